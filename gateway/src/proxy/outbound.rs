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
//! Each HTTP request loads the active snapshot once and is planned by
//! [`super::plan`] (pure: route, cluster, fault, mirrors, retries,
//! timeouts, edits); this module then executes the plan in steps: the fault
//! ([`apply_fault`]), the rule's edits, the body kept for replay
//! ([`keep_body`]), the mirrors ([`spawn_mirror`], response drained a chunk
//! at a time), and forwarding ([`forward`]): one retry and replay layer
//! ([`retry`]) over tries that go to a local endpoint ([`forward_local`]) or
//! over a link to the chosen cluster's gateway ([`forward_remote`]). Every
//! refusal on the path, CONNECT's included, is a [`TryError`] written by
//! [`TryError::respond`] alone.
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

use super::detect::{self, Detected};
use super::plan::{self, Plan, Seen};
use super::{rules, strip_hop_by_hop};
use crate::accept::{Acceptor, ConnectionLimit};
use crate::body::{self, ProxyBody, TunnelBody, read_head, write_frame};
use crate::endpoints::EndpointSet;
use crate::metrics::{RequestKey, TcpLabels};
use crate::respond::{ERROR_HEADER, error_response, is_grpc};
use crate::route::{self, Target};
use crate::state::Gateway;
use crate::wire::frame::{Frame, Open, Refusal, RequestHead, StreamKind};
use meshfed_policy::snapshot::AbortStatus;

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
    /// The namespace of the caller's workload certificate, if it presented
    /// one.
    pub namespace: Option<String>,
    /// `--caller-namespace`: the namespace of plaintext callers whose
    /// address does not tell theirs (an edge site's operator declares it).
    pub declared_namespace: Option<Arc<str>>,
    /// The namespace the caller's address told, once it told one: a pod's
    /// address keeps its namespace for as long as the connection lasts, so
    /// the endpoints are searched once per connection, not per request (an
    /// address that told nothing is searched again: its pod may not have
    /// been listed yet).
    pub inferred_namespace: std::sync::OnceLock<Box<str>>,
}

impl Caller {
    /// The namespace `authority` resolves in, when it is a short name
    /// (one label, crate::route::is_short_name): the caller's
    /// certificate's, else the one its address has among the local
    /// endpoints (crate::route::caller_namespace), else the declared one.
    /// Never a guess: with none of these, `Err` says what to call instead.
    /// A longer name does not depend on it (the certificate's namespace, or
    /// "", is returned). `watched`: the namespaces Kubernetes discovery
    /// watches, when it watches only some (a caller elsewhere is no
    /// endpoint, and the refusal says so); read only for that refusal.
    fn namespace_for<'a>(
        &'a self,
        authority: &str,
        local: &'a EndpointSet,
        domain: &str,
        watched: &arc_swap::ArcSwapOption<Vec<String>>,
    ) -> Result<&'a str, String> {
        if let Some(ns) = &self.namespace {
            return Ok(ns);
        }
        if !route::is_short_name(authority) {
            return Ok("");
        }
        if let Some(ns) = self.inferred_namespace.get() {
            return Ok(ns);
        }
        if let Some(ns) = self
            .addr
            .and_then(|a| route::caller_namespace(local, a.ip(), domain))
        {
            return Ok(self.inferred_namespace.get_or_init(|| ns.into()));
        }
        if let Some(ns) = &self.declared_namespace {
            return Ok(ns);
        }
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let host = host.trim_end_matches('.');
        let who = match self.addr {
            Some(a) => format!("the caller at {}", a.ip()),
            None => "the caller".to_string(),
        };
        let watched = watched.load();
        let Some(watched) = watched.as_deref() else {
            return Err(format!(
                "`{host}` is a short name, and this gateway cannot tell which namespace it means: \
                 {who} presented no workload certificate and is not an endpoint of exactly one \
                 namespace's services; call `{host}.<namespace>` or `{host}.<namespace>.svc.{domain}` \
                 (docs/kubernetes.md, \"Short names\")"
            ));
        };
        const SHOWN: usize = 8;
        let mut listed = watched
            .iter()
            .take(SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if watched.len() > SHOWN {
            listed.push_str(&format!(" and {} more", watched.len() - SHOWN));
        }
        Err(format!(
            "`{host}` is a short name, and this gateway cannot tell which namespace it means: \
             {who} presented no workload certificate and is not an endpoint of exactly one \
             namespace's services among those it watches: Kubernetes discovery watches only the \
             namespaces the policy names and --kube-namespace adds ({listed}), so a caller in \
             another namespace cannot be placed by its address; call `{host}.<namespace>` or \
             `{host}.<namespace>.svc.{domain}`, or add the caller's namespace with \
             --kube-namespace (docs/kubernetes.md, \"Short names\")"
        ))
    }
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
    declared_namespace: Option<Arc<str>>,
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
        let (state, declared_namespace) = (state.clone(), declared_namespace.clone());
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
                namespace: None,
                declared_namespace: declared_namespace.clone(),
                inferred_namespace: std::sync::OnceLock::new(),
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
                caller.namespace = Some(namespace.clone());
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
        service_fn(move |req: Request<Incoming>| serve_request(&state, &caller, &activity, req))
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

