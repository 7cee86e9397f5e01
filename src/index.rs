//! "Does this variant exist, with what size, ETag and type": moka in front of
//! Redis hashes (embedded: moka only), plus a size-weighted moka cache of hot
//! variant bytes, negative answers, and expiring failures of variants whose
//! jobs failed for good. An index is a hint over storage: losing it costs a
//! storage read, never a wrong answer. Storage is asked about a variant the
//! index does not know once: concurrent askers share that one read, and an
//! "absent" answer is kept (in Redis when there is one; while a render of
//! the variant is queued, until that render records it), so misses never go
//! to storage (an S3 request) again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use moka::future::Cache;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::config::IndexConfig;
use crate::error::Result;
use crate::keys::{ExpiringMarker, RedisKeys};
use crate::redis_conn::RedisHandle;
use crate::storage::{Storage, StoredObject};

/// What serving a stored variant needs to know without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantInfo {
    pub size: u64,
    pub etag: String,
    pub content_type: String,
    /// Unix seconds.
    pub last_modified: i64,
    /// Its header values, formatted by the first hit that needs them.
    #[serde(skip)]
    headers: FormattedOnce,
}

/// The header values a hit of a variant answers with.
#[derive(Debug, Clone)]
pub struct HitHeaders {
    pub content_type: HeaderValue,
    pub etag: HeaderValue,
    pub last_modified: HeaderValue,
    /// The length `VariantInfo::size` says.
    pub content_length: HeaderValue,
}

/// A cache of derived values, not part of what an entry says: equal to any
/// other, and cloned empty-or-full like the rest.
#[derive(Debug, Clone, Default)]
struct FormattedOnce(std::sync::OnceLock<Option<HitHeaders>>);

impl PartialEq for FormattedOnce {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for FormattedOnce {}

impl VariantInfo {
    /// Describes stored bytes: the type from their magic, never a file extension.
    pub fn of_bytes(bytes: &[u8], last_modified: i64) -> VariantInfo {
        let content_type = image::guess_format(bytes)
            .map(|f| f.to_mime_type())
            .unwrap_or("application/octet-stream");
        VariantInfo::new(
            bytes.len() as u64,
            crate::keys::etag(bytes),
            content_type.to_string(),
            last_modified,
        )
    }

    pub fn new(size: u64, etag: String, content_type: String, last_modified: i64) -> VariantInfo {
        VariantInfo {
            size,
            etag,
            content_type,
            last_modified,
            headers: FormattedOnce::default(),
        }
    }

    /// The header values a hit answers with, formatted once per entry
    /// instead of on every request; `None` when a stored field cannot be a
    /// header value (a hit then formats them itself, and fails on it).
    pub fn hit_headers(&self) -> Option<&HitHeaders> {
        self.headers
            .0
            .get_or_init(|| {
                Some(HitHeaders {
                    content_type: HeaderValue::from_str(&self.content_type).ok()?,
                    etag: HeaderValue::from_str(&self.etag).ok()?,
                    last_modified: HeaderValue::from_str(&self.http_last_modified()).ok()?,
                    content_length: HeaderValue::from(self.size),
                })
            })
            .as_ref()
    }

    /// `last_modified` as an HTTP date. An HTTP date ends with year 9999
    /// (`httpdate` panics after it), while a file's time or a Redis field
    /// may say later.
    pub fn http_last_modified(&self) -> String {
        const LAST_HTTP_DATE_SECS: i64 = 253_402_300_799;
        let secs = self.last_modified.clamp(0, LAST_HTTP_DATE_SECS) as u64;
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
    }
}

/// A variant kept in memory: its bytes and what the index knows of them
/// (whose header values are formatted once, `VariantInfo::hit_headers`).
#[derive(Debug)]
pub struct HotVariant {
    pub info: Arc<VariantInfo>,
    pub bytes: Bytes,
}

/// Why a variant's job failed for good; answered instead of queueing the
/// same doomed job again, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub status: u16,
}

/// Where a lookup found its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory,
    Redis,
    Storage,
}

/// What the index alone says of a variant. A variant not stored comes
/// with the failure recorded for its last job, if any (looked up on the
/// way, in the same Redis round trip).
enum Known {
    Stored(Arc<VariantInfo>, Source),
    /// Storage said it does not hold it, and nothing recorded it since.
    Absent(Option<Arc<Failure>>),
    /// Storage must be asked.
    Unknown(Option<Arc<Failure>>),
}

