//! The filter chain on real pixels: every filter makes the size its
//! geometry says, and crops, canvases, watermarks, turns and EXIF put the
//! colours where Liip (or, upright, kiln) puts them.

use std::io::Cursor;

use image::{AnimationDecoder as _, DynamicImage, ImageFormat, Rgba, RgbaImage};

use super::tests::{halves_jpeg, limits, with_exif_orientation};
use super::{decode_for, render};
use crate::filter::{FilterSet, Preset};

const RED: [u8; 3] = [220, 20, 20];
const GREEN: [u8; 3] = [20, 200, 20];
const BLUE: [u8; 3] = [20, 20, 220];
const YELLOW: [u8; 3] = [230, 220, 20];
const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];

fn preset(body: &str) -> Preset {
    FilterSet::from_toml(&format!("[p]\n{body}"))
        .unwrap()
        .get("p")
        .unwrap()
        .into_owned()
}

fn png_of(image: RgbaImage) -> Vec<u8> {
    let mut out = Vec::new();
    DynamicImage::ImageRgba8(image)
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

fn solid(w: u32, h: u32, [r, g, b]: [u8; 3]) -> Vec<u8> {
    png_of(RgbaImage::from_pixel(w, h, Rgba([r, g, b, 255])))
}

/// Top left red, top right green, bottom left blue, bottom right yellow.
fn quadrants(w: u32, h: u32) -> Vec<u8> {
    png_of(RgbaImage::from_fn(w, h, |x, y| {
        let [r, g, b] = match (x < w / 2, y < h / 2) {
            (true, true) => RED,
            (false, true) => GREEN,
            (true, false) => BLUE,
            (false, false) => YELLOW,
        };
        Rgba([r, g, b, 255])
    }))
}

fn rendered(source: &[u8], preset: &Preset) -> (super::Rendered, DynamicImage) {
    let decoded = decode_for(source, limits(), std::slice::from_ref(preset)).unwrap();
    let out = render(&decoded, preset).unwrap();
    let image = image::load_from_memory(&out.bytes).unwrap();
    assert_eq!((image.width(), image.height()), (out.width, out.height));
    (out, image)
}

fn run(source: &[u8], preset: &Preset) -> DynamicImage {
    rendered(source, preset).1
}

/// Mean colour of `[x0, x1) x [y0, y1)`, flattened on white.
fn mean(image: &DynamicImage, (x0, y0): (u32, u32), (x1, y1): (u32, u32)) -> [f32; 3] {
    let rgba = image.to_rgba8();
    let mut sum = [0f32; 3];
    for y in y0..y1 {
        for x in x0..x1 {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            let a = f32::from(a) / 255.0;
            for (s, c) in sum.iter_mut().zip([r, g, b]) {
                *s += f32::from(c) * a + 255.0 * (1.0 - a);
            }
        }
    }
    let n = ((x1 - x0) * (y1 - y0)) as f32;
    sum.map(|s| s / n)
}

#[track_caller]
fn assert_colour(image: &DynamicImage, from: (u32, u32), to: (u32, u32), want: [u8; 3]) {
    let got = mean(image, from, to);
    let close = got
        .iter()
        .zip(want)
        .all(|(g, w)| (g - f32::from(w)).abs() < 40.0);
    assert!(close, "region {from:?}-{to:?} is {got:?}, want {want:?}");
}

fn watermark_file(dir: &tempfile::TempDir) -> String {
    // 20x20: its top-left 10x10 black, the rest transparent.
    let mark = RgbaImage::from_fn(20, 20, |x, y| {
        if x < 10 && y < 10 {
            Rgba([0, 0, 0, 255])
        } else {
            Rgba([0, 0, 0, 0])
        }
    });
    let path = dir.path().join("mark.png");
    std::fs::write(&path, png_of(mark)).unwrap();
    path.display().to_string()
}

#[test]
fn every_filter_renders_the_size_its_geometry_says() {
    let dir = tempfile::tempdir().unwrap();
    let mark = watermark_file(&dir);
    let filters = [
        r#"{ thumbnail = { size = [50, 50], mode = "inset" } }"#.to_string(),
        r#"{ thumbnail = { size = [50, 50] } }"#.into(),
        r#"{ thumbnail = { size = [0, 40], mode = "inset", allow_upscale = true } }"#.into(),
        r#"{ fixed = { width = 60, height = 40 } }"#.into(),
        r#"{ resize = { size = [33, 77] } }"#.into(),
        r#"{ relative_resize = { heighten = 45 } }"#.into(),
        r#"{ relative_resize = { widen = 45 } }"#.into(),
        r#"{ relative_resize = { increase = 7 } }"#.into(),
        r#"{ relative_resize = { scale = 0.3 } }"#.into(),
        r#"{ scale = { dim = [70, 70] } }"#.into(),
        r#"{ scale = { to = 1.5 } }"#.into(),
        r#"{ downscale = { max = [40, 40] } }"#.into(),
        r#"{ downscale = { by = 0.25 } }"#.into(),
        r#"{ upscale = { min = [100, 100] } }"#.into(),
        r#"{ upscale = { by = 0.2 } }"#.into(),
        r#"{ crop = { start = [5, 5], size = [40, 200] } }"#.into(),
        r##"{ background = { color = "#00f", size = [130, 130], position = "top" } }"##.into(),
        r#"{ background = { transparency = 50 } }"#.into(),
        format!(
            r#"{{ watermark_image = {{ image = "{mark}", size = 0.5, position = "right" }} }}"#
        ),
        r#"{ rotate = { angle = 90 } }"#.into(),
        r#"{ rotate = { angle = 30 } }"#.into(),
        r#"{ flip = { axis = "y" } }"#.into(),
        r#"{ grayscale = {} }"#.into(),
        r#"{ strip = {} }"#.into(),
        r#"{ interlace = { mode = "plane" } }"#.into(),
        r#"{ auto_rotate = {} }"#.into(),
    ];
    for source in [(120, 90), (90, 120), (80, 80), (30, 15)] {
        let bytes = quadrants(source.0, source.1);
        for filter in &filters {
            let preset = preset(&format!("format = \"png\"\nfilters = [{filter}]"));
            let image = run(&bytes, &preset);
            assert_eq!(
                (image.width(), image.height()),
                preset.output_size(source.0, source.1, false),
                "{filter} on {source:?}"
            );
        }
    }
    // A chain, on a JPEG shrunk on load: thumbnail, then a canvas round it.
    let chain = preset(
        r##"filters = [
            { thumbnail = { size = [100, 100], mode = "inset" } },
            { background = { color = "#000", size = [120, 120] } },
            { rotate = { angle = 270 } },
        ]"##,
    );
    let image = run(&halves_jpeg(1600, 800), &chain);
    assert_eq!((image.width(), image.height()), (120, 120));
}

