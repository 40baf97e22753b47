//! The retry budget (Envoy's): retries in flight stay under 20% of
//! requests in flight, with at least 3 always allowed, so that retries
//! cannot multiply an outage.
//!
//! Counters only, in the base layer: the shared state ([`crate::state`])
//! holds one, and the outbound plan's execution ([`crate::proxy::plan`],
//! [`crate::proxy::outbound`]) takes its slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Requests and retries in flight.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: Arc<AtomicI64>,
    retries: Arc<AtomicI64>,
}

impl RetryBudget {
    /// Counts a request in flight until the slot drops.
    pub fn request(&self) -> Slot {
        Slot::new(self.requests.clone())
    }

    /// A retry, if the budget allows one; counted in flight until the slot
    /// drops.
    pub fn retry(&self) -> Option<Slot> {
        let requests = self.requests.load(Ordering::Relaxed);
        let allowed = (requests / 5).max(3);
        if self.retries.load(Ordering::Relaxed) >= allowed {
            return None;
        }
        Some(Slot::new(self.retries.clone()))
    }
}

/// A counted thing in flight; uncounted on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicI64>);

impl Slot {
    fn new(c: Arc<AtomicI64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Slot(c)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
