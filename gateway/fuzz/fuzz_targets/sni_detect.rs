//! Fuzzes the outbound listener's protocol detection, `proxy::detect`,
//! on the first bytes a local caller sends. See `../checks.rs`
//! (`check_sni_detect`) for the properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_sni_detect(data));