/// The future hyper's dispatcher holds for one request: boxed whole, so
/// that hyper moves a pointer (its in-flight slot, an HTTP/2 stream's task)
/// and an idle caller connection holds no room for a request
/// ([`future_sizes`] guards the size of what is inside).
type RequestFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// One request on a caller connection: counted in flight (for [`idle`]),
/// then [`handle_http`].
fn serve_request(
    state: &Arc<Gateway>,
    caller: &Arc<Caller>,
    activity: &Arc<Activity>,
    mut req: Request<Incoming>,
) -> RequestFuture {
    let (state, caller) = (state.clone(), caller.clone());
    let in_flight = InFlight::new(activity);
    let h2 = req.version() == http::Version::HTTP_2;
    if h2 && req.method() == Method::CONNECT {
        // The tunnel outlives the response; connect() holds this.
        req.extensions_mut().insert(in_flight.clone());
    }
    Box::pin(async move {
        let resp = handle_http(state, caller, req).await;
        // HTTP/1 is not timed by `idle`: no need to hold its body.
        Ok::<_, Infallible>(if h2 {
            resp.map(|b| Held::boxed(b, in_flight))
        } else {
            resp
        })
    })
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
            // No caller namespace: crate::run qualified a short host.
            if let Some(route) = route_tcp_or_close(&state, &host, port, "") {
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
            let namespace = {
                let domain = state.active.load().snapshot.policy.domain.clone();
                let local = state.endpoints.borrow();
                caller
                    .namespace_for(&host, &local, &domain, &state.watched_namespaces)
                    .map(str::to_string)
            };
            let namespace = match namespace {
                Ok(ns) => ns,
                Err(why) => {
                    state.metrics.refused("listener", "short-name");
                    tracing::info!(caller = ?caller.addr, %host, %why, "TLS passthrough to a short name; closing");
                    return;
                }
            };
            if let Some(route) = route_tcp_or_close(&state, &host, 443, &namespace) {
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
        // Boxed: the task-local scope holds the request future again,
        // which would double this future's size for untraced requests.
        return Box::pin(crate::trace::in_hop(
            hop,
            route_and_forward(state, caller, req),
        ))
        .await;
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
    req.headers_mut().remove(&super::XFCC);
    let grpc = is_grpc(req.headers());
    if req.method() == Method::CONNECT {
        return connect(state, caller, req).await;
    }
    // Decide: one snapshot, one view of the endpoints, one plan.
    let active = state.active.load_full();
    let endpoints = state.endpoints.borrow().clone();
    let remote = state.tunnel.announcements();
    let authority = authority_of(req.uri(), req.headers());
    let namespace = match caller.namespace_for(
        &authority,
        &endpoints,
        &active.snapshot.policy.domain,
        &state.watched_namespaces,
    ) {
        Ok(ns) => ns,
        Err(why) => {
            let r = TryError::refused(Refusal::BadRequest, why).respond(grpc);
            record(&state, &r, "", "", start, grpc);
            return r;
        }
    };
    let ask = plan::Ask {
        method: req.method(),
        uri: req.uri(),
        authority: &authority,
        headers: req.headers(),
        namespace,
        verified: caller.id.is_some(),
        addr: caller.addr.map(|a| a.ip()),
    };
    let view = plan::View {
        active: &active,
        local_cluster: &state.cluster,
        endpoints: &endpoints,
        remote: &remote,
    };
    let planned = plan::plan(&ask, &view, &mut plan::hit);
    // The announcements are not needed past the plan (retries read fresh).
    drop(remote);
    // PeerAuthentication, on the routed target (before the cluster choice
    // says whether any endpoint is healthy).
    let routed = match &planned {
        Ok(p) => Some(&*p.routed),
        Err(no) => no.routed(),
    };
    if let Some(t) = routed {
        crate::trace::route(t, &active);
        let mtls = caller.id.is_some();
        if let Err(r) = crate::proxy::admission::peer_auth(
            &state,
            &active,
            mtls,
            &t.service,
            &t.selector,
            t.port,
        ) {
            let r = TryError::PeerAuth(r).respond(grpc);
            record(&state, &r, &t.service, "", start, grpc);
            return r;
        }
    }
    let plan = match planned {
        Ok(p) => p,
        Err(no) => {
            let (refusal, message) = no.refusal();
            let r = TryError::refused(refusal, message).respond(grpc);
            record(
                &state,
                &r,
                no.routed().map_or("", |t| &t.service),
                "",
                start,
                grpc,
            );
            return r;
        }
    };
    // Do.
    let (resp, cluster) = execute(
        &state, &caller, &active, &endpoints, &plan, req, authority, grpc,
    )
    .await;
    record(&state, &resp, &plan.routed.service, &cluster, start, grpc);
    resp
}

/// A request's authority: the URI's, else the `Host` header ("" if neither).
fn authority_of(uri: &Uri, headers: &http::HeaderMap) -> String {
    uri.authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Executes a plan, in steps: the fault, the rule's edits, the body kept
/// for replay, the mirrors, the destination's edits, then forwarding with
/// retries under the route timeout, and the response edits. Returns the
/// response and the cluster that answered it.
#[allow(clippy::too_many_arguments)]
async fn execute(
    state: &Arc<Gateway>,
    caller: &Arc<Caller>,
    active: &Arc<route::Active>,
    endpoints: &crate::endpoints::EndpointSet,
    plan: &Plan<'_>,
    req: Request<Incoming>,
    mut authority: String,
    grpc: bool,
) -> (Response<ProxyBody>, String) {
    if let Err(e) = apply_fault(&plan.fault).await {
        return (e.respond(grpc), plan.cluster.clone());
    }
    let (mut parts, body) = req.into_parts();
    plan.edit_request(&mut parts, &mut authority);
    let (body, kept) = match keep_body(plan, body).await {
        Ok(b) => b,
        Err(e) => return (e.respond(grpc), plan.cluster.clone()),
    };
    if !plan.mirrors.is_empty() {
        let copy = clone_head(&parts);
        for m in &plan.mirrors {
            spawn_mirror(
                state,
                active,
                caller,
                m,
                &copy,
                kept.clone(),
                &authority,
                plan.target.port,
            );
        }
    }
    plan.edit_request_for_destination(&mut parts.headers);
    let replay = Replay::of(plan, &parts, kept, http_body::Body::is_end_stream(&body));
    let mut tries = Live {
        state,
        active,
        caller,
        endpoints,
        authority: &authority,
        grpc,
        failed_endpoints: Vec::new(),
        failed_links: Vec::new(),
    };
    let req = Request::from_parts(parts, body);
    let (tried, cluster) = forward(plan, grpc, &mut tries, req, replay.as_ref()).await;
    let mut resp = tried.unwrap_or_else(|e| e.respond(grpc));
    plan.edit_response(resp.headers_mut());
    (resp, cluster)
}

/// The plan's fault: waits out its delay, then answers its abort instead
/// of forwarding.
async fn apply_fault(fault: &plan::Fault<'_>) -> Result<(), TryError> {
    if let Some(d) = fault.delay {
        tokio::time::sleep(d).await;
    }
    match fault.abort {
        Some(status) => Err(TryError::Fault(status.clone())),
        None => Ok(()),
    }
}

/// Makes the body sendable again when the plan may need it again. A
/// request can be sent again only if its whole body is known: bodiless
/// ones, and, when retries or mirrors are configured, bodies that declare
/// at most [`RETRY_BUFFER`] bytes, which are buffered (as Envoy buffers for
/// retries). Bigger or unsized bodies stream and are not sent again.
/// Returns the body to send and the bytes kept.
async fn keep_body(
    plan: &Plan<'_>,
    body: Incoming,
) -> Result<(ProxyBody, Option<bytes::Bytes>), TryError> {
    if !plan.keeps_request() {
        return Ok((body.map_err(Into::into).boxed_unsync(), None));
    }
    if http_body::Body::is_end_stream(&body) {
        return Ok((body::empty(), Some(bytes::Bytes::new())));
    }
    let small = http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|n| n <= RETRY_BUFFER as u64);
    if !small {
        return Ok((body.map_err(Into::into).boxed_unsync(), None));
    }
    match http_body_util::Limited::new(body, RETRY_BUFFER)
        .collect()
        .await
    {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            Ok((body::full(bytes.clone()), Some(bytes)))
        }
        Err(e) => Err(TryError::CallerBody {
            fault: body::CallerFault::of(&*e),
            message: format!("request body: {e}"),
        }),
    }
}

/// A request kept to be sent again (a retry, or a replay after a dead
/// link): its head, as the first try sent it, and its whole body. The one
/// replay buffer of the outbound path.
#[derive(Debug)]
pub(super) struct Replay {
    head: rules::Head,
    body: bytes::Bytes,
}

impl Replay {
    /// What the plan may send again: with a retry policy, a kept body; a
    /// bodiless idempotent request always (a dead link replays it).
    fn of(
        plan: &Plan<'_>,
        parts: &http::request::Parts,
        kept: Option<bytes::Bytes>,
        bodiless: bool,
    ) -> Option<Self> {
        let body = match kept {
            Some(b) if plan.retry.is_some() => b,
            _ if bodiless && plan::is_idempotent(&parts.method) => bytes::Bytes::new(),
            _ => return None,
        };
        Some(Replay {
            head: clone_head(parts),
            body,
        })
    }

    /// The request again.
    fn request(&self) -> Request<ProxyBody> {
        rebuild(&self.head, self.body.clone())
    }

    /// Whether a dead link may replay it: bodiless and idempotent.
    fn on_dead_link(&self) -> bool {
        self.body.is_empty() && plan::is_idempotent(&self.head.0)
    }
}

/// What the retry layer needs from the world: one try, a fresh cluster
/// choice, the links left, counting. [`Live`] is the gateway's; tests use
/// their own.
pub(super) trait Tries {
    /// Sends one try of the request to `cluster`.
    async fn send(&mut self, target: &Target, cluster: &str, req: Request<ProxyBody>) -> Tried;
    /// Chooses a cluster for `target` again, on the state of now (a link
    /// that died, endpoints ejected since), avoiding `exclude`.
    fn choose(&mut self, target: &mut Target, exclude: &[String]) -> Option<String>;
    /// Whether `cluster` has an available link that no try saw die.
    fn another_link(&self, cluster: &str) -> bool;
    /// A slot of the retry budget, if it has one (counted when not).
    fn retry_slot(&self) -> Option<crate::retry_budget::Slot>;
    /// Counts a retry of `service`.
    fn retried(&self, service: &str, reason: String);
}

/// Forwards a planned request: [`retry`] under the route timeout (which
/// bounds the wait for the response head, Istio's `timeout`; a streaming
/// body may go on after it). Returns the last try's outcome and its
/// cluster.
pub(super) async fn forward<T: Tries>(
    plan: &Plan<'_>,
    grpc: bool,
    tries: &mut T,
    req: Request<ProxyBody>,
    replay: Option<&Replay>,
) -> (Tried, String) {
    let Some(limit) = plan.timeout else {
        return retry(plan, grpc, tries, req, replay).await;
    };
    match tokio::time::timeout(limit, retry(plan, grpc, tries, req, replay)).await {
        Ok(r) => r,
        Err(_) => (
            Err(TryError::refused(
                Refusal::Timeout,
                format!(
                    "{} did not answer within the route timeout of {} ms",
                    plan.routed.service,
                    limit.as_millis()
                ),
            )),
            plan.cluster.clone(),
        ),
    }
}

/// The one retry and replay layer. Each try runs under the per-try timeout;
/// its typed outcome ([`Seen`]) decides what comes next:
/// - a bodiless idempotent request whose link died before its answer goes
///   again on another link of the same cluster (once per try), so callers
///   do not see a peer's death; then, when no retry policy would try it
///   again, once to the next cluster that can serve it;
/// - a try the policy's `retryOn` matches goes again after Envoy's backoff,
///   to a cluster chosen again (away from clusters whose path broke), under
///   the retry budget, unless it leaves a path that provably failed before
///   reaching a backend for another cluster.
async fn retry<T: Tries>(
    plan: &Plan<'_>,
    grpc: bool,
    tries: &mut T,
    mut req: Request<ProxyBody>,
    replay: Option<&Replay>,
) -> (Tried, String) {
    let mut target = plan.target.clone();
    let mut cluster = plan.cluster.clone();
    let policy = plan.retry.zip(replay);
    let mut attempt: u32 = 0;
    // The budget slot of the retry in flight, held until it is answered.
    let mut _retry_slot = None;
    // Clusters a try failed on for want of a working path (a dead link, no
    // endpoint, a refused connection): retries go elsewhere when they can,
    // as Istio's default `previous_hosts` retry predicate does per host.
    let mut failed: Vec<String> = Vec::new();
    let (mut replayed, mut link_replayed) = (false, false);
    loop {
        // Each branch makes its own try: a try future made before the
        // match and moved into the timeout would be kept twice.
        let tried = match plan.per_try {
            Some(d) => tokio::time::timeout(d, tries.send(&target, &cluster, req))
                .await
                .unwrap_or_else(|_| Err(TryError::refused(Refusal::Timeout, "per-try timeout"))),
            None => tries.send(&target, &cluster, req).await,
        };
        let seen = seen_of(&tried, grpc);
        let policy_retries =
            policy.is_some_and(|(p, _)| attempt < p.attempts && seen.retriable(&p.retry_on));
        if let Some(again) = replay.filter(|r| seen.link_died && r.on_dead_link()) {
            // A peer killed, not yet detected: another link of its cluster.
            if !link_replayed && tries.another_link(&cluster) {
                link_replayed = true;
                req = again.request();
                continue;
            }
            // A peer killed under load: calls on its link fail until the
            // link is declared dead (under a second). One that no retry
            // policy would try again goes once to the next cluster that can
            // serve it (within the route timeout).
            if !replayed && !policy_retries {
                if !failed.contains(&cluster) {
                    failed.push(cluster.clone());
                }
                let mut next_target = (*plan.routed).clone();
                if let Some(next) = tries.choose(&mut next_target, &failed) {
                    replayed = true;
                    link_replayed = false;
                    crate::trace::retry();
                    tries.retried(&target.service, "link-died".into());
                    target = next_target;
                    cluster = next;
                    req = again.request();
                    continue;
                }
            }
        }
        let Some((_, again)) = policy else {
            return (tried, cluster);
        };
        if !policy_retries {
            if seen.status >= 500 {
                tracing::debug!(
                    status = seen.status,
                    reason = seen.label(),
                    attempt,
                    "not retried"
                );
            }
            return (tried, cluster);
        }
        attempt += 1;
        crate::trace::retry();
        tokio::time::sleep(plan::backoff(attempt, rand::random_range(0.0..=1.0))).await;
        // The budget counts retries in flight, not those backing off.
        _retry_slot = None;
        if seen.path_failed() && !failed.contains(&cluster) {
            failed.push(cluster.clone());
        }
        let mut next_target = (*plan.routed).clone();
        let next = tries.choose(&mut next_target, &failed);
        // The budget keeps retries from multiplying the load on what
        // fails. A retry that leaves a broken path for another cluster
        // adds nothing there (the call moves, as it would have if the
        // failure had been known), so it needs no slot: when a peer
        // dies, every call in flight to it fails over, not only 20%.
        let moves = seen.exempt_move(&again.head.0) && next.as_ref().is_some_and(|c| *c != cluster);
        if !moves {
            let Some(slot) = tries.retry_slot() else {
                return (tried, cluster);
            };
            _retry_slot = Some(slot);
        }
        tries.retried(&target.service, seen.label());
        if let Some(c) = next {
            target = next_target;
            cluster = c;
        }
        req = again.request();
        link_replayed = false;
    }
}

/// The gateway's tries: a local endpoint (under DestinationRule policy and
/// authorization) or a link to the cluster's gateway.
struct Live<'a> {
    state: &'a Gateway,
    active: &'a route::Active,
    caller: &'a Caller,
    /// The request's view of the local endpoints (the plan's).
    endpoints: &'a crate::endpoints::EndpointSet,
    authority: &'a str,
    grpc: bool,
    /// Local endpoints a try could not connect to or that reset it.
    failed_endpoints: Vec<SocketAddr>,
    /// Links a try failed to open a stream on or saw die.
    failed_links: Vec<String>,
}

