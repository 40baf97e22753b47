//! The last good snapshot on disk (`--state-dir`).
//!
//! One file, `<state-dir>/snapshot.json`, holding the canonical bytes the
//! syncer sent (`Snapshot::encode`), written after the snapshot was applied
//! and before it is ACKed. Writes are atomic: a temporary file in the same
//! directory, fsynced, renamed over the old one, then the directory fsynced,
//! so a crash leaves either the old snapshot or the new one, never half.
//!
//! At start, [`load`] reads it back through the same strict
//! `Snapshot::decode` the syncer's snapshots go through, and refuses one
//! for another cluster. It does not decide when to use it (the caller
//! does: at start, before the syncer answers).

use std::path::{Path, PathBuf};

use meshfed_policy::Snapshot;

/// The file name inside the state directory.
pub const SNAPSHOT_FILE: &str = "snapshot.json";

/// Why the persisted snapshot cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "cannot {what} {path}: {source}; hint: the state directory must be writable by the gateway and on a disk with room"
    )]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable snapshot ({reason}); it is ignored and the gateway waits for the syncer (delete the file to silence this)"
    )]
    Invalid { path: String, reason: String },
}

/// The snapshot file of `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

/// Writes `canonical` (a snapshot's canonical bytes) atomically. Blocking:
/// call it from `spawn_blocking`.
pub fn save(dir: &Path, canonical: &[u8]) -> Result<(), PersistError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source| PersistError::Io { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    meshfed_cli::fs::write_atomic(&path(dir), canonical).map_err(|e| PersistError::Io {
        what: e.step,
        path: e.path.display().to_string(),
        source: e.source,
    })?;
    Ok(())
}

/// Reads the persisted snapshot of `dir`, if there is one, checked for
/// `cluster`. Blocking.
pub fn load(dir: &Path, cluster: &str) -> Result<Option<Snapshot>, PersistError> {
    let file = path(dir);
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PersistError::Io {
                what: "read",
                path: file.display().to_string(),
                source,
            });
        }
    };
    let invalid = |reason: String| PersistError::Invalid {
        path: file.display().to_string(),
        reason,
    };
    let snap = Snapshot::decode(&bytes).map_err(|e| invalid(e.to_string()))?;
    if snap.policy.cluster != cluster {
        return Err(invalid(format!(
            "it is cluster `{}`'s, and this gateway is in `{cluster}`",
            snap.policy.cluster
        )));
    }
    Ok(Some(snap))
}

#[cfg(test)]
mod tests {
    use meshfed_policy::snapshot::ClusterPolicy;

    use super::*;

    fn snap(cluster: &str, version: &str) -> Snapshot {
        Snapshot::new(
            version,
            ClusterPolicy {
                cluster: cluster.into(),
                domain: "cluster.local".into(),
                trust_domain: "cluster.local".into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_saved_snapshot_loads_back_and_replaces_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(load(&state, "east").unwrap().is_none());
        save(&state, &snap("east", "v1").encode()).unwrap();
        save(&state, &snap("east", "v2").encode()).unwrap();
        let back = load(&state, "east").unwrap().unwrap();
        assert_eq!(back.version, "v2");
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [SNAPSHOT_FILE], "no temporary file is left behind");
    }

    #[test]
    fn another_clusters_or_a_damaged_snapshot_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &snap("west", "v1").encode()).unwrap();
        let e = load(dir.path(), "east").unwrap_err().to_string();
        assert!(
            e.contains("cluster `west`") && e.contains(SNAPSHOT_FILE),
            "{e}"
        );
        save(dir.path(), b"{\"schema\":1,").unwrap();
        let e = load(dir.path(), "east").unwrap_err().to_string();
        assert!(e.contains("not a usable snapshot"), "{e}");
    }
}
