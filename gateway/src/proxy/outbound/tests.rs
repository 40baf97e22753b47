//! The execution steps on a paused clock: the retry layer (budget, per-try
//! and route timeouts, dead-link replays) with scripted tries, the fault
//! step, the one writer of refusals, and the mirror's response drain.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use meshfed_policy::snapshot::{AbortStatus, RetryPolicy};
use tokio::time::Instant;

use super::*;

fn target() -> Target {
    Target {
        service: "reviews.default.svc.cluster.local".into(),
        port: 9080,
        subset: None,
        selector: BTreeMap::new(),
        rule: None,
        failed_over_from: None,
        destination: None,
    }
}

fn policy(attempts: u32, retry_on: &str) -> &'static RetryPolicy {
    Box::leak(Box::new(RetryPolicy {
        attempts,
        per_try_timeout_ms: None,
        retry_on: retry_on.split(',').map(String::from).collect(),
    }))
}

/// A plan to `cluster` with `retry`, timeouts as given.
fn plan_to(
    cluster: &str,
    retry: Option<&'static RetryPolicy>,
    per_try: Option<Duration>,
    timeout: Option<Duration>,
) -> Plan<'static> {
    Plan {
        routed: Box::new(target()),
        target: target(),
        cluster: cluster.into(),
        rule: None,
        destination: None,
        retry,
        per_try,
        timeout,
        fault: plan::Fault::default(),
        mirrors: Box::new([]),
    }
}

fn get() -> (Request<ProxyBody>, Replay) {
    let req = Request::get("http://reviews/").body(body::empty()).unwrap();
    let (parts, body) = req.into_parts();
    let replay = Replay {
        head: clone_head(&parts),
        body: bytes::Bytes::new(),
    };
    (Request::from_parts(parts, body), replay)
}

fn answer(status: u16) -> Tried {
    Ok(Response::builder()
        .status(status)
        .body(body::empty())
        .unwrap())
}

/// What a scripted try does.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// The first try answers 503 at once; retries answer 503 after 1 s.
    FailThenSlow,
    /// Never answers.
    Hang,
    /// Tries to `west` die with their link; others answer 200.
    WestDies,
}

/// Counters shared by concurrent fake requests.
#[derive(Default)]
struct Shared {
    budget: crate::retry_budget::RetryBudget,
    retries_in_flight: AtomicUsize,
    max_retries_in_flight: AtomicUsize,
    exhausted: AtomicUsize,
}

struct Fake {
    script: Script,
    shared: Arc<Shared>,
    sends: Vec<String>,
    retried: Mutex<Vec<String>>,
    links_left: usize,
    /// What `choose` answers.
    next: Option<String>,
}

impl Fake {
    fn new(script: Script, shared: Arc<Shared>) -> Self {
        Fake {
            script,
            shared,
            sends: Vec::new(),
            retried: Mutex::new(Vec::new()),
            links_left: 0,
            next: None,
        }
    }
}

impl Tries for Fake {
    async fn send(&mut self, _: &Target, cluster: &str, _req: Request<ProxyBody>) -> Tried {
        self.sends.push(cluster.to_string());
        match self.script {
            Script::Hang => std::future::pending().await,
            Script::FailThenSlow if self.sends.len() == 1 => answer(503),
            Script::FailThenSlow => {
                let s = &self.shared;
                let now = s.retries_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_retries_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                s.retries_in_flight.fetch_sub(1, Ordering::SeqCst);
                answer(503)
            }
            Script::WestDies if cluster == "west" => Err(TryError::link_died(
                Refusal::UpstreamReset,
                "gateway of `west`: stream reset",
            )),
            Script::WestDies => answer(200),
        }
    }

    fn choose(&mut self, _: &mut Target, exclude: &[String]) -> Option<String> {
        self.next.clone().filter(|n| !exclude.contains(n))
    }

    fn another_link(&self, _: &str) -> bool {
        self.links_left > self.sends.len().saturating_sub(1)
    }

    fn retry_slot(&self) -> Option<crate::retry_budget::Slot> {
        let slot = self.shared.budget.retry();
        if slot.is_none() {
            self.shared.exhausted.fetch_add(1, Ordering::SeqCst);
        }
        slot
    }

