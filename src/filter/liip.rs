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
        // serde_yaml reads enums from YAML tags; Liip writes `name: options`,
        // which is serde's usual externally tagged shape: read it as JSON.
        let mut step: Step = serde_json::to_value(Value::Mapping(tagged))
            .and_then(serde_json::from_value)
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
pub(crate) fn resolve(image: &str, base_dir: &Path) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{FilterSet, OutputFormat};

    /// SAIS's configuration (Feb 2025) with a few more Liip features.
    const SAIS_YAML: &str = r#"
liip_imagine:
    driver: imagick
    default_filter_set_settings:
        format: webp
        quality: 68
        filters:
            strip: ~
            thumbnail: { size: [100, 100], mode: inset }
    filter_sets:
        auto_rotate: ~
        tiny:
            filters:
                thumbnail: { size: [125, 125], mode: inset }
        small:
            quality: 80
            filters:
                thumbnail: { size: [200, 200], allow_upscale: true }
                background: { color: '#000', size: [220, 220], position: bottomright }
        framed:
            format: png
            png_compression_level: 9
            cache: default
            filters:
                relative_resize: { widen: 300 }
                watermark_image: { image: '%kernel.project_dir%/marks/logo.png', size: 50%, position: multiple }
"#;

    fn import() -> LiipImport {
        read_yaml(SAIS_YAML, Path::new("/srv/app/config/liip_imagine.yaml")).unwrap()
    }

    fn spec<'a>(import: &'a LiipImport, name: &str) -> &'a PresetSpec {
        &import.sets.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn defaults_merge_into_each_set_as_liip_merges_them() {
        let import = import();
        let names: Vec<&str> = import.sets.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["auto_rotate", "tiny", "small", "framed"],
            "file order"
        );

        // An empty set (SAIS's `auto_rotate: ~`) is the defaults alone.
        let empty = spec(&import, "auto_rotate");
        assert_eq!(empty.format, Some(OutputFormat::Webp));
        assert_eq!(empty.quality, Some(68));
        assert_eq!(
            empty.filters.iter().map(Step::name).collect::<Vec<_>>(),
            ["strip", "thumbnail"]
        );

        // Default filters first; a set's filter of the same name replaces
        // its options key by key (mode kept from the defaults); new ones after.
        let small = spec(&import, "small");
        assert_eq!(small.quality, Some(80));
        let names: Vec<&str> = small.filters.iter().map(Step::name).collect();
        assert_eq!(names, ["strip", "thumbnail", "background"]);
        let Step::Thumbnail(thumb) = &small.filters[1] else {
            panic!("{:?}", small.filters)
        };
        assert_eq!(thumb.size.0, [Some(200), Some(200)]);
        assert_eq!(thumb.mode, crate::filter::Mode::Inset);
        assert!(thumb.allow_upscale);

        let framed = spec(&import, "framed");
        assert_eq!(framed.format, Some(OutputFormat::Png));
        assert_eq!(framed.png_compression_level, Some(9));
        let Some(Step::WatermarkImage(mark)) = framed.filters.last() else {
            panic!("{:?}", framed.filters)
        };
        assert_eq!(mark.image, "/srv/app/config/marks/logo.png");
        assert!(import.notes.iter().any(|n| n.contains("framed.cache")));
    }

    #[test]
    fn the_written_toml_loads_as_the_same_presets() {
        let import = import();
        let toml = to_toml(&import, "liip_imagine.yaml").unwrap();
        assert!(toml.contains("[small]"), "{toml}");
        assert!(toml.contains("# note:"), "{toml}");
        let from_toml = FilterSet::from_toml(&toml).unwrap();
        for (name, spec) in &import.sets {
            let preset = from_toml.get(name).unwrap();
            assert_eq!(*preset, spec.compile(name).unwrap(), "{name}:\n{toml}");
        }
        // Liip's default quality is 100, written out, not left to kiln's 82.
        let bare = read_yaml(
            "filter_sets:\n  plain:\n    filters:\n      grayscale: ~\n",
            Path::new("x.yaml"),
        )
        .unwrap();
        assert_eq!(bare.sets[0].1.quality, Some(100));
        assert!(to_toml(&bare, "x.yaml").unwrap().contains("quality = 100"));
    }

    #[test]
    fn what_kiln_cannot_run_is_refused_with_its_place() {
        for (yaml, expected) in [
            (
                "filter_sets:\n  a:\n    filters:\n      paste_image: { image: x.png }\n",
                "filter_sets.a.filters: kiln has no filter \"paste_image\"",
            ),
            (
                "filter_sets:\n  a:\n    filters:\n      thumbnail: { size: [1, 1], sharpen: 2 }\n",
                "unknown field `sharpen`",
            ),
            (
                "filter_sets:\n  a:\n    jpeg_quality: high\n",
                "jpeg_quality must be a whole number",
            ),
            (
                "filter_sets:\n  a:\n    colour: red\n",
                "unknown setting \"colour\"",
            ),
            ("liip_imagine:\n  driver: gd\n", ""),
            ("just: text\n", "no liip_imagine"),
        ] {
            match read_yaml(yaml, Path::new("x.yaml")) {
                Ok(import) => assert!(expected.is_empty() && import.sets.is_empty(), "{yaml}"),
                Err(e) => assert!(
                    !expected.is_empty() && e.to_string().contains(expected),
                    "{yaml}: {e}"
                ),
            }
        }
    }
}
