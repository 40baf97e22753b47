use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue};
use meshfed_policy::snapshot::{
    AuthzAction, AuthzCondition, AuthzOperation, AuthzPolicy, AuthzRule, AuthzScope, AuthzSource,
    ClusterPolicy, SourceRef,
};

use super::*;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const EAST_GW: &str = "spiffe://cluster.local/meshfed/cluster/east/gateway/gw-0";

fn policy(
    ns: &str,
    name: &str,
    action: AuthzAction,
    selector: &[(&str, &str)],
    rules: Vec<AuthzRule>,
) -> AuthzPolicy {
    let scope = if ns == "istio-system" {
        AuthzScope::Mesh
    } else if selector.is_empty() {
        AuthzScope::Namespace
    } else {
        AuthzScope::Workload
    };
    AuthzPolicy {
        source: SourceRef {
            kind: "AuthorizationPolicy".into(),
            namespace: ns.into(),
            name: name.into(),
        },
        namespace: ns.into(),
        scope,
        selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        action,
        rules,
        dry_run: false,
    }
}

fn authz(policies: Vec<AuthzPolicy>) -> Authz {
    let p = ClusterPolicy {
        cluster: "west".into(),
        domain: "cluster.local".into(),
        trust_domain: "cluster.local".into(),
        authz: policies,
        ..Default::default()
    };
    Authz::compile(&p).unwrap()
}