    fn retried(&self, _: &str, reason: String) {
        self.retried.lock().unwrap().push(reason);
    }
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_caps_retries_in_flight_at_20_percent_of_requests() {
    let shared = Arc::new(Shared::default());
    let requests = 20;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..requests {
        let shared = shared.clone();
        calls.spawn(async move {
            let _request = shared.budget.request();
            // Let every request count itself in flight before any retries.
            tokio::task::yield_now().await;
            let plan = plan_to("east", Some(policy(1, "5xx")), None, None);
            let mut fake = Fake::new(Script::FailThenSlow, shared.clone());
            let (req, replay) = get();
            let (tried, _) = forward(&plan, false, &mut fake, req, Some(&replay)).await;
            (tried.unwrap().status(), fake.sends.len())
        });
    }
    let mut tries = 0;
    while let Some(r) = calls.join_next().await {
        let (status, sent) = r.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tries += sent;
    }
    let retries = tries - requests;
    assert_eq!(retries, 4, "20% of 20 requests in flight may retry");
    assert_eq!(shared.max_retries_in_flight.load(Ordering::SeqCst), 4);
    assert_eq!(shared.exhausted.load(Ordering::SeqCst), 16);
}

#[tokio::test(start_paused = true)]
async fn each_try_ends_at_the_per_try_timeout_and_the_caller_gets_504() {
    let plan = plan_to(
        "east",
        Some(policy(2, "5xx")),
        Some(Duration::from_millis(100)),
        None,
    );
    let mut fake = Fake::new(Script::Hang, Arc::default());
    let (req, replay) = get();
    let start = Instant::now();
    let (tried, _) = forward(&plan, false, &mut fake, req, Some(&replay)).await;
    let took = start.elapsed();
    assert_eq!(fake.sends.len(), 3, "the try and 2 retries");
    // Three tries of 100 ms and two backoffs of at most 25 and 50 ms.
    assert!(
        took >= Duration::from_millis(300) && took <= Duration::from_millis(375),
        "{took:?}"
    );
    let resp = tried.unwrap_err().respond(false);
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers()[ERROR_HEADER], Refusal::Timeout.reason());
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_route_timeout() {
    let plan = plan_to(
        "east",
        Some(policy(5, "5xx")),
        Some(Duration::from_millis(100)),
        Some(Duration::from_millis(250)),
    );
    let mut fake = Fake::new(Script::Hang, Arc::default());
    let (req, replay) = get();
    let start = Instant::now();
    let (tried, cluster) = forward(&plan, false, &mut fake, req, Some(&replay)).await;
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert!((2..=3).contains(&fake.sends.len()), "{:?}", fake.sends);
    assert_eq!(cluster, "east");
    let resp = tried.unwrap_err().respond(false);
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let text = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        std::str::from_utf8(&text)
            .unwrap()
            .contains("route timeout of 250 ms"),
        "{text:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_link_replays_on_another_link_then_in_another_cluster() {
    // No retry policy: the one replay layer still moves a bodiless GET.
    let plan = plan_to("west", None, None, None);
    let mut fake = Fake::new(Script::WestDies, Arc::default());
    fake.links_left = 2;
    fake.next = Some("north".into());
    let (req, replay) = get();
    let (tried, cluster) = forward(&plan, false, &mut fake, req, Some(&replay)).await;
    assert_eq!(tried.unwrap().status(), StatusCode::OK);
    assert_eq!(cluster, "north");
    assert_eq!(fake.sends, ["west", "west", "north"]);
    assert_eq!(*fake.retried.lock().unwrap(), ["link-died"]);

    // A request with a body that streamed (nothing kept) is not replayed.
    let mut fake = Fake::new(Script::WestDies, Arc::default());
    fake.links_left = 2;
    fake.next = Some("north".into());
    let (req, _) = get();
    let (tried, cluster) = forward(&plan, false, &mut fake, req, None).await;
    assert_eq!(cluster, "west");
    assert!(tried.is_err());
    assert_eq!(fake.sends, ["west"]);
}

#[tokio::test(start_paused = true)]
async fn a_fault_delays_then_aborts() {
    let abort = AbortStatus::Http(418);
    let fault = plan::Fault {
        delay: Some(Duration::from_secs(2)),
        abort: Some(&abort),
    };
    let start = Instant::now();
    let e = apply_fault(&fault).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let resp = e.respond(false);
    assert_eq!(resp.status().as_u16(), 418);
    assert_eq!(resp.headers()[ERROR_HEADER], "fault-injected");

    let grpc = AbortStatus::Grpc(14);
    let fault = plan::Fault {
        delay: None,
        abort: Some(&grpc),
    };
    let start = Instant::now();
    let resp = apply_fault(&fault).await.unwrap_err().respond(true);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");

    // A delay alone forwards after it.
    let fault = plan::Fault {
        delay: Some(Duration::from_millis(300)),
        abort: None,
    };
    let start = Instant::now();
    assert!(apply_fault(&fault).await.is_ok());
    assert_eq!(start.elapsed(), Duration::from_millis(300));
}

/// The retry layer's view of an error and the caller's response agree:
/// the one gRPC mapping.
#[test]
fn the_retry_view_of_an_error_is_what_the_caller_gets() {
    use crate::upstream::UpstreamError;
    use crate::upstream::pool::Limit;
    for grpc in [false, true] {
        let errors = || {
            let mut v: Vec<TryError> = (1..=11)
                .map(|c| TryError::refused(Refusal::from_code(c), "x"))
                .collect();
            v.push(TryError::CallerBody {
                fault: body::CallerFault::Aborted,
                message: "gone".into(),
            });
            v.push(TryError::CallerBody {
                fault: body::CallerFault::Malformed,
                message: "bad".into(),
            });
            v.push(TryError::PeerAuth(crate::peer_auth::Refused {
                reason: "mtls-required",
                message: "plaintext caller".into(),
            }));
            v.push(TryError::Fault(AbortStatus::Http(418)));
            v.push(TryError::Fault(AbortStatus::Http(503)));
            v.push(TryError::Fault(AbortStatus::Grpc(14)));
            v.push(TryError::Upstream(UpstreamError::Overflow {
                service: "s".into(),
                limit: Limit::MaxConnections,
            }));
            v
        };
        for e in errors() {
            let seen = e.seen(grpc);
            let (status, grpc_status, reason) = (seen.status, seen.grpc_status, seen.reason());
            let reason = reason.to_string();
            let resp = e.respond(grpc);
            assert_eq!(resp.status().as_u16(), status, "{reason} grpc={grpc}");
            let header = resp
                .headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().parse::<u8>().unwrap());
            assert_eq!(header, grpc_status, "{reason} grpc={grpc}");
            assert_eq!(resp.headers()[ERROR_HEADER], reason.as_str());
        }
    }
}

