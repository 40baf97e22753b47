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
//!
//! It outlives a restart of the syncer ([`Rollout::persistent`]): every
//! connect, ACK, NACK and disconnect is written to `gateways.json` in the
//! state directory, so a restarted syncer still knows which gateways a
//! rollout waits for before they reconnect, and `status --wait` does not
//! answer "all applied" for want of anyone to ask.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use meshfed_policy::Snapshot;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    store: Option<Arc<Store>>,
}

/// Where the records are kept across restarts, and the signal that they
/// changed.
#[derive(Debug)]
struct Store {
    path: PathBuf,
    changed: Notify,
    /// One writer at a time (the background saver and the final save at
    /// shutdown share the temporary file).
    writing: Mutex<()>,
}

/// The file's form.
#[derive(Serialize, Deserialize)]
struct Saved {
    gateways: Vec<GatewayRecord>,
}

/// The records file in a state directory.
pub const RECORDS_FILE: &str = "gateways.json";

impl Rollout {
    /// Tracking in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tracking kept in `state_dir/gateways.json`, starting from what it
    /// holds. A gateway that was connected when the syncer stopped counts
    /// as last seen now, so it stays known (as pending) for the known
    /// window while it reconnects. An unreadable file is reported and
    /// replaced: the records rebuild as gateways reconnect.
    pub fn persistent(state_dir: &Path) -> (Self, Option<String>) {
        let path = state_dir.join(RECORDS_FILE);
        let (records, problem) = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) => (saved.gateways, None),
                Err(e) => (
                    Vec::new(),
                    Some(format!(
                        "{}: unreadable ({e}); starting with no known gateways",
                        path.display()
                    )),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), None),
            Err(e) => (
                Vec::new(),
                Some(format!(
                    "{}: {e}; starting with no known gateways",
                    path.display()
                )),
            ),
        };
        let now = SystemTime::now();
        let map = records
            .into_iter()
            .map(|mut r| {
                if r.connected {
                    r.last_seen = now;
                }
                r.connected = false;
                ((r.cluster.clone(), r.gateway_id.clone()), r)
            })
            .collect();
        let rollout = Rollout {
            inner: Arc::new(Mutex::new(map)),
            store: Some(Arc::new(Store {
                path,
                changed: Notify::new(),
                writing: Mutex::new(()),
            })),
        };
        (rollout, problem)
    }

    /// Writes the records whenever they change, a burst of changes at
    /// once, until the task is dropped; a final [`Rollout::save`] at
    /// shutdown catches the last ones. Returns at once without a store.
    pub async fn keep_saved(self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        loop {
            store.changed.notified().await;
            // Let a burst (a commit's ACKs from every gateway) land first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.save()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(path = %store.path.display(), error = %e, "cannot save the gateway records; a restart would forget them")
                }
                Err(e) => tracing::warn!(error = %e, "saving the gateway records failed"),
            }
        }
    }

    /// Writes the records now (atomically: a crash leaves the old file or
    /// the new one).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let _one_writer = store.writing.lock().unwrap_or_else(|e| e.into_inner());
        let saved = Saved {
            gateways: self.gateways(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
        crate::pipeline::write_atomic(&store.path, &bytes)
    }

    fn changed(&self) {
        if let Some(store) = &self.store {
            store.changed.notify_one();
        }
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
        drop(m);
        self.changed();
    }

    pub fn acked(&self, cluster: &str, gateway_id: &str, version: &str) {
        self.update(cluster, gateway_id, |r| {
            r.applied = Some(version.to_string());
            r.acked_at = Some(SystemTime::now());
            r.nack = None;
        });
        self.changed();
    }

    pub fn nacked(&self, cluster: &str, gateway_id: &str, version: &str, reason: &str) {
        self.update(cluster, gateway_id, |r| {
            r.nack = Some((version.to_string(), reason.to_string()));
        });
        self.changed();
    }

    /// Any sign of life (keep-alive) from a connected gateway.
    pub fn seen(&self, cluster: &str, gateway_id: &str) {
        self.update(cluster, gateway_id, |_| {});
    }

    pub fn disconnected(&self, cluster: &str, gateway_id: &str) {
        self.update(cluster, gateway_id, |r| r.connected = false);
        self.changed();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn records_survive_a_restart_and_a_gateway_connected_at_the_stop_stays_known() {
        let dir = tempfile::tempdir().unwrap();
        let (r, problem) = Rollout::persistent(dir.path());
        assert_eq!(problem, None);
        r.connected("east", "gw-0", "spiffe://x/east/gw-0", None, None);
        r.acked("east", "gw-0", "c1");
        r.connected(
            "west",
            "gw-0",
            "spiffe://x/west/gw-0",
            None,
            Some("c0".into()),
        );
        r.nacked("west", "gw-0", "c1", "bad.yaml:3: nope");
        r.disconnected("west", "gw-0");
        let west_seen = r.get("west", "gw-0").unwrap().last_seen;
        r.save().unwrap();

        let (back, problem) = Rollout::persistent(dir.path());
        assert_eq!(problem, None);
        let east = back.get("east", "gw-0").unwrap();
        assert!(!east.connected, "nobody is connected to a fresh syncer");
        assert_eq!(east.applied.as_deref(), Some("c1"));
        assert!(east.last_seen.elapsed().unwrap() < Duration::from_secs(5));
        let west = back.get("west", "gw-0").unwrap();
        assert_eq!(west.applied.as_deref(), Some("c0"));
        assert_eq!(west.nack.as_ref().unwrap().1, "bad.yaml:3: nope");
        assert_eq!(
            west.last_seen, west_seen,
            "a disconnected one keeps its age"
        );
    }

    #[test]
    fn an_unreadable_records_file_is_reported_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORDS_FILE), b"{not json").unwrap();
        let (r, problem) = Rollout::persistent(dir.path());
        assert!(problem.unwrap().contains(RECORDS_FILE));
        assert!(r.gateways().is_empty());
        r.connected("east", "gw-0", "id", None, None);
        r.save().unwrap();
        assert_eq!(Rollout::persistent(dir.path()).0.gateways().len(), 1);
    }
}
