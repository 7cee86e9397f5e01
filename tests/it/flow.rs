//! The hit/miss loop over real HTTP, as one contract run against both
//! backends: pre-heat with callbacks, 202 → 200, hits with validators,
//! dedupe, storage as the source of truth, and the error answers.

use std::time::Duration;

use crate::kiln::{preheat_url, until_ready, Backend, Kiln, ADMIN_KEY};
use crate::support::{
    decode, dimensions, eventually, format_of, jpeg, jpeg_with_orientation, mean_rgb,
    png_header_claiming, png_rgba, CallbackSink, Origin, OriginResponse,
};

on_both_backends!(
    preheat_downloads_renders_stores_and_calls_back,
    miss_answers_202_then_the_same_url_answers_200,
    concurrent_requests_make_one_job_and_one_fetch,
    variant_in_storage_but_not_in_index_is_served,
    exif_orientation_is_applied_before_resizing,
    failed_download_calls_back_with_the_reason,
    bad_requests_get_clear_errors,
    webhooks_leave_when_their_job_is_done_not_at_the_next_poll,
    misses_of_two_filters_at_once_both_land_in_the_media_record,
    kilns_own_files_are_never_an_original,
    a_variant_deleted_behind_kilns_back_is_rendered_again,
    a_job_whose_record_is_unreadable_ends_dead_lettered,
    a_job_slower_than_the_visibility_timeout_runs_once,
);

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::get(url).await.expect("request")
}

