//! What each cluster's gateways receive, from whole example repositories.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::snapshot::*;
use meshfed_policy::{Analysis, CompileError, Options, analyze};

fn example(name: &str) -> Analysis {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let (files, io) = read_paths(&[dir], &Selection::default());
    assert!(io.is_empty(), "{io:?}");
    let a = analyze(files, &Options::default());
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    a
}

fn files(texts: &[&str]) -> Analysis {
    analyze(
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("f{i}.yaml"), *t)),
        &Options::default(),
    )
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";

#[test]
fn seed_mobile_routing_sends_mobile_to_v2_and_splits_the_rest_80_20() {
    let s = example("bookinfo-mobile")
        .compile("east", "abc", &Options::default())
        .unwrap();
    let routes = &s.policy.routes[REVIEWS];
    assert_eq!(routes.http.len(), 2);
    let mobile = &routes.http[0];
    assert_eq!(
        mobile.matches[0].headers["user-agent"],
        StringMatch::Regex(".*mobile.*".into())
    );
    assert_eq!(mobile.destinations[0].subset.as_deref(), Some("v2"));
    assert_eq!(mobile.destinations[0].weight, 100);
    let split: Vec<(Option<&str>, u32)> = routes.http[1]
        .destinations
        .iter()
        .map(|d| (d.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(split, vec![(Some("v1"), 80), (Some("v2"), 20)]);
}

#[test]
fn seed_destination_rule_keeps_its_connection_pool_limits_in_every_subset() {
    let s = example("bookinfo-mobile")
        .compile("east", "abc", &Options::default())
        .unwrap();
    let d = &s.policy.destinations[REVIEWS];
    for pool in [
        &d.traffic_policy.connection_pool,
        &d.subsets["v1"].traffic_policy.connection_pool,
        &d.subsets["v2"].traffic_policy.connection_pool,
    ] {
        assert_eq!(pool.max_connections, Some(100));
        assert_eq!(pool.http1_max_pending_requests, Some(50));
        assert_eq!(pool.max_requests_per_connection, Some(2));
    }
    assert_eq!(d.subsets["v2"].labels["version"], "v2");
}

#[test]
fn seed_security_policies_compile_to_strict_mtls_and_a_productpage_get_rule() {
    let s = example("bookinfo-canary")
        .compile("east", "abc", &Options::default())
        .unwrap();
    assert_eq!(s.policy.mtls.mesh, MtlsMode::Strict);
    let [a] = &s.policy.authz[..] else {
        panic!("{:?}", s.policy.authz)
    };
    assert_eq!(a.action, AuthzAction::Allow);
    assert_eq!(a.scope, AuthzScope::Workload);
    assert_eq!(a.selector["app"], "reviews");
    assert_eq!(
        a.rules[0].from[0].principals,
        ["cluster.local/ns/default/sa/productpage"]
    );
    assert_eq!(a.rules[0].to[0].methods, ["GET"]);
}

#[test]
fn seed_canary_sends_internal_users_to_v2_and_5_percent_of_the_rest() {
    let s = example("bookinfo-canary")
        .compile("east", "abc", &Options::default())
        .unwrap();
    let http = &s.policy.routes[REVIEWS].http;
    assert_eq!(
        http[0].matches[0].headers["user-type"],
        StringMatch::Exact("internal".into())
    );
    assert_eq!(http[0].destinations[0].subset.as_deref(), Some("v2"));
    let weights: Vec<u32> = http[1].destinations.iter().map(|d| d.weight).collect();
    assert_eq!(weights, [95, 5]);
}

#[test]
fn cross_cluster_split_is_70_30_between_cluster_subsets() {
    let a = example("multicluster-failover");
    assert_eq!(
        a.clusters().into_iter().collect::<Vec<_>>(),
        ["east", "west"]
    );
    let s = a.compile("east", "c0ffee", &Options::default()).unwrap();
    let ratings = "ratings.default.svc.cluster.local";
    let d = &s.policy.routes[ratings].http[0].destinations;
    assert_eq!(
        d.iter()
            .map(|d| (d.subset.clone().unwrap(), d.weight))
            .collect::<Vec<_>>(),
        [("east".to_string(), 70), ("west".to_string(), 30)]
    );
    let subsets = &s.policy.destinations[ratings].subsets;
    assert_eq!(subsets["west"].cluster(), Some("west"));
    assert_eq!(
        s.policy.exports[ratings].iter().collect::<Vec<_>>(),
        ["east", "west"]
    );
    assert_eq!(
        s.policy.clusters["west"].gateways,
        ["gw.west.example.com:15443", "10.0.2.10:15443"]
    );
    let retries = &s.policy.routes[ratings].http[0].retries;
    assert_eq!(
        (retries.attempts, retries.per_try_timeout_ms),
        (3, Some(500))
    );
    assert_eq!(s.policy.routes[ratings].http[0].timeout_ms, Some(2000));
}

#[test]
fn each_cluster_gets_only_the_resources_targeted_at_it() {
    let clusters = "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {name: east}\nspec: {gateways: ['e:1']}\n---\napiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {name: west}\nspec: {gateways: ['w:1']}\n";
    let east_only = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, annotations: {meshfed.io/clusters: east}}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews}}]}]\n";
    let a = files(&[clusters, east_only]);
    let opts = Options::default();
    let east = a.compile("east", "v", &opts).unwrap();
    let west = a.compile("west", "v", &opts).unwrap();
    assert!(east.policy.routes.contains_key(REVIEWS));
    assert!(west.policy.routes.is_empty());
    assert_ne!(east.content_hash, west.content_hash);
}

#[test]
fn subset_traffic_policy_replaces_the_top_level_part_it_sets() {
    let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 10}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 7}}
