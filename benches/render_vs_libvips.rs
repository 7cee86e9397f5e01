//! kiln's render pipeline against libvips (imgproxy's engine) and Pillow
//! (thumbor's), single-threaded, in the same run, on real photographs.
//!
//! `cargo bench --bench render_vs_libvips` makes the test photos (once,
//! under `<target>/bench-photos/`, installing Debian's `mate-backgrounds`
//! if needed), sets up the references (Debian `libvips-tools`, a venv under
//! `<target>/bench-venv` with pyvips and Pillow from PyPI), then for each
//! scenario runs rounds of one child process per engine, alternating, each
//! measuring its own time per job and its own peak RSS; it prints medians
//! over the rounds, the ratios and the targets with PASS/FAIL.
//!
//! Run by `cargo test --all-targets` (no `--bench` argument) it only does a
//! one-iteration smoke run of kiln's side on small synthesized images, and
//! fails loudly if anything does not render.
//!
//! Environment: ROUNDS (default 5), WARMUP (jobs before timing, default 3),
//! BUDGET_SECS (timing stops after this once 5 jobs are done, default 4),
//! ITERS_SCALE (multiplies each scenario's job count, default 1),
//! ONLY (a scenario key: jpeg-300, jpeg-300-camera, jpeg-3sizes,
//! png-alpha-300, webp-300),
//! STRICT=1 (exit 1 when a target fails).

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use kiln::filter::{Mode as FitMode, Preset};
use kiln::imaging::{self, Limits};
use serde_json::{json, Value};

use common::Mode;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    Jpeg,
    /// The same photo with sensor-like noise: a camera's file size.
    CameraJpeg,
    PngAlpha,
    Webp,
}

impl Input {
    /// The reference engines' output format: the source's, as kiln's `source`.
    fn format(self) -> &'static str {
        match self {
            Input::Jpeg | Input::CameraJpeg => "jpeg",
            Input::PngAlpha => "png",
            Input::Webp => "webp",
        }
    }
}

struct Scenario {
    key: &'static str,
    label: &'static str,
    input: Input,
    sizes: &'static [u32],
    /// Timed jobs per child (before ITERS_SCALE and the time budget).
    iters: usize,
    /// kiln's images/s must be at least this times libvips'.
    target_vs_libvips: f64,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        key: "jpeg-300",
        label: "12 MP JPEG -> 300 px JPEG q80",
        input: Input::Jpeg,
        sizes: &[300],
        iters: 40,
        target_vs_libvips: 2.5,
    },
    Scenario {
        key: "jpeg-300-camera",
        label: "12 MP camera-like JPEG (the photo plus sensor noise) -> 300 px JPEG q80",
        input: Input::CameraJpeg,
        sizes: &[300],
        iters: 20,
        target_vs_libvips: 2.5,
    },
    Scenario {
        key: "jpeg-3sizes",
        label: "12 MP JPEG -> 150 + 300 + 800 px JPEG q80 (kiln: one job, one decode)",
        input: Input::Jpeg,
        sizes: &[150, 300, 800],
        iters: 20,
        target_vs_libvips: 4.0,
    },
    Scenario {
        key: "png-alpha-300",
        label: "2000x1500 PNG with alpha -> 300 px PNG",
        input: Input::PngAlpha,
        sizes: &[300],
        iters: 20,
        target_vs_libvips: 1.0,
    },
    Scenario {
        key: "webp-300",
        label: "12 MP WebP -> 300 px WebP q80",
        input: Input::Webp,
        sizes: &[300],
        iters: 20,
        target_vs_libvips: 1.0,
    },
];

/// The memory target: peak RSS of one 12 MP JPEG job above the baseline.
const MAX_JOB_PEAK_MIB: f64 = 16.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Kiln,
    KilnPreviews,
    Libvips,
    Pillow,
}

const ENGINES: [Engine; 4] = [
    Engine::Kiln,
    Engine::KilnPreviews,
    Engine::Libvips,
    Engine::Pillow,
];

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Kiln => "kiln",
            Engine::KilnPreviews => "kiln+previews",
            Engine::Libvips => "libvips",
            Engine::Pillow => "Pillow",
        }
    }
}

