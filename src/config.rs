//! Typed settings. Layers, later wins: the embedded `config/default.toml`, an
//! optional file (`--config` / `KILN_CONFIG`), then `KILN_<SECTION>__<KEY>`
//! environment variables. `validate()` runs before any port binds.
//! Owns no I/O beyond reading the config file.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The defaults compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub queue: QueueConfig,
    pub redis: RedisConfig,
    pub index: IndexConfig,
    pub fetch: FetchConfig,
    pub callback: CallbackConfig,
    pub imaging: ImagingConfig,
    pub network: NetworkConfig,
    pub filters: FiltersConfig,
    pub auth: AuthConfig,
    pub sais: SaisConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub ui: UiConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,pingora_core=warn`; `RUST_LOG`
    /// wins when set. Default `info,pingora_core=warn`.
    pub level: String,
    /// One `info` line per answered request (target `kiln::access`), like
    /// nginx's `access_log`. Default true.
    pub access_log: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// host:port of a separate listener serving `/metrics` and `/healthz`,
    /// in any role; a `kiln worker` has no other HTTP port. The front
    /// always serves `/metrics` on its own port. Empty = none. Default empty.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiConfig {
    /// Serve the `/ui` status page on the front. Default true.
    pub enabled: bool,
    /// Finished jobs kept for the page (a capped Redis list with the redis
    /// backend, in memory otherwise). Default 50.
    pub recent_jobs: usize,
    /// Seconds of recent jobs the throughput figure covers. Default 60.
    pub throughput_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// host:port the front listens on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Base URL for variant URLs in records and callbacks; empty = `http://<listen>`.
    pub public_url: String,
    /// Threads of the front (with `reuseport`, one listening socket each). Default 2.
    pub threads: usize,
    /// One listening socket (`SO_REUSEPORT`) and one single-threaded
    /// runtime per front thread: the kernel spreads connections and each is
    /// served on the thread that accepted it, like nginx's `reuseport`.
    /// Off, one accept loop hands connections to the threads. Default true
    /// (benches/load: more hits per second for less CPU, a longer p99 tail
    /// with few connections).
    pub reuseport: bool,
    /// With `reuseport` off, whether the front's threads take each other's
    /// connections (tokio work stealing). Default false. kiln started
    /// in-process (`app::spawn`) always steals: pingora's no-steal runtime
    /// supports one front per process.
    pub work_stealing: bool,
    /// Per-connection write buffer, bytes. Default 0: answers on kept-open
    /// connections leave in one vectored write from their own bytes
    /// (`front::one_write`), which a buffer would only copy.
    pub write_buffer_bytes: usize,
    /// A front thread yields its core after this many answers, so that a
    /// thread that never blocks under load does not hold its connections
    /// off for a whole scheduler tick when it is switched out. 0 = never.
    /// Default 16.
    pub yield_every_responses: u32,
    /// Seconds of graceful shutdown before runtimes stop. Default 5.
    pub grace_period_secs: u64,
    /// Seconds runtimes get to finish after the grace period. Default 5.
    pub graceful_shutdown_timeout_secs: u64,
    /// Unix socket over which a `--upgrade` start takes the running kiln's
    /// listening sockets (on its SIGQUIT). Default `/tmp/kiln_upgrade.sock`.
    pub upgrade_sock: String,
    /// Seconds a `--upgrade` start waits for the old kiln's sockets. Default 30.
    pub upgrade_wait_secs: u64,
    /// `Cache-Control: max-age` of stored variants, seconds. Default one year.
    pub cache_max_age_secs: u64,
    /// `Retry-After` of a 202 busy answer, seconds. Default 2.
    pub retry_after_secs: u64,
    /// Longest accepted request path, bytes. Default 1024.
    pub max_path_bytes: usize,
    /// Largest accepted request body, bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// What a 202 carries: a BlurHash `preview`, a 1x1 `pixel`, `none`, or
    /// a `redirect` (302) to `placeholder_redirect_url`. Default `preview`.
    pub miss_body: MissBody,
    /// Where `miss_body = "redirect"` sends a miss. Default empty.
    pub placeholder_redirect_url: String,
    /// Longer side of a preview placeholder, pixels. Default 32.
    pub placeholder_max_side: u32,
    /// Memory for rendered previews, bytes. Default 4 MiB.
    pub placeholder_cache_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// A directory, `file:///abs/dir` or `s3://bucket/prefix`. Default `./var`.
    pub url: String,
    /// Account root used by `/request`. Default `default`.
    pub default_root: String,
    /// Estimated image count of the default root (sizes its bins). Default 1000.
    pub default_approx: u64,
    /// S3 endpoint URL (MinIO, moto, another S3-compatible server); empty =
    /// AWS, or `AWS_ENDPOINT_URL` when set. Default empty.
    pub s3_endpoint: String,
    /// S3 region; empty = `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`. Default empty.
    pub s3_region: String,
    /// Path-style requests (`<endpoint>/<bucket>/<key>`) instead of
    /// virtual-hosted ones (`<bucket>.<endpoint>/<key>`); most S3-compatible
    /// servers want path style. Default true.
    pub s3_path_style: bool,
    /// Allow a plain `http://` endpoint (a loopback test server). Default
    /// false; `AWS_ALLOW_HTTP=true` also allows it.
    pub s3_allow_http: bool,
    /// Access key id; empty = from the environment as the AWS tools read it
    /// (`AWS_ACCESS_KEY_ID`, then web identity or instance metadata). Default empty.
    pub s3_access_key_id: String,
    /// Secret access key; empty = from the environment (`AWS_SECRET_ACCESS_KEY`). Default empty.
    pub s3_secret_access_key: String,
    /// Milliseconds one S3 request may take, body included. Default 30 000.
    pub s3_request_timeout_ms: u64,
    /// Milliseconds to connect to S3. Default 5000.
    pub s3_connect_timeout_ms: u64,
    /// Retries of an S3 request that failed retryably (transport error,
    /// 5xx, throttling). Default 3.
    pub s3_max_retries: usize,
    /// Milliseconds after the first attempt past which an S3 request is no
    /// longer retried. Default 10 000.
    pub s3_retry_timeout_ms: u64,
    /// Descriptors of local variant files kept open between reads (0 =
    /// none); at most a quarter of the process's descriptor limit. Default 1000.
    pub open_files_max: u64,
    /// Milliseconds a kept descriptor may go unread before it is closed. Default 60 000.
    pub open_files_idle_ms: u64,
    /// Lifetime of a media record's lock in Redis, milliseconds: its holder
    /// renews it every third of this while it reads and writes the record,
    /// and a process that dies holding it blocks that record this long.
    /// At least 30. Default 30 000.
    pub record_lock_ttl_ms: u64,
    /// Milliseconds a change to a media record waits for another process's
    /// lock on it before failing (retryably). Default 5 000.
    pub record_lock_wait_ms: u64,
}

