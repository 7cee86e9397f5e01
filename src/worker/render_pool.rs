//! The render pool: `imaging.render_threads` long-lived threads that run a
//! worker's CPU work (decode, render, encode, previews), one job each at a
//! time. Long-lived on purpose: each thread's malloc arena keeps the pages
//! of the big pixel buffers from one job to the next. On tokio's blocking
//! pool renders hopped across many threads (file writes run there too), and
//! a profile of the worker showed every buffer faulted in and zeroed afresh.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crossbeam_channel::Sender;
use tokio::sync::oneshot;

use crate::error::{Error, Result};

type Task = Box<dyn FnOnce() + Send>;

pub struct RenderPool {
    tasks: Sender<Task>,
}

impl RenderPool {
    /// Starts `threads` threads at `nice` (`imaging.render_nice`); they end
    /// when the pool is dropped.
    pub fn new(threads: usize, nice: i32) -> std::io::Result<RenderPool> {
        let (tasks, queue) = crossbeam_channel::unbounded::<Task>();
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("kiln-render-{n}"))
                .spawn(move || {
                    lower_priority(nice);
                    for task in queue {
                        task();
                    }
                })?;
        }
        Ok(RenderPool { tasks })
    }

    /// Runs `work` on the next free render thread, after the work queued
    /// before it. A panic inside it (a codec bug) becomes this job's error;
    /// the thread lives on.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let task: Task = Box::new(move || {
            // The job may have been dropped meanwhile (shutdown): nobody to tell.
            let _ = reply.send(catch_unwind(AssertUnwindSafe(work)));
        });
        self.tasks.send(task).map_err(|_| Error::ShuttingDown)?;
        match answer.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => Err(Error::RenderPanicked(panic_message(panic))),
            Err(_) => Err(Error::ShuttingDown),
        }
    }
}

/// Sets the calling thread's nice value: on Linux each thread has its
/// own, so the process's other threads keep theirs. Renders still run if
/// this fails, only without yielding the core to the front first.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(None, nice) {
        tracing::warn!(error = %e, nice, "could not lower the render thread's priority");
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_codec_fails_its_job_only() {
        let pool = RenderPool::new(1, 0).unwrap();
        let err = pool
            .run(|| -> Result<()> { panic!("codec bug") })
            .await
            .unwrap_err();
        assert_eq!(err.code(), "render-panicked");
        assert!(err.to_string().contains("codec bug"), "{err}");
        assert!(!err.is_retryable());
        // The one thread survived and still works.
        assert_eq!(pool.run(|| Ok(7)).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn work_runs_on_the_pools_own_long_lived_threads() {
        let pool = RenderPool::new(2, 0).unwrap();
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let name = pool
                .run(|| Ok(std::thread::current().name().unwrap_or("").to_string()))
                .await
                .unwrap();
            names.insert(name);
        }
        assert!(!names.is_empty() && names.len() <= 2, "{names:?}");
        assert!(
            names.iter().all(|n| n.starts_with("kiln-render-")),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn renders_run_at_the_configured_nice_and_the_caller_keeps_its_own() {
        let own = rustix::process::getpriority_process(None).unwrap();
        // Above the caller's: raising a nice value needs no privilege.
        let lower = (own + 3).min(19);
        assert_ne!(lower, own, "the test runs at nice 19 already");
        let pool = RenderPool::new(2, lower).unwrap();
        for _ in 0..4 {
            let nice = pool
                .run(|| Ok(rustix::process::getpriority_process(None).unwrap()))
                .await
                .unwrap();
            assert_eq!(nice, lower);
        }
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), own);
    }
}
