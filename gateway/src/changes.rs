//! When to re-check a file input: on a change the kernel reports, not on a
//! clock.
//!
//! The gateway follows three inputs on disk: the policy directory
//! (`--policy-dir`, [`crate::control`]), the endpoints file
//! (`--discovery-file`, [`crate::discovery::static_file`]) and the
//! certificate directory (`--tls-dir`, [`crate::run`] through
//! `identity::store`). Each has a thread of its own that blocks in
//! [`Changes::wait`] until a check is due, then does the same validated
//! load as before. A check is due:
//! - when inotify reports a change in a watched directory, after
//!   [`SETTLE`] without further events (one check for an editor's burst of
//!   writes). The directories are watched, not only the files, so a
//!   rename onto a file (editors that write a temporary file and rename it,
//!   `kubectl`'s ConfigMap and Secret volumes, which swap a `..data`
//!   symlink by rename) is seen;
//! - every [`SAFETY`] whatever happened, against missed events: an
//!   overflowed event queue, a network file system that reports nothing,
//!   a directory replaced above the watched path;
//! - every [`POLL`] instead, when inotify cannot be set up (the kernel's
//!   `max_user_watches` or `max_user_instances` reached, a file system
//!   without inotify): the old polling, said once at warn with the reason.
//!
//! After each wake the watches are placed anew (directories come and go,
//! symlinks change targets) before the caller checks, so a change made in
//! between is seen by that check. Every check is counted in
//! `meshfed_config_source_checks_total{source}` ([`ChangeMetrics`]): idle,
//! it moves once per [`SAFETY`].
//!
//! This module decides when to look; it neither reads nor validates what
//! it watches (its callers do).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::inotify;

/// How often an input is checked when inotify cannot be used.
pub const POLL: Duration = Duration::from_secs(1);
/// How often an input is checked even when no event came: the bound on how
/// long a missed event can leave a change unapplied.
pub const SAFETY: Duration = Duration::from_secs(30);
/// Quiet time after an event before the check, so that a burst of writes
/// (an editor's save, a volume update) gives one check.
pub const SETTLE: Duration = Duration::from_millis(50);
/// Longest wait for quiet: a writer that never stops is still checked.
const MAX_SETTLE: Duration = Duration::from_secs(1);
/// Most directories watched for one input; a larger tree is polled.
pub const MAX_WATCHES: usize = 1024;

/// The inputs, as the `source` label says them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `--policy-dir`.
    PolicyDir,
    /// `--discovery-file`.
    EndpointsFile,
    /// `--tls-dir`.
    TlsDir,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::PolicyDir => "policy_dir",
            Source::EndpointsFile => "endpoints_file",
            Source::TlsDir => "tls_dir",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// Checks of each input since start (`meshfed_config_source_checks_total`).
static CHECKS: LazyLock<Family<SourceLabels, Counter>> = LazyLock::new(Default::default);

/// Counts one check of `source` (for a caller that checks again by itself,
/// e.g. to confirm an invalid set it has just seen).
pub fn count_check(source: Source) {
    CHECKS
        .get_or_create(&SourceLabels {
            source: source.label(),
        })
        .inc();
}

/// Checks of `source` so far.
pub fn checks(source: Source) -> u64 {
    CHECKS
        .get_or_create(&SourceLabels {
            source: source.label(),
        })
        .get()
}

/// Registers `meshfed_config_source_checks_total`.
#[derive(Debug)]
pub struct ChangeMetrics;

impl crate::metrics::Register for ChangeMetrics {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "config_source_checks",
            "Checks of a file input (policy_dir, endpoints_file, tls_dir) for changes since \
             start: on an inotify event, every 30 s regardless, or every second when inotify \
             is unavailable",
            CHECKS.clone(),
        );
    }
}

/// Why [`Changes::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// inotify reported a change.
    Event,
    /// [`SAFETY`] passed without one.
    Safety,
    /// Polling ([`POLL`]): inotify is unavailable.
    Poll,
    /// The first wait, right after the watches were placed: a change made
    /// between the caller's first read and the watches is checked now, not
    /// at the next [`SAFETY`] check.
    Armed,
}

/// What to watch, computed anew at every wake: directories (watched for
/// entries created, removed, renamed, written or changed) and files
/// (followed through symlinks, for an in-place write to a target outside
/// the directories). A path that does not exist is skipped.
pub type Targets = Box<dyn Fn() -> Vec<PathBuf> + Send>;

/// A blocking change detector for one input. Use it on a thread of its
/// own: [`Changes::wait`] blocks.
pub struct Changes {
    source: Source,
    targets: Targets,
    /// The armed inotify instance, or why there is none.
    armed: Result<OwnedFd, String>,
    /// The reason polling was last announced, so it is said once.
    warned: Option<String>,
    since: Instant,
    /// Whether [`Changes::wait`] has returned yet.
    started: bool,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("source", &self.source)
            .field("armed", &self.armed.is_ok())
            .finish()
    }
}

