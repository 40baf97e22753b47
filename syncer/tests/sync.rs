//! The syncer as operators run it: the real binary (`--no-grpc`: these
//! tests are about Git, triggers, the pipeline and status; delivery to
//! gateways is tested in tests/ with real gateways), real Git repositories
//! made with the `git` CLI, real HTTP.

// Test helpers panic with context on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;
use meshfed_syncer::trigger::{github_signature, hmac_hex};

const SECRET: &str = "webhook-s3cret";

struct Setup {
    _tmp: tempfile::TempDir,
    repo: Repo,
    state: std::path::PathBuf,
    work: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::init(&tmp.path().join("remote"));
    let state = tmp.path().join("state");
    let work = tmp.path().to_path_buf();
    std::fs::write(work.join("secret"), SECRET).unwrap();
    Setup {
        _tmp: tmp,
        repo,
        state,
        work,
    }
}

impl Setup {
    fn start(&self, extra: &[&str]) -> Syncer {
        let mut args = vec![
            "--repo".to_string(),
            self.repo.dir.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--no-grpc".into(),
            "--webhook-secret-file".into(),
            self.work.join("secret").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Syncer::start(&self.work, &refs)
    }
}

const PUSH: &str = r#"{"ref":"refs/heads/main","after":"x"}"#;
const HOUR: &str = "1h";

#[test]
fn a_signed_webhook_syncs_at_once_and_a_forged_one_gets_401_and_changes_nothing_for_each_provider()
{
    let s = setup();
    let c1 = s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    // An hour's poll: only the webhook can bring the next commit.
    let syncer = s.start(&["--poll-interval", HOUR]);
    syncer.wait_good(&c1);

    let gh = github_signature(SECRET.as_bytes(), PUSH.as_bytes());
    let gt = hmac_hex(SECRET.as_bytes(), PUSH.as_bytes());
    let forged_gh = github_signature(b"guess", PUSH.as_bytes());
    let forged: [(&str, &str); 4] = [
        ("X-Hub-Signature-256", &forged_gh),
        ("X-Gitea-Signature", "deadbeef"),
        ("X-Gitlab-Token", "guess"),
        ("X-Nothing", "1"),
    ];
    let goods: [(&str, &str); 3] = [
        ("X-Hub-Signature-256", &gh),
        ("X-Gitea-Signature", &gt),
        ("X-Gitlab-Token", SECRET),
    ];
    let mut prev = c1;
    for (i, good) in goods.iter().enumerate() {
        let next = s.repo.commit(
            &format!("c{i}"),
            &[("reviews.yaml", &format!("{}# {i}\n", reviews_vs(None)))],
        );
        let before = syncer.status()["triggers"].clone();
        for f in forged {
            let (code, body) = syncer.post_hook(&[f], PUSH);
            assert_eq!(code, 401, "forged {f:?}: {body}");
        }
        // A refusal requests nothing: the counter is bumped before any
        // signed request is answered, so this is not a race.
        assert_eq!(syncer.status()["triggers"], before);
        assert_eq!(syncer.last_good().as_deref(), Some(prev.as_str()));

        let t = Instant::now();
        let (code, body) = syncer.post_hook(&[*good], PUSH);
        assert_eq!(code, 202, "{good:?}: {body}");
        syncer.wait_good(&next);
        eprintln!("{}: webhook → published in {:?}", good.0, t.elapsed());
        prev = next;
    }
}

#[test]
fn a_push_to_another_branch_is_acknowledged_but_does_not_sync() {
    let s = setup();
    s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    let syncer = s.start(&["--poll-interval", HOUR]);
    let body = r#"{"ref":"refs/heads/feature"}"#;
    let sig = github_signature(SECRET.as_bytes(), body.as_bytes());
    let (code, text) = syncer.post_hook(&[("X-Hub-Signature-256", &sig)], body);
    assert_eq!(code, 202, "{text}");
    assert!(text.contains("ignored"), "{text}");
    assert_eq!(syncer.status()["triggers"]["requests"], 0);
}

#[test]
fn polling_picks_up_a_new_commit() {
    let s = setup();
    let c1 = s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    let syncer = s.start(&["--poll-interval", "200ms"]);
    syncer.wait_good(&c1);
    let c2 = s.repo.commit("two", &[("reviews.yaml", &reviews_vs(None))]);
    syncer.wait_good(&c2);
}

#[test]
fn a_bad_commit_is_rejected_with_file_line_the_last_good_stays_and_the_next_good_one_is_accepted() {
    let s = setup();
    let c1 = s.repo.commit("one", &[("mesh/clusters.yaml", &clusters())]);
    let syncer = s.start(&["--poll-interval", "200ms"]);
    syncer.wait_good(&c1);

    let bad = s
        .repo
        .commit("bad weights", &[("mesh/ratings.yaml", BAD_WEIGHTS)]);
    let rejected = syncer.wait_rejected(&bad);
    let diags = rejected["diagnostics"].as_array().unwrap();
    let weights = diags
        .iter()
        .find(|d| d["code"] == "weights-sum")
        .unwrap_or_else(|| panic!("no weights-sum diagnostic: {rejected}"));
    assert_eq!(
        weights["file"], "mesh/ratings.yaml",
        "repo-relative path: {weights}"
    );
    assert!(weights["line"].as_u64().unwrap() >= 7, "{weights}");
    assert_eq!(syncer.last_good().as_deref(), Some(c1.as_str()));

    // The log and the status CLI show FILE:LINE too.
    let log = syncer.log_text();
    assert!(log.contains("mesh/ratings.yaml:"), "{log}");
    let out = syncer_cmd()
        .args(["status", "--server", &syncer.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("rejected  {}", &bad[..12])),
        "{text}"
    );
    assert!(text.contains("mesh/ratings.yaml:"), "{text}");
    // The rejected commit's rollout fails `status --wait` with exit 1.
    let out = syncer_cmd()
        .args([
            "status",
            "--server",
            &syncer.url(),
            "--wait",
            &bad,
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let fixed = s.repo.commit(
        "fix",
        &[("mesh/ratings.yaml", &BAD_WEIGHTS.replace("40", "50"))],
    );
    syncer.wait_good(&fixed);
    let m = syncer.get("/metrics").1;
    assert!(
        m.contains("meshfed_syncer_commits_total{result=\"rejected\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshfed_syncer_commits_total{result=\"accepted\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("meshfed_syncer_git_fetch_duration_seconds_count"),
        "{m}"
    );
}

#[test]
fn per_cluster_targeting_reaches_only_the_named_clusters_snapshot() {
    let s = setup();
    let c = s.repo.commit(
        "west only",
        &[
            ("clusters.yaml", &clusters()),
            ("reviews.yaml", &reviews_vs(Some("west"))),
        ],
    );
    let syncer = s.start(&["--poll-interval", HOUR]);
    syncer.wait_good(&c);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.state.join("last-good.json")).unwrap()).unwrap();
    assert_eq!(saved["commit"], c.as_str());
    let snap = |cluster: &str| -> serde_json::Value {
        serde_json::from_str(saved["clusters"][cluster].as_str().unwrap()).unwrap()
    };
    let (east, west) = (snap("east"), snap("west"));
    assert_eq!(west["version"], c.as_str());
    assert_eq!(east["version"], c.as_str());
    let host = "reviews.default.svc.cluster.local";
    assert!(west["policy"]["routes"].get(host).is_some(), "{west}");
    assert!(east["policy"]["routes"].get(host).is_none(), "{east}");
    // Both clusters are served, with different content.
    let st = syncer.status();
    assert_ne!(
        st["clusters"]["east"]["content_hash"],
        st["clusters"]["west"]["content_hash"]
    );
}

#[test]
fn a_force_push_is_followed_and_ancestry_decides_what_a_later_commit_contains() {
    let s = setup();
    let base = s.repo.commit("base", &[("clusters.yaml", &clusters())]);
    let c2 = s.repo.commit("two", &[("reviews.yaml", &reviews_vs(None))]);
    let syncer = s.start(&["--poll-interval", "200ms"]);
    syncer.wait_good(&c2);
    // Rewrite history: drop c2, commit something else on base.
    git(&s.repo.dir, &["reset", "-q", "--hard", &base]);
    let c3 = s
        .repo
        .commit("rewritten", &[("reviews.yaml", &reviews_vs(Some("east")))]);
    syncer.wait_good(&c3);
    // base is contained in c3 (live, carried by c3); c2 is no longer on the branch.
    let r: serde_json::Value =
        serde_json::from_str(&syncer.get(&format!("/rollout/{base}")).1).unwrap();
    assert_eq!(r["covered_by"], c3.as_str(), "{r}");
    let r: serde_json::Value =
        serde_json::from_str(&syncer.get(&format!("/rollout/{c2}")).1).unwrap();
    assert_ne!(r["covered_by"], c3.as_str(), "{r}");
}

#[test]
fn a_restarted_syncer_serves_its_last_good_commit_with_the_remote_gone() {
    let s = setup();
    let c1 = s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    let mut syncer = s.start(&["--poll-interval", HOUR]);
    syncer.wait_good(&c1);
    assert_eq!(syncer.terminate(), Some(0), "{}", syncer.log_text());
    std::fs::remove_dir_all(&s.repo.dir).unwrap();

    let syncer = s.start(&["--poll-interval", HOUR]);
    // Served at once from the state directory, before any fetch succeeded.
    let st = syncer.status();
    assert_eq!(st["last_good"]["commit"], c1.as_str(), "{st}");
    assert_eq!(st["last_good"]["restored"], true, "{st}");
    let st = eventually_status(&syncer, |st| st["last_fetch"]["ok"] == false);
    let err = st["last_fetch"]["error"].as_str().unwrap();
    assert!(err.contains("remote"), "{err}");
    assert_eq!(st["last_good"]["commit"], c1.as_str());
    assert!(st["clusters"]["east"]["version"] == c1.as_str(), "{st}");
}

fn eventually_status(
    syncer: &Syncer,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    meshfed_tests::eventually("a status condition", Duration::from_secs(20), || {
        let st = syncer.status();
        if cond(&st) {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    })
}

#[test]
fn status_wait_exits_0_when_every_known_gateway_applied_3_on_timeout_and_2_on_bad_input_or_no_syncer()
 {
    let s = setup();
    let c1 = s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    let syncer = s.start(&["--poll-interval", HOUR]);
    syncer.wait_good(&c1);
    let run = |args: &[&str]| {
        let out = syncer_cmd()
            .args(["status", "--server", &syncer.url()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // No gateway is known (no config server here), so it is live at once,
    // and the output says no gateway is known.
    let (code, out) = run(&["--wait", &c1[..10]]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("LIVE"), "{out}");
    assert!(out.contains("no known gateway"), "{out}");
    // A commit the syncer never saw: pending until the timeout, exit 3.
    let (code, out) = run(&[
        "--wait",
        "0123456789abcdef0123456789abcdef01234567",
        "--timeout",
        "600ms",
    ]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("timed out"), "{out}");
    // Not a SHA: usage error.
    let (code, _) = run(&["--wait", "main"]);
    assert_eq!(code, Some(2));
    // Nobody listening: exit 2 naming the server.
    let out = syncer_cmd()
        .args([
            "status",
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// `/rollout/SHA`, `/status` and `meshfed-syncer status` show what each
/// accepted commit changes for each cluster (`meshfed-policy diff`'s
/// sentences), from the commit published before it.
#[test]
fn each_accepted_commit_shows_its_effective_change_per_cluster_in_status_and_rollout() {
    let s = setup();
    let base = s.repo.commit(
        "west only",
        &[
            ("clusters.yaml", &clusters()),
            ("reviews.yaml", &reviews_vs(Some("west"))),
        ],
    );
    let syncer = s.start(&["--poll-interval", "200ms"]);
    syncer.wait_good(&base);
    let c2 = s
        .repo
        .commit("east too", &[("reviews.yaml", &reviews_vs(None))]);
    syncer.wait_good(&c2);
    let r: serde_json::Value =
        serde_json::from_str(&syncer.get(&format!("/rollout/{c2}")).1).unwrap();
    assert_eq!(r["changes"]["from"], base.as_str(), "{r}");
    let cluster = |name: &str| {
        r["changes"]["clusters"]
            .as_array()
            .and_then(|v| v.iter().find(|c| c["cluster"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {r}"))
    };
    assert_eq!(cluster("west")["status"], "unchanged", "{r}");
    let east = cluster("east");
    assert_eq!(east["status"], "changed", "{r}");
    assert_eq!(east["changes"][0]["area"], "route", "{r}");
    assert_eq!(east["changes"][0]["kind"], "added", "{r}");
    assert_eq!(
        east["changes"][0]["summary"],
        "reviews.default: new routes (VirtualService default/reviews): any request → reviews.default 100%",
        "{r}"
    );
    // The status document carries it with the last good commit.
    assert_eq!(
        syncer.status()["last_good"]["changes"]["from"],
        base.as_str()
    );
    // And `status` says it in words.
    let out = syncer_cmd()
        .args(["status", "--server", &syncer.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("changes from"), "{text}");
    assert!(
        text.contains("east: reviews.default: new routes (VirtualService default/reviews)"),
        "{text}"
    );
    assert!(text.contains("no change for cluster west"), "{text}");
}

#[test]
fn status_and_metrics_need_the_bearer_token_when_one_is_set_but_the_webhook_only_its_signature() {
    let s = setup();
    s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    std::fs::write(s.work.join("token"), "t0ken-abc\n").unwrap();
    let mut syncer = s.start(&[
        "--poll-interval",
        HOUR,
        "--http-token-file",
        s.work.join("token").to_str().unwrap(),
    ]);
    assert_eq!(syncer.get("/status").0, 401);
    assert_eq!(syncer.get("/metrics").0, 401);
    let sig = github_signature(SECRET.as_bytes(), PUSH.as_bytes());
    assert_eq!(
        syncer.post_hook(&[("X-Hub-Signature-256", &sig)], PUSH).0,
        202
    );
    syncer.token = Some("t0ken-abc".into());
    assert_eq!(syncer.get("/status").0, 200);
    assert_eq!(syncer.get("/metrics").0, 200);
}

/// Reads until the syncer closes the connection; returns what it sent and
/// when it closed, or panics after `limit`.
fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> (String, Instant) {
    use std::io::Read;
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the syncer kept a stalled client past {limit:?}: {e}"),
    }
    (String::from_utf8_lossy(&out).into_owned(), Instant::now())
}

#[test]
fn a_stalled_http_client_is_cut_at_the_header_timeout_and_the_listener_keeps_serving() {
    use std::io::Write;
    let s = setup();
    s.repo.commit("one", &[("clusters.yaml", &clusters())]);
    let syncer = s.start(&["--poll-interval", HOUR, "--header-timeout", "1s"]);
    let t0 = Instant::now();
    // Slowloris: half a request head, then nothing.
    let mut head = std::net::TcpStream::connect(syncer.http).unwrap();
    head.write_all(b"POST /hooks/git HTTP/1.1\r\nHost: s\r\nX-Hub-Sig")
        .unwrap();
    // A webhook whose body stalls: announced 100 bytes, sends 2.
    let mut body = std::net::TcpStream::connect(syncer.http).unwrap();
    body.write_all(b"POST /hooks/git HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n{\"")
        .unwrap();
    // An idle kept-alive connection, after one request.
    let mut idle = std::net::TcpStream::connect(syncer.http).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n")
        .unwrap();

    let (_, closed) = read_until_closed(&mut head, Duration::from_secs(10));
    let took = closed - t0;
    assert!(took >= Duration::from_millis(900), "cut early: {took:?}");
    let (answer, closed) = read_until_closed(&mut body, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--header-timeout"), "{answer}");
    let took = closed - t0;
    assert!(took >= Duration::from_millis(900), "cut early: {took:?}");
    let (answer, _) = read_until_closed(&mut idle, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Nothing of that hurt the listener.
    assert_eq!(syncer.get("/healthz").0, 200);
}

#[test]
fn an_exposed_http_listener_without_a_token_refuses_to_start() {
    let s = setup();
    let out = syncer_cmd()
        .args(["--repo", "/nonexistent", "--state-dir"])
        .arg(&s.state)
        .args(["--no-grpc", "--http-addr", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--http-token-file"), "{err}");
}

#[test]
fn credentials_in_the_url_and_the_token_never_reach_logs_or_status() {
    let s = setup();
    let port = free_port();
    std::fs::write(s.work.join("gittoken"), "ghp_T0KENVALUE").unwrap();
    let url = format!("http://alice:pa55w0rdXYZ@127.0.0.1:{port}/policy.git");
    let syncer = Syncer::start(
        &s.work,
        &[
            "--repo",
            &url,
            "--state-dir",
            s.state.to_str().unwrap(),
            "--no-grpc",
            "--git-token-file",
            s.work.join("gittoken").to_str().unwrap(),
            "--poll-interval",
            HOUR,
        ],
    );
    let st = eventually_status(&syncer, |st| st["last_fetch"]["ok"] == false);
    let text = st.to_string() + &syncer.log_text();
    for secret in ["pa55w0rdXYZ", "ghp_T0KENVALUE", "alice"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    assert!(
        st["repo"].as_str().unwrap().contains("***@127.0.0.1"),
        "{st}"
    );
}

#[test]
fn a_path_and_globs_select_the_policy_files() {
    let s = setup();
    let c = s.repo.commit(
        "layout",
        &[
            ("mesh/clusters.yaml", &clusters()),
            ("mesh/charts/broken.yaml", "kind: [unclosed"),
            ("other/broken.yaml", "kind: [unclosed"),
        ],
    );
    let syncer = s.start(&[
        "--poll-interval",
        HOUR,
        "--path",
        "mesh",
        "--exclude",
        "charts/**",
    ]);
    syncer.wait_good(&c);
}

#[test]
fn help_documents_flags_ports_and_exit_codes() {
    let out = syncer_cmd().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "0.0.0.0:15012",
        "127.0.0.1:15014",
        "--ready-file",
        "--config",
        "--log-format",
        "--tls-dir",
        "--require-signed",
        "--trusted-keys",
        "--webhook-secret-file",
        "--http-token-file",
        "--known-window",
        "[default: 30s]",
        "3 --timeout",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[test]
fn settings_come_from_a_config_file_and_all_problems_are_reported_together() {
    let s = setup();
    let cfg = s.work.join("syncer.yaml");
    std::fs::write(
        &cfg,
        "poll-interval: 1h\nrequire-signed: true\ntrusted-keys: /nonexistent/keys\n",
    )
    .unwrap();
    let out = syncer_cmd().arg("--config").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for needle in [
        "--repo is required",
        "--state-dir is required",
        "/nonexistent/keys",
        "--tls-dir",
    ] {
        assert!(err.contains(needle), "lacks {needle}: {err}");
    }
}

/// Issue 16: the syncer and the gateway read config files with one shim
/// (meshfed_cli::config_file). A list item that is not a scalar is refused
/// (it used to be dropped without a word), and a list for a flag that takes
/// one value is refused by name (it used to become that flag twice).
#[test]
fn a_config_file_list_is_refused_for_a_single_value_flag_and_for_non_scalar_items() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("syncer.yaml");
    std::fs::write(
        &cfg,
        "poll-interval: [1m, 2m]\nexclude: [charts/**, {a: 1}]\n",
    )
    .unwrap();
    let out = syncer_cmd().arg("--config").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for needle in [
        "`poll-interval` takes one value, not a list",
        "`exclude` item 2: must be a string, number or boolean, not a map",
    ] {
        assert!(err.contains(needle), "lacks {needle}: {err}");
    }
}

fn export(name: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: default}}\n"
    )
}

/// Issue 21, item 14: a valid commit that deletes every export but keeps
/// the Clusters used to go live everywhere at once. Now it is held (the
/// last good commit stays in force), `status` shows it as held with the
/// reason and the override, `status --wait` on it fails; a smaller
/// deletion goes through, and a later commit that carries the
/// `Meshfed-Allow-Deletion: true` trailer applies it.
#[test]
fn a_commit_that_deletes_most_resources_is_held_until_a_commit_with_the_override_trailer_contains_it()
 {
    let s = setup();
    let names: Vec<String> = (0..10).map(|i| format!("svc-{i}")).collect();
    let texts: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("exports/{n}.yaml"), export(n)))
        .collect();
    let cl = clusters();
    let mut files: Vec<(&str, &str)> = texts
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    files.push(("clusters.yaml", &cl));
    let c1 = s.repo.commit("federation", &files);
    let syncer = s.start(&["--poll-interval", "200ms"]);
    syncer.wait_good(&c1);

    // 2 of 12 resources: under the default 50%, goes live.
    let small = s.repo.commit(
        "retire two",
        &[("exports/svc-0.yaml", ""), ("exports/svc-1.yaml", "")],
    );
    syncer.wait_good(&small);

    // Every remaining export (8 of 10): held.
    let gone: Vec<(&str, &str)> = texts[2..].iter().map(|(p, _)| (p.as_str(), "")).collect();
    let mass = s.repo.commit("remove every export", &gone);
    let held = eventually_status(&syncer, |st| st["held"]["commit"] == mass)["held"].clone();
    let reason = held["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("deletes 8 of the 10 resources")
            && reason.contains("Meshfed-Allow-Deletion: true"),
        "{held}"
    );
    assert_eq!(held["state"], "held", "{held}");
    assert_eq!(syncer.last_good().as_deref(), Some(small.as_str()));
    let out = syncer_cmd()
        .args([
            "status",
            "--server",
            &syncer.url(),
            "--wait",
            &mass,
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("HELD") && text.contains("would delete ServiceExport"),
        "{text}"
    );

    // The override: an empty commit on top with the trailer.
    let ok = s.repo.commit(
        "apply the export removal\n\nMeshfed-Allow-Deletion: true",
        &[],
    );
    syncer.wait_good(&ok);
    let st = syncer.status();
    assert!(st["held"].is_null(), "{st}");
    let out = syncer_cmd()
        .args([
            "status",
            "--server",
            &syncer.url(),
            "--wait",
            &mass,
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the held commit is live once the override contains it: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
