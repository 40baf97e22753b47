//! `meshfed-policy diff` as reviewers and CI jobs use it: the real binary,
//! on real Git repositories made with the `git` CLI in a tempdir, whose
//! commits have a known effective change. Exit codes: 0 shown (with
//! `--exit-code`: no change), 1 a side is invalid, 2 usage or I/O error,
//! 3 with `--exit-code`: a cluster's policy changes.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use meshfed_tests::syncer::PolicyRepo;
use meshfed_tests::{Outcome, bin, run};
use serde_json::Value;

fn policy_in<I, S>(dir: &Path, args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin("meshfed-policy"));
    cmd.args(args).current_dir(dir);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("MESHFED_") || k.starts_with("GIT_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd).unwrap_or_else(|e| panic!("running meshfed-policy: {e}"))
}

fn json(out: &Outcome) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{out}"))
}

/// Four clusters; edge is in its own region.
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
---
apiVersion: meshfed.io/v1alpha1
kind: Cluster
metadata: {name: north}
spec: {gateways: ['gw.north:15443'], locality: {region: eu-north1, zone: a}}
";

/// reviews: a DestinationRule and a VirtualService for east only, sending
/// `v1`% to v1 and the rest to v2.
fn reviews(v1: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
  annotations: {{meshfed.io/clusters: east}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {v1}
    - destination: {{host: reviews, subset: v2}}
      weight: {}
",
        100 - v1
    )
}

/// ratings: exported by east and west; edge fails over to `to` first.
fn ratings(to: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: ratings
  namespace: default
  annotations: {{meshfed.io/clusters: 'east,west'}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
  namespace: default
  annotations: {{meshfed.io/clusters: edge}}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover:
        - {{from: eu-edge1, to: {to}}}
"
    )
}

/// A DENY of `GET /admin/*` on ratings, in west only.
const DENY_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: default
  annotations: {meshfed.io/clusters: west}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - to:
    - operation: {methods: [GET], paths: ['/admin/*']}
";

fn repo() -> (tempfile::TempDir, PolicyRepo) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let repo = PolicyRepo::init(&dir.path().join("repo"));
    let reviews = reviews(100);
    let ratings = ratings("us-east1");
    repo.commit(
        "mesh: reviews and ratings",
        &[
            ("mesh/clusters.yaml", CLUSTERS),
            ("mesh/reviews.yaml", &reviews),
            ("mesh/ratings.yaml", &ratings),
            ("README.md", "not policy\n"),
        ],
    );
    (dir, repo)
}

#[test]
fn a_reordering_and_a_file_rename_are_no_effective_change() {
    let (_t, repo) = repo();
    // The same resources, in one renamed file, in the other order, with a
    // comment and other indentation.
    let reviews = reviews(100);
    let (dr, vs) = reviews.split_once("---\n").expect("two documents");
    let vs = vs
        .replace("  - route:", "    - route:")
        .replace("    - destination", "        - destination")
        .replace("      weight", "          weight");
    let moved = format!("# reviews: routing first\n{vs}---\n{dr}");
    repo.commit(
        "mesh: one file for reviews",
        &[
            ("mesh/reviews.yaml", ""),
            ("mesh/routing/all-reviews.yml", &moved),
        ],
    );
    let out = policy_in(&repo.dir, ["diff", "HEAD~1", "HEAD", "--exit-code"]);
    assert_eq!(out.code, Some(0), "{out}");
    for c in ["east", "west", "edge", "north"] {
        assert!(
            out.stdout.contains(&format!("no change for cluster {c}\n")),
            "{out}"
        );
    }
    assert!(
        out.stdout
            .contains("no effective change (4 cluster(s) compared)"),
        "{out}"
    );
}

