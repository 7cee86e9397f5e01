//! The job queue: enqueue once per variant (deduped, callbacks attached),
//! claim urgent before pre-heat, complete (ack once its callbacks are filed), leave
//! for retry, dead-letter. Two backends with one contract: `embedded`
//! (in-process) and `redis` (streams + consumer group + `lua/` scripts).

mod embedded;
mod redis_streams;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::keys::ExpiringMarker;
use crate::metrics::StreamStats;

pub use embedded::EmbeddedQueue;
pub use redis_streams::RedisQueue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Misses from live pages: always drained first.
    Urgent,
    /// Bulk pre-heat.
    Preheat,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Urgent => "urgent",
            Priority::Preheat => "preheat",
        }
    }
}

/// One original and the filters wanted from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub priority: Priority,
    /// Storage path of the original; empty while its extension waits for
    /// the downloaded bytes' type (then it is `<stem>.<ext>`).
    pub original: String,
    /// `<root>/<bin>/<code>`: where an original of unknown type goes.
    #[serde(default)]
    pub stem: Option<String>,
    /// Where to download the original from when it is not stored yet.
    pub source_url: Option<String>,
    pub root: String,
    pub code: String,
    pub filters: Vec<String>,
    /// Jobs with the same key are one job.
    pub dedupe: String,
    pub enqueued_at_ms: u64,
    /// Failed attempts before this copy was put back to wait (Redis backend:
    /// a retried job is a new stream entry, whose own delivery count restarts).
    #[serde(default)]
    pub attempts: u32,
}

impl Job {
    /// A fresh job rendering `filters` of the original stored at `original`,
    /// or (`original` empty) of the one to be downloaded to `<stem>.<ext>`.
    /// Jobs for the same original and filters share a dedupe key.
    pub fn new(
        priority: Priority,
        original: &str,
        stem: Option<String>,
        source_url: Option<String>,
        root: &str,
        code: &str,
        filters: Vec<String>,
    ) -> Job {
        let names = if original.is_empty() {
            stem.as_deref().unwrap_or_default()
        } else {
            original
        };
        Job {
            id: crate::keys::job_id(),
            priority,
            dedupe: crate::keys::dedupe_key(names, &filters),
            original: original.to_string(),
            stem,
            source_url,
            root: root.to_string(),
            code: code.to_string(),
            filters,
            enqueued_at_ms: now_millis(),
            attempts: 0,
        }
    }
}

/// A job a worker holds until it completes, fails or lets go of it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: Job,
    /// Backend handle of this delivery (stream entry id or sequence number).
    pub receipt: String,
    /// 1 on the first delivery.
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Depths {
    pub urgent: u64,
    pub preheat: u64,
    /// Jobs backing off before a retry.
    pub delayed: u64,
    pub dead: u64,
}

impl Depths {
    /// The four streams, given each job stream's (lag, pending).
    pub fn streams(&self, [urgent, preheat]: [(u64, u64); 2]) -> Vec<StreamStats> {
        let stream = |stream, length, (lag, pending)| StreamStats {
            stream,
            length,
            lag,
            pending,
        };
        vec![
            stream("urgent", self.urgent, urgent),
            stream("preheat", self.preheat, preheat),
            stream("delayed", self.delayed, (0, 0)),
            stream("dead", self.dead, (0, 0)),
        ]
    }
}

/// What `complete` or `dead_letter` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The job is acknowledged (or dead-lettered) and its callbacks dropped.
    Done,
    /// Callbacks beyond those filed are attached: nothing changed. Here are
    /// all of them, in the order they attached.
    Unfiled(Vec<String>),
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Adds the job unless one with its dedupe key is in flight; attaches
    /// the callback either way. True when a new job was added.
    async fn enqueue(&self, job: &Job, callback: Option<&str>) -> Result<bool> {
        self.enqueue_marked(job, callback, None).await
    }

    /// `enqueue`, setting `marker` first in the same step (in flight or
    /// not): one round trip instead of two, and whatever the job records
    /// comes after the marker. Only a Redis queue is handed markers; an
    /// in-memory index keeps its own.
    async fn enqueue_marked(
        &self,
        job: &Job,
        callback: Option<&str>,
        marker: Option<&ExpiringMarker>,
    ) -> Result<bool>;

    /// The next job, urgent first, waiting up to `wait`. Jobs claimed by a
    /// worker that went quiet for the visibility timeout are handed out again.
    async fn claim(&self, consumer: &str, wait: Duration) -> Result<Option<Claimed>>;

    /// Done: acknowledges the job, clears its in-flight mark and drops its
    /// callbacks, but only once the caller has filed every one of them:
    /// `filed` is how many it has. If more are attached (or, at first, any),
    /// nothing changes and all of them come back, to be filed before the
    /// next try, so no subscriber's webhook is dropped with the job.
    async fn complete(&self, claimed: &Claimed, filed: usize) -> Result<Finish>;

    /// Failed for good: as `complete`, moving the job to the dead-letter
    /// list with its reason.
    async fn dead_letter(&self, claimed: &Claimed, reason: &str, filed: usize) -> Result<Finish>;

    /// Still working on it: restarts the job's visibility timeout, so no
    /// other worker takes it over meanwhile. False when it is no longer
    /// this consumer's (taken over, or finished).
    async fn hold(&self, claimed: &Claimed, consumer: &str) -> Result<bool>;

    /// Failed but worth another try: lets go of the job so it can be claimed
    /// again after `delay`, counting this attempt. Its in-flight mark and
    /// callbacks stay, so misses meanwhile attach instead of enqueueing.
    async fn retry_later(&self, claimed: &Claimed, delay: Duration) -> Result<()>;

    /// Jobs waiting per stream, backing off, and dead letters.
    async fn depths(&self) -> Result<Depths>;

    /// Per stream (`urgent`, `preheat`, `delayed`, `dead`): its length, and
    /// for the job streams the entries not yet delivered (lag) and delivered
    /// but not acknowledged (pending). Read when metrics are scraped.
    async fn streams(&self) -> Result<Vec<StreamStats>> {
        let d = self.depths().await?;
        Ok(Depths::streams(&d, [(d.urgent, 0), (d.preheat, 0)]))
    }

    async fn ping(&self) -> Result<()>;
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
