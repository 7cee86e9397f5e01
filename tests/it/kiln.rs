//! Starts kiln in-process on a free port with a temp-dir storage, on either
//! backend, and stops it when dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::app::{Role, Running};
use kiln::config::{Config, Sources};

use crate::support::{eventually, free_port, RedisServer};

/// Runs each `async fn name(backend: Backend)` as two tests, `embedded::name`
/// and `redis::name`: one contract, both backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::kiln::Backend::Embedded).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::kiln::Backend::Redis).await
                }
            )*
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
}

/// The admin key every test kiln is configured with.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// Config for a test kiln: loopback only, fast timeouts, storage in `dir`,
/// with `extra` TOML merged over it.
pub fn test_config_toml(port: u16, dir: &Path, redis: Option<&RedisServer>, extra: &str) -> String {
    let backend = match redis {
        Some(r) => format!("[queue]\nbackend = \"redis\"\nclaim_block_ms = 200\nvisibility_timeout_secs = 30\n[redis]\nurl = \"{}\"\n", r.url()),
        None => "[queue]\nbackend = \"embedded\"\nclaim_block_ms = 200\nvisibility_timeout_secs = 30\n".to_string(),
    };
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ngrace_period_secs = 0\ngraceful_shutdown_timeout_secs = 1\n\
         [storage]\nurl = \"{}\"\n[network]\nallow = [\"127.0.0.1/32\"]\n[callback]\nbackoff_ms = 50\npoll_ms = 50\n\
         [auth]\nadmin_key = \"{ADMIN_KEY}\"\n{backend}",
        dir.display()
    );
    merged(&base, extra)
}

/// Merges two TOML documents so a test's `extra` can override the base tables.
fn merged(base: &str, extra: &str) -> String {
    let mut doc: toml::Table = base.parse().expect("base toml");
    let extra: toml::Table = extra.parse().expect("extra toml");
    for (table, values) in extra {
        match (doc.get_mut(&table), values) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => into.extend(from),
            (_, v) => {
                doc.insert(table, v);
            }
        }
    }
    toml::to_string(&doc).expect("toml")
}

/// A kiln (front and worker) on a Redis and storage directory that outlive
/// it: the handle that keeps it running, and its base URL.
pub fn start_on(redis: &RedisServer, dir: &Path, extra: &str) -> (kiln::app::Running, String) {
    spawn_serving(Some(redis), dir, extra)
}

/// A kiln serving the storage in `dir`, on `redis` or the embedded queue.
fn spawn_serving(
    redis: Option<&RedisServer>,
    dir: &Path,
    extra: &str,
) -> (kiln::app::Running, String) {
    let port = free_port();
    let toml = test_config_toml(port, dir, redis, extra);
    let config = Config::load_from(Sources {
        extra_toml: Some(&toml),
        ..Default::default()
    })
    .expect("test config");
    let running = kiln::app::spawn(config, Role::Serve).expect("spawn kiln");
    (running, format!("http://127.0.0.1:{port}"))
}

pub struct Kiln {
    pub base: String,
    pub dir: tempfile::TempDir,
    _redis: Option<RedisServer>,
    running: Option<Running>,
}

impl Kiln {
    pub async fn start(backend: Backend) -> Kiln {
        Self::start_with(backend, "").await
    }

    /// `extra` is TOML merged over the test defaults.
    pub async fn start_with(backend: Backend, extra: &str) -> Kiln {
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = (backend == Backend::Redis).then(RedisServer::start);
        let (running, base) = spawn_serving(redis.as_ref(), dir.path(), extra);
        let kiln = Kiln {
            base,
            dir,
            _redis: redis,
            running: Some(running),
        };
        kiln.wait_healthy().await;
        kiln
    }

    pub async fn wait_healthy(&self) {
        until_ready(&self.url("/healthz")).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The test's own redis-server (Redis backend only).
    pub fn redis(&self) -> Option<&RedisServer> {
        self._redis.as_ref()
    }

    /// The test's redis-server, to kill and restart (Redis backend only).
    pub fn redis_mut(&mut self) -> &mut RedisServer {
        self._redis.as_mut().expect("a Redis-backed kiln")
    }

    pub fn storage_path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Puts an original straight into storage, as another system would.
    pub fn store(&self, relative: &str, bytes: &[u8]) {
        let path = self.storage_path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().expect("kiln stops cleanly");
        }
    }
}

/// Polls a URL until it answers 200, returning the response.
pub async fn until_ready(url: &str) -> reqwest::Response {
    eventually(
        Duration::from_secs(30),
        &format!("{url} answers 200"),
        || async move {
            let r = reqwest::get(url).await.ok()?;
            (r.status() == 200).then_some(r)
        },
    )
    .await
}

/// POSTs `body` as JSON with `key` as a Bearer token; the status and the
/// answer parsed as JSON (`Null` when it is not JSON).
pub async fn post_json(
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    send_json(reqwest::Client::new().post(url).json(body), key).await
}

/// GETs with `key` as a Bearer token; the status and the JSON answer.
pub async fn get_json(url: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    send_json(reqwest::Client::new().get(url), key).await
}

async fn send_json(
    mut request: reqwest::RequestBuilder,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Sets up an account with the admin key; its answer (apiKey, webhookSecret, …).
pub async fn setup_account(base: &str, root: &str, approx: u64) -> serde_json::Value {
    let (status, answer) = post_json(
        &format!("{base}/account_setup"),
        Some(ADMIN_KEY),
        &serde_json::json!({"root": root, "approx": approx}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// A pre-heat URL with the admin key:
/// `<base>/request/<filter>?url=…[&callback=…]&token=…`, encoded.
/// Pre-heats `image_url` through `/request/<filter>` with the admin key;
/// the JSON answer (code, path, url, status, record).
pub async fn preheat(
    base: &str,
    filter: &str,
    image_url: &str,
    callback: Option<&str>,
) -> serde_json::Value {
    let response = reqwest::get(preheat_url(base, filter, image_url, callback))
        .await
        .expect("pre-heat request");
    response.json().await.expect("pre-heat answer")
}

pub fn preheat_url(base: &str, filter: &str, image_url: &str, callback: Option<&str>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("token", ADMIN_KEY);
    query.append_pair("url", image_url);
    if let Some(callback) = callback {
        query.append_pair("callback", callback);
    }
    format!("{base}/request/{filter}?{}", query.finish())
}
