//! The load generator (`meshfed_tests::load` and the `meshfed-load` binary)
//! against real hyper HTTP/1.1 and HTTP/2 servers on loopback, started by
//! each test: healthy, failing half the calls, answering gRPC with a
//! non-zero status, stalling, or not listening at all.
//!
//! The assertions are on counts (what was sent, what the server received,
//! how each request ended), never on latency figures: this machine is small
//! and shared, and latency budgets belong to the benchmark harness.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_tests::load::{self, LoadReport, LoadSpec, Protocol};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How a test server answers request number `n` (from 0).
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// 200 with a small body.
    Healthy,
    /// 503 for every odd request, 200 otherwise.
    OddUnavailable,
    /// A unary gRPC answer: one empty message, then `grpc-status` 0 for
    /// even requests and `odd_status` for odd ones.
    Grpc { odd_status: u32 },
    /// Never answers.
    Stall,
    /// 200 with `x-served-by: east`, `west`, or no such header, in turn.
    ServedBy,
}

/// What the server saw of the first request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authority: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Debug, Default)]
struct State {
    requests: AtomicU64,
    /// Requests that arrived in the first second after `started`.
    in_first_second: AtomicU64,
    started: Mutex<Option<Instant>>,
    first: Mutex<Option<Seen>>,
}

/// A server on 127.0.0.1:0, stopped when dropped.
struct Server {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Server {
    /// Serves HTTP/2 (prior knowledge) when `h2`, HTTP/1.1 otherwise.
    async fn start(h2: bool, behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // As real servers do: without it, an HTTP/2 response's
                // HEADERS and DATA writes meet Nagle and delayed ACKs.
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    let svc = service_fn(move |req| handle(Arc::clone(&state), behaviour, req));
                    // A connection the client drops mid-request ends in an
                    // error here; that is the client's business.
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                    };
                });
            }
        });
        Server {
            addr,
            state,
            accept,
        }
    }

    async fn for_protocol(protocol: Protocol, behaviour: Behaviour) -> Server {
        Server::start(protocol != Protocol::Http1, behaviour).await
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Marks the start of a run, for [`Server::in_first_second`].
    fn mark_start(&self) {
        *self.state.started.lock().unwrap() = Some(Instant::now());
    }

    fn in_first_second(&self) -> u64 {
        self.state.in_first_second.load(Ordering::SeqCst)
    }

    fn first(&self) -> Seen {
        self.state.first.lock().unwrap().clone().unwrap()
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(
    state: Arc<State>,
    behaviour: Behaviour,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let started = *state.started.lock().unwrap();
    if started.is_some_and(|s| s.elapsed() < Duration::from_secs(1)) {
        state.in_first_second.fetch_add(1, Ordering::SeqCst);
    }
    let (head, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.first.lock().unwrap().get_or_insert_with(|| Seen {
        method: head.method.to_string(),
        path: head.uri.path().to_string(),
        authority: head
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                let host = head.headers.get("host")?;
                Some(host.to_str().ok()?.to_string())
            })
            .unwrap_or_default(),
        headers: head.headers.clone(),
        body: body.clone(),
    });

    let ok = || Full::new(Bytes::from_static(b"ok")).boxed();
    let response = match behaviour {
        Behaviour::Healthy => Response::new(ok()),
        Behaviour::OddUnavailable if n % 2 == 1 => {
            let mut response = Response::new(ok());
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
        }
        Behaviour::OddUnavailable => Response::new(ok()),
        Behaviour::Grpc { odd_status } => {
            let code = if n % 2 == 1 { odd_status } else { 0 };
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(code));
            // One empty message: flag 0, length 0.
            let body = Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed();
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            response
        }
        Behaviour::Stall => std::future::pending().await,
        Behaviour::ServedBy => {
            let mut response = Response::new(ok());
            if let Some(cluster) = ["east", "west"].get((n % 3) as usize) {
                response
                    .headers_mut()
                    .insert("x-served-by", HeaderValue::from_static(cluster));
            }
            response
        }
    };
    Ok(response)
}

