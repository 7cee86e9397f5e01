//! Filter presets and the resize plan they make for a source size. Pure: no
//! I/O beyond reading the presets file named in config, no pixels.

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
}

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

impl Preset {
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

/// 1-64 of `[A-Za-z0-9_-]`: safe as one URL and path segment.
pub fn is_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    presets: BTreeMap<String, Preset>,
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
        Ok(FilterSet { presets })
    }

    /// The presets named by `[filters] file`, or the embedded ones.
    pub fn from_config(config: &Config) -> Result<FilterSet> {
        if config.filters.file.is_empty() {
            return Self::from_toml(DEFAULT_FILTERS_TOML);
        }
        let text = std::fs::read_to_string(&config.filters.file)
            .map_err(|e| Error::Config(format!("filters.file {:?}: {e}", config.filters.file)))?;
        let set = Self::from_toml(&text)?;
        set.check_avif_boxes(config.imaging.avif_max_pixels)?;
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

    pub fn get(&self, name: &str) -> Result<&Preset> {
        self.presets
            .get(name)
            .ok_or_else(|| Error::UnknownFilter(name.chars().take(64).collect()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Preset> {
        self.presets.values()
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
