//! What a miss shows: a tiny preview of the variant-to-be, drawn from its
//! original's BlurHash at the variant's shape, once kiln knows the original;
//! a 1x1 otherwise; or no body, or a redirect, as configured.

use std::time::Duration;

use crate::kiln::{get_json, preheat, until_ready, Backend, Kiln, ADMIN_KEY};
use crate::support::{decode, dimensions, eventually, jpeg, mean_rgb, Origin, OriginResponse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_of_a_known_original_shows_its_preview_at_the_variants_shape() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    origin.serve(
        "/red.jpg",
        OriginResponse::image("image/jpeg", jpeg(1200, 800, [210, 30, 30])),
    );
    let record = preheat(&kiln.base, "small", &origin.url("/red.jpg"), None).await;
    until_ready(record["url"].as_str().unwrap()).await;
    let path = record["path"].as_str().unwrap();
    // The record gets its BlurHash just after the variant is stored.
    let media = kiln.url(&format!("/media/{}", record["code"].as_str().unwrap()));
    eventually(Duration::from_secs(10), "the record has a BlurHash", || {
        let media = media.clone();
        async move {
            let (_, record) = get_json(&media, Some(ADMIN_KEY)).await;
            record["blurhash"].is_string().then_some(())
        }
    })
    .await;

    // Other filters of the same original: previews shaped like each variant.
    for (filter, shape) in [("square", (32, 32)), ("large", (32, 21))] {
        let miss = reqwest::get(kiln.url(&format!("/media/cache/{filter}/{path}")))
            .await
            .unwrap();
        assert_eq!(miss.status(), 202, "{filter}");
        assert_eq!(miss.headers()["cache-control"], "no-store");
        assert_eq!(miss.headers()["content-type"], "image/png");
        let png = miss.bytes().await.unwrap();
        assert!(png.len() < 2048, "{filter}: {} bytes", png.len());
        assert_eq!(dimensions(&png), shape, "{filter}");
        let mean = mean_rgb(&decode(&png), 0, 0, shape.0, shape.1);
        assert!(
            mean[0] > 150.0 && mean[2] < 90.0,
            "{filter}: the original's colour {mean:?}"
        );
        // And the real image on the next load.
        let real = until_ready(&kiln.url(&format!("/media/cache/{filter}/{path}")))
            .await
            .bytes()
            .await
            .unwrap();
        assert!(dimensions(&real).0 > 32);
    }

    // An original kiln knows nothing about: the neutral 1x1.
    kiln.store("acme/0/plain.jpg", &jpeg(300, 200, [0, 0, 0]));
    let miss = reqwest::get(kiln.url("/media/cache/small/acme/0/plain.jpg"))
        .await
        .unwrap();
    assert_eq!(miss.status(), 202);
    assert_eq!(dimensions(&miss.bytes().await.unwrap()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_can_carry_no_body_or_redirect_to_a_fallback() {
    let kiln = Kiln::start_with(Backend::Embedded, "[server]\nmiss_body = \"none\"\n").await;
    kiln.store("acme/0/a.jpg", &jpeg(300, 200, [0, 0, 0]));
    let miss = reqwest::get(kiln.url("/media/cache/small/acme/0/a.jpg"))
        .await
        .unwrap();
    assert_eq!(miss.status(), 202);
    assert_eq!(miss.headers()["cache-control"], "no-store");
    assert!(miss.bytes().await.unwrap().is_empty());
    drop(kiln);

    let kiln = Kiln::start_with(
        Backend::Embedded,
        "[server]\nmiss_body = \"redirect\"\nplaceholder_redirect_url = \"https://static.example/loading.png\"\n",
    )
    .await;
    kiln.store("acme/0/a.jpg", &jpeg(300, 200, [0, 0, 0]));
    let url = kiln.url("/media/cache/small/acme/0/a.jpg");
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let miss = no_redirects.get(&url).send().await.unwrap();
    assert_eq!(miss.status(), 302);
    assert_eq!(
        miss.headers()["location"],
        "https://static.example/loading.png"
    );
    assert_eq!(miss.headers()["cache-control"], "no-store");
    // Queued all the same: the real image follows.
    let real = until_ready(&url).await.bytes().await.unwrap();
    assert_eq!(dimensions(&real), (200, 133));
}
