//! Replays the committed fuzz corpus of the tunnel's decoders and the
//! outbound listener's protocol detection through the
//! fuzz targets' own checks, on stable, in a plain `cargo test` (no nightly,
//! no sanitizers, no libFuzzer).
//!
//! - `gateway/fuzz/corpus/<target>/`: the minimized corpus of each target;
//! - `gateway/fuzz/regressions/<target>/`: inputs that once crashed, hung or
//!   ran out of memory under the fuzzer, kept out of the fuzzing corpus so
//!   that they cannot stop a fuzzing run at start-up.
//!
//! The checks are not copied here: `gateway/fuzz/checks.rs` is compiled into
//! this test and into the fuzz targets alike, so CI checks every committed
//! input exactly as the fuzzer did. A check fails by panicking; each input
//! runs under `catch_unwind`, so one run names every failing file. There is
//! no time limit here (a wall-clock assertion would be flaky on a loaded CI
//! machine): a hang shows up as a test that does not finish.
//!
//! This file also holds the seed generator of both corpora (the `seed-*`
//! files, made with the gateway's own encoder) and the generator of the
//! worked example in docs/tunnel.md; tests check that the committed seeds
//! and the document still match what the encoder writes.
//!
//! See docs/tunnel.md, "Fuzzing".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use meshfed_gateway::wire::announce::{Announcement, EndpointGroup, MAX_GROUPS, ServicePort};
use meshfed_gateway::wire::frame::{
    self, Frame, MAX_DATA_FRAME, MAX_FIELDS, MAX_HEADER_BLOCK, Open, Refusal, RequestHead,
    ResponseHead, StreamError, StreamKind,
};

#[path = "../fuzz/checks.rs"]
mod checks;

mod support {
    pub mod client_hello;
}

#[path = "../../policy/tests/support/fuzz_replay.rs"]
mod fuzz_replay;

use fuzz_replay::{assert_no_failures, replay};
use support::client_hello::{hello_message, records as tls_records, sni_extension};

fn fuzz_dir() -> PathBuf {
    fuzz_replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"))
}

/// The files directly in `gateway/fuzz/<dir>`, sorted.
fn inputs(dir: &str) -> Vec<PathBuf> {
    fuzz_replay::inputs(&fuzz_dir(), dir)
}

