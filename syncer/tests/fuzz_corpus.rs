//! Replays the committed corpus of the `webhook` fuzz target through the
//! target's own checks, on stable, in a plain `cargo test` (no nightly, no
//! sanitizers, no libFuzzer).
//!
//! - `syncer/fuzz/corpus/webhook/`: the minimized corpus;
//! - `syncer/fuzz/regressions/webhook/`: inputs that once failed under the
//!   fuzzer, kept out of the fuzzing corpus so that they cannot stop a run at
//!   start-up.
//!
//! The checks are not copied here: `syncer/fuzz/checks.rs` is compiled into
//! this test and into the fuzz target alike, so CI checks every committed
//! input exactly as the fuzzer did. Here they run against the syncer's own
//! `trigger::webhook` module; the fuzz target compiles the same file on its
//! own. A check fails by panicking; each input runs under `catch_unwind`, so
//! one run names every failing file. No time limit: a hang shows up as a
//! test that does not finish.
//!
//! This file also holds the seed generator (the `seed-*` files: push events
//! of GitHub, GitLab, Gitea and Forgejo as those hosts send them, signed
//! with the syncer's helpers, and hand-made edge cases) and a test that
//! changes every byte of the realistic requests, not just the one a fuzz
//! input picks. See docs/fuzzing.md, "Syncer target".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

// `checks.rs` reaches the module under test as `super::webhook`.
use meshfed_syncer::trigger::webhook;

#[path = "../fuzz/checks.rs"]
mod checks;

#[path = "../../policy/tests/support/fuzz_replay.rs"]
mod fuzz_replay;

use fuzz_replay::{assert_no_failures, replay};

