//! kiln as a CDN's origin, behind a real caching proxy (nginx
//! `proxy_cache`): 202s pass through uncached, 200s are cached and served
//! without kiln, revalidation gets kiln's 304, HEAD and Range work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::kiln::{Backend, Kiln};
use crate::support::{dimensions, eventually, jpeg, Nginx};

fn cache_status(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caching_proxy_never_keeps_a_202_and_serves_200s_without_kiln() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let cdn = Nginx::start(kiln.base.trim_start_matches("http://"));
    kiln.store("shop/0/shoe.jpg", &jpeg(1000, 800, [30, 120, 220]));
    let path = "/media/cache/small/shop/0/shoe.jpg";
    let client = reqwest::Client::new();

    // Through the CDN: 202s until the render lands, none of them cached.
    let busy = AtomicUsize::new(0);
    let image = eventually(
        Duration::from_secs(30),
        "the CDN passes the image through",
        || {
            let (client, url, busy) = (client.clone(), cdn.url(path), &busy);
            async move {
                let response = client.get(url).send().await.ok()?;
                match response.status().as_u16() {
                    202 => {
                        assert_ne!(cache_status(&response), "HIT", "a 202 was cached");
                        busy.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                    200 => Some(response),
                    other => panic!("unexpected {other}"),
                }
            }
        },
    )
    .await;
    assert!(busy.into_inner() >= 1, "the first answer was a 202");
    assert_eq!(cache_status(&image), "MISS", "the 200 came from kiln");
    let etag = image.headers()["etag"].to_str().unwrap().to_string();
    let bytes = image.bytes().await.unwrap();
    assert_eq!(dimensions(&bytes), (200, 160));

    // Revalidation: an expired copy is checked with kiln's ETag and kiln answers 304.
    let short = format!("/short{path}");
    let first = client.get(cdn.url(&short)).send().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), cache_status(&first).as_str()),
        (200, "MISS")
    );
    let revalidated = eventually(
        Duration::from_secs(10),
        "the short-lived copy is revalidated",
        || {
            let (client, url) = (client.clone(), cdn.url(&short));
            async move {
                let response = client.get(url).send().await.ok()?;
                assert_eq!(response.status(), 200);
                (cache_status(&response) == "REVALIDATED").then_some(response)
            }
        },
    )
    .await;
    assert_eq!(revalidated.bytes().await.unwrap(), bytes);

    // kiln stops: the CDN keeps serving the cached 200, its 304, HEAD and ranges.
    drop(kiln);
    let cached = client.get(cdn.url(path)).send().await.unwrap();
    assert_eq!(
        (cached.status().as_u16(), cache_status(&cached).as_str()),
        (200, "HIT")
    );
    assert_eq!(cached.headers()["content-type"], "image/jpeg");
    assert_eq!(cached.bytes().await.unwrap(), bytes);

    let not_modified = client
        .get(cdn.url(path))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);

    let head = client.head(cdn.url(path)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
    assert!(head.bytes().await.unwrap().is_empty());

    let part = client
        .get(cdn.url(path))
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap(), bytes.slice(0..100));
    assert!(
        cdn.error_log().lines().all(|l| !l.contains("[emerg]")),
        "{}",
        cdn.error_log()
    );
}
