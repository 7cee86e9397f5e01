//! The job pipeline: claim, load the original (storage, or fetch and
//! archive), decode once, render every wanted filter on the bounded blocking
//! pool, store, index, update the media record, complete, call back.
//! Retryable failures are left unacked for a later attempt; permanent ones
//! and jobs out of attempts are dead-lettered with a failure callback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use crate::callback::Notifier;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetch::Fetcher;
use crate::filter::{FilterSet, Preset};
use crate::imaging::{self, Limits};
use crate::index::{Index, VariantInfo};
use crate::keys;
use crate::queue::{Claimed, Job, Queue};
use crate::storage::{now_secs, FailureSummary, MediaRecord, Storage, VariantSummary};

pub struct Worker {
    pub queue: Arc<dyn Queue>,
    pub storage: Storage,
    pub index: Arc<Index>,
    pub filters: Arc<FilterSet>,
    pub fetcher: Fetcher,
    pub notifier: Arc<Notifier>,
    pub limits: Limits,
    pub render_slots: Arc<Semaphore>,
    pub public_base: String,
    pub concurrency: usize,
    pub claim_wait: Duration,
    pub max_attempts: u32,
    pub shutdown_deadline: Duration,
    pub consumer: String,
}

/// A variant the job produced or found already stored.
#[derive(Debug, Clone)]
struct Done {
    filter: String,
    summary: VariantSummary,
}

