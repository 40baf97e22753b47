//! Traffic policy a gateway enforces on its callers' requests: route
//! timeouts and fault injection (the first part of the traffic-policy
//! issue; retries, outlier detection and authorization come next).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshfed_tests::federation::*;

/// A backend that answers after `delay`.
async fn slow_backend(delay: Duration) -> SocketAddr {
    let (addr, _task) = serve_fn(move |_req| async move {
        tokio::time::sleep(delay).await;
        hyper::Response::new(Full::new(Bytes::from_static(b"slow")))
    })
    .await;
    addr
}

/// One gateway (a single-cluster mesh) in front of `backend`, serving
/// `ratings` with `http_rule` as its only VirtualService rule.
async fn gateway(backend: SocketAddr, http_rule: &str) -> (tempfile::TempDir, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("ratings.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings}}\nspec:\n  hosts: [ratings]\n  http:\n  - route: [{{destination: {{host: ratings}}}}]\n{http_rule}"
        ),
    )
    .unwrap();
    let eps = dir.path().join("eps.yaml");
    discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
    let gw = GatewayProcess::start(&GatewaySpec {
        cluster: "east".into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway("east", "gw-0"),
        policy_dir: policy,
        discovery: Some(eps),
        tunnel_port: free_udp_port(),
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    });
    (dir, gw)
}

async fn get(via: SocketAddr) -> (u16, Option<String>, Duration) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{via}/"))
        .header("host", "ratings")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let took = start.elapsed();
    let reason = resp
        .headers()
        .get("x-meshfed-error")
        .map(|v| v.to_str().unwrap().to_string());
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    (status, reason, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_at_the_configured_time() {
    let backend = slow_backend(Duration::from_secs(5)).await;
    let (_dir, gw) = gateway(backend, "    timeout: 500ms\n").await;
    let (status, reason, took) = get(gw.outbound).await;
    assert_eq!(status, 504);
    assert_eq!(reason.as_deref(), Some("upstream-timeout"));
    // A behaviour deadline, with margins for a noisy 2-core machine.
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_abort_answers_every_request_with_its_status() {
    let backend = slow_backend(Duration::ZERO).await;
    let (_dir, gw) = gateway(
        backend,
        "    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n",
    )
    .await;
    for _ in 0..5 {
        let (status, reason, _) = get(gw.outbound).await;
        assert_eq!((status, reason.as_deref()), (418, Some("fault-injected")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_delay_holds_requests_then_lets_them_through() {
    let backend = slow_backend(Duration::ZERO).await;
    let (_dir, gw) = gateway(
        backend,
        "    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n",
    )
    .await;
    let (status, _, took) = get(gw.outbound).await;
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

/// A backend that answers 503 to its first `failures` requests, then 200
/// with the length of the request body it read; it counts requests.
async fn flaky_backend(failures: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let (addr, _task) = serve_fn(move |req: Request<hyper::body::Incoming>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let len = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            hyper::Response::builder()
                .status(if n < failures { 503 } else { 200 })
                .body(Full::new(Bytes::from(len.to_string())))
                .unwrap()
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_transient_503s_into_a_success_within_the_attempts() {
    let (backend, seen) = flaky_backend(2).await;
    let (_dir, gw) = gateway(backend, "    retries: {attempts: 3, retryOn: 5xx}\n").await;
    let (status, _, _) = get(gw.outbound).await;
    assert_eq!(status, 200);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "two failures, then the success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_configured_attempts() {
    let (backend, seen) = flaky_backend(10).await;
    let (_dir, gw) = gateway(
        backend,
        "    retries: {attempts: 2, retryOn: 'gateway-error,503'}\n",
    )
    .await;
    let (status, _, _) = get(gw.outbound).await;
    assert_eq!(status, 503);
    assert_eq!(seen.load(Ordering::SeqCst), 3, "one try and two retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_outside_retry_on_is_not_retried() {
    let (backend, seen) = flaky_backend(10).await;
    let (_dir, gw) = gateway(
        backend,
        "    retries: {attempts: 3, retryOn: connect-failure}\n",
    )
    .await;
    let (status, _, _) = get(gw.outbound).await;
    assert_eq!(status, 503);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_post_is_buffered_and_retried_with_its_body() {
    // 503 twice, then the body's length: the retry carries the body.
    let (backend, seen) = flaky_backend(2).await;
    let (_dir, gw) = gateway(backend, "    retries: {attempts: 3, retryOn: 5xx}\n").await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{}/", gw.outbound))
        .header("host", "ratings")
        .body(Full::new(Bytes::from(vec![b'p'; 1000])))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"1000");
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}
