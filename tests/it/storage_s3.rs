//! kiln end to end on S3 (a real `moto_server`): a pre-heat lands the
//! original, the variant and the media record in the bucket under the
//! configured prefix and the variant is served from there; and, through a
//! counting proxy between kiln and moto, misses ask S3 about a variant once
//! however many come, at the same time, over time and after the render.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::distributed::Process;
use crate::kiln::{preheat_url, until_ready, Backend, Kiln, ADMIN_KEY};
use crate::storage_contract::{s3_storage_toml, BUCKET};
use crate::support::{
    dimensions, eventually, format_of, free_port, jpeg, CountingProxy, Gate, Moto, Origin,
    OriginResponse,
};

on_both_backends!(misses_ask_s3_about_a_variant_once);

/// Every file under `dir`: nothing may bypass the configured storage.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_on_s3_stores_original_variant_and_record_and_serves_them() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let kiln = Kiln::start_with(
        Backend::Redis,
        &s3_storage_toml(&moto.endpoint(), BUCKET, "edge/eu"),
    )
    .await;
    let origin = Origin::start().await;
    origin.serve(
        "/photos/cat.jpg",
        OriginResponse::image("image/jpeg", jpeg(1200, 800, [200, 60, 40])),
    );
    let image_url = origin.url("/photos/cat.jpg");
    let code = kiln::keys::media_code(&image_url, "default");
    let path = format!("default/0/{code}.jpg");

    let first = reqwest::get(preheat_url(&kiln.base, "small", &image_url, None))
        .await
        .unwrap();
    assert!(
        [200, 202].contains(&first.status().as_u16()),
        "{}",
        first.status()
    );
    let variant_url = kiln.url(&format!("/media/cache/small/{path}"));
    let hit = until_ready(&variant_url).await;
    assert_eq!(hit.headers()["content-type"], "image/jpeg");
    let served = hit.bytes().await.unwrap();
    assert_eq!(format_of(&served), "jpeg");
    assert_eq!(dimensions(&served), (200, 133));

    // In the bucket, under the prefix, as the layout spells them.
    let record_key = format!("edge/eu/meta/{code}.json");
    let record = eventually(Duration::from_secs(30), "a resized media record", || {
        let moto = &moto;
        let record_key = record_key.clone();
        async move {
            let record: serde_json::Value =
                serde_json::from_slice(&moto.get(BUCKET, &record_key)?).ok()?;
            (record["marking"] == "resized").then_some(record)
        }
    })
    .await;
    assert_eq!(record["path"], path.as_str());
    assert_eq!(record["thumbData"]["small"]["marking"], "done");
    let keys = moto.keys(BUCKET, "");
    for key in [
        format!("edge/eu/{path}"),
        format!("edge/eu/media/cache/small/{path}"),
        record_key.clone(),
        "edge/eu/accounts/default.json".to_owned(),
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}");
    }
    assert!(keys.iter().all(|k| k.starts_with("edge/eu/")), "{keys:?}");
    let original = moto.get(BUCKET, &format!("edge/eu/{path}")).unwrap();
    assert_eq!(format_of(&original), "jpeg");
    assert_eq!(dimensions(&original), (1200, 800));
    let variant = moto
        .get(BUCKET, &format!("edge/eu/media/cache/small/{path}"))
        .unwrap();
    assert_eq!(format_of(&variant), "jpeg");
    assert_eq!(dimensions(&variant), (200, 133));
    assert_eq!(variant.len(), served.len());

    // Asking again: done, from the bucket, nothing fetched twice.
    let again = reqwest::get(preheat_url(&kiln.base, "small", &image_url, None))
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(origin.hits("/photos/cat.jpg"), 1);
    assert_eq!(
        reqwest::get(kiln.url("/readyz")).await.unwrap().status(),
        200
    );
    // Nothing went to the local directory kiln would otherwise use.
    assert_eq!(files_under(kiln.dir.path()), Vec::<String>::new());
}

