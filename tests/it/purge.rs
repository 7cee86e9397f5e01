//! Purge (`DELETE /media/...`, `kiln purge`) and byte ranges over real
//! HTTP: a purged variant answers 202 again and is rendered anew, in every
//! process that held it in memory.

use std::time::Duration;

use crate::kiln::{preheat, setup_account, start_on, until_ready, Backend, Kiln, ADMIN_KEY};
use crate::support::{
    decode, dimensions, eventually, jpeg, mean_rgb, Origin, OriginResponse, RedisServer,
};

on_both_backends!(
    purging_an_original_makes_its_variants_render_again,
    purge_needs_the_owners_key,
    ranges_of_a_variant_answer_206_and_416,
);

const ORIGINAL: &str = "acme/0/photo.jpg";

async fn delete(url: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().delete(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("DELETE");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_default())
}

async fn status_of(url: &str) -> u16 {
    reqwest::get(url).await.expect("GET").status().as_u16()
}

/// Renders `small` and `square` of the stored original and reads each twice
/// (the second from memory).
async fn rendered(kiln: &Kiln) -> [String; 2] {
    let urls = ["small", "square"].map(|f| kiln.url(&format!("/media/cache/{f}/{ORIGINAL}")));
    for url in &urls {
        until_ready(url).await;
        assert_eq!(status_of(url).await, 200);
    }
    urls
}

