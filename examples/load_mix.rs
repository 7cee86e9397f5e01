//! A bounded, loopback-only load run against a running kiln: a mix of cache
//! hits, cache misses, pre-heats and hostile requests for a few minutes, with
//! kiln's resident memory sampled along the way. `scripts/load-mix` sets up
//! kiln, Redis and an origin and runs this; see its header for how to read
//! the output.
//!
//! Pass criteria (exit status 1 otherwise):
//! - no valid request is answered 5xx (503 included), times out or fails at
//!   the transport level;
//! - kiln's RSS averaged over the last third of the run is at most 10 % above
//!   its average over the middle third;
//! - kiln is still running at the end.
//!
//! Bad requests that get another status than the expected 4xx are counted
//! and printed, but do not fail the run; neither do valid requests answered
//! an unexpected non-5xx status (printed as warnings).
//!
//! Deliberately does not use the `kiln` library crate, so it links quickly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use image::{ImageEncoder, RgbImage};

// ---- the mix -------------------------------------------------------------

/// Relative weights of the request classes (they need not sum to 100).
const WEIGHT_HIT: u32 = 60;
const WEIGHT_MISS: u32 = 20;
const WEIGHT_BAD: u32 = 10;
const WEIGHT_PREHEAT: u32 = 10;

/// Share of hits sent with `If-None-Match` (expect 304), in percent.
const CONDITIONAL_HIT_PERCENT: u64 = 30;
/// Misses waiting to be rendered at once; past this, miss slots re-ask
/// pending variants instead of asking new ones (keeps the queue bounded).
const MAX_PENDING_MISSES: usize = 48;
/// Share of miss slots that ask a new variant while fewer are pending, in percent.
const NEW_MISS_PERCENT: u64 = 50;
/// A pending miss is not re-asked sooner than this after its last ask.
const REASK_AFTER: Duration = Duration::from_millis(500);
/// Filters of the embedded presets.
const FILTERS: &[&str] = &["tiny", "small", "medium", "large", "square"];
/// Filters pre-heats ask for.
const PREHEAT_FILTERS: &[&str] = &["tiny", "small", "medium"];
/// Corrupt files the origin serves (pre-heats of them fail in the worker).
const CORRUPT_FILES: &[&str] = &[
    "bad-truncated.jpg",
    "bad-random.jpg",
    "bad-html.jpg",
    "bad-header-only.png",
    "bad-empty.jpg",
];
/// Names the origin answers 404 for.
const MISSING_FILES: usize = 5;
/// Longest accepted request path in kiln (`server.max_path_bytes`).
const MAX_PATH_BYTES: usize = 1024;
/// RSS growth (last third over middle third) that fails the run, in percent.
const MAX_RSS_GROWTH_PERCENT: f64 = 10.0;
/// Shorter runs report the RSS growth without failing on it: kiln's caches
/// (hot variants, index) and the allocator's working set for decoding fill
/// during the first minute or two, so the middle third of a short run is
/// still on that ramp.
const MIN_JUDGED_SECS: u64 = 180;
/// Seconds between two RSS samples.
const RSS_EVERY: Duration = Duration::from_secs(5);
/// Valid-request failures and bad-request mismatches printed in full.
const SHOW_FIRST: usize = 5;

// ---- arguments -----------------------------------------------------------

struct Args {
    base: String,
    origin: String,
    key: String,
    pid: u32,
    duration: Duration,
    concurrency: usize,
    originals: usize,
    copies: usize,
    warm: usize,
    rate: u64,
    timeout: Duration,
    storage_dir: Option<PathBuf>,
    origin_dir: Option<PathBuf>,
    root: String,
    seed: u64,
}

