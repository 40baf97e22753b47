//! Admitting TCP connections: how many caller connections the gateway holds
//! at once, and accepting without spinning when descriptors run out.
//!
//! - Caller connections (the outbound listener and every port mapping)
//!   share one limit, `--max-connections` ([`DEFAULT_MAX_CONNECTIONS`]),
//!   lowered at start to fit the open-files limit ([`crate::limits`]). Past
//!   it, a new connection is accepted and reset at once: nothing is read,
//!   nothing waits in the kernel's backlog, no TIME_WAIT is left here, and
//!   the refusal is counted as
//!   `meshfed_refusals_total{stage="listener",reason="connection-limit"}`.
//!   Open connections are `meshfed_caller_connections`.
//! - The admin server has a small limit of its own
//!   ([`ADMIN_MAX_CONNECTIONS`]) and descriptors kept for it, so `/readyz`
//!   and `/metrics` answer while the outbound listener is saturated.
//! - An accept that fails for want of a resource (EMFILE, ENFILE, ENOBUFS,
//!   ENOMEM) leaves the connection in the backlog and the listener ready, so
//!   retrying at once would spin: it backs off from 5 ms to 1 s, and says
//!   so once per episode.
//!
//! What a connection does once admitted is the listeners' business
//! ([`crate::proxy::outbound`], [`crate::admin`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Caller connections held at once by default. Sized for the shipped
/// 128 MiB limit (deploy/base/gateway.yaml): a caller connection that has
/// sent nothing holds little more than protocol detection's state (~1 KiB),
/// but one that has started a request head and stalled holds hyper's read
/// and write buffers, about 24 KiB of RSS (measured). 2,048 of them hold
/// ~50 MiB over a ~20 MiB idle gateway, leaving room for requests in flight
/// (docs/operations.md, "Caller connections").
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;

/// Connections the admin server holds at once (probes, scrapes, dumps).
pub const ADMIN_MAX_CONNECTIONS: usize = 32;

/// How often, at most, a listener at its limit says so in the log.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A limit on connections held at once, shared by the listeners it is given
/// to.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    open: Gauge,
}

impl ConnectionLimit {
    /// A limit of `max` connections; `open` follows how many are held.
    pub fn new(max: usize, open: Gauge) -> Self {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            open,
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// A slot for one more connection, if there is one.
    pub fn try_admit(&self) -> Option<Admitted> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.open.inc();
        Some(Admitted {
            _permit: permit,
            open: self.open.clone(),
        })
    }
}

/// An admitted connection's slot, given back when dropped: keep it for as
/// long as the connection is open.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The connection gauges, registered with the gateway's metrics.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Caller connections open now (outbound listener and port mappings).
    pub caller_connections: Gauge,
    /// Their limit (`--max-connections`, after fitting the open-files limit).
    pub caller_connections_limit: Gauge,
    /// Admin connections open now.
    pub admin_connections: Gauge,
}

impl crate::metrics::Register for ConnectionMetrics {
    /// Registers the gauges under `registry`'s prefix.
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "caller_connections",
            "Caller connections open on the outbound listener and port mappings",
            self.caller_connections.clone(),
        );
        registry.register(
            "caller_connections_limit",
            "The most caller connections held at once (--max-connections, fitted to the open-files limit)",
            self.caller_connections_limit.clone(),
        );
        registry.register(
            "admin_connections",
            "Connections open on the admin server",
            self.admin_connections.clone(),
        );
    }
}

/// Accepts a listener's connections under a [`ConnectionLimit`].
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    limit: ConnectionLimit,
    /// The refusal's `stage` label: `listener` or `admin`.
    stage: &'static str,
    /// For the log: `outbound listener`, `admin server`...
    name: &'static str,
    backoff: Backoff,
    last_full_log: Option<Instant>,
}

impl Acceptor {
    pub fn new(
        listener: TcpListener,
        limit: ConnectionLimit,
        stage: &'static str,
        name: &'static str,
    ) -> Self {
        Acceptor {
            listener,
            limit,
            stage,
            name,
            backoff: Backoff::default(),
            last_full_log: None,
        }
    }

