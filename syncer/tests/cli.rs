//! The `meshfed-syncer` binary's command line, run as a real process.
//!
//! These live here rather than in the workspace's `tests/` package because an
//! integration test is what makes cargo build this package's binary during
//! `cargo test --workspace` / `cargo nextest run --workspace`, which the
//! cross-process tests in `tests/` rely on; and `CARGO_BIN_EXE_*` then names
//! exactly the binary just built.
//!
//! Until the control plane lands, the binary documents its interface but says
//! plainly that it is not built and exits with code 2, so that no script
//! mistakes it for a running syncer, or a rollout for a finished one. Replace
//! these tests as the parts land.

use std::process::Command;

use meshfed_tests::{Outcome, run};

fn syncer(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshfed-syncer"));
    cmd.args(args);
    // The flags have environment overrides; keep the caller's out.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHFED_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd).unwrap_or_else(|e| panic!("running meshfed-syncer: {e}"))
}

#[test]
fn without_a_control_plane_it_says_so_and_exits_2() {
    let out = syncer(&[]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("not built yet"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[test]
fn status_wait_says_it_is_not_built_and_exits_2_rather_than_report_success() {
    let out = syncer(&["status", "--wait", "3f2a9c4", "--timeout", "1s"]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("not built yet"), "{out}");
}

#[test]
fn help_documents_the_istio_style_default_ports_and_common_flags() {
    let out = syncer(&["--help"]);

    assert_eq!(out.code, Some(0), "{out}");
    for text in [
        "0.0.0.0:15012",
        "127.0.0.1:15014",
        "--ready-file",
        "--config",
        "--log-format",
        "status",
    ] {
        assert!(out.stdout.contains(text), "--help lacks {text}:\n{out}");
    }
}

#[test]
fn durations_are_checked_like_istio_durations() {
    let out = syncer(&["--poll-interval", "30"]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("no unit"), "{out}");
}

#[test]
fn long_version_names_the_snapshot_schema_it_writes() {
    let out = syncer(&["--version"]);

    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("policy snapshot schema"), "{out}");
}
