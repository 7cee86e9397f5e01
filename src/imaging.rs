//! Pixels: sniff, decode with limits checked from the header before the
//! full decode allocates, shrink-on-load for JPEG (libjpeg-turbo's DCT
//! scaling, or at 1/8 `jpeg_dc`'s DC-only read), EXIF orientation,
//! resize (`fast_image_resize`), encode (libjpeg-turbo, libwebp, `image`'s
//! PNG), BlurHash. Synchronous and I/O-free: callers run it on their own
//! threads (the worker on its render pool).

use std::io::Cursor;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions};
use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::config::ImagingConfig;
use crate::error::{Error, Result};
use crate::filter::{Encoding, OutputFormat, Preset};

mod jpeg_dc;
mod ops;
mod scratch;

#[cfg(test)]
mod chain_tests;

/// Decoder limits, from `[imaging]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
    pub max_alloc_bytes: u64,
    pub max_jpeg_scans: u32,
    pub max_output_pixels: u64,
    pub max_animation_frames: u32,
    pub max_animation_pixels: u64,
}

impl From<&ImagingConfig> for Limits {
    fn from(c: &ImagingConfig) -> Self {
        Limits {
            max_width: c.max_width,
            max_height: c.max_height,
            max_pixels: c.max_pixels,
            max_alloc_bytes: c.max_alloc_bytes,
            max_jpeg_scans: c.max_jpeg_scans,
            max_output_pixels: c.max_output_pixels,
            max_animation_frames: c.max_animation_frames,
            max_animation_pixels: c.max_animation_pixels,
        }
    }
}

impl Limits {
    /// The `image` crate's decoder limits: its allocations (every frame of
    /// an animation too) stay within ours.
    fn for_decoder(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(self.max_width);
        limits.max_image_height = Some(self.max_height);
        limits.max_alloc = Some(self.max_alloc_bytes);
        limits
    }

    fn check_size(&self, width: u32, height: u32) -> Result<()> {
        if width == 0 || height == 0 {
            return Err(Error::DecodeFailed("image has no pixels".into()));
        }
        if width > self.max_width
            || height > self.max_height
            || u64::from(width) * u64::from(height) > self.max_pixels
        {
            return Err(Error::ImageTooLarge(format!(
                "{width}x{height} exceeds {}x{} or {} pixels",
                self.max_width, self.max_height, self.max_pixels
            )));
        }
        Ok(())
    }
}

/// Shrink-on-load stops while the decoded image is still this many times
/// the largest output. libvips and Pillow shrink right down to the output
/// (measured in `benches/render_vs_libvips`); so does kiln: a larger
/// factor doubles decode time and memory for a sharper-looking DCT average
/// the final Lanczos pass barely changes.
const SHRINK_ON_LOAD_HEADROOM: f64 = 1.0;

/// The side the previews are computed at (ThumbHash takes at most 100x100).
const PREVIEW_SIDE: u32 = 64;

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

/// A decoded, upright source. Its pixels may be smaller than the original
/// (shrink-on-load); `width()` and `height()` are always the original's
/// upright size, which plans and records use.
pub struct Decoded {
    pub image: DynamicImage,
    pub format: ImageFormat,
    width: u32,
    height: u32,
    /// The EXIF orientation decoding applied (Liip's literal layout undoes it).
    pub orientation: Orientation,
    /// Every frame of an animated GIF, when a preset keeps animations and
    /// the animation is within the frame limits.
    pub animation: Option<Vec<image::Frame>>,
    limits: Limits,
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded")
            .field("format", &self.format)
            .field("size", &(self.width, self.height))
            .field("pixels", &(self.image.width(), self.image.height()))
            .field("orientation", &self.orientation)
            .field("frames", &self.animation.as_ref().map(Vec::len))
            .finish()
    }
}

/// The pixels go back to this thread's spares for the next job's decode.
impl Drop for Decoded {
    fn drop(&mut self) {
        scratch::recycle(std::mem::replace(
            &mut self.image,
            DynamicImage::new_rgb8(0, 0),
        ));
    }
}

impl Decoded {
    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    fn full(
        image: DynamicImage,
        format: ImageFormat,
        orientation: Orientation,
        limits: Limits,
    ) -> Decoded {
        Decoded {
            width: image.width(),
            height: image.height(),
            image,
            format,
            orientation,
            animation: None,
            limits,
        }
    }
}

/// Decodes at full size.
pub fn decode(bytes: &[u8], limits: Limits) -> Result<Decoded> {
    decode_scaled(bytes, limits, |_, _| 1.0)
}

/// Decodes once for every preset of a job and its previews: a JPEG is
/// shrunk on load by the largest DCT factor (1/2, 1/4, 1/8) that still
/// leaves every preset's crop [`SHRINK_ON_LOAD_HEADROOM`] times its output.
/// A still WebP is scaled by libwebp while it decodes, to the same need;
/// other formats decode at full size.
pub fn decode_for(bytes: &[u8], limits: Limits, presets: &[Preset]) -> Result<Decoded> {
    let needed = |preset: &Preset, width: u32, height: u32| match preset.first_plan(width, height) {
        Some(plan) => {
            let x = f64::from(plan.width) / f64::from(plan.crop.width);
            let y = f64::from(plan.height) / f64::from(plan.crop.height);
            x.max(y) * SHRINK_ON_LOAD_HEADROOM
        }
        // The chain starts with a step that needs every pixel.
        None => 1.0,
    };
    let mut decoded = decode_scaled(bytes, limits, |width, height| {
        // Previews are box-filtered: they need no headroom.
        let previews = f64::from(PREVIEW_SIDE) / f64::from(width.max(height));
        presets
            .iter()
            .map(|preset| {
                let upright = needed(preset, width, height);
                // Liip's literal layout may see the stored, turned size.
                if preset.liip_literal {
                    upright.max(needed(preset, height, width))
                } else {
                    upright
                }
            })
            .fold(previews, f64::max)
    })?;
    let keeps_animation = presets.iter().any(|preset| {
        preset.encoding.animated && output_format(decoded.format, preset.format) == ImageFormat::Gif
    });
    if decoded.format == ImageFormat::Gif && keeps_animation {
        decoded.animation = gif_frames(bytes, limits)?;
    }
    Ok(decoded)
}