/// How many of these S3 requests read the variant to see whether it exists
/// (HEAD, or a GET that found nothing), and how many read its bytes.
fn existence_and_reads(requests: &[crate::support::s3::Proxied]) -> (usize, usize) {
    let looks = requests
        .iter()
        .filter(|r| r.method == "HEAD" || (r.method == "GET" && r.status == 404))
        .count();
    let reads = requests
        .iter()
        .filter(|r| r.method == "GET" && r.status == 200)
        .count();
    (looks, reads)
}

async fn misses_ask_s3_about_a_variant_once(backend: Backend) {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let proxy = CountingProxy::start(moto.addr()).await;
    let kiln = Kiln::start_with(backend, &s3_storage_toml(&proxy.endpoint(), BUCKET, "edge")).await;
    // The original's download waits at a gate, so the variant stays missing
    // while the misses come.
    let gate = Gate::closed();
    let origin = Origin::start().await;
    origin.serve(
        "/photos/dog.jpg",
        OriginResponse::image("image/jpeg", jpeg(900, 600, [40, 90, 200])).with_gate(&gate),
    );
    let image_url = origin.url("/photos/dog.jpg");
    let code = kiln::keys::media_code(&image_url, "default");
    let path = format!("default/0/{code}.jpg");
    let variant_key = format!("/{BUCKET}/edge/media/cache/medium/{path}");
    let variant_url = kiln.url(&format!("/media/cache/medium/{path}"));

    let first = reqwest::get(preheat_url(&kiln.base, "medium", &image_url, None))
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    eventually(Duration::from_secs(10), "the download to start", || async {
        (origin.hits("/photos/dog.jpg") == 1).then_some(())
    })
    .await;

    // Many at once.
    let client = reqwest::Client::new();
    let concurrent =
        futures::future::join_all((0..24).map(|_| client.get(&variant_url).send())).await;
    for response in concurrent {
        assert_eq!(response.unwrap().status(), 202);
    }
    // Again and again, for longer than any short-lived negative answer
    // (index.negative_ttl_secs, 2 s) lives.
    let start = Instant::now();
    let mut repeated = 0;
    eventually(Duration::from_secs(20), "3 s of repeated misses", || {
        repeated += 1;
        let response = client.get(&variant_url).send();
        async move {
            assert_eq!(response.await.ok()?.status(), 202);
            (start.elapsed() > Duration::from_secs(3)).then_some(())
        }
    })
    .await;
    assert!(repeated > 10, "{repeated} repeated misses");
    let (looks, reads) = existence_and_reads(&proxy.requests_for(&variant_key));
    assert_eq!(looks, 1, "S3 asked about the missing variant once");
    assert_eq!(reads, 0);

    // Rendered: served, and nothing asks S3 whether it exists.
    gate.open();
    let hit = until_ready(&variant_url).await;
    let bytes = hit.bytes().await.unwrap();
    assert_eq!(format_of(&bytes), "jpeg");
    assert_eq!(dimensions(&bytes), (400, 267));
    let after = futures::future::join_all((0..24).map(|_| client.get(&variant_url).send())).await;
    for response in after {
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(dimensions(&response.bytes().await.unwrap()), (400, 267));
    }
    let requests = proxy.requests_for(&variant_key);
    let (looks, reads) = existence_and_reads(&requests);
    assert_eq!(
        looks, 1,
        "no more existence checks after the render: {requests:?}"
    );
    assert!(
        reads <= 1,
        "its bytes read once, then kept hot: {requests:?}"
    );
    assert_eq!(
        requests.iter().filter(|r| r.method == "PUT").count(),
        1,
        "{requests:?}"
    );

    // A variant nothing has asked about yet, many at once: one look at S3
    // between them, and one at its original.
    let small_key = format!("/{BUCKET}/edge/media/cache/small/{path}");
    let small_url = kiln.url(&format!("/media/cache/small/{path}"));
    let original_key = format!("/{BUCKET}/edge/{path}");
    let original_heads = |proxy: &CountingProxy| {
        proxy
            .requests_for(&original_key)
            .iter()
            .filter(|r| r.method == "HEAD")
            .count()
    };
    let heads_before = original_heads(&proxy);
    let concurrent =
        futures::future::join_all((0..24).map(|_| client.get(&small_url).send())).await;
    for response in concurrent {
        assert_eq!(response.unwrap().status(), 202);
    }
    let (looks, _) = existence_and_reads(&proxy.requests_for(&small_key));
    assert_eq!(looks, 1, "concurrent first misses share one look");
    assert_eq!(
        original_heads(&proxy) - heads_before,
        1,
        "and one look at the original"
    );
    let hit = until_ready(&small_url).await;
    assert_eq!(dimensions(&hit.bytes().await.unwrap()), (200, 133));
    let requests = proxy.requests_for(&small_key);
    assert_eq!(existence_and_reads(&requests).0, 1, "{requests:?}");

    let all = proxy.requests();
    eprintln!(
        "S3 requests during the miss test ({backend:?}): {} in all, {} on the medium variant",
        all.len(),
        proxy.requests_for(&variant_key).len()
    );
}