/// The body of a 202 busy answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissBody {
    Preview,
    Pixel,
    None,
    Redirect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// `embedded` or `redis`. Default `embedded`.
    pub backend: QueueBackend,
    /// Seconds a variant stays marked in flight. Default 300.
    pub inflight_ttl_secs: u64,
    /// Seconds before an unacked claimed job is reclaimed. Default 60.
    pub visibility_timeout_secs: u64,
    /// Attempts before dead-lettering. Default 5.
    pub max_attempts: u32,
    /// Milliseconds before retrying a job that failed retryably (timeout,
    /// 5xx, 429); doubles each attempt. Default 2000.
    pub retry_backoff_ms: u64,
    /// Longest wait between two attempts, in milliseconds. Default 300 000.
    pub max_retry_backoff_ms: u64,
    /// Dead letters kept (older ones are dropped). Default 10 000.
    pub dead_letter_max: u64,
    /// Jobs one worker process runs at once. Default 4, twice the render
    /// threads: while one job fetches, stores or calls back, another keeps
    /// its render thread busy.
    pub worker_concurrency: usize,
    /// Threads of the workers' async runtime: claims, downloads, storage
    /// calls, Redis and webhooks (rendering has threads of its own).
    /// Default 1: that work is about a sixth of a render's CPU, and each
    /// extra thread wakes and preempts the render threads for nothing.
    pub worker_threads: usize,
    /// Milliseconds a claim blocks waiting for work. Default 1000.
    pub claim_block_ms: u64,
    /// Seconds a stopping worker gets to finish its jobs. Default 10.
    pub shutdown_deadline_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key. Default `kiln:`.
    pub prefix: String,
    /// Consumer group of the workers. Default `kiln-workers`.
    pub group: String,
    /// Milliseconds to connect or answer. Default 2000.
    pub timeout_ms: u64,
    /// Milliseconds Redis calls fail at once after a connection failure,
    /// before one call probes again. Default 1000.
    pub breaker_cooldown_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// Variant index entries kept in memory. Default 100 000.
    pub max_entries: u64,
    /// Seconds an index entry stays in memory. Default 3600.
    pub ttl_secs: u64,
    /// Bytes of hot variant data in memory. Default 64 MiB.
    pub hot_bytes: u64,
    /// Largest variant kept hot, bytes; larger local ones are sent by
    /// `sendfile`. Default 1 MiB.
    pub hot_max_object_bytes: u64,
    /// Seconds a negative answer (original missing, variant just queued) is
    /// remembered; misses of a variant this front just queued are answered
    /// from memory that long. Default 2.
    pub negative_ttl_secs: u64,
    /// Seconds "storage does not hold this variant, its render is queued"
    /// is remembered (in Redis with that backend, so every front and worker
    /// shares it), so misses never ask storage about it again; recording the
    /// rendered variant clears it at once. Without a queued render, the
    /// answer lives `negative_ttl_secs`. Default 3600.
    pub absent_ttl_secs: u64,
    /// Seconds a variant whose job failed for good answers that failure
    /// instead of being queued again. Default 300.
    pub failure_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    /// Milliseconds to connect to an origin. Default 5000.
    pub connect_timeout_ms: u64,
    /// Milliseconds from sending the request to the response headers. Default 10 000.
    pub first_byte_timeout_ms: u64,
    /// Milliseconds for a whole download. Default 30 000.
    pub total_timeout_ms: u64,
    /// Largest original, bytes. Default 50 MiB.
    pub max_bytes: u64,
    /// Redirects followed. Default 5.
    pub max_redirects: usize,
    /// User-Agent sent to origins.
    pub user_agent: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackConfig {
    /// Milliseconds one callback POST may take. Default 10 000.
    pub timeout_ms: u64,
    /// Delivery attempts per webhook. Default 12.
    pub max_attempts: u32,
    /// Milliseconds before the first retry, doubling. Default 1000.
    pub backoff_ms: u64,
    /// Longest wait between two attempts, milliseconds. Default one hour.
    pub max_backoff_ms: u64,
    /// Milliseconds between looks at the outbox for due deliveries. Default 200.
    pub poll_ms: u64,
    /// Webhook POSTs in flight per worker process. Default 16.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Key that sets up accounts and may act on any root. Empty: a random
    /// one is generated at start and logged. Default empty.
    pub admin_key: String,
    /// Require an account's API key for dispatch, pre-heat and media JSON.
    /// `false` lets legacy SAIS clients, which send none, in. Default true.
    pub require_api_key: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaisConfig {
    /// Filters rendered when a dispatch names none. Default small, medium.
    pub default_filters: Vec<String>,
    /// Longest a `wait: true` dispatch holds its answer, milliseconds. Default 20 000.
    pub wait_timeout_ms: u64,
    /// Most images in one dispatch. Default 1000.
    pub max_images: usize,
    /// Most filters one dispatch renders, a name given twice counted once:
    /// each is a render of every image. Default 16.
    pub max_filters: usize,
    /// Longest accepted image URL, bytes. Default 4096.
    pub max_url_bytes: usize,
    /// Largest accepted `context`, bytes of JSON. Default 16 KiB.
    pub max_context_bytes: usize,
    /// Estimated image count of an account set up without one. Default 1000.
    pub default_approx: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagingConfig {
    /// Largest source width, pixels. Default 16 384.
    pub max_width: u32,
    /// Largest source height, pixels. Default 16 384.
    pub max_height: u32,
    /// Largest source area, pixels. Default 50 MP.
    pub max_pixels: u64,
    /// Bytes a decoder may allocate. Default 512 MiB.
    pub max_alloc_bytes: u64,
    /// Most scans a progressive JPEG may have (each one re-walks the whole
    /// coefficient buffer). Default 100.
    pub max_jpeg_scans: u32,
    /// Largest box (width x height) a filter with `format = "avif"` may
    /// have: AVIF encodes take 0.2-3 s. Default 640 000 (800x800).
    pub avif_max_pixels: u64,
    /// Largest variant a filter chain may make, pixels. Default 40 MP.
    pub max_output_pixels: u64,
    /// Frames an `animated` GIF filter keeps; more: its first frame. Default 200.
    pub max_animation_frames: u32,
    /// Pixels over all frames of an animation; more: its first frame. Default 50 M.
    pub max_animation_pixels: u64,
    /// Long-lived render threads per worker process. Default 2.
    pub render_threads: usize,
    /// Nice value of the render threads (0-19): a front, webhooks and
    /// anything else at nice 0 get the core first when both want it. Default 10.
    pub render_nice: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// CIDRs fetches and callbacks may reach although non-public. Default none.
    pub allow: Vec<String>,
    /// Host names fetches and callbacks may reach whatever they resolve to;
    /// `.example.com` covers subdomains. Default none.
    pub allow_hosts: Vec<String>,
    /// DNS servers (`ip:port`) to resolve with; empty = the system resolver.
    pub nameservers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiltersConfig {
    /// TOML file of filter presets; empty = the embedded `config/filters.toml`.
    pub file: String,
    /// A LiipImagineBundle YAML (`liip_imagine:`) whose filter sets are the
    /// presets; the alternative to `file`. Default empty.
    pub liip_yaml: String,
    /// Lay out as Liip literally does: EXIF orientation only at an
    /// `auto_rotate` step, `allow_upscale` ignored. Default false.
    pub liip_literal: bool,
    /// Whether `w500`, `x600` and `300x400` work as filter names. Default true.
    pub size_urls: bool,
    /// Widest size a size URL may ask for, pixels (over: 406). Default 2048.
    pub size_max_width: u32,
    /// Tallest size a size URL may ask for, pixels (over: 406). Default 2048.
    pub size_max_height: u32,
    /// The only size names allowed (others: 404); empty = any up to the maximum. Default empty.
    pub size_allowed: Vec<String>,
    /// Quality of size-URL variants, 1-100. Default 82.
    pub size_quality: u8,
}

/// The longest any time setting may be: ten years.
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 24 * 3600;

/// The `KILN_<SECTION>__<KEY>` environment variables, read as figment's
/// `Env` reads them (a number, a bool, an array in TOML's syntax) except
/// that a setting whose default is text keeps the variable's text as it
/// is: `Env` made `KILN_AUTH__ADMIN_KEY=123456` a number, refused for a
/// text setting, and would have made `007` seven.
struct EnvSettings {
    /// (`section.key`, value) pairs.
    pairs: Vec<(String, String)>,
}

impl EnvSettings {
    /// Only names with `__` are settings. Others are not ours: KILN_CONFIG
    /// names the file, KILN_API_KEY is the CLI's key, and Kubernetes gives
    /// a Service named kiln KILN_PORT and friends.
    fn from_vars(vars: impl IntoIterator<Item = (OsString, OsString)>) -> EnvSettings {
        let pairs = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let name = name.to_string_lossy();
                let setting = name
                    .get(..5)?
                    .eq_ignore_ascii_case("KILN_")
                    .then(|| &name[5..])?;
                if !setting.contains("__") {
                    return None;
                }
                let key = setting.trim().replace("__", ".").to_ascii_lowercase();
                if key.split('.').any(str::is_empty) {
                    return None;
                }
                Some((key, value.to_string_lossy().into_owned()))
            })
            .collect();
        EnvSettings { pairs }
    }
}

impl figment::Provider for EnvSettings {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("`KILN_` environment variable(s)")
    }

    fn data(
        &self,
    ) -> std::result::Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let defaults = Figment::from(Toml::string(DEFAULT_TOML));
        let mut settings = Dict::new();
        for (key, text) in &self.pairs {
            let value = match defaults.find_value(key) {
                Ok(Value::String(..)) => Value::from(text.clone()),
                _ => text.parse().expect("a value parses from any text"),
            };
            if let Some(nested) = figment::util::nest(key, value).into_dict() {
                merge_into(&mut settings, nested);
            }
        }
        Ok(figment::Profile::Default.collect(settings))
    }
}