impl Tries for Live<'_> {
    async fn send(&mut self, target: &Target, cluster: &str, req: Request<ProxyBody>) -> Tried {
        // Boxed: a try's own future (the local pool's connect and
        // handshake, the link's stream open) is moved once into its box,
        // instead of living inline in every step above it (retry, forward,
        // execute, the service future), each of which is moved per request.
        if cluster == self.state.cluster {
            Box::pin(forward_local(
                self.state,
                self.active,
                self.caller.id.as_deref(),
                target,
                self.endpoints,
                req,
                self.grpc,
                &mut self.failed_endpoints,
            ))
            .await
        } else {
            Box::pin(forward_remote(
                self.state,
                self.active,
                self.caller,
                cluster,
                target,
                self.authority,
                req,
                &mut self.failed_links,
            ))
            .await
        }
    }

    fn choose(&mut self, target: &mut Target, exclude: &[String]) -> Option<String> {
        let endpoints = self.state.endpoints.borrow().clone();
        let remote = self.state.tunnel.announcements();
        plan::View {
            active: self.active,
            local_cluster: &self.state.cluster,
            endpoints: &endpoints,
            remote: &remote,
        }
        .choose(target, exclude)
    }

    fn another_link(&self, cluster: &str) -> bool {
        let stale = self.state.tunnel.settings().announce_stale;
        self.state
            .tunnel
            .links_to(cluster)
            .iter()
            .any(|l| l.available(stale) && !self.failed_links.contains(&l.target))
    }

    fn retry_slot(&self) -> Option<crate::retry_budget::Slot> {
        let slot = self.state.retry_budget();
        if slot.is_none() {
            self.state.metrics.refused("retry", "budget-exhausted");
        }
        slot
    }

    fn retried(&self, service: &str, reason: String) {
        self.state.metrics.retried(service, reason);
    }
}

