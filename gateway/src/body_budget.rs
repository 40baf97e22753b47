//! The budget of request bodies in flight from peers: how many streams
//! whose request body has started and not ended this gateway forwards to
//! its endpoints at once, per peer and in all.
//!
//! A body in flight costs memory here for as long as it lasts (its stream's
//! read buffer, the chunk the endpoint's connection is writing, the
//! endpoint connection itself), and a peer decides how long that is: a
//! body that never ends, to an endpoint that never reads it, lasts
//! forever. Without a budget, one authenticated peer with 10,000 such
//! bodies took a gateway past its 128 MiB limit in seconds (RELIABILITY.md,
//! "Hostile network"). With it, a body past the budget is refused at once
//! with `Overloaded` (a `503` at the source, counted
//! `meshfed_refusals_total{stage="stream",reason="body-limit"}`), which
//! keeps legitimate traffic flowing and never hangs a request: the source
//! may retry elsewhere. A request whose stream ended with its head
//! (bodiless) takes no place; any other takes one from its head until its
//! body ends, including one whose first byte has not arrived yet (it would
//! hold an endpoint connection just the same).
//!
//! The budget is per peer certificate (its SPIFFE ID, so several
//! connections of one peer share it), and gateway-wide, so that two
//! hostile peers together still fit the memory limit. It does not own the
//! per-stream buffering ([`crate::body::TunnelBody`] bounds that).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Request bodies of one peer in flight at once, unless
/// `--max-peer-request-bodies` says otherwise.
///
/// Sized for the shipped 128 MiB limit: a stalled body costs about 60 KB
/// here (its stream, a 16 KiB read buffer and chunk, the endpoint
/// connection; measured: 1,000 held took a gateway from 21 to 79 MiB), so
/// 512 are about 30 MB, on top of the burst of the peer's streams
/// ([`crate::tunnel::link::MAX_STREAMS_PER_PEER`]).
pub const DEFAULT_PEER_BODIES: usize = 512;

/// Request bodies in flight from all peers at once, unless
/// `--max-request-bodies` says otherwise: two peers' worth, about 60 MB at
/// worst, so that two hostile peers' bodies together fit.
pub const DEFAULT_BODIES: usize = 1_024;

/// Why a body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error(
        "the peer has {limit} request bodies in flight here already \
         (--max-peer-request-bodies); retry once some finish"
    )]
    Peer { limit: usize },
    #[error(
        "the gateway has {limit} request bodies from peers in flight already \
         (--max-request-bodies); retry once some finish, or elsewhere"
    )]
    Total { limit: usize },
}

/// The counts and limits; cloned handles share them.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    per_peer: AtomicUsize,
    total: AtomicUsize,
    in_flight: Mutex<InFlight>,
}

#[derive(Debug, Default)]
struct InFlight {
    total: usize,
    /// Bodies per peer SPIFFE ID; a peer with none has no entry.
    peers: HashMap<Arc<str>, usize>,
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(DEFAULT_PEER_BODIES, DEFAULT_BODIES)
    }
}

impl BodyBudget {
    /// A budget of `per_peer` bodies per peer and `total` in all.
    pub fn new(per_peer: usize, total: usize) -> Self {
        BodyBudget(Arc::new(Inner {
            per_peer: AtomicUsize::new(per_peer),
            total: AtomicUsize::new(total),
            in_flight: Mutex::new(InFlight::default()),
        }))
    }

    /// Sets the limits (at start, from flags); bodies in flight keep their
    /// places.
    pub fn set_limits(&self, per_peer: usize, total: usize) {
        self.0.per_peer.store(per_peer, Ordering::Relaxed);
        self.0.total.store(total, Ordering::Relaxed);
    }

    /// A place for one body of `peer` (its SPIFFE ID), held until the
    /// permit is dropped.
    pub fn try_acquire(&self, peer: &Arc<str>) -> Result<BodyPermit, OverBudget> {
        let per_peer = self.0.per_peer.load(Ordering::Relaxed);
        let total = self.0.total.load(Ordering::Relaxed);
        // A poisoned lock only means a panic elsewhere mid-update of plain
        // counters; they stay usable.
        let mut st = self
            .0
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if st.total >= total {
            return Err(OverBudget::Total { limit: total });
        }
        let mine = st.peers.get(peer).copied().unwrap_or(0);
        if mine >= per_peer {
            return Err(OverBudget::Peer { limit: per_peer });
        }
        st.total += 1;
        st.peers.insert(peer.clone(), mine + 1);
        Ok(BodyPermit {
            budget: self.0.clone(),
            peer: peer.clone(),
        })
    }

    /// Bodies in flight now, in all.
    pub fn in_flight(&self) -> usize {
        self.0
            .in_flight
            .lock()
            .map_or_else(|p| p.into_inner().total, |st| st.total)
    }
}

/// One body's place in the budget, given back on drop.
#[derive(Debug)]
pub struct BodyPermit {
    budget: Arc<Inner>,
    peer: Arc<str>,
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        let mut st = self
            .budget
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.peers.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.peers.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_no_more_and_places_come_back_on_drop() {
        let budget = BodyBudget::new(2, 3);
        let (a, b): (Arc<str>, Arc<str>) = ("spiffe://a".into(), "spiffe://b".into());
        let a1 = budget.try_acquire(&a).unwrap();
        let _a2 = budget.try_acquire(&a).unwrap();
        assert_eq!(
            budget.try_acquire(&a).unwrap_err(),
            OverBudget::Peer { limit: 2 }
        );
        // Another peer still gets in, up to the gateway-wide limit.
        let _b1 = budget.try_acquire(&b).unwrap();
        assert_eq!(
            budget.try_acquire(&b).unwrap_err(),
            OverBudget::Total { limit: 3 }
        );
        assert_eq!(budget.in_flight(), 3);
        drop(a1);
        assert_eq!(budget.in_flight(), 2);
        let _b2 = budget.try_acquire(&b).unwrap();
        assert!(budget.try_acquire(&a).is_err(), "the total is full again");
    }

    #[test]
    fn a_peer_with_nothing_in_flight_leaves_no_entry() {
        let budget = BodyBudget::new(10, 10);
        for i in 0..100 {
            let peer: Arc<str> = format!("spiffe://p{i}").into();
            drop(budget.try_acquire(&peer).unwrap());
        }
        let st = budget.0.in_flight.lock().unwrap();
        assert_eq!((st.total, st.peers.len()), (0, 0));
    }
}