#[test]
fn a_commit_shows_a_weight_move_a_new_deny_a_failover_change_and_clusters_without_change() {
    let (_t, repo) = repo();
    let old = repo.commit("no-op", &[]);
    let reviews = reviews(55);
    let ratings = ratings("us-west1");
    let new = repo.commit(
        "mesh: canary, admin lockdown, edge fails over west",
        &[
            ("mesh/reviews.yaml", &reviews),
            ("mesh/ratings.yaml", &ratings),
            ("mesh/authz/deny-admin.yaml", DENY_ADMIN),
        ],
    );

    let out = policy_in(&repo.dir, ["diff", &old, "HEAD", "--exit-code"]);
    assert_eq!(
        out.code,
        Some(3),
        "a change exits 3 with --exit-code:\n{out}"
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    for want in [
        "east: reviews.default: 45% of requests move from subset v1 to subset v2 (subset v1 100% → 55%, subset v2 0% → 45%)",
        "west: new DENY on ratings.default for GET /admin/* from any source (AuthorizationPolicy default/deny-admin)",
        "edge: failover order for ratings.default changes from [east, west] to [west, east]",
        "no change for cluster north",
        "effective change in 3 of 4 cluster(s): east, edge, west",
    ] {
        assert!(lines.contains(&want), "missing {want:?}:\n{out}");
    }
    // Without --exit-code a shown diff is a success.
    assert_eq!(policy_in(&repo.dir, ["diff", &old, &new]).code, Some(0));

    // One cluster only.
    let west = policy_in(&repo.dir, ["diff", &old, &new, "--cluster", "west"]);
    assert_eq!(west.code, Some(0), "{west}");
    assert!(west.stdout.contains("west: new DENY"), "{west}");
    assert!(!west.stdout.contains("east:"), "{west}");

    // JSON: stable fields, one entry per cluster.
    let j = json(&policy_in(
        &repo.dir,
        ["diff", &old, &new, "--format", "json"],
    ));
    assert_eq!(j["schema"], 1);
    assert_eq!(j["old"]["commit"], old.as_str());
    assert_eq!(j["new"]["commit"], new.as_str());
    assert_eq!(j["changed"], true);
    let clusters = j["clusters"].as_array().expect("clusters");
    let find = |c: &str| {
        clusters
            .iter()
            .find(|x| x["cluster"] == c)
            .unwrap_or_else(|| panic!("no {c} in {j:#}"))
    };
    assert_eq!(find("north")["status"], "unchanged");
    assert_eq!(find("north")["changes"].as_array().map(Vec::len), Some(0));
    let east = &find("east")["changes"][0];
    assert_eq!(find("east")["status"], "changed");
    assert_eq!(east["area"], "route");
    assert_eq!(east["subject"], "reviews.default");
    assert_eq!(east["kind"], "traffic-moved");
    assert_eq!(east["moved_percent"], 45);
    assert_eq!(find("west")["changes"][0]["area"], "authz");
    assert_eq!(find("west")["changes"][0]["kind"], "added");

    // Markdown for a pull request comment.
    let md = policy_in(&repo.dir, ["diff", &old, &new, "--format", "markdown"]);
    assert_eq!(md.code, Some(0), "{md}");
    assert!(
        md.stdout.starts_with("<!-- meshfed-policy-diff -->\n"),
        "{md}"
    );
    assert!(
        md.stdout.contains(
            "#### `west`\n\n- new DENY on ratings.default for GET /admin/\\* from any source"
        ),
        "{md}"
    );
    assert!(md.stdout.contains("No change for `north`."), "{md}");
}

#[test]
fn an_invalid_new_commit_prints_its_errors_with_file_and_line_and_exits_1() {
    let (_t, repo) = repo();
    let broken = reviews(55).replace("      weight: 55", "      wieght: 55");
    repo.commit("mesh: typo", &[("mesh/reviews.yaml", &broken)]);
    let out = policy_in(&repo.dir, ["diff", "HEAD~1", "HEAD"]);
    assert_eq!(out.code, Some(1), "{out}");
    // `wieght` is on line 21 of the file, indented by 6.
    assert!(
        out.stdout
            .contains("mesh/reviews.yaml:21:7: error[unknown-field]"),
        "{out}"
    );
    assert!(out.stdout.contains("NEW HEAD ("), "{out}");
    assert!(!out.stdout.contains("no change for cluster"), "{out}");

    let j = json(&policy_in(
        &repo.dir,
        ["diff", "HEAD~1", "HEAD", "--format", "json"],
    ));
    assert_eq!(j["old"]["valid"], true);
    assert_eq!(j["new"]["valid"], false);
    let diags = j["new"]["diagnostics"].as_array().expect("diagnostics");
    assert!(
        diags.iter().any(|d| d["file"] == "mesh/reviews.yaml"
            && d["line"] == 21
            && d["code"] == "unknown-field"),
        "{j:#}"
    );
    assert_eq!(j["changed"], Value::Null);
}

#[test]
fn unknown_revisions_missing_paths_and_undeclared_clusters_exit_2_and_say_what() {
    let (_t, repo) = repo();
    let out = policy_in(&repo.dir, ["diff", "HEAD", "no-such-branch"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains("`no-such-branch` is neither a directory nor a commit"),
        "{out}"
    );
    let out = policy_in(&repo.dir, ["diff", "HEAD", "HEAD", "--path", "nowhere"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains("--path `nowhere` is not a directory"),
        "{out}"
    );
    let out = policy_in(&repo.dir, ["diff", "HEAD", "HEAD", "--cluster", "south"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains("declared clusters: east, edge, north, west"),
        "{out}"
    );
    // Outside any repository, a name that is not a directory.
    let outside = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = policy_in(outside.path(), ["diff", "HEAD~1", "HEAD"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("not in a Git repository"), "{out}");
}

#[test]
fn a_commit_compares_with_a_working_directory_and_path_limits_what_is_read() {
    let (_t, repo) = repo();
    // Policy outside mesh/ that does not validate: --path leaves it out.
    repo.commit("scratch", &[("scratch/broken.yaml", "kind: [\n")]);
    let reviews = reviews(90);
    std::fs::write(repo.dir.join("mesh/reviews.yaml"), reviews).expect("write");
    let out = policy_in(&repo.dir, ["diff", "HEAD", "mesh", "--path", "mesh"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("east: reviews.default: 10% of requests move from subset v1 to subset v2"),
        "{out}"
    );
    // Without --path the broken file in the commit is read, and refused.
    let out = policy_in(&repo.dir, ["diff", "HEAD", "mesh"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("scratch/broken.yaml:"), "{out}");
}
