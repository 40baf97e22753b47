//! Replaying a fuzz crate's committed inputs under `cargo test`: the one
//! copy of the loop for the policy, gateway and syncer fuzz crates, each of
//! which includes this file with `#[path]` (no crate depends on another for
//! it).

use std::panic;
use std::path::{Path, PathBuf};

/// `<crate>/fuzz` of the crate whose test includes this file.
pub fn fuzz_dir(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("fuzz")
}

/// The files directly in `fuzz/<dir>`, sorted; none if the directory does
/// not exist.
pub fn inputs(fuzz: &Path, dir: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(fuzz.join(dir)) else {
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
pub fn replay(files: &[PathBuf], check: fn(&[u8])) -> Vec<String> {
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
            failures.push(format!("{}: {}", file.display(), panic_text(&*payload)));
        }
    }
    failures
}

/// A panic's message.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(non-string panic)")
}

pub fn assert_no_failures(what: &str, count: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {count} {what} input(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
