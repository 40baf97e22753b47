//! The demo's child processes: where the binaries are, how they are
//! started, and how every one of them is stopped.
//!
//! Each child runs in a process group of its own, so the terminal's Ctrl-C
//! reaches only the demo, which then stops the children in order (SIGTERM
//! to each group, SIGKILL to whatever is left after a grace period). The
//! [`Supervisor`] does this on drop too, so an error or a panic anywhere in
//! the demo leaves nothing behind. Every child's PID is listed in
//! `<work>/pids` (one `PID NAME` per line) so that a test can check that.
//!
//! What this module does not cover: a demo killed with SIGKILL cannot clean
//! up, and its children keep running (`pkill -g` with the PIDs in
//! `<work>/pids` stops them).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process_group};

/// Where the workspace binaries are: beside the demo's own executable, as
/// `cargo build` puts them.
#[derive(Debug, Clone)]
pub struct Bins {
    dir: PathBuf,
}

impl Bins {
    /// The directory of the running executable; every binary the demo needs
    /// must be there.
    pub fn beside_me() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the demo's own executable")?;
        let dir = exe
            .parent()
            .context("the demo's executable has no directory")?
            .to_path_buf();
        let bins = Bins { dir };
        if !bins.missing().is_empty() {
            bins.build_with_cargo()?;
        }
        let missing = bins.missing();
        if !missing.is_empty() {
            bail!(
                "{} not found in {} (the demo runs the binaries built beside it); \
                 run `cargo build --release` (or `cargo build` for the debug demo) in the \
                 repository first, then start the demo again",
                missing.join(", "),
                bins.dir.display()
            );
        }
        Ok(bins)
    }

    fn missing(&self) -> Vec<String> {
        [
            "meshfed-gateway",
            "meshfed-syncer",
            "meshfed-policy",
            "meshfed-backend",
        ]
        .iter()
        .filter(|b| !self.path(b).is_file())
        .map(|b| b.to_string())
        .collect()
    }

    /// Under `cargo run` (which builds only this package), builds the
    /// workspace's other binaries into the same profile directory, so that
    /// `cargo run --release --bin meshfed-demo` is the whole set-up.
    fn build_with_cargo(&self) -> anyhow::Result<()> {
        let (Some(cargo), Some(manifest)) = (
            std::env::var_os("CARGO"),
            std::env::var_os("CARGO_MANIFEST_DIR"),
        ) else {
            return Ok(());
        };
        if std::env::var("CARGO_PKG_NAME").as_deref() != Ok("meshfed-examples") {
            return Ok(());
        }
        let profile = match self.dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(p) => p.to_string(),
            None => return Ok(()),
        };
        let workspace = Path::new(&manifest).join("..").join("Cargo.toml");
        println!(
            "meshfed-demo: building the gateway, syncer, policy and backend binaries \
             (cargo build --profile {profile} --workspace --bins)..."
        );
        let status = Command::new(cargo)
            .args(["build", "--profile", &profile, "--workspace", "--bins"])
            .arg("--manifest-path")
            .arg(&workspace)
            .status()
            .context("running cargo build for the other binaries")?;
        if !status.success() {
            bail!("cargo build --profile {profile} --workspace --bins failed ({status})");
        }
        Ok(())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    pub fn command(&self, name: &str) -> Command {
        Command::new(self.path(name))
    }
}

/// One supervised child.
#[derive(Debug)]
struct Entry {
    name: String,
    child: Child,
}

/// Owns every long-running child of the demo.
#[derive(Debug)]
pub struct Supervisor {
    pids_file: PathBuf,
    children: Mutex<Vec<Entry>>,
    /// Every PID ever started, for `<work>/pids`.
    started: Mutex<Vec<(u32, String)>>,
}

impl Supervisor {
    pub fn new(work: &Path) -> Self {
        Supervisor {
            pids_file: work.join("pids"),
            children: Mutex::new(Vec::new()),
            started: Mutex::new(Vec::new()),
        }
    }

    /// Starts `cmd` as `name` in a process group of its own, with stdin
    /// closed, stderr appended to `log` and stdout piped (returned, for
    /// children that print their address) or discarded.
    pub fn spawn(
        &self,
        name: &str,
        mut cmd: Command,
        log: &Path,
        capture_stdout: bool,
    ) -> anyhow::Result<Option<BufReader<std::process::ChildStdout>>> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stderr(log_file)
            .stdout(if capture_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let stdout = child.stdout.take().map(BufReader::new);
        let pid = child.id();
        lock(&self.children).push(Entry {
            name: name.to_string(),
            child,
        });
        let mut started = lock(&self.started);
        started.push((pid, name.to_string()));
        let text: String = started.iter().map(|(p, n)| format!("{p} {n}\n")).collect();
        std::fs::write(&self.pids_file, text)
            .with_context(|| format!("writing {}", self.pids_file.display()))?;
        Ok(stdout)
    }

    /// Whether `name` is still running; its exit status if it is not.
    pub fn exited(&self, name: &str) -> Option<std::process::ExitStatus> {
        let mut children = lock(&self.children);
        let e = children.iter_mut().find(|e| e.name == name)?;
        e.child.try_wait().ok().flatten()
    }

    /// SIGKILLs `name`'s process group at once (a crash, not a shutdown)
    /// and reaps it.
    pub fn kill(&self, name: &str) {
        let mut children = lock(&self.children);
        if let Some(i) = children.iter().position(|e| e.name == name) {
            let mut e = children.remove(i);
            signal_group(&e.child, Signal::KILL);
            let _ = e.child.kill();
            let _ = e.child.wait();
        }
    }

    /// Stops every child: SIGTERM to each group, then SIGKILL after `grace`
    /// to whatever is still running. Idempotent.
    pub fn shutdown(&self, grace: Duration) {
        let mut children = lock(&self.children);
        for e in children.iter() {
            signal_group(&e.child, Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && children
                .iter_mut()
                .any(|e| matches!(e.child.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for mut e in children.drain(..) {
            if matches!(e.child.try_wait(), Ok(None)) {
                signal_group(&e.child, Signal::KILL);
                let _ = e.child.kill();
            }
            let _ = e.child.wait();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(3));
    }
}

/// Signals the child's whole process group (it leads one: `process_group(0)`).
fn signal_group(child: &Child, signal: Signal) {
    if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
        // ESRCH (already gone) is fine.
        let _ = kill_process_group(pid, signal);
    }
}

/// A poisoned lock only means another thread panicked while holding it; the
/// list of children is still right, and shutting them down matters more.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the first line a child prints (e.g. its bound address), giving up
/// after `within`.
pub fn first_line(
    stdout: BufReader<std::process::ChildStdout>,
    within: Duration,
    what: &str,
) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut line = String::new();
        let res = stdout.read_line(&mut line).map(|_| line);
        let _ = tx.send(res);
        // Keep reading so the child never blocks on a full pipe.
        let mut sink = String::new();
        while matches!(stdout.read_line(&mut sink), Ok(n) if n > 0) {
            sink.clear();
        }
    });
    match rx.recv_timeout(within) {
        Ok(Ok(line)) if !line.trim().is_empty() => Ok(line.trim().to_string()),
        Ok(Ok(_)) => bail!("{what} exited before printing its address"),
        Ok(Err(e)) => bail!("reading {what}'s output: {e}"),
        Err(_) => bail!("{what} printed nothing within {within:?}"),
    }
}