    /// The next admitted connection. Connections past the limit are reset
    /// and counted; accept errors are retried with backoff. Cancel-safe.
    pub async fn accept(&mut self, metrics: &Metrics) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    self.backoff.succeeded(self.name);
                    if let Some(admitted) = self.limit.try_admit() {
                        return (stream, addr, admitted);
                    }
                    metrics.refused(self.stage, "connection-limit");
                    // RST at once: the caller learns now, and the socket
                    // leaves no TIME_WAIT behind.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    self.log_full();
                }
                Err(e) => {
                    let pause = self.backoff.failed(&e, self.name);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    fn log_full(&mut self) {
        let now = Instant::now();
        if self
            .last_full_log
            .is_some_and(|t| now.duration_since(t) < FULL_LOG_EVERY)
        {
            return;
        }
        self.last_full_log = Some(now);
        tracing::warn!(
            listener = self.name,
            limit = self.limit.max(),
            "at the connection limit: new connections are reset until some close (counted in meshfed_refusals_total{{reason=\"connection-limit\"}}; raise --max-connections only with the memory limit)"
        );
    }
}

/// Exponential backoff for a failing accept (no jitter: one listener, and
/// the pause only spaces out retries of the same accept).
#[derive(Debug)]
struct Backoff {
    /// The pauses; `failures() == 0` when the last accept succeeded.
    pause: crate::backoff::Backoff,
    /// Failures in the current episode.
    failures: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            pause: crate::backoff::Backoff::new(
                BACKOFF_MIN,
                BACKOFF_MAX,
                crate::backoff::Jitter::None,
            ),
            failures: 0,
        }
    }
}

impl Backoff {
    /// Records a failed accept; returns how long to wait before the next.
    fn failed(&mut self, e: &io::Error, name: &str) -> Duration {
        self.failures += 1;
        // A connection that died in the backlog is consumed by the failed
        // accept: go on at once.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            return Duration::ZERO;
        }
        if self.failures == 1 || self.pause.failures() == 0 {
            match crate::limits::exhaustion(e) {
                Some(why) => {
                    tracing::error!(listener = name, error = %e, "cannot accept connections: {why}; retrying with backoff")
                }
                None => {
                    tracing::warn!(listener = name, error = %e, "accept failed; retrying with backoff")
                }
            }
        }
        self.pause.next_delay()
    }

    /// Records a successful accept, ending an episode of failures.
    fn succeeded(&mut self, name: &str) {
        if self.failures > 0 && self.pause.failures() > 0 {
            tracing::info!(
                listener = name,
                failures = self.failures,
                "accepting connections again"
            );
        }
        self.failures = 0;
        self.pause.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_accept_backs_off_to_one_second_and_recovers_at_once() {
        let mut b = Backoff::default();
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let pauses: Vec<Duration> = (0..12).map(|_| b.failed(&emfile, "test")).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap_or(&Duration::ZERO), BACKOFF_MAX);
        // Never a zero pause for a resource error: that would spin.
        assert!(pauses.iter().all(|p| !p.is_zero()));
        b.succeeded("test");
        assert_eq!(b.failed(&emfile, "test"), BACKOFF_MIN);
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(b.failed(&aborted, "test"), Duration::ZERO);
    }

    #[test]
    fn a_limit_admits_up_to_its_size_and_frees_a_slot_when_one_closes() {
        let gauge = Gauge::default();
        let limit = ConnectionLimit::new(2, gauge.clone());
        let a = limit.try_admit();
        let b = limit.try_admit();
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_admit().is_none());
        assert_eq!((limit.open(), gauge.get()), (2, 2));
        drop(a);
        assert_eq!((limit.open(), gauge.get()), (1, 1));
        assert!(limit.try_admit().is_some());
    }

    #[tokio::test]
    async fn past_the_limit_a_connection_is_reset_at_once_and_counted() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let metrics = Arc::new(Metrics::new(&[]));
        let limit = ConnectionLimit::new(1, Gauge::default());
        let mut acceptor = Acceptor::new(listener, limit, "listener", "test");
        let _first = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (_held, _, _slot) = acceptor.accept(&metrics).await;
        let mut second = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let m = metrics.clone();
        let serving = tokio::spawn(async move {
            let _ = acceptor.accept(&m).await;
        });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await;
        match read {
            Ok(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("the second connection was not reset: {other:?}"),
        }
        let text = metrics.encode(&[]);
        assert!(
            text.lines()
                .any(|l| l.contains("reason=\"connection-limit\"") && l.ends_with(" 1")),
            "{text}"
        );
        serving.abort();
    }
}
