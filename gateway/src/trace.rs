//! Distributed tracing: one span per gateway hop, W3C and B3 propagation,
//! export over OTLP/gRPC.
//!
//! Owns the sampling decision, the span of each HTTP request a gateway
//! handles (CLIENT on the source gateway's outbound listener, SERVER on the
//! destination gateway's inbound side, as Envoy records egress and ingress),
//! the rewrite of the trace headers for the next hop ([`context`]), and the
//! exporter (the OpenTelemetry SDK's batch processor on its own thread, an
//! OTLP/gRPC exporter over the workspace's tonic). It does not own logs
//! (`tracing`) or metrics (`crate::metrics`); TCP streams are not traced.
//!
//! Off unless `--otlp-endpoint` is set: then [`Gateway::trace`] is empty,
//! the proxy never calls in here, and trace headers pass through untouched.
//!
//! **Sampling** is parent-based (Envoy's and the OpenTelemetry SDK's
//! default): a caller's decision (`traceparent` flags, `x-b3-sampled`, B3
//! debug) is followed whatever the ratio; only a request that arrives with
//! no decision is sampled at `--trace-sampling` percent. Such a request gets
//! a `traceparent` either way, with flags `00` when not sampled (as Envoy
//! propagates an unsampled decision), so every later hop follows the one
//! decision instead of starting trace fragments of its own.
//!
//! **Propagation.** A hop that records a span rewrites `traceparent` (and
//! the B3 headers the request came with) so that the next hop's parent is
//! this span: the backend sees the destination gateway's span as parent. An
//! unsampled hop passes the caller's context on unchanged.
//!
//! **Where facts come from.** A span's attributes are learnt at several
//! points of the data path (the route, each retry, the endpoint, the
//! response). Rather than thread a span through every return of
//! `proxy::outbound` and `proxy::inbound`, a recorded hop lives in a tokio
//! task-local for the request's future, scoped only when the hop is
//! recorded; the hooks ([`route`], [`retry`], [`upstream`], [`response`])
//! do nothing outside a scope (one thread-local read). The span ends when
//! the scope's future is dropped: when the response head is ready, or when
//! the caller went away (then marked `cancelled`).
//!
//! **Export** never blocks a request: ended spans go to the SDK's batch
//! processor (a queue of 2,048, a background thread, a batch every 5 s or
//! 512 spans); a full queue drops spans, a failed export drops its batch and
//! counts it in `meshfed_trace_spans_dropped_total`. SIGTERM flushes what is
//! queued ([`Tracing::shutdown`]).
//!
//! **Without the `otel` cargo feature** (on by default) the SDK and the
//! exporter are left out: [`Tracing`] is an empty type, so tracing is off as
//! without `--otlp-endpoint` (which `main.rs` then refuses at start, naming
//! the feature), and the hooks below never find a hop.

// Without `otel` no `Tracing` value can exist, so the recording half below
// compiles but never runs: its dead code there says nothing.
#![cfg_attr(not(feature = "otel"), allow(dead_code, unused_imports))]

pub mod context;

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
#[cfg(feature = "otel")]
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
#[cfg(feature = "otel")]
use opentelemetry::{Context, KeyValue};
#[cfg(feature = "otel")]
use opentelemetry_sdk::error::OTelSdkResult;
#[cfg(feature = "otel")]
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use context::{Extracted, Ids};

/// Tracing settings, as parsed from flags, environment and config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where spans go (OTLP over gRPC, `http://host:port`); `None`: tracing
    /// is off.
    pub otlp_endpoint: Option<String>,
    /// The share of requests without a caller's decision that are sampled,
    /// in percent (0 to 100).
    pub sampling_percent: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            otlp_endpoint: None,
            sampling_percent: DEFAULT_SAMPLING_PERCENT,
        }
    }
}

/// Production guidance is 1–5%; tests use 100.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

/// The `service.name` of every span a gateway exports.
pub const SERVICE_NAME: &str = "meshfed-gateway";

/// How long one export may take before its batch is dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[cfg(feature = "otel")]
    #[error(
        "cannot build the OTLP exporter for {endpoint}: {source}; check --otlp-endpoint (http://HOST:PORT of an OTLP/gRPC collector, usually port 4317)"
    )]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[cfg(not(feature = "otel"))]
    #[error(
        "cannot export spans to {endpoint}: this gateway was built without the `otel` feature; build one with it: cargo build -p meshfed-gateway --features otel"
    )]
    NotBuilt { endpoint: String },
}