/// Every frame of a GIF (composited on its canvas), or `None` when it has
/// one frame, more than the limits allow, or a frame that cannot be read
/// (its first frame, already decoded, is used).
fn gif_frames(bytes: &[u8], limits: Limits) -> Result<Option<Vec<image::Frame>>> {
    use image::{AnimationDecoder as _, ImageDecoder as _};
    let mut decoder = GifDecoder::new(Cursor::new(bytes)).map_err(decode_error)?;
    // Without them, a frame claiming more than its screen is allocated whole.
    decoder
        .set_limits(limits.for_decoder())
        .map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    let frame_pixels = u64::from(width) * u64::from(height);
    let mut frames = Vec::new();
    for frame in decoder.into_frames() {
        match frame {
            Ok(frame) => frames.push(frame),
            Err(e) => {
                tracing::info!(error = %e, "an animation frame cannot be read: first frame only");
                return Ok(None);
            }
        }
        let total = frame_pixels * frames.len() as u64;
        if frames.len() as u64 > u64::from(limits.max_animation_frames)
            || total > limits.max_animation_pixels
        {
            tracing::info!(
                frames = frames.len(),
                "animation over imaging.max_animation_frames/pixels: first frame only"
            );
            return Ok(None);
        }
    }
    Ok((frames.len() > 1).then_some(frames))
}

/// `needed_scale(upright width, upright height)` is the smallest fraction of
/// the original the caller can work from.
fn decode_scaled(
    bytes: &[u8],
    limits: Limits,
    needed_scale: impl Fn(u32, u32) -> f64,
) -> Result<Decoded> {
    let format = sniff(bytes)
        .ok_or_else(|| Error::UnsupportedImage("not a JPEG, PNG, GIF or WebP image".into()))?;
    if format == ImageFormat::Jpeg {
        if !jpeg_is_complete(bytes) {
            // Decoders fill a cut-off scan with grey instead of failing.
            return Err(Error::DecodeFailed(
                "truncated JPEG: no end of image after the scan".into(),
            ));
        }
        if let Some(decoded) = decode_jpeg(bytes, limits, &needed_scale)? {
            return Ok(decoded);
        }
    }
    if format == ImageFormat::WebP {
        if let Some(decoded) = decode_webp(bytes, limits, &needed_scale)? {
            return Ok(decoded);
        }
    }
    decode_generic(bytes, format, limits)
}

/// libjpeg-turbo with DCT scaling. `None` for colour spaces it cannot turn
/// into RGB (CMYK, YCCK), which the generic decoder handles.
fn decode_jpeg(
    bytes: &[u8],
    limits: Limits,
    needed_scale: impl Fn(u32, u32) -> f64,
) -> Result<Option<Decoded>> {
    use turbojpeg::{Colorspace, Decompressor};
    let mut decompressor = Decompressor::new().map_err(|e| Error::Internal(e.to_string()))?;
    let header = decompressor.read_header(bytes).map_err(turbo_error)?;
    if matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK) {
        return Ok(None);
    }
    let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let (width, height) = (to_u32(header.width), to_u32(header.height));
    limits.check_size(width, height)?;
    if header.is_progressive || header.is_arithmetic {
        // Multi-scan JPEGs keep every DCT coefficient (2 bytes, up to three
        // full-size components) until the last scan.
        let coefficients = u64::from(width) * u64::from(height) * 6;
        if coefficients > limits.max_alloc_bytes {
            return Err(Error::ImageTooLarge(format!(
                "a progressive {width}x{height} JPEG needs {coefficients} bytes, over {}",
                limits.max_alloc_bytes
            )));
        }
        decompressor
            .set_scan_limit(limits.max_jpeg_scans)
            .map_err(turbo_error)?;
    }

    let orientation = jpeg_orientation(bytes);
    let (upright_w, upright_h) = if swaps_axes(orientation) {
        (height, width)
    } else {
        (width, height)
    };
    let needed = needed_scale(upright_w, upright_h);
    let denominator = [8, 4, 2]
        .into_iter()
        .find(|&d| 1.0 / f64::from(d) >= needed)
        .unwrap_or(1);
    let sequential = !header.is_progressive && !header.is_arithmetic;
    let dc_only = (denominator == 8 && sequential)
        .then(|| jpeg_dc::decode_eighth(bytes))
        .flatten();
    let rgb = match dc_only {
        Some(rgb) => rgb,
        None => turbo_rgb(&mut decompressor, &header, bytes, denominator as usize)?,
    };
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    Ok(Some(Decoded {
        image,
        format: ImageFormat::Jpeg,
        width: upright_w,
        height: upright_h,
        orientation,
        animation: None,
        limits,
    }))
}

fn turbo_error(e: turbojpeg::Error) -> Error {
    Error::DecodeFailed(format!("JPEG: {e}"))
}

/// libjpeg-turbo's decode to RGB at 1/`denominator` (1, 2, 4 or 8), within
/// the limits `decompressor` was given, into one of this thread's spare
/// buffers.
fn turbo_rgb(
    decompressor: &mut turbojpeg::Decompressor,
    header: &turbojpeg::DecompressHeader,
    bytes: &[u8],
    denominator: usize,
) -> Result<image::RgbImage> {
    use turbojpeg::{Image, PixelFormat, ScalingFactor};
    let scale = ScalingFactor::new(1, denominator);
    decompressor
        .set_scaling_factor(scale)
        .map_err(turbo_error)?;
    let scaled = header.scaled(scale);
    let mut pixels = scratch::zeroed(3 * scaled.width * scaled.height);
    decompressor
        .decompress(
            bytes,
            Image {
                pixels: pixels.as_mut_slice(),
                width: scaled.width,
                pitch: 3 * scaled.width,
                height: scaled.height,
                format: PixelFormat::RGB,
            },
        )
        .map_err(turbo_error)?;
    let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    image::RgbImage::from_raw(to_u32(scaled.width), to_u32(scaled.height), pixels)
        .ok_or_else(|| Error::Internal("decoded buffer size".into()))
}