/// A body of `chunks` chunks of 16 KiB that counts the chunks alive.
struct Counting {
    chunks: usize,
    alive: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

struct Chunk(Vec<u8>, Arc<AtomicUsize>);

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

impl http_body::Body for Counting {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        self.chunks -= 1;
        let now = self.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let chunk = Chunk(vec![0; 16 * 1024], self.alive.clone());
        Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_owner(
            chunk,
        )))))
    }
}

#[tokio::test]
async fn a_mirrored_response_is_discarded_a_chunk_at_a_time_up_to_a_limit() {
    let (alive, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // 8 MiB of response.
    let body = Counting {
        chunks: 512,
        alive: alive.clone(),
        peak: peak.clone(),
    };
    let (read, ended) = discard(body, MIRROR_DRAIN_LIMIT).await;
    assert_eq!(read, MIRROR_DRAIN_LIMIT, "read up to the limit, no further");
    assert!(!ended);
    assert_eq!(peak.load(Ordering::SeqCst), 1, "one chunk held at a time");
    assert_eq!(alive.load(Ordering::SeqCst), 0);

    // A small response is read to its end (the connection can be reused).
    let body = Counting {
        chunks: 3,
        alive: alive.clone(),
        peak: peak.clone(),
    };
    assert_eq!(
        discard(body, MIRROR_DRAIN_LIMIT).await,
        (3 * 16 * 1024, true)
    );
}

#[test]
fn a_short_name_takes_the_certificates_namespace_then_the_addresss_then_the_declared_one_never_default()
 {
    use crate::endpoints::{Endpoint, EndpointSet};
    let at = |ip: [u8; 4]| Endpoint {
        addr: std::net::SocketAddr::from((ip, 9080)),
        labels: Default::default(),
        healthy: true,
    };
    let local: EndpointSet = [(
        "productpage.bookinfo.svc.cluster.local".to_string(),
        vec![at([10, 0, 0, 5])],
    )]
    .into_iter()
    .collect();
    let caller = |ip: [u8; 4], cert: Option<&str>, declared: Option<&str>| Caller {
        addr: Some(std::net::SocketAddr::from((ip, 40000))),
        id: None,
        namespace: cert.map(str::to_string),
        declared_namespace: declared.map(std::sync::Arc::from),
        inferred_namespace: std::sync::OnceLock::new(),
    };
    let ns = |c: &Caller, host: &str| {
        c.namespace_for(host, &local, "cluster.local", &Default::default())
            .map(str::to_string)
    };
    // The certificate wins, whatever the address says.
    let c = caller([10, 0, 0, 5], Some("payments"), Some("edge"));
    assert_eq!(ns(&c, "ratings").as_deref(), Ok("payments"));
    // Then the address among the local endpoints, over the declared one.
    let c = caller([10, 0, 0, 5], None, Some("edge"));
    assert_eq!(ns(&c, "ratings-west:9080").as_deref(), Ok("bookinfo"));
    // Once told, kept for the connection (searched once, not per request).
    assert_eq!(
        c.namespace_for(
            "ratings",
            &EndpointSet::new(),
            "cluster.local",
            &Default::default(),
        ),
        Ok("bookinfo")
    );
    // Then the declared one.
    let c = caller([10, 9, 9, 9], None, Some("edge"));
    assert_eq!(ns(&c, "ratings").as_deref(), Ok("edge"));
    // Else a short name is refused, naming what to call instead.
    let c = caller([10, 9, 9, 9], None, None);
    let why = ns(&c, "ratings-west:9080").unwrap_err();
    assert!(
        why.contains("`ratings-west` is a short name")
            && why.contains("`ratings-west.<namespace>`")
            && why.contains("`ratings-west.<namespace>.svc.cluster.local`")
            && why.contains("10.9.9.9")
            && !why.contains("default"),
        "{why}"
    );
    // A qualified name needs no namespace.
    assert_eq!(ns(&c, "ratings-west.bookinfo:9080").as_deref(), Ok(""));
    // With discovery scoped to the policy's namespaces, the refusal says a
    // caller elsewhere cannot be placed, and how to fix it; never a guess.
    let watched =
        arc_swap::ArcSwapOption::from_pointee(vec!["bookinfo".to_string(), "shop".to_string()]);
    let why = c
        .namespace_for("ratings", &local, "cluster.local", &watched)
        .unwrap_err();
    assert!(
        why.contains("watches only the namespaces the policy names")
            && why.contains("(bookinfo, shop)")
            && why.contains("`ratings.<namespace>`")
            && why.contains("add the caller's namespace with --kube-namespace"),
        "{why}"
    );
}

/// A backend's `grpc-status` becomes a label only as one of the 17 codes:
/// ever new strings would mint a metric series each.
#[test]
fn a_grpc_status_label_is_one_of_the_codes_or_other() {
    use super::grpc_status_label;
    assert_eq!(grpc_status_label(None), "");
    assert_eq!(grpc_status_label(Some(b"0")), "0");
    assert_eq!(grpc_status_label(Some(b"14")), "14");
    assert_eq!(grpc_status_label(Some(b"16")), "16");
    for hostile in [&b"17"[..], b"007", b"-1", b"", b"ok", b"14 ", b"\xff"] {
        assert_eq!(grpc_status_label(Some(hostile)), "other", "{hostile:?}");
    }
}
