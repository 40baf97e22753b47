//! Distributed tracing through real gateway processes: east's outbound hop
//! and west's inbound hop export their spans over OTLP/gRPC to a collector
//! in this test process, and the backend reports the trace headers it
//! received.
//!
//! The collector is the OTLP TraceService from `opentelemetry-proto`,
//! served with tonic on loopback: the same protocol a real OpenTelemetry
//! Collector speaks. Gateways batch spans for up to 5 s; the tests stop the
//! gateways with SIGTERM, which flushes them, so they also pin the flush on
//! drain.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshfed_tests::federation::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A span as the collector received it, with its resource's attributes.
#[derive(Debug, Clone)]
struct Got {
    span: Span,
    resource: BTreeMap<String, String>,
}

impl Got {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(value_text)
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An in-process OTLP/gRPC collector that keeps every span.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource: BTreeMap<String, String> = rs
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|kv| Some((kv.key, value_text(kv.value?.value.as_ref()?))))
                .collect();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Got {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a loopback port; returns its `http://` endpoint.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                if tx.send(Ok::<_, std::io::Error>(s)).await.is_err() {
                    break;
                }
            }
        });
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    fn trace(&self, trace_id: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect()
    }
}

/// The trace headers a backend received, per request (keyed by `x-req`).
type Seen = Arc<Mutex<BTreeMap<String, http::HeaderMap>>>;

const TRACE_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

async fn backend(seen: Seen) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve_fn(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let mut kept = http::HeaderMap::new();
            for h in TRACE_HEADERS {
                if let Some(v) = req.headers().get(*h) {
                    kept.insert(*h, v.clone());
                }
            }
            let key = req
                .headers()
                .get("x-req")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            seen.lock().unwrap().insert(key, kept);
            Response::new(Full::new(Bytes::from_static(b"ratings")))
        }
    })
    .await
}

const VIRTUAL_SERVICE: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - name: primary
    route:
    - destination: {host: ratings}
";

/// east (caller side) and west (serving ratings at `backend`), both
/// exporting to `endpoint` with `sampling` percent.
fn federation(
    backend: SocketAddr,
    endpoint: &str,
    sampling: &str,
) -> (tempfile::TempDir, GatewayProcess, GatewayProcess) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (east_port, west_port) = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n---\n{VIRTUAL_SERVICE}",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[west_port])
        ),
    )
    .unwrap();
    let eps = dir.path().join("west.yaml");
    discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
    let args = vec![
        "--otlp-endpoint".to_string(),
        endpoint.to_string(),
        "--trace-sampling".to_string(),
        sampling.to_string(),
    ];
    let spec = |cluster: &str, port: u16, discovery: Option<std::path::PathBuf>| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery,
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: args.clone(),
    };
    let west = GatewayProcess::start(&spec("west", west_port, Some(eps)));
    let east = GatewayProcess::start(&spec("east", east_port, None));
    east.wait_links("west", 1);
    (dir, east, west)
}

