//! LiipImagineBundle's filters as kiln steps: their options (spelled as in
//! Liip's YAML), validation, and the exact geometry each gives a source
//! size. Pure: the pixels are `imaging`'s job.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Mode, Rect, ResizePlan};
use crate::error::{Error, Result};

/// One filter of a chain, run in the order given. Externally tagged:
/// `{ thumbnail = { size = [200, 200], mode = "inset" } }` in TOML,
/// `thumbnail: { size: [200, 200], mode: inset }` in Liip's YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Thumbnail(Thumbnail),
    Fixed(Fixed),
    Resize(Resize),
    RelativeResize(RelativeResize),
    Scale(Scale),
    Downscale(Downscale),
    Upscale(Upscale),
    Crop(Crop),
    Background(Background),
    /// Liip's legacy name `watermark` reads as this.
    #[serde(alias = "watermark")]
    WatermarkImage(Watermark),
    Strip(NoOptions),
    AutoRotate(NoOptions),
    Rotate(Rotate),
    Flip(Flip),
    Grayscale(NoOptions),
    Interlace(Interlace),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

/// `[w, h]` where a side may be left to the aspect ratio: null in Liip's
/// YAML, 0 in kiln's TOML (which has no null).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sides(pub [Option<u32>; 2]);

impl Serialize for Sides {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.map(|side| side.unwrap_or(0)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Sides {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let sides = <[Option<u32>; 2]>::deserialize(d)?;
        Ok(Sides(sides.map(|side| side.filter(|&n| n > 0))))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thumbnail {
    /// `[w, h]`; one may be null/0 (derived from the aspect ratio).
    pub size: Sides,
    /// Liip: anything but `inset` is outbound, and outbound is the default.
    #[serde(default = "outbound", deserialize_with = "liip_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub allow_upscale: bool,
    /// Liip's resampling filter name. kiln always resamples with Lanczos3;
    /// kept so an imported set says what it asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

fn outbound() -> Mode {
    Mode::Outbound
}

fn liip_mode<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Mode, D::Error> {
    let mode = Option::<String>::deserialize(d)?;
    Ok(match mode.as_deref() {
        Some("inset") => Mode::Inset,
        _ => Mode::Outbound,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixed {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub size: [u32; 2],
}

/// Exactly one option.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelativeResize {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heighten: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub widen: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub increase: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

/// `dim: [w, h]` (fit within; a null side takes the other's ratio) or
/// `to: ratio`. Up or down.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<Sides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<f64>,
}

/// `max: [w, h]` or `by: fraction` (shrink by it); only ever smaller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Downscale {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Sides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<f64>,
}

/// `min: [w, h]` or `by: fraction` (grow by it); only ever larger.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upscale {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Sides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<f64>,
}

/// `start` must lie inside the image; a box past the edge keeps what is
/// inside (Imagick's behaviour; GD would invent fill pixels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Crop {
    pub start: [u32; 2],
    pub size: [u32; 2],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    Topleft,
    Top,
    Topright,
    #[serde(alias = "centerleft")]
    Left,
    Center,
    #[serde(alias = "centerright")]
    Right,
    Bottomleft,
    Bottom,
    Bottomright,
    /// Watermarks only: tile from the top left.
    Multiple,
}

impl Position {
    /// Top-left corner of `inner` placed in `outer` (Liip's arithmetic,
    /// truncated to whole pixels; negative when `inner` is larger).
    pub fn place(self, outer: (u32, u32), inner: (u32, u32)) -> (i64, i64) {
        let free_x = i64::from(outer.0) - i64::from(inner.0);
        let free_y = i64::from(outer.1) - i64::from(inner.1);
        let (x, y) = match self {
            Position::Topleft | Position::Multiple => (0, 0),
            Position::Top => (free_x / 2, 0),
            Position::Topright => (free_x, 0),
            Position::Left => (0, free_y / 2),
            Position::Center => (free_x / 2, free_y / 2),
            Position::Right => (free_x, free_y / 2),
            Position::Bottomleft => (0, free_y),
            Position::Bottom => (free_x / 2, free_y),
            Position::Bottomright => (free_x, free_y),
        };
        (x, y)
    }
}

fn center() -> Position {
    Position::Center
}

fn white() -> String {
    "#fff".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Background {
    #[serde(default = "white")]
    pub color: String,
    /// 0 opaque .. 100 transparent.
    #[serde(default)]
    pub transparency: u8,
    /// A canvas of this size with the image pasted at `position`; without
    /// it only transparent pixels are filled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[u32; 2]>,
    #[serde(default = "center")]
    pub position: Position,
}

/// A watermark's size: a ratio of the image's limiting side, or "NN%".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ratio {
    Fraction(f64),
    Percent(String),
}

impl Ratio {
    fn value(&self) -> std::result::Result<f64, String> {
        let value = match self {
            Ratio::Fraction(f) => *f,
            Ratio::Percent(text) => text
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<f64>().ok())
                .map(|n| n / 100.0)
                .ok_or_else(|| format!("watermark size {text:?} is not a ratio or NN%"))?,
        };
        if !(value.is_finite() && value > 0.0 && value <= 1.0) {
            return Err(format!("watermark size {value} must be in (0, 1]"));
        }
        Ok(value)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    /// A PNG/JPEG/WebP file; relative paths are resolved from the file that
    /// declares the filter.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Ratio>,
    #[serde(default = "center")]
    pub position: Position,
}

impl Watermark {
    /// The watermark's size on an image of `image` size (Liip: scaled by
    /// `size` of the limiting side; without `size`, shrunk only when it is
    /// larger than the image). Sides truncate, as Imagine's Box does.
    pub fn fitted(&self, image: (u32, u32), mark: (u32, u32)) -> Result<(u32, u32)> {
        let ratio = match &self.size {
            Some(size) => Some(size.value().map_err(Error::Config)?),
            None if mark.0 > image.0 || mark.1 > image.1 => Some(1.0),
            None => None,
        };
        Ok(match ratio {
            Some(ratio) => {
                let factor = ratio
                    * (f64::from(image.0) / f64::from(mark.0))
                        .min(f64::from(image.1) / f64::from(mark.1));
                (
                    ((f64::from(mark.0) * factor) as u32).max(1),
                    ((f64::from(mark.1) * factor) as u32).max(1),
                )
            }
            None => mark,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// Degrees clockwise. Multiples of 90 are exact; other angles grow the
    /// canvas to the rotated bounding box, filled transparent (white in a
    /// format without alpha).
    pub angle: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    #[serde(alias = "horizontal")]
    X,
    #[serde(alias = "vertical")]
    Y,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flip {
    pub axis: Axis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterlaceMode {
    None,
    Line,
    Plane,
    Partition,
}

fn line() -> InterlaceMode {
    InterlaceMode::Line
}

/// Progressive output: a progressive JPEG, an interlaced GIF. PNG and WebP
/// are written non-interlaced (the encoders kiln uses have no such mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interlace {
    #[serde(default = "line")]
    pub mode: InterlaceMode,
}

/// Liip's `round(side × ratio)`, at least 1.
fn scaled(side: u32, ratio: f64) -> u32 {
    ((f64::from(side) * ratio).round() as u32).max(1)
}

/// Scale by `ratio` (both sides rounded), then centre-crop to `box`:
/// the crop in source pixels, offset `floor((scaled − box) / 2)`.
fn cover_then_crop(size: (u32, u32), ratio: f64, boxed: (u32, u32)) -> ResizePlan {
    let (sw, sh) = (scaled(size.0, ratio), scaled(size.1, ratio));
    let (bw, bh) = (boxed.0.min(sw), boxed.1.min(sh));
    let to_source = |v: u32| f64::from(v) / ratio;
    let crop_w = (to_source(bw).round() as u32).clamp(1, size.0);
    let crop_h = (to_source(bh).round() as u32).clamp(1, size.1);
    let x = (to_source((sw - bw) / 2).round() as u32).min(size.0 - crop_w);
    let y = (to_source((sh - bh) / 2).round() as u32).min(size.1 - crop_h);
    ResizePlan {
        crop: Rect {
            x,
            y,
            width: crop_w,
            height: crop_h,
        },
        width: bw,
        height: bh,
    }
}

/// Ratio of Liip's ScaleFilterLoader family for `[w, h]` with nulls: a
/// null side yields the other's ratio; else `pick` of the two.
fn dim_ratio(size: (u32, u32), Sides(dim): Sides, pick: fn(f64, f64) -> f64) -> f64 {
    let rw = dim[0].map(|w| f64::from(w) / f64::from(size.0));
    let rh = dim[1].map(|h| f64::from(h) / f64::from(size.1));
    match (rw, rh) {
        (Some(rw), Some(rh)) => pick(rw, rh),
        (Some(r), None) | (None, Some(r)) => r,
        (None, None) => 1.0,
    }
}

fn exactly_one(name: &str, given: &[bool]) -> Result<()> {
    if given.iter().filter(|&&g| g).count() != 1 {
        return Err(Error::Config(format!("{name}: give exactly one option")));
    }
    Ok(())
}

fn positive_ratio(name: &str, ratio: f64) -> Result<()> {
    if ratio.is_finite() && ratio > 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{name}: ratio {ratio} must be positive"
        )))
    }
}

fn positive_box(name: &str, size: [u32; 2]) -> Result<()> {
    if size[0] == 0 || size[1] == 0 {
        return Err(Error::Config(format!("{name}: sizes must be positive")));
    }
    Ok(())
}

fn some_positive_side(name: &str, Sides(size): Sides) -> Result<()> {
    if size == [None, None] {
        return Err(Error::Config(format!(
            "{name}: give a positive width, height or both"
        )));
    }
    Ok(())
}

/// `#rgb`, `#rrggbb` (the `#` optional), as Imagine's palette reads them.
pub fn parse_color(text: &str) -> std::result::Result<[u8; 3], String> {
    let hex = text.strip_prefix('#').unwrap_or(text);
    let digits: Vec<u8> = hex
        .chars()
        .map(|c| c.to_digit(16).map(|d| d as u8))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("colour {text:?} is not #rgb or #rrggbb"))?;
    match digits.as_slice() {
        [r, g, b] => Ok([r * 17, g * 17, b * 17]),
        [r1, r2, g1, g2, b1, b2] => Ok([r1 * 16 + r2, g1 * 16 + g2, b1 * 16 + b2]),
        _ => Err(format!("colour {text:?} is not #rgb or #rrggbb")),
    }
}

impl Step {
    /// Liip's name of the filter.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Thumbnail(_) => "thumbnail",
            Step::Fixed(_) => "fixed",
            Step::Resize(_) => "resize",
            Step::RelativeResize(_) => "relative_resize",
            Step::Scale(_) => "scale",
            Step::Downscale(_) => "downscale",
            Step::Upscale(_) => "upscale",
            Step::Crop(_) => "crop",
            Step::Background(_) => "background",
            Step::WatermarkImage(_) => "watermark_image",
            Step::Strip(_) => "strip",
            Step::AutoRotate(_) => "auto_rotate",
            Step::Rotate(_) => "rotate",
            Step::Flip(_) => "flip",
            Step::Grayscale(_) => "grayscale",
            Step::Interlace(_) => "interlace",
        }
    }

