//! One failing and one passing case per rule. Each case is a whole
//! repository (one or more YAML files) run through [`crate::analyze`], so
//! the tests pin what users see, not how a rule is implemented.

use crate::diag::{Code, Severity};
use crate::{Analysis, Options, analyze};

fn run(files: &[&str]) -> Analysis {
    let named: Vec<(String, &str)> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("f{i}.yaml"), *f))
        .collect();
    analyze(named, &Options::default())
}

fn has(a: &Analysis, code: Code) -> bool {
    a.diagnostics.iter().any(|d| d.code == code)
}

/// `bad` must produce `code`; `good` must not, and must be valid.
fn rule(code: Code, bad: &[&str], good: &[&str]) {
    let b = run(bad);
    assert!(has(&b, code), "expected {code} in {:#?}", b.diagnostics);
    if code.severity() == Severity::Error {
        assert!(!b.is_valid());
    }
    let g = run(good);
    assert!(!has(&g, code), "unexpected {code} in {:#?}", g.diagnostics);
    assert!(g.is_valid(), "good case invalid: {:#?}", g.diagnostics);
}

const DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

const CLUSTERS: &str = "apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {gateways: ['gw.east:15443']}
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: west}
spec: {gateways: ['gw.west:15443']}
";

/// A VirtualService for `reviews` whose first http rule is `rule`.
fn vs(rule: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - {rule}
"
    )
}

fn dr_with(policy: &str) -> String {
    format!("{DR}  trafficPolicy: {policy}\n")
}

fn authz(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  rules: {rules}
"
    )
}

const ROUTE_V1: &str = "route: [{destination: {host: reviews, subset: v1}}]";

#[test]
fn unknown_fields_are_errors_with_a_suggestion() {
    let bad = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  htp: []\n";
    rule(Code::UnknownField, &[bad], &[&vs(ROUTE_V1), DR]);
    let d = &run(&[bad]).diagnostics[0];
    assert_eq!((d.line, d.column), (6, 3));
    assert_eq!(d.hint.as_deref(), Some("did you mean `http`?"));
}

#[test]
fn wrong_types_are_errors() {
    let bad = vs("route: [{destination: {host: reviews, subset: v1}, weight: fifty}]");
    rule(Code::InvalidType, &[&bad, DR], &[&vs(ROUTE_V1), DR]);
}

#[test]
fn unknown_enum_values_are_errors() {
    rule(
        Code::InvalidType,
        &[&dr_with("{loadBalancer: {simple: ROUND_ROBINN}}")],
        &[&dr_with("{loadBalancer: {simple: ROUND_ROBIN}}")],
    );
}

#[test]
fn required_fields_must_be_present() {
    let no_host = vs("route: [{destination: {subset: v1}}]");
    rule(Code::MissingField, &[&no_host, DR], &[&vs(ROUTE_V1), DR]);
    let no_name =
        "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {}\nspec: {gateways: ['a:1']}\n";
    rule(Code::MissingField, &[no_name], &[CLUSTERS]);
}

#[test]
fn durations_must_parse_and_be_at_least_a_millisecond() {
    rule(
        Code::InvalidDuration,
        &[&vs(&format!("{ROUTE_V1}\n    timeout: 5 sec")), DR],
        &[&vs(&format!("{ROUTE_V1}\n    timeout: 5s")), DR],
    );
    rule(
        Code::InvalidDuration,
        &[
            &vs(&format!(
                "{ROUTE_V1}\n    retries: {{attempts: 2, perTryTimeout: 0.1ms}}"
            )),
            DR,
        ],
        &[
            &vs(&format!(
                "{ROUTE_V1}\n    retries: {{attempts: 2, perTryTimeout: 100ms}}"
            )),
            DR,
        ],
    );
}

#[test]
fn a_duration_without_unit_gets_a_hint() {
    let a = run(&[&vs(&format!("{ROUTE_V1}\n    timeout: 5")), DR]);
    let d = a
        .diagnostics
        .iter()
        .find(|d| d.code == Code::InvalidType)
        .unwrap();
    assert!(d.hint.as_deref().unwrap_or("").contains("`5s`"), "{d}");
}

#[test]
fn percentages_are_within_0_and_100() {
    let fault = |v: &str| {
        vs(&format!(
            "{ROUTE_V1}\n    fault: {{abort: {{httpStatus: 503, percentage: {{value: {v}}}}}}}"
        ))
    };
    rule(
        Code::InvalidPercent,
        &[&fault("150"), DR],
        &[&fault("12.5"), DR],
    );
}

#[test]
fn numbers_are_within_their_ranges() {
    let abort = |s: &str| {
        vs(&format!(
            "{ROUTE_V1}\n    fault: {{abort: {{httpStatus: {s}}}}}"
        ))
    };
    rule(Code::OutOfRange, &[&abort("700"), DR], &[&abort("503"), DR]);
    let port = |p: &str| {
        vs(&format!(
            "route: [{{destination: {{host: reviews, port: {{number: {p}}}}}}}]"
        ))
    };
    rule(Code::OutOfRange, &[&port("70000")], &[&port("9080")]);
    rule(
        Code::OutOfRange,
        &[&dr_with("{outlierDetection: {maxEjectionPercent: 101}}")],
        &[&dr_with("{outlierDetection: {maxEjectionPercent: 100}}")],
    );
}