fn from_principals(p: &[&str]) -> AuthzSource {
    AuthzSource {
        principals: p.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn rule(from: Vec<AuthzSource>, to: Vec<AuthzOperation>) -> AuthzRule {
    AuthzRule {
        from,
        to,
        when: vec![],
    }
}

struct Call {
    principal: Option<&'static str>,
    cluster: &'static str,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
    tcp: bool,
}

impl Call {
    fn get(path: &'static str) -> Self {
        Call {
            principal: Some(PRODUCTPAGE),
            cluster: "east",
            method: "GET",
            path,
            host: "reviews.default.svc.cluster.local:9080",
            headers: HeaderMap::new(),
            tcp: false,
        }
    }
    fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    fn principal(mut self, p: Option<&'static str>) -> Self {
        self.principal = p;
        self
    }
    fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
}

fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn decide_at(
    a: &Authz,
    c: &Call,
    ns: &str,
    l: Option<&BTreeMap<String, String>>,
    port: u16,
) -> Result<(), Denial> {
    let http = (!c.tcp).then_some(Http {
        method: c.method,
        path: c.path,
        host: c.host,
        headers: &c.headers,
    });
    let req = Request::new(c.principal, c.cluster, http);
    a.decide(
        &req,
        &Workload {
            namespace: ns,
            labels: l,
            port: Some(port),
        },
    )
}

fn decide(a: &Authz, c: &Call) -> Result<(), Denial> {
    let l = labels(&[("app", "reviews"), ("version", "v1")]);
    decide_at(a, c, "default", Some(&l), 9080)
}

#[test]
fn patterns_are_exact_prefix_suffix_or_any() {
    let p = |s| Pattern::parse(s).unwrap();
    assert!(p("/api").matches("/api"));
    assert!(!p("/api").matches("/api/"));
    assert!(p("/api/*").matches("/api/v1/x"));
    assert!(p("/api/*").matches("/api/"));
    assert!(!p("/api/*").matches("/apix"));
    assert!(p("*.png").matches("/img/a.png"));
    assert!(!p("*.png").matches("/img/a.png.txt"));
    assert!(p("*").matches(""));
    for bad in ["", "/a*b", "*a*", "**", "/a/*/b"] {
        assert!(Pattern::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn no_policy_allows_and_an_allow_policy_denies_what_it_does_not_match() {
    assert!(decide(&authz(vec![]), &Call::get("/")).is_ok());
    let a = authz(vec![policy(
        "default",
        "reviews-viewer",
        AuthzAction::Allow,
        &[("app", "reviews")],
        vec![rule(
            vec![from_principals(&[
                "cluster.local/ns/default/sa/productpage",
            ])],
            vec![AuthzOperation {
                methods: strings(&["GET"]),
                ..Default::default()
            }],
        )],
    )]);
    assert!(decide(&a, &Call::get("/reviews/1")).is_ok());
    let post = decide(&a, &Call::get("/reviews/1").method("POST")).unwrap_err();
    assert_eq!(post.reason, DenyReason::NoAllowMatch);
    assert!(post.detail.contains("default/reviews-viewer"), "{post}");
    let stranger = Call::get("/").principal(Some("spiffe://cluster.local/ns/default/sa/other"));
    assert!(decide(&a, &stranger).is_err());
    // No identity at all: `principals` cannot match.
    assert!(decide(&a, &Call::get("/").principal(None)).is_err());
    // The source gateway's identity is not productpage's.
    assert!(decide(&a, &Call::get("/").principal(Some(EAST_GW))).is_err());
}

#[test]
fn an_allow_policy_with_no_rules_denies_everything() {
    let a = authz(vec![policy(
        "default",
        "deny-all",
        AuthzAction::Allow,
        &[],
        vec![],
    )]);
    assert!(decide(&a, &Call::get("/")).is_err());
}

#[test]
fn deny_is_evaluated_before_allow_and_wins() {
    let allow_all = policy(
        "default",
        "allow-all",
        AuthzAction::Allow,
        &[],
        vec![AuthzRule::default()],
    );
    let deny_admin = policy(
        "default",
        "deny-admin",
        AuthzAction::Deny,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                paths: strings(&["/admin*"]),
                ..Default::default()
            }],
        )],
    );
    let a = authz(vec![allow_all, deny_admin]);
    assert!(decide(&a, &Call::get("/reviews")).is_ok());
    let d = decide(&a, &Call::get("/admin/users")).unwrap_err();
    assert_eq!(d.reason, DenyReason::DenyPolicy);
    assert_eq!(d.policy, "default/deny-admin");
}

#[test]
fn audit_policies_never_block() {
    let a = authz(vec![policy(
        "default",
        "audit",
        AuthzAction::Audit,
        &[],
        vec![AuthzRule::default()],
    )]);
    assert!(decide(&a, &Call::get("/")).is_ok());
}

#[test]
fn scopes_select_by_mesh_namespace_and_workload_labels() {
    let deny_all = |ns: &str, name: &str, sel: &[(&str, &str)]| {
        policy(ns, name, AuthzAction::Deny, sel, vec![AuthzRule::default()])
    };
    let v1 = labels(&[("app", "reviews"), ("version", "v1")]);
    let v2 = labels(&[("app", "reviews"), ("version", "v2")]);
    let c = Call::get("/");

    let a = authz(vec![deny_all("default", "v2-only", &[("version", "v2")])]);
    assert!(decide_at(&a, &c, "default", Some(&v1), 9080).is_ok());
    assert!(decide_at(&a, &c, "default", Some(&v2), 9080).is_err());
    // A selector in another namespace does not select this workload.
    assert!(decide_at(&a, &c, "other", Some(&v2), 9080).is_ok());
    // Without a known endpoint, workload policies select nothing.
    assert!(decide_at(&a, &c, "default", None, 9080).is_ok());
    assert!(a.depends_on_endpoint("default"));
    assert!(!a.depends_on_endpoint("other"));

    let a = authz(vec![deny_all("default", "ns", &[])]);
    assert!(decide_at(&a, &c, "default", None, 9080).is_err());
    assert!(decide_at(&a, &c, "other", Some(&v1), 9080).is_ok());
    assert!(!a.depends_on_endpoint("default"));

    let a = authz(vec![deny_all("istio-system", "mesh", &[])]);
    assert!(decide_at(&a, &c, "default", Some(&v1), 9080).is_err());
    assert!(decide_at(&a, &c, "anything", None, 9080).is_err());

    // Root namespace with a selector: matching workloads of every namespace.
    let a = authz(vec![deny_all(
        "istio-system",
        "mesh-v2",
        &[("version", "v2")],
    )]);
    assert!(decide_at(&a, &c, "other", Some(&v2), 9080).is_err());
    assert!(decide_at(&a, &c, "other", Some(&v1), 9080).is_ok());
}

#[test]
fn not_fields_hold_when_no_value_matches_including_an_absent_one() {
    let a = authz(vec![policy(
        "default",
        "deny-outsiders",
        AuthzAction::Deny,
        &[],
        vec![rule(
            vec![AuthzSource {
                not_namespaces: strings(&["default"]),
                ..Default::default()
            }],
            vec![],
        )],
    )]);
    assert!(decide(&a, &Call::get("/")).is_ok());
    let foreign = Call::get("/").principal(Some("spiffe://cluster.local/ns/other/sa/x"));
    assert!(decide(&a, &foreign).is_err());
    // A gateway principal has no namespace: notNamespaces holds.
    assert!(decide(&a, &Call::get("/").principal(Some(EAST_GW))).is_err());

    let a = authz(vec![policy(
        "default",
        "allow-not-post",
        AuthzAction::Allow,
        &[],
        vec![rule(
            vec![AuthzSource {
                not_principals: strings(&["*/sa/blocked"]),
                ..Default::default()
            }],
            vec![AuthzOperation {
                not_methods: strings(&["POST", "PUT"]),
                not_paths: strings(&["*.secret"]),
                ..Default::default()
            }],
        )],
    )]);
    assert!(decide(&a, &Call::get("/x")).is_ok());
    assert!(decide(&a, &Call::get("/x").method("PUT")).is_err());
    assert!(decide(&a, &Call::get("/x.secret")).is_err());
    let blocked = Call::get("/x").principal(Some("spiffe://cluster.local/ns/default/sa/blocked"));
    assert!(decide(&a, &blocked).is_err());
    // `notPrincipals` alone admits a caller with no identity, as in Istio.
    assert!(decide(&a, &Call::get("/x").principal(None)).is_ok());
}

#[test]
fn namespaces_and_service_accounts_come_from_a_workload_principal() {
    let a = authz(vec![policy(
        "default",
        "allow",
        AuthzAction::Allow,
        &[],
        vec![rule(
            vec![
                AuthzSource {
                    namespaces: strings(&["frontend"]),
                    ..Default::default()
                },
                AuthzSource {
                    service_accounts: strings(&["default/productpage"]),
                    ..Default::default()
                },
            ],
            vec![],
        )],
    )]);
    assert!(decide(&a, &Call::get("/")).is_ok());
    let fe = Call::get("/").principal(Some("spiffe://west.example.org/ns/frontend/sa/web"));
    assert!(decide(&a, &fe).is_ok());
    let other = Call::get("/").principal(Some("spiffe://cluster.local/ns/default/sa/ratings"));
    assert!(decide(&a, &other).is_err());
}

#[test]
fn ports_hosts_and_paths_match_the_operation() {
    let a = authz(vec![policy(
        "default",
        "allow",
        AuthzAction::Allow,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                hosts: strings(&["reviews.default.svc.cluster.local", "*.example.com"]),
                ports: vec![9080],
                paths: strings(&["/api/*", "/health"]),
                ..Default::default()
            }],
        )],
    )]);
    let l = labels(&[("app", "reviews")]);
    assert!(decide_at(&a, &Call::get("/api/x"), "default", Some(&l), 9080).is_ok());
    assert!(decide_at(&a, &Call::get("/health"), "default", Some(&l), 9080).is_ok());
    assert!(decide_at(&a, &Call::get("/healthz"), "default", Some(&l), 9080).is_err());
    assert!(decide_at(&a, &Call::get("/api/x"), "default", Some(&l), 9090).is_err());
    let mut c = Call::get("/api/x");
    c.host = "WWW.Example.COM:443";
    assert!(decide_at(&a, &c, "default", Some(&l), 9080).is_ok());
    c.host = "evil.com";
    assert!(decide_at(&a, &c, "default", Some(&l), 9080).is_err());
    assert!(a.depends_on_endpoint("default"));
}

