//! The outbound listener: where local callers send their calls.
//!
//! Each accepted connection is classified by its first bytes:
//! - a TLS ClientHello (`0x16 0x03`): opaque TCP routed by its SNI;
//! - anything else that starts like HTTP: served by hyper, which tells
//!   HTTP/1.1 from HTTP/2 prior knowledge (so gRPC works); `CONNECT host:port`
//!   becomes a TCP tunnel;
//! - anything else: opaque TCP, which needs a port mapping (a listener of its
//!   own per mapped service port); on the shared port it is refused.
//!
//! Each HTTP request loads the active snapshot once, routes, and goes either
//! to a local endpoint or over a link to the chosen cluster's gateway.
//!
//! A caller connection with no request in flight is bounded by the header
//! timeout (`--header-timeout`, 30 s): HTTP/1 by hyper's header-read timer,
//! HTTP/2 (and a connection that has not yet said which it speaks) by
//! [`idle`], which closes it with GOAWAY, as Envoy's idle timeout does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::body::{self, ProxyBody, TunnelBody, read_head, write_frame};
use super::detect::{self, Detected};
use super::{ERROR_HEADER, error_response, is_grpc, rules, strip_hop_by_hop};
use crate::accept::{Acceptor, ConnectionLimit};
use crate::metrics::{DurationLabels, RequestLabels, TcpLabels};
use crate::route::{self, RequestInfo, Target};
use crate::state::Gateway;
use crate::tunnel::frame::{Frame, Open, Refusal, RequestHead, StreamKind};

/// How long a caller has to send its first bytes before the connection is
/// treated as opaque TCP.
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default header timeout (`--header-timeout`). HTTP/1: how long a
/// caller has to send a whole request head, from the moment the connection
/// waits for one (so also how long a kept-alive connection may sit idle);
/// hyper applies its own 30 s default only with a timer, which the listener
/// did not set: a slowloris client could hold a connection and its task
/// forever. HTTP/2: how long a connection may have no request in flight
/// ([`idle`]). 30 s is hyper's documented default.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// After an idle HTTP/2 connection is sent GOAWAY, how long a caller that
/// does not answer it (h2 waits for the PING it sends with the GOAWAY) may
/// keep the connection, at most; less when the header timeout is shorter.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// Who called, as far as the listener knows.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub addr: Option<SocketAddr>,
    /// The caller's SPIFFE ID, when it presented a workload certificate.
    pub id: Option<String>,
    /// The namespace short names resolve in.
    pub namespace: String,
}

/// Serves the outbound listener until `stop` turns true; then stops
/// accepting, asks every HTTP connection to close gracefully (HTTP/1.1 after
/// its current response, HTTP/2 with GOAWAY) and waits for them, at most
/// `drain`. `header_timeout` bounds connections with no request in flight
/// (`--header-timeout`, [`HEADER_READ_TIMEOUT`] by default).
pub async fn serve(
    state: Arc<Gateway>,
    listener: TcpListener,
    limit: ConnectionLimit,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    header_timeout: Duration,
) {
    // Each connection holds a receiver: a send asks them all to close
    // gracefully, and `closed` resolves when every one has (hyper-util's
    // GracefulShutdown, whose signal serve_http needs beside its own).
    let (graceful, _) = watch::channel(());
    let mut acceptor = Acceptor::new(listener, limit, "listener", "outbound listener");
    loop {
        let (stream, addr, admitted) = tokio::select! {
            accepted = acceptor.accept(&state.metrics) => accepted,
            _ = stop.changed() => break,
        };
        let state = state.clone();
        let watcher = Watcher {
            drain: graceful.subscribe(),
            header_timeout,
        };
        tokio::spawn(async move {
            let _admitted = admitted;
            let _ = stream.set_nodelay(true);
            let caller = Caller {
                addr: Some(addr),
                id: None,
                namespace: "default".into(),
            };
            match state.local_tls.load_full() {
                None => handle_connection(state, stream, caller, watcher).await,
                // TLS callers present workload certificates; plaintext ones
                // are admitted per destination by PeerAuthentication
                // (crate::peer_auth).
                Some(tls) => match detect(&stream).await {
                    // Boxed, as the protocols in handle_connection: a caller
                    // that has sent nothing costs only detection's state.
                    Detected::Tls { .. } => {
                        Box::pin(handle_mutual(state, stream, caller, watcher, tls)).await
                    }
                    _ => handle_connection(state, stream, caller, watcher).await,
                },
            }
        });
    }
    drop(acceptor);
    let _ = graceful.send(());
    if tokio::time::timeout(drain, graceful.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "outbound connections still open at the drain deadline"
        );
    }
}