const USAGE: &str = "\
usage: load_mix --base URL --origin URL --key KEY --pid PID [options]
  --base URL            kiln, e.g. http://127.0.0.1:8080
  --origin URL          the origin serving --origin-dir, e.g. http://127.0.0.1:8081
  --key KEY             kiln's admin key (auth.admin_key)
  --pid PID             kiln's process id (RSS is read from /proc/PID/status)
  --duration-secs N     length of the measured run (default 180)
  --concurrency N       requests in flight (default 24)
  --originals N         originals img-0..img-N-1 (default 200)
  --copies N            storage bins 0..N-1 holding the originals; bins past 0 are hard
                        links, so misses have originals x copies x 5 new variants (default 10)
  --warm N              variants rendered before the run, the hit set (default 100)
  --rate N              requests per second over all tasks, 0 = as fast as possible (default 250)
  --timeout-secs N      per-request timeout (default 10)
  --storage-dir DIR     kiln's storage directory: originals are written to DIR/<root>/0/
  --origin-dir DIR      the origin's directory: originals (hard links) and corrupt files
  --root NAME           storage root of the originals (default \"default\")
  --seed N              random seed (default 1)
Existing files are kept, so a second run over the same directories skips generation.";

fn parse_args() -> Result<Args, String> {
    let mut map: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let Some(name) = flag.strip_prefix("--") else {
            return Err(format!("unexpected argument {flag:?}"));
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (
                name.to_string(),
                it.next().ok_or_else(|| format!("{flag} needs a value"))?,
            ),
        };
        map.insert(name, value);
    }
    let take = |map: &mut HashMap<String, String>, name: &str| map.remove(name);
    let required = |map: &mut HashMap<String, String>, name: &str| {
        take(map, name).ok_or_else(|| format!("--{name} is required"))
    };
    fn number<T: std::str::FromStr>(
        value: Option<String>,
        name: &str,
        default: T,
    ) -> Result<T, String> {
        match value {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: {v:?} is not a number")),
        }
    }
    let args = Args {
        base: required(&mut map, "base")?
            .trim_end_matches('/')
            .to_string(),
        origin: required(&mut map, "origin")?
            .trim_end_matches('/')
            .to_string(),
        key: required(&mut map, "key")?,
        pid: number(Some(required(&mut map, "pid")?), "pid", 0)?,
        duration: Duration::from_secs(number(
            take(&mut map, "duration-secs"),
            "duration-secs",
            180,
        )?),
        concurrency: number(take(&mut map, "concurrency"), "concurrency", 24)?,
        originals: number(take(&mut map, "originals"), "originals", 200)?,
        copies: number(take(&mut map, "copies"), "copies", 10)?,
        warm: number(take(&mut map, "warm"), "warm", 100)?,
        rate: number(take(&mut map, "rate"), "rate", 250)?,
        timeout: Duration::from_secs(number(take(&mut map, "timeout-secs"), "timeout-secs", 10)?),
        storage_dir: take(&mut map, "storage-dir").map(PathBuf::from),
        origin_dir: take(&mut map, "origin-dir").map(PathBuf::from),
        root: take(&mut map, "root").unwrap_or_else(|| "default".into()),
        seed: number(take(&mut map, "seed"), "seed", 1)?,
    };
    if let Some(name) = map.keys().next() {
        return Err(format!("unknown option --{name}"));
    }
    if args.concurrency == 0 || args.originals == 0 || args.copies == 0 || args.warm == 0 {
        return Err("--concurrency, --originals, --copies and --warm must be positive".into());
    }
    if args.warm >= args.originals * args.copies * FILTERS.len() {
        return Err("--warm must be below originals x copies x filters".into());
    }
    Ok(args)
}

// ---- a small deterministic RNG (no extra dependency) -----------------------

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo + 1)) as u32
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

// ---- test originals ---------------------------------------------------------

/// Original `n`'s file name: mostly JPEG, every sixth a PNG.
fn original_name(n: usize) -> String {
    if n % 6 == 5 {
        format!("img-{n}.png")
    } else {
        format!("img-{n}.jpg")
    }
}

/// A photo-ish picture: a diagonal two-colour gradient, soft blobs, a faint
/// wave texture and grain, so JPEG sizes and decode costs look like photos.
fn photo(rng: &mut Rng, width: u32, height: u32, grain: f32) -> RgbImage {
    let c0: [f32; 3] = [rng.unit() * 255.0, rng.unit() * 255.0, rng.unit() * 255.0];
    let c1: [f32; 3] = [rng.unit() * 255.0, rng.unit() * 255.0, rng.unit() * 255.0];
    let blobs: Vec<(f32, f32, f32, [f32; 3])> = (0..6)
        .map(|_| {
            (
                rng.unit() * width as f32,
                rng.unit() * height as f32,
                (0.05 + rng.unit() * 0.25) * width.min(height) as f32,
                [rng.unit() * 255.0, rng.unit() * 255.0, rng.unit() * 255.0],
            )
        })
        .collect();
    let freq = 0.01 + rng.unit() * 0.05;
    let mut noise = rng.clone();
    let (wf, hf) = (width as f32, height as f32);
    RgbImage::from_fn(width, height, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let t = (xf / wf + yf / hf) * 0.5;
        let mut px = [0f32; 3];
        for c in 0..3 {
            px[c] = c0[c] * (1.0 - t) + c1[c] * t;
        }
        for (bx, by, r, col) in &blobs {
            let d2 = ((xf - bx) * (xf - bx) + (yf - by) * (yf - by)) / (r * r);
            if d2 < 4.0 {
                let a = (-d2).exp() * 0.8;
                for c in 0..3 {
                    px[c] = px[c] * (1.0 - a) + col[c] * a;
                }
            }
        }
        let wave = ((xf * freq).sin() * (yf * freq * 0.7).cos()) * 12.0;
        let g = (noise.unit() - 0.5) * grain;
        image::Rgb([
            (px[0] + wave + g).clamp(0.0, 255.0) as u8,
            (px[1] + wave + g).clamp(0.0, 255.0) as u8,
            (px[2] - wave + g).clamp(0.0, 255.0) as u8,
        ])
    })
}

fn encode(name: &str, img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    if name.ends_with(".png") {
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .expect("png encode");
    } else {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .expect("jpeg encode");
    }
    out
}

