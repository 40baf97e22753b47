//! The `meshfed-policy` CLI as operators, CI jobs and pre-commit hooks use it:
//! the real binary, run against the repository's examples and against policy
//! files written to a tempdir. Exit codes: 0 valid (warnings allowed), 1
//! invalid, 2 usage or I/O error.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshfed_tests::{Outcome, bin, run};
use serde_json::Value;
use tempfile::TempDir;

/// Runs `meshfed-policy` with `args` in the current directory.
fn policy<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    policy_in(Path::new("."), args)
}

/// Runs `meshfed-policy` with `args` in `dir`.
fn policy_in<I, S>(dir: &Path, args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin("meshfed-policy"));
    cmd.args(args).current_dir(dir);
    // Options have environment overrides (MESHFED_DOMAIN...); keep the
    // caller's out.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHFED_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd).unwrap_or_else(|e| panic!("running meshfed-policy: {e}"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Writes `lines` (joined with newlines) to `dir/rel`, creating directories.
/// Tests state line numbers by counting in `lines`, 1-based.
fn write(dir: &Path, rel: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn tempdir() -> TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn json(out: &Outcome) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{out}"))
}

/// A VirtualService with a typo on line 11, column 11: `wieght`.
const TYPO_IN_WEIGHT: &[&str] = &[
    "apiVersion: networking.istio.io/v1",
    "kind: VirtualService",
    "metadata:",
    "  name: reviews",
    "  namespace: default",
    "spec:",
    "  hosts: [reviews]",
    "  http:",
    "    - route:",
    "        - destination: {host: reviews}",
    "          wieght: 100",
];

/// A DestinationRule with an unknown load balancer on line 10, column 20
/// (the `simple` key inside the flow mapping).
const UNKNOWN_LB: &[&str] = &[
    "# Ratings' traffic policy.",
    "apiVersion: networking.istio.io/v1",
    "kind: DestinationRule",
    "metadata:",
    "  name: ratings",
    "  namespace: default",
    "spec:",
    "  host: ratings",
    "  trafficPolicy:",
    "    loadBalancer: {simple: FASTEST}",
];

/// A valid VirtualService with a single destination.
const VALID_ROUTE: &[&str] = &[
    "apiVersion: networking.istio.io/v1",
    "kind: VirtualService",
    "metadata:",
    "  name: ratings",
    "  namespace: default",
    "spec:",
    "  hosts: [ratings]",
    "  http:",
    "    - route:",
    "        - destination: {host: ratings}",
];

/// Two destinations whose weights sum to 90, the route on line 9.
const BAD_WEIGHTS: &[&str] = &[
    "apiVersion: networking.istio.io/v1",
    "kind: VirtualService",
    "metadata:",
    "  name: split",
    "  namespace: default",
    "spec:",
    "  hosts: [ratings]",
    "  http:",
    "    - route:",
    "        - destination: {host: ratings}",
    "          weight: 60",
    "        - destination: {host: ratings.default.svc.cluster.local}",
    "          weight: 30",
];

/// A manifest outside the mesh API groups: skipped with a warning.
const DEPLOYMENT: &[&str] = &[
    "apiVersion: apps/v1",
    "kind: Deployment",
    "metadata:",
    "  name: ratings-v1",
    "  namespace: default",
];

#[test]
fn every_example_directory_validates_with_exit_0() {
    let mut dirs: Vec<PathBuf> = fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        // The demo crate's sources live beside the policy repositories.
        .filter(|p| !matches!(p.file_name().and_then(OsStr::to_str), Some("src" | "tests")))
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no example directories under {}",
        examples().display()
    );
    for dir in dirs {
        let out = policy([OsStr::new("validate"), dir.as_os_str()]);
        assert_eq!(out.code, Some(0), "{}:\n{out}", dir.display());
        assert!(out.stdout.contains("valid:"), "{}:\n{out}", dir.display());
        assert!(!out.stdout.contains("error["), "{}:\n{out}", dir.display());
    }
}