#[test]
fn crops_take_the_region_asked_for() {
    let source = quadrants(200, 100);
    let top_right = preset("filters = [{ crop = { start = [100, 0], size = [100, 50] } }]");
    assert_colour(&run(&source, &top_right), (0, 0), (100, 50), GREEN);
    // Outbound keeps the centre: of red | green | blue thirds, green.
    let thirds = png_of(RgbaImage::from_fn(300, 100, |x, _| {
        let [r, g, b] = [RED, GREEN, BLUE][(x / 100) as usize];
        Rgba([r, g, b, 255])
    }));
    let square = preset("filters = [{ thumbnail = { size = [50, 50] } }]");
    let image = run(&thirds, &square);
    assert_eq!((image.width(), image.height()), (50, 50));
    assert_colour(&image, (5, 5), (45, 45), GREEN);
    // fixed covers then crops the centre too.
    let fixed = preset("filters = [{ fixed = { width = 40, height = 40 } }]");
    assert_colour(&run(&thirds, &fixed), (5, 5), (35, 35), GREEN);
}

#[test]
fn a_background_canvas_puts_the_image_at_its_position() {
    let red = solid(40, 40, RED);
    for (position, inside, corner) in [
        ("topleft", (0, 0), (190, 90)),
        ("center", (80, 30), (0, 0)),
        ("bottomright", (160, 60), (0, 0)),
        ("bottom", (80, 60), (0, 0)),
        ("right", (160, 30), (0, 0)),
    ] {
        let preset = preset(&format!(
            "format = \"png\"\nfilters = [{{ background = {{ color = \"#0000ff\", size = [200, 100], position = \"{position}\" }} }}]"
        ));
        let image = run(&red, &preset);
        assert_eq!((image.width(), image.height()), (200, 100));
        let (x, y) = inside;
        assert_colour(&image, (x + 2, y + 2), (x + 38, y + 38), RED);
        let (cx, cy) = corner;
        assert_colour(&image, (cx, cy), (cx + 10, cy + 10), [0, 0, 255]);
    }
    // Without a size, only transparency is filled.
    let clear = png_of(RgbaImage::from_pixel(10, 10, Rgba([0, 0, 0, 0])));
    let fill = preset(
        r##"format = "png"
filters = [{ background = { color = "#ff0" } }]"##,
    );
    assert_colour(&run(&clear, &fill), (0, 0), (10, 10), [255, 255, 0]);
}