#[test]
fn regexes_must_compile() {
    let m = |re: &str| {
        vs(&format!(
            "match: [{{headers: {{user-agent: {{regex: '{re}'}}}}}}]\n    {ROUTE_V1}"
        ))
    };
    rule(
        Code::InvalidRegex,
        &[&m("(unclosed"), DR],
        &[&m(".*mobile.*"), DR],
    );
}

#[test]
fn a_string_match_has_exactly_one_of_exact_prefix_regex() {
    let m = |sm: &str| vs(&format!("match: [{{uri: {sm}}}]\n    {ROUTE_V1}"));
    rule(
        Code::StringMatchOneOf,
        &[&m("{exact: /a, prefix: /b}"), DR],
        &[&m("{prefix: /b}"), DR],
    );
    rule(
        Code::StringMatchOneOf,
        &[&m("{}"), DR],
        &[&m("{exact: /a}"), DR],
    );
}

#[test]
fn weights_of_several_destinations_sum_to_100() {
    let split = |a: u32, b: u32| {
        vs(&format!(
            "route: [{{destination: {{host: reviews, subset: v1}}, weight: {a}}}, {{destination: {{host: reviews, subset: v2}}, weight: {b}}}]"
        ))
    };
    rule(
        Code::WeightsSum,
        &[&split(50, 40), DR],
        &[&split(80, 20), DR],
    );
    // One destination needs no weight.
    rule(
        Code::WeightsSum,
        &[&split(100, 1), DR],
        &[&vs(ROUTE_V1), DR],
    );
}

#[test]
fn referenced_subsets_must_be_defined_for_the_host() {
    let to = |s: &str| {
        vs(&format!(
            "route: [{{destination: {{host: reviews, subset: {s}}}}}]"
        ))
    };
    rule(Code::UnknownSubset, &[&to("v3"), DR], &[&to("v2"), DR]);
    // The subset of another host does not count.
    let other = DR.replace("host: reviews", "host: ratings");
    rule(Code::UnknownSubset, &[&to("v1"), &other], &[&to("v1"), DR]);
    // Mirrors are references too.
    let mirror = |s: &str| {
        vs(&format!(
            "{ROUTE_V1}\n    mirror: {{host: reviews, subset: {s}}}"
        ))
    };
    rule(
        Code::UnknownSubset,
        &[&mirror("v9"), DR],
        &[&mirror("v2"), DR],
    );
}

#[test]
fn a_subset_must_be_defined_in_every_cluster_the_route_applies_to() {
    let dr_west = DR.replace(
        "metadata: {name: reviews}",
        "metadata: {name: reviews, annotations: {meshfed.io/clusters: west}}",
    );
    let vs_all = vs(ROUTE_V1);
    let a = run(&[CLUSTERS, &dr_west, &vs_all]);
    let d = a
        .diagnostics
        .iter()
        .find(|d| d.code == Code::UnknownSubset)
        .expect("east has no subset v1");
    assert!(d.message.contains("`east`"), "{}", d.message);
    assert!(!d.message.contains("`west`"), "{}", d.message);
    let vs_west = vs_all.replace(
        "metadata: {name: reviews}",
        "metadata: {name: reviews, annotations: {meshfed.io/clusters: west}}",
    );
    rule(
        Code::UnknownSubset,
        &[CLUSTERS, &dr_west, &vs_all],
        &[CLUSTERS, &dr_west, &vs_west],
    );
}

#[test]
fn referenced_clusters_must_be_declared() {
    let sub =
        |c: &str| format!("{DR}  - {{name: remote, labels: {{topology.istio.io/cluster: {c}}}}}\n");
    rule(
        Code::UnknownCluster,
        &[CLUSTERS, &sub("north")],
        &[CLUSTERS, &sub("west")],
    );
    let targeted = |c: &str| {
        DR.replace(
            "metadata: {name: reviews}",
            &format!(
                "metadata: {{name: reviews, annotations: {{meshfed.io/clusters: 'east,{c}'}}}}"
            ),
        )
    };
    rule(
        Code::UnknownCluster,
        &[CLUSTERS, &targeted("wset")],
        &[CLUSTERS, &targeted("west")],
    );
    let by_cluster = |c: &str| {
        authz(&format!(
            "[{{when: [{{key: source.cluster, values: [{c}]}}]}}]"
        ))
    };
    rule(
        Code::UnknownCluster,
        &[CLUSTERS, &by_cluster("north")],
        &[CLUSTERS, &by_cluster("east")],
    );
    let a = run(&[CLUSTERS, &targeted("wset")]);
    let d = a
        .diagnostics
        .iter()
        .find(|d| d.code == Code::UnknownCluster)
        .unwrap();
    assert!(
        d.hint
            .as_deref()
            .unwrap_or("")
            .contains("did you mean `west`?")
    );
}

#[test]
fn duplicate_resources_are_errors() {
    let other = vs("route: [{destination: {host: ratings}}]")
        .replace("hosts: [reviews]", "hosts: [ratings]");
    let renamed = other.replace("name: reviews}", "name: ratings}");
    rule(
        Code::DuplicateResource,
        &[&vs(ROUTE_V1), &other, DR],
        &[&vs(ROUTE_V1), &renamed, DR],
    );
    // Same name in another namespace is another resource.
    let other_ns = other.replace("{name: reviews}", "{name: reviews, namespace: prod}");
    rule(
        Code::DuplicateResource,
        &[&vs(ROUTE_V1), &other, DR],
        &[&vs(ROUTE_V1), &other_ns, DR],
    );
}