/// Writes originals into `<storage>/<root>/0/` and hard-links them into the
/// bins `<storage>/<root>/1..copies/` (what misses and hits render from), and
/// into the origin directory with the corrupt files (what pre-heats download).
fn generate(args: &Args) -> std::io::Result<()> {
    let Some(storage) = &args.storage_dir else {
        return Ok(());
    };
    let dir = storage.join(&args.root).join("0");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let todo: Vec<usize> = (0..args.originals)
        .filter(|&n| !dir.join(original_name(n)).exists())
        .collect();
    let made = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (todo, dir, made, bytes) = (&todo, &dir, &made, &bytes);
            s.spawn(move || {
                for &n in todo.iter().skip(t).step_by(threads) {
                    let name = original_name(n);
                    let mut rng = Rng(args.seed.wrapping_mul(1_000_003).wrapping_add(n as u64));
                    let png = name.ends_with(".png");
                    let hi = if png { 1600 } else { 3000 };
                    let (w, h) = (rng.range(800, hi), rng.range(800, hi));
                    let img = photo(&mut rng, w, h, if png { 6.0 } else { 14.0 });
                    let data = encode(&name, &img);
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    let tmp = dir.join(format!(".{name}.tmp"));
                    std::fs::write(&tmp, &data).expect("write original");
                    std::fs::rename(&tmp, dir.join(&name)).expect("rename original");
                    made.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    if !todo.is_empty() {
        println!(
            "generated {} originals ({:.1} MiB) in {:.1}s into {}",
            made.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
            started.elapsed().as_secs_f64(),
            dir.display()
        );
    }
    let mut targets: Vec<PathBuf> = (1..args.copies)
        .map(|bin| storage.join(&args.root).join(bin.to_string()))
        .collect();
    targets.extend(args.origin_dir.iter().cloned());
    for target_dir in &targets {
        std::fs::create_dir_all(target_dir)?;
        for n in 0..args.originals {
            let name = original_name(n);
            let target = target_dir.join(&name);
            if !target.exists() {
                let source = dir.join(&name);
                std::fs::hard_link(&source, &target)
                    .or_else(|_| std::fs::copy(&source, &target).map(|_| ()))?;
            }
        }
    }
    if let Some(origin) = &args.origin_dir {
        write_corrupt(&dir, origin)?;
    }
    Ok(())
}

fn write_corrupt(originals: &Path, origin: &Path) -> std::io::Result<()> {
    let jpeg = std::fs::read(originals.join(original_name(0)))?;
    let mut rng = Rng(0xbad);
    let random: Vec<u8> = (0..200_000).map(|_| rng.next() as u8).collect();
    let mut header_only =
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\x0b\xb8\0\0\x0b\xb8\x08\x02\0\0\0".to_vec();
    header_only.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let files: [(&str, Vec<u8>); 5] = [
        ("bad-truncated.jpg", jpeg[..jpeg.len() * 2 / 5].to_vec()),
        ("bad-random.jpg", random),
        (
            "bad-html.jpg",
            b"<html><body>Not an image</body></html>\n".to_vec(),
        ),
        ("bad-header-only.png", header_only),
        ("bad-empty.jpg", Vec::new()),
    ];
    debug_assert_eq!(files.len(), CORRUPT_FILES.len());
    for (name, data) in files {
        std::fs::write(origin.join(name), data)?;
    }
    Ok(())
}

// ---- request kinds ------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Kind {
    Hit,
    HitConditional,
    MissNew,
    MissReask,
    Preheat,
    /// A pre-heat of a corrupt or missing origin file: a fair request whose
    /// honest answer is the failure (once known) — never a 5xx.
    PreheatBroken,
    BadTraversal,
    BadDoubleEncoded,
    BadFilter,
    BadNul,
    BadLongPath,
    BadSsrf,
    BadScheme,
    BadToken,
    BadBigBody,
    BadJson,
}

const BAD_KINDS: &[Kind] = &[
    Kind::BadTraversal,
    Kind::BadDoubleEncoded,
    Kind::BadFilter,
    Kind::BadNul,
    Kind::BadLongPath,
    Kind::BadSsrf,
    Kind::BadScheme,
    Kind::BadToken,
    Kind::BadBigBody,
    Kind::BadJson,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Hit => "hit",
            Kind::HitConditional => "hit-if-none-match",
            Kind::MissNew => "miss-new",
            Kind::MissReask => "miss-reask",
            Kind::Preheat => "preheat",
            Kind::PreheatBroken => "preheat-broken-origin",
            Kind::BadTraversal => "bad-traversal ..%2f",
            Kind::BadDoubleEncoded => "bad-double-enc %252e",
            Kind::BadFilter => "bad-unknown-filter",
            Kind::BadNul => "bad-nul %00",
            Kind::BadLongPath => "bad-long-path",
            Kind::BadSsrf => "bad-preheat-169.254",
            Kind::BadScheme => "bad-preheat-ftp",
            Kind::BadToken => "bad-preheat-token",
            Kind::BadBigBody => "bad-2MiB-dispatch",
            Kind::BadJson => "bad-malformed-json",
        }
    }

    fn valid(self) -> bool {
        matches!(
            self,
            Kind::Hit
                | Kind::HitConditional
                | Kind::MissNew
                | Kind::MissReask
                | Kind::Preheat
                | Kind::PreheatBroken
        )
    }

    fn expected(self) -> &'static [u16] {
        match self {
            Kind::Hit => &[200],
            Kind::HitConditional => &[304],
            Kind::MissNew | Kind::MissReask => &[202, 200],
            Kind::Preheat => &[200, 202],
            // 202 until the job fails; then the remembered failure: origin
            // 404 → 404, not an image → 422.
            Kind::PreheatBroken => &[202, 404, 422],
            Kind::BadTraversal | Kind::BadDoubleEncoded | Kind::BadNul | Kind::BadLongPath => {
                &[400]
            }
            Kind::BadFilter => &[404],
            Kind::BadSsrf => &[403],
            Kind::BadScheme => &[400],
            Kind::BadToken => &[401],
            Kind::BadBigBody => &[413],
            Kind::BadJson => &[400],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Status(u16),
    Timeout,
    Error,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Status(s) => write!(f, "{s}"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Error => f.write_str("conn-error"),
        }
    }
}

