//! The webhook outbox: deliveries waiting to be sent, each due at a time,
//! leased while an attempt runs. `redis` keeps them in a ZSET + hash (they
//! survive a restart of kiln); `embedded` keeps them in memory (they do not).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::Result;
use crate::keys::RedisKeys;
use crate::queue::now_millis;
use crate::redis_conn::RedisHandle;

const SCHEDULE_LUA: &str = include_str!("../../lua/webhook_schedule.lua");
const TAKE_LUA: &str = include_str!("../../lua/webhook_take.lua");
const SETTLE_LUA: &str = include_str!("../../lua/webhook_settle.lua");

/// Dead deliveries kept for inspection.
const DEAD_KEPT: usize = 1000;

/// One webhook to deliver. The id is stable across attempts and job retries,
/// so scheduling it twice is one delivery and receivers can drop duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub url: String,
    /// The account whose secret signs it.
    pub root: String,
    /// The exact JSON text POSTed.
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last attempt's error, if any.
    #[serde(default)]
    pub last_error: Option<String>,
}

#[async_trait]
pub trait Outbox: Send + Sync {
    /// Adds the deliveries, due now, except ids already scheduled.
    async fn schedule(&self, deliveries: &[Delivery]) -> Result<()>;

    /// Up to `limit` due deliveries, each leased for `lease`: unless settled
    /// by then it becomes due again.
    async fn take_due(&self, limit: usize, lease: Duration) -> Result<Vec<Delivery>>;

    /// Delivered: forget it.
    async fn done(&self, id: &str) -> Result<()>;

    /// Failed this time: keep the updated delivery, due after `delay`.
    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<()>;

    /// Out of attempts: forget it, but keep it on the dead list.
    async fn give_up(&self, delivery: &Delivery) -> Result<()>;

    /// Deliveries waiting (due or not).
    async fn pending(&self) -> Result<u64>;

    /// Resolves when this process has scheduled deliveries, or after
    /// `poll`: what other processes schedule, and retries coming due, are
    /// found then.
    async fn wait(&self, poll: Duration);
}

/// In-memory outbox of the embedded backend: nothing survives a restart.
#[derive(Default)]
pub struct EmbeddedOutbox {
    entries: Mutex<HashMap<String, (u64, Delivery)>>,
    dead: Mutex<Vec<Delivery>>,
    changed: Notify,
}

impl EmbeddedOutbox {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Outbox for EmbeddedOutbox {
    async fn schedule(&self, deliveries: &[Delivery]) -> Result<()> {
        let now = now_millis();
        let mut entries = self.entries.lock();
        for delivery in deliveries {
            entries
                .entry(delivery.id.clone())
                .or_insert_with(|| (now, delivery.clone()));
        }
        drop(entries);
        self.changed.notify_one();
        Ok(())
    }

    async fn take_due(&self, limit: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let now = now_millis();
        let mut entries = self.entries.lock();
        let mut due: Vec<(u64, String)> = entries
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(id, (at, _))| (*at, id.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        Ok(due
            .into_iter()
            .filter_map(|(_, id)| {
                let entry = entries.get_mut(&id)?;
                entry.0 = now + lease.as_millis() as u64;
                Some(entry.1.clone())
            })
            .collect())
    }

    async fn done(&self, id: &str) -> Result<()> {
        self.entries.lock().remove(id);
        Ok(())
    }

    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let due = now_millis() + delay.as_millis() as u64;
        self.entries
            .lock()
            .insert(delivery.id.clone(), (due, delivery.clone()));
        self.changed.notify_one();
        Ok(())
    }

    async fn give_up(&self, delivery: &Delivery) -> Result<()> {
        self.entries.lock().remove(&delivery.id);
        let mut dead = self.dead.lock();
        dead.push(delivery.clone());
        if dead.len() > DEAD_KEPT {
            dead.remove(0);
        }
        Ok(())
    }

    async fn pending(&self) -> Result<u64> {
        Ok(self.entries.lock().len() as u64)
    }

    async fn wait(&self, poll: Duration) {
        let _ = tokio::time::timeout(poll, self.changed.notified()).await;
    }
}

/// Redis outbox: `{webhooks}:due` (ZSET of id by due ms) and
/// `{webhooks}:pending` (hash of id to JSON), changed only by `lua/webhook_*.lua`.
///
/// Once this process's deliverer has taken from it, what this process
/// schedules is leased to that deliverer in the same script and handed over
/// in memory, so the deliverer need not ask Redis for it; should the
/// process die, the lease runs out and any deliverer finds it. Settles of
/// delivered webhooks that finish together go to Redis together.
pub struct RedisOutbox {
    handle: Arc<RedisHandle>,
    keys: RedisKeys,
    schedule_script: redis::Script,
    take_script: redis::Script,
    settle_script: redis::Script,
    /// How often deliveries scheduled elsewhere, and due retries, are looked for.
    poll: Duration,
    /// The lease of this process's deliverer, once it has taken from here.
    local_lease: Mutex<Option<Duration>>,
    /// Scheduled and leased here, with when to leave them to Redis instead:
    /// for this process's deliverer.
    leased_here: Mutex<VecDeque<(Instant, Delivery)>>,
    /// When Redis was last asked for due deliveries, and whether it had more.
    shared_look: Mutex<SharedLook>,
    /// Ids delivered whose settle waits for the next batch.
    delivered: Mutex<Vec<String>>,
    /// One batch of settles in flight at a time; the next gathers meanwhile.
    settling: tokio::sync::Mutex<()>,
    /// Wakes this process's deliverer when its own worker schedules, so a
    /// finished job's webhooks leave at once instead of at the next poll.
    scheduled_here: Notify,
}

#[derive(Default)]
struct SharedLook {
    at: Option<Instant>,
    more_due: bool,
}

impl RedisOutbox {
    pub fn new(handle: Arc<RedisHandle>, prefix: &str, poll: Duration) -> Self {
        RedisOutbox {
            handle,
            keys: RedisKeys::new(prefix),
            schedule_script: redis::Script::new(SCHEDULE_LUA),
            take_script: redis::Script::new(TAKE_LUA),
            settle_script: redis::Script::new(SETTLE_LUA),
            poll,
            local_lease: Mutex::new(None),
            leased_here: Mutex::new(VecDeque::new()),
            shared_look: Mutex::new(SharedLook::default()),
            delivered: Mutex::new(Vec::new()),
            settling: tokio::sync::Mutex::new(()),
            scheduled_here: Notify::new(),
        }
    }