#[test]
fn when_conditions_on_cluster_headers_principal_and_port() {
    let cond = |key: &str, values: &[&str], not: &[&str]| AuthzCondition {
        key: key.into(),
        values: strings(values),
        not_values: strings(not),
    };
    let a = authz(vec![policy(
        "default",
        "allow",
        AuthzAction::Allow,
        &[],
        vec![AuthzRule {
            from: vec![],
            to: vec![],
            when: vec![
                cond("source.cluster", &["east"], &[]),
                cond("request.headers[X-Team]", &["blue*"], &["blue-banned"]),
                cond("source.principal", &["*/sa/productpage"], &[]),
                cond("source.namespace", &["default"], &[]),
                cond("destination.port", &[], &["9999"]),
            ],
        }],
    )]);
    let mut c = Call::get("/");
    c.headers
        .insert("x-team", HeaderValue::from_static("blue-1"));
    assert!(decide(&a, &c).is_ok());
    c.cluster = "edge";
    assert!(decide(&a, &c).is_err(), "source.cluster");
    c.cluster = "east";
    c.headers
        .insert("x-team", HeaderValue::from_static("blue-banned"));
    assert!(decide(&a, &c).is_err(), "notValues");
    c.headers.remove("x-team");
    assert!(
        decide(&a, &c).is_err(),
        "an absent header never matches values"
    );
    c.headers
        .insert("x-team", HeaderValue::from_static("blue-1"));
    let l = labels(&[]);
    assert!(
        decide_at(&a, &c, "default", Some(&l), 9999).is_err(),
        "port"
    );
    // Repeated headers are joined with `,` before matching.
    c.headers.append("x-team", HeaderValue::from_static("red"));
    assert!(decide(&a, &c).is_ok(), "`blue-1,red` starts with blue");
}

