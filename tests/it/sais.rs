//! The SAIS protocol over real HTTP, with payloads shaped exactly as the PHP
//! client sends them: accounts, batch dispatch, media records, signed and
//! retried webhooks, JSON-RPC tools, and keys scoped to their root.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::kiln::{get_json, post_json, setup_account, start_on, Backend, Kiln, ADMIN_KEY};
use crate::support::{
    dimensions, eventually, format_of, jpeg, png_rgba, CallbackSink, Gate, Origin, OriginResponse,
    Received, RedisServer,
};

on_both_backends!(dispatch_speaks_the_php_client_protocol);

/// What a webhook receiver checks first: the signature, with the account's secret.
fn assert_signed(hooks: &[Received], secret: &str) {
    for hook in hooks {
        assert!(
            hook.signature_valid(secret),
            "bad signature on {}: {:?}",
            hook.path_and_query,
            hook.headers
        );
        assert!(hook
            .header("webhook-id")
            .is_some_and(|id| id.starts_with("msg_")));
    }
}

async fn dispatch_speaks_the_php_client_protocol(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/photos/a.jpg",
        OriginResponse::image("image/jpeg", jpeg(1200, 800, [200, 60, 40])),
    );
    // No extension in the URL: the stored path takes it from the bytes.
    origin.serve(
        "/img/b",
        OriginResponse::image("image/png", png_rgba(300, 600, [20, 90, 200, 255])),
    );
    let url_a = origin.url("/photos/a.jpg");
    let url_b = origin.url("/img/b");
    let account = setup_account(&kiln.base, "acme", 11000).await;
    let key = account["apiKey"].as_str().unwrap();
    let secret = account["webhookSecret"].as_str().unwrap();

    // Exactly what the PHP client's ProcessPayload encodes to: every key present.
    let payload = json!({
        "root": "acme",
        "images": [url_a, {"url": url_b, "context": {"id": 7}}, url_a],
        "filters": ["tiny", "small"],
        "context": [],
        "mediaCallbackUrl": sink.url("/webhook/media?code=batch1"),
        "thumbCallbackUrl": sink.url("/webhook/thumb?code=batch1"),
        "apiKey": null,
        "wait": null,
    });
    let (status, rows) = post_json(&kiln.url("/dispatch_process.json"), Some(key), &payload).await;
    assert_eq!(status, 200, "{rows}");
    let rows = rows.as_array().expect("an array of media records").clone();
    let code_a = kiln::keys::media_code(&url_a, "acme");
    let code_b = kiln::keys::media_code(&url_b, "acme");
    // One row per distinct code, in request order.
    let codes: Vec<&str> = rows.iter().map(|r| r["code"].as_str().unwrap()).collect();
    assert_eq!(codes, [code_a.as_str(), code_b.as_str()]);
    assert_eq!(rows[0]["marking"], "new");
    assert_eq!(rows[0]["root"], "acme");
    assert_eq!(rows[0]["originalUrl"], url_a);
    assert_eq!(
        rows[0]["path"],
        Value::Null,
        "no path before the type is known"
    );
    assert_eq!(rows[0]["context"], json!({}));
    assert_eq!(rows[1]["context"], json!({"id": 7}));
    assert_eq!(rows[0]["thumbData"]["tiny"]["marking"], "new");

    // Two media webhooks and a thumb webhook per variant, all signed, to the URLs as given.
    let hooks = sink.wait_for(6, Duration::from_secs(30)).await;
    assert_signed(&hooks, secret);
    let (media, thumbs): (Vec<_>, Vec<_>) = hooks
        .iter()
        .partition(|h| h.path_and_query == "/webhook/media?code=batch1");
    assert_eq!(thumbs.len(), 4, "{hooks:?}");
    assert!(thumbs
        .iter()
        .all(|h| h.path_and_query == "/webhook/thumb?code=batch1"));

    for (code, ext, size) in [(&code_a, "jpg", (1200, 800)), (&code_b, "png", (300, 600))] {
        let body = &media
            .iter()
            .find(|h| h.body["code"] == **code)
            .expect("a media webhook per image")
            .body;
        let bin = kiln::keys::bin_for(code, 11000);
        assert_eq!(body["path"], format!("acme/{bin}/{code}.{ext}"));
        assert_eq!(body["marking"], "resized");
        assert_eq!(body["statusCode"], 200);
        assert_eq!(
            (
                body["originalWidth"].as_u64(),
                body["originalHeight"].as_u64()
            ),
            (Some(size.0), Some(size.1))
        );
        assert_eq!(
            body["mimeType"],
            format!("image/{}", if ext == "jpg" { "jpeg" } else { "png" })
        );
        assert!(body["size"].as_u64().unwrap() > 0);
        let blur = body["blur"].as_str().expect("a ThumbHash");
        assert!(!blur.contains('='), "unpadded base64: {blur}");
        use base64::Engine as _;
        let hash = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(blur)
            .expect("standard base64");
        assert!(hash.len() >= 5, "{blur}");
        assert!(body["blurhash"].as_str().is_some_and(|b| b.len() > 6));
        let resized: BTreeSet<&str> = body["resized"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(resized, BTreeSet::from(["small", "tiny"]));
        assert!(
            std::path::Path::new(&kiln.storage_path(body["path"].as_str().unwrap())).exists(),
            "original archived at its path"
        );
    }
    assert_eq!(
        media
            .iter()
            .find(|h| h.body["code"] == *code_b)
            .unwrap()
            .body["context"],
        json!({"id": 7})
    );

    // Every cache URL a thumb webhook names serves that image.
    for hook in &thumbs {
        let body = &hook.body;
        assert_eq!(body["marking"], "done");
        assert_eq!(body["mediaCode"], body["code"]);
        // The record's time, by which a receiver orders what it is told.
        let media_hook = media
            .iter()
            .find(|h| h.body["code"] == body["code"])
            .unwrap();
        assert_eq!(body["updatedAt"], media_hook.body["updatedAt"], "{body}");
        assert!(body["updatedAt"].as_i64().unwrap() > 0);
        let url = body["url"].as_str().unwrap();
        let response = reqwest::get(url).await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let bytes = response.bytes().await.unwrap();
        assert_eq!(body["size"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(
            format_of(&bytes),
            if body["code"] == *code_a {
                "jpeg"
            } else {
                "png"
            }
        );
        let expected = match (body["code"] == *code_a, body["liipCode"].as_str().unwrap()) {
            (true, "tiny") => (125, 83),
            (true, "small") => (200, 133),
            (false, "tiny") => (63, 125),
            (false, "small") => (100, 200),
            other => panic!("unexpected thumb {other:?}"),
        };
        assert_eq!(dimensions(&bytes), expected, "{url}");
    }

    // The records are readable by code, by the newer client's code, and by ids.
    let (status, record) = get_json(&kiln.url(&format!("/media/{code_a}")), Some(key)).await;
    assert_eq!((status, &record["marking"]), (200, &json!("resized")));
    let g3 = kiln::keys::normalized_code(&url_a);
    let (status, by_g3) = get_json(&kiln.url(&format!("/media/{g3}")), Some(key)).await;
    assert_eq!((status, &by_g3["code"]), (200, &json!(code_a)));
    let (status, _) = get_json(&kiln.url(&format!("/media/{code_a}")), None).await;
    assert_eq!(status, 401);
    // Without a key, an unknown code answers as a known one does: whether
    // it exists is not told.
    let (status, _) = get_json(&kiln.url("/media/0123456789abcdef"), None).await;
    assert_eq!(status, 401);
    let (status, rows) = get_json(
        &kiln.url(&format!("/fetch/media/by-ids?id={code_a},{code_b}")),
        Some(key),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["source"], url_a);
    assert_eq!(rows[0]["context"]["saisCode"], code_a);
    assert!(rows[0]["thumbs"]["small"].as_str().is_some());
    let (status, rows) = post_json(
        &kiln.url("/fetch/media/by-ids"),
        Some(key),
        &json!({"ids": [code_b, "ffffffffffffffff"]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        rows.as_array().unwrap().len(),
        1,
        "unknown ids are left out"
    );

    // Now the account has media: its count shows and approx no longer moves.
    let answer = setup_account(&kiln.base, "acme", 500_000).await;
    assert_eq!(answer["mediaCount"], 2);
    assert_eq!(answer["approxImageCount"], 11000);
    assert_eq!(answer["approxFixed"], true);
    assert_eq!(answer["apiKey"], key, "the key stays");

    // Dispatching finished media again answers their records, with nothing to render.
    let (status, rows) = post_json(
        &kiln.url("/dispatch_process"),
        Some(key),
        &json!({"root": null, "images": [url_a], "filters": ["tiny"], "context": {},
                "mediaCallbackUrl": null, "thumbCallbackUrl": null, "apiKey": null, "wait": null}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(rows[0]["marking"], "resized");
    assert_eq!(origin.hits("/photos/a.jpg"), 1, "downloaded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_setup_creates_updates_and_refuses() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let url = kiln.url("/account_setup");
    let body = json!({"root": "shop", "estimated": 5000, "mediaCallbackUrl": null,
                      "thumbCallbackUrl": null, "apiKey": null});
    let (status, answer) = post_json(&url, None, &body).await;
    assert_eq!((status, &answer["error"]), (401, &json!("unauthorized")));

    let (status, answer) = post_json(&url, Some(ADMIN_KEY), &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "shop");
    assert_eq!(answer["userIdentifier"], "shop");
    assert_eq!(answer["approxImageCount"], 5000);
    assert_eq!(answer["binCount"], 5);
    assert_eq!(answer["mediaCount"], 0);
    assert_eq!(answer["created"], true);
    assert!(answer["webhookSecret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));
    let key = answer["apiKey"].as_str().unwrap().to_string();
    assert!(key.len() >= 32);
    let stored: Value =
        serde_json::from_slice(&std::fs::read(kiln.storage_path("accounts/shop.json")).unwrap())
            .unwrap();
    assert_eq!(stored["apiKey"], key.as_str(), "accounts live in storage");

    // The account's own key updates it; approx may move while it has no media.
    let (status, answer) = post_json(
        &kiln.url("/account_setup.json"),
        Some(&key),
        &json!({"root": "shop", "approx": 11000, "thumbCallbackUrl": "http://127.0.0.1:9/t?code=1"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (
            answer["approxImageCount"].as_u64(),
            answer["binCount"].as_u64()
        ),
        (Some(11000), Some(11))
    );
    assert_eq!(answer["thumbCallbackUrl"], "http://127.0.0.1:9/t?code=1");
    assert_eq!(answer["created"], false);

    for (body, bearer, status, code) in [
        (
            json!({"root": "other", "approx": 10}),
            Some(key.as_str()),
            403,
            "forbidden",
        ),
        (
            json!({"root": "ab", "approx": 10}),
            Some(ADMIN_KEY),
            422,
            "invalid-payload",
        ),
        (
            json!({"root": "../x", "approx": 10}),
            Some(ADMIN_KEY),
            422,
            "invalid-payload",
        ),
        (
            json!({"root": "shop", "approx": "many"}),
            Some(ADMIN_KEY),
            422,
            "invalid-payload",
        ),
        (
            json!({"root": "shop2", "mediaCallbackUrl": "http://10.0.0.1/x"}),
            Some(ADMIN_KEY),
            422,
            "invalid-payload",
        ),
        (
            json!({"root": "shop"}),
            Some("not-a-key"),
            401,
            "unauthorized",
        ),
    ] {
        let (got, answer) = post_json(&url, bearer, &body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (_, answer) = post_json(&url, Some(ADMIN_KEY), &json!({"root": "ab", "approx": 10})).await;
    assert!(answer["message"]
        .as_str()
        .unwrap()
        .starts_with("Validation error: root - "));
    // A value of the wrong type is named by its field, in the same form.
    let (got, answer) = post_json(
        &url,
        Some(ADMIN_KEY),
        &json!({"root": "shop", "approx": "many"}),
    )
    .await;
    assert_eq!(got, 422, "{answer}");
    assert_eq!(
        answer["message"],
        "Validation error: approx - invalid type: string \"many\", expected u64"
    );
    let (got, answer) = post_json(&url, Some(ADMIN_KEY), &json!("shop")).await;
    assert_eq!(got, 422, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("Validation error: body - invalid type: string"),
        "{answer}"
    );

    let client = reqwest::Client::new();
    let malformed = client
        .post(&url)
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body("{\"root\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let form = client
        .post(&url)
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("root=shop")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    // An announced body over server.max_body_bytes is refused before it is read.
    // Raw, since kiln answers and closes while an HTTP client is still sending.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(kiln.base.trim_start_matches("http://"))
        .await
        .unwrap();
    socket
        .write_all(
            format!(
                "POST /account_setup HTTP/1.1\r\nHost: k\r\nContent-Type: application/json\r\n\
                 Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: {}\r\n\r\n",
                2 << 20
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // kiln closes the connection after answering: read to its end.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("kiln answers and closes")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too-large"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_true_answers_finished_records_and_failures() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    origin.serve(
        "/w.jpg",
        OriginResponse::image("image/jpeg", jpeg(640, 480, [10, 200, 10])),
    );
    let sink = CallbackSink::start().await;
    let account = setup_account(&kiln.base, "waiter", 100).await;
    let key = account["apiKey"].as_str().unwrap();
    let (status, rows) = post_json(
        &kiln.url("/dispatch_process"),
        Some(key),
        &json!({"root": "waiter", "images": [origin.url("/w.jpg"), origin.url("/missing.jpg"),
                "ftp://127.0.0.1/x.jpg"], "filters": ["small"], "wait": true,
                "mediaCallbackUrl": sink.url("/media")}),
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[0]["marking"], "resized", "{rows}");
    assert!(rows[0]["resized"]["small"]
        .as_str()
        .unwrap()
        .contains("/media/cache/small/waiter/0/"));
    assert_eq!(rows[0]["thumbData"]["small"]["marking"], "done");
    assert_eq!(rows[1]["marking"], "failed");
    assert_eq!(rows[1]["statusCode"], 404);
    assert_eq!(rows[1]["error"]["code"], "origin-status");
    assert_eq!(rows[2]["marking"], "failed");
    assert_eq!(rows[2]["error"]["code"], "invalid-url");
    // The failed download gets a media webhook too, signed like the rest.
    let failure = eventually(Duration::from_secs(30), "failure webhook", || async {
        sink.received()
            .into_iter()
            .find(|h| h.body["marking"] == "failed")
    })
    .await;
    assert_eq!(failure.body["code"], rows[1]["code"]);
    assert_eq!(failure.body["error"]["code"], "origin-status");
    assert_signed(&[failure], account["webhookSecret"].as_str().unwrap());

    // Unknown filters and oversized batches are refused before anything is queued.
    let (status, answer) = post_json(
        &kiln.url("/dispatch_process"),
        Some(key),
        &json!({"images": [origin.url("/w.jpg")], "filters": ["huge"]}),
    )
    .await;
    assert_eq!((status, &answer["error"]), (422, &json!("invalid-payload")));
}

/// The worker writes a media record once per job. A render that fails after
/// the download must still record the archived original, so the record
/// says what was fetched and the next try renders from the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_render_keeps_the_archived_original_in_the_record() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    // Sniffs as a JPEG, fails to decode: a permanent failure after the download.
    let broken = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hostile/truncated-scan.jpg"),
    )
    .unwrap();
    origin.serve(
        "/broken.jpg",
        OriginResponse::image("image/jpeg", broken.clone()),
    );
    let account = setup_account(&kiln.base, "broken", 100).await;
    let key = account["apiKey"].as_str().unwrap();
    let dispatch = || async {
        let (status, rows) = post_json(
            &kiln.url("/dispatch_process"),
            Some(key),
            &json!({"root": "broken", "images": [origin.url("/broken.jpg")],
                    "filters": ["small"], "wait": true}),
        )
        .await;
        assert_eq!(status, 200, "{rows}");
        rows[0].clone()
    };
    let row = dispatch().await;
    assert_eq!(row["marking"], "failed", "{row}");
    assert_eq!(row["error"]["code"], "decode-failed", "{row}");
    assert_eq!(row["statusCode"], 200, "{row}");
    assert_eq!(row["mimeType"], "image/jpeg", "{row}");
    assert_eq!(row["size"], broken.len(), "{row}");
    let path = row["path"].as_str().expect("the archived original's path");
    assert_eq!(std::fs::read(kiln.storage_path(path)).unwrap(), broken);

    // Another try renders from the archive: no second download.
    let again = dispatch().await;
    assert_eq!(again["error"]["code"], "decode-failed", "{again}");
    assert_eq!(again["path"], row["path"]);
    assert_eq!(origin.hits("/broken.jpg"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_retried_with_backoff_until_accepted() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/r.png",
        OriginResponse::image("image/png", png_rgba(50, 50, [1, 2, 3, 255])),
    );
    let account = setup_account(&kiln.base, "retry", 100).await;
    // The account's URL is the fallback when the dispatch gives none.
    let (status, _) = post_json(
        &kiln.url("/account_setup"),
        Some(ADMIN_KEY),
        &json!({"root": "retry", "thumbCallbackUrl": sink.url("/thumb?code=r")}),
    )
    .await;
    assert_eq!(status, 200);
    // A redirect is a failed attempt, retried where it was sent, not followed.
    sink.fail_next(2, 307);
    let (status, _) = post_json(
        &kiln.url("/dispatch_process"),
        Some(account["apiKey"].as_str().unwrap()),
        &json!({"images": [origin.url("/r.png")], "filters": ["tiny"], "thumbCallbackUrl": null}),
    )
    .await;
    assert_eq!(status, 200);
    let hooks = sink.wait_for(3, Duration::from_secs(30)).await;
    assert_signed(&hooks, account["webhookSecret"].as_str().unwrap());
    let ids: BTreeSet<&str> = hooks
        .iter()
        .map(|h| h.header("webhook-id").unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "one delivery, the same id on every attempt");
    assert!(hooks.iter().all(|h| h.path_and_query == "/thumb?code=r"));
    assert_eq!(hooks[2].body["liipCode"], "tiny");
}

/// A filter that fails for good on a media whose other filter is done is
/// marked failed in its own thumb: the media stays `resized`, and a
/// dispatch that waits for it comes back at once instead of at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_fails_beside_a_done_one_is_marked_failed_in_its_thumb() {
    let kiln = Kiln::start_with(
        Backend::Embedded,
        "[imaging]\nmax_output_pixels = 100000\n[sais]\nwait_timeout_ms = 60000\n",
    )
    .await;
    let origin = Origin::start().await;
    origin.serve(
        "/f.png",
        OriginResponse::image("image/png", png_rgba(900, 900, [30, 60, 90, 255])),
    );
    let account = setup_account(&kiln.base, "halfway", 100).await;
    let key = account["apiKey"].as_str().unwrap();
    let endpoint = kiln.url("/dispatch_process");
    let image = origin.url("/f.png");
    let dispatch = |filter: &'static str| {
        let body = json!({"images": [image], "filters": [filter], "wait": true});
        let endpoint = endpoint.clone();
        async move { post_json(&endpoint, Some(key), &body).await }
    };
    let (status, rows) = dispatch("tiny").await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[0]["thumbData"]["tiny"]["marking"], "done", "{rows}");

    // 800 x 800 is over the 100 000 pixels allowed.
    let started = std::time::Instant::now();
    let (status, rows) = dispatch("large").await;
    assert_eq!(status, 200, "{rows}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not held to the timeout"
    );
    let row = &rows[0];
    assert_eq!(row["thumbData"]["large"]["marking"], "failed", "{row}");
    assert_eq!(row["thumbData"]["tiny"]["marking"], "done", "{row}");
    assert_eq!(row["marking"], "resized", "{row}");
    assert_eq!(row["error"]["code"], "image-too-large", "{row}");
}

/// An account written without a webhook secret (by hand, or imported)
/// gets one at its next set-up, so its webhooks are signed from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_a_webhook_secret_gets_one_at_set_up() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let file = kiln.storage_path("accounts/imported.json");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let key = "kiln_imported_key_0123456789";
    std::fs::write(
        &file,
        json!({"root": "imported", "approxImageCount": 100, "binCount": 1, "apiKey": key})
            .to_string(),
    )
    .unwrap();
    let (status, answer) = post_json(
        &kiln.url("/account_setup"),
        Some(ADMIN_KEY),
        &json!({"root": "imported"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let secret = answer["webhookSecret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{answer}");
    let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(stored["webhookSecret"], secret.as_str());
    // The same secret from then on.
    let (_, again) = post_json(
        &kiln.url("/account_setup"),
        Some(ADMIN_KEY),
        &json!({"root": "imported"}),
    )
    .await;
    assert_eq!(again["webhookSecret"], secret.as_str());
}

/// A receiver that answers 410 Gone has said it will never take the
/// webhook: it is given up at once, not retried for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answered_410_gone_is_not_retried() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/g.png",
        OriginResponse::image("image/png", png_rgba(50, 50, [4, 5, 6, 255])),
    );
    let account = setup_account(&kiln.base, "gone", 100).await;
    sink.set_status(410);
    let (status, _) = post_json(
        &kiln.url("/dispatch_process"),
        Some(account["apiKey"].as_str().unwrap()),
        &json!({"images": [origin.url("/g.png")], "filters": ["tiny"],
                "thumbCallbackUrl": sink.url("/thumb")}),
    )
    .await;
    assert_eq!(status, 200);
    sink.wait_for(1, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "the webhook given up", || async {
        (counter(&kiln, "kiln_callbacks_given_up_total").await == 1.0).then_some(())
    })
    .await;
    // The tests' backoff is 50 ms: a retry would have come by now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sink.count(), 1, "one attempt only");
}

/// Thumbnail URLs are built at render time on the public URL of that
/// moment; once kiln is moved behind another (a CDN), records and webhooks
/// give URLs on the new one, also for variants rendered before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbnail_urls_follow_a_changed_public_url() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/m.png",
        OriginResponse::image("image/png", png_rgba(60, 60, [9, 90, 9, 255])),
    );
    let (first, base) = start_on(&redis, dir.path(), "");
    crate::kiln::until_ready(&format!("{base}/healthz")).await;
    let account = setup_account(&base, "moved", 100).await;
    let key = account["apiKey"].as_str().unwrap().to_string();
    let body = json!({"images": [origin.url("/m.png")], "filters": ["tiny"], "wait": true,
                      "thumbCallbackUrl": sink.url("/thumb")});
    let (_, rows) = post_json(&format!("{base}/dispatch_process"), Some(&key), &body).await;
    let old_url = rows[0]["resized"]["tiny"].as_str().unwrap().to_string();
    assert!(old_url.starts_with(&base), "{rows}");
    sink.wait_for(1, Duration::from_secs(30)).await;
    first.stop().unwrap();

    let cdn = "https://cdn.example";
    let (second, base) = start_on(
        &redis,
        dir.path(),
        &format!("[server]\npublic_url = \"{cdn}\"\n"),
    );
    crate::kiln::until_ready(&format!("{base}/healthz")).await;
    let new_url = old_url.replacen(&old_url[..old_url.find("/media/cache/").unwrap()], cdn, 1);
    let code = rows[0]["code"].as_str().unwrap();
    let (_, record) = get_json(&format!("{base}/media/{code}"), Some(&key)).await;
    assert_eq!(record["resized"]["tiny"], new_url.as_str(), "{record}");
    assert_eq!(
        record["thumbData"]["tiny"]["url"],
        new_url.as_str(),
        "{record}"
    );
    // Dispatched again with a callback: the webhook has the new URL too.
    let (_, rows) = post_json(&format!("{base}/dispatch_process"), Some(&key), &body).await;
    assert_eq!(rows[0]["resized"]["tiny"], new_url.as_str(), "{rows}");
    let hooks = sink.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(
        hooks[1].body["url"],
        new_url.as_str(),
        "{:?}",
        hooks[1].body
    );
    second.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_survive_a_restart_on_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve(
        "/s.png",
        OriginResponse::image("image/png", png_rgba(40, 40, [9, 9, 9, 255])),
    );
    sink.set_status(500);
    let slow_retries = "[callback]\nbackoff_ms = 300\n";
    let (first, base) = start_on(&redis, dir.path(), slow_retries);
    crate::kiln::until_ready(&format!("{base}/healthz")).await;
    let account = setup_account(&base, "durable", 100).await;
    let (status, _) = post_json(
        &format!("{base}/dispatch_process"),
        Some(account["apiKey"].as_str().unwrap()),
        &json!({"images": [origin.url("/s.png")], "filters": ["tiny"],
                "mediaCallbackUrl": sink.url("/media?code=s")}),
    )
    .await;
    assert_eq!(status, 200);
    sink.wait_for(1, Duration::from_secs(30)).await;
    first.stop().unwrap();
    assert_eq!(
        redis.redis_int(&["HLEN", "kiln:{webhooks}:pending"]),
        1,
        "the failed delivery waits in Redis"
    );
    let attempts_before = sink.count();

    sink.set_status(200);
    let (_second, base) = start_on(&redis, dir.path(), slow_retries);
    crate::kiln::until_ready(&format!("{base}/healthz")).await;
    let hooks = sink
        .wait_for(attempts_before + 1, Duration::from_secs(30))
        .await;
    eventually(Duration::from_secs(10), "the outbox drains", || async {
        (redis.redis_int(&["HLEN", "kiln:{webhooks}:pending"]) == 0).then_some(())
    })
    .await;
    assert_signed(&hooks, account["webhookSecret"].as_str().unwrap());
    let ids: BTreeSet<&str> = hooks
        .iter()
        .map(|h| h.header("webhook-id").unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(hooks.last().unwrap().body["marking"], "resized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_act_only_on_their_own_root() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    origin.serve(
        "/k.png",
        OriginResponse::image("image/png", png_rgba(20, 20, [5, 5, 5, 255])),
    );
    let alpha = setup_account(&kiln.base, "alpha", 100).await;
    let beta = setup_account(&kiln.base, "beta", 100).await;
    let alpha_key = alpha["apiKey"].as_str().unwrap();
    let beta_key = beta["apiKey"].as_str().unwrap();
    let dispatch = kiln.url("/dispatch_process");
    let images = json!({"root": "alpha", "images": [origin.url("/k.png")], "wait": true});

    let (status, _) = post_json(&dispatch, None, &images).await;
    assert_eq!(status, 401, "no key");
    let (status, _) = post_json(&dispatch, Some(beta_key), &images).await;
    assert_eq!(status, 403, "another account's key");
    // The key may also come in the body or the query string.
    let mut with_body_key = images.clone();
    with_body_key["apiKey"] = json!(alpha_key);
    let (status, rows) = post_json(&dispatch, None, &with_body_key).await;
    assert_eq!(status, 200, "{rows}");
    let code = rows[0]["code"].as_str().unwrap().to_string();
    let (status, _) = post_json(&format!("{dispatch}?token={alpha_key}"), None, &images).await;
    assert_eq!(status, 200);

    let (status, _) = get_json(&kiln.url(&format!("/media/{code}")), Some(beta_key)).await;
    assert_eq!(status, 404, "another account's media is not there for beta");
    let (status, _) = get_json(&kiln.url(&format!("/media/{code}")), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200);
    let (status, rows) = get_json(
        &kiln.url(&format!("/fetch/media/by-ids?id={code}")),
        Some(beta_key),
    )
    .await;
    assert_eq!((status, rows), (200, json!([])));

    // SAIS codes hash the URL's bytes and the root's run together, so root
    // "pha" with ".../k.pngal" has alpha's ".../k.png" code. It may neither
    // change nor read alpha's record.
    let pha = setup_account(&kiln.base, "pha", 100).await;
    let pha_key = pha["apiKey"].as_str().unwrap();
    let crafted = format!("{}al", origin.url("/k.png"));
    assert_eq!(kiln::keys::media_code(&crafted, "pha"), code);
    let (status, body) = post_json(
        &dispatch,
        Some(pha_key),
        &json!({"root": "pha", "images": [crafted], "context": {"taken": true}}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let preheat = crate::kiln::preheat_url(&kiln.base, "small", &crafted, None);
    let (status, body) = get_json(&preheat, Some(pha_key)).await;
    assert_eq!(status, 403, "{body}");
    let (_, record) = get_json(&kiln.url(&format!("/media/{code}")), Some(alpha_key)).await;
    assert!(record["context"].get("taken").is_none(), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_clients_without_keys_are_let_in_when_configured() {
    let kiln = Kiln::start_with(Backend::Embedded, "[auth]\nrequire_api_key = false\n").await;
    let origin = Origin::start().await;
    origin.serve(
        "/l.jpg",
        OriginResponse::image("image/jpeg", jpeg(64, 64, [100, 100, 100])),
    );
    // `sais:register` and `dispatchProcess` as the v1 client sends them: no key anywhere.
    let (status, account) = post_json(
        &kiln.url("/account_setup"),
        None,
        &json!({"root": "legacy", "approx": 100, "mediaCallbackUrl": null,
                "thumbCallbackUrl": null, "apiKey": null}),
    )
    .await;
    assert_eq!(status, 200, "{account}");
    let (status, rows) = post_json(
        &kiln.url("/dispatch_process"),
        None,
        &json!({"root": "legacy", "images": [origin.url("/l.jpg")], "filters": null,
                "context": [], "mediaCallbackUrl": null, "thumbCallbackUrl": null,
                "apiKey": null, "wait": true}),
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[0]["marking"], "resized");
    // Default filters apply when the payload names none.
    let resized: BTreeSet<&str> = rows[0]["resized"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(resized, BTreeSet::from(["medium", "small"]));
    let (status, _) = post_json(
        &kiln.url("/dispatch_process"),
        None,
        &json!({"root": "nobody", "images": [origin.url("/l.jpg")]}),
    )
    .await;
    assert_eq!(status, 404, "an account must be set up first");
    let (status, body) = get_json(&kiln.url("/status"), None).await;
    assert_eq!((status, &body["status"]), (200, &json!("okay")));

    // Keyless callers act on the root they name, but never take it over.
    assert!(account["apiKey"].is_string(), "its creator is told its key");
    let victim = setup_account(&kiln.base, "victim", 100).await;
    let victim_key = victim["apiKey"].as_str().unwrap();
    let setup = |body: Value, key: Option<String>| {
        let url = kiln.url("/account_setup");
        async move { post_json(&url, key.as_deref(), &body).await }
    };
    let (status, body) = setup(
        json!({"root": "victim", "apiKey": "attacker-key-0123456"}),
        None,
    )
    .await;
    assert_eq!(status, 401, "a wrong key in the body: {body}");
    let legacy_key = account["apiKey"].as_str().map(str::to_string);
    let (status, body) = setup(json!({"root": "victim"}), legacy_key).await;
    assert_eq!(status, 403, "another account's key: {body}");
    let (status, body) = setup(
        json!({"root": "victim", "thumbCallbackUrl": origin.url("/hook")}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["thumbCallbackUrl"], origin.url("/hook"));
    assert!(
        body.get("apiKey").is_none() && body.get("webhookSecret").is_none(),
        "{body}"
    );
    let (_, body) = setup(json!({"root": "victim"}), Some(ADMIN_KEY.into())).await;
    assert_eq!(body["apiKey"], victim_key, "the key stands");
    assert_eq!(body["webhookSecret"], victim["webhookSecret"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_speak_json_rpc_and_mcp() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let rpc = |method: &str, params: Value| json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let (status, list) = post_json(&kiln.url("/tools"), None, &rpc("tools/list", json!({}))).await;
    assert_eq!(status, 200);
    let names: BTreeSet<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["account_setup", "create_account", "dispatch_process"])
    );
    let create = &list["result"]["tools"].as_array().unwrap()[0];
    assert_eq!(create["inputSchema"]["required"], json!(["root", "approx"]));
    assert_eq!(create["annotations"]["title"], "Create an account");

    let (_, created) = post_json(
        &kiln.url("/tools"),
        Some(ADMIN_KEY),
        &rpc(
            "tools/call",
            json!({"name": "create_account", "arguments": {"root": "rpc1", "approx": 500}}),
        ),
    )
    .await;
    assert_eq!(created["jsonrpc"], "2.0");
    assert_eq!(created["id"], 1);
    assert_eq!(
        created["result"]["content"][0]["text"],
        "Account created successfully! 500 images expected."
    );
    let key = created["result"]["structuredContent"]["apiKey"]
        .as_str()
        .unwrap();

    // The README's older method form, with `estimated`, on /mcp.
    let (_, updated) = post_json(
        &kiln.url("/mcp"),
        Some(ADMIN_KEY),
        &rpc(
            "tools/create_account",
            json!({"root": "rpc1", "estimated": 500}),
        ),
    )
    .await;
    assert_eq!(
        updated["result"]["content"][0]["text"],
        "Account updated successfully! 500 images expected."
    );
    let (_, invalid) = post_json(
        &kiln.url("/tools"),
        Some(ADMIN_KEY),
        &rpc(
            "tools/call",
            json!({"name": "account_setup", "arguments": {"root": "x", "approx": 1}}),
        ),
    )
    .await;
    assert_eq!(invalid["result"]["isError"], true);
    assert!(invalid["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Validation error: root - "));
    let (_, unauthorized) = post_json(
        &kiln.url("/tools"),
        None,
        &rpc(
            "tools/call",
            json!({"name": "create_account", "arguments": {"root": "rpc2", "approx": 1}}),
        ),
    )
    .await;
    assert_eq!(unauthorized["result"]["isError"], true);

    let (_, dispatched) = post_json(
        &kiln.url("/tools"),
        None,
        &rpc(
            "tools/call",
            json!({"name": "dispatch_process", "arguments":
            {"root": "rpc1", "images": ["http://127.0.0.1:9/a.jpg"], "apiKey": key}}),
        ),
    )
    .await;
    assert_eq!(dispatched["result"]["isError"], false, "{dispatched}");
    assert_eq!(
        dispatched["result"]["structuredContent"]["media"][0]["marking"],
        "new"
    );

    let (_, unknown) = post_json(&kiln.url("/tools"), None, &rpc("tools/nope", json!({}))).await;
    assert_eq!(unknown["error"]["code"], -32601);
    let garbage = reqwest::Client::new()
        .post(kiln.url("/tools"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let garbage: Value = garbage.json().await.unwrap();
    assert_eq!(garbage["error"]["code"], -32700);
    let notification = reqwest::Client::new()
        .post(kiln.url("/mcp"))
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(notification.status(), 202);
}

/// One counter from kiln's `/metrics`, 0 when absent.
async fn counter(kiln: &Kiln, name: &str) -> f64 {
    let text = reqwest::get(kiln.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A webhook whose account cannot be read when it is due is not sent
/// unsigned: it is retried, more often than callback.max_attempts since
/// the receiver was never called, and goes out signed once the account
/// reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_never_sent_unsigned_when_its_account_cannot_be_read() {
    let kiln = Kiln::start_with(
        Backend::Embedded,
        "[callback]\nbackoff_ms = 100\nmax_backoff_ms = 200\nmax_attempts = 2\n",
    )
    .await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    let gate = Gate::closed();
    origin.serve(
        "/u.png",
        OriginResponse::image("image/png", png_rgba(40, 40, [7, 8, 9, 255])).with_gate(&gate),
    );
    let account = setup_account(&kiln.base, "signed", 100).await;
    let (status, _) = post_json(
        &kiln.url("/dispatch_process"),
        Some(account["apiKey"].as_str().unwrap()),
        &json!({"images": [origin.url("/u.png")], "filters": ["tiny"],
                "thumbCallbackUrl": sink.url("/thumb")}),
    )
    .await;
    assert_eq!(status, 200);

    // While the job waits for its original, the account's file goes bad.
    let account_file = kiln.storage_path("accounts/signed.json");
    let good = std::fs::read(&account_file).unwrap();
    std::fs::write(&account_file, b"not JSON").unwrap();
    gate.open();
    eventually(
        Duration::from_secs(30),
        "a failed webhook attempt",
        || async { (counter(&kiln, "kiln_callback_failures_total").await >= 4.0).then_some(()) },
    )
    .await;
    assert_eq!(sink.count(), 0, "nothing was sent unsigned");

    std::fs::write(&account_file, good).unwrap();
    let hooks = sink.wait_for(1, Duration::from_secs(30)).await;
    assert_signed(&hooks, account["webhookSecret"].as_str().unwrap());
}

/// The default root's account, made on the fly by `/request`, has a key
/// that works once set-up hands it out, like any account's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_roots_key_works() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    origin.serve(
        "/d.png",
        OriginResponse::image("image/png", png_rgba(30, 30, [3, 3, 3, 255])),
    );
    let preheat = crate::kiln::preheat_url(&kiln.base, "small", &origin.url("/d.png"), None);
    let (status, answer) = get_json(&preheat, None).await;
    assert_eq!(status, 202, "{answer}");
    let code = answer["code"].as_str().unwrap().to_string();

    let (status, account) = post_json(
        &kiln.url("/account_setup"),
        Some(ADMIN_KEY),
        &json!({"root": "default"}),
    )
    .await;
    assert_eq!(
        (status, &account["created"]),
        (200, &json!(false)),
        "{account}"
    );
    let key = account["apiKey"].as_str().unwrap();
    let (status, record) = get_json(&kiln.url(&format!("/media/{code}")), Some(key)).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["root"], "default");
}
