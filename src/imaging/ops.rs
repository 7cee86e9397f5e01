//! A preset's filter chain on pixels: each Liip step in order, from a
//! decoded (maybe shrunk-on-load) source to the variant's pixels. The
//! sizes come from `filter::steps`, so what the chain makes is what its
//! geometry says.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions};
use image::metadata::Orientation;
use image::{DynamicImage, GenericImageView, Rgba, RgbaImage};
use parking_lot::Mutex;

use super::{swaps_axes, Decoded};
use crate::error::{Error, Result};
use crate::filter::steps::{
    parse_color, rotated_size, Axis, Background, InterlaceMode, Position, Watermark,
};
use crate::filter::{Preset, ResizePlan, Step};

/// The chain's pixels and what it asked of the encoder.
pub struct Chained {
    pub image: DynamicImage,
    pub interlace: bool,
}

/// Runs `preset`'s steps on `source`. The first resizing step reads the
/// decoded pixels directly, whatever shrink-on-load left of them; every
/// other step works on pixels at their full logical size.
pub fn run_chain(source: &Decoded, preset: &Preset, max_output_pixels: u64) -> Result<Chained> {
    let literal = preset.liip_literal;
    let orientation = source.orientation;
    let (mut pixels, mut size): (Cow<'_, DynamicImage>, (u32, u32)) =
        if literal && orientation != Orientation::NoTransforms {
            // Liip sees the stored pixels: undo what decoding turned upright.
            let mut stored = source.image.clone();
            stored.apply_orientation(inverse(orientation));
            let size = if swaps_axes(orientation) {
                (source.height(), source.width())
            } else {
                (source.width(), source.height())
            };
            (Cow::Owned(stored), size)
        } else {
            (
                Cow::Borrowed(&source.image),
                (source.width(), source.height()),
            )
        };
    let check = |(w, h): (u32, u32)| {
        if u64::from(w) * u64::from(h) > max_output_pixels {
            return Err(Error::ImageTooLarge(format!(
                "filter {}: a {w}x{h} step is over imaging.max_output_pixels ({max_output_pixels})",
                preset.name
            )));
        }
        Ok(())
    };
    let mut exif_kept = true;
    let mut interlace = false;
    for step in &preset.steps {
        step.check_against(size)?;
        let exif_was_kept = exif_kept;
        exif_kept &= !step.drops_exif();
        match step {
            Step::Strip(_) => continue,
            Step::Interlace(mode) => {
                interlace = mode.mode != InterlaceMode::None;
                continue;
            }
            // Upright sources were turned by decoding; Liip's literal
            // layout turns here, unless a thumbnail or strip dropped the EXIF.
            Step::AutoRotate(_) => {
                if literal && exif_was_kept && orientation != Orientation::NoTransforms {
                    let mut image = at_size(pixels, size)?;
                    image.apply_orientation(orientation);
                    size = image.dimensions();
                    pixels = Cow::Owned(image);
                }
                continue;
            }
            _ => {}
        }
        if let Some(plan) = step.resize_plan(size, !literal) {
            check((plan.width, plan.height))?;
            pixels = Cow::Owned(resize(&pixels, size, plan)?);
            size = (plan.width, plan.height);
            continue;
        }
        check(step.output_size(size, !literal, false))?;
        let image = at_size(pixels, size)?;
        let image = match step {
            Step::Background(background) => fill(image, background)?,
            Step::WatermarkImage(mark) => watermark(image, mark)?,
            Step::Rotate(rotate) => rotated(image, rotate.angle),
            Step::Flip(flip) => match flip.axis {
                Axis::X => image.fliph(),
                Axis::Y => image.flipv(),
            },
            Step::Grayscale(_) => grayscale(image),
            other => {
                return Err(Error::Internal(format!(
                    "step {} has no pixel operation",
                    other.name()
                )))
            }
        };
        size = image.dimensions();
        pixels = Cow::Owned(image);
    }
    Ok(Chained {
        image: at_size(pixels, size)?,
        interlace,
    })
}

/// The orientation that undoes `orientation`.
fn inverse(orientation: Orientation) -> Orientation {
    match orientation {
        Orientation::Rotate90 => Orientation::Rotate270,
        Orientation::Rotate270 => Orientation::Rotate90,
        // Flips, half turns and transposes undo themselves.
        other => other,
    }
}

/// The pixels at their logical size (a shrunk decode is scaled back up:
/// only when no resizing step came first, which `decode_for` avoids).
fn at_size(pixels: Cow<'_, DynamicImage>, size: (u32, u32)) -> Result<DynamicImage> {
    if pixels.dimensions() == size {
        return Ok(pixels.into_owned());
    }
    resize(&pixels, size, ResizePlan::whole(size, size.0, size.1))
}

/// Crops and resizes per `plan`, given in `logical` pixels, from `pixels`
/// (which may be smaller: shrink-on-load). Lanczos3.
pub fn resize(
    pixels: &DynamicImage,
    logical: (u32, u32),
    plan: ResizePlan,
) -> Result<DynamicImage> {
    let identity = plan.crop.x == 0
        && plan.crop.y == 0
        && (plan.crop.width, plan.crop.height) == logical
        && (plan.width, plan.height) == logical
        && pixels.dimensions() == logical;
    if identity {
        return Ok(pixels.clone());
    }
    // The crop in decoded pixels. Scaling can overshoot the edge by a
    // rounding error, which the resizer refuses: clamp to the pixels.
    let to_pixels = |start: u32, length: u32, logical: u32, pixels: u32| {
        let scale = f64::from(pixels) / f64::from(logical);
        let start = (f64::from(start) * scale).min(f64::from(pixels));
        (
            start,
            (f64::from(length) * scale).min(f64::from(pixels) - start),
        )
    };
    let (x, width) = to_pixels(plan.crop.x, plan.crop.width, logical.0, pixels.width());
    let (y, height) = to_pixels(plan.crop.y, plan.crop.height, logical.1, pixels.height());
    let mut resized = super::scratch::blank(plan.width, plan.height, pixels.color());
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(x, y, width, height);
    super::scratch::resize(pixels, &mut resized, &options)
        .map_err(|e| Error::Internal(format!("resize: {e}")))?;
    Ok(resized)
}

/// Keeps alpha when the image has it; otherwise 8-bit RGB, which every
/// encoder takes fastest.
fn settle(image: RgbaImage, had_alpha: bool) -> DynamicImage {
    let rgba = DynamicImage::ImageRgba8(image);
    if had_alpha {
        rgba
    } else {
        DynamicImage::ImageRgb8(rgba.to_rgb8())
    }
}

/// `background`: a canvas of the colour (of `size`, the image pasted at
/// `position`; else the image's own size, filling its transparency).
fn fill(image: DynamicImage, background: &Background) -> Result<DynamicImage> {
    let [r, g, b] = parse_color(&background.color).map_err(Error::Config)?;
    let alpha = (f64::from(100 - background.transparency.min(100)) * 2.55).round() as u8;
    let (canvas_w, canvas_h) = background.size.map_or(image.dimensions(), |[w, h]| (w, h));
    let mut canvas = RgbaImage::from_pixel(canvas_w, canvas_h, Rgba([r, g, b, alpha]));
    let (x, y) = background
        .position
        .place((canvas_w, canvas_h), image.dimensions());
    let (x, y) = if background.size.is_some() {
        (x, y)
    } else {
        (0, 0)
    };
    let had_alpha = alpha < 255;
    image::imageops::overlay(&mut canvas, &image.to_rgba8(), x, y);
    Ok(settle(canvas, had_alpha))
}

/// Watermark images by path, decoded once per process.
fn watermark_image(path: &str) -> Result<Arc<RgbaImage>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<RgbaImage>>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(Default::default);
    let path = Path::new(path);
    if let Some(image) = loaded.lock().get(path) {
        return Ok(image.clone());
    }
    let image = image::open(path)
        .map_err(|e| Error::Internal(format!("watermark {}: {e}", path.display())))?
        .to_rgba8();
    let image = Arc::new(image);
    loaded.lock().insert(path.to_path_buf(), image.clone());
    Ok(image)
}

