//! Faults: processes killed mid-job, Redis restarted with AOF, storage
//! writes failing, SIGTERM drain, callback receivers that hang.
//!
//! Every test runs the redis deployment as it ships: `kiln front` and
//! `kiln worker` child processes sharing a harness-started `redis-server`
//! and one storage directory, sent real signals. "Mid-job" is made
//! provable by an origin that holds its answer behind a `Gate`: once the
//! origin has seen the request, the worker is holding the job.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::distributed::{deployment, wait_healthy, Deployment, Process};
use crate::kiln::{preheat_url, until_ready};
use crate::support::{
    dimensions, eventually, jpeg, CallbackSink, Gate, Origin, OriginResponse, RedisServer,
};

/// The pre-heat job stream and the workers' consumer group (default prefix).
const STREAM: &str = "kiln:jobs:preheat";
const GROUP: &str = "kiln-workers";
/// The webhook outbox: deliveries not yet settled, and given-up ones.
const WEBHOOKS_PENDING: &str = "kiln:{webhooks}:pending";
const WEBHOOKS_DEAD: &str = "kiln:{webhooks}:dead";
const WEBHOOKS_DUE: &str = "kiln:{webhooks}:due";

/// Bound of every wait in this module; generous for a loaded 2-core box.
const WAIT: Duration = Duration::from_secs(20);

/// One entry of the consumer group's pending list (claimed, not acked).
#[derive(Debug)]
struct Pending {
    consumer: String,
}

/// The pre-heat stream's pending entries (empty when the group does not
/// exist yet), from `XPENDING <stream> <group> - + 100`.
fn pending(redis: &RedisServer) -> Vec<Pending> {
    let reply = redis.redis_cli(&["XPENDING", STREAM, GROUP, "-", "+", "100"]);
    if reply.starts_with("-NOGROUP") {
        return Vec::new();
    }
    // *N, then per entry: *4, $len, id, $len, consumer, :idle-ms, :delivered
    let lines: Vec<&str> = reply.split("\r\n").collect();
    let count: usize = lines[0]
        .strip_prefix('*')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("XPENDING answered {reply:?}"));
    (0..count)
        .map(|i| {
            let entry = &lines[1 + i * 7..1 + (i + 1) * 7];
            assert_eq!(entry[0], "*4", "XPENDING entry in {reply:?}");
            Pending {
                consumer: entry[4].to_owned(),
            }
        })
        .collect()
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn xlen(redis: &RedisServer) -> i64 {
    redis.redis_int(&["XLEN", STREAM])
}

/// Waits until every job was acked and deleted: nothing queued, nothing pending.
async fn wait_drained(redis: &RedisServer) {
    eventually(
        WAIT,
        "the job stream drained and nothing pending",
        || async { (xlen(redis) == 0 && pending(redis).is_empty()).then_some(()) },
    )
    .await;
}