fn main() -> ExitCode {
    match common::mode() {
        Mode::Child(args) => child(&args),
        Mode::Smoke => smoke(),
        Mode::Full => full(),
    }
}

// ---- kiln's side (a child process) -----------------------------------------------

fn presets(sizes: &[u32]) -> Vec<Preset> {
    sizes
        .iter()
        .map(|&side| Preset::thumbnail(&format!("box{side}"), FitMode::Inset, side, side, 80))
        .collect()
}

fn limits() -> Limits {
    let config = kiln::config::Config::load_from(kiln::config::Sources::default())
        .expect("kiln's default config");
    Limits::from(&config.imaging)
}

/// One job as the worker does it: decode once for every preset, render each,
/// and (with `previews`) the BlurHash and ThumbHash.
fn kiln_job(
    bytes: &[u8],
    limits: Limits,
    presets: &[Preset],
    previews: bool,
) -> kiln::Result<(Vec<imaging::Rendered>, (u32, u32))> {
    let source = imaging::decode_for(bytes, limits, presets)?;
    let decoded = (source.image.width(), source.image.height());
    let out = presets
        .iter()
        .map(|p| imaging::render(&source, p))
        .collect::<kiln::Result<Vec<_>>>()?;
    if previews {
        imaging::previews(&source)?;
    }
    Ok((out, decoded))
}

/// `--child kiln FILE SIZES ITERS WARMUP BUDGET_SECS PREVIEWS(0|1)`: prints one JSON line.
fn child(args: &[String]) -> ExitCode {
    let [engine, file, sizes, iters, warmup, budget, previews] = args else {
        eprintln!("child: unexpected arguments {args:?}");
        return ExitCode::from(2);
    };
    assert_eq!(engine, "kiln");
    let sizes: Vec<u32> = sizes.split(',').map(|s| s.parse().unwrap()).collect();
    let (iters, warmup): (usize, usize) = (iters.parse().unwrap(), warmup.parse().unwrap());
    let budget = Duration::from_secs_f64(budget.parse().unwrap());
    let previews = previews == "1";
    let presets = presets(&sizes);
    let limits = limits();
    let bytes = std::fs::read(file).expect("read input");

    let peak_reset = common::reset_peak_rss();
    let baseline = common::status_kib("self", "VmRSS").unwrap_or(0);
    let mut outs = (Vec::new(), (0, 0));
    for _ in 0..warmup {
        outs = kiln_job(&bytes, limits, &presets, previews).expect("kiln job");
    }
    let mut times = Vec::new();
    let cpu0 = common::cpu_time("self").unwrap_or_default();
    let started = Instant::now();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        outs = match kiln_job(&bytes, limits, &presets, previews) {
            Ok(outs) => outs,
            Err(e) => {
                eprintln!("kiln job failed: {} ({e})", e.code());
                return ExitCode::from(1);
            }
        };
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if times.len() >= 5 && started.elapsed() > budget {
            break;
        }
    }
    let cpu = common::cpu_time("self").unwrap_or_default() - cpu0;
    let peak = common::status_kib("self", "VmHWM").unwrap_or(0);
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    // The decode alone, as often as the jobs were timed: the part of a job
    // that no resize or encode work can take away.
    let decode_times: Vec<f64> = (0..times.len())
        .map(|_| {
            let t = Instant::now();
            let source = imaging::decode_for(&bytes, limits, &presets).expect("decode");
            std::hint::black_box(source);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!(
        "{}",
        json!({
            "engine": if previews { "kiln+previews" } else { "kiln" },
            "iters": times.len(),
            "ms_median": common::median(&times),
            "ms_min": min,
            "decode_ms_median": common::median(&decode_times),
            "cpu_ms": cpu.as_secs_f64() * 1000.0 / times.len() as f64,
            "baseline_kib": baseline,
            "peak_kib": peak.saturating_sub(baseline),
            "peak_reset": peak_reset,
            "out_bytes": outs.0.iter().map(|o| o.bytes.len()).collect::<Vec<_>>(),
            "out_dims": outs.0.iter().map(|o| [o.width, o.height]).collect::<Vec<_>>(),
            "decoded": [outs.1 .0, outs.1 .1],
        })
    );
    ExitCode::SUCCESS
}

// ---- the driver ---------------------------------------------------------------------

/// One child's report.
#[derive(Clone)]
struct Report {
    ms_median: f64,
    cpu_ms: f64,
    peak_kib: f64,
    out_bytes: Vec<u64>,
    out_dims: Vec<(u32, u32)>,
    /// The size kiln decoded the source at (shrink-on-load); None for the references.
    decoded: Option<(u32, u32)>,
    /// kiln's decode alone, median ms; None for the references.
    decode_ms: Option<f64>,
    /// (max - min) / median of the rounds' medians; 0 for one child's report.
    spread: f64,
}

fn parse_report(stdout: &[u8]) -> Result<Report, String> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| format!("no JSON line in {text:?}"))?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
    let num = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("no number {k:?} in {line}"))
    };
    Ok(Report {
        ms_median: num("ms_median")?,
        cpu_ms: num("cpu_ms")?,
        peak_kib: num("peak_kib")?,
        out_bytes: v["out_bytes"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
        out_dims: v["out_dims"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            d[0].as_u64().unwrap_or(0) as u32,
                            d[1].as_u64().unwrap_or(0) as u32,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        spread: 0.0,
        decode_ms: v["decode_ms_median"].as_f64(),
        decoded: v["decoded"].as_array().map(|d| {
            (
                d[0].as_u64().unwrap_or(0) as u32,
                d[1].as_u64().unwrap_or(0) as u32,
            )
        }),
    })
}

struct Run<'a> {
    python: Option<PathBuf>,
    reference: PathBuf,
    input: &'a Path,
    scenario: &'a Scenario,
    iters: usize,
    warmup: usize,
    budget: f64,
}