/// Where a variant is, as `Index::locate` found it.
pub enum Located {
    /// In storage: its entry, where the entry came from, and its bytes when
    /// storage had to be read to know.
    Stored(Arc<VariantInfo>, Source, Option<Bytes>),
    /// Not in storage, with the failure recorded for its last job if that
    /// has not expired.
    Missing(Option<Arc<Failure>>),
}

/// A variant's Redis keys, read in one round trip.
struct RedisEntry {
    info: Option<VariantInfo>,
    absent: bool,
    /// Its failure, when asked for.
    failure: Option<Failure>,
}

/// Storage's answer for a variant the index did not know, shared by the
/// askers that waited on the same read.
#[derive(Clone)]
enum Probe {
    Found(Arc<VariantInfo>, Bytes),
    Absent,
}

/// One run at a time per key, its answer handed to every caller that
/// came while it ran; later callers run again (the answer lives on
/// elsewhere). Lighter than a moka cache used the same way: no eviction
/// bookkeeping for entries that live a few microseconds.
struct SingleFlight<T> {
    running: parking_lot::Mutex<HashMap<String, Arc<OnceCell<T>>>>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight {
            running: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone> SingleFlight<T> {
    /// `work`'s answer, or the answer of the same key's run under way. A
    /// run that fails or is dropped leaves a waiter to run its own.
    async fn run(&self, key: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        let cell = self
            .running
            .lock()
            .entry(key.to_string())
            .or_default()
            .clone();
        let _leave = Leave {
            flight: self,
            key,
            cell: cell.clone(),
        };
        cell.get_or_try_init(|| work).await.cloned()
    }
}

/// Takes a run's cell out of the map when its caller is done or dropped,
/// unless a later run has replaced it.
struct Leave<'a, T> {
    flight: &'a SingleFlight<T>,
    key: &'a str,
    cell: Arc<OnceCell<T>>,
}

impl<T> Drop for Leave<'_, T> {
    fn drop(&mut self) {
        let mut running = self.flight.running.lock();
        if running
            .get(self.key)
            .is_some_and(|cell| Arc::ptr_eq(cell, &self.cell))
        {
            running.remove(self.key);
        }
    }
}

/// Storage's "absent" answers of the last moments, by variant. A plain map
/// under a lock: a moka insert per first miss cost about a tenth of its CPU.
/// Answers older than `keep` do not count, and are swept out once the map
/// has doubled since the last sweep. At most `max` answers are kept, so
/// distinct paths (size URLs give millions per original) cannot grow it
/// without end; past that it starts over, which only costs probes.
struct ProbedAbsent {
    keep: Duration,
    max: usize,
    answers: parking_lot::Mutex<ProbedAnswers>,
}

#[derive(Default)]
struct ProbedAnswers {
    at: HashMap<String, Instant>,
    sweep_at_len: usize,
}

impl ProbedAbsent {
    /// The map is not swept below this many answers.
    const SWEEP_FLOOR: usize = 1024;

    fn new(keep: Duration, max: usize) -> ProbedAbsent {
        ProbedAbsent {
            keep,
            max: max.max(1),
            answers: Default::default(),
        }
    }

    fn contains(&self, variant: &str) -> bool {
        self.answers
            .lock()
            .at
            .get(variant)
            .is_some_and(|at| at.elapsed() < self.keep)
    }

    fn insert(&self, variant: &str) {
        let now = Instant::now();
        let mut answers = self.answers.lock();
        if answers.at.len() >= answers.sweep_at_len {
            answers
                .at
                .retain(|_, at| now.duration_since(*at) < self.keep);
            if answers.at.len() >= self.max {
                answers.at = HashMap::new();
            }
            answers.sweep_at_len =
                (answers.at.len() * 2).clamp(Self::SWEEP_FLOOR.min(self.max), self.max);
        }
        answers.at.insert(variant.to_string(), now);
    }

    fn remove(&self, variant: &str) {
        self.answers.lock().at.remove(variant);
    }

    fn clear(&self) {
        self.answers.lock().at.clear();
    }
}

