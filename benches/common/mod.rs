//! Shared by the on-demand benchmarks (`render_vs_libvips`, `worker_e2e`):
//! how a bench binary was started, test photos made from real photographs,
//! `/proc` readings (RSS, peak RSS, CPU time) and small statistics.
//!
//! Photos are made from Debian's `mate-backgrounds` (twelve real
//! photographs, 2560 px wide at most), cropped at their native resolution
//! and tiled, so the pixels are a camera's and not a generator's. They are written once
//! under `<target>/bench-photos/` and never committed.
#![allow(dead_code)] // each bench uses a part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How this bench binary was started.
pub enum Mode {
    /// `cargo bench` (it passes `--bench`): the whole comparison.
    Full,
    /// `cargo test --all-targets` (no `--bench`): a quick check that the
    /// harness works, on small synthesized images, without the references.
    Smoke,
    /// Re-executed by the driver as a measuring child: the arguments after `--child`.
    Child(Vec<String>),
}

pub fn mode() -> Mode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        return Mode::Child(args[at + 1..].to_vec());
    }
    if args.iter().any(|a| a == "--bench") {
        Mode::Full
    } else {
        Mode::Smoke
    }
}

/// A positive number from the environment, or `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else the ancestor of this
/// binary holding `CACHEDIR.TAG`), for generated photos and the Python venv.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `git describe`-ish name of the code being measured.
pub fn code_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["log", "-1", "--format=%h %s"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let head: String = head.chars().take(90).collect();
    format!(
        "{head}{}",
        if dirty {
            " (+ uncommitted changes)"
        } else {
            ""
        }
    )
}

// ---- /proc --------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (`self` for this process).
pub fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resets this process's peak RSS (VmHWM) to its current RSS.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// User + system CPU time of a process (all its threads), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time (user + system) of those of `pid`'s threads whose name starts
/// with `prefix`, from `/proc/<pid>/task/*`.
pub fn threads_cpu_time(pid: &str, prefix: &str) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            total += cpu_time(&format!("{pid}/task/{tid}")).unwrap_or_default();
        }
    }
    Some(total)
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---- statistics -----------------------------------------------------------------

/// Prints the load average at the end and, when the start or the end was
/// busier than the machine has cores, a note of what that does to the figures.
pub fn report_load_at_end(load_start: &str, busy_note: &str) {
    let load_end = loadavg();
    println!("load average at the end: {load_end} ({} cores)", cores());
    let busiest = [load_start, &load_end]
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    if busiest > cores() as f64 + 0.5 {
        println!(
            "NOTE: the machine was busy (load {busiest:.1} on {} cores): {busy_note}",
            cores()
        );
    }
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

// ---- system packages ------------------------------------------------------------

/// Installs Debian packages with apt-get (as root, or through sudo).
pub fn apt_install(packages: &[&str]) -> Result<(), String> {
    eprintln!("installing Debian packages: {}", packages.join(" "));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let run = |args: &[&str]| -> Result<(), String> {
        let mut cmd = if root {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg(args[0]);
            c
        };
        cmd.args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null());
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{} exited with {s}", args.join(" "))),
            Err(e) => Err(format!("{}: {e}", args.join(" "))),
        }
    };
    let mut install = vec!["apt-get", "install", "-y", "--no-install-recommends"];
    install.extend_from_slice(packages);
    if run(&install).is_err() {
        run(&["apt-get", "update", "-q"])?;
        run(&install)?;
    }
    Ok(())
}

// ---- test photos -----------------------------------------------------------------

/// Where Debian's `mate-backgrounds` keeps its photographs: twelve JPEGs
/// of 1280x1024 to 2560x1920.
const MATE_NATURE: &str = "/usr/share/backgrounds/mate/nature";
/// The tiled test photo: the centre 1000x1000 of each photograph, at its
/// native resolution (not resampled), 4 across and 3 down.
const CELL: u32 = 1000;
const ACROSS: u32 = 4;
const DOWN: u32 = 3;
/// Bump when the way photos are made changes, so old ones are not reused.
const PHOTOS_VERSION: &str = "v2";

/// The generated photos' directory.
pub fn photo_dir() -> PathBuf {
    target_dir().join("bench-photos").join(PHOTOS_VERSION)
}