async fn preheat_downloads_renders_stores_and_calls_back(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/photos/cat.jpg",
        OriginResponse::image("image/jpeg", jpeg(1200, 800, [200, 60, 40])),
    );
    let image_url = origin.url("/photos/cat.jpg");
    let callback = sink.url("/hooks/thumb?code=abc&x=1");

    let response = reqwest::Client::new()
        .post(kiln.url("/request/small"))
        .bearer_auth(ADMIN_KEY)
        .query(&[("url", image_url.as_str()), ("callback", callback.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let record = json(&response.text().await.unwrap());
    let code = kiln::keys::media_code(&image_url, "default");
    assert_eq!(record["code"], code);
    let path = record["path"].as_str().unwrap().to_string();
    assert_eq!(path, format!("default/0/{code}.jpg"));
    let variant_url = record["url"].as_str().unwrap().to_string();
    assert_eq!(variant_url, kiln.url(&format!("/media/cache/small/{path}")));

    let received = sink.wait_for(1, Duration::from_secs(30)).await;
    let hook = &received[0];
    assert_eq!(hook.method, "POST");
    assert_eq!(
        hook.path_and_query, "/hooks/thumb?code=abc&x=1",
        "callback URL used exactly as given"
    );
    let body = &hook.body;
    assert_eq!(body["status"], "done");
    assert_eq!(body["code"], code);
    assert_eq!(body["path"], path);
    assert_eq!(body["filter"], "small");
    assert_eq!(body["url"], variant_url);
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(200), Some(133))
    );
    assert_eq!(body["originalWidth"], 1200);
    let blurhash = body["blurhash"].as_str().expect("blurhash");
    assert_eq!(blurhash.len(), 28, "4x3 components: {blurhash}");
    assert!(hook.header("webhook-id").is_some());

    // The original is archived in storage, the variant served with validators.
    let archived = std::fs::read(kiln.storage_path(&path)).expect("original archived");
    assert_eq!(format_of(&archived), "jpeg");
    let hit = get(&variant_url).await;
    assert_eq!(hit.status(), 200);
    let headers = hit.headers().clone();
    assert_eq!(headers["content-type"], "image/jpeg");
    assert_eq!(
        headers["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let etag = headers["etag"].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && !etag.starts_with("W/"),
        "{etag}"
    );
    assert!(headers.contains_key("last-modified"));
    let bytes = hit.bytes().await.unwrap();
    assert_eq!(headers["content-length"], bytes.len().to_string());
    assert_eq!(body["size"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(format_of(&bytes), "jpeg");
    assert_eq!(dimensions(&bytes), (200, 133));
    let mean = mean_rgb(&decode(&bytes), 0, 0, 200, 133);
    assert!(mean[0] > 170.0 && mean[1] < 110.0, "colour kept: {mean:?}");

    let client = reqwest::Client::new();
    let head = client.head(&variant_url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], bytes.len().to_string());
    assert_eq!(head.headers()["etag"], etag.as_str());
    assert!(head.bytes().await.unwrap().is_empty());
    let not_modified = client
        .get(&variant_url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], etag.as_str());
    let changed = client
        .get(&variant_url)
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    // Header lines of one name make one list (RFC 9110 §5.3).
    let second_line = client
        .get(&variant_url)
        .header("if-none-match", "\"something-else\"")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(second_line.status(), 304);

    // Asking again: done, 200, nothing fetched again.
    let again = get(&preheat_url(&kiln.base, "small", &image_url, None)).await;
    assert_eq!(again.status(), 200);
    let again = json(&again.text().await.unwrap());
    assert_eq!(again["status"], "done");
    assert_eq!(again["record"]["marking"], "resized");
    assert_eq!(again["record"]["mimeType"], "image/jpeg");
    assert_eq!(origin.hits("/photos/cat.jpg"), 1);
}

/// The outbox is polled only for what other processes schedule: a job's
/// webhooks wake this process's deliverer, job after job.
async fn webhooks_leave_when_their_job_is_done_not_at_the_next_poll(backend: Backend) {
    let kiln = Kiln::start_with(backend, "[callback]\npoll_ms = 600000").await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    for (n, colour) in [[200, 60, 40], [40, 60, 200], [60, 200, 40]]
        .into_iter()
        .enumerate()
    {
        let path = format!("/photos/{n}.jpg");
        origin.serve(
            &path,
            OriginResponse::image("image/jpeg", jpeg(640, 480, colour)),
        );
        let callback = sink.url(&format!("/hooks/thumb?n={n}"));
        let response = get(&preheat_url(
            &kiln.base,
            "small",
            &origin.url(&path),
            Some(&callback),
        ))
        .await;
        assert_eq!(response.status(), 202);
        // Well inside the ten-minute poll.
        let received = sink.wait_for(n + 1, Duration::from_secs(30)).await;
        assert_eq!(received[n].path_and_query, format!("/hooks/thumb?n={n}"));
        assert_eq!(received[n].body["status"], "done");
    }
}

async fn miss_answers_202_then_the_same_url_answers_200(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    kiln.store("acme/0/logo.png", &png_rgba(900, 600, [20, 200, 40, 128]));
    let url = kiln.url("/media/cache/medium/acme/0/logo.png");

    let miss = get(&url).await;
    assert_eq!(miss.status(), 202);
    assert_eq!(miss.headers()["cache-control"], "no-store");
    assert_eq!(miss.headers()["retry-after"], "2");
    assert_eq!(miss.headers()["content-type"], "image/png");
    let placeholder = miss.bytes().await.unwrap();
    assert_eq!(dimensions(&placeholder), (1, 1));

    let hit = until_ready(&url).await;
    assert_eq!(
        hit.headers()["content-type"],
        "image/png",
        "format kept from the source"
    );
    let bytes = hit.bytes().await.unwrap();
    assert_eq!(format_of(&bytes), "png");
    assert_eq!(dimensions(&bytes), (400, 267));
    let pixels = decode(&bytes).to_rgba8();
    assert!(
        (100..=156).contains(&pixels.get_pixel(200, 130).0[3]),
        "alpha kept"
    );

    // Liip's resolve URL redirects once the variant exists.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resolved = no_redirects
        .get(kiln.url("/media/cache/resolve/medium/acme/0/logo.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(resolved.status(), 302);
    assert_eq!(resolved.headers()["location"], url.as_str());
}

async fn concurrent_requests_make_one_job_and_one_fetch(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    // A slow origin keeps the job in flight while everyone asks.
    origin.serve(
        "/big.jpg",
        OriginResponse::image("image/jpeg", jpeg(1600, 1200, [30, 90, 200]))
            .with_delay(Duration::from_millis(500)),
    );
    let image_url = origin.url("/big.jpg");
    // 25 callers, each with its callback, and each asking twice: one
    // webhook per caller (an identical callback is attached once).
    let answers = futures::future::join_all((0..50).map(|n| {
        let callback = sink.url(&format!("/cb?caller={}", n % 25));
        let request = preheat_url(&kiln.base, "large", &image_url, Some(&callback));
        async move {
            let r = get(&request).await;
            (r.status().as_u16(), json(&r.text().await.unwrap()))
        }
    }))
    .await;
    assert!(
        answers.iter().all(|(status, _)| *status == 202),
        "{answers:?}"
    );
    let queued = answers
        .iter()
        .filter(|(_, body)| body["queued"] == true)
        .count();
    assert_eq!(queued, 1, "one job however many ask");

    let path = answers[0].1["path"].as_str().unwrap().to_string();
    let variant = kiln.url(&format!("/media/cache/large/{path}"));
    let misses = futures::future::join_all((0..25).map(|_| get(&variant))).await;
    assert!(misses
        .iter()
        .all(|r| r.status() == 202 || r.status() == 200));

    until_ready(&variant).await;
    // Every caller that attached a callback is called back, from the one render.
    let received = sink.wait_for(25, Duration::from_secs(30)).await;
    assert!(received.iter().all(|r| r.body["status"] == "done"));
    let callers: std::collections::BTreeSet<&str> =
        received.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(callers.len(), 25, "each caller once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 25, "no caller twice");
    assert_eq!(origin.hits("/big.jpg"), 1, "exactly one origin fetch");
}

async fn variant_in_storage_but_not_in_index_is_served(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    // Bytes are JPEG whatever the extension says.
    let bytes = jpeg(120, 80, [10, 10, 240]);
    kiln.store("media/cache/small/ext/0/pic.png", &bytes);
    let hit = get(&kiln.url("/media/cache/small/ext/0/pic.png")).await;
    assert_eq!(
        hit.status(),
        200,
        "served from storage, never re-rendered (the original is not even stored)"
    );
    assert_eq!(hit.headers()["content-type"], "image/jpeg");
    assert_eq!(hit.bytes().await.unwrap().as_ref(), bytes.as_slice());
}

async fn exif_orientation_is_applied_before_resizing(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    // 400x200 stored sideways; orientation 6 means "rotate 90° clockwise to view".
    kiln.store("acme/0/turned.jpg", &jpeg_with_orientation(400, 200, 6));
    let bytes = until_ready(&kiln.url("/media/cache/small/acme/0/turned.jpg"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(dimensions(&bytes), (100, 200), "upright: portrait");
    let img = decode(&bytes);
    // Left half red becomes the top half once rotated clockwise.
    let top = mean_rgb(&img, 0, 0, 100, 90);
    let bottom = mean_rgb(&img, 0, 110, 100, 200);
    assert!(top[0] > 180.0 && top[2] < 80.0, "top is red: {top:?}");
    assert!(
        bottom[2] > 180.0 && bottom[0] < 80.0,
        "bottom is blue: {bottom:?}"
    );
    assert!(
        !bytes.windows(4).any(|w| w == b"Exif"),
        "metadata not carried over"
    );
}

async fn failed_download_calls_back_with_the_reason(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/page.html",
        OriginResponse::image("text/html", b"<html>hi</html>".to_vec()),
    );
    // A few dozen bytes claiming 2.5 gigapixels: refused from the header, before any allocation.
    origin.serve(
        "/bomb.png",
        OriginResponse::image("image/png", png_header_claiming(50_000, 50_000)),
    );
    origin.serve(
        "/vector.svg",
        OriginResponse::image(
            "image/svg+xml",
            b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>".to_vec(),
        ),
    );
    for (path, error, status) in [
        ("/gone.jpg", "origin-status", 404),
        ("/page.html", "unsupported-image", 422),
        ("/bomb.png", "image-too-large", 413),
        ("/vector.svg", "unsupported-image", 422),
    ] {
        let request = preheat_url(&kiln.base, "tiny", &origin.url(path), Some(&sink.url(path)));
        assert_eq!(get(&request).await.status(), 202);
        let hook = eventually(Duration::from_secs(30), "failure callback", || async {
            sink.received()
                .into_iter()
                .find(|h| h.path_and_query == path)
        })
        .await;
        assert_eq!(hook.body["status"], "failed");
        assert_eq!(hook.body["error"]["code"], error);
        assert_eq!(hook.body["marking"], "failed");
        // Asking again answers the failure at once, without another download.
        let again = get(&request).await;
        assert_eq!(again.status(), status, "{path}");
        let record = json(&again.text().await.unwrap());
        assert_eq!(record["status"], "failed");
        assert_eq!(record["queued"], false);
        assert_eq!(record["record"]["marking"], "failed");
        assert_eq!(record["record"]["error"]["code"], error);
        assert_eq!(origin.hits(path), 1, "{path} was downloaded again");
    }
}

async fn bad_requests_get_clear_errors(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    kiln.store("acme/0/a.png", &png_rgba(10, 10, [0, 0, 0, 255]));
    let cases: &[(&str, u16, &str)] = &[
        ("/media/cache/nope/acme/0/a.png", 404, "unknown-filter"),
        (
            "/media/cache/small/acme/0/missing.png",
            404,
            "source-not-found",
        ),
        ("/media/cache/small/../secret.png", 400, "invalid-path"),
        (
            "/media/cache/small/acme/%2e%2e/%2e%2e/secret.png",
            400,
            "invalid-path",
        ),
        (
            "/media/cache/small/acme/%252e%252e/secret.png",
            400,
            "invalid-path",
        ),
        (
            "/media/cache/small/acme/..%5c..%5csecret.png",
            400,
            "invalid-path",
        ),
        (
            "/media/cache/small/acme\\..\\secret.png",
            400,
            "invalid-path",
        ),
        ("/media/cache/small/acme/%00.png", 400, "invalid-path"),
        ("/media/cache/small//etc/passwd", 400, "invalid-path"),
        ("/request/small?token=test-admin-key-0123456789", 400, "bad-request"),
        (
            "/request/small?url=http://127.0.0.1/a.jpg",
            401,
            "unauthorized",
        ),
        (
            "/request/small?url=http://127.0.0.1/a.jpg&token=wrong-key",
            401,
            "unauthorized",
        ),
        (
            "/request/nope?url=http://127.0.0.1/a.jpg&token=test-admin-key-0123456789",
            404,
            "unknown-filter",
        ),
        (
            "/request/small?url=ftp://127.0.0.1/a.jpg&token=test-admin-key-0123456789",
            400,
            "invalid-url",
        ),
        (
            "/request/small?url=http://10.1.2.3/a.jpg&token=test-admin-key-0123456789",
            403,
            "address-denied",
        ),
        (
            "/request/small?url=http://169.254.169.254/latest&token=test-admin-key-0123456789",
            403,
            "address-denied",
        ),
        (
            "/request/small?url=http://127.0.0.1/a.jpg&callback=http://192.168.1.1/cb&token=test-admin-key-0123456789",
            403,
            "address-denied",
        ),
        ("/nothing/here", 404, "no-route"),
    ];
    // /request bounds its URLs as a dispatch does (sais.max_url_bytes).
    let long = "a".repeat(4100);
    let long_url = format!("/request/small?url=http://127.0.0.1/{long}.jpg&token={ADMIN_KEY}");
    let long_callback = format!(
        "/request/small?url=http://127.0.0.1/a.jpg&callback=http://127.0.0.1/{long}&token={ADMIN_KEY}"
    );
    let long_cases = [
        (long_url.as_str(), 400, "invalid-url"),
        (long_callback.as_str(), 400, "invalid-url"),
    ];
    for (path, status, code) in cases.iter().chain(&long_cases) {
        // Raw request line, so the client does not tidy the path first.
        let (got_status, body) = raw_get(&kiln.base, path).await;
        assert_eq!(got_status, *status, "{path}: {body}");
        let body = json(&body);
        assert_eq!(body["error"], *code, "{path}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let client = reqwest::Client::new();
    let delete = client.delete(kiln.url("/healthz")).send().await.unwrap();
    assert_eq!(delete.status(), 405);
    // A 405 says what the route takes (RFC 9110 §15.5.6).
    assert_eq!(delete.headers()["allow"], "GET, HEAD");
    let post = client
        .post(kiln.url("/media/cache/small/acme/0/a.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD, DELETE");
    let head = client
        .head(kiln.url("/fetch/media/by-ids?id=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 401, "HEAD is taken where GET is");
    // DELETE of a variant is a purge, which needs a key; a 401 says which
    // kind (RFC 9110 §11.6.1), and JSON that quotes the path is not sniffed.
    let delete = client
        .delete(kiln.url("/media/cache/small/acme/0/a.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 401);
    assert_eq!(delete.headers()["www-authenticate"], "Bearer");
    assert_eq!(delete.headers()["x-content-type-options"], "nosniff");
    // Nothing was written outside the storage root.
    assert!(!kiln
        .dir
        .path()
        .parent()
        .unwrap()
        .join("secret.png")
        .exists());
}

/// Sends a request line byte for byte and returns the status and body.
async fn raw_get(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A page showing two sizes of a new image asks for both at once: two jobs
/// for one original run side by side, each noting its thumbnail in the
/// same media record. Neither write may undo the other's.
async fn misses_of_two_filters_at_once_both_land_in_the_media_record(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let code = "0123456789abcdef";
    let original = format!("acme/0/{code}.jpg");
    kiln.store(&original, &jpeg(1600, 1200, [90, 140, 200]));
    let filters = ["small", "medium", "square"];
    let urls = filters.map(|f| kiln.url(&format!("/media/cache/{f}/{original}")));
    let asked = futures::future::join_all(urls.iter().map(|url| get(url))).await;
    for response in asked {
        assert_eq!(response.status(), 202);
    }
    for url in &urls {
        until_ready(url).await;
    }
    let record_path = kiln.storage_path(&format!("meta/{code}.json"));
    let record = eventually(
        Duration::from_secs(10),
        "every thumbnail in the record",
        || {
            let record_path = record_path.clone();
            async move {
                let record = json(&std::fs::read_to_string(&record_path).ok()?);
                filters
                    .iter()
                    .all(|f| record["thumbData"][f]["marking"] == "done")
                    .then_some(record)
            }
        },
    )
    .await;
    assert_eq!(record["path"], original.as_str());
    assert_eq!(record["marking"], "resized");
}

/// A cache URL whose path names a variant, a media record or an account
/// would render from it and write the media record its file name points at
/// (a code's record pointing at a thumbnail, or marked failed). Refused
/// before anything is looked up; an original that merely lives under
/// `media/` is not.
async fn kilns_own_files_are_never_an_original(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let code = "323cacebbf207228";
    let thumbnail = png_rgba(10, 10, [0, 0, 0, 255]);
    kiln.store(&format!("media/cache/small/acme/0/{code}.png"), &thumbnail);
    let record = format!(r#"{{"code":"{code}","path":"acme/0/{code}.png"}}"#);
    kiln.store(&format!("meta/{code}.json"), record.as_bytes());
    kiln.store("accounts/acme.json", b"{}");
    for path in [
        format!("/media/cache/large/media/cache/small/acme/0/{code}.png"),
        format!("/media/cache/small/meta/{code}.json"),
        "/media/cache/small/accounts/acme.json".to_string(),
    ] {
        let (status, body) = raw_get(&kiln.base, &path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(json(&body)["error"], "invalid-path", "{path}");
    }
    kiln.store("media/photos/a.png", &thumbnail);
    let (status, body) = raw_get(&kiln.base, "/media/cache/small/media/photos/a.png").await;
    assert_eq!(status, 202, "an original under media/: {body}");
    let rendered = until_ready(&kiln.url("/media/cache/small/media/photos/a.png")).await;
    assert_eq!(rendered.status(), 200);
    let stored = std::fs::read_to_string(kiln.storage_path(&format!("meta/{code}.json")));
    assert_eq!(stored.unwrap(), record, "the record is untouched");
}

/// Storage is the source of truth: a variant whose file was deleted behind
/// kiln's back (its index entry still there) answers 202 and is rendered
/// again, rather than being trusted to the index forever.
async fn a_variant_deleted_behind_kilns_back_is_rendered_again(backend: Backend) {
    // Nothing kept hot: every hit reads storage.
    let kiln = Kiln::start_with(backend, "[index]\nhot_max_object_bytes = 0\n").await;
    kiln.store("acme/0/gone.png", &png_rgba(300, 200, [200, 20, 40, 255]));
    let url = kiln.url("/media/cache/small/acme/0/gone.png");
    assert_eq!(get(&url).await.status(), 202);
    let first = until_ready(&url).await.bytes().await.unwrap();

    let file = kiln.storage_path("media/cache/small/acme/0/gone.png");
    std::fs::remove_file(&file).unwrap();
    assert_eq!(get(&url).await.status(), 202, "a miss, not a broken hit");
    let again = until_ready(&url).await.bytes().await.unwrap();
    assert_eq!(again, first, "the same variant, rendered again");
    assert!(file.exists(), "and stored again");
}

/// A job whose media record cannot be read (not JSON) fails every attempt.
/// Out of attempts it is dead-lettered without the record, and its variant
/// answers the error, rather than the job being taken over forever while
/// the page gets 202.
async fn a_job_whose_record_is_unreadable_ends_dead_lettered(backend: Backend) {
    let quick = "[queue]\nmax_attempts = 2\nretry_backoff_ms = 50\nvisibility_timeout_secs = 1\n";
    let kiln = Kiln::start_with(backend, quick).await;
    let code = "0123456789abcdef";
    kiln.store(
        &format!("acme/0/{code}.png"),
        &png_rgba(60, 40, [9, 90, 9, 255]),
    );
    kiln.store(&format!("meta/{code}.json"), b"not JSON");
    let url = kiln.url(&format!("/media/cache/small/acme/0/{code}.png"));
    assert_eq!(get(&url).await.status(), 202);
    let answer = eventually(
        Duration::from_secs(30),
        "the variant to answer its job's failure",
        || async {
            let answer = get(&url).await;
            (answer.status() != 202).then_some(answer)
        },
    )
    .await;
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    let body = json(&answer.text().await.unwrap());
    assert_eq!(body["error"], "storage-error", "{body}");
}

/// A job slower than the visibility timeout (its origin holds the download)
/// is held by the worker running it, so no other claim loop takes it over
/// and downloads the original a second time.
async fn a_job_slower_than_the_visibility_timeout_runs_once(backend: Backend) {
    let kiln = Kiln::start_with(backend, "[queue]\nvisibility_timeout_secs = 1\n").await;
    let origin = Origin::start().await;
    let gate = crate::support::Gate::closed();
    origin.serve(
        "/slow.png",
        OriginResponse::image("image/png", png_rgba(80, 60, [1, 2, 3, 255])).with_gate(&gate),
    );
    let answer = reqwest::Client::new()
        .post(kiln.url("/request/small"))
        .bearer_auth(crate::kiln::ADMIN_KEY)
        .query(&[("url", origin.url("/slow.png"))])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let variant = json(&answer.text().await.unwrap())["url"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(10), "the download to start", || async {
        (origin.hits("/slow.png") == 1).then_some(())
    })
    .await;
    // Three visibility timeouts while the job waits on its origin.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(origin.hits("/slow.png"), 1, "nobody took the job over");
    gate.open();
    until_ready(&variant).await;
    assert_eq!(origin.hits("/slow.png"), 1);
}