// ---- shared state -------------------------------------------------------------

#[derive(Clone)]
struct Ready {
    url: String,
    etag: String,
}

struct Combo {
    url: String,
    last_asked: Instant,
}

#[derive(Default)]
struct Misses {
    fresh: Vec<String>,
    pending: VecDeque<Combo>,
    /// Miss slots that found nothing to ask (fresh used up, nothing pending due) and sent a hit.
    fell_back: u64,
    /// Misses answered an unexpected status; not re-asked.
    dropped: u64,
}

#[derive(Default)]
struct Stats {
    counts: BTreeMap<(Kind, Outcome), u64>,
    latency_us: HashMap<Kind, Vec<u32>>,
    valid_failures: u64,
    valid_failure_samples: Vec<String>,
    valid_unexpected: u64,
    valid_unexpected_samples: Vec<String>,
    bad_mismatches: u64,
    bad_mismatch_samples: Vec<String>,
    became_ready: u64,
}

struct Shared {
    args: Args,
    client: reqwest::Client,
    ready: RwLock<Vec<Ready>>,
    misses: Mutex<Misses>,
    stats: Mutex<Stats>,
    preheat_urls: Vec<(String, String)>,
    limiter: Option<tokio::sync::Mutex<tokio::time::Interval>>,
}

struct Answer {
    outcome: Outcome,
    etag: Option<String>,
    body: Vec<u8>,
    elapsed: Duration,
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.replace('\n', " ")
}

impl Shared {
    fn cache_url(&self, filter: &str, bin: usize, name: &str) -> String {
        format!(
            "{}/media/cache/{filter}/{}/{bin}/{name}",
            self.args.base, self.args.root
        )
    }