/// libjpeg-turbo alone at 1/`denominator`, without EXIF orientation: the
/// reference kiln's DC-only 1/8 read is tested and benched against.
pub fn libjpeg_turbo_rgb(bytes: &[u8], denominator: usize) -> Result<image::RgbImage> {
    let mut decompressor =
        turbojpeg::Decompressor::new().map_err(|e| Error::Internal(e.to_string()))?;
    let header = decompressor.read_header(bytes).map_err(turbo_error)?;
    turbo_rgb(&mut decompressor, &header, bytes, denominator)
}

/// libwebp, scaled while decoding. `None` for animations, for files with
/// EXIF (whose orientation the generic decoder applies) and for headers
/// libwebp refuses.
#[allow(unsafe_code)]
fn decode_webp(
    bytes: &[u8],
    limits: Limits,
    needed_scale: impl Fn(u32, u32) -> f64,
) -> Result<Option<Decoded>> {
    use libwebp_sys::{
        VP8StatusCode, WebPDecode, WebPDecoderConfig, WebPFreeDecBuffer, WebPGetFeatures,
        WEBP_CSP_MODE,
    };
    // VP8X header: flags at byte 20, EXIF is bit 3.
    if bytes.get(12..16) == Some(b"VP8X") && bytes.get(20).is_some_and(|f| f & 0x08 != 0) {
        return Ok(None);
    }
    let mut config = WebPDecoderConfig::new()
        .map_err(|()| Error::Internal("libwebp: decoder config version".into()))?;
    // SAFETY: libwebp reads `bytes` within the given length and fills the
    // features struct, which `config` owns.
    let status = unsafe { WebPGetFeatures(bytes.as_ptr(), bytes.len(), &mut config.input) };
    // A header libwebp refuses goes to the generic decoder, which names the
    // fault (e.g. a canvas over the limits, not just "bitstream error").
    if status != VP8StatusCode::VP8_STATUS_OK || config.input.has_animation != 0 {
        return Ok(None);
    }
    let to_u32 = |v: i32| u32::try_from(v).unwrap_or(0);
    let (width, height) = (to_u32(config.input.width), to_u32(config.input.height));
    limits.check_size(width, height)?;
    let needed = needed_scale(width, height).min(1.0);
    let scaled = |side: u32| ((f64::from(side) * needed).ceil() as u32).clamp(1, side);
    let (out_w, out_h) = (scaled(width), scaled(height));
    let alpha = config.input.has_alpha != 0;
    let channels: u32 = if alpha { 4 } else { 3 };
    let mut pixels = scratch::zeroed((channels * out_w * out_h) as usize);
    if (out_w, out_h) != (width, height) {
        config.options.use_scaling = 1;
        config.options.scaled_width = out_w as i32;
        config.options.scaled_height = out_h as i32;
    }
    config.output.colorspace = if alpha {
        WEBP_CSP_MODE::MODE_RGBA
    } else {
        WEBP_CSP_MODE::MODE_RGB
    };
    // libwebp's own second thread reconstructs and scales a row while this
    // one parses the next, as libvips asks: a 12 MP still decodes in about
    // 0.8x the wall time for 1.15x the CPU. It needs the WEBP_USE_THREAD
    // define that .cargo/config.toml gives libwebp-sys's build.
    config.options.use_threads = 1;
    config.output.is_external_memory = 1;
    config.output.u.RGBA.rgba = pixels.as_mut_ptr();
    config.output.u.RGBA.stride = (channels * out_w) as i32;
    config.output.u.RGBA.size = pixels.len();
    // SAFETY: the output buffer is `pixels`, exactly stride x height bytes,
    // alive and unmoved until WebPDecode returns; libwebp writes only there.
    let status = unsafe { WebPDecode(bytes.as_ptr(), bytes.len(), &mut config) };
    // SAFETY: frees only what libwebp allocated itself (nothing, for
    // external memory); `pixels` stays ours.
    unsafe { WebPFreeDecBuffer(&mut config.output) };
    if status != VP8StatusCode::VP8_STATUS_OK {
        return Err(Error::DecodeFailed(format!("WebP: {status:?}")));
    }
    let image = if alpha {
        image::RgbaImage::from_raw(out_w, out_h, pixels).map(DynamicImage::ImageRgba8)
    } else {
        image::RgbImage::from_raw(out_w, out_h, pixels).map(DynamicImage::ImageRgb8)
    }
    .ok_or_else(|| Error::Internal("decoded buffer size".into()))?;
    Ok(Some(Decoded {
        image,
        format: ImageFormat::WebP,
        width,
        height,
        orientation: Orientation::NoTransforms,
        animation: None,
        limits,
    }))
}

fn swaps_axes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// The `image` crate's decoders, at full size.
fn decode_generic(bytes: &[u8], format: ImageFormat, limits: Limits) -> Result<Decoded> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.for_decoder());
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    limits.check_size(width, height)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let color = decoder.color_type();
    let total_bytes = usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX);
    let mut image = if matches!(color, ColorType::Rgb8 | ColorType::Rgba8)
        && total_bytes as u64 <= limits.max_alloc_bytes
    {
        // Straight into one of this thread's spare buffers.
        let mut pixels = scratch::zeroed(total_bytes);
        decoder.read_image(&mut pixels).map_err(decode_error)?;
        if color == ColorType::Rgb8 {
            image::RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8)
        } else {
            image::RgbaImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgba8)
        }
        .ok_or_else(|| Error::Internal("decoded buffer size".into()))?
    } else {
        DynamicImage::from_decoder(decoder).map_err(decode_error)?
    };
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
    Ok(Decoded::full(image, format, orientation, limits))
}

/// The header segments of a JPEG, up to and including its first scan
/// (SOS), each as `(marker, payload, offset after it)`. Walks by segment
/// lengths, so data inside a segment (an EXIF thumbnail) is never mistaken
/// for the image's own markers.
struct JpegSegments<'a> {
    bytes: &'a [u8],
    at: usize,
    done: bool,
}

