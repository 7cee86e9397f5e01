//! Webhooks: who gets told what (`Subscriber`), the SAIS bodies, Standard
//! Webhooks signatures, and delivery from the outbox with exponential
//! backoff. Every URL goes through the SSRF guard and is POSTed exactly as
//! given (clients keep `?code=` in it). Never renders or touches the queue.

mod outbox;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use crate::config::CallbackConfig;
use crate::error::{Error, Result};
use crate::security::{classify_client_error, guarded_client, ClientLimits, NetworkPolicy};
use crate::storage::{MediaRecord, Storage, Thumb};

pub use outbox::{Delivery, EmbeddedOutbox, Outbox, RedisOutbox};

/// Where one caller wants a job's results, fixed when it enqueues: the
/// request's URLs, else its account's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subscriber {
    /// The account whose secret signs the webhooks.
    pub root: String,
    /// Gets the media record when the media is done, or failed.
    pub media: Option<String>,
    /// Gets one body per finished thumbnail. With no media URL, it also
    /// hears of a failure, so a caller never waits for nothing.
    pub thumb: Option<String>,
}

impl Subscriber {
    pub fn is_empty(&self) -> bool {
        self.media.is_none() && self.thumb.is_none()
    }

    /// The form kept beside a queued job.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a queued subscriber; a bare URL (older queue entries) is a thumb URL.
    pub fn decode(text: &str, root: &str) -> Subscriber {
        serde_json::from_str(text).unwrap_or_else(|_| Subscriber {
            root: root.to_string(),
            media: None,
            thumb: Some(text.to_string()),
        })
    }
}

/// The thumb webhook: SAIS's `liipCode, url, size, marking`, plus the
/// `mediaCode`/`code` SAIS left out and what a client needs to lay it out.
pub fn thumb_body(record: &MediaRecord, filter: &str, thumb: &Thumb) -> Value {
    json!({
        "liipCode": filter,
        "url": thumb.url,
        "size": thumb.size,
        "marking": thumb.marking,
        "mediaCode": record.code,
        "code": record.code,
        "root": record.root,
        "status": "done",
        "filter": filter,
        "path": record.path,
        "width": thumb.width,
        "height": thumb.height,
        "mimeType": thumb.mime_type,
        "blur": record.blur,
        "blurhash": record.blurhash,
        "originalUrl": record.original_url,
        "originalWidth": record.original_width,
        "originalHeight": record.original_height,
        "context": record.context,
        // When the record said this: retries and queues can deliver an
        // older webhook after a newer one, and a receiver keeps the newest.
        "updatedAt": record.updated_at,
    })
}

/// The deliveries one subscriber gets for a finished job: a thumb webhook per
/// variant and the media webhook. Ids derive from the job, so a retried job
/// schedules the same deliveries again, not new ones.
pub fn success_deliveries(
    job_id: &str,
    position: usize,
    subscriber: &Subscriber,
    record: &MediaRecord,
    filters: &[String],
) -> Vec<Delivery> {
    let mut out = Vec::new();
    if let Some(url) = &subscriber.thumb {
        for filter in filters {
            if let Some(thumb) = record.thumb_data.get(filter) {
                out.push(delivery(
                    format!("{job_id}.{position}.thumb.{filter}"),
                    url,
                    subscriber,
                    &thumb_body(record, filter, thumb),
                ));
            }
        }
    }
    if let Some(url) = &subscriber.media {
        out.push(delivery(
            format!("{job_id}.{position}.media"),
            url,
            subscriber,
            &serde_json::to_value(record).unwrap_or_default(),
        ));
    }
    out
}

/// The failure webhook: the media record, marked failed with its reason.
pub fn failure_deliveries(
    job_id: &str,
    position: usize,
    subscriber: &Subscriber,
    record: &MediaRecord,
) -> Vec<Delivery> {
    let Some(url) = subscriber.media.as_ref().or(subscriber.thumb.as_ref()) else {
        return Vec::new();
    };
    let mut body = serde_json::to_value(record).unwrap_or_default();
    body["status"] = json!("failed");
    vec![delivery(
        format!("{job_id}.{position}.failed"),
        url,
        subscriber,
        &body,
    )]
}

fn delivery(id: String, url: &str, subscriber: &Subscriber, body: &Value) -> Delivery {
    Delivery {
        id: format!("msg_{id}"),
        url: url.to_string(),
        root: subscriber.root.clone(),
        body: body.to_string(),
        attempts: 0,
        last_error: None,
    }
}

