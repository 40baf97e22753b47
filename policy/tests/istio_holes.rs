//! Istio YAML that used to load as something weaker than what it says
//! (issue 15's three silent holes): a DENY inside a `kind: List`, a dry-run
//! policy enforced for real, and an empty `from`/`to`/`when` list read as
//! "any". Each case is a whole repository run through `analyze` and
//! `compile`, as the syncer does.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshfed_policy::snapshot::*;
use meshfed_policy::{Analysis, Code, Options, Severity, analyze};

fn files(texts: &[&str]) -> Analysis {
    analyze(
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("f{i}.yaml"), *t)),
        &Options::default(),
    )
}

fn errors(a: &Analysis) -> Vec<String> {
    a.diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .collect()
}

/// What `kubectl get authorizationpolicy,virtualservice -o yaml` prints.
const LIST: &str = "apiVersion: v1
kind: List
metadata:
  resourceVersion: \"\"
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    name: deny-admin
    namespace: default
  spec:
    action: DENY
    rules:
    - to:
      - operation:
          paths: [\"/admin*\"]
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata:
    name: reviews
    namespace: default
  spec:
    hosts: [reviews]
    http:
    - route:
      - destination: {host: reviews}
";

#[test]
fn a_deny_inside_a_kubectl_list_is_compiled_and_enforced() {
    let a = files(&[LIST]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    assert!(
        !a.diagnostics.iter().any(|d| d.code == Code::Foreign),
        "the List must not be skipped: {:#?}",
        a.diagnostics
    );
    assert_eq!(a.resources.len(), 2);
    let s = a.compile("any", "v1", &Options::default()).unwrap();
    assert_eq!(s.policy.authz.len(), 1, "{:#?}", s.policy.authz);
    let p = &s.policy.authz[0];
    assert_eq!(p.action, AuthzAction::Deny);
    assert_eq!(p.source.name, "deny-admin");
    assert_eq!(p.rules[0].to[0].paths, vec!["/admin*".to_string()]);
    assert!(
        s.policy
            .routes
            .contains_key("reviews.default.svc.cluster.local")
    );
    // Origins point into the List, at the item.
    assert_eq!(
        s.origins
            .get("AuthorizationPolicy default/deny-admin")
            .map(String::as_str),
        Some("f0.yaml:9")
    );
}

#[test]
fn diagnostics_inside_a_list_item_point_at_the_item_line() {
    let bad = LIST
        .replace("paths: [\"/admin*\"]", "methods: [\"GET\", \"\"]")
        .replace("host: reviews}", "host: reviews, subset: nope}");
    let a = files(&[&bad]);
    assert!(!a.is_valid());
    let empty = a
        .diagnostics
        .iter()
        .find(|d| d.code == Code::InvalidValue)
        .unwrap_or_else(|| panic!("{:#?}", a.diagnostics));
    assert_eq!((empty.line, empty.column), (16, 28), "{empty}");
    assert_eq!(empty.field_path, "spec.rules[0].to[0].operation.methods[1]");
    let subset = a
        .diagnostics
        .iter()
        .find(|d| d.code == Code::UnknownSubset)
        .unwrap_or_else(|| panic!("{:#?}", a.diagnostics));
    assert_eq!(subset.line, 26, "{subset}");
}

#[test]
fn a_list_in_a_list_and_malformed_lists_are_errors_not_skipped() {
    let nested = "apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: List
  items:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-all}
    spec: {action: DENY, rules: [{}]}
";
    let a = files(&[nested]);
    assert!(!a.is_valid());
    let e = errors(&a);
    assert!(
        e.iter()
            .any(|d| d.starts_with("f0.yaml:5:") && d.contains("List inside a List")),
        "{e:#?}"
    );

    let not_a_sequence = "apiVersion: v1\nkind: List\nitems: {a: b}\n";
    let a = files(&[not_a_sequence]);
    assert!(
        errors(&a).iter().any(|d| d.starts_with("f0.yaml:3:")),
        "{:#?}",
        a.diagnostics
    );

    let item_not_a_mapping = "apiVersion: v1\nkind: List\nitems:\n- just a string\n- null\n";
    let a = files(&[item_not_a_mapping]);
    let e = errors(&a);
    assert!(
        e.iter()
            .any(|d| d.starts_with("f0.yaml:4:3:") && d.contains("item 0 of the List")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|d| d.starts_with("f0.yaml:5:") && d.contains("item 1")),
        "{e:#?}"
    );

    let stray = "apiVersion: v1\nkind: List\nitems: []\nspec: {}\n";
    let a = files(&[stray]);
    assert!(
        errors(&a).iter().any(|d| d.starts_with("f0.yaml:4:1:")),
        "{:#?}",
        a.diagnostics
    );
}

#[test]
fn a_huge_list_of_aliases_stays_bounded() {
    // An alias bomb in List items still hits the YAML node budget.
    let mut y = String::from(
        "apiVersion: v1\nkind: List\nx0: &a0 [\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"]\n",
    );
    for i in 1..30 {
        let p = i - 1;
        y.push_str(&format!("x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}]\n"));
    }
    y.push_str("items: [*a29]\n");
    let a = files(&[&y]);
    assert!(!a.is_valid());
    assert!(
        a.diagnostics.iter().any(|d| d.code == Code::YamlLimit),
        "{:#?}",
        a.diagnostics
    );
}