/// Peeks at the caller's first bytes until [`detect::classify`] decides
/// (up to [`detect::MAX_HELLO`] bytes of a ClientHello) or the caller has
/// been silent for [`DETECT_TIMEOUT`]. The buffer grows only as a
/// ClientHello needs it, so an idle caller holds 1 KiB.
async fn detect(stream: &TcpStream) -> Detected {
    let mut buf = vec![0u8; 1024];
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let mut seen = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(remaining, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return detect::at_deadline(&buf[..seen]),
        };
        seen = n;
        match detect::classify(&buf[..n]) {
            detect::Step::Done(d) => return d,
            detect::Step::Need(want) => {
                if Instant::now() >= deadline {
                    return detect::at_deadline(&buf[..n]);
                }
                if want > buf.len() {
                    buf.resize(want.min(detect::MAX_HELLO), 0);
                } else {
                    // The bytes wanted have not all arrived: peek again soon.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
}

/// Mutual TLS from a local caller: the caller presents a workload
/// certificate of this cluster (the verifier refuses anything else and
/// counts it); its SPIFFE ID becomes the caller identity that travels to the
/// destination. Inside TLS, HTTP/1.1 and HTTP/2 are served (TCP through
/// CONNECT); TLS passthrough by SNI is a plaintext-mode feature.
async fn handle_mutual(
    state: Arc<Gateway>,
    stream: TcpStream,
    mut caller: Caller,
    watcher: Watcher,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls_stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            state.metrics.refused("listener", "tls-handshake");
            tracing::info!(caller = ?caller.addr, error = %e, "local caller refused at the TLS handshake");
            return;
        }
        Err(_) => {
            state.metrics.refused("listener", "tls-handshake-timeout");
            return;
        }
    };
    let id = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .map(crate::identity::verify::peer_identity);
    match id {
        Some(Ok(p)) => {
            if let crate::identity::spiffe::SpiffeId::Workload { namespace, .. } = &p.id {
                caller.namespace = namespace.clone();
            }
            caller.id = Some(p.id.to_string());
        }
        _ => {
            state.metrics.refused("listener", "no-workload-identity");
            return;
        }
    }
    serve_http(state, caller, tls_stream, watcher).await;
}

/// What a caller connection gets from the listener: the drain signal and
/// the header timeout.
#[derive(Debug)]
struct Watcher {
    drain: watch::Receiver<()>,
    header_timeout: Duration,
}

/// Serves HTTP/1.1 and HTTP/2 (with CONNECT upgrades) on one caller
/// connection, under the drain signal and the header timeout.
async fn serve_http<I>(state: Arc<Gateway>, caller: Caller, io: I, watcher: Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Watcher {
        mut drain,
        header_timeout,
    } = watcher;
    let addr = caller.addr;
    let caller = Arc::new(caller);
    let metrics = state.clone();
    let metrics = &metrics.metrics;
    let activity = Arc::new(Activity::new());
    let io = Sniff {
        io,
        preface: detect::Preface::default(),
        activity: activity.clone(),
    };
    let svc = {
        let activity = activity.clone();
        service_fn(move |mut req: Request<Incoming>| {
            let state = state.clone();
            let caller = caller.clone();
            let in_flight = InFlight::new(&activity);
            let h2 = req.version() == http::Version::HTTP_2;
            if h2 && req.method() == Method::CONNECT {
                // The tunnel outlives the response; connect() holds this.
                req.extensions_mut().insert(in_flight.clone());
            }
            async move {
                // Boxed: hyper keeps room for this future from the start of
                // every connection (its dispatcher's in-flight slot), so an
                // inline request future would cost every idle caller ~28 KiB.
                let resp = Box::pin(handle_http(state, caller, req)).await;
                // HTTP/1 is not timed by `idle`: no need to hold its body.
                Ok::<_, Infallible>(if h2 {
                    resp.map(|b| Held::boxed(b, in_flight))
                } else {
                    resp
                })
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_close = idle(&activity, header_timeout);
    tokio::pin!(idle_close);
    // After GOAWAY: how long with nothing in flight before the connection is
    // dropped, for a caller that does not answer the GOAWAY's PING.
    let hard_close = idle(&activity, header_timeout.min(GOAWAY_GRACE));
    tokio::pin!(hard_close);
    let (mut draining, mut idle_closed) = (false, false);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = drain.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle_close, if !idle_closed => {
                idle_closed = true;
                let reason = if activity.served.load(Ordering::Relaxed) {
                    "idle-timeout"
                } else {
                    "header-timeout"
                };
                metrics.refused("listener", reason);
                tracing::debug!(caller = ?addr, reason, "closing an idle HTTP/2 caller connection with GOAWAY");
                // The grace runs from the GOAWAY.
                activity.stamp_idle();
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut hard_close, if idle_closed => break Ok(()),
        }
    };
    if let Err(e) = result {
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            metrics.refused("listener", "header-timeout");
        }
        tracing::debug!(error = %e, timed_out, "outbound HTTP connection ended with an error");
    }
}

/// What a caller connection has spoken and has in flight, for [`idle`].
#[derive(Debug)]
struct Activity {
    /// [`UNKNOWN`], [`HTTP2`] or [`HTTP1`], from the first bytes.
    protocol: AtomicU8,
    /// Requests whose response has not ended (and CONNECT tunnels).
    in_flight: AtomicUsize,
    /// When `in_flight` last fell to 0: nanoseconds since `start`.
    idle_since: AtomicU64,
    /// Whether any request arrived.
    served: AtomicBool,
    start: Instant,
}

const UNKNOWN: u8 = 0;
const HTTP2: u8 = 1;
const HTTP1: u8 = 2;

impl Activity {
    fn new() -> Self {
        Activity {
            protocol: AtomicU8::new(UNKNOWN),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            served: AtomicBool::new(false),
            start: Instant::now(),
        }
    }

    /// Marks now as the start of an idle period (if nothing is in flight).
    fn stamp_idle(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.fetch_max(nanos, Ordering::AcqRel);
    }

    fn idle_since(&self) -> Instant {
        self.start + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }
}

/// One request in flight on a caller connection; clones count too.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.served.store(true, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Clone for InFlight {
    fn clone(&self) -> Self {
        InFlight::new(&self.0)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamp, then leave: whoever sees in_flight at 0 sees the stamp of
        // the last request to end (or a later one).
        self.0.stamp_idle();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once the connection has had nothing in flight for `timeout`,
/// while it speaks HTTP/2 or has not yet said what it speaks. Never for
/// HTTP/1, which hyper's header-read timer bounds. A timer per connection,
/// re-armed at most once per `timeout` while requests are in flight;
/// nothing per request but two atomics and a clock read.
async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        if activity.protocol.load(Ordering::Relaxed) == HTTP1 {
            return std::future::pending().await;
        }
        let now = Instant::now();
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep_until((now + timeout).into()).await;
            continue;
        }
        let deadline = activity.idle_since() + timeout;
        if deadline <= now {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// A response body that keeps its request counted in flight until it ends.
struct Held {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl Held {
    fn boxed(body: ProxyBody, in_flight: InFlight) -> ProxyBody {
        http_body_util::BodyExt::boxed_unsync(Held {
            body,
            _in_flight: in_flight,
        })
    }
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The caller connection's bytes, with a look at the first ones: the
/// HTTP/2 preface or not.
struct Sniff<I> {
    io: I,
    /// Whether the bytes open with the HTTP/2 preface.
    preface: detect::Preface,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Sniff<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if !this.preface.decided() {
            let protocol = match this.preface.feed(&buf.filled()[before..]) {
                Some(detect::PrefaceIs::H2) => HTTP2,
                Some(detect::PrefaceIs::Other) => HTTP1,
                None => UNKNOWN,
            };
            if protocol != UNKNOWN {
                this.activity.protocol.store(protocol, Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Sniff<I> {
    crate::delegate_async_write!(io);
}

/// Serves a port mapping: every connection to `listener` is TCP to
/// `host:port`, with no protocol detection (server-first protocols work).
/// Its connections count against the caller-connection `limit` shared
/// with the outbound listener.
///
/// Drains as the outbound listener does: once `stop` turns true it stops
/// accepting (the listener is closed, so new callers are refused) and
/// waits for its open connections to end, at most `drain`. Opaque TCP has
/// no way to ask a caller to close, so they are only waited for.
pub async fn serve_mapped(
    state: Arc<Gateway>,
    listener: TcpListener,
    limit: ConnectionLimit,
    host: String,
    port: u16,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    // Each connection holds a receiver; `closed` resolves once all are gone.
    let (open, _) = watch::channel(());
    let mut acceptor = Acceptor::new(listener, limit, "listener", "port mapping");
    loop {
        let (stream, _, admitted) = tokio::select! {
            accepted = acceptor.accept(&state.metrics) => accepted,
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let (state, host, held) = (state.clone(), host.clone(), open.subscribe());
        tokio::spawn(async move {
            let _admitted = admitted;
            let _held = held;
            if let Some(route) = route_tcp_or_close(&state, &host, port, "default") {
                tcp_proxy(state, route, TcpOrigin::default(), stream).await
            }
        });
    }
    drop(acceptor);
    if tokio::time::timeout(drain, open.closed()).await.is_err() {
        tracing::warn!(
            ?drain,
            %host,
            port,
            "port-mapped connections still open at the drain deadline"
        );
    }
}

async fn handle_connection(
    state: Arc<Gateway>,
    stream: TcpStream,
    caller: Caller,
    watcher: Watcher,
) {
    // Each protocol's state is boxed once the first bytes name it, so a
    // connection that has sent nothing holds only detection's (~1 KiB).
    match detect(&stream).await {
        Detected::Http => Box::pin(serve_http(state, caller, stream, watcher)).await,
        Detected::Tls { sni: Some(host) } => {
            // TLS passthrough: the caller talks TLS to the service itself.
            if let Some(route) = route_tcp_or_close(&state, &host, 443, &caller.namespace) {
                let origin = TcpOrigin {
                    caller: None,
                    sni: Some(host),
                };
                Box::pin(tcp_proxy(state, route, origin, stream)).await;
            }
        }
        Detected::Tls { sni: None } => {
            state.metrics.refused("listener", "tls-without-sni");
            tracing::info!(caller = ?caller.addr, "TLS without SNI on the outbound listener; closing (map a port for it)");
        }
        Detected::Opaque => {
            state.metrics.refused("listener", "unknown-protocol");
            tracing::info!(caller = ?caller.addr, "opaque TCP on the shared outbound port; closing (map a port for it)");
        }
    }
}

/// Handles one HTTP request from a local caller; with tracing on, as one
/// gateway hop of its trace (crate::trace).
pub async fn handle_http(
    state: Arc<Gateway>,
    caller: Arc<Caller>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(t) = state.trace.get()
        && req.method() != Method::CONNECT
        && let Some(hop) = t.outbound(&mut req)
    {
        return crate::trace::in_hop(hop, route_and_forward(state, caller, req)).await;
    }
    route_and_forward(state, caller, req).await
}

async fn route_and_forward(
    state: Arc<Gateway>,
    caller: Arc<Caller>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let _active = state.request_guard();
    // A local caller cannot vouch for a client certificate: whatever it
    // sent as XFCC is dropped before routing and authorization see it
    // (Envoy's SANITIZE). The destination sets XFCC from the verified
    // identity alone (super::xfcc).
    req.headers_mut().remove(super::XFCC);
    let grpc = is_grpc(req.headers());
    if req.method() == Method::CONNECT {
        return connect(state, caller, req).await;
    }
    let active = state.active.load_full();
    let endpoints = state.endpoints.borrow().clone();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let info = RequestInfo {
        method: req.method(),
        uri: req.uri(),
        authority: &authority,
        headers: req.headers(),
        scheme: "http",
        caller_namespace: &caller.namespace,
    };
    // The caller, for sourceNamespace and sourceLabels matches.
    let source_namespace = caller.id.as_ref().map(|_| caller.namespace.as_str());
    let labels = caller
        .addr
        .filter(|_| active.uses_source_labels())
        .and_then(|a| route::source_labels(&endpoints, a.ip(), source_namespace));
    let source = route::Source {
        namespace: source_namespace,
        labels: labels.as_ref(),
    };
    let Some(mut target) = route::http_target_from(&active, &info, &source, &endpoints, 80) else {
        let r = TryError::refused(
            Refusal::NoRoute,
            format!("no service or route for `{authority}`"),
        )
        .respond(grpc);
        record(&state, &r, "", "", start, grpc);
        return r;
    };
    crate::trace::route(&target, &active);
    let (mtls, t) = (caller.id.is_some(), &target);
    if let Err(r) = crate::peer_auth::admit(&state, &active, mtls, &t.service, &t.selector, t.port)
    {
        let r = r.response(grpc);
        record(&state, &r, &target.service, "", start, grpc);
        return r;
    }
    let remote = state.tunnel.announcements();
    let Some(cluster) = route::choose_cluster(
        &mut target,
        &active,
        &state.cluster,
        &endpoints,
        &remote,
        &[],
    ) else {
        let r = TryError::refused(
            Refusal::NoHealthyEndpoint,
            format!(
                "no cluster has a healthy endpoint for {}{}",
                target.service,
                subset_note(&target)
            ),
        )
        .respond(grpc);
        record(&state, &r, &target.service, "", start, grpc);
        return r;
    };
    let rule = target.http_rule(&active);
    // Fault injection, as Istio's: a delay, then maybe an abort, each for
    // its percentage of requests.
    if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
        if let Some(d) = fault.delay.as_ref().filter(|d| hit(d.percent_ppm)) {
            tokio::time::sleep(Duration::from_millis(d.delay_ms)).await;
        }
        if let Some(a) = fault.abort.as_ref().filter(|a| hit(a.percent_ppm)) {
            let r = fault_response(&a.status, grpc);
            record(&state, &r, &target.service, &cluster, start, grpc);
            return r;
        }
    }
    // A VirtualService rule's retries; without one, Istio's defaults.
    let retries = match rule {
        Some(r) => Some(&r.retries).filter(|r| r.attempts > 0),
        None => Some(&*DEFAULT_RETRIES),
    };
    let mirrors: Vec<&meshfed_policy::snapshot::Mirror> = rule
        .map(|r| r.mirrors.iter().filter(|m| hit(m.percent_ppm)).collect())
        .unwrap_or_default();
    let (mut parts, body) = req.into_parts();
    let mut authority = authority;
    if let Some(r) = rule {
        rules::apply_headers(&mut parts.headers, &r.request_headers);
        let before = authority.clone();
        rules::rewrite(r, &mut parts.uri, &mut authority);
        if authority != before {
            rules::set_authority(&mut parts.uri, &mut parts.headers, &authority);
        }
    }
    // A request can be sent again only if its whole body is known: bodiless
    // ones, and, when retries are configured, bodies that declare at most
    // RETRY_BUFFER bytes, which are buffered (as Envoy buffers for retries).
    // Bigger or unsized bodies stream and are not retried.
    let small = http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|n| n <= RETRY_BUFFER as u64);
    let (body, buffered): (ProxyBody, Option<bytes::Bytes>) = if retries.is_none()
        && mirrors.is_empty()
    {
        (body.map_err(Into::into).boxed_unsync(), None)
    } else if http_body::Body::is_end_stream(&body) {
        (body::empty(), Some(bytes::Bytes::new()))
    } else if small {
        match http_body_util::Limited::new(body, RETRY_BUFFER)
            .collect()
            .await
        {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                (body::full(bytes.clone()), Some(bytes))
            }
            Err(e) => {
                let fault = body::CallerFault::of(&*e);
                let r = super::caller_fault_response(fault, &format!("request body: {e}"), grpc);
                record(&state, &r, &target.service, &cluster, start, grpc);
                return r;
            }
        }
    } else {
        (body.map_err(Into::into).boxed_unsync(), None)
    };
    if !mirrors.is_empty() {
        let copy = clone_head(&parts);
        for m in mirrors {
            rules::spawn_mirror(
                &state,
                &active,
                &caller,
                m,
                &copy,
                buffered.clone(),
                &authority,
                target.port,
            );
        }
    }
    let destination = target.weighted_destination(&active);
    if let Some(d) = destination {
        rules::apply_headers(&mut parts.headers, &d.request_headers);
    }
    let head = buffered
        .filter(|_| retries.is_some())
        .map(|b| (clone_head(&parts), b));
    // A bodiless idempotent request whose link dies before its answer may
    // be replayed once in another cluster, policy or not (a link_died
    // TryError).
    let replay_head = (is_idempotent(&parts.method) && http_body::Body::is_end_stream(&body))
        .then(|| clone_head(&parts));
    let mut replayed = false;
    let mut req = Some(Request::from_parts(parts, body));
    let per_try = retries
        .and_then(|r| r.per_try_timeout_ms)
        .map(Duration::from_millis);
    let original = target.clone();
    let first_cluster = cluster.clone();
    let mut cluster = cluster;
    // Clusters a try failed on for want of a working path (a dead link, no
    // endpoint, a refused connection): retries go elsewhere when they can,
    // as Istio's default `previous_hosts` retry predicate does per host.
    let mut failed: Vec<String> = Vec::new();
    // The same within this cluster, per endpoint.
    let mut failed_endpoints: Vec<SocketAddr> = Vec::new();
    let forward = async {
        let mut attempt: u32 = 0;
        // The budget slot of the retry in flight, held until it is answered.
        let mut _retry_slot = None;
        loop {
            let Some(this) = req.take() else {
                break (
                    Err(TryError::refused(Refusal::Internal, "no request to send")),
                    cluster,
                );
            };
            let once = async {
                if cluster == state.cluster {
                    forward_local(
                        &state,
                        &active,
                        caller.id.as_deref(),
                        &target,
                        &endpoints,
                        this,
                        grpc,
                        &mut failed_endpoints,
                    )
                    .await
                } else {
                    forward_remote(
                        &state, &active, &caller, &cluster, &target, &authority, this,
                    )
                    .await
                }
            };
            let tried = match per_try {
                Some(d) => tokio::time::timeout(d, once).await.unwrap_or_else(|_| {
                    Err(TryError::refused(Refusal::Timeout, "per-try timeout"))
                }),
                None => once.await,
            };
            let seen = Seen::of(&tried, grpc);
            // A peer killed under load: calls on its link fail until the
            // link is declared dead (under a second). A bodiless idempotent
            // one that died with its link, and that no retry policy would
            // try again, goes once to the next cluster that can serve it
            // (within the route timeout, which bounds this whole loop).
            let policy_retries = retries.is_some_and(|p| {
                head.is_some() && attempt < p.attempts && seen.retriable(&p.retry_on)
            });
            if !replayed
                && !policy_retries
                && let Some(h) = replay_head.as_ref()
                && seen.link_died
            {
                if !failed.contains(&cluster) {
                    failed.push(cluster.clone());
                }
                let mut again = original.clone();
                let endpoints = state.endpoints.borrow().clone();
                let remote = state.tunnel.announcements();
                if let Some(next) = route::choose_cluster(
                    &mut again,
                    &active,
                    &state.cluster,
                    &endpoints,
                    &remote,
                    &failed,
                ) {
                    replayed = true;
                    crate::trace::retry();
                    state.metrics.retried(&target.service, "link-died".into());
                    target = again;
                    cluster = next;
                    req = Some(rebuild(h, bytes::Bytes::new()));
                    continue;
                }
            }
            let (Some(policy), Some(head)) = (retries, head.as_ref()) else {
                break (tried, cluster);
            };
            if attempt >= policy.attempts || !seen.retriable(&policy.retry_on) {
                if seen.status >= 500 {
                    tracing::debug!(
                        status = seen.status,
                        reason = seen.label(),
                        attempt,
                        "not retried"
                    );
                }
                break (tried, cluster);
            }
            attempt += 1;
            crate::trace::retry();
            // Envoy's backoff: 25 ms base, doubling, with full jitter.
            let backoff = Duration::from_millis(25u64 << (attempt - 1).min(3))
                .mul_f64(rand::random_range(0.0..=1.0));
            tokio::time::sleep(backoff).await;
            // The budget counts retries in flight, not those backing off.
            _retry_slot = None;
            let broken = seen.path_failed();
            if broken && !failed.contains(&cluster) {
                failed.push(cluster.clone());
            }
            // Choose again on the state of now: a link that died, or
            // endpoints that were ejected, since the last try.
            let mut again = original.clone();
            let endpoints = state.endpoints.borrow().clone();
            let remote = state.tunnel.announcements();
            let next = route::choose_cluster(
                &mut again,
                &active,
                &state.cluster,
                &endpoints,
                &remote,
                &failed,
            );
            // The budget keeps retries from multiplying the load on what
            // fails. A retry that leaves a broken path for another cluster
            // adds nothing there (the call moves, as it would have if the
            // failure had been known), so it needs no slot: when a peer
            // dies, every call in flight to it fails over, not only 20%.
            let moves = seen.exempt_move(&head.0.0) && next.as_ref().is_some_and(|c| *c != cluster);
            if !moves {
                let Some(slot) = state.retry_budget() else {
                    state.metrics.refused("retry", "budget-exhausted");
                    break (tried, cluster);
                };
                _retry_slot = Some(slot);
            }
            state.metrics.retried(&target.service, seen.label());
            if let Some(c) = next {
                target = again;
                cluster = c;
            }
            req = Some(rebuild(&head.0, head.1.clone()));
        }
    };
    // The route timeout bounds the wait for the response head (Istio's
    // `timeout`); a streaming body may go on after it.
    let service = original.service.clone();
    let (tried, cluster) = match rule.and_then(|r| r.timeout_ms) {
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), forward).await {
            Ok(r) => r,
            Err(_) => (
                Err(TryError::refused(
                    Refusal::Timeout,
                    format!("{service} did not answer within the route timeout of {ms} ms"),
                )),
                first_cluster,
            ),
        },
        None => forward.await,
    };
    let mut resp = tried.unwrap_or_else(|e| e.respond(grpc));
    if let Some(r) = rule {
        rules::apply_headers(resp.headers_mut(), &r.response_headers);
    }
    if let Some(d) = destination {
        rules::apply_headers(resp.headers_mut(), &d.response_headers);
    }
    record(&state, &resp, &service, &cluster, start, grpc);
    resp
}

/// How one try of a request ended without an answer from a backend: the
/// outbound execution's one error type. Retry decisions read it through
/// [`Seen`]; [`TryError::respond`] is the one place it becomes the caller's
/// response (status and `x-meshfed-error`).
#[derive(Debug)]
pub(super) enum TryError {
    /// Refused or failed by this gateway, or by the destination gateway in
    /// an ERROR frame. `link_died`: a request to another cluster that never
    /// reached a peer's answer because the link failed (it died, or no link
    /// was left to open a stream on), after any replay on another link of
    /// that cluster; a bodiless idempotent request may then go to another
    /// cluster.
    Refused {
        refusal: Refusal,
        message: String,
        link_died: bool,
    },
    /// A local endpoint failed or overflowed (proxy::upstream), or the
    /// caller failed its own body on the way there.
    Upstream(super::upstream::UpstreamError),
    /// An answer a gateway made itself, passed on as it is: the destination
    /// gateway's own response (its pool's overflow 503 carries headers an
    /// ERROR frame cannot), or this gateway's authorization denial.
    Made(Box<Response<ProxyBody>>),
}

impl TryError {
    fn refused(refusal: Refusal, message: impl Into<String>) -> Self {
        TryError::Refused {
            refusal,
            message: message.into(),
            link_died: false,
        }
    }

    fn link_died(refusal: Refusal, message: impl Into<String>) -> Self {
        TryError::Refused {
            refusal,
            message: message.into(),
            link_died: true,
        }
    }

    /// The response for the caller.
    pub(super) fn respond(self, grpc: bool) -> Response<ProxyBody> {
        match self {
            TryError::Refused {
                refusal, message, ..
            } => error_response(refusal, &message, grpc),
            TryError::Upstream(e) => e.response(grpc),
            TryError::Made(r) => *r,
        }
    }
}

/// One try's outcome: a backend's answer, or why there is none.
pub(super) type Tried = Result<Response<ProxyBody>, TryError>;

/// What the retry policy looks at in a try's outcome: what the caller would
/// see (a gRPC caller gets a gateway's refusal as HTTP 200 with a
/// `grpc-status`) and the gateway's reason, from the type for this gateway's
/// errors. A backend's answer and a destination gateway's own response are
/// read from their headers (a backend's `x-meshfed-error` is removed where
/// responses leave an endpoint, so only a gateway's reaches this).
#[derive(Debug)]
struct Seen<'a> {
    status: u16,
    /// The gateway's reason, when a gateway made the answer.
    refusal: Option<Refusal>,
    /// The gateway's reason token when it is not a [`Refusal`]'s (a caller
    /// fault's `source-cancelled`), or a destination gateway's header.
    token: Option<&'a str>,
    grpc_status: Option<u8>,
    /// A gateway's (or a backend's) own overflow: never retried.
    overloaded: bool,
    link_died: bool,
}

impl<'a> Seen<'a> {
    fn of(tried: &'a Tried, grpc: bool) -> Self {
        use super::upstream::UpstreamError;
        let refused = |refusal: Refusal, overloaded: bool, link_died: bool| {
            let http = refusal.http_status();
            Seen {
                status: if grpc { 200 } else { http.as_u16() },
                refusal: Some(refusal),
                token: None,
                grpc_status: grpc.then(|| super::grpc_status_for(http)),
                overloaded,
                link_died,
            }
        };
        match tried {
            Ok(resp) => Seen::read(resp, None),
            Err(TryError::Made(resp)) => {
                let token = gateway_reason(resp);
                Seen::read(resp, Some(token))
            }
            Err(TryError::Refused {
                refusal, link_died, ..
            }) => refused(*refusal, false, *link_died),
            Err(TryError::Upstream(UpstreamError::Overflow { .. })) => {
                refused(Refusal::Overloaded, true, false)
            }
            Err(TryError::Upstream(UpstreamError::Caller { fault, .. })) => {
                // As super::caller_fault_response answers it.
                let aborted = *fault == body::CallerFault::Aborted;
                let http = StatusCode::BAD_REQUEST;
                Seen {
                    status: match (grpc, aborted) {
                        (true, _) => 200,
                        (false, true) => fault.status().as_u16(),
                        (false, false) => http.as_u16(),
                    },
                    refusal: (!aborted).then_some(Refusal::BadRequest),
                    token: aborted.then(|| fault.reason()),
                    grpc_status: grpc.then(|| {
                        if aborted {
                            1
                        } else {
                            super::grpc_status_for(http)
                        }
                    }),
                    overloaded: false,
                    link_died: false,
                }
            }
            Err(TryError::Upstream(e)) => refused(e.refusal(), false, false),
        }
    }

    /// A response's own view; `token`: the gateway reason it carries.
    fn read(resp: &'a Response<ProxyBody>, token: Option<&'a str>) -> Self {
        let token = token.filter(|t| !t.is_empty());
        Seen {
            status: resp.status().as_u16(),
            refusal: token.and_then(refusal_named),
            token,
            grpc_status: resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            overloaded: resp.headers().contains_key("x-envoy-overloaded"),
            link_died: false,
        }
    }

    /// The gateway's reason token, "" for a backend's answer.
    fn reason(&self) -> &str {
        self.refusal
            .map(Refusal::reason)
            .or(self.token)
            .unwrap_or("")
    }

    /// The label a retry is counted under: the gateway's reason, else the
    /// status.
    fn label(&self) -> String {
        match self.reason() {
            "" => self.status.to_string(),
            r => r.to_string(),
        }
    }

    /// Whether the failed try says the path to its cluster is broken
    /// (rather than the service answering badly), so that a retry should go
    /// elsewhere.
    fn path_failed(&self) -> bool {
        matches!(
            self.refusal,
            Some(
                Refusal::ConnectFailed
                    | Refusal::NoHealthyEndpoint
                    | Refusal::UpstreamReset
                    | Refusal::Timeout
                    | Refusal::StaleConfig
            )
        )
    }

    /// Whether a retry that moves to another cluster may skip the retry
    /// budget: only when the failed try cannot have reached a backend (no
    /// connection, no endpoint, a refusal for stale config), or when it died
    /// with its link and repeating it is harmless (an idempotent method). A
    /// per-try timeout never qualifies: the slow try may still be running.
    fn exempt_move(&self, method: &Method) -> bool {
        match self.refusal {
            Some(Refusal::ConnectFailed | Refusal::NoHealthyEndpoint | Refusal::StaleConfig) => {
                true
            }
            Some(Refusal::UpstreamReset) => matches!(
                *method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
            ),
            _ => false,
        }
    }

    /// Whether the try is worth another under Istio's `retryOn`.
    fn retriable(&self, retry_on: &[String]) -> bool {
        // A 503 a gateway gave for its own overflow is not retried (as
        // Envoy): retrying would only add to the overload.
        if self.overloaded {
            return false;
        }
        let (status, refusal, grpc) = (self.status, self.refusal, self.grpc_status);
        retry_on.iter().any(|cond| match cond.as_str() {
            "5xx" => status >= 500,
            "gateway-error" => matches!(status, 502..=504),
            "reset" => refusal == Some(Refusal::UpstreamReset),
            "connect-failure" => refusal == Some(Refusal::ConnectFailed),
            "refused-stream" => refusal == Some(Refusal::StaleConfig),
            "retriable-4xx" => status == 409,
            "retriable-status-codes" => false,
            "cancelled" => grpc == Some(1),
            "deadline-exceeded" => grpc == Some(4),
            "resource-exhausted" => grpc == Some(8),
            "internal" => grpc == Some(13),
            "unavailable" => grpc == Some(14),
            code => code.parse::<u16>().is_ok_and(|c| c == status),
        })
    }
}

/// The refusal whose token is `token`.
fn refusal_named(token: &str) -> Option<Refusal> {
    (1..=11)
        .map(Refusal::from_code)
        .find(|r| r.reason() == token)
}

/// Methods that are safe to send twice (RFC 9110 §9.2.2) and that a
/// bodiless request uses.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The gateway's own reason for an answer it made (the error header; a
/// backend's copy of that header is removed where responses enter a
/// gateway), or "" for an answer from a backend.
fn gateway_reason(resp: &Response<ProxyBody>) -> &str {
    resp.headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The head of a request, to send it again.
fn clone_head(parts: &http::request::Parts) -> (Method, Uri, http::Version, http::HeaderMap) {
    (
        parts.method.clone(),
        parts.uri.clone(),
        parts.version,
        parts.headers.clone(),
    )
}

/// Retries for calls no VirtualService rule routed.
static DEFAULT_RETRIES: std::sync::LazyLock<meshfed_policy::snapshot::RetryPolicy> =
    std::sync::LazyLock::new(meshfed_policy::snapshot::RetryPolicy::istio_default);

/// Largest request body buffered so that it can be retried.
const RETRY_BUFFER: usize = 64 * 1024;

fn rebuild(
    head: &(Method, Uri, http::Version, http::HeaderMap),
    body: bytes::Bytes,
) -> Request<ProxyBody> {
    let mut r = Request::new(if body.is_empty() {
        body::empty()
    } else {
        body::full(body)
    });
    *r.method_mut() = head.0.clone();
    *r.uri_mut() = head.1.clone();
    *r.version_mut() = head.2;
    *r.headers_mut() = head.3.clone();
    r
}

/// Whether this request falls in a `percent_ppm` share.
fn hit(percent_ppm: u32) -> bool {
    percent_ppm >= meshfed_policy::snapshot::PPM
        || rand::random_range(0..meshfed_policy::snapshot::PPM) < percent_ppm
}

/// The response of an injected abort, marked as such.
fn fault_response(
    status: &meshfed_policy::snapshot::AbortStatus,
    grpc: bool,
) -> Response<ProxyBody> {
    use meshfed_policy::snapshot::AbortStatus;
    let mut b = Response::builder().header(ERROR_HEADER, "fault-injected");
    match status {
        AbortStatus::Http(code) => {
            b = b.status(*code);
            if grpc {
                b = b.header(
                    "grpc-status",
                    super::grpc_status_for(
                        StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    )
                    .to_string(),
                );
            }
        }
        AbortStatus::Grpc(code) => {
            b = b
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", code.to_string())
                .header("grpc-message", "fault%20injected");
        }
    }
    b.body(body::full(if grpc { "" } else { "fault injected\n" }))
        .unwrap_or_else(|_| Response::new(body::empty()))
}

fn subset_note(t: &Target) -> String {
    t.subset
        .as_ref()
        .map(|s| format!(" (subset {s})"))
        .unwrap_or_default()
}

fn record(
    state: &Gateway,
    resp: &Response<ProxyBody>,
    service: &str,
    cluster: &str,
    start: Instant,
    grpc: bool,
) {
    let reason = gateway_reason(resp).to_string();
    let grpc_status = if grpc {
        resp.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    } else {
        String::new()
    };
    crate::trace::response(resp.status().as_u16(), &reason, &grpc_status, Some(cluster));
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            direction: "outbound",
            source_cluster: state.cluster.clone(),
            destination_cluster: cluster.to_string(),
            destination_service: service.to_string(),
            response_code: resp.status().as_u16(),
            grpc_response_status: grpc_status,
            reason,
        })
        .inc();
    state
        .metrics
        .request_duration
        .get_or_create(&DurationLabels {
            direction: "outbound",
            destination_cluster: cluster.to_string(),
        })
        .observe(start.elapsed().as_secs_f64());
}

/// Sends a request to an endpoint in this cluster. This gateway is then also
/// the call's destination gateway, so AuthorizationPolicy is enforced here,
/// on every try (a retry or a mirrored copy that lands here included).
/// Endpoints in `failed` are passed over while another is left; one that
/// this try cannot connect to, or that resets it, is added.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward_local(
    state: &Gateway,
    active: &crate::route::Active,
    caller: Option<&str>,
    target: &Target,
    endpoints: &crate::discovery::EndpointSet,
    mut req: Request<ProxyBody>,
    grpc: bool,
    failed: &mut Vec<SocketAddr>,
) -> Tried {
    if let Some(v) = caller.and_then(|c| super::xfcc(state, active, c)) {
        req.headers_mut().insert(super::XFCC, v);
    }
    let req = match crate::authz::enforce_local(
        state,
        active,
        caller,
        &target.service,
        &target.selector,
        req,
    ) {
        Ok(req) => req,
        Err(denied) => return Err(TryError::Made(Box::new(denied))),
    };
    // Endpoint-level policy (DestinationRule) applies here (proxy::upstream).
    let dest = super::upstream::Dest {
        service: &target.service,
        subset: target.subset.as_deref(),
        port: target.port,
        selector: &target.selector,
    };
    let Some(picked) = state
        .upstream
        .choose_avoiding(active, endpoints, &dest, failed)
    else {
        return Err(TryError::refused(
            Refusal::NoHealthyEndpoint,
            format!("no healthy local endpoint for {}", target.service),
        ));
    };
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    strip_hop_by_hop(&mut parts.headers);
    if let Some(a) = authority.and_then(|a| a.parse().ok()) {
        parts.headers.insert(header::HOST, a);
    }
    // The endpoint's protocol, not the caller's (an HTTP/2 caller of an
    // HTTP/1.1 service is translated, as on the peer path).
    let h2 = super::upstream::speaks_h2(active, &target.service, target.port, grpc);
    let req = Request::from_parts(parts, body);
    let addr = picked.addr;
    match state.upstream.send(picked, req, h2).await {
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        }
        Err(e) => {
            if matches!(
                e,
                super::upstream::UpstreamError::Connect { .. }
                    | super::upstream::UpstreamError::Reset { .. }
            ) && !failed.contains(&addr)
            {
                failed.push(addr);
            }
            Err(TryError::Upstream(e))
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn forward_remote(
    state: &Gateway,
    active: &crate::route::Active,
    caller: &Caller,
    cluster: &str,
    target: &Target,
    authority: &str,
    req: Request<ProxyBody>,
) -> Tried {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let replayable = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
        && http_body::Body::is_end_stream(&body);
    let open = Open {
        kind: StreamKind::Http,
        service: target.service.clone(),
        port: target.port,
        subset: target.subset.clone(),
        subset_labels: target
            .selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        caller: caller.id.clone(),
        source_version: Some(active.version().to_string()),
        sni: None,
        http: Some(RequestHead {
            method: parts.method.clone(),
            scheme: "http".into(),
            authority: authority.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers: parts.headers.clone(),
        }),
    };
    // A link that fails before the request left is skipped for the next.
    let mut tried = Vec::new();
    let (mut send, mut recv, guard) = loop {
        let Some(link) = state
            .tunnel
            .links_to(cluster)
            .into_iter()
            .filter(|l| l.available(state.tunnel.settings().announce_stale))
            .filter(|l| !tried.contains(&l.target))
            .min_by_key(|l| l.open_streams())
        else {
            return Err(TryError::link_died(
                Refusal::NoHealthyEndpoint,
                format!(
                    "no available link to cluster `{cluster}` (tried {})",
                    tried.len()
                ),
            ));
        };
        tried.push(link.target.clone());
        match open_stream(&link).await {
            Ok((mut send, recv, guard)) => {
                match write_frame(&mut send, &Frame::Open(Box::new(open.clone()))).await {
                    Ok(()) => break (send, recv, guard),
                    Err(body::WriteFrameError::Encode(e)) => {
                        let _ = send.reset(quinn::VarInt::from_u32(0));
                        return Err(TryError::refused(
                            Refusal::BadRequest,
                            format!("request head too large to forward: {e}"),
                        ));
                    }
                    Err(body::WriteFrameError::Write(e)) => {
                        tracing::debug!(cluster, error = %e, "link failed while opening; trying another");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(cluster, target = %link.target, error = %e, "link failed; trying another")
            }
        }
    };
    tokio::spawn(async move {
        if let Err(e) = body::pump_request(body, &mut send).await {
            tracing::debug!(error = %e, "request body to peer failed");
        }
    });
    let head = read_head(&mut recv).await;
    // A link that died before answering (a peer killed, not yet detected):
    // a bodiless idempotent request is replayed on another link once, so
    // callers do not see the failover. With no other link, the answer is
    // a link_died TryError, and route_and_forward may replay it in another
    // cluster.
    if head.is_err()
        && replayable
        && tried.len() < 2
        && let Some(link) = state
            .tunnel
            .links_to(cluster)
            .into_iter()
            .filter(|l| l.available(state.tunnel.settings().announce_stale))
            .find(|l| !tried.contains(&l.target))
        && let Ok((mut send2, mut recv2, guard2)) = open_stream(&link).await
        && write_frame(&mut send2, &Frame::Open(Box::new(open.clone())))
            .await
            .is_ok()
        && send2.finish().is_ok()
    {
        return remote_response(cluster, read_head(&mut recv2).await, recv2, guard2);
    }
    remote_response(cluster, head, recv, guard)
}

/// How long opening a stream on a link may take. A link that is up but
/// whose peer grants no stream credit (every stream slot busy) would
/// otherwise hold the call forever; past this the link counts as failed and
/// the call moves on (another link, or a retry elsewhere).
const OPEN_TIMEOUT: Duration = Duration::from_secs(1);

async fn open_stream(
    link: &Arc<crate::tunnel::link::Link>,
) -> Result<
    (
        quinn::SendStream,
        quinn::RecvStream,
        crate::tunnel::link::StreamGuard,
    ),
    String,
> {
    match tokio::time::timeout(OPEN_TIMEOUT, link.open()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no stream credit within {OPEN_TIMEOUT:?}")),
    }
}

fn remote_response(
    cluster: &str,
    head: Result<(Frame, bytes::BytesMut), body::BodyError>,
    recv: quinn::RecvStream,
    guard: crate::tunnel::link::StreamGuard,
) -> Tried {
    match head {
        Ok((Frame::Response(head), rest)) => {
            let mut b = Response::builder().status(head.status);
            if let Some(h) = b.headers_mut() {
                *h = head.headers;
            }
            let body = TunnelBody::new(recv, rest, Some(guard))
                .map_err(Into::into)
                .boxed_unsync();
            let resp = b
                .body(body)
                .map_err(|_| TryError::refused(Refusal::Internal, "bad response head"))?;
            // The destination gateway's own answer names its reason (a
            // backend's copy of the header was removed there).
            if resp.headers().contains_key(ERROR_HEADER) {
                Err(TryError::Made(Box::new(resp)))
            } else {
                Ok(resp)
            }
        }
        Ok((Frame::Error(e), _)) => Err(TryError::refused(
            e.refusal,
            format!("gateway of `{cluster}`: {}", e.message),
        )),
        Ok((_, _)) => Err(TryError::refused(
            Refusal::Internal,
            format!("gateway of `{cluster}` answered out of protocol"),
        )),
        Err(e) => Err(TryError::link_died(
            Refusal::UpstreamReset,
            format!("gateway of `{cluster}`: {e}"),
        )),
    }
}

/// `CONNECT host:port`: a TCP tunnel.
async fn connect(
    state: Arc<Gateway>,
    caller: Arc<Caller>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    // An HTTP/2 caller connection counts the tunnel in flight while it
    // lasts (serve_http's idle bound).
    let in_flight = req.extensions_mut().remove::<InFlight>();
    let Some(authority) = req.uri().authority().cloned() else {
        return error_response(Refusal::BadRequest, "CONNECT needs host:port", false);
    };
    let (host, port) = route::split_authority(authority.as_str(), 443);
    // Route before answering, so the caller sees a refusal as a status.
    let mtls = caller.id.is_some();
    let route = match TcpRoute::new(&state, host, port, &caller.namespace, mtls) {
        Ok(r) => r,
        Err(TcpRefused::NoRoute) => {
            return error_response(Refusal::NoRoute, &format!("no service `{host}`"), false);
        }
        Err(TcpRefused::PeerAuth(r)) => return r.response(false),
    };
    tokio::spawn(async move {
        let _in_flight = in_flight;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                // A caller that came in over mutual TLS keeps its identity
                // for the destination's authorization, as HTTP does.
                let origin = TcpOrigin {
                    caller: caller.id.clone(),
                    sni: None,
                };
                tcp_proxy(state, route, origin, TokioIo::new(upgraded)).await
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .body(body::empty())
        .unwrap_or_else(|_| Response::new(body::empty()))
}

/// What the listener knows of a TCP caller, for authorization where the
/// endpoints are.
#[derive(Debug, Clone, Default)]
pub struct TcpOrigin {
    /// The caller's SPIFFE ID, when it came in over mutual TLS (a CONNECT
    /// inside it); it travels in the OPEN frame as HTTP callers' does.
    pub caller: Option<String>,
    /// The server name of the caller's TLS ClientHello, when the stream was
    /// routed by SNI (`connection.sni`).
    pub sni: Option<String>,
}

/// A TCP stream's route, decided once, from one snapshot and one view of
/// the endpoints: the PeerAuthentication check, the cluster, authorization
/// and the endpoint all use the same (a config swap in between cannot admit
/// a caller for one destination and send it to another).
pub struct TcpRoute {
    active: Arc<route::Active>,
    endpoints: Arc<crate::discovery::EndpointSet>,
    target: Target,
    host: String,
}

/// Why a TCP stream has no route.
#[derive(Debug)]
pub enum TcpRefused {
    /// No service or TCP route for the host (not counted here).
    NoRoute,
    /// PeerAuthentication refused the caller (counted and logged).
    PeerAuth(crate::peer_auth::Refused),
}

impl std::fmt::Debug for TcpRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRoute")
            .field("host", &self.host)
            .field("target", &self.target)
            .field("config", &self.active.version())
            .finish_non_exhaustive()
    }
}

impl TcpRoute {
    /// Routes a stream for `host:port` from a caller in `ns` (`mtls`: it
    /// came in over mutual TLS) and applies PeerAuthentication.
    pub fn new(
        state: &Gateway,
        host: &str,
        port: u16,
        ns: &str,
        mtls: bool,
    ) -> Result<Self, TcpRefused> {
        let active = state.active.load_full();
        let endpoints = state.endpoints.borrow().clone();
        let target =
            route::tcp_target(&active, host, port, ns, &endpoints).ok_or(TcpRefused::NoRoute)?;
        let t = &target;
        crate::peer_auth::admit(state, &active, mtls, &t.service, &t.selector, t.port)
            .map_err(TcpRefused::PeerAuth)?;
        Ok(TcpRoute {
            active,
            endpoints,
            target,
            host: host.to_string(),
        })
    }
}

/// [`TcpRoute::new`] for a plaintext TCP caller (TLS passthrough by SNI, a
/// port mapping), which can only be closed: `None`, counted and logged,
/// when there is no route or PeerAuthentication refuses it.
fn route_tcp_or_close(state: &Gateway, host: &str, port: u16, ns: &str) -> Option<TcpRoute> {
    match TcpRoute::new(state, host, port, ns, false) {
        Ok(r) => Some(r),
        Err(TcpRefused::NoRoute) => {
            state.metrics.refused("listener", "no-route");
            tracing::info!(%host, port, "no TCP route; closing");
            None
        }
        Err(TcpRefused::PeerAuth(_)) => None,
    }
}

/// Proxies a routed TCP connection, locally or over the tunnel; `origin`'s
/// identity and SNI reach the destination's authorization.
pub async fn tcp_proxy<S>(
    state: Arc<Gateway>,
    mut route: TcpRoute,
    origin: TcpOrigin,
    mut client: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Borrowed, not moved out: an async fn keeps its arguments in the
    // future, so moved-out fields would be stored twice for as long as the
    // stream is open (docs/benchmarks.md: RSS per open stream).
    let TcpRoute {
        active,
        endpoints,
        target,
        host,
    } = &mut route;
    let remote = state.tunnel.announcements();
    let Some(cluster) =
        route::choose_cluster(target, active, &state.cluster, endpoints, &remote, &[])
    else {
        state.metrics.refused("listener", "no-healthy-endpoint");
        return;
    };
    if cluster == state.cluster
        && !crate::authz::admit_local_tcp(
            &state,
            active,
            &target.service,
            &target.selector,
            origin.caller.as_deref(),
            origin.sni.as_deref(),
        )
    {
        return;
    }
    let labels = TcpLabels {
        direction: "outbound",
        destination_service: target.service.clone(),
        destination_cluster: cluster.clone(),
    };
    state.metrics.tcp_connections.get_or_create(&labels).inc();
    let (sent, received) = if cluster == state.cluster {
        // The one way to a local endpoint (proxy::upstream), as the inbound
        // path and HTTP go: the DestinationRule's balancer and ejections,
        // then `tcp.maxConnections` and `connectTimeout`.
        let dest = super::upstream::Dest {
            service: &target.service,
            subset: target.subset.as_deref(),
            port: target.port,
            selector: &target.selector,
        };
        let Some(picked) = state.upstream.choose(active, endpoints, &dest) else {
            state.metrics.refused("listener", "no-healthy-endpoint");
            return;
        };
        let (mut upstream, _slot) = match state.upstream.connect_tcp(picked).await {
            Ok(ok) => ok,
            Err(e) => {
                let reason = e.refusal().reason();
                state.metrics.refused("listener", reason);
                tracing::info!(%host, reason, error = %e, "TCP to a local endpoint failed; closing");
                return;
            }
        };
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((a, b)) => (a, b),
            Err(_) => (0, 0),
        }
    } else {
        let Some(link) = state.tunnel.pick(&cluster) else {
            return;
        };
        let Ok((mut send, mut recv, _guard)) = open_stream(&link).await else {
            return;
        };
        let open = Open {
            kind: StreamKind::Tcp,
            service: target.service.clone(),
            port: target.port,
            subset: target.subset.clone(),
            subset_labels: target
                .selector
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            caller: origin.caller.clone(),
            source_version: Some(active.version().to_string()),
            sni: origin.sni.clone(),
            http: None,
        };
        if write_frame(&mut send, &Frame::Open(Box::new(open)))
            .await
            .is_err()
        {
            return;
        }
        let head = tokio::time::timeout(super::HEAD_TIMEOUT, read_head(&mut recv))
            .await
            .unwrap_or_else(|_| {
                Err(body::BodyError::Read(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer to a TCP stream in time",
                )))
            });
        match head {
            Ok((Frame::Accept, rest)) => {
                if !rest.is_empty() && client.write_all(&rest).await.is_err() {
                    return;
                }
                // The head's read buffer must not live as long as the stream.
                let already = rest.len() as u64;
                drop(rest);
                super::splice::splice(client, send, recv, already).await
            }
            Ok((Frame::Error(e), _)) => {
                tracing::info!(%host, refusal = e.refusal.reason(), message = %e.message, "peer refused TCP stream");
                state.metrics.refused("stream", e.refusal.reason());
                return;
            }
            _ => return,
        }
    };
    state
        .metrics
        .tcp_sent_bytes
        .get_or_create(&labels)
        .inc_by(sent);
    state
        .metrics
        .tcp_received_bytes
        .get_or_create(&labels)
        .inc_by(received);
}
