//! Fuzzes the tunnel's frame decoder, `wire::frame::decode`, on the bytes
//! a peer gateway can send on any stream: frame by frame, whole and in two
//! parts, with a round trip through the encoder for every frame. See
//! `../checks.rs` for the properties checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_frame_decode(data));