#[test]
fn frame_decode_corpus() {
    let files = inputs("corpus/frame_decode");
    assert!(
        !files.is_empty(),
        "gateway/fuzz/corpus/frame_decode is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_frame_decode);
    assert_no_failures("frame_decode corpus", files.len(), &failures);
}

#[test]
fn announce_decode_corpus() {
    let files = inputs("corpus/announce_decode");
    assert!(
        !files.is_empty(),
        "gateway/fuzz/corpus/announce_decode is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_announce_decode);
    assert_no_failures("announce_decode corpus", files.len(), &failures);
}

#[test]
fn sni_detect_corpus() {
    let files = inputs("corpus/sni_detect");
    assert!(
        !files.is_empty(),
        "gateway/fuzz/corpus/sni_detect is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_sni_detect);
    assert_no_failures("sni_detect corpus", files.len(), &failures);
}

#[test]
fn h2_preface_corpus() {
    let files = inputs("corpus/h2_preface");
    assert!(
        !files.is_empty(),
        "gateway/fuzz/corpus/h2_preface is empty or missing: the replay would check nothing"
    );
    let failures = replay(&files, checks::check_h2_preface);
    assert_no_failures("h2_preface corpus", files.len(), &failures);
}

/// Findings reported and not fixed yet, as `<target>/<file>` under
/// `gateway/fuzz/regressions/` (this test does not own `gateway/src`; see
/// docs/tunnel.md, "Known findings"). Each must still fail its check, so
/// that a fix is noticed: then its line goes, and the file guards against a
/// relapse like any other regression.
const OPEN_FINDINGS: &[&str] = &[];

/// Replays `regressions/<target>/`: every file must pass its check, except
/// the open findings, which must still fail.
fn replay_regressions(target: &str, check: fn(&[u8])) {
    let files = inputs(&format!("regressions/{target}"));
    let is_open = |file: &PathBuf| {
        file.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| OPEN_FINDINGS.contains(&format!("{target}/{n}").as_str()))
    };
    let (open, fixed): (Vec<PathBuf>, Vec<PathBuf>) = files.iter().cloned().partition(is_open);
    let mut failures = replay(&fixed, check);
    let still_failing = replay(&open, check);
    for file in &open {
        let shown = file.display().to_string();
        if !still_failing
            .iter()
            .any(|f| f.starts_with(&format!("{shown}: ")))
        {
            failures.push(format!(
                "{shown}: passes now, so the finding is fixed: remove it from OPEN_FINDINGS"
            ));
        }
    }
    for listed in OPEN_FINDINGS {
        if let Some(name) = listed.strip_prefix(&format!("{target}/"))
            && !files.iter().any(|f| f.ends_with(name))
        {
            failures.push(format!(
                "{listed}: listed in OPEN_FINDINGS but not in the directory"
            ));
        }
    }
    assert_no_failures(&format!("{target} regression"), files.len(), &failures);
}

/// Past findings. This directory may be empty once findings are fixed and
/// moved into the corpus, so no non-empty assertion here.
#[test]
fn frame_decode_regressions() {
    replay_regressions("frame_decode", checks::check_frame_decode);
}

#[test]
fn announce_decode_regressions() {
    replay_regressions("announce_decode", checks::check_announce_decode);
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

/// The control byte of a frame seed that cuts its stream in the middle.
const MIDDLE: u8 = 0x80;

/// A `frame_decode` input: the control byte, then the stream.
fn seed(control: u8, stream: &[u8]) -> Vec<u8> {
    [&[control][..], stream].concat()
}

/// The encoder's bytes for `frames`, back to back.
fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in frames {
        frame::encode(f, &mut out).unwrap_or_else(|e| panic!("seed frame: {e}"));
    }
    out.to_vec()
}

/// A frame made by hand: `ty`, the payload's length, the payload.
fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    [&[ty][..], &len.to_be_bytes(), payload].concat()
}

/// A header-block field made by hand: `tag`, the value's length, the value.
fn field(tag: u8, value: &[u8]) -> Vec<u8> {
    let len = u16::try_from(value.len()).unwrap();
    [&[tag][..], &len.to_be_bytes(), value].concat()
}

/// A name/value field (SUBSET_LABEL, HEADER) made by hand.
fn pair(tag: u8, name: &[u8], value: &[u8]) -> Vec<u8> {
    let n = u16::try_from(name.len()).unwrap();
    field(tag, &[&n.to_be_bytes()[..], name, value].concat())
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(*name, HeaderValue::from_static(value));
    }
    h
}

/// The OPEN of the worked example: an HTTP request to a subset, with a
/// forwarded caller identity.
fn example_open() -> Open {
    Open {
        kind: StreamKind::Http,
        service: "ratings.default.svc.cluster.local".into(),
        port: 9080,
        subset: Some("v2".into()),
        subset_labels: vec![("version".into(), "v2".into())],
        caller: Some("spiffe://cluster.local/ns/default/sa/reviews".into()),
        source_version: Some("3f2c9e1".into()),
        sni: None,
        http: Some(RequestHead {
            method: Method::POST,
            scheme: "http".into(),
            authority: "ratings:9080".into(),
            path: "/ratings/7".into(),
            headers: headers(&[("content-type", "application/json")]),
        }),
    }
}

/// The request stream of the worked example: OPEN, one DATA, TRAILERS.
fn example_request() -> Vec<Frame> {
    vec![
        Frame::Open(Box::new(example_open())),
        Frame::Data(Bytes::from_static(b"{\"stars\":5}")),
        Frame::Trailers(headers(&[("x-checksum", "c0ffee")])),
    ]
}

/// A response stream: RESPONSE, two DATA, gRPC trailers.
fn example_response() -> Vec<Frame> {
    vec![
        Frame::Response(Box::new(ResponseHead {
            status: StatusCode::OK,
            headers: headers(&[("content-type", "application/grpc")]),
        })),
        Frame::Data(Bytes::from_static(b"\x00\x00\x00\x00\x02\x08\x05")),
        Frame::Data(Bytes::from_static(b"\x00\x00\x00\x00\x00")),
        Frame::Trailers(headers(&[("grpc-status", "0"), ("grpc-message", "")])),
    ]
}

