//! `meshfed-gateway certs ...` run as a real process, as an operator runs it,
//! and the directories it writes loaded by the library as a gateway loads
//! them, then used in a real (in-memory) rustls handshake.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meshfed_gateway::identity::store::{Credentials, client_config, server_config};
use meshfed_gateway::identity::verify::{HandshakeRefusals, peer_identity};
use meshfed_gateway::identity::{SpiffeId, install_crypto_provider};
use meshfed_tests::{Outcome, run};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "meshfed-certs-cli-{name}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempDir(path)
    }

    /// A path inside, as a string for the command line.
    fn at(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn certs(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshfed-gateway"));
    cmd.arg("certs").args(args);
    run(&mut cmd).unwrap_or_else(|e| panic!("running meshfed-gateway certs: {e}"))
}

fn ok(args: &[&str]) -> Outcome {
    let out = certs(args);
    assert_eq!(out.code, Some(0), "certs {args:?}: {out}");
    out
}

fn mode(path: &str) -> u32 {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    meta.permissions().mode() & 0o777
}

fn load(dir: &str) -> Credentials {
    Credentials::load(Path::new(dir)).unwrap_or_else(|e| panic!("loading {dir}: {e}"))
}

/// anchor `root` → intermediates `east` and `west`.
fn hierarchy(tmp: &TempDir) {
    ok(&["anchor", "--out", &tmp.at("root")]);
    for cluster in ["east", "west"] {
        ok(&[
            "intermediate",
            "--ca",
            &tmp.at("root"),
            "--cluster",
            cluster,
            "--out",
            &tmp.at(cluster),
        ]);
    }
}

/// The chain the client received, and the one the server received.
type Chains = (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>);

/// Drives a client and a server against each other in memory; returns the
/// chains each side received, or both sides' errors.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: &str,
) -> Result<Chains, String> {
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let client = ClientConnection::new(client, name).map_err(|e| e.to_string())?;
    let server = ServerConnection::new(server).map_err(|e| e.to_string())?;
    let (mut client, mut server) = (Connection::Client(client), Connection::Server(server));
    let mut errors = Vec::new();
    for _ in 0..32 {
        let sent = transfer(&mut client, &mut server, &mut errors);
        let answered = transfer(&mut server, &mut client, &mut errors);
        if !sent && !answered {
            break;
        }
    }
    let saw = |c: &Connection| {
        c.peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
    };
    match (saw(&client), saw(&server)) {
        (Some(a), Some(b)) if errors.is_empty() && !client.is_handshaking() => Ok((a, b)),
        _ => Err(errors.join("; ")),
    }
}

fn transfer(from: &mut Connection, to: &mut Connection, errors: &mut Vec<String>) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() && from.write_tls(&mut buf).is_ok_and(|n| n > 0) {}
    let mut rest = &buf[..];
    while !rest.is_empty() && to.read_tls(&mut rest).is_ok_and(|n| n > 0) {}
    if !buf.is_empty()
        && let Err(e) = to.process_new_packets()
    {
        errors.push(e.to_string());
    }
    !buf.is_empty()
}

#[test]
fn the_certs_commands_build_gateway_directories_that_connect_across_clusters() {
    install_crypto_provider();
    let tmp = TempDir::new("hierarchy");
    hierarchy(&tmp);
    for (cluster, id) in [("east", "gw-0"), ("west", "gw-7")] {
        let out = ok(&[
            "gateway",
            "--ca",
            &tmp.at(cluster),
            "--cluster",
            cluster,
            "--id",
            id,
            "--out",
            &tmp.at(&format!("gw-{cluster}")),
        ]);
        assert!(out.stdout.contains("key.pem (mode 0600)"), "{out}");
    }

    let east = load(&tmp.at("gw-east"));
    let west = load(&tmp.at("gw-west"));
    assert_eq!(
        east.id.to_string(),
        "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0"
    );
    assert_eq!(
        (east.cluster.as_str(), west.cluster.as_str()),
        ("east", "west")
    );

    let refusals = Arc::new(HandshakeRefusals::new());
    let alpn = [b"meshfed".to_vec()];
    let (from_west, from_east) = handshake(
        client_config(&east, &alpn, refusals.clone()).unwrap_or_else(|e| panic!("{e}")),
        server_config(&west, &alpn, refusals.clone()).unwrap_or_else(|e| panic!("{e}")),
        "west.cluster.meshfed.internal",
    )
    .unwrap_or_else(|e| panic!("handshake: {e}"));
    assert_eq!(
        peer_identity(&from_west).map(|p| p.cluster).ok(),
        Some("west".to_owned())
    );
    assert_eq!(
        peer_identity(&from_east).map(|p| p.id).ok(),
        Some(east.id.clone())
    );
}

