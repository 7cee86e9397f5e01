//! The job pipeline: claim, load the original (storage, or fetch and
//! archive), decode once, render every wanted filter on the bounded blocking
//! pool, store, index, update the media record, schedule the webhooks in the
//! outbox, complete. Retryable failures wait out a doubling backoff in the
//! queue; permanent ones and jobs out of attempts are dead-lettered with a
//! failure webhook. Each attempt is counted in `metrics`, logged in one
//! line, and (when finished) remembered for `/ui`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::callback::{self, Delivery, Outbox, Subscriber};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetch::Fetcher;
use crate::filter::{FilterSet, Preset};
use crate::imaging::{self, Limits};
use crate::index::{Failure, Index, VariantInfo};
use crate::keys;
use crate::metrics::{JobOutcome, Metrics};
use crate::queue::{Claimed, Finish, Job, Queue};
use crate::storage::{now_secs, FailureSummary, MediaRecord, Storage, Thumb};
use crate::ui::{RecentJob, RecentJobs};

mod render_pool;
pub use render_pool::RenderPool;

pub struct Worker {
    pub queue: Arc<dyn Queue>,
    pub storage: Storage,
    pub index: Arc<Index>,
    pub filters: Arc<FilterSet>,
    pub fetcher: Fetcher,
    pub outbox: Arc<dyn Outbox>,
    pub limits: Limits,
    pub render_pool: Arc<RenderPool>,
    pub public_base: String,
    pub concurrency: usize,
    pub claim_wait: Duration,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub max_retry_backoff: Duration,
    pub shutdown_deadline: Duration,
    /// How often a running job's visibility timeout is restarted.
    pub hold_every: Duration,
    pub consumer: String,
    /// This process's counters (jobs, renders, fetches).
    pub metrics: Arc<Metrics>,
    /// Where finished jobs are remembered for `/ui`, if anywhere.
    pub recent: Option<Arc<RecentJobs>>,
}

impl Worker {
    pub fn new(
        config: &Config,
        queue: Arc<dyn Queue>,
        storage: Storage,
        index: Arc<Index>,
        filters: Arc<FilterSet>,
        outbox: Arc<dyn Outbox>,
    ) -> Result<Worker> {
        let policy = config.network_policy()?;
        Ok(Worker {
            queue,
            storage,
            index,
            filters,
            fetcher: Fetcher::new(&config.fetch, policy)?,
            outbox,
            limits: Limits::from(&config.imaging),
            render_pool: Arc::new(
                RenderPool::new(config.imaging.render_threads, config.imaging.render_nice)
                    .map_err(|e| Error::Internal(format!("cannot start render threads: {e}")))?,
            ),
            public_base: config.public_base(),
            concurrency: config.queue.worker_concurrency,
            claim_wait: Duration::from_millis(config.queue.claim_block_ms),
            max_attempts: config.queue.max_attempts,
            retry_backoff: Duration::from_millis(config.queue.retry_backoff_ms),
            max_retry_backoff: Duration::from_millis(config.queue.max_retry_backoff_ms),
            shutdown_deadline: Duration::from_secs(config.queue.shutdown_deadline_secs),
            hold_every: Duration::from_secs(config.queue.visibility_timeout_secs) / 3,
            consumer: format!(
                "{}-{}-{:08x}",
                hostname::get()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id(),
                rand::random::<u32>()
            ),
            metrics: Arc::new(Metrics::new()),
            recent: None,
        })
    }