fn jpeg_segments(bytes: &[u8]) -> JpegSegments<'_> {
    JpegSegments {
        bytes,
        at: 2, // after SOI
        done: false,
    }
}

impl<'a> Iterator for JpegSegments<'a> {
    type Item = (u8, &'a [u8], usize);

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.bytes;
        loop {
            if self.done {
                return None;
            }
            // Markers may be padded with extra 0xFF bytes.
            while bytes.get(self.at) == Some(&0xff) && bytes.get(self.at + 1) == Some(&0xff) {
                self.at += 1;
            }
            let (Some(&0xff), Some(&marker)) = (bytes.get(self.at), bytes.get(self.at + 1)) else {
                self.done = true;
                return None;
            };
            if (0xd0..=0xd7).contains(&marker) || marker == 0x01 {
                self.at += 2; // no length
                continue;
            }
            let length = bytes
                .get(self.at + 2..self.at + 4)
                .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])));
            // EOI before any scan, or a malformed length, ends the walk.
            let Some(length) = length.filter(|&l| marker != 0xd9 && l >= 2) else {
                self.done = true;
                return None;
            };
            let payload = bytes.get(self.at + 4..self.at + 2 + length).unwrap_or(&[]);
            self.at += 2 + length;
            self.done = marker == 0xda;
            return Some((marker, payload, self.at));
        }
    }
}

/// Whether a JPEG's first scan is followed by an end-of-image marker.
/// Inside entropy-coded data 0xFF is always stuffed, so FF D9 there is EOI.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    jpeg_segments(bytes)
        .find(|&(marker, _, _)| marker == 0xda)
        .and_then(|(_, _, scan)| bytes.get(scan..))
        // From the end, where EOI is: the same answer without reading the scan.
        .is_some_and(|scan| scan.windows(2).rev().any(|w| w == [0xff, 0xd9]))
}

/// The orientation in a JPEG's EXIF (APP1) segment; upright without one.
fn jpeg_orientation(bytes: &[u8]) -> Orientation {
    jpeg_segments(bytes)
        .find_map(|(marker, payload, _)| {
            (marker == 0xe1)
                .then(|| payload.strip_prefix(b"Exif\0\0"))
                .flatten()
        })
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
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

/// Runs one preset's filter chain on a decoded source and encodes it.
pub fn render(source: &Decoded, preset: &Preset) -> Result<Rendered> {
    let format = output_format(source.format, preset.format);
    if let Some(frames) = source
        .animation
        .as_ref()
        .filter(|_| format == ImageFormat::Gif && preset.encoding.animated)
    {
        return render_animation(source, frames, preset);
    }
    let chained = ops::run_chain(source, preset, source.limits.max_output_pixels)?;
    let bytes = encode_with(&chained.image, format, &preset.encoding, chained.interlace)?;
    let (width, height) = (chained.image.width(), chained.image.height());
    scratch::recycle(chained.image);
    Ok(Rendered {
        bytes,
        format,
        width,
        height,
    })
}

/// Every frame through the chain, re-encoded as a looping GIF with the
/// source's frame delays.
fn render_animation(
    source: &Decoded,
    frames: &[image::Frame],
    preset: &Preset,
) -> Result<Rendered> {
    let failed = |e: image::ImageError| Error::EncodeFailed(format!("GIF: {e}"));
    let mut out = Vec::new();
    let (mut width, mut height) = (0, 0);
    {
        let mut encoder = GifEncoder::new_with_speed(&mut out, GIF_SPEED);
        encoder.set_repeat(Repeat::Infinite).map_err(failed)?;
        for frame in frames {
            let canvas = Decoded::full(
                DynamicImage::ImageRgba8(frame.buffer().clone()),
                ImageFormat::Gif,
                Orientation::NoTransforms,
                source.limits,
            );
            let chained = ops::run_chain(&canvas, preset, source.limits.max_output_pixels)?;
            (width, height) = (chained.image.width(), chained.image.height());
            let pixels = chained.image.to_rgba8();
            encoder
                .encode_frame(image::Frame::from_parts(pixels, 0, 0, frame.delay()))
                .map_err(failed)?;
        }
    }
    Ok(Rendered {
        bytes: out,
        format: ImageFormat::Gif,
        width,
        height,
    })
}

/// NeuQuant's sampling step, 1 (best, slowest) to 30: 10 is the `gif`
/// crate's recommended speed for near-identical palettes.
const GIF_SPEED: i32 = 10;

fn output_format(source: ImageFormat, wanted: OutputFormat) -> ImageFormat {
    match wanted {
        OutputFormat::Jpeg => ImageFormat::Jpeg,
        OutputFormat::Png => ImageFormat::Png,
        OutputFormat::Webp => ImageFormat::WebP,
        OutputFormat::Gif => ImageFormat::Gif,
        OutputFormat::Avif => ImageFormat::Avif,
        // `auto` without a negotiated format renders as `source`.
        OutputFormat::Source | OutputFormat::Auto => match source {
            ImageFormat::Jpeg => ImageFormat::Jpeg,
            ImageFormat::WebP => ImageFormat::WebP,
            ImageFormat::Gif => ImageFormat::Gif,
            _ => ImageFormat::Png,
        },
    }
}

/// Encodes with the fastest encoder measured per format (`benches/stages.rs`):
/// libjpeg-turbo for JPEG, libwebp (lossy, at the preset's quality) for
/// WebP, `image`'s PNG encoder at its fast setting, rav1e (through `ravif`)
/// for the filters that opt into AVIF.
pub fn encode(image: &DynamicImage, format: ImageFormat, quality: u8) -> Result<Vec<u8>> {
    let encoding = Encoding {
        quality,
        jpeg_quality: None,
        png_compression_level: None,
        webp_lossless: false,
        webp_method: None,
        animated: false,
    };
    encode_with(image, format, &encoding, false)
}

/// Encodes per a preset's settings: `jpeg_quality` (else `quality`) and
/// progressive when interlaced for JPEG, lossy or lossless WebP, the PNG
/// zlib level when one is given, a GIF's first frame.
pub fn encode_with(
    image: &DynamicImage,
    format: ImageFormat,
    encoding: &Encoding,
    interlace: bool,
) -> Result<Vec<u8>> {
    match format {
        ImageFormat::Jpeg => encode_jpeg_with(
            &flatten_on_white(image),
            encoding.jpeg_quality(),
            true,
            interlace,
        ),
        ImageFormat::WebP => encode_webp(image, encoding),
        ImageFormat::Avif => encode_avif(image, encoding.quality),
        ImageFormat::Gif => encode_gif(image),
        _ => encode_png(image, encoding.png_compression_level),
    }
}

fn encode_gif(image: &DynamicImage) -> Result<Vec<u8>> {
    let failed = |e: image::ImageError| Error::EncodeFailed(format!("GIF: {e}"));
    let mut out = Vec::new();
    GifEncoder::new_with_speed(&mut out, GIF_SPEED)
        .encode_frame(image::Frame::new(image.to_rgba8()))
        .map_err(failed)?;
    Ok(out)
}

/// Width and height of a stored variant, read from its header; (0, 0)
/// when it has none kiln can read. AVIF is read from its `ispe` box, since
/// kiln's `image` encodes AVIF but cannot decode it: a variant described
/// from storage said 0 × 0.
pub fn stored_dimensions(bytes: &[u8]) -> (u32, u32) {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .or_else(|| avif_dimensions(bytes))
        .unwrap_or((0, 0))
}

/// The image spatial extents (`ispe`) property of an AVIF (ISO/IEC
/// 23008-12 §6.5.3): four bytes of version and flags, then width and
/// height, big-endian. The first is the primary image's in what kiln's
/// encoder writes (it writes no grid or thumbnail items).
fn avif_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let head = bytes.get(..bytes.len().min(4096))?;
    if head.get(4..12)? != b"ftypavif" {
        return None;
    }
    let at = head.windows(4).position(|w| w == b"ispe")?;
    let field = |offset: usize| -> Option<u32> {
        let b = head.get(at + offset..at + offset + 4)?;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    };
    Some((field(8)?, field(12)?)).filter(|(w, h)| *w > 0 && *h > 0)
}