    async fn settle(&self, delivery: &Delivery, outcome: &str, due_ms: u64) -> Result<()> {
        let mut conn = self.handle.conn().await?;
        let _: i64 = self
            .settle_script
            .key(self.keys.webhooks_due())
            .key(self.keys.webhooks_pending())
            .key(self.keys.webhooks_dead())
            .arg(&delivery.id)
            .arg(outcome)
            .arg(due_ms)
            .arg(serde_json::to_string(delivery)?)
            .arg(DEAD_KEPT)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Up to `limit` of the deliveries leased here whose lease still holds.
    fn take_leased_here(&self, limit: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut leased = self.leased_here.lock();
        // All share one lease length, so the oldest run out first.
        while leased.front().is_some_and(|(until, _)| *until <= now) {
            leased.pop_front();
        }
        let n = limit.min(leased.len());
        leased.drain(..n).map(|(_, delivery)| delivery).collect()
    }

    /// Whether to ask Redis now: on the first take, once a poll has passed,
    /// or when the last look left due deliveries behind.
    fn shared_look_due(&self) -> bool {
        let look = self.shared_look.lock();
        look.more_due || look.at.is_none_or(|at| at.elapsed() >= self.poll)
    }

    async fn take_shared(&self, limit: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let mut conn = self.handle.conn().await?;
        let taken: Vec<String> = self
            .take_script
            .key(self.keys.webhooks_due())
            .key(self.keys.webhooks_pending())
            .arg(now_millis())
            .arg(lease.as_millis() as u64)
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        *self.shared_look.lock() = SharedLook {
            at: Some(Instant::now()),
            more_due: taken.len() >= limit,
        };
        Ok(taken
            .iter()
            .filter_map(|json| match serde_json::from_str(json) {
                Ok(delivery) => Some(delivery),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable webhook delivery skipped");
                    None
                }
            })
            .collect())
    }
}

#[async_trait]
impl Outbox for RedisOutbox {
    async fn schedule(&self, deliveries: &[Delivery]) -> Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let lease = *self.local_lease.lock();
        let now = now_millis();
        let due = lease.map_or(now, |lease| now + lease.as_millis() as u64);
        let mut invocation = self.schedule_script.prepare_invoke();
        invocation
            .key(self.keys.webhooks_due())
            .key(self.keys.webhooks_pending())
            .arg(due);
        for delivery in deliveries {
            invocation
                .arg(&delivery.id)
                .arg(serde_json::to_string(delivery)?);
        }
        let mut conn = self.handle.conn().await?;
        let added: Vec<String> = invocation.invoke_async(&mut conn).await?;
        if let Some(lease) = lease {
            // Sent from here only while half its lease is left, which outlasts
            // an attempt (the lease is twice an attempt's timeout, plus a
            // second): never sent here and by a deliverer that took it from
            // Redis once the lease ran out. Later, Redis hands it out.
            let until = Instant::now() + lease / 2;
            let mut leased = self.leased_here.lock();
            for delivery in deliveries.iter().filter(|d| added.contains(&d.id)) {
                leased.push_back((until, delivery.clone()));
            }
        }
        self.scheduled_here.notify_one();
        Ok(())
    }

    /// This process's own deliveries first; Redis only when a look there is due.
    async fn take_due(&self, limit: usize, lease: Duration) -> Result<Vec<Delivery>> {
        *self.local_lease.lock() = Some(lease);
        let mut due = self.take_leased_here(limit);
        if due.len() < limit && self.shared_look_due() {
            due.extend(self.take_shared(limit - due.len(), lease).await?);
        }
        Ok(due)
    }

    /// Settles with the others delivered meanwhile, in one round trip.
    async fn done(&self, id: &str) -> Result<()> {
        self.delivered.lock().push(id.to_string());
        let _turn = self.settling.lock().await;
        let ids = std::mem::take(&mut *self.delivered.lock());
        if ids.is_empty() {
            // An earlier turn settled this one with its own.
            return Ok(());
        }
        let mut conn = self.handle.conn().await?;
        // Bodies first, then the ids: not atomic, and need not be, since
        // webhook_take.lua drops an id whose body is gone.
        let _: () = redis::pipe()
            .hdel(self.keys.webhooks_pending(), &ids)
            .ignore()
            .zrem(self.keys.webhooks_due(), &ids)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn retry(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        self.settle(delivery, "retry", now_millis() + delay.as_millis() as u64)
            .await
    }

    async fn give_up(&self, delivery: &Delivery) -> Result<()> {
        self.settle(delivery, "dead", 0).await
    }

    async fn pending(&self) -> Result<u64> {
        let mut conn = self.handle.conn().await?;
        Ok(redis::cmd("HLEN")
            .arg(self.keys.webhooks_pending())
            .query_async(&mut conn)
            .await?)
    }

    /// Other processes' deliveries and due retries are found by the poll.
    async fn wait(&self, poll: Duration) {
        let _ = tokio::time::timeout(poll, self.scheduled_here.notified()).await;
    }
}
