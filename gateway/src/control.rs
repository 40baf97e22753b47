//! Where snapshots come from.
//!
//! File mode (`--policy-dir DIR`): the gateway reads the policy repository
//! itself, validates and compiles it for its cluster with the
//! `meshfed-policy` crate, and applies it by atomic swap; then it checks the
//! directory every second and does the same on every change. A bad edit is
//! refused and logged with its diagnostics (FILE:LINE), and the previous
//! snapshot stays.
//!
//! The syncer client (the config delivery issue) will plug into the same
//! [`Gateway::apply`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::{Options, Snapshot, analyze};

use crate::state::Gateway;

/// How often the policy directory is checked.
pub const POLL: Duration = Duration::from_secs(1);

/// Why a policy directory gave no snapshot.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy in {dir} is invalid ({count} error(s)):\n{diagnostics}")]
    Invalid {
        dir: String,
        count: usize,
        diagnostics: String,
    },
    #[error("policy in {dir}: {reason}")]
    Compile { dir: String, reason: String },
}

/// Loads, validates and compiles `dir` for `cluster`. The version is
/// `file-<content hash prefix>`.
pub fn load_dir(dir: &Path, cluster: &str, opts: &Options) -> Result<Snapshot, PolicyError> {
    let (files, io) = read_paths(&[dir.to_path_buf()], &Selection::default());
    let mut a = analyze(files, opts);
    a.diagnostics.extend(io);
    if !a.is_valid() {
        let errors: Vec<String> = a
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| d.to_string())
            .collect();
        return Err(PolicyError::Invalid {
            dir: dir.display().to_string(),
            count: errors.len(),
            diagnostics: errors.join("\n"),
        });
    }
    let snap = a
        .compile(cluster, "pending", opts)
        .map_err(|e| PolicyError::Compile {
            dir: dir.display().to_string(),
            reason: e.to_string(),
        })?;
    let short = snap
        .content_hash
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect::<String>();
    let mut snap = snap;
    snap.version = format!("file-{short}");
    Ok(snap)
}

/// Follows `dir`: every change is loaded and applied, or refused and logged.
pub fn watch_dir(state: Arc<Gateway>, dir: PathBuf, opts: Options) {
    tokio::spawn(async move {
        let mut last = fingerprint(&dir);
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = fingerprint(&dir);
            if now == last {
                continue;
            }
            last = now;
            let (dir2, cluster, opts2) = (dir.clone(), state.cluster.clone(), opts.clone());
            let loaded =
                tokio::task::spawn_blocking(move || load_dir(&dir2, &cluster, &opts2)).await;
            match loaded {
                Ok(Ok(snap)) => {
                    let current = state.active.load();
                    if current.snapshot.content_hash == snap.content_hash {
                        continue;
                    }
                    let version = snap.version.clone();
                    match state.apply(Arc::new(snap)) {
                        Ok(()) => tracing::info!(%version, "policy reloaded from the directory"),
                        Err(e) => {
                            tracing::error!(%version, error = %e, "policy refused; keeping the previous snapshot")
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "policy edit refused; keeping the previous snapshot");
                }
                Err(e) => tracing::error!(error = %e, "policy loader failed"),
            }
        }
    });
}

/// A cheap change detector for a directory: every YAML file's name and
/// bytes, hashed. Reading the files is what loading costs anyway, and it
/// sees a Kubernetes ConfigMap's `..data` symlink swap.
fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let (files, io) = read_paths(&[dir.to_path_buf()], &Selection::default());
    let mut h = DefaultHasher::new();
    for (name, bytes) in files {
        name.hash(&mut h);
        bytes.hash(&mut h);
    }
    io.len().hash(&mut h);
    h.finish()
}