#[test]
fn http_only_fields_fail_closed_for_tcp_streams() {
    let http_allow = policy(
        "default",
        "allow-get",
        AuthzAction::Allow,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                methods: strings(&["GET"]),
                ..Default::default()
            }],
        )],
    );
    // ALLOW with HTTP-only fields: the rule cannot match a TCP stream.
    assert!(decide(&authz(vec![http_allow]), &Call::get("/").tcp()).is_err());
    // DENY with HTTP-only fields: they are ignored, so the rule matches on
    // the rest (here: productpage).
    let http_deny = policy(
        "default",
        "deny-post",
        AuthzAction::Deny,
        &[],
        vec![AuthzRule {
            from: vec![from_principals(&[
                "cluster.local/ns/default/sa/productpage",
            ])],
            to: vec![AuthzOperation {
                methods: strings(&["POST"]),
                ..Default::default()
            }],
            when: vec![AuthzCondition {
                key: "request.headers[x-a]".into(),
                values: strings(&["1"]),
                not_values: vec![],
            }],
        }],
    );
    let a = authz(vec![http_deny]);
    assert!(decide(&a, &Call::get("/").tcp()).is_err());
    assert!(
        decide(&a, &Call::get("/")).is_ok(),
        "HTTP GET is not denied"
    );
    let other = Call::get("/")
        .principal(Some("spiffe://cluster.local/ns/default/sa/x"))
        .tcp();
    assert!(decide(&a, &other).is_ok());
}

#[test]
fn what_cannot_be_enforced_is_refused_at_compile() {
    let with_when = |key: &str, v: &str| {
        let p = ClusterPolicy {
            authz: vec![policy(
                "default",
                "p",
                AuthzAction::Deny,
                &[],
                vec![AuthzRule {
                    from: vec![],
                    to: vec![],
                    when: vec![AuthzCondition {
                        key: key.into(),
                        values: strings(&[v]),
                        not_values: vec![],
                    }],
                }],
            )],
            ..Default::default()
        };
        Authz::compile(&p)
    };
    let e = with_when("source.ip", "10.0.0.1").unwrap_err();
    assert!(matches!(e, CompileError::UnknownKey { .. }), "{e}");
    assert!(e.to_string().contains("default/p"), "{e}");
    assert!(with_when("destination.port", "http").is_err());
    assert!(with_when("request.headers[bad header]", "x").is_err());
    assert!(with_when("source.principal", "a*b").is_err());
    assert!(with_when("source.cluster", "east").is_ok());

    // Pseudo-headers other than the authority and the method.
    for key in [
        "request.headers[:path]",
        "request.headers[:scheme]",
        "request.headers[:status]",
    ] {
        let e = with_when(key, "x").unwrap_err();
        assert!(matches!(e, CompileError::UnknownKey { .. }), "{key}: {e}");
    }
    assert!(with_when("request.headers[:authority]", "reviews").is_ok());
    assert!(with_when("request.headers[:Method]", "GET").is_ok());

    let with_path = |path: &str| {
        Authz::compile(&ClusterPolicy {
            authz: vec![policy(
                "default",
                "t",
                AuthzAction::Deny,
                &[],
                vec![rule(
                    vec![],
                    vec![AuthzOperation {
                        not_paths: strings(&[path]),
                        ..Default::default()
                    }],
                )],
            )],
            ..Default::default()
        })
    };
    assert!(with_path("/users/{*}/secret").is_ok());
    // Malformed templates (a snapshot from an older or hostile syncer): the
    // whole snapshot is refused, never read as an exact path that matches
    // nothing.
    for bad in [
        "/users/{id}",
        "/a{*}b",
        "/{**}/x/{*}",
        "{*}/x",
        "//{*}",
        "/a/*/{*}",
    ] {
        let e = with_path(bad).unwrap_err();
        assert!(
            matches!(
                e,
                CompileError::BadValue {
                    field: "notPaths",
                    ..
                }
            ),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains(bad), "{bad}: {e}");
    }
}

fn allow_paths(paths: &[&str], not_paths: &[&str]) -> Authz {
    authz(vec![policy(
        "default",
        "allow-paths",
        AuthzAction::Allow,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                paths: strings(paths),
                not_paths: strings(not_paths),
                ..Default::default()
            }],
        )],
    )])
}