#[test]
fn workload_and_syncer_directories_load_with_their_ids() {
    let tmp = TempDir::new("leaves");
    hierarchy(&tmp);
    let (ca, wl, syncer) = (tmp.at("east"), tmp.at("wl"), tmp.at("syncer"));
    ok(&[
        "workload",
        "--ca",
        &ca,
        "--namespace",
        "default",
        "--service-account",
        "productpage",
        "--out",
        &wl,
    ]);
    ok(&["syncer", "--ca", &ca, "--id", "syncer-0", "--out", &syncer]);

    let wl = load(&wl);
    assert_eq!(
        wl.id.istio_principal().as_deref(),
        Some("cluster.local/ns/default/sa/productpage")
    );
    assert_eq!(wl.cluster, "east");
    assert_eq!(
        load(&syncer).id,
        SpiffeId::parse("spiffe://cluster.local/meshfed/syncer/syncer-0")
            .unwrap_or_else(|e| panic!("{e}"))
    );
}

#[test]
fn every_key_the_cli_writes_is_mode_0600() {
    let tmp = TempDir::new("modes");
    hierarchy(&tmp);
    ok(&[
        "gateway",
        "--ca",
        &tmp.at("east"),
        "--cluster",
        "east",
        "--id",
        "a",
        "--out",
        &tmp.at("gw"),
    ]);

    for key in ["root/ca.key", "east/ca.key", "west/ca.key", "gw/key.pem"] {
        assert_eq!(mode(&tmp.at(key)), 0o600, "{key}");
    }
    for public in ["root/ca.pem", "east/bundle.pem", "gw/cert.pem"] {
        assert_eq!(
            mode(&tmp.at(public)) & 0o022,
            0,
            "{public} must not be writable by others"
        );
    }
}

