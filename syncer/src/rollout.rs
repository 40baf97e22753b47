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
//! Records are bound to the certificate that made them
//! ([`Rollout::admit`]): a record belongs to the SPIFFE ID of the gateway
//! that first subscribed with its (cluster, id), and no other certificate
//! may take it over while it is known; one certificate (shared by a
//! Deployment's replicas) holds at most [`Admission::max_ids_per_identity`]
//! ids, so a certificate cannot flood the records with phantom gateways.
//! "Applied" comes only from an ACK on the gateway's current stream: a new
//! stream starts with nothing applied, whatever its Hello says.
//!
//! A gateway that drains says goodbye on its stream ([`Rollout::retire`]):
//! its record is marked as left and no longer counts, at once, instead of
//! staying pending for the known window (a Kubernetes rollout brings new
//! pod names, so the old ids never come back). Records of gateways not
//! seen for `--forget-gateways-after` are removed ([`Rollout::prune`]),
//! from memory and from `gateways.json`, so the records do not grow with
//! every rollout.
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
    /// Set when the gateway said goodbye (it drained): the record no longer
    /// counts for rollouts. Cleared when it subscribes again. Absent in
    /// records written by older syncers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<Departure>,
}

impl GatewayRecord {
    /// Whether it counts for rollouts now: connected, or seen within the
    /// known window and not gone with a goodbye.
    pub fn is_known(&self, window: Duration, now: SystemTime) -> bool {
        self.connected
            || (self.left.is_none()
                && now
                    .duration_since(self.last_seen)
                    .map_or(true, |age| age <= window))
    }
}

/// A gateway's goodbye.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub at: SystemTime,
    /// What the gateway gave as its reason (cut to [`MAX_GOODBYE_REASON`]).
    pub reason: String,
}

/// A goodbye's reason is cut to this many bytes: it is for people.
pub const MAX_GOODBYE_REASON: usize = 256;

/// How long a record of a gateway not seen is kept by default
/// (`--forget-gateways-after`).
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How many gateway ids one certificate may hold by default: a Deployment's
/// replicas share one certificate, and rolling restarts bring new pod names
/// while the old ones are still known.
pub const DEFAULT_MAX_IDS_PER_IDENTITY: usize = 16;

/// The rules [`Rollout::admit`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// Most gateway ids recorded for one certificate identity.
    pub max_ids_per_identity: usize,
    /// A disconnected record older than this is forgotten (the status API's
    /// known window): it no longer counts, and may be taken over.
    pub known_window: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_ids_per_identity: DEFAULT_MAX_IDS_PER_IDENTITY,
            known_window: Duration::from_secs(600),
        }
    }
}