/// How one try of a request ended without an answer from a backend, or why
/// the request was not forwarded at all: the outbound path's one error
/// type. Retry decisions read it as a [`Seen`] ([`seen_of`]);
/// [`TryError::respond`] is the one place it becomes the caller's response
/// (status and `x-meshfed-error`).
#[derive(Debug)]
pub(super) enum TryError {
    /// Refused or failed by this gateway, or by the destination gateway in
    /// an ERROR frame. `link_died`: a request to another cluster that never
    /// reached a peer's answer because the link failed (it died, or no link
    /// was left to open a stream on); a bodiless idempotent request may then
    /// go again on another link or to another cluster.
    Refused {
        refusal: Refusal,
        message: String,
        link_died: bool,
    },
    /// A local endpoint failed or overflowed (crate::upstream), or the
    /// caller failed its own body on the way there.
    Upstream(crate::upstream::UpstreamError),
    /// An answer a gateway made itself, passed on as it is: the destination
    /// gateway's own response (its pool's overflow 503 carries headers an
    /// ERROR frame cannot), or this gateway's authorization denial. `reason`:
    /// its `x-meshfed-error`, decoded once where the answer was made or
    /// arrived ([`TryError::made`]).
    Made {
        resp: Box<Response<ProxyBody>>,
        reason: Box<str>,
    },
    /// PeerAuthentication refused the caller.
    PeerAuth(crate::peer_auth::Refused),
    /// An injected abort (`fault.abort`).
    Fault(AbortStatus),
    /// The caller failed its request body while it was kept for retries.
    CallerBody {
        fault: body::CallerFault,
        message: String,
    },
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