#[test]
fn errors_in_two_files_are_both_reported_with_file_line_and_column() {
    let repo = tempdir();
    let a = write(repo.path(), "reviews.yaml", TYPO_IN_WEIGHT);
    let b = write(repo.path(), "nested/ratings.yml", UNKNOWN_LB);

    let out = policy([OsStr::new("validate"), repo.path().as_os_str()]);

    assert_eq!(out.code, Some(1), "{out}");
    let line = |prefix: String| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}:\n{out}"))
            .to_string()
    };
    let typo = line(format!("{}:11:11: error[unknown-field]: ", a.display()));
    assert!(
        typo.ends_with("(at spec.http[0].route[0].wieght)"),
        "{typo}"
    );
    assert!(out.stdout.contains("did you mean `weight`?"), "{out}");
    let lb = line(format!("{}:10:20: error[invalid-type]: ", b.display()));
    assert!(lb.contains("FASTEST"), "{lb}");
    assert!(
        lb.ends_with("(at spec.trafficPolicy.loadBalancer.simple)"),
        "{lb}"
    );
    assert!(out.stdout.contains("2 error(s)"), "{out}");
}

#[test]
fn diagnostics_name_files_as_the_user_wrote_the_path() {
    let repo = tempdir();
    write(repo.path(), "policy/reviews.yaml", TYPO_IN_WEIGHT);

    let out = policy_in(repo.path(), ["validate", "policy"]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout
            .starts_with("policy/reviews.yaml:11:11: error[unknown-field]"),
        "{out}"
    );
}

#[test]
fn json_format_parses_and_carries_every_diagnostic() {
    let repo = tempdir();
    let typo = write(repo.path(), "reviews.yaml", TYPO_IN_WEIGHT);
    let split = write(repo.path(), "split.yaml", BAD_WEIGHTS);
    write(repo.path(), "deploy.yaml", DEPLOYMENT);

    let out = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("--format"),
        OsStr::new("json"),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    let report = json(&out);
    for key in [
        "valid",
        "files",
        "resources",
        "errors",
        "warnings",
        "clusters",
        "diagnostics",
    ] {
        assert!(report.get(key).is_some(), "no `{key}` in {report:#}");
    }
    assert_eq!(report["valid"], false);
    assert_eq!(report["files"], 3);
    assert_eq!(report["errors"], 2);
    assert_eq!(report["warnings"], 1);
    let diags = report["diagnostics"].as_array().unwrap();
    assert_eq!(diags.len(), 3, "{report:#}");
    for d in diags {
        assert!(d["file"].is_string() && d["message"].is_string(), "{d:#}");
        assert!(d["line"].is_u64() && d["column"].is_u64(), "{d:#}");
        assert!(
            d["field_path"].is_string() && d["code"].is_string(),
            "{d:#}"
        );
        assert!(
            ["error", "warning"].contains(&d["severity"].as_str().unwrap()),
            "{d:#}"
        );
    }
    let find = |code: &str| {
        diags
            .iter()
            .find(|d| d["code"] == code)
            .unwrap_or_else(|| panic!("no {code} in {report:#}"))
    };
    let unknown = find("unknown-field");
    assert_eq!(unknown["file"], typo.display().to_string());
    assert_eq!(
        (unknown["line"].as_u64(), unknown["column"].as_u64()),
        (Some(11), Some(11))
    );
    assert_eq!(unknown["field_path"], "spec.http[0].route[0].wieght");
    assert_eq!(unknown["hint"], "did you mean `weight`?");
    let weights = find("weights-sum");
    assert_eq!(weights["file"], split.display().to_string());
    assert_eq!(weights["line"], 9);
    assert_eq!(weights["resource"], "VirtualService default/split");
    assert_eq!(find("foreign-resource")["severity"], "warning");
}

#[test]
fn a_valid_repo_in_json_reports_valid_and_its_clusters() {
    let out = policy([
        OsStr::new("validate"),
        examples().join("multicluster-failover").as_os_str(),
        OsStr::new("--format=json"),
    ]);

    assert_eq!(out.code, Some(0), "{out}");
    let report = json(&out);
    assert_eq!(report["valid"], true);
    assert_eq!(report["clusters"], serde_json::json!(["east", "west"]));
    assert_eq!(report["diagnostics"], serde_json::json!([]));
}