/// A spec for `server`, with a timeout generous enough for a busy machine.
fn spec(server: &Server, protocol: Protocol, rate: u32, duration: Duration) -> LoadSpec {
    LoadSpec {
        rate,
        duration,
        timeout: meshfed_tests::patient(Duration::from_secs(5)),
        ..LoadSpec::new(server.addr, "ratings.default", protocol)
    }
}

/// `expected` ± `percent`%.
fn assert_near(what: &str, actual: u64, expected: u64, percent: u64, report: &LoadReport) {
    let slack = expected * percent / 100;
    assert!(
        actual.abs_diff(expected) <= slack,
        "{what}: {actual}, expected {expected} ± {slack}\n{report}"
    );
}

/// 500 req/s for 2 s: about 1000 requests sent, all of them answered, about
/// half of them in the first second (a fixed rate, not a burst).
async fn healthy_server_answers_every_request_at_the_rate(protocol: Protocol) {
    let server = Server::for_protocol(protocol, Behaviour::Healthy).await;
    let behaviour = spec(&server, protocol, 500, Duration::from_secs(2));
    server.mark_start();
    let report = load::run(behaviour).await;

    assert_near("sent", report.sent, 1000, 10, &report);
    assert_eq!(report.ok, report.sent, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(server.requests(), report.sent, "{report}");
    assert_eq!(report.status.get(&200), Some(&report.sent), "{report}");
    assert_eq!(report.latency.len(), report.sent, "{report}");
    assert_near(
        "first-second arrivals",
        server.in_first_second(),
        500,
        20,
        &report,
    );
    let rate = report.achieved_rate();
    assert!((450.0..=550.0).contains(&rate), "rate {rate}\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_healthy_server_gets_every_request_at_the_requested_rate() {
    healthy_server_answers_every_request_at_the_rate(Protocol::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_healthy_server_gets_every_request_at_the_requested_rate() {
    healthy_server_answers_every_request_at_the_rate(Protocol::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_healthy_server_gets_every_call_at_the_requested_rate_with_grpc_status_0() {
    let server = Server::start(true, Behaviour::Grpc { odd_status: 0 }).await;
    let behaviour = spec(&server, Protocol::Grpc, 500, Duration::from_secs(2));
    server.mark_start();
    let report = load::run(behaviour).await;

    assert_near("sent", report.sent, 1000, 10, &report);
    assert_eq!(report.ok, report.sent, "{report}");
    assert_eq!(server.requests(), report.sent, "{report}");
    assert_near(
        "first-second arrivals",
        server.in_first_second(),
        500,
        20,
        &report,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_authority_path_headers_and_body_asked_for() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let server = Server::for_protocol(protocol, Behaviour::Healthy).await;
        let report = load::run(LoadSpec {
            path: "/reviews/7?full=1".into(),
            body_bytes: 1024,
            headers: vec![("x-test".into(), "yes".into())],
            ..spec(&server, protocol, 50, Duration::from_millis(200))
        })
        .await;
        assert_eq!(report.ok, report.sent, "{protocol:?}\n{report}");
        let seen = server.first();
        assert_eq!(seen.method, "POST", "{protocol:?}");
        assert_eq!(seen.path, "/reviews/7", "{protocol:?}");
        assert_eq!(seen.authority, "ratings.default", "{protocol:?}");
        assert_eq!(seen.headers["x-test"], "yes", "{protocol:?}");
        assert_eq!(seen.body.len(), 1024, "{protocol:?}");
    }

    let server = Server::start(true, Behaviour::Grpc { odd_status: 0 }).await;
    let report = load::run(LoadSpec {
        path: "/ratings.v1.Ratings/Get".into(),
        body_bytes: 100,
        ..spec(&server, Protocol::Grpc, 50, Duration::from_millis(200))
    })
    .await;
    assert_eq!(report.ok, report.sent, "{report}");
    let seen = server.first();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/ratings.v1.Ratings/Get");
    assert_eq!(seen.authority, "ratings.default");
    assert_eq!(seen.headers["content-type"], "application/grpc");
    assert_eq!(seen.headers["te"], "trailers");
    let mut frame = seen.body.clone();
    assert_eq!(frame.get_u8(), 0, "uncompressed");
    assert_eq!(frame.get_u32(), 100, "length prefix");
    assert_eq!(frame.remaining(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_calls_answered_503_are_failures_with_reason_status_503() {
    let server = Server::start(false, Behaviour::OddUnavailable).await;
    let report = load::run(spec(&server, Protocol::Http1, 200, Duration::from_secs(1))).await;

    assert_eq!(report.sent, 200, "{report}");
    assert_eq!(report.failures_of("status 503"), 100, "{report}");
    assert_eq!(report.failed, 100, "{report}");
    assert_eq!(report.ok, 100, "{report}");
    assert_eq!(report.status.get(&503), Some(&100), "{report}");
    assert_eq!(report.status.get(&200), Some(&100), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_14_is_a_failure_with_reason_grpc_status_14() {
    let server = Server::start(true, Behaviour::Grpc { odd_status: 14 }).await;
    let report = load::run(spec(&server, Protocol::Grpc, 200, Duration::from_secs(1))).await;

    assert_eq!(report.sent, 200, "{report}");
    assert_eq!(report.failures_of("grpc-status 14"), 100, "{report}");
    assert_eq!(report.failed, 100, "{report}");
    assert_eq!(report.ok, 100, "{report}");
    // Every call was HTTP 200: the failure is gRPC's, not HTTP's.
    assert_eq!(report.status.get(&200), Some(&200), "{report}");
}

/// Open loop: the server answering nothing does not slow the sender. Over
/// HTTP/2 every request still reaches the server on schedule, and each one
/// fails as a timeout once its timeout has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_server_gives_timeouts_without_lowering_the_send_rate() {
    let server = Server::start(true, Behaviour::Stall).await;
    let timeout = Duration::from_millis(300);
    let began = Instant::now();
    let report = load::run(LoadSpec {
        timeout,
        ..spec(&server, Protocol::Http2, 200, Duration::from_secs(1))
    })
    .await;
    let took = began.elapsed();

    assert_eq!(report.sent, 200, "{report}");
    assert_eq!(report.failures_of("timeout"), 200, "{report}");
    assert_eq!(report.ok, 0, "{report}");
    assert_near(
        "requests the server saw",
        server.requests(),
        200,
        10,
        &report,
    );
    // The last request is sent just before 1 s and times out 300 ms later;
    // run waits for it, and for nothing longer than a timeout.
    assert!(
        took >= Duration::from_millis(1250),
        "returned after {took:?}"
    );
    assert!(
        took < meshfed_tests::patient(Duration::from_secs(5)),
        "returned after {took:?}"
    );
}

/// HTTP/1.1 carries one request per connection: behind a stalled server,
/// requests queue for the few connections; the schedule is unchanged, and
/// each request times out at its intended send time plus the timeout,
/// whether it was on the wire or still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http1_server_gives_timeouts_for_queued_requests_too() {
    let server = Server::start(false, Behaviour::Stall).await;
    let report = load::run(LoadSpec {
        timeout: Duration::from_millis(200),
        connections: 4,
        ..spec(&server, Protocol::Http1, 100, Duration::from_secs(1))
    })
    .await;

    assert_eq!(report.sent, 100, "{report}");
    assert_eq!(report.failures_of("timeout"), 100, "{report}");
    assert_eq!(report.failed, 100, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_in_flight_fail_at_once_as_overload() {
    let server = Server::start(true, Behaviour::Stall).await;
    let report = load::run(LoadSpec {
        timeout: Duration::from_millis(300),
        max_in_flight: 10,
        ..spec(&server, Protocol::Http2, 200, Duration::from_secs(1))
    })
    .await;

    let (overload, timeout) = (
        report.failures_of("overload"),
        report.failures_of("timeout"),
    );
    assert_eq!(report.sent, 200, "{report}");
    assert_eq!(overload + timeout, 200, "{report}");
    // 10 slots, each held 300 ms, over 1 s: about 40 requests get one.
    assert!((10..=60).contains(&timeout), "{report}");
    assert!(server.requests() <= timeout, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nobody_listens_on_gives_connect_failures() {
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    for protocol in [Protocol::Http1, Protocol::Http2, Protocol::Grpc] {
        let report = load::run(LoadSpec {
            rate: 100,
            duration: Duration::from_millis(300),
            ..LoadSpec::new(dead, "ratings", protocol)
        })
        .await;
        assert_eq!(report.sent, 30, "{protocol:?}\n{report}");
        assert_eq!(report.failures_of("connect"), 30, "{protocol:?}\n{report}");
        assert_eq!(report.failed, 30, "{protocol:?}\n{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_header_counts_responses_per_value_and_those_without_it() {
    let server = Server::start(true, Behaviour::ServedBy).await;
    let report = load::run(LoadSpec {
        tally_header: Some("x-served-by".into()),
        ..spec(&server, Protocol::Http2, 300, Duration::from_secs(1))
    })
    .await;

    assert_eq!(report.ok, 300, "{report}");
    let by = &report.responses_by_header;
    assert_eq!(
        by.keys().map(String::as_str).collect::<Vec<_>>(),
        ["(none)", "east", "west"],
        "{report}"
    );
    assert_eq!(by.values().sum::<u64>(), 300, "{report}");
    assert!(by.values().all(|&n| n == 100), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_until_stops_sending_when_told_and_reports_what_was_sent() {
    let server = Server::start(false, Behaviour::Healthy).await;
    let watched = Arc::clone(&server.state);
    // Stop once the server has answered 50: a condition, not a sleep.
    let stop = async move {
        while watched.requests.load(Ordering::SeqCst) < 50 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let began = Instant::now();
    let report = load::run_until(
        spec(&server, Protocol::Http1, 200, Duration::from_secs(60)),
        stop,
    )
    .await;

    assert!(began.elapsed() < Duration::from_secs(30), "{report}");
    assert!((50..200).contains(&report.sent), "{report}");
    assert_eq!(report.ok, report.sent, "{report}");
    assert_eq!(server.requests(), report.sent, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_a_json_report_and_exits_0_when_all_succeed() {
    let server = Server::start(true, Behaviour::ServedBy).await;
    let target = server.addr.to_string();
    let outcome = tokio::task::spawn_blocking(move || {
        meshfed_tests::run_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_meshfed-load")).args([
                "--target",
                &target,
                "--authority",
                "ratings",
                "--rate",
                "100",
                "--duration",
                "1s",
                "--protocol",
                "http2",
                "--header",
                "x-test: yes",
                "--tally-header",
                "x-served-by",
                "--json",
            ]),
            Duration::from_secs(20),
        )
    })
    .await
    .unwrap()
    .unwrap();

    assert_eq!(outcome.code, Some(0), "{outcome}");
    let json: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(json["sent"], 100, "{outcome}");
    assert_eq!(json["ok"], 100, "{outcome}");
    assert_eq!(json["failed"], 0, "{outcome}");
    assert_eq!(json["status"]["200"], 100, "{outcome}");
    assert_eq!(json["responses_by_header"]["east"], 34, "{outcome}");
    assert!(json["latency_us"]["p99"].as_u64().is_some(), "{outcome}");
    assert_eq!(server.first().headers["x-test"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_1_when_requests_fail_and_2_for_a_bad_header() {
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let run = |extra: &'static [&'static str]| {
        let dead = dead.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meshfed-load"));
            cmd.args(["--target", &dead, "--authority", "ratings"])
                .args(["--rate", "50", "--duration", "200ms"])
                .args(extra);
            meshfed_tests::run_within(&mut cmd, Duration::from_secs(20)).unwrap()
        })
    };

    let failed = run(&[]).await.unwrap();
    assert_eq!(failed.code, Some(1), "{failed}");
    assert!(failed.stdout.contains("connect"), "{failed}");

    let bad = run(&["--header", "bad name:v"]).await.unwrap();
    assert_eq!(bad.code, Some(2), "{bad}");
    assert!(bad.stderr.contains("header name"), "{bad}");
}
