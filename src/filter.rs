//! Filter presets and the resize plan they make for a source size. Pure: no
//! I/O beyond reading the presets file named in config, no pixels.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

pub mod liip;
pub mod steps;

pub use steps::Step;
use steps::{rotated_size, Sides, Thumbnail};

/// The presets embedded in the binary.
pub const DEFAULT_FILTERS_TOML: &str = include_str!("../config/filters.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fit inside the box, keep the aspect ratio.
    Inset,
    /// Cover the box and centre-crop to exactly the box.
    Outbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Keep the source's format (JPEG, PNG, WebP, GIF).
    Source,
    #[serde(alias = "jpg")]
    Jpeg,
    Png,
    Webp,
    /// The first frame, or the animation when the preset says `animated`.
    Gif,
    /// Opt-in: 0.2-3 s per image, so the box is capped by
    /// `imaging.avif_max_pixels`.
    Avif,
    /// Chosen per request from `Accept`: AVIF (when the box is within
    /// `imaging.avif_max_pixels`), else WebP, else as `source`. Each format
    /// asked for is its own variant, stored under `<filter>.<ext>`.
    Auto,
}

/// The formats `auto` may pick beyond `source`, as the suffix of the
/// variant's filter segment (`small.webp`).
pub const NEGOTIATED_EXTENSIONS: [&str; 2] = ["avif", "webp"];

/// A preset as written in a filters file: either kiln's shorthand
/// (`mode`, `width`, `height`, `upscale`) or Liip's chain (`filters`, run
/// in order), plus how the result is encoded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscale: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    /// JPEG quality; `quality` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jpeg_quality: Option<u8>,
    /// PNG zlib level 0-9; kiln's fast setting when absent (Liip would
    /// derive one from `quality`, uncompressed at its default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub png_compression_level: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<OutputFormat>,
    /// WebP output without loss (photos grow several times; for graphics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webp_lossless: Option<bool>,
    /// libwebp's speed/size trade-off, 0 (fastest) to 6; its default 4
    /// when absent. Lossy WebP at 2 encodes 2.5 times faster than at 4
    /// for a few per cent more bytes (benches/README.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webp_method: Option<u8>,
    /// A GIF stays animated (within `imaging.max_animation_frames`) when
    /// the output is GIF; otherwise its first frame is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub animated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eager: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Step>,
}

/// libwebp's slowest, smallest method.
pub const MAX_WEBP_METHOD: u8 = 6;

/// How a preset's pixels become bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoding {
    pub quality: u8,
    pub jpeg_quality: Option<u8>,
    pub png_compression_level: Option<u8>,
    pub webp_lossless: bool,
    /// libwebp's method 0-6; None leaves libwebp's default.
    pub webp_method: Option<u8>,
    pub animated: bool,
}

impl Encoding {
    pub fn jpeg_quality(&self) -> u8 {
        self.jpeg_quality.unwrap_or(self.quality)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: String,
    /// The filters, in order. kiln's shorthand is one `thumbnail`.
    pub steps: Vec<Step>,
    pub format: OutputFormat,
    pub encoding: Encoding,
    /// Rendered along with any other filter of the same original (from the
    /// same decode), so it is there before a page asks for it.
    pub eager: bool,
    /// `filters.liip_literal`: lay out as Liip does, EXIF orientation only
    /// at an `auto_rotate` step (and lost after a thumbnail or strip), and
    /// `allow_upscale` ignored. Otherwise kiln turns every source upright
    /// before any geometry and honours `allow_upscale`.
    pub liip_literal: bool,
}

fn default_quality() -> u8 {
    82
}

/// Pixel rectangle in source coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// What to do with a source of a given size: take `crop` of it and resize
/// that to `width` x `height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizePlan {
    pub crop: Rect,
    pub width: u32,
    pub height: u32,
}

impl ResizePlan {
    /// The whole of a `size` source resized to `width` x `height`.
    pub fn whole(size: (u32, u32), width: u32, height: u32) -> ResizePlan {
        ResizePlan {
            crop: Rect {
                x: 0,
                y: 0,
                width: size.0,
                height: size.1,
            },
            width,
            height,
        }
    }
}