    /// Refuses options Liip would throw on, or that would make no image.
    pub fn validate(&self) -> Result<()> {
        let name = self.name();
        match self {
            Step::Thumbnail(t) => some_positive_side(name, t.size),
            Step::Fixed(f) => positive_box(name, [f.width, f.height]),
            Step::Resize(r) => positive_box(name, r.size),
            Step::RelativeResize(r) => {
                exactly_one(
                    name,
                    &[
                        r.heighten.is_some(),
                        r.widen.is_some(),
                        r.increase.is_some(),
                        r.scale.is_some(),
                    ],
                )?;
                if r.heighten == Some(0) || r.widen == Some(0) {
                    return Err(Error::Config(format!("{name}: sizes must be positive")));
                }
                r.scale.map_or(Ok(()), |s| positive_ratio(name, s))
            }
            Step::Scale(s) => {
                exactly_one(name, &[s.dim.is_some(), s.to.is_some()])?;
                s.dim.map_or(Ok(()), |d| some_positive_side(name, d))?;
                s.to.map_or(Ok(()), |r| positive_ratio(name, r))
            }
            Step::Downscale(d) => {
                exactly_one(name, &[d.max.is_some(), d.by.is_some()])?;
                d.max.map_or(Ok(()), |m| some_positive_side(name, m))?;
                match d.by {
                    Some(by) if !(by.is_finite() && (0.0..1.0).contains(&by)) => {
                        Err(Error::Config(format!("{name}: by {by} must be in [0, 1)")))
                    }
                    _ => Ok(()),
                }
            }
            Step::Upscale(u) => {
                exactly_one(name, &[u.min.is_some(), u.by.is_some()])?;
                u.min.map_or(Ok(()), |m| some_positive_side(name, m))?;
                match u.by {
                    Some(by) if !(by.is_finite() && by >= 0.0) => {
                        Err(Error::Config(format!("{name}: by {by} must be 0 or more")))
                    }
                    _ => Ok(()),
                }
            }
            Step::Crop(c) => positive_box(name, c.size),
            Step::Background(b) => {
                parse_color(&b.color).map_err(|e| Error::Config(format!("{name}: {e}")))?;
                if b.transparency > 100 {
                    return Err(Error::Config(format!(
                        "{name}: transparency is 0 (opaque) to 100"
                    )));
                }
                if b.position == Position::Multiple {
                    return Err(Error::Config(format!(
                        "{name}: position multiple is for watermarks"
                    )));
                }
                b.size.map_or(Ok(()), |s| positive_box(name, s))
            }
            Step::WatermarkImage(w) => {
                if w.image.is_empty() {
                    return Err(Error::Config(format!("{name}: image is required")));
                }
                w.size.as_ref().map_or(Ok(()), |s| {
                    s.value()
                        .map(drop)
                        .map_err(|e| Error::Config(format!("{name}: {e}")))
                })
            }
            Step::Rotate(r) if !r.angle.is_finite() => {
                Err(Error::Config(format!("{name}: angle must be a number")))
            }
            _ => Ok(()),
        }
    }