fn fuzz_dir() -> PathBuf {
    fuzz_replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

/// The files directly in `syncer/fuzz/<dir>`, sorted.
fn inputs(dir: &str) -> Vec<PathBuf> {
    fuzz_replay::inputs(&fuzz_dir(), dir)
}

#[test]
fn webhook_corpus() {
    let files = inputs("corpus/webhook");
    assert!(
        !files.is_empty(),
        "syncer/fuzz/corpus/webhook is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_webhook);
    assert_no_failures("webhook corpus", files.len(), &failures);
}

/// Past findings. This directory may be empty, so no non-empty assertion.
#[test]
fn webhook_regressions() {
    let files = inputs("regressions/webhook");
    let failures = replay(&files, checks::check_webhook);
    assert_no_failures("webhook regression", files.len(), &failures);
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

/// The secret of most seeds: what `openssl rand -hex 32` gives, as
/// docs/operations.md suggests.
const SECRET: &str = "5f0c3a9e2b7d41c8a6e19f3b0d2c7e84a1b6f9d3c5e07a2b4d8f1c6e3a9b0d57";

const GITHUB_DELIVERY: &str = "b5f3c1a0-7c2e-11ef-8f6a-2e1c9d4b7a10";
const GITLAB_UUID: &str = "4d2b8f0e-9a1c-4e37-b6d5-0c8e2f7a3b91";
const GITEA_DELIVERY: &str = "8a3f6d2c-51e4-4b9a-9c07-e6b1f4d0a2c5";

/// One webhook input in the framing of `checks.rs`: the secret line, the
/// header lines, an empty line, the body.
fn framed(secret: &[u8], headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = secret.to_vec();
    out.push(b'\n');
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

fn github_headers(event: &str, signature: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Accept", "*/*".into()),
        ("Content-Type", "application/json".into()),
        ("User-Agent", "GitHub-Hookshot/7b4d2e9".into()),
        ("X-GitHub-Delivery", GITHUB_DELIVERY.into()),
        ("X-GitHub-Event", event.into()),
        ("X-GitHub-Hook-ID", "512093877".into()),
        ("X-GitHub-Hook-Installation-Target-ID", "873346211".into()),
        (
            "X-GitHub-Hook-Installation-Target-Type",
            "repository".into(),
        ),
        ("X-Hub-Signature-256", signature.into()),
    ]
}

fn gitlab_headers(event: &str, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "application/json".into()),
        ("User-Agent", "GitLab/17.6.1".into()),
        (
            "Idempotency-Key",
            "0e7c4a52-3b9f-4d18-a2c6-95f0e1b3d7a4".into(),
        ),
        ("X-Gitlab-Event", event.into()),
        (
            "X-Gitlab-Event-UUID",
            "f1a9c3e7-2d5b-4f80-9e6a-7c3b1d0e8f24".into(),
        ),
        ("X-Gitlab-Instance", "https://gitlab.example.com".into()),
        ("X-Gitlab-Webhook-UUID", GITLAB_UUID.into()),
        ("X-Gitlab-Token", token.into()),
    ]
}

/// Gitea sends its own signature, Gogs' and GitHub's, all of the body.
fn gitea_headers(hex: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "application/json".into()),
        ("User-Agent", "Go-http-client/1.1".into()),
        ("X-GitHub-Delivery", GITEA_DELIVERY.into()),
        ("X-GitHub-Event", "push".into()),
        ("X-GitHub-Event-Type", "push".into()),
        ("X-Gitea-Delivery", GITEA_DELIVERY.into()),
        ("X-Gitea-Event", "push".into()),
        ("X-Gitea-Event-Type", "push".into()),
        ("X-Gitea-Signature", hex.into()),
        ("X-Gogs-Delivery", GITEA_DELIVERY.into()),
        ("X-Gogs-Event", "push".into()),
        ("X-Gogs-Event-Type", "push".into()),
        ("X-Gogs-Signature", hex.into()),
        ("X-Hub-Signature-256", format!("sha256={hex}")),
    ]
}

/// Forgejo sends the Gitea set plus its own.
fn forgejo_headers(hex: &str) -> Vec<(&'static str, String)> {
    let mut h = gitea_headers(hex);
    h.insert(8, ("X-Forgejo-Delivery", GITEA_DELIVERY.into()));
    h.insert(9, ("X-Forgejo-Event", "push".into()));
    h.insert(10, ("X-Forgejo-Event-Type", "push".into()));
    h.insert(11, ("X-Forgejo-Signature", hex.into()));
    h
}

fn borrow<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

const BEFORE: &str = "9c1e4b7a2d5f8e0c3b6a9d2f5e8c1b4a7d0e3f62";
const AFTER: &str = "3f2c9e1d8b7a6c5e4d3f2a1b0c9e8d7f6a5b4c3d";
const ZERO: &str = "0000000000000000000000000000000000000000";

/// A GitHub push event, abridged from a real delivery (fewer URL members).
fn github_push(git_ref: &str, before: &str, after: &str, deleted: bool) -> String {
    let commits = if deleted {
        String::from("[]")
    } else {
        format!(
            r#"[{{"id":"{after}","tree_id":"a7d0e3f629c1e4b7a2d5f8e0c3b6a9d2f5e8c1b4","distinct":true,"message":"ratings: send 10% of traffic to v2 in west","timestamp":"2026-11-26T09:14:03+01:00","url":"https://github.com/acme/mesh-policy/commit/{after}","author":{{"name":"Ada Ops","email":"ada@acme.example","username":"ada-ops"}},"committer":{{"name":"GitHub","email":"noreply@github.com","username":"web-flow"}},"added":[],"removed":[],"modified":["ratings.yaml"]}}]"#
        )
    };
    let head = if deleted {
        "null".to_string()
    } else {
        format!(
            r#"{{"id":"{after}","tree_id":"a7d0e3f629c1e4b7a2d5f8e0c3b6a9d2f5e8c1b4","distinct":true,"message":"ratings: send 10% of traffic to v2 in west","timestamp":"2026-11-26T09:14:03+01:00","url":"https://github.com/acme/mesh-policy/commit/{after}","author":{{"name":"Ada Ops","email":"ada@acme.example","username":"ada-ops"}},"committer":{{"name":"GitHub","email":"noreply@github.com","username":"web-flow"}},"added":[],"removed":[],"modified":["ratings.yaml"]}}"#
        )
    };
    format!(
        r#"{{"ref":"{git_ref}","before":"{before}","after":"{after}","repository":{{"id":873346211,"node_id":"R_kgDONA6Zow","name":"mesh-policy","full_name":"acme/mesh-policy","private":true,"owner":{{"name":"acme","email":null,"login":"acme","id":51234987,"node_id":"O_kgDOAw3b6w","type":"Organization","site_admin":false}},"html_url":"https://github.com/acme/mesh-policy","description":"Federation policy for the meshfed clusters","fork":false,"url":"https://github.com/acme/mesh-policy","created_at":1761400000,"updated_at":"2026-11-25T17:02:11Z","pushed_at":1764144843,"git_url":"git://github.com/acme/mesh-policy.git","ssh_url":"git@github.com:acme/mesh-policy.git","clone_url":"https://github.com/acme/mesh-policy.git","size":48,"default_branch":"main","master_branch":"main","organization":"acme"}},"pusher":{{"name":"ada-ops","email":"ada@acme.example"}},"organization":{{"login":"acme","id":51234987,"node_id":"O_kgDOAw3b6w"}},"sender":{{"login":"ada-ops","id":90412766,"node_id":"U_kgDOBWOPXg","type":"User","site_admin":false}},"created":false,"deleted":{deleted},"forced":false,"base_ref":null,"compare":"https://github.com/acme/mesh-policy/compare/9c1e4b7a2d5f...3f2c9e1d8b7a","commits":{commits},"head_commit":{head}}}"#
    )
}

fn github_ping() -> String {
    r#"{"zen":"Design for failure.","hook_id":512093877,"hook":{"type":"Repository","id":512093877,"name":"web","active":true,"events":["push"],"config":{"content_type":"json","insecure_ssl":"0","secret":"********","url":"https://syncer.acme.example/hooks/git"},"updated_at":"2026-11-26T08:00:00Z","created_at":"2026-11-26T08:00:00Z"},"repository":{"id":873346211,"name":"mesh-policy","full_name":"acme/mesh-policy","private":true},"sender":{"login":"ada-ops","id":90412766,"type":"User"}}"#.to_string()
}

/// A GitLab push (or tag push) hook, abridged from a real delivery.
fn gitlab_push(kind: &str, event: &str, git_ref: &str) -> String {
    format!(
        r#"{{"object_kind":"{kind}","event_name":"{event}","before":"{BEFORE}","after":"{AFTER}","ref":"{git_ref}","ref_protected":true,"checkout_sha":"{AFTER}","message":null,"user_id":4,"user_name":"Ada Ops","user_username":"ada-ops","user_email":"","user_avatar":"https://gitlab.example.com/uploads/-/system/user/avatar/4/avatar.png","project_id":15,"project":{{"id":15,"name":"mesh-policy","description":"Federation policy for the meshfed clusters","web_url":"https://gitlab.example.com/platform/mesh-policy","avatar_url":null,"git_ssh_url":"git@gitlab.example.com:platform/mesh-policy.git","git_http_url":"https://gitlab.example.com/platform/mesh-policy.git","namespace":"platform","visibility_level":0,"path_with_namespace":"platform/mesh-policy","default_branch":"main","ci_config_path":null,"homepage":"https://gitlab.example.com/platform/mesh-policy","url":"git@gitlab.example.com:platform/mesh-policy.git","ssh_url":"git@gitlab.example.com:platform/mesh-policy.git","http_url":"https://gitlab.example.com/platform/mesh-policy.git"}},"commits":[{{"id":"{AFTER}","message":"ratings: send 10% of traffic to v2 in west\n","title":"ratings: send 10% of traffic to v2 in west","timestamp":"2026-11-26T09:14:03+01:00","url":"https://gitlab.example.com/platform/mesh-policy/-/commit/{AFTER}","author":{{"name":"Ada Ops","email":"[REDACTED]"}},"added":[],"modified":["ratings.yaml"],"removed":[]}}],"total_commits_count":1,"push_options":{{}},"repository":{{"name":"mesh-policy","url":"git@gitlab.example.com:platform/mesh-policy.git","description":"Federation policy for the meshfed clusters","homepage":"https://gitlab.example.com/platform/mesh-policy","git_http_url":"https://gitlab.example.com/platform/mesh-policy.git","git_ssh_url":"git@gitlab.example.com:platform/mesh-policy.git","visibility_level":0}}}}"#
    )
}

/// A Gitea / Forgejo push event, abridged from a real delivery.
fn gitea_push(host: &str) -> String {
    format!(
        r#"{{
  "ref": "refs/heads/main",
  "before": "{BEFORE}",
  "after": "{AFTER}",
  "compare_url": "https://{host}/platform/mesh-policy/compare/9c1e4b7a2d5f...3f2c9e1d8b7a",
  "commits": [
    {{
      "id": "{AFTER}",
      "message": "ratings: send 10% of traffic to v2 in west\n",
      "url": "https://{host}/platform/mesh-policy/commit/{AFTER}",
      "author": {{"name": "Ada Ops", "email": "ada@acme.example", "username": "ada-ops"}},
      "committer": {{"name": "Ada Ops", "email": "ada@acme.example", "username": "ada-ops"}},
      "verification": null,
      "timestamp": "2026-11-26T09:14:03+01:00",
      "added": [],
      "removed": [],
      "modified": ["ratings.yaml"]
    }}
  ],
  "total_commits": 1,
  "head_commit": {{
    "id": "{AFTER}",
    "message": "ratings: send 10% of traffic to v2 in west\n",
    "url": "https://{host}/platform/mesh-policy/commit/{AFTER}",
    "timestamp": "2026-11-26T09:14:03+01:00",
    "added": [],
    "removed": [],
    "modified": ["ratings.yaml"]
  }},
  "repository": {{
    "id": 7,
    "owner": {{"id": 3, "login": "platform", "full_name": "", "username": "platform"}},
    "name": "mesh-policy",
    "full_name": "platform/mesh-policy",
    "private": true,
    "html_url": "https://{host}/platform/mesh-policy",
    "ssh_url": "git@{host}:platform/mesh-policy.git",
    "clone_url": "https://{host}/platform/mesh-policy.git",
    "default_branch": "main"
  }},
  "pusher": {{"id": 5, "login": "ada-ops", "email": "ada@acme.example", "username": "ada-ops"}},
  "sender": {{"id": 5, "login": "ada-ops", "email": "ada@acme.example", "username": "ada-ops"}}
}}"#
    )
}

/// A seed: its file name (without `seed-`), secret, headers and body.
struct Seed {
    name: &'static str,
    secret: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Seed {
    fn bytes(&self) -> Vec<u8> {
        framed(&self.secret, &borrow(&self.headers), &self.body)
    }
}

fn seed(
    name: &'static str,
    secret: &[u8],
    headers: Vec<(&'static str, String)>,
    body: impl AsRef<[u8]>,
) -> Seed {
    Seed {
        name,
        secret: secret.to_vec(),
        headers,
        body: body.as_ref().to_vec(),
    }
}

fn gh(body: &str) -> String {
    webhook::github_signature(SECRET.as_bytes(), body.as_bytes())
}

fn hx(body: &str) -> String {
    webhook::hmac_hex(SECRET.as_bytes(), body.as_bytes())
}

/// The realistic requests: each host's push as it sends it, correctly
/// signed. `every_byte_of_a_real_request_is_covered` changes each of their
/// bytes.
fn realistic() -> Vec<Seed> {
    let s = SECRET.as_bytes();
    let push = github_push("refs/heads/main", BEFORE, AFTER, false);
    let tag = github_push("refs/tags/v1.4.0", ZERO, AFTER, false)
        .replace(r#""created":false"#, r#""created":true"#);
    let deleted = github_push("refs/heads/feature/canary", AFTER, ZERO, true);
    let ping = github_ping();
    let gl = gitlab_push("push", "push", "refs/heads/main");
    let gl_tag = gitlab_push("tag_push", "tag_push", "refs/tags/v1.4.0");
    let gitea = gitea_push("gitea.acme.example");
    let forgejo = gitea_push("codeberg.org");
    vec![
        seed("github-push", s, github_headers("push", &gh(&push)), &push),
        seed(
            "github-push-tag",
            s,
            github_headers("push", &gh(&tag)),
            &tag,
        ),
        seed(
            "github-push-branch-deleted",
            s,
            github_headers("push", &gh(&deleted)),
            &deleted,
        ),
        seed("github-ping", s, github_headers("ping", &gh(&ping)), &ping),
        seed("gitlab-push", s, gitlab_headers("Push Hook", SECRET), &gl),
        seed(
            "gitlab-tag-push",
            s,
            gitlab_headers("Tag Push Hook", SECRET),
            &gl_tag,
        ),
        seed("gitea-push", s, gitea_headers(&hx(&gitea)), &gitea),
        seed("forgejo-push", s, forgejo_headers(&hx(&forgejo)), &forgejo),
        // GitHub's own worked example ("Validating webhook deliveries").
        seed(
            "github-docs-example",
            b"It's a Secret to Everybody",
            vec![(
                "X-Hub-Signature-256",
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".into(),
            )],
            "Hello, World!",
        ),
    ]
}

/// Every seed: the realistic requests, then edge cases of the headers, the
/// secret, the payload and the framing.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let s = SECRET.as_bytes();
    let push = github_push("refs/heads/main", BEFORE, AFTER, false);
    let small = r#"{"ref":"refs/heads/main","after":"3f2c9e1d8b7a6c5e4d3f2a1b0c9e8d7f6a5b4c3d"}"#;
    let sig = |name: &'static str, value: String| vec![(name, value)];
    let mut all = realistic();
    let mut add = |name, secret: &[u8], headers, body: &[u8]| {
        all.push(seed(name, secret, headers, body));
    };
    // Signature headers that must be refused, or accepted.
    add(
        "github-forged",
        s,
        github_headers(
            "push",
            &webhook::github_signature(b"guess", push.as_bytes()),
        ),
        push.as_bytes(),
    );
    add(
        "github-sha1-prefix",
        s,
        sig("X-Hub-Signature-256", format!("sha1={}", &hx(small)[..40])),
        small.as_bytes(),
    );
    add(
        "github-no-prefix",
        s,
        sig("X-Hub-Signature-256", hx(small)),
        small.as_bytes(),
    );
    add(
        "github-uppercase-hex",
        s,
        sig(
            "X-Hub-Signature-256",
            format!("sha256={}", hx(small).to_uppercase()),
        ),
        small.as_bytes(),
    );
    add(
        "github-space-after-prefix",
        s,
        sig("X-Hub-Signature-256", format!("sha256= {}", hx(small))),
        small.as_bytes(),
    );
    add(
        "github-truncated",
        s,
        sig("X-Hub-Signature-256", gh(small)[..40].to_string()),
        small.as_bytes(),
    );
    add(
        "github-empty-value",
        s,
        sig("X-Hub-Signature-256", String::new()),
        small.as_bytes(),
    );
    add(
        "gitea-odd-length",
        s,
        sig("X-Gitea-Signature", hx(small)[1..].to_string()),
        small.as_bytes(),
    );
    add(
        "gitea-not-hex",
        s,
        sig("X-Gitea-Signature", hx(small).replace('a', "g")),
        small.as_bytes(),
    );
    add(
        "forgejo-only",
        s,
        sig("X-Forgejo-Signature", hx(small)),
        small.as_bytes(),
    );
    add(
        "gitlab-wrong-token",
        s,
        gitlab_headers("Push Hook", "guess"),
        small.as_bytes(),
    );
    add(
        "gitlab-token-other-case",
        s,
        gitlab_headers("Push Hook", &SECRET.to_uppercase()),
        small.as_bytes(),
    );
    add(
        "gitlab-token-prefix",
        s,
        gitlab_headers("Push Hook", &SECRET[..32]),
        small.as_bytes(),
    );
    add(
        "no-signature",
        s,
        vec![
            ("Content-Type", "application/json".into()),
            ("X-GitHub-Event", "push".into()),
        ],
        small.as_bytes(),
    );
    add(
        "github-good-gitlab-bad",
        s,
        vec![
            ("X-Hub-Signature-256", gh(small)),
            ("X-Gitlab-Token", "guess".into()),
        ],
        small.as_bytes(),
    );
    add(
        "gitlab-good-gitea-bad",
        s,
        vec![
            ("X-Gitea-Signature", "00".repeat(32)),
            ("X-Gitlab-Token", SECRET.into()),
        ],
        small.as_bytes(),
    );
    add(
        "all-providers-good",
        s,
        vec![
            ("X-Gitlab-Token", SECRET.into()),
            ("X-Forgejo-Signature", hx(small)),
            ("X-Gitea-Signature", hx(small)),
            ("X-Hub-Signature-256", gh(small)),
        ],
        small.as_bytes(),
    );
    add(
        "github-repeated-good-then-bad",
        s,
        vec![
            ("X-Hub-Signature-256", gh(small)),
            ("X-Hub-Signature-256", "sha256=00".into()),
        ],
        small.as_bytes(),
    );
    add(
        "github-repeated-bad-then-good",
        s,
        vec![
            ("X-Hub-Signature-256", "sha256=00".into()),
            ("X-Hub-Signature-256", gh(small)),
        ],
        small.as_bytes(),
    );
    add(
        "gitea-non-ascii-value",
        s,
        sig("X-Gitea-Signature", format!("{}\u{e9}", hx(small))),
        small.as_bytes(),
    );
    // Secrets: longer than SHA-256's 64-byte block (HMAC hashes the key),
    // exactly one block, one byte.
    for (name, secret) in [
        ("secret-100-bytes", "k".repeat(100)),
        ("secret-64-bytes", "k".repeat(64)),
        ("secret-1-byte", "k".to_string()),
    ] {
        let signature = webhook::github_signature(secret.as_bytes(), small.as_bytes());
        add(
            name,
            secret.as_bytes(),
            vec![
                ("X-Hub-Signature-256", signature),
                ("X-Gitlab-Token", secret.clone()),
            ],
            small.as_bytes(),
        );
    }
    // Payloads.
    let form = format!(
        "payload={}",
        small
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect::<String>()
    );
    let bodies: [(&str, String); 11] = [
        ("body-empty", String::new()),
        ("body-form-encoded", form),
        ("body-ref-not-string", r#"{"ref":7,"after":"x"}"#.into()),
        (
            "body-ref-repeated",
            r#"{"ref":"refs/heads/main","ref":"refs/heads/evil"}"#.into(),
        ),
        (
            "body-ref-nested-only",
            r#"{"push":{"ref":"refs/heads/main"}}"#.into(),
        ),
        ("body-array", r#"[{"ref":"refs/heads/main"}]"#.into()),
        (
            "body-escaped-ref",
            r#"{"ref":"refs\/heads\/m\u00e4in\ud83d\ude80"}"#.into(),
        ),
        (
            "body-lone-surrogate",
            r#"{"ref":"refs/heads/\ud800"}"#.into(),
        ),
        (
            "body-deep-nesting",
            format!(
                r#"{{"ref":"refs/heads/main","x":{}{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
        ),
        ("body-trailing-garbage", format!("{small} {{")),
        ("body-bom", format!("\u{feff}{small}")),
    ];
    for (name, body) in bodies {
        add(
            name,
            s,
            sig("X-Hub-Signature-256", gh(&body)),
            body.as_bytes(),
        );
    }
    let bad_utf8 = b"{\"ref\":\"refs/heads/\xff\xfe\"}".to_vec();
    add(
        "body-invalid-utf8",
        s,
        sig(
            "X-Hub-Signature-256",
            webhook::github_signature(s, &bad_utf8),
        ),
        &bad_utf8,
    );
    let mut out: Vec<(String, Vec<u8>)> = all
        .into_iter()
        .map(|seed| (format!("seed-{}", seed.name), seed.bytes()))
        .collect();
    // The framing itself, written by hand.
    let mut raw = |name: &str, bytes: Vec<u8>| out.push((format!("seed-{name}"), bytes));
    raw(
        "framing-crlf",
        format!(
            "{SECRET}\r\nX-Hub-Signature-256: {}\r\n\r\n{small}",
            gh(small)
        )
        .into_bytes(),
    );
    raw(
        "framing-bad-header-lines",
        format!(
            "{SECRET}\nno colon here\nbad name: 1\n: empty name\nX-Gitlab-Token:\t{SECRET}\t\n\n{small}"
        )
        .into_bytes(),
    );
    raw(
        "framing-control-byte-in-value",
        format!("{SECRET}\nX-Gitlab-Token: {SECRET}\x01\n\n{small}").into_bytes(),
    );
    raw("framing-secret-only", SECRET.as_bytes().to_vec());
    raw(
        "framing-no-blank-line",
        format!("{SECRET}\nX-Gitlab-Token: {SECRET}").into_bytes(),
    );
    raw(
        "framing-empty-secret",
        format!("\nX-Gitlab-Token: \n\n{small}").into_bytes(),
    );
    raw("empty", Vec::new());
    out
}

/// Every seed file the generator makes, as committed.
fn committed_seeds() -> BTreeMap<String, Vec<u8>> {
    inputs("corpus/webhook")
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_string();
            name.starts_with("seed-")
                .then(|| (name, std::fs::read(&path).unwrap()))
        })
        .collect()
}

/// The committed `seed-*` files are exactly what the generator makes today:
/// a change to the signing helpers or the seeds shows up here and is then
/// made on purpose (regenerate with `write_seeds`).
#[test]
fn committed_seeds_match_the_generator() {
    let want: BTreeMap<String, Vec<u8>> = seeds().into_iter().collect();
    let have = committed_seeds();
    let missing: Vec<&String> = want.keys().filter(|k| !have.contains_key(*k)).collect();
    let stale: Vec<&String> = have.keys().filter(|k| !want.contains_key(*k)).collect();
    let changed: Vec<&String> = want
        .iter()
        .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty() && changed.is_empty(),
        "syncer/fuzz/corpus/webhook: seeds missing {missing:?}, not generated {stale:?}, \
         different {changed:?}; run `cargo test -p meshfed-syncer --test fuzz_corpus -- \
         --ignored write_seeds` if the change is intended"
    );
}

/// Writes the `seed-*` files. Run on purpose:
/// `cargo test -p meshfed-syncer --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "writes files; run it to regenerate the seeds"]
fn write_seeds() {
    let dir = fuzz_dir().join("corpus/webhook");
    std::fs::create_dir_all(&dir).unwrap();
    for old in committed_seeds().keys() {
        std::fs::remove_file(dir.join(old)).unwrap();
    }
    for (name, bytes) in seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The seeds mean what their names say: the realistic requests verify as
/// their host, and the edge cases get the outcome they were written for.
#[test]
fn seeds_verify_as_their_names_say() {
    use webhook::{Provider, WebhookError};
    let outcome: BTreeMap<String, Result<Provider, WebhookError>> = seeds()
        .into_iter()
        .map(|(name, bytes)| {
            let r = checks::parse_input(&bytes);
            (name, webhook::verify(&r.secret, &r.headers, &r.body))
        })
        .collect();
    let want = [
        ("github-push", Ok(Provider::GitHub)),
        ("github-ping", Ok(Provider::GitHub)),
        ("gitlab-push", Ok(Provider::GitLab)),
        ("gitlab-tag-push", Ok(Provider::GitLab)),
        // Gitea and Forgejo also send GitHub's header, which comes first.
        ("gitea-push", Ok(Provider::GitHub)),
        ("forgejo-push", Ok(Provider::GitHub)),
        ("forgejo-only", Ok(Provider::Gitea)),
        ("github-docs-example", Ok(Provider::GitHub)),
        ("github-forged", Err(WebhookError::Forged(Provider::GitHub))),
        (
            "github-sha1-prefix",
            Err(WebhookError::Malformed(Provider::GitHub)),
        ),
        ("github-uppercase-hex", Ok(Provider::GitHub)),
        (
            "github-truncated",
            Err(WebhookError::Malformed(Provider::GitHub)),
        ),
        (
            "gitea-odd-length",
            Err(WebhookError::Malformed(Provider::Gitea)),
        ),
        (
            "gitlab-token-other-case",
            Err(WebhookError::Forged(Provider::GitLab)),
        ),
        (
            "gitlab-token-prefix",
            Err(WebhookError::Forged(Provider::GitLab)),
        ),
        ("no-signature", Err(WebhookError::Missing)),
        (
            "github-good-gitlab-bad",
            Err(WebhookError::Forged(Provider::GitLab)),
        ),
        (
            "gitlab-good-gitea-bad",
            Err(WebhookError::Forged(Provider::Gitea)),
        ),
        ("all-providers-good", Ok(Provider::GitHub)),
        ("github-repeated-good-then-bad", Ok(Provider::GitHub)),
        (
            "github-repeated-bad-then-good",
            Err(WebhookError::Forged(Provider::GitHub)),
        ),
        (
            "gitea-non-ascii-value",
            Err(WebhookError::Malformed(Provider::Gitea)),
        ),
        ("secret-100-bytes", Ok(Provider::GitHub)),
        ("body-invalid-utf8", Ok(Provider::GitHub)),
        ("framing-crlf", Ok(Provider::GitHub)),
        ("framing-bad-header-lines", Ok(Provider::GitLab)),
        ("framing-control-byte-in-value", Err(WebhookError::Missing)),
        ("framing-secret-only", Err(WebhookError::Missing)),
    ];
    for (name, expected) in want {
        let got = &outcome[&format!("seed-{name}")];
        assert_eq!(got, &expected, "seed-{name}");
    }
    let refs = |name: &str| {
        let bytes = &seeds()
            .into_iter()
            .find(|(n, _)| n == &format!("seed-{name}"))
            .unwrap()
            .1;
        webhook::pushed_ref(&checks::parse_input(bytes).body)
    };
    assert_eq!(refs("github-push").as_deref(), Some("refs/heads/main"));
    assert_eq!(refs("gitlab-tag-push").as_deref(), Some("refs/tags/v1.4.0"));
    assert_eq!(refs("gitea-push").as_deref(), Some("refs/heads/main"));
    assert_eq!(refs("github-ping"), None);
    assert_eq!(refs("body-form-encoded"), None);
    assert_eq!(
        refs("body-ref-repeated").as_deref(),
        Some("refs/heads/evil")
    );
    assert_eq!(
        refs("body-escaped-ref").as_deref(),
        Some("refs/heads/mäin🚀")
    );
}

/// What a fuzz input checks for one byte, done for every byte: each
/// realistic request, re-signed for each provider, is refused with any one
/// byte of its body changed (GitLab excepted: its token does not cover the
/// body) and with any byte of its signature changed to any other hex digit,
/// a non-hex letter, a space, a `=` or a non-ASCII byte (a case flip of a
/// hex digit is the same signature and verifies).
#[test]
fn every_byte_of_a_real_request_is_covered() {
    let no_changes: Vec<(usize, u8)> = Vec::new();
    let mut sig_changes = Vec::new();
    for at in 0..71 {
        for new in b"0123456789abcdefABCDEFgz =\x80".iter() {
            sig_changes.push((at, *new));
        }
    }
    for seed in realistic() {
        let all_body: Vec<(usize, u8)> = (0..seed.body.len()).map(|i| (i, 0x01)).collect();
        for forgejo in [false, true] {
            checks::check_signed(&seed.secret, &seed.body, &all_body, &sig_changes, forgejo);
        }
        // Any byte of the body to a few other values, once.
        let more: Vec<(usize, u8)> = (0..seed.body.len()).map(|i| (i, 0xa5)).collect();
        checks::check_signed(&seed.secret, &seed.body, &more, &no_changes, false);
    }
}