/// `watermark_image`: the mark, fitted as Liip fits it, at a position or
/// tiled (`multiple`), blended over the image.
fn watermark(image: DynamicImage, mark: &Watermark) -> Result<DynamicImage> {
    let source = watermark_image(&mark.image)?;
    let size = image.dimensions();
    let (mark_w, mark_h) = mark.fitted(size, source.dimensions())?;
    let fitted = if (mark_w, mark_h) == source.dimensions() {
        (*source).clone()
    } else {
        let source = DynamicImage::ImageRgba8((*source).clone());
        resize(
            &source,
            source.dimensions(),
            ResizePlan::whole(source.dimensions(), mark_w, mark_h),
        )?
        .into_rgba8()
    };
    let had_alpha = image.color().has_alpha();
    let mut canvas = image.to_rgba8();
    if mark.position == Position::Multiple {
        for y in (0..size.1).step_by(mark_h as usize) {
            for x in (0..size.0).step_by(mark_w as usize) {
                image::imageops::overlay(&mut canvas, &fitted, i64::from(x), i64::from(y));
            }
        }
    } else {
        let (x, y) = mark.position.place(size, (mark_w, mark_h));
        image::imageops::overlay(&mut canvas, &fitted, x, y);
    }
    Ok(settle(canvas, had_alpha))
}

