//! Filter presets and the resize plan they make for a source size. Pure: no
//! I/O beyond reading the presets file named in config, no pixels.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

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
    /// Keep JPEG, PNG and WebP; GIF becomes PNG.
    Source,
    Jpeg,
    Png,
    Webp,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    #[serde(skip_deserializing)]
    pub name: String,
    pub mode: Mode,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub upscale: bool,
    #[serde(default = "default_quality")]
    pub quality: u8,
    #[serde(default = "default_format")]
    pub format: OutputFormat,
    /// Rendered along with any other filter of the same original (from the
    /// same decode), so it is there before a page asks for it.
    #[serde(default)]
    pub eager: bool,
}

fn default_quality() -> u8 {
    82
}

fn default_format() -> OutputFormat {
    OutputFormat::Source
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

/// The filter segment an `auto` filter's variant in a negotiated format is
/// stored under (`small.webp`).
pub fn negotiated_segment(filter: &str, extension: &str) -> String {
    format!("{filter}.{extension}")
}

impl Preset {
    /// The filter segments this preset's variants are stored under: its
    /// name, and for an `auto` filter each negotiated format's too.
    pub fn stored_segments(&self) -> Vec<String> {
        let mut segments = vec![self.name.clone()];
        if self.format == OutputFormat::Auto {
            segments.extend(NEGOTIATED_EXTENSIONS.map(|ext| negotiated_segment(&self.name, ext)));
        }
        segments
    }

    pub fn plan(&self, src_width: u32, src_height: u32) -> ResizePlan {
        let full = Rect {
            x: 0,
            y: 0,
            width: src_width,
            height: src_height,
        };
        let (sw, sh) = (f64::from(src_width), f64::from(src_height));
        let (bw, bh) = (f64::from(self.width), f64::from(self.height));
        match self.mode {
            Mode::Inset => {
                let mut scale = (bw / sw).min(bh / sh);
                if !self.upscale {
                    scale = scale.min(1.0);
                }
                ResizePlan {
                    crop: full,
                    width: scaled(sw, scale),
                    height: scaled(sh, scale),
                }
            }
            Mode::Outbound => {
                let mut scale = (bw / sw).max(bh / sh);
                if !self.upscale {
                    scale = scale.min(1.0);
                }
                // Output is the box, shrunk to the scaled source when it cannot cover it.
                let width = self.width.min(scaled(sw, scale));
                let height = self.height.min(scaled(sh, scale));
                let crop_w = ((f64::from(width) / scale).round() as u32).clamp(1, src_width);
                let crop_h = ((f64::from(height) / scale).round() as u32).clamp(1, src_height);
                ResizePlan {
                    crop: Rect {
                        x: (src_width - crop_w) / 2,
                        y: (src_height - crop_h) / 2,
                        width: crop_w,
                        height: crop_h,
                    },
                    width,
                    height,
                }
            }
        }
    }
}

fn scaled(side: f64, scale: f64) -> u32 {
    ((side * scale).round() as u32).max(1)
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
        Ok(Preset {
            name: name.to_string(),
            mode,
            width,
            height,
            upscale: false,
            quality: self.quality,
            format: OutputFormat::Source,
            eager: false,
        })
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
        let mut presets: BTreeMap<String, Preset> =
            toml::from_str(text).map_err(|e| Error::Config(format!("filters: {e}")))?;
        for (name, preset) in presets.iter_mut() {
            if !is_identifier(name) {
                return Err(Error::Config(format!("filters: bad name {name:?}")));
            }
            if preset.width == 0 || preset.height == 0 {
                return Err(Error::Config(format!(
                    "filters.{name}: width and height must be positive"
                )));
            }
            if !(1..=100).contains(&preset.quality) {
                return Err(Error::Config(format!(
                    "filters.{name}: quality must be 1-100"
                )));
            }
            preset.name = name.clone();
        }
        Ok(FilterSet {
            presets,
            sizes: SizeRules::default(),
            avif_max_pixels: 0,
        })
    }

    /// The presets named by `[filters] file`, or the embedded ones, with
    /// the size URLs `[filters]` allows.
    pub fn from_config(config: &Config) -> Result<FilterSet> {
        let mut set = if config.filters.file.is_empty() {
            Self::from_toml(DEFAULT_FILTERS_TOML)?
        } else {
            let text = std::fs::read_to_string(&config.filters.file).map_err(|e| {
                Error::Config(format!("filters.file {:?}: {e}", config.filters.file))
            })?;
            Self::from_toml(&text)?
        };
        set.check_avif_boxes(config.imaging.avif_max_pixels)?;
        set.sizes = SizeRules::from_config(config)?;
        set.avif_max_pixels = config.imaging.avif_max_pixels;
        Ok(set)
    }

    /// AVIF encodes cost seconds for large outputs: a filter may opt in only
    /// with a box of at most `max_pixels`.
    pub fn check_avif_boxes(&self, max_pixels: u64) -> Result<()> {
        for preset in self.iter() {
            let area = u64::from(preset.width) * u64::from(preset.height);
            if preset.format == OutputFormat::Avif && area > max_pixels {
                return Err(Error::Config(format!(
                    "filters.{}: an AVIF box of {}x{} is over imaging.avif_max_pixels ({max_pixels})",
                    preset.name, preset.width, preset.height
                )));
            }
        }
        Ok(())
    }

    /// A configured preset, a negotiated format of an `auto` one
    /// (`small.webp`), else a size URL's (when size URLs are on).
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
        u64::from(preset.width) * u64::from(preset.height) <= self.avif_max_pixels
    }

    /// The presets rendered whenever another filter of an original is.
    pub fn eager(&self) -> impl Iterator<Item = &Preset> {
        self.presets.values().filter(|preset| preset.eager)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(mode: Mode, w: u32, h: u32, upscale: bool) -> Preset {
        Preset {
            name: "t".into(),
            mode,
            width: w,
            height: h,
            upscale,
            quality: 80,
            format: OutputFormat::Source,
            eager: false,
        }
    }

    #[test]
    fn inset_fits_inside_and_never_upscales_by_default() {
        let p = preset(Mode::Inset, 200, 200, false);
        assert_eq!(
            (p.plan(4000, 3000).width, p.plan(4000, 3000).height),
            (200, 150)
        );
        assert_eq!(
            (p.plan(3000, 4000).width, p.plan(3000, 4000).height),
            (150, 200)
        );
        assert_eq!((p.plan(100, 50).width, p.plan(100, 50).height), (100, 50));
        let up = preset(Mode::Inset, 200, 200, true);
        assert_eq!(
            (up.plan(100, 50).width, up.plan(100, 50).height),
            (200, 100)
        );
    }

    #[test]
    fn outbound_covers_and_centre_crops() {
        let p = preset(Mode::Outbound, 300, 300, false);
        let plan = p.plan(4000, 3000);
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
        let plan = p.plan(200, 400);
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
        assert_eq!((w.mode, w.width, w.upscale), (Mode::Inset, 500, false));
        // At most 500 wide, whatever the height.
        let plan = w.plan(1000, 4000);
        assert_eq!((plan.width, plan.height), (500, 2000));
        let plan = w.plan(300, 200);
        assert_eq!((plan.width, plan.height), (300, 200), "never enlarged");
        let square = set.get("x600").unwrap();
        let plan = square.plan(4000, 3000);
        assert_eq!((plan.width, plan.height), (600, 600));
        assert_eq!(plan.crop.x, 500, "centre crop");
        let boxed = set.get("300x400").unwrap();
        let plan = boxed.plan(4000, 3000);
        assert_eq!((plan.width, plan.height), (300, 400));

        assert_eq!(set.get("w1001").unwrap_err().status(), 406);
        assert_eq!(set.get("900x801").unwrap_err().code(), "size-too-large");
        assert_eq!(set.get("w1000").unwrap().width, 1000);
        // A configured preset wins over the grammar.
        assert_eq!(set.get("small").unwrap().width, 200);

        let listed = with_sizes("[filters]\nsize_allowed = [\"w500\", \"300x400\"]\n");
        assert!(listed.get("w500").is_ok());
        let err = listed.get("w501").unwrap_err();
        assert_eq!((err.status(), err.code()), (404, "size-not-allowed"));
        assert_eq!(listed.get("w5000").unwrap_err().status(), 406);

        let off = with_sizes("[filters]\nsize_urls = false\n");
        assert_eq!(off.get("w500").unwrap_err().code(), "unknown-filter");
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
                (p.mode, p.width, p.height, p.upscale),
                (Mode::Inset, side, side, false)
            );
        }
        assert_eq!(set.get("square").unwrap().mode, Mode::Outbound);
        assert_eq!(set.get("nope").unwrap_err().code(), "unknown-filter");
    }
}
