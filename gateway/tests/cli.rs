//! The `meshfed-gateway` binary's command line, run as a real process.
//!
//! These live here rather than in the workspace's `tests/` package because an
//! integration test is what makes cargo build this package's binary during
//! `cargo test --workspace` / `cargo nextest run --workspace`, which the
//! cross-process tests in `tests/` rely on; and `CARGO_BIN_EXE_*` then names
//! exactly the binary just built.
//!
//! The running gateway is exercised across processes in `tests/`; here are
//! its command line and its refusals to start.

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
fn without_its_required_settings_it_names_them_and_exits_2() {
    let out = gateway(&[]);

    assert_eq!(out.code, Some(2), "{out}");
    for flag in ["--cluster", "--tls-dir", "--policy-dir"] {
        assert!(out.stderr.contains(flag), "{flag} not named:\n{out}");
    }
}

#[test]
fn unreadable_credentials_stop_the_start_with_exit_1_and_say_where() {
    let out = gateway(&[
        "--cluster",
        "east",
        "--tls-dir",
        "/nonexistent/tls",
        "--policy-dir",
        "/nonexistent/policy",
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("/nonexistent/tls"), "{out}");
}

#[test]
fn an_admin_api_off_loopback_needs_a_token() {
    let out = gateway(&[
        "--cluster",
        "east",
        "--tls-dir",
        "/x",
        "--policy-dir",
        "/y",
        "--admin-addr",
        "0.0.0.0:15020",
    ]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("--admin-token-file"), "{out}");
}

#[test]
fn settings_come_from_a_config_file_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("meshfed-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gw.yaml");
    std::fs::write(
        &cfg,
        "cluster: east\ntls-dir: /from-file/tls\npolicy-dir: /from-file/policy\n",
    )
    .unwrap();
    let out = gateway(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("/from-file/tls"), "{out}");
    let out = gateway(&[
        "--config",
        cfg.to_str().unwrap(),
        "--tls-dir",
        "/from-flag/tls",
    ]);
    assert!(out.stderr.contains("/from-flag/tls"), "{out}");
    std::fs::write(&cfg, "cluster: east\ntls-dirr: /x\n").unwrap();
    let out = gateway(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("unknown setting `tls-dirr`"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 16: the gateway and the syncer read config files with one shim
/// (meshfed_cli::config_file). A list is one value per item for a flag that
/// may be repeated (the gateway used to refuse every list), and refused for
/// a flag that takes one value; an item that is not a scalar is refused.
#[test]
fn a_config_file_list_repeats_a_repeatable_flag_and_is_refused_for_a_single_value() {
    let dir = std::env::temp_dir().join(format!("meshfed-cli-lists-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gw.yaml");
    let base = "cluster: east\ntls-dir: /from-file/tls\npolicy-dir: /from-file/policy\n";
    // Accepted: parsing succeeds, and the start stops later, at the
    // credentials.
    std::fs::write(&cfg, format!("{base}mirror-ports: [80, 8080]\n")).unwrap();
    let out = gateway(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("/from-file/tls"), "{out}");
    // Each item is a value of its own, checked as a flag's would be.
    std::fs::write(&cfg, format!("{base}mirror-ports: [80, http]\n")).unwrap();
    let out = gateway(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains("'http'") && out.stderr.contains("--mirror-ports"),
        "{out}"
    );
    // Refused, every problem at once.
    std::fs::write(
        &cfg,
        "cluster: [east, west]\ntls-dir: /t\npolicy-dir: /p\nkube-namespace: [a, {b: 1}]\n",
    )
    .unwrap();
    let out = gateway(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains("`cluster` takes one value, not a list"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("`kube-namespace` item 2: must be a string, number or boolean, not a map"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
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
        "--congestion-control",
        "[default: cubic]",
        "--link-transport",
        "[default: auto]",
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
