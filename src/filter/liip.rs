//! LiipImagineBundle's `liip_imagine:` YAML read as kiln presets, and
//! written out as the equivalent kiln TOML (`kiln filters import`).

use std::path::Path;

use serde_yaml::{Mapping, Value};

use super::steps::Step;
use super::PresetSpec;
use crate::error::{Error, Result};

/// Liip's default `quality` when neither the set nor the defaults give one.
const LIIP_DEFAULT_QUALITY: u8 = 100;

/// Liip's filter names kiln runs (`watermark` is the legacy alias).
const KNOWN_FILTERS: [&str; 17] = [
    "thumbnail",
    "fixed",
    "resize",
    "relative_resize",
    "scale",
    "downscale",
    "upscale",
    "crop",
    "background",
    "watermark_image",
    "watermark",
    "strip",
    "auto_rotate",
    "rotate",
    "flip",
    "grayscale",
    "interlace",
];

/// Set settings that only concern Liip's plumbing (kiln's loader, routes
/// and cache are its own): read, reported, not used.
const PLUMBING_SETTINGS: [&str; 6] = [
    "cache",
    "data_loader",
    "default_image",
    "route",
    "png_compression_filter",
    "post_processors",
];

/// The filter sets of a Liip YAML, in file order, with notes on what kiln
/// read but does not use.
#[derive(Debug, Default)]
pub struct LiipImport {
    pub sets: Vec<(String, PresetSpec)>,
    pub notes: Vec<String>,
}

/// Reads `liip_imagine:` (or a document that is its body). `path` is the
/// file's, to resolve relative watermark images from its directory.
pub fn read_yaml(text: &str, path: &Path) -> Result<LiipImport> {
    let bad = |what: String| Error::Config(what);
    let document: Value =
        serde_yaml::from_str(text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let root = match document.get("liip_imagine") {
        Some(root) => root.clone(),
        None if document.get("filter_sets").is_some() => document,
        None => return Err(bad("no liip_imagine: or filter_sets: in the YAML".into())),
    };
    let defaults = match root.get("default_filter_set_settings") {
        None | Some(Value::Null) => Value::Mapping(Mapping::new()),
        Some(defaults @ Value::Mapping(_)) => defaults.clone(),
        Some(_) => return Err(bad("default_filter_set_settings must be a mapping".into())),
    };
    let sets = match root.get("filter_sets") {
        Some(Value::Mapping(sets)) => sets.clone(),
        None | Some(Value::Null) => Mapping::new(),
        Some(_) => return Err(bad("filter_sets must be a mapping".into())),
    };
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut import = LiipImport::default();
    for (name, set) in sets {
        let name = name
            .as_str()
            .ok_or_else(|| bad(format!("filter set name {name:?} is not a string")))?
            .to_string();
        let set = match set {
            Value::Null => Value::Mapping(Mapping::new()),
            set @ Value::Mapping(_) => set,
            _ => return Err(bad(format!("filter_sets.{name} must be a mapping"))),
        };
        let merged = replace_recursive(defaults.clone(), set);
        let spec = set_spec(&name, &merged, base_dir, &mut import.notes)?;
        import.sets.push((name, spec));
    }
    Ok(import)
}

/// PHP's `array_replace_recursive`, which Liip merges the defaults into
/// each set with: keys keep their first position, values are replaced key
/// by key (a list index by index), new keys are appended.
fn replace_recursive(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Mapping(mut base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => {
                        let old = std::mem::replace(slot, Value::Null);
                        *slot = replace_recursive(old, value);
                    }
                    None => {
                        base.insert(key, value);
                    }
                }
            }
            Value::Mapping(base)
        }
        (Value::Sequence(mut base), Value::Sequence(over)) => {
            for (i, value) in over.into_iter().enumerate() {
                match base.get_mut(i) {
                    Some(slot) => {
                        let old = std::mem::replace(slot, Value::Null);
                        *slot = replace_recursive(old, value);
                    }
                    None => base.push(value),
                }
            }
            Value::Sequence(base)
        }
        (_, over) => over,
    }
}