impl Run<'_> {
    fn command(&self, engine: Engine) -> Command {
        let sizes: Vec<String> = self.scenario.sizes.iter().map(u32::to_string).collect();
        let sizes = sizes.join(",");
        let common_args = [
            self.iters.to_string(),
            self.warmup.to_string(),
            self.budget.to_string(),
        ];
        match engine {
            Engine::Kiln | Engine::KilnPreviews => {
                let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
                cmd.arg("--child").arg("kiln").arg(self.input).arg(sizes);
                cmd.args(common_args);
                cmd.arg(if engine == Engine::KilnPreviews {
                    "1"
                } else {
                    "0"
                });
                cmd
            }
            Engine::Libvips | Engine::Pillow => {
                let mut cmd = Command::new(self.python.as_ref().expect("python venv"));
                cmd.arg(&self.reference)
                    .arg(if engine == Engine::Libvips {
                        "libvips"
                    } else {
                        "pillow"
                    })
                    .arg(self.input)
                    .arg(sizes)
                    .arg(self.scenario.input.format());
                cmd.args(common_args);
                // One thread, as kiln's render of one job.
                cmd.env("VIPS_CONCURRENCY", "1");
                cmd
            }
        }
    }

    fn measure(&self, engine: Engine) -> Result<Report, String> {
        let output = self
            .command(engine)
            .output()
            .map_err(|e| format!("{}: {e}", engine.name()))?;
        if !output.status.success() {
            return Err(format!(
                "{} exited with {}:\n{}",
                engine.name(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        parse_report(&output.stdout).map_err(|e| format!("{}: {e}", engine.name()))
    }
}

/// `cargo test`: one job per scenario on small synthesized images, kiln only.
fn smoke() -> ExitCode {
    let dir = tempfile::tempdir().expect("temp dir");
    let jpeg = dir.path().join("smoke.jpg");
    let png = dir.path().join("smoke.png");
    let webp = dir.path().join("smoke.webp");
    let rgb = common::synthetic(640, 480);
    std::fs::write(&jpeg, common::encode_jpeg(&rgb, 90)).unwrap();
    std::fs::write(
        &png,
        common::encode_png_rgba(&common::synthetic_rgba(400, 300)),
    )
    .unwrap();
    let webp_bytes = webp::Encoder::from_rgb(rgb.as_raw(), rgb.width(), rgb.height()).encode(85.0);
    std::fs::write(&webp, &*webp_bytes).unwrap();
    for scenario in SCENARIOS {
        let (input, (w, h)) = match scenario.input {
            Input::Jpeg | Input::CameraJpeg => (&jpeg, (640, 480)),
            Input::PngAlpha => (&png, (400, 300)),
            Input::Webp => (&webp, (640, 480)),
        };
        let run = Run {
            python: None,
            reference: PathBuf::new(),
            input,
            scenario,
            iters: 1,
            warmup: 0,
            budget: 0.0,
        };
        let report = match run.measure(Engine::KilnPreviews) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("render_vs_libvips smoke: {}: {e}", scenario.key);
                return ExitCode::FAILURE;
            }
        };
        let expected: Vec<(u32, u32)> = scenario
            .sizes
            .iter()
            .map(|&s| {
                let scale = (f64::from(s) / f64::from(w.max(h))).min(1.0);
                (
                    (f64::from(w) * scale).round() as u32,
                    (f64::from(h) * scale).round() as u32,
                )
            })
            .collect();
        if report.out_dims != expected || report.out_bytes.contains(&0) {
            eprintln!(
                "render_vs_libvips smoke: {}: got {:?} ({:?} bytes), expected {expected:?}",
                scenario.key, report.out_dims, report.out_bytes
            );
            return ExitCode::FAILURE;
        }
        println!(
            "render_vs_libvips smoke: {} ok ({:.1} ms, outputs {:?})",
            scenario.key, report.ms_median, report.out_dims
        );
    }
    ExitCode::SUCCESS
}

/// The Python venv with pyvips and Pillow, made once; libvips from Debian.
fn reference_python() -> Result<PathBuf, String> {
    let libvips_present = Command::new("sh")
        .args(["-c", "ldconfig -p | grep -q 'libvips.so.42 '"])
        .status()
        .is_ok_and(|s| s.success());
    if !libvips_present {
        common::apt_install(&["libvips-tools"])?;
    }
    let venv = common::target_dir().join("bench-venv");
    let python = venv.join("bin").join("python");
    let requirements =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/render_vs_libvips/requirements.txt");
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&requirements).map_err(|e| e.to_string())?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return Ok(python);
    }
    eprintln!("setting up {} (pyvips, Pillow)", venv.display());
    let run = |cmd: &mut Command| -> Result<(), String> {
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            other => Err(format!("{cmd:?}: {other:?}")),
        }
    };
    if !python.exists() {
        let made = run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        if made.is_err() {
            common::apt_install(&["python3-venv"])?;
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        }
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(&requirements))?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(python)
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn full() -> ExitCode {
    let rounds: usize = common::env_number("ROUNDS", 5);
    let warmup: usize = common::env_number("WARMUP", 3);
    let budget: f64 = common::env_number("BUDGET_SECS", 4.0);
    let scale: f64 = common::env_number("ITERS_SCALE", 1.0);
    let only = std::env::var("ONLY").ok();
    let strict = std::env::var("STRICT").is_ok_and(|v| v == "1");

    let photos = match common::photos(true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("render_vs_libvips: test photos: {e}");
            return ExitCode::FAILURE;
        }
    };
    let python = match reference_python() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("render_vs_libvips: reference engines: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reference =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/render_vs_libvips/reference.py");
    let versions = Command::new(&python)
        .arg(&reference)
        .arg("versions")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let line = "=".repeat(104);
    println!("{line}");
    println!("render_vs_libvips: kiln's render pipeline vs libvips and Pillow, one thread each, same run");
    println!("kiln code:   {}", common::code_version());
    println!("references:  {versions}");
    let load_start = common::loadavg();
    println!(
        "machine:     {} cores, load average {load_start} at start (other work on the machine shows as wall > CPU time)",
        common::cores(),
    );
    println!(
        "method:      {rounds} rounds per scenario, engines alternating (order rotated each round), one process per engine \
         per round: {warmup} warm-up jobs, then timed jobs (median); medians over rounds (spread: (max - min) / median \
         of the rounds' medians); peak RSS = VmHWM above the process's RSS after reading the input, max over rounds"
    );
    println!("{line}");

    struct Outcome {
        scenario: &'static Scenario,
        results: Vec<(Engine, Report)>,
    }
    let mut outcomes: Vec<Outcome> = Vec::new();
    for scenario in SCENARIOS {
        if only.as_deref().is_some_and(|o| o != scenario.key) {
            continue;
        }
        let input = match scenario.input {
            Input::Jpeg => &photos.jpeg,
            Input::CameraJpeg => &photos.jpeg_camera,
            Input::PngAlpha => &photos.png_alpha,
            Input::Webp => &photos.webp,
        };
        let size = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
        println!(
            "\n{} [{}]\n  input {} ({:.2} MiB)",
            scenario.label,
            scenario.key,
            input.display(),
            size as f64 / 1048576.0
        );
        let run = Run {
            python: Some(python.clone()),
            reference: reference.clone(),
            input,
            scenario,
            iters: ((scenario.iters as f64 * scale).round() as usize).max(1),
            warmup,
            budget,
        };
        let mut per_engine: Vec<Vec<Report>> = vec![Vec::new(); ENGINES.len()];
        for round in 0..rounds {
            let mut line = format!("  round {}/{rounds}:", round + 1);
            for k in 0..ENGINES.len() {
                let i = (k + round) % ENGINES.len();
                match run.measure(ENGINES[i]) {
                    Ok(report) => {
                        line += &format!(" {} {:.1} ms", ENGINES[i].name(), report.ms_median);
                        per_engine[i].push(report);
                    }
                    Err(e) => {
                        eprintln!("render_vs_libvips: {}: {e}", scenario.key);
                        return ExitCode::FAILURE;
                    }
                }
            }
            println!("{line}");
        }
        let results: Vec<(Engine, Report)> = ENGINES
            .iter()
            .zip(&per_engine)
            .map(|(&engine, reports)| {
                let pick = |f: fn(&Report) -> f64| reports.iter().map(f).collect::<Vec<_>>();
                let peak = pick(|r| r.peak_kib).into_iter().fold(0.0, f64::max);
                let times = pick(|r| r.ms_median);
                let spread = (times.iter().copied().fold(f64::MIN, f64::max)
                    - times.iter().copied().fold(f64::MAX, f64::min))
                    / common::median(&times);
                (
                    engine,
                    Report {
                        ms_median: common::median(&pick(|r| r.ms_median)),
                        cpu_ms: common::median(&pick(|r| r.cpu_ms)),
                        peak_kib: peak,
                        out_bytes: reports[0].out_bytes.clone(),
                        out_dims: reports[0].out_dims.clone(),
                        decoded: reports[0].decoded,
                        decode_ms: reports
                            .iter()
                            .map(|r| r.decode_ms)
                            .collect::<Option<Vec<f64>>>()
                            .map(|d| common::median(&d)),
                        spread,
                    },
                )
            })
            .collect();
        let of = |e: Engine| &results.iter().find(|(x, _)| *x == e).unwrap().1;
        println!(
            "  {:<14} {:>9} {:>7} {:>9} {:>10} {:>11} {:>12} {:>12}  outputs",
            "engine",
            "ms/job",
            "spread",
            "jobs/s",
            "CPU ms/job",
            "peak RSS +",
            "kiln/this",
            "(by CPU)"
        );
        for (engine, r) in &results {
            let kiln = of(Engine::Kiln);
            let outputs: Vec<String> = r
                .out_dims
                .iter()
                .zip(&r.out_bytes)
                .map(|((w, h), b)| format!("{w}x{h} {:.1}k", *b as f64 / 1024.0))
                .collect();
            println!(
                "  {:<14} {:>9.1} {:>6.0}% {:>9.2} {:>10.1} {:>7.1} MiB {:>11.2}x {:>11.2}x  {}{}",
                engine.name(),
                r.ms_median,
                r.spread * 100.0,
                1000.0 / r.ms_median,
                r.cpu_ms,
                mib(r.peak_kib),
                r.ms_median / kiln.ms_median,
                r.cpu_ms / kiln.cpu_ms,
                outputs.join(", "),
                match (r.decoded, r.decode_ms) {
                    (Some((w, h)), Some(ms)) => format!(" (decoded at {w}x{h} in {ms:.1} ms)"),
                    (Some((w, h)), None) => format!(" (decoded at {w}x{h})"),
                    _ => String::new(),
                }
            );
        }
        outcomes.push(Outcome { scenario, results });
    }

    // ---- targets ----
    println!("\n{line}");
    println!("TARGETS (kiln = decode_for + render, without previews; ratios of jobs/s from wall-clock medians; kiln/this = kiln's jobs/s over this engine's)");
    let mut failed = 0;
    let mut verdict = |ok: bool| {
        if ok {
            "PASS"
        } else {
            failed += 1;
            "FAIL"
        }
    };
    for outcome in &outcomes {
        let of = |e: Engine| &outcome.results.iter().find(|(x, _)| *x == e).unwrap().1;
        let (kiln, previews, vips, pillow) = (
            of(Engine::Kiln),
            of(Engine::KilnPreviews),
            of(Engine::Libvips),
            of(Engine::Pillow),
        );
        let ratio = vips.ms_median / kiln.ms_median;
        let target = outcome.scenario.target_vs_libvips;
        // What the target asks of a whole job, beside what decoding alone took.
        let floor = kiln
            .decode_ms
            .map(|d| {
                format!(
                    "; target = a job in {:.1} ms, kiln's decode alone takes {d:.1} ms",
                    vips.ms_median / target
                )
            })
            .unwrap_or_default();
        println!(
            "  {:<15} kiln {:>7.2} jobs/s = {:>5.2}x libvips (target >= {target}x) {:<4}  | with previews {:.2}x; vs Pillow {:.2}x; by CPU time {:.2}x libvips{floor}",
            outcome.scenario.key,
            1000.0 / kiln.ms_median,
            ratio,
            verdict(ratio >= target),
            vips.ms_median / previews.ms_median,
            pillow.ms_median / kiln.ms_median,
            vips.cpu_ms / kiln.cpu_ms,
        );
    }
    let jpeg_peaks: Vec<(&str, f64)> = outcomes
        .iter()
        .filter(|o| o.scenario.input.format() == "jpeg")
        .flat_map(|o| {
            o.results
                .iter()
                .filter(|(e, _)| matches!(e, Engine::Kiln | Engine::KilnPreviews))
                .map(move |(_, r)| (o.scenario.key, mib(r.peak_kib)))
        })
        .collect();
    if let Some((key, worst)) = jpeg_peaks
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        let vips: Vec<String> = outcomes
            .iter()
            .filter(|o| o.scenario.input.format() == "jpeg")
            .map(|o| {
                let r = &o
                    .results
                    .iter()
                    .find(|(e, _)| *e == Engine::Libvips)
                    .unwrap()
                    .1;
                format!("{} {:.1} MiB", o.scenario.key, mib(r.peak_kib))
            })
            .collect();
        println!(
            "  memory          kiln's worst 12 MP JPEG job peaks {worst:.1} MiB above baseline ({key}, with or without previews) \
             (target <= {MAX_JOB_PEAK_MIB} MiB) {}  | libvips: {}",
            verdict(worst <= MAX_JOB_PEAK_MIB),
            vips.join(", ")
        );
    }
    common::report_load_at_end(&load_start, "wall-clock times include waiting for a core; the CPU-time ratios are the steadier comparison");
    println!(
        "VERDICT: {}",
        if failed == 0 {
            "all targets PASS".to_string()
        } else {
            format!("{failed} target(s) FAIL")
        }
    );
    if failed > 0 && strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