#[test]
fn path_templates_match_exactly_what_envoy_matches_and_never_widen_an_allow() {
    // Istio's builder test input (authz-builder/http__allow-path-in).
    let a = allow_paths(
        &[
            "/exact",
            "/prefix/*",
            "*/suffix",
            "/path/template/{*}",
            "/{**}/path/template",
        ],
        &[],
    );
    for (path, allowed) in [
        ("/exact", true),
        ("/prefix/a/b", true),
        ("/a/suffix", true),
        ("/path/template/x", true),
        ("/path/template/x.json", true),
        ("/x/path/template", true),
        ("/a/b/c/path/template", true),
        // `{*}` is one non-empty segment, not a prefix.
        ("/path/template/", false),
        ("/path/template", false),
        ("/path/template/x/y", false),
        ("/path/template/x/", false),
        // `{**}` keeps the `/` around it, and is no `*suffix`.
        ("//path/templatex", false),
        ("/xpath/template", false),
        ("/x/path/template/y", false),
        // Literals are case-sensitive; a `{*}` never matches a character
        // outside Envoy's set.
        ("/Path/template/x", false),
        ("/path/template/a*b", false),
        ("/other", false),
    ] {
        assert_eq!(decide(&a, &Call::get(path)).is_ok(), allowed, "{path}");
    }
    // notPaths with templates: everything under /static but a private
    // file two levels down.
    let a = allow_paths(&["/static/{**}"], &["/static/{*}/private"]);
    for (path, allowed) in [
        ("/static/", true),
        ("/static/a/b/c.css", true),
        ("/static/a/public", true),
        ("/static/a/private", false),
        ("/static/a/b/private", true),
        ("/static", false),
        ("/staticx", false),
    ] {
        assert_eq!(decide(&a, &Call::get(path)).is_ok(), allowed, "{path}");
    }
}

#[test]
fn a_path_template_deny_holds_after_normalization() {
    let a = authz(vec![deny_paths(
        "default",
        "deny-edit",
        &["/users/{*}/edit"],
    )]);
    for path in [
        "/users/ann/edit",
        "/users/./ann/edit",
        "/users/x/../ann/edit",
    ] {
        let (n, _) = normalize_path(path).unwrap();
        let n: &'static str = n.into_owned().leak();
        assert!(decide(&a, &Call::get(n)).is_err(), "{path}");
    }
    assert!(decide(&a, &Call::get("/users/ann/view")).is_ok());
    assert!(decide(&a, &Call::get("/users/edit")).is_ok());
}

fn when_policy(action: AuthzAction, key: &str, values: &[&str], not: &[&str]) -> AuthzPolicy {
    policy(
        "default",
        "when",
        action,
        &[],
        vec![AuthzRule {
            from: vec![],
            to: vec![],
            when: vec![AuthzCondition {
                key: key.into(),
                values: strings(values),
                not_values: strings(not),
            }],
        }],
    )
}

#[test]
fn the_authority_pseudo_header_is_the_authority_as_sent_never_an_alias() {
    // ALLOW only `ratings.default.svc.cluster.local` as written.
    let a = authz_knowing_ratings(vec![when_policy(
        AuthzAction::Allow,
        "request.headers[:authority]",
        &["ratings.default.svc.cluster.local"],
        &[],
    )]);
    let call = |host: &'static str| {
        let mut c = Call::get("/");
        c.host = host;
        c
    };
    assert!(decide(&a, &call("ratings.default.svc.cluster.local")).is_ok());
    // Unlike `hosts`, an alias that the router sends to the same service,
    // another case or a port is another header value: not allowed (Envoy's
    // header matcher, as Istio compiles this key).
    for host in [
        "ratings",
        "ratings.default",
        "ratings.default.svc.cluster.local.",
        "ratings.default.svc.cluster.local:9080",
        "RATINGS.default.svc.cluster.local",
        "",
    ] {
        assert!(decide(&a, &call(host)).is_err(), "Host: {host:?}");
    }
    // A TCP stream has no authority: the ALLOW cannot match it.
    assert!(decide(&a, &call("ratings.default.svc.cluster.local").tcp()).is_err());

    // Patterns and notValues, in a DENY.
    let d = authz(vec![when_policy(
        AuthzAction::Deny,
        "request.headers[:authority]",
        &["*.internal.example.com", "admin.*"],
        &[],
    )]);
    assert!(decide(&d, &call("a.internal.example.com")).is_err());
    assert!(decide(&d, &call("admin.example.com:8443")).is_err());
    assert!(decide(&d, &call("reviews")).is_ok());
    // A DENY that needs an authority is ignored for TCP (then matches on
    // its other fields: here none, so it denies), as for any header.
    assert!(decide(&d, &call("reviews").tcp()).is_err());
    let not = authz(vec![when_policy(
        AuthzAction::Deny,
        "request.headers[:authority]",
        &[],
        &["*"],
    )]);
    assert!(
        decide(&not, &call("")).is_err(),
        "an empty authority is absent"
    );
    assert!(decide(&not, &call("reviews")).is_ok());
}

