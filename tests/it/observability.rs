//! Observability against real traffic: `/metrics` counters move by exactly
//! what was done (hits by source, misses, 202s, jobs by outcome and code,
//! fetches, callbacks, queue length/lag/pending read from Redis), a
//! worker-only process is scraped on `metrics.listen`, and `/ui` is checked
//! in headless Chromium (DOM and screenshot).

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use crate::kiln::{preheat_url, Backend, Kiln};
use crate::support::{eventually, free_port, png_rgba, CallbackSink, Gate, Origin, OriginResponse};

/// A scrape: series (`name{labels}`) to value.
type Scrape = HashMap<String, f64>;

/// Parses the text exposition, checking every line's shape on the way.
fn parse(text: &str) -> Scrape {
    let mut series = Scrape::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP kiln_") || comment.starts_with("TYPE kiln_"),
                "comment line {line:?}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("`series value`");
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.starts_with("kiln_")
                && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "metric name in {line:?}"
        );
        if let Some(labels) = name.strip_prefix(bare) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "labels in {line:?}"
            );
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        assert!(
            series.insert(name.to_string(), value).is_none(),
            "duplicate series {name}"
        );
    }
    series
}

async fn scrape(url: &str) -> Scrape {
    let response = reqwest::get(url).await.expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse(&response.text().await.unwrap())
}

fn value(s: &Scrape, series: &str) -> f64 {
    s.get(series).copied().unwrap_or(0.0)
}

/// Polls `/metrics` until `series` reaches `want`.
async fn until_metric(kiln: &Kiln, series: &str, want: f64) -> Scrape {
    let url = kiln.url("/metrics");
    eventually(
        Duration::from_secs(30),
        &format!("{series} = {want}"),
        || {
            let url = url.clone();
            async move {
                let s = scrape(&url).await;
                (value(&s, series) == want).then_some(s)
            }
        },
    )
    .await
}

