//! A LiipImagineBundle configuration brought along unchanged: kiln serves
//! its filter sets (`filters.liip_yaml`), turns photos upright first, names
//! WebP bytes WebP whatever the path's extension, and `kiln filters
//! import` writes the same sets as kiln TOML.

use crate::cli::kiln_cli;
use crate::kiln::{preheat, until_ready, Backend, Kiln};
use crate::support::{
    decode, dimensions, format_of, jpeg_with_orientation, mean_rgb, Origin, OriginResponse,
};

const LIIP_YAML: &str = r#"
# config/packages/liip_imagine.yaml, as SAIS had it, plus a framed set.
liip_imagine:
    driver: gd
    resolvers:
        default:
            web_path: { web_root: '%kernel.project_dir%/public', cache_prefix: media/cache }
    default_filter_set_settings:
        format: webp
        quality: 68
    filter_sets:
        auto_rotate: ~
        small:
            filters:
                thumbnail: { size: [200, 200], mode: inset }
        framed:
            format: png
            filters:
                thumbnail: { size: [100, 100] }
                background: { color: '#000000', size: [120, 120], position: center }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liip_yaml_serves_its_sets_upright_and_with_the_right_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("liip_imagine.yaml");
    std::fs::write(&yaml, LIIP_YAML).unwrap();
    let kiln = Kiln::start_with(
        Backend::Embedded,
        &format!(
            "[filters]\nliip_yaml = \"{}\"\n[sais]\ndefault_filters = [\"small\"]\n",
            yaml.display()
        ),
    )
    .await;
    let origin = Origin::start().await;
    // Stored 400x200 with its left half red; EXIF orientation 6 shows it
    // 200x400, red on top. The sets have no auto_rotate.
    origin.serve(
        "/turned.jpg",
        OriginResponse::image("image/jpeg", jpeg_with_orientation(400, 200, 6)),
    );
    let answer = preheat(&kiln.base, "small", &origin.url("/turned.jpg"), None).await;
    let path = answer["path"].as_str().expect("stored path").to_string();
    assert!(path.ends_with(".jpg"), "{path}");

    let small = until_ready(&kiln.url(&format!("/media/cache/small/{path}"))).await;
    assert_eq!(
        small.headers()["content-type"],
        "image/webp",
        "Liip said image/jpeg"
    );
    let bytes = small.bytes().await.unwrap();
    assert_eq!(format_of(&bytes), "webp");
    assert_eq!(dimensions(&bytes), (100, 200), "upright, not sideways");
    let image = decode(&bytes);
    let top = mean_rgb(&image, 10, 10, 90, 90);
    assert!(top[0] > 150.0 && top[2] < 100.0, "red on top: {top:?}");

    // The empty set re-encodes at full size, as WebP.
    let whole = until_ready(&kiln.url(&format!("/media/cache/auto_rotate/{path}"))).await;
    assert_eq!(whole.headers()["content-type"], "image/webp");
    assert_eq!(dimensions(&whole.bytes().await.unwrap()), (200, 400));

    // A chain: outbound 100x100 centred on a 120x120 black canvas, as PNG.
    let framed = until_ready(&kiln.url(&format!("/media/cache/framed/{path}"))).await;
    assert_eq!(framed.headers()["content-type"], "image/png");
    let image = decode(&framed.bytes().await.unwrap());
    assert_eq!((image.width(), image.height()), (120, 120));
    let border = mean_rgb(&image, 0, 0, 120, 8);
    assert!(border.iter().all(|&c| c < 30.0), "black canvas: {border:?}");
    let inside = mean_rgb(&image, 20, 12, 100, 50);
    assert!(inside[0] > 150.0, "red top half of the photo: {inside:?}");
}

#[test]
fn kiln_filters_import_writes_toml_that_loads_as_the_same_sets() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("liip_imagine.yaml");
    std::fs::write(&yaml, LIIP_YAML).unwrap();
    let toml = dir.path().join("filters.toml");
    let kiln = |args: &[&str], env: &[(&str, &str)]| {
        let (ok, text) = kiln_cli(args, env);
        assert!(ok, "kiln {args:?}: {text}");
        text
    };
    kiln(
        &[
            "filters",
            "import",
            yaml.to_str().unwrap(),
            "--output",
            toml.to_str().unwrap(),
        ],
        &[],
    );
    let written = std::fs::read_to_string(&toml).unwrap();
    assert!(
        written.contains("[framed]") && written.contains("background"),
        "{written}"
    );
    // `kiln filters` lists the same presets from the YAML and from the TOML.
    let from_yaml = kiln(
        &["filters"],
        &[("KILN_FILTERS__LIIP_YAML", yaml.to_str().unwrap())],
    );
    let from_toml = kiln(
        &["filters"],
        &[("KILN_FILTERS__FILE", toml.to_str().unwrap())],
    );
    assert_eq!(from_yaml, from_toml);
    for set in ["auto_rotate", "small", "framed"] {
        assert!(from_yaml.contains(set), "{set} missing:\n{from_yaml}");
    }
    assert!(from_yaml.contains("thumbnail inset 200x200"), "{from_yaml}");

    // A filter kiln cannot run is refused, naming it and its set.
    std::fs::write(
        &yaml,
        "liip_imagine:\n  filter_sets:\n    odd:\n      filters:\n        paste_image: { image: a.png }\n",
    )
    .unwrap();
    let (ok, text) = kiln_cli(&["filters", "import", yaml.to_str().unwrap()], &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("filter_sets.odd") && text.contains("paste_image"),
        "{text}"
    );
}