#[test]
fn the_method_pseudo_header_is_the_method() {
    let a = authz(vec![when_policy(
        AuthzAction::Allow,
        "request.headers[:method]",
        &["GET", "HEAD"],
        &[],
    )]);
    assert!(decide(&a, &Call::get("/")).is_ok());
    assert!(decide(&a, &Call::get("/").method("HEAD")).is_ok());
    assert!(decide(&a, &Call::get("/").method("POST")).is_err());
    assert!(
        decide(&a, &Call::get("/").method("get")).is_err(),
        "case-sensitive"
    );
    assert!(decide(&a, &Call::get("/").tcp()).is_err());
}

#[test]
fn paths_are_normalized_before_matching() {
    let n = |p| {
        let (path, query) = normalize_path(p).unwrap();
        format!("{path}{query}")
    };
    assert_eq!(n("/a/b?x=1"), "/a/b?x=1");
    assert_eq!(n("/a/./b/../c"), "/a/c");
    assert_eq!(n("/public/../admin"), "/admin");
    assert_eq!(n("/../../admin"), "/admin");
    assert_eq!(n("/%61dmin/%2e%2E/admin/"), "/admin/");
    assert_eq!(n("/a/.."), "/");
    assert_eq!(n("/a/b/."), "/a/b/");
    assert_eq!(n("/a%2fb"), "/a%2Fb", "escaped slashes stay escaped");
    assert_eq!(n("/public\\..\\admin"), "/admin", "a backslash is a slash");
    assert_eq!(n("\\da"), "/da", "Istio's example");
    assert_eq!(n("/a\\b?q=\\"), "/a/b?q=\\", "the query is left alone");
    assert_eq!(n("/a%5cb"), "/a%5Cb", "escaped backslashes stay escaped");
    assert_eq!(normalize_path("/a%00b"), Err(PathError::Nul));
    assert_eq!(n("/caf\u{e9}/x"), "/caf\u{e9}/x");
    assert_eq!(n("*"), "*");
    assert!(normalize_path("/a%zz").is_err());
    assert!(normalize_path("a/b").is_err());
}

#[test]
fn service_namespaces_come_from_the_host_or_the_service_entry() {
    let p = ClusterPolicy {
        domain: "cluster.local".into(),
        ..Default::default()
    };
    assert_eq!(
        service_namespace(&p, "reviews.shop.svc.cluster.local"),
        Some("shop")
    );
    assert_eq!(service_namespace(&p, "api.example.com"), None);
}

fn dry_run(mut p: AuthzPolicy) -> AuthzPolicy {
    p.dry_run = true;
    p
}

fn deny_paths(ns: &str, name: &str, paths: &[&str]) -> AuthzPolicy {
    policy(
        ns,
        name,
        AuthzAction::Deny,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                paths: strings(paths),
                ..Default::default()
            }],
        )],
    )
}

/// Every dry-run verdict for a call to `default`, as (policy, action, decision).
fn shadow(
    a: &Authz,
    c: &Call,
    candidates: &[&Endpoint],
) -> Vec<(String, &'static str, &'static str)> {
    let http = (!c.tcp).then_some(Http {
        method: c.method,
        path: c.path,
        host: c.host,
        headers: &c.headers,
    });
    let req = Request::new(c.principal, c.cluster, http);
    let mut out = Vec::new();
    a.dry_run(&req, "default", candidates, |d| {
        let (action, decision) = d.labels();
        out.push((d.policy.to_string(), action, decision));
    });
    out
}

