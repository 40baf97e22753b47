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

use std::path::PathBuf;

#[path = "../fuzz/checks.rs"]
mod checks;

#[path = "support/fuzz_replay.rs"]
mod fuzz_replay;

use fuzz_replay::{assert_no_failures, replay};

/// The files directly in `policy/fuzz/<dir>`, sorted.
fn inputs(dir: &str) -> Vec<PathBuf> {
    fuzz_replay::inputs(&fuzz_replay::fuzz_dir(env!("CARGO_MANIFEST_DIR")), dir)
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
