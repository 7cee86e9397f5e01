//! Work that holds something shared (a claimed job, a media record's lock)
//! for as long as it runs: the hold is a lease, renewed on a timer while the
//! work goes on, so work slower than the lease does not lose it.

use std::future::Future;
use std::time::Duration;

/// Runs `work`, calling `renew` every `every` while it runs (the first time
/// after one period). A renewal that fails stops the work, which is dropped,
/// and its error is the answer.
pub async fn renewing<T, E, R>(
    every: Duration,
    work: impl Future<Output = T>,
    mut renew: impl FnMut() -> R,
) -> Result<T, E>
where
    R: Future<Output = Result<(), E>>,
{
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            _ = ticks.tick() => renew().await?,
        }
    }
}
