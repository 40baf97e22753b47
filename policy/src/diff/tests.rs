//! The diff engine on whole repositories: YAML through [`crate::analyze`]
//! and [`crate::Analysis::compile`], as the CLI and the syncer get them, so
//! the tests pin the sentences reviewers read.

use std::collections::BTreeMap;

use super::*;
use crate::{Options, analyze};

/// Compiles every declared cluster of `files` (name, text).
fn compile(files: &[(&str, &str)]) -> BTreeMap<String, Snapshot> {
    let opts = Options::default();
    let a = analyze(files.iter().map(|(n, t)| (*n, *t)), &opts);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    a.clusters()
        .into_iter()
        .map(|c| {
            let s = a.compile(&c, "v", &opts).expect("compiles");
            (c, s)
        })
        .collect()
}

fn report(old: &[(&str, &str)], new: &[(&str, &str)]) -> Report {
    diff_clusters(&compile(old), &compile(new))
}

/// Every sentence of `cluster`.
fn sentences(r: &Report, cluster: &str) -> Vec<String> {
    r.clusters
        .iter()
        .find(|c| c.cluster == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {r:#?}"))
        .changes
        .iter()
        .map(|c| c.summary.clone())
        .collect()
}

fn status(r: &Report, cluster: &str) -> Status {
    r.clusters
        .iter()
        .find(|c| c.cluster == cluster)
        .map(|c| c.status)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {r:#?}"))
}

const CLUSTERS: &str = "apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['gw.east:15443'], locality: {region: us-east1, zone: a}}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {gateways: ['gw.west:15443'], locality: {region: us-west1, zone: a}}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: edge}
spec: {gateways: ['gw.edge:15443'], locality: {region: eu-edge1, zone: a}}
";

const DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

/// A VirtualService for reviews, only in `east`, with `http` as its rules.
fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
  annotations: {{meshfed.io/clusters: east}}
spec:
  hosts: [reviews]
  http:
{http}"
    )
}

const V1_ONLY: &str = "  - route:
    - destination: {host: reviews, subset: v1}
";

const V1_55_V2_45: &str = "  - route:
    - destination: {host: reviews, subset: v1}
      weight: 55
    - destination: {host: reviews, subset: v2}
      weight: 45
";

#[test]
fn reordering_and_moving_resources_between_files_is_no_effective_change() {
    let vs = vs(V1_ONLY);
    let old = [
        ("clusters.yaml", CLUSTERS),
        ("dr.yaml", DR),
        ("vs.yaml", vs.as_str()),
    ];
    // The same resources, reordered, in other files, with comments and
    // other whitespace and key order.
    let reordered_dr = "# reviews subsets\nkind: DestinationRule\napiVersion: networking.istio.io/v1\nmetadata: {namespace: default, name: reviews}\nspec:\n  subsets:\n    - labels: {version: v1}\n      name: v1\n    - {labels: {version: v2}, name: v2}\n  host: reviews\n";
    let together = format!("{vs}---\n{reordered_dr}");
    let new = [
        ("all/routing.yaml", together.as_str()),
        ("z.yaml", CLUSTERS),
    ];
    let r = report(&old, &new);
    assert!(!r.changed(), "{r:#?}");
    for c in ["east", "west", "edge"] {
        assert_eq!(status(&r, c), Status::Unchanged);
        assert!(sentences(&r, c).is_empty());
    }
    assert!(
        r.text().contains("no change for cluster east"),
        "{}",
        r.text()
    );
    assert!(r.summary_line().starts_with("no effective change"));
}

#[test]
fn a_weight_change_says_how_much_traffic_moves_and_where() {
    let (a, b) = (vs(V1_ONLY), vs(V1_55_V2_45));
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &b)],
    );
    let east = &r
        .clusters
        .iter()
        .find(|c| c.cluster == "east")
        .unwrap()
        .changes;
    assert_eq!(east.len(), 1, "{east:#?}");
    assert_eq!(east[0].kind, "traffic-moved");
    assert_eq!(east[0].moved_percent, Some(45));
    assert_eq!(
        east[0].summary,
        "reviews.default: 45% of requests move from subset v1 to subset v2 \
         (subset v1 100% → 55%, subset v2 0% → 45%)"
    );
    // The VirtualService applies to east only.
    assert_eq!(status(&r, "west"), Status::Unchanged);
    assert_eq!(status(&r, "edge"), Status::Unchanged);
    assert!(
        r.text()
            .contains("east: reviews.default: 45% of requests move")
    );
}