#[test]
fn a_missing_path_exits_2_and_names_it() {
    let repo = tempdir();
    let missing = repo.path().join("no-such-dir");

    let out = policy([OsStr::new("validate"), missing.as_os_str()]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("no-such-dir"),
        "{out}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let examples = examples();
    let unknown_flag = policy([
        OsStr::new("validate"),
        examples.as_os_str(),
        OsStr::new("--bogus"),
    ]);
    assert_eq!(unknown_flag.code, Some(2), "{unknown_flag}");
    let bad_format = policy([
        OsStr::new("validate"),
        examples.as_os_str(),
        OsStr::new("--format=xml"),
    ]);
    assert_eq!(bad_format.code, Some(2), "{bad_format}");
    let no_path = policy(["validate"]);
    assert_eq!(no_path.code, Some(2), "{no_path}");
    let compile_without_cluster = policy([OsStr::new("compile"), examples.as_os_str()]);
    assert_eq!(
        compile_without_cluster.code,
        Some(2),
        "{compile_without_cluster}"
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let repo = tempdir();
    write(repo.path(), "split.yaml", BAD_WEIGHTS);
    write(repo.path(), "reviews.yaml", TYPO_IN_WEIGHT);
    write(repo.path(), "ratings.yaml", UNKNOWN_LB);

    let out = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("-q"),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    for code in [
        "error[weights-sum]",
        "error[unknown-field]",
        "error[invalid-type]",
    ] {
        assert!(out.stdout.contains(code), "no {code}:\n{out}");
    }
}

#[test]
fn compiled_snapshots_for_east_and_west_differ_in_cluster_but_share_the_commit_version() {
    let sha = "3f2a9c41d07be5e0b8c6f1a2d3e4f5061728394a";
    let compile = |cluster: &str| {
        let out = policy([
            OsStr::new("compile"),
            examples().join("multicluster-failover").as_os_str(),
            OsStr::new("--cluster"),
            OsStr::new(cluster),
            OsStr::new("--snapshot-version"),
            OsStr::new(sha),
            OsStr::new("--format"),
            OsStr::new("json"),
        ]);
        assert_eq!(out.code, Some(0), "{out}");
        json(&out)
    };

    let east = compile("east");
    let west = compile("west");

    for snapshot in [&east, &west] {
        for key in ["schema", "version", "content_hash", "policy", "origins"] {
            assert!(snapshot.get(key).is_some(), "no `{key}` in {snapshot:#}");
        }
        assert_eq!(snapshot["version"], sha);
    }
    assert_eq!(east["policy"]["cluster"], "east");
    assert_eq!(west["policy"]["cluster"], "west");
    assert_eq!(east["schema"], west["schema"]);
    assert_ne!(east["content_hash"], west["content_hash"]);
}

#[test]
fn the_content_hash_depends_on_the_policy_not_on_the_version() {
    let hash = |version: &str| {
        let out = policy([
            OsStr::new("compile"),
            examples().join("multicluster-failover").as_os_str(),
            OsStr::new("--cluster=east"),
            OsStr::new("--snapshot-version"),
            OsStr::new(version),
            OsStr::new("--format=json"),
        ]);
        assert_eq!(out.code, Some(0), "{out}");
        json(&out)["content_hash"].clone()
    };

    assert_eq!(
        hash("one-commit"),
        hash("a-later-commit-with-the-same-policy")
    );
}

#[test]
fn compile_for_an_undeclared_cluster_exits_2_and_names_the_declared_clusters() {
    let out = policy([
        OsStr::new("compile"),
        examples().join("multicluster-failover").as_os_str(),
        OsStr::new("--cluster"),
        OsStr::new("north"),
    ]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("north"), "{out}");
    assert!(out.stderr.contains("east, west"), "{out}");
    assert!(out.stdout.is_empty(), "no snapshot may be printed:\n{out}");
}

#[test]
fn compile_of_an_invalid_policy_exits_1_and_prints_no_snapshot() {
    let repo = tempdir();
    write(repo.path(), "reviews.yaml", TYPO_IN_WEIGHT);

    let out = policy([
        OsStr::new("compile"),
        repo.path().as_os_str(),
        OsStr::new("--cluster=east"),
        OsStr::new("--format=json"),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.contains("error[unknown-field]"), "{out}");
}

#[test]
fn canonical_compile_output_is_one_line_of_json_and_stable() {
    let compile = || {
        policy([
            OsStr::new("compile"),
            examples().join("multicluster-failover").as_os_str(),
            OsStr::new("--cluster=west"),
            OsStr::new("--format=canonical"),
        ])
    };

    let first = compile();
    let second = compile();

    assert_eq!(first.code, Some(0), "{first}");
    assert_eq!(first.stdout, second.stdout);
    assert_eq!(first.stdout.trim_end().lines().count(), 1, "{first}");
    assert_eq!(json(&first)["policy"]["cluster"], "west");
}

#[test]
fn exclude_skips_a_broken_file() {
    let repo = tempdir();
    write(repo.path(), "mesh/ratings.yaml", VALID_ROUTE);
    write(repo.path(), "charts/templates/broken.yaml", TYPO_IN_WEIGHT);

    let all = policy([OsStr::new("validate"), repo.path().as_os_str()]);
    let excluded = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("--exclude"),
        OsStr::new("charts/**"),
    ]);

    assert_eq!(all.code, Some(1), "{all}");
    assert_eq!(excluded.code, Some(0), "{excluded}");
    assert!(!excluded.stdout.contains("broken.yaml"), "{excluded}");
}

#[test]
fn include_reads_only_matching_files() {
    let repo = tempdir();
    write(repo.path(), "mesh/ratings.yaml", VALID_ROUTE);
    write(repo.path(), "apps/broken.yaml", TYPO_IN_WEIGHT);

    let out = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("--include"),
        OsStr::new("mesh/**"),
    ]);

    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("1 file(s)"), "{out}");
}