/// A new Standard Webhooks secret: `whsec_` + base64 of 24 random bytes.
pub fn new_webhook_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// `webhook-signature` per Standard Webhooks: `v1,` + base64 of
/// HMAC-SHA256(secret key, "{id}.{timestamp}.{body}").
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| Error::Internal(format!("webhook secret is not base64: {e}")))?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key)
        .map_err(|e| Error::Internal(format!("webhook secret: {e}")))?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Sends one attempt of a delivery.
pub struct Notifier {
    client: reqwest::Client,
    policy: NetworkPolicy,
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
                // A callback answers where it is told to; it does not send us
                // elsewhere. A 3xx is a failed attempt, retried like a 5xx.
                max_redirects: 0,
                user_agent: user_agent.to_string(),
            },
        )?;
        Ok(Notifier { client, policy })
    }

    /// One signed POST; a non-2xx answer is an error.
    pub async fn attempt(&self, delivery: &Delivery, secret: Option<&str>) -> Result<()> {
        let target = crate::security::parse_outbound_url(&delivery.url, &self.policy)?;
        let timestamp = crate::storage::now_secs();
        let mut request = self
            .client
            .post(target)
            .header("content-type", "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = secret {
            request = request.header(
                "webhook-signature",
                sign(secret, &delivery.id, timestamp, &delivery.body)?,
            );
        }
        match request.body(delivery.body.clone()).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            // Other answers may change (a deploy, a hiccup); Gone is for good.
            Ok(response) if response.status() == reqwest::StatusCode::GONE => Err(
                Error::CallbackGone(format!("{} answered 410 Gone", delivery.url)),
            ),
            Ok(response) => Err(Error::Callback(format!(
                "{} answered {}",
                delivery.url,
                response.status()
            ))),
            Err(e) => Err(classify_client_error(&e, &delivery.url)),
        }
    }
}

/// `first` × 2^(attempts − 1), capped at `longest`: the wait after the
/// `attempts`-th failure (webhooks and jobs alike).
pub fn doubling_backoff(first: Duration, longest: Duration, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(20);
    first.saturating_mul(factor).min(longest)
}