impl Changes {
    /// Watches what `targets` names; falls back to polling (said at warn)
    /// when inotify cannot be set up.
    pub fn new(source: Source, targets: Targets) -> Self {
        // The series exists from the start, at 0, so "no check" shows.
        let _ = checks(source);
        let mut c = Changes {
            source,
            targets,
            armed: Err(String::new()),
            warned: None,
            since: Instant::now(),
            started: false,
        };
        c.rearm();
        c
    }

    /// Whether inotify is in use (`false`: polling every [`POLL`]).
    pub fn is_watching(&self) -> bool {
        self.armed.is_ok()
    }

    /// Blocks until a check is due, counts it and says why.
    pub fn wait(&mut self) -> Wake {
        if !self.started {
            self.started = true;
            count_check(self.source);
            return Wake::Armed;
        }
        let wake = self.next();
        self.rearm();
        self.since = Instant::now();
        count_check(self.source);
        wake
    }

    fn next(&mut self) -> Wake {
        let Ok(fd) = &self.armed else {
            std::thread::sleep(POLL);
            return Wake::Poll;
        };
        let left = SAFETY.saturating_sub(self.since.elapsed());
        match readable(fd, left) {
            Ok(false) => Wake::Safety,
            Ok(true) => {
                // Drain, then wait for quiet (bounded), so one burst of
                // writes is one check.
                let start = Instant::now();
                loop {
                    drain(fd);
                    let left = MAX_SETTLE.saturating_sub(start.elapsed());
                    if left.is_zero() || !matches!(readable(fd, SETTLE.min(left)), Ok(true)) {
                        break;
                    }
                }
                Wake::Event
            }
            Err(e) => {
                // Not expected from poll(2) on an inotify descriptor; do
                // not spin on it: poll the files from now on.
                self.armed = Err(format!("waiting on inotify failed: {e}"));
                std::thread::sleep(POLL);
                Wake::Poll
            }
        }
    }

    /// Places the watches anew on a fresh inotify instance (the old one,
    /// with watches on replaced directories, is closed).
    fn rearm(&mut self) {
        self.armed = arm(&(self.targets)());
        match (&self.armed, &self.warned) {
            (Err(reason), warned) if warned.as_ref() != Some(reason) => {
                tracing::warn!(
                    source = self.source.label(),
                    %reason,
                    "cannot watch for changes with inotify; checking every second instead \
                     (raise fs.inotify.max_user_watches or max_user_instances if they are reached)"
                );
                self.warned = Some(reason.clone());
            }
            (Ok(_), Some(_)) => {
                tracing::info!(
                    source = self.source.label(),
                    "watching for changes with inotify again; no longer checking every second"
                );
                self.warned = None;
            }
            _ => {}
        }
    }
}

/// A thread of its own that sends `()` each time a check of `source` is
/// due, for a caller that reads on the runtime's blocking pool
/// (`identity::store::watch_on`). Wakes that come while one is queued
/// merge into it. The thread ends at the first wake after the receiver is
/// gone.
pub fn spawn_wakes(
    source: Source,
    targets: Targets,
) -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name(format!("{}-watch", source.label().replace('_', "-")))
        .spawn(move || {
            let mut changes = Changes::new(source, targets);
            loop {
                changes.wait();
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// An inotify instance watching `targets`.
fn arm(targets: &[PathBuf]) -> Result<OwnedFd, String> {
    if targets.len() > MAX_WATCHES {
        return Err(format!(
            "{} directories to watch, over the limit of {MAX_WATCHES}",
            targets.len()
        ));
    }
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .map_err(|e| format!("inotify_init1: {e}"))?;
    let mask = inotify::WatchFlags::CLOSE_WRITE
        | inotify::WatchFlags::CREATE
        | inotify::WatchFlags::DELETE
        | inotify::WatchFlags::MOVED_FROM
        | inotify::WatchFlags::MOVED_TO
        | inotify::WatchFlags::ATTRIB
        | inotify::WatchFlags::DELETE_SELF
        | inotify::WatchFlags::MOVE_SELF;
    let mut placed = 0;
    for path in targets {
        match inotify::add_watch(&fd, path.as_path(), mask) {
            Ok(_) => placed += 1,
            // Gone (or not yet there): the next wake places it again.
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => {}
            Err(e) => return Err(format!("watching {}: {e}", path.display())),
        }
    }
    if placed == 0 {
        return Err(format!(
            "none of {} exists to watch",
            targets
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(fd)
}

/// Whether `fd` has events within `timeout`.
fn readable(fd: &OwnedFd, timeout: Duration) -> rustix::io::Result<bool> {
    let ts = Timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    };
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads every queued event; what they say does not matter, only that
/// something changed (the caller compares what it loads).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = rustix::io::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests;