    /// Runs `concurrency` claim loops until `shutdown` turns true, then lets
    /// running jobs finish within the shutdown deadline.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let loops: Vec<_> = (0..self.concurrency)
            .map(|n| {
                let worker = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { worker.claim_loop(n, shutdown).await })
            })
            .collect();
        for handle in loops {
            let _ = handle.await;
        }
    }

    async fn claim_loop(&self, n: usize, mut shutdown: watch::Receiver<bool>) {
        let consumer = format!("{}-{n}", self.consumer);
        while !*shutdown.borrow() {
            let claimed = tokio::select! {
                claimed = self.queue.claim(&consumer, self.claim_wait) => claimed,
                _ = shutdown.changed() => break,
            };
            match claimed {
                Ok(Some(claimed)) => {
                    let job = self.handle_held(&consumer, &claimed);
                    tokio::pin!(job);
                    tokio::select! {
                        () = &mut job => {}
                        _ = shutdown.changed() => {
                            // Finish what is running, within the deadline; an
                            // unfinished job stays unacked for another worker.
                            if tokio::time::timeout(self.shutdown_deadline, job).await.is_err() {
                                tracing::warn!(job = %claimed.job.id, "shutdown deadline passed; job left unacked for another worker (lost with the embedded queue)");
                            }
                            break;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; backing off");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }
    }

    /// Handles a job while holding it: its visibility timeout restarts every
    /// third of itself, so a slow job (a slow origin, a slow S3) is not taken
    /// over and run a second time while this worker is still on it.
    async fn handle_held(&self, consumer: &str, claimed: &Claimed) {
        let held = crate::heartbeat::renewing(self.hold_every, self.handle(claimed), || async {
            match self.queue.hold(claimed, consumer).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(job = %claimed.job.id, "job taken over by another worker while still running here"),
                Err(e) => tracing::warn!(job = %claimed.job.id, error = %e, "could not hold the job; another worker may take it over"),
            }
            // The job goes on either way: it may still finish first.
            Ok::<(), std::convert::Infallible>(())
        })
        .await;
        let Ok(()) = held;
    }

    async fn handle(&self, claimed: &Claimed) {
        let started = std::time::Instant::now();
        let job = &claimed.job;
        if claimed.attempt > self.max_attempts {
            let error = Error::Internal(format!("gave up after {} attempts", self.max_attempts));
            return self.fail(claimed, &error, started).await;
        }
        let record = match self.process(job).await {
            Ok(record) => record,
            Err(e) if e.is_retryable() && claimed.attempt < self.max_attempts => {
                let delay = callback::doubling_backoff(
                    self.retry_backoff,
                    self.max_retry_backoff,
                    claimed.attempt,
                );
                self.metrics.job(JobOutcome::Retry, e.code());
                tracing::warn!(
                    job = %job.id,
                    media = %job.code,
                    filters = ?job.filters,
                    outcome = "retry",
                    code = e.code(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    attempt = claimed.attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "job failed; will retry"
                );
                if let Err(park) = self.queue.retry_later(claimed, delay).await {
                    // Still unacked: reclaimed after the visibility timeout instead.
                    tracing::warn!(job = %job.id, error = %park, "could not schedule the retry");
                }
                return;
            }
            Err(e) => return self.fail(claimed, &e, started).await,
        };
        match self.settle(claimed, Outcome::Done(&record)).await {
            Ok(()) => {
                let duration_ms = started.elapsed().as_millis() as u64;
                self.metrics.job(JobOutcome::Done, "");
                tracing::info!(
                    job = %job.id,
                    media = %job.code,
                    filters = ?job.filters,
                    outcome = "done",
                    duration_ms,
                    "job done"
                );
                let original = record.path.clone().unwrap_or_default();
                self.remember(job, original, None, duration_ms).await;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "could not complete job; it will be retried")
            }
        }
    }

    /// Webhooks first, ack second: the queue acks only once every attached
    /// subscriber's deliveries are in the outbox, and hands back any that
    /// attached since, to be filed before the next try. A job without
    /// callbacks settles in one step.
    async fn settle(&self, claimed: &Claimed, outcome: Outcome<'_>) -> Result<()> {
        let mut filed = 0;
        loop {
            let finished = match outcome {
                Outcome::Done(_) => self.queue.complete(claimed, filed).await?,
                Outcome::Failed(_, reason) => {
                    self.queue.dead_letter(claimed, reason, filed).await?
                }
            };
            let Finish::Unfiled(attached) = finished else {
                return Ok(());
            };
            self.outbox
                .schedule(&deliveries(&claimed.job, &attached, filed, &outcome))
                .await?;
            filed = attached.len();
        }
    }

    /// Remembers a finished job for `/ui`.
    async fn remember(&self, job: &Job, original: String, error: Option<&Error>, duration_ms: u64) {
        let Some(recent) = &self.recent else { return };
        recent
            .record(RecentJob {
                id: job.id.clone(),
                code: job.code.clone(),
                filters: job.filters.clone(),
                original,
                outcome: if error.is_some() { "failed" } else { "done" }.into(),
                error_code: error.map(|e| e.code().to_string()),
                reason: error.map(|e| e.to_string()),
                duration_ms,
                finished_at_ms: crate::queue::now_millis(),
            })
            .await;
    }

    async fn fail(&self, claimed: &Claimed, error: &Error, started: std::time::Instant) {
        let job = &claimed.job;
        let duration_ms = started.elapsed().as_millis() as u64;
        self.metrics.job(JobOutcome::Failed, error.code());
        tracing::warn!(
            job = %job.id,
            media = %job.code,
            filters = ?job.filters,
            outcome = "failed",
            code = error.code(),
            duration_ms,
            error = %error,
            "job failed for good"
        );
        let record = match self.record_failure(job, error).await {
            Ok(record) => record,
            Err(e) if claimed.attempt < self.max_attempts => {
                tracing::warn!(job = %job.id, error = %e, "could not record the failure; left for retry");
                return;
            }
            // Out of attempts (the record itself may be what fails, e.g.
            // unreadable): dead-lettered without it, not reclaimed forever.
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "could not record the failure; dead-lettering the job without it");
                with_failure(new_record(job), error, &job.filters)
            }
        };
        // Misses of these variants answer the failure instead of queueing it again.
        let original = record.path.as_deref().unwrap_or(&job.original);
        if !original.is_empty() {
            let failure = Failure {
                code: error.code().to_string(),
                message: error.to_string(),
                status: error.status(),
            };
            for filter in &job.filters {
                let variant = keys::variant_path(filter, original);
                if let Err(e) = self.index.mark_failed(&variant, failure.clone()).await {
                    tracing::warn!(job = %job.id, error = %e, "could not record the failed variant");
                }
            }
        }
        let reason = format!("{}: {error}", error.code());
        if let Err(e) = self
            .settle(claimed, Outcome::Failed(&record, &reason))
            .await
        {
            tracing::warn!(job = %job.id, error = %e, "could not dead-letter job");
            return;
        }
        let original = record.path.clone().unwrap_or_else(|| job.original.clone());
        self.remember(job, original, Some(error), duration_ms).await;
    }

    /// Renders what is missing; returns the updated media record, written
    /// once at the end. A job that fails after archiving its original still
    /// writes the record, so the download is not forgotten.
    async fn process(&self, job: &Job) -> Result<MediaRecord> {
        let presets: Vec<Preset> = job
            .filters
            .iter()
            .map(|name| self.filters.get(name).map(Cow::into_owned))
            .collect::<Result<_>>()?;
        let loaded = self.load_record(job).await?;
        // Written back with its URLs on today's base, which its webhooks carry.
        let mut record = loaded.clone().with_public_base(&self.public_base);
        match self.render_missing(job, presets, &mut record).await {
            Ok(original) => {
                record.path = Some(original);
                record.marking = "resized".into();
                record.error = None;
                record.updated_at = now_secs();
                self.save_record(&loaded, &record).await
            }
            Err(e) => {
                if record != loaded {
                    if let Err(lost) = self.save_record(&loaded, &record).await {
                        tracing::warn!(job = %job.id, error = %lost, "could not record the archived original");
                    }
                }
                Err(e)
            }
        }
    }

    /// Writes this job's changes to its media record (`ours`, read as
    /// `loaded`) onto the record as stored now: a job for another filter of
    /// the same media may have written it while this one rendered. Answers
    /// the record written.
    async fn save_record(&self, loaded: &MediaRecord, ours: &MediaRecord) -> Result<MediaRecord> {
        self.storage
            .update_media_record(&ours.code, |current| {
                let record = match current {
                    Some(current) => ours.rebased(loaded, current),
                    None => ours.clone(),
                };
                (Some(record.clone()), record)
            })
            .await
    }

    /// Loads or downloads the original and renders every preset not stored
    /// yet into `record`; returns the original's path.
    async fn render_missing(
        &self,
        job: &Job,
        presets: Vec<Preset>,
        record: &mut MediaRecord,
    ) -> Result<String> {
        // The original's path is known from the job or the record, or fixed
        // now by downloading it: its extension comes from the sniffed type.
        let mut downloaded = None;
        let original = match (job.original.as_str(), &record.path) {
            ("", Some(path)) => path.clone(),
            ("", None) => {
                let (path, bytes) = self.download_new(job, record).await?;
                downloaded = Some(bytes);
                path
            }
            (path, _) => path.to_string(),
        };

        let mut to_render = Vec::new();
        let variants: Vec<String> = presets
            .iter()
            .map(|preset| keys::variant_path(&preset.name, &original))
            .collect();
        let fresh = downloaded.is_some();
        let stored = self.stored_of(&variants, fresh).await?;
        for ((preset, variant), stored) in presets.into_iter().zip(&variants).zip(stored) {
            let recorded = record
                .thumb_data
                .get(&preset.name)
                .is_some_and(Thumb::is_done);
            match stored {
                Some(_) if recorded => {}
                Some((info, bytes)) => {
                    // Stored but not in the record (e.g. rendered by a miss): describe it.
                    let bytes = match bytes {
                        Some(b) => b,
                        None => match self.storage.get(variant).await? {
                            Some(object) => object.bytes,
                            // The index outlived the file: render it again.
                            None => {
                                to_render.push(preset);
                                continue;
                            }
                        },
                    };
                    let (width, height) = crate::imaging::stored_dimensions(&bytes);
                    let thumb = self.thumb(
                        &preset.name,
                        &original,
                        info.size,
                        (width, height),
                        &info.content_type,
                    );
                    note_thumb(record, &preset.name, thumb);
                }
                None => to_render.push(preset),
            }
        }
        // This decode also makes the eager filters' variants that are missing.
        if !to_render.is_empty() {
            let eager: Vec<&Preset> = self
                .filters
                .eager()
                .filter(|preset| !to_render.iter().any(|p| p.name == preset.name))
                .collect();
            let variants: Vec<String> = eager
                .iter()
                .map(|preset| keys::variant_path(&preset.name, &original))
                .collect();
            let stored = self.stored_of(&variants, fresh).await?;
            for (preset, stored) in eager.into_iter().zip(stored) {
                if stored.is_none() {
                    to_render.push(preset.clone());
                }
            }
        }

        let needs_previews = record.blurhash.is_none() || record.blur.is_none();
        if !to_render.is_empty() || needs_previews {
            let bytes = match downloaded {
                Some(bytes) => Some(bytes),
                None => match self.load_original(job, &original, record).await {
                    Ok(bytes) => Some(bytes),
                    // Only previews were missing: the stored variants still stand.
                    Err(Error::SourceNotFound(_)) if to_render.is_empty() => None,
                    Err(e) => return Err(e),
                },
            };
            if let Some(bytes) = bytes {
                self.render(&original, bytes, to_render, record).await?;
            }
        }
        Ok(original)
    }

    /// Which of `variants` are stored. None are under a just-downloaded
    /// original's path: any there came from an earlier download its record
    /// lost, and are rendered again from this one rather than asked about.
    async fn stored_of(
        &self,
        variants: &[String],
        fresh_original: bool,
    ) -> Result<Vec<Option<(Arc<VariantInfo>, Option<Bytes>)>>> {
        if fresh_original {
            return Ok(vec![None; variants.len()]);
        }
        self.index.stored_of(&self.storage, variants).await
    }

    /// Decodes once, computes the previews, renders every preset, and
    /// stores each variant: storage first, index second.
    async fn render(
        &self,
        original: &str,
        bytes: Bytes,
        presets: Vec<Preset>,
        record: &mut MediaRecord,
    ) -> Result<()> {
        let limits = self.limits;
        let (width, height, previews, variants) = self
            .blocking(move || {
                let source = imaging::decode_for(&bytes, limits, &presets)?;
                let previews = imaging::previews(&source)?;
                let variants = presets
                    .iter()
                    .map(|preset| {
                        let started = std::time::Instant::now();
                        imaging::render(&source, preset)
                            .map(|r| (preset.name.clone(), r, started.elapsed()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((source.width(), source.height(), previews, variants))
            })
            .await?;
        for (filter, _, took) in &variants {
            self.metrics
                .render(self.filters.metrics_label(filter), *took);
        }
        record.original_width = Some(width);
        record.original_height = Some(height);
        record.blurhash = Some(previews.blurhash);
        record.blur = Some(previews.thumbhash);

        // Storage first, index second: the index never points at missing
        // bytes. The variants are written at once and indexed in one go.
        let variants: Vec<_> = variants
            .into_iter()
            .map(|(filter, variant, _)| {
                let path = keys::variant_path(&filter, original);
                let size = (variant.width, variant.height);
                (filter, path, Bytes::from(variant.bytes), size)
            })
            .collect();
        let written = self
            .storage
            .put_all(
                variants
                    .iter()
                    .map(|(_, path, bytes, _)| (path.clone(), bytes.clone()))
                    .collect(),
            )
            .await?;
        let stored: Vec<_> = variants
            .into_iter()
            .zip(written)
            .map(|((filter, path, bytes, size), written)| {
                let info = VariantInfo::of_bytes(&bytes, written.last_modified);
                (filter, path, bytes, info, size)
            })
            .collect();
        self.index
            .mark_all(
                stored
                    .iter()
                    .map(|(_, path, _, info, _)| (path.clone(), info.clone()))
                    .collect(),
            )
            .await?;
        for (filter, path, bytes, info, size) in stored {
            self.index.hot_put(&path, bytes).await;
            let thumb = self.thumb(&filter, original, info.size, size, &info.content_type);
            note_thumb(record, &filter, thumb);
        }
        Ok(())
    }

    fn thumb(
        &self,
        filter: &str,
        original: &str,
        size: u64,
        (width, height): (u32, u32),
        mime: &str,
    ) -> Thumb {
        Thumb {
            marking: "done".into(),
            url: Some(keys::variant_url(&self.public_base, filter, original)),
            size: Some(size),
            width: Some(width),
            height: Some(height),
            mime_type: Some(mime.to_string()),
        }
    }

    /// Downloads an original whose path waits for its type, archives it at
    /// `<stem>.<ext>` and records it as downloaded.
    async fn download_new(&self, job: &Job, record: &mut MediaRecord) -> Result<(String, Bytes)> {
        let (Some(url), Some(stem)) = (&job.source_url, &job.stem) else {
            return Err(Error::SourceNotFound(job.code.clone()));
        };
        let fetched = self.fetch(url).await?;
        let path = format!("{stem}.{}", keys::extension_for_mime(fetched.mime));
        self.archive(&path, url, &fetched, record).await?;
        Ok((path, fetched.bytes))
    }

    /// The stored original, or a download archived to storage first.
    async fn load_original(
        &self,
        job: &Job,
        path: &str,
        record: &mut MediaRecord,
    ) -> Result<Bytes> {
        let max_bytes = self.fetcher.max_bytes();
        if let Some(object) = self.storage.get_original(path, max_bytes).await? {
            return Ok(object.bytes);
        }
        let Some(url) = &job.source_url else {
            return Err(Error::SourceNotFound(path.to_string()));
        };
        let fetched = self.fetch(url).await?;
        self.archive(path, url, &fetched, record).await?;
        Ok(fetched.bytes)
    }

    /// Downloads an original, counting its bytes and time.
    async fn fetch(&self, url: &str) -> Result<crate::fetch::Fetched> {
        let started = std::time::Instant::now();
        let fetched = self.fetcher.fetch(url).await;
        let bytes = fetched.as_ref().ok().map(|f| f.bytes.len() as u64);
        self.metrics.fetch(bytes, started.elapsed());
        fetched
    }

    /// Stores a downloaded original and notes it in the record, which
    /// `process` writes.
    async fn archive(
        &self,
        path: &str,
        url: &str,
        fetched: &crate::fetch::Fetched,
        record: &mut MediaRecord,
    ) -> Result<()> {
        self.storage.put(path, fetched.bytes.clone()).await?;
        record.path = Some(path.to_string());
        record.original_url = Some(url.to_string());
        record.mime_type = Some(fetched.mime.to_string());
        record.size = Some(fetched.bytes.len() as u64);
        record.status_code = Some(fetched.status);
        record.marking = "downloaded".into();
        record.updated_at = now_secs();
        Ok(())
    }

    /// The job's media record, or a new one.
    async fn load_record(&self, job: &Job) -> Result<MediaRecord> {
        Ok(self
            .storage
            .media_record(&job.code)
            .await?
            .unwrap_or_else(|| new_record(job)))
    }

    async fn record_failure(&self, job: &Job, error: &Error) -> Result<MediaRecord> {
        self.storage
            .update_media_record(&job.code, |current| {
                let record = with_failure(
                    current.unwrap_or_else(|| new_record(job)),
                    error,
                    &job.filters,
                );
                (Some(record.clone()), record)
            })
            .await
    }

    /// Runs CPU work on the render pool; a panic fails this job only.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.render_pool.run(work).await
    }
}

/// A job's media record before anything is known of it.
fn new_record(job: &Job) -> MediaRecord {
    MediaRecord {
        path: Some(job.original.clone()).filter(|p| !p.is_empty()),
        ..MediaRecord::new(&job.code, &job.root, job.source_url.as_deref())
    }
}

/// The record of a job for `filters` that failed for good.
fn with_failure(mut record: MediaRecord, error: &Error, filters: &[String]) -> MediaRecord {
    match error {
        Error::OriginStatus { status, .. } => record.status_code = Some(*status),
        // SAIS's convention for "no HTTP answer at all".
        Error::OriginUnreachable(_) | Error::Timeout(_) => record.status_code = Some(0),
        _ => {}
    }
    // The job's own filters say so, also when another filter is done and
    // the media as a whole stays `resized`: a waiting dispatch and the
    // failure webhook can tell which variant will not come.
    for filter in filters {
        let thumb = record
            .thumb_data
            .entry(filter.clone())
            .or_insert_with(Thumb::pending);
        if !thumb.is_done() {
            thumb.marking = "failed".into();
        }
    }
    // A failed re-render of one filter does not undo what is stored.
    if !record.thumb_data.values().any(Thumb::is_done) {
        record.marking = "failed".into();
    }
    record.error = Some(FailureSummary {
        code: error.code().to_string(),
        message: error.to_string(),
    });
    record.updated_at = now_secs();
    record
}

/// How a job ended, for its webhooks and its ack.
enum Outcome<'a> {
    Done(&'a MediaRecord),
    /// Dead-lettered with this reason.
    Failed(&'a MediaRecord, &'a str),
}

/// The webhooks each attached subscriber after the first `filed` gets for
/// an outcome (a subscriber's position is part of its deliveries' ids).
fn deliveries(
    job: &Job,
    attached: &[String],
    filed: usize,
    outcome: &Outcome<'_>,
) -> Vec<Delivery> {
    attached
        .iter()
        .enumerate()
        .skip(filed)
        .flat_map(|(position, text)| {
            let subscriber = Subscriber::decode(text, &job.root);
            match outcome {
                Outcome::Done(record) => callback::success_deliveries(
                    &job.id,
                    position,
                    &subscriber,
                    record,
                    &job.filters,
                ),
                Outcome::Failed(record, _) => {
                    callback::failure_deliveries(&job.id, position, &subscriber, record)
                }
            }
        })
        .collect()
}

/// Records a finished thumbnail in the SAIS maps.
fn note_thumb(record: &mut MediaRecord, filter: &str, thumb: Thumb) {
    if let Some(url) = &thumb.url {
        record.resized.insert(filter.to_string(), url.clone());
    }
    record.thumb_data.insert(filter.to_string(), thumb);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_per_attempt_up_to_the_cap() {
        let first = Duration::from_millis(2000);
        let cap = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=10)
            .map(|attempt| callback::doubling_backoff(first, cap, attempt).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000, 300000, 300000]
        );
        assert_eq!(callback::doubling_backoff(first, cap, u32::MAX), cap);
    }
}