#[test]
fn traffic_moved_is_the_sum_of_increases_across_several_destinations() {
    let a = vs("  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: 50
");
    let b = vs("  - route:
    - destination: {host: reviews, subset: v1}
      weight: 20
    - destination: {host: reviews, subset: v2}
      weight: 60
    - destination: {host: ratings}
      weight: 20
");
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &b)],
    );
    let east = &r
        .clusters
        .iter()
        .find(|c| c.cluster == "east")
        .unwrap()
        .changes;
    let moved: Vec<_> = east.iter().filter(|c| c.kind == "traffic-moved").collect();
    assert_eq!(moved.len(), 1, "{east:#?}");
    assert_eq!(moved[0].moved_percent, Some(30));
    assert_eq!(
        moved[0].summary,
        "reviews.default: 30% of requests move from subset v1 to ratings.default, subset v2 \
         (ratings.default 0% → 20%, subset v1 50% → 20%, subset v2 50% → 60%)"
    );
}

#[test]
fn timeouts_retries_faults_and_mirrors_each_get_a_sentence() {
    let a = vs("  - match: [{uri: {prefix: /api}}]
    route:
    - destination: {host: reviews, subset: v1}
    timeout: 2s
  - route:
    - destination: {host: reviews, subset: v1}
");
    let b = vs("  - match: [{uri: {prefix: /api}}]
    route:
    - destination: {host: reviews, subset: v1}
    timeout: 5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: 5xx}
    fault: {abort: {httpStatus: 503, percentage: {value: 10}}}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 25}
  - route:
    - destination: {host: reviews, subset: v1}
");
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &b)],
    );
    let s = sentences(&r, "east");
    let want = [
        "reviews.default (/api*): timeout 2s → 5s",
        "reviews.default (/api*): retries 2 attempt(s) on connect-failure,refused-stream,unavailable,cancelled,503 → 3 attempt(s) of 500ms each on 5xx",
        "reviews.default (/api*): new fault injection: abort with HTTP 503 for 10% of requests",
        "reviews.default (/api*): now mirrors 25% of requests to reviews.default/v2",
    ];
    for w in want {
        assert!(s.iter().any(|x| x == w), "missing {w:?} in {s:#?}");
    }
    assert_eq!(s.len(), want.len(), "{s:#?}");
}

#[test]
fn a_new_rule_and_a_new_rule_order_are_named() {
    let a = vs("  - match: [{headers: {end-user: {exact: jason}}}]
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
");
    let b = vs("  - route:
    - destination: {host: reviews, subset: v1}
  - match: [{headers: {end-user: {exact: jason}}}]
    route:
    - destination: {host: reviews, subset: v2}
  - match: [{method: {exact: GET}, uri: {prefix: /admin}}]
    route:
    - destination: {host: reviews, subset: v2}
");
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &b)],
    );
    let s = sentences(&r, "east");
    assert!(
        s.contains(&"reviews.default: new rule 3 of 3: GET /admin* → subset v2 100%".to_string()),
        "{s:#?}"
    );
    assert!(
        s.contains(
            &"reviews.default: rules are tried in a new order (the first match wins): \
              [header end-user=jason; any request] → [any request; header end-user=jason]"
                .to_string()
        ),
        "{s:#?}"
    );
}

fn ratings_dr(failover_to: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings, namespace: default}}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover:
        - {{from: eu-edge1, to: {failover_to}}}
"
    )
}

/// ratings is exported by east and west only.
fn ratings_export() -> String {
    "apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: ratings
  namespace: default
  annotations: {meshfed.io/clusters: 'east,west'}
"
    .to_string()
}