pub struct Index {
    entries: Cache<String, Arc<VariantInfo>>,
    hot: Cache<String, Arc<HotVariant>>,
    /// Other keys remembered absent briefly (`remember_absent`): a missing
    /// original, a media record not there yet.
    absent: Cache<String, ()>,
    /// Variants storage did not hold whose render is queued (the embedded
    /// backend's only record of it; with Redis the shared marker is the one
    /// consulted).
    absent_variants: Cache<String, ()>,
    /// Storage reads in progress, one per variant.
    probes: SingleFlight<Probe>,
    /// What those reads answered "absent" (`negative_ttl_secs`).
    probed_absent: ProbedAbsent,
    absent_ttl: Duration,
    negative_ttl: Duration,
    queued: Cache<String, ()>,
    /// Enqueues in progress, one per variant.
    queueing: SingleFlight<()>,
    failed: Cache<String, Arc<Failure>>,
    failure_ttl: Duration,
    hot_max_object_bytes: u64,
    /// Whether the hot cache can hold anything at all.
    keeps_any_hot: bool,
    redis: Option<(Arc<RedisHandle>, RedisKeys)>,
}

impl Index {
    pub fn new(config: &IndexConfig, redis: Option<(Arc<RedisHandle>, RedisKeys)>) -> Index {
        let negative_ttl = Duration::from_secs(config.negative_ttl_secs.max(1));
        let absent_ttl = Duration::from_secs(config.absent_ttl_secs.max(1));
        let failure_ttl = Duration::from_secs(config.failure_ttl_secs.max(1));
        Index {
            entries: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(Duration::from_secs(config.ttl_secs))
                .build(),
            hot: Cache::builder()
                .max_capacity(config.hot_bytes)
                .weigher(|key: &String, hot: &Arc<HotVariant>| {
                    (key.len() + hot.bytes.len()).try_into().unwrap_or(u32::MAX)
                })
                .build(),
            absent: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(negative_ttl)
                .build(),
            absent_variants: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(absent_ttl)
                .build(),
            probes: SingleFlight::default(),
            probed_absent: ProbedAbsent::new(
                negative_ttl,
                usize::try_from(config.max_entries).unwrap_or(usize::MAX),
            ),
            absent_ttl,
            negative_ttl,
            queued: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(negative_ttl)
                .build(),
            queueing: SingleFlight::default(),
            failed: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_live(failure_ttl)
                .build(),
            failure_ttl,
            hot_max_object_bytes: config.hot_max_object_bytes,
            keeps_any_hot: config.hot_bytes > 0 && config.hot_max_object_bytes > 0,
            redis,
        }
    }

