//! What snapshot is applied, from where and when, and the syncer link's
//! state: the record `/config_dump` and readiness read.
//!
//! Kept with the state it describes, so that [`crate::state`] never
//! imports the config client ([`crate::control`]) that writes it.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use meshfed_policy::Snapshot;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where the applied snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Compiled from `--policy-dir`.
    File { dir: String },
    /// Sent by the syncer at `addr`, whose certificate carried `id`.
    Syncer { addr: String, id: String },
    /// Read at start from `--state-dir` (the last snapshot applied before).
    StateDir { path: String },
}

/// The applied snapshot's version and origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub version: String,
    pub content_hash: String,
    pub source: Source,
    /// When it was applied, in milliseconds since the Unix epoch.
    pub applied_at_unix_ms: u64,
}

/// The config client's connection to the syncer, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct SyncerLink {
    /// `host:port` given with `--syncer`.
    pub addr: String,
    /// The only SPIFFE ID accepted as the syncer.
    pub accepted_id: String,
    /// `connecting`, `connected` or `backing_off`.
    pub state: &'static str,
    /// The last failure, with its cause (no secrets: addresses and IDs only).
    pub last_error: Option<String>,
}

/// What snapshot is applied and from where, plus the syncer link's state.
/// Readiness waits on it: a gateway is ready once something is applied.
#[derive(Debug)]
pub struct Provenance {
    applied: watch::Sender<Option<Arc<Applied>>>,
    syncer: Mutex<Option<SyncerLink>>,
}

impl Default for Provenance {
    fn default() -> Self {
        Provenance {
            applied: watch::channel(None).0,
            syncer: Mutex::new(None),
        }
    }
}

impl Provenance {
    /// Records that `snapshot` from `source` is now applied.
    pub fn applied(&self, snapshot: &Snapshot, source: Source) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.applied.send_replace(Some(Arc::new(Applied {
            version: snapshot.version.clone(),
            content_hash: snapshot.content_hash.clone(),
            source,
            applied_at_unix_ms: at,
        })));
    }

    /// The applied snapshot's record; `None` until one is applied.
    pub fn current(&self) -> Option<Arc<Applied>> {
        self.applied.borrow().clone()
    }

    /// Follows [`Provenance::current`].
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Applied>>> {
        self.applied.subscribe()
    }

    /// Updates the syncer link's state.
    pub fn set_syncer(&self, link: SyncerLink) {
        *self.syncer.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
    }

    /// The syncer link's state, in syncer mode.
    pub fn syncer(&self) -> Option<SyncerLink> {
        self.syncer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For `/config_dump`: `{"applied": ..., "syncer": ...}`.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "applied": self.current().as_deref(),
            "syncer": self.syncer(),
        })
    }
}
