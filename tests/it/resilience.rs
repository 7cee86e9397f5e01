//! Failures that must cost little: a bad original fails once and is then
//! answered from memory, retryable failures back off and end in a dead
//! letter with a failure webhook, Redis going away degrades to fast 503s.

use std::time::Duration;

use crate::kiln::{preheat_url, Backend, Kiln};
use crate::support::{eventually, jpeg, CallbackSink, Origin, OriginResponse};

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