#[test]
fn duplicate_clusters_are_errors() {
    let east_again = "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {name: east}\nspec: {gateways: ['gw2.east:15443']}\n";
    let north = east_again.replace("east", "north");
    rule(
        Code::DuplicateResource,
        &[CLUSTERS, east_again],
        &[CLUSTERS, &north],
    );
}

#[test]
fn a_gateway_address_belongs_to_one_cluster() {
    let north = |addr: &str| {
        format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: north}}\nspec: {{gateways: ['{addr}']}}\n"
        )
    };
    rule(
        Code::DuplicateAddress,
        &[CLUSTERS, &north("gw.west:15443")],
        &[CLUSTERS, &north("gw.north:15443")],
    );
}

#[test]
fn gateway_addresses_are_host_port() {
    let c = |addr: &str| {
        format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: east}}\nspec: {{gateways: ['{addr}']}}\n"
        )
    };
    rule(
        Code::InvalidAddress,
        &[&c("gw.east")],
        &[&c("gw.east:15443")],
    );
    rule(
        Code::InvalidAddress,
        &[&c("::1:15443")],
        &[&c("[::1]:15443")],
    );
}

#[test]
fn unknown_kinds_and_versions_in_mesh_groups_are_errors() {
    let k = |api: &str, kind: &str| {
        format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\nspec: {{}}\n")
    };
    rule(
        Code::UnknownKind,
        &[&k("networking.istio.io/v1", "EnvoyFiltr")],
        &[&k("multicluster.x-k8s.io/v1alpha1", "ServiceExport")],
    );
    rule(
        Code::UnknownKind,
        &[&k("security.istio.io/v1beta2", "PeerAuthentication")],
        &[&k("security.istio.io/v1beta1", "PeerAuthentication")],
    );
}

#[test]
fn foreign_manifests_are_skipped_with_a_warning() {
    let deploy =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n";
    rule(Code::Foreign, &[deploy, DR], &[DR]);
    let a = run(&[deploy]);
    assert!(a.is_valid() && a.resources.is_empty());
}

#[test]
fn documents_that_are_not_resources_are_errors() {
    rule(Code::NotAResource, &["just: a map\n"], &[DR]);
    rule(Code::NotAResource, &["- a\n- list\n"], &[DR]);
}

#[test]
fn yaml_syntax_errors_and_duplicate_keys_are_errors() {
    rule(Code::YamlSyntax, &["apiVersion: [unclosed\n"], &[DR]);
    let dup = DR.replace(
        "kind: DestinationRule",
        "kind: DestinationRule\nkind: DestinationRule",
    );
    rule(Code::DuplicateKey, &[&dup], &[DR]);
}

#[test]
fn security_fields_meshfed_cannot_enforce_fail_closed() {
    let from = |src: &str| authz(&format!("[{{from: [{{source: {src}}}]}}]"));
    let good = from("{principals: [cluster.local/ns/default/sa/productpage]}");
    rule(
        Code::Unsupported,
        &[&from("{ipBlocks: [10.0.0.0/8]}")],
        &[&good],
    );
    rule(
        Code::Unsupported,
        &[&from("{requestPrincipals: ['*']}")],
        &[&good],
    );
    rule(
        Code::Unsupported,
        &[&authz("[{when: [{key: source.ip, values: [1.2.3.4]}]}]")],
        &[&good],
    );
    let custom = authz("[{}]").replace("rules:", "action: CUSTOM\n  rules:");
    rule(Code::Unsupported, &[&custom], &[&good]);
    rule(
        Code::Unsupported,
        &[&dr_with("{tls: {mode: SIMPLE, credentialName: my-secret}}")],
        &[&dr_with(
            "{tls: {mode: SIMPLE, caCertificates: /etc/certs/ca.pem}}",
        )],
    );
}

#[test]
fn fields_meshfed_ignores_that_do_not_affect_security_are_warnings() {
    let cors = vs(&format!(
        "{ROUTE_V1}\n    corsPolicy: {{allowOrigins: [{{exact: x}}]}}"
    ));
    rule(Code::NotEnforced, &[&cors, DR], &[&vs(ROUTE_V1), DR]);
    assert!(run(&[&cors, DR]).is_valid());
    let ingress = vs(ROUTE_V1).replace(
        "hosts: [reviews]",
        "hosts: [reviews]\n  gateways: [istio-system/ingress]",
    );
    rule(Code::ProxyKind, &[&ingress, DR], &[&vs(ROUTE_V1), DR]);
}

#[test]
fn kinds_that_istios_proxies_enforce_are_skipped_with_a_warning_naming_them() {
    let k = |api: &str, kind: &str| {
        format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\nspec: {{anything: [goes]}}\n"
        )
    };
    for (api, kind) in [
        ("networking.istio.io/v1", "Gateway"),
        ("networking.istio.io/v1alpha3", "Sidecar"),
        ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("networking.istio.io/v1beta1", "WorkloadEntry"),
        ("networking.istio.io/v1", "WorkloadGroup"),
        ("networking.istio.io/v1beta1", "ProxyConfig"),
        ("security.istio.io/v1", "RequestAuthentication"),
        ("telemetry.istio.io/v1", "Telemetry"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
    ] {
        let doc = k(api, kind);
        rule(Code::ProxyKind, &[&doc, DR], &[DR]);
        let a = run(&[&doc]);
        let d = &a.diagnostics[0];
        assert_eq!((d.line, d.code), (2, Code::ProxyKind), "{d}");
        assert!(
            d.message.contains(kind)
                && d.message
                    .contains("enforced by Istio's proxies; meshfed does not apply it"),
            "{d}"
        );
        assert!(a.resources.is_empty());
    }
}