#[test]
fn deny_warnings_turns_a_foreign_manifest_warning_into_exit_1() {
    let repo = tempdir();
    write(repo.path(), "ratings.yaml", VALID_ROUTE);
    let deploy = write(repo.path(), "deployment.yaml", DEPLOYMENT);

    let lenient = policy([OsStr::new("validate"), repo.path().as_os_str()]);
    let strict = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("--deny-warnings"),
    ]);

    let warning = format!("{}:2:1: warning[foreign-resource]: ", deploy.display());
    assert_eq!(lenient.code, Some(0), "{lenient}");
    assert!(lenient.stdout.contains(&warning), "{lenient}");
    assert_eq!(strict.code, Some(1), "{strict}");
    assert!(strict.stdout.contains(&warning), "{strict}");
}

#[test]
fn istio_proxy_kinds_warn_and_strict_kinds_turns_them_into_exit_1() {
    let repo = tempdir();
    write(repo.path(), "ratings.yaml", VALID_ROUTE);
    let gw = write(
        repo.path(),
        "gateway.yaml",
        &[
            "apiVersion: networking.istio.io/v1",
            "kind: Gateway",
            "metadata: {name: bookinfo-gateway}",
            "spec:",
            "  selector: {istio: ingressgateway}",
            "  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ['*']}]",
        ],
    );
    let deploy = write(repo.path(), "deployment.yaml", DEPLOYMENT);
    let lenient = policy([OsStr::new("validate"), repo.path().as_os_str()]);
    let strict = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("--strict-kinds"),
    ]);
    let warning = format!(
        "{}:2:1: warning[istio-proxy-kind]: skipping Gateway bookinfo-gateway (networking.istio.io/v1): enforced by Istio's proxies; meshfed does not apply it",
        gw.display()
    );
    assert_eq!(lenient.code, Some(0), "{lenient}");
    assert!(lenient.stdout.contains(&warning), "{lenient}");
    assert_eq!(strict.code, Some(1), "{strict}");
    assert!(
        strict
            .stdout
            .contains(&format!("{}:2:1: error[istio-proxy-kind]", gw.display())),
        "{strict}"
    );
    // A Kubernetes kind stays a warning: --strict-kinds is about Istio's.
    let foreign = format!("{}:2:1: warning[foreign-resource]", deploy.display());
    assert!(strict.stdout.contains(&foreign), "{strict}");
}