    /// A gateway's own answer, with its reason read once.
    fn made(resp: Response<ProxyBody>) -> Self {
        let reason = gateway_reason(&resp).into();
        TryError::Made {
            resp: Box::new(resp),
            reason,
        }
    }

    /// The response for the caller: the one writer of the outbound path's
    /// refusals.
    pub(super) fn respond(self, grpc: bool) -> Response<ProxyBody> {
        match self {
            TryError::Refused {
                refusal, message, ..
            } => error_response(refusal, &message, grpc),
            TryError::Upstream(e) => e.response(grpc),
            TryError::Made { resp, .. } => *resp,
            TryError::PeerAuth(r) => r.response(grpc),
            TryError::Fault(status) => fault_response(&status, grpc),
            TryError::CallerBody { fault, message } => {
                crate::respond::caller_fault_response(fault, &message, grpc)
            }
        }
    }

    /// What the retry policy sees of it (as the caller would get it from
    /// [`TryError::respond`]).
    fn seen(&self, grpc: bool) -> Seen<'_> {
        use crate::upstream::UpstreamError;
        match self {
            TryError::Refused {
                refusal, link_died, ..
            } => Seen {
                link_died: *link_died,
                ..Seen::refused(*refusal, grpc)
            },
            TryError::Upstream(UpstreamError::Overflow { .. }) => Seen {
                overloaded: true,
                ..Seen::refused(Refusal::Overloaded, grpc)
            },
            TryError::Upstream(UpstreamError::Caller { fault, .. })
            | TryError::CallerBody { fault, .. } => caller_fault_seen(*fault, grpc),
            TryError::Upstream(e) => Seen::refused(e.refusal(), grpc),
            TryError::Made { resp, reason } => {
                let reason = Some(&**reason).filter(|r| !r.is_empty());
                Seen {
                    refusal: reason.and_then(plan::refusal_named),
                    token: reason,
                    ..backend_seen(resp)
                }
            }
            TryError::PeerAuth(r) => Seen {
                token: Some(r.reason),
                ..Seen::made(StatusCode::FORBIDDEN, Some(16), grpc, None)
            },
            // As fault_response answers: an HTTP abort keeps its status
            // (gRPC callers also get its gRPC mapping), a gRPC abort is a
            // trailers-only 200 with its code.
            TryError::Fault(AbortStatus::Http(code)) => {
                let http = StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                Seen {
                    status: *code,
                    token: Some("fault-injected"),
                    ..Seen::made(http, None, grpc, None)
                }
            }
            TryError::Fault(AbortStatus::Grpc(code)) => Seen {
                token: Some("fault-injected"),
                ..Seen::made(StatusCode::OK, u8::try_from(*code).ok(), true, None)
            },
        }
    }
}