#[test]
fn two_resources_claiming_the_same_thing_for_a_cluster_conflict() {
    let vs2 = vs(ROUTE_V1).replace("{name: reviews}", "{name: reviews-2}");
    rule(
        Code::Conflict,
        &[&vs(ROUTE_V1), &vs2, DR],
        &[&vs(ROUTE_V1), DR],
    );
    let dr2 = DR.replace("{name: reviews}", "{name: reviews-2}");
    rule(Code::Conflict, &[DR, &dr2], &[DR]);
    let pa = |name: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: istio-system}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
        )
    };
    rule(Code::Conflict, &[&pa("a"), &pa("b")], &[&pa("a")]);
    // Targeting them at different clusters resolves it.
    let east = vs(ROUTE_V1).replace(
        "{name: reviews}",
        "{name: reviews, annotations: {meshfed.io/clusters: east}}",
    );
    let west = vs2.replace(
        "{name: reviews-2}",
        "{name: reviews-2, annotations: {meshfed.io/clusters: west}}",
    );
    rule(
        Code::Conflict,
        &[CLUSTERS, &east, &vs2, DR],
        &[CLUSTERS, &east, &west, DR],
    );
}

#[test]
fn names_and_labels_follow_kubernetes_syntax() {
    let named = |n: &str| DR.replace("{name: reviews}", &format!("{{name: {n}}}"));
    rule(
        Code::InvalidName,
        &[&named("Reviews_V1")],
        &[&named("reviews-v1")],
    );
    let label = |v: &str| DR.replace("{version: v1}", &format!("{{version: '{v}'}}"));
    rule(Code::InvalidName, &[&label("-v1")], &[&label("v1.0")]);
    let sub = |n: &str| DR.replace("{name: v1,", &format!("{{name: {n},"));
    rule(Code::InvalidName, &[&sub("V1")], &[&sub("v1")]);
}

#[test]
fn hosts_are_dns_names_with_an_optional_leading_wildcard() {
    let h = |host: &str| DR.replace("host: reviews", &format!("host: '{host}'"));
    rule(
        Code::InvalidHost,
        &[&h("foo.*.com")],
        &[&h("*.example.com")],
    );
}

#[test]
fn retry_conditions_are_known_ones_or_status_codes() {
    let r = |on: &str| {
        vs(&format!(
            "{ROUTE_V1}\n    retries: {{attempts: 3, retryOn: '{on}'}}"
        ))
    };
    rule(
        Code::InvalidValue,
        &[&r("5xx,gateway-eror"), DR],
        &[&r("5xx,gateway-error,503,unavailable"), DR],
    );
}

#[test]
fn authorization_conditions_use_known_keys() {
    let w = |k: &str| authz(&format!("[{{when: [{{key: '{k}', values: [x]}}]}}]"));
    rule(
        Code::InvalidValue,
        &[&w("source.namepsace")],
        &[&w("source.namespace")],
    );
    rule(
        Code::InvalidValue,
        &[&w("request.headers[Bad Header]")],
        &[&w("request.headers[x-user]")],
    );
}

#[test]
fn pseudo_header_conditions_are_the_authority_and_the_method() {
    let w = |k: &str| authz(&format!("[{{when: [{{key: '{k}', values: [x]}}]}}]"));
    for good in [
        "request.headers[:authority]",
        "request.headers[:method]",
        "request.headers[:Authority]",
    ] {
        rule(
            Code::InvalidValue,
            &[&w("request.headers[:status]")],
            &[&w(good)],
        );
    }
    // `:path` would carry the query (Envoy's header); `:scheme` is not
    // carried to the destination: refused, never read as absent.
    for k in ["request.headers[:path]", "request.headers[:scheme]"] {
        let a = run(&[&w(k)]);
        assert!(has(&a, Code::Unsupported), "{k}: {:#?}", a.diagnostics);
        assert!(!a.is_valid());
    }
}

#[test]
fn path_templates_are_istios_and_malformed_ones_are_errors_at_their_line() {
    let op = |o: &str| authz(&format!("[{{to: [{{operation: {o}}}]}}]"));
    rule(
        Code::InvalidValue,
        &[&op("{paths: ['/a/{**}/{*}']}")],
        &[&op(
            "{paths: ['/path/template/{*}', '/{**}/path/template', '/api/{*}/{**}'], \
             notPaths: ['/not-path/template/{*}', '/{**}/not-path/template']}",
        )],
    );
    for bad in [
        "{paths: ['/a{*}b']}",
        "{paths: ['/{*}.txt']}",
        "{paths: ['/users/{id}']}",
        "{notPaths: ['/{**}/{**}']}",
        "{paths: ['{*}/edit']}",
        "{paths: ['/a//{*}']}",
        "{paths: ['/a/*/{*}']}",
    ] {
        let a = run(&[&op(bad)]);
        assert!(!a.is_valid(), "{bad} accepted");
        let d = a
            .diagnostics
            .iter()
            .find(|d| d.code == Code::InvalidValue)
            .unwrap_or_else(|| panic!("{bad}: {:#?}", a.diagnostics));
        // The line of the value, with a hint that says what to write.
        assert_eq!(d.line, 6, "{bad}: {d}");
        assert!(d.field_path.contains("aths[0]"), "{bad}: {d}");
        assert!(
            d.hint.as_deref().is_some_and(|h| !h.is_empty()),
            "{bad}: {d}"
        );
    }
}

