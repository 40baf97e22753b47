//! Helpers for meshfed's cross-process integration tests (see README.md for
//! which test style to use when).
//!
//! - [`bin`] finds a workspace binary (`meshfed-policy`, `meshfed-gateway`,
//!   `meshfed-syncer`) as cargo built it;
//! - [`run`] runs a command to completion under a deadline and keeps its
//!   output as text, so a failed assertion can show everything;
//! - [`eventually`], [`assert_eventually`] and [`wait_for`] wait on a
//!   condition with a deadline scaled by `MESHFED_TEST_PATIENCE`. Tests never
//!   synchronize with a fixed sleep;
//! - [`load`] is an open-loop, fixed-rate HTTP/1.1, HTTP/2 and gRPC load
//!   generator (also the `meshfed-load` binary);
//! - [`relay`] is a user-space link impairment relay (UDP and TCP: loss,
//!   delay, jitter, reordering, outages), since `tc netem` is unavailable;
//! - [`syncer`] runs the real `meshfed-syncer` against a Git repository made
//!   with the `git` CLI, with lightweight in-process config subscribers;
//! - [`fake_kube`] is a fake Kubernetes API server at the HTTP level (the
//!   suite's one fake: no real API server can run here);
//! - [`soak`] is the soak's echo backend, stream fleet and `/proc`
//!   readings;
//! - [`cgroup`] runs a binary under a memory limit (the shipped ones);
//! - [`bench`] is the benchmark harness's scenarios (the `meshfed-bench`
//!   binary).
//!
//! The waiting helpers block the calling thread; async variants come with
//! the first tests that run the data plane on tokio.

#![forbid(unsafe_code)]

pub mod bench;
pub mod cgroup;
pub mod fake_kube;
pub mod federation;
pub mod kube;
pub mod load;
pub mod netns;
pub mod probe;
pub mod relay;
pub mod soak;
pub mod syncer;

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Environment variable naming the directory that holds the binaries under
/// test, e.g. `target/release` to run the suite against a release build.
pub const BIN_DIR_ENV: &str = "MESHFED_BIN_DIR";

/// Environment variable with a multiplier for every deadline in the suite
/// (default 1.0), e.g. `MESHFED_TEST_PATIENCE=5` on a slow or busy machine.
pub const PATIENCE_ENV: &str = "MESHFED_TEST_PATIENCE";

/// How long [`run`] lets a process take before it kills it, before scaling.
pub const DEFAULT_RUN_DEADLINE: Duration = Duration::from_secs(60);

/// Returns the path of the workspace binary `name`.
///
/// It looks in `$MESHFED_BIN_DIR` if that is set, and otherwise beside the
/// running test executable: cargo puts test executables in
/// `<target>/<profile>/deps/` and binaries in `<target>/<profile>/`, so this
/// works for any profile and for a `CARGO_TARGET_DIR` outside the repository.
///
/// Cargo builds a package's binaries for `cargo test` only when that package
/// has integration tests of its own (`policy/tests/`, `gateway/tests/`,
/// `syncer/tests/` exist partly for this), so `cargo test --workspace` and
/// `cargo nextest run --workspace` build them all. With `-p meshfed-tests`
/// they build none, and the binaries found may be missing or stale: run
/// `cargo build --workspace --bins` first.
///
/// # Panics
///
/// If the binary is not there; the message names the path and the fix. Use
/// [`locate`] to get the error instead.
///
/// ```no_run
/// let policy = meshfed_tests::bin("meshfed-policy");
/// let status = std::process::Command::new(policy).arg("--help").status();
/// ```
pub fn bin(name: &str) -> PathBuf {
    match locate(name) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`bin`], but returns an error instead of panicking.
///
/// `MESHFED_BIN_DIR`, when set, is authoritative: a binary missing there is an
/// error rather than a reason to fall back to the build beside the test,
/// which would quietly test a different build than the one asked for.
pub fn locate(name: &str) -> Result<PathBuf, BinError> {
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let (dir, origin) = match std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => (PathBuf::from(dir), Origin::Env),
        None => (build_dir()?, Origin::BesideTest),
    };
    let path = dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(BinError::Missing { path, origin })
    }
}

