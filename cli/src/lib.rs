//! What meshfed's binaries (`meshfed-gateway`, `meshfed-syncer`) share at
//! their edge with the operator and the operating system, so that each rule
//! has one copy:
//! - [`io`]: telling "out of descriptors or memory" from other I/O errors,
//!   with what to try, and the write half of a stream wrapper.
//!
//! It owns no socket, no runtime and no TLS: every meshfed crate may depend
//! on it without pulling a network stack in.

#![forbid(unsafe_code)]

pub mod io;
