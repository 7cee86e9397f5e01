//! Redis backend: one stream per priority read through a consumer group,
//! dedupe and completion as Lua scripts from `lua/`, stuck entries taken
//! over with XAUTOCLAIM after the visibility timeout, retries parked in a
//! sorted set until their backoff is over. Redis 7.0 commands only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::AsyncCommands;

use super::{Claimed, Depths, Finish, Job, Priority, Queue};
use crate::config::{QueueConfig, RedisConfig};
use crate::error::{Error, Result};
use crate::keys::{ExpiringMarker, RedisKeys};
use crate::metrics::StreamStats;
use crate::redis_conn::{Guarded, RedisHandle};
use redis::aio::MultiplexedConnection;

const ENQUEUE_LUA: &str = include_str!("../../lua/enqueue.lua");
const COMPLETE_LUA: &str = include_str!("../../lua/complete.lua");
const RETRY_LUA: &str = include_str!("../../lua/retry.lua");
const PROMOTE_LUA: &str = include_str!("../../lua/promote.lua");
const HOLD_LUA: &str = include_str!("../../lua/hold.lua");
/// Most due retries moved back onto a stream per look.
const PROMOTE_BATCH: u32 = 100;
/// Longest one blocking read waits before due retries and stuck entries are looked for.
const LONGEST_BLOCK: Duration = Duration::from_secs(1);
/// Due retries are moved back at most this often: a busy worker claims
/// hundreds of jobs a second, and one script call per claim was a sixth of
/// its Redis calls.
const PROMOTE_EVERY: Duration = Duration::from_millis(100);

const PRIORITIES: [Priority; 2] = [Priority::Urgent, Priority::Preheat];

pub struct RedisQueue {
    handle: Arc<RedisHandle>,
    keys: RedisKeys,
    group: String,
    enqueue_script: redis::Script,
    complete_script: redis::Script,
    retry_script: redis::Script,
    promote_script: redis::Script,
    hold_script: redis::Script,
    inflight_ttl_secs: u64,
    dead_letter_max: u64,
    visibility_timeout: Duration,
    /// Entries a blocking read delivered beyond the one it returned.
    stash: Mutex<VecDeque<Claimed>>,
    last_reclaim: Mutex<Option<Instant>>,
    last_promote: Mutex<Option<Instant>>,
    groups_ready: AtomicBool,
    blocking: tokio::sync::Mutex<Option<Guarded<MultiplexedConnection>>>,
}

impl RedisQueue {
    pub fn new(handle: Arc<RedisHandle>, redis: &RedisConfig, config: &QueueConfig) -> Self {
        RedisQueue {
            handle,
            keys: RedisKeys::new(&redis.prefix),
            group: redis.group.clone(),
            enqueue_script: redis::Script::new(ENQUEUE_LUA),
            complete_script: redis::Script::new(COMPLETE_LUA),
            retry_script: redis::Script::new(RETRY_LUA),
            promote_script: redis::Script::new(PROMOTE_LUA),
            hold_script: redis::Script::new(HOLD_LUA),
            inflight_ttl_secs: config.inflight_ttl_secs,
            dead_letter_max: config.dead_letter_max,
            visibility_timeout: Duration::from_secs(config.visibility_timeout_secs),
            stash: Mutex::new(VecDeque::new()),
            last_reclaim: Mutex::new(None),
            last_promote: Mutex::new(None),
            groups_ready: AtomicBool::new(false),
            blocking: tokio::sync::Mutex::new(None),
        }
    }

