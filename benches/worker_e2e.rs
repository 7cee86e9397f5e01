//! Whole-worker throughput: a pre-heat of distinct originals through Redis
//! (or, with QUEUE_BACKEND=embedded, kiln's in-memory queue), end to end (dispatch -> download -> archive -> render -> store -> signed
//! webhooks received), against the pure render time of the same originals
//! with the same filters, measured in the same run.
//!
//! `cargo bench --bench worker_e2e`:
//! 1. makes (once, under `<target>/bench-photos/v1/originals/`) ORIGINALS
//!    distinct upload-sized JPEGs (about 2-3 MP, crops of a tile of real
//!    photographs from Debian's `mate-backgrounds`);
//! 2. pure render: the originals' bytes in memory, `decode_for` + `render`
//!    of every filter + `previews` for each, on RENDER_THREADS threads;
//! 3. end to end: a private `redis-server` on a free port, a loopback origin
//!    serving the originals, a loopback webhook receiver, and the release
//!    `kiln serve` (redis backend, `imaging.render_threads = RENDER_THREADS`,
//!    `queue.worker_concurrency = WORKER_CONCURRENCY`, 127.0.0.1 allowed);
//!    all originals are pre-heated with `POST /dispatch_process` in batches
//!    of BATCH, timed from the first dispatch sent to the last webhook
//!    received (a media webhook per original and a thumb webhook per filter);
//! 4. the I/O floor: pure render on the same threads, each of which also
//!    downloads its original from the same origin, archives it, writes the
//!    variants and posts the webhooks itself, blocking, with no queue,
//!    Redis or media record: what the unavoidable I/O costs by itself;
//! 5. steps 3, 4 and 2 again for ROUNDS rounds (a fresh kiln, Redis and
//!    storage each time); each round's end to end and floor are set against
//!    the mean of the pure runs just before and after them. A round whose
//!    pure runs disagree by more than 15 %, or did not get 85 % of their
//!    threads' CPU (other processes on the machine), is shown but not
//!    judged; with no round left the verdict says it is inconclusive.
//!
//! It prints images/s for all three, the overhead `1 - e2e/pure` (median
//! over rounds) against the <= 10 % target, how much of it the floor
//! already takes (`1 - floor/pure`) and what kiln adds (`1 - e2e/floor`),
//! and the CPU time kiln, Redis and the harness spent per image against
//! pure render's, which other work on the machine moves much less than
//! wall-clock rates.
//!
//! Run by `cargo test --all-targets` (no `--bench`), it does the same with a
//! handful of small synthesized originals and fails loudly if any webhook
//! is missing or reports a failure.
//!
//! Environment: ORIGINALS (default 500), FILTERS (comma list of kiln's
//! embedded presets, default small,medium,large), RENDER_THREADS (default
//! 2), WORKER_CONCURRENCY (jobs in flight, default 4), BATCH (images per
//! dispatch, default 100), ROUNDS (default 3), QUEUE_BACKEND (kiln's
//! `queue.backend`, default redis; embedded keeps queue, index, records'
//! lock and webhook outbox in kiln's memory), KEEP=1 (keep the temp dir:
//! kiln's log, storage), BENCH_KILN_BIN (the kiln binary to run, default the one
//! cargo built beside this bench), STRICT=1 (exit 1 when the target fails).

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kiln::filter::{FilterSet, Preset};
use kiln::imaging::{self, Limits};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use common::Mode;

const ADMIN_KEY: &str = "bench-admin-key-0123456789";
/// The overhead target: e2e images/s at least 90 % of pure render images/s.
const MAX_OVERHEAD: f64 = 0.10;
/// A round whose two pure runs differ by more than this saw the machine's
/// other load change; it is shown but left out of the verdict.
const MAX_PURE_DRIFT: f64 = 0.15;
/// Nor is a round judged whose pure runs got less than this share of their
/// threads' worth of CPU: other processes were taking the cores, and they
/// take more from pure render's few threads than from kiln's many.
const MIN_PURE_CPU_SHARE: f64 = 0.85;
/// What kiln names its render threads (`worker::RenderPool`).
const RENDER_THREAD: &str = "kiln-render-";

struct Settings {
    smoke: bool,
    originals: usize,
    filters: Vec<String>,
    render_threads: usize,
    worker_concurrency: usize,
    batch: usize,
    rounds: usize,
    /// kiln's `queue.backend`: `redis` (the default) or `embedded`.
    backend: String,
    timeout: Duration,
    keep: bool,
    strict: bool,
}

