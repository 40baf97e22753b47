//! Where snapshots come from, and which one is applied.
//!
//! Two sources, one at a time:
//! - file mode (`--policy-dir DIR`): the gateway reads the policy repository
//!   itself, validates and compiles it for its cluster with the
//!   `meshfed-policy` crate, and applies it by atomic swap; then it checks
//!   the directory when inotify reports a change in it or a subdirectory
//!   (an editor's write-then-rename included; with the parent directory
//!   too when the path is a symlink, so a `..data` or git-sync swap is
//!   seen), every 30 s regardless against missed events, or every second
//!   where inotify is unavailable ([`changes`]), and loads it again on
//!   every change. The check looks at the policy files' names, sizes and
//!   modification times (reading only files modified in the last
//!   [`RECENT`], whose times may not yet tell two edits apart), on a thread
//!   of its own, so the runtime never waits on the disk. A bad edit is
//!   refused and logged with its diagnostics (FILE:LINE), and the previous
//!   snapshot stays.
//! - syncer mode (`--syncer ADDR`, [`syncer`]): the gateway subscribes to
//!   the syncer's config stream over mTLS, applies each snapshot it is sent
//!   and ACKs or NACKs it; with `--state-dir` ([`persist`]) it keeps the last
//!   good snapshot on disk and starts from it, so it serves without a
//!   syncer (edge sites).
//!
//! Either way a snapshot goes through [`Gateway::apply`], and
//! [`crate::state::provenance::Provenance`] records what was applied, from where and when, for
//! `/config_dump` and readiness.
//!
//! This module does not decide what a snapshot means ([`crate::route`] and
//! the data path do) nor compile policy (the `meshfed-policy` crate does).

pub mod golden;
pub mod persist;
pub mod syncer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::{Options, Snapshot, analyze};

use crate::changes::{self, Changes, Targets};
use crate::state::Gateway;
use crate::state::provenance::Source;

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
/// `file-<digest prefix>` of the directory's policy files, the same for every
/// cluster's gateway that reads the same files (as a commit SHA is), so that
/// gateways can tell whether they run the same policy.
pub fn load_dir(dir: &Path, cluster: &str, opts: &Options) -> Result<Snapshot, PolicyError> {
    let (files, io) = read_paths(&[dir.to_path_buf()], &Selection::default());
    let digest = meshfed_policy::fs::digest_files(dir, &files);
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
    let short: String = digest.chars().take(12).collect();
    let mut snap = snap;
    snap.version = format!("file-{short}");
    Ok(snap)
}

/// Follows `dir`: every change is loaded and applied, or refused and logged.
///
/// A thread of its own (`policy-watch`) checks the directory when
/// [`Changes`] says so (an inotify event, the 30 s safety check, or the
/// 1 s poll without inotify) and, on a change, loads and compiles it
/// there; the runtime only applies the result ([`Gateway::apply`], itself
/// off the runtime thread for its compilation). The thread ends at the
/// first check after the gateway is gone.
pub fn watch_dir(state: Arc<Gateway>, dir: PathBuf, opts: Options) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Snapshot, PolicyError>>(1);
    let (dir2, cluster) = (dir.clone(), state.cluster.clone());
    let spawned = std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            // Watching starts before the first look, so that a change
            // made in between is not missed.
            let mut changes = Changes::new(changes::Source::PolicyDir, policy_targets(&dir2));
            let mut last = fingerprint(&dir2);
            loop {
                changes.wait();
                if tx.is_closed() {
                    return;
                }
                let now = fingerprint(&dir2);
                if now == last {
                    continue;
                }
                last = now;
                if tx.blocking_send(load_dir(&dir2, &cluster, &opts)).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, dir = %dir.display(), "cannot start the policy directory watcher; policy edits will not be followed");
        return;
    }
    tokio::spawn(async move {
        while let Some(loaded) = rx.recv().await {
            match loaded {
                Ok(snap) => {
                    let current = state.active.load();
                    if current.snapshot.content_hash == snap.content_hash {
                        continue;
                    }
                    let version = snap.version.clone();
                    let snap = Arc::new(snap);
                    match state.apply(snap.clone()).await {
                        Ok(()) => {
                            state.provenance.applied(
                                &snap,
                                Source::File {
                                    dir: dir.display().to_string(),
                                },
                            );
                            tracing::info!(%version, "policy reloaded from the directory")
                        }
                        Err(e) => {
                            tracing::error!(%version, error = %e, "policy refused; keeping the previous snapshot")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy edit refused; keeping the previous snapshot");
                }
            }
        }
    });
}

/// What to watch for `dir`: it and its subdirectories as loading walks
/// them (hidden ones skipped, symlinks not followed), and its parent when
/// `dir` itself is a symlink, whose swap by rename (a ConfigMap's `..data`,
/// git-sync's worktree link) happens there.
fn policy_targets(dir: &Path) -> Targets {
    let dir = dir.to_path_buf();
    Box::new(move || {
        let mut out = Vec::new();
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => out.push(p.to_path_buf()),
                _ => out.push(PathBuf::from(".")),
            }
        }
        let walker = walkdir::WalkDir::new(&dir)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
        // One over the limit is enough for Changes to refuse (and poll).
        let dirs = walker
            .filter_map(Result::ok)
            .filter(|e| e.depth() == 0 || e.file_type().is_dir())
            .map(|e| e.into_path())
            .take(changes::MAX_WATCHES + 1);
        out.extend(dirs);
        out
    })
}

/// Files modified this recently are read by [`fingerprint`], not just
/// stat'ed: a file system's clock may not tell apart two writes of the
/// same size in one tick (Git's "racily clean" index entries).
pub const RECENT: Duration = Duration::from_secs(2);

/// A change detector for a directory, from metadata: every selected
/// file's path, size, modification time and inode (and the bytes of those
/// modified within [`RECENT`]), hashed. It walks the directory as
/// [`read_paths`] does, so it sees what loading would read, and a
/// Kubernetes ConfigMap's `..data` symlink swap (the files' metadata, read
/// through the links, changes). Blocks: call it off the runtime thread.
fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let sel = Selection::default();
    let mut h = DefaultHasher::new();
    let now = SystemTime::now();
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walker {
        let Ok(e) = entry else {
            // An unreadable entry: its error is part of the state.
            1u8.hash(&mut h);
            continue;
        };
        let rel = e.path().strip_prefix(dir).unwrap_or(e.path());
        // Symlinks count by their target's metadata (a ConfigMap's entries are
        // links into `..data`), as `read_paths` reads them.
        let file = e.file_type().is_file() || e.file_type().is_symlink();
        if !file || (e.depth() > 0 && !sel.selects(rel)) {
            continue;
        }
        rel.hash(&mut h);
        match std::fs::metadata(e.path()) {
            Ok(m) => {
                (
                    m.len(),
                    m.ino(),
                    m.dev(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
                    .hash(&mut h);
                let recent = m
                    .modified()
                    .map(|t| now.duration_since(t).ok().is_none_or(|age| age < RECENT))
                    .unwrap_or(true);
                if recent && m.len() <= meshfed_policy::yaml::MAX_FILE_BYTES as u64 {
                    std::fs::read(e.path()).ok().hash(&mut h);
                }
            }
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}