fn example_open_tcp() -> Open {
    Open {
        kind: StreamKind::Tcp,
        service: "mysql.db.svc.cluster.local".into(),
        port: 3306,
        subset: None,
        subset_labels: vec![],
        caller: None,
        source_version: Some("3f2c9e1".into()),
        sni: None,
        http: None,
    }
}

fn example_announcement() -> Announcement {
    let group = |version: &str, total, healthy| EndpointGroup {
        labels: BTreeMap::from([
            ("app".to_string(), "ratings".to_string()),
            ("version".to_string(), version.to_string()),
        ]),
        total,
        healthy,
    };
    Announcement {
        seq: 42,
        cluster: "west".into(),
        config_version: "3f2c9e1".into(),
        draining: false,
        services: BTreeMap::from([
            (
                "ratings.default.svc.cluster.local".to_string(),
                vec![group("v1", 3, 3), group("v2", 2, 1)],
            ),
            ("mysql.db.svc.cluster.local".to_string(), vec![]),
        ]),
        ports: BTreeMap::from([(
            "ratings.default.svc.cluster.local".to_string(),
            vec![ServicePort {
                port: 9080,
                name: "http".into(),
                protocol: "TCP".into(),
                app_protocol: Some("http".into()),
            }],
        )]),
    }
}

/// One frame of every type, and every refusal code.
fn every_frame() -> Vec<Frame> {
    let mut frames = example_request();
    frames.push(Frame::Open(Box::new(example_open_tcp())));
    frames.extend(example_response());
    frames.push(Frame::Accept);
    frames.push(Frame::Announce(example_announcement().encode().into()));
    frames.push(Frame::Data(Bytes::new()));
    frames.push(Frame::Error(StreamError {
        refusal: Refusal::NotExported,
        message: "ratings is not exported from cluster `west`".into(),
    }));
    frames
}

const REFUSALS: [Refusal; 11] = [
    Refusal::NotExported,
    Refusal::NoRoute,
    Refusal::NoHealthyEndpoint,
    Refusal::Unauthorized,
    Refusal::ConnectFailed,
    Refusal::Overloaded,
    Refusal::StaleConfig,
    Refusal::BadRequest,
    Refusal::Timeout,
    Refusal::UpstreamReset,
    Refusal::Internal,
];

