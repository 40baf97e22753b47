//! Connections to local endpoints under a DestinationRule's
//! `connectionPool` limits, with Envoy's circuit-breaking semantics.
//!
//! One [`ClusterPool`] per upstream cluster (service, subset, port), holding
//! per-endpoint connections. hyper-util's pooled client cannot count
//! connections nor retire one after N requests, so this module keeps its
//! own, small pool over hyper's connection-level API
//! (`hyper::client::conn::{http1, http2}`):
//!
//! - HTTP/1.1: one request per connection at a time; a connection comes
//!   back to the pool when the response body is finished or dropped, and is
//!   handed straight to the oldest waiting request if there is one.
//! - HTTP/2: connections are shared; a request takes a stream on an open
//!   one.
//! - `tcp.maxConnections` (cluster-wide): a request that finds no free
//!   connection opens one only below the limit. As in Envoy, an endpoint
//!   with no connection at all may always open one, so a request queued for
//!   it is never stranded by other endpoints' connections.
//! - `http.http1MaxPendingRequests`: requests waiting for a connection;
//!   beyond it, a request fails at once with [`Limit::Http1MaxPendingRequests`].
//! - `http.http2MaxRequests`: requests in flight to the cluster, HTTP/1.1
//!   and HTTP/2 alike (as Istio documents it).
//! - `http.maxRequestsPerConnection`: a connection that has carried that
//!   many requests is closed after its last response (HTTP/1.1) or takes no
//!   new stream and closes when its streams end (HTTP/2).
//! - `tcp.connectTimeout` bounds connecting (and the TLS handshake);
//!   `http.idleTimeout` (default 1 h as Envoy; we use 90 s unless set)
//!   closes a connection that no request has used for that long: its own
//!   task times it ([`Usage`]), so an idle connection closes whether or not
//!   another request ever comes.
//!
//! A waiting request waits until a connection frees or its caller gives up
//! (the route timeout); overflow never waits. Every connection's task owns
//! a slot that gives its count back when the connection ends, whatever
//! ends it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_policy::snapshot::ConnectionPool;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use super::tls::TlsSetup;
use crate::body::ProxyBody;

#[cfg(test)]
mod tests;

/// Connect timeout unless `tcp.connectTimeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle connection is kept unless `http.idleTimeout` says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A cluster's limits, in the pool's units. `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from(&ConnectionPool::default())
    }
}

impl From<&ConnectionPool> for Limits {
    fn from(c: &ConnectionPool) -> Self {
        Limits {
            max_connections: c.max_connections,
            max_pending: c.http1_max_pending_requests,
            max_requests: c.http2_max_requests,
            max_requests_per_connection: c.max_requests_per_connection.filter(|n| *n > 0),
            connect_timeout: c
                .connect_timeout_ms
                .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_millis),
            idle_timeout: c
                .http_idle_timeout_ms
                .map_or(DEFAULT_IDLE_TIMEOUT, Duration::from_millis),
        }
    }
}

/// The limit a request overflowed: the `limit` label of
/// `meshfed_upstream_overflow_total` and the `x-meshfed-overflow` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    MaxConnections,
    Http1MaxPendingRequests,
    Http2MaxRequests,
}

impl Limit {
    /// The DestinationRule field's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "maxConnections",
            Limit::Http1MaxPendingRequests => "http1MaxPendingRequests",
            Limit::Http2MaxRequests => "http2MaxRequests",
        }
    }
}

/// Why no connection was had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the connection pool is full ({})", .0.as_str())]
    Overflow(Limit),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
}

/// Which connections may be shared: same endpoint, protocol and TLS setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: SocketAddr,
    pub h2: bool,
    /// [`TlsSetup::id`], 0 for plaintext.
    pub tls: u64,
}

#[derive(Debug)]
struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    served: u32,
    usage: Arc<Usage>,
}

#[derive(Debug)]
struct Shared {
    tx: http2::SendRequest<ProxyBody>,
    served: u32,
    usage: Arc<Usage>,
}

/// One connection's use, shared by its task and the leases on it: the
/// task closes the connection once no lease has held it for the idle
/// timeout.
#[derive(Debug)]
struct Usage {
    leases: AtomicUsize,
    /// When the last lease ended (or the connection opened), in ms since
    /// `base`.
    idle_since_ms: AtomicU64,
    base: Instant,
}

impl Usage {
    fn new() -> Arc<Self> {
        Arc::new(Usage {
            leases: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            base: Instant::now(),
        })
    }

