//! What meshfed's binaries (`meshfed-gateway`, `meshfed-syncer`) share at
//! their edge with the operator and the operating system, so that each rule
//! has one copy:
//! - [`config_file`]: `--config FILE` (a YAML map of long flag names to
//!   values) turned into arguments in front of the command line;
//! - [`time`]: RFC 3339 timestamps (`2025-01-02T03:04:05.678Z`), printed and
//!   read back;
//! - [`fs`]: files replaced atomically (temporary file, fsync, rename,
//!   directory fsync);
//! - [`io`]: telling "out of descriptors or memory" from other I/O errors,
//!   with what to try, and the write half of a stream wrapper.
//!
//! It owns no socket, no runtime and no TLS: every meshfed crate may depend
//! on it without pulling a network stack in.

#![forbid(unsafe_code)]

pub mod config_file;
pub mod fs;
pub mod io;
pub mod time;