#[test]
fn a_failover_change_shows_the_order_each_cluster_tries() {
    let export = ratings_export();
    let (a, b) = (ratings_dr("us-east1"), ratings_dr("us-west1"));
    let r = report(
        &[("c.yaml", CLUSTERS), ("e.yaml", &export), ("dr.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("e.yaml", &export), ("dr.yaml", &b)],
    );
    let s = sentences(&r, "edge");
    assert!(
        s.contains(
            &"failover order for ratings.default changes from [east, west] to [west, east]"
                .to_string()
        ),
        "{s:#?}"
    );
    // east and west serve ratings themselves first; only the rule's
    // text changed for them.
    for c in ["east", "west"] {
        let s = sentences(&r, c);
        assert!(
            !s.iter().any(|x| x.contains("failover order")),
            "{c}: {s:#?}"
        );
        assert!(
            s.iter().any(|x| x.contains("locality load balancing")),
            "{c}: {s:#?}"
        );
    }
}

#[test]
fn a_new_deny_names_its_target_operation_and_sources() {
    let deny = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - to:
    - operation: {methods: [GET], paths: ['/admin/*']}
";
    let r = report(
        &[("c.yaml", CLUSTERS)],
        &[("c.yaml", CLUSTERS), ("authz.yaml", deny)],
    );
    for c in ["east", "west", "edge"] {
        let ch = &r.clusters.iter().find(|x| x.cluster == c).unwrap().changes;
        assert_eq!(ch.len(), 1, "{ch:#?}");
        assert_eq!(ch[0].area, Area::Authz);
        assert_eq!(
            ch[0].summary,
            "new DENY on ratings.default for GET /admin/* from any source \
             (AuthorizationPolicy default/deny-admin)"
        );
    }
    // Renamed, same rules: said as a rename.
    let renamed = deny.replace("deny-admin", "no-admin");
    let r = report(
        &[("c.yaml", CLUSTERS), ("authz.yaml", deny)],
        &[("c.yaml", CLUSTERS), ("authz.yaml", &renamed)],
    );
    let ch = &r.clusters[0].changes;
    assert_eq!(ch.len(), 1, "{ch:#?}");
    assert_eq!(ch[0].kind, "renamed");
    // A new rule in an existing policy.
    let more = format!("{deny}  - from:\n    - source: {{namespaces: [untrusted]}}\n");
    let r = report(
        &[("c.yaml", CLUSTERS), ("authz.yaml", deny)],
        &[("c.yaml", CLUSTERS), ("authz.yaml", &more)],
    );
    assert_eq!(
        sentences(&r, "east"),
        [
            "AuthorizationPolicy default/deny-admin: new DENY on ratings.default for any request from namespace untrusted"
        ]
    );
}

#[test]
fn destination_rule_changes_name_subsets_load_balancing_limits_and_outlier_detection() {
    let b = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", b)],
    );
    let s = sentences(&r, "west");
    let want = [
        "reviews.default: load balancing LEAST_REQUEST → ROUND_ROBIN",
        "reviews.default: connection limits: max_connections: unlimited → 100",
        "reviews.default: outlier detection on: eject after 3 consecutive 5xx, every 1s, for 30s at least, at most 10% ejected, panic under 0% healthy",
        "reviews.default: new subset v3 (version=v3)",
    ];
    for w in want {
        assert!(s.iter().any(|x| x == w), "missing {w:?} in {s:#?}");
    }
    assert_eq!(s.len(), want.len(), "subsets inherit: said once: {s:#?}");
}

#[test]
fn exports_mtls_and_new_clusters_are_reported() {
    let export = ratings_export();
    let strict = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";
    let north = "apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: north}
spec: {gateways: ['gw.north:15443']}
";
    let r = report(
        &[("c.yaml", CLUSTERS)],
        &[
            ("c.yaml", CLUSTERS),
            ("n.yaml", north),
            ("e.yaml", &export),
            ("pa.yaml", strict),
        ],
    );
    let s = sentences(&r, "east");
    for w in [
        "cluster north joins the federation (gateways gw.north:15443)",
        "ratings.default: now exported from east, west",
        "mTLS mesh-wide: PERMISSIVE → STRICT",
    ] {
        assert!(s.iter().any(|x| x == w), "missing {w:?} in {s:#?}");
    }
    assert_eq!(status(&r, "north"), Status::Added);
    let text = r.text();
    assert!(text.contains("north: new cluster"), "{text}");
}

#[test]
fn any_difference_gives_at_least_one_change() {
    // Fields without a sentence of their own (header edits, rewrites,
    // per-destination headers) are listed field by field.
    let a = vs(V1_ONLY);
    let b = vs("  - route:
    - destination: {host: reviews, subset: v1}
      headers: {request: {set: {x-canary: '1'}}}
    headers: {response: {remove: [server]}}
    rewrite: {uri: /v2}
");
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &b)],
    );
    let s = sentences(&r, "east");
    assert!(
        s.iter().any(|x| x.contains("rewrite.uri: unset → /v2")),
        "{s:#?}"
    );
    assert!(
        s.iter().any(|x| x.contains("response_headers.remove")),
        "{s:#?}"
    );
    assert!(s.iter().any(|x| x.contains("x-canary")), "{s:#?}");
    // And the engine's own guarantee, on a policy edited by hand.
    let mut p = compile(&[("c.yaml", CLUSTERS)])["east"].policy.clone();
    let q = p.clone();
    p.trust_domain = "example.org".into();
    assert!(!diff(&q, &p).is_empty());
    assert!(diff(&q, &q).is_empty());
}