    /// When the connection became idle; `None` while a lease holds it.
    fn idle_since(&self) -> Option<Instant> {
        (self.leases.load(Ordering::Acquire) == 0)
            .then(|| self.base + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }

    fn expired(&self, timeout: Duration) -> bool {
        self.idle_since()
            .is_some_and(|t| t + timeout <= Instant::now())
    }

    fn hold(self: &Arc<Self>) -> Busy {
        self.leases.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

/// A lease's hold on a connection's [`Usage`].
#[derive(Debug)]
struct Busy(Arc<Usage>);

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Stamp, then leave: whoever sees no lease sees this stamp.
        self.0.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
enum Grant {
    /// An HTTP/1.1 connection, handed over.
    Conn(Idle),
    /// Something freed up: look again.
    Retry,
}

#[derive(Debug, Default)]
struct Endpoint {
    /// Connections open or being opened.
    open: usize,
    idle: Vec<Idle>,
    shared: Vec<Shared>,
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

impl Endpoint {
    fn unused(&self) -> bool {
        self.open == 0 && self.idle.is_empty() && self.shared.is_empty() && self.waiters.is_empty()
    }

    /// Hands `idle` to the oldest waiter still waiting; gives it back if none.
    fn hand_over(&mut self, mut idle: Idle) -> Option<Idle> {
        while let Some(w) = self.waiters.pop_front() {
            match w.send(Grant::Conn(idle)) {
                Ok(()) => return None,
                Err(Grant::Conn(back)) => idle = back,
                Err(Grant::Retry) => return None,
            }
        }
        Some(idle)
    }

    fn wake_one(&mut self) -> bool {
        while let Some(w) = self.waiters.pop_front() {
            if w.send(Grant::Retry).is_ok() {
                return true;
            }
        }
        false
    }

    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Grant::Retry);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    connections: usize,
    pending: usize,
    endpoints: FxHashMap<EndpointKey, Endpoint>,
}

/// One upstream cluster's connections and counters.
#[derive(Debug, Default)]
pub struct ClusterPool {
    requests: AtomicUsize,
    state: Mutex<State>,
}

enum Step {
    H1(Idle),
    H2((http2::SendRequest<ProxyBody>, Arc<Usage>)),
    Connect(ConnSlot),
    Wait(oneshot::Receiver<Grant>),
}

impl ClusterPool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind; go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight, connections open and requests waiting.
    pub fn stats(&self) -> (usize, usize, usize) {
        let st = self.lock();
        (
            self.requests.load(Ordering::Relaxed),
            st.connections,
            st.pending,
        )
    }

    /// A connection for one request to `key`, within `limits`.
    pub async fn acquire(
        self: &Arc<Self>,
        key: EndpointKey,
        limits: &Limits,
        tls: Option<&TlsSetup>,
    ) -> Result<Lease, PoolError> {
        let request = self.count_request(limits)?;
        let mut pending: Option<PendingSlot> = None;
        loop {
            let step = {
                let mut st = self.lock();
                let at_limit = limits
                    .max_connections
                    .is_some_and(|m| st.connections >= m as usize);
                let pending_now = st.pending;
                let ep = st.endpoints.entry(key).or_default();
                let mut found = None;
                if key.h2 {
                    ep.shared.retain(|s| !s.tx.is_closed());
                    if let Some(i) = ep.shared.iter().position(|_| true) {
                        let s = &mut ep.shared[i];
                        s.served += 1;
                        let tx = (s.tx.clone(), s.usage.clone());
                        if limits
                            .max_requests_per_connection
                            .is_some_and(|m| s.served >= m)
                        {
                            // Retired: no new stream; it closes when its streams end.
                            ep.shared.swap_remove(i);
                        }
                        found = Some(Step::H2(tx));
                    }
                } else {
                    while let Some(idle) = ep.idle.pop() {
                        if !idle.tx.is_closed() && !idle.usage.expired(limits.idle_timeout) {
                            found = Some(Step::H1(idle));
                            break;
                        }
                    }
                }
                match found {
                    Some(step) => step,
                    None if ep.open == 0 || !at_limit => {
                        ep.open += 1;
                        st.connections += 1;
                        Step::Connect(ConnSlot {
                            pool: self.clone(),
                            key,
                        })
                    }
                    None => {
                        if pending.is_none() {
                            if limits
                                .max_pending
                                .is_some_and(|m| pending_now >= m as usize)
                            {
                                return Err(PoolError::Overflow(Limit::Http1MaxPendingRequests));
                            }
                            st.pending += 1;
                            pending = Some(PendingSlot(self.clone()));
                        }
                        let (tx, rx) = oneshot::channel();
                        if let Some(ep) = st.endpoints.get_mut(&key) {
                            ep.waiters.push_back(tx);
                        }
                        Step::Wait(rx)
                    }
                }
            };
            match step {
                Step::H1(mut idle) => {
                    if idle.tx.ready().await.is_ok() {
                        idle.served += 1;
                        return Ok(self.lease(key, Conn::H1(Some(idle)), request, limits));
                    }
                }
                Step::H2((mut tx, usage)) => {
                    if tx.ready().await.is_ok() {
                        return Ok(self.lease(key, Conn::H2(tx, usage), request, limits));
                    }
                }
                Step::Connect(slot) => {
                    // Boxed: a new connection (TCP, TLS, the HTTP handshake) is
                    // the rare path, and inline its future would make every
                    // request's future kilobytes larger (issue 17).
                    let conn = Box::pin(connect(key, limits, tls, slot)).await?;
                    if let Conn::H2(tx, usage) = &conn {
                        let mut st = self.lock();
                        if let Some(ep) = st.endpoints.get_mut(&key) {
                            let retire = limits.max_requests_per_connection.is_some_and(|m| m <= 1);
                            if !retire {
                                ep.shared.push(Shared {
                                    tx: tx.clone(),
                                    served: 1,
                                    usage: usage.clone(),
                                });
                            }
                            ep.wake_all();
                        }
                    }
                    return Ok(self.lease(key, conn, request, limits));
                }
                Step::Wait(rx) => match rx.await {
                    Ok(Grant::Conn(mut idle)) => {
                        if idle.tx.ready().await.is_ok() {
                            idle.served += 1;
                            return Ok(self.lease(key, Conn::H1(Some(idle)), request, limits));
                        }
                    }
                    // Woken (or the pool dropped our place): look again,
                    // still counted as pending.
                    Ok(Grant::Retry) | Err(_) => {}
                },
            }
        }
    }

    fn count_request(self: &Arc<Self>, limits: &Limits) -> Result<RequestSlot, PoolError> {
        let before = self.requests.fetch_add(1, Ordering::Relaxed);
        let slot = RequestSlot(self.clone());
        if limits.max_requests.is_some_and(|m| before >= m as usize) {
            return Err(PoolError::Overflow(Limit::Http2MaxRequests));
        }
        Ok(slot)
    }

    fn lease(
        self: &Arc<Self>,
        key: EndpointKey,
        conn: Conn,
        request: RequestSlot,
        limits: &Limits,
    ) -> Lease {
        let busy = match &conn {
            Conn::H1(idle) => idle.as_ref().map(|i| i.usage.hold()),
            Conn::H2(_, usage) => Some(usage.hold()),
        };
        Lease {
            pool: self.clone(),
            key,
            conn,
            max_per_connection: limits.max_requests_per_connection,
            abandoned: false,
            _busy: busy,
            _request: request,
        }
    }

    /// A slot for one proxied TCP connection, within `tcp.maxConnections`.
    pub fn tcp_slot(
        self: &Arc<Self>,
        addr: SocketAddr,
        limits: &Limits,
    ) -> Result<ConnSlot, Limit> {
        let key = EndpointKey {
            addr,
            h2: false,
            tls: u64::MAX,
        };
        let mut st = self.lock();
        if limits
            .max_connections
            .is_some_and(|m| st.connections >= m as usize)
        {
            return Err(Limit::MaxConnections);
        }
        st.connections += 1;
        st.endpoints.entry(key).or_default().open += 1;
        Ok(ConnSlot {
            pool: self.clone(),
            key,
        })
    }

    fn give_back(&self, key: EndpointKey, idle: Idle) {
        let mut st = self.lock();
        if let Some(ep) = st.endpoints.get_mut(&key)
            && let Some(idle) = ep.hand_over(idle)
        {
            ep.idle.push(idle);
        }
    }
}

#[derive(Debug)]
enum Conn {
    H1(Option<Idle>),
    H2(http2::SendRequest<ProxyBody>, Arc<Usage>),
}

/// One request's hold on a connection; the connection goes back to the
/// pool (or is retired) when the lease drops. Keep it until the response
/// body is done.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<ClusterPool>,
    key: EndpointKey,
    conn: Conn,
    max_per_connection: Option<u32>,
    /// A request is on the connection and its response head has not come
    /// back: the sender gave up mid-request. HTTP/1 cannot take another
    /// request on that connection, so it is closed rather than given back.
    abandoned: bool,
    /// Keeps the connection from being retired as idle; released after
    /// the connection is given back (fields drop in order).
    _busy: Option<Busy>,
    _request: RequestSlot,
}

impl Lease {
    /// Sends `req`, whose URI must already be right for the protocol
    /// (origin-form for HTTP/1.1, absolute for HTTP/2).
    pub async fn send(&mut self, req: Request<ProxyBody>) -> Result<Response<Incoming>, SendError> {
        match &mut self.conn {
            Conn::H1(Some(idle)) => {
                self.abandoned = true;
                let resp = idle.tx.send_request(req).await;
                self.abandoned = false;
                Ok(resp?)
            }
            Conn::H2(tx, _) => Ok(tx.send_request(req).await?),
            Conn::H1(None) => Err(SendError::Released),
        }
    }
}

/// Why a request on a leased connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// A bug: the lease had already given its connection back.
    #[error("internal: the connection was already released")]
    Released,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Conn::H1(slot) = &mut self.conn else {
            return;
        };
        let Some(idle) = slot.take() else { return };
        let retire = self.max_per_connection.is_some_and(|m| idle.served >= m);
        if retire || self.abandoned || idle.tx.is_closed() {
            // Dropping the sender closes the connection; its task's slot
            // then frees the count and wakes a waiter.
            return;
        }
        self.pool.give_back(self.key, idle);
    }
}