    /// The crop + resize this step is, for a source of `size`: `None` for a
    /// step that is not one (or leaves the image as it is, `Some` of the
    /// whole image at its own size). `upscale_honoured`: kiln's
    /// `allow_upscale`; Liip ignores it (false keeps Liip's layout).
    pub fn resize_plan(&self, size: (u32, u32), upscale_honoured: bool) -> Option<ResizePlan> {
        let (ow, oh) = size;
        let same = ResizePlan::whole(size, ow, oh);
        let plan = match self {
            Step::Thumbnail(t) => {
                let derived = |given: u32, from: u32, to: u32| {
                    ((f64::from(given) / f64::from(from) * f64::from(to)) as u32).max(1)
                };
                let (w, h) = match t.size.0 {
                    [Some(w), Some(h)] => (w, h),
                    [Some(w), None] => (w, derived(w, ow, oh)),
                    [None, Some(h)] => (derived(h, oh, ow), h),
                    [None, None] => (ow, oh),
                };
                let upscale = t.allow_upscale && upscale_honoured;
                let runs = ow > w || oh > h || (upscale && (ow, oh) != (w, h));
                let (rw, rh) = (f64::from(w) / f64::from(ow), f64::from(h) / f64::from(oh));
                match t.mode {
                    _ if !runs => same,
                    Mode::Inset => {
                        let ratio = if upscale {
                            rw.min(rh)
                        } else {
                            rw.min(rh).min(1.0)
                        };
                        ResizePlan::whole(size, scaled(ow, ratio), scaled(oh, ratio))
                    }
                    Mode::Outbound if upscale || (ow >= w && oh >= h) => {
                        cover_then_crop(size, rw.max(rh), (w, h))
                    }
                    // Smaller than the box on a side: no scaling, a centred
                    // crop of min(image, box) per side.
                    Mode::Outbound => cover_then_crop(size, 1.0, (w, h)),
                }
            }
            Step::Fixed(f) => {
                let ratio =
                    (f64::from(f.width) / f64::from(ow)).max(f64::from(f.height) / f64::from(oh));
                let mut plan = cover_then_crop(size, ratio, (f.width, f.height));
                // Always exactly the box, even when rounding left a side short.
                (plan.width, plan.height) = (f.width, f.height);
                plan
            }
            Step::Resize(r) => ResizePlan::whole(size, r.size[0], r.size[1]),
            Step::RelativeResize(r) => {
                if let Some(h) = r.heighten {
                    let ratio = f64::from(h) / f64::from(oh);
                    ResizePlan::whole(size, scaled(ow, ratio), h)
                } else if let Some(w) = r.widen {
                    let ratio = f64::from(w) / f64::from(ow);
                    ResizePlan::whole(size, w, scaled(oh, ratio))
                } else if let Some(n) = r.increase {
                    let grow = |side: u32| (i64::from(side) + i64::from(n)).max(1) as u32;
                    ResizePlan::whole(size, grow(ow), grow(oh))
                } else {
                    let ratio = r.scale.unwrap_or(1.0);
                    ResizePlan::whole(size, scaled(ow, ratio), scaled(oh, ratio))
                }
            }
            Step::Scale(s) => {
                let ratio = match (s.to, s.dim) {
                    (Some(to), _) => to,
                    (None, Some(dim)) => dim_ratio(size, dim, f64::min),
                    (None, None) => 1.0,
                };
                ResizePlan::whole(size, scaled(ow, ratio), scaled(oh, ratio))
            }
            Step::Downscale(d) => {
                let ratio = match (d.by, d.max) {
                    (Some(by), _) => 1.0 - by,
                    (None, Some(max)) => dim_ratio(size, max, f64::min),
                    (None, None) => 1.0,
                };
                if ratio < 1.0 {
                    ResizePlan::whole(size, scaled(ow, ratio), scaled(oh, ratio))
                } else {
                    same
                }
            }
            Step::Upscale(u) => {
                let ratio = match (u.by, u.min) {
                    (Some(by), _) => 1.0 + by,
                    (None, Some(min)) => dim_ratio(size, min, f64::max),
                    (None, None) => 1.0,
                };
                if ratio > 1.0 {
                    ResizePlan::whole(size, scaled(ow, ratio), scaled(oh, ratio))
                } else {
                    same
                }
            }
            Step::Crop(c) => {
                let [x, y] = c.start;
                // Liip refuses a start outside the image; the caller reports it.
                let (x, y) = (x.min(ow - 1), y.min(oh - 1));
                let (w, h) = (c.size[0].min(ow - x), c.size[1].min(oh - y));
                ResizePlan {
                    crop: Rect {
                        x,
                        y,
                        width: w,
                        height: h,
                    },
                    width: w,
                    height: h,
                }
            }
            _ => return None,
        };
        Some(plan)
    }