fn policy_with(annotations: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-path-headers
  namespace: foo
  annotations:
{annotations}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/headers\"]
"
    )
}

#[test]
fn a_dry_run_policy_compiles_marked_dry_run_and_others_do_not() {
    let a = files(&[&policy_with("    \"istio.io/dry-run\": \"true\"")]);
    assert!(a.is_valid(), "{:#?}", a.diagnostics);
    let s = a.compile("any", "v1", &Options::default()).unwrap();
    assert!(s.policy.authz[0].dry_run, "{:#?}", s.policy.authz);
    assert_eq!(s.policy.authz[0].action, AuthzAction::Deny);
    // The flag survives the wire.
    let back = Snapshot::decode(&s.encode()).unwrap();
    assert!(back.policy.authz[0].dry_run);

    for enforced in ["    istio.io/dry-run: \"false\"", "    other: x"] {
        let a = files(&[&policy_with(enforced)]);
        assert!(a.is_valid(), "{:#?}", a.diagnostics);
        let s = a.compile("any", "v1", &Options::default()).unwrap();
        assert!(!s.policy.authz[0].dry_run, "{enforced}");
        // An enforced policy encodes exactly as before the flag existed.
        assert!(!String::from_utf8(s.encode()).unwrap().contains("dry_run"));
    }
}

#[test]
fn a_bad_dry_run_value_is_an_error_at_its_line() {
    for bad in ["\"True\"", "\"yes\"", "\"\"", "\"1\""] {
        let a = files(&[&policy_with(&format!("    istio.io/dry-run: {bad}"))]);
        let e = errors(&a);
        assert!(
            e.iter()
                .any(|d| d.starts_with("f0.yaml:7:5: error[invalid-value]")
                    && d.contains("istio.io/dry-run")),
            "{bad}: {e:#?}"
        );
    }
}

fn allow_get_with(rule_head: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: foo
spec:
  action: ALLOW
  rules:
{rule_head}
    to:
    - operation:
        methods: [\"GET\"]
"
    )
}

#[test]
fn an_empty_from_to_or_when_list_is_an_error_at_its_line() {
    for (head, field) in [
        ("  - from: []", "from"),
        (
            "  - from:\n    - source: {namespaces: [bar]}\n    when: []",
            "when",
        ),
    ] {
        let a = files(&[&allow_get_with(head)]);
        let e = errors(&a);
        let line = 9 + head.lines().count() - 1;
        let at = format!("f0.yaml:{line}:");
        assert!(
            e.iter()
                .any(|d| d.starts_with(&at) && d.contains(&format!("`{field}` must not be empty"))),
            "{head}: {e:#?}"
        );
        assert!(a.compile("any", "v1", &Options::default()).is_err());
    }
    let empty_to = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all-to, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [bar]}
    to: []
";
    let e = errors(&files(&[empty_to]));
    assert!(
        e.iter()
            .any(|d| d.starts_with("f0.yaml:9:5:") && d.contains("`to` must not be empty")),
        "{e:#?}"
    );
}

#[test]
fn an_absent_or_null_from_still_means_any_source() {
    for head in ["  - from:", "  - from: null", "  - when: ~\n    from:"] {
        let a = files(&[&allow_get_with(head)]);
        assert!(a.is_valid(), "{head}: {:#?}", a.diagnostics);
        let s = a.compile("any", "v1", &Options::default()).unwrap();
        let r = &s.policy.authz[0].rules[0];
        assert!(r.from.is_empty() && r.when.is_empty(), "{head}: {r:#?}");
        assert_eq!(r.to.len(), 1);
    }
}
