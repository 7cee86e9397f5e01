//! This process's counters and histograms, and their Prometheus text
//! exposition (format 0.0.4). Each process (front, worker, or both) owns one
//! `Metrics` and exposes its own numbers; nothing here is shared between
//! processes. Owns no I/O: gauges read elsewhere at scrape time (queue
//! depths) are passed in to `render`.
//!
//! The front's request path only does relaxed atomic increments on series
//! that exist from the start: no lock, no allocation, no formatting. Those
//! counters are sharded per thread (summed when scraped) so that front
//! threads do not bounce one cache line between cores on every hit. Worker
//! series (jobs, renders, fetches, callbacks) happen a few times per job and
//! may take a short lock; their labels come from closed sets (error codes,
//! configured filters), so cardinality is bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// The front's routes, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/media/cache/<filter>/<path>`
    Cache,
    /// `/media/cache/resolve/<filter>/<path>`
    Resolve,
    /// `/request/<filter>`
    Request,
    /// `/media/<code>`
    Media,
    /// The SAIS client protocol: dispatch, account setup, media by ids, status.
    Sais,
    /// `/tools`, `/mcp`
    Tools,
    /// `/healthz`, `/readyz`
    Health,
    /// `/metrics`
    Metrics,
    /// `/ui`
    Ui,
    /// Anything else (404).
    Other,
}

impl Route {
    const ALL: [Route; 10] = [
        Route::Cache,
        Route::Resolve,
        Route::Request,
        Route::Media,
        Route::Sais,
        Route::Tools,
        Route::Health,
        Route::Metrics,
        Route::Ui,
        Route::Other,
    ];

    /// The route of a request path: a few prefix comparisons.
    pub fn of(path: &str) -> Route {
        if let Some(rest) = path.strip_prefix("/media/") {
            return if rest.starts_with("cache/resolve/") {
                Route::Resolve
            } else if rest.starts_with("cache/") {
                Route::Cache
            } else {
                Route::Media
            };
        }
        match path {
            "/healthz" | "/readyz" => Route::Health,
            "/metrics" => Route::Metrics,
            "/ui" => Route::Ui,
            "/status"
            | "/account_setup"
            | "/account_setup.json"
            | "/dispatch_process"
            | "/dispatch_process.json"
            | "/fetch/media/by-ids" => Route::Sais,
            "/tools" | "/mcp" => Route::Tools,
            _ if path.starts_with("/request/") => Route::Request,
            _ => Route::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Cache => "cache",
            Route::Resolve => "resolve",
            Route::Request => "request",
            Route::Media => "media",
            Route::Sais => "sais",
            Route::Tools => "tools",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Ui => "ui",
            Route::Other => "other",
        }
    }
}

/// Where a hit's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitSource {
    /// Hot bytes in memory, with their index entry.
    Memory,
    /// The index (memory or Redis) knew the variant; bytes read from storage.
    Index,
    /// Neither: found in storage and indexed now.
    Storage,
}

impl HitSource {
    const ALL: [HitSource; 3] = [HitSource::Memory, HitSource::Index, HitSource::Storage];

    pub fn as_str(self) -> &'static str {
        match self {
            HitSource::Memory => "memory",
            HitSource::Index => "index",
            HitSource::Storage => "storage",
        }
    }
}

/// Status codes 100..=599 each have their counter; anything else counts as 599.
const STATUSES: usize = 600;

/// Upper bounds of the duration histograms, seconds.
const SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of seconds.
#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at or under each bound (not cumulative; summed when written).
    buckets: [u64; SECONDS_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = SECONDS_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in SECONDS_BUCKETS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// How a job attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum JobOutcome {
    /// Rendered, stored and acknowledged.
    Done,
    /// Failed retryably; put back to wait.
    Retry,
    /// Failed for good; dead-lettered.
    Failed,
}

impl JobOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Done => "done",
            JobOutcome::Retry => "retry",
            JobOutcome::Failed => "failed",
        }
    }
}