impl Settings {
    fn new(smoke: bool) -> Settings {
        let filters = std::env::var("FILTERS").unwrap_or_else(|_| {
            if smoke {
                "small,medium".into()
            } else {
                "small,medium,large".into()
            }
        });
        Settings {
            smoke,
            originals: if smoke {
                4
            } else {
                common::env_number("ORIGINALS", 500)
            },
            filters: filters.split(',').map(str::to_string).collect(),
            render_threads: common::env_number("RENDER_THREADS", 2),
            worker_concurrency: common::env_number("WORKER_CONCURRENCY", 4),
            batch: common::env_number("BATCH", 100).max(1),
            backend: std::env::var("QUEUE_BACKEND").unwrap_or_else(|_| "redis".into()),
            rounds: if smoke {
                1
            } else {
                common::env_number("ROUNDS", 3).max(1)
            },
            timeout: Duration::from_secs(if smoke { 90 } else { 1800 }),
            keep: std::env::var("KEEP").is_ok_and(|v| v == "1"),
            strict: std::env::var("STRICT").is_ok_and(|v| v == "1"),
        }
    }
}

fn main() -> ExitCode {
    let settings = match common::mode() {
        Mode::Child(args) => {
            eprintln!("worker_e2e: no child mode ({args:?})");
            return ExitCode::from(2);
        }
        Mode::Smoke => Settings::new(true),
        Mode::Full => Settings::new(false),
    };
    match run(&settings) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if settings.strict => ExitCode::FAILURE,
        Ok(false) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker_e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---- pure render ------------------------------------------------------------------------

struct Pure {
    wall: Duration,
    cpu: Duration,
}

/// Every original through `decode_for` + `render` (each filter) + `previews`,
/// on `threads` threads taking the next original as they finish one.
fn pure_render(
    originals: &[Bytes],
    presets: &[Preset],
    limits: Limits,
    threads: usize,
) -> Result<Pure, String> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let cpu0 = common::cpu_time("self").unwrap_or_default();
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(bytes) = originals.get(n) else {
                    return;
                };
                let job = || -> kiln::Result<()> {
                    let source = imaging::decode_for(bytes, limits, presets)?;
                    for preset in presets {
                        std::hint::black_box(imaging::render(&source, preset)?);
                    }
                    std::hint::black_box(imaging::previews(&source)?);
                    Ok(())
                };
                if let Err(e) = job() {
                    *failure.lock().unwrap() = Some(format!("original {n}: {e}"));
                    return;
                }
            });
        }
    });
    let wall = started.elapsed();
    let cpu = common::cpu_time("self").unwrap_or_default() - cpu0;
    match failure.into_inner().unwrap() {
        Some(e) => Err(format!("pure render failed: {e}")),
        None => Ok(Pure { wall, cpu }),
    }
}

// ---- the I/O floor ---------------------------------------------------------------------------

/// Pure render plus the I/O no worker can skip, with no queue, no Redis, no
/// media record and no async runtime: each of `threads` plain threads takes
/// the next original, downloads it from the harness origin (keep-alive
/// HTTP/1.1), archives it, renders it as `pure_render` does, writes its
/// variants (a staging file renamed into place, as kiln's local store
/// does) and posts a media webhook and one per filter to the receiver. Set
/// against pure render it is the least a worker's I/O costs on this
/// machine; set against it, the end to end shows what kiln's queue, Redis
/// and async hand-offs add on top.
fn io_floor(
    originals: &[Bytes],
    presets: &[Preset],
    limits: Limits,
    threads: usize,
    dir: &Path,
) -> Result<Pure, String> {
    let harness = Harness::start(originals)?;
    let folders: Vec<PathBuf> = std::iter::once("originals")
        .chain(presets.iter().map(|p| p.name.as_str()))
        .map(|name| dir.join("floor").join(name))
        .collect();
    for folder in &folders {
        std::fs::create_dir_all(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    }
    let next = AtomicUsize::new(0);
    let (origin, sink) = (harness.origin, harness.sink);
    let cpu0 = common::cpu_time("self").unwrap_or_default();
    let started = Instant::now();
    // The floor's threads report here; this thread serves the harness's
    // origin and receiver until all of them have.
    let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
    let next = &next;
    let folders = &folders;
    let outcome = std::thread::scope(|s| {
        for _ in 0..threads {
            let done = done.clone();
            s.spawn(move || {
                let run = || -> Result<(), String> {
                    let mut origin = Http::connect(origin)?;
                    let mut sink = Http::connect(sink)?;
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= originals.len() {
                            return Ok(());
                        }
                        floor_job(n, presets, limits, folders, &mut origin, &mut sink)
                            .map_err(|e| format!("floor, original {n}: {e}"))?;
                    }
                };
                let _ = done.send(run());
            });
        }
        drop(done);
        harness.runtime.block_on(async {
            let mut outcome = Ok(());
            while let Some(result) = finished.recv().await {
                outcome = outcome.and(result);
            }
            outcome
        })
    });
    outcome?;
    let wall = started.elapsed();
    let cpu = common::cpu_time("self").unwrap_or_default() - cpu0;
    let webhooks = harness.webhooks.lock().unwrap();
    let want = originals.len() * (presets.len() + 1);
    if webhooks.media.len() + webhooks.thumbs != want || !webhooks.failures.is_empty() {
        return Err(format!(
            "floor: {} webhooks received, {} failed, want {want}",
            webhooks.media.len() + webhooks.thumbs,
            webhooks.failures.len()
        ));
    }
    Ok(Pure { wall, cpu })
}