/// The directory cargo puts binaries in, found from the running test
/// executable: `<target>/<profile>/deps/<test>` → `<target>/<profile>`.
fn build_dir() -> Result<PathBuf, BinError> {
    let exe = std::env::current_exe().map_err(BinError::CurrentExe)?;
    let dir = exe
        .parent()
        .ok_or_else(|| BinError::NoBuildDir(exe.clone()))?;
    // Test executables live in deps/; examples in examples/. Anything else
    // (a binary run directly) already sits in the build directory.
    let in_subdir = matches!(
        dir.file_name().and_then(OsStr::to_str),
        Some("deps" | "examples")
    );
    let dir = if in_subdir { dir.parent() } else { Some(dir) };
    dir.map(Path::to_path_buf)
        .ok_or_else(|| BinError::NoBuildDir(exe.clone()))
}

/// Why [`locate`] found no binary.
#[derive(Debug)]
pub enum BinError {
    /// The binary is not where it should be.
    Missing { path: PathBuf, origin: Origin },
    /// The running executable's path is unknown, so the build is too.
    CurrentExe(io::Error),
    /// The running executable sits at the root of the file system.
    NoBuildDir(PathBuf),
}

/// Where [`locate`] looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// In `$MESHFED_BIN_DIR`.
    Env,
    /// In the build directory of the running test executable.
    BesideTest,
}

impl fmt::Display for BinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BinError::Missing {
                path,
                origin: Origin::Env,
            } => write!(
                f,
                "no binary at {} ({BIN_DIR_ENV} is set); build it there, or unset \
                 {BIN_DIR_ENV} to use the binaries beside the test executable",
                path.display()
            ),
            BinError::Missing {
                path,
                origin: Origin::BesideTest,
            } => write!(
                f,
                "no binary at {}; run `cargo build --workspace --bins` first (`cargo test \
                 --workspace` and `cargo nextest run --workspace` do it, `-p meshfed-tests` \
                 does not), or set {BIN_DIR_ENV} to a directory that holds it",
                path.display()
            ),
            BinError::CurrentExe(e) => write!(
                f,
                "cannot find the running test executable, so not the build beside it \
                 ({e}); set {BIN_DIR_ENV}"
            ),
            BinError::NoBuildDir(exe) => write!(
                f,
                "the test executable {} has no parent directory; set {BIN_DIR_ENV}",
                exe.display()
            ),
        }
    }
}

impl std::error::Error for BinError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BinError::CurrentExe(e) => Some(e),
            _ => None,
        }
    }
}

/// The multiplier from `MESHFED_TEST_PATIENCE` (1.0 when unset).
///
/// # Panics
///
/// If it is set to anything but a positive number: a typo there would
/// otherwise silently change every deadline.
pub fn patience() -> f64 {
    match std::env::var(PATIENCE_ENV) {
        Err(std::env::VarError::NotPresent) => 1.0,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(p) if p.is_finite() && p > 0.0 => p,
            _ => panic!("{PATIENCE_ENV}={text:?} is not a positive number, e.g. 1.0 or 5"),
        },
        Err(std::env::VarError::NotUnicode(text)) => {
            panic!("{PATIENCE_ENV}={text:?} is not a positive number, e.g. 1.0 or 5")
        }
    }
}

/// `base` scaled by [`patience`], saturating rather than overflowing.
pub fn patient(base: Duration) -> Duration {
    Duration::try_from_secs_f64(base.as_secs_f64() * patience()).unwrap_or(Duration::MAX)
}

/// A condition that did not hold before its deadline.
#[derive(Debug)]
pub struct TimedOut {
    /// What was awaited, in words.
    pub what: String,
    /// How long it was awaited, patience included.
    pub waited: Duration,
    /// How many times the condition was checked.
    pub attempts: u32,
    /// The condition's last complaint.
    pub last: String,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} ({} checks) waiting for {}; last: {} \
             (set {PATIENCE_ENV} to scale deadlines on a slow machine)",
            self.waited, self.attempts, self.what, self.last
        )
    }
}

impl std::error::Error for TimedOut {}