/// Parses `--trace-sampling`: a percentage from 0 to 100.
pub fn parse_sampling(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage; write e.g. 1 or 0.5 or 100"))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!(
            "`{s}`: the sampling percentage must be from 0 to 100"
        ));
    }
    Ok(p)
}

/// Checks `--otlp-endpoint`: `http://HOST:PORT` of an OTLP/gRPC collector.
/// HTTPS is refused: the exporter carries no TLS stack of its own (one
/// crypto provider in the tree); send to a local collector agent, which
/// forwards with TLS.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("`{s}` is not a URL ({e}); write e.g. http://127.0.0.1:4317"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{s}`: HTTPS is not supported by the gateway's exporter; send to a collector agent on the node or pod (http://HOST:4317) and let it forward with TLS"
            ));
        }
        _ => {
            return Err(format!(
                "`{s}`: write http://HOST:PORT, e.g. http://127.0.0.1:4317"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{s}` names no host; write http://HOST:PORT"));
    }
    Ok(s.to_string())
}

/// Counters of the span pipeline, under `meshfed_trace_`.
#[derive(Debug, Clone, Default)]
pub struct TraceMetrics {
    ended: Counter,
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    /// `export-failed` (the collector refused or was unreachable).
    reason: &'static str,
}

impl crate::metrics::Register for TraceMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "trace_spans_ended",
            "Spans recorded and handed to the exporter's queue",
            self.ended.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans lost, by reason (ended - exported - dropped = queued, or dropped at a full queue)",
            self.dropped.clone(),
        );
    }
}

/// A running tracer: sampling ratio, SDK tracer and exporter.
#[cfg(feature = "otel")]
#[derive(Debug)]
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    /// The sampling ratio as a threshold on a random u64.
    threshold: u64,
    cluster: String,
    metrics: TraceMetrics,
}

#[cfg(feature = "otel")]
impl Tracing {
    /// Starts the exporter when `settings` name an endpoint; `None` when
    /// tracing is off. Must run inside the tokio runtime (the gRPC channel
    /// is bound to it); exports run on the SDK's own thread.
    pub fn start(
        settings: &Settings,
        cluster: &str,
        gateway_id: &str,
        metrics: TraceMetrics,
    ) -> Result<Option<Arc<Tracing>>, TraceError> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        use opentelemetry_otlp::WithExportConfig;
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| TraceError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?;
        let exporter = Counting {
            inner: otlp,
            metrics: metrics.clone(),
            endpoint: endpoint.clone(),
            last_warning: AtomicU64::new(0),
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attributes([
                KeyValue::new("service.instance.id", format!("{cluster}/{gateway_id}")),
                KeyValue::new("meshfed.cluster", cluster.to_string()),
            ])
            .build();
        // Sampling is decided here (Tracing::decide), before the SDK is
        // asked for a span, so unsampled requests never reach it.
        let provider = SdkTracerProvider::builder()
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("meshfed-gateway");
        let ratio = settings.sampling_percent / 100.0;
        tracing::info!(
            %endpoint,
            sampling_percent = settings.sampling_percent,
            "tracing on: spans exported over OTLP/gRPC"
        );
        Ok(Some(Arc::new(Tracing {
            tracer,
            provider,
            threshold: threshold(ratio),
            cluster: cluster.to_string(),
            metrics,
        })))
    }

    /// Exports what is queued and stops the exporter, within `deadline`
    /// (SIGTERM drain). The SDK blocks while it flushes, so it runs off the
    /// runtime's workers.
    pub async fn shutdown(&self, deadline: Duration) {
        let provider = self.provider.clone();
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(deadline));
        match tokio::time::timeout(deadline + Duration::from_millis(100), flushed).await {
            Ok(Ok(Ok(()))) => tracing::info!("trace exporter flushed"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace exporter did not flush cleanly"),
            _ => tracing::warn!(?deadline, "trace exporter still flushing at the deadline"),
        }
    }

    /// The sampling decision: the caller's when it made one, else the ratio.
    fn decide(&self, seen: &Extracted) -> bool {
        match seen.sampled {
            Some(s) => s,
            None => self.threshold == u64::MAX || rand::random::<u64>() < self.threshold,
        }
    }

    /// The source gateway's hop for a request from a local caller: decides,
    /// rewrites the trace headers for the next hop, and returns the hop to
    /// record when sampled ([`in_hop`]).
    pub fn outbound<B>(&self, req: &mut http::Request<B>) -> Option<Hop> {
        let (authority, path) = {
            let uri = req.uri();
            let authority = uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .unwrap_or("");
            (authority.to_string(), uri.path().to_string())
        };
        let method = req.method().as_str().to_string();
        let hop = self.begin(Side::Outbound, req.headers(), |seen| {
            let (host, port) = crate::route::split_authority(&authority, 80);
            let mut attrs = vec![
                KeyValue::new("http.request.method", method.clone()),
                KeyValue::new("url.path", path),
                KeyValue::new("server.address", host.to_string()),
            ];
            if authority.contains(':') {
                attrs.push(KeyValue::new("server.port", i64::from(port)));
            }
            if seen.parent.is_none() {
                attrs.push(KeyValue::new("meshfed.trace_root", true));
            }
            (format!("{method} {host}"), attrs)
        });
        hop.inject(req.headers_mut());
        hop.span.is_some().then_some(hop)
    }

    /// The destination gateway's hop for a stream from a peer gateway.
    /// The request's trace headers are rewritten later, when it is forwarded
    /// ([`inject`]).
    pub fn inbound(
        &self,
        peer_cluster: &str,
        service: &str,
        head: &crate::wire::frame::RequestHead,
    ) -> Hop {
        self.begin(Side::Inbound, &head.headers, |seen| {
            let (host, port) = crate::route::split_authority(&head.authority, 80);
            let mut attrs = vec![
                KeyValue::new("http.request.method", head.method.as_str().to_string()),
                KeyValue::new("url.path", path_of(&head.path).to_string()),
                KeyValue::new("server.address", host.to_string()),
                KeyValue::new("meshfed.peer_cluster", peer_cluster.to_string()),
                KeyValue::new("meshfed.service", service.to_string()),
            ];
            if head.authority.contains(':') {
                attrs.push(KeyValue::new("server.port", i64::from(port)));
            }
            if seen.parent.is_none() {
                attrs.push(KeyValue::new("meshfed.trace_root", true));
            }
            (format!("{} {service}", head.method), attrs)
        })
    }

    /// Reads the caller's context, decides, and starts the span if sampled.
    /// `describe` (name and first attributes) runs only for a sampled hop.
    fn begin(
        &self,
        side: Side,
        headers: &HeaderMap,
        describe: impl FnOnce(&Extracted) -> (String, Vec<KeyValue>),
    ) -> Hop {
        let seen = context::extract(headers);
        let sampled = self.decide(&seen);
        if !sampled {
            // Nothing recorded: the caller's context goes on unchanged; a
            // request without one gets an unsampled traceparent.
            let next = match seen.parent {
                Some(p) => p,
                None => Ids {
                    trace_id: nonzero(rand::random::<u128>()),
                    span_id: nonzero(rand::random::<u64>()),
                },
            };
            return Hop {
                span: None,
                seen,
                next,
                sampled,
                inject: seen.parent.is_none() && seen.sampled.is_none(),
                side,
                metrics: None,
                facts: Facts::default(),
            };
        }
        let parent_cx = match seen.parent {
            Some(p) => {
                let state = if seen.from_traceparent {
                    headers
                        .get(context::TRACESTATE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<TraceState>().ok())
                        .unwrap_or_default()
                } else {
                    TraceState::default()
                };
                Context::new().with_remote_span_context(SpanContext::new(
                    TraceId::from_bytes(p.trace_id.to_be_bytes()),
                    SpanId::from_bytes(p.span_id.to_be_bytes()),
                    TraceFlags::SAMPLED,
                    true,
                    state,
                ))
            }
            None => Context::new(),
        };
        let (name, mut attrs) = describe(&seen);
        attrs.push(KeyValue::new("meshfed.cluster", self.cluster.clone()));
        let kind = match side {
            Side::Outbound => SpanKind::Client,
            Side::Inbound => SpanKind::Server,
        };
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs);
        let span = self.tracer.build_with_context(builder, &parent_cx);
        let sc = span.span_context();
        let next = Ids {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        };
        Hop {
            span: Some(span),
            seen,
            next,
            sampled,
            inject: true,
            side,
            metrics: Some(self.metrics.clone()),
            facts: Facts::default(),
        }
    }
}

/// A tracer in a build without the `otel` feature: there is none.
#[cfg(not(feature = "otel"))]
#[derive(Debug)]
pub enum Tracing {}

#[cfg(not(feature = "otel"))]
impl Tracing {
    /// `None` when `settings` name no endpoint (tracing off); an error
    /// naming the missing feature when they do.
    pub fn start(
        settings: &Settings,
        _cluster: &str,
        _gateway_id: &str,
        _metrics: TraceMetrics,
    ) -> Result<Option<Arc<Tracing>>, TraceError> {
        match &settings.otlp_endpoint {
            None => Ok(None),
            Some(endpoint) => Err(TraceError::NotBuilt {
                endpoint: endpoint.clone(),
            }),
        }
    }

    pub async fn shutdown(&self, _deadline: Duration) {
        match *self {}
    }

    pub fn outbound<B>(&self, _req: &mut http::Request<B>) -> Option<Hop> {
        match *self {}
    }

    pub fn inbound(
        &self,
        _peer_cluster: &str,
        _service: &str,
        _head: &crate::wire::frame::RequestHead,
    ) -> Hop {
        match *self {}
    }
}

/// A recorded span: the SDK's, or nothing at all without `otel`.
#[cfg(feature = "otel")]
type Span = opentelemetry_sdk::trace::Span;
#[cfg(not(feature = "otel"))]
type Span = std::convert::Infallible;

/// u64 threshold for a ratio: a random u64 below it is sampled.
fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 {
        0
    } else {
        // Precision to 2^-53 is plenty for a percentage.
        (ratio * u64::MAX as f64) as u64
    }
}

fn nonzero<T: PartialEq + From<u8>>(v: T) -> T {
    if v == T::from(0) { T::from(1) } else { v }
}

/// The path without its query: `url.path` never carries query values, which
/// may be secrets.
fn path_of(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Outbound,
    Inbound,
}

/// One gateway hop of one request: the sampling decision, the context for
/// the next hop and, when sampled, the span with what was learnt so far.
/// Ending is on drop.
#[derive(Debug)]
pub struct Hop {
    span: Option<Span>,
    seen: Extracted,
    next: Ids,
    sampled: bool,
    /// Whether the next hop's headers are rewritten: when this hop records
    /// a span, or starts a trace.
    inject: bool,
    side: Side,
    metrics: Option<TraceMetrics>,
    facts: Facts,
}

#[derive(Debug, Default)]
struct Facts {
    status: Option<u16>,
    reason: String,
    grpc_status: Option<i64>,
    peer_cluster: Option<String>,
    route: Option<(String, String)>,
    retries: u32,
    upstream: Option<SocketAddr>,
}

impl Hop {
    /// Rewrites `headers` for the next hop, if this hop should.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if self.inject {
            context::inject(headers, &self.seen, self.next, self.sampled);
        }
    }

    /// The trace and span IDs the next hop sees as its parent.
    pub fn ids(&self) -> (u128, u64) {
        (self.next.trace_id, self.next.span_id)
    }
}

#[cfg(feature = "otel")]
impl Drop for Hop {
    fn drop(&mut self) {
        let Some(mut span) = self.span.take() else {
            return;
        };
        let f = std::mem::take(&mut self.facts);
        match f.status {
            Some(code) => {
                span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
                // OpenTelemetry's HTTP conventions: 4xx is an error for the
                // client side only.
                let limit = if self.side == Side::Outbound {
                    400
                } else {
                    500
                };
                if code >= limit || !f.reason.is_empty() {
                    let why = if f.reason.is_empty() {
                        format!("HTTP {code}")
                    } else {
                        f.reason.clone()
                    };
                    span.set_status(Status::error(why));
                }
            }
            None => {
                span.set_attribute(KeyValue::new("meshfed.error", "cancelled"));
                span.set_status(Status::error("the caller went away before the response"));
            }
        }
        if !f.reason.is_empty() {
            span.set_attribute(KeyValue::new("meshfed.error", f.reason));
        }
        if let Some(g) = f.grpc_status {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", g));
        }
        if let Some(p) = f.peer_cluster {
            span.set_attribute(KeyValue::new("meshfed.peer_cluster", p));
        }
        if let Some((route, name)) = f.route {
            span.set_attribute(KeyValue::new("meshfed.route", route));
            if !name.is_empty() {
                span.set_attribute(KeyValue::new("meshfed.route.name", name));
            }
        }
        if self.side == Side::Outbound {
            span.set_attribute(KeyValue::new("meshfed.retries", i64::from(f.retries)));
        }
        if let Some(a) = f.upstream {
            span.set_attribute(KeyValue::new("meshfed.upstream.address", a.to_string()));
        }
        span.end();
        if let Some(m) = &self.metrics {
            m.ended.inc();
        }
    }
}

tokio::task_local! {
    static HOP: RefCell<Option<Hop>>;
}

/// Runs a request's future with its recorded hop; the span ends when the
/// future completes or is dropped.
pub async fn in_hop<F: Future>(hop: Hop, fut: F) -> F::Output {
    HOP.scope(RefCell::new(Some(hop)), fut).await
}

/// Runs a peer stream's future with room for its hop ([`start_inbound`]).
pub async fn in_stream<F: Future>(fut: F) -> F::Output {
    HOP.scope(RefCell::new(None), fut).await
}

/// The destination gateway's hop, inside [`in_stream`]: decided when the
/// stream's head is read.
pub fn start_inbound(tracing: &Tracing, peer_cluster: &str, open: &crate::wire::frame::Open) {
    let Some(head) = &open.http else {
        return;
    };
    let hop = tracing.inbound(peer_cluster, &open.service, head);
    let _ = HOP.try_with(|h| *h.borrow_mut() = Some(hop));
}

/// Rewrites the trace headers of the request this hop forwards (the
/// destination gateway, to the endpoint). Nothing outside a hop.
pub fn inject(headers: &mut HeaderMap) {
    let _ = HOP.try_with(|h| {
        if let Some(hop) = h.borrow().as_ref() {
            hop.inject(headers);
        }
    });
}

fn with_facts(f: impl FnOnce(&mut Facts)) {
    let _ = HOP.try_with(|h| {
        if let Some(hop) = h.borrow_mut().as_mut()
            && hop.span.is_some()
        {
            f(&mut hop.facts);
        }
    });
}

/// Notes the VirtualService rule that routed the request.
pub fn route(target: &crate::route::Target, active: &crate::route::Active) {
    let Some((host, index)) = &target.rule else {
        return;
    };
    with_facts(|f| {
        let routes = active.snapshot.policy.routes.get(host);
        let source = routes.map_or_else(
            || host.clone(),
            |r| format!("{}/{}", r.source.namespace, r.source.name),
        );
        let name = routes
            .and_then(|r| r.http.get(*index))
            .map(|r| r.name.clone())
            .unwrap_or_default();
        f.route = Some((format!("{source}/http[{index}]"), name));
    });
}

/// Notes one more retry of the request.
pub fn retry() {
    with_facts(|f| f.retries += 1);
}

/// Notes the endpoint the destination gateway sent the request to.
pub fn upstream(addr: SocketAddr) {
    with_facts(|f| f.upstream = Some(addr));
}

/// Notes the response: status, the gateway's reason (`x-meshfed-error`),
/// gRPC status, and (source side) the destination cluster.
pub fn response(status: u16, reason: &str, grpc_status: &str, peer_cluster: Option<&str>) {
    with_facts(|f| {
        f.status = Some(status);
        f.reason = reason.to_string();
        f.grpc_status = grpc_status.parse().ok();
        if let Some(p) = peer_cluster.filter(|p| !p.is_empty()) {
            f.peer_cluster = Some(p.to_string());
        }
    });
}

/// The exporter, counting what it exported and what it lost.
#[cfg(feature = "otel")]
#[derive(Debug)]
struct Counting {
    inner: opentelemetry_otlp::SpanExporter,
    metrics: TraceMetrics,
    endpoint: String,
    /// Seconds since the epoch of the last warning, to log at most one a
    /// minute while the collector is down.
    last_warning: AtomicU64,
}

#[cfg(feature = "otel")]
impl SpanExporter for Counting {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.metrics.exported.inc_by(n);
            }
            Err(e) => {
                self.metrics
                    .dropped
                    .get_or_create(&DropLabels {
                        reason: "export-failed",
                    })
                    .inc_by(n);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let last = self.last_warning.load(Ordering::Relaxed);
                if now >= last + 60
                    && self
                        .last_warning
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        spans = n,
                        error = %e,
                        "trace export failed; spans dropped (is the OTLP collector up and listening for gRPC there?)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(feature = "otel")]
#[cfg(test)]
mod tests;