/// A job stream's numbers, read when metrics are scraped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    /// `urgent`, `preheat`, `delayed` or `dead`.
    pub stream: &'static str,
    /// Entries in the stream (Redis `XLEN`): waiting plus claimed, not yet acked.
    pub length: u64,
    /// Entries not yet delivered to a worker (consumer group `lag`).
    pub lag: u64,
    /// Entries delivered and not yet acknowledged (consumer group `pending`).
    pub pending: u64,
}

/// Shards of the request counters; a thread uses one for its lifetime.
const SHARDS: usize = 8;

thread_local! {
    /// This thread's shard, handed out round-robin on first use.
    static SHARD: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) as usize % SHARDS
    };
}

/// One shard of the request path's counters, on cache lines of its own.
#[repr(align(128))]
struct RequestShard {
    /// By route, then status code.
    requests: [[AtomicU64; STATUSES]; Route::ALL.len()],
    hits: [AtomicU64; 3],
    misses: AtomicU64,
    enqueued: AtomicU64,
}

impl RequestShard {
    fn new() -> RequestShard {
        RequestShard {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            hits: Default::default(),
            misses: AtomicU64::new(0),
            enqueued: AtomicU64::new(0),
        }
    }
}

/// This process's numbers.
pub struct Metrics {
    shards: Box<[RequestShard]>,
    jobs: Mutex<BTreeMap<(JobOutcome, &'static str), u64>>,
    renders: Mutex<BTreeMap<String, Histogram>>,
    fetches_ok: AtomicU64,
    fetches_failed: AtomicU64,
    fetch_bytes: AtomicU64,
    fetch_seconds: Mutex<Histogram>,
    callback_attempts: AtomicU64,
    callback_failures: AtomicU64,
    callbacks_given_up: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            shards: (0..SHARDS).map(|_| RequestShard::new()).collect(),
            jobs: Mutex::new(BTreeMap::new()),
            renders: Mutex::new(BTreeMap::new()),
            fetches_ok: AtomicU64::new(0),
            fetches_failed: AtomicU64::new(0),
            fetch_bytes: AtomicU64::new(0),
            fetch_seconds: Mutex::new(Histogram::default()),
            callback_attempts: AtomicU64::new(0),
            callback_failures: AtomicU64::new(0),
            callbacks_given_up: AtomicU64::new(0),
        }
    }

    /// This thread's shard.
    #[inline]
    fn shard(&self) -> &RequestShard {
        &self.shards[SHARD.with(|shard| *shard)]
    }

    /// One answered request: one relaxed increment, two with a hit.
    #[inline]
    pub fn request(&self, route: Route, status: u16, hit: Option<HitSource>) {
        let status = usize::from(status).min(STATUSES - 1);
        let shard = self.shard();
        shard.requests[route as usize][status].fetch_add(1, Ordering::Relaxed);
        if let Some(source) = hit {
            shard.hits[source as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A cache look-up that found no stored variant.
    pub fn miss(&self) {
        self.shard().misses.fetch_add(1, Ordering::Relaxed);
    }

    /// A miss that enqueued a job (not one already queued).
    pub fn enqueued(&self) {
        self.shard().enqueued.fetch_add(1, Ordering::Relaxed);
    }

    /// A request counter summed over the shards.
    fn sum(&self, counter: impl Fn(&RequestShard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|shard| counter(shard).load(Ordering::Relaxed))
            .sum()
    }

    /// A job attempt's outcome; `code` is `Error::code()` (empty when done).
    pub fn job(&self, outcome: JobOutcome, code: &'static str) {
        *self.jobs.lock().entry((outcome, code)).or_default() += 1;
    }

    /// One filter's render (resize + encode) time.
    pub fn render(&self, filter: &str, took: Duration) {
        let mut renders = self.renders.lock();
        match renders.get_mut(filter) {
            Some(h) => h.observe(took.as_secs_f64()),
            None => {
                let mut h = Histogram::default();
                h.observe(took.as_secs_f64());
                renders.insert(filter.to_string(), h);
            }
        }
    }

    /// One download of an original: its bytes when it succeeded, and its time.
    pub fn fetch(&self, bytes: Option<u64>, took: Duration) {
        match bytes {
            Some(n) => {
                self.fetches_ok.fetch_add(1, Ordering::Relaxed);
                self.fetch_bytes.fetch_add(n, Ordering::Relaxed);
            }
            None => {
                self.fetches_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.fetch_seconds.lock().observe(took.as_secs_f64());
    }

    /// One webhook attempt; `failed` when it was not accepted, `given_up`
    /// when it was the last one.
    pub fn callback(&self, failed: bool, given_up: bool) {
        self.callback_attempts.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.callback_failures.fetch_add(1, Ordering::Relaxed);
        }
        if given_up {
            self.callbacks_given_up.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition of everything, with the job streams
    /// read at scrape time (`None`: the queue did not answer).
    pub fn render_text(&self, streams: Option<&[StreamStats]>) -> String {
        let mut out = String::with_capacity(8192);
        let o = &mut out;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        header(
            o,
            "kiln_http_requests_total",
            "counter",
            "Requests answered by the front, by route and status.",
        );
        for route in Route::ALL {
            for status in 0..STATUSES {
                let n = self.sum(|s| &s.requests[route as usize][status]);
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "kiln_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                        route.as_str()
                    );
                }
            }
        }
        header(
            o,
            "kiln_cache_hits_total",
            "counter",
            "Variant hits (200 or 304) by where the answer came from.",
        );
        for source in HitSource::ALL {
            let _ = writeln!(
                o,
                "kiln_cache_hits_total{{source=\"{}\"}} {}",
                source.as_str(),
                self.sum(|s| &s.hits[source as usize])
            );
        }
        counter(
            o,
            "kiln_cache_misses_total",
            "Cache look-ups that found no stored variant.",
            self.sum(|s| &s.misses),
        );
        let busy: u64 = [Route::Cache, Route::Resolve]
            .iter()
            .map(|r| self.sum(|s| &s.requests[*r as usize][202]))
            .sum();
        counter(
            o,
            "kiln_cache_busy_total",
            "Misses answered 202 (busy, rendering).",
            busy,
        );
        counter(
            o,
            "kiln_cache_jobs_enqueued_total",
            "Misses that enqueued a new job.",
            self.sum(|s| &s.enqueued),
        );

        header(
            o,
            "kiln_jobs_total",
            "counter",
            "Job attempts run by this process's workers, by outcome and error code.",
        );
        for ((outcome, code), n) in self.jobs.lock().iter() {
            let _ = writeln!(
                o,
                "kiln_jobs_total{{outcome=\"{}\",code=\"{code}\"}} {n}",
                outcome.as_str()
            );
        }
        header(
            o,
            "kiln_render_seconds",
            "histogram",
            "Resize and encode time of one variant, by filter.",
        );
        for (filter, h) in self.renders.lock().iter() {
            h.write(
                o,
                "kiln_render_seconds",
                &format!("filter=\"{}\"", label_value(filter)),
            );
        }

        header(
            o,
            "kiln_fetches_total",
            "counter",
            "Downloads of originals, by outcome.",
        );
        let _ = writeln!(
            o,
            "kiln_fetches_total{{outcome=\"ok\"}} {}",
            load(&self.fetches_ok)
        );
        let _ = writeln!(
            o,
            "kiln_fetches_total{{outcome=\"error\"}} {}",
            load(&self.fetches_failed)
        );
        counter(
            o,
            "kiln_fetch_bytes_total",
            "Bytes of originals downloaded.",
            load(&self.fetch_bytes),
        );
        header(
            o,
            "kiln_fetch_seconds",
            "histogram",
            "Time of one download of an original, successful or not.",
        );
        self.fetch_seconds.lock().write(o, "kiln_fetch_seconds", "");

        counter(
            o,
            "kiln_callback_attempts_total",
            "Webhook delivery attempts.",
            load(&self.callback_attempts),
        );
        counter(
            o,
            "kiln_callback_failures_total",
            "Webhook attempts that failed (refused, error or redirect status, timeout, or its account's secret unreadable, so not sent unsigned).",
            load(&self.callback_failures),
        );
        counter(
            o,
            "kiln_callbacks_given_up_total",
            "Webhooks given up after their last attempt.",
            load(&self.callbacks_given_up),
        );

        if let Some(streams) = streams {
            for (name, help, value) in [
                (
                    "kiln_queue_length",
                    "Entries in a job stream: waiting, claimed, or (delayed, dead) parked.",
                    (|s: &StreamStats| s.length) as fn(&StreamStats) -> u64,
                ),
                (
                    "kiln_queue_lag",
                    "Entries of a job stream not yet delivered to a worker.",
                    |s: &StreamStats| s.lag,
                ),
                (
                    "kiln_queue_pending",
                    "Entries of a job stream delivered and not yet acknowledged.",
                    |s: &StreamStats| s.pending,
                ),
            ] {
                header(o, name, "gauge", help);
                for s in streams {
                    let _ = writeln!(o, "{name}{{stream=\"{}\"}} {}", s.stream, value(s));
                }
            }
            let dead = streams
                .iter()
                .find(|s| s.stream == "dead")
                .map_or(0, |s| s.length);
            header(
                o,
                "kiln_dead_letters",
                "gauge",
                "Jobs in the dead-letter stream.",
            );
            let _ = writeln!(o, "kiln_dead_letters {dead}");
        }
        header(
            o,
            "kiln_queue_up",
            "gauge",
            "1 when the queue answered this scrape.",
        );
        let _ = writeln!(o, "kiln_queue_up {}", u8::from(streams.is_some()));
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value escaped as the text format wants (backslash, quote, newline).
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_of_paths() {
        for (path, route) in [
            ("/media/cache/small/a.png", Route::Cache),
            ("/media/cache/resolve/small/a.png", Route::Resolve),
            ("/media/0123456789abcdef", Route::Media),
            ("/request/small", Route::Request),
            ("/dispatch_process.json", Route::Sais),
            ("/readyz", Route::Health),
            ("/metrics", Route::Metrics),
            ("/ui", Route::Ui),
            ("/mcp", Route::Tools),
            ("/nope", Route::Other),
        ] {
            assert_eq!(Route::of(path), route, "{path}");
        }
    }

    #[test]
    fn shards_add_up_across_threads() {
        let m = std::sync::Arc::new(Metrics::new());
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.request(Route::Cache, 200, Some(HitSource::Index));
                    }
                    m.miss();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.render_text(None);
        let n = (SHARDS + 3) * 1000;
        for line in [
            format!("kiln_http_requests_total{{route=\"cache\",status=\"200\"}} {n}"),
            format!("kiln_cache_hits_total{{source=\"index\"}} {n}"),
            format!("kiln_cache_misses_total {}", SHARDS + 3),
            "kiln_queue_up 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn exposition_counts_and_buckets() {
        let m = Metrics::new();
        m.request(Route::Cache, 200, Some(HitSource::Memory));
        m.request(Route::Cache, 200, Some(HitSource::Memory));
        m.request(Route::Cache, 202, None);
        m.request(Route::Other, 9999, None);
        m.job(JobOutcome::Failed, "origin-status");
        m.render("we\"ird", Duration::from_millis(30));
        m.render("we\"ird", Duration::from_secs(60));
        let text = m.render_text(Some(&[StreamStats {
            stream: "dead",
            length: 3,
            ..Default::default()
        }]));
        for line in [
            "kiln_http_requests_total{route=\"cache\",status=\"200\"} 2",
            "kiln_http_requests_total{route=\"cache\",status=\"202\"} 1",
            "kiln_http_requests_total{route=\"other\",status=\"599\"} 1",
            "kiln_cache_hits_total{source=\"memory\"} 2",
            "kiln_cache_busy_total 1",
            "kiln_jobs_total{outcome=\"failed\",code=\"origin-status\"} 1",
            "kiln_render_seconds_bucket{filter=\"we\\\"ird\",le=\"0.025\"} 0",
            "kiln_render_seconds_bucket{filter=\"we\\\"ird\",le=\"0.05\"} 1",
            "kiln_render_seconds_bucket{filter=\"we\\\"ird\",le=\"+Inf\"} 2",
            "kiln_render_seconds_count{filter=\"we\\\"ird\"} 2",
            "kiln_fetch_seconds_count 0",
            "kiln_dead_letters 3",
            "kiln_queue_up 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