/// A caller fault as [`crate::respond::caller_fault_response`] answers it: `400
/// bad-request` (gRPC INTERNAL), or `499 source-cancelled` (gRPC CANCELLED).
fn caller_fault_seen(fault: body::CallerFault, grpc: bool) -> Seen<'static> {
    if fault == body::CallerFault::Aborted {
        Seen {
            token: Some(fault.reason()),
            ..Seen::made(fault.status(), Some(1), grpc, None)
        }
    } else {
        Seen::refused(Refusal::BadRequest, grpc)
    }
}

/// A response's own view: its status, `grpc-status` and overflow mark.
fn backend_seen(resp: &Response<ProxyBody>) -> Seen<'static> {
    Seen {
        status: resp.status().as_u16(),
        refusal: None,
        token: None,
        grpc_status: resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()),
        overloaded: resp.headers().contains_key("x-envoy-overloaded"),
        link_died: false,
    }
}

/// What the retry policy sees of a try's outcome.
fn seen_of(tried: &Tried, grpc: bool) -> Seen<'_> {
    match tried {
        Ok(resp) => backend_seen(resp),
        Err(e) => e.seen(grpc),
    }
}

/// One try's outcome: a backend's answer, or why there is none.
pub(super) type Tried = Result<Response<ProxyBody>, TryError>;

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
fn clone_head(parts: &http::request::Parts) -> rules::Head {
    (
        parts.method.clone(),
        parts.uri.clone(),
        parts.version,
        parts.headers.clone(),
    )
}

/// Largest request body buffered so that it can be retried.
const RETRY_BUFFER: usize = 64 * 1024;