/// Prints a child's log when the test fails, before its temp dir goes.
struct ShowLogOnPanic(std::path::PathBuf);

impl Drop for ShowLogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("--- {} ---\n{log}", self.0.display());
        }
    }
}

/// The `kiln` binary with no `s3_*` setting: endpoint, region, plain HTTP
/// and credentials all come from the AWS environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_takes_s3_credentials_and_endpoint_from_the_aws_environment() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let proxy = CountingProxy::start(moto.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nurl = \"s3://{BUCKET}/from-env\"\n\
             [network]\nallow = [\"127.0.0.1/32\"]\n[auth]\nadmin_key = \"{ADMIN_KEY}\"\n"
        ),
    )
    .unwrap();
    let log_path = dir.path().join("kiln.log");
    let _show_log = ShowLogOnPanic(log_path.clone());
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env_remove("KILN_CONFIG")
        .envs([
            ("AWS_ACCESS_KEY_ID", "env-key-id"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", proxy.endpoint().as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ])
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _kiln = Process::spawn(&mut command);
    let base = format!("http://127.0.0.1:{port}");
    until_ready(&format!("{base}/readyz")).await;

    let origin = Origin::start().await;
    origin.serve(
        "/photos/env.jpg",
        OriginResponse::image("image/jpeg", jpeg(640, 480, [10, 200, 10])),
    );
    let image_url = origin.url("/photos/env.jpg");
    let code = kiln::keys::media_code(&image_url, "default");
    let path = format!("default/0/{code}.jpg");
    reqwest::get(preheat_url(&base, "small", &image_url, None))
        .await
        .unwrap();
    let hit = until_ready(&format!("{base}/media/cache/small/{path}")).await;
    assert_eq!(dimensions(&hit.bytes().await.unwrap()), (200, 150));
    let variant = moto
        .get(BUCKET, &format!("from-env/media/cache/small/{path}"))
        .expect("the variant in the bucket");
    assert_eq!(format_of(&variant), "jpeg");

    let requests = proxy.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            request.key_id.as_deref(),
            Some("env-key-id"),
            "signed with the environment's key: {request:?}"
        );
    }
}

/// Scanners asking for paths with no original leave no lasting Redis key:
/// "absent" lives `index.negative_ttl_secs` unless a render is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_nobody_renders_leaves_no_lasting_absent_marker() {
    let kiln = Kiln::start(Backend::Redis).await;
    let response = reqwest::get(kiln.url("/media/cache/small/nope/0/missing.jpg"))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let redis = kiln.redis().unwrap();
    let ttl = redis.redis_int(&["TTL", "kiln:absent:media/cache/small/nope/0/missing.jpg"]);
    assert!((1..=2).contains(&ttl), "marker TTL {ttl}");

    // A render queued: the marker lasts until the render records the variant.
    kiln.store("acme/0/a.jpg", &jpeg(300, 200, [1, 2, 3]));
    let miss = reqwest::get(kiln.url("/media/cache/small/acme/0/a.jpg"))
        .await
        .unwrap();
    assert!([200, 202].contains(&miss.status().as_u16()));
    until_ready(&kiln.url("/media/cache/small/acme/0/a.jpg")).await;
    assert_eq!(
        redis.redis_int(&["EXISTS", "kiln:absent:media/cache/small/acme/0/a.jpg"]),
        0,
        "the render cleared it"
    );
}