/// The `frame_decode` seeds: valid frames of every type made by the
/// encoder, whole streams, and hand-made frames that must be refused or that
/// sit on a rule's edge.
fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, control: u8, stream: &[u8]| {
        seeds.push((format!("seed-{name}"), seed(control, stream)));
    };
    let one = |f: Frame| wire(&[f]);

    // Valid frames and streams, from the encoder.
    add(
        "open-http",
        MIDDLE,
        &one(Frame::Open(Box::new(example_open()))),
    );
    add(
        "open-tcp",
        MIDDLE,
        &one(Frame::Open(Box::new(example_open_tcp()))),
    );
    // A TCP stream of TLS routed by SNI, with the caller's identity: the
    // optional SNI field (0x08) that older peers skip.
    let mut tls = example_open_tcp();
    tls.sni = Some("db.example.com".into());
    tls.caller = Some("spiffe://cluster.local/ns/default/sa/reviews".into());
    add("open-tcp-sni", MIDDLE, &one(Frame::Open(Box::new(tls))));
    let mut minimal = example_open();
    minimal.subset = None;
    minimal.subset_labels.clear();
    minimal.caller = None;
    minimal.source_version = None;
    if let Some(h) = minimal.http.as_mut() {
        h.method = Method::GET;
        h.headers.clear();
    }
    add(
        "open-http-minimal",
        MIDDLE,
        &one(Frame::Open(Box::new(minimal))),
    );
    add("http-request-stream", MIDDLE, &wire(&example_request()));
    add("http-response-stream", MIDDLE, &wire(&example_response()));
    add(
        "tcp-stream",
        MIDDLE,
        &wire(&[Frame::Open(Box::new(example_open_tcp())), Frame::Accept]),
    );
    add("every-frame", MIDDLE, &wire(&every_frame()));
    add("every-frame-cut-at-0", 0x00, &wire(&every_frame()));
    add("every-frame-cut-at-end", 0xff, &wire(&every_frame()));
    add("every-frame-cut-early", 0x03, &wire(&every_frame()));
    add(
        "data",
        MIDDLE,
        &one(Frame::Data(Bytes::from_static(b"hello"))),
    );
    add("data-empty", MIDDLE, &one(Frame::Data(Bytes::new())));
    add("accept", MIDDLE, &one(Frame::Accept));
    add(
        "announce",
        MIDDLE,
        &one(Frame::Announce(example_announcement().encode().into())),
    );
    for r in REFUSALS {
        let e = Frame::Error(StreamError {
            refusal: r,
            message: format!("{} (message)", r.reason()),
        });
        add(&format!("error-{}", r.reason()), MIDDLE, &one(e));
    }
    let mut many = HeaderMap::new();
    for i in 0..MAX_FIELDS {
        many.append(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("v"),
        );
    }
    add("trailers-max-fields", MIDDLE, &one(Frame::Trailers(many)));

    // Hand-made: what a newer peer may send.
    let status_ok = field(0x20, &200u16.to_be_bytes());
    add(
        "response-unknown-optional-field",
        MIDDLE,
        &raw_frame(0x02, &[status_ok.clone(), field(0x7f, b"new")].concat()),
    );
    add(
        "response-unknown-critical-field",
        MIDDLE,
        &raw_frame(0x02, &[status_ok.clone(), field(0x81, b"")].concat()),
    );
    let http_fields = [
        field(0x01, &[1]),
        field(0x02, b"ratings.default.svc.cluster.local"),
        field(0x03, &9080u16.to_be_bytes()),
        field(0x10, b"GET"),
        field(0x12, b"ratings"),
        field(0x13, b"/"),
    ]
    .concat();
    add("open-no-scheme", MIDDLE, &raw_frame(0x01, &http_fields));
    add(
        "open-duplicate-fields",
        MIDDLE,
        &raw_frame(
            0x01,
            &[
                http_fields.clone(),
                field(0x02, b"other.default.svc.cluster.local"),
                field(0x01, &[1]),
                field(0x11, b"https"),
                field(0x11, b"http"),
            ]
            .concat(),
        ),
    );
    add(
        "open-tcp-with-http-fields",
        MIDDLE,
        &raw_frame(0x01, &[http_fields.clone(), field(0x01, &[2])].concat()),
    );
    add(
        "open-extension-method",
        MIDDLE,
        &raw_frame(0x01, &[http_fields.clone(), field(0x10, b"PURGE")].concat()),
    );

    // Hand-made: what must be refused.
    let no_port = [
        field(0x01, &[1]),
        field(0x02, b"ratings.default.svc.cluster.local"),
        field(0x10, b"GET"),
        field(0x12, b"ratings"),
        field(0x13, b"/"),
    ]
    .concat();
    add("open-missing-port", MIDDLE, &raw_frame(0x01, &no_port));
    for (name, f) in [
        ("open-bad-kind", field(0x01, &[3])),
        ("open-bad-port-length", field(0x03, &[0x23])),
        ("open-service-not-utf8", field(0x02, b"rat\xffings")),
        ("open-bad-method", field(0x10, b"GE T")),
        ("open-bad-subset-label", field(0x05, &[0x00, 0x09, b'v'])),
        ("open-header-bad-name", pair(0x14, b"x y", b"1")),
        ("open-header-bad-value", pair(0x14, b"x-y", b"a\nb")),
        ("open-header-pseudo-name", pair(0x14, b":path", b"/")),
        ("open-header-truncated-pair", field(0x14, &[0x00])),
    ] {
        add(
            name,
            MIDDLE,
            &raw_frame(0x01, &[http_fields.clone(), f].concat()),
        );
    }
    add("response-missing-status", MIDDLE, &raw_frame(0x02, &[]));
    add(
        "response-status-out-of-range",
        MIDDLE,
        &raw_frame(0x02, &field(0x20, &99u16.to_be_bytes())),
    );
    add(
        "response-truncated-field",
        MIDDLE,
        &raw_frame(0x02, &[0x20, 0x00, 0x02, 0x01]),
    );
    add(
        "response-field-header-cut",
        MIDDLE,
        &raw_frame(0x02, &[0x20, 0x00]),
    );
    let mut too_many = Vec::new();
    for _ in 0..=MAX_FIELDS {
        too_many.extend(field(0x7e, b""));
    }
    add(
        "trailers-too-many-fields",
        MIDDLE,
        &raw_frame(0x04, &too_many),
    );
    add(
        "error-unknown-code",
        MIDDLE,
        &raw_frame(0x05, b"\x03\xe7future refusal"),
    );
    add(
        "error-message-not-utf8",
        MIDDLE,
        &raw_frame(0x05, b"\x00\x08bad \xff\xfe byte"),
    );
    add("error-no-code", MIDDLE, &raw_frame(0x05, b"\x00"));
    add("accept-with-payload", MIDDLE, &raw_frame(0x06, b"x"));
    let limit = |ty: u8, len: usize| {
        let len = u32::try_from(len).unwrap();
        [&[ty][..], &len.to_be_bytes()].concat()
    };
    add("data-header-at-limit", MIDDLE, &limit(0x03, MAX_DATA_FRAME));
    add(
        "data-header-over-limit",
        MIDDLE,
        &limit(0x03, MAX_DATA_FRAME + 1),
    );
    add(
        "open-header-over-limit",
        MIDDLE,
        &limit(0x01, MAX_HEADER_BLOCK + 1),
    );
    add(
        "announce-header-max-u32",
        MIDDLE,
        &limit(0x07, u32::MAX as usize),
    );
    add("unknown-type-0x00", MIDDLE, &raw_frame(0x00, b""));
    add("unknown-type-0x08", MIDDLE, &raw_frame(0x08, b"next"));
    add("unknown-type-0xff", MIDDLE, &raw_frame(0xff, b""));
    add("incomplete-header", MIDDLE, &[0x03, 0x00, 0x00]);
    add(
        "incomplete-payload",
        MIDDLE,
        &one(Frame::Data(Bytes::from_static(b"hello")))[..8],
    );
    add("empty", MIDDLE, b"");
    add(
        "raw-bytes-after-accept",
        MIDDLE,
        &[one(Frame::Accept), b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()].concat(),
    );
    add(
        "http1-request",
        MIDDLE,
        b"GET / HTTP/1.1\r\nhost: ratings\r\n\r\n",
    );
    add(
        "tls-client-hello",
        MIDDLE,
        b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03",
    );
    seeds
}

