//! One lazily opened Redis connection per process part, shared by `index` and
//! `queue`. Opened on first use so it lives on the runtime that uses it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::AsyncConnectionConfig;
use tokio::sync::OnceCell;

use crate::config::RedisConfig;
use crate::error::{Error, Result};

pub struct RedisHandle {
    client: redis::Client,
    manager: OnceCell<ConnectionManager>,
    timeout: Duration,
}

impl RedisHandle {
    pub fn new(config: &RedisConfig) -> Result<RedisHandle> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| Error::Config(format!("redis.url: {e}")))?;
        Ok(RedisHandle {
            client,
            manager: OnceCell::new(),
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    /// The shared, auto-reconnecting connection for short commands.
    pub async fn conn(&self) -> Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            self.timeout,
            self.manager.get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), config)
            }),
        )
        .await
        .map_err(|_| Error::Queue("timed out connecting to Redis".into()))??;
        Ok(manager.clone())
    }

    /// A connection of its own, for commands that block (XREADGROUP BLOCK)
    /// and must not stall everyone else's.
    pub async fn dedicated(&self, longest_block: Duration) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(longest_block + self.timeout));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }
}