/// rav1e's speed, 1 (slowest) to 10: 8 costs a fraction of the default's
/// time for files a few per cent larger.
const AVIF_SPEED: u8 = 8;

fn encode_avif(image: &DynamicImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let encoder = image::codecs::avif::AvifEncoder::new_with_speed_quality(
        &mut out,
        AVIF_SPEED,
        quality.clamp(1, 100),
    );
    image
        .write_with_encoder(encoder)
        .map_err(|e| Error::EncodeFailed(format!("AVIF: {e}")))?;
    Ok(out)
}

/// libjpeg-turbo. Variants subsample chroma (4:2:0, as libvips does below
/// quality 90); without it (4:4:4) is the `image` crate's like-for-like,
/// which `benches/stages.rs` measures.
pub fn encode_jpeg(rgb: &image::RgbImage, quality: u8, subsample_chroma: bool) -> Result<Vec<u8>> {
    encode_jpeg_with(rgb, quality, subsample_chroma, false)
}

fn encode_jpeg_with(
    rgb: &image::RgbImage,
    quality: u8,
    subsample_chroma: bool,
    progressive: bool,
) -> Result<Vec<u8>> {
    use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};
    let failed = |e: turbojpeg::Error| Error::EncodeFailed(format!("JPEG: {e}"));
    let mut compressor = Compressor::new().map_err(failed)?;
    compressor
        .set_quality(i32::from(quality.clamp(1, 100)))
        .map_err(failed)?;
    let subsampling = if subsample_chroma {
        Subsamp::Sub2x2
    } else {
        Subsamp::None
    };
    compressor.set_subsamp(subsampling).map_err(failed)?;
    compressor.set_progressive(progressive).map_err(failed)?;
    compressor
        .compress_to_vec(Image {
            pixels: rgb.as_raw().as_slice(),
            width: rgb.width() as usize,
            pitch: 3 * rgb.width() as usize,
            height: rgb.height() as usize,
            format: PixelFormat::RGB,
        })
        .map_err(failed)
}

fn encode_webp(image: &DynamicImage, encoding: &Encoding) -> Result<Vec<u8>> {
    let encoder = match image {
        DynamicImage::ImageRgba8(rgba) => {
            webp::Encoder::from_rgba(rgba.as_raw(), rgba.width(), rgba.height())
        }
        DynamicImage::ImageRgb8(rgb) => {
            webp::Encoder::from_rgb(rgb.as_raw(), rgb.width(), rgb.height())
        }
        other => return encode_webp(&DynamicImage::ImageRgba8(other.to_rgba8()), encoding),
    };
    let mut config = webp::WebPConfig::new()
        .map_err(|()| Error::Internal("libwebp: encoder config version".into()))?;
    // As the webp crate's encode_simple, plus the preset's method.
    config.lossless = i32::from(encoding.webp_lossless);
    config.alpha_compression = i32::from(!encoding.webp_lossless);
    config.quality = f32::from(encoding.quality.min(100));
    if let Some(method) = encoding.webp_method {
        config.method = i32::from(method.min(crate::filter::MAX_WEBP_METHOD));
    }
    encoder
        .encode_advanced(&config)
        .map(|memory| memory.to_vec())
        .map_err(|e| Error::EncodeFailed(format!("WebP: {e:?}")))
}

/// `level` 0-9 is zlib's; without one, the fast setting `benches/stages.rs`
/// measured. (Liip derives a level from `quality`, which makes its default
/// quality 100 write uncompressed PNGs; kiln does not.)
fn encode_png(image: &DynamicImage, level: Option<u8>) -> Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
    let mut out = Vec::with_capacity(64 * 1024);
    let compression = match level {
        None => CompressionType::Fast,
        Some(0) => CompressionType::Uncompressed,
        Some(level) => CompressionType::Level(level.min(9)),
    };
    let encoder = PngEncoder::new_with_quality(&mut out, compression, PngFilter::Adaptive);
    image
        .write_with_encoder(encoder)
        .map_err(|e| Error::EncodeFailed(e.to_string()))?;
    Ok(out)
}

