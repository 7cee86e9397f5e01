//! Locks held in Redis, shared by every process that uses it: one media
//! record's read-change-write at a time across fronts and workers
//! (`storage::SharedLock`). A lock expires on its own, so a process that
//! dies holding one blocks that record for the lock's lifetime only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;

use crate::error::{Error, Result};
use crate::keys::RedisKeys;
use crate::redis_conn::RedisHandle;
use crate::storage::SharedLock;

const UNLOCK_LUA: &str = include_str!("../lua/unlock.lua");
const RENEW_LUA: &str = include_str!("../lua/renew.lua");

/// How long a waiter sleeps between tries: a record's change takes a read
/// and a write, about a millisecond on local disk.
const RETRY_EVERY: Duration = Duration::from_millis(2);

pub struct RedisRecordLock {
    handle: Arc<RedisHandle>,
    keys: RedisKeys,
    ttl: Duration,
    wait: Duration,
    unlock: Script,
    renew: Script,
}

impl RedisRecordLock {
    pub fn new(handle: Arc<RedisHandle>, keys: RedisKeys, ttl: Duration, wait: Duration) -> Self {
        RedisRecordLock {
            handle,
            keys,
            ttl,
            wait,
            unlock: Script::new(UNLOCK_LUA),
            renew: Script::new(RENEW_LUA),
        }
    }
}

#[async_trait::async_trait]
impl SharedLock for RedisRecordLock {
    async fn acquire(&self, code: &str) -> Result<String> {
        let key = self.keys.record_lock(code);
        let token = format!("{:032x}", rand::random::<u128>());
        let started = Instant::now();
        loop {
            let mut conn = self.handle.conn().await?;
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if taken.is_some() {
                return Ok(token);
            }
            if started.elapsed() >= self.wait {
                return Err(Error::Storage(format!(
                    "media record {code} is being changed by another process (waited {} ms)",
                    self.wait.as_millis()
                )));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    async fn release(&self, code: &str, token: &str) {
        let released: Result<()> = async {
            let mut conn = self.handle.conn().await?;
            let _: i64 = self
                .unlock
                .key(self.keys.record_lock(code))
                .arg(token)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = released {
            // It expires on its own; until then the record waits.
            tracing::warn!(error = %e, code, "could not release a media record's lock");
        }
    }

    async fn renew(&self, code: &str, token: &str) -> Result<bool> {
        let mut conn = self.handle.conn().await?;
        let renewed: i64 = self
            .renew
            .key(self.keys.record_lock(code))
            .arg(token)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    /// A third of its lifetime: two renewals can fail or run late before
    /// it lapses.
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
}
