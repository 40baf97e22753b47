//! A memory-limited cgroup for one process under test: the shipped limits of
//! `deploy/` (128 MiB per gateway, 512 MiB for the syncer) applied to the real
//! binary, so that "it survives under the limit" is a fact the kernel
//! enforces, not an estimate.
//!
//! Linux cgroup v1 (`/sys/fs/cgroup/memory`, this machine kind) or v2 (a
//! `memory` controller in `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`). The
//! tests run as root; a test that needs a cgroup and cannot make one fails
//! and says why, as the netns tests do.
//!
//! A process joins the cgroup through [`MemoryCgroup::prefix`]: a shell that
//! writes its own pid into the cgroup and then `exec`s the binary, so the
//! child's pid is the binary's (signals reach it) and no allocation happens
//! outside the limit. It fits [`crate::federation::Launch::prefix`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The gateway's memory limit in `deploy/base/gateway.yaml`.
pub const GATEWAY_LIMIT: u64 = 128 << 20;
/// The syncer's memory limit in `deploy/base/syncer.yaml`.
pub const SYNCER_LIMIT: u64 = 512 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A memory cgroup, removed on drop (its processes are killed first).
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    version: Version,
}

impl MemoryCgroup {
    /// Makes a new cgroup limited to `limit` bytes of memory, swap included.
    pub fn new(name: &str, limit: u64) -> io::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let leaf = format!(
            "meshfed-test-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let (root, version) = root()?;
        let dir = root.join(leaf);
        fs::create_dir(&dir).map_err(|e| annotate(e, &dir, "creating cgroup"))?;
        let cg = MemoryCgroup { dir, version };
        match version {
            Version::V1 => {
                cg.write("memory.limit_in_bytes", &limit.to_string())?;
                // Swap counts too, where the kernel accounts it.
                let _ = cg.write("memory.memsw.limit_in_bytes", &limit.to_string());
            }
            Version::V2 => {
                cg.write("memory.max", &limit.to_string())?;
                let _ = cg.write("memory.swap.max", "0");
            }
        }
        Ok(cg)
    }

    /// Like [`MemoryCgroup::new`], panicking with the reason when the
    /// machine cannot make one (the test cannot check what it claims).
    pub fn require(name: &str, limit: u64) -> Self {
        Self::new(name, limit).unwrap_or_else(|e| {
            panic!("this test needs a memory cgroup (root, cgroup v1 or v2 memory controller): {e}")
        })
    }

    /// A command prefix that runs the following program inside this cgroup:
    /// `sh -c 'echo $$ > …/cgroup.procs && exec "$0" "$@"'`.
    pub fn prefix(&self) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        vec![
            "sh".into(),
            "-c".into(),
            format!("echo $$ > '{}' && exec \"$0\" \"$@\"", procs.display()),
        ]
    }

    /// How many times the kernel's OOM killer ran in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill"),
            Version::V2 => ("memory.events", "oom_kill"),
        };
        fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok()).flatten()
                })
            })
            .unwrap_or(0)
    }

    /// The memory charged to the cgroup now, in bytes.
    pub fn usage(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        self.read_u64(file).unwrap_or(0)
    }

    /// The highest memory charged to the cgroup so far, in bytes (v2 kernels
    /// before 5.19 lack `memory.peak`: then the current usage).
    pub fn peak(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        self.read_u64(file).unwrap_or_else(|| self.usage())
    }

    /// The pids in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|e| annotate(e, &path, "writing"))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // The kernel refuses to remove a cgroup until its last process is
        // reaped; give it a moment.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn root() -> io::Result<(PathBuf, Version)> {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        return Ok((v1.to_path_buf(), Version::V1));
    }
    for dir in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let dir = Path::new(dir);
        let controllers = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory");
            return Ok((dir.to_path_buf(), Version::V2));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup memory controller at /sys/fs/cgroup/memory (v1) or in /sys/fs/cgroup (v2)",
    ))
}

fn annotate(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The limit is real: a process that allocates past it is OOM-killed
    /// and counted, and one under it is not.
    #[test]
    fn a_process_over_the_limit_is_oom_killed_and_counted() {
        let cg = MemoryCgroup::require("selftest", 32 << 20);
        let mut over = Command::new(&cg.prefix()[0]);
        over.args(&cg.prefix()[1..])
            .args(["python3", "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"]);
        let status = over.status().expect("running python3");
        assert!(!status.success(), "allocating 200 MiB under 32 MiB succeeded");
        assert!(cg.oom_kills() >= 1, "no OOM kill counted");

        let cg = MemoryCgroup::require("selftest-ok", 64 << 20);
        let mut under = Command::new(&cg.prefix()[0]);
        under.args(&cg.prefix()[1..]).args(["python3", "-c", "b = bytearray(1 << 20)"]);
        assert!(under.status().expect("running python3").success());
        assert_eq!(cg.oom_kills(), 0);
        assert!(cg.peak() > 0);
    }
}