#[test]
fn authorization_patterns_and_ports_are_well_formed() {
    let op = |o: &str| authz(&format!("[{{to: [{{operation: {o}}}]}}]"));
    rule(
        Code::InvalidValue,
        &[&op("{paths: ['api/*']}")],
        &[&op("{paths: ['/api/*']}")],
    );
    rule(
        Code::InvalidValue,
        &[&op("{methods: ['G*T']}")],
        &[&op("{methods: [GET]}")],
    );
    rule(
        Code::OutOfRange,
        &[&op("{ports: ['99999']}")],
        &[&op("{ports: ['9080']}")],
    );
    rule(Code::InvalidValue, &[&op("{}")], &[&op("{methods: [GET]}")]);
}

#[test]
fn subset_names_are_unique_within_a_destination_rule() {
    let dup = DR.replace("name: v2,", "name: v1,");
    rule(Code::DuplicateSubset, &[&dup], &[DR]);
}

#[test]
fn match_header_names_are_lowercase() {
    let m = |h: &str| {
        vs(&format!(
            "match: [{{headers: {{{h}: {{exact: x}}}}}}]\n    {ROUTE_V1}"
        ))
    };
    rule(
        Code::InvalidValue,
        &[&m("User-Type"), DR],
        &[&m("user-type"), DR],
    );
}

#[test]
fn mirror_percentage_needs_a_mirror() {
    let bad = vs(&format!("{ROUTE_V1}\n    mirrorPercentage: {{value: 10}}"));
    let good = vs(&format!(
        "{ROUTE_V1}\n    mirror: {{host: reviews, subset: v2}}\n    mirrorPercentage: {{value: 10}}"
    ));
    rule(Code::InvalidValue, &[&bad, DR], &[&good, DR]);
}

#[test]
fn locality_weights_sum_to_100() {
    let lb = |w: u32| {
        dr_with(&format!(
            "{{loadBalancer: {{localityLbSetting: {{distribute: [{{from: 'us-east1/*', to: {{'us-east1/*': {w}, 'us-west1/*': 20}}}}]}}}}}}"
        ))
    };
    rule(Code::WeightsSum, &[&lb(70)], &[&lb(80)]);
}

#[test]
fn mutual_tls_to_endpoints_needs_a_client_certificate() {
    rule(
        Code::MissingField,
        &[&dr_with("{tls: {mode: MUTUAL}}")],
        &[&dr_with(
            "{tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}}",
        )],
    );
    rule(
        Code::InvalidValue,
        &[&dr_with("{tls: {mode: ISTIO_MUTUAL, privateKey: /k.pem}}")],
        &[&dr_with("{tls: {mode: ISTIO_MUTUAL}}")],
    );
}

#[test]
fn short_names_with_a_namespace_are_flagged_as_istio_reads_them() {
    let h = |host: &str| DR.replace("host: reviews", &format!("host: {host}"));
    rule(
        Code::Ambiguous,
        &[&h("reviews.default")],
        &[&h("reviews.default.svc.cluster.local")],
    );
}

#[test]
fn cluster_scoped_kinds_take_no_namespace() {
    let c = CLUSTERS.replacen("{name: east}", "{name: east, namespace: default}", 1);
    rule(Code::InvalidValue, &[&c], &[CLUSTERS]);
}

#[test]
fn port_level_mtls_needs_a_selector() {
    let pa = |sel: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\nspec: {{{sel}mtls: {{mode: STRICT}}, portLevelMtls: {{8080: {{mode: DISABLE}}}}}}\n"
        )
    };
    rule(
        Code::InvalidValue,
        &[&pa("")],
        &[&pa("selector: {matchLabels: {app: x}}, ")],
    );
}

#[test]
fn every_problem_in_every_file_is_reported_at_its_line() {
    let a = run(&[
        &vs(
            "route: [{destination: {host: reviews, subset: v1}, weight: 50}, {destination: {host: reviews, subset: v2}, weight: 40}]",
        ),
        &format!(
            "{DR}---\n{}",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [x]\n  bogus: 1\n"
        ),
        &dr_with("{outlierDetection: {interval: soon, maxEjectionPercent: 300}}")
            .replace("{name: reviews}", "{name: other}")
            .replace("host: reviews", "host: other"),
    ]);
    let got: Vec<(String, usize, Code)> = a
        .diagnostics
        .iter()
        .map(|d| (d.file.clone(), d.line, d.code))
        .collect();
    assert_eq!(
        got,
        vec![
            ("f0.yaml".into(), 7, Code::WeightsSum),
            ("f1.yaml".into(), 15, Code::UnknownField),
            ("f2.yaml".into(), 9, Code::InvalidDuration),
            ("f2.yaml".into(), 9, Code::OutOfRange),
        ],
        "{:#?}",
        a.diagnostics
    );
}

#[test]
fn a_resource_that_fails_to_load_does_not_cascade_into_reference_errors() {
    let broken_dr = DR.replace("host: reviews", "host: reviews\n  typo: 1");
    let a = run(&[&vs(ROUTE_V1), &broken_dr]);
    let codes: Vec<Code> = a.diagnostics.iter().map(|d| d.code).collect();
    assert_eq!(codes, vec![Code::UnknownField]);
}

fn service_entry(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext}}\nspec: {spec}\n"
    )
}