/// The source photographs (sorted by name), installing `mate-backgrounds`
/// when missing and `install` is set.
fn source_photos(install: bool) -> Result<Vec<PathBuf>, String> {
    let list = || -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(MATE_NATURE)
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        paths
    };
    let wanted = (ACROSS * DOWN) as usize;
    if list().len() < wanted {
        if !install {
            return Err(format!(
                "{MATE_NATURE} is missing (Debian package mate-backgrounds)"
            ));
        }
        apt_install(&["mate-backgrounds"])?;
    }
    let mut paths = list();
    if paths.len() < wanted {
        return Err(format!(
            "{MATE_NATURE} has {} JPEGs, {wanted} needed",
            paths.len()
        ));
    }
    paths.truncate(wanted);
    Ok(paths)
}

/// The bench's input files.
pub struct Photos {
    /// 4000x3000 (12 MP) JPEG, quality 90, 4:2:0: a camera-sized photo.
    pub jpeg: PathBuf,
    /// The same pixels plus sensor-like noise, quality 90, 4:2:0: about
    /// 4.3 MiB, as a camera's 12 MP file (the clean tile is 1.4 MiB).
    pub jpeg_camera: PathBuf,
    /// 2000x1500 RGBA PNG with a radial alpha fade (a cut-out).
    pub png_alpha: PathBuf,
    /// 4000x3000 lossy WebP (quality 85) of the same pixels as the JPEG.
    pub webp: PathBuf,
}

/// Makes (once) and returns the test photos.
pub fn photos(install: bool) -> Result<Photos, String> {
    let dir = photo_dir();
    let photos = Photos {
        jpeg: dir.join("photo-4000x3000-q90.jpg"),
        jpeg_camera: dir.join("photo-4000x3000-q90-noise.jpg"),
        png_alpha: dir.join("photo-alpha-2000x1500.png"),
        webp: dir.join("photo-4000x3000-q85.webp"),
    };
    let made = [
        &photos.jpeg,
        &photos.jpeg_camera,
        &photos.png_alpha,
        &photos.webp,
    ];
    if !made.iter().all(|p| p.exists()) {
        make_photos(&dir, &photos, install)?;
    }
    // Where benches/stages.rs looks for a 12 MP photo.
    let alias = dir.parent().expect("bench-photos").join("photo-12mp.jpg");
    if !alias.exists() {
        let _ = std::fs::hard_link(&photos.jpeg, &alias);
    }
    Ok(photos)
}

fn make_photos(dir: &Path, photos: &Photos, install: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tile = tile(&source_photos(install)?)?;
    write_atomic(&photos.jpeg, &encode_jpeg(&tile, 90))?;
    let noisy = with_sensor_noise(&tile, CAMERA_NOISE_SIGMA);
    write_atomic(&photos.jpeg_camera, &encode_jpeg(&noisy, 90))?;
    let crop = image::imageops::crop_imm(&tile, 1000, 750, 2000, 1500).to_image();
    write_atomic(&photos.png_alpha, &encode_png_rgba(&with_alpha_fade(&crop)))?;
    let webp = webp::Encoder::from_rgb(tile.as_raw(), tile.width(), tile.height()).encode(85.0);
    write_atomic(&photos.webp, &webp)?;
    eprintln!("made test photos in {}", dir.display());
    Ok(())
}

/// 4000x3000: twelve photographs' centre 1000x1000, not resampled.
fn tile(sources: &[PathBuf]) -> Result<image::RgbImage, String> {
    let mut out = image::RgbImage::new(ACROSS * CELL, DOWN * CELL);
    for (i, path) in sources.iter().enumerate() {
        let photo = image::open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .to_rgb8();
        if photo.width() < CELL || photo.height() < CELL {
            return Err(format!("{} is smaller than {CELL}x{CELL}", path.display()));
        }
        let (x, y) = ((photo.width() - CELL) / 2, (photo.height() - CELL) / 2);
        let cell = image::imageops::crop_imm(&photo, x, y, CELL, CELL);
        let (ox, oy) = ((i as u32 % ACROSS) * CELL, (i as u32 / ACROSS) * CELL);
        image::imageops::replace(&mut out, &*cell, i64::from(ox), i64::from(oy));
    }
    Ok(out)
}

/// Standard deviation, in 8-bit levels, of the noise in the camera-like JPEG.
const CAMERA_NOISE_SIGMA: f64 = 12.0;