    /// Checks that need the size the step meets (Liip throws on them).
    pub fn check_against(&self, size: (u32, u32)) -> Result<()> {
        if let Step::Crop(c) = self {
            if c.start[0] >= size.0 || c.start[1] >= size.1 {
                return Err(Error::DecodeFailed(format!(
                    "crop: start {:?} is outside the {}x{} image",
                    c.start, size.0, size.1
                )));
            }
        }
        Ok(())
    }

    /// The size the step gives a source of `size`. `rotate_exif`: the
    /// orientation `auto_rotate` applies swaps the axes.
    pub fn output_size(
        &self,
        size: (u32, u32),
        upscale_honoured: bool,
        rotate_swaps_axes: bool,
    ) -> (u32, u32) {
        if let Some(plan) = self.resize_plan(size, upscale_honoured) {
            return (plan.width, plan.height);
        }
        match self {
            Step::Background(b) => b.size.map_or(size, |[w, h]| (w, h)),
            Step::AutoRotate(_) if rotate_swaps_axes => (size.1, size.0),
            Step::Rotate(r) => rotated_size(size, r.angle),
            _ => size,
        }
    }

    /// After this step the source's EXIF is gone: Imagine's thumbnail and
    /// `strip` drop it, and `auto_rotate` has used it.
    pub fn drops_exif(&self) -> bool {
        matches!(
            self,
            Step::Thumbnail(_) | Step::Strip(_) | Step::AutoRotate(_)
        )
    }