/// A connection counted against `maxConnections` until it ends.
#[derive(Debug)]
pub struct ConnSlot {
    pool: Arc<ClusterPool>,
    key: EndpointKey,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.connections = st.connections.saturating_sub(1);
        let mut woke = false;
        if let Some(ep) = st.endpoints.get_mut(&self.key) {
            ep.open = ep.open.saturating_sub(1);
            // This connection's own entry, if it was idle or shared.
            ep.idle.retain(|i| !i.tx.is_closed());
            ep.shared.retain(|s| !s.tx.is_closed());
            woke = ep.wake_one();
            if ep.unused() {
                st.endpoints.remove(&self.key);
            }
        }
        // A cluster-wide slot freed: a request waiting on another endpoint
        // may open a connection now.
        if !woke {
            for ep in st.endpoints.values_mut() {
                if ep.wake_one() {
                    break;
                }
            }
        }
    }
}

#[derive(Debug)]
struct RequestSlot(Arc<ClusterPool>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct PendingSlot(Arc<ClusterPool>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.pending = st.pending.saturating_sub(1);
    }
}

async fn connect(
    key: EndpointKey,
    limits: &Limits,
    tls: Option<&TlsSetup>,
    slot: ConnSlot,
) -> Result<Conn, PoolError> {
    let addr = key.addr;
    let fail = |reason: String| PoolError::Connect { addr, reason };
    let idle = limits.idle_timeout;
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => handshake(TokioIo::new(tcp), key.h2, slot, idle).await,
            Some(t) => {
                let io = t
                    .connect(tcp, key.h2, addr)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                handshake(TokioIo::new(io), key.h2, slot, idle).await
            }
        }
    };
    match tokio::time::timeout(limits.connect_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!(
            "no connection within the connect timeout of {:?}",
            limits.connect_timeout
        ))),
    }
}