/// JPEG has no alpha: composite transparent pixels over white, not black.
fn flatten_on_white(image: &DynamicImage) -> std::borrow::Cow<'_, image::RgbImage> {
    match image {
        DynamicImage::ImageRgb8(rgb) => std::borrow::Cow::Borrowed(rgb),
        DynamicImage::ImageRgba8(rgba) => {
            let mut rgb = image::RgbImage::new(rgba.width(), rgba.height());
            for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
                let [r, g, b, a] = px.0;
                let blend = |c: u8| {
                    ((u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a))) / 255) as u8
                };
                out.0 = [blend(r), blend(g), blend(b)];
            }
            std::borrow::Cow::Owned(rgb)
        }
        other => std::borrow::Cow::Owned(other.to_rgb8()),
    }
}

/// The two previews a record carries: BlurHash, and ThumbHash (what SAIS
/// sends as `blur`) as unpadded standard base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previews {
    pub blurhash: String,
    pub thumbhash: String,
}

/// Both previews from one small box-filtered copy.
pub fn previews(source: &Decoded) -> Result<Previews> {
    let (w, h) = (source.image.width(), source.image.height());
    let scale = (f64::from(PREVIEW_SIDE) / f64::from(w.max(h))).min(1.0);
    let tw = ((f64::from(w) * scale).round() as u32).max(1);
    let th = ((f64::from(h) * scale).round() as u32).max(1);
    let mut small = DynamicImage::new(tw, th, source.image.color());
    scratch::resize(
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

/// A tiny PNG of what a variant will look like, from its original's
/// BlurHash: the hash decoded at the original's aspect, cut by the preset's
/// crop, at most `max_side` pixels on its longer side (a browser scales it
/// up, blurred anyway). Cheap enough for a 202: no image is decoded.
pub fn placeholder_png(
    blurhash: &str,
    (original_width, original_height): (u32, u32),
    preset: &Preset,
    max_side: u32,
) -> Result<Vec<u8>> {
    if original_width == 0 || original_height == 0 {
        return Err(Error::BadRequest("placeholder of an empty image".into()));
    }
    let plan = preset.preview_plan(original_width, original_height);
    let crop = plan.crop;
    let scale = (f64::from(max_side.max(1)) / f64::from(plan.width.max(plan.height))).min(1.0);
    let side = |v: u32| ((f64::from(v) * scale).round() as u32).max(1);
    let (out_w, out_h) = (side(plan.width), side(plan.height));
    // The whole original at the scale that makes the crop out_w x out_h.
    let (sx, sy) = (
        f64::from(out_w) / f64::from(crop.width),
        f64::from(out_h) / f64::from(crop.height),
    );
    let full_w =
        ((f64::from(original_width) * sx).round() as u32).clamp(out_w, 8 * max_side.max(1));
    let full_h =
        ((f64::from(original_height) * sy).round() as u32).clamp(out_h, 8 * max_side.max(1));
    let pixels = blurhash::decode(blurhash, full_w, full_h, 1.0)
        .map_err(|e| Error::BadRequest(format!("blurhash: {e}")))?;
    let full = image::RgbaImage::from_raw(full_w, full_h, pixels)
        .ok_or_else(|| Error::Internal("blurhash decoded to the wrong size".into()))?;
    let x = ((f64::from(crop.x) * sx).round() as u32).min(full_w - out_w.min(full_w));
    let y = ((f64::from(crop.y) * sy).round() as u32).min(full_h - out_h.min(full_h));
    let cut = image::imageops::crop_imm(&full, x, y, out_w, out_h).to_image();
    let rgb = DynamicImage::ImageRgba8(cut).to_rgb8();
    use image::ImageEncoder as _;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(rgb.as_raw(), out_w, out_h, image::ExtendedColorType::Rgb8)
    .map_err(|e| Error::EncodeFailed(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn stored_dimensions_are_read_from_every_output_format() {
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            37,
            23,
            image::Rgb([9, 99, 199]),
        ));
        for format in [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::WebP,
            ImageFormat::Avif,
        ] {
            let bytes = encode(&image, format, 80).unwrap();
            assert_eq!(stored_dimensions(&bytes), (37, 23), "{format:?}");
        }
        assert_eq!(stored_dimensions(b"not an image"), (0, 0));
    }

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

    pub(super) fn limits() -> Limits {
        Limits {
            max_width: 10_000,
            max_height: 10_000,
            max_pixels: 10_000_000,
            max_alloc_bytes: 512 << 20,
            max_jpeg_scans: 100,
            max_output_pixels: 40_000_000,
            max_animation_frames: 200,
            max_animation_pixels: 50_000_000,
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
            format: OutputFormat::Jpeg,
            ..Preset::thumbnail("p", Mode::Inset, 100, 100, 80)
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
            format,
            ..Preset::thumbnail("p", Mode::Outbound, 50, 50, 80)
        };
        for (input, wanted, expected) in [
            (ImageFormat::Gif, OutputFormat::Source, ImageFormat::Gif),
            (ImageFormat::Gif, OutputFormat::Png, ImageFormat::Png),
            (ImageFormat::Png, OutputFormat::Gif, ImageFormat::Gif),
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

    /// A JPEG whose left half is red and right half blue.
    pub(super) fn halves_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                image::Rgb([220, 20, 20])
            } else {
                image::Rgb([20, 20, 220])
            }
        });
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    fn preset(mode: Mode, width: u32, height: u32) -> Preset {
        Preset {
            format: OutputFormat::Jpeg,
            ..Preset::thumbnail("p", mode, width, height, 80)
        }
    }

    #[test]
    fn a_jpeg_is_shrunk_on_load_to_what_its_presets_need() {
        let jpeg = halves_jpeg(1600, 1200);
        // 100 px of 1600: 1/8 (200x150) is the smallest scale there is.
        let small = decode_for(&jpeg, limits(), &[preset(Mode::Inset, 100, 100)]).unwrap();
        assert_eq!((small.width(), small.height()), (1600, 1200));
        assert_eq!((small.image.width(), small.image.height()), (200, 150));
        // The largest preset decides: 500 px needs more than 1/4 (400).
        let big = decode_for(
            &jpeg,
            limits(),
            &[preset(Mode::Inset, 100, 100), preset(Mode::Inset, 500, 500)],
        )
        .unwrap();
        assert_eq!((big.image.width(), big.image.height()), (800, 600));
        let mid = decode_for(&jpeg, limits(), &[preset(Mode::Inset, 300, 300)]).unwrap();
        assert_eq!((mid.image.width(), mid.image.height()), (400, 300));
        let full = decode_for(&jpeg, limits(), &[preset(Mode::Inset, 900, 900)]).unwrap();
        assert_eq!((full.image.width(), full.image.height()), (1600, 1200));
        // An outbound crop is served in original coordinates either way.
        for source in [&small, &mid, &big, &full] {
            let out = render(source, &preset(Mode::Outbound, 80, 80)).unwrap();
            let back = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (80, 80));
            let (left, right) = (back.get_pixel(10, 40).0, back.get_pixel(70, 40).0);
            assert!(left[0] > 180 && left[2] < 60, "{left:?}");
            assert!(right[2] > 180 && right[0] < 60, "{right:?}");
        }
        // Previews alone need only 64 px: the smallest scale.
        let previews_only = decode_for(&jpeg, limits(), &[]).unwrap();
        assert_eq!(previews_only.image.width(), 200);
    }

    /// Inserts an EXIF APP1 segment with `orientation` after SOI.
    pub(super) fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let payload = [b"Exif\0\0".as_slice(), &tiff].concat();
        let mut out = vec![0xff, 0xd8, 0xff, 0xe1];
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn a_shrunk_jpeg_is_turned_upright_by_its_exif_orientation() {
        // Orientation 6: the stored image is shown rotated 90 degrees clockwise,
        // so its left (red) half ends up on top.
        let jpeg = with_exif_orientation(&halves_jpeg(800, 400), 6);
        let source = decode_for(&jpeg, limits(), &[preset(Mode::Inset, 50, 50)]).unwrap();
        assert_eq!((source.width(), source.height()), (400, 800));
        assert_eq!((source.image.width(), source.image.height()), (50, 100));
        let out = render(&source, &preset(Mode::Inset, 50, 50)).unwrap();
        assert_eq!((out.width, out.height), (25, 50));
        let back = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
        let (top, bottom) = (back.get_pixel(12, 8).0, back.get_pixel(12, 42).0);
        assert!(top[0] > 180 && top[2] < 60, "top {top:?}");
        assert!(bottom[2] > 180 && bottom[0] < 60, "bottom {bottom:?}");
    }

    #[test]
    fn lossy_webp_is_smaller_than_lossless_and_keeps_the_colours() {
        // Texture, as in a photo: flat colour would favour lossless.
        let textured = image::RgbImage::from_fn(400, 300, |x, y| {
            let n = ((x * 7919) ^ (y * 104_729)) % 61;
            if x < 200 {
                image::Rgb([190 + n as u8, 20 + n as u8 / 2, 20])
            } else {
                image::Rgb([20, 20 + n as u8 / 2, 190 + n as u8])
            }
        });
        let photo = Decoded::full(
            DynamicImage::ImageRgb8(textured),
            ImageFormat::Png,
            Orientation::NoTransforms,
            limits(),
        );
        let lossy = encode(&photo.image, ImageFormat::WebP, 75).unwrap();
        let mut lossless_bytes = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut lossless_bytes)
            .encode(
                photo.image.as_bytes(),
                400,
                300,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        assert!(
            lossy.len() < lossless_bytes.len(),
            "{} vs {}",
            lossy.len(),
            lossless_bytes.len()
        );
        let back = image::load_from_memory(&lossy).unwrap().to_rgb8();
        let left = back.get_pixel(50, 150).0;
        assert!(left[0] > 180 && left[2] < 60, "{left:?}");
    }

    #[test]
    fn a_progressive_jpeg_is_held_to_its_scan_and_memory_limits() {
        let rgb =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_progressive(true).unwrap();
        let progressive = compressor
            .compress_to_vec(turbojpeg::Image {
                pixels: rgb.as_raw().as_slice(),
                width: 64,
                pitch: 64 * 3,
                height: 48,
                format: turbojpeg::PixelFormat::RGB,
            })
            .unwrap();
        assert_eq!(decode(&progressive, limits()).unwrap().image.width(), 64);
        let few_scans = Limits {
            max_jpeg_scans: 2,
            ..limits()
        };
        assert_eq!(
            decode(&progressive, few_scans).unwrap_err().code(),
            "decode-failed"
        );
        let little_memory = Limits {
            max_alloc_bytes: 64 * 48 * 6 - 1,
            ..limits()
        };
        assert_eq!(
            decode(&progressive, little_memory).unwrap_err().code(),
            "image-too-large"
        );
    }

    #[test]
    fn an_avif_filter_encodes_avif_of_the_planned_size() {
        let source = decode(&encoded(ImageFormat::Jpeg), limits()).unwrap();
        let out = render(&source, &preset(Mode::Outbound, 50, 40)).unwrap();
        assert_eq!(out.format, ImageFormat::Jpeg);
        let avif = Preset {
            format: OutputFormat::Avif,
            ..preset(Mode::Outbound, 50, 40)
        };
        let out = render(&source, &avif).unwrap();
        assert_eq!(image::guess_format(&out.bytes).unwrap(), ImageFormat::Avif);
        // kiln does not decode AVIF; the image spatial extent box tells the size.
        let ispe = out.bytes.windows(4).position(|w| w == b"ispe").unwrap();
        let field = |at: usize| u32::from_be_bytes(out.bytes[at..at + 4].try_into().unwrap());
        assert_eq!((field(ispe + 8), field(ispe + 12)), (50, 40));
    }

    /// libwebp-sys builds libwebp without WEBP_USE_THREAD unless
    /// .cargo/config.toml passes it; without it libwebp's worker runs its
    /// job on the caller's thread and `use_threads` is silently ignored.
    #[test]
    #[allow(unsafe_code)]
    fn libwebp_is_built_with_its_worker_thread() {
        use std::ffi::{c_int, c_void};
        // utils/thread_utils.h, exported by libwebp (WEBP_EXTERN).
        #[repr(C)]
        struct Worker {
            implementation: *mut c_void,
            status: c_int,
            hook: Option<unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int>,
            data1: *mut c_void,
            data2: *mut c_void,
            had_error: c_int,
        }
        #[repr(C)]
        struct WorkerInterface {
            init: unsafe extern "C" fn(*mut Worker),
            reset: unsafe extern "C" fn(*mut Worker) -> c_int,
            sync: unsafe extern "C" fn(*mut Worker) -> c_int,
            launch: unsafe extern "C" fn(*mut Worker),
            execute: unsafe extern "C" fn(*mut Worker),
            end: unsafe extern "C" fn(*mut Worker),
        }
        extern "C" {
            fn WebPGetWorkerInterface() -> *const WorkerInterface;
        }
        unsafe extern "C" fn record_thread(ran_on: *mut c_void, _: *mut c_void) -> c_int {
            // SAFETY: data1 is the test's `ran_on`, alive until `end`.
            unsafe {
                *ran_on.cast::<Option<std::thread::ThreadId>>() = Some(std::thread::current().id())
            };
            1
        }
        let mut ran_on: Option<std::thread::ThreadId> = None;
        // SAFETY: the interface is libwebp's static table; the worker is
        // initialised, reset, launched, synced and ended in its documented
        // order, and `ran_on` outlives it.
        unsafe {
            let interface = &*WebPGetWorkerInterface();
            let mut worker = std::mem::zeroed::<Worker>();
            (interface.init)(&mut worker);
            assert_eq!((interface.reset)(&mut worker), 1, "worker reset");
            worker.hook = Some(record_thread);
            worker.data1 = (&mut ran_on as *mut Option<std::thread::ThreadId>).cast();
            (interface.launch)(&mut worker);
            assert_eq!((interface.sync)(&mut worker), 1, "worker sync");
            (interface.end)(&mut worker);
        }
        let ran_on = ran_on.expect("the worker ran its hook");
        assert_ne!(
            ran_on,
            std::thread::current().id(),
            "libwebp ran its worker's job on the calling thread: built without WEBP_USE_THREAD"
        );
    }

    #[test]
    fn a_webp_is_scaled_by_libwebp_while_it_decodes_and_keeps_its_alpha() {
        let rgba = image::RgbaImage::from_fn(800, 600, |x, _| {
            if x < 400 {
                image::Rgba([220, 20, 20, 255])
            } else {
                image::Rgba([20, 20, 220, 0])
            }
        });
        let webp = webp::Encoder::from_rgba(rgba.as_raw(), 800, 600)
            .encode_simple(false, 90.0)
            .unwrap()
            .to_vec();
        let source = decode_for(&webp, limits(), &[preset(Mode::Inset, 100, 100)]).unwrap();
        assert_eq!((source.width(), source.height()), (800, 600));
        assert_eq!((source.image.width(), source.image.height()), (100, 75));
        let DynamicImage::ImageRgba8(pixels) = &source.image else {
            panic!("alpha lost: {:?}", source.image.color());
        };
        let (left, right) = (pixels.get_pixel(20, 37).0, pixels.get_pixel(80, 37).0);
        assert!(left[0] > 180 && left[3] > 250, "{left:?}");
        assert!(right[3] < 5, "{right:?}");
        let full = decode(&webp, limits()).unwrap();
        assert_eq!((full.image.width(), full.image.height()), (800, 600));
        assert_eq!(
            decode(&webp[..webp.len() / 2], limits())
                .unwrap_err()
                .code(),
            "decode-failed"
        );
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

    #[test]
    fn placeholders_take_the_variants_shape_and_stay_small() {
        // Left half red, right half blue.
        let mut photo = image::RgbImage::new(800, 400);
        for (x, _, pixel) in photo.enumerate_pixels_mut() {
            *pixel = if x < 400 {
                image::Rgb([230, 20, 20])
            } else {
                image::Rgb([20, 20, 230])
            };
        }
        let source = Decoded::full(
            DynamicImage::ImageRgb8(photo),
            ImageFormat::Png,
            Orientation::NoTransforms,
            limits(),
        );
        let hash = previews(&source).unwrap().blurhash;
        let preset = |mode, w, h| Preset::thumbnail("p", mode, w, h, 80);
        let inset = placeholder_png(
            &hash,
            (800, 400),
            &preset(crate::filter::Mode::Inset, 200, 200),
            32,
        )
        .unwrap();
        let square = placeholder_png(
            &hash,
            (800, 400),
            &preset(crate::filter::Mode::Outbound, 300, 300),
            32,
        )
        .unwrap();
        for png in [&inset, &square] {
            assert!(png.len() < 2048, "{} bytes", png.len());
        }
        let inset = image::load_from_memory(&inset).unwrap().to_rgb8();
        assert_eq!(inset.dimensions(), (32, 16));
        let square = image::load_from_memory(&square).unwrap().to_rgb8();
        assert_eq!(square.dimensions(), (32, 32));
        // The centre crop still has red on the left and blue on the right.
        let (left, right) = (square.get_pixel(2, 16), square.get_pixel(29, 16));
        assert!(
            left[0] > left[2] + 40 && right[2] > right[0] + 40,
            "{left:?} {right:?}"
        );
        // A variant smaller than max_side is not enlarged.
        let tiny = placeholder_png(
            &hash,
            (800, 400),
            &preset(crate::filter::Mode::Inset, 20, 20),
            32,
        )
        .unwrap();
        assert_eq!(image::load_from_memory(&tiny).unwrap().width(), 20);
        assert!(placeholder_png(
            "bad",
            (800, 400),
            &preset(crate::filter::Mode::Inset, 20, 20),
            32
        )
        .is_err());
    }
}
