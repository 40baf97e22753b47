//! Fuzzes the gateway side: `Snapshot::decode` on untrusted bytes. See
//! `../checks.rs` for the properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_snapshot_decode(data));
