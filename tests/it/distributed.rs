//! The redis backend as it is deployed: `kiln front` and `kiln worker` as
//! separate processes sharing one Redis and one storage directory.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use crate::kiln::{preheat_url, test_config_toml, until_ready};
use crate::support::{
    dimensions, eventually, free_port, jpeg, CallbackSink, CountingListener, Origin,
    OriginResponse, RedisServer,
};

/// A kiln child process, killed when dropped.
pub struct Process(Child);

impl Process {
    pub fn spawn(command: &mut Command) -> Process {
        Process(command.spawn().expect("start kiln"))
    }

    /// `kiln --config <config> <role>` with `RUST_LOG=info`, its stdout
    /// (where tracing writes) and stderr both written to `log`.
    pub(crate) fn start(role: &str, config: &Path, log: &Path) -> Process {
        Self::start_with_args(&[role], config, log)
    }

    /// Like `start`, with more arguments after `--config <config>`.
    pub(crate) fn start_with_args(args: &[&str], config: &Path, log: &Path) -> Process {
        let log = std::fs::File::create(log).unwrap();
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["--config", config.to_str().unwrap()])
                .args(args)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
    }
}

impl Process {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`, …) with `kill(1)`.
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} {} failed", self.pid());
    }

    /// The exit status once the process has ended, without waiting.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().expect("try_wait")
    }

    /// Waits (bounded by `timeout`) for the process to end.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let what = format!("kiln process {} to exit", self.pid());
        eventually(timeout, &what, || {
            let exited = self.exited();
            async move { exited }
        })
        .await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One config for fronts and workers: its base URL, and a temp dir holding
/// the config, the storage (`<dir>/storage`) and the processes' logs.
pub(crate) struct Deployment {
    pub(crate) base: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: std::path::PathBuf,
}

pub(crate) fn deployment(redis: &RedisServer, extra: &str) -> Deployment {
    deployment_on(Some(redis), extra)
}

/// A deployment on the embedded backend: one `kiln serve` process.
pub(crate) fn embedded_deployment(extra: &str) -> Deployment {
    deployment_on(None, extra)
}

fn deployment_on(redis: Option<&RedisServer>, extra: &str) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let storage = dir.path().join("storage");
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, test_config_toml(port, &storage, redis, extra)).unwrap();
    Deployment {
        base: format!("http://127.0.0.1:{port}"),
        dir,
        config,
    }
}

pub(crate) async fn wait_healthy(base: &str) {
    until_ready(&format!("{base}/healthz")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_and_worker_processes_share_redis_and_storage() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "");
    let _front = Process::start("front", &d.config, &d.dir.path().join("front.log"));
    let _worker = Process::start("worker", &d.config, &d.dir.path().join("worker.log"));
    wait_healthy(&d.base).await;
    assert_eq!(
        reqwest::get(format!("{}/readyz", d.base))
            .await
            .unwrap()
            .status(),
        200
    );

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/p.jpg",
        OriginResponse::image("image/jpeg", jpeg(1000, 1000, [90, 90, 90])),
    );
    let request = preheat_url(
        &d.base,
        "medium",
        &origin.url("/p.jpg"),
        Some(&sink.url("/done?code=1")),
    );
    let answer: serde_json::Value = reqwest::get(&request).await.unwrap().json().await.unwrap();
    let hooks = sink.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(hooks[0].body["status"], "done", "{:?}", hooks[0].body);
    let path = answer["path"].as_str().unwrap();
    let bytes = until_ready(&format!("{}/media/cache/medium/{path}", d.base))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(dimensions(&bytes), (400, 400));

    // A miss on another filter goes front → stream → worker process.
    let square = format!("{}/media/cache/square/{path}", d.base);
    assert_eq!(reqwest::get(&square).await.unwrap().status(), 202);
    let square_bytes = until_ready(&square).await.bytes().await.unwrap();
    assert_eq!(dimensions(&square_bytes), (300, 300));

    // Redis wiped: every stored variant is still served, nothing re-fetched.
    assert_eq!(redis.redis_cli(&["FLUSHALL"]), "+OK");
    let after_wipe = reqwest::get(format!("{}/media/cache/medium/{path}", d.base))
        .await
        .unwrap();
    assert_eq!(after_wipe.status(), 200);
    assert_eq!(after_wipe.bytes().await.unwrap(), bytes);
    assert_eq!(origin.hits("/p.jpg"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_by_a_dead_worker_is_reclaimed_and_called_back_once() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "[queue]\nvisibility_timeout_secs = 1\n");
    let _front = Process::start("front", &d.config, &d.dir.path().join("front.log"));
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/q.jpg",
        OriginResponse::image("image/jpeg", jpeg(600, 400, [10, 200, 10])),
    );
    let request = preheat_url(
        &d.base,
        "tiny",
        &origin.url("/q.jpg"),
        Some(&sink.url("/cb")),
    );
    assert_eq!(reqwest::get(&request).await.unwrap().status(), 202);
    assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:preheat"]), 1);

    // A worker claims the job and dies without acknowledging it.
    let created = redis.redis_cli(&[
        "XGROUP",
        "CREATE",
        "kiln:jobs:preheat",
        "kiln-workers",
        "0",
        "MKSTREAM",
    ]);
    assert!(
        created == "+OK" || created.contains("BUSYGROUP"),
        "{created}"
    );
    let taken = redis.redis_cli(&[
        "XREADGROUP",
        "GROUP",
        "kiln-workers",
        "ghost",
        "COUNT",
        "1",
        "STREAMS",
        "kiln:jobs:preheat",
        ">",
    ]);
    assert!(taken.contains("q.jpg"), "{taken}");

    let _worker = Process::start("worker", &d.config, &d.dir.path().join("worker.log"));
    let hooks = sink.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(hooks[0].body["status"], "done");
    // Acked and removed: nothing pending, nothing left, one callback.
    eventually(Duration::from_secs(10), "stream drained", || async {
        (redis.redis_int(&["XLEN", "kiln:jobs:preheat"]) == 0).then_some(())
    })
    .await;
    let pending = redis.redis_cli(&["XPENDING", "kiln:jobs:preheat", "kiln-workers"]);
    assert!(pending.starts_with("*4\r\n:0"), "{pending}");
    assert_eq!(sink.count(), 1);
    assert_eq!(origin.hits("/q.jpg"), 1);
}

/// A front answers misses of a variant it has just queued from memory: a
/// storm of them makes no Redis look-up and no second job, until the mark
/// expires (`index.negative_ttl_secs`); then one look-up finds the render
/// still pending and queues nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_misses_of_a_queued_variant_are_answered_from_memory() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "[index]\nnegative_ttl_secs = 1\n");
    let original = d.dir.path().join("storage/acme/0/a.jpg");
    std::fs::create_dir_all(original.parent().unwrap()).unwrap();
    std::fs::write(&original, jpeg(300, 200, [10, 120, 200])).unwrap();
    // No worker: the job stays queued.
    let _front = Process::start("front", &d.config, &d.dir.path().join("front.log"));
    wait_healthy(&d.base).await;
    let url = format!("{}/media/cache/small/acme/0/a.jpg", d.base);
    let client = reqwest::Client::new();
    let status = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };

    assert_eq!(status(url.clone()).await, 202);
    let lookups = redis.command_calls("hgetall");
    assert!(lookups >= 1, "the first miss looked the variant up");
    assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:urgent"]), 1);

    let storm: Vec<u16> = futures::future::join_all((0..50).map(|_| status(url.clone()))).await;
    assert!(storm.iter().all(|s| *s == 202), "{storm:?}");
    assert_eq!(
        redis.command_calls("hgetall"),
        lookups,
        "answered from memory"
    );
    assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:urgent"]), 1);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(status(url.clone()).await, 202);
    assert_eq!(
        redis.command_calls("hgetall"),
        lookups + 1,
        "looked up once the mark expired"
    );
    assert_eq!(
        redis.redis_int(&["XLEN", "kiln:jobs:urgent"]),
        1,
        "still one job"
    );
}

/// A first miss makes two Redis round trips: the index look-up, then one
/// script that marks the variant absent until rendered and queues its job.
/// The storage probe's "absent" is not sent on its own (no `SETEX`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_miss_marks_the_variant_and_queues_it_in_one_script() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "");
    let original = d.dir.path().join("storage/acme/0/b.jpg");
    std::fs::create_dir_all(original.parent().unwrap()).unwrap();
    std::fs::write(&original, jpeg(300, 200, [10, 120, 200])).unwrap();
    // No worker: the job stays queued and the marker stays.
    let _front = Process::start("front", &d.config, &d.dir.path().join("front.log"));
    wait_healthy(&d.base).await;
    let (setex, hgetall) = (redis.command_calls("setex"), redis.command_calls("hgetall"));

    let url = format!("{}/media/cache/small/acme/0/b.jpg", d.base);
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 202);

    assert_eq!(redis.command_calls("hgetall"), hgetall + 1, "one look-up");
    assert_eq!(redis.command_calls("setex"), setex, "no marker sent alone");
    assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:urgent"]), 1);
    let ttl = redis.redis_int(&["TTL", "kiln:absent:media/cache/small/acme/0/b.jpg"]);
    assert!(
        (3000..=3600).contains(&ttl),
        "absent until rendered (absent_ttl_secs), set by the script: TTL {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_proxy_variables_are_ignored() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "");
    // A proxy would dial on kiln's behalf, past the address guard.
    let proxy = CountingListener::start("127.0.0.1", 0, "text/plain", b"proxied".to_vec()).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let log = std::fs::File::create(d.dir.path().join("serve.log")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["--config", d.config.to_str().unwrap(), "serve"])
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env(var, &proxy_url);
    }
    let _kiln = Process::spawn(&mut command);
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/direct.jpg",
        OriginResponse::image("image/jpeg", jpeg(300, 200, [40, 80, 120])),
    );
    let request = preheat_url(
        &d.base,
        "tiny",
        &origin.url("/direct.jpg"),
        Some(&sink.url("/cb")),
    );
    assert_eq!(reqwest::get(&request).await.unwrap().status(), 202);
    let hooks = sink.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(hooks[0].body["status"], "done", "{:?}", hooks[0].body);
    assert_eq!(origin.hits("/direct.jpg"), 1);
    assert_eq!(proxy.connections(), 0, "the proxy variables were followed");
}