/// The filter segment an `auto` filter's variant in a negotiated format is
/// stored under (`small.webp`).
pub fn negotiated_segment(filter: &str, extension: &str) -> String {
    format!("{filter}.{extension}")
}

fn check_quality(name: &str, key: &str, quality: Option<u8>) -> Result<()> {
    match quality {
        Some(q) if !(1..=100).contains(&q) => Err(Error::Config(format!(
            "filters.{name}: {key} must be 1-100"
        ))),
        _ => Ok(()),
    }
}

impl PresetSpec {
    /// Checks the spec and makes the preset it describes.
    pub fn compile(&self, name: &str) -> Result<Preset> {
        if !is_identifier(name) {
            return Err(Error::Config(format!("filters: bad name {name:?}")));
        }
        let bad = |what: String| Error::Config(format!("filters.{name}: {what}"));
        let shorthand = [
            self.mode.is_some(),
            self.width.is_some(),
            self.height.is_some(),
        ];
        let steps = match (shorthand, self.filters.is_empty()) {
            ([false, false, false], _) => {
                if self.upscale.is_some() {
                    return Err(bad("upscale goes with mode, width and height".into()));
                }
                self.filters.clone()
            }
            ([true, true, true], true) => {
                let (width, height) = (self.width.unwrap_or(0), self.height.unwrap_or(0));
                if width == 0 || height == 0 {
                    return Err(bad("width and height must be positive".into()));
                }
                vec![Step::Thumbnail(Thumbnail {
                    size: Sides([Some(width), Some(height)]),
                    mode: self.mode.unwrap_or(Mode::Inset),
                    allow_upscale: self.upscale.unwrap_or(false),
                    filter: None,
                })]
            }
            (_, true) => return Err(bad("give mode, width and height together".into())),
            (_, false) => {
                return Err(bad(
                    "give either mode/width/height or filters, not both".into()
                ))
            }
        };
        for step in &steps {
            step.validate().map_err(|e| bad(e.to_string()))?;
        }
        check_quality(name, "quality", self.quality)?;
        check_quality(name, "jpeg_quality", self.jpeg_quality)?;
        if self.png_compression_level.is_some_and(|level| level > 9) {
            return Err(bad("png_compression_level must be 0-9".into()));
        }
        if self
            .webp_method
            .is_some_and(|method| method > MAX_WEBP_METHOD)
        {
            return Err(bad(format!("webp_method must be 0-{MAX_WEBP_METHOD}")));
        }
        Ok(Preset {
            name: name.to_string(),
            steps,
            format: self.format.unwrap_or(OutputFormat::Source),
            encoding: Encoding {
                quality: self.quality.unwrap_or_else(default_quality),
                jpeg_quality: self.jpeg_quality,
                png_compression_level: self.png_compression_level,
                webp_lossless: self.webp_lossless.unwrap_or(false),
                webp_method: self.webp_method,
                animated: self.animated.unwrap_or(false),
            },
            eager: self.eager.unwrap_or(false),
            liip_literal: false,
        })
    }
}

impl Preset {
    /// kiln's shorthand: one thumbnail of the box.
    pub fn thumbnail(name: &str, mode: Mode, width: u32, height: u32, quality: u8) -> Preset {
        PresetSpec {
            mode: Some(mode),
            width: Some(width),
            height: Some(height),
            quality: Some(quality),
            ..PresetSpec::default()
        }
        .compile(name)
        .expect("a positive box and quality make a valid preset")
    }

    /// The filter segments this preset's variants are stored under: its
    /// name, and for an `auto` filter each negotiated format's too.
    pub fn stored_segments(&self) -> Vec<String> {
        let mut segments = vec![self.name.clone()];
        if self.format == OutputFormat::Auto {
            segments.extend(NEGOTIATED_EXTENSIONS.map(|ext| negotiated_segment(&self.name, ext)));
        }
        segments
    }

    fn upscale_honoured(&self) -> bool {
        !self.liip_literal
    }

