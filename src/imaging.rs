//! Pixels: sniff, decode with limits checked from the header before the
//! full decode allocates, EXIF orientation, resize (`fast_image_resize`),
//! encode, BlurHash. Synchronous and I/O-free: callers run it on the
//! blocking pool.

use std::io::Cursor;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::config::ImagingConfig;
use crate::error::{Error, Result};
use crate::filter::{OutputFormat, Preset};

/// Decoder limits, from `[imaging]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
    pub max_alloc_bytes: u64,
}

impl From<&ImagingConfig> for Limits {
    fn from(c: &ImagingConfig) -> Self {
        Limits {
            max_width: c.max_width,
            max_height: c.max_height,
            max_pixels: c.max_pixels,
            max_alloc_bytes: c.max_alloc_bytes,
        }
    }
}

/// The formats kiln decodes, by magic bytes. Anything else is refused.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    match image::guess_format(bytes).ok()? {
        f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP) => {
            Some(f)
        }
        _ => None,
    }
}

pub fn mime_of(format: ImageFormat) -> &'static str {
    format.to_mime_type()
}

/// The MIME type of stored bytes, from their magic.
pub fn sniff_mime(bytes: &[u8]) -> &'static str {
    sniff(bytes).map_or("application/octet-stream", mime_of)
}

/// A decoded, upright source.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    pub format: ImageFormat,
}

impl Decoded {
    pub fn width(&self) -> u32 {
        self.image.width()
    }

    pub fn height(&self) -> u32 {
        self.image.height()
    }
}

pub fn decode(bytes: &[u8], limits: Limits) -> Result<Decoded> {
    let format = sniff(bytes)
        .ok_or_else(|| Error::UnsupportedImage("not a JPEG, PNG, GIF or WebP image".into()))?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a cut-off scan with grey instead of failing.
        return Err(Error::DecodeFailed(
            "truncated JPEG: no end of image after the scan".into(),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::DecodeFailed("image has no pixels".into()));
    }
    if width > limits.max_width
        || height > limits.max_height
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(Error::ImageTooLarge(format!(
            "{width}x{height} exceeds {}x{} or {} pixels",
            limits.max_width, limits.max_height, limits.max_pixels
        )));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    // Resizing and encoding work on 8-bit RGB(A); other layouts convert once here.
    let image = if image.color().has_alpha() {
        match image {
            DynamicImage::ImageRgba8(_) => image,
            other => DynamicImage::ImageRgba8(other.to_rgba8()),
        }
    } else {
        match image {
            DynamicImage::ImageRgb8(_) => image,
            other => DynamicImage::ImageRgb8(other.to_rgb8()),
        }
    };
    Ok(Decoded { image, format })
}

/// Whether a JPEG's first scan is followed by an end-of-image marker.
/// Walks the header segments by their lengths, so a thumbnail embedded in
/// EXIF (which has its own scan and EOI) cannot stand in for the image's.
/// Inside entropy-coded data 0xFF is always stuffed, so FF D9 there is EOI.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut at = 2; // after SOI
    loop {
        // Markers may be padded with extra 0xFF bytes.
        while bytes.get(at) == Some(&0xff) && bytes.get(at + 1) == Some(&0xff) {
            at += 1;
        }
        let (Some(&0xff), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) else {
            return false;
        };
        if (0xd0..=0xd7).contains(&marker) || marker == 0x01 {
            at += 2; // no length
            continue;
        }
        let Some(len) = bytes
            .get(at + 2..at + 4)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        else {
            return false;
        };
        let next = at + 2 + len;
        if marker == 0xda {
            return bytes
                .get(next..)
                .is_some_and(|scan| scan.windows(2).any(|w| w == [0xff, 0xd9]));
        }
        if marker == 0xd9 || len < 2 {
            return false; // EOI before any scan, or a malformed length
        }
        at = next;
    }
}

fn decode_error(e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(l) => Error::ImageTooLarge(l.to_string()),
        image::ImageError::Unsupported(u) => Error::UnsupportedImage(u.to_string()),
        other => Error::DecodeFailed(other.to_string()),
    }
}

