//! Webhook delivery: POSTs a JSON body to the client's URL exactly as given,
//! through the SSRF guard, retrying timeouts and non-2xx answers with
//! exponential backoff. The same `webhook-id` is sent on every attempt so a
//! receiver can drop duplicates.

use std::time::Duration;

use crate::config::CallbackConfig;
use crate::error::{Error, Result};
use crate::security::{classify_client_error, guarded_client, ClientLimits, NetworkPolicy};

pub struct Notifier {
    client: reqwest::Client,
    policy: NetworkPolicy,
    max_attempts: u32,
    backoff: Duration,
}

impl Notifier {
    pub fn new(
        config: &CallbackConfig,
        policy: NetworkPolicy,
        user_agent: &str,
    ) -> Result<Notifier> {
        let client = guarded_client(
            &policy,
            &ClientLimits {
                connect_timeout: Duration::from_millis(config.timeout_ms),
                total_timeout: Duration::from_millis(config.timeout_ms),
                // A callback answers where it is told to; it does not send us elsewhere.
                max_redirects: 0,
                user_agent: user_agent.to_string(),
            },
        )?;
        Ok(Notifier {
            client,
            policy,
            max_attempts: config.max_attempts,
            backoff: Duration::from_millis(config.backoff_ms),
        })
    }

    /// Delivers with retries; the error is the last attempt's.
    pub async fn deliver(
        &self,
        url: &str,
        webhook_id: &str,
        body: &serde_json::Value,
    ) -> Result<()> {
        let target = crate::security::parse_outbound_url(url, &self.policy)?;
        let payload = serde_json::to_vec(body)?;
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            let outcome = self
                .client
                .post(target.clone())
                .header("content-type", "application/json")
                .header("webhook-id", webhook_id)
                .header("webhook-timestamp", crate::storage::now_secs().to_string())
                .body(payload.clone())
                .send()
                .await;
            let error = match outcome {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => Error::Callback(format!("{url} answered {}", response.status())),
                Err(e) => classify_client_error(&e, url),
            };
            // Refused addresses and bad URLs will not get better; the rest is worth another try.
            if !error.is_retryable() || attempt >= self.max_attempts {
                return Err(error);
            }
            tracing::debug!(url, attempt, error = %error, "callback failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }
}