    /// The index of the step that meets the source's pixels first: the
    /// steps before it only change how bytes are written (and, upright,
    /// `auto_rotate`, which decoding already did).
    fn first_pixel_step(&self) -> usize {
        self.steps
            .iter()
            .position(|step| {
                !(step.is_metadata_only()
                    || (!self.liip_literal && matches!(step, Step::AutoRotate(_))))
            })
            .unwrap_or(self.steps.len())
    }

    /// The crop + resize the chain starts with on a source of this size,
    /// which a decoder may do part of (shrink-on-load); `None` when the
    /// first step needs every source pixel as it is.
    pub fn first_plan(&self, width: u32, height: u32) -> Option<ResizePlan> {
        let first = self.steps.get(self.first_pixel_step())?;
        first.resize_plan((width, height), self.upscale_honoured())
    }

    /// The size the whole chain gives a source of `width` x `height`
    /// (upright, unless `liip_literal`, where it is the stored size and
    /// `exif_swaps_axes` says whether its EXIF orientation turns it 90°).
    pub fn output_size(&self, width: u32, height: u32, exif_swaps_axes: bool) -> (u32, u32) {
        let mut exif_kept = true;
        self.steps.iter().fold((width, height), |size, step| {
            let swaps = self.liip_literal && exif_kept && exif_swaps_axes;
            let next = step.output_size(size, self.upscale_honoured(), swaps);
            exif_kept &= !step.drops_exif();
            next
        })
    }

    /// What a preview of the variant shows of an upright original: the
    /// first step's crop when nothing after it changes the size, else the
    /// whole image, at the chain's output size.
    pub fn preview_plan(&self, width: u32, height: u32) -> ResizePlan {
        let (out_w, out_h) = self.output_size(width, height, false);
        match self.first_plan(width, height) {
            Some(plan) if (plan.width, plan.height) == (out_w, out_h) => plan,
            _ => ResizePlan::whole((width, height), out_w, out_h),
        }
    }

    /// The largest output the chain can make whatever the source, when it
    /// has one (the box of its last bounding step, as later steps leave it).
    pub fn output_bound(&self) -> Option<(u32, u32)> {
        let mut bound: Option<(u32, u32)> = None;
        for step in &self.steps {
            bound = match step {
                Step::Thumbnail(t) => match t.size.0 {
                    [Some(w), Some(h)] => Some((w, h)),
                    _ => None,
                },
                Step::Fixed(f) => Some((f.width, f.height)),
                Step::Resize(r) => Some((r.size[0], r.size[1])),
                Step::Crop(c) => Some(bound.map_or((c.size[0], c.size[1]), |(w, h)| {
                    (w.min(c.size[0]), h.min(c.size[1]))
                })),
                Step::Downscale(d) => match (bound, d.max) {
                    (Some(b), _) => Some(b),
                    (None, Some(Sides([Some(w), Some(h)]))) => Some((w, h)),
                    _ => None,
                },
                Step::Background(b) => match (b.size, bound) {
                    (None, bound) => bound,
                    (Some([w, h]), Some((bw, bh))) => Some((w.max(bw), h.max(bh))),
                    (Some(_), None) => None,
                },
                Step::Rotate(r) => bound.map(|b| {
                    let (w, h) = rotated_size(b, r.angle);
                    (w.max(h), w.max(h))
                }),
                Step::AutoRotate(_) if self.liip_literal => {
                    bound.map(|(w, h)| (w.max(h), w.max(h)))
                }
                Step::Scale(_) | Step::RelativeResize(_) | Step::Upscale(_) => None,
                _ => bound,
            };
        }
        bound
    }