/// Adds `from` to `into`, keys of `from` winning, tables merged.
fn merge_into(into: &mut Dict, from: Dict) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Dict(_, existing)), Value::Dict(_, more)) => merge_into(existing, more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Where the settings come from, beyond the embedded defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources<'a> {
    /// A TOML config file.
    pub file: Option<&'a Path>,
    /// Extra TOML text merged after the file (tests and the CLI use it).
    pub extra_toml: Option<&'a str>,
    /// Read `KILN_*` environment variables last.
    pub env: bool,
}

impl Config {
    /// Defaults, then `KILN_CONFIG` or the given file, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let env_file = std::env::var_os("KILN_CONFIG").map(PathBuf::from);
        let file = file.or(env_file.as_deref());
        Self::load_from(Sources {
            file,
            extra_toml: None,
            env: true,
        })
    }

    pub fn load_from(sources: Sources<'_>) -> Result<Config> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = sources.file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        if let Some(extra) = sources.extra_toml {
            figment = figment.merge(Toml::string(extra));
        }
        if sources.env {
            figment = figment.merge(EnvSettings::from_vars(std::env::vars_os()));
        }
        Self::extract(figment)
    }

    fn extract(figment: Figment) -> Result<Config> {
        let config: Config = figment
            .extract()
            .map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Every time setting, in whole seconds.
    fn durations_secs(&self) -> [(&'static str, u64); 32] {
        let ms = |ms: u64| ms / 1000;
        [
            ("ui.throughput_window_secs", self.ui.throughput_window_secs),
            ("server.grace_period_secs", self.server.grace_period_secs),
            (
                "server.graceful_shutdown_timeout_secs",
                self.server.graceful_shutdown_timeout_secs,
            ),
            ("server.upgrade_wait_secs", self.server.upgrade_wait_secs),
            ("server.cache_max_age_secs", self.server.cache_max_age_secs),
            ("server.retry_after_secs", self.server.retry_after_secs),
            (
                "storage.s3_request_timeout_ms",
                ms(self.storage.s3_request_timeout_ms),
            ),
            (
                "storage.s3_connect_timeout_ms",
                ms(self.storage.s3_connect_timeout_ms),
            ),
            (
                "storage.s3_retry_timeout_ms",
                ms(self.storage.s3_retry_timeout_ms),
            ),
            (
                "storage.open_files_idle_ms",
                ms(self.storage.open_files_idle_ms),
            ),
            (
                "storage.record_lock_ttl_ms",
                ms(self.storage.record_lock_ttl_ms),
            ),
            (
                "storage.record_lock_wait_ms",
                ms(self.storage.record_lock_wait_ms),
            ),
            ("queue.inflight_ttl_secs", self.queue.inflight_ttl_secs),
            (
                "queue.visibility_timeout_secs",
                self.queue.visibility_timeout_secs,
            ),
            ("queue.retry_backoff_ms", ms(self.queue.retry_backoff_ms)),
            (
                "queue.max_retry_backoff_ms",
                ms(self.queue.max_retry_backoff_ms),
            ),
            ("queue.claim_block_ms", ms(self.queue.claim_block_ms)),
            (
                "queue.shutdown_deadline_secs",
                self.queue.shutdown_deadline_secs,
            ),
            ("redis.timeout_ms", ms(self.redis.timeout_ms)),
            (
                "redis.breaker_cooldown_ms",
                ms(self.redis.breaker_cooldown_ms),
            ),
            ("index.ttl_secs", self.index.ttl_secs),
            ("index.negative_ttl_secs", self.index.negative_ttl_secs),
            ("index.absent_ttl_secs", self.index.absent_ttl_secs),
            ("index.failure_ttl_secs", self.index.failure_ttl_secs),
            (
                "fetch.connect_timeout_ms",
                ms(self.fetch.connect_timeout_ms),
            ),
            (
                "fetch.first_byte_timeout_ms",
                ms(self.fetch.first_byte_timeout_ms),
            ),
            ("fetch.total_timeout_ms", ms(self.fetch.total_timeout_ms)),
            ("callback.timeout_ms", ms(self.callback.timeout_ms)),
            ("callback.backoff_ms", ms(self.callback.backoff_ms)),
            ("callback.max_backoff_ms", ms(self.callback.max_backoff_ms)),
            ("callback.poll_ms", ms(self.callback.poll_ms)),
            ("sais.wait_timeout_ms", ms(self.sais.wait_timeout_ms)),
        ]
    }

    /// Checks every value that could only fail later, with a message naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("{key}: {why}")));
        // A time past this is a typo, and some panic where it is used
        // (moka's caches refuse a lifetime over 1000 years, `Instant + d`
        // overflows).
        for (key, secs) in self.durations_secs() {
            if secs > MAX_DURATION_SECS {
                return bad(key, format!("more than {MAX_DURATION_SECS} s (ten years)"));
            }
        }
        if self.listen_addr().is_err() {
            return bad(
                "server.listen",
                format!("{:?} is not host:port", self.server.listen),
            );
        }
        if !self.server.public_url.is_empty() && url::Url::parse(&self.server.public_url).is_err() {
            return bad(
                "server.public_url",
                format!("{:?} is not a URL", self.server.public_url),
            );
        }
        if self.server.threads == 0 {
            return bad("server.threads", "must be at least 1".into());
        }
        if self.server.miss_body == MissBody::Redirect
            && url::Url::parse(&self.server.placeholder_redirect_url).is_err()
        {
            return bad(
                "server.placeholder_redirect_url",
                "miss_body = \"redirect\" needs a URL".into(),
            );
        }
        if self.server.placeholder_max_side == 0 || self.server.placeholder_max_side > 256 {
            return bad("server.placeholder_max_side", "must be 1-256".into());
        }
        if self.storage.url.trim().is_empty() {
            return bad("storage.url", "must not be empty".into());
        }
        if self.storage.s3_request_timeout_ms == 0 || self.storage.s3_connect_timeout_ms == 0 {
            return bad(
                "storage.s3_request_timeout_ms / s3_connect_timeout_ms",
                "must be positive".into(),
            );
        }
        // Renewed every third of it, and a renewal is a Redis round trip.
        if self.storage.record_lock_ttl_ms < 30 {
            return bad("storage.record_lock_ttl_ms", "must be at least 30".into());
        }
        if !self.storage.s3_endpoint.is_empty()
            && url::Url::parse(&self.storage.s3_endpoint).is_err()
        {
            return bad(
                "storage.s3_endpoint",
                format!("{:?} is not a URL", self.storage.s3_endpoint),
            );
        }
        crate::keys::validate_root(&self.storage.default_root)
            .or_else(|e| bad("storage.default_root", e.to_string()))?;
        if self.queue.worker_concurrency == 0 {
            return bad("queue.worker_concurrency", "must be at least 1".into());
        }
        if self.queue.worker_threads == 0 {
            return bad("queue.worker_threads", "must be at least 1".into());
        }
        if self.queue.max_attempts == 0 {
            return bad("queue.max_attempts", "must be at least 1".into());
        }
        // 0 would make an idle claim loop spin, never yielding its thread.
        if self.queue.claim_block_ms == 0 {
            return bad("queue.claim_block_ms", "must be at least 1".into());
        }
        if self.queue.visibility_timeout_secs == 0 || self.queue.inflight_ttl_secs == 0 {
            return bad(
                "queue.visibility_timeout_secs / inflight_ttl_secs",
                "must be positive".into(),
            );
        }
        if self.queue.backend == QueueBackend::Redis {
            if let Err(e) = redis::Client::open(self.redis.url.as_str()) {
                return bad("redis.url", format!("{:?}: {e}", self.redis.url));
            }
        }
        if self.imaging.render_threads == 0 {
            return bad("imaging.render_threads", "must be at least 1".into());
        }
        // Below 0 needs privileges a service should not hold.
        if !(0..=19).contains(&self.imaging.render_nice) {
            return bad("imaging.render_nice", "must be 0-19".into());
        }
        if self.imaging.max_width == 0
            || self.imaging.max_height == 0
            || self.imaging.max_pixels == 0
            || self.imaging.max_jpeg_scans == 0
        {
            return bad("imaging.max_*", "limits must be positive".into());
        }
        if self.fetch.max_bytes == 0 {
            return bad("fetch.max_bytes", "must be positive".into());
        }
        if self.callback.max_attempts == 0 {
            return bad("callback.max_attempts", "must be at least 1".into());
        }
        if self.callback.concurrency == 0 || self.callback.poll_ms == 0 {
            return bad("callback.concurrency / poll_ms", "must be positive".into());
        }
        if self.sais.max_images == 0 || self.sais.max_filters == 0 {
            return bad("sais.max_images / max_filters", "must be at least 1".into());
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "metrics.listen",
                format!("{:?} is not host:port", self.metrics.listen),
            );
        }
        if self.ui.recent_jobs == 0 || self.ui.throughput_window_secs == 0 {
            return bad(
                "ui.recent_jobs / throughput_window_secs",
                "must be positive".into(),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }
        self.network_policy()?;
        Ok(())
    }

    pub fn listen_addr(&self) -> std::result::Result<SocketAddr, std::net::AddrParseError> {
        self.server.listen.parse()
    }

    /// The base URL of variant URLs, without a trailing slash. Unset, the
    /// listen address; one on every interface (0.0.0.0, ::) is no address a
    /// client can reach, so localhost stands for it.
    pub fn public_base(&self) -> String {
        if self.server.public_url.is_empty() {
            match self.listen_addr() {
                Ok(addr) if addr.ip().is_unspecified() => {
                    format!("http://localhost:{}", addr.port())
                }
                _ => format!("http://{}", self.server.listen),
            }
        } else {
            self.server.public_url.trim_end_matches('/').to_string()
        }
    }

    pub fn allowed_networks(&self) -> Result<Vec<IpNet>> {
        self.network
            .allow
            .iter()
            .map(|cidr| {
                cidr.parse::<IpNet>()
                    .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| Error::Config(format!("network.allow: {cidr:?} is not a CIDR")))
            })
            .collect()
    }

    /// What fetches and callbacks may reach, and how names resolve.
    pub fn network_policy(&self) -> Result<crate::security::NetworkPolicy> {
        let nameservers = self
            .network
            .nameservers
            .iter()
            .map(|addr| {
                addr.parse::<SocketAddr>().map_err(|_| {
                    Error::Config(format!("network.nameservers: {addr:?} is not ip:port"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(
            crate::security::NetworkPolicy::new(self.allowed_networks()?)
                .with_allowed_hosts(self.network.allow_hosts.clone())
                .with_nameservers(nameservers),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid() {
        let config = Config::load_from(Sources::default()).unwrap();
        assert_eq!(config.queue.backend, QueueBackend::Embedded);
        assert_eq!(config.storage.url, "./var");
    }

    #[test]
    fn environment_variables_keep_text_settings_as_written() {
        let vars = [
            ("KILN_AUTH__ADMIN_KEY", "007123"),
            ("KILN_STORAGE__S3_SECRET_ACCESS_KEY", "true"),
            ("KILN_SERVER__LISTEN", "127.0.0.1:9001"),
            ("KILN_INDEX__NEGATIVE_TTL_SECS", "17"),
            ("kiln_ui__enabled", "false"),
            ("KILN_NETWORK__ALLOW", "[\"127.0.0.1/32\"]"),
            // Not settings: no `__`.
            ("KILN_PORT", "tcp://10.0.0.1:8080"),
            ("KILN_API_KEY", "42"),
        ]
        .map(|(name, value)| (OsString::from(name), OsString::from(value)));
        let figment = Figment::from(Toml::string(DEFAULT_TOML)).merge(EnvSettings::from_vars(vars));
        let config = Config::extract(figment).unwrap();
        assert_eq!(config.auth.admin_key, "007123");
        assert_eq!(config.storage.s3_secret_access_key, "true");
        assert_eq!(config.server.listen, "127.0.0.1:9001");
        assert_eq!(config.index.negative_ttl_secs, 17);
        assert!(!config.ui.enabled);
        assert_eq!(config.network.allow, ["127.0.0.1/32"]);

        // A number where one belongs is still checked, and named.
        let vars = [("KILN_INDEX__NEGATIVE_TTL_SECS", "soon")]
            .map(|(name, value)| (OsString::from(name), OsString::from(value)));
        let figment = Figment::from(Toml::string(DEFAULT_TOML)).merge(EnvSettings::from_vars(vars));
        let error = Config::extract(figment).unwrap_err().to_string();
        assert!(error.contains("negative_ttl_secs"), "{error}");
    }

    #[test]
    fn every_time_setting_is_bounded() {
        let config = Config::load_from(Sources::default()).unwrap();
        // A time setting added later is bounded too.
        let declared = include_str!("config.rs")
            .lines()
            .map(str::trim)
            .filter(|l| {
                l.starts_with("pub ") && (l.ends_with("_secs: u64,") || l.ends_with("_ms: u64,"))
            })
            .count();
        assert_eq!(declared, config.durations_secs().len());
        for (key, _) in config.durations_secs() {
            let (section, name) = key.split_once('.').unwrap();
            let far = if name.ends_with("_ms") {
                (MAX_DURATION_SECS + 1) * 1000
            } else {
                MAX_DURATION_SECS + 1
            };
            let error = Config::load_from(Sources {
                extra_toml: Some(&format!("[{section}]\n{name} = {far}")),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(
                error.contains(key) && error.contains("ten years"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_public_base_is_an_address_clients_can_reach() {
        let base = |server: &str| {
            Config::load_from(Sources {
                extra_toml: Some(&format!("[server]\n{server}")),
                ..Default::default()
            })
            .unwrap()
            .public_base()
        };
        assert_eq!(base(""), "http://127.0.0.1:8080");
        assert_eq!(base("listen = \"0.0.0.0:9000\""), "http://localhost:9000");
        assert_eq!(base("listen = \"[::]:9000\""), "http://localhost:9000");
        let set = "listen = \"0.0.0.0:9000\"\npublic_url = \"https://img.example/\"";
        assert_eq!(base(set), "https://img.example");
    }

    #[test]
    fn later_layers_win_and_bad_values_are_named() {
        let config = Config::load_from(Sources {
            extra_toml: Some("[queue]\nbackend = \"redis\"\n[network]\nallow=[\"127.0.0.1/32\"]"),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.queue.backend, QueueBackend::Redis);
        assert_eq!(config.allowed_networks().unwrap().len(), 1);

        let err = Config::load_from(Sources {
            extra_toml: Some("[server]\nlisten = \"nope\""),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");

        let err = Config::load_from(Sources {
            extra_toml: Some("[network]\nallow = [\"10.0.0.0/99\"]"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("network.allow"), "{err}");

        let err = Config::load_from(Sources {
            extra_toml: Some("[server]\nlistne = \"x\""),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");

        for nice in ["-1", "20"] {
            let err = Config::load_from(Sources {
                extra_toml: Some(&format!("[imaging]\nrender_nice = {nice}")),
                ..Default::default()
            })
            .unwrap_err();
            assert!(err.to_string().contains("imaging.render_nice"), "{err}");
        }

        let err = Config::load_from(Sources {
            extra_toml: Some("[queue]\nworker_threads = 0"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("queue.worker_threads"), "{err}");
    }
}
