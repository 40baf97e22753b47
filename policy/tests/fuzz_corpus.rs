//! Replays the committed fuzz corpus through the fuzz targets' own checks, on
//! stable, in a plain `cargo test` (no nightly, no sanitizers, no libFuzzer).
//!
//! - `policy/fuzz/corpus/<target>/`: the minimized corpus of each target;
//! - `policy/fuzz/regressions/<target>/`: inputs that once crashed, hung or
//!   ran out of memory under the fuzzer, kept out of the fuzzing corpus so
//!   that they cannot stop a fuzzing run at start-up.
//!
//! The checks are not copied here: `policy/fuzz/checks.rs` is compiled into
//! this test and into the fuzz targets alike, so CI checks every committed
//! input exactly as the fuzzer did. A check fails by panicking; each input
//! runs under `catch_unwind`, so one run names every failing file. There is
//! no time limit here (a wall-clock assertion would be flaky on a loaded CI
//! machine): a hang shows up as a test that does not finish.
//!
//! See docs/fuzzing.md.

use std::panic;
use std::path::{Path, PathBuf};

#[path = "../fuzz/checks.rs"]
mod checks;

/// The files directly in `policy/fuzz/<dir>`, sorted; none if the directory
/// does not exist.
fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file and returns one line per failure.
fn replay(files: &[PathBuf], check: fn(&[u8])) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) => {
                failures.push(format!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        if let Err(payload) = panic::catch_unwind(|| check(&bytes)) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    failures
}

fn assert_no_failures(what: &str, count: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {count} {what} input(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn load_corpus() {
    let files = inputs("corpus/load");
    assert!(
        !files.is_empty(),
        "policy/fuzz/corpus/load is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_load);
    assert_no_failures("load corpus", files.len(), &failures);
}

#[test]
fn snapshot_decode_corpus() {
    let files = inputs("corpus/snapshot_decode");
    assert!(
        !files.is_empty(),
        "policy/fuzz/corpus/snapshot_decode is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_snapshot_decode);
    assert_no_failures("snapshot_decode corpus", files.len(), &failures);
}

/// Past findings. This directory may be empty once findings are fixed and
/// moved into the corpus, so no non-empty assertion here.
#[test]
fn load_regressions() {
    let files = inputs("regressions/load");
    let failures = replay(&files, checks::check_load);
    assert_no_failures("load regression", files.len(), &failures);
}

#[test]
fn snapshot_decode_regressions() {
    let files = inputs("regressions/snapshot_decode");
    let failures = replay(&files, checks::check_snapshot_decode);
    assert_no_failures("snapshot_decode regression", files.len(), &failures);
}
