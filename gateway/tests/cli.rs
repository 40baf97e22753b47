//! The `meshfed-gateway` binary's command line, run as a real process.
//!
//! These live here rather than in the workspace's `tests/` package because an
//! integration test is what makes cargo build this package's binary during
//! `cargo test --workspace` / `cargo nextest run --workspace`, which the
//! cross-process tests in `tests/` rely on; and `CARGO_BIN_EXE_*` then names
//! exactly the binary just built.
//!
//! Until the data plane lands, the binary documents its interface but says
//! plainly that it is not built and exits with code 2, so that no script or
//! supervisor mistakes it for a running gateway. Replace these tests as the
//! parts land.

use std::process::Command;

use meshfed_tests::{Outcome, run};

fn gateway(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshfed-gateway"));
    cmd.args(args);
    // The flags have environment overrides; keep the caller's out.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHFED_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd).unwrap_or_else(|e| panic!("running meshfed-gateway: {e}"))
}

#[test]
fn without_a_data_plane_it_says_so_and_exits_2() {
    let out = gateway(&[]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("not built yet"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[test]
fn help_documents_the_istio_style_default_ports_and_common_flags() {
    let out = gateway(&["--help"]);

    assert_eq!(out.code, Some(0), "{out}");
    for text in [
        "0.0.0.0:15443",
        "0.0.0.0:15001",
        "127.0.0.1:15020",
        "--ready-file",
        "--config",
        "--log-format",
    ] {
        assert!(out.stdout.contains(text), "--help lacks {text}:\n{out}");
    }
}

#[test]
fn a_malformed_address_is_a_usage_error() {
    let out = gateway(&["--tunnel-addr", "not-an-address"]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("--tunnel-addr"), "{out}");
}

#[test]
fn long_version_names_the_snapshot_schema_it_accepts() {
    let out = gateway(&["--version"]);

    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("policy snapshot schema"), "{out}");
}