";
    let s = files(&[dr])
        .compile("any", "v", &Options::default())
        .unwrap();
    let d = &s.policy.destinations[REVIEWS];
    assert_eq!(
        d.subsets["v1"]
            .traffic_policy
            .connection_pool
            .max_connections,
        Some(10)
    );
    let v2 = &d.subsets["v2"].traffic_policy;
    assert_eq!(
        v2.connection_pool.max_connections, None,
        "the subset's pool replaces the whole pool"
    );
    assert_eq!(v2.connection_pool.http2_max_requests, Some(7));
    assert_eq!(
        v2.load_balancer.algorithm,
        LbAlgorithm::Random,
        "unset parts are inherited"
    );
}

#[test]
fn peer_authentication_resolves_from_workload_to_namespace_to_mesh() {
    let pa = |name: &str, ns: &str, extra: &str, mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{{extra}mtls: {{mode: {mode}}}}}\n"
        )
    };
    let s = files(&[
        &pa("mesh", "istio-system", "", "STRICT"),
        &pa("legacy", "legacy", "", "PERMISSIVE"),
        &pa(
            "db",
            "legacy",
            "selector: {matchLabels: {app: db}}, ",
            "UNSET",
        ),
    ])
    .compile("any", "v", &Options::default())
    .unwrap();
    let m = &s.policy.mtls;
    assert_eq!(m.mesh, MtlsMode::Strict);
    assert_eq!(m.namespaces["legacy"], MtlsMode::Permissive);
    assert_eq!(
        m.workloads[0].mode,
        MtlsMode::Permissive,
        "UNSET inherits the namespace"
    );
}

#[test]
fn routes_without_retries_get_istios_default_retry_policy() {
    let s = example("bookinfo-mobile")
        .compile("east", "v", &Options::default())
        .unwrap();
    let r = &s.policy.routes[REVIEWS].http[0].retries;
    assert_eq!(r.attempts, 2);
    assert!(r.retry_on.iter().any(|c| c == "connect-failure"));
}

#[test]
fn compile_refuses_invalid_policy_and_undeclared_clusters() {
    let bad = files(&[
        "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {name: east}\nspec: {gateways: []}\n",
    ]);
    assert!(matches!(
        bad.compile("east", "v", &Options::default()),
        Err(CompileError::Invalid(1))
    ));
    let a = example("multicluster-failover");
    let err = a.compile("north", "v", &Options::default()).unwrap_err();
    assert!(err.to_string().contains("east, west"), "{err}");
}

#[test]
fn compile_output_does_not_depend_on_paths_or_comments() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multicluster-failover");
    let (mut files, _) = read_paths(&[dir], &Selection::default());
    let opts = Options::default();
    let before = analyze(files.clone(), &opts)
        .compile("east", "v", &opts)
        .unwrap();
    for (name, bytes) in &mut files {
        *name = format!("elsewhere/{name}");
        bytes.splice(
            0..0,
            b"# a comment that shifts every line\n".iter().copied(),
        );
    }
    let after = analyze(files, &opts).compile("east", "v", &opts).unwrap();
    assert_eq!(before.content_hash, after.content_hash);
    assert_eq!(before.policy, after.policy);
    assert_ne!(before.origins, after.origins, "origins do follow the files");
}

#[test]
fn a_short_service_account_names_one_in_the_policys_own_namespace() {
    let a = files(&["apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - from:
    - source: {serviceAccounts: [sa, other/sb]}
    - source: {notServiceAccounts: [sc]}
"]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    let s = a.compile("east", "abc", &Options::default()).unwrap();
    let from = &s.policy.authz[0].rules[0].from;
    assert_eq!(from[0].service_accounts, ["shop/sa", "other/sb"]);
    assert_eq!(from[1].not_service_accounts, ["shop/sc"]);
}

#[test]
fn a_quoted_port_level_mtls_key_is_the_same_port() {
    let a = files(&["apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: x}}
  mtls: {mode: STRICT}
  portLevelMtls:
    \"8080\": {mode: DISABLE}
"]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    let s = a.compile("east", "abc", &Options::default()).unwrap();
    let pa = s
        .policy
        .mtls
        .workloads
        .first()
        .expect("one workload policy");
    assert_eq!(pa.ports.get(&8080), Some(&MtlsMode::Disable));
}

#[test]
fn trust_domains_compile_to_principal_patterns() {
    let a = files(&["apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - from:
    - source: {trustDomains: [cluster.local, 'east*', '*']}
    - source: {notTrustDomains: [untrusted], namespaces: [shop]}
"]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    let s = a.compile("east", "abc", &Options::default()).unwrap();
    let from = &s.policy.authz[0].rules[0].from;
    assert_eq!(from[0].principals, ["cluster.local/*", "east*", "*"]);
    assert_eq!(from[1].not_principals, ["untrusted/*"]);
    assert_eq!(from[1].namespaces, ["shop"]);
}

#[test]
fn setting_the_authority_header_compiles_to_an_authority_rewrite() {
    let a = files(&["apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: default}
spec:
  hosts: [reviews]
  http:
  - headers:
      request:
        set: {':authority': foo.example, x-a: b}
    rewrite: {uri: /v2}
    route:
    - destination: {host: reviews}
"]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    let s = a.compile("east", "abc", &Options::default()).unwrap();
    let route = &s.policy.routes[REVIEWS].http[0];
    let rw = route.rewrite.as_ref().expect("a rewrite");
    assert_eq!(rw.authority.as_deref(), Some("foo.example"));
    assert_eq!(rw.uri.as_deref(), Some("/v2"));
    assert!(!route.request_headers.set.contains_key(":authority"));
    assert_eq!(route.request_headers.set["x-a"], "b");
}