async fn purging_an_original_makes_its_variants_render_again(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    kiln.store(ORIGINAL, &jpeg(800, 600, [200, 40, 40]));
    let [small, square] = rendered(&kiln).await;

    let (status, purged) = delete(
        &kiln.url(&format!("/media/cache/*/{ORIGINAL}")),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(
        purged["variants"],
        serde_json::json!([
            format!("media/cache/small/{ORIGINAL}"),
            format!("media/cache/square/{ORIGINAL}")
        ])
    );
    assert!(purged["original"].is_null());
    assert!(!kiln
        .storage_path(&format!("media/cache/small/{ORIGINAL}"))
        .exists());
    assert!(kiln.storage_path(ORIGINAL).exists(), "original kept");

    // Not served from memory: a miss again, then rendered from the new original.
    kiln.store(ORIGINAL, &jpeg(800, 600, [40, 40, 200]));
    assert_eq!(status_of(&small).await, 202);
    let bytes = until_ready(&small).await.bytes().await.unwrap();
    assert_eq!(dimensions(&bytes), (200, 150));
    let mean = mean_rgb(&decode(&bytes), 0, 0, 200, 150);
    assert!(mean[2] > 150.0 && mean[0] < 90.0, "rendered anew: {mean:?}");
    assert_eq!(status_of(&square).await, 202, "every filter was purged");

    // One filter only.
    until_ready(&square).await;
    let (status, purged) = delete(
        &kiln.url(&format!("/media/cache/square/{ORIGINAL}")),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["variants"].as_array().unwrap().len(), 1);
    assert_eq!(status_of(&small).await, 200);
    assert_eq!(status_of(&square).await, 202);
    until_ready(&square).await;

    // With the original: the source is gone, so the next request is a 404.
    let (status, purged) = delete(
        &kiln.url(&format!("/media/cache/*/{ORIGINAL}?original=1")),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["original"], ORIGINAL);
    assert!(!kiln.storage_path(ORIGINAL).exists());
    assert_eq!(status_of(&small).await, 404);

    // By media code: a pre-heated original, its variant and its record.
    let origin = Origin::start().await;
    origin.serve(
        "/a.jpg",
        OriginResponse::image("image/jpeg", jpeg(640, 480, [10, 160, 10])),
    );
    let record = preheat(&kiln.base, "small", &origin.url("/a.jpg"), None).await;
    let code = record["code"].as_str().unwrap().to_string();
    let variant = record["url"].as_str().unwrap().to_string();
    until_ready(&variant).await;
    let media = kiln.url(&format!("/media/{code}"));
    let (_, before) = crate::kiln::get_json(&media, Some(ADMIN_KEY)).await;
    assert_eq!(before["thumbData"]["small"]["marking"], "done", "{before}");

    // The variant alone: the record stops saying it is done.
    let path = record["path"].as_str().unwrap();
    let (status, purged) = delete(
        &kiln.url(&format!("/media/cache/small/{path}")),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    let (_, after) = crate::kiln::get_json(&media, Some(ADMIN_KEY)).await;
    assert_eq!(after["thumbData"]["small"]["marking"], "new", "{after}");
    assert!(after["resized"].get("small").is_none(), "{after}");
    assert_eq!(after["marking"], "downloaded", "{after}");
    // Rendered again, and the record says so once the job has written it.
    until_ready(&variant).await;
    eventually(
        Duration::from_secs(10),
        "the record to say done",
        || async {
            let (_, again) = crate::kiln::get_json(&media, Some(ADMIN_KEY)).await;
            (again["thumbData"]["small"]["marking"] == "done").then_some(())
        },
    )
    .await;

    let (status, purged) = delete(
        &kiln.url(&format!("/media/{code}?original=1")),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["record"], code.as_str());
    assert_eq!(purged["variants"].as_array().unwrap().len(), 1);
    let (status, _) =
        crate::kiln::get_json(&kiln.url(&format!("/media/{code}")), Some(ADMIN_KEY)).await;
    assert_eq!(status, 404, "record removed");

    // A whole filter, after its definition changed.
    kiln.store("acme/0/b.jpg", &jpeg(300, 300, [90, 90, 90]));
    let b = kiln.url("/media/cache/small/acme/0/b.jpg");
    until_ready(&b).await;
    let (status, purged) = delete(&kiln.url("/media/cache/small"), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(
        purged["variants"],
        serde_json::json!(["media/cache/small/acme/0/b.jpg"])
    );
    assert_eq!(status_of(&b).await, 202);
}

async fn purge_needs_the_owners_key(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let acme = setup_account(&kiln.base, "acme", 10).await;
    let other = setup_account(&kiln.base, "other", 10).await;
    kiln.store(ORIGINAL, &jpeg(400, 300, [200, 200, 40]));
    let [small, _] = rendered(&kiln).await;
    let target = kiln.url(&format!("/media/cache/*/{ORIGINAL}"));

    let (status, body) = delete(&target, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = delete(&target, other["apiKey"].as_str()).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = delete(&kiln.url("/media/cache/small"), acme["apiKey"].as_str()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "a whole filter is the admin's"
    );
    let (status, body) = delete(&kiln.url("/media/cache/*/acme/a%00b.jpg"), Some(ADMIN_KEY)).await;
    assert_eq!(status, 400, "{body}");
    // kiln's own files are no original, even to the admin.
    let own = kiln.url("/media/cache/*/accounts/acme.json?original=1");
    let (status, body) = delete(&own, Some(ADMIN_KEY)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid-path"))
    );
    assert!(kiln.storage_path("accounts/acme.json").exists());
    assert_eq!(
        status_of(&small).await,
        200,
        "nothing purged by refused requests"
    );

    let (status, body) = delete(&target, acme["apiKey"].as_str()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["variants"].as_array().unwrap().len(), 2);
    assert_eq!(status_of(&small).await, 202);
}

async fn ranges_of_a_variant_answer_206_and_416(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    kiln.store(ORIGINAL, &jpeg(800, 600, [120, 80, 200]));
    let [small, _] = rendered(&kiln).await;
    let whole = reqwest::get(&small).await.unwrap();
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    let whole = whole.bytes().await.unwrap();
    let client = reqwest::Client::new();

    let part = client
        .get(&small)
        .header("range", "bytes=10-109")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 10-109/{}", whole.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap(), whole.slice(10..110));

    let tail = client
        .get(&small)
        .header("range", "bytes=-16")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap(), whole.slice(whole.len() - 16..));

    let past = client
        .get(&small)
        .header("range", format!("bytes={}-", whole.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    assert_eq!(
        past.headers()["content-range"],
        format!("bytes */{}", whole.len()).as_str()
    );

    // HEAD describes the whole; a miss ignores Range.
    let head = client
        .head(&small)
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        whole.len().to_string().as_str()
    );
    kiln.store("acme/0/new.jpg", &jpeg(100, 100, [0, 0, 0]));
    let miss = client
        .get(kiln.url("/media/cache/small/acme/0/new.jpg"))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(miss.status(), 202);
}

/// Two fronts over one Redis and one storage: a purge through one drops the
/// variant from the other's memory too (the purge channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_reaches_every_front_sharing_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (_a, a) = start_on(&redis, dir.path(), "");
    let (_b, b) = start_on(&redis, dir.path(), "");
    std::fs::create_dir_all(dir.path().join("acme/0")).unwrap();
    std::fs::write(dir.path().join(ORIGINAL), jpeg(640, 480, [250, 250, 250])).unwrap();
    let path = format!("/media/cache/small/{ORIGINAL}");
    until_ready(&format!("{a}{path}")).await;
    // Both hold it in memory now.
    for base in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(status_of(&format!("{base}{path}")).await, 200);
        }
    }
    let (status, body) = delete(&format!("{a}/media/cache/*/{ORIGINAL}"), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{body}");
    eventually(
        Duration::from_secs(5),
        "the other front forgets the purged variant",
        || {
            let url = format!("{b}{path}");
            async move { (status_of(&url).await == 202).then_some(()) }
        },
    )
    .await;
}

async fn body_of(url: &str) -> Vec<u8> {
    let response = reqwest::get(url).await.expect("GET");
    assert_eq!(response.status(), 200, "{url}");
    response.bytes().await.unwrap().to_vec()
}

/// Fronts that keep no bytes in memory read variants through descriptors
/// they keep open. Once another front has purged a variant and it has been
/// rendered anew from a changed original, each serves the new file, never
/// the purged one its descriptor still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_open_variant_is_not_served_after_another_front_purged_it() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cold = "[index]\nhot_max_object_bytes = 0\n";
    let (_a, a) = start_on(&redis, dir.path(), cold);
    let (_b, b) = start_on(&redis, dir.path(), cold);
    std::fs::create_dir_all(dir.path().join("acme/0")).unwrap();
    std::fs::write(dir.path().join(ORIGINAL), jpeg(640, 480, [230, 230, 230])).unwrap();
    let path = format!("/media/cache/small/{ORIGINAL}");
    until_ready(&format!("{a}{path}")).await;
    let light = body_of(&format!("{a}{path}")).await;
    for base in [&a, &b] {
        for _ in 0..2 {
            let body = body_of(&format!("{base}{path}")).await;
            assert!(body == light, "{base}: {} bytes", body.len());
        }
    }

    std::fs::write(dir.path().join(ORIGINAL), jpeg(640, 480, [10, 10, 10])).unwrap();
    let (status, body) = delete(&format!("{a}/media/cache/*/{ORIGINAL}"), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{body}");
    until_ready(&format!("{a}{path}")).await;
    until_ready(&format!("{b}{path}")).await;
    for base in [&a, &b] {
        let body = body_of(&format!("{base}{path}")).await;
        let red = mean_rgb(&decode(&body), 0, 0, 8, 8)[0];
        assert!(
            body != light && red < 60.0,
            "{base} served the purged render"
        );
    }
}