fn set_spec(
    name: &str,
    set: &Value,
    base_dir: &Path,
    notes: &mut Vec<String>,
) -> Result<PresetSpec> {
    let bad = |what: String| Error::Config(format!("filter_sets.{name}: {what}"));
    let Value::Mapping(set) = set else {
        return Err(bad("must be a mapping".into()));
    };
    let mut spec = PresetSpec {
        quality: Some(LIIP_DEFAULT_QUALITY),
        ..PresetSpec::default()
    };
    for (key, value) in set {
        let key = key.as_str().unwrap_or_default();
        let number = |value: &Value| -> Result<u8> {
            value
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| bad(format!("{key} must be a whole number")))
        };
        match key {
            "quality" => spec.quality = Some(number(value)?),
            "jpeg_quality" => spec.jpeg_quality = Some(number(value)?),
            "png_compression_level" => spec.png_compression_level = Some(number(value)?),
            "format" => {
                spec.format = Some(
                    serde_yaml::from_value(value.clone())
                        .map_err(|e| bad(format!("format: {e}")))?,
                )
            }
            "animated" => {
                spec.animated = Some(
                    value
                        .as_bool()
                        .ok_or_else(|| bad("animated must be true or false".into()))?,
                )
            }
            "filters" => spec.filters = steps(name, value, base_dir)?,
            plumbing if PLUMBING_SETTINGS.contains(&plumbing) => {
                if !value.is_null() {
                    notes.push(format!(
                        "filter_sets.{name}.{plumbing} is not used by kiln (it has its own storage, routes and encoders)"
                    ));
                }
            }
            other => return Err(bad(format!("unknown setting {other:?}"))),
        }
    }
    Ok(spec)
}

fn steps(name: &str, filters: &Value, base_dir: &Path) -> Result<Vec<Step>> {
    let bad = |what: String| Error::Config(format!("filter_sets.{name}.filters: {what}"));
    let filters = match filters {
        Value::Null => return Ok(Vec::new()),
        Value::Mapping(filters) => filters,
        _ => return Err(bad("must be a mapping of filter name to options".into())),
    };
    let mut steps = Vec::with_capacity(filters.len());
    for (filter, options) in filters {
        let filter = filter.as_str().unwrap_or_default();
        if !KNOWN_FILTERS.contains(&filter) {
            return Err(bad(format!(
                "kiln has no filter {filter:?} (it runs {})",
                KNOWN_FILTERS.join(", ")
            )));
        }
        let options = match options {
            Value::Null => Value::Mapping(Mapping::new()),
            options => options.clone(),
        };
        let mut tagged = Mapping::new();
        tagged.insert(Value::String(filter.to_string()), options);
        let mut step: Step = serde_yaml::from_value(Value::Mapping(tagged))
            .map_err(|e| bad(format!("{filter}: {e}")))?;
        if let Step::WatermarkImage(mark) = &mut step {
            mark.image = resolve(&mark.image, base_dir);
        }
        steps.push(step);
    }
    Ok(steps)
}

/// Liip's watermark paths are under the project directory, often spelled
/// `%kernel.project_dir%/…`; kiln reads them from the YAML's directory.
fn resolve(image: &str, base_dir: &Path) -> String {
    let image = image.strip_prefix("%kernel.project_dir%/").unwrap_or(image);
    let path = Path::new(image);
    if path.is_absolute() {
        image.to_string()
    } else {
        base_dir.join(path).to_string_lossy().into_owned()
    }
}

/// The kiln TOML of an import: one table per set in the YAML's order, its
/// filters as an ordered list, and the notes as comments.
pub fn to_toml(import: &LiipImport, source: &str) -> Result<String> {
    let failed = |e: toml::ser::Error| Error::Internal(format!("TOML: {e}"));
    let mut out = format!(
        "# kiln filters, imported from the LiipImagineBundle YAML {source}.\n\
         # Defaults are merged into each set; filters run in the order listed.\n"
    );
    for note in &import.notes {
        out.push_str(&format!("# note: {note}\n"));
    }
    for (name, spec) in &import.sets {
        out.push_str(&format!("\n[{name}]\n"));
        let settings = PresetSpec {
            filters: Vec::new(),
            ..spec.clone()
        };
        out.push_str(&toml::to_string(&settings).map_err(failed)?);
        if !spec.filters.is_empty() {
            out.push_str("filters = [\n");
            for step in &spec.filters {
                let value = toml::Value::try_from(step).map_err(failed)?;
                out.push_str(&format!("    {value},\n"));
            }
            out.push_str("]\n");
        }
    }
    Ok(out)
}
