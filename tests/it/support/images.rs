//! In-memory image generators and image assertion helpers (format by magic
//! bytes, decode, mean colour of a region). Tests compare images by these
//! properties, never by byte equality.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, GenericImageView, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

/// JPEG quality used by every generator.
const JPEG_QUALITY: u8 = 90;

/// A photo-like JPEG: `rgb` plus a small diagonal gradient (up to +32 per
/// channel, saturating), quality 90.
pub fn jpeg(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        let step = (x * 16 / w.max(1) + y * 16 / h.max(1)) as u8;
        Rgb(rgb.map(|c| c.saturating_add(step)))
    });
    encode_jpeg(&img)
}

/// A solid-colour RGBA PNG.
pub fn png_rgba(w: u32, h: u32, rgba: [u8; 4]) -> Vec<u8> {
    encode(
        DynamicImage::ImageRgba8(RgbaImage::from_pixel(w, h, Rgba(rgba))),
        ImageFormat::Png,
    )
}

/// An RGBA PNG of random-looking pixels: it does not compress, so its
/// variants stay about as large as their pixels.
pub fn png_noise(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let img = RgbaImage::from_fn(w, h, |_, _| {
        // xorshift64: a fixed sequence, so every run stores the same image.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let [r, g, b, ..] = state.to_le_bytes();
        Rgba([r, g, b, 255])
    });
    encode(DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

/// A solid-colour single-frame GIF.
pub fn gif(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let [r, g, b] = rgb;
    encode(
        DynamicImage::ImageRgba8(RgbaImage::from_pixel(w, h, Rgba([r, g, b, 255]))),
        ImageFormat::Gif,
    )
}

/// A solid-colour lossless WebP.
pub fn webp_lossless(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    encode(
        DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, Rgb(rgb))),
        ImageFormat::WebP,
    )
}

/// A `w`x`h` JPEG, left half pure red and right half pure blue as stored,
/// with an EXIF APP1 segment right after SOI whose Orientation tag (0x0112)
/// is `orientation` (1..=8). Decoded without applying the tag, the left half
/// is red; after applying e.g. 3 (rotate 180) the left half is blue.
pub fn jpeg_with_orientation(w: u32, h: u32, orientation: u16) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let jpeg = encode_jpeg(&img);
    assert_eq!(jpeg[..2], [0xFF, 0xD8], "encoder output starts with SOI");
    let mut out = Vec::with_capacity(jpeg.len() + 64);
    out.extend_from_slice(&jpeg[..2]);
    out.extend_from_slice(&exif_app1(orientation));
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// An APP1 segment: "Exif\0\0" + a big-endian TIFF header + IFD0 holding
/// only Orientation (SHORT, count 1).
fn exif_app1(orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\x00\x2A"); // big endian, TIFF magic 42
    tiff.extend_from_slice(&8u32.to_be_bytes()); // IFD0 right after the header
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // tag: Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // type: SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&orientation.to_be_bytes()); // value, left-justified
    tiff.extend_from_slice(&[0, 0]); // padding of the 4-byte value field
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD

    let payload_len = 6 + tiff.len();
    let segment_len = u16::try_from(payload_len + 2).expect("APP1 fits a segment");
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend_from_slice(&segment_len.to_be_bytes());
    app1.extend_from_slice(b"Exif\x00\x00");
    app1.extend_from_slice(&tiff);
    app1
}

fn encode_jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode_image(img)
        .expect("encode JPEG");
    out
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)
        .unwrap_or_else(|e| panic!("encode {format:?}: {e}"));
    out.into_inner()
}

/// Decodes any supported format (guessed from content); panics with the
/// detected format and size on failure.
pub fn decode(bytes: &[u8]) -> DynamicImage {
    image::load_from_memory(bytes).unwrap_or_else(|e| {
        panic!(
            "decode {} bytes (format {}): {e}",
            bytes.len(),
            format_of(bytes)
        )
    })
}

/// Width and height of an encoded image.
pub fn dimensions(bytes: &[u8]) -> (u32, u32) {
    decode(bytes).dimensions()
}

/// `"jpeg"`, `"png"`, `"webp"`, `"gif"` from magic bytes, else `"unknown"`.
pub fn format_of(bytes: &[u8]) -> &'static str {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => "jpeg",
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => "png",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "webp",
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => "gif",
        [_, _, _, _, b'f', b't', b'y', b'p', b'a', b'v', b'i', b'f', ..] => "avif",
        _ => "unknown",
    }
}

/// Mean RGB (alpha ignored) over the half-open rectangle
/// `[x0, x1) x [y0, y1)`, clamped to the image; panics when it is empty.
pub fn mean_rgb(img: &DynamicImage, x0: u32, y0: u32, x1: u32, y1: u32) -> [f32; 3] {
    let (w, h) = img.dimensions();
    let (x1, y1) = (x1.min(w), y1.min(h));
    assert!(
        x0 < x1 && y0 < y1,
        "mean_rgb: empty region ({x0},{y0})..({x1},{y1}) in a {w}x{h} image"
    );
    let mut sum = [0f64; 3];
    for y in y0..y1 {
        for x in x0..x1 {
            let Rgba([r, g, b, _]) = img.get_pixel(x, y);
            sum[0] += f64::from(r);
            sum[1] += f64::from(g);
            sum[2] += f64::from(b);
        }
    }
    let n = f64::from(x1 - x0) * f64::from(y1 - y0);
    sum.map(|s| (s / n) as f32)
}

/// A PNG of a few dozen bytes whose header claims `w` x `h` pixels: a
/// decompression bomb for any decoder that trusts the header.
pub fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    // An empty zlib stream: the pixels a decoder would have to allocate never come.
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