#[test]
fn service_entries_need_hosts_ports_and_matching_endpoints() {
    let good = service_entry(
        "{hosts: [api.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: STATIC, endpoints: [{address: 10.1.2.3, ports: {https: 8443}}]}",
    );
    rule(
        Code::MissingField,
        &[&service_entry("{ports: [{number: 443, name: https}]}")],
        &[&good],
    );
    rule(
        Code::InvalidValue,
        &[&good.replace("address: 10.1.2.3", "address: api.internal")],
        &[&good],
    );
    rule(
        Code::InvalidValue,
        &[&good.replace("{https: 8443}", "{http: 8443}")],
        &[&good],
    );
    rule(
        Code::InvalidValue,
        &[&good.replace("protocol: TLS", "protocol: QUIC")],
        &[&good],
    );
    rule(
        Code::OutOfRange,
        &[&good.replace("number: 443", "number: 0")],
        &[&good],
    );
}

#[test]
fn tcp_routes_need_destinations_and_summed_weights() {
    let tcp = |route: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: db}}\nspec:\n  hosts: [db]\n  tcp: [{{match: [{{port: 5432}}], route: {route}}}]\n"
        )
    };
    rule(
        Code::MissingField,
        &[&tcp("[]")],
        &[&tcp("[{destination: {host: db}}]")],
    );
    rule(
        Code::WeightsSum,
        &[&tcp(
            "[{destination: {host: db-a}, weight: 60}, {destination: {host: db-b}, weight: 60}]",
        )],
        &[&tcp(
            "[{destination: {host: db-a}, weight: 40}, {destination: {host: db-b}, weight: 60}]",
        )],
    );
}

#[test]
fn a_fault_abort_has_exactly_one_status_and_known_grpc_codes() {
    let abort = |a: &str| vs(&format!("{ROUTE_V1}\n    fault: {{abort: {a}}}"));
    rule(
        Code::InvalidValue,
        &[&abort("{httpStatus: 503, grpcStatus: UNAVAILABLE}"), DR],
        &[&abort("{grpcStatus: UNAVAILABLE}"), DR],
    );
    rule(
        Code::InvalidValue,
        &[&abort("{grpcStatus: UNAVAILABLEE}"), DR],
        &[&abort("{httpStatus: 503}"), DR],
    );
    let delay = |d: &str| vs(&format!("{ROUTE_V1}\n    fault: {{delay: {d}}}"));
    rule(
        Code::MissingField,
        &[&delay("{percentage: {value: 10}}"), DR],
        &[&delay("{fixedDelay: 2s, percentage: {value: 10}}"), DR],
    );
}

#[test]
fn port_level_settings_name_a_port_once() {
    rule(
        Code::MissingField,
        &[&dr_with(
            "{portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}",
        )],
        &[&dr_with(
            "{portLevelSettings: [{port: {number: 9080}, loadBalancer: {simple: RANDOM}}]}",
        )],
    );
    rule(
        Code::InvalidValue,
        &[&dr_with(
            "{portLevelSettings: [{port: {number: 9080}}, {port: {number: 9080}}]}",
        )],
        &[&dr_with(
            "{portLevelSettings: [{port: {number: 9080}}, {port: {number: 9443}}]}",
        )],
    );
}

#[test]
fn cluster_trust_domains_and_localities_are_well_formed() {
    let c = |extra: &str| {
        format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: east}}\nspec: {{gateways: ['gw:1'], {extra}}}\n"
        )
    };
    rule(
        Code::InvalidName,
        &[&c("trustDomain: East.Example")],
        &[&c("trustDomain: east.example.org")],
    );
    rule(
        Code::MissingField,
        &[&c("locality: {zone: z1}")],
        &[&c("locality: {region: r1, zone: z1}")],
    );
}

#[test]
fn service_accounts_cannot_be_mixed_with_principals_or_namespaces() {
    let from = |src: &str| authz(&format!("[{{from: [{{source: {src}}}]}}]"));
    rule(
        Code::InvalidValue,
        &[&from("{serviceAccounts: [bar/sa], namespaces: [bar]}")],
        &[&authz(
            "[{from: [{source: {serviceAccounts: [bar/sa]}}, {source: {namespaces: [bar]}}]}]",
        )],
    );
    rule(
        Code::InvalidValue,
        &[&from("{notServiceAccounts: [bar/sa], principals: [bar]}")],
        &[&from("{serviceAccounts: [bar/sa, sa]}")],
    );
}

#[test]
fn an_empty_condition_value_is_refused() {
    rule(
        Code::InvalidValue,
        &[&authz(
            "[{when: [{key: 'request.headers[x-foo]', values: [v1, '']}]}]",
        )],
        &[&authz(
            "[{when: [{key: 'request.headers[x-foo]', values: [v1]}]}]",
        )],
    );
    rule(
        Code::InvalidValue,
        &[&authz(
            "[{when: [{key: source.namespace, notValues: ['']}]}]",
        )],
        &[&authz(
            "[{when: [{key: source.namespace, notValues: [x]}]}]",
        )],
    );
}

#[test]
fn port_level_mtls_takes_quoted_port_keys_but_not_an_empty_map() {
    let pa = |ports: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\nspec: {{selector: {{matchLabels: {{app: x}}}}, portLevelMtls: {ports}}}\n"
        )
    };
    rule(
        Code::InvalidValue,
        &[&pa("{}")],
        &[&pa("{'8080': {mode: DISABLE}, 9090: {mode: STRICT}}")],
    );
    let a = run(&[&pa("{'80x': {mode: DISABLE}}")]);
    assert!(!a.is_valid(), "{:#?}", a.diagnostics);
    let a = run(&[&pa("{'8080': {mode: DISABLE}, 8080: {mode: STRICT}}")]);
    assert!(!a.is_valid(), "{:#?}", a.diagnostics);
}