async fn get(url: &str, if_none_match: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(url);
    if let Some(etag) = if_none_match {
        request = request.header("if-none-match", etag);
    }
    request.send().await.expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_real_traffic() {
    let origin = Origin::start().await;
    let green = png_rgba(300, 200, [30, 160, 60, 255]);
    origin.serve("/b.png", OriginResponse::image("image/png", green.clone()));
    origin.serve("/gone.png", OriginResponse::status(404));
    let ok_sink = CallbackSink::start().await;
    let bad_sink = CallbackSink::start().await;
    bad_sink.set_status(500);
    // One worker loop, so held fetches leave later jobs waiting (lag).
    let kiln = Kiln::start_with(
        Backend::Redis,
        "[callback]\nmax_attempts = 1\n[queue]\nworker_concurrency = 1\n",
    )
    .await;
    let before = scrape(&kiln.url("/metrics")).await;

    // A miss: 202, one job, rendered by the worker.
    kiln.store("default/a.png", &png_rgba(64, 64, [200, 30, 30, 255]));
    let miss = get(&kiln.url("/media/cache/small/default/a.png"), None).await;
    assert_eq!(miss.status(), 202);
    until_metric(&kiln, "kiln_jobs_total{outcome=\"done\",code=\"\"}", 1.0).await;
    // Hot in memory at once: the worker's render went into the memory its
    // front serves from (the process's two indexes share it).
    let first_hit = get(&kiln.url("/media/cache/small/default/a.png"), None).await;
    assert_eq!(first_hit.status(), 200);
    let etag = first_hit.headers()["etag"].to_str().unwrap().to_string();
    let hot_hit = get(&kiln.url("/media/cache/small/default/a.png"), None).await;
    assert_eq!(hot_hit.status(), 200);
    let not_modified = get(&kiln.url("/media/cache/small/default/a.png"), Some(&etag)).await;
    assert_eq!(not_modified.status(), 304);
    // A variant put in storage by someone else: found in storage (a cold hit).
    kiln.store("media/cache/small/default/direct.png", &green);
    let cold = get(&kiln.url("/media/cache/small/default/direct.png"), None).await;
    assert_eq!(cold.status(), 200);

    // A pre-heat that renders, whose webhook is refused (given up at once),
    // and one whose origin answers 404, whose webhook is delivered.
    let ok = get(
        &preheat_url(
            &kiln.base,
            "small",
            &origin.url("/b.png"),
            Some(&bad_sink.url("/hook")),
        ),
        None,
    )
    .await;
    assert_eq!(ok.status(), 202);
    let failing = get(
        &preheat_url(
            &kiln.base,
            "small",
            &origin.url("/gone.png"),
            Some(&ok_sink.url("/hook")),
        ),
        None,
    )
    .await;
    assert_eq!(failing.status(), 202);
    until_metric(&kiln, "kiln_jobs_total{outcome=\"done\",code=\"\"}", 2.0).await;
    until_metric(
        &kiln,
        "kiln_jobs_total{outcome=\"failed\",code=\"origin-status\"}",
        1.0,
    )
    .await;
    let after = until_metric(&kiln, "kiln_callback_attempts_total", 2.0).await;
    assert_eq!(ok_sink.count(), 1);
    assert_eq!(bad_sink.count(), 1);

    let delta = |series: &str| value(&after, series) - value(&before, series);
    for (series, want) in [
        (
            "kiln_http_requests_total{route=\"cache\",status=\"202\"}",
            1.0,
        ),
        (
            "kiln_http_requests_total{route=\"cache\",status=\"200\"}",
            3.0,
        ),
        (
            "kiln_http_requests_total{route=\"cache\",status=\"304\"}",
            1.0,
        ),
        (
            "kiln_http_requests_total{route=\"request\",status=\"202\"}",
            2.0,
        ),
        ("kiln_cache_hits_total{source=\"index\"}", 0.0),
        ("kiln_cache_hits_total{source=\"memory\"}", 3.0),
        ("kiln_cache_hits_total{source=\"storage\"}", 1.0),
        ("kiln_cache_misses_total", 1.0),
        ("kiln_cache_busy_total", 1.0),
        ("kiln_cache_jobs_enqueued_total", 1.0),
        ("kiln_jobs_total{outcome=\"done\",code=\"\"}", 2.0),
        (
            "kiln_jobs_total{outcome=\"failed\",code=\"origin-status\"}",
            1.0,
        ),
        ("kiln_render_seconds_count{filter=\"small\"}", 2.0),
        (
            "kiln_render_seconds_bucket{filter=\"small\",le=\"+Inf\"}",
            2.0,
        ),
        ("kiln_fetches_total{outcome=\"ok\"}", 1.0),
        ("kiln_fetches_total{outcome=\"error\"}", 1.0),
        ("kiln_fetch_bytes_total", green.len() as f64),
        ("kiln_fetch_seconds_count", 2.0),
        ("kiln_callback_attempts_total", 2.0),
        ("kiln_callback_failures_total", 1.0),
        ("kiln_callbacks_given_up_total", 1.0),
    ] {
        assert_eq!(delta(series), want, "{series}");
    }
    assert!(value(&after, "kiln_render_seconds_sum{filter=\"small\"}") > 0.0);
    assert_eq!(value(&after, "kiln_queue_up"), 1.0);
    assert_eq!(value(&after, "kiln_dead_letters"), 1.0);
    assert_eq!(value(&after, "kiln_queue_length{stream=\"dead\"}"), 1.0);
    assert_eq!(value(&after, "kiln_queue_length{stream=\"preheat\"}"), 0.0);

    // Queue depth from Redis: the one worker loop holds a fetch, the next job waits.
    let gate = Gate::closed();
    for name in ["/held1.png", "/held2.png"] {
        origin.serve(
            name,
            OriginResponse::image("image/png", green.clone()).with_gate(&gate),
        );
        let queued = get(
            &preheat_url(&kiln.base, "small", &origin.url(name), None),
            None,
        )
        .await;
        assert_eq!(queued.status(), 202);
    }
    let held = until_metric(&kiln, "kiln_queue_pending{stream=\"preheat\"}", 1.0).await;
    assert_eq!(value(&held, "kiln_queue_lag{stream=\"preheat\"}"), 1.0);
    assert_eq!(value(&held, "kiln_queue_length{stream=\"preheat\"}"), 2.0);
    gate.open();
    let drained = until_metric(&kiln, "kiln_queue_length{stream=\"preheat\"}", 0.0).await;
    assert_eq!(value(&drained, "kiln_queue_lag{stream=\"preheat\"}"), 0.0);
    assert_eq!(
        value(&drained, "kiln_queue_pending{stream=\"preheat\"}"),
        0.0
    );
}

/// A worker-only process serves its own counters on `metrics.listen`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_only_process_is_scraped_on_its_metrics_listener() {
    let front = Kiln::start(Backend::Redis).await;
    let redis_url = front.redis().unwrap().url();
    let metrics_port = free_port();
    let toml = crate::kiln::test_config_toml(
        free_port(),
        front.dir.path(),
        front.redis(),
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let config = kiln::config::Config::load_from(kiln::config::Sources {
        extra_toml: Some(&toml),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(config.redis.url, redis_url);
    let worker = kiln::app::spawn(config.clone(), kiln::app::Role::Worker).unwrap();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    crate::kiln::until_ready(&format!("http://127.0.0.1:{metrics_port}/healthz")).await;

    front.store("default/w.png", &png_rgba(40, 40, [10, 10, 200, 255]));
    let miss = get(&front.url("/media/cache/small/default/w.png"), None).await;
    assert_eq!(miss.status(), 202);
    // Rendered by one of the two worker processes; the two scrapes add up.
    eventually(
        Duration::from_secs(30),
        "one job done across processes",
        || {
            let (a, b) = (front.url("/metrics"), metrics_url.clone());
            async move {
                let done = "kiln_jobs_total{outcome=\"done\",code=\"\"}";
                let total = value(&scrape(&a).await, done) + value(&scrape(&b).await, done);
                (total == 1.0).then_some(())
            }
        },
    )
    .await;
    let worker_scrape = scrape(&metrics_url).await;
    // The worker process answered no HTTP request of the front's.
    assert!(!worker_scrape
        .keys()
        .any(|k| k.starts_with("kiln_http_requests_total")));
    assert_eq!(value(&worker_scrape, "kiln_queue_up"), 1.0);
    let other = get(&format!("http://127.0.0.1:{metrics_port}/ui"), None).await;
    assert_eq!(other.status(), 404);

    // A second worker given the same metrics port fails to start instead of
    // running without its listener.
    let second = kiln::app::spawn(config.clone(), kiln::app::Role::Worker).unwrap();
    let error = second.stop().unwrap_err().to_string();
    assert!(
        error.contains("metrics.listen") && error.contains("in use"),
        "{error}"
    );
    // A worker on the embedded queue would wait for jobs nothing can send it.
    let mut embedded = config.clone();
    embedded.queue.backend = kiln::config::QueueBackend::Embedded;
    embedded.metrics.listen = String::new();
    let lonely = kiln::app::spawn(embedded, kiln::app::Role::Worker).unwrap();
    let error = lonely.stop().unwrap_err().to_string();
    assert!(
        error.contains("`kiln worker` needs queue.backend"),
        "{error}"
    );
    worker.stop().unwrap();
}

/// Runs headless Chromium on `url` with these extra arguments; its stdout.
async fn chromium(profile: &std::path::Path, args: &[&str], url: &str) -> Vec<u8> {
    let mut command = tokio::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("chromium finishes within 60 s")
        .expect("chromium runs (scripts/test installs it)");
    assert!(output.status.success(), "chromium: {:?}", output.status);
    output.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium() {
    const RED: [u8; 3] = [220, 40, 40];
    let origin = Origin::start().await;
    origin.serve(
        "/red.png",
        OriginResponse::image(
            "image/png",
            png_rgba(300, 300, [RED[0], RED[1], RED[2], 255]),
        ),
    );
    origin.serve("/missing.png", OriginResponse::status(404));
    // Redis: the worker writes recent jobs to a Redis list the front reads.
    let kiln = Kiln::start(Backend::Redis).await;
    for path in ["/red.png", "/missing.png"] {
        let answer = get(
            &preheat_url(&kiln.base, "small", &origin.url(path), None),
            None,
        )
        .await;
        assert_eq!(answer.status(), 202);
    }
    let html = eventually(Duration::from_secs(30), "both jobs on /ui", || {
        let url = kiln.url("/ui");
        async move {
            let html = reqwest::get(&url).await.ok()?.text().await.ok()?;
            (html.matches("<tr class=\"job ").count() == 2).then_some(html)
        }
    })
    .await;
    assert!(html.contains("<table id=\"queues\">"), "{html}");

    // The first view stored the sample original; render every preset's sample.
    let presets: Vec<String> = kiln::filter::FilterSet::from_config(
        &kiln::config::Config::load_from(Default::default()).unwrap(),
    )
    .unwrap()
    .iter()
    .map(|p| p.name.clone())
    .collect();
    assert!(presets.len() >= 2);
    for preset in &presets {
        let url = kiln.url(&format!("/media/cache/{preset}/kiln-ui/sample.png"));
        eventually(Duration::from_secs(30), &format!("{preset} sample"), || {
            let url = url.clone();
            async move { (get(&url, None).await.status() == 200).then_some(()) }
        })
        .await;
    }

    let profile = tempfile::tempdir().unwrap();
    let dom = String::from_utf8(chromium(profile.path(), &["--dump-dom"], &kiln.url("/ui")).await)
        .unwrap();
    assert!(dom.contains("<table id=\"queues\">"), "{dom}");
    for stream in ["urgent", "preheat", "delayed", "dead"] {
        assert!(
            dom.contains(&format!("data-stream=\"{stream}\"")),
            "{stream}: {dom}"
        );
    }
    assert!(dom.contains("id=\"throughput\""), "{dom}");
    // The preset samples' jobs are listed too; ours renders `small` of a download.
    let done_rows: Vec<&str> = dom
        .split("<tr class=\"job done\"")
        .skip(1)
        .map(|row| row.split("</tr>").next().unwrap())
        .filter(|row| !row.contains("kiln-ui/"))
        .collect();
    assert_eq!(done_rows.len(), 1, "{dom}");
    assert!(
        done_rows[0].contains("<img class=\"thumb\" src=\"/media/cache/small/"),
        "{}",
        done_rows[0]
    );
    let failed_row = dom
        .split("<tr class=\"job failed\"")
        .nth(1)
        .expect("a failed job row")
        .split("</tr>")
        .next()
        .unwrap();
    assert!(
        failed_row.contains("data-code=\"origin-status\""),
        "{failed_row}"
    );
    assert!(
        failed_row.contains("404"),
        "the reason names the status: {failed_row}"
    );
    assert_eq!(
        dom.matches("<section class=\"preset\"").count(),
        presets.len()
    );
    for preset in &presets {
        assert!(
            dom.contains(&format!("src=\"/media/cache/{preset}/kiln-ui/sample.png\"")),
            "{preset}"
        );
    }

    let shot = profile.path().join("ui.png");
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600",
        ],
        &kiln.url("/ui"),
    )
    .await;
    let image = image::open(&shot)
        .expect("the screenshot decodes")
        .to_rgb8();
    assert_eq!(image.dimensions(), (1280, 1600));
    // The rendered thumbnail (96x96 CSS pixels of the red original) shows.
    let red = image
        .pixels()
        .filter(|p| {
            p.0.iter()
                .zip(RED)
                .all(|(got, want)| (i16::from(*got) - i16::from(want)).abs() <= 12)
        })
        .count();
    assert!(
        (96 * 96 * 9 / 10..=96 * 96 * 2).contains(&red),
        "{red} red pixels in the screenshot"
    );
    // And the samples rendered: pixels of the sample's light disc.
    let disc = image.pixels().filter(|p| p.0 == [245, 235, 200]).count();
    assert!(disc > 1000, "{disc} sample-disc pixels");
}

/// `kiln serve` with `log.format = "json"`: every stdout line is a JSON
/// object; a request gives one access line, a job one line with its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_a_line_per_request_and_per_job() {
    let d = crate::distributed::embedded_deployment("[log]\nformat = \"json\"\n");
    let (dir, config, storage) = (&d.dir, &d.config, d.dir.path().join("storage"));
    let original = storage.join("default/j.png");
    std::fs::create_dir_all(original.parent().unwrap()).unwrap();
    std::fs::write(&original, png_rgba(50, 50, [90, 90, 90, 255])).unwrap();
    let log = dir.path().join("kiln.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let _kiln = crate::distributed::Process::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("RUST_LOG")
            .env_remove("KILN_CONFIG")
            .stdout(log_file)
            .stderr(Stdio::null()),
    );
    let base = &d.base;
    let url = format!("{base}/media/cache/small/default/j.png");
    // On failure, the process's log says why.
    let served = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        crate::kiln::until_ready(&format!("{base}/healthz")).await;
        assert_eq!(get(&url, None).await.status(), 202);
        eventually(Duration::from_secs(30), "the variant", || {
            let url = url.clone();
            async move { (get(&url, None).await.status() == 200).then_some(()) }
        })
        .await;
    }))
    .await;
    if let Err(panic) = served {
        eprintln!(
            "kiln's log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(panic);
    }

    let lines: Vec<serde_json::Value> = eventually(
        Duration::from_secs(30),
        "the job's and the hit's log lines",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
            let job_done = lines.iter().any(|l| l["message"] == "job done");
            let hit = lines.iter().any(|l| {
                l["target"] == "kiln::access" && l["status"] == 200 && l["route"] == "cache"
            });
            async move { (job_done && hit).then_some(lines) }
        },
    )
    .await;
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "kiln::access" && l["route"] == "cache")
        .collect();
    let miss = access
        .iter()
        .find(|l| l["status"] == 202)
        .expect("the 202's line");
    assert_eq!(miss["method"], "GET");
    assert_eq!(miss["path"], "/media/cache/small/default/j.png");
    assert!(miss["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(miss["bytes"].as_u64().unwrap() > 0, "{miss}");
    let hit = access.iter().find(|l| l["status"] == 200).unwrap();
    assert!(
        ["memory", "index", "storage"].contains(&hit["hit"].as_str().unwrap()),
        "{hit}"
    );
    let job = lines.iter().find(|l| l["message"] == "job done").unwrap();
    assert_eq!(job["outcome"], "done");
    assert_eq!(job["filters"], "[\"small\"]");
    assert!(
        job["job"].as_str().is_some_and(|id| !id.is_empty()),
        "{job}"
    );
    assert!(job["duration_ms"].as_u64().is_some(), "{job}");
}