/// Every file under `root`, as sorted `/`-separated paths relative to it.
fn files_under(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let relative = path.strip_prefix(root).expect("under root");
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Asserts no staging file of a write (`<key>#<n>`, how the local store
/// writes before it renames) was left anywhere in storage.
fn assert_no_temp_files(storage: &Path) {
    let leftovers: Vec<String> = files_under(storage)
        .into_iter()
        .filter(|f| f.contains('#'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

fn storage_of(d: &Deployment) -> PathBuf {
    d.dir.path().join("storage")
}

fn log_path(d: &Deployment, name: &str) -> PathBuf {
    d.dir.path().join(format!("{name}.log"))
}

fn start(d: &Deployment, role: &str, name: &str) -> Process {
    Process::start(role, &d.config, &log_path(d, name))
}

/// Waits until the process log `name` contains `needle`.
async fn wait_log(d: &Deployment, name: &str, needle: &str) {
    let path = log_path(d, name);
    eventually(WAIT, &format!("{name}.log to say {needle:?}"), || {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        async move { log.contains(needle).then_some(()) }
    })
    .await;
}

/// Pre-heats `filter` of `image_url` with a callback; asserts 202 and
/// returns the answer (its `path` is the original's storage path).
async fn preheat(base: &str, filter: &str, image_url: &str, callback: &str) -> serde_json::Value {
    let response = reqwest::get(preheat_url(base, filter, image_url, Some(callback)))
        .await
        .expect("pre-heat request");
    assert_eq!(response.status(), 202, "pre-heat of {image_url}");
    response.json().await.expect("pre-heat answer")
}

fn path_of(answer: &serde_json::Value) -> String {
    answer["path"].as_str().expect("answer.path").to_owned()
}

fn webhook_ids(hooks: &[crate::support::Received]) -> Vec<String> {
    hooks
        .iter()
        .map(|h| {
            h.header("webhook-id")
                .expect("webhook-id header")
                .to_owned()
        })
        .collect()
}

/// A 500x500 JPEG; its `tiny` variant is 125x125.
fn square_jpeg(rgb: [u8; 3]) -> OriginResponse {
    OriginResponse::image("image/jpeg", jpeg(500, 500, rgb))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_it_to_another_that_stores_and_calls_back_once() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "[queue]\nvisibility_timeout_secs = 1\n");
    let _front = start(&d, "front", "front");
    let mut first = start(&d, "worker", "worker-1");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    origin.serve("/k.jpg", square_jpeg([200, 40, 40]).with_gate(&gate));
    // The first delivery fails, so the webhook is seen twice: its id must hold.
    sink.fail_next(1, 500);
    let answer = preheat(&d.base, "tiny", &origin.url("/k.jpg"), &sink.url("/cb")).await;
    let path = path_of(&answer);

    // The first worker holds the job: it claimed it and awaits the original.
    eventually(WAIT, "the first worker to ask for the original", || async {
        (origin.hits("/k.jpg") == 1).then_some(())
    })
    .await;
    let held = pending(&redis);
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(
        held[0].consumer.contains(&format!("-{}-", first.pid())),
        "the job is held by the first worker: {held:?}"
    );

    first.signal("KILL");
    let status = first.wait_exit(WAIT).await;
    assert_eq!(status.signal(), Some(9), "{status:?}");

    // A second worker takes the job over after the visibility timeout and
    // downloads the original again; only then does the origin answer.
    let _second = start(&d, "worker", "worker-2");
    eventually(
        WAIT,
        "the second worker to ask for the original",
        || async { (origin.hits("/k.jpg") == 2).then_some(()) },
    )
    .await;
    gate.open();

    let hooks = sink.wait_for(2, WAIT).await;
    for hook in &hooks {
        assert_eq!(hook.body["status"], "done", "{:?}", hook.body);
        assert_eq!(hook.body["path"], path.as_str());
    }
    let ids = webhook_ids(&hooks);
    assert!(!ids[0].is_empty());
    assert_eq!(ids[0], ids[1], "a retried delivery keeps its webhook-id");
    wait_drained(&redis).await;
    eventually(WAIT, "the webhook outbox settled", || async {
        (redis.redis_int(&["HLEN", WEBHOOKS_PENDING]) == 0).then_some(())
    })
    .await;

    // Asserting that nothing more happens: wait past the visibility timeout
    // (1 s), long enough for a stray reclaim to fetch and call back again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.count(), 2, "one webhook, delivered once after one 500");
    assert_eq!(origin.hits("/k.jpg"), 2);

    let storage = storage_of(&d);
    assert_eq!(
        files_under(&storage.join("media/cache")),
        vec![format!("tiny/{path}")],
        "the variant is stored once, nothing else in the cache"
    );
    assert_no_temp_files(&storage);
    let stored = std::fs::read(storage.join("media/cache/tiny").join(&path)).unwrap();
    assert_eq!(dimensions(&stored), (125, 125));
    let served = until_ready(&format!("{}/media/cache/tiny/{path}", d.base))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(served, stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_before_a_redis_restart_with_aof_are_all_completed() {
    let mut redis = RedisServer::start_with_aof();
    let d = deployment(&redis, "[queue]\nvisibility_timeout_secs = 2\n");
    let _front = start(&d, "front", "front");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let names = ["a", "b", "c", "d"];
    let mut paths = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let image = format!("/{name}.jpg");
        origin.serve(&image, square_jpeg([40 * n as u8, 100, 200]));
        let answer = preheat(
            &d.base,
            "tiny",
            &origin.url(&image),
            &sink.url(&format!("/cb/{name}")),
        )
        .await;
        paths.push(path_of(&answer));
    }
    // No worker yet: all four wait in the stream.
    assert_eq!(xlen(&redis), 4);

    // SIGKILL: only what the AOF (fsynced on every write) holds comes back.
    redis.restart();
    assert_eq!(xlen(&redis), 4, "the queued jobs survived the restart");

    let _worker = start(&d, "worker", "worker");
    let hooks = sink.wait_for(4, WAIT).await;
    let mut called_back: Vec<&str> = hooks.iter().map(|h| h.path_and_query.as_str()).collect();
    called_back.sort_unstable();
    assert_eq!(called_back, ["/cb/a", "/cb/b", "/cb/c", "/cb/d"]);
    assert!(hooks.iter().all(|h| h.body["status"] == "done"));
    wait_drained(&redis).await;
    for path in &paths {
        // Served by the front, whose Redis connections were cut by the restart.
        let bytes = until_ready(&format!("{}/media/cache/tiny/{path}", d.base))
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(dimensions(&bytes), (125, 125));
    }
    for name in names {
        assert_eq!(origin.hits(&format!("/{name}.jpg")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_storage_write_leaves_the_job_unacked_without_callback_or_object() {
    let redis = RedisServer::start();
    // Many attempts: the job must keep being retried, not dead-lettered.
    let d = deployment(
        &redis,
        "[queue]\nvisibility_timeout_secs = 1\nmax_attempts = 1000\nretry_backoff_ms = 100\nmax_retry_backoff_ms = 200\n",
    );
    let _front = start(&d, "front", "front");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve("/w.jpg", square_jpeg([30, 160, 60]));
    let answer = preheat(&d.base, "tiny", &origin.url("/w.jpg"), &sink.url("/cb")).await;
    let path = path_of(&answer);

    // Where the variant must go stands a directory (root ignores
    // permissions, so chmod cannot make a write fail): reads of the key
    // find nothing, the staged file cannot be renamed over it.
    let storage = storage_of(&d);
    let cache = storage.join("media/cache");
    let key = cache.join("tiny").join(&path);
    std::fs::create_dir_all(&key).unwrap();
    std::fs::write(key.join("blocker"), b"").unwrap();

    let _worker = start(&d, "worker", "worker");
    // The job was tried at least twice and is still queued: each failed
    // attempt parked it for a retry (stream entry and delayed copy swap
    // atomically, so exactly one of them exists at any instant).
    let log = log_path(&d, "worker");
    eventually(WAIT, "two failed attempts", || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        async move { (log.matches("will retry").count() >= 2).then_some(()) }
    })
    .await;
    let queued = redis.redis_int(&[
        "EVAL",
        "return redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])",
        "2",
        "kiln:jobs:preheat",
        "kiln:jobs:preheat:delayed",
    ]);
    assert_eq!(queued, 1, "the job is neither acked nor duplicated");
    assert_eq!(sink.count(), 0, "no webhook while the write fails");
    assert!(key.is_dir(), "nothing was written at the final key");
    assert_eq!(
        files_under(&cache),
        vec![format!("tiny/{path}/blocker")],
        "nothing but the blocker in the cache"
    );
    assert_no_temp_files(&storage);

    // Storage heals: the next attempt stores the variant and calls back.
    std::fs::remove_dir_all(&key).unwrap();
    let hooks = sink.wait_for(1, WAIT).await;
    assert_eq!(hooks[0].body["status"], "done", "{:?}", hooks[0].body);
    wait_drained(&redis).await;
    assert_eq!(files_under(&cache), vec![format!("tiny/{path}")]);
    assert_no_temp_files(&storage);
    let stored = std::fs::read(&key).unwrap();
    assert_eq!(dimensions(&stored), (125, 125));

    // Asserting that nothing more happens: wait past the visibility timeout
    // (1 s), long enough for a retry that slipped through to call back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.count(), 1, "exactly one success webhook");
}

/// Whether no client of `redis` is blocked in a command (`XREADGROUP BLOCK`).
fn nobody_blocked(redis: &RedisServer) -> bool {
    redis
        .redis_bulk(&["INFO", "clients"])
        .is_some_and(|info| info.contains("blocked_clients:0\r\n"))
}

/// A worker is mid-job (its origin stalled) when it gets SIGTERM; the origin
/// answers once the shutdown has begun. The job in hand is finished and
/// acked, a job queued after the signal is not taken, the process exits 0,
/// and a worker started later does the rest; every webhook arrives once.
/// With `called_back_before_exit`, the finished job's webhook must also have
/// been delivered by the time the process is gone.
async fn sigterm_drains_the_job_in_hand(extra: &str, called_back_before_exit: bool) {
    let redis = RedisServer::start();
    let d = deployment(&redis, extra);
    let _front = start(&d, "front", "front");
    let mut worker = start(&d, "worker", "worker");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    origin.serve("/t.jpg", square_jpeg([90, 20, 160]).with_gate(&gate));
    origin.serve("/u.jpg", square_jpeg([20, 90, 160]));
    let t = path_of(&preheat(&d.base, "tiny", &origin.url("/t.jpg"), &sink.url("/cb/t")).await);
    eventually(WAIT, "the worker to ask for the original", || async {
        (origin.hits("/t.jpg") == 1).then_some(())
    })
    .await;

    worker.signal("TERM");
    wait_log(&d, "worker", "Graceful shutdown started").await;
    // Its idle claim loop has let go of its blocking read: a job queued
    // from now on can only be taken by a worker that still claims.
    eventually(WAIT, "no blocking read left in Redis", || async {
        nobody_blocked(&redis).then_some(())
    })
    .await;
    let u = path_of(&preheat(&d.base, "tiny", &origin.url("/u.jpg"), &sink.url("/cb/u")).await);
    gate.open();

    let status = worker.wait_exit(WAIT).await;
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    if called_back_before_exit {
        let hooks = sink.received();
        assert_eq!(
            hooks.len(),
            1,
            "the finished job's webhook went out before exit"
        );
        assert_eq!(hooks[0].path_and_query, "/cb/t");
    }
    let cache = storage_of(&d).join("media/cache");
    assert_eq!(
        files_under(&cache),
        vec![format!("tiny/{t}")],
        "the job in hand was finished, the later one not started"
    );
    assert_eq!(xlen(&redis), 1, "only the job queued after SIGTERM waits");
    let held = pending(&redis);
    assert!(held.is_empty(), "nothing left claimed: {held:?}");
    assert_eq!(origin.hits("/u.jpg"), 0);

    let _next = start(&d, "worker", "worker-2");
    let hooks = sink.wait_for(2, WAIT).await;
    wait_drained(&redis).await;
    let mut called_back: Vec<&str> = hooks.iter().map(|h| h.path_and_query.as_str()).collect();
    called_back.sort_unstable();
    assert_eq!(called_back, ["/cb/t", "/cb/u"]);
    assert!(hooks.iter().all(|h| h.body["status"] == "done"));
    let mut both = vec![format!("tiny/{t}"), format!("tiny/{u}")];
    both.sort();
    assert_eq!(files_under(&cache), both);
    assert_no_temp_files(&storage_of(&d));
    assert_eq!(origin.hits("/t.jpg"), 1, "the finished job was not redone");
}

/// Ctrl-C again during a graceful stop means now: the worker stops waiting
/// for the job in hand (its origin never answers, the deadline is ten
/// minutes) and exits, leaving the job claimed in Redis for another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_a_draining_worker_at_once() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "[queue]\nshutdown_deadline_secs = 600\n");
    let _front = start(&d, "front", "front");
    let mut worker = start(&d, "worker", "worker");
    wait_healthy(&d.base).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    origin.serve("/t.jpg", square_jpeg([90, 20, 160]).with_gate(&gate));
    preheat(&d.base, "tiny", &origin.url("/t.jpg"), &sink.url("/cb/t")).await;
    eventually(WAIT, "the worker to ask for the original", || async {
        (origin.hits("/t.jpg") == 1).then_some(())
    })
    .await;

    worker.signal("TERM");
    wait_log(&d, "worker", "Graceful shutdown started").await;
    worker.signal("INT");
    worker.wait_exit(WAIT).await;
    let log = std::fs::read_to_string(d.dir.path().join("worker.log")).unwrap();
    assert_eq!(pending(&redis).len(), 1, "the job is left claimed: {log}");
    assert!(files_under(&storage_of(&d).join("media/cache")).is_empty());
    assert!(sink.received().is_empty());
    gate.open();
}

/// The contract as configured: `queue.shutdown_deadline_secs` is the time a
/// worker gets to finish its jobs, here 10 s, with no front grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_worker_finish_its_job_within_the_shutdown_deadline() {
    sigterm_drains_the_job_in_hand(
        "[queue]\nvisibility_timeout_secs = 2\nshutdown_deadline_secs = 10\n\
         [server]\ngrace_period_secs = 0\ngraceful_shutdown_timeout_secs = 10\n",
        false,
    )
    .await;
}

/// Finishing a job includes telling its subscribers; a worker that drains
/// and exits should not leave that to whichever worker runs next (and a
/// grace period set for fronts changes nothing for a worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_worker_call_back_the_job_it_finished_while_draining() {
    sigterm_drains_the_job_in_hand(
        "[queue]\nvisibility_timeout_secs = 2\nshutdown_deadline_secs = 10\n\
         [server]\ngrace_period_secs = 3\n",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_deadline_leaves_the_job_unacked_for_another_worker() {
    let redis = RedisServer::start();
    // The grace period outlasts the 1 s deadline, so the deadline is what
    // ends the job.
    let d = deployment(
        &redis,
        "[queue]\nvisibility_timeout_secs = 1\nshutdown_deadline_secs = 1\n\
         [server]\ngrace_period_secs = 3\n",
    );
    let _front = start(&d, "front", "front");
    let mut worker = start(&d, "worker", "worker");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    origin.serve("/s.jpg", square_jpeg([160, 160, 20]).with_gate(&gate));
    let path = path_of(&preheat(&d.base, "tiny", &origin.url("/s.jpg"), &sink.url("/cb")).await);
    eventually(WAIT, "the worker to ask for the original", || async {
        (origin.hits("/s.jpg") == 1).then_some(())
    })
    .await;

    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    wait_log(&d, "worker", "shutdown deadline passed").await;
    // Left as it was: queued, claimed by the worker that is gone, unacked.
    assert_eq!(xlen(&redis), 1);
    let held = pending(&redis);
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].consumer.contains(&format!("-{}-", worker.pid())));
    assert_eq!(sink.count(), 0);
    assert!(files_under(&storage_of(&d).join("media/cache")).is_empty());

    gate.open();
    let _next = start(&d, "worker", "worker-2");
    let hooks = sink.wait_for(1, WAIT).await;
    assert_eq!(hooks[0].body["status"], "done", "{:?}", hooks[0].body);
    wait_drained(&redis).await;
    assert_eq!(
        files_under(&storage_of(&d).join("media/cache")),
        vec![format!("tiny/{path}")]
    );
    assert_eq!(origin.hits("/s.jpg"), 2);
    assert_eq!(sink.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_a_front_stop_answering_and_exit_cleanly() {
    let redis = RedisServer::start();
    // A grace period, so the process is still there after it stops serving.
    let d = deployment(&redis, "[server]\ngrace_period_secs = 2\n");
    let mut front = start(&d, "front", "front");
    wait_healthy(&d.base).await;

    front.signal("TERM");
    wait_log(&d, "front", "Graceful shutdown started").await;
    wait_log(&d, "front", "Shutting down").await;
    assert!(front.exited().is_none(), "still in its grace period");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let late = client.get(format!("{}/healthz", d.base)).send().await;
    assert!(
        late.is_err(),
        "a request after SIGTERM was answered: {:?}",
        late.map(|r| r.status())
    );
    let status = front.wait_exit(WAIT).await;
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let addr = d.base.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_receiver_that_hangs_or_fails_does_not_hold_up_other_jobs() {
    let redis = RedisServer::start();
    // One job at a time, and a webhook may take a minute: were delivery part
    // of a job, one hanging receiver would stall every job after it.
    let d = deployment(
        &redis,
        "[queue]\nworker_concurrency = 1\n[callback]\ntimeout_ms = 60000\n",
    );
    let _front = start(&d, "front", "front");
    let _worker = start(&d, "worker", "worker");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    let hanging = CallbackSink::start().await;
    let never = Gate::closed();
    hanging.hold_until(&never);
    let failing = CallbackSink::start().await;
    failing.set_status(500);
    let healthy = CallbackSink::start().await;

    let names = ["a", "f", "b", "c", "d", "e"];
    for (n, name) in names.iter().enumerate() {
        origin.serve(&format!("/{name}.jpg"), square_jpeg([30 * n as u8, 60, 90]));
    }
    let mut paths = Vec::new();
    let a = preheat(&d.base, "tiny", &origin.url("/a.jpg"), &hanging.url("/cb")).await;
    paths.push(path_of(&a));
    hanging.wait_for(1, WAIT).await;
    let f = preheat(&d.base, "tiny", &origin.url("/f.jpg"), &failing.url("/cb")).await;
    paths.push(path_of(&f));
    failing.wait_for(2, WAIT).await;
    for name in &names[2..] {
        let image = origin.url(&format!("/{name}.jpg"));
        let answer = preheat(
            &d.base,
            "tiny",
            &image,
            &healthy.url(&format!("/cb/{name}")),
        )
        .await;
        paths.push(path_of(&answer));
    }

    let hooks = healthy.wait_for(4, WAIT).await;
    assert!(hooks.iter().all(|h| h.body["status"] == "done"));
    wait_drained(&redis).await;
    for path in &paths {
        let variant = until_ready(&format!("{}/media/cache/tiny/{path}", d.base)).await;
        assert_eq!(dimensions(&variant.bytes().await.unwrap()), (125, 125));
    }
    // A's receiver still holds its one webhook: it hung through all of it.
    assert_eq!(hanging.count(), 1);
    assert!(!never.is_open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_callback_is_timed_out_retried_under_one_id_then_given_up() {
    let redis = RedisServer::start();
    let d = deployment(&redis, "[callback]\ntimeout_ms = 300\nmax_attempts = 3\n");
    let _front = start(&d, "front", "front");
    let _worker = start(&d, "worker", "worker");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    origin.serve("/h.jpg", square_jpeg([120, 120, 120]));
    let hanging = CallbackSink::start().await;
    let never = Gate::closed();
    hanging.hold_until(&never);
    let path = path_of(&preheat(&d.base, "tiny", &origin.url("/h.jpg"), &hanging.url("/cb")).await);

    // The job is done and acked whatever the receiver does.
    wait_drained(&redis).await;
    until_ready(&format!("{}/media/cache/tiny/{path}", d.base)).await;
    let hooks = hanging.wait_for(3, WAIT).await;
    let ids = webhook_ids(&hooks);
    assert!(ids.iter().all(|id| *id == ids[0]), "one delivery: {ids:?}");
    eventually(WAIT, "the delivery to be given up", || async {
        (redis.redis_int(&["LLEN", WEBHOOKS_DEAD]) == 1
            && redis.redis_int(&["HLEN", WEBHOOKS_PENDING]) == 0)
            .then_some(())
    })
    .await;
    assert_eq!(hanging.count(), 3, "max_attempts = 3");
}

/// A worker sends the webhooks it schedules itself: they are leased to it in
/// the same script that files them, and never fetched back from Redis. Killed
/// while sending, it leaves them to another worker once that lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_a_killed_worker_was_sending_are_sent_by_another_after_their_lease() {
    let redis = RedisServer::start();
    // The lease is 2 x 2 s + 1 s. With a ten-minute poll, a worker asks
    // Redis for due deliveries only as it starts.
    let d = deployment(&redis, "[callback]\ntimeout_ms = 2000\npoll_ms = 600000\n");
    let _front = start(&d, "front", "front");
    let mut first = start(&d, "worker", "worker-1");
    wait_healthy(&d.base).await;

    let origin = Origin::start().await;
    origin.serve("/l.jpg", square_jpeg([40, 160, 90]));
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    sink.hold_until(&gate);
    let scheduled_at = now_millis();
    preheat(&d.base, "tiny", &origin.url("/l.jpg"), &sink.url("/cb")).await;
    let held = sink.wait_for(1, WAIT).await;
    let id = webhook_ids(&held)[0].clone();
    // webhook_take.lua reads each delivery it leases with HGET; nothing else does.
    assert_eq!(
        redis.command_calls("hget"),
        0,
        "the worker sent its own webhook without taking it from Redis"
    );
    let leased_until: u64 = redis
        .redis_bulk(&["ZSCORE", WEBHOOKS_DUE, &id])
        .expect("the delivery is in the outbox while it is sent")
        .parse()
        .expect("a due time in ms");
    assert!(
        leased_until >= scheduled_at + 4000,
        "leased for its attempt: due at {leased_until}, scheduled at {scheduled_at}"
    );

    first.signal("KILL");
    first.wait_exit(WAIT).await;
    gate.open();
    assert_eq!(redis.redis_int(&["HLEN", WEBHOOKS_PENDING]), 1);
    let wait = Duration::from_millis(leased_until.saturating_sub(now_millis()) + 200);
    tokio::time::sleep(wait).await;

    let _second = start(&d, "worker", "worker-2");
    let hooks = sink.wait_for(2, WAIT).await;
    assert_eq!(redis.command_calls("hget"), 1, "taken from Redis this time");
    assert_eq!(
        webhook_ids(&hooks),
        vec![id.clone(), id],
        "one delivery, sent again"
    );
    assert_eq!(hooks[1].body["status"], "done");
    eventually(WAIT, "the webhook outbox settled", || async {
        (redis.redis_int(&["HLEN", WEBHOOKS_PENDING]) == 0
            && redis.redis_int(&["ZCARD", WEBHOOKS_DUE]) == 0)
            .then_some(())
    })
    .await;
    assert_eq!(sink.count(), 2);
}

/// The embedded backend keeps its queue in memory only: a `kiln serve`
/// stopped with a job still waiting says in its log that it is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_serve_stopped_with_a_job_waiting_says_it_is_lost() {
    let d = crate::distributed::embedded_deployment(
        "[queue]\nworker_concurrency = 1\nshutdown_deadline_secs = 1\n",
    );
    let mut serve = start(&d, "serve", "serve");
    wait_healthy(&d.base).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    origin.serve("/a.jpg", square_jpeg([1, 2, 3]).with_gate(&gate));
    origin.serve("/b.jpg", square_jpeg([3, 2, 1]));
    preheat(&d.base, "tiny", &origin.url("/a.jpg"), &sink.url("/cb/a")).await;
    // The only claim loop is on the first job; the second waits behind it.
    eventually(WAIT, "the worker to ask for the first original", || async {
        (origin.hits("/a.jpg") == 1).then_some(())
    })
    .await;
    preheat(&d.base, "tiny", &origin.url("/b.jpg"), &sink.url("/cb/b")).await;

    serve.signal("TERM");
    let status = serve.wait_exit(WAIT).await;
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let log = std::fs::read_to_string(log_path(&d, "serve")).unwrap();
    let said = log
        .lines()
        .find(|line| line.contains("lost with this process"))
        .unwrap_or_else(|| panic!("no word of the lost job in:\n{log}"));
    assert!(said.contains("jobs=1"), "{said}");
    gate.open();
}