#[test]
fn newer_istio_traffic_fields_are_warned_not_refused() {
    for newer in [
        "{loadBalancer: {warmup: {duration: 300s, minimumPercent: 10, aggression: 2}}}",
        "{loadBalancer: {simple: ROUND_ROBIN, zoneAwareLbSetting: {enabled: true}}}",
        "{connectionPool: {http: {http2KeepAlive: {interval: 15s, timeout: 5s}}}}",
    ] {
        rule(Code::NotEnforced, &[&dr_with(newer)], &[DR]);
        assert!(!has(&run(&[&dr_with(newer)]), Code::UnknownField));
    }
    // Their values are still checked, as Istio checks them.
    for bad in [
        "{loadBalancer: {warmup: {duration: 300s, minimumPercent: 150.0}}}",
        "{loadBalancer: {warmup: {duration: 300s, aggression: -0.1}}}",
    ] {
        rule(
            Code::OutOfRange,
            &[&dr_with(bad)],
            &[&dr_with("{loadBalancer: {warmup: {duration: 300s}}}")],
        );
    }
    rule(
        Code::MissingField,
        &[&dr_with("{loadBalancer: {warmup: {minimumPercent: 5.0}}}")],
        &[&dr_with(
            "{loadBalancer: {warmup: {duration: 1s, minimumPercent: 5.0}}}",
        )],
    );
    // A real typo still gets its hint.
    let typo = run(&[&dr_with("{loadBalancer: {warmpu: {duration: 300s}}}")]);
    let d = typo
        .diagnostics
        .iter()
        .find(|d| d.code == Code::UnknownField)
        .expect("unknown-field");
    assert_eq!(d.hint.as_deref(), Some("did you mean `warmup`?"));
}

#[test]
fn trust_domains_are_read_as_principal_patterns_or_refused() {
    let from = |src: &str| authz(&format!("[{{from: [{{source: {src}}}]}}]"));
    let good = from("{trustDomains: [cluster.local, 'other*'], notTrustDomains: [bad]}");
    rule(
        Code::Unsupported,
        &[&from("{trustDomains: ['*-suffix']}")],
        &[&good],
    );
    rule(
        Code::Unsupported,
        &[&from(
            "{trustDomains: [cluster.local], principals: ['x/ns/a/sa/b']}",
        )],
        &[&good],
    );
    rule(
        Code::InvalidValue,
        &[&from("{notTrustDomains: [a/b]}")],
        &[&good],
    );
}

#[test]
fn service_entry_resolution_endpoints_and_ports_agree_as_istio_requires() {
    let se = |spec: &str| {
        service_entry(&format!(
            "{{hosts: [example.com], ports: [{{number: 80, name: http, protocol: HTTP}}], {spec}}}"
        ))
    };
    let good_static = se("resolution: STATIC, endpoints: [{address: 1.2.3.4}]");
    for bad in [
        "endpoints: [{address: 1.2.3.4}]",
        "resolution: NONE, endpoints: [{address: 1.2.3.4}]",
        "resolution: DNS_ROUND_ROBIN, endpoints: [{address: a.example.com}, {address: b.example.com}]",
        "resolution: DNS, addresses: [1.2.3.4/16]",
        "resolution: STATIC, workloadSelector: {}, endpoints: [{address: 1.2.3.4}]",
        "workloadSelector: {labels: {val: '*'}}",
    ] {
        rule(Code::InvalidValue, &[&se(bad)], &[&good_static]);
    }
    for good in [
        "resolution: DNS_ROUND_ROBIN, endpoints: [{address: a.example.com}]",
        "resolution: NONE, addresses: [1.1.1.1/32]",
        "resolution: STATIC, workloadSelector: {labels: {app: details}}",
    ] {
        assert!(run(&[&se(good)]).is_valid(), "{good}");
    }
    rule(
        Code::InvalidValue,
        &[&service_entry(
            "{hosts: [example.com], ports: [{number: 1, name: a}, {number: 1, name: b}]}",
        )],
        &[&service_entry(
            "{hosts: [example.com], ports: [{number: 1, name: a}, {number: 2, name: b}]}",
        )],
    );
    // No ports: valid, but warned, since nothing is routed.
    rule(
        Code::NotEnforced,
        &[&service_entry("{hosts: [example.com]}")],
        &[&good_static],
    );
}

#[test]
fn service_entry_protocols_are_istios_in_any_case() {
    let se = |proto: &str| {
        service_entry(&format!(
            "{{hosts: [db.example.com], ports: [{{number: 27018, name: p, protocol: {proto}}}], resolution: DNS}}"
        ))
    };
    for ok in [
        "MONGO", "tcp", "Redis", "MYSQL", "thrift", "grpc-web", "HTTP2",
    ] {
        let a = run(&[&se(ok)]);
        assert!(
            a.is_valid() && a.diagnostics.is_empty(),
            "{ok}: {:#?}",
            a.diagnostics
        );
    }
    rule(Code::InvalidValue, &[&se("QUIC")], &[&se("tcp")]);
    rule(Code::NotEnforced, &[&se("udp")], &[&se("tcp")]);
}