    /// Changes only how the bytes are written, never the pixels.
    pub fn is_metadata_only(&self) -> bool {
        matches!(self, Step::Strip(_) | Step::Interlace(_))
    }
}

/// The bounding box of `size` rotated by `angle` degrees; exact for
/// multiples of 90.
pub fn rotated_size(size: (u32, u32), angle: f64) -> (u32, u32) {
    let quarter_turns = angle / 90.0;
    if quarter_turns.fract() == 0.0 {
        return if (quarter_turns as i64).rem_euclid(2) == 1 {
            (size.1, size.0)
        } else {
            size
        };
    }
    let (sin, cos) = angle.to_radians().sin_cos();
    let (w, h) = (f64::from(size.0), f64::from(size.1));
    let bound = |a: f64, b: f64| ((a + b).round() as u32).max(1);
    (
        bound(w * cos.abs(), h * sin.abs()),
        bound(w * sin.abs(), h * cos.abs()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step from its TOML, as a filters file writes it.
    fn step(toml_text: &str) -> Step {
        #[derive(Deserialize)]
        struct One {
            step: Step,
        }
        let one: One = toml::from_str(&format!("step = {toml_text}")).unwrap();
        one.step.validate().unwrap();
        one.step
    }

    const LANDSCAPE: (u32, u32) = (4000, 3000);
    const PORTRAIT: (u32, u32) = (3000, 4000);
    const SQUARE: (u32, u32) = (2000, 2000);
    const SMALL: (u32, u32) = (100, 50);

    /// Every filter against landscape, portrait, square and smaller-than-
    /// the-box sources; each expected size worked out by hand from Liip's
    /// rules (liip/LiipImagineBundle's loaders and Imagine's Box maths).
    #[test]
    fn each_filter_gives_the_size_liip_gives() {
        let table: &[(&str, [(u32, u32); 4])] = &[
            // inset: ratio min(w/ow, h/oh), sides rounded.
            (
                r#"{ thumbnail = { size = [200, 200], mode = "inset" } }"#,
                [(200, 150), (150, 200), (200, 200), (100, 50)],
            ),
            // outbound is the default: cover, centre-crop to the box; a
            // source inside the box is left alone.
            (
                r#"{ thumbnail = { size = [200, 200] } }"#,
                [(200, 200), (200, 200), (200, 200), (100, 50)],
            ),
            (
                r#"{ thumbnail = { size = [200, 200], mode = "anything" } }"#,
                [(200, 200), (200, 200), (200, 200), (100, 50)],
            ),
            // A null side: 100 / 3000 × 4000 = 133 (truncated), then inset.
            (
                r#"{ thumbnail = { size = [0, 100], mode = "inset" } }"#,
                [(133, 100), (75, 100), (100, 100), (100, 50)],
            ),
            // kiln honours allow_upscale: 100x50 into 200x200 → ×2.
            (
                r#"{ thumbnail = { size = [200, 200], mode = "inset", allow_upscale = true } }"#,
                [(200, 150), (150, 200), (200, 200), (200, 100)],
            ),
            (
                r#"{ thumbnail = { size = [200, 200], mode = "outbound", allow_upscale = true } }"#,
                [(200, 200), (200, 200), (200, 200), (200, 200)],
            ),
            // fixed: always exactly the box, upscaling when needed.
            (
                r#"{ fixed = { width = 300, height = 200 } }"#,
                [(300, 200), (300, 200), (300, 200), (300, 200)],
            ),
            (
                r#"{ resize = { size = [120, 80] } }"#,
                [(120, 80), (120, 80), (120, 80), (120, 80)],
            ),
            // heighten 60: ratio 60 / oh.
            (
                r#"{ relative_resize = { heighten = 60 } }"#,
                [(80, 60), (45, 60), (60, 60), (120, 60)],
            ),
            (
                r#"{ relative_resize = { widen = 32 } }"#,
                [(32, 24), (32, 43), (32, 32), (32, 16)],
            ),
            (
                r#"{ relative_resize = { increase = 10 } }"#,
                [(4010, 3010), (3010, 4010), (2010, 2010), (110, 60)],
            ),
            (
                r#"{ relative_resize = { scale = 0.25 } }"#,
                [(1000, 750), (750, 1000), (500, 500), (25, 13)],
            ),
            // scale dim: ratio min of both, up or down.
            (
                r#"{ scale = { dim = [400, 300] } }"#,
                [(400, 300), (225, 300), (300, 300), (400, 200)],
            ),
            (
                r#"{ scale = { to = 0.5 } }"#,
                [(2000, 1500), (1500, 2000), (1000, 1000), (50, 25)],
            ),
            // downscale: only when the ratio is under 1.
            (
                r#"{ downscale = { max = [800, 800] } }"#,
                [(800, 600), (600, 800), (800, 800), (100, 50)],
            ),
            (
                r#"{ downscale = { by = 0.6 } }"#,
                [(1600, 1200), (1200, 1600), (800, 800), (40, 20)],
            ),
            // upscale: ratio max of both, only when over 1.
            (
                r#"{ upscale = { min = [800, 800] } }"#,
                [(4000, 3000), (3000, 4000), (2000, 2000), (1600, 800)],
            ),
            (
                r#"{ upscale = { by = 0.5 } }"#,
                [(6000, 4500), (4500, 6000), (3000, 3000), (150, 75)],
            ),
            // crop keeps what lies inside the image.
            (
                r#"{ crop = { start = [10, 20], size = [50, 30] } }"#,
                [(50, 30), (50, 30), (50, 30), (50, 30)],
            ),
            (
                r#"{ crop = { start = [60, 0], size = [200, 200] } }"#,
                [(200, 200), (200, 200), (200, 200), (40, 50)],
            ),
            (
                r##"{ background = { color = "#000", size = [300, 300] } }"##,
                [(300, 300), (300, 300), (300, 300), (300, 300)],
            ),
            (
                r##"{ background = { color = "#fff" } }"##,
                [LANDSCAPE, PORTRAIT, SQUARE, SMALL],
            ),
            (
                r#"{ rotate = { angle = 90 } }"#,
                [PORTRAIT, LANDSCAPE, SQUARE, (50, 100)],
            ),
            (
                r#"{ rotate = { angle = -180 } }"#,
                [LANDSCAPE, PORTRAIT, SQUARE, SMALL],
            ),
            // 100x50 at 45°: 100·cos + 50·sin = 106.07 each way.
            (
                r#"{ rotate = { angle = 45 } }"#,
                [(4950, 4950), (4950, 4950), (2828, 2828), (106, 106)],
            ),
            (
                r#"{ flip = { axis = "x" } }"#,
                [LANDSCAPE, PORTRAIT, SQUARE, SMALL],
            ),
            (
                r#"{ grayscale = {} }"#,
                [LANDSCAPE, PORTRAIT, SQUARE, SMALL],
            ),
            (r#"{ strip = {} }"#, [LANDSCAPE, PORTRAIT, SQUARE, SMALL]),
            (
                r#"{ interlace = {} }"#,
                [LANDSCAPE, PORTRAIT, SQUARE, SMALL],
            ),
            (
                r#"{ auto_rotate = {} }"#,
                [LANDSCAPE, PORTRAIT, SQUARE, SMALL],
            ),
        ];
        for (spec, expected) in table {
            let step = step(spec);
            for (source, want) in [LANDSCAPE, PORTRAIT, SQUARE, SMALL]
                .into_iter()
                .zip(expected)
            {
                assert_eq!(
                    step.output_size(source, true, false),
                    *want,
                    "{spec} on {source:?}"
                );
                if let Some(plan) = step.resize_plan(source, true) {
                    let crop = plan.crop;
                    assert!(
                        crop.x + crop.width <= source.0 && crop.y + crop.height <= source.1,
                        "{spec} on {source:?}: crop {crop:?} outside the source"
                    );
                }
            }
        }
    }

    #[test]
    fn liips_own_examples_hold() {
        // From Liip's filter docs, on a 50x40 source.
        let source = (50, 40);
        for (spec, want) in [
            (
                r#"{ thumbnail = { size = [32, 32], mode = "outbound" } }"#,
                (32, 32),
            ),
            (
                r#"{ thumbnail = { size = [32, 32], mode = "inset" } }"#,
                (32, 26),
            ),
            (r#"{ relative_resize = { heighten = 60 } }"#, (75, 60)),
            (r#"{ relative_resize = { widen = 32 } }"#, (32, 26)),
            (r#"{ relative_resize = { increase = 10 } }"#, (60, 50)),
            (r#"{ relative_resize = { scale = 2.5 } }"#, (125, 100)),
        ] {
            assert_eq!(step(spec).output_size(source, true, false), want, "{spec}");
        }
        // The protocol notes' downscale example.
        assert_eq!(
            step(r#"{ downscale = { by = 0.6 } }"#).output_size((1980, 1280), true, false),
            (792, 512)
        );
    }

    #[test]
    fn liips_literal_layout_ignores_allow_upscale() {
        let up =
            step(r#"{ thumbnail = { size = [200, 200], mode = "inset", allow_upscale = true } }"#);
        assert_eq!(up.output_size(SMALL, true, false), (200, 100));
        assert_eq!(up.output_size(SMALL, false, false), SMALL);
    }

    #[test]
    fn positions_place_as_liip_does() {
        let outer = (200, 100);
        let inner = (50, 30);
        for (position, want) in [
            (Position::Topleft, (0, 0)),
            (Position::Top, (75, 0)),
            (Position::Topright, (150, 0)),
            (Position::Left, (0, 35)),
            (Position::Center, (75, 35)),
            (Position::Right, (150, 35)),
            (Position::Bottomleft, (0, 70)),
            (Position::Bottom, (75, 70)),
            (Position::Bottomright, (150, 70)),
        ] {
            assert_eq!(position.place(outer, inner), want, "{position:?}");
        }
    }

    #[test]
    fn watermarks_fit_as_liip_fits_them() {
        let mark = |size: Option<Ratio>| Watermark {
            image: "w.png".into(),
            size,
            position: Position::Center,
        };
        // No size: left alone when it fits, shrunk to fit when it does not.
        assert_eq!(mark(None).fitted((200, 100), (20, 20)).unwrap(), (20, 20));
        assert_eq!(
            mark(None).fitted((200, 100), (400, 100)).unwrap(),
            (200, 50)
        );
        // A ratio of the limiting side: 0.5 × min(200/20, 100/20) = 2.5.
        assert_eq!(
            mark(Some(Ratio::Fraction(0.5)))
                .fitted((200, 100), (20, 20))
                .unwrap(),
            (50, 50)
        );
        assert_eq!(
            mark(Some(Ratio::Percent("50%".into())))
                .fitted((200, 100), (20, 20))
                .unwrap(),
            (50, 50)
        );
        assert!(mark(Some(Ratio::Percent("lots".into())))
            .fitted((1, 1), (1, 1))
            .is_err());
    }

    #[test]
    fn bad_options_are_refused_with_the_filter_named() {
        for spec in [
            r#"{ thumbnail = { size = [0, 0] } }"#,
            r#"{ relative_resize = { heighten = 10, widen = 10 } }"#,
            r#"{ relative_resize = {} }"#,
            r#"{ scale = { to = -1.0 } }"#,
            r#"{ downscale = { by = 1.5 } }"#,
            r##"{ background = { color = "#12" } }"##,
            r#"{ background = { color = "red" } }"#,
            r#"{ background = { transparency = 101 } }"#,
            r#"{ background = { position = "multiple" } }"#,
            r#"{ watermark_image = { image = "" } }"#,
        ] {
            #[derive(Deserialize)]
            struct One {
                step: Step,
            }
            let one: One = toml::from_str(&format!("step = {spec}")).unwrap();
            let err = one.step.validate().unwrap_err().to_string();
            assert!(err.contains(one.step.name()), "{spec}: {err}");
        }
        // Unknown options and filters do not parse at all.
        for spec in [
            r#"{ thumbnail = { size = [1, 1], colour = 1 } }"#,
            r#"{ paste_image = {} }"#,
        ] {
            assert!(
                toml::from_str::<toml::Table>(&format!("step = {spec}"))
                    .ok()
                    .and_then(|t| t["step"].clone().try_into::<Step>().ok())
                    .is_none(),
                "{spec}"
            );
        }
    }

    #[test]
    fn colours_parse_as_imagine_reads_them() {
        assert_eq!(parse_color("#fff").unwrap(), [255, 255, 255]);
        assert_eq!(parse_color("00ff80").unwrap(), [0, 255, 128]);
        assert_eq!(parse_color("#1A2b3C").unwrap(), [0x1a, 0x2b, 0x3c]);
    }
}