#[test]
fn a_gateway_is_refused_for_a_cluster_that_is_not_its_intermediates() {
    let tmp = TempDir::new("wrong-cluster");
    hierarchy(&tmp);

    let out = certs(&[
        "gateway",
        "--ca",
        &tmp.at("east"),
        "--cluster",
        "west",
        "--id",
        "gw-0",
        "--out",
        &tmp.at("gw"),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("is the CA of cluster `east`, not `west`"),
        "{out}"
    );
    assert!(!Path::new(&tmp.at("gw")).exists(), "nothing may be written");
}

#[test]
fn leaves_are_refused_directly_under_the_anchor() {
    let tmp = TempDir::new("anchor-leaf");
    hierarchy(&tmp);

    let out = certs(&[
        "syncer",
        "--ca",
        &tmp.at("root"),
        "--id",
        "s",
        "--out",
        &tmp.at("s"),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("holds the trust anchor"), "{out}");
}

#[test]
fn existing_files_are_kept_unless_force_is_given() {
    let tmp = TempDir::new("force");
    let root = tmp.at("root");
    ok(&["anchor", "--out", &root]);
    let before = std::fs::read_to_string(tmp.at("root/ca.key")).unwrap_or_default();

    let out = certs(&["anchor", "--out", &root]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("--force"), "{out}");
    assert_eq!(
        std::fs::read_to_string(tmp.at("root/ca.key")).unwrap_or_default(),
        before
    );

    ok(&["anchor", "--out", &root, "--force"]);
    assert_ne!(
        std::fs::read_to_string(tmp.at("root/ca.key")).unwrap_or_default(),
        before
    );
    assert_eq!(mode(&tmp.at("root/ca.key")), 0o600);
}

#[test]
fn a_bundle_of_two_anchors_trusts_leaves_of_both_and_inspect_checks_against_it() {
    let tmp = TempDir::new("rotation");
    for (root, east) in [("old", "old-east"), ("new", "new-east")] {
        ok(&["anchor", "--out", &tmp.at(root), "--name", root]);
        ok(&[
            "intermediate",
            "--ca",
            &tmp.at(root),
            "--cluster",
            "east",
            "--out",
            &tmp.at(east),
        ]);
        ok(&[
            "gateway",
            "--ca",
            &tmp.at(east),
            "--cluster",
            "east",
            "--id",
            root,
            "--out",
            &tmp.at(&format!("gw-{root}")),
        ]);
    }
    let both = tmp.at("both.pem");
    let out = ok(&[
        "bundle",
        &tmp.at("old/ca.pem"),
        &tmp.at("new/bundle.pem"),
        "--out",
        &both,
    ]);
    assert!(out.stdout.contains("(2 anchor(s))"), "{out}");

    for gw in ["gw-old", "gw-new"] {
        let out = ok(&[
            "inspect",
            &tmp.at(&format!("{gw}/cert.pem")),
            "--bundle",
            &both,
        ]);
        assert!(out.stdout.contains("trusted by"), "{out}");
        // Rotation in place: the gateway's bundle becomes the two-anchor one.
        std::fs::copy(&both, tmp.at(&format!("{gw}/bundle.pem"))).unwrap_or_default();
        assert_eq!(load(&tmp.at(gw)).cluster, "east");
    }
    let out = certs(&[
        "inspect",
        &tmp.at("gw-old/cert.pem"),
        "--bundle",
        &tmp.at("new/bundle.pem"),
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("not trusted by"), "{out}");

    let out = certs(&[
        "bundle",
        &tmp.at("old-east/ca.pem"),
        "--out",
        &tmp.at("bad.pem"),
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("is not a trust anchor"), "{out}");
}

#[test]
fn inspect_prints_the_spiffe_id_cluster_issuer_and_validity() {
    let tmp = TempDir::new("inspect");
    hierarchy(&tmp);
    ok(&[
        "gateway",
        "--ca",
        &tmp.at("west"),
        "--cluster",
        "west",
        "--id",
        "gw-2",
        "--out",
        &tmp.at("gw"),
    ]);

    let out = ok(&["inspect", &tmp.at("gw/cert.pem")]);

    for text in [
        "#1: leaf",
        "spiffe id:    spiffe://cluster.local/meshfed/cluster/west/gateway/gw-2",
        "dns names:    west.cluster.meshfed.internal",
        "#2: cluster intermediate CA",
        "spiffe id:    spiffe://cluster.local/meshfed/cluster/west",
        "issuer:       ",
        "meshfed intermediate CA for cluster west",
        "not after:",
        "days left",
        "identity: spiffe://cluster.local/meshfed/cluster/west/gateway/gw-2, cluster `west`",
    ] {
        assert!(out.stdout.contains(text), "inspect lacks {text:?}:\n{out}");
    }
    let out = certs(&["inspect", &tmp.at("gw/key.pem")]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        !out.stdout.contains("PRIVATE") && !out.stderr.contains("PRIVATE"),
        "{out}"
    );
}

#[test]
fn every_certs_command_has_help_and_a_usage_error_exits_2() {
    let out = ok(&["--help"]);
    for text in [
        "anchor",
        "intermediate",
        "gateway",
        "workload",
        "syncer",
        "bundle",
        "inspect",
        "ca.key (0600)",
    ] {
        assert!(
            out.stdout.contains(text),
            "certs --help lacks {text}:\n{out}"
        );
    }
    for (command, flags) in [
        ("anchor", &["--out", "--name", "--days"][..]),
        (
            "intermediate",
            &["--ca", "--cluster", "--trust-domain", "cluster.local"][..],
        ),
        (
            "gateway",
            &["--ca", "--cluster", "--id", "--dns", "--force"][..],
        ),
        ("workload", &["--namespace", "--service-account"][..]),
        ("syncer", &["--id", "syncer.meshfed.internal"][..]),
        ("bundle", &["FILE", "--out"][..]),
        ("inspect", &["--bundle"][..]),
    ] {
        let out = ok(&[command, "--help"]);
        for flag in flags {
            assert!(
                out.stdout.contains(flag),
                "certs {command} --help lacks {flag}:\n{out}"
            );
        }
    }
    let out = certs(&["anchor"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("--out"), "{out}");
}
