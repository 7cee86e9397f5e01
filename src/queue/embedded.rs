//! In-process queue with the Redis backend's semantics: dedupe with an
//! in-flight TTL, attached callbacks, urgent before pre-heat, reclaim after
//! the visibility timeout, delayed retries, dead letters. Nothing survives a restart.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{Claimed, Depths, Finish, Job, Priority, Queue};
use crate::config::QueueConfig;
use crate::error::Result;
use crate::keys::ExpiringMarker;
use crate::metrics::StreamStats;

struct Pending {
    job: Job,
    attempt: u32,
    claimed_at: Instant,
}

#[derive(Default)]
struct State {
    urgent: VecDeque<(Job, u32)>,
    preheat: VecDeque<(Job, u32)>,
    pending: HashMap<String, Pending>,
    inflight: HashMap<String, (String, Instant)>,
    callbacks: HashMap<String, Vec<String>>,
    dead: VecDeque<(Job, String)>,
    /// Jobs backing off after a retryable failure: due time, job, attempts so far.
    delayed: Vec<(Instant, Job, u32)>,
    next_receipt: u64,
}

impl State {
    fn requeue(&mut self, job: Job, attempts: u32) {
        let queue = match job.priority {
            Priority::Urgent => &mut self.urgent,
            Priority::Preheat => &mut self.preheat,
        };
        queue.push_front((job, attempts));
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.iter().map(|(at, _, _)| *at).min()
    }
}

pub struct EmbeddedQueue {
    state: Mutex<State>,
    ready: Notify,
    inflight_ttl: Duration,
    visibility_timeout: Duration,
    dead_letter_max: u64,
}

impl EmbeddedQueue {
    pub fn new(config: &QueueConfig) -> Self {
        EmbeddedQueue {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            inflight_ttl: Duration::from_secs(config.inflight_ttl_secs),
            visibility_timeout: Duration::from_secs(config.visibility_timeout_secs),
            dead_letter_max: config.dead_letter_max.max(1),
        }
    }

