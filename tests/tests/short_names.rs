//! Short service names (`ratings`, `ratings-west:9080`) from plaintext
//! callers resolve in the caller's own namespace, told by its address among
//! the gateway's local endpoints, or are refused with a 400 that names what
//! to call instead; they are never resolved in a guessed `default` (issue
//! 22, item 2).
//!
//! `west` exports `ratings` from two namespaces, `bookinfo` and `default`,
//! each with its own backend. East's discovery file lists `productpage` in
//! `bookinfo` at 127.0.0.5 (a pod's address); the callers bind their own
//! loopback address before connecting, so east sees them as that pod
//! (127.0.0.5) or as an address it knows nothing of (127.0.0.6). East runs
//! without `--caller-namespace`.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use meshfed_tests::federation::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plaintext GET through `via` from the local address `from`, with
/// `Host: host`: the status, the `x-meshfed-error` header and `x-served-by`
/// (or the body of a refusal).
async fn get_from(from: &str, via: SocketAddr, host: &str) -> (u16, String, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse().unwrap())
        .unwrap_or_else(|e| panic!("binding {from}: {e}"));
    let mut s = socket.connect(via).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("GET {host} from {from} timed out"))
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let served = match header("x-served-by") {
        s if s.is_empty() => body.to_string(),
        s => s,
    };
    (status, header("x-meshfed-error"), served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_names_resolve_in_the_callers_namespace_from_its_address_or_are_refused_never_in_default()
 {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (east_port, west_port) = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let export = |ns: &str| {
        format!(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: {ns}}}\n---\n"
        )
    };
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}{}{}",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[west_port]),
            export("bookinfo"),
            export("default")
        ),
    )
    .unwrap();
    let (bookinfo, _t1) = http_backend("ratings-bookinfo").await;
    let (default, _t2) = http_backend("ratings-default").await;
    let west_eps = dir.path().join("west.yaml");
    discovery_file(
        &west_eps,
        &[
            ("ratings.bookinfo", vec![(bookinfo, vec![])]),
            ("ratings.default", vec![(default, vec![])]),
        ],
    );
    let east_eps = dir.path().join("east.yaml");
    discovery_file(
        &east_eps,
        &[(
            "productpage.bookinfo",
            vec![("127.0.0.5:9080".parse().unwrap(), vec![])],
        )],
    );
    let spec =
        |cluster: &str, port: u16, eps: &std::path::Path, extra_args: Vec<String>| GatewaySpec {
            cluster: cluster.into(),
            id: "gw-0".into(),
            tls_dir: pki.gateway(cluster, "gw-0"),
            policy_dir: policy.clone(),
            discovery: Some(eps.to_path_buf()),
            tunnel_port: port,
            work_dir: dir.path().to_path_buf(),
            extra_args,
        };
    let west_spec = spec("west", west_port, &west_eps, vec![]);
    // Unset: the harness declares `default` for every other test.
    let east_spec = spec(
        "east",
        east_port,
        &east_eps,
        vec!["--caller-namespace=".into()],
    );
    let (_west, east) = tokio::task::spawn_blocking(move || {
        let west = GatewayProcess::start(&west_spec);
        let east = GatewayProcess::start(&east_spec);
        east.wait_links("west", 1);
        (west, east)
    })
    .await
    .unwrap();

    // The productpage pod calls as applications do, by short name: its own
    // namespace's service, never default's.
    for host in ["ratings-west:9080", "ratings", "ratings-clusterset"] {
        let (status, reason, served) = get_from("127.0.0.5", east.outbound, host).await;
        assert_eq!(
            (status, served.as_str()),
            (200, "ratings-bookinfo"),
            "{host} from bookinfo's pod ({reason})\n{}",
            east.log_tail()
        );
    }
    // Qualified names need no namespace, from anywhere.
    for (host, backend) in [
        ("ratings-west.bookinfo:9080", "ratings-bookinfo"),
        ("ratings.default", "ratings-default"),
        ("ratings.bookinfo.svc.cluster.local", "ratings-bookinfo"),
    ] {
        let (status, _, served) = get_from("127.0.0.6", east.outbound, host).await;
        assert_eq!((status, served.as_str()), (200, backend), "{host}");
    }
    // A caller the gateway cannot place: refused, saying what to call.
    let (status, reason, body) = get_from("127.0.0.6", east.outbound, "ratings-west:9080").await;
    assert_eq!((status, reason.as_str()), (400, "bad-request"), "{body}");
    assert!(
        body.contains("`ratings-west` is a short name")
            && body.contains("`ratings-west.<namespace>`")
            && body.contains("127.0.0.6"),
        "{body}"
    );
    let (status, _, _) = get_from("127.0.0.6", east.outbound, "ratings").await;
    assert_eq!(status, 400, "plain short names too");
}