/// The `announce_decode` seeds: announcements made by the encoder, and
/// hand-written JSON at the edges of what serde_json and the limits accept.
fn announce_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: &[u8]| {
        seeds.push((format!("seed-{name}"), bytes.to_vec()));
    };
    add("example", &example_announcement().encode());
    let mut draining = example_announcement();
    draining.draining = true;
    draining.seq = 43;
    add("draining", &draining.encode());
    add("default", &Announcement::default().encode());
    let mut at_limit = Announcement::default();
    at_limit
        .services
        .insert("s".into(), vec![EndpointGroup::default(); MAX_GROUPS]);
    add("groups-at-limit", &at_limit.encode());
    let mut over_limit = at_limit.clone();
    over_limit
        .services
        .insert("t".into(), vec![EndpointGroup::default(); MAX_GROUPS + 1]);
    add("groups-over-limit", &over_limit.encode());
    add(
        "no-draining-field",
        br#"{"seq":1,"cluster":"east","config_version":"abc","services":{}}"#,
    );
    add(
        "unknown-field",
        br#"{"seq":1,"cluster":"east","config_version":"abc","services":{},"zone":"a","x":[1,{}]}"#,
    );
    add(
        "max-numbers",
        br#"{"seq":18446744073709551615,"cluster":"c","config_version":"v","services":{"s":[{"labels":{},"total":4294967295,"healthy":4294967295}]}}"#,
    );
    add(
        "escapes",
        br#"{"seq":1,"cluster":"\u00e9\ud83d\ude00\n\"","config_version":"\/","services":{"a\u0000b":[]}}"#,
    );
    add(
        "whitespace",
        b" \t\r\n{ \"seq\" : 1 , \"cluster\" : \"c\" , \"config_version\" : \"v\" , \"services\" : { } } \n",
    );
    add(
        "lone-surrogate",
        br#"{"seq":1,"cluster":"\ud800","config_version":"v","services":{}}"#,
    );
    add(
        "duplicate-service",
        br#"{"seq":1,"cluster":"c","config_version":"v","services":{"s":[],"s":[{"labels":{},"total":1,"healthy":1}]}}"#,
    );
    add(
        "duplicate-field",
        br#"{"seq":1,"seq":2,"cluster":"c","config_version":"v","services":{}}"#,
    );
    add("missing-fields", b"{}");
    add(
        "wrong-types",
        br#"{"seq":"1","cluster":2,"config_version":null,"services":[]}"#,
    );
    add(
        "negative-seq",
        br#"{"seq":-1,"cluster":"c","config_version":"v","services":{}}"#,
    );
    add(
        "float-count",
        br#"{"seq":1,"cluster":"c","config_version":"v","services":{"s":[{"labels":{},"total":1.5,"healthy":1e2}]}}"#,
    );
    add(
        "count-over-u32",
        br#"{"seq":1,"cluster":"c","config_version":"v","services":{"s":[{"labels":{},"total":4294967296,"healthy":0}]}}"#,
    );
    let deep = format!(
        r#"{{"seq":1,"cluster":"c","config_version":"v","services":{{}},"x":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    add("deep-nesting", deep.as_bytes());
    add(
        "trailing-garbage",
        br#"{"seq":1,"cluster":"c","config_version":"v","services":{}} {"#,
    );
    add(
        "truncated",
        br#"{"seq":1,"cluster":"c","config_version":"v","services":{"s":[{"labels":{"ver"#,
    );
    add("bom", b"\xef\xbb\xbf{}");
    add("not-utf8", b"{\"seq\":1,\"cluster\":\"\xff\"}");
    add("garbage", b"\x00garbage");
    add("empty", b"");
    seeds
}

