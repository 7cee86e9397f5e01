//! Lazily opened Redis connections per process part, shared by `index`,
//! `queue` and the outbox, behind a circuit breaker: one per tokio runtime
//! that uses them, opened on its first use so it lives on that runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::OnceCell;

use crate::config::RedisConfig;
use crate::error::{Error, Result};

type ConnectionSlot = Arc<OnceCell<ConnectionManager>>;

pub struct RedisHandle {
    client: redis::Client,
    /// One connection per runtime. pingora runs each front thread on a
    /// runtime of its own: a connection driven by another thread's runtime
    /// costs two cross-thread wake-ups per command, and loads that thread
    /// with every thread's Redis I/O.
    managers: RwLock<Vec<(tokio::runtime::Id, ConnectionSlot)>>,
    timeout: Duration,
    breaker: Arc<Breaker>,
}

impl RedisHandle {
    pub fn new(config: &RedisConfig) -> Result<RedisHandle> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| Error::Config(format!("redis.url: {e}")))?;
        Ok(RedisHandle {
            client,
            managers: RwLock::new(Vec::new()),
            timeout: Duration::from_millis(config.timeout_ms),
            breaker: Arc::new(Breaker::new(Duration::from_millis(
                config.breaker_cooldown_ms,
            ))),
        })
    }

    /// The calling runtime's shared, auto-reconnecting connection for short
    /// commands. Fails at once while the breaker is open, so callers degrade
    /// instead of waiting out a timeout per request.
    pub async fn conn(&self) -> Result<Guarded<ConnectionManager>> {
        self.breaker.admit()?;
        let manager = self.runtime_manager();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let opened = tokio::time::timeout(
            self.timeout,
            manager.get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), config)
            }),
        )
        .await;
        let manager = match opened {
            Ok(Ok(manager)) => manager.clone(),
            Ok(Err(e)) => {
                self.breaker.trip();
                return Err(e.into());
            }
            Err(_) => {
                self.breaker.trip();
                return Err(Error::Queue("timed out connecting to Redis".into()));
            }
        };
        Ok(Guarded {
            inner: manager,
            breaker: self.breaker.clone(),
        })
    }

    /// The calling runtime's connection slot, added on its first call.
    fn runtime_manager(&self) -> ConnectionSlot {
        let runtime = tokio::runtime::Handle::current().id();
        let find = |managers: &[(tokio::runtime::Id, ConnectionSlot)]| {
            managers
                .iter()
                .find(|(id, _)| *id == runtime)
                .map(|(_, manager)| manager.clone())
        };
        if let Some(manager) = find(&self.managers.read().unwrap_or_else(|e| e.into_inner())) {
            return manager;
        }
        let mut managers = self.managers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(manager) = find(&managers) {
            return manager;
        }
        let manager = Arc::new(OnceCell::new());
        managers.push((runtime, manager.clone()));
        manager
    }

    /// A connection of its own, for commands that block (XREADGROUP BLOCK)
    /// and must not stall everyone else's.
    pub async fn dedicated(
        &self,
        longest_block: Duration,
    ) -> Result<Guarded<MultiplexedConnection>> {
        self.breaker.admit()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(longest_block + self.timeout));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(inner) => Ok(Guarded {
                inner,
                breaker: self.breaker.clone(),
            }),
            Err(e) => {
                self.breaker.trip();
                Err(e.into())
            }
        }
    }

    /// A connection for SUBSCRIBE (pub/sub needs one of its own).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::Queue("timed out connecting to Redis".into())),
        }
    }

    /// True while calls fail fast because Redis was found unreachable.
    pub fn is_unavailable(&self) -> bool {
        self.breaker.is_open()
    }
}

/// Open after a connection-level failure for `cooldown`; then one caller at
/// a time probes (half-open) and a success closes it.
struct Breaker {
    cooldown: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` until which calls are refused; 0 = closed.
    open_until_ms: AtomicU64,
}

impl Breaker {
    fn new(cooldown: Duration) -> Breaker {
        Breaker {
            cooldown,
            epoch: Instant::now(),
            open_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "closed".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) != 0
    }

    /// Lets a call through when closed, or as the one probe once the
    /// cooldown has passed (pushing the others back by another cooldown).
    fn admit(&self) -> Result<()> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = self.now_ms();
        if now >= until
            && self
                .open_until_ms
                .compare_exchange(
                    until,
                    now + self.cooldown.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Ok(());
        }
        Err(Error::Queue(
            "Redis is unreachable; retrying shortly".into(),
        ))
    }

    fn trip(&self) {
        let until = self.now_ms() + self.cooldown.as_millis() as u64;
        if self.open_until_ms.swap(until, Ordering::AcqRel) == 0 {
            tracing::warn!(
                cooldown_ms = self.cooldown.as_millis() as u64,
                "Redis unreachable; failing fast"
            );
        }
    }

    fn succeed(&self) {
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("Redis reachable again");
        }
    }

    /// Connection-level failures trip the breaker; answers (even error
    /// replies such as NOSCRIPT) prove Redis is there.
    fn observe<T>(&self, result: &std::result::Result<T, RedisError>) {
        match result {
            Ok(_) => self.succeed(),
            Err(e)
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal() =>
            {
                self.trip()
            }
            Err(_) => self.succeed(),
        }
    }
}

/// A connection whose every command result feeds the breaker.
pub struct Guarded<C> {
    inner: C,
    breaker: Arc<Breaker>,
}

impl<C: ConnectionLike + Send> ConnectionLike for Guarded<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.inner.req_packed_command(cmd).await;
            self.breaker.observe(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.breaker.observe(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_gets_a_connection_of_its_own() {
        let config = crate::config::Config::load_from(Default::default()).unwrap();
        let handle = RedisHandle::new(&config.redis).unwrap();
        let slot_on = |runtime: &tokio::runtime::Runtime| {
            runtime.block_on(async { (handle.runtime_manager(), handle.runtime_manager()) })
        };
        let single = || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        };
        let (first, again) = slot_on(&single());
        assert!(Arc::ptr_eq(&first, &again), "one slot per runtime");
        let (other, _) = slot_on(&single());
        assert!(
            !Arc::ptr_eq(&first, &other),
            "another runtime, another slot"
        );
        assert_eq!(handle.managers.read().unwrap().len(), 2);
    }

    #[test]
    fn breaker_fails_fast_then_lets_one_probe_through() {
        let breaker = Breaker::new(Duration::from_millis(0));
        assert!(breaker.admit().is_ok());
        breaker.trip();
        assert!(breaker.is_open());
        // Cooldown 0: the first caller probes, the breaker stays open until it succeeds.
        assert!(breaker.admit().is_ok());
        breaker.succeed();
        assert!(!breaker.is_open());

        let slow = Breaker::new(Duration::from_secs(3600));
        slow.trip();
        let err = slow.admit().unwrap_err();
        assert_eq!(err.code(), "queue-unavailable");
    }
}