#[test]
fn a_dry_run_deny_never_denies_but_reports_what_it_would_have_done() {
    let a = authz(vec![dry_run(deny_paths(
        "default",
        "deny-headers",
        &["/headers"],
    ))]);
    assert!(decide(&a, &Call::get("/headers")).is_ok());
    assert_eq!(
        shadow(&a, &Call::get("/headers"), &[]),
        vec![("default/deny-headers".to_string(), "DENY", "deny")]
    );
    assert_eq!(
        shadow(&a, &Call::get("/ip"), &[]),
        vec![("default/deny-headers".to_string(), "DENY", "allow")]
    );
    // The same policy enforced denies: the flag is the only difference.
    let enforced = authz(vec![deny_paths("default", "deny-headers", &["/headers"])]);
    assert!(decide(&enforced, &Call::get("/headers")).is_err());
    assert!(shadow(&enforced, &Call::get("/headers"), &[]).is_empty());
}

#[test]
fn a_dry_run_allow_does_not_turn_on_allow_semantics_for_the_workload() {
    // An enforced ALLOW policy makes everything it does not match denied;
    // a dry-run one must not.
    let allow_get = |dry: bool| {
        let mut p = policy(
            "default",
            "allow-get",
            AuthzAction::Allow,
            &[],
            vec![rule(
                vec![],
                vec![AuthzOperation {
                    methods: strings(&["GET"]),
                    ..Default::default()
                }],
            )],
        );
        p.dry_run = dry;
        p
    };
    let a = authz(vec![allow_get(true)]);
    assert!(decide(&a, &Call::get("/x").method("POST")).is_ok());
    assert_eq!(
        shadow(&a, &Call::get("/x").method("POST"), &[]),
        vec![("default/allow-get".to_string(), "ALLOW", "deny")]
    );
    assert_eq!(
        shadow(&a, &Call::get("/x"), &[]),
        vec![("default/allow-get".to_string(), "ALLOW", "allow")]
    );
    assert!(
        decide(
            &authz(vec![allow_get(false)]),
            &Call::get("/x").method("POST")
        )
        .is_err()
    );
    // An endpoint-specific dry-run policy neither makes the enforced
    // decision per endpoint nor applies where its selector selects nothing.
    let mut sel = dry_run(deny_paths("default", "deny-v2", &["/x"]));
    sel.selector = labels(&[("version", "v2")]);
    sel.scope = AuthzScope::Workload;
    let a = authz(vec![sel]);
    assert!(!a.depends_on_endpoint("default"));
    let v1 = Endpoint {
        addr: "10.0.0.1:9080".parse().unwrap(),
        labels: labels(&[("version", "v1")]),
        healthy: true,
    };
    let v2 = Endpoint {
        addr: "10.0.0.2:9080".parse().unwrap(),
        labels: labels(&[("version", "v2")]),
        healthy: true,
    };
    assert!(shadow(&a, &Call::get("/x"), &[&v1]).is_empty());
    assert_eq!(
        shadow(&a, &Call::get("/x"), &[&v1, &v2]),
        vec![("default/deny-v2".to_string(), "DENY", "deny")]
    );
}

#[test]
fn dry_run_verdicts_are_counted_per_policy_action_and_decision() {
    let a = authz(vec![
        dry_run(deny_paths("default", "deny-headers", &["/headers"])),
        deny_paths("default", "deny-admin", &["/admin"]),
    ]);
    let set = AuthzMetrics::default();
    let metrics = crate::metrics::Metrics::new(&[&set]);
    let headers = HeaderMap::new();
    for path in ["/headers", "/headers", "/ip", "/admin"] {
        let req = Request::new(
            Some(PRODUCTPAGE),
            "east",
            Some(Http {
                method: "GET",
                path,
                host: "reviews",
                headers: &headers,
            }),
        );
        count_dry_run(&set, &a, &req, "default", &[]);
    }
    let text = metrics.encode(&[]);
    let line = |decision: &str| {
        format!(
            "meshfed_authz_dry_run_total{{policy=\"default/deny-headers\",action=\"DENY\",decision=\"{decision}\"}}"
        )
    };
    assert!(text.contains(&format!("{} 2", line("deny"))), "{text}");
    assert!(text.contains(&format!("{} 2", line("allow"))), "{text}");
    assert!(
        !text.contains("policy=\"default/deny-admin\",action"),
        "{text}"
    );
}

/// An Authz whose snapshot knows `ratings.default` (exported).
fn authz_knowing_ratings(policies: Vec<AuthzPolicy>) -> Authz {
    let mut p = ClusterPolicy {
        cluster: "west".into(),
        domain: "cluster.local".into(),
        trust_domain: "cluster.local".into(),
        authz: policies,
        ..Default::default()
    };
    p.exports.insert(
        "ratings.default.svc.cluster.local".into(),
        ["west".to_string()].into(),
    );
    Authz::compile(&p).unwrap()
}