/// `sni_detect` seeds: ClientHellos (small, post-quantum sized with the
/// name last, over several records, without a name, malformed), HTTP and
/// other first bytes; each cut in the middle.
fn sni_seeds() -> Vec<(String, Vec<u8>)> {
    let name = sni_extension(b"ratings.default.svc.cluster.local");
    let key_share = (0x0033, vec![0x11; 1216 + 36]);
    let padding = (0x0015, vec![0; 300]);
    let big = hello_message(&[key_share.clone(), padding.clone(), name.clone()]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "small",
            tls_records(&hello_message(std::slice::from_ref(&name)), 16384),
        ),
        ("pq-sni-last", tls_records(&big, 16384)),
        ("pq-sni-last-records-of-500", tls_records(&big, 500)),
        (
            "records-of-1",
            tls_records(&hello_message(std::slice::from_ref(&name)), 1),
        ),
        (
            "no-sni",
            tls_records(&hello_message(&[key_share, padding]), 16384),
        ),
        (
            "two-names",
            tls_records(
                &hello_message(&[name.clone(), sni_extension(b"other.example")]),
                16384,
            ),
        ),
        (
            "bad-name",
            tls_records(&hello_message(&[sni_extension(b"a b/c")]), 16384),
        ),
        (
            "over-16k-name-first",
            tls_records(
                &hello_message(&[name.clone(), (0x0015, vec![0; 17000])]),
                16384,
            ),
        ),
        ("not-a-client-hello", tls_records(&[2, 0, 0, 1, 0], 16384)),
        ("record-too-long", vec![0x16, 0x03, 0x01, 0x40, 0x01, 0x01]),
        ("http1", b"GET / HTTP/1.1\r\nHost: ratings\r\n\r\n".to_vec()),
        ("h2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("empty", Vec::new()),
    ];
    cases
        .into_iter()
        .map(|(n, bytes)| (format!("seed-{n}"), seed(MIDDLE, &bytes)))
        .collect()
}