    fn preheat_url(&self, filter: &str, source: &str) -> String {
        let mut url =
            url::Url::parse(&format!("{}/request/{filter}", self.args.base)).expect("base URL");
        url.query_pairs_mut()
            .append_pair("url", source)
            .append_pair("token", &self.args.key);
        url.to_string()
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let started = Instant::now();
        let result = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, etag, body.to_vec()))
        }
        .await;
        let elapsed = started.elapsed();
        match result {
            Ok((status, etag, body)) => Answer {
                outcome: Outcome::Status(status),
                etag,
                body,
                elapsed,
            },
            Err(e) => Answer {
                outcome: if e.is_timeout() {
                    Outcome::Timeout
                } else {
                    Outcome::Error
                },
                etag: None,
                body: format!("{e:?}").into_bytes(),
                elapsed,
            },
        }
    }

    fn record(&self, kind: Kind, target: &str, answer: &Answer) {
        let mut stats = self.stats.lock().unwrap();
        *stats.counts.entry((kind, answer.outcome)).or_default() += 1;
        stats
            .latency_us
            .entry(kind)
            .or_default()
            .push(answer.elapsed.as_micros().min(u128::from(u32::MAX)) as u32);
        let ok = matches!(answer.outcome, Outcome::Status(s) if kind.expected().contains(&s));
        if ok {
            return;
        }
        let line = format!(
            "{} {} -> {}: {}",
            kind.name(),
            shorten(target),
            answer.outcome,
            snippet(&answer.body)
        );
        if kind.valid() {
            let failure = match answer.outcome {
                Outcome::Status(s) => s >= 500,
                Outcome::Timeout | Outcome::Error => true,
            };
            if failure {
                stats.valid_failures += 1;
                if stats.valid_failure_samples.len() < SHOW_FIRST {
                    stats.valid_failure_samples.push(line);
                }
            } else {
                stats.valid_unexpected += 1;
                if stats.valid_unexpected_samples.len() < SHOW_FIRST {
                    stats.valid_unexpected_samples.push(line);
                }
            }
        } else {
            stats.bad_mismatches += 1;
            if stats.bad_mismatch_samples.len() < SHOW_FIRST {
                stats.bad_mismatch_samples.push(line);
            }
        }
    }

    async fn hit(&self, rng: &mut Rng) {
        let pick = {
            let ready = self.ready.read().unwrap();
            ready[rng.below(ready.len() as u64) as usize].clone()
        };
        let conditional = rng.below(100) < CONDITIONAL_HIT_PERCENT;
        let mut request = self.client.get(&pick.url);
        if conditional {
            request = request.header("if-none-match", &pick.etag);
        }
        let answer = self.send(request).await;
        let kind = if conditional {
            Kind::HitConditional
        } else {
            Kind::Hit
        };
        self.record(kind, &pick.url, &answer);
    }

    async fn miss(&self, rng: &mut Rng) {
        enum Pick {
            New(String),
            Reask(Combo),
            Nothing,
        }
        let pick = {
            let mut misses = self.misses.lock().unwrap();
            let due = misses
                .pending
                .front()
                .is_some_and(|c| c.last_asked.elapsed() >= REASK_AFTER);
            let room = misses.pending.len() < MAX_PENDING_MISSES && !misses.fresh.is_empty();
            if room && (!due || rng.below(100) < NEW_MISS_PERCENT) {
                let i = rng.below(misses.fresh.len() as u64) as usize;
                Pick::New(misses.fresh.swap_remove(i))
            } else if due {
                Pick::Reask(misses.pending.pop_front().expect("due"))
            } else {
                misses.fell_back += 1;
                Pick::Nothing
            }
        };
        let (kind, url) = match pick {
            Pick::New(url) => (Kind::MissNew, url),
            Pick::Reask(combo) => (Kind::MissReask, combo.url),
            Pick::Nothing => return self.hit(rng).await,
        };
        let answer = self.send(self.client.get(&url)).await;
        self.record(kind, &url, &answer);
        match answer.outcome {
            Outcome::Status(200) => {
                self.stats.lock().unwrap().became_ready += 1;
                let etag = answer.etag.unwrap_or_default();
                self.ready.write().unwrap().push(Ready { url, etag });
            }
            Outcome::Status(202) | Outcome::Status(500..) | Outcome::Timeout | Outcome::Error => {
                self.misses.lock().unwrap().pending.push_back(Combo {
                    url,
                    last_asked: Instant::now(),
                });
            }
            Outcome::Status(_) => self.misses.lock().unwrap().dropped += 1,
        }
    }

    async fn preheat(&self, rng: &mut Rng) {
        let (filter, source) =
            &self.preheat_urls[rng.below(self.preheat_urls.len() as u64) as usize];
        let url = self.preheat_url(filter, source);
        let answer = self.send(self.client.get(&url)).await;
        let broken = source.contains("/bad-") || source.contains("/gone-");
        let kind = if broken {
            Kind::PreheatBroken
        } else {
            Kind::Preheat
        };
        self.record(kind, &url, &answer);
    }

    async fn bad(&self, rng: &mut Rng) {
        let kind = BAD_KINDS[rng.below(BAD_KINDS.len() as u64) as usize];
        let base = &self.args.base;
        let n = rng.below(self.args.originals as u64) as usize;
        let name = original_name(n);
        let (target, request) = match kind {
            Kind::BadTraversal => {
                let url = format!("{base}/media/cache/small/..%2f..%2f..%2fetc%2fpasswd");
                (url.clone(), self.client.get(url))
            }
            Kind::BadDoubleEncoded => {
                let url = format!(
                    "{base}/media/cache/small/{}/%252e%252e%252f%252e%252e%252f{name}",
                    self.args.root
                );
                (url.clone(), self.client.get(url))
            }
            Kind::BadFilter => {
                let url = format!(
                    "{base}/media/cache/nosuchfilter/{}/0/{name}",
                    self.args.root
                );
                (url.clone(), self.client.get(url))
            }
            Kind::BadNul => {
                let url = format!(
                    "{base}/media/cache/small/{}/0/img%00-{n}.jpg",
                    self.args.root
                );
                (url.clone(), self.client.get(url))
            }
            Kind::BadLongPath => {
                let long = "a".repeat(MAX_PATH_BYTES + 100);
                let url = format!("{base}/media/cache/small/{}/0/{long}.jpg", self.args.root);
                (url.clone(), self.client.get(url))
            }
            Kind::BadSsrf => {
                let url = self.preheat_url("small", "http://169.254.169.254/x");
                (url.clone(), self.client.get(url))
            }
            Kind::BadScheme => {
                let url = self.preheat_url("small", &format!("ftp://127.0.0.1/{name}"));
                (url.clone(), self.client.get(url))
            }
            Kind::BadToken => {
                let mut url = url::Url::parse(&format!("{base}/request/small")).expect("base URL");
                url.query_pairs_mut()
                    .append_pair("url", &format!("{}/{name}", self.args.origin))
                    .append_pair("token", "kiln_not-the-key");
                let url = url.to_string();
                (url.clone(), self.client.get(url))
            }
            Kind::BadBigBody => {
                let url = format!("{base}/dispatch_process");
                let mut body = br#"{"images": [""#.to_vec();
                body.resize(2 << 20, b'x');
                body.extend_from_slice(br#""]}"#);
                let request = self
                    .client
                    .post(&url)
                    .bearer_auth(&self.args.key)
                    .header("content-type", "application/json")
                    .body(body);
                (url, request)
            }
            Kind::BadJson => {
                let url = format!("{base}/dispatch_process");
                let request = self
                    .client
                    .post(&url)
                    .bearer_auth(&self.args.key)
                    .header("content-type", "application/json")
                    .body(r#"{"root": "default", "images": ["http://127.0.0.1/a.jpg", "#);
                (url, request)
            }
            _ => unreachable!("not a bad kind"),
        };
        let answer = self.send(request).await;
        self.record(kind, &target, &answer);
    }

    async fn one(&self, rng: &mut Rng) {
        if let Some(limiter) = &self.limiter {
            limiter.lock().await.tick().await;
        }
        let total = WEIGHT_HIT + WEIGHT_MISS + WEIGHT_BAD + WEIGHT_PREHEAT;
        let roll = rng.below(u64::from(total)) as u32;
        if roll < WEIGHT_HIT {
            self.hit(rng).await
        } else if roll < WEIGHT_HIT + WEIGHT_MISS {
            self.miss(rng).await
        } else if roll < WEIGHT_HIT + WEIGHT_MISS + WEIGHT_BAD {
            self.bad(rng).await
        } else {
            self.preheat(rng).await
        }
    }
}

fn shorten(url: &str) -> String {
    if url.len() > 140 {
        format!("{}…({} bytes)", &url[..120], url.len())
    } else {
        url.to_string()
    }
}

// ---- RSS -------------------------------------------------------------------

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// kiln's CPU time (user + system) in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

// ---- warm-up -------------------------------------------------------------------

/// Asks `warm` variants and waits until they render: the hit set.
async fn warm_up(shared: &Shared, rng: &mut Rng) -> Result<(), String> {
    let mut combos: Vec<String> = Vec::new();
    for bin in 0..shared.args.copies {
        for n in 0..shared.args.originals {
            for filter in FILTERS {
                combos.push(shared.cache_url(filter, bin, &original_name(n)));
            }
        }
    }
    // Shuffle, then split: the first `warm` are the hit set, the rest are fresh misses.
    for i in (1..combos.len()).rev() {
        combos.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let fresh = combos.split_off(shared.args.warm);
    shared.misses.lock().unwrap().fresh = fresh;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    let mut waiting = combos;
    let mut round = 0;
    while !waiting.is_empty() && Instant::now() < deadline {
        round += 1;
        let mut still = Vec::new();
        for chunk in waiting.chunks(8) {
            let answers = futures::future::join_all(
                chunk.iter().map(|url| shared.send(shared.client.get(url))),
            )
            .await;
            for (url, answer) in chunk.iter().zip(answers) {
                match answer.outcome {
                    Outcome::Status(200) => shared.ready.write().unwrap().push(Ready {
                        url: url.clone(),
                        etag: answer.etag.unwrap_or_default(),
                    }),
                    Outcome::Status(202) => still.push(url.clone()),
                    other => {
                        return Err(format!(
                            "warm-up: {url} answered {other}: {}",
                            snippet(&answer.body)
                        ))
                    }
                }
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            if round % 10 == 0 {
                println!(
                    "  warm-up: {} ready, {} rendering ({:.0}s)",
                    shared.ready.read().unwrap().len(),
                    waiting.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let ready = shared.ready.read().unwrap().len();
    println!(
        "warm-up: {ready} variants ready in {:.1}s{}",
        started.elapsed().as_secs_f64(),
        if waiting.is_empty() {
            String::new()
        } else {
            format!(", {} still rendering (dropped)", waiting.len())
        }
    );
    if ready == 0 {
        return Err("warm-up: no variant became ready".into());
    }
    Ok(())
}

// ---- main ------------------------------------------------------------------------

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("load_mix: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = tokio::task::block_in_place(|| generate(&args)) {
        eprintln!("load_mix: generating originals: {e}");
        return ExitCode::from(2);
    }
    if rss_kib(args.pid).is_none() {
        eprintln!("load_mix: cannot read VmRSS of pid {}", args.pid);
        return ExitCode::from(2);
    }

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(args.timeout)
        .connect_timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .expect("HTTP client");
    let mut preheat_urls = Vec::new();
    for n in 0..args.originals {
        for filter in PREHEAT_FILTERS {
            preheat_urls.push((
                filter.to_string(),
                format!("{}/{}", args.origin, original_name(n)),
            ));
        }
    }
    // About 1 pre-heat in 10 goes to a corrupt file, 1 in 20 to a missing one.
    let good = preheat_urls.len();
    for i in 0..good / 9 {
        let name = CORRUPT_FILES[i % CORRUPT_FILES.len()];
        preheat_urls.push(("small".into(), format!("{}/{name}", args.origin)));
    }
    for i in 0..good / 19 {
        preheat_urls.push((
            "small".into(),
            format!("{}/gone-{}.jpg", args.origin, i % MISSING_FILES),
        ));
    }
    let limiter = (args.rate > 0).then(|| {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::sync::Mutex::new(interval)
    });
    let mut rng = Rng(args.seed);
    let shared = Arc::new(Shared {
        args,
        client,
        ready: RwLock::new(Vec::new()),
        misses: Mutex::new(Misses::default()),
        stats: Mutex::new(Stats::default()),
        preheat_urls,
        limiter,
    });
    let args = &shared.args;
    let rss_before = rss_kib(args.pid).unwrap_or(0);
    println!(
        "kiln pid {} RSS before warm-up: {}; warming {} of {} variants ({} originals x {} bins x {} filters)",
        args.pid,
        mib(rss_before as f64),
        args.warm,
        args.originals * args.copies * FILTERS.len(),
        args.originals,
        args.copies,
        FILTERS.len()
    );
    if let Err(e) = warm_up(&shared, &mut rng).await {
        eprintln!("load_mix: {e}");
        return ExitCode::from(1);
    }

    println!(
        "load: {}s, concurrency {}, rate {}, timeout {}s, mix hit/miss/bad/preheat = {WEIGHT_HIT}/{WEIGHT_MISS}/{WEIGHT_BAD}/{WEIGHT_PREHEAT}",
        args.duration.as_secs(),
        args.concurrency,
        if args.rate == 0 { "unlimited".to_string() } else { format!("{}/s", args.rate) },
        args.timeout.as_secs()
    );
    let started = Instant::now();
    let deadline = started + args.duration;
    let done_requests = Arc::new(AtomicU64::new(0));

    let sampler = {
        let shared = shared.clone();
        let done_requests = done_requests.clone();
        tokio::spawn(async move {
            let mut series: Vec<(f64, Option<u64>)> = Vec::new();
            let mut tick = tokio::time::interval(RSS_EVERY);
            let mut last_cpu: Option<(f64, u64)> = None;
            loop {
                tick.tick().await;
                let t = started.elapsed().as_secs_f64();
                let rss = rss_kib(shared.args.pid);
                let cpu = cpu_ticks(shared.args.pid);
                let cpu_percent = match (last_cpu, cpu) {
                    (Some((t0, c0)), Some(c1)) if t > t0 => {
                        format!(
                            "{:>4.0}%",
                            (c1 - c0) as f64 / TICKS_PER_SEC / (t - t0) * 100.0
                        )
                    }
                    _ => "    -".to_string(),
                };
                last_cpu = cpu.map(|c| (t, c));
                let (hits, pending, fresh) = {
                    let m = shared.misses.lock().unwrap();
                    (
                        shared.ready.read().unwrap().len(),
                        m.pending.len(),
                        m.fresh.len(),
                    )
                };
                println!(
                    "  t={t:>5.0}s  RSS {:>11}  kiln CPU {cpu_percent}  requests {:>7}  hit-set {hits:>5}  pending-misses {pending:>3}  fresh-misses {fresh:>5}",
                    rss.map_or("gone".into(), |r| mib(r as f64)),
                    done_requests.load(Ordering::Relaxed),
                );
                series.push((t, rss));
                if rss.is_none() || Instant::now() >= deadline {
                    return series;
                }
            }
        })
    };

    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let shared = shared.clone();
        let done_requests = done_requests.clone();
        let mut rng = Rng(args.seed.wrapping_mul(31).wrapping_add(t as u64 + 1));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                shared.one(&mut rng).await;
                done_requests.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("load task");
    }
    let elapsed = started.elapsed();
    let series = sampler.await.expect("sampler");

    // ---- report ----
    let status = shared
        .send(shared.client.get(format!("{}/status", args.base)))
        .await;
    let stats = shared.stats.lock().unwrap();
    let misses = shared.misses.lock().unwrap();
    let total: u64 = stats.counts.values().sum();
    let line = "-".repeat(100);
    println!("\n{line}");
    println!(
        "SUMMARY  {total} requests in {:.1}s = {:.1} req/s  (concurrency {}, rate limit {})",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        args.concurrency,
        if args.rate == 0 {
            "none".to_string()
        } else {
            format!("{}/s", args.rate)
        }
    );
    println!("{line}");
    println!(
        "{:<6} {:<22} {:>8} {:>9} {:>9}  statuses (* = unexpected)",
        "class", "kind", "count", "p50 ms", "p99 ms"
    );
    let mut kinds: Vec<Kind> = stats.counts.keys().map(|(k, _)| *k).collect();
    kinds.dedup();
    let mut class_totals: BTreeMap<(&str, Outcome), u64> = BTreeMap::new();
    for kind in &kinds {
        let class = if kind.valid() { "valid" } else { "bad" };
        let mut n = 0;
        let mut parts = Vec::new();
        for ((k, outcome), count) in stats.counts.range((*kind, Outcome::Status(0))..) {
            if k != kind {
                break;
            }
            n += count;
            *class_totals.entry((class, *outcome)).or_default() += count;
            let mark = match outcome {
                Outcome::Status(s) if kind.expected().contains(s) => "",
                _ => "*",
            };
            parts.push(format!("{outcome}{mark}:{count}"));
        }
        let mut lat = stats.latency_us.get(kind).cloned().unwrap_or_default();
        lat.sort_unstable();
        println!(
            "{:<6} {:<22} {:>8} {:>9.2} {:>9.2}  {}",
            class,
            kind.name(),
            n,
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            parts.join(" ")
        );
    }
    println!("{line}");
    for class in ["valid", "bad"] {
        let parts: Vec<String> = class_totals
            .iter()
            .filter(|((c, _), _)| *c == class)
            .map(|((_, o), n)| format!("{o}:{n}"))
            .collect();
        let n: u64 = class_totals
            .iter()
            .filter(|((c, _), _)| *c == class)
            .map(|(_, n)| n)
            .sum();
        println!("{class:<6} total {n:>8}  {}", parts.join(" "));
    }
    println!(
        "misses: {} rendered during the run, {} still pending, {} fresh left, {} miss slots fell back to a hit, {} dropped",
        stats.became_ready,
        misses.pending.len(),
        misses.fresh.len(),
        misses.fell_back,
        misses.dropped
    );
    match status.outcome {
        Outcome::Status(200) => println!("kiln /status after the run: {}", snippet(&status.body)),
        other => println!(
            "kiln /status after the run: {other} {}",
            snippet(&status.body)
        ),
    }
    println!("{line}");

    println!(
        "valid requests answered 5xx / timed out / failed: {}",
        stats.valid_failures
    );
    for sample in &stats.valid_failure_samples {
        println!("  ! {sample}");
    }
    if stats.valid_unexpected > 0 {
        println!(
            "WARNING valid requests answered an unexpected non-5xx status: {}",
            stats.valid_unexpected
        );
        for sample in &stats.valid_unexpected_samples {
            println!("  ? {sample}");
        }
    }
    println!(
        "bad requests not answered their expected 4xx: {} (reported, not failing)",
        stats.bad_mismatches
    );
    for sample in &stats.bad_mismatch_samples {
        println!("  ~ {sample}");
    }
    println!("{line}");

    // RSS: every sample, then middle third vs last third.
    let alive = rss_kib(args.pid).is_some();
    let values: Vec<(f64, u64)> = series
        .iter()
        .filter_map(|(t, r)| r.map(|r| (*t, r)))
        .collect();
    println!(
        "RSS series (kiln pid {}, every {}s; before warm-up {}):",
        args.pid,
        RSS_EVERY.as_secs(),
        mib(rss_before as f64)
    );
    let row: Vec<String> = values
        .iter()
        .map(|(t, r)| format!("{t:.0}s={:.1}", *r as f64 / 1024.0))
        .collect();
    for chunk in row.chunks(8) {
        println!("  {} (MiB)", chunk.join("  "));
    }
    let mut rss_ok = true;
    let third = values.len() / 3;
    if third == 0 {
        println!(
            "RSS verdict: too few samples ({}) to compare thirds",
            values.len()
        );
    } else {
        let mean =
            |s: &[(f64, u64)]| s.iter().map(|(_, r)| *r as f64).sum::<f64>() / s.len() as f64;
        let middle = mean(&values[third..values.len() - third]);
        let last = mean(&values[values.len() - third..]);
        let growth = (last - middle) / middle * 100.0;
        let judged = args.duration.as_secs() >= MIN_JUDGED_SECS;
        rss_ok = !judged || growth <= MAX_RSS_GROWTH_PERCENT;
        println!(
            "RSS middle third {} -> last third {}: growth {growth:+.1}% (limit {MAX_RSS_GROWTH_PERCENT}%) {}",
            mib(middle),
            mib(last),
            if !judged {
                format!("not judged: runs under {MIN_JUDGED_SECS}s are still on the cache-fill ramp")
            } else if rss_ok {
                "ok".to_string()
            } else {
                "TOO MUCH".to_string()
            }
        );
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", args.pid)) {
        let fields: Vec<String> = status
            .lines()
            .filter(|l| {
                ["VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "Threads:"]
                    .iter()
                    .any(|f| l.starts_with(f))
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        println!("kiln at the end: {}", fields.join(", "));
    }
    println!("{line}");
    let mut failures = Vec::new();
    if stats.valid_failures > 0 {
        failures.push(format!(
            "{} valid requests got 5xx/timeout/error",
            stats.valid_failures
        ));
    }
    if !rss_ok {
        failures.push("RSS grew more than 10% between the middle and last third".to_string());
    }
    if !alive {
        failures.push(format!("kiln (pid {}) is gone", args.pid));
    }
    if failures.is_empty() && args.duration.as_secs() < MIN_JUDGED_SECS {
        println!("VERDICT: PASS (zero 5xx on valid requests; memory not judged, run under {MIN_JUDGED_SECS}s)");
        ExitCode::SUCCESS
    } else if failures.is_empty() {
        println!("VERDICT: PASS (zero 5xx on valid requests, memory flat)");
        ExitCode::SUCCESS
    } else {
        println!("VERDICT: FAIL: {}", failures.join("; "));
        ExitCode::from(1)
    }
}
