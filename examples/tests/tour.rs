//! `meshfed-demo` as a user runs it: the scripted tour must pass, and
//! neither the tour's end nor Ctrl-C may leave a process behind. Real
//! binaries throughout (the demo runs the gateways, syncer and backends
//! built beside it; `cargo nextest run --workspace` builds them all).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEMO: &str = env!("CARGO_BIN_EXE_meshfed-demo");

/// Deadlines scale with `MESHFED_TEST_PATIENCE`, as in meshfed-tests.
fn patient(d: Duration) -> Duration {
    let p: f64 = std::env::var("MESHFED_TEST_PATIENCE")
        .ok()
        .and_then(|p| p.parse().ok())
        .filter(|p: &f64| *p > 0.0)
        .unwrap_or(1.0);
    d.mul_f64(p)
}

/// Checks `check` every 20 ms until it is `Ok`, panicking after `within`.
fn eventually<T, E: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + patient(within);
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to the end, killing it (SIGINT, so it cleans up) past
/// `within`.
fn run_within(cmd: &mut Command, within: Duration) -> Outcome {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + patient(within);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The PIDs the demo recorded in `<work>/pids`.
fn pids(work: &Path) -> Vec<(u32, String)> {
    std::fs::read_to_string(work.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, name) = l.split_once(' ')?;
            Some((pid.parse().ok()?, name.to_string()))
        })
        .collect()
}

/// Whether a process runs (exists and is not a zombie awaiting its reaper).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

fn assert_none_alive(work: &Path) {
    let started = pids(work);
    assert!(
        started.len() >= 14,
        "the demo started its 9 backends, the syncer and 4 gateways: {started:?}"
    );
    // Orphans would be reparented and keep running; give exits a moment.
    eventually(
        "every process the demo started to be gone",
        Duration::from_secs(5),
        || {
            let left: Vec<_> = started.iter().filter(|(p, _)| alive(*p)).collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {left:?}"))
            }
        },
    );
}

#[test]
fn serial_the_tour_passes_every_step_and_leaves_no_process_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let out = run_within(
        Command::new(DEMO)
            .args(["--tour", "--rate", "60", "--work-dir"])
            .arg(&work),
        Duration::from_secs(180),
    );
    eprintln!("{}", out.stdout);
    assert_eq!(out.code, Some(0), "{out}");
    let table: Vec<&str> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("STEP "))
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(table.len(), 7, "a header and six steps: {table:?}");
    assert!(
        table[1..].iter().all(|l| l.trim_end().ends_with("pass")),
        "{out}"
    );
    for step in [
        "1 baseline",
        "2 canary",
        "3 invalid",
        "4 west gateways killed",
        "5 west back",
        "6 bad commit rolled back",
    ] {
        assert!(table.iter().any(|l| l.starts_with(step)), "{step}: {out}");
    }
    // The rejection names its place.
    assert!(
        out.stdout.contains("reviews-canary.yaml:") && out.stdout.contains("error[weights-sum]"),
        "{out}"
    );
    // The bad commit: rolled back by the syncer at wave 1 with the gate's
    // reason; failures only for edge's callers; only edge's gateway ever
    // applied it; `status --wait` exits 1.
    let step6 = out
        .stdout
        .split("== 6.")
        .nth(1)
        .unwrap_or_else(|| panic!("no step 6: {out}"));
    for needle in [
        "syncer: rolled-back",
        "rolled back at wave 1 of 3 (edge): gate success_rate",
        "ratings",
        "(exit 1)",
        "ROLLED BACK",
        "gateways that ever applied",
    ] {
        assert!(step6.contains(needle), "{needle}: {out}");
    }
    let failed = step6
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("failed requests by the caller's cluster: ")
        })
        .unwrap_or_else(|| panic!("no failure count: {out}"));
    let count = |cluster: &str| -> usize {
        failed
            .split([',', '('])
            .find_map(|p| p.trim().strip_prefix(&format!("{cluster} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no count for {cluster} in `{failed}`"))
    };
    assert!(
        count("edge") > 0,
        "edge's callers saw the bad commit: {failed}"
    );
    assert_eq!((count("west"), count("east")), (0, 0), "{failed}");
    assert!(
        step6
            .lines()
            .any(|l| l.trim().ends_with(": edge/x1") && l.contains("gateways that ever applied")),
        "only edge applied the bad commit: {out}"
    );
    assert_none_alive(&work);
}

#[test]
fn serial_ctrl_c_stops_every_process_the_demo_started() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let log = std::fs::File::create(tmp.path().join("demo.out")).unwrap();
    let mut demo = Command::new(DEMO)
        .arg("--work-dir")
        .arg(&work)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Up: every child started and the live view running.
    eventually(
        "the demo's federation to be up",
        Duration::from_secs(60),
        || {
            if let Some(status) = demo.try_wait().unwrap() {
                panic!(
                    "the demo exited early ({status}): {}",
                    std::fs::read_to_string(tmp.path().join("demo.out")).unwrap_or_default()
                );
            }
            let out = std::fs::read_to_string(tmp.path().join("demo.out")).unwrap_or_default();
            if out.contains("Gateways:") {
                Ok(())
            } else {
                Err("no live view yet")
            }
        },
    );
    let status = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = eventually(
        "the demo to exit after SIGINT",
        Duration::from_secs(15),
        || demo.try_wait().unwrap().ok_or("still running"),
    );
    assert_eq!(code.code(), Some(130), "exit code after Ctrl-C");
    assert_none_alive(&work);
}

#[test]
fn without_the_other_binaries_the_demo_says_how_to_build_them() {
    let tmp = tempfile::tempdir().unwrap();
    let lonely = tmp.path().join("meshfed-demo");
    std::fs::copy(DEMO, &lonely).unwrap();
    // Not under `cargo run`: no building of the missing binaries.
    let out = run_within(
        Command::new(&lonely).arg("--tour").env_remove("CARGO"),
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("meshfed-gateway") && out.stderr.contains("cargo build --release"),
        "{out}"
    );
}