async fn handshake<I>(
    io: I,
    h2: bool,
    slot: ConnSlot,
    idle_timeout: Duration,
) -> Result<Conn, PoolError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let addr = slot.key.addr;
    let fail = |e: hyper::Error| PoolError::Connect {
        addr,
        reason: format!("HTTP handshake: {e}"),
    };
    let usage = Usage::new();
    if h2 {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(fail)?;
        let watched = usage.clone();
        tokio::spawn(async move {
            let _slot = slot;
            drive(conn, &watched, idle_timeout, addr, "HTTP/2").await;
        });
        Ok(Conn::H2(tx, usage))
    } else {
        let (tx, conn) = http1::Builder::new().handshake(io).await.map_err(fail)?;
        let watched = usage.clone();
        tokio::spawn(async move {
            let _slot = slot;
            drive(conn, &watched, idle_timeout, addr, "HTTP/1.1").await;
        });
        Ok(Conn::H1(Some(Idle {
            tx,
            served: 1,
            usage,
        })))
    }
}

/// Runs an endpoint connection until it ends, or until no lease has held it
/// for `idle_timeout` (then dropping it closes the socket). The timer is
/// re-armed at most once per `idle_timeout` while the connection is in use.
async fn drive<C>(conn: C, usage: &Usage, idle_timeout: Duration, addr: SocketAddr, proto: &str)
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    loop {
        let wake = usage.idle_since().unwrap_or_else(Instant::now) + idle_timeout;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "{proto} connection to endpoint ended");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                if usage.expired(idle_timeout) {
                    tracing::debug!(%addr, ?idle_timeout, "closing an idle {proto} connection to endpoint");
                    return;
                }
            }
        }
    }
}