    /// One line: the format, quality and steps with their options.
    pub fn describe(&self) -> String {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|step| match (step, serde_json::to_value(step)) {
                (Step::Thumbnail(t), _) => {
                    let side = |s: Option<u32>| s.map_or("auto".to_string(), |n| n.to_string());
                    format!(
                        "thumbnail {} {}x{}{}",
                        format!("{:?}", t.mode).to_lowercase(),
                        side(t.size.0[0]),
                        side(t.size.0[1]),
                        if t.allow_upscale { " upscale" } else { "" }
                    )
                }
                (_, Ok(serde_json::Value::Object(map))) => map
                    .into_iter()
                    .map(|(name, options)| format!("{name} {options}"))
                    .collect(),
                _ => step.name().to_string(),
            })
            .collect();
        let steps = if steps.is_empty() {
            "re-encode".to_string()
        } else {
            steps.join(" → ")
        };
        format!(
            "{steps}; format {}, quality {}",
            format!("{:?}", self.format).to_lowercase(),
            self.encoding.quality
        )
    }
}

/// A filter segment of a stored variant: a filter name, or one with a
/// negotiated format's suffix (`small.webp`).
pub fn is_variant_filter_name(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((base, extension)) => {
            is_identifier(base) && NEGOTIATED_EXTENSIONS.contains(&extension)
        }
        None => is_identifier(name),
    }
}

/// 1-64 of `[A-Za-z0-9_-]`: safe as one URL and path segment.
pub fn is_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A size asked in the URL's filter segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeName {
    /// `w500`: at most this wide, any height.
    MaxWidth(u32),
    /// `x600`: a square of this side, cover + centre crop.
    Square(u32),
    /// `300x400`: exactly this box, cover + centre crop.
    Box(u32, u32),
}

impl SizeName {
    /// Parses the grammar; only the canonical spelling (no sign, no leading
    /// zero), so one size has one name and one set of stored variants.
    pub fn parse(name: &str) -> Option<SizeName> {
        fn side(digits: &str) -> Option<u32> {
            let canonical = !digits.is_empty()
                && digits.len() <= 6
                && digits.bytes().all(|b| b.is_ascii_digit())
                && !digits.starts_with('0');
            canonical.then(|| digits.parse().ok()).flatten()
        }
        if let Some(width) = name.strip_prefix('w') {
            return side(width).map(SizeName::MaxWidth);
        }
        if let Some(edge) = name.strip_prefix('x') {
            return side(edge).map(SizeName::Square);
        }
        let (width, height) = name.split_once('x')?;
        Some(SizeName::Box(side(width)?, side(height)?))
    }

    fn bounds(self) -> (u32, u32) {
        match self {
            SizeName::MaxWidth(width) => (width, 0),
            SizeName::Square(edge) => (edge, edge),
            SizeName::Box(width, height) => (width, height),
        }
    }
}

/// Which size URLs are answered, and how they render.
#[derive(Debug, Clone, Default)]
pub struct SizeRules {
    pub enabled: bool,
    pub max_width: u32,
    pub max_height: u32,
    /// Empty: any size up to the maximum.
    pub allowed: Vec<String>,
    pub quality: u8,
    /// The height a `w<N>` box stands for: no image is taller.
    pub unbounded_height: u32,
}

impl SizeRules {
    fn from_config(config: &Config) -> Result<SizeRules> {
        let filters = &config.filters;
        for name in &filters.size_allowed {
            if SizeName::parse(name).is_none() {
                return Err(Error::Config(format!(
                    "filters.size_allowed: {name:?} is not w<N>, x<N> or <W>x<H>"
                )));
            }
        }
        if !(1..=100).contains(&filters.size_quality) {
            return Err(Error::Config("filters.size_quality must be 1-100".into()));
        }
        Ok(SizeRules {
            enabled: filters.size_urls,
            max_width: filters.size_max_width,
            max_height: filters.size_max_height,
            allowed: filters.size_allowed.clone(),
            quality: filters.size_quality,
            unbounded_height: config.imaging.max_height,
        })
    }

