//! The hostile-input corpus in `tests/fixtures/hostile/`, run through the
//! same entry points the fuzz targets drive.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use kiln::api::sais::ProcessPayload;
use kiln::api::{Caller, Context};
use kiln::config::{Config, Sources};
use kiln::filter::FilterSet;
use kiln::front::Request;
use kiln::imaging::{decode, sniff, Limits};
use kiln::index::Index;
use kiln::queue::{EmbeddedQueue, Queue};
use kiln::security::{normalize_path, parse_outbound_url, NetworkPolicy};
use kiln::storage::Storage;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Per-thread allocation accounting, so "refused before the decode allocates"
// is a measured fact rather than a timing guess. Only the calling thread's
// allocations count, so tests running in parallel do not disturb it.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// bookkeeping touches only const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes this thread held
/// at once during the call, above what it held before.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as usize)
}

// ---------------------------------------------------------------------------
// Image files.

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile")
}

/// Files in the corpus directory that are not inputs.
const NOT_INPUTS: &[&str] = &["README.md", "gen.py"];

fn default_limits() -> Limits {
    Limits::from(&Config::load_from(Sources::default()).unwrap().imaging)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Refused with this stable error code.
    Refused(&'static str),
    /// Decodes, to this many pixels.
    Decodes(u32, u32),
}

use Expect::{Decodes, Refused};

/// Every input in `tests/fixtures/hostile/` and what kiln must answer with
/// the default limits. A file without a row here fails the test.
const EXPECTED: &[(&str, Expect)] = &[
    // Nothing, or only a format's magic.
    ("empty.jpg", Refused("unsupported-image")),
    ("png-signature-only.png", Refused("decode-failed")),
    ("png-magic-then-zeros.png", Refused("decode-failed")),
    ("jpeg-magic-then-zeros.jpg", Refused("decode-failed")),
    ("gif-magic-only.gif", Refused("decode-failed")),
    ("webp-riff-only.webp", Refused("decode-failed")),
    // Truncated.
    ("truncated-header.jpg", Refused("decode-failed")),
    // zune-jpeg (behind `image`, which turns its strict mode off) fills a
    // scan that ends early with grey instead of failing.
    ("truncated-scan.jpg", Refused("decode-failed")),
    ("truncated-after-sos.jpg", Refused("decode-failed")),
    ("truncated.png", Refused("decode-failed")),
    ("truncated.webp", Refused("decode-failed")),
    // Bombs: refused from the header.
    ("png-50000x50000.png", Refused("image-too-large")),
    ("png-20000x1.png", Refused("image-too-large")),
    ("png-10000x10000.png", Refused("image-too-large")),
    ("jpeg-sof-60000x60000.jpg", Refused("image-too-large")),
    ("gif-huge-screen.gif", Refused("image-too-large")),
    ("gif-frame-beyond-screen.gif", Refused("image-too-large")),
    ("gif-second-frame-beyond-screen.gif", Decodes(1, 1)),
    ("webp-vp8x-60000x60000.webp", Refused("image-too-large")),
    // image-webp refuses a canvas over 2^32 pixels itself, as a format error.
    ("webp-vp8x-16777216x16777216.webp", Refused("decode-failed")),
    ("webp-animated-no-frames.webp", Refused("decode-failed")),
    // Animation: the first frame is the image; the truncated 3000th is never read.
    ("gif-3000-frames.gif", Decodes(1, 1)),
    // Corrupt.
    ("png-bad-crc.png", Refused("decode-failed")),
    ("png-bad-zlib.png", Refused("decode-failed")),
    ("png-short-idat.png", Refused("decode-failed")),
    ("jpeg-garbage-after-soi.jpg", Refused("decode-failed")),
    // Mislabelled: kiln goes by the bytes, never the name.
    ("png-named.jpg", Decodes(16, 16)),
    ("text-named.png", Refused("unsupported-image")),
    ("script.jpg.php", Refused("unsupported-image")),
    // Outside the allow-list.
    ("image.svg", Refused("unsupported-image")),
    ("svg-no-prolog.svg", Refused("unsupported-image")),
    ("page.html", Refused("unsupported-image")),
    ("image.bmp", Refused("unsupported-image")),
    ("image.tiff", Refused("unsupported-image")),
    ("image.ico", Refused("unsupported-image")),
    ("image.avif", Refused("unsupported-image")),
];

fn read(name: &str) -> Vec<u8> {
    std::fs::read(corpus_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What kiln does with `bytes`, in the terms of `EXPECTED`.
fn outcome(bytes: &[u8], limits: Limits) -> Expect {
    match decode(bytes, limits) {
        Ok(decoded) => Decodes(decoded.width(), decoded.height()),
        Err(e) => Refused(e.code()),
    }
}

#[test]
fn every_corpus_file_has_an_expectation_and_meets_it() {
    let limits = default_limits();
    let mut on_disk: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_type().unwrap().is_file())
        .map(|entry| entry.file_name().into_string().unwrap())
        .filter(|name| !NOT_INPUTS.contains(&name.as_str()))
        .collect();
    on_disk.sort();

    let mut problems = Vec::new();
    for name in &on_disk {
        let Some((_, expected)) = EXPECTED.iter().find(|(n, _)| n == name) else {
            problems.push(format!("{name}: no expectation in EXPECTED"));
            continue;
        };
        let bytes = read(name);
        assert!(bytes.len() < 64 * 1024, "{name} is too big for the corpus");
        let got = outcome(&bytes, limits);
        if got != *expected {
            problems.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
        // Refused as unsupported means refused by the sniff, before any decoder.
        if *expected == Refused("unsupported-image") && sniff(&bytes).is_some() {
            problems.push(format!("{name}: sniffed as {:?}", sniff(&bytes)));
        }
    }
    for (name, _) in EXPECTED {
        if !on_disk.iter().any(|n| n == name) {
            problems.push(format!("{name}: in EXPECTED but not on disk"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn bombs_are_refused_from_the_header_before_the_decode_allocates() {
    // The counter sees this thread's allocations (so a small peak below means something).
    let (buffer, peak) = peak_allocation(|| vec![1u8; 2 << 20]);
    assert!(peak >= 2 << 20 && buffer.len() == 2 << 20, "counted {peak}");
    drop(buffer);
    let limits = default_limits();
    for name in [
        "png-50000x50000.png",
        "png-20000x1.png",
        "png-10000x10000.png",
        "jpeg-sof-60000x60000.jpg",
        "gif-huge-screen.gif",
        "webp-vp8x-60000x60000.webp",
    ] {
        let bytes = read(name);
        let (result, peak) = peak_allocation(|| decode(&bytes, limits));
        let err = result.expect_err(name);
        assert_eq!(err.code(), "image-too-large", "{name}: {err}");
        // The smallest of these claims 20 000 pixels wide; any pixel buffer for
        // them is megabytes to gigabytes. Header parsing needs a few KB.
        assert!(
            peak < 1 << 20,
            "{name}: decode held {peak} bytes before refusing"
        );
    }
}

#[test]
fn a_frame_larger_than_the_screen_is_refused_by_the_allocation_limit() {
    // A 1x1 screen passes the header check; its first frame claims 65535x65535
    // (16 GiB of RGBA). The decoder's allocation limit must stop it.
    let bytes = read("gif-frame-beyond-screen.gif");
    let (result, peak) = peak_allocation(|| decode(&bytes, default_limits()));
    assert_eq!(result.unwrap_err().code(), "image-too-large");
    assert!(peak < 1 << 20, "held {peak} bytes");
}

/// Kept animated, a GIF's later frames are decoded too: one claiming far
/// more than its screen is stopped by the allocation limit, and the first
/// frame is the image.
#[test]
fn a_later_frame_larger_than_the_screen_is_refused_by_the_allocation_limit() {
    let bytes = read("gif-second-frame-beyond-screen.gif");
    let animated = FilterSet::from_toml(
        "[moving]\nformat = \"gif\"\nanimated = true\n\
         filters = [{ thumbnail = { size = [20, 20], mode = \"inset\" } }]",
    )
    .unwrap()
    .get("moving")
    .unwrap()
    .into_owned();
    let (decoded, peak) = peak_allocation(|| {
        kiln::imaging::decode_for(&bytes, default_limits(), std::slice::from_ref(&animated))
    });
    let decoded = decoded.expect("the first frame");
    assert!(decoded.animation.is_none(), "first frame only");
    assert!(peak < 1 << 20, "held {peak} bytes");
}

#[test]
fn an_animated_gif_decodes_its_first_frame_only() {
    let bytes = read("gif-3000-frames.gif");
    // The last frame is cut short: reading every frame would fail.
    let mut frames = 0;
    let mut rest = &bytes[13 + 6..];
    while let Some(at) = rest.iter().position(|&b| b == 0x2c) {
        frames += 1;
        rest = &rest[at + 1..];
    }
    assert!(frames >= 3000, "{frames} frame descriptors");
    let (decoded, peak) = peak_allocation(|| decode(&bytes, default_limits()));
    let decoded = decoded.expect("the first frame decodes");
    assert_eq!((decoded.width(), decoded.height()), (1, 1));
    // 3000 composited 1x1 frames would be small too, so the proof is the
    // truncated tail; still, nothing near a frame-per-allocation buildup.
    assert!(peak < 4 << 20, "held {peak} bytes");
}

// ---------------------------------------------------------------------------
// Paths.

const MAX_PATH: usize = 1024;

/// Request paths that must be refused as `invalid-path`.
const HOSTILE_PATHS: &[&str] = &[
    "",
    "/",
    "/etc/passwd",
    "..",
    ".",
    "../etc/passwd",
    "a/../../b",
    "a/./b",
    "a//b",
    "a/",
    "%2e%2e/x",
    "%2E%2E/x",
    "a/%2e%2e/x",
    ".%2e/x",
    "%252e%252e/x",
    "%25%32%65%25%32%65/x",
    "%%32e%%32e/x",
    "a\\..\\b",
    "a%5c..%5cb",
    "..\\x",
    "a/%00b",
    "a/\0b",
    "a/b\n",
    "a/%0ab",
    "a/%7fb",
    "a/%c0%ae%c0%ae/b",
    "a/%ff",
    "%2f%2fhost/x",
    "/%2e%2e/%2e%2e/etc/passwd",
    "a/..",
    "a/.",
    "a/%2e",
    "a/\u{202e}gpj.exe\\",
];

#[test]
fn hostile_paths_are_refused() {
    for raw in HOSTILE_PATHS {
        match normalize_path(raw, MAX_PATH) {
            Ok(path) => panic!("{raw:?} was accepted as {path:?}"),
            Err(e) => assert_eq!(e.code(), "invalid-path", "{raw:?}: {e}"),
        }
    }
    let long = "a/".repeat(MAX_PATH / 2) + "b";
    assert_eq!(
        normalize_path(&long, MAX_PATH).unwrap_err().code(),
        "invalid-path"
    );
}

#[test]
fn ordinary_paths_are_normalised() {
    for (raw, want) in [
        ("a/b.jpg", "a/b.jpg"),
        ("a/b%20c.jpg", "a/b c.jpg"),
        ("..a/b..", "..a/b.."),
        ("a/.hidden", "a/.hidden"),
        ("%E2%82%AC/x", "€/x"),
        ("a/%41", "a/A"),
        // One decode: an encoded slash is a separator, not a way around one.
        ("a%2Fb", "a/b"),
    ] {
        assert_eq!(normalize_path(raw, MAX_PATH).unwrap(), want, "{raw:?}");
    }
}

// ---------------------------------------------------------------------------
// Outbound URLs and addresses.

/// Outbound URLs that must be refused, and the code.
const HOSTILE_URLS: &[(&str, &str)] = &[
    ("", "invalid-url"),
    ("example.com/a.jpg", "invalid-url"),
    ("//example.com/a.jpg", "invalid-url"),
    ("file:///etc/passwd", "invalid-url"),
    ("ftp://example.com/a.jpg", "invalid-url"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "invalid-url"),
    ("javascript:alert(1)", "invalid-url"),
    ("data:image/png;base64,iVBORw0KGgo=", "invalid-url"),
    ("http://user:pw@example.com/a.jpg", "invalid-url"),
    ("http://user@example.com/a.jpg", "invalid-url"),
    ("http://:pw@example.com/a.jpg", "invalid-url"),
    ("http://[::1", "invalid-url"),
    ("http://exa mple.com/", "invalid-url"),
    ("http://127.0.0.1/a.jpg", "address-denied"),
    ("http://127.1/a.jpg", "address-denied"),
    ("http://2130706433/a.jpg", "address-denied"),
    ("http://0x7f000001/a.jpg", "address-denied"),
    ("http://0177.0.0.1/a.jpg", "address-denied"),
    ("http://0/a.jpg", "address-denied"),
    ("http://0.0.0.0:8080/", "address-denied"),
    ("http://10.0.0.1/", "address-denied"),
    ("http://172.16.0.1/", "address-denied"),
    ("http://192.168.0.1/", "address-denied"),
    ("http://169.254.169.254/latest/meta-data/", "address-denied"),
    ("http://169.254.43518/latest", "address-denied"),
    ("http://100.64.0.1/", "address-denied"),
    ("http://255.255.255.255/", "address-denied"),
    ("http://224.0.0.1/", "address-denied"),
    ("http://[::1]/", "address-denied"),
    ("http://[::]/", "address-denied"),
    ("http://[::ffff:127.0.0.1]/", "address-denied"),
    ("http://[::ffff:7f00:1]/", "address-denied"),
    ("http://[::127.0.0.1]/", "address-denied"),
    ("http://[64:ff9b::a9fe:a9fe]/", "address-denied"),
    ("http://[2002:7f00:1::]/", "address-denied"),
    ("http://[2002:a9fe:a9fe::1]/", "address-denied"),
    ("http://[2001::1]/", "address-denied"),
    ("http://[fe80::1]/", "address-denied"),
    ("http://[fc00::1]/", "address-denied"),
    ("http://[fd12:3456::1]/", "address-denied"),
    ("http://[ff02::1]/", "address-denied"),
    ("https://[::ffff:a9fe:a9fe]:443/", "address-denied"),
    ("HTTP://127.0.0.1/", "address-denied"),
    ("http://127.0.0.1.%2f@example.com/", "invalid-url"),
    ("http:\\\\127.0.0.1\\a.jpg", "address-denied"),
    ("http://①②⑦.0.0.1/", "address-denied"),
];

#[test]
fn hostile_outbound_urls_are_refused_with_stable_codes() {
    let policy = NetworkPolicy::default();
    for (raw, code) in HOSTILE_URLS {
        match parse_outbound_url(raw, &policy) {
            Ok(url) => panic!("{raw:?} was accepted as {url}"),
            Err(e) => assert_eq!(e.code(), *code, "{raw:?}: {e}"),
        }
    }
}

#[test]
fn public_outbound_urls_pass() {
    let policy = NetworkPolicy::default();
    for raw in [
        "https://example.com/a.jpg",
        "http://93.184.216.34/a.jpg",
        "http://[2606:4700::1111]/a.jpg",
        "http://[::ffff:93.184.216.34]/a.jpg",
        "https://example.com:8443/a%20b.jpg?x=1#y",
    ] {
        let url = parse_outbound_url(raw, &policy).unwrap_or_else(|e| panic!("{raw}: {e}"));
        assert!(matches!(url.scheme(), "http" | "https"));
    }
}

#[test]
fn ipv6_wrappers_of_denied_ipv4_are_denied() {
    let policy = NetworkPolicy::default();
    let denied_v4: [Ipv4Addr; 10] = [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(172, 31, 255, 255),
        Ipv4Addr::new(192, 168, 1, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(100, 127, 0, 1),
        Ipv4Addr::new(0, 0, 0, 0),
        Ipv4Addr::new(0, 0, 1, 2),
        Ipv4Addr::new(255, 255, 255, 255),
        Ipv4Addr::new(198, 19, 0, 1),
    ];
    for v4 in denied_v4 {
        assert!(!policy.is_allowed(v4.into()), "{v4}");
        let [a, b, c, d] = v4.octets();
        let (hi, lo) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
        for v6 in [
            v4.to_ipv6_mapped(),
            Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo),
            Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
            Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 0),
            Ipv6Addr::new(0x2002, hi, lo, 0xffff, 1, 2, 3, 4),
        ] {
            assert!(!policy.is_allowed(IpAddr::V6(v6)), "{v6} wraps {v4}");
        }
    }
    let public = Ipv4Addr::new(93, 184, 216, 34);
    assert!(policy.is_allowed(public.into()));
    assert!(policy.is_allowed(public.to_ipv6_mapped().into()));
}

// ---------------------------------------------------------------------------
// Config.

fn nested(depth: usize) -> String {
    format!("x = {}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn hostile_config_is_refused_as_invalid_config() {
    let deep_arrays = nested(10_000);
    let deep_tables = format!("x = {}1{}", "{a = ".repeat(10_000), "}".repeat(10_000));
    let long_key = format!("[server]\n{} = 1", "k".repeat(100_000));
    let cases: Vec<&str> = vec![
        "[",
        "[server",
        "= 1",
        "[server]\nlisten = ",
        "[server]\nlisten = \"nope\"",
        "[server]\nlisten = \"[::1\"",
        "[server]\nlisten = 8080",
        "[server]\nthreads = 0",
        "[server]\nthreads = -1",
        "[server]\nthreads = 18446744073709551616",
        "[server]\npublic_url = \"::\"",
        "[imaging]\nmax_width = 0",
        "[imaging]\nmax_pixels = 1e400",
        "[imaging]\nmax_width = 4294967296",
        "[imaging]\nmax_width = nan",
        "[imaging]\nmax_width = \"16384\"",
        "[network]\nallow = [\"10.0.0.0/99\"]",
        "[network]\nallow = \"10.0.0.0/8\"",
        "[network]\nallow = [\"\"]",
        "[storage]\nurl = \"\"",
        "[storage]\ndefault_root = \"../etc\"",
        "[storage]\ndefault_root = \"media\"",
        "[queue]\nbackend = \"kafka\"",
        "[queue]\nbackend = \"redis\"\n[redis]\nurl = \"not a url\"",
        "[queue]\nmax_attempts = 0",
        "[queue]\nclaim_block_ms = 0",
        "[sais]\nmax_images = 0",
        "[server]\n[server]",
        "server = 1",
        "[nope]\nx = 1",
        "[server]\nlistne = \"x\"",
        "\u{feff}\u{0}",
        "a = \"\\uD800\"",
        "a = 1979-05-27T07:32:00Z\n[server]\nlisten = 1979-05-27",
        &deep_arrays,
        &deep_tables,
        &long_key,
    ];
    for toml in cases {
        let shown: String = toml.chars().take(60).collect();
        match Config::load_from(Sources {
            extra_toml: Some(toml),
            ..Default::default()
        }) {
            Ok(_) => panic!("{shown:?} was accepted"),
            Err(e) => assert_eq!(e.code(), "invalid-config", "{shown:?}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Dispatch payloads, taken as the front takes them.

/// `wait: true` would poll for up to `sais.wait_timeout_ms`: not here.
const DISPATCH_TOML: &str =
    "[storage]\nurl = \"memory://\"\n[sais]\nwait_timeout_ms = 0\nmax_images = 50\n";

fn dispatch_context() -> Context {
    dispatch_context_and_queue().0
}

/// A dispatch context on memory storage, and its queue.
fn dispatch_context_and_queue() -> (Context, Arc<EmbeddedQueue>) {
    let config = Arc::new(
        Config::load_from(Sources {
            extra_toml: Some(DISPATCH_TOML),
            ..Default::default()
        })
        .unwrap(),
    );
    let queue = Arc::new(EmbeddedQueue::new(&config.queue));
    let context = Context::new(
        config.clone(),
        Arc::new(FilterSet::from_config(&config).unwrap()),
        Storage::open("memory://").unwrap(),
        Arc::new(Index::new(&config.index, None)),
        queue.clone(),
        NetworkPolicy::default(),
        "test-admin-key-0123456789".into(),
    );
    (context, queue)
}

/// A filter named twice is rendered once: the job carries each name once,
/// in the order given.
#[tokio::test]
async fn a_dispatch_renders_a_filter_named_twice_once() {
    let (context, queue) = dispatch_context_and_queue();
    let payload = json!({"root": "default", "filters": ["small", "medium", "small", "small"],
        "images": ["https://example.com/a.jpg"]});
    let rows = context
        .dispatch(&Caller::Admin, serde_json::from_value(payload).unwrap())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let claimed = queue
        .claim("test", std::time::Duration::from_millis(200))
        .await
        .unwrap()
        .expect("one job");
    assert_eq!(claimed.job.filters, ["small", "medium"]);
}

/// What became of one dispatch body: refused whole with a code, or rows
/// with each image's failure code (`None` for an accepted image).
#[derive(Debug, PartialEq)]
enum Dispatched {
    Refused(&'static str),
    Rows(Vec<Option<String>>),
}

async fn dispatch(body: &[u8]) -> Dispatched {
    let request = Request {
        method: Method::POST,
        path: "/dispatch_process",
        query: None,
        conditions: Default::default(),
        bearer: None,
        content_type: Some("application/json"),
        body: Bytes::copy_from_slice(body),
    };
    let payload: ProcessPayload = match request.json() {
        Ok(payload) => payload,
        Err(e) => return Dispatched::Refused(e.code()),
    };
    match dispatch_context().dispatch(&Caller::Admin, payload).await {
        Ok(rows) => Dispatched::Rows(
            rows.into_iter()
                .map(|row| {
                    assert_eq!(row.marking == "failed", row.error.is_some(), "{}", row.code);
                    row.error.map(|e| e.code)
                })
                .collect(),
        ),
        Err(e) => Dispatched::Refused(e.code()),
    }
}

fn rows(codes: &[Option<&str>]) -> Dispatched {
    Dispatched::Rows(codes.iter().map(|c| c.map(str::to_string)).collect())
}

#[tokio::test]
async fn hostile_dispatch_bodies_are_refused_or_recorded_as_failed() {
    let root = |images: Value| json!({"root": "default", "images": images}).to_string();
    // Past serde_json's recursion limit, where any JSON value is accepted.
    let deep = format!(
        r#"{{"context": {}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let long_url = format!("https://example.com/{}", "a".repeat(5000));
    let many: Vec<String> = (0..51)
        .map(|i| format!("https://example.com/{i}.jpg"))
        .collect();
    let big_context = json!({"root": "default", "images": ["https://example.com/a.jpg"],
        "context": {"x": "y".repeat(17 * 1024)}})
    .to_string();
    let too_many_filters: Vec<String> = (0..17).map(|i| format!("w{}", 100 + i)).collect();
    let cases: Vec<(String, Dispatched)> = vec![
        ("{".into(), Dispatched::Refused("bad-request")),
        ("nul\0".into(), Dispatched::Refused("bad-request")),
        (deep, Dispatched::Refused("bad-request")),
        ("[]".into(), Dispatched::Refused("invalid-payload")),
        ("\"images\"".into(), Dispatched::Refused("invalid-payload")),
        (
            r#"{"images": "https://example.com/a.jpg"}"#.into(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            r#"{"images": [{"context": {}}]}"#.into(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            r#"{"wait": "yes"}"#.into(),
            Dispatched::Refused("invalid-payload"),
        ),
        // Parsed, then refused whole.
        (
            r#"{"images": ["https://example.com/a.jpg"]}"#.into(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            r#"{"root": "nobody", "images": []}"#.into(),
            Dispatched::Refused("unknown-account"),
        ),
        // A root is one safe path segment, checked before any storage look-up.
        (
            r#"{"root": "a/b", "images": []}"#.into(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            r#"{"root": "../accounts/x", "images": []}"#.into(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            json!({"root": "default", "images": many}).to_string(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            json!({"root": "default", "filters": ["../../etc"], "images": []}).to_string(),
            Dispatched::Refused("invalid-payload"),
        ),
        (big_context, Dispatched::Refused("invalid-payload")),
        // Each filter is a render of every image: 17 distinct sizes are too many.
        (
            json!({"root": "default", "filters": too_many_filters, "images": []}).to_string(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            json!({"root": "default", "images": [], "mediaCallbackUrl": "http://127.0.0.1/hook"})
                .to_string(),
            Dispatched::Refused("invalid-payload"),
        ),
        (
            json!({"root": "default", "images": [], "thumbCallbackUrl": "file:///etc/passwd"})
                .to_string(),
            Dispatched::Refused("invalid-payload"),
        ),
        // Accepted whole; each refused image is a failed row with its code, no job.
        (
            root(json!([
                "",
                "   ",
                "file:///etc/passwd",
                "http://127.0.0.1/a.jpg",
                "http://[::ffff:169.254.169.254]/",
                "http://user:pw@example.com/a.jpg",
                long_url,
                {"url": "gopher://example.com/"},
                "https://example.com/ok.jpg",
                "https://example.com/ok.jpg",
            ])),
            rows(&[
                Some("invalid-url"),
                Some("invalid-url"),
                Some("address-denied"),
                Some("address-denied"),
                Some("invalid-url"),
                Some("invalid-url"),
                Some("invalid-url"),
                None,
            ]),
        ),
    ];
    for (body, expected) in cases {
        let shown: String = body.chars().take(80).collect();
        assert_eq!(dispatch(body.as_bytes()).await, expected, "{shown}");
    }
}