fn rebuild(head: &rules::Head, body: bytes::Bytes) -> Request<ProxyBody> {
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

/// The response of an injected abort, marked as such.
fn fault_response(status: &AbortStatus, grpc: bool) -> Response<ProxyBody> {
    let mut b = Response::builder().header(ERROR_HEADER, "fault-injected");
    match status {
        AbortStatus::Http(code) => {
            b = b.status(*code);
            if grpc {
                b = b.header(
                    "grpc-status",
                    crate::respond::grpc_status_for(
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

/// Mirrored copies in flight at most, per gateway process; beyond it copies
/// are dropped (and counted) rather than queued.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 1024;

/// How long a mirrored copy may take, head and body, before it is abandoned.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a mirrored copy's response body is read (and discarded, a
/// chunk at a time) so its connection can be reused; past it the response
/// is dropped, which closes or resets its stream instead.
pub const MIRROR_DRAIN_LIMIT: u64 = 1 << 20;

static MIRRORS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Sends a copy of a request to `mirror`, in the background (the plan's
/// mirrors; [`super::rules`] for their semantics). `body` is the buffered
/// request body, or `None` when it streamed (then nothing is sent).
#[allow(clippy::too_many_arguments)]
fn spawn_mirror(
    state: &Arc<Gateway>,
    active: &Arc<route::Active>,
    caller: &Arc<Caller>,
    mirror: &meshfed_policy::snapshot::Mirror,
    head: &rules::Head,
    body: Option<bytes::Bytes>,
    authority: &str,
    port: u16,
) {
    let mut target = route::mirror_target(active, mirror, port);
    let service = target.service.clone();
    let Some(body) = body else {
        state.metrics.mirrored(&service, "dropped-streaming-body");
        return;
    };
    if MIRRORS_IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_MIRRORS_IN_FLIGHT {
        MIRRORS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        state.metrics.mirrored(&service, "dropped-too-many");
        return;
    }
    let (state, active, caller) = (state.clone(), active.clone(), caller.clone());
    let (host, _) = route::split_authority(authority, port);
    let shadow = format!("{host}-shadow");
    let mut req = rebuild(head, body);
    let mut uri = req.uri().clone();
    rules::set_authority(&mut uri, req.headers_mut(), &shadow);
    *req.uri_mut() = uri;
    let grpc = is_grpc(req.headers());
    tokio::spawn(async move {
        let _slot = MirrorSlot;
        let endpoints = state.endpoints.borrow().clone();
        let remote = state.tunnel.announcements();
        let view = plan::View {
            active: &active,
            local_cluster: &state.cluster,
            endpoints: &endpoints,
            remote: &remote,
        };
        let Some(cluster) = view.choose(&mut target, &[]) else {
            state.metrics.mirrored(&service, "no-healthy-endpoint");
            return;
        };
        drop(remote);
        let copy = async {
            let tried = if cluster == state.cluster {
                forward_local(
                    &state,
                    &active,
                    caller.id.as_deref(),
                    &target,
                    &endpoints,
                    req,
                    grpc,
                    &mut Vec::new(),
                )
                .await
            } else {
                forward_remote(
                    &state,
                    &active,
                    &caller,
                    &cluster,
                    &target,
                    &shadow,
                    req,
                    &mut Vec::new(),
                )
                .await
            };
            let (resp, ok) = match tried {
                Ok(resp) => (resp, true),
                Err(e) => (e.respond(grpc), false),
            };
            discard(resp.into_body(), MIRROR_DRAIN_LIMIT).await;
            ok
        };
        let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, copy).await {
            Ok(true) => "sent",
            Ok(false) => "failed",
            Err(_) => "timeout",
        };
        state.metrics.mirrored(&service, outcome);
    });
}

/// Reads a body and drops it a frame at a time, at most `limit` bytes, so
/// that its connection can be reused without the body ever being held
/// whole. Returns the bytes read and whether the body ended (rather than
/// failing or passing the limit).
async fn discard<B>(body: B, limit: u64) -> (u64, bool)
where
    B: http_body::Body + Unpin,
{
    let mut body = body;
    let mut read = 0u64;
    while read < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += bytes::Buf::remaining(data) as u64;
                }
            }
            Some(Err(_)) => return (read, false),
            None => return (read, true),
        }
    }
    (read, body.is_end_stream())
}

/// A response's `grpc-status` as a metric and span label: one of the 17
/// gRPC codes (`0`..`16`), `other` for anything else a backend sends, or
/// empty without one. The header is the backend's to choose: as a label
/// it must not mint a series per value.
fn grpc_status_label(value: Option<&[u8]>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    match value {
        None => "",
        Some(v) => CODES
            .iter()
            .find(|c| c.as_bytes() == v)
            .copied()
            .unwrap_or("other"),
    }
}

/// Releases a mirror slot when the copy's task ends, however it ends.
struct MirrorSlot;

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        MIRRORS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

fn record(
    state: &Gateway,
    resp: &Response<ProxyBody>,
    service: &str,
    cluster: &str,
    start: Instant,
    grpc: bool,
) {
    let reason = gateway_reason(resp);
    let grpc_status = if grpc {
        grpc_status_label(resp.headers().get("grpc-status").map(|v| v.as_bytes()))
    } else {
        ""
    };
    crate::trace::response(resp.status().as_u16(), reason, grpc_status, Some(cluster));
    state.metrics.record_request(
        RequestKey {
            direction: "outbound",
            source_cluster: &state.cluster,
            destination_cluster: cluster,
            destination_service: service,
            response_code: resp.status().as_u16(),
            grpc_response_status: grpc_status,
            reason,
        },
        start.elapsed().as_secs_f64(),
    );
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
    endpoints: &crate::endpoints::EndpointSet,
    mut req: Request<ProxyBody>,
    grpc: bool,
    failed: &mut Vec<SocketAddr>,
) -> Tried {
    if let Some(v) = caller.and_then(|c| super::xfcc(state, active, c)) {
        req.headers_mut().insert(&super::XFCC, v);
    }
    let req = match crate::proxy::admission::enforce_local(
        state,
        active,
        caller,
        &target.service,
        &target.selector,
        req,
    ) {
        Ok(req) => req,
        Err(denied) => return Err(TryError::made(denied)),
    };
    // Endpoint-level policy (DestinationRule) applies here (crate::upstream).
    let dest = crate::upstream::Dest {
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
    let h2 = crate::upstream::speaks_h2(
        active,
        &state.service_ports.load(),
        &target.service,
        target.port,
        grpc,
    );
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
                crate::upstream::UpstreamError::Connect { .. }
                    | crate::upstream::UpstreamError::Reset { .. }
            ) && !failed.contains(&addr)
            {
                failed.push(addr);
            }
            Err(TryError::Upstream(e))
        }
    }
}

/// Sends a request over a link to `cluster`'s gateway: one try. A link
/// that fails before the request left is skipped for the next; links in
/// `failed_links` (that failed earlier tries) are used only when no other
/// is available. A link that dies before answering is added to it, and the
/// answer is a `link_died` [`TryError`]: the retry layer may replay the
/// request ([`retry`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward_remote(
    state: &Gateway,
    active: &crate::route::Active,
    caller: &Caller,
    cluster: &str,
    target: &Target,
    authority: &str,
    req: Request<ProxyBody>,
    failed_links: &mut Vec<String>,
) -> Tried {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
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
            method: parts.method,
            scheme: "http".into(),
            authority: authority.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers: parts.headers,
        }),
    };
    // Encoded once: a link that fails while opening is followed by another
    // with the same bytes.
    let mut encoded = bytes::BytesMut::with_capacity(512);
    if let Err(e) = crate::wire::frame::encode(&Frame::Open(Box::new(open)), &mut encoded) {
        return Err(TryError::refused(
            Refusal::BadRequest,
            format!("request head too large to forward: {e}"),
        ));
    }
    let encoded = encoded.freeze();
    let stale = state.tunnel.settings().announce_stale;
    let mut tried = Vec::new();
    let (mut send, mut recv, guard, used) = loop {
        let Some(link) = state
            .tunnel
            .links_to(cluster)
            .into_iter()
            .filter(|l| l.available(stale))
            .filter(|l| !tried.contains(&l.target))
            .min_by_key(|l| (failed_links.contains(&l.target), l.open_streams()))
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
            Ok((mut send, recv, guard)) => match send.write_chunk(encoded.clone()).await {
                Ok(()) => break (send, recv, guard, link.target.clone()),
                Err(e) => {
                    tracing::debug!(cluster, error = %e, "link failed while opening; trying another");
                }
            },
            Err(e) => {
                tracing::debug!(cluster, target = %link.target, error = %e, "link failed; trying another")
            }
        }
        if !failed_links.contains(&link.target) {
            failed_links.push(link.target.clone());
        }
    };
    drop(encoded);
    if http_body::Body::is_end_stream(&body) {
        // Bodiless: the FIN follows the OPEN, with no task to send it.
        let _ = send.finish();
    } else {
        tokio::spawn(async move {
            if let Err(e) = body::pump_request(body, &mut send).await {
                tracing::debug!(error = %e, "request body to peer failed");
            }
        });
    }
    let head = read_head(&mut recv).await;
    if head.is_err() && !failed_links.contains(&used) {
        failed_links.push(used);
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
        crate::tunnel::stream::SendHalf,
        crate::tunnel::stream::RecvHalf,
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
    recv: crate::tunnel::stream::RecvHalf,
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
                Err(TryError::made(resp))
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
        return TryError::refused(Refusal::BadRequest, "CONNECT needs host:port").respond(false);
    };
    let (host, port) = route::split_authority(authority.as_str(), 443);
    // Route before answering, so the caller sees a refusal as a status.
    let mtls = caller.id.is_some();
    let namespace = {
        let domain = state.active.load().snapshot.policy.domain.clone();
        let local = state.endpoints.borrow();
        caller
            .namespace_for(host, &local, &domain, &state.watched_namespaces)
            .map(str::to_string)
    };
    let namespace = match namespace {
        Ok(ns) => ns,
        Err(why) => return TryError::refused(Refusal::BadRequest, why).respond(false),
    };
    let route = match TcpRoute::new(&state, host, port, &namespace, mtls) {
        Ok(r) => r,
        Err(TcpRefused::NoRoute) => {
            return TryError::refused(Refusal::NoRoute, format!("no service `{host}`"))
                .respond(false);
        }
        Err(TcpRefused::PeerAuth(r)) => return TryError::PeerAuth(r).respond(false),
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
    endpoints: Arc<crate::endpoints::EndpointSet>,
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
        crate::proxy::admission::peer_auth(state, &active, mtls, &t.service, &t.selector, t.port)
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
        && !crate::proxy::admission::admit_local_tcp(
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
        // The one way to a local endpoint (crate::upstream), as the inbound
        // path and HTTP go: the DestinationRule's balancer and ejections,
        // then `tcp.maxConnections` and `connectTimeout`.
        let dest = crate::upstream::Dest {
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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod future_sizes;
