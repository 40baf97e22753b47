//! File inputs are checked on change, not on a clock: an idle gateway in
//! file mode does not look at its policy directory, endpoints file or
//! certificate directory, and an edit (in place, by rename, or by a
//! Kubernetes ConfigMap's `..data` swap) still applies within the usual
//! deadlines, a bad one still refused with the previous snapshot kept.
//!
//! The checks are read from `meshfed_config_source_checks_total{source}`
//! (gateway/src/control/changes.rs).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshfed_tests::federation::*;
use meshfed_tests::{assert_eventually, eventually};

const CHECKS: &str = "meshfed_config_source_checks_total";
const SOURCES: [&str; 3] = ["policy_dir", "endpoints_file", "tls_dir"];

/// The checks of each source, or why they cannot be read (a series absent
/// is an error, not 0: a gateway that never counts would pass otherwise).
fn checks(gw: &GatewayProcess) -> Result<[u64; 3], String> {
    let text = gw.admin_get("/metrics");
    let mut out = [0; 3];
    for (i, source) in SOURCES.iter().enumerate() {
        let needle = format!("{CHECKS}{{source=\"{source}\"}} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&needle))
            .ok_or_else(|| format!("no {needle} in /metrics"))?;
        out[i] = line[needle.len()..]
            .trim()
            .parse::<f64>()
            .map_err(|e| format!("{line}: {e}"))? as u64;
    }
    Ok(out)
}

fn config_version(gw: &GatewayProcess) -> String {
    let dump: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default();
    dump["applied_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The addresses of `ratings` among the gateway's local endpoints.
fn ratings_endpoints(gw: &GatewayProcess) -> Vec<String> {
    let dump: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/config_dump")).unwrap_or_default();
    dump["local_endpoints"]["ratings.default.svc.cluster.local"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .filter_map(|e| e["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

const DR_REVIEWS: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec: {host: reviews}\n";

fn endpoints_yaml(port: u16) -> String {
    format!("services:\n  ratings.default:\n    - address: 127.0.0.1:{port}\n")
}

/// A policy for cluster `east` alone; `tag` makes each version distinct.
fn policy_yaml(port: u16, tag: &str) -> String {
    format!(
        "{}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: ratings-{tag}}}\nspec:\n  host: ratings\n",
        cluster_yaml("east", &[port])
    )
}

/// A Kubernetes ConfigMap volume in `vol`: `..data -> ..<version>`, and each
/// file `f -> ..data/f`.
fn configmap(vol: &Path, version: &str, files: &[(&str, &str)]) {
    std::fs::create_dir_all(vol.join(format!("..{version}"))).unwrap();
    for (name, text) in files {
        std::fs::write(vol.join(format!("..{version}")).join(name), text).unwrap();
        let link = vol.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), link).unwrap();
        }
    }
}

/// The kubelet's update: a new version's directory, `..data_tmp` pointing
/// at it, renamed onto `..data`.
fn configmap_swap(vol: &Path, version: &str, files: &[(&str, &str)]) {
    configmap(vol, version, files);
    symlink(format!("..{version}"), vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    gw: GatewayProcess,
    /// What `--policy-dir` names.
    policy: PathBuf,
    /// What `--discovery-file` names.
    eps: PathBuf,
    port: u16,
}

/// One gateway of cluster `east` in file mode. With `configmap`, both the
/// policy and the endpoints come from ConfigMap volumes, named as a user
/// names them: `--policy-dir vol` (its entries are symlinks into `..data`)
/// and `--discovery-file vol/endpoints.yaml`.
fn start(configmap_layout: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let port = free_udp_port();
    let (policy, eps) = if configmap_layout {
        let pvol = dir.path().join("policy-volume");
        configmap(&pvol, "v1", &[("p.yaml", &policy_yaml(port, "v1"))]);
        symlink("..v1", pvol.join("..data")).unwrap();
        let evol = dir.path().join("endpoints-volume");
        configmap(&evol, "v1", &[("endpoints.yaml", &endpoints_yaml(9001))]);
        symlink("..v1", evol.join("..data")).unwrap();
        (pvol, evol.join("endpoints.yaml"))
    } else {
        let policy = dir.path().join("policy");
        std::fs::create_dir_all(policy.join("team")).unwrap();
        std::fs::write(policy.join("p.yaml"), policy_yaml(port, "v1")).unwrap();
        // A directory of its own, as deployed: the file's directory is
        // watched, and the work directory gets the gateway's ready file.
        let eps = dir.path().join("endpoints/endpoints.yaml");
        std::fs::create_dir_all(dir.path().join("endpoints")).unwrap();
        std::fs::write(&eps, endpoints_yaml(9001)).unwrap();
        (policy, eps)
    };
    let gw = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: policy.clone(),
        discovery: Some(eps.clone()),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    });
    Setup {
        _dir: dir,
        gw,
        policy,
        eps,
        port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_an_idle_gateway_in_file_mode_does_not_check_its_inputs() {
    let s = start(false);
    let before = eventually(
        "the check counters are exported",
        Duration::from_secs(10),
        || checks(&s.gw),
    );
    // An observation window: nothing changes on disk, so nothing may be
    // checked. (The safety re-check is every 30 s, outside the window.)
    std::thread::sleep(Duration::from_secs(3));
    let after = checks(&s.gw).unwrap();
    assert_eq!(
        after,
        before,
        "idle checks of {SOURCES:?} over 3 s: {before:?} -> {after:?}\n{}",
        s.gw.log_tail()
    );
    // The counter is live: an edit is checked (and applied).
    let version = config_version(&s.gw);
    write_atomic(&s.policy.join("team/more.yaml"), DR_REVIEWS);
    assert_eventually(
        "the edit is checked and applied",
        Duration::from_secs(10),
        || checks(&s.gw).is_ok_and(|c| c[0] > before[0]) && config_version(&s.gw) != version,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_apply_and_a_bad_one_is_refused_keeping_the_snapshot() {
    let s = start(false);
    let v1 = config_version(&s.gw);
    assert!(!v1.is_empty());
    // In place.
    std::fs::write(s.policy.join("p.yaml"), policy_yaml(s.port, "v2")).unwrap();
    let v2 = eventually("an in-place edit applies", Duration::from_secs(10), || {
        let v = config_version(&s.gw);
        if v != v1 { Ok(v) } else { Err("still v1") }
    });
    // Bad, by rename: refused with its diagnostics, v2 kept.
    let seen = checks(&s.gw).unwrap()[0];
    write_atomic(
        &s.policy.join("p.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x}\nspec: {hots: ratings}\n",
    );
    assert_eventually("the bad edit is refused", Duration::from_secs(10), || {
        s.gw.log_tail().contains("policy edit refused")
    });
    assert!(checks(&s.gw).unwrap()[0] > seen);
    assert_eq!(
        config_version(&s.gw),
        v2,
        "a refused edit changed the snapshot"
    );
    assert!(
        s.gw.log_tail().contains("p.yaml:"),
        "no FILE:LINE diagnostic:\n{}",
        s.gw.log_tail()
    );
    // A new file in a new subdirectory is seen too.
    std::fs::write(s.policy.join("p.yaml"), policy_yaml(s.port, "v3")).unwrap();
    std::fs::create_dir_all(s.policy.join("new/deeper")).unwrap();
    std::fs::write(s.policy.join("new/deeper/q.yaml"), DR_REVIEWS).unwrap();
    assert_eventually(
        "the fixed edit and the new file apply",
        Duration::from_secs(10),
        || {
            let dump = s.gw.admin_get("/config_dump");
            config_version(&s.gw) != v2 && dump.contains("ratings-v3") && dump.contains("reviews")
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_data_swaps_of_the_policy_and_the_endpoints_apply() {
    let s = start(true);
    let v1 = config_version(&s.gw);
    assert_eq!(ratings_endpoints(&s.gw), vec!["127.0.0.1:9001".to_string()]);
    let pvol = s.policy.as_path();
    configmap_swap(pvol, "v2", &[("p.yaml", &policy_yaml(s.port, "v2"))]);
    assert_eventually(
        "the policy volume's swap applies",
        Duration::from_secs(10),
        || {
            let v = config_version(&s.gw);
            !v.is_empty() && v != v1 && s.gw.admin_get("/config_dump").contains("ratings-v2")
        },
    );
    let evol = s.eps.parent().unwrap();
    configmap_swap(evol, "v2", &[("endpoints.yaml", &endpoints_yaml(9002))]);
    assert_eventually(
        "the endpoints volume's swap applies",
        Duration::from_secs(10),
        || ratings_endpoints(&s.gw) == vec!["127.0.0.1:9002".to_string()],
    );
    // A bad endpoints version is refused; the previous endpoints stay.
    configmap_swap(evol, "v3", &[("endpoints.yaml", "services: [broken")]);
    assert_eventually(
        "the bad endpoints are refused",
        Duration::from_secs(10),
        || s.gw.log_tail().contains("discovery file refused"),
    );
    assert_eq!(ratings_endpoints(&s.gw), vec!["127.0.0.1:9002".to_string()]);
}