    /// Memory, then Redis (the index hash, the absent marker and the
    /// failure in one round trip); without Redis, what memory holds. A Redis
    /// failure is logged and answered from memory, so the caller falls back
    /// to storage instead of failing.
    async fn known(&self, variant: &str) -> Known {
        if let Some(info) = self.entries.get(variant).await {
            return Known::Stored(info, Source::Memory);
        }
        let (absent, shared_failure) = match self.redis.as_ref() {
            None => (self.absent_locally(variant), None),
            // Boxed, like the storage probe: the future of a look-up that
            // memory answers stays small, and a hit moves it once.
            Some((handle, keys)) => {
                match Box::pin(Self::redis_get_all(handle, keys, &[variant], true)).await {
                    Ok(mut found) => {
                        let entry = found.pop().expect("one answer per variant");
                        if let Some(info) = entry.info {
                            let info = Arc::new(info);
                            self.entries.insert(variant.to_string(), info.clone()).await;
                            return Known::Stored(info, Source::Redis);
                        }
                        // Not copied into memory: the Redis entry carries the
                        // expiry, and a render elsewhere clears it.
                        (entry.absent, entry.failure.map(Arc::new))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "index lookup in Redis failed; falling back to storage");
                        // Redis down: storage is asked at most once per negative_ttl_secs.
                        (self.absent_locally(variant), None)
                    }
                }
            }
        };
        let failure = self.failed.get(variant).await.or(shared_failure);
        if absent {
            Known::Absent(failure)
        } else {
            Known::Unknown(failure)
        }
    }

    /// What this process alone knows storage lacks: without Redis its only
    /// record (including renders queued here), with Redis the fallback when
    /// Redis fails.
    fn absent_locally(&self, variant: &str) -> bool {
        self.probed_absent.contains(variant)
            || (self.redis.is_none() && self.absent_variants.contains_key(variant))
    }

    /// The index, then storage (the source of truth), asked once however
    /// many ask at the same time. A variant found only in storage is
    /// recorded, its bytes kept hot and returned, and never re-rendered.
    /// Storage's "absent" is kept in memory briefly; in Redis by whoever
    /// decides what follows it: `expect_render` as a render is queued,
    /// `mark_unrendered` when none will be (here, for a failed variant).
    pub async fn locate(&self, storage: &Storage, variant: &str) -> Result<Located> {
        let failure = match self.known(variant).await {
            Known::Stored(info, source) => return Ok(Located::Stored(info, source, None)),
            Known::Absent(failure) => return Ok(Located::Missing(failure)),
            Known::Unknown(failure) => failure,
        };
        // Storage's answer, read once for however many ask at the same time.
        let probe = self.probes.run(variant, self.probe(storage, variant));
        match Box::pin(probe).await? {
            Probe::Found(info, bytes) => Ok(Located::Stored(info, Source::Storage, Some(bytes))),
            Probe::Absent => {
                // Failed for good: no render will mark it, so the index does.
                if failure.is_some() {
                    self.mark_unrendered(variant).await;
                }
                Ok(Located::Missing(failure))
            }
        }
    }

    /// Storage's answer, kept in memory when "absent" (`negative_ttl_secs`).
    /// With Redis, the "absent" that every process sees is set only with
    /// the render's job (`expect_render`). Until then, a miss whose Redis
    /// look-up raced that job, or found the probe just ended, would ask
    /// storage again. This answer of moments ago stands instead, and it is
    /// kept before the probe's single flight ends, so none slips between.
    async fn probe(&self, storage: &Storage, variant: &str) -> Result<Probe> {
        if self.probed_absent.contains(variant) {
            return Ok(Probe::Absent);
        }
        match storage.get(variant).await? {
            Some(object) => {
                let info = self.found_in_storage(variant, &object).await;
                Ok(Probe::Found(info, object.bytes))
            }
            None => {
                self.probed_absent.insert(variant);
                Ok(Probe::Absent)
            }
        }
    }

    /// Records a variant only storage held, and keeps its bytes hot.
    async fn found_in_storage(&self, variant: &str, object: &StoredObject) -> Arc<VariantInfo> {
        let info = Arc::new(VariantInfo::of_bytes(
            &object.bytes,
            object.info.last_modified,
        ));
        self.remember(variant, (*info).clone()).await;
        self.hot_put_known(variant, info.clone(), object.bytes.clone())
            .await;
        info
    }

    /// Storage lacks this variant (`locate` said so) and no render will be
    /// queued (failed for good, or its original is missing): "absent" is
    /// kept in Redis briefly (`negative_ttl_secs`), so no front asks storage
    /// again meanwhile. Only what a render is queued for is kept longer
    /// (`expect_render`), so paths nobody renders cost no lasting key.
    pub async fn mark_unrendered(&self, variant: &str) {
        let Some((handle, keys)) = &self.redis else {
            return;
        };
        let marked: Result<()> = async {
            let mut conn = handle.conn().await?;
            let () = conn
                .set_ex(keys.variant_absent(variant), 1, self.negative_ttl.as_secs())
                .await?;
            Ok(())
        }
        .await;
        // It only costs the next asker another storage read.
        if let Err(e) = marked {
            tracing::warn!(error = %e, variant, "could not record an absent variant in the index");
        }
    }

    /// A render of this variant is about to be queued, and storage did not
    /// hold it: the index answers "absent" until the render records it (or
    /// `absent_ttl_secs`), so misses meanwhile never ask storage. Without
    /// Redis it is kept here; with Redis the marker is returned for the
    /// queue to set with the job (`Queue::enqueue_marked`), which puts it
    /// before the render's `mark`, in the same round trip.
    #[must_use = "the marker must go to the queue with the job"]
    pub async fn expect_render(&self, variant: &str) -> Option<ExpiringMarker> {
        let Some((_, keys)) = &self.redis else {
            self.absent_variants.insert(variant.to_string(), ()).await;
            return None;
        };
        Some(keys.render_expected(variant, self.absent_ttl.as_secs()))
    }

    /// Several variants' index fields and absent markers (and failures,
    /// `with_failures`) in one round trip.
    async fn redis_get_all(
        handle: &RedisHandle,
        keys: &RedisKeys,
        variants: &[&str],
        with_failures: bool,
    ) -> Result<Vec<RedisEntry>> {
        let mut conn = handle.conn().await?;
        let mut pipe = redis::pipe();
        for variant in variants {
            pipe.hgetall(keys.variant_index(variant))
                .exists(keys.variant_absent(variant));
            if with_failures {
                pipe.get(keys.variant_failure(variant));
            }
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let per_variant = if with_failures { 3 } else { 2 };
        replies
            .chunks(per_variant)
            .map(|replies| {
                let fields: std::collections::HashMap<String, String> =
                    redis::from_redis_value_ref(&replies[0])?;
                let absent: bool = redis::from_redis_value_ref(&replies[1])?;
                let failure: Option<String> = match replies.get(2) {
                    Some(reply) => redis::from_redis_value_ref(reply)?,
                    None => None,
                };
                let field = |name: &str| fields.get(name).cloned();
                let info = (|| {
                    Some(VariantInfo::new(
                        field("size")?.parse().ok()?,
                        field("etag")?,
                        field("type")?,
                        field("mtime")?.parse().ok()?,
                    ))
                })();
                Ok(RedisEntry {
                    info,
                    absent,
                    failure: failure.and_then(|json| serde_json::from_str(&json).ok()),
                })
            })
            .collect::<std::result::Result<_, redis::ParsingError>>()
            .map_err(|e| redis::RedisError::from(e).into())
    }

    /// For a worker about to render these variants: which are stored
    /// already, asking Redis once for all of them and storage only about
    /// those nobody knows. Unlike `locate`, nothing is marked absent: the
    /// render records each variant it makes.
    pub async fn stored_of(
        &self,
        storage: &Storage,
        variants: &[String],
    ) -> Result<Vec<Option<(Arc<VariantInfo>, Option<Bytes>)>>> {
        let mut found = Vec::with_capacity(variants.len());
        let mut unknown = Vec::new();
        for (i, variant) in variants.iter().enumerate() {
            let entry = self.entries.get(variant).await;
            if entry.is_none() {
                unknown.push(i);
            }
            found.push(entry.map(|info| (info, None)));
        }
        let mut ask_storage: Vec<usize> = unknown
            .iter()
            .copied()
            .filter(|&i| !self.absent_locally(&variants[i]))
            .collect();
        if let (Some((handle, keys)), false) = (&self.redis, unknown.is_empty()) {
            let names: Vec<&str> = unknown.iter().map(|&i| variants[i].as_str()).collect();
            match Self::redis_get_all(handle, keys, &names, false).await {
                Ok(replies) => {
                    ask_storage.clear();
                    for (&i, RedisEntry { info, absent, .. }) in unknown.iter().zip(replies) {
                        match info {
                            Some(info) => {
                                let info = Arc::new(info);
                                self.entries.insert(variants[i].clone(), info.clone()).await;
                                found[i] = Some((info, None));
                            }
                            None if absent => {}
                            None => ask_storage.push(i),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "index lookup in Redis failed; asking storage");
                }
            }
        }
        for i in ask_storage {
            if let Some(object) = storage.get(&variants[i]).await? {
                let info = self.found_in_storage(&variants[i], &object).await;
                found[i] = Some((info, Some(object.bytes)));
            }
        }
        Ok(found)
    }

    /// Records a stored variant. Call only after the bytes are in storage.
    pub async fn mark(&self, variant: &str, info: VariantInfo) -> Result<()> {
        self.mark_all(vec![(variant.to_string(), info)]).await
    }

    /// Records stored variants, in one Redis round trip. Call only after
    /// their bytes are in storage.
    pub async fn mark_all(&self, variants: Vec<(String, VariantInfo)>) -> Result<()> {
        if variants.is_empty() {
            // Redis refuses an empty pipeline; a job that only made previews marks nothing.
            return Ok(());
        }
        if let Some((handle, keys)) = &self.redis {
            let mut pipe = redis::pipe();
            let mut stale = Vec::with_capacity(variants.len() * 2);
            for (variant, info) in &variants {
                pipe.hset_multiple(
                    keys.variant_index(variant),
                    &[
                        ("size", info.size.to_string()),
                        ("etag", info.etag.clone()),
                        ("type", info.content_type.clone()),
                        ("mtime", info.last_modified.to_string()),
                    ],
                )
                .ignore();
                stale.push(keys.variant_failure(variant));
                stale.push(keys.variant_absent(variant));
            }
            // One DEL for every variant's markers: Redis pays per command.
            pipe.del(stale).ignore();
            let mut conn = handle.conn().await?;
            let () = pipe.query_async(&mut conn).await?;
        }
        for (variant, info) in variants {
            self.absent_variants.invalidate(&variant).await;
            self.probed_absent.remove(&variant);
            self.queued.invalidate(&variant).await;
            self.failed.invalidate(&variant).await;
            // Hot bytes answer without the entry: they must describe the same bytes.
            if self
                .hot
                .get(&variant)
                .await
                .is_some_and(|hot| *hot.info != info)
            {
                self.hot.invalidate(&variant).await;
            }
            self.entries.insert(variant, Arc::new(info)).await;
        }
        Ok(())
    }

    /// Like `mark`, for a variant found in storage by a reader: a Redis
    /// failure only costs the next reader another storage look-up.
    pub async fn remember(&self, variant: &str, info: VariantInfo) {
        if let Err(e) = self.mark(variant, info).await {
            tracing::warn!(error = %e, variant, "could not record variant in the index");
        }
    }

    /// Records that this variant's job failed for good.
    pub async fn mark_failed(&self, variant: &str, failure: Failure) -> Result<()> {
        if let Some((handle, keys)) = &self.redis {
            let mut conn = handle.conn().await?;
            let () = conn
                .set_ex(
                    keys.variant_failure(variant),
                    serde_json::to_string(&failure)?,
                    self.failure_ttl.as_secs(),
                )
                .await?;
        }
        self.failed
            .insert(variant.to_string(), Arc::new(failure))
            .await;
        // Misses answer the failure now, not "queued".
        self.queued.invalidate(variant).await;
        Ok(())
    }

    /// The failure recorded for this variant, if it has not expired. A Redis
    /// failure answers "none": the miss is then queued as usual.
    pub async fn failure(&self, variant: &str) -> Option<Arc<Failure>> {
        if let Some(failure) = self.failed.get(variant).await {
            return Some(failure);
        }
        let (handle, keys) = self.redis.as_ref()?;
        let found: Result<Option<String>> = async {
            let mut conn = handle.conn().await?;
            Ok(conn.get(keys.variant_failure(variant)).await?)
        }
        .await;
        let failure: Failure = match found {
            Ok(Some(json)) => serde_json::from_str(&json).ok()?,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "failure look-up in Redis failed");
                return None;
            }
        };
        // Not copied into memory: the Redis entry carries the expiry, and a
        // render elsewhere clears it.
        Some(Arc::new(failure))
    }

    /// The variant's bytes, info and header values when they are in memory:
    /// a hit that needs no other look-up.
    pub async fn hot_get(&self, variant: &str) -> Option<Arc<HotVariant>> {
        if !self.keeps_any_hot {
            // Nothing to find: spare every hit the look-up.
            return None;
        }
        self.hot.get(variant).await
    }

    /// Keeps a variant's bytes in memory, described by its index entry (call
    /// after `mark`); without one they are left to the next reader.
    pub async fn hot_put(&self, variant: &str, bytes: Bytes) {
        if let Some(info) = self.entries.get(variant).await {
            self.hot_put_known(variant, info, bytes).await;
        }
    }

    /// Whether bytes of this size are kept in memory once read; the front
    /// sends others from their file.
    pub fn keeps_hot(&self, size: u64) -> bool {
        self.keeps_any_hot && size <= self.hot_max_object_bytes
    }

    /// Keeps a variant's bytes in memory with what the index knows of them.
    pub async fn hot_put_known(&self, variant: &str, info: Arc<VariantInfo>, bytes: Bytes) {
        if !self.keeps_hot(bytes.len() as u64) {
            return;
        }
        self.hot
            .insert(variant.to_string(), Arc::new(HotVariant { info, bytes }))
            .await;
    }

    /// Remembers briefly that storage answered "absent" for this key.
    pub async fn remember_absent(&self, key: &str) {
        self.absent.insert(key.to_string(), ()).await;
    }

    pub async fn is_known_absent(&self, key: &str) -> bool {
        self.absent.contains_key(key)
    }

    pub async fn forget_absent(&self, key: &str) {
        self.absent.invalidate(key).await;
    }

    /// Runs `enqueue` once however many misses of the variant come at the
    /// same time (the others wait for its answer; should it fail, each
    /// runs its own), and remembers its success briefly
    /// (`negative_ttl_secs`): misses meanwhile answer 202 without asking
    /// Redis or the queue. `mark_all`, `mark_failed` and
    /// purges clear it.
    pub async fn queue_once(
        &self,
        variant: &str,
        enqueue: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        if self.is_recently_queued(variant) {
            return Ok(());
        }
        // Not moka's own `try_get_with`: its per-key waiter bookkeeping was
        // a tenth of a first miss's CPU in a miss storm. The mark is set
        // inside the run, so a miss arriving as the run ends finds it.
        // Boxed: each layer awaiting it would otherwise copy it whole.
        let enqueue_and_mark = Box::pin(async {
            enqueue.await?;
            self.queued.insert(variant.to_string(), ()).await;
            Ok(())
        });
        self.queueing.run(variant, enqueue_and_mark).await
    }

    /// Shares `other`'s memory: its "just queued" marks, index entries and
    /// hot bytes. A process's worker index and front index are separate
    /// (each has its runtime's Redis connection), but one memory: the
    /// worker's renders and failures must clear what the front queued, and
    /// what the worker renders and marks is what the front serves next,
    /// hot, rather than a second copy only the worker holds.
    pub fn share_memory_with(&mut self, other: &Index) {
        self.queued = other.queued.clone();
        self.entries = other.entries.clone();
        self.hot = other.hot.clone();
    }

    pub fn is_recently_queued(&self, variant: &str) -> bool {
        self.queued.contains_key(variant)
    }

    /// Forgets a purged variant: its Redis entry and failure, this process's
    /// memory, and (published on the purge channel) every other process's.
    /// Call after the bytes are gone from storage.
    pub async fn forget(&self, variant: &str) -> Result<()> {
        if let Some((handle, keys)) = &self.redis {
            let mut conn = handle.conn().await?;
            let () = redis::pipe()
                .del(keys.variant_index(variant))
                .ignore()
                .del(keys.variant_failure(variant))
                .ignore()
                .publish(keys.purges(), variant)
                .ignore()
                .query_async(&mut conn)
                .await?;
        }
        self.forget_locally(variant).await;
        Ok(())
    }

    /// Drops what this process remembers of a variant (or any other key).
    pub async fn forget_locally(&self, key: &str) {
        self.entries.invalidate(key).await;
        self.hot.invalidate(key).await;
        self.absent.invalidate(key).await;
        self.absent_variants.invalidate(key).await;
        self.probed_absent.remove(key);
        self.queued.invalidate(key).await;
        self.failed.invalidate(key).await;
    }

    /// Drops everything this process remembers: after a gap in the purge
    /// channel, any of it may be stale.
    pub fn forget_all_locally(&self) {
        self.entries.invalidate_all();
        self.hot.invalidate_all();
        self.absent.invalidate_all();
        self.absent_variants.invalidate_all();
        self.probed_absent.clear();
        self.queued.invalidate_all();
        self.failed.invalidate_all();
    }
}