impl Worker {
    pub fn new(
        config: &Config,
        queue: Arc<dyn Queue>,
        storage: Storage,
        index: Arc<Index>,
        filters: Arc<FilterSet>,
    ) -> Result<Worker> {
        let policy = crate::security::NetworkPolicy::new(config.allowed_networks()?);
        Ok(Worker {
            queue,
            storage,
            index,
            filters,
            fetcher: Fetcher::new(&config.fetch, policy.clone())?,
            notifier: Arc::new(Notifier::new(
                &config.callback,
                policy,
                &config.fetch.user_agent,
            )?),
            limits: Limits::from(&config.imaging),
            render_slots: Arc::new(Semaphore::new(config.imaging.render_threads)),
            public_base: config.public_base(),
            concurrency: config.queue.worker_concurrency,
            claim_wait: Duration::from_millis(config.queue.claim_block_ms),
            max_attempts: config.queue.max_attempts,
            shutdown_deadline: Duration::from_secs(config.queue.shutdown_deadline_secs),
            consumer: format!(
                "{}-{}-{:08x}",
                hostname::get()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id(),
                rand::random::<u32>()
            ),
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
                    let job = self.handle(claimed);
                    tokio::pin!(job);
                    tokio::select! {
                        () = &mut job => {}
                        _ = shutdown.changed() => {
                            // Finish what is running, within the deadline; an
                            // unfinished job stays unacked for another worker.
                            if tokio::time::timeout(self.shutdown_deadline, job).await.is_err() {
                                tracing::warn!("shutdown deadline passed; job left for another worker");
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

    async fn handle(&self, claimed: Claimed) {
        let started = std::time::Instant::now();
        let job = &claimed.job;
        if claimed.attempt > self.max_attempts {
            let error = Error::Internal(format!("gave up after {} attempts", self.max_attempts));
            return self.fail(&claimed, &error).await;
        }
        match self.process(job).await {
            Ok((record, done)) => match self.queue.complete(&claimed).await {
                Ok(callbacks) => {
                    tracing::info!(job = %job.id, code = %job.code, ms = started.elapsed().as_millis() as u64, "job done");
                    for filter_done in &done {
                        let body = success_body(job, &record, filter_done);
                        self.send_callbacks(&callbacks, &job.id, &filter_done.filter, body);
                    }
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "could not complete job; it will be retried")
                }
            },
            Err(e) if e.is_retryable() && claimed.attempt < self.max_attempts => {
                tracing::warn!(job = %job.id, attempt = claimed.attempt, error = %e, "job failed; left for retry");
            }
            Err(e) => self.fail(&claimed, &e).await,
        }
    }

    async fn fail(&self, claimed: &Claimed, error: &Error) {
        let job = &claimed.job;
        tracing::warn!(job = %job.id, code = error.code(), error = %error, "job failed for good");
        if let Err(e) = self.record_failure(job, error).await {
            tracing::warn!(job = %job.id, error = %e, "could not record the failure");
        }
        match self
            .queue
            .dead_letter(claimed, &format!("{}: {error}", error.code()))
            .await
        {
            Ok(callbacks) => {
                for filter in &job.filters {
                    let body = json!({
                        "status": "failed",
                        "code": job.code,
                        "path": job.original,
                        "filter": filter,
                        "originalUrl": job.source_url,
                        "error": error.code(),
                        "message": error.to_string(),
                    });
                    self.send_callbacks(&callbacks, &job.id, filter, body);
                }
            }
            Err(e) => tracing::warn!(job = %job.id, error = %e, "could not dead-letter job"),
        }
    }

    /// Delivery runs beside the queue: a slow receiver never holds a worker.
    fn send_callbacks(&self, urls: &[String], job_id: &str, filter: &str, body: Value) {
        for url in urls {
            let notifier = self.notifier.clone();
            let url = url.clone();
            let webhook_id = format!("{job_id}-{filter}");
            let body = body.clone();
            tokio::spawn(async move {
                if let Err(e) = notifier.deliver(&url, &webhook_id, &body).await {
                    tracing::warn!(url, error = %e, "callback not delivered");
                }
            });
        }
    }

    /// Renders what is missing; returns the updated media record and every variant.
    async fn process(&self, job: &Job) -> Result<(MediaRecord, Vec<Done>)> {
        let presets: Vec<Preset> = job
            .filters
            .iter()
            .map(|name| self.filters.get(name).cloned())
            .collect::<Result<_>>()?;
        let mut record = self.load_record(job).await?;

        let mut done = Vec::new();
        let mut to_render = Vec::new();
        for preset in presets {
            let variant = keys::variant_path(&preset.name, &job.original);
            let known = record.variants.get(&preset.name).cloned();
            match (self.index.locate(&self.storage, &variant).await?, known) {
                (Some(_), Some(summary)) => done.push(Done {
                    filter: preset.name.clone(),
                    summary,
                }),
                (Some((info, _, bytes)), None) => {
                    let bytes = match bytes {
                        Some(b) => b,
                        None => self
                            .storage
                            .get(&variant)
                            .await?
                            .map(|o| o.bytes)
                            .unwrap_or_default(),
                    };
                    let (width, height) = dimensions(&bytes);
                    done.push(Done {
                        filter: preset.name.clone(),
                        summary: self.summary(
                            &preset.name,
                            job,
                            info.size,
                            width,
                            height,
                            &info.content_type,
                        ),
                    });
                }
                (None, _) => to_render.push(preset),
            }
        }
        if to_render.is_empty() && record.blurhash.is_some() {
            return Ok((record, done));
        }

        let original = self.load_original(job, &mut record).await?;
        let limits = self.limits;
        let rendered = self
            .blocking(move || {
                let source = imaging::decode(&original, limits)?;
                let blurhash = imaging::blurhash(&source)?;
                let variants = to_render
                    .iter()
                    .map(|preset| {
                        imaging::render(&source, preset).map(|r| (preset.name.clone(), r))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((source.width(), source.height(), blurhash, variants))
            })
            .await?;
        let (width, height, blurhash, variants) = rendered;
        record.original_width = Some(width);
        record.original_height = Some(height);
        record.blurhash = Some(blurhash);

        for (filter, variant) in variants {
            let path = keys::variant_path(&filter, &job.original);
            let bytes = Bytes::from(variant.bytes);
            // Storage first, index second: the index never points at missing bytes.
            let stored = self.storage.put(&path, bytes.clone()).await?;
            let info = VariantInfo::of_bytes(&bytes, stored.last_modified);
            self.index.mark(&path, info.clone()).await?;
            self.index.hot_put(&path, bytes).await;
            done.push(Done {
                summary: self.summary(
                    &filter,
                    job,
                    info.size,
                    variant.width,
                    variant.height,
                    &info.content_type,
                ),
                filter,
            });
        }
        for d in &done {
            record
                .resized
                .insert(d.filter.clone(), d.summary.url.clone());
            record.variants.insert(d.filter.clone(), d.summary.clone());
        }
        record.marking = "resized".into();
        record.error = None;
        record.updated_at = now_secs();
        self.storage.put_media_record(&record).await?;
        Ok((record, done))
    }

    fn summary(
        &self,
        filter: &str,
        job: &Job,
        size: u64,
        width: u32,
        height: u32,
        mime: &str,
    ) -> VariantSummary {
        VariantSummary {
            url: keys::variant_url(&self.public_base, filter, &job.original),
            size,
            width,
            height,
            mime_type: mime.to_string(),
        }
    }

    /// The stored original, or a download archived to storage first.
    async fn load_original(&self, job: &Job, record: &mut MediaRecord) -> Result<Bytes> {
        if let Some(object) = self.storage.get(&job.original).await? {
            return Ok(object.bytes);
        }
        let Some(url) = &job.source_url else {
            return Err(Error::SourceNotFound(job.original.clone()));
        };
        let fetched = self.fetcher.fetch(url).await?;
        self.storage
            .put(&job.original, fetched.bytes.clone())
            .await?;
        record.path = Some(job.original.clone());
        record.original_url = Some(url.clone());
        record.mime_type = Some(fetched.mime.to_string());
        record.size = Some(fetched.bytes.len() as u64);
        record.status_code = Some(fetched.status);
        record.marking = "downloaded".into();
        record.updated_at = now_secs();
        self.storage.put_media_record(record).await?;
        Ok(fetched.bytes)
    }

    /// The job's media record, or a new one.
    async fn load_record(&self, job: &Job) -> Result<MediaRecord> {
        Ok(self
            .storage
            .media_record(&job.code)
            .await?
            .unwrap_or_else(|| MediaRecord {
                code: job.code.clone(),
                root: job.root.clone(),
                path: Some(job.original.clone()),
                original_url: job.source_url.clone(),
                marking: "new".into(),
                ..Default::default()
            }))
    }

    async fn record_failure(&self, job: &Job, error: &Error) -> Result<()> {
        let mut record = self.load_record(job).await?;
        if let Error::OriginStatus { status, .. } = error {
            record.status_code = Some(*status);
        }
        // A failed re-render of one filter does not undo what is stored.
        if record.variants.is_empty() {
            record.marking = "failed".into();
        }
        record.error = Some(FailureSummary {
            code: error.code().to_string(),
            message: error.to_string(),
        });
        record.updated_at = now_secs();
        self.storage.put_media_record(&record).await
    }

    /// Runs CPU work on the blocking pool, at most `render_threads` at once;
    /// a panic fails this job only.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _slot = self
            .render_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(Error::RenderPanicked(panic_message(e.into_panic()))),
            Err(e) => Err(Error::Internal(e.to_string())),
        }
    }
}

/// The callback body for one finished variant.
fn success_body(job: &Job, record: &MediaRecord, done: &Done) -> Value {
    json!({
        "status": "done",
        "code": job.code,
        "path": job.original,
        "filter": done.filter,
        "url": done.summary.url,
        "size": done.summary.size,
        "width": done.summary.width,
        "height": done.summary.height,
        "mimeType": done.summary.mime_type,
        "blurhash": record.blurhash,
        "originalUrl": job.source_url,
        "originalWidth": record.original_width,
        "originalHeight": record.original_height,
    })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Width and height from an encoded image's header.
fn dimensions(bytes: &[u8]) -> (u32, u32) {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .unwrap_or((0, 0))
}
