//! `format = "auto"`: the format comes from `Accept` (AVIF, WebP, else the
//! source's), each format asked for is its own stored variant, every answer
//! says `Vary: Accept`, and a real caching proxy keeps the formats apart.

use std::time::Duration;

use crate::kiln::{until_ready, Backend, Kiln};
use crate::support::{dimensions, eventually, format_of, jpeg, Nginx};

const FILTERS: &str = r#"
auto = { mode = "inset", width = 120, height = 120, format = "auto" }
plain = { mode = "inset", width = 120, height = 120 }
# sais.default_filters names these two.
small = { mode = "inset", width = 200, height = 200 }
medium = { mode = "inset", width = 400, height = 400 }
"#;

async fn kiln_with_auto_filter(filters: &tempfile::NamedTempFile) -> Kiln {
    std::fs::write(filters.path(), FILTERS).unwrap();
    let kiln = Kiln::start_with(
        Backend::Embedded,
        &format!("[filters]\nfile = \"{}\"\n", filters.path().display()),
    )
    .await;
    kiln.store("shop/0/p.jpg", &jpeg(480, 360, [200, 120, 40]));
    kiln
}

/// GETs `url` with `accept` until it is a 200; every answer must say `Vary: Accept`.
async fn fetch(client: &reqwest::Client, url: &str, accept: &str) -> (String, bytes::Bytes) {
    eventually(
        Duration::from_secs(30),
        &format!("{url} as {accept}"),
        || {
            let (client, url, accept) = (client.clone(), url.to_string(), accept.to_string());
            async move {
                let response = client
                    .get(&url)
                    .header("accept", &accept)
                    .send()
                    .await
                    .ok()?;
                assert_eq!(response.headers()["vary"], "Accept", "{accept}");
                if response.status() != 200 {
                    assert_eq!(response.status(), 202);
                    return None;
                }
                let cache = response
                    .headers()
                    .get("x-cache-status")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                Some((cache, response.bytes().await.unwrap()))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_picks_the_format_and_each_format_is_one_stored_variant() {
    let filters = tempfile::NamedTempFile::new().unwrap();
    let kiln = kiln_with_auto_filter(&filters).await;
    let client = reqwest::Client::new();
    let url = kiln.url("/media/cache/auto/shop/0/p.jpg");
    for (accept, format) in [
        ("image/avif,image/webp,image/apng,*/*;q=0.8", "avif"),
        ("image/webp,*/*", "webp"),
        ("image/png,*/*;q=0.5", "jpeg"),
        // Other spellings of the same choices reuse those variants.
        ("image/avif, image/webp;q=0.9", "avif"),
        ("image/webp;q=1.0, image/avif;q=0", "webp"),
        ("*/*", "jpeg"),
    ] {
        let (_, bytes) = fetch(&client, &url, accept).await;
        assert_eq!(format_of(&bytes), format, "{accept}");
        if format != "avif" {
            assert_eq!(dimensions(&bytes), (120, 90), "{accept}");
        }
    }
    let stored: Vec<bool> = ["auto", "auto.webp", "auto.avif"]
        .iter()
        .map(|segment| {
            kiln.storage_path(&format!("media/cache/{segment}/shop/0/p.jpg"))
                .is_file()
        })
        .collect();
    assert_eq!(stored, [true, true, true]);
    let dirs = std::fs::read_dir(kiln.storage_path("media/cache"))
        .unwrap()
        .count();
    assert_eq!(
        dirs, 3,
        "three variants, however the Accept headers were spelled"
    );

    // A 304 says it varies too; a filter that does not negotiate does not.
    let webp = client
        .get(&url)
        .header("accept", "image/webp")
        .send()
        .await
        .unwrap();
    let etag = webp.headers()["etag"].clone();
    let not_modified = client
        .get(&url)
        .header("accept", "image/webp")
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["vary"], "Accept");
    let plain = kiln.url("/media/cache/plain/shop/0/p.jpg");
    until_ready(&plain).await;
    let plain = client
        .get(&plain)
        .header("accept", "image/webp")
        .send()
        .await
        .unwrap();
    assert!(plain.headers().get("vary").is_none());
    assert_eq!(format_of(&plain.bytes().await.unwrap()), "jpeg");

    let purge = |path: &str| {
        let request = client
            .delete(kiln.url(path))
            .bearer_auth(crate::kiln::ADMIN_KEY);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    // A purge of one negotiating filter takes every format of it.
    let (status, purged) = purge("/media/cache/auto/shop/0/p.jpg").await;
    assert_eq!(status, 200);
    let variants = purged["variants"].as_array().unwrap();
    for stored in [
        "media/cache/auto/shop/0/p.jpg",
        "media/cache/auto.webp/shop/0/p.jpg",
    ] {
        assert!(variants.iter().any(|v| v == stored), "{stored}: {purged}");
    }
    let webp = client
        .get(&url)
        .header("accept", "image/webp")
        .send()
        .await
        .unwrap();
    assert_eq!(webp.status(), 202, "the WebP is gone too");
    until_ready(&kiln.url("/media/cache/auto/shop/0/p.jpg")).await;

    // A purge of the original takes every format of every filter with it.
    let (status, purged) = purge("/media/cache/*/shop/0/p.jpg").await;
    assert_eq!(status, 200);
    assert_eq!(purged["variants"].as_array().unwrap().len(), 3, "{purged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caching_proxy_honours_vary_and_keeps_formats_apart() {
    let filters = tempfile::NamedTempFile::new().unwrap();
    let kiln = kiln_with_auto_filter(&filters).await;
    let cdn = Nginx::start(kiln.base.trim_start_matches("http://"));
    let client = reqwest::Client::new();
    let url = cdn.url("/media/cache/auto/shop/0/p.jpg");
    let (cache, bytes) = fetch(&client, &url, "image/webp").await;
    assert_eq!((cache.as_str(), format_of(&bytes)), ("MISS", "webp"));
    let (cache, bytes) = fetch(&client, &url, "image/webp").await;
    assert_eq!((cache.as_str(), format_of(&bytes)), ("HIT", "webp"));
    // Another Accept is not served the cached WebP.
    let (_, bytes) = fetch(&client, &url, "image/jpeg").await;
    assert_eq!(format_of(&bytes), "jpeg");
    let (cache, bytes) = fetch(&client, &url, "image/jpeg").await;
    assert_eq!((cache.as_str(), format_of(&bytes)), ("HIT", "jpeg"));
    let (cache, bytes) = fetch(&client, &url, "image/webp").await;
    assert_eq!((cache.as_str(), format_of(&bytes)), ("HIT", "webp"));
}
