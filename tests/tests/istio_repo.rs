//! An Istio repository followed as-is (issue 15): the real `meshfed-syncer`
//! pulls a Git repository that holds what an Istio user already has (a
//! `Gateway`, a VirtualService bound only to it, Kubernetes manifests, and
//! the mesh policy meshfed enforces) and pushes it to a real gateway in
//! syncer mode. A commit that touches only the ingress `Gateway` is
//! reported live, and changes nothing the gateway enforces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshfed_tests::eventually;
use meshfed_tests::federation::{GatewayProcess, GatewaySpec, Pki, cluster_yaml, free_udp_port};
use meshfed_tests::syncer::{PolicyRepo, SyncerProcess, SyncerSpec, syncer_creds};

/// Istio's bookinfo ingress, as samples/bookinfo/networking/bookinfo-gateway.yaml
/// writes it (the port varies between the two commits).
fn ingress(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: {port}
      name: http
      protocol: HTTP
    hosts:
    - "*"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    route:
    - destination:
        host: productpage
        port:
          number: {port}
"#
    )
}

const MESH: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: reviews
  labels: {app: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 20
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*"]
"#;

fn content_hash(gw: &GatewayProcess, version: &str) -> String {
    eventually(
        &format!("the gateway runs {version}"),
        Duration::from_secs(20),
        || {
            let dump: serde_json::Value =
                serde_json::from_str(&gw.admin_get("/config_dump")).map_err(|e| e.to_string())?;
            if dump["applied_version"].as_str() == Some(version) {
                Ok(dump["content_hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string())
            } else {
                Err(format!("runs {}", dump["applied_version"]))
            }
        },
    )
}

#[test]
fn a_commit_that_touches_only_an_istio_gateway_is_reported_live_and_changes_nothing_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let port = free_udp_port();
    let repo = PolicyRepo::init(&tmp.path().join("repo"));
    let c1 = repo.commit(
        "bookinfo, as the Istio repository has it",
        &[
            ("clusters.yaml", &cluster_yaml("east", &[port])),
            ("bookinfo/mesh.yaml", MESH),
            ("bookinfo/gateway.yaml", &ingress(8080)),
        ],
    );
    let syncer = SyncerProcess::start(&SyncerSpec::new(
        &repo.dir,
        &syncer_creds(&pki, "east", "syncer"),
        &tmp.path().join("syncer"),
    ));
    let gw = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: Default::default(),
        discovery: None,
        tunnel_port: port,
        work_dir: tmp.path().to_path_buf(),
        extra_args: vec![
            "--syncer".into(),
            syncer.grpc.to_string(),
            "--syncer-issuer".into(),
            "east".into(),
        ],
    });
    let waited = syncer.status_wait(&c1, Duration::from_secs(30));
    assert_eq!(
        waited.code,
        Some(0),
        "the Istio repository is not live: {waited}"
    );
    let before = content_hash(&gw, &c1);
    assert!(!before.is_empty());
    let dump = gw.admin_get("/config_dump");
    assert!(dump.contains("reviews.default.svc.cluster.local"), "{dump}");

    // Only the ingress changes: a new port on the Gateway and the
    // VirtualService bound to it.
    let c2 = repo.commit(
        "ingress on 8443",
        &[("bookinfo/gateway.yaml", &ingress(8443))],
    );
    let (code, text) = syncer.webhook();
    assert_eq!(code, 202, "{text}");
    let waited = syncer.status_wait(&c2, Duration::from_secs(30));
    assert_eq!(
        waited.code,
        Some(0),
        "the ingress-only commit is not reported live: {waited}"
    );
    let after = content_hash(&gw, &c2);
    assert_eq!(
        before, after,
        "a commit touching only Istio's ingress changed what the gateway enforces"
    );

    // The syncer says why it applied nothing of those files.
    let status = syncer.status().to_string();
    assert!(
        status.contains("Gateway") || syncer.log_text().contains("Gateway"),
        "no word of the skipped Gateway in status or log: {status}"
    );
}