/// Applies purges published by any process to these indexes (a front's and
/// a worker's may share a process) until `stop` turns true. Each (re)
/// subscription starts by dropping all memory, since purges published while
/// unsubscribed were missed.
pub async fn follow_purges(
    indexes: Vec<Arc<Index>>,
    handle: Arc<RedisHandle>,
    keys: RedisKeys,
    retry_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use futures::StreamExt;
    let channel = keys.purges();
    loop {
        let subscribed = async {
            let mut pubsub = handle.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, crate::error::Error>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                for index in &indexes {
                    index.forget_all_locally();
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                let Ok(variant) = message.get_payload::<String>() else { continue };
                                for index in &indexes {
                                    index.forget_locally(&variant).await;
                                }
                            }
                            None => break,
                        },
                        () = stopped(&mut stop) => return,
                    }
                }
                tracing::warn!("purge channel closed; subscribing again");
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to the purge channel"),
        }
        tokio::select! {
            () = tokio::time::sleep(retry_after) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once `stop` is true (its guard is not held across an await).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_time_past_year_9999_is_sent_as_the_last_http_date() {
        let info = VariantInfo::new(3, "\"e\"".into(), "image/png".into(), i64::MAX);
        let headers = info.hit_headers().expect("header values");
        assert_eq!(headers.last_modified, "Fri, 31 Dec 9999 23:59:59 GMT");
        let before_1970 = VariantInfo::new(3, "\"e\"".into(), "image/png".into(), -5);
        assert_eq!(
            before_1970.http_last_modified(),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }

    #[tokio::test]
    async fn concurrent_misses_queue_once_and_a_failed_enqueue_marks_nothing() {
        let config = crate::config::Config::load_from(Default::default()).unwrap();
        let index = Index::new(&config.index, None);
        let enqueues = AtomicUsize::new(0);
        let gate = tokio::sync::Notify::new();
        let enqueue = || async {
            enqueues.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok(())
        };
        let (answers, ()) = tokio::join!(
            futures::future::join_all((0..5).map(|_| index.queue_once("v", enqueue()))),
            async { gate.notify_one() }
        );
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(
            enqueues.load(Ordering::SeqCst),
            1,
            "one enqueue for five misses"
        );
        assert!(index.is_recently_queued("v"));
        index.queue_once("v", enqueue()).await.unwrap();
        assert_eq!(
            enqueues.load(Ordering::SeqCst),
            1,
            "a later miss finds the mark"
        );

        let failed = index
            .queue_once("w", async {
                Err(crate::error::Error::SourceNotFound("w".into()))
            })
            .await;
        assert_eq!(failed.unwrap_err().code(), "source-not-found");
        assert!(
            !index.is_recently_queued("w"),
            "a failed enqueue marks nothing"
        );
        index.queue_once("w", async { Ok(()) }).await.unwrap();
        assert!(index.is_recently_queued("w"));
    }

    /// Storage's "absent" stands for `negative_ttl_secs`, kept before the
    /// probe's single flight ends: a miss that comes as it ends (its Redis
    /// look-up raced the render's job) does not ask storage again. A purge
    /// forgets it.
    #[tokio::test]
    async fn a_probes_absent_answer_is_kept_briefly_and_a_purge_forgets_it() {
        let config = crate::config::Config::load_from(Default::default()).unwrap();
        let index = Index::new(&config.index, None);
        let storage = Storage::open("memory://").unwrap();
        let variant = "media/cache/small/default/late.png";
        let probe = || index.probes.run(variant, index.probe(&storage, variant));
        assert!(matches!(probe().await.unwrap(), Probe::Absent));
        assert!(
            index.probes.running.lock().is_empty(),
            "the probe's flight has ended"
        );

        storage
            .put(variant, Bytes::from_static(b"stored just after"))
            .await
            .unwrap();
        assert!(
            matches!(probe().await.unwrap(), Probe::Absent),
            "answered from memory, not storage"
        );

        index.forget_locally(variant).await;
        assert!(matches!(probe().await.unwrap(), Probe::Found(..)));
    }

    #[test]
    fn probed_absent_answers_expire_and_are_swept() {
        let kept = ProbedAbsent::new(Duration::from_secs(3600), 100_000);
        kept.insert("a");
        assert!(kept.contains("a"));
        kept.remove("a");
        assert!(!kept.contains("a"));

        let stale = ProbedAbsent::new(Duration::ZERO, 100_000);
        for i in 0..=ProbedAbsent::SWEEP_FLOOR {
            stale.insert(&i.to_string());
        }
        assert!(!stale.contains("0"), "too old to count");
        assert_eq!(
            stale.answers.lock().at.len(),
            1,
            "swept when the floor was reached"
        );

        // Fresh answers for ever new paths stay within the bound.
        let bounded = ProbedAbsent::new(Duration::from_secs(3600), 3000);
        for i in 0..10_000 {
            bounded.insert(&i.to_string());
            assert!(bounded.answers.lock().at.len() <= 3000);
        }
        assert!(bounded.contains("9999"), "the newest answer counts");
    }

    #[tokio::test]
    async fn a_single_flight_shares_the_run_under_way_and_forgets_it_after() {
        let flight = SingleFlight::<u32>::default();
        let runs = AtomicUsize::new(0);
        let gate = tokio::sync::Notify::new();
        let work = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok(7)
        };
        let (answers, ()) = tokio::join!(
            futures::future::join_all((0..5).map(|_| flight.run("k", work()))),
            async { gate.notify_one() }
        );
        assert!(answers.iter().all(|a| matches!(a, Ok(7))));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for five callers");
        assert!(flight.running.lock().is_empty());

        let again = flight.run("k", async { Ok(8) }).await;
        assert!(matches!(again, Ok(8)), "a later caller runs again");

        let dropped = tokio::time::timeout(
            Duration::from_millis(10),
            flight.run("d", std::future::pending()),
        )
        .await;
        assert!(dropped.is_err());
        assert!(
            flight.running.lock().is_empty(),
            "a dropped run leaves nothing"
        );
    }
}
