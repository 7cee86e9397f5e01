//! The `/ui` status page for a person, server-rendered HTML with no script
//! and no external asset: queue depths, throughput, recent jobs with their
//! thumbnails and failures with their reason, and each filter preset with a
//! sample rendering. Also the recent-jobs log the workers write to (a capped
//! Redis list with the redis backend, so a front sees other processes'
//! jobs; an in-process ring otherwise).
//!
//! Never decodes or renders: a preset's sample is an ordinary
//! `/media/cache/<filter>/<sample>` URL over a small original stored at
//! start, so the usual miss → job → render path makes it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::filter::FilterSet;
use crate::keys;
use crate::metrics::StreamStats;
use crate::queue::Queue;
use crate::redis_conn::RedisHandle;
use crate::storage::Storage;

/// One finished job, as the page lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentJob {
    pub id: String,
    pub code: String,
    pub filters: Vec<String>,
    /// Storage path of the original (empty when it was never known).
    pub original: String,
    /// `done` or `failed`.
    pub outcome: String,
    /// `Error::code()` of a failure.
    pub error_code: Option<String>,
    /// Why it failed, as the error says.
    pub reason: Option<String>,
    pub duration_ms: u64,
    pub finished_at_ms: u64,
}

/// Where finished jobs are remembered for the page, newest first.
pub struct RecentJobs {
    cap: usize,
    ring: Mutex<VecDeque<RecentJob>>,
    redis: Option<(Arc<RedisHandle>, String)>,
}

impl RecentJobs {
    /// In memory, or (`redis`: a handle and the list's key) in Redis.
    pub fn new(cap: usize, redis: Option<(Arc<RedisHandle>, String)>) -> RecentJobs {
        RecentJobs {
            cap: cap.max(1),
            ring: Mutex::new(VecDeque::new()),
            redis,
        }
    }

    /// Remembers a finished job; a Redis failure is logged, never the job's.
    pub async fn record(&self, job: RecentJob) {
        let Some((handle, key)) = &self.redis else {
            let mut ring = self.ring.lock();
            ring.push_front(job);
            ring.truncate(self.cap);
            return;
        };
        let written: Result<()> = async {
            let text = serde_json::to_string(&job).unwrap_or_default();
            let mut conn = handle.conn().await?;
            redis::pipe()
                .lpush(key, text)
                .ignore()
                .ltrim(key, 0, self.cap as isize - 1)
                .ignore()
                .query_async::<()>(&mut conn)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not record the job for /ui");
        }
    }

    /// The remembered jobs, newest first.
    pub async fn list(&self) -> Result<Vec<RecentJob>> {
        let Some((handle, key)) = &self.redis else {
            return Ok(self.ring.lock().iter().cloned().collect());
        };
        let mut conn = handle.conn().await?;
        let texts: Vec<String> = conn.lrange(key, 0, self.cap as isize - 1).await?;
        Ok(texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }
}

/// The page's parts.
pub struct Ui {
    pub filters: Arc<FilterSet>,
    pub storage: Storage,
    pub recent: Arc<RecentJobs>,
    /// Seconds of finished jobs the throughput covers.
    pub window_secs: u64,
    /// Set once the sample original is known to be stored.
    pub sample_stored: tokio::sync::OnceCell<()>,
}

impl Ui {
    pub fn new(
        filters: Arc<FilterSet>,
        storage: Storage,
        recent: Arc<RecentJobs>,
        window_secs: u64,
    ) -> Ui {
        Ui {
            filters,
            storage,
            recent,
            window_secs: window_secs.max(1),
            sample_stored: tokio::sync::OnceCell::new(),
        }
    }

