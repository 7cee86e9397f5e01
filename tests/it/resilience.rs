//! Failures that must cost little: a bad original fails once and is then
//! answered from memory, retryable failures back off and end in a dead
//! letter with a failure webhook, Redis going away degrades to fast 503s.

use std::time::Duration;

use crate::kiln::{preheat_url, start_on, until_ready, Backend, Kiln};
use crate::support::{
    dimensions, eventually, jpeg, png_rgba, CallbackSink, Origin, OriginResponse, RedisServer,
};

on_both_backends!(
    a_variant_that_failed_for_good_answers_its_error_without_queueing_again,
    retryable_failures_back_off_then_dead_letter_with_a_failure_webhook,
);

async fn a_variant_that_failed_for_good_answers_its_error_without_queueing_again(backend: Backend) {
    let kiln = Kiln::start(backend).await;
    // JPEG magic, then nothing a decoder can use.
    kiln.store(
        "acme/0/broken.jpg",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 cut short",
    );
    let url = kiln.url("/media/cache/small/acme/0/broken.jpg");
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 202);

    let failed = eventually(
        Duration::from_secs(30),
        "the failure is answered",
        || async {
            let response = reqwest::get(&url).await.unwrap();
            (response.status() == 422).then_some(response)
        },
    )
    .await;
    assert_eq!(
        failed.headers()["cache-control"],
        "public, max-age=300",
        "a bad original's error may be cached as long as kiln remembers it"
    );
    let body: serde_json::Value = failed.json().await.unwrap();
    assert_eq!(body["error"], "decode-failed", "{body}");

    // Asked again and again: the same answer, and no new job.
    for _ in 0..5 {
        assert_eq!(reqwest::get(&url).await.unwrap().status(), 422);
    }
    if let Some(redis) = kiln.redis() {
        assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:urgent"]), 0);
        assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:dead"]), 1);
        let failure = redis
            .redis_bulk(&["GET", "kiln:failed:media/cache/small/acme/0/broken.jpg"])
            .expect("the failure is shared through Redis");
        assert!(failure.contains("decode-failed"), "{failure}");
    }
    // Another filter of the same original is its own job, and fails the same way.
    let other = kiln.url("/media/cache/medium/acme/0/broken.jpg");
    assert_eq!(reqwest::get(&other).await.unwrap().status(), 202);
}

/// A kiln started after another recorded a failure knows it only through
/// Redis: the look-up that finds the variant missing answers the failure,
/// and no job is queued again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_recorded_by_one_kiln_is_answered_by_another_sharing_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (_first, first) = start_on(&redis, dir.path(), "");
    until_ready(&format!("{first}/healthz")).await;
    std::fs::create_dir_all(dir.path().join("acme/0")).unwrap();
    std::fs::write(
        dir.path().join("acme/0/broken.jpg"),
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 cut short",
    )
    .unwrap();
    let path = "/media/cache/small/acme/0/broken.jpg";
    assert_eq!(
        reqwest::get(format!("{first}{path}"))
            .await
            .unwrap()
            .status(),
        202
    );
    eventually(
        Duration::from_secs(30),
        "the failure is answered",
        || async {
            let status = reqwest::get(format!("{first}{path}"))
                .await
                .unwrap()
                .status();
            (status == 422).then_some(())
        },
    )
    .await;

    let (_second, second) = start_on(&redis, dir.path(), "");
    until_ready(&format!("{second}/healthz")).await;
    let answer = reqwest::get(format!("{second}{path}")).await.unwrap();
    assert_eq!(answer.status(), 422);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "decode-failed", "{body}");
    assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:urgent"]), 0);
    assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:dead"]), 1);
}

