//! Fuzzes `wire::announce::Announcement::decode` on the payload of an
//! ANNOUNCE frame, as a gateway receives it from a peer on the control
//! stream. See `../checks.rs` for the properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_announce_decode(data));