/// `h2_preface` seeds: the preface (whole, with a SETTINGS frame after),
/// its prefixes, HTTP/1.1 and near misses; each cut in the middle.
fn h2_seeds() -> Vec<(String, Vec<u8>)> {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut with_settings = preface.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("preface", preface.to_vec()),
        ("preface-settings", with_settings),
        ("preface-half", preface[..12].to_vec()),
        ("near-miss", b"PRI * HTTP/2.1\r\n\r\nSM\r\n\r\n".to_vec()),
        ("http1", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("empty", Vec::new()),
    ];
    cases
        .into_iter()
        .map(|(n, bytes)| (format!("seed-{n}"), seed(MIDDLE, &bytes)))
        .collect()
}

/// Every seed file of `target` the generator makes, as committed.
fn committed_seeds(target: &str) -> BTreeMap<String, Vec<u8>> {
    inputs(&format!("corpus/{target}"))
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_string();
            name.starts_with("seed-")
                .then(|| (name, std::fs::read(&path).unwrap()))
        })
        .collect()
}

/// The committed `seed-*` files are exactly what the generator makes from
/// today's encoder: a change to the wire format shows up here and is then
/// made on purpose (regenerate with `write_seeds`).
#[test]
fn committed_seeds_match_the_generator() {
    for (target, seeds) in [
        ("frame_decode", frame_seeds()),
        ("announce_decode", announce_seeds()),
        ("sni_detect", sni_seeds()),
        ("h2_preface", h2_seeds()),
    ] {
        let want: BTreeMap<String, Vec<u8>> = seeds.into_iter().collect();
        let have = committed_seeds(target);
        let missing: Vec<&String> = want.keys().filter(|k| !have.contains_key(*k)).collect();
        let stale: Vec<&String> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        let changed: Vec<&String> = want
            .iter()
            .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty() && stale.is_empty() && changed.is_empty(),
            "gateway/fuzz/corpus/{target}: seeds missing {missing:?}, not generated {stale:?}, \
             different {changed:?}; run `cargo test -p meshfed-gateway --test fuzz_corpus -- \
             --ignored write_seeds` if the change is intended"
        );
    }
}

/// Writes the `seed-*` files of both corpora. Run on purpose:
/// `cargo test -p meshfed-gateway --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "writes files; run it to regenerate the seeds"]
fn write_seeds() {
    for (target, seeds) in [
        ("frame_decode", frame_seeds()),
        ("announce_decode", announce_seeds()),
        ("sni_detect", sni_seeds()),
        ("h2_preface", h2_seeds()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for old in committed_seeds(target).keys() {
            std::fs::remove_file(dir.join(old)).unwrap();
        }
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// The worked example in docs/tunnel.md
// ---------------------------------------------------------------------------

fn frame_name(ty: u8) -> &'static str {
    match ty {
        0x01 => "OPEN",
        0x02 => "RESPONSE",
        0x03 => "DATA",
        0x04 => "TRAILERS",
        0x05 => "ERROR",
        0x06 => "ACCEPT",
        0x07 => "ANNOUNCE",
        _ => "?",
    }
}

fn tag_name(tag: u8) -> &'static str {
    match tag {
        0x01 => "KIND",
        0x02 => "SERVICE",
        0x03 => "PORT",
        0x04 => "SUBSET",
        0x05 => "SUBSET_LABEL",
        0x06 => "CALLER",
        0x07 => "SOURCE_VERSION",
        0x08 => "SNI",
        0x10 => "METHOD",
        0x11 => "SCHEME",
        0x12 => "AUTHORITY",
        0x13 => "PATH",
        0x14 => "HEADER",
        0x20 => "STATUS",
        _ => "?",
    }
}

/// Appends `bytes` at `offset` as rows of up to 16 bytes, each with its
/// printable text; `note` labels the first row.
fn rows(out: &mut String, offset: usize, bytes: &[u8], note: &str) {
    if bytes.is_empty() {
        let _ = writeln!(out, "{offset:04x}  {:<48}  {note} (empty)", "");
        return;
    }
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        let label = if i == 0 {
            note.to_string()
        } else {
            " ".repeat(note.len())
        };
        let _ = writeln!(
            out,
            "{:04x}  {:<48}  {label} \"{text}\"",
            offset + 16 * i,
            hex.join(" ")
        );
    }
}

/// One line: `offset  hex  note`.
fn line(out: &mut String, offset: usize, bytes: &[u8], note: &str) {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let _ = writeln!(out, "{offset:04x}  {:<48}  {note}", hex.join(" "));
}