    /// The preset a size name stands for; 406 over the maximum, 404 when
    /// not allowed, checked before anything is queued.
    fn preset(&self, name: &str, size: SizeName) -> Result<Preset> {
        let (width, height) = size.bounds();
        if width > self.max_width || height > self.max_height {
            return Err(Error::SizeTooLarge(format!(
                "{name} (at most {}x{})",
                self.max_width, self.max_height
            )));
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|allowed| allowed == name) {
            return Err(Error::SizeNotAllowed(name.to_string()));
        }
        let (mode, width, height) = match size {
            SizeName::MaxWidth(width) => (Mode::Inset, width, self.unbounded_height.max(1)),
            SizeName::Square(edge) => (Mode::Outbound, edge, edge),
            SizeName::Box(width, height) => (Mode::Outbound, width, height),
        };
        Ok(Preset::thumbnail(name, mode, width, height, self.quality))
    }
}

#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    presets: BTreeMap<String, Preset>,
    sizes: SizeRules,
    /// Largest box an `auto` filter may render as AVIF.
    avif_max_pixels: u64,
}

impl FilterSet {
    pub fn from_toml(text: &str) -> Result<FilterSet> {
        let specs: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(format!("filters: {e}")))?;
        let specs = specs
            .into_iter()
            .map(|(name, spec)| {
                let spec: PresetSpec = spec
                    .try_into()
                    .map_err(|e| Error::Config(format!("filters.{name}: {e}")))?;
                Ok((name, spec))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::compiled(specs)
    }

    /// The presets the specs describe, each checked.
    fn compiled(specs: Vec<(String, PresetSpec)>) -> Result<FilterSet> {
        let presets = specs
            .into_iter()
            .map(|(name, spec)| Ok((name.clone(), spec.compile(&name)?)))
            .collect::<Result<_>>()?;
        Ok(FilterSet {
            presets,
            sizes: SizeRules::default(),
            avif_max_pixels: 0,
        })
    }

    /// The presets named by `[filters] file` or `liip_yaml`, or the
    /// embedded ones, with the size URLs `[filters]` allows.
    pub fn from_config(config: &Config) -> Result<FilterSet> {
        let filters = &config.filters;
        let read = |key: &str, path: &str| {
            std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("filters.{key} {path:?}: {e}")))
        };
        let mut set = match (filters.file.is_empty(), filters.liip_yaml.is_empty()) {
            (true, true) => Self::from_toml(DEFAULT_FILTERS_TOML)?,
            (false, true) => {
                let mut set = Self::from_toml(&read("file", &filters.file)?)?;
                set.resolve_watermarks(std::path::Path::new(&filters.file));
                set
            }
            (true, false) => {
                let yaml = read("liip_yaml", &filters.liip_yaml)?;
                let specs = liip::read_yaml(&yaml, std::path::Path::new(&filters.liip_yaml))
                    .map_err(|e| match e {
                        Error::Config(why) => Error::Config(format!("filters.liip_yaml: {why}")),
                        other => other,
                    })?;
                Self::compiled(specs.sets)?
            }
            (false, false) => {
                return Err(Error::Config(
                    "filters.file and filters.liip_yaml are alternatives: set one".into(),
                ))
            }
        };
        for preset in set.presets.values_mut() {
            preset.liip_literal = filters.liip_literal;
        }
        set.check_watermarks()?;
        set.check_avif_boxes(config.imaging.avif_max_pixels)?;
        set.sizes = SizeRules::from_config(config)?;
        set.avif_max_pixels = config.imaging.avif_max_pixels;
        Ok(set)
    }

    /// Relative watermark images are read from the filters file's directory.
    fn resolve_watermarks(&mut self, file: &std::path::Path) {
        let base_dir = file.parent().unwrap_or(std::path::Path::new("."));
        for preset in self.presets.values_mut() {
            for step in &mut preset.steps {
                if let Step::WatermarkImage(mark) = step {
                    mark.image = liip::resolve(&mark.image, base_dir);
                }
            }
        }
    }

    /// A watermark file that is not there fails at start, not per render.
    fn check_watermarks(&self) -> Result<()> {
        for preset in self.iter() {
            for step in &preset.steps {
                if let Step::WatermarkImage(mark) = step {
                    if !std::path::Path::new(&mark.image).is_file() {
                        return Err(Error::Config(format!(
                            "filters.{}: watermark image {:?} is not a file",
                            preset.name, mark.image
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// AVIF encodes cost seconds for large outputs: a filter may opt in only
    /// with a bounded output of at most `max_pixels`.
    pub fn check_avif_boxes(&self, max_pixels: u64) -> Result<()> {
        for preset in self.iter() {
            if preset.format == OutputFormat::Avif && !within(preset, max_pixels) {
                return Err(Error::Config(format!(
                    "filters.{}: an AVIF output of {} is over imaging.avif_max_pixels ({max_pixels})",
                    preset.name,
                    preset
                        .output_bound()
                        .map_or("unbounded size".to_string(), |(w, h)| format!("{w}x{h}"))
                )));
            }
        }
        Ok(())
    }

    /// A configured preset, a negotiated format of an `auto` one
    /// (`small.webp`), else a size URL's (when size URLs are on).
    /// The name a render's metrics go under: the filter's own, except a
    /// size URL's when any size may be asked for (`size_allowed` empty).
    /// Those all share `size`, so clients cannot add series without end.
    pub fn metrics_label<'a>(&self, name: &'a str) -> &'a str {
        let invented = !self.presets.contains_key(name)
            && self.sizes.allowed.is_empty()
            && SizeName::parse(name).is_some();
        if invented {
            "size"
        } else {
            name
        }
    }

    pub fn get(&self, name: &str) -> Result<Cow<'_, Preset>> {
        if let Some(preset) = self.presets.get(name) {
            return Ok(Cow::Borrowed(preset));
        }
        if let Some((base, extension)) = name.rsplit_once('.') {
            let negotiated = self
                .presets
                .get(base)
                .filter(|preset| preset.format == OutputFormat::Auto)
                .and_then(|preset| {
                    let format = match extension {
                        "webp" => OutputFormat::Webp,
                        "avif" if self.avif_allowed(preset) => OutputFormat::Avif,
                        _ => return None,
                    };
                    Some(Preset {
                        name: name.to_string(),
                        format,
                        ..preset.clone()
                    })
                });
            return negotiated
                .map(Cow::Owned)
                .ok_or_else(|| Error::UnknownFilter(name.chars().take(64).collect()));
        }
        match SizeName::parse(name) {
            Some(size) if self.sizes.enabled => self.sizes.preset(name, size).map(Cow::Owned),
            _ => Err(Error::UnknownFilter(name.chars().take(64).collect())),
        }
    }

    /// The configured presets (not the size URLs).
    pub fn iter(&self) -> impl Iterator<Item = &Preset> {
        self.presets.values()
    }

    /// Whether an `auto` preset may answer with AVIF (its box is within the cap).
    pub fn avif_allowed(&self, preset: &Preset) -> bool {
        within(preset, self.avif_max_pixels)
    }

    /// The presets rendered whenever another filter of an original is.
    pub fn eager(&self) -> impl Iterator<Item = &Preset> {
        self.presets.values().filter(|preset| preset.eager)
    }
}

/// Whether every output of the preset is at most `max_pixels`.
fn within(preset: &Preset, max_pixels: u64) -> bool {
    preset
        .output_bound()
        .is_some_and(|(w, h)| u64::from(w) * u64::from(h) <= max_pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(mode: Mode, w: u32, h: u32, upscale: bool) -> Preset {
        PresetSpec {
            mode: Some(mode),
            width: Some(w),
            height: Some(h),
            upscale: Some(upscale),
            ..PresetSpec::default()
        }
        .compile("t")
        .unwrap()
    }

    fn first(preset: &Preset, w: u32, h: u32) -> ResizePlan {
        preset.first_plan(w, h).unwrap()
    }

    /// The (mode, box, upscale) of a one-thumbnail preset.
    fn thumbnail(preset: &Preset) -> (Mode, [Option<u32>; 2], bool) {
        match preset.steps.as_slice() {
            [Step::Thumbnail(t)] => (t.mode, t.size.0, t.allow_upscale),
            other => panic!("not one thumbnail: {other:?}"),
        }
    }

    #[test]
    fn inset_fits_inside_and_never_upscales_by_default() {
        let p = preset(Mode::Inset, 200, 200, false);
        assert_eq!(
            (first(&p, 4000, 3000).width, first(&p, 4000, 3000).height),
            (200, 150)
        );
        assert_eq!(
            (first(&p, 3000, 4000).width, first(&p, 3000, 4000).height),
            (150, 200)
        );
        assert_eq!(
            (first(&p, 100, 50).width, first(&p, 100, 50).height),
            (100, 50)
        );
        let up = preset(Mode::Inset, 200, 200, true);
        assert_eq!(
            (first(&up, 100, 50).width, first(&up, 100, 50).height),
            (200, 100)
        );
    }

    #[test]
    fn outbound_covers_and_centre_crops() {
        let p = preset(Mode::Outbound, 300, 300, false);
        let plan = first(&p, 4000, 3000);
        assert_eq!((plan.width, plan.height), (300, 300));
        assert_eq!(
            plan.crop,
            Rect {
                x: 500,
                y: 0,
                width: 3000,
                height: 3000
            }
        );
        // Smaller than the box: crop to what it has, never enlarge.
        let plan = first(&p, 200, 400);
        assert_eq!((plan.width, plan.height), (200, 300));
        assert_eq!(
            plan.crop,
            Rect {
                x: 0,
                y: 50,
                width: 200,
                height: 300
            }
        );
    }

    #[test]
    fn an_avif_filter_must_keep_to_its_box_cap() {
        let set = FilterSet::from_toml(
            r#"
            small = { mode = "inset", width = 400, height = 300, format = "avif" }
            big = { mode = "inset", width = 1600, height = 1600, format = "jpeg" }
            "#,
        )
        .unwrap();
        set.check_avif_boxes(120_000).unwrap();
        let err = set.check_avif_boxes(119_999).unwrap_err();
        assert!(err.to_string().contains("filters.small"), "{err}");
    }

    fn with_sizes(extra: &str) -> FilterSet {
        let config = crate::config::Config::load_from(crate::config::Sources {
            extra_toml: Some(extra),
            ..Default::default()
        })
        .unwrap();
        FilterSet::from_config(&config).unwrap()
    }

    #[test]
    fn size_names_parse_only_canonically() {
        use SizeName::*;
        assert_eq!(SizeName::parse("w500"), Some(MaxWidth(500)));
        assert_eq!(SizeName::parse("x600"), Some(Square(600)));
        assert_eq!(SizeName::parse("300x400"), Some(Box(300, 400)));
        for bad in [
            "w", "x", "w0", "w0500", "w-5", "w+5", "w5.0", "300x", "x300x", "300x0", "3x4x5",
            "W500", "w1234567", "small", "",
        ] {
            assert_eq!(SizeName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn size_urls_become_presets_within_their_limits() {
        let set = with_sizes("[filters]\nsize_max_width = 1000\nsize_max_height = 800\n");
        let w = set.get("w500").unwrap();
        assert_eq!(thumbnail(&w).0, Mode::Inset);
        assert_eq!(thumbnail(&w).1[0], Some(500));
        // At most 500 wide, whatever the height.
        let plan = first(&w, 1000, 4000);
        assert_eq!((plan.width, plan.height), (500, 2000));
        let plan = first(&w, 300, 200);
        assert_eq!((plan.width, plan.height), (300, 200), "never enlarged");
        let square = set.get("x600").unwrap();
        let plan = first(&square, 4000, 3000);
        assert_eq!((plan.width, plan.height), (600, 600));
        assert_eq!(plan.crop.x, 500, "centre crop");
        let boxed = set.get("300x400").unwrap();
        let plan = first(&boxed, 4000, 3000);
        assert_eq!((plan.width, plan.height), (300, 400));

        assert_eq!(set.get("w1001").unwrap_err().status(), 406);
        assert_eq!(set.get("900x801").unwrap_err().code(), "size-too-large");
        assert_eq!(thumbnail(&set.get("w1000").unwrap()).1[0], Some(1000));
        // A configured preset wins over the grammar.
        assert_eq!(thumbnail(&set.get("small").unwrap()).1[0], Some(200));

        let listed = with_sizes("[filters]\nsize_allowed = [\"w500\", \"300x400\"]\n");
        assert!(listed.get("w500").is_ok());
        let err = listed.get("w501").unwrap_err();
        assert_eq!((err.status(), err.code()), (404, "size-not-allowed"));
        assert_eq!(listed.get("w5000").unwrap_err().status(), 406);

        let off = with_sizes("[filters]\nsize_urls = false\n");
        assert_eq!(off.get("w500").unwrap_err().code(), "unknown-filter");

        // Metrics: any size shares one series; listed sizes and presets keep theirs.
        assert_eq!(set.metrics_label("w500"), "size");
        assert_eq!(set.metrics_label("300x400"), "size");
        assert_eq!(set.metrics_label("small"), "small");
        assert_eq!(set.metrics_label("small.webp"), "small.webp");
        assert_eq!(listed.metrics_label("w500"), "w500");
    }

    #[test]
    fn watermarks_are_read_from_the_filters_files_directory_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("marks")).unwrap();
        std::fs::write(dir.path().join("marks/logo.png"), b"png").unwrap();
        let file = dir.path().join("filters.toml");
        let load = |image: &str| {
            std::fs::write(
                &file,
                format!(
                    "[marked]\nfilters = [{{ watermark_image = {{ image = \"{image}\" }} }}]\n"
                ),
            )
            .unwrap();
            let config = crate::config::Config::load_from(crate::config::Sources {
                extra_toml: Some(&format!("[filters]\nfile = \"{}\"\n", file.display())),
                ..Default::default()
            })
            .unwrap();
            FilterSet::from_config(&config)
        };
        let set = load("marks/logo.png").unwrap();
        let Step::WatermarkImage(mark) = &set.get("marked").unwrap().steps[0] else {
            panic!("not a watermark");
        };
        assert_eq!(
            std::path::Path::new(&mark.image),
            dir.path().join("marks/logo.png")
        );
        let err = load("marks/gone.png").unwrap_err().to_string();
        assert!(
            err.contains("filters.marked") && err.contains("gone.png"),
            "{err}"
        );
    }

    #[test]
    fn a_liip_yaml_that_cannot_run_stops_kiln_naming_the_set_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("liip.yaml");
        std::fs::write(
            &yaml,
            "filter_sets:\n  odd:\n    filters:\n      paste_image: {}\n",
        )
        .unwrap();
        let config = crate::config::Config::load_from(crate::config::Sources {
            extra_toml: Some(&format!("[filters]\nliip_yaml = \"{}\"\n", yaml.display())),
            ..Default::default()
        })
        .unwrap();
        let err = FilterSet::from_config(&config).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid configuration: filters.liip_yaml: filter_sets.odd.filters:"),
            "{err}"
        );
        assert!(
            err.contains("paste_image") && err.matches("invalid configuration").count() == 1,
            "{err}"
        );
    }

    #[test]
    fn a_bad_allowed_size_is_refused_at_start() {
        let config = crate::config::Config::load_from(crate::config::Sources {
            extra_toml: Some("[filters]\nsize_allowed = [\"w05\"]\n"),
            ..Default::default()
        })
        .unwrap();
        let err = FilterSet::from_config(&config).unwrap_err();
        assert!(err.to_string().contains("filters.size_allowed"), "{err}");
    }

    #[test]
    fn embedded_presets_load() {
        let set = FilterSet::from_toml(DEFAULT_FILTERS_TOML).unwrap();
        for (name, side) in [
            ("tiny", 125),
            ("small", 200),
            ("medium", 400),
            ("large", 800),
        ] {
            let p = set.get(name).unwrap();
            assert_eq!(
                thumbnail(&p),
                (Mode::Inset, [Some(side), Some(side)], false)
            );
        }
        assert_eq!(thumbnail(&set.get("square").unwrap()).0, Mode::Outbound);
        assert_eq!(set.get("nope").unwrap_err().code(), "unknown-filter");
    }
}