    fn try_claim(&self) -> Option<Claimed> {
        let mut state = self.state.lock();
        let now = Instant::now();
        let stale: Vec<String> = state
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.claimed_at) >= self.visibility_timeout)
            .map(|(receipt, _)| receipt.clone())
            .collect();
        for receipt in stale {
            if let Some(p) = state.pending.remove(&receipt) {
                state.requeue(p.job, p.attempt);
            }
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.delayed)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        state.delayed = waiting;
        for (_, job, attempts) in due {
            state.requeue(job, attempts);
        }
        let (job, previous_attempts) = state
            .urgent
            .pop_front()
            .or_else(|| state.preheat.pop_front())?;
        state.next_receipt += 1;
        let receipt = state.next_receipt.to_string();
        let attempt = previous_attempts + 1;
        state.pending.insert(
            receipt.clone(),
            Pending {
                job: job.clone(),
                attempt,
                claimed_at: now,
            },
        );
        Some(Claimed {
            job,
            receipt,
            attempt,
        })
    }

    fn finish(&self, claimed: &Claimed, reason: Option<&str>, filed: usize) -> Finish {
        let mut state = self.state.lock();
        let dedupe = &claimed.job.dedupe;
        if let Some(attached) = state.callbacks.get(dedupe) {
            if attached.len() > filed {
                return Finish::Unfiled(attached.clone());
            }
        }
        state.pending.remove(&claimed.receipt);
        if let Some(reason) = reason {
            if state.dead.len() as u64 >= self.dead_letter_max {
                state.dead.pop_front();
            }
            state
                .dead
                .push_back((claimed.job.clone(), reason.to_string()));
        }
        if state
            .inflight
            .get(dedupe)
            .is_some_and(|(id, _)| *id == claimed.job.id)
        {
            state.inflight.remove(dedupe);
        }
        state.callbacks.remove(dedupe);
        Finish::Done
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn enqueue_marked(
        &self,
        job: &Job,
        callback: Option<&str>,
        marker: Option<&ExpiringMarker>,
    ) -> Result<bool> {
        debug_assert!(marker.is_none(), "an in-memory index keeps its own marks");
        let fresh = {
            let mut state = self.state.lock();
            if let Some(url) = callback {
                let attached = state.callbacks.entry(job.dedupe.clone()).or_default();
                // Once, as `enqueue.lua` does.
                if !attached.iter().any(|a| a == url) {
                    attached.push(url.to_string());
                }
            }
            let now = Instant::now();
            let in_flight = state
                .inflight
                .get(&job.dedupe)
                .is_some_and(|(_, expires)| *expires > now);
            if in_flight {
                false
            } else {
                state.inflight.insert(
                    job.dedupe.clone(),
                    (job.id.clone(), now + self.inflight_ttl),
                );
                match job.priority {
                    Priority::Urgent => state.urgent.push_back((job.clone(), 0)),
                    Priority::Preheat => state.preheat.push_back((job.clone(), 0)),
                }
                true
            }
        };
        if fresh {
            self.ready.notify_one();
        }
        Ok(fresh)
    }

    async fn claim(&self, _consumer: &str, wait: Duration) -> Result<Option<Claimed>> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before looking, so a notify between look and wait is kept.
            let notified = self.ready.notified();
            if let Some(claimed) = self.try_claim() {
                return Ok(Some(claimed));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Wake for new work, in time to reclaim stale work, or when a
            // backing-off job is due.
            let mut nap = left.min(self.visibility_timeout);
            if let Some(due) = self.state.lock().next_due() {
                nap = nap.min(due.saturating_duration_since(Instant::now()));
            }
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn complete(&self, claimed: &Claimed, filed: usize) -> Result<Finish> {
        Ok(self.finish(claimed, None, filed))
    }

    async fn dead_letter(&self, claimed: &Claimed, reason: &str, filed: usize) -> Result<Finish> {
        Ok(self.finish(claimed, Some(reason), filed))
    }

    async fn hold(&self, claimed: &Claimed, _consumer: &str) -> Result<bool> {
        let mut state = self.state.lock();
        Ok(match state.pending.get_mut(&claimed.receipt) {
            Some(pending) => {
                pending.claimed_at = Instant::now();
                true
            }
            None => false,
        })
    }

    async fn retry_later(&self, claimed: &Claimed, delay: Duration) -> Result<()> {
        let mut state = self.state.lock();
        if state.pending.remove(&claimed.receipt).is_none() {
            return Ok(()); // Reclaimed meanwhile: the other holder retries it.
        }
        let due = Instant::now() + delay;
        if let Some((id, expires)) = state.inflight.get_mut(&claimed.job.dedupe) {
            if *id == claimed.job.id {
                *expires = (*expires).max(due + self.inflight_ttl);
            }
        }
        state
            .delayed
            .push((due, claimed.job.clone(), claimed.attempt));
        Ok(())
    }

    async fn depths(&self) -> Result<Depths> {
        let state = self.state.lock();
        Ok(Depths {
            urgent: state.urgent.len() as u64,
            preheat: state.preheat.len() as u64,
            delayed: state.delayed.len() as u64,
            dead: state.dead.len() as u64,
        })
    }

    /// A waiting job counts in its stream's length and lag, a claimed one
    /// in its length and pending, as with Redis streams.
    async fn streams(&self) -> Result<Vec<StreamStats>> {
        let state = self.state.lock();
        let claimed = |priority| {
            state
                .pending
                .values()
                .filter(|p| p.job.priority == priority)
                .count() as u64
        };
        let (urgent_claimed, preheat_claimed) =
            (claimed(Priority::Urgent), claimed(Priority::Preheat));
        let depths = Depths {
            urgent: state.urgent.len() as u64 + urgent_claimed,
            preheat: state.preheat.len() as u64 + preheat_claimed,
            delayed: state.delayed.len() as u64,
            dead: state.dead.len() as u64,
        };
        Ok(depths.streams([
            (state.urgent.len() as u64, urgent_claimed),
            (state.preheat.len() as u64, preheat_claimed),
        ]))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