async fn retryable_failures_back_off_then_dead_letter_with_a_failure_webhook(backend: Backend) {
    // A visibility timeout far longer than the test: only the backoff can
    // bring the job back.
    let kiln = Kiln::start_with(
        backend,
        "[queue]\nmax_attempts = 3\nretry_backoff_ms = 100\nvisibility_timeout_secs = 600\n",
    )
    .await;
    let origin = Origin::start().await;
    let sink = CallbackSink::start().await;
    origin.serve("/down.jpg", OriginResponse::status(503));
    origin.serve("/gone.jpg", OriginResponse::status(404));
    origin.serve(
        "/fine.jpg",
        OriginResponse::image("image/jpeg", jpeg(64, 64, [1, 2, 3])),
    );

    let request = preheat_url(
        &kiln.base,
        "small",
        &origin.url("/down.jpg"),
        Some(&sink.url("/down")),
    );
    assert_eq!(reqwest::get(&request).await.unwrap().status(), 202);
    let hooks = sink.wait_for(1, Duration::from_secs(30)).await;
    let hook = &hooks[0];
    assert_eq!(hook.body["status"], "failed", "{}", hook.body);
    assert_eq!(hook.body["error"]["code"], "origin-status");
    assert_eq!(hook.body["statusCode"], 503);
    // Exactly max_attempts downloads, then it stops.
    assert_eq!(origin.hits("/down.jpg"), 3);

    // A permanent failure is not retried at all.
    let request = preheat_url(
        &kiln.base,
        "small",
        &origin.url("/gone.jpg"),
        Some(&sink.url("/gone")),
    );
    assert_eq!(reqwest::get(&request).await.unwrap().status(), 202);
    let hooks = sink.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(hooks[1].body["statusCode"], 404, "{}", hooks[1].body);
    assert_eq!(origin.hits("/gone.jpg"), 1);

    // Work after the failures is unaffected, and nothing more was tried.
    let request = preheat_url(
        &kiln.base,
        "small",
        &origin.url("/fine.jpg"),
        Some(&sink.url("/fine")),
    );
    assert_eq!(reqwest::get(&request).await.unwrap().status(), 202);
    let hooks = sink.wait_for(3, Duration::from_secs(30)).await;
    assert_eq!(hooks[2].body["status"], "done", "{}", hooks[2].body);
    assert_eq!(origin.hits("/down.jpg"), 3);
    assert_eq!(origin.hits("/gone.jpg"), 1);

    if let Some(redis) = kiln.redis() {
        assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:dead"]), 2);
        let dead = redis.redis_cli(&["XRANGE", "kiln:jobs:dead", "-", "+"]);
        assert!(dead.contains("origin-status"), "{dead}");
        assert_eq!(redis.redis_int(&["ZCARD", "kiln:jobs:preheat:delayed"]), 0);
        assert_eq!(redis.redis_int(&["XLEN", "kiln:jobs:preheat"]), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_degrades_to_fast_503s_and_kiln_heals_by_itself() {
    let mut kiln = Kiln::start_with(
        Backend::Redis,
        "[redis]\ntimeout_ms = 1000\nbreaker_cooldown_ms = 200\n",
    )
    .await;
    kiln.store("acme/0/a.png", &png_rgba(400, 300, [200, 10, 10, 255]));
    let hot = kiln.url("/media/cache/small/acme/0/a.png");
    assert_eq!(reqwest::get(&hot).await.unwrap().status(), 202);
    let rendered = until_ready(&hot).await.bytes().await.unwrap();
    // A variant some other kiln rendered: on storage, in no memory of ours.
    kiln.store(
        "media/cache/small/acme/0/cold.png",
        &png_rgba(10, 10, [1, 1, 1, 255]),
    );

    kiln.redis_mut().kill();
    // Never hang: every answer below must come well inside this.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let get = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.expect("an answer, not a hang") }
    };
    // Hits keep being served: from memory, and from storage.
    let hit = get(hot.clone()).await;
    assert_eq!(hit.status(), 200);
    assert_eq!(hit.bytes().await.unwrap(), rendered);
    let cold = get(kiln.url("/media/cache/small/acme/0/cold.png")).await;
    assert_eq!(cold.status(), 200);
    // Misses cannot be queued: 503, never cached.
    let miss = kiln.url("/media/cache/medium/acme/0/a.png");
    for _ in 0..5 {
        let answer = get(miss.clone()).await;
        assert_eq!(answer.status(), 503);
        assert_eq!(answer.headers()["cache-control"], "no-store");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["error"], "queue-unavailable", "{body}");
    }

    // Redis comes back empty (no persistence): kiln reconnects, re-creates
    // its consumer groups, and the same miss is queued and rendered.
    kiln.redis_mut().restart();
    eventually(
        Duration::from_secs(30),
        "misses are queued again",
        || async { (get(miss.clone()).await.status() == 202).then_some(()) },
    )
    .await;
    let medium = until_ready(&miss).await.bytes().await.unwrap();
    assert_eq!(dimensions(&medium), (400, 300));
}
