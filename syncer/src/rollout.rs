//! The contract between the pipeline and the config server.
//!
//! The pipeline publishes one [`Published`] per accepted commit: every
//! cluster's snapshot at once, so a subscriber never sees cluster A at one
//! commit and cluster B at another within the same publication. The config
//! server ([`crate::server`]) streams from a `watch` of it and reports what
//! each gateway does into a [`Rollout`], which the status API
//! ([`crate::status`]) reads.
//!
//! `Rollout` is the single source of truth for "which gateway applied what":
//! the server writes it, the status API and `status --wait` read it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use meshfed_policy::Snapshot;

/// One accepted commit, compiled for every cluster of the federation.
#[derive(Debug, Clone)]
pub struct Published {
    /// The commit SHA (40 hex digits); also every snapshot's `version`.
    pub commit: String,
    /// When the pipeline started on this commit (fetch start), for the
    /// propagation histogram.
    pub fetched_at: Instant,
    /// Per cluster: the snapshot and its canonical encoding (sent as is).
    pub clusters: BTreeMap<String, ClusterSnapshot>,
}

/// A cluster's snapshot with its wire encoding computed once.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    pub snapshot: Arc<Snapshot>,
    pub encoded: Arc<[u8]>,
}

impl ClusterSnapshot {
    pub fn new(snapshot: Snapshot) -> Self {
        let encoded = snapshot.encode().into();
        Self {
            snapshot: Arc::new(snapshot),
            encoded,
        }
    }
}

/// What the syncer knows about one gateway.
#[derive(Debug, Clone)]
pub struct GatewayRecord {
    pub cluster: String,
    pub gateway_id: String,
    /// The verified SPIFFE ID of its client certificate.
    pub identity: String,
    pub peer_addr: Option<SocketAddr>,
    pub connected: bool,
    /// Last time anything arrived from it (hello, ACK, NACK, keep-alive), or
    /// when it disconnected.
    pub last_seen: SystemTime,
    /// The version it last ACKed (or reported as applied in its hello).
    pub applied: Option<String>,
    pub acked_at: Option<SystemTime>,
    /// The last NACK: (version, reason). Cleared by a later ACK.
    pub nack: Option<(String, String)>,
}

/// Rollout tracking, shared by the server (writer) and the status API
/// (reader). Cheap to clone; all methods take `&self`.
#[derive(Debug, Clone, Default)]
pub struct Rollout {
    inner: Arc<Mutex<BTreeMap<(String, String), GatewayRecord>>>,
}

impl Rollout {
    pub fn new() -> Self {
        Self::default()
    }

    /// A gateway said hello on a verified stream.
    pub fn connected(
        &self,
        cluster: &str,
        gateway_id: &str,
        identity: &str,
        peer_addr: Option<SocketAddr>,
        applied: Option<String>,
    ) {
        let mut m = self.lock();
        let r = m
            .entry((cluster.to_string(), gateway_id.to_string()))
            .or_insert_with(|| GatewayRecord {
                cluster: cluster.to_string(),
                gateway_id: gateway_id.to_string(),
                identity: identity.to_string(),
                peer_addr,
                connected: true,
                last_seen: SystemTime::now(),
                applied: None,
                acked_at: None,
                nack: None,
            });
        r.identity = identity.to_string();
        r.peer_addr = peer_addr;
        r.connected = true;
        r.last_seen = SystemTime::now();
        if applied.is_some() {
            r.applied = applied;
        }
    }

    pub fn acked(&self, cluster: &str, gateway_id: &str, version: &str) {
        self.update(cluster, gateway_id, |r| {
            r.applied = Some(version.to_string());
            r.acked_at = Some(SystemTime::now());
            r.nack = None;
        });
    }

    pub fn nacked(&self, cluster: &str, gateway_id: &str, version: &str, reason: &str) {
        self.update(cluster, gateway_id, |r| {
            r.nack = Some((version.to_string(), reason.to_string()));
        });
    }

    /// Any sign of life (keep-alive) from a connected gateway.
    pub fn seen(&self, cluster: &str, gateway_id: &str) {
        self.update(cluster, gateway_id, |_| {});
    }

    pub fn disconnected(&self, cluster: &str, gateway_id: &str) {
        self.update(cluster, gateway_id, |r| r.connected = false);
    }

    /// One gateway's record.
    pub fn get(&self, cluster: &str, gateway_id: &str) -> Option<GatewayRecord> {
        self.lock()
            .get(&(cluster.to_string(), gateway_id.to_string()))
            .cloned()
    }

    /// Every gateway ever seen, in (cluster, id) order.
    pub fn gateways(&self) -> Vec<GatewayRecord> {
        self.lock().values().cloned().collect()
    }

    fn update(&self, cluster: &str, gateway_id: &str, f: impl FnOnce(&mut GatewayRecord)) {
        if let Some(r) = self
            .lock()
            .get_mut(&(cluster.to_string(), gateway_id.to_string()))
        {
            r.last_seen = SystemTime::now();
            f(r);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), GatewayRecord>> {
        // A panic while holding this lock cannot leave a record half-written
        // in a way that matters: every update is a few field stores.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
