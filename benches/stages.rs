//! Criterion benches of the render pipeline's stages, each beside the
//! alternative it was chosen over, on one 12 MP photo:
//! decode (full `image` vs libjpeg-turbo full, and kiln's 1/8 DC-only
//! shrink-on-load vs libjpeg-turbo's own 1/8), resize
//! (`fast_image_resize` vs `image`), encode per format, previews.
//!
//! `cargo bench --bench stages` measures; under `cargo test` each routine
//! runs once as a smoke test. The photo is `KILN_BENCH_PHOTO`, else the
//! one `benches/render_vs_libvips` tiles from Debian's backgrounds, else a
//! synthetic stand-in (said so on stderr: its numbers are not a photo's).

use std::hint::black_box;
use std::io::Cursor;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageFormat};
use kiln::filter::{Mode, OutputFormat, Preset};
use kiln::imaging::{self, Limits};

fn limits() -> Limits {
    Limits {
        max_width: 16_384,
        max_height: 16_384,
        max_pixels: 50_000_000,
        max_alloc_bytes: 512 << 20,
        max_jpeg_scans: 100,
        max_output_pixels: 40_000_000,
        max_animation_frames: 200,
        max_animation_pixels: 50_000_000,
    }
}

fn preset(side: u32, format: OutputFormat) -> Preset {
    Preset {
        format,
        ..Preset::thumbnail(&format!("s{side}"), Mode::Inset, side, side, 80)
    }
}

fn photo() -> Vec<u8> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let candidates = [
        std::env::var_os("KILN_BENCH_PHOTO").map(PathBuf::from),
        Some(target.join("bench-photos/photo-12mp.jpg")),
    ];
    for path in candidates.into_iter().flatten() {
        if let Ok(bytes) = std::fs::read(&path) {
            eprintln!("photo: {}", path.display());
            return bytes;
        }
    }
    eprintln!("photo: synthetic 4000x3000 (run benches/render_vs_libvips once for a real one)");
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        // Smooth gradients plus high-frequency texture, roughly photo-like entropy.
        let n = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 24;
        image::Rgb([
            ((x / 16) as u8).wrapping_add(n as u8 / 8),
            ((y / 12) as u8).wrapping_add(n as u8 / 6),
            (((x + y) / 28) as u8) ^ (n as u8 / 10),
        ])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
        .unwrap();
    out
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    let mse = sum / a.as_raw().len() as f64;
    10.0 * (255.0 * 255.0 / mse).log10()
}

fn decode_stage(c: &mut Criterion, jpeg: &[u8]) {
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.bench_function("image-crate-full", |b| {
        b.iter(|| image::load_from_memory(black_box(jpeg)).unwrap())
    });
    group.bench_function("turbojpeg-full", |b| {
        b.iter(|| imaging::decode(black_box(jpeg), limits()).unwrap())
    });
    // The reference for kiln's 1/8 decode: libjpeg-turbo's own DCT scaling,
    // which still decodes every AC coefficient.
    group.bench_function("libjpeg-turbo-eighth", |b| {
        b.iter(|| imaging::libjpeg_turbo_rgb(black_box(jpeg), 8).unwrap())
    });
    let thumb = [preset(300, OutputFormat::Jpeg)];
    group.bench_function("kiln-shrink-on-load-for-300-dc-only", |b| {
        b.iter(|| imaging::decode_for(black_box(jpeg), limits(), &thumb).unwrap())
    });
    group.finish();
}

fn resize_stage(c: &mut Criterion, source: &DynamicImage) {
    let mut group = c.benchmark_group("resize-to-300");
    group.bench_function("fast_image_resize-lanczos3", |b| {
        b.iter(|| {
            let mut dst = DynamicImage::new(300, 225, source.color());
            Resizer::new()
                .resize(
                    black_box(source),
                    &mut dst,
                    &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
                )
                .unwrap();
            dst
        })
    });
    group.bench_function("image-crate-lanczos3", |b| {
        b.iter(|| black_box(source).resize_exact(300, 225, image::imageops::FilterType::Lanczos3))
    });
    group.finish();
}

