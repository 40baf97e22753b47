//! Istio conformance: every `valid` and `invalid` case of the shared corpus
//! (`../shared/istio-conformance/`, README there) run through `analyze` as a
//! repository of its own. A `valid` case must have no error; an `invalid`
//! one an error at (or next to) a line Istio objects to, or any error when
//! the case names no line. Exceptions are named by case ID with their
//! reason, as in docs/policy.md ("Conformance exceptions"): `deliberate`
//! differences only (a `not yet` gap, while one is open, says so). The
//! list is a ratchet: a case outside it that fails, or a case in it that now
//! passes, fails the test (remove it from the list and the docs).
//!
//! The corpus lives beside the workspace (`<workspace>/../shared/…`); the
//! test fails, saying where it looked, when it is missing.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::{Options, Severity, analyze};

/// Case ID → why meshfed's verdict differs from Istio's.
const EXCEPTIONS: &[(&str, &str)] = &[
    (
        "analyzers/destinationrule-simple-destination-credentialname-selector",
        "deliberate: `credentialName` refused (unsupported-field): meshfed reads certificates from files, not Kubernetes secrets",
    ),
    (
        "analyzers/destinationrule-simple-port-credentialname-selector",
        "deliberate: `credentialName` refused (unsupported-field): meshfed reads certificates from files, not Kubernetes secrets",
    ),
    (
        "apidocs/networking_v1alpha3_destination_rule_L98_DestinationRule",
        "deliberate: `credentialName` refused (unsupported-field): meshfed reads certificates from files, not Kubernetes secrets",
    ),
    (
        "apidocs/networking_v1alpha3_service_entry_L261_ServiceEntry",
        "deliberate: unix-socket ServiceEntry endpoints refused: a gateway in another process cannot reach them",
    ),
    (
        "apidocs/networking_v1alpha3_virtual_service_L537_VirtualService",
        "deliberate: namespace `nsA`/`nsB` is not a DNS-1123 label (Kubernetes refuses it too); the delegate itself is accepted with a not-enforced warning",
    ),
    (
        "apidocs/networking_v1alpha3_virtual_service_L556_VirtualService",
        "deliberate: namespace `nsA`/`nsB` is not a DNS-1123 label (Kubernetes refuses it too); the delegate itself is accepted with a not-enforced warning",
    ),
    (
        "apidocs/security_v1beta1_authorization_policy_L344_AuthorizationPolicy",
        "deliberate: `action: CUSTOM` refused (unsupported-field): no external authorizer; fails closed",
    ),
    (
        "apidocs/security_v1beta1_authorization_policy_L63_AuthorizationPolicy",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/http__allow-full-rule-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/http__custom-simple-http-in",
        "deliberate: `action: CUSTOM` refused (unsupported-field): no external authorizer; fails closed",
    ),
    (
        "authz-builder/http__multiple-policies-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/http__single-policy-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/tcp__allow-both-http-tcp-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/tcp__allow-only-http-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/tcp__audit-both-http-tcp-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "authz-builder/tcp__custom-both-http-tcp-in",
        "deliberate: `action: CUSTOM` refused (unsupported-field): no external authorizer; fails closed",
    ),
    (
        "authz-builder/tcp__custom-only-http-in",
        "deliberate: `action: CUSTOM` refused (unsupported-field): no external authorizer; fails closed",
    ),
    (
        "authz-builder/tcp__deny-both-http-tcp-in",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "crd-valid/authz-valid-01-full",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "istio.io/authz-jwt_1_require-jwt",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
    (
        "istio.io/authz-jwt_2_require-jwt-groups",
        "deliberate: `requestPrincipals`/`request.auth.*`/`ipBlocks` refused (unsupported-field): no JWT validation or client IPs at the gateway; an ALLOW needing them fails closed",
    ),
];

/// Where the corpus is: `$MESHFED_ISTIO_CONFORMANCE` if set, else
/// `shared/istio-conformance` beside the workspace or beside any directory
/// above it (a CI clone may sit deeper than a developer's checkout), else
/// `/work/shared/istio-conformance`.
fn corpus() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut looked = Vec::new();
    let candidates = std::env::var_os("MESHFED_ISTIO_CONFORMANCE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            workspace
                .ancestors()
                .skip(1)
                .map(|dir| dir.join("shared/istio-conformance")),
        )
        .chain([PathBuf::from("/work/shared/istio-conformance")]);
    for dir in candidates {
        let cases = dir.join("cases");
        if cases.is_dir() {
            return cases;
        }
        looked.push(cases.display().to_string());
    }
    panic!(
        "the Istio conformance corpus is missing: looked in {}; put it beside the workspace \
         (…/shared/istio-conformance) or set MESHFED_ISTIO_CONFORMANCE",
        looked.join(", ")
    );
}

