//! Fuzzes the whole pipeline from raw bytes: the bounded YAML loader, the
//! typed model, validation, and (for valid input) the per-cluster compiler and
//! the snapshot codec. See `../checks.rs` for the properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_load(data));