#[test]
fn markdown_escapes_paths_and_lists_unchanged_clusters_once() {
    let deny = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default, annotations: {meshfed.io/clusters: west}}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ['/admin/*']}
";
    let r = report(
        &[("c.yaml", CLUSTERS)],
        &[("c.yaml", CLUSTERS), ("a.yaml", deny)],
    );
    let md = r.markdown("abc1234", "def5678");
    assert!(md.starts_with("<!-- meshfed-policy-diff -->\n"), "{md}");
    assert!(
        md.contains("#### `west`\n\n- new DENY on ratings.default for /admin/\\* from any source"),
        "{md}"
    );
    assert!(md.contains("No change for `east`, `edge`."), "{md}");
    assert!(!md.contains("#### `east`"), "{md}");
}

/// A dry-run policy is counted, never enforced: an ALLOW without rules in
/// dry-run denies nothing, and the sentence must not say it does.
#[test]
fn a_dry_run_allow_without_rules_is_said_to_deny_nothing_for_real() {
    let allow = |dry: bool| {
        format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-readers
  namespace: default
  annotations: {{istio.io/dry-run: '{dry}'}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
"
        )
    };
    for (dry, wanted, unwanted) in [
        (true, "would be denied", "is denied"),
        (false, "is denied", "would be denied"),
    ] {
        let r = report(
            &[("c.yaml", CLUSTERS)],
            &[("c.yaml", CLUSTERS), ("authz.yaml", &allow(dry))],
        );
        let said = sentences(&r, "east").join("\n");
        assert!(
            said.contains(wanted) && !said.contains(unwanted),
            "dry-run {dry}: {said}"
        );
    }
}

#[test]
fn reordering_lists_whose_order_means_nothing_is_no_effective_change() {
    let authz = |rules: &str| {
        format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ratings-callers, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: ALLOW
  rules:
{rules}"
        )
    };
    let a = authz(
        "  - from:
    - source: {principals: [cluster.local/ns/default/sa/a, cluster.local/ns/default/sa/b]}
    to:
    - operation: {methods: [GET, HEAD], paths: ['/x', '/y']}
  - to:
    - operation: {methods: [POST]}
",
    );
    // Rules, principals, methods and paths in another order; the split's
    // destinations too.
    let b = authz(
        "  - to:
    - operation: {methods: [POST]}
  - to:
    - operation: {paths: ['/y', '/x'], methods: [HEAD, GET]}
    from:
    - source: {principals: [cluster.local/ns/default/sa/b, cluster.local/ns/default/sa/a]}
",
    );
    let split = vs(V1_55_V2_45);
    let swapped = vs("  - route:
    - destination: {host: reviews, subset: v2}
      weight: 45
    - destination: {host: reviews, subset: v1}
      weight: 55
");
    let old = [
        ("c.yaml", CLUSTERS),
        ("dr.yaml", DR),
        ("vs.yaml", split.as_str()),
        ("authz.yaml", a.as_str()),
    ];
    let new = [
        ("c.yaml", CLUSTERS),
        ("dr.yaml", DR),
        ("vs.yaml", swapped.as_str()),
        ("authz.yaml", b.as_str()),
    ];
    let r = report(&old, &new);
    assert!(!r.changed(), "{:#?}", sentences(&r, "east"));
    // A real change among the reordered items is still seen.
    let c = b.replace("[HEAD, GET]", "[HEAD, GET, DELETE]");
    let changed = [
        ("c.yaml", CLUSTERS),
        ("dr.yaml", DR),
        ("vs.yaml", swapped.as_str()),
        ("authz.yaml", c.as_str()),
    ];
    let r = report(&old, &changed);
    assert!(r.changed());
    let s = sentences(&r, "east").join("\n");
    assert!(s.contains("DELETE"), "{s}");
}