    /// Creates the consumer groups once, and again after Redis lost them
    /// (restarted without persistence, or flushed).
    async fn ensure_groups(&self) -> Result<()> {
        if self.groups_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut conn = self.handle.conn().await?;
        for priority in PRIORITIES {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.stream(priority.as_str()))
                .arg(&self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(Error::from(e)),
            }
        }
        self.groups_ready.store(true, Ordering::Release);
        Ok(())
    }

    fn decode(&self, entry: &StreamId, attempt: u32) -> Result<Claimed> {
        let raw: String = entry
            .get("job")
            .ok_or_else(|| Error::Queue(format!("stream entry {} has no job", entry.id)))?;
        let job: Job = serde_json::from_str(&raw)
            .map_err(|e| Error::Queue(format!("stream entry {} is not a job: {e}", entry.id)))?;
        Ok(Claimed {
            attempt: job.attempts + attempt,
            job,
            receipt: entry.id.clone(),
        })
    }

    /// The job an entry holds; an entry that holds none (written by another
    /// version, or by hand) goes to the dead-letter stream as it is, with
    /// the reason, rather than failing every claim that meets it.
    async fn decode_or_bury(
        &self,
        stream: &str,
        entry: &StreamId,
        attempt: u32,
    ) -> Result<Option<Claimed>> {
        let reason = match self.decode(entry, attempt) {
            Ok(claimed) => return Ok(Some(claimed)),
            Err(e) => e.to_string(),
        };
        tracing::warn!(stream, entry = %entry.id, reason, "dead-lettering a stream entry that is not a job");
        let raw: String = entry.get("job").unwrap_or_default();
        let mut conn = self.handle.conn().await?;
        let () = redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(self.keys.dead_letter())
            .arg("MAXLEN")
            .arg(self.dead_letter_max)
            .arg("*")
            .arg("job")
            .arg(raw)
            .arg("reason")
            .arg(reason)
            .ignore()
            .cmd("XACK")
            .arg(stream)
            .arg(&self.group)
            .arg(&entry.id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(&entry.id)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(None)
    }

    /// Moves retries whose backoff is over back onto their streams, unless
    /// that was done less than [`PROMOTE_EVERY`] ago.
    async fn promote_due(&self) -> Result<()> {
        {
            let mut last = self.last_promote.lock();
            if last.is_some_and(|at| at.elapsed() < PROMOTE_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let mut conn = self.handle.conn().await?;
        let mut invocation = self.promote_script.prepare_invoke();
        for priority in PRIORITIES {
            invocation
                .key(self.keys.delayed(priority.as_str()))
                .key(self.keys.stream(priority.as_str()));
        }
        let _moved: u64 = invocation
            .arg(PROMOTE_BATCH)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Takes over one entry another consumer left idle past the visibility timeout.
    async fn reclaim(&self, consumer: &str) -> Result<Option<Claimed>> {
        {
            let mut last = self.last_reclaim.lock();
            let due = last.is_none_or(|at| at.elapsed() >= self.visibility_timeout / 4);
            if !due {
                return Ok(None);
            }
            *last = Some(Instant::now());
        }
        let mut conn = self.handle.conn().await?;
        let min_idle = self.visibility_timeout.as_millis() as u64;
        for priority in PRIORITIES {
            let stream = self.keys.stream(priority.as_str());
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(&self.group)
                .arg(consumer)
                .arg(min_idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await?;
            if let Some(entry) = reply.claimed.first() {
                let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg(&self.group)
                    .arg(&entry.id)
                    .arg(&entry.id)
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                let attempt = pending.ids.first().map_or(2, |p| p.times_delivered as u32);
                // More left: look again on the next claim rather than after the timeout.
                *self.last_reclaim.lock() = None;
                return self.decode_or_bury(&stream, entry, attempt).await;
            }
        }
        Ok(None)
    }

    async fn read(
        &self,
        conn: &mut Guarded<MultiplexedConnection>,
        consumer: &str,
        priorities: &[Priority],
        block: Option<Duration>,
    ) -> Result<Vec<Claimed>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(1);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for priority in priorities {
            cmd.arg(self.keys.stream(priority.as_str()));
        }
        for _ in priorities {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
        let mut claimed = Vec::new();
        // Reply order follows the STREAMS order: urgent first.
        for priority in priorities {
            let stream = self.keys.stream(priority.as_str());
            for key in reply
                .iter()
                .flat_map(|r| &r.keys)
                .filter(|k| k.key == stream)
            {
                for entry in &key.ids {
                    if let Some(job) = self.decode_or_bury(&stream, entry, 1).await? {
                        claimed.push(job);
                    }
                }
            }
        }
        Ok(claimed)
    }

    /// Urgent first, then anything stashed, then a blocking read of both streams.
    async fn read_next(&self, consumer: &str, block: Duration) -> Result<Option<Claimed>> {
        // One blocking connection per queue; concurrent claimers take turns on it.
        let mut blocking = self.blocking.lock().await;
        if blocking.is_none() {
            *blocking = Some(self.handle.dedicated(self.visibility_timeout).await?);
        }
        let conn = blocking.as_mut().expect("connection just set");
        let outcome = async {
            // With nothing stashed, the read of both streams below answers
            // urgent first anyway: a read of urgent alone would be a wasted
            // round trip per job.
            if !self.stash.lock().is_empty() {
                if let Some(urgent) = self
                    .read(conn, consumer, &[Priority::Urgent], None)
                    .await?
                    .pop()
                {
                    return Ok(Some(urgent));
                }
                if let Some(stashed) = self.stash.lock().pop_front() {
                    return Ok(Some(stashed));
                }
            }
            let mut got = self.read(conn, consumer, &PRIORITIES, Some(block)).await?;
            if got.is_empty() {
                return Ok(None);
            }
            let first = got.remove(0);
            self.stash.lock().extend(got);
            Ok(Some(first))
        }
        .await;
        if outcome.is_err() {
            // A broken connection is replaced on the next claim.
            *blocking = None;
        }
        outcome
    }

    async fn claim_from_groups(&self, consumer: &str, wait: Duration) -> Result<Option<Claimed>> {
        let deadline = Instant::now() + wait;
        // Block in short slices so due retries and stuck entries are looked
        // for while waiting.
        let slice = (self.visibility_timeout / 4).clamp(Duration::from_millis(50), LONGEST_BLOCK);
        loop {
            self.promote_due().await?;
            if let Some(claimed) = self.reclaim(consumer).await? {
                return Ok(Some(claimed));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(claimed) = self.read_next(consumer, left.min(slice)).await? {
                return Ok(Some(claimed));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    async fn finish(&self, claimed: &Claimed, reason: &str, filed: usize) -> Result<Finish> {
        let mut conn = self.handle.conn().await?;
        let job = &claimed.job;
        let (finished, callbacks): (i64, Vec<String>) = self
            .complete_script
            .key(self.keys.stream(job.priority.as_str()))
            .key(self.keys.inflight(&job.dedupe))
            .key(self.keys.callbacks(&job.dedupe))
            .key(self.keys.dead_letter())
            .arg(&self.group)
            .arg(&claimed.receipt)
            .arg(&job.id)
            .arg(reason)
            .arg(serde_json::to_string(job)?)
            .arg(self.dead_letter_max)
            .arg(filed)
            .invoke_async(&mut conn)
            .await?;
        Ok(if finished == 1 {
            Finish::Done
        } else {
            Finish::Unfiled(callbacks)
        })
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue_marked(
        &self,
        job: &Job,
        callback: Option<&str>,
        marker: Option<&ExpiringMarker>,
    ) -> Result<bool> {
        let mut conn = self.handle.conn().await?;
        let mut invocation = self.enqueue_script.prepare_invoke();
        invocation
            .key(self.keys.inflight(&job.dedupe))
            .key(self.keys.callbacks(&job.dedupe))
            .key(self.keys.stream(job.priority.as_str()))
            .arg(self.inflight_ttl_secs)
            .arg(callback.unwrap_or(""))
            .arg(&job.id)
            .arg(serde_json::to_string(job)?);
        if let Some(marker) = marker {
            invocation.key(&marker.key).arg(marker.ttl_secs);
        }
        let added: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(added == 1)
    }

    async fn claim(&self, consumer: &str, wait: Duration) -> Result<Option<Claimed>> {
        self.ensure_groups().await?;
        let claimed = self.claim_from_groups(consumer, wait).await;
        if let Err(Error::Queue(message)) = &claimed {
            if message.contains("NOGROUP") {
                self.groups_ready.store(false, Ordering::Release);
            }
        }
        claimed
    }

    async fn complete(&self, claimed: &Claimed, filed: usize) -> Result<Finish> {
        self.finish(claimed, "", filed).await
    }

    async fn dead_letter(&self, claimed: &Claimed, reason: &str, filed: usize) -> Result<Finish> {
        let reason = if reason.is_empty() { "failed" } else { reason };
        self.finish(claimed, reason, filed).await
    }

    async fn hold(&self, claimed: &Claimed, consumer: &str) -> Result<bool> {
        let mut conn = self.handle.conn().await?;
        let held: i64 = self
            .hold_script
            .key(self.keys.stream(claimed.job.priority.as_str()))
            .arg(&self.group)
            .arg(consumer)
            .arg(&claimed.receipt)
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    async fn retry_later(&self, claimed: &Claimed, delay: Duration) -> Result<()> {
        let mut conn = self.handle.conn().await?;
        let job = &claimed.job;
        let parked = Job {
            attempts: claimed.attempt,
            ..job.clone()
        };
        let _parked: i64 = self
            .retry_script
            .key(self.keys.stream(job.priority.as_str()))
            .key(self.keys.delayed(job.priority.as_str()))
            .key(self.keys.inflight(&job.dedupe))
            .arg(&self.group)
            .arg(&claimed.receipt)
            .arg(delay.as_millis() as u64)
            .arg(serde_json::to_string(&parked)?)
            .arg(&job.id)
            .arg(self.inflight_ttl_secs)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn depths(&self) -> Result<Depths> {
        let mut conn = self.handle.conn().await?;
        let (urgent, preheat, delayed_urgent, delayed_preheat, dead): (u64, u64, u64, u64, u64) =
            redis::pipe()
                .xlen(self.keys.stream("urgent"))
                .xlen(self.keys.stream("preheat"))
                .zcard(self.keys.delayed("urgent"))
                .zcard(self.keys.delayed("preheat"))
                .xlen(self.keys.dead_letter())
                .query_async(&mut conn)
                .await?;
        Ok(Depths {
            urgent,
            preheat,
            delayed: delayed_urgent + delayed_preheat,
            dead,
        })
    }

    /// `XLEN` and the consumer group's `lag` and `pending` (XINFO GROUPS)
    /// of each job stream, plus the delayed and dead-letter sizes.
    async fn streams(&self) -> Result<Vec<StreamStats>> {
        let depths = self.depths().await?;
        let mut conn = self.handle.conn().await?;
        let mut group_stats = [(0, 0); 2];
        for (i, priority) in PRIORITIES.iter().enumerate() {
            let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
                conn.xinfo_groups(self.keys.stream(priority.as_str())).await;
            // No stream yet (nothing enqueued, no worker started): nothing waits.
            let Ok(groups) = groups else { continue };
            if let Some(group) = groups.groups.iter().find(|g| g.name == self.group) {
                let length = match priority {
                    Priority::Urgent => depths.urgent,
                    Priority::Preheat => depths.preheat,
                };
                // Redis answers no lag when it cannot tell (entries deleted
                // past the last delivered one): then all undelivered entries.
                let lag = group.lag.map_or_else(
                    || length.saturating_sub(group.pending as u64),
                    |lag| lag as u64,
                );
                group_stats[i] = (lag, group.pending as u64);
            }
        }
        Ok(depths.streams(group_stats))
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.handle.conn().await?;
        let _: String = conn.ping().await?;
        Ok(())
    }
}