/// Adds independent, roughly Gaussian noise to every sample, as a camera
/// sensor at a middling ISO does. Noise is what makes a camera's file three
/// times the size of the clean tile, and entropy decoding costs per byte.
fn with_sensor_noise(rgb: &image::RgbImage, sigma: f64) -> image::RgbImage {
    // The sum of four uniform 16-bit draws (one u64): mean 131070, standard
    // deviation 65536 / sqrt(3).
    let scale = sigma / (65536.0 / 3f64.sqrt());
    let mut rng = Rng(0x6e6f6973);
    let mut out = rgb.clone();
    for sample in out.iter_mut() {
        let bits = rng.next();
        let sum: u64 = (0..4).map(|i| (bits >> (16 * i)) & 0xffff).sum();
        let noise = (sum as f64 - 131070.0) * scale;
        *sample = (f64::from(*sample) + noise).round().clamp(0.0, 255.0) as u8;
    }
    out
}

/// Opaque in the middle, fading to fully transparent towards the corners.
fn with_alpha_fade(rgb: &image::RgbImage) -> image::RgbaImage {
    let (w, h) = (rgb.width() as f32, rgb.height() as f32);
    image::RgbaImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let dx = (x as f32 + 0.5 - w / 2.0) / (w / 2.0);
        let dy = (y as f32 + 0.5 - h / 2.0) / (h / 2.0);
        let d = (dx * dx + dy * dy).sqrt() / std::f32::consts::SQRT_2;
        let a = ((1.0 - d) * 1.6).clamp(0.0, 1.0);
        image::Rgba([r, g, b, (a * 255.0).round() as u8])
    })
}

/// libjpeg-turbo at 4:2:0, as cameras and kiln's variants are.
pub fn encode_jpeg(rgb: &image::RgbImage, quality: u8) -> Vec<u8> {
    kiln::imaging::encode_jpeg(rgb, quality, true).expect("libjpeg-turbo encode")
}

pub fn encode_png_rgba(rgba: &image::RgbaImage) -> Vec<u8> {
    use image::ImageEncoder as _;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            rgba.as_raw(),
            rgba.width(),
            rgba.height(),
            image::ExtendedColorType::Rgba8,
        )
        .expect("png encode");
    out
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A small deterministic RNG (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }
}

/// `count` distinct upload-sized originals (JPEG q85, 1700-2000 px on the
/// long side, about 2-3 MP; one in four portrait, every other one mirrored),
/// each a different crop of the tiled photo. Made once under the photo
/// directory; returns their paths in order.
pub fn originals(count: usize, install: bool) -> Result<Vec<PathBuf>, String> {
    let dir = photo_dir().join("originals");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let paths: Vec<PathBuf> = (0..count)
        .map(|n| dir.join(format!("original-{n:04}.jpg")))
        .collect();
    let todo: Vec<usize> = (0..count).filter(|&n| !paths[n].exists()).collect();
    if todo.is_empty() {
        return Ok(paths);
    }
    let tile = tile(&source_photos(install)?)?;
    let started = std::time::Instant::now();
    let threads = cores().min(4);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (todo, paths, tile) = (&todo, &paths, &tile);
            s.spawn(move || {
                for &n in todo.iter().skip(t).step_by(threads) {
                    let mut rng = Rng(0x6b696c6e ^ (n as u64).wrapping_mul(0x1000_0001));
                    let long = rng.range(1700, 2000);
                    let short = long * 3 / 4 - rng.range(0, 120);
                    let (w, h) = if n % 4 == 3 {
                        (short, long)
                    } else {
                        (long, short)
                    };
                    let x = rng.range(0, tile.width() - w);
                    let y = rng.range(0, tile.height() - h);
                    let mut crop = image::imageops::crop_imm(tile, x, y, w, h).to_image();
                    if n % 2 == 1 {
                        image::imageops::flip_horizontal_in_place(&mut crop);
                    }
                    write_atomic(&paths[n], &encode_jpeg(&crop, 85)).expect("write original");
                }
            });
        }
    });
    eprintln!(
        "made {} originals in {:.1}s in {}",
        todo.len(),
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(paths)
}

/// A small photo-like picture (gradients and a ripple) for smoke runs, when
/// no photographs are needed.
pub fn synthetic(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let ripple = ((xf * 0.05).sin() * (yf * 0.07).cos() * 40.0) as i32;
        image::Rgb([
            (x * 255 / width) as u8,
            (y * 255 / height) as u8,
            (128 + ripple).clamp(0, 255) as u8,
        ])
    })
}

/// The synthetic picture with the same alpha fade as the PNG test photo.
pub fn synthetic_rgba(width: u32, height: u32) -> image::RgbaImage {
    with_alpha_fade(&synthetic(width, height))
}