#[test]
fn quiet_prints_errors_but_no_warnings_or_summary() {
    let repo = tempdir();
    write(repo.path(), "reviews.yaml", TYPO_IN_WEIGHT);
    write(repo.path(), "deployment.yaml", DEPLOYMENT);

    let out = policy([
        OsStr::new("validate"),
        repo.path().as_os_str(),
        OsStr::new("-q"),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("error[unknown-field]"), "{out}");
    assert!(!out.stdout.contains("warning["), "{out}");
    assert!(!out.stdout.contains("error(s)"), "{out}");
}

#[test]
fn validating_a_single_file_ignores_its_broken_siblings() {
    let repo = tempdir();
    let good = write(repo.path(), "ratings.yaml", VALID_ROUTE);
    write(repo.path(), "reviews.yaml", TYPO_IN_WEIGHT);

    let out = policy([OsStr::new("validate"), good.as_os_str()]);

    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("1 file(s)"), "{out}");
}

/// A pre-commit hook as the CLI's help suggests, in a real git repository:
/// it validates only the staged YAML files.
#[cfg(unix)]
#[test]
fn pre_commit_hook_blocks_a_broken_policy_file_and_accepts_the_fix() {
    use std::os::unix::fs::PermissionsExt;

    let repo = tempdir();
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.args(args)
            .current_dir(repo.path())
            // Keep the user's and the machine's git config (and hooks) out.
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "test")
            .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
            .env("GIT_COMMITTER_NAME", "test")
            .env("GIT_COMMITTER_EMAIL", "test@example.invalid");
        run(&mut cmd).unwrap_or_else(|e| panic!("git {args:?}: {e}"))
    };
    assert_eq!(git(&["init", "-q"]).code, Some(0));
    let hook = repo.path().join(".git/hooks/pre-commit");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\n\
             files=$(git diff --cached --name-only --diff-filter=ACMR -- '*.yaml' '*.yml')\n\
             [ -z \"$files\" ] && exit 0\n\
             exec '{}' validate --deny-warnings $files\n",
            bin("meshfed-policy").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();

    write(repo.path(), "mesh/reviews.yaml", TYPO_IN_WEIGHT);
    assert_eq!(git(&["add", "mesh/reviews.yaml"]).code, Some(0));
    let blocked = git(&["commit", "-q", "-m", "reviews: route"]);
    assert_ne!(
        blocked.code,
        Some(0),
        "the hook let a broken file through:\n{blocked}"
    );
    let shown = format!("{}{}", blocked.stdout, blocked.stderr);
    assert!(
        shown.contains("mesh/reviews.yaml:11:11: error[unknown-field]"),
        "{blocked}"
    );

    write(repo.path(), "mesh/reviews.yaml", VALID_ROUTE);
    assert_eq!(git(&["add", "mesh/reviews.yaml"]).code, Some(0));
    let accepted = git(&["commit", "-q", "-m", "reviews: route"]);
    assert_eq!(accepted.code, Some(0), "{accepted}");
}

#[test]
fn codes_lists_every_code_the_validator_emits() {
    let text = policy(["codes"]);
    let markdown = policy(["codes", "--format", "markdown"]);

    assert_eq!(text.code, Some(0), "{text}");
    assert_eq!(markdown.code, Some(0), "{markdown}");
    for code in [
        "unknown-field",
        "invalid-type",
        "weights-sum",
        "foreign-resource",
        "io",
    ] {
        assert!(
            text.stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(code)),
            "`codes` does not list {code}:\n{text}"
        );
        assert!(
            markdown.stdout.contains(&format!("| `{code}` |")),
            "{markdown}"
        );
    }
    assert!(
        markdown.stdout.contains("| `foreign-resource` | warning |"),
        "{markdown}"
    );
}