fn deny_hosts(hosts: &[&str]) -> AuthzPolicy {
    policy(
        "default",
        "deny-ratings",
        AuthzAction::Deny,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                hosts: strings(hosts),
                ..Default::default()
            }],
        )],
    )
}

/// Names the router resolves to ratings.default.svc.cluster.local for a
/// caller in `default` (issue 21, item 15).
const RATINGS_ALIASES: &[&str] = &[
    "ratings",
    "ratings.",
    "ratings:9080",
    "ratings.:9080",
    "ratings.default",
    "ratings.default:9080",
    "ratings.default.svc",
    "ratings.default.svc:9080",
    "ratings.default.svc.cluster.local",
    "ratings.default.svc.cluster.local.",
    "ratings.default.svc.cluster.local.:9080",
    "RATINGS.Default.SVC.cluster.local",
    "ratings.default.svc.clusterset.local",
];

#[test]
fn a_hosts_deny_covers_every_name_the_router_resolves_to_the_service() {
    for written in [
        "ratings.default.svc.cluster.local",
        "ratings",
        "ratings.default",
        "ratings.default.svc.cluster.local.",
    ] {
        let a = authz_knowing_ratings(vec![deny_hosts(&[written])]);
        for host in RATINGS_ALIASES {
            let mut c = Call::get("/");
            c.host = host;
            assert!(
                decide(&a, &c).is_err(),
                "DENY hosts [{written}] let Host: {host} through"
            );
        }
        // Another service is not denied.
        let mut c = Call::get("/");
        c.host = "reviews.default.svc.cluster.local";
        assert!(decide(&a, &c).is_ok(), "{written}");
    }
    // With a port in the policy, only that port.
    let a = authz_knowing_ratings(vec![deny_hosts(&[
        "ratings.default.svc.cluster.local:9080",
    ])]);
    for (host, denied) in [
        ("ratings.:9080", true),
        ("ratings.default:9080", true),
        ("ratings.default.svc.cluster.local.:9080", true),
        ("ratings.default:9090", false),
    ] {
        let mut c = Call::get("/");
        c.host = host;
        assert_eq!(decide(&a, &c).is_err(), denied, "{host}");
    }
}

#[test]
fn a_not_hosts_allow_and_deny_resolve_names_too() {
    // ALLOW everything but ratings: every ratings alias is refused.
    let allow_but_ratings = policy(
        "default",
        "allow-but-ratings",
        AuthzAction::Allow,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                not_hosts: strings(&["ratings.default.svc.cluster.local"]),
                ..Default::default()
            }],
        )],
    );
    let a = authz_knowing_ratings(vec![allow_but_ratings]);
    for host in RATINGS_ALIASES {
        let mut c = Call::get("/");
        c.host = host;
        assert!(decide(&a, &c).is_err(), "{host}");
    }
    // DENY everything that is not ratings: an unknown name that merely
    // looks like a service is still denied (it names no known service).
    let deny_but_ratings = policy(
        "default",
        "deny-but-ratings",
        AuthzAction::Deny,
        &[],
        vec![rule(
            vec![],
            vec![AuthzOperation {
                not_hosts: strings(&["*.svc.cluster.local"]),
                ..Default::default()
            }],
        )],
    );
    let a = authz_knowing_ratings(vec![deny_but_ratings]);
    for (host, denied) in [
        ("ratings.default", false),
        ("ratings.", false),
        ("example.com", true),
        ("evil.default", true),
    ] {
        let mut c = Call::get("/");
        c.host = host;
        assert_eq!(decide(&a, &c).is_err(), denied, "{host}");
    }
}

#[test]
fn the_destination_service_resolves_names_the_snapshot_does_not_list() {
    // A service known only from local endpoints: the caller passes it.
    let a = authz(vec![deny_hosts(&["payments.default.svc.cluster.local"])]);
    let headers = HeaderMap::new();
    let req = |host: &'static str| {
        Request::new(
            Some(PRODUCTPAGE),
            "east",
            Some(Http {
                method: "GET",
                path: "/",
                host,
                headers: &headers,
            }),
        )
    };
    let wl = Workload {
        namespace: "default",
        labels: None,
        port: None,
    };
    assert!(a.decide(&req("payments.default"), &wl).is_ok());
    let r = req("payments.default").with_service("payments.default.svc.cluster.local");
    assert!(a.decide(&r, &wl).is_err());
    assert!(a.filter(&r, "default", vec![]).is_err());
}
