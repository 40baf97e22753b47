//! The properties the fuzz targets check, one function per target.
//!
//! This file is compiled twice, with `#[path]`: into the fuzz targets
//! (`fuzz_targets/*.rs`, nightly, sanitizers) and into the replay test
//! `policy/tests/fuzz_corpus.rs` (stable, plain `cargo test`). So the committed
//! corpus is checked in CI by exactly the code the fuzzer ran, with no copy to
//! drift. It may only use `std` and `meshfed_policy`, which both crates have.
//!
//! A check fails by panicking, which libFuzzer reports as a crash and the
//! test as a failure.

use meshfed_policy::{Options, Snapshot, analyze};

/// The file name the `load` input is given.
pub const FILE_NAME: &str = "fuzz.yaml";
/// The cluster compiled when the input declares none (a single-cluster mesh).
pub const DEFAULT_CLUSTER: &str = "fuzz";
/// The version stamped on every snapshot the checks compile.
pub const VERSION: &str = "fuzz-0000000";

/// `load`: the bytes are one policy file. Loading and validating must not
/// panic. If the policy is valid, every declared cluster (or
/// [`DEFAULT_CLUSTER`] if none is declared) must compile; compiling must be
/// deterministic (a second, independent analysis of the same bytes compiles
/// to identical canonical bytes); and the canonical encoding must decode back
/// to an equal snapshot that re-encodes to the same bytes.
pub fn check_load(data: &[u8]) {
    let opts = Options::default();
    let analysis = analyze([(FILE_NAME, data)], &opts);
    if !analysis.is_valid() {
        return;
    }
    // A fresh analysis, so that state hidden in the first one (hash map
    // order, caches) cannot make the two compilations agree by accident.
    let again = analyze([(FILE_NAME, data)], &opts);
    assert!(
        again.is_valid(),
        "second analysis of the same bytes is invalid"
    );
    let mut clusters: Vec<String> = analysis.clusters().into_iter().collect();
    if clusters.is_empty() {
        clusters.push(DEFAULT_CLUSTER.to_string());
    }
    for cluster in &clusters {
        let first = match analysis.compile(cluster, VERSION, &opts) {
            Ok(snapshot) => snapshot,
            Err(e) => panic!("valid policy does not compile for cluster `{cluster}`: {e}"),
        };
        let second = match again.compile(cluster, VERSION, &opts) {
            Ok(snapshot) => snapshot,
            Err(e) => panic!("second compile for cluster `{cluster}` failed: {e}"),
        };
        let bytes = first.encode();
        assert!(
            bytes == second.encode(),
            "compile is not deterministic for cluster `{cluster}`"
        );
        match Snapshot::decode(&bytes) {
            Ok(decoded) => {
                assert!(
                    decoded == first,
                    "snapshot of cluster `{cluster}` does not round-trip through decode"
                );
                assert!(
                    decoded.encode() == bytes,
                    "snapshot of cluster `{cluster}` re-encodes to different bytes"
                );
            }
            Err(e) => panic!("canonical snapshot of cluster `{cluster}` does not decode: {e}"),
        }
    }
}

/// `snapshot_decode`: the bytes are a snapshot as a gateway receives it.
/// Decoding must not panic (it returns an error for anything it refuses).
/// A snapshot that decodes must re-encode canonically to bytes that decode to
/// an equal snapshot.
pub fn check_snapshot_decode(data: &[u8]) {
    let Ok(snapshot) = Snapshot::decode(data) else {
        return;
    };
    let bytes = snapshot.encode();
    match Snapshot::decode(&bytes) {
        Ok(again) => assert!(
            again == snapshot,
            "decoded snapshot does not round-trip through its canonical encoding"
        ),
        Err(e) => panic!("canonical re-encoding of a decoded snapshot does not decode: {e}"),
    }
}