/// An encoded variant.
pub struct Rendered {
    pub bytes: Vec<u8>,
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// Resizes and encodes one preset from a decoded source.
pub fn render(source: &Decoded, preset: &Preset) -> Result<Rendered> {
    let plan = preset.plan(source.width(), source.height());
    let mut resized = DynamicImage::new(plan.width, plan.height, source.image.color());
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(
            f64::from(plan.crop.x),
            f64::from(plan.crop.y),
            f64::from(plan.crop.width),
            f64::from(plan.crop.height),
        );
    Resizer::new()
        .resize(&source.image, &mut resized, &options)
        .map_err(|e| Error::Internal(format!("resize: {e}")))?;
    let format = output_format(source.format, preset.format);
    let bytes = encode(&resized, format, preset.quality)?;
    Ok(Rendered {
        bytes,
        format,
        width: plan.width,
        height: plan.height,
    })
}

fn output_format(source: ImageFormat, wanted: OutputFormat) -> ImageFormat {
    match wanted {
        OutputFormat::Jpeg => ImageFormat::Jpeg,
        OutputFormat::Png => ImageFormat::Png,
        OutputFormat::Webp => ImageFormat::WebP,
        OutputFormat::Source => match source {
            ImageFormat::Jpeg => ImageFormat::Jpeg,
            ImageFormat::WebP => ImageFormat::WebP,
            _ => ImageFormat::Png,
        },
    }
}

fn encode(image: &DynamicImage, format: ImageFormat, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 * 1024);
    let result = match format {
        ImageFormat::Jpeg => {
            let rgb = flatten_on_white(image);
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(&rgb)
        }
        ImageFormat::WebP => image::codecs::webp::WebPEncoder::new_lossless(&mut out).encode(
            image.as_bytes(),
            image.width(),
            image.height(),
            image.color().into(),
        ),
        _ => image.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out)),
    };
    result.map_err(|e| Error::EncodeFailed(e.to_string()))?;
    Ok(out)
}

/// JPEG has no alpha: composite transparent pixels over white, not black.
fn flatten_on_white(image: &DynamicImage) -> DynamicImage {
    match image {
        DynamicImage::ImageRgba8(rgba) => {
            let mut rgb = image::RgbImage::new(rgba.width(), rgba.height());
            for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
                let [r, g, b, a] = px.0;
                let blend = |c: u8| {
                    ((u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a))) / 255) as u8
                };
                out.0 = [blend(r), blend(g), blend(b)];
            }
            DynamicImage::ImageRgb8(rgb)
        }
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

/// The two previews a record carries: BlurHash, and ThumbHash (what SAIS
/// sends as `blur`) as unpadded standard base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previews {
    pub blurhash: String,
    pub thumbhash: String,
}