    /// Stores the built-in sample original the preset samples are made
    /// from, unless it is there already; once per process (the first page
    /// view encodes a small PNG, a few milliseconds).
    async fn store_sample(&self) -> Result<()> {
        self.sample_stored
            .get_or_try_init(|| async {
                if self.storage.head(keys::UI_SAMPLE_PATH).await?.is_none() {
                    self.storage
                        .put(keys::UI_SAMPLE_PATH, Bytes::from(sample_png()))
                        .await?;
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// The whole page. Parts that cannot be read now say so in place.
    pub async fn page(&self, queue: &dyn Queue) -> String {
        if let Err(e) = self.store_sample().await {
            tracing::warn!(error = %e, "could not store the /ui sample original");
        }
        let streams = queue.streams().await;
        let recent = self.recent.list().await;
        let now = crate::queue::now_millis();
        let mut o = String::with_capacity(16 * 1024);
        o.push_str(concat!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
            "<meta http-equiv=\"refresh\" content=\"30\">",
            "<title>kiln status</title><style>",
            "body{font:14px/1.4 sans-serif;margin:16px;background:#fafafa;color:#222}",
            "table{border-collapse:collapse;margin-bottom:16px}",
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}",
            "th{background:#eee}.failed td{background:#fff4e0}",
            ".thumb{width:96px;height:96px;object-fit:contain;display:block}",
            ".preset{display:inline-block;margin:0 12px 12px 0;padding:8px;border:1px solid #ccc}",
            ".preset img{display:block;max-width:240px;max-height:240px}",
            "</style></head><body>\n<h1>kiln</h1>\n"
        ));

        o.push_str("<h2>Queues</h2>\n");
        match &streams {
            Ok(streams) => queue_table(&mut o, streams),
            Err(e) => {
                let _ = writeln!(
                    o,
                    "<p id=\"queues-error\">queue unavailable: {}</p>",
                    esc(&e.to_string())
                );
            }
        }

        o.push_str("<h2>Recent jobs</h2>\n");
        match &recent {
            Ok(jobs) => {
                let window_ms = self.window_secs * 1000;
                let in_window: Vec<&RecentJob> = jobs
                    .iter()
                    .filter(|j| now.saturating_sub(j.finished_at_ms) <= window_ms)
                    .collect();
                let failed = in_window.iter().filter(|j| j.outcome != "done").count();
                let per_sec = in_window.len() as f64 / self.window_secs as f64;
                let _ = writeln!(
                    o,
                    "<p id=\"throughput\">{per_sec:.2} jobs/s over the last {} s: {} done, {failed} failed{}</p>",
                    self.window_secs,
                    in_window.len() - failed,
                    if in_window.len() == jobs.len() && jobs.len() >= self.recent.cap {
                        " (at least: the recent-jobs list is full)"
                    } else {
                        ""
                    }
                );
                jobs_table(&mut o, jobs, now);
            }
            Err(e) => {
                let _ = writeln!(
                    o,
                    "<p id=\"recent-error\">recent jobs unavailable: {}</p>",
                    esc(&e.to_string())
                );
            }
        }

        o.push_str("<h2>Filter presets</h2>\n<div id=\"presets\">\n");
        for preset in self.filters.iter() {
            let src = keys::variant_url("", &preset.name, keys::UI_SAMPLE_PATH);
            let _ = writeln!(
                o,
                "<section class=\"preset\" id=\"preset-{name}\" data-filter=\"{name}\"><h3>{name}</h3>\
                 <p>{describe}</p>\
                 <img src=\"{src}\" alt=\"{name} sample\"></section>",
                name = esc(&preset.name),
                describe = esc(&preset.describe()),
                src = esc(&src),
            );
        }
        o.push_str("</div>\n</body></html>\n");
        o
    }
}

fn queue_table(o: &mut String, streams: &[StreamStats]) {
    o.push_str(
        "<table id=\"queues\"><tr><th>stream</th><th>length</th><th>lag</th><th>pending</th></tr>\n",
    );
    for s in streams {
        let _ = writeln!(
            o,
            "<tr class=\"stream\" data-stream=\"{0}\"><td>{0}</td><td>{1}</td><td>{2}</td><td>{3}</td></tr>",
            esc(s.stream),
            s.length,
            s.lag,
            s.pending
        );
    }
    o.push_str("</table>\n");
}

fn jobs_table(o: &mut String, jobs: &[RecentJob], now: u64) {
    o.push_str(concat!(
        "<table id=\"recent\"><tr><th>finished</th><th>job</th><th>original</th>",
        "<th>filters</th><th>outcome</th><th>code</th><th>reason</th><th>ms</th><th>thumbnail</th></tr>\n"
    ));
    for job in jobs {
        let thumb = match (job.outcome.as_str(), job.filters.first()) {
            ("done", Some(filter)) if !job.original.is_empty() => format!(
                "<img class=\"thumb\" src=\"{}\" alt=\"{}\">",
                esc(&keys::variant_url("", filter, &job.original)),
                esc(filter)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "<tr class=\"job {outcome}\" data-job=\"{id}\" data-code=\"{code}\"><td>{ago} s ago</td><td>{id}</td>\
             <td>{original}</td><td>{filters}</td><td>{outcome}</td><td class=\"code\">{code}</td>\
             <td class=\"reason\">{reason}</td><td>{ms}</td><td>{thumb}</td></tr>",
            outcome = esc(&job.outcome),
            id = esc(&job.id),
            code = esc(job.error_code.as_deref().unwrap_or("")),
            ago = now.saturating_sub(job.finished_at_ms) / 1000,
            original = esc(&job.original),
            filters = esc(&job.filters.join(", ")),
            reason = esc(&without_queries(job.reason.as_deref().unwrap_or(""))),
            ms = job.duration_ms,
        );
    }
    o.push_str("</table>\n");
}

/// Text made safe for HTML content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A failure's reason as the page shows it, to anyone: each URL's query
/// and fragment are cut, since they may carry an origin's signed token.
fn without_queries(reason: &str) -> String {
    reason
        .split(' ')
        .map(|word| match word.find("://") {
            Some(_) => match word.find(['?', '#']) {
                Some(cut) => Cow::Owned(format!("{}?…", &word[..cut])),
                None => Cow::Borrowed(word),
            },
            None => Cow::Borrowed(word),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The built-in sample original: a 480×320 PNG with colour gradients and a
/// light disc, so every preset's crop and fit show.
fn sample_png() -> Vec<u8> {
    let (w, h) = (480u32, 320u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - 300.0, y as f32 - 150.0);
        if dx * dx + dy * dy < 70.0 * 70.0 {
            return image::Rgb([245, 235, 200]);
        }
        image::Rgb([
            (40 + x * 160 / w) as u8,
            (60 + y * 120 / h) as u8,
            (200 - x * 100 / w) as u8,
        ])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encoding a PNG in memory cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_lose_their_urls_queries() {
        assert_eq!(
            without_queries(
                "origin answered HTTP 403 for https://o.example/a.jpg?X-Amz-Signature=s3cr3t"
            ),
            "origin answered HTTP 403 for https://o.example/a.jpg?…"
        );
        assert_eq!(
            without_queries("decode failed: what? no"),
            "decode failed: what? no"
        );
        assert_eq!(without_queries("see http://o/a#frag"), "see http://o/a?…");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[tokio::test]
    async fn ring_keeps_the_newest() {
        let recent = RecentJobs::new(2, None);
        for n in 0..3 {
            recent
                .record(RecentJob {
                    id: n.to_string(),
                    code: String::new(),
                    filters: vec![],
                    original: String::new(),
                    outcome: "done".into(),
                    error_code: None,
                    reason: None,
                    duration_ms: 0,
                    finished_at_ms: 0,
                })
                .await;
        }
        let ids: Vec<String> = recent
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(ids, ["2", "1"]);
    }
}