#[test]
fn control_characters_from_the_repository_are_escaped_in_sentences() {
    let plain = vs(V1_ONLY);
    let coloured = vs("  - headers:
      request:
        set: {x-note: \"\\e[31mred\\nfake: line\"}
    route:
    - destination: {host: reviews, subset: v1}
");
    let old = [
        ("c.yaml", CLUSTERS),
        ("dr.yaml", DR),
        ("vs.yaml", plain.as_str()),
    ];
    let new = [
        ("c.yaml", CLUSTERS),
        ("dr.yaml", DR),
        ("vs.yaml", coloured.as_str()),
    ];
    let r = report(&old, &new);
    let text = r.text();
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(text.contains("\\u{1b}[31mred\\nfake: line"), "{text}");
    // One line per change: the value's newline did not start another.
    assert!(!text.lines().any(|l| l.starts_with("fake:")), "{text}");
}

/// What east's changes reach, folded.
fn reached(r: &Report, cluster: &str) -> Reached {
    let c = r.clusters.iter().find(|c| c.cluster == cluster).unwrap();
    Reached::of(&c.changes, "cluster.local")
}

#[test]
fn a_route_change_reaches_its_host_and_the_hosts_its_rules_send_to() {
    let (a, b) = (vs(V1_ONLY), vs(V1_55_V2_45));
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &b)],
    );
    let east = reached(&r, "east");
    assert!(
        east.contains("reviews.default.svc.cluster.local"),
        "{east:?}"
    );
    assert!(
        !east.contains("ratings.default.svc.cluster.local"),
        "{east:?}"
    );
    assert!(!east.everything);
    // West's policy is unchanged: nothing reached there.
    assert!(reached(&r, "west").is_empty());
    // Routes that move reviews to another host reach that host too.
    let elsewhere = vs("  - route:\n    - destination: {host: reviews-next}\n");
    let r = report(
        &[("c.yaml", CLUSTERS), ("dr.yaml", DR), ("vs.yaml", &a)],
        &[
            ("c.yaml", CLUSTERS),
            ("dr.yaml", DR),
            ("vs.yaml", &elsewhere),
        ],
    );
    let east = reached(&r, "east");
    for host in [
        "reviews.default.svc.cluster.local",
        "reviews-next.default.svc.cluster.local",
    ] {
        assert!(east.contains(host), "{host}: {east:?}");
    }
    assert!(!east.contains("details.default.svc.cluster.local"));
}

#[test]
fn authorization_and_mtls_reach_their_namespace_and_mesh_wide_settings_everything() {
    let deny = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ['/admin/*']}
";
    let r = report(
        &[("c.yaml", CLUSTERS)],
        &[("c.yaml", CLUSTERS), ("authz.yaml", deny)],
    );
    let east = reached(&r, "east");
    // Which workloads the selector picks only discovery knows: every
    // service of the namespace is judged.
    assert!(east.contains("ratings.shop.svc.cluster.local"));
    assert!(east.contains("cart.shop.svc.cluster.local"));
    assert!(!east.contains("ratings.default.svc.cluster.local"));
    assert!(!east.contains("api.example.com"));
    let strict = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";
    let r = report(
        &[("c.yaml", CLUSTERS)],
        &[("c.yaml", CLUSTERS), ("pa.yaml", strict)],
    );
    assert!(reached(&r, "east").contains("api.example.com"));
    // JSON says it per change.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["clusters"][0]["changes"][0]["reaches"],
        serde_json::json!(["everything"])
    );
}

#[test]
fn a_change_that_says_nothing_of_its_reach_reaches_everything_and_wildcards_their_subdomains() {
    let mut c = Change::new(Area::Route, "x", "added", "x".into());
    c.reaches.clear();
    assert!(Reached::of(&[c], "cluster.local").contains("anything.default.svc.cluster.local"));
    let mut c = Change::new(Area::ServiceEntry, "x", "added", "x".into());
    c.reaches = vec![Reach::Service("*.example.com".into())];
    let r = Reached::of(&[c], "cluster.local");
    assert!(r.contains("api.example.com"));
    assert!(!r.contains("example.com"));
    assert!(!r.contains("api.example.org"));
}