/// GET ratings through east with `headers`; returns the status.
async fn call(east: &GatewayProcess, key: &str, headers: &[(&str, &str)]) -> u16 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut b = Request::get(format!("http://{}/ratings/1?user=alice", east.outbound))
        .header("host", "ratings.default")
        .header("x-req", key);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(b.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("no answer in 10 s")
    .expect("request failed");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// SIGTERM both gateways (which flushes their spans) and waits until the
/// collector holds at least `n` spans, or 10 s.
async fn stop_and_collect(
    collector: &Collector,
    east: &mut GatewayProcess,
    west: &mut GatewayProcess,
    n: usize,
) {
    let (e, w) = tokio::task::block_in_place(|| (east.terminate(), west.terminate()));
    assert_eq!((e, w), (Some(0), Some(0)), "gateways must drain cleanly");
    let deadline = Instant::now() + Duration::from_secs(10);
    while collector.spans().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn parse_traceparent(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "traceparent `{v}`");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_links_caller_source_gateway_destination_gateway_and_backend() {
    let collector = Collector::default();
    let endpoint = collector.serve().await;
    let seen: Seen = Arc::default();
    let (addr, _backend) = backend(seen.clone()).await;
    let (_dir, mut east, mut west) = federation(addr, &endpoint, "100");

    let tp = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let w3c = [
        ("traceparent", tp.as_str()),
        ("tracestate", "vendor=opaque"),
    ];
    assert_eq!(call(&east, "w3c", &w3c).await, 200);
    assert_eq!(call(&east, "none", &[]).await, 200);
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let b3_single = format!("{b3_trace}-e457b5a2e4d86bd1-1");
    assert_eq!(call(&east, "b3", &[("b3", b3_single.as_str())]).await, 200);
    let b3_multi = [
        ("x-b3-traceid", "64fe8b2a57d3eff7"),
        ("x-b3-spanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "1"),
    ];
    assert_eq!(call(&east, "b3multi", &b3_multi).await, 200);
    stop_and_collect(&collector, &mut east, &mut west, 8).await;

    // One trace, the caller's, with exactly the two gateway hops.
    let spans = collector.trace(TRACE);
    assert_eq!(spans.len(), 2, "spans of the trace: {spans:#?}");
    let source = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Client as i32)
        .expect("a CLIENT span from the source gateway");
    let dest = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Server as i32)
        .expect("a SERVER span from the destination gateway");
    assert_eq!(
        source.parent(),
        CALLER_SPAN,
        "source's parent is the caller"
    );
    assert_eq!(
        dest.parent(),
        source.span_id(),
        "destination's parent is the source"
    );
    assert_eq!(source.attr("meshfed.cluster").as_deref(), Some("east"));
    assert_eq!(source.attr("meshfed.peer_cluster").as_deref(), Some("west"));
    assert_eq!(
        source.attr("meshfed.route").as_deref(),
        Some("default/ratings/http[0]")
    );
    assert_eq!(
        source.attr("meshfed.route.name").as_deref(),
        Some("primary")
    );
    assert_eq!(source.attr("meshfed.retries").as_deref(), Some("0"));
    assert_eq!(source.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(source.attr("url.path").as_deref(), Some("/ratings/1"));
    assert_eq!(
        source.attr("server.address").as_deref(),
        Some("ratings.default")
    );
    assert_eq!(
        source.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        source.resource.get("service.name").map(String::as_str),
        Some("meshfed-gateway")
    );
    assert_eq!(dest.attr("meshfed.cluster").as_deref(), Some("west"));
    assert_eq!(dest.attr("meshfed.peer_cluster").as_deref(), Some("east"));
    assert_eq!(
        dest.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        dest.attr("meshfed.upstream.address").as_deref(),
        Some(addr.to_string().as_str())
    );
    assert_eq!(
        dest.resource.get("service.instance.id").map(String::as_str),
        Some("west/gw-0")
    );

    // The backend's parent is the destination gateway's span; tracestate
    // travels with its trace.
    let seen = seen.lock().unwrap().clone();
    let h = &seen["w3c"];
    let (trace, parent, flags) = parse_traceparent(h["traceparent"].to_str().unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
    assert_eq!(parent, dest.span_id());
    assert_eq!(h["tracestate"], "vendor=opaque");

    // Without a context, at 100%: a new trace rooted at the source gateway.
    let h = &seen["none"];
    let (trace, parent, flags) = parse_traceparent(h["traceparent"].to_str().unwrap());
    assert_eq!(flags, "01");
    let spans = collector.trace(&trace);
    assert_eq!(spans.len(), 2, "a new trace with both hops: {spans:#?}");
    let root = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Client as i32)
        .unwrap();
    assert!(
        root.span.parent_span_id.is_empty(),
        "the source gateway starts the trace"
    );
    let server = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(
        (server.parent(), server.span_id()),
        (root.span_id(), parent)
    );

    // B3 single: continued, and rewritten with the destination as parent.
    let h = &seen["b3"];
    let spans = collector.trace(b3_trace);
    assert_eq!(spans.len(), 2, "the B3 trace: {spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Server as i32)
        .unwrap();
    let b3: Vec<&str> = h["b3"].to_str().unwrap().split('-').collect();
    assert_eq!(b3[0], b3_trace);
    assert_eq!(
        b3[1],
        server.span_id(),
        "backend's B3 span is the destination's"
    );
    assert_eq!(b3[2], "1");
    assert_eq!(
        b3[3],
        server.parent(),
        "its parent is the source gateway's span"
    );

    // B3 multi with a 64-bit trace ID: kept 64-bit in x-b3-*, widened in
    // traceparent and in the exported spans.
    let h = &seen["b3multi"];
    assert_eq!(h["x-b3-traceid"], "64fe8b2a57d3eff7");
    assert_eq!(h["x-b3-sampled"], "1");
    let spans = collector.trace("000000000000000064fe8b2a57d3eff7");
    assert_eq!(spans.len(), 2, "the B3 multi trace: {spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Server as i32)
        .unwrap();
    let client = spans
        .iter()
        .find(|s| s.span.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(client.parent(), "05e3ac9a4f6e3b90");
    assert_eq!(h["x-b3-spanid"], server.span_id().as_str());
    assert_eq!(h["x-b3-parentspanid"], client.span_id().as_str());
    assert_eq!(
        parse_traceparent(h["traceparent"].to_str().unwrap()).0,
        "000000000000000064fe8b2a57d3eff7"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_zero_percent_only_a_callers_sampled_decision_is_exported() {
    let collector = Collector::default();
    let endpoint = collector.serve().await;
    let seen: Seen = Arc::default();
    let (addr, _backend) = backend(seen.clone()).await;
    let (_dir, mut east, mut west) = federation(addr, &endpoint, "0");

    for i in 0..20 {
        assert_eq!(call(&east, &format!("none-{i}"), &[]).await, 200);
    }
    let unsampled = format!("00-{TRACE}-{CALLER_SPAN}-00");
    assert_eq!(
        call(&east, "unsampled", &[("traceparent", &unsampled)]).await,
        200
    );
    // Parent-based: a caller that sampled is followed even at 0%.
    let sampled = "00-11111111111111111111111111111111-2222222222222222-01";
    assert_eq!(
        call(&east, "sampled", &[("traceparent", sampled)]).await,
        200
    );
    stop_and_collect(&collector, &mut east, &mut west, 2).await;

    let spans = collector.spans();
    assert_eq!(spans.len(), 2, "only the sampled caller's hops: {spans:#?}");
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id() == "11111111111111111111111111111111")
    );

    let seen = seen.lock().unwrap().clone();
    // The unsampled decision travels: a traceparent with flags 00, so no
    // later hop starts a trace of its own.
    let (_, _, flags) = parse_traceparent(seen["none-0"]["traceparent"].to_str().unwrap());
    assert_eq!(flags, "00");
    // An unsampled caller's context passes through unchanged.
    assert_eq!(seen["unsampled"]["traceparent"], unsampled.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_never_delays_requests() {
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let seen: Seen = Arc::default();
    let (addr, _backend) = backend(seen.clone()).await;
    let (_dir, mut east, mut west) = federation(addr, &dead, "100");
    let start = Instant::now();
    for i in 0..50 {
        assert_eq!(call(&east, &format!("r{i}"), &[]).await, 200);
    }
    // Generous on two busy cores; an exporter on the request path would
    // take its 5 s export timeout.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "50 requests took {:?}",
        start.elapsed()
    );
    assert!(east.metric("meshfed_trace_spans_ended_total", &[]) >= 50.0);
    let (e, w) = tokio::task::block_in_place(|| (east.terminate(), west.terminate()));
    assert_eq!(
        (e, w),
        (Some(0), Some(0)),
        "drain with a dead collector still exits 0"
    );
}
