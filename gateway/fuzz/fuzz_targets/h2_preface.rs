//! Fuzzes the HTTP/2 preface detection of the outbound listener,
//! `proxy::detect::Preface`, on an HTTP caller's bytes in two reads. See `../checks.rs`
//! (`check_h2_preface`) for the properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_h2_preface(data));