/// Why a subscription does not get a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error(
        "gateway id `{gateway_id}` in cluster `{cluster}` belongs to {holder}; {identity} cannot \
         speak for it (give each gateway its own --gateway-id; a gateway that is gone for good is \
         forgotten after the syncer's --known-window)"
    )]
    Taken {
        cluster: String,
        gateway_id: String,
        holder: String,
        identity: String,
    },
    #[error(
        "{identity} already holds {max} connected gateway ids ({ids}); refusing `{gateway_id}` \
         (give replicas their own certificates, or raise --max-gateways-per-identity)"
    )]
    TooMany {
        identity: String,
        gateway_id: String,
        max: usize,
        ids: String,
    },
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
        meshfed_cli::fs::write_atomic(&store.path, &bytes)?;
        Ok(())
    }

    fn changed(&self) {
        if let Some(store) = &self.store {
            store.changed.notify_one();
        }
    }

    /// A gateway said hello on a verified stream whose certificate is
    /// `identity`: its record is (re)opened, bound to `identity`, with
    /// nothing applied until it ACKs on this stream. Refused when the
    /// (cluster, id) belongs to another known certificate, or when
    /// `identity` already holds `max_ids_per_identity` connected ids; to
    /// make room, its oldest disconnected record is dropped. Returns the
    /// ids dropped.
    pub fn admit(
        &self,
        cluster: &str,
        gateway_id: &str,
        identity: &str,
        peer_addr: Option<SocketAddr>,
        rules: &Admission,
    ) -> Result<Vec<String>, AdmitError> {
        let now = SystemTime::now();
        let forgotten = |r: &GatewayRecord| {
            !r.connected
                && now
                    .duration_since(r.last_seen)
                    .is_ok_and(|age| age > rules.known_window)
        };
        let key = (cluster.to_string(), gateway_id.to_string());
        let mut m = self.lock();
        let mut dropped = Vec::new();
        if let Some(r) = m.get(&key)
            && r.identity != identity
        {
            if !forgotten(r) {
                return Err(AdmitError::Taken {
                    cluster: cluster.to_string(),
                    gateway_id: gateway_id.to_string(),
                    holder: r.identity.clone(),
                    identity: identity.to_string(),
                });
            }
            m.remove(&key);
            dropped.push(gateway_id.to_string());
        }
        if !m.contains_key(&key) {
            // This identity's forgotten records go first, then, if it is
            // still at its bound, its longest-disconnected one.
            let mine: Vec<(String, String)> = m
                .iter()
                .filter(|(_, r)| r.identity == identity)
                .map(|(k, _)| k.clone())
                .collect();
            let mut held = mine.len();
            for k in &mine {
                if m.get(k).is_some_and(forgotten) {
                    m.remove(k);
                    dropped.push(k.1.clone());
                    held -= 1;
                }
            }
            if held >= rules.max_ids_per_identity.max(1) {
                let oldest = m
                    .iter()
                    .filter(|(_, r)| r.identity == identity && !r.connected)
                    .min_by_key(|(_, r)| r.last_seen)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => {
                        m.remove(&k);
                        dropped.push(k.1);
                    }
                    None => {
                        let ids: Vec<String> = m
                            .values()
                            .filter(|r| r.identity == identity)
                            .map(|r| r.gateway_id.clone())
                            .take(5)
                            .collect();
                        drop(m);
                        if !dropped.is_empty() {
                            self.changed();
                        }
                        return Err(AdmitError::TooMany {
                            identity: identity.to_string(),
                            gateway_id: gateway_id.to_string(),
                            max: rules.max_ids_per_identity,
                            ids: format!("{}, …", ids.join(", ")),
                        });
                    }
                }
            }
        }
        let r = m.entry(key).or_insert_with(|| GatewayRecord {
            cluster: cluster.to_string(),
            gateway_id: gateway_id.to_string(),
            identity: identity.to_string(),
            peer_addr,
            connected: true,
            last_seen: now,
            applied: None,
            acked_at: None,
            nack: None,
            left: None,
        });
        r.identity = identity.to_string();
        r.peer_addr = peer_addr;
        r.connected = true;
        r.last_seen = now;
        // Only an ACK on this stream says what it applies now.
        r.applied = None;
        r.acked_at = None;
        r.nack = None;
        // Known again after a goodbye.
        r.left = None;
        drop(m);
        self.changed();
        Ok(dropped)
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

    /// The gateway said goodbye on its last open stream, whose certificate
    /// is `identity`: its record is marked as left (disconnected, no longer
    /// counted by the status API) now. Only the certificate that holds the
    /// record may retire it: returns false, and changes nothing, for any
    /// other identity or an unknown record.
    pub fn retire(&self, cluster: &str, gateway_id: &str, identity: &str, reason: &str) -> bool {
        let now = SystemTime::now();
        let mut m = self.lock();
        let Some(r) = m.get_mut(&(cluster.to_string(), gateway_id.to_string())) else {
            return false;
        };
        if r.identity != identity {
            return false;
        }
        r.connected = false;
        r.last_seen = now;
        r.left = Some(Departure {
            at: now,
            reason: cut(reason, MAX_GOODBYE_REASON),
        });
        drop(m);
        self.changed();
        true
    }

    /// Removes the records of gateways not connected and not seen for
    /// longer than `after` (`--forget-gateways-after`); returns their
    /// `cluster/id`. A connected gateway's record is never removed.
    pub fn prune(&self, after: Duration) -> Vec<String> {
        let now = SystemTime::now();
        let mut gone = Vec::new();
        self.lock().retain(|_, r| {
            let stale =
                !r.connected && now.duration_since(r.last_seen).is_ok_and(|age| age > after);
            if stale {
                gone.push(format!("{}/{}", r.cluster, r.gateway_id));
            }
            !stale
        });
        if !gone.is_empty() {
            self.changed();
        }
        gone
    }

    /// Prunes every `after / 4` (at least every 100 ms, at most every
    /// minute) until the task is dropped, logging what it removes.
    pub async fn keep_pruned(self, after: Duration) {
        let every = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        loop {
            let gone = self.prune(after);
            if !gone.is_empty() {
                tracing::info!(
                    gateways = %gone.join(", "), after = ?after,
                    "forgot the records of gateways gone longer than --forget-gateways-after"
                );
            }
            tokio::time::sleep(every).await;
        }
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

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
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
        let rules = Admission::default();
        r.admit("east", "gw-0", "spiffe://x/east/gw-0", None, &rules)
            .unwrap();
        r.acked("east", "gw-0", "c1");
        r.admit("west", "gw-0", "spiffe://x/west/gw-0", None, &rules)
            .unwrap();
        r.acked("west", "gw-0", "c0");
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

    /// Item 11 of issue 21: another certificate of the cluster cannot take
    /// over a known gateway's record, connected or not.
    #[test]
    fn a_record_belongs_to_its_certificate_while_it_is_known() {
        let r = Rollout::new();
        let rules = Admission::default();
        r.admit("east", "gw-0", "spiffe://td/a", None, &rules)
            .unwrap();
        r.acked("east", "gw-0", "c1");
        r.disconnected("east", "gw-0");
        let e = r
            .admit("east", "gw-0", "spiffe://td/b", None, &rules)
            .unwrap_err();
        assert!(matches!(e, AdmitError::Taken { .. }), "{e}");
        assert!(e.to_string().contains("spiffe://td/a"), "{e}");
        let rec = r.get("east", "gw-0").unwrap();
        assert_eq!(rec.identity, "spiffe://td/a");
        assert!(!rec.connected, "the refused stream must not look connected");

        // Forgotten (disconnected past the known window): it may be reused.
        let short = Admission {
            known_window: Duration::ZERO,
            ..rules
        };
        std::thread::sleep(Duration::from_millis(5));
        r.admit("east", "gw-0", "spiffe://td/b", None, &short)
            .unwrap();
        assert_eq!(r.get("east", "gw-0").unwrap().identity, "spiffe://td/b");
    }

    /// Item 11 of issue 21: a new stream has applied nothing until it ACKs.
    #[test]
    fn a_reconnect_starts_with_nothing_applied() {
        let r = Rollout::new();
        let rules = Admission::default();
        r.admit("east", "gw-0", "spiffe://td/a", None, &rules)
            .unwrap();
        r.acked("east", "gw-0", "c1");
        r.admit("east", "gw-0", "spiffe://td/a", None, &rules)
            .unwrap();
        assert_eq!(r.get("east", "gw-0").unwrap().applied, None);
    }

    /// Item 11 of issue 21: 2,000 phantom ids from one certificate leave at
    /// most the bound in the records; connected ones are never dropped.
    #[test]
    fn one_certificate_holds_at_most_its_bound_of_gateway_ids() {
        let r = Rollout::new();
        let rules = Admission {
            max_ids_per_identity: 4,
            ..Admission::default()
        };
        for i in 0..2000 {
            let id = format!("phantom-{i}");
            r.admit("east", &id, "spiffe://td/x", None, &rules).unwrap();
            r.disconnected("east", &id);
        }
        assert_eq!(r.gateways().len(), 4);
        assert!(r.get("east", "phantom-1999").is_some());

        let live = Rollout::new();
        for i in 0..4 {
            live.admit("east", &format!("gw-{i}"), "spiffe://td/x", None, &rules)
                .unwrap();
        }
        let e = live
            .admit("east", "gw-4", "spiffe://td/x", None, &rules)
            .unwrap_err();
        assert!(matches!(e, AdmitError::TooMany { max: 4, .. }), "{e}");
        assert_eq!(live.gateways().len(), 4);
        assert!(live.gateways().iter().all(|g| g.connected));
        // Another certificate is not affected.
        live.admit("east", "gw-4", "spiffe://td/y", None, &rules)
            .unwrap();
    }

    /// Issue 22, item 9: only the certificate holding a record retires it;
    /// a retired record comes back on a new subscription.
    #[test]
    fn a_goodbye_retires_only_a_record_its_certificate_holds() {
        let r = Rollout::new();
        let rules = Admission::default();
        r.admit("east", "gw-0", "spiffe://td/a", None, &rules)
            .unwrap();
        assert!(!r.retire("east", "gw-0", "spiffe://td/b", "forged"));
        assert!(!r.retire("west", "gw-0", "spiffe://td/a", "other cluster"));
        let rec = r.get("east", "gw-0").unwrap();
        assert!(rec.connected && rec.left.is_none(), "{rec:?}");

        assert!(r.retire("east", "gw-0", "spiffe://td/a", &"x".repeat(1000)));
        let rec = r.get("east", "gw-0").unwrap();
        assert!(!rec.connected);
        assert_eq!(rec.left.as_ref().unwrap().reason.len(), MAX_GOODBYE_REASON);

        r.admit("east", "gw-0", "spiffe://td/a", None, &rules)
            .unwrap();
        let rec = r.get("east", "gw-0").unwrap();
        assert!(rec.connected && rec.left.is_none(), "known again: {rec:?}");
    }

    /// Issue 22, item 9: records gone longer than the limit are removed,
    /// from the file too; connected ones stay whatever their age.
    #[test]
    fn prune_removes_only_records_gone_longer_than_the_limit_and_the_file_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Rollout::persistent(dir.path());
        let rules = Admission::default();
        for id in ["gone", "live"] {
            r.admit("east", id, "spiffe://td/a", None, &rules).unwrap();
        }
        r.disconnected("east", "gone");
        assert!(r.prune(Duration::from_secs(3600)).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.prune(Duration::from_millis(10)), vec!["east/gone"]);
        assert!(r.get("east", "gone").is_none());
        assert!(r.get("east", "live").is_some(), "connected: never pruned");
        r.save().unwrap();
        let (back, _) = Rollout::persistent(dir.path());
        let ids: Vec<String> = back.gateways().into_iter().map(|g| g.gateway_id).collect();
        assert_eq!(ids, vec!["live"]);
    }

    #[test]
    fn records_written_before_goodbyes_existed_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"gateways":[{"cluster":"east","gateway_id":"gw-0","identity":"spiffe://td/a",
            "peer_addr":null,"connected":false,"last_seen":{"secs_since_epoch":1,"nanos_since_epoch":0},
            "applied":"c1","acked_at":null,"nack":null}]}"#;
        std::fs::write(dir.path().join(RECORDS_FILE), old).unwrap();
        let (r, problem) = Rollout::persistent(dir.path());
        assert_eq!(problem, None);
        assert!(r.get("east", "gw-0").unwrap().left.is_none());
    }

    #[test]
    fn an_unreadable_records_file_is_reported_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORDS_FILE), b"{not json").unwrap();
        let (r, problem) = Rollout::persistent(dir.path());
        assert!(problem.unwrap().contains(RECORDS_FILE));
        assert!(r.gateways().is_empty());
        r.admit("east", "gw-0", "id", None, &Admission::default())
            .unwrap();
        r.save().unwrap();
        assert_eq!(Rollout::persistent(dir.path()).0.gateways().len(), 1);
    }
}