#[test]
fn watermarks_land_where_liip_puts_them() {
    let dir = tempfile::tempdir().unwrap();
    let mark = watermark_file(&dir);
    let white = solid(200, 100, WHITE);
    let with = |options: &str| {
        preset(&format!(
            "format = \"png\"\nfilters = [{{ watermark_image = {{ image = \"{mark}\", {options} }} }}]"
        ))
    };
    // The mark's black square is its top-left quarter.
    let image = run(&white, &with(r#"position = "bottomright""#));
    assert_colour(&image, (181, 81), (189, 89), BLACK);
    assert_colour(&image, (0, 0), (20, 20), WHITE);
    assert_colour(&image, (191, 91), (200, 100), WHITE);
    let image = run(&white, &with(r#"position = "topleft""#));
    assert_colour(&image, (1, 1), (9, 9), BLACK);
    let image = run(&white, &with(r#"position = "center""#));
    assert_colour(&image, (91, 41), (99, 49), BLACK);
    // Tiled every 20 pixels from the top left.
    let image = run(&white, &with(r#"position = "multiple""#));
    for (x, y) in [(0, 0), (40, 20), (180, 80)] {
        assert_colour(&image, (x + 1, y + 1), (x + 9, y + 9), BLACK);
        assert_colour(&image, (x + 11, y + 11), (x + 19, y + 19), WHITE);
    }
    // 50 % of the limiting side: 0.5 × min(200/20, 100/20) → 50x50.
    let image = run(&white, &with(r#"size = "50%", position = "bottomright""#));
    assert_colour(&image, (152, 52), (173, 73), BLACK);
    assert_colour(&image, (178, 78), (200, 100), WHITE);
}

#[test]
fn turns_flips_and_grey_move_the_colours() {
    let source = quadrants(200, 100);
    // Clockwise: the top-left (red) goes to the top right.
    let image = run(&source, &preset("filters = [{ rotate = { angle = 90 } }]"));
    assert_eq!((image.width(), image.height()), (100, 200));
    assert_colour(&image, (60, 10), (90, 90), RED);
    assert_colour(&image, (10, 110), (40, 190), YELLOW);
    let image = run(&source, &preset(r#"filters = [{ flip = { axis = "x" } }]"#));
    assert_colour(&image, (10, 10), (90, 40), GREEN);
    let image = run(
        &source,
        &preset(r#"filters = [{ flip = { axis = "vertical" } }]"#),
    );
    assert_colour(&image, (10, 10), (90, 40), BLUE);
    let image = run(&source, &preset("filters = [{ grayscale = {} }]"));
    for pixel in image.to_rgb8().pixels() {
        let [r, g, b] = pixel.0;
        assert!(r.abs_diff(g) <= 2 && g.abs_diff(b) <= 2, "{:?}", pixel.0);
    }
}

#[test]
fn exif_orientation_comes_first_unless_liips_literal_layout_is_asked_for() {
    // Stored 800x400, left red; orientation 6 shows it 400x800, red on top.
    let turned = with_exif_orientation(&halves_jpeg(800, 400), 6);
    let thumb = r#"{ thumbnail = { size = [100, 100], mode = "inset" } }"#;
    let upright = preset(&format!("filters = [{thumb}]"));
    let image = run(&turned, &upright);
    assert_eq!((image.width(), image.height()), (50, 100));
    assert_colour(&image, (5, 5), (45, 40), RED);

    let literal = |filters: &str| Preset {
        liip_literal: true,
        ..preset(&format!("filters = [{filters}]"))
    };
    // Liip without auto_rotate: sideways, as SAIS's thumbnails came out.
    let image = run(&turned, &literal(thumb));
    assert_eq!((image.width(), image.height()), (100, 50));
    assert_colour(&image, (5, 5), (40, 45), RED);
    // auto_rotate first turns it.
    let image = run(
        &turned,
        &literal(&format!("{{ auto_rotate = {{}} }}, {thumb}")),
    );
    assert_eq!((image.width(), image.height()), (50, 100));
    assert_colour(&image, (5, 5), (45, 40), RED);
    // After a thumbnail the EXIF is gone (Imagine strips it): no turn.
    let image = run(
        &turned,
        &literal(&format!("{thumb}, {{ auto_rotate = {{}} }}")),
    );
    assert_eq!((image.width(), image.height()), (100, 50));
    assert_eq!(
        literal(&format!("{thumb}, {{ auto_rotate = {{}} }}")).output_size(800, 400, true),
        (100, 50)
    );
}

#[test]
fn encoding_settings_reach_the_encoders() {
    let noisy = png_of(RgbaImage::from_fn(64, 48, |x, y| {
        let v = ((x * 37 + y * 91) % 256) as u8;
        Rgba([v, v.wrapping_mul(3), 255 - v, 255])
    }));
    // Lossless WebP gives back the very pixels.
    let lossless = preset("format = \"webp\"\nwebp_lossless = true");
    let (out, image) = rendered(&noisy, &lossless);
    assert_eq!(out.format, ImageFormat::WebP);
    assert!(out.bytes.windows(4).any(|w| w == b"VP8L"), "lossless chunk");
    assert_eq!(
        image.to_rgb8(),
        image::load_from_memory(&noisy).unwrap().to_rgb8()
    );
    let lossy = preset("format = \"webp\"\nquality = 50");
    assert!(rendered(&noisy, &lossy)
        .0
        .bytes
        .windows(4)
        .any(|w| w == b"VP8 "));

    // webp_method reaches libwebp: absent is libwebp's own default, 4.
    let webp = |extra: &str| {
        rendered(
            &noisy,
            &preset(&format!("format = \"webp\"\nquality = 80\n{extra}")),
        )
        .0
        .bytes
    };
    let default_method = webp("");
    assert_eq!(default_method, webp("webp_method = 4"));
    assert_ne!(default_method, webp("webp_method = 0"));
    assert_ne!(default_method, webp("webp_method = 6"));
    let err = FilterSet::from_toml("[p]\nformat = \"webp\"\nwebp_method = 7")
        .unwrap_err()
        .to_string();
    assert!(err.contains("webp_method must be 0-6"), "{err}");

    // jpeg_quality wins over quality; interlace makes a progressive JPEG.
    let jpeg = |extra: &str| {
        rendered(
            &noisy,
            &preset(&format!("format = \"jpeg\"\nquality = 95\n{extra}")),
        )
        .0
        .bytes
    };
    assert!(jpeg("jpeg_quality = 20").len() < jpeg("").len());
    let has_marker = |bytes: &[u8], marker: u8| bytes.windows(2).any(|w| w == [0xff, marker]);
    assert!(
        has_marker(&jpeg("filters = [{ interlace = {} }]"), 0xc2),
        "SOF2"
    );
    assert!(!has_marker(&jpeg(""), 0xc2));

    // PNG level 0 is stored, 9 is compressed.
    let png = |level: u8| {
        rendered(
            &noisy,
            &preset(&format!(
                "format = \"png\"\npng_compression_level = {level}"
            )),
        )
        .0
        .bytes
        .len()
    };
    assert!(png(0) > png(9), "{} vs {}", png(0), png(9));
}

fn animated_gif(frames: &[[u8; 3]]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        encoder
            .set_repeat(image::codecs::gif::Repeat::Infinite)
            .unwrap();
        for [r, g, b] in frames {
            let frame = RgbaImage::from_pixel(40, 30, Rgba([*r, *g, *b, 255]));
            encoder
                .encode_frame(image::Frame::from_parts(
                    frame,
                    0,
                    0,
                    image::Delay::from_numer_denom_ms(100, 1),
                ))
                .unwrap();
        }
    }
    out
}

fn frames_of(gif: &[u8]) -> Vec<image::Frame> {
    image::codecs::gif::GifDecoder::new(Cursor::new(gif))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap()
}

#[test]
fn gifs_keep_their_animation_within_the_frame_limits() {
    let gif = animated_gif(&[RED, GREEN, BLUE]);
    let animated = preset(
        "format = \"gif\"\nanimated = true\nfilters = [{ thumbnail = { size = [20, 20], mode = \"inset\" } }]",
    );
    let (out, _) = rendered(&gif, &animated);
    assert_eq!(out.format, ImageFormat::Gif);
    let frames = frames_of(&out.bytes);
    assert_eq!(frames.len(), 3);
    for (frame, colour) in frames.iter().zip([RED, GREEN, BLUE]) {
        assert_eq!(frame.buffer().dimensions(), (20, 15));
        let image = DynamicImage::ImageRgba8(frame.buffer().clone());
        assert_colour(&image, (2, 2), (18, 13), colour);
        assert_eq!(frame.delay().numer_denom_ms(), (100, 1));
    }
    // Not animated: the first frame only.
    let still = preset(
        "format = \"gif\"\nfilters = [{ thumbnail = { size = [20, 20], mode = \"inset\" } }]",
    );
    let frames = frames_of(&rendered(&gif, &still).0.bytes);
    assert_eq!(frames.len(), 1);
    // Over the frame limit: the first frame only, rendered all the same.
    let decoded = decode_for(
        &gif,
        super::Limits {
            max_animation_frames: 2,
            ..limits()
        },
        std::slice::from_ref(&animated),
    )
    .unwrap();
    assert!(decoded.animation.is_none());
    let out = render(&decoded, &animated).unwrap();
    assert_eq!(frames_of(&out.bytes).len(), 1);
}

#[test]
fn a_chain_over_the_output_limit_fails_before_allocating() {
    let huge = preset("filters = [{ upscale = { by = 100.0 } }]");
    let decoded = decode_for(&solid(100, 100, RED), limits(), std::slice::from_ref(&huge)).unwrap();
    let Err(err) = render(&decoded, &huge) else {
        panic!("a 10000x10000 variant rendered");
    };
    assert_eq!(err.code(), "image-too-large", "{err}");
}