/// Whether meshfed agrees with Istio on one case; `Err` says how not.
fn check(dir: &Path, case: &serde_json::Value) -> Result<(), String> {
    let (files, io) = read_paths(&[dir.to_path_buf()], &Selection::default());
    assert!(io.is_empty(), "{}: {io:?}", dir.display());
    let a = analyze(files, &Options::default());
    let errors: Vec<_> = a
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    let summary = || {
        errors
            .iter()
            .take(3)
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    };
    match case["expect"].as_str() {
        Some("valid") if errors.is_empty() => Ok(()),
        Some("valid") => Err(format!("refused: {}", summary())),
        Some("invalid") => {
            let bad = case["bad"].as_object().cloned().unwrap_or_default();
            let at_a_bad_line = bad.iter().any(|(file, lines)| {
                let lines: Vec<u64> = lines
                    .as_array()
                    .map(|l| l.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                errors.iter().any(|d| {
                    d.file.ends_with(file.as_str())
                        && lines.iter().any(|l| (d.line as u64).abs_diff(*l) <= 1)
                })
            });
            if !errors.is_empty() && (bad.is_empty() || at_a_bad_line) {
                Ok(())
            } else if errors.is_empty() {
                Err("accepted".into())
            } else {
                Err(format!("not at {bad:?}: {}", summary()))
            }
        }
        other => panic!("{}: unexpected expect {other:?}", dir.display()),
    }
}

#[test]
fn istio_conformance_corpus_matches_istio_apart_from_named_exceptions() {
    let root = corpus();
    let exceptions: BTreeMap<&str, &str> = EXCEPTIONS.iter().copied().collect();
    let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut fixed = Vec::new();
    let mut seen = 0;
    let mut groups: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    groups.sort();
    for group in groups {
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&group)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("CASE.json").is_file())
            .collect();
        cases.sort();
        for dir in cases {
            let case: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("CASE.json")).unwrap()).unwrap();
            let expect = match case["expect"].as_str() {
                Some("valid") => "valid",
                Some("invalid") => "invalid",
                _ => continue,
            };
            let id = format!(
                "{}/{}",
                group.file_name().unwrap().to_string_lossy(),
                dir.file_name().unwrap().to_string_lossy()
            );
            seen += 1;
            let result = check(&dir, &case);
            let entry = counts.entry(expect).or_default();
            entry.1 += 1;
            if result.is_ok() {
                entry.0 += 1;
            }
            match (result, exceptions.contains_key(id.as_str())) {
                (Ok(()), true) => fixed.push(id),
                (Err(why), false) => unexpected.push(format!("{id} ({expect}): {why}")),
                _ => {}
            }
        }
    }
    let (va, vn) = counts.get("valid").copied().unwrap_or_default();
    let (ic, inn) = counts.get("invalid").copied().unwrap_or_default();
    println!(
        "valid accepted {va}/{vn}, invalid caught {ic}/{inn} ({} named exceptions)",
        EXCEPTIONS.len()
    );
    assert!(
        seen > 100,
        "only {seen} cases found under {}",
        root.display()
    );
    assert!(
        unexpected.is_empty(),
        "cases that disagree with Istio and are not named exceptions:\n{}",
        unexpected.join("\n")
    );
    assert!(
        fixed.is_empty(),
        "named exceptions that now agree with Istio; remove them from EXCEPTIONS and from \
         docs/policy.md: {fixed:?}"
    );
    let missing: Vec<&&str> = exceptions
        .keys()
        .filter(|id| !root.join(id).join("CASE.json").is_file())
        .collect();
    assert!(missing.is_empty(), "exceptions naming no case: {missing:?}");
}