#[test]
fn only_a_routes_request_set_may_name_the_authority_pseudo_header() {
    let good = vs(
        "{headers: {request: {set: {':authority': foo.example}}}, route: [{destination: {host: reviews}}]}",
    );
    for bad in [
        "{headers: {request: {set: {':path': /x}}}, route: [{destination: {host: reviews}}]}",
        "{headers: {request: {add: {':authority': foo}}}, route: [{destination: {host: reviews}}]}",
        "{headers: {response: {set: {':authority': foo}}}, route: [{destination: {host: reviews}}]}",
        "{route: [{destination: {host: reviews}, headers: {request: {set: {':authority': foo}}}}]}",
        "{headers: {request: {set: {':authority': foo}}}, rewrite: {authority: bar}, route: [{destination: {host: reviews}}]}",
    ] {
        rule(Code::InvalidValue, &[&vs(bad)], &[&good]);
    }
    rule(
        Code::InvalidHost,
        &[&vs(
            "{headers: {request: {set: {':authority': 'a b'}}}, route: [{destination: {host: reviews}}]}",
        )],
        &[&good],
    );
}

#[test]
fn istio_refusals_of_part_4_are_errors_at_their_field() {
    // Duplicate hosts.
    let dup = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews, Reviews]\n  http: [{route: [{destination: {host: reviews}}]}]\n";
    rule(Code::InvalidValue, &[dup], &[&vs(ROUTE_V1), DR]);
    // Empty prefix and regex matches.
    for bad in [
        "{match: [{uri: {prefix: ''}}], route: [{destination: {host: reviews}}]}",
        "{match: [{headers: {x-a: {regex: ''}}}], route: [{destination: {host: reviews}}]}",
    ] {
        rule(
            Code::InvalidValue,
            &[&vs(bad)],
            &[&vs(
                "{match: [{uri: {prefix: /a}}], route: [{destination: {host: reviews}}]}",
            )],
        );
    }
    // A regex over 1,024 bytes.
    let long = format!(
        "{{match: [{{uri: {{regex: '{}'}}}}], route: [{{destination: {{host: reviews}}}}]}}",
        "a".repeat(1025)
    );
    let ok = format!(
        "{{match: [{{uri: {{regex: '{}'}}}}], route: [{{destination: {{host: reviews}}}}]}}",
        "a".repeat(1024)
    );
    rule(Code::InvalidRegex, &[&vs(&long)], &[&vs(&ok)]);
    // insecureSkipVerify with caCertificates.
    rule(
        Code::InvalidValue,
        &[&dr_with(
            "{tls: {mode: SIMPLE, caCertificates: /ca.pem, insecureSkipVerify: true}}",
        )],
        &[&dr_with("{tls: {mode: SIMPLE, insecureSkipVerify: true}}")],
    );
    // A DENY without rules.
    let deny = |rules: &str| authz(rules).replace("rules:", "action: DENY\n  rules:");
    rule(Code::InvalidValue, &[&deny("[]")], &[&deny("[{}]")]);
    // Sub-millisecond durations.
    rule(
        Code::InvalidDuration,
        &[&dr_with("{connectionPool: {tcp: {connectTimeout: 500us}}}")],
        &[&dr_with("{connectionPool: {tcp: {connectTimeout: 1ms}}}")],
    );
}

#[test]
fn a_zero_tcp_idle_timeout_turns_it_off_and_is_warned_as_not_enforced() {
    let a = run(&[&dr_with("{connectionPool: {tcp: {idleTimeout: 0s}}}")]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    assert!(has(&a, Code::NotEnforced));
    rule(
        Code::InvalidDuration,
        &[&dr_with("{connectionPool: {tcp: {idleTimeout: 500us}}}")],
        &[&dr_with("{connectionPool: {tcp: {idleTimeout: 0s}}}")],
    );
    // HTTP's idle timeout is enforced, so 0s stays an error there.
    rule(
        Code::InvalidDuration,
        &[&dr_with("{connectionPool: {http: {idleTimeout: 0s}}}")],
        &[&dr_with("{connectionPool: {http: {idleTimeout: 1s}}}")],
    );
}

#[test]
fn a_virtual_service_without_hosts_is_a_delegate_warned_as_not_enforced() {
    let delegate = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  http: [{route: [{destination: {host: reviews}}]}]\n";
    rule(
        Code::NotEnforced,
        &[delegate],
        &[&vs("route: [{destination: {host: reviews}}]")],
    );
    let a = run(&[delegate, CLUSTERS]);
    let s = a
        .compile("east", "abc", &Options::default())
        .expect("a delegate compiles");
    assert!(s.policy.routes.is_empty(), "{:?}", s.policy.routes);
}

#[test]
fn a_partial_wildcard_service_entry_host_is_warned_and_left_out() {
    let se = |host: &str| {
        service_entry(&format!(
            "{{hosts: ['{host}', api.example.com], ports: [{{number: 443, name: tls, protocol: TLS}}], resolution: DNS}}"
        ))
    };
    rule(Code::NotEnforced, &[&se("*x")], &[&se("*.x")]);
    rule(Code::InvalidHost, &[&se("*x!")], &[&se("*.x")]);
    let a = run(&[&se("*foo.baz"), CLUSTERS]);
    let s = a
        .compile("east", "abc", &Options::default())
        .expect("compiles");
    let hosts: Vec<&String> = s.policy.service_entries.keys().collect();
    assert_eq!(hosts, ["api.example.com"]);
}