/// An annotated hex dump of encoded frames: one line per frame header and
/// per field header, then the value bytes with their text.
fn annotated_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut p = 0;
    while p + 5 <= bytes.len() {
        let ty = bytes[p];
        let len = u32::from_be_bytes([bytes[p + 1], bytes[p + 2], bytes[p + 3], bytes[p + 4]]);
        let len = len as usize;
        line(
            &mut out,
            p,
            &bytes[p..p + 5],
            &format!("frame {} (0x{ty:02x}), payload {len} bytes", frame_name(ty)),
        );
        let payload = &bytes[p + 5..p + 5 + len];
        let base = p + 5;
        match ty {
            0x01 | 0x02 | 0x04 => {
                let mut q = 0;
                while q + 3 <= payload.len() {
                    let tag = payload[q];
                    let n = usize::from(u16::from_be_bytes([payload[q + 1], payload[q + 2]]));
                    let value = &payload[q + 3..q + 3 + n];
                    let unit = if n == 1 { "byte" } else { "bytes" };
                    let head = format!("  {} (0x{tag:02x}), {n} {unit}", tag_name(tag));
                    match tag {
                        0x01 => {
                            let kind = if value == [1] { "HTTP" } else { "TCP" };
                            line(
                                &mut out,
                                base + q,
                                &payload[q..q + 3 + n],
                                &format!("{head}: {kind}"),
                            );
                        }
                        0x03 | 0x20 => {
                            let v = u16::from_be_bytes([value[0], value[1]]);
                            line(
                                &mut out,
                                base + q,
                                &payload[q..q + 3 + n],
                                &format!("{head}: {v}"),
                            );
                        }
                        0x05 | 0x14 => {
                            let m = usize::from(u16::from_be_bytes([value[0], value[1]]));
                            line(
                                &mut out,
                                base + q,
                                &payload[q..q + 5],
                                &format!("{head}: name of {m} bytes"),
                            );
                            rows(&mut out, base + q + 5, &value[2..2 + m], "    name");
                            rows(&mut out, base + q + 5 + m, &value[2 + m..], "    value");
                        }
                        _ => {
                            line(&mut out, base + q, &payload[q..q + 3], &head);
                            rows(&mut out, base + q + 3, value, "   ");
                        }
                    }
                    q += 3 + n;
                }
            }
            0x05 => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                line(
                    &mut out,
                    base,
                    &payload[..2],
                    &format!("  refusal code {code}"),
                );
                rows(&mut out, base + 2, &payload[2..], "  message");
            }
            _ => rows(&mut out, base, payload, "  bytes"),
        }
        p += 5 + len;
    }
    out
}

/// The worked example as docs/tunnel.md shows it.
fn worked_example() -> String {
    annotated_dump(&wire(&example_request()))
}

/// docs/tunnel.md shows the bytes today's encoder writes for the example
/// request stream (regenerate with `print_worked_example`).
#[test]
fn worked_example_in_the_docs_matches_the_encoder() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/tunnel.md");
    let doc = std::fs::read_to_string(doc).unwrap();
    let example = worked_example();
    assert!(
        doc.contains(&example),
        "docs/tunnel.md does not contain the worked example as the encoder writes it today; \
         run `cargo test -p meshfed-gateway --test fuzz_corpus -- --ignored --nocapture \
         print_worked_example` and paste it:\n{example}"
    );
    let announcement = String::from_utf8(example_announcement().encode()).unwrap();
    assert!(
        doc.contains(&announcement),
        "docs/tunnel.md does not contain the example announcement as the encoder writes it \
         today:\n{announcement}"
    );
    // The example is a valid stream, and the checks accept it.
    let stream = wire(&example_request());
    let decoded = checks::decode_stream(&stream, &[stream.len()]);
    assert_eq!(decoded.frames, example_request());
    assert_eq!(decoded.end, checks::End::Incomplete(0));
}

#[test]
#[ignore = "prints the worked example of docs/tunnel.md"]
fn print_worked_example() {
    print!("{}", worked_example());
    println!(
        "{}",
        String::from_utf8(example_announcement().encode()).unwrap()
    );
}