/// Both previews from one small box-filtered copy (ThumbHash takes at most 100x100).
pub fn previews(source: &Decoded) -> Result<Previews> {
    const SIDE: u32 = 64;
    let (w, h) = (source.width(), source.height());
    let scale = (f64::from(SIDE) / f64::from(w.max(h))).min(1.0);
    let tw = ((f64::from(w) * scale).round() as u32).max(1);
    let th = ((f64::from(h) * scale).round() as u32).max(1);
    let mut small = DynamicImage::new(tw, th, source.image.color());
    Resizer::new()
        .resize(
            &source.image,
            &mut small,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Box)),
        )
        .map_err(|e| Error::Internal(format!("resize: {e}")))?;
    let rgba = small.to_rgba8();
    // More components along the longer side keep the preview's shape.
    let (cx, cy) = if w >= h { (4, 3) } else { (3, 4) };
    let blurhash = blurhash::encode(cx, cy, tw, th, rgba.as_raw())
        .map_err(|e| Error::Internal(format!("blurhash: {e}")))?;
    let thumbhash = thumbhash::rgba_to_thumb_hash(tw as usize, th as usize, rgba.as_raw());
    use base64::Engine as _;
    Ok(Previews {
        blurhash,
        thumbhash: base64::engine::general_purpose::STANDARD_NO_PAD.encode(thumbhash),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_jpeg_is_complete_only_with_an_end_after_its_own_scan() {
        // An EXIF thumbnail (its own scan and EOI) inside APP1 must not count.
        let thumbnail = [0xff, 0xd8, 0xff, 0xda, 0x00, 0x02, 0x11, 0xff, 0xd9];
        let mut app1 = vec![0xff, 0xe1];
        app1.extend_from_slice(&((thumbnail.len() + 2) as u16).to_be_bytes());
        app1.extend_from_slice(&thumbnail);
        let scan = [0xff, 0xda, 0x00, 0x02, 0x12, 0xff, 0x00, 0x34];
        let cut = [[0xff, 0xd8].as_slice(), &app1, &scan].concat();
        assert!(!jpeg_is_complete(&cut));
        let whole = [cut.as_slice(), &[0xff, 0xd9]].concat();
        assert!(jpeg_is_complete(&whole));
        assert!(!jpeg_is_complete(&[0xff, 0xd8]));
        assert!(!jpeg_is_complete(&[0xff, 0xd8, 0xff, 0xe0, 0x00]));
    }

    use super::*;
    use crate::filter::Mode;

    fn limits() -> Limits {
        Limits {
            max_width: 10_000,
            max_height: 10_000,
            max_pixels: 10_000_000,
            max_alloc_bytes: 512 << 20,
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_pixel(w, h, image::Rgba([10, 200, 30, 255]));
        let mut out = Vec::new();
        DynamicImage::ImageRgba8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn decodes_renders_and_hashes() {
        let source = decode(&png(400, 200), limits()).unwrap();
        let preset = Preset {
            name: "p".into(),
            mode: Mode::Inset,
            width: 100,
            height: 100,
            upscale: false,
            quality: 80,
            format: OutputFormat::Jpeg,
        };
        let out = render(&source, &preset).unwrap();
        assert_eq!(
            (out.width, out.height, out.format),
            (100, 50, ImageFormat::Jpeg)
        );
        let back = image::load_from_memory(&out.bytes).unwrap();
        assert_eq!((back.width(), back.height()), (100, 50));
        let px = back.to_rgb8().get_pixel(50, 25).0;
        assert!(px[1] > 150 && px[0] < 60, "{px:?}");
        let previews = previews(&source).unwrap();
        assert_eq!(previews.blurhash.len(), 4 + 2 * (4 * 3));
        // The ThumbHash decodes back to the source's aspect ratio and colour.
        use base64::Engine as _;
        let hash = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&previews.thumbhash)
            .unwrap();
        assert!(!previews.thumbhash.ends_with('='));
        let ratio = thumbhash::thumb_hash_to_approximate_aspect_ratio(&hash).unwrap();
        assert!((ratio - 2.0).abs() < 0.3, "{ratio}");
        let (r, g, b, _) = thumbhash::thumb_hash_to_average_rgba(&hash).unwrap();
        assert!(g > 0.5 && r < 0.3 && b < 0.3, "{r} {g} {b}");
    }

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            300,
            100,
            image::Rgb([200, 30, 30]),
        ));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    #[test]
    fn every_input_format_renders_to_its_output_format() {
        let preset = |format| Preset {
            name: "p".into(),
            mode: Mode::Outbound,
            width: 50,
            height: 50,
            upscale: false,
            quality: 80,
            format,
        };
        for (input, wanted, expected) in [
            (ImageFormat::Gif, OutputFormat::Source, ImageFormat::Png),
            (ImageFormat::WebP, OutputFormat::Source, ImageFormat::WebP),
            (ImageFormat::Png, OutputFormat::Webp, ImageFormat::WebP),
            (ImageFormat::Jpeg, OutputFormat::Png, ImageFormat::Png),
        ] {
            let source = decode(&encoded(input), limits()).unwrap();
            let out = render(&source, &preset(wanted)).unwrap();
            assert_eq!(
                image::guess_format(&out.bytes).unwrap(),
                expected,
                "{input:?}"
            );
            let back = image::load_from_memory(&out.bytes).unwrap();
            assert_eq!((back.width(), back.height()), (50, 50), "{input:?}");
            let px = back.to_rgb8().get_pixel(25, 25).0;
            assert!(px[0] > 150 && px[1] < 80, "{input:?} colour {px:?}");
        }
    }

    #[test]
    fn refuses_what_it_must() {
        assert_eq!(
            decode(b"<svg></svg>", limits()).unwrap_err().code(),
            "unsupported-image"
        );
        let mut small = limits();
        small.max_pixels = 1000;
        assert_eq!(
            decode(&png(100, 100), small).unwrap_err().code(),
            "image-too-large"
        );
        let truncated = &png(100, 100)[..60];
        assert!(decode(truncated, limits()).is_err());
    }
}