/// Checks `check` until it returns `Ok`, for at most `within` scaled by
/// [`patience`]; it is always checked at least once.
///
/// Between checks it backs off from 1 ms to 50 ms: a poll interval, not a
/// guess at how long something takes.
pub fn wait_for<T, E: fmt::Display>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> Result<T, TimedOut> {
    let start = Instant::now();
    let budget = patient(within);
    // `None` (an overflowing deadline) means the caller asked to wait forever.
    let deadline = start.checked_add(budget);
    let mut pause = Duration::from_millis(1);
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let last = match check() {
            Ok(value) => return Ok(value),
            Err(e) => e.to_string(),
        };
        let now = Instant::now();
        let remaining = match deadline {
            Some(deadline) if now >= deadline => {
                return Err(TimedOut {
                    what: what.to_string(),
                    waited: now.duration_since(start),
                    attempts,
                    last,
                });
            }
            Some(deadline) => deadline - now,
            None => Duration::MAX,
        };
        thread::sleep(pause.min(remaining));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Like [`wait_for`], but panics with a message naming `what` on timeout.
pub fn eventually<T, E: fmt::Display>(
    what: &str,
    within: Duration,
    check: impl FnMut() -> Result<T, E>,
) -> T {
    match wait_for(what, within, check) {
        Ok(value) => value,
        Err(e) => panic!("{e}"),
    }
}

/// Panics unless `condition` becomes true within `within` scaled by
/// [`patience`].
pub fn assert_eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    eventually(what, within, || {
        if condition() {
            Ok(())
        } else {
            Err("still false")
        }
    });
}

/// How a finished process ended, with its output as text.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What ran, for messages.
    pub program: String,
    /// The exit code; `None` if a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            Some(code) => code.to_string(),
            None => "none (killed by a signal)".to_string(),
        };
        write!(
            f,
            "{} exited with code {code}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.program, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with no stdin, capturing its output, and kills it
/// if it takes longer than [`DEFAULT_RUN_DEADLINE`] scaled by [`patience`]:
/// a hung binary fails its test instead of hanging the suite.
pub fn run(cmd: &mut Command) -> io::Result<Outcome> {
    run_within(cmd, DEFAULT_RUN_DEADLINE)
}

/// Like [`run`], with a deadline of `within` scaled by [`patience`].
pub fn run_within(cmd: &mut Command, within: Duration) -> io::Result<Outcome> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {program}: {e}")))?;
    // Drain both pipes on their own threads, so a chatty child never blocks
    // on a full pipe while we wait for it.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let waited = wait_for(&format!("{program} to exit"), within, || {
        child.try_wait().and_then(|status| {
            status.ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "still running"))
        })
    });
    let status = match waited {
        Ok(status) => status,
        Err(timed_out) => {
            // Best effort: the process may have exited in the meantime.
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                timed_out.to_string(),
            ));
        }
    };
    Ok(Outcome {
        program,
        code: status.code(),
        stdout: join(stdout)?,
        stderr: join(stderr)?,
    })
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<io::Result<String>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    })
}

fn join(reader: Option<thread::JoinHandle<io::Result<String>>>) -> io::Result<String> {
    match reader {
        None => Ok(String::new()),
        Some(handle) => handle
            .join()
            .map_err(|_| io::Error::other("the thread reading the output panicked"))?,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

    #[test]
    fn build_dir_is_the_parent_of_deps() {
        let dir = build_dir().unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(exe.parent().unwrap().file_name().unwrap(), "deps");
        assert_eq!(Some(dir.as_path()), exe.parent().unwrap().parent());
    }

    #[test]
    fn missing_binary_error_names_the_path_and_the_fix() {
        let err = BinError::Missing {
            path: PathBuf::from("/t/debug/meshfed-nope"),
            origin: Origin::BesideTest,
        };
        let msg = err.to_string();
        assert!(msg.contains("/t/debug/meshfed-nope"), "{msg}");
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
    }

    #[test]
    fn wait_for_returns_once_the_condition_holds() {
        let calls = Cell::new(0);
        let value = wait_for("the third call", Duration::from_secs(10), || {
            calls.set(calls.get() + 1);
            if calls.get() >= 3 {
                Ok(calls.get())
            } else {
                Err("too early")
            }
        });
        assert_eq!(value.unwrap(), 3);
    }

    #[test]
    fn wait_for_reports_what_and_the_last_complaint_on_timeout() {
        let err = wait_for("godot", Duration::ZERO, || Err::<(), _>("not here")).unwrap_err();
        assert_eq!(err.attempts, 1);
        let msg = err.to_string();
        assert!(msg.contains("godot") && msg.contains("not here"), "{msg}");
    }

    #[test]
    fn run_captures_exit_code_and_output() {
        let out = run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"])).unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn run_kills_a_process_past_its_deadline() {
        let err =
            run_within(Command::new("sleep").arg("30"), Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