/// Drains the outbox: sends what is due, reschedules failures with
/// exponential backoff, gives up after `max_attempts`.
pub struct Deliverer {
    pub outbox: Arc<dyn Outbox>,
    pub notifier: Notifier,
    pub storage: Storage,
    secrets: moka::future::Cache<String, Option<String>>,
    max_attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    poll: Duration,
    lease: Duration,
    concurrency: usize,
    slots: Arc<Semaphore>,
    /// This process's counters (attempts, failures).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Deliverer {
    pub fn new(
        config: &CallbackConfig,
        outbox: Arc<dyn Outbox>,
        notifier: Notifier,
        storage: Storage,
    ) -> Deliverer {
        Deliverer {
            outbox,
            notifier,
            storage,
            secrets: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            max_attempts: config.max_attempts,
            backoff: Duration::from_millis(config.backoff_ms),
            max_backoff: Duration::from_millis(config.max_backoff_ms),
            poll: Duration::from_millis(config.poll_ms),
            // An attempt that outlives its timeout twice over is presumed dead.
            lease: Duration::from_millis(config.timeout_ms.saturating_mul(2) + 1000),
            concurrency: config.concurrency.max(1),
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

    /// The wait before attempt `attempts + 1`: backoff × 2^(attempts − 1), capped.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        doubling_backoff(self.backoff, self.max_backoff, attempts)
    }

    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        while !*shutdown.borrow() {
            match self.clone().send_due().await {
                Ok(0) => {}
                Ok(_) => continue,
                Err(e) => tracing::warn!(error = %e, "webhook outbox unavailable"),
            }
            tokio::select! {
                () = self.outbox.wait(self.poll) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// For a stopping worker: sends what is due now (the webhooks of the
    /// jobs it just finished) and waits for sends in flight, within
    /// `deadline`. Failures are rescheduled in the outbox as usual.
    pub async fn flush(self: Arc<Self>, deadline: Duration) {
        let flushed = async {
            while let Ok(sent) = self.clone().send_due().await {
                if sent == 0 {
                    break;
                }
            }
            let _all_back = self.slots.acquire_many(self.concurrency as u32).await;
        };
        if tokio::time::timeout(deadline, flushed).await.is_err() {
            tracing::warn!("webhooks still in flight at exit; the Redis outbox keeps them (the embedded one loses them)");
        }
    }

    /// Takes as many due deliveries as there are free send slots and starts
    /// sending them; returns how many were started.
    async fn send_due(self: Arc<Self>) -> Result<usize> {
        let free = self.slots.available_permits();
        if free == 0 {
            // Wait for a slot rather than spin.
            drop(self.slots.acquire().await);
            return Ok(1);
        }
        let due = self.outbox.take_due(free, self.lease).await?;
        let started = due.len();
        for delivery in due {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                break;
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.send(delivery).await;
                drop(slot);
            });
        }
        Ok(started)
    }

    /// The account's signing secret, `None` when it has none. A failed
    /// read is not kept: the next delivery asks storage again.
    async fn secret(&self, root: &str) -> Result<Option<String>> {
        let storage = self.storage.clone();
        let root_owned = root.to_string();
        self.secrets
            .try_get_with(root.to_string(), async move {
                let account = storage.account(&root_owned).await?;
                Ok::<_, Error>(account.map(|a| a.webhook_secret).filter(|s| !s.is_empty()))
            })
            .await
            .map_err(|e| {
                Error::Storage(format!("cannot read account {root} to sign a webhook: {e}"))
            })
    }

    async fn send(&self, mut delivery: Delivery) {
        // Never sent unsigned for want of the secret. A failed read of it is
        // kiln's own failure, not the receiver's: retried, and not counted
        // against callback.max_attempts, so an outage of storage cannot
        // make kiln give up on a receiver it never called.
        let secret = match self.secret(&delivery.root).await {
            Ok(secret) => secret,
            Err(e) => {
                self.metrics.callback(true, false);
                let delay = self.delay_after(delivery.attempts.max(1));
                tracing::warn!(id = delivery.id, url = delivery.url, error = %e, "webhook not signed yet; retrying in {delay:?}");
                delivery.last_error = Some(e.to_string());
                if let Err(e) = self.outbox.retry(&delivery, delay).await {
                    tracing::warn!(id = delivery.id, error = %e, "could not settle webhook delivery");
                }
                return;
            }
        };
        let outcome = self.notifier.attempt(&delivery, secret.as_deref()).await;
        delivery.attempts += 1;
        let settled = match outcome {
            Ok(()) => {
                self.metrics.callback(false, false);
                tracing::debug!(id = delivery.id, url = delivery.url, "webhook delivered");
                self.outbox.done(&delivery.id).await
            }
            Err(e) => {
                delivery.last_error = Some(e.to_string());
                // Refused addresses and bad URLs will not get better.
                let retry = e.is_retryable() && delivery.attempts < self.max_attempts;
                self.metrics.callback(true, !retry);
                if retry {
                    let delay = self.delay_after(delivery.attempts);
                    tracing::info!(id = delivery.id, url = delivery.url, attempts = delivery.attempts, error = %e, "webhook failed; retrying in {delay:?}");
                    self.outbox.retry(&delivery, delay).await
                } else {
                    tracing::warn!(id = delivery.id, url = delivery.url, attempts = delivery.attempts, error = %e, "webhook given up");
                    self.outbox.give_up(&delivery).await
                }
            }
        };
        if let Err(e) = settled {
            // The lease runs out and the delivery is tried again: at least once, never lost.
            tracing::warn!(id = delivery.id, error = %e, "could not settle webhook delivery");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signature_vector() {
        // The example from the Standard Webhooks specification.
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn subscribers_round_trip_and_bare_urls_are_thumb_urls() {
        let s = Subscriber {
            root: "acme".into(),
            media: Some("http://m/?code=1".into()),
            thumb: None,
        };
        assert_eq!(Subscriber::decode(&s.encode(), "x"), s);
        let bare = Subscriber::decode("http://t/cb", "acme");
        assert_eq!(bare.thumb.as_deref(), Some("http://t/cb"));
        assert_eq!(bare.root, "acme");
    }

    #[test]
    fn failure_goes_to_media_url_else_thumb_url() {
        let record = MediaRecord {
            code: "c".into(),
            marking: "failed".into(),
            ..Default::default()
        };
        let both = Subscriber {
            root: "r".into(),
            media: Some("http://m".into()),
            thumb: Some("http://t".into()),
        };
        let d = failure_deliveries("j", 0, &both, &record);
        assert_eq!((d.len(), d[0].url.as_str()), (1, "http://m"));
        let thumb_only = Subscriber {
            media: None,
            ..both.clone()
        };
        assert_eq!(
            failure_deliveries("j", 0, &thumb_only, &record)[0].url,
            "http://t"
        );
        assert!(failure_deliveries("j", 0, &Subscriber::default(), &record).is_empty());
    }
}