/// Clockwise by `angle` degrees, as Imagine turns. Quarter turns are exact;
/// other angles sample bilinearly into the rotated bounding box, whose
/// corners are transparent.
fn rotated(image: DynamicImage, angle: f64) -> DynamicImage {
    let quarter_turns = angle / 90.0;
    if quarter_turns.fract() == 0.0 {
        return match (quarter_turns as i64).rem_euclid(4) {
            1 => image.rotate90(),
            2 => image.rotate180(),
            3 => image.rotate270(),
            _ => image,
        };
    }
    let source = image.to_rgba8();
    let (w, h) = source.dimensions();
    let (out_w, out_h) = rotated_size((w, h), angle);
    let (sin, cos) = angle.to_radians().sin_cos();
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let (ox, oy) = (f64::from(out_w) / 2.0, f64::from(out_h) / 2.0);
    let out = RgbaImage::from_fn(out_w, out_h, |x, y| {
        // The source point that lands on this output pixel's centre.
        let (dx, dy) = (f64::from(x) + 0.5 - ox, f64::from(y) + 0.5 - oy);
        let sx = dx * cos + dy * sin + cx - 0.5;
        let sy = -dx * sin + dy * cos + cy - 0.5;
        bilinear(&source, sx, sy)
    });
    DynamicImage::ImageRgba8(out)
}

fn bilinear(image: &RgbaImage, x: f64, y: f64) -> Rgba<u8> {
    let (w, h) = (f64::from(image.width()), f64::from(image.height()));
    if x < -0.5 || y < -0.5 || x > w - 0.5 || y > h - 0.5 {
        return Rgba([0, 0, 0, 0]);
    }
    let x = x.clamp(0.0, w - 1.0);
    let y = y.clamp(0.0, h - 1.0);
    let (x0, y0) = (x.floor() as u32, y.floor() as u32);
    let (x1, y1) = (
        (x0 + 1).min(image.width() - 1),
        (y0 + 1).min(image.height() - 1),
    );
    let (fx, fy) = (x - x.floor(), y - y.floor());
    let mut out = [0u8; 4];
    for (c, value) in out.iter_mut().enumerate() {
        let at = |px: u32, py: u32| f64::from(image.get_pixel(px, py).0[c]);
        let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
        let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
        *value = (top * (1.0 - fy) + bottom * fy).round() as u8;
    }
    Rgba(out)
}

/// Grey by luma, kept in RGB(A) so every encoder takes it.
fn grayscale(image: DynamicImage) -> DynamicImage {
    if image.color().has_alpha() {
        DynamicImage::ImageRgba8(image.grayscale().to_rgba8())
    } else {
        DynamicImage::ImageRgb8(image.grayscale().to_rgb8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Rect;

    /// Whole-image crops of shrunk decodes: `w × (pw / w)` can come out a
    /// hair over `pw`, which the resizer refuses (found by worker_e2e).
    #[test]
    fn a_crop_scaled_to_a_shrunk_decode_stays_inside_it() {
        let mut overshoots = 0;
        for width in 1000..1600u32 {
            let pixels = width.div_ceil(8);
            let scale = f64::from(pixels) / f64::from(width);
            if f64::from(width) * scale > f64::from(pixels) {
                overshoots += 1;
                let shrunk = DynamicImage::new_rgb8(pixels, 10);
                let plan = ResizePlan {
                    crop: Rect {
                        x: 0,
                        y: 0,
                        width,
                        height: 80,
                    },
                    width: 100,
                    height: 8,
                };
                let out = resize(&shrunk, (width, 80), plan).unwrap();
                assert_eq!((out.width(), out.height()), (100, 8));
            }
        }
        assert!(
            overshoots > 0,
            "no width overshoots: the case is not exercised"
        );
    }
}