/// One original through the floor: download, archive, render, store, post.
fn floor_job(
    n: usize,
    presets: &[Preset],
    limits: Limits,
    folders: &[PathBuf],
    origin: &mut Http,
    sink: &mut Http,
) -> Result<(), String> {
    let (status, bytes) =
        origin.call(format!("GET /o/{n}.jpg HTTP/1.1\r\nhost: origin\r\n\r\n").as_bytes())?;
    if status != 200 {
        return Err(format!("origin answered {status}"));
    }
    let name = format!("{n}.jpg");
    store(&folders[0], &name, &bytes)?;
    let source = imaging::decode_for(&bytes, limits, presets).map_err(|e| e.to_string())?;
    let previews = imaging::previews(&source).map_err(|e| e.to_string())?;
    let mut thumbs = serde_json::Map::new();
    for (preset, folder) in presets.iter().zip(&folders[1..]) {
        let variant = imaging::render(&source, preset).map_err(|e| e.to_string())?;
        store(folder, &name, &variant.bytes)?;
        let thumb = json!({
            "marking": "done",
            "url": format!("http://kiln/media/cache/{}/default/{name}", preset.name),
            "size": variant.bytes.len(),
            "width": variant.width,
            "height": variant.height,
            "mime_type": imaging::mime_of(variant.format),
        });
        post(
            sink,
            "thumb",
            &json!({"code": n, "filter": preset.name, "thumb": thumb}),
        )?;
        thumbs.insert(preset.name.clone(), thumb);
    }
    let media = json!({
        "code": n,
        "root": "default",
        "path": format!("default/{name}"),
        "original_url": format!("http://origin/o/{name}"),
        "mime_type": "image/jpeg",
        "size": bytes.len(),
        "original_width": source.width(),
        "original_height": source.height(),
        "blurhash": previews.blurhash,
        "blur": previews.thumbhash,
        "thumb_data": thumbs,
        "marking": "resized",
    });
    post(sink, "media", &media)
}

/// Writes a whole file under a staging name, then renames it into place.
fn store(folder: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let staging = folder.join(format!("{name}#1"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&staging)
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    file.write_all(bytes).map_err(|e| e.to_string())?;
    drop(file);
    std::fs::rename(&staging, folder.join(name)).map_err(|e| e.to_string())
}

fn post(sink: &mut Http, kind: &str, body: &Value) -> Result<(), String> {
    let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let mut request = format!(
        "POST /hook/{kind} HTTP/1.1\r\nhost: sink\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    match sink.call(&request)? {
        (200, _) => Ok(()),
        (status, _) => Err(format!("webhook receiver answered {status}")),
    }
}

/// A blocking keep-alive HTTP/1.1 connection that knows just enough of the
/// protocol for the harness's servers (answers carry a Content-Length).
struct Http {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Result<Http, String> {
        let stream = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Http {
            stream: std::io::BufReader::new(stream),
        })
    }

    /// Sends one request; answers the status and body.
    fn call(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>), String> {
        use std::io::{BufRead, Read, Write};
        let io = |e: std::io::Error| e.to_string();
        self.stream.get_mut().write_all(request).map_err(io)?;
        let mut line = String::new();
        self.stream.read_line(&mut line).map_err(io)?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut length = 0;
        loop {
            line.clear();
            self.stream.read_line(&mut line).map_err(io)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad {header:?}"))?;
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).map_err(io)?;
        Ok((status, body))
    }
}

// ---- child processes ------------------------------------------------------------------------

/// A child process killed (and reaped) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.pid()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("worker_e2e: killed {}", self.name);
        }
    }
}

fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if port != 6379 {
            return port;
        }
    }
}

/// One section of Redis's `INFO`, or "" when Redis does not answer.
fn redis_info(port: u16, section: &str) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let command = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
    if stream.write_all(command.as_bytes()).is_err() {
        return String::new();
    }
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    let _ = reader.read_line(&mut header);
    let len: usize = header
        .trim()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if reader.read_exact(&mut body).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Times Redis read from a client socket (`total_reads_processed`): about
