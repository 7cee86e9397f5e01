//! A gate that held requests wait at until the test opens it. It opens once
//! and for good; a gate that is never opened stalls its requests forever.
//!
//! Owns nothing but a `watch` channel; clones share the same gate.

use std::sync::Arc;

use tokio::sync::watch;

/// Holds requests (origin answers, callback answers) until opened.
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    /// A gate that holds everything until [`Gate::open`].
    pub fn closed() -> Gate {
        Gate(Arc::new(watch::Sender::new(false)))
    }

    /// Lets every held and later request through.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`Gate::open`] was called.
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the gate is open (at once if it already is).
    pub async fn passed(&self) {
        let mut open = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close under us.
        let _ = open.wait_for(|open| *open).await;
    }
}