fn encode_stage(c: &mut Criterion, thumb: &DynamicImage) {
    let rgb = thumb.to_rgb8();
    let by_image_crate = |format: ImageFormat| {
        let mut out = Vec::new();
        match format {
            ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
                .encode_image(&rgb)
                .unwrap(),
            _ => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .encode(
                    rgb.as_raw(),
                    rgb.width(),
                    rgb.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .unwrap(),
        }
        out
    };
    // The `image` crate does not subsample chroma: this is its like-for-like.
    let turbo_444 = || imaging::encode_jpeg(&rgb, 80, false).unwrap();
    let png_at = |compression| {
        use image::codecs::png::{FilterType, PngEncoder};
        let mut out = Vec::new();
        thumb
            .write_with_encoder(PngEncoder::new_with_quality(
                &mut out,
                compression,
                FilterType::Adaptive,
            ))
            .unwrap();
        out
    };
    // libwebp's faster methods (kiln's default is libwebp's 4).
    let webp_method = |method: u8| {
        let encoding = kiln::filter::Encoding {
            quality: 80,
            jpeg_quality: None,
            png_compression_level: None,
            webp_lossless: false,
            webp_method: Some(method),
            animated: false,
        };
        imaging::encode_with(thumb, ImageFormat::WebP, &encoding, false).unwrap()
    };
    // Equal visual quality is checked, not assumed: size and PSNR per encoder.
    let report = |name: &str, bytes: &[u8]| {
        let back = image::load_from_memory(bytes).unwrap().to_rgb8();
        eprintln!(
            "encode {name:<28} {:>7} bytes  PSNR {:.2} dB",
            bytes.len(),
            psnr(&rgb, &back)
        );
    };
    report(
        "jpeg q80 libjpeg-turbo",
        &imaging::encode(thumb, ImageFormat::Jpeg, 80).unwrap(),
    );
    report("jpeg q80 image-crate", &by_image_crate(ImageFormat::Jpeg));
    report("jpeg q80 libjpeg-turbo 4:4:4", &turbo_444());
    report(
        "webp q80 libwebp lossy",
        &imaging::encode(thumb, ImageFormat::WebP, 80).unwrap(),
    );
    report("webp q80 libwebp method 2", &webp_method(2));
    report("webp q80 libwebp method 0", &webp_method(0));
    report(
        "webp image-crate lossless",
        &by_image_crate(ImageFormat::WebP),
    );
    use image::codecs::png::CompressionType;
    for (name, level) in [
        ("png fast", CompressionType::Fast),
        ("png default", CompressionType::Default),
        ("png best", CompressionType::Best),
    ] {
        report(name, &png_at(level));
    }

    let mut group = c.benchmark_group("encode");
    group.sample_size(20);
    group.bench_function("jpeg-q80-libjpeg-turbo", |b| {
        b.iter(|| imaging::encode(black_box(thumb), ImageFormat::Jpeg, 80).unwrap())
    });
    group.bench_function("jpeg-q80-libjpeg-turbo-444", |b| b.iter(turbo_444));
    group.bench_function("jpeg-q80-image-crate", |b| {
        b.iter(|| by_image_crate(ImageFormat::Jpeg))
    });
    group.bench_function("webp-q80-libwebp-lossy", |b| {
        b.iter(|| imaging::encode(black_box(thumb), ImageFormat::WebP, 80).unwrap())
    });
    group.bench_function("webp-q80-libwebp-lossy-method-2", |b| {
        b.iter(|| webp_method(2))
    });
    group.bench_function("webp-q80-libwebp-lossy-method-0", |b| {
        b.iter(|| webp_method(0))
    });
    group.bench_function("webp-image-crate-lossless", |b| {
        b.iter(|| by_image_crate(ImageFormat::WebP))
    });
    group.bench_function("avif-q80-rav1e-speed8", |b| {
        b.iter(|| imaging::encode(black_box(thumb), ImageFormat::Avif, 80).unwrap())
    });
    group.bench_function("png-fast", |b| b.iter(|| png_at(CompressionType::Fast)));
    group.bench_function("png-default", |b| {
        b.iter(|| png_at(CompressionType::Default))
    });
    group.finish();
}

fn previews_stage(c: &mut Criterion, source: &imaging::Decoded) {
    c.bench_function("previews/blurhash+thumbhash", |b| {
        b.iter(|| imaging::previews(black_box(source)).unwrap())
    });
}

fn stages(c: &mut Criterion) {
    let jpeg = photo();
    decode_stage(c, &jpeg);
    let shrunk = imaging::decode_for(&jpeg, limits(), &[preset(300, OutputFormat::Jpeg)]).unwrap();
    resize_stage(c, &shrunk.image);
    let thumb = imaging::render(&shrunk, &preset(800, OutputFormat::Png)).unwrap();
    let thumb = image::load_from_memory(&thumb.bytes).unwrap();
    encode_stage(c, &thumb);
    previews_stage(c, &shrunk);
}

criterion_group!(benches, stages);
criterion_main!(benches);