/// one per round trip a client makes, each a wake-up of `redis-server` and
/// a loopback write on the client's side. Its CPU follows these more than
/// the commands they carry.
fn redis_read_events(port: u16) -> u64 {
    redis_info(port, "stats")
        .lines()
        .find_map(|l| l.strip_prefix("total_reads_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// One line of Redis's `INFO commandstats`.
struct CommandStat {
    name: String,
    calls: u64,
    /// Time spent executing the command, in µs (a script's includes the
    /// commands it calls, which also have lines of their own).
    usec: u64,
}

/// Redis's `INFO commandstats`, most called first.
fn redis_command_stats(port: u16) -> Vec<CommandStat> {
    let mut stats: Vec<CommandStat> = redis_info(port, "commandstats")
        .lines()
        .filter_map(|l| {
            let (name, fields) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some(CommandStat {
                name: name.to_string(),
                calls: field("calls")?,
                usec: field("usec")?,
            })
        })
        .collect();
    stats.sort_by_key(|c| std::cmp::Reverse(c.calls));
    stats
}

fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

fn start_redis(dir: &Path) -> Result<(Proc, u16), String> {
    let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let port = free_port();
    let child = Command::new(&binary)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{binary}: {e} (install Debian's redis-server)"))?;
    let proc = Proc {
        name: "redis-server",
        child,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_ping(port) {
        if Instant::now() > deadline {
            return Err(format!("redis-server on {port} did not answer PING"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, port))
}

// ---- loopback HTTP: the origin and the webhook receiver ---------------------------------

async fn serve<H, Fut>(handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handler(req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn respond(status: u16, body: Bytes, content_type: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("response")
}

/// Webhooks received, by kind.
#[derive(Default)]
struct Webhooks {
    media: Vec<Instant>,
    thumbs: usize,
    failures: Vec<String>,
    last: Option<Instant>,
}

/// The harness's loopback origin (`/o/<n>.jpg` serves original n) and
/// webhook receiver (`.../thumb` counts a thumb, anything else a media
/// webhook; a failure or unreadable body is kept for the report), served
/// by `runtime` on the bench's own thread whenever it runs `block_on`.
struct Harness {
    runtime: tokio::runtime::Runtime,
    origin: SocketAddr,
    sink: SocketAddr,
    webhooks: Arc<Mutex<Webhooks>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Harness {
    fn start(originals: &[Bytes]) -> Result<Harness, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let served: Arc<Vec<Bytes>> = Arc::new(originals.to_vec());
        let webhooks: Arc<Mutex<Webhooks>> = Arc::default();
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (origin, sink) = runtime.block_on(async {
            let origin = serve(move |req: Request<Incoming>| {
                let served = served.clone();
                async move {
                    let n = req
                        .uri()
                        .path()
                        .strip_prefix("/o/")
                        .and_then(|p| p.strip_suffix(".jpg"))
                        .and_then(|p| p.parse::<usize>().ok());
                    Ok(match n.and_then(|n| served.get(n)) {
                        Some(bytes) => respond(200, bytes.clone(), "image/jpeg"),
                        None => respond(404, Bytes::new(), "text/plain"),
                    })
                }
            })
            .await;
            let (hooks, arrived) = (webhooks.clone(), arrived.clone());
            let sink = serve(move |req: Request<Incoming>| {
                let (hooks, arrived) = (hooks.clone(), arrived.clone());
                async move {
                    let thumb = req.uri().path().ends_with("/thumb");
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let now = Instant::now();
                    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    {
                        let mut hooks = hooks.lock().unwrap();
                        hooks.last = Some(now);
                        let failed = value["marking"] == "failed" || value["status"] == "failed";
                        if failed || value.is_null() {
                            hooks
                                .failures
                                .push(String::from_utf8_lossy(&body).chars().take(400).collect());
                        } else if thumb {
                            hooks.thumbs += 1;
                        } else {
                            hooks.media.push(now);
                        }
                    }
                    arrived.notify_one();
                    Ok(respond(200, Bytes::new(), "text/plain"))
                }
            })
            .await;
            (origin, sink)
        });
        Ok(Harness {
            runtime,
            origin,
            sink,
            webhooks,
            arrived,
        })
    }
}

// ---- the run -------------------------------------------------------------------------------

fn load_originals(settings: &Settings) -> Result<Vec<Bytes>, String> {
    if settings.smoke {
        return Ok((0..settings.originals as u32)
            .map(|n| {
                Bytes::from(common::encode_jpeg(
                    &common::synthetic(640 + 16 * n, 480),
                    85,
                ))
            })
            .collect());
    }
    let paths = common::originals(settings.originals, true)?;
    paths
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(Bytes::from)
                .map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}

fn kiln_config(dir: &Path, port: u16, redis_port: u16, settings: &Settings) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
grace_period_secs = 0
graceful_shutdown_timeout_secs = 1

[storage]
url = "{storage}"

[queue]
backend = "{backend}"
worker_concurrency = {concurrency}

[redis]
url = "redis://127.0.0.1:{redis_port}"

[imaging]
render_threads = {render_threads}

[network]
allow = ["127.0.0.1/32"]

[auth]
admin_key = "{ADMIN_KEY}"
"#,
        storage = dir.join("storage").display(),
        backend = settings.backend,
        concurrency = settings.worker_concurrency,
        render_threads = settings.render_threads,
    )
}

fn run(settings: &Settings) -> Result<bool, String> {
    if !["redis", "embedded"].contains(&settings.backend.as_str()) {
        return Err(format!(
            "QUEUE_BACKEND={:?}: use redis or embedded",
            settings.backend
        ));
    }
    let config = kiln::config::Config::load_from(kiln::config::Sources::default())
        .map_err(|e| e.to_string())?;
    let limits = Limits::from(&config.imaging);
    let filter_set = FilterSet::from_config(&config).map_err(|e| e.to_string())?;
    let presets: Vec<Preset> = settings
        .filters
        .iter()
        .map(|f| {
            filter_set
                .get(f)
                .map(std::borrow::Cow::into_owned)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let originals = load_originals(settings)?;
    let n = originals.len();
    let total_bytes: usize = originals.iter().map(Bytes::len).sum();
    let line = "=".repeat(100);
    let load_start = common::loadavg();
    if !settings.smoke {
        println!("{line}");
        let through = match settings.backend.as_str() {
            "redis" => "Redis",
            _ => "the embedded queue (Redis idle)",
        };
        println!("worker_e2e: whole-worker pre-heat through {through} vs pure render, same run");
        println!("kiln code:  {}", common::code_version());
        println!(
            "originals:  {n} distinct JPEGs, {:.1} MiB in all; filters {}; render_threads {}, worker_concurrency {}, dispatch batches of {}, queue backend {}",
            total_bytes as f64 / 1048576.0,
            settings.filters.join(","),
            settings.render_threads,
            settings.worker_concurrency,
            settings.batch,
            settings.backend
        );
        println!(
            "machine:    {} cores, load average {load_start} at start",
            common::cores(),
        );
        let temp = std::env::temp_dir();
        let fs = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&temp)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        println!(
            "storage:    kiln's storage and Redis's dir under {} ({fs}; TMPDIR moves it)",
            temp.display()
        );
        println!(
            "method:     {} rounds of [end to end on a fresh kiln + Redis + storage, I/O floor, pure render]; pure render once more \
             before the first; each round's overhead against the mean of the pure runs beside it; medians over rounds",
            settings.rounds
        );
        println!("{line}");
    }
    let rate = |wall: Duration| n as f64 / wall.as_secs_f64();
    let threads = settings.render_threads as f64;
    let share = |p: &Pure| p.cpu.as_secs_f64() / p.wall.as_secs_f64() / threads;

    let mut pure_before = pure_render(&originals, &presets, limits, settings.render_threads)?;
    let mut rounds: Vec<Round> = Vec::new();
    let mut dirs = Vec::new();
    for round in 1..=settings.rounds {
        let e2e = end_to_end(settings, &originals, &mut dirs)?;
        let floor_dir = tempfile::Builder::new()
            .prefix("kiln-worker-floor-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let floor = io_floor(
            &originals,
            &presets,
            limits,
            settings.render_threads,
            floor_dir.path(),
        )?;
        dirs.push(floor_dir);
        let pure_after = pure_render(&originals, &presets, limits, settings.render_threads)?;
        let pure_rate = (rate(pure_before.wall) + rate(pure_after.wall)) / 2.0;
        let pure_cpu = (pure_before.cpu + pure_after.cpu) / 2;
        let (a, b) = (rate(pure_before.wall), rate(pure_after.wall));
        let r = Round {
            steady: (a - b).abs() / a.max(b) <= MAX_PURE_DRIFT
                && share(&pure_before).min(share(&pure_after)) >= MIN_PURE_CPU_SHARE,
            pure_rate,
            e2e_rate: rate(e2e.wall),
            overhead: 1.0 - rate(e2e.wall) / pure_rate,
            floor_rate: rate(floor.wall),
            floor_overhead: 1.0 - rate(floor.wall) / pure_rate,
            over_floor: 1.0 - rate(e2e.wall) / rate(floor.wall),
            floor_busy: floor.cpu.as_secs_f64() / floor.wall.as_secs_f64() / common::cores() as f64,
            cpu_overhead: (e2e.kiln_cpu + e2e.redis_cpu).as_secs_f64() / pure_cpu.as_secs_f64()
                - 1.0,
            beside_render: (e2e.kiln_cpu.saturating_sub(e2e.render_cpu) + e2e.redis_cpu)
                .as_secs_f64()
                / e2e.render_cpu.as_secs_f64(),
            e2e,
        };
        if !settings.smoke {
            let beside = |cpu: Duration| cpu.as_secs_f64() / r.e2e.render_cpu.as_secs_f64();
            println!(
                "round {round}: pure {:.2} -> {:.2} images/s (CPU {:.0} % / {:.0} % of its threads) | e2e {:.2} images/s in {:.2}s (steady {:.2}) | overhead {:+.1} % \
                 | I/O floor {:.2} images/s ({:+.1} % under pure, busy {:.0} % of {} cores; e2e {:+.1} % under it) | CPU/image kiln+redis vs pure {:+.1} % | beside kiln's renders {:.1} % (kiln {:.1} + redis {:.1}) | kiln busy {:.0} % of {} cores, redis CPU {:.2}s, harness CPU {:.2}s, kiln peak RSS {:.0} MiB{}",
                rate(pure_before.wall),
                rate(pure_after.wall),
                share(&pure_before) * 100.0,
                share(&pure_after) * 100.0,
                r.e2e_rate,
                r.e2e.wall.as_secs_f64(),
                r.e2e.steady_rate,
                r.overhead * 100.0,
                r.floor_rate,
                r.floor_overhead * 100.0,
                r.floor_busy * 100.0,
                common::cores(),
                r.over_floor * 100.0,
                r.cpu_overhead * 100.0,
                r.beside_render * 100.0,
                beside(r.e2e.kiln_cpu.saturating_sub(r.e2e.render_cpu)) * 100.0,
                beside(r.e2e.redis_cpu) * 100.0,
                r.e2e.kiln_cpu.as_secs_f64() / r.e2e.wall.as_secs_f64() / common::cores() as f64
                    * 100.0,
                common::cores(),
                r.e2e.redis_cpu.as_secs_f64(),
                r.e2e.harness_cpu.as_secs_f64(),
                r.e2e.kiln_hwm_kib as f64 / 1024.0,
                if r.steady {
                    ""
                } else {
                    " | UNSTEADY: the pure runs differ by more than 15 % or got under 85 % of their threads' CPU; left out of the verdict"
                },
            );
        }
        // On the embedded backend kiln leaves Redis idle.
        if !settings.smoke && settings.backend == "redis" {
            let commands = &r.e2e.redis_commands;
            let calls: u64 = commands.iter().map(|c| c.calls).sum();
            let usec: u64 = commands.iter().map(|c| c.usec).sum();
            let top: Vec<String> = commands
                .iter()
                .take(12)
                .map(|c| format!("{} {:.1}", c.name, c.calls as f64 / n as f64))
                .collect();
            println!(
                "  Redis commands per image: {:.1} in all; {}",
                calls as f64 / n as f64,
                top.join(", ")
            );
            // Where Redis's CPU goes: the commands themselves, or waking up
            // and moving bytes for each round trip.
            println!(
                "  Redis per image: {:.0} µs CPU, {:.1} read events (round trips), \
                 at most {:.0} µs executing commands (a script's own commands count twice)",
                r.e2e.redis_cpu.as_secs_f64() * 1e6 / n as f64,
                r.e2e.redis_reads as f64 / n as f64,
                usec as f64 / n as f64
            );
        }
        rounds.push(r);
        pure_before = pure_after;
    }
    let steady: Vec<&Round> = rounds.iter().filter(|r| r.steady).collect();
    // Judged on the steady rounds; with none, on all (and said so).
    let judged: Vec<&Round> = if steady.is_empty() {
        rounds.iter().collect()
    } else {
        steady
    };
    let med =
        |f: fn(&Round) -> f64| common::median(&judged.iter().map(|r| f(r)).collect::<Vec<_>>());
    let (pure_rate, e2e_rate) = (med(|r| r.pure_rate), med(|r| r.e2e_rate));
    let (overhead, cpu_overhead) = (med(|r| r.overhead), med(|r| r.cpu_overhead));
    let beside_render = med(|r| r.beside_render);
    let (floor_rate, floor_overhead) = (med(|r| r.floor_rate), med(|r| r.floor_overhead));
    let over_floor = med(|r| r.over_floor);

    if settings.smoke {
        let e2e = &rounds[0].e2e;
        println!(
            "worker_e2e smoke: {n} originals x {} filters: {} webhooks received in {:.2}s; pure render {pure_rate:.1} images/s; I/O floor {floor_rate:.1} images/s",
            presets.len(),
            e2e.webhooks,
            e2e.wall.as_secs_f64(),
        );
        return Ok(true);
    }
    println!("{line}");
    println!(
        "medians over {} of {} rounds{} ({n} originals, {} filters each, {} render threads):",
        judged.len(),
        rounds.len(),
        if judged.iter().all(|r| r.steady) {
            ""
        } else {
            " (no steady round: all of them, unreliable)"
        },
        presets.len(),
        settings.render_threads
    );
    println!("  pure render (bytes in memory; decode_for + render + previews)   {pure_rate:>8.2} images/s");
    println!(
        "  end to end (first dispatch sent -> last webhook received)      {e2e_rate:>8.2} images/s"
    );
    println!(
        "  I/O floor (download, archive, render, store, post; no queue)   {floor_rate:>8.2} images/s"
    );
    println!(
        "  the floor's own overhead, 1 - floor/pure                        {:>+8.1} %",
        floor_overhead * 100.0
    );
    println!(
        "  kiln's queue, Redis and hand-offs over the floor, 1 - e2e/floor {:>+8.1} %",
        over_floor * 100.0
    );
    println!(
        "  CPU per image, kiln + redis over pure render                    {:>+8.1} %",
        cpu_overhead * 100.0
    );
    // Measured in the same round as what it is set against, so unlike the
    // two lines above it does not move when the machine speeds up or slows
    // down between the pure and the end-to-end runs.
    println!(
        "  CPU beside the renders: kiln's other threads + redis over kiln's render threads {:>6.1} %",
        beside_render * 100.0
    );
    common::report_load_at_end(
        &load_start,
        "wall-clock rates move with other work; the CPU-per-image comparison is the steadier one",
    );
    println!("{line}");
    let ok = overhead <= MAX_OVERHEAD;
    let conclusive = judged.iter().all(|r| r.steady);
    let verdict = match (ok, conclusive) {
        (true, true) => "PASS",
        (false, true) => "FAIL",
        (true, false) => "PASS? (inconclusive: no steady round)",
        (false, false) => "FAIL? (inconclusive: no steady round)",
    };
    println!(
        "TARGET queue + storage + webhook overhead = 1 - e2e/pure = {:.1} % (target <= {:.0} %): {verdict}",
        overhead * 100.0,
        MAX_OVERHEAD * 100.0,
    );
    println!("VERDICT: target {verdict}");
    Ok(ok && conclusive)
}

struct Round {
    /// The pure runs before and after agree within MAX_PURE_DRIFT and each
    /// got at least MIN_PURE_CPU_SHARE of its threads' CPU.
    steady: bool,
    pure_rate: f64,
    e2e_rate: f64,
    overhead: f64,
    /// The I/O floor's rate (`io_floor`), its overhead against pure render,
    /// and the end to end's against it.
    floor_rate: f64,
    floor_overhead: f64,
    over_floor: f64,
    /// The bench process's CPU during the floor (its threads and the
    /// harness's origin and receiver) over all cores' time.
    floor_busy: f64,
    cpu_overhead: f64,
    /// kiln's other threads' CPU and Redis's over kiln's render threads',
    /// all from the same round.
    beside_render: f64,
    e2e: EndToEnd,
}

struct EndToEnd {
    wall: Duration,
    steady_rate: f64,
    webhooks: usize,
    kiln_cpu: Duration,
    /// Of `kiln_cpu`, what kiln's render threads spent.
    render_cpu: Duration,
    redis_cpu: Duration,
    harness_cpu: Duration,
    kiln_hwm_kib: u64,
    /// Redis commands run during the round (from kiln's start), most called first.
    redis_commands: Vec<CommandStat>,
    /// Redis's read events over the whole run (`redis_read_events`).
    redis_reads: u64,
}

/// One end-to-end run in a fresh temp dir, which goes into `dirs`: removed
/// only when the whole bench ends, since deleting thousands of files slows
/// the next round's file creation on ext4.
fn end_to_end(
    settings: &Settings,
    originals: &[Bytes],
    dirs: &mut Vec<tempfile::TempDir>,
) -> Result<EndToEnd, String> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-worker-e2e-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let result = end_to_end_in(settings, originals, dir.path());
    if settings.keep || result.is_err() {
        let kept = dir.keep();
        eprintln!(
            "worker_e2e: kept {} (kiln.log, redis.log, storage)",
            kept.display()
        );
    } else {
        dirs.push(dir);
    }
    result
}

fn end_to_end_in(settings: &Settings, originals: &[Bytes], dir: &Path) -> Result<EndToEnd, String> {
    let harness = Harness::start(originals)?;
    let runtime = &harness.runtime;
    let (origin, sink) = (harness.origin, harness.sink);
    let (webhooks, arrived) = (harness.webhooks.clone(), harness.arrived.clone());
    let (mut redis, redis_port) = start_redis(dir)?;
    let n = originals.len();
    let expected = n * (settings.filters.len() + 1);

    // kiln.
    let port = free_port();
    let config_path = dir.join("kiln.toml");
    std::fs::write(&config_path, kiln_config(dir, port, redis_port, settings))
        .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("kiln.log")).map_err(|e| e.to_string())?;
    let binary = std::env::var_os("BENCH_KILN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")));
    let mut command = Command::new(&binary);
    // Only the generated config: no KILN_* settings from this environment.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KILN_") {
            command.env_remove(name);
        }
    }
    let child = command
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .env("RUST_LOG", "info,pingora_core=warn")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let mut kiln = Proc {
        name: "kiln",
        child,
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;

    let outcome = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if Instant::now() > deadline || matches!(kiln.child.try_wait(), Ok(Some(_))) {
                return Err(format!(
                    "kiln did not become ready; see {}",
                    dir.join("kiln.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://{origin}/o/{i}.jpg"))
            .collect();
        let cpu = |pid: &str| common::cpu_time(pid).unwrap_or_default();
        let (kiln_pid, redis_pid) = (kiln.pid(), redis.pid());
        let render_cpu = |pid: &str| common::threads_cpu_time(pid, RENDER_THREAD).unwrap_or_default();
        let (kiln_cpu0, redis_cpu0, self_cpu0) = (cpu(&kiln_pid), cpu(&redis_pid), cpu("self"));
        let render_cpu0 = render_cpu(&kiln_pid);
        let started = Instant::now();
        for chunk in urls.chunks(settings.batch) {
            let body = json!({
                "root": "default",
                "images": chunk,
                "filters": settings.filters,
                "mediaCallbackUrl": format!("http://{sink}/hook/media"),
                "thumbCallbackUrl": format!("http://{sink}/hook/thumb"),
            });
            let answer = client
                .post(format!("{base}/dispatch_process"))
                .bearer_auth(ADMIN_KEY)
                .json(&body)
                .send()
                .await
                .map_err(|e| format!("dispatch: {e}"))?;
            let status = answer.status();
            let rows: Value = answer
                .json()
                .await
                .map_err(|e| format!("dispatch answer: {e}"))?;
            if !status.is_success() || rows.as_array().map(Vec::len) != Some(chunk.len()) {
                return Err(format!("dispatch answered {status}: {rows}"));
            }
        }
        let dispatched = started.elapsed();
        let deadline = started + settings.timeout;
        let mut last_report = Instant::now();
        loop {
            let (received, failures) = {
                let hooks = webhooks.lock().unwrap();
                (hooks.media.len() + hooks.thumbs, hooks.failures.clone())
            };
            if !failures.is_empty() {
                return Err(format!(
                    "{} failure webhooks, the first: {}",
                    failures.len(),
                    failures[0]
                ));
            }
            if received >= expected {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out: {received} of {expected} webhooks after {:.0}s; see {}",
                    started.elapsed().as_secs_f64(),
                    dir.join("kiln.log").display()
                ));
            }
            if !settings.smoke && last_report.elapsed() > Duration::from_secs(5) {
                last_report = Instant::now();
                println!(
                    "  e2e t={:>5.1}s: {received}/{expected} webhooks, kiln CPU {:.1}s",
                    started.elapsed().as_secs_f64(),
                    (cpu(&kiln_pid) - kiln_cpu0).as_secs_f64()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), arrived.notified()).await;
        }
        let (last, mut media, received) = {
            let hooks = webhooks.lock().unwrap();
            (
                hooks.last,
                hooks.media.clone(),
                hooks.media.len() + hooks.thumbs,
            )
        };
        let wall = last.expect("webhooks arrived") - started;
        media.sort();
        let (lo, hi) = (media[n / 10], media[(n * 9 / 10).min(n - 1)]);
        let steady_rate = if hi > lo {
            (n * 9 / 10 - n / 10) as f64 / (hi - lo).as_secs_f64()
        } else {
            f64::NAN
        };
        if !settings.smoke {
            let at = |t: Instant| (t - started).as_secs_f64();
            println!(
                "end to end: dispatched {n} originals in {:.2}s; media webhooks: first at {:.2}s, 10 % at {:.2}s, 90 % at {:.2}s; last webhook at {:.2}s",
                dispatched.as_secs_f64(),
                at(media[0]),
                at(lo),
                at(hi),
                wall.as_secs_f64()
            );
        }
        // A variant really is served.
        let url = format!("{base}/media/cache/{}/", settings.filters[0]);
        let record: Value = client
            .get(format!(
                "{base}/media/{}",
                kiln::keys::media_code(&urls[0], "default")
            ))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let path = record["path"].as_str().unwrap_or_default();
        let variant = client
            .get(format!("{url}{path}"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if variant.status() != 200 {
            return Err(format!(
                "{url}{path} answered {}: record {record}",
                variant.status()
            ));
        }
        Ok(EndToEnd {
            wall,
            steady_rate,
            webhooks: received,
            kiln_cpu: cpu(&kiln_pid) - kiln_cpu0,
            render_cpu: render_cpu(&kiln_pid) - render_cpu0,
            redis_cpu: cpu(&redis_pid) - redis_cpu0,
            harness_cpu: cpu("self") - self_cpu0,
            kiln_hwm_kib: common::status_kib(&kiln_pid, "VmHWM").unwrap_or(0),
            redis_commands: redis_command_stats(redis_port),
            redis_reads: redis_read_events(redis_port),
        })
    });
    kiln.stop(Duration::from_secs(15));
    redis.stop(Duration::from_secs(5));
    outcome
}
