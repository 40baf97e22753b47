//! The TCP link transport: HTTP/2 over mutual TLS 1.3, for networks that
//! drop UDP (issue 18).
//!
//! A TCP link carries what a QUIC link carries, mapped onto HTTP/2
//! (docs/tunnel.md, "Transports"):
//!
//! - the same rustls configs and verifiers (mutual TLS, the cluster
//!   binding, the trust-domain rule, the refusal counters), with their own
//!   ALPN, [`ALPN`];
//! - one HTTP/2 stream per tunnel stream: the dialer sends a `POST` to
//!   [`STREAM_PATH`], the dialed side answers `200` at once, and both bodies
//!   carry exactly the QUIC stream's framing in DATA frames. END_STREAM is
//!   QUIC's FIN, RST_STREAM its resets;
//! - the control stream: a `GET` of [`CONTROL_PATH`] the dialer sends once
//!   the link is up; the response body is the announcements, as on QUIC's
//!   unidirectional stream;
//! - liveness: an HTTP/2 PING every `keep_alive`, and a link whose PING is
//!   not answered within `idle_timeout` is dead (the QUIC link's deadlines:
//!   a dead peer is dropped within a second);
//! - windows and stream limits as QUIC's: 8 MiB per stream, 16 MiB per
//!   connection, [`super::link::LinkSettings::max_streams`] concurrent
//!   streams, announced only after the peer's certificate was verified and
//!   its cluster found in the snapshot.
//!
//! It owns the TCP connections' setup and liveness; the links, admission
//! and serving stay in [`super::link`], which treats both transports alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::stream::{H2Recv, H2Send, RecvHalf, SendHalf};

/// The ALPN protocol id of TCP links (QUIC links use
/// [`crate::wire::frame::ALPN`]).
pub const ALPN: &[u8] = b"meshfed-h2/1";

/// The path of a tunnel stream's request.
pub const STREAM_PATH: &str = "/meshfed/stream";
/// The path of the control stream's request.
pub const CONTROL_PATH: &str = "/meshfed/control";

/// A stream's receive window, as a QUIC link's.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// A connection's receive window, as a QUIC link's: the bound on what one
/// peer can make HTTP/2 buffer here.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest DATA frame either side sends: a 64 KiB write of a body or a
/// spliced connection is one frame.
const MAX_FRAME: u32 = 64 << 10;
/// Request heads are a method and a path: anything bigger is not ours.
const MAX_HEADER_LIST: u32 = 4 << 10;

/// The rustls server config of TCP links: `base` (the QUIC links'), with
/// the TCP ALPN.
pub fn server_config(base: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut c = base.clone();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(c)
}

/// The rustls client config of TCP links: `base`, with the TCP ALPN.
pub fn client_config(base: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut c = base.clone();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(c)
}

/// The dialed side's HTTP/2 settings: as many streams as a verified peer
/// may open on a QUIC link.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(max_streams);
    b
}

fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false);
    b
}

/// What the dialer and the dialed side share of a connection: its RTT and
/// why it ended.
#[derive(Debug)]
struct Shared {
    /// Smoothed PING round trip in microseconds; 0 before the first.
    rtt_us: AtomicU64,
    closed: watch::Sender<Option<String>>,
}

/// A dialed TCP link's connection.
#[derive(Debug)]
pub struct TcpConn {
    requests: h2::client::SendRequest<Bytes>,
    remote: SocketAddr,
    shared: Arc<Shared>,
    task: AbortHandle,
}

/// Why a TCP dial failed, and whether anything answered.
#[derive(Debug)]
pub struct DialFailure {
    pub message: String,
    pub answered: bool,
}

impl TcpConn {
    /// Connects to `addr`, runs the TLS handshake asking for `name`, then
    /// HTTP/2's, all within `handshake_timeout`. Returns the connection
    /// and the peer's certificate chain (the caller identifies it).
    pub async fn dial(
        addr: SocketAddr,
        name: &str,
        client: Arc<rustls::ClientConfig>,
        handshake_timeout: Duration,
        keep_alive: Duration,
        idle_timeout: Duration,
    ) -> Result<(TcpConn, Vec<CertificateDer<'static>>), DialFailure> {
        let failed = |message: String| DialFailure {
            message,
            answered: true,
        };
        let deadline = tokio::time::Instant::now() + handshake_timeout;
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(DialFailure {
                    message: format!("{addr} (TCP): {e}; is a gateway listening on TCP there?"),
                    // Refused or unreachable: an answer of sorts; silence
                    // (a firewall dropping SYNs) is the timeout below.
                    answered: e.kind() == std::io::ErrorKind::ConnectionRefused,
                });
            }
            Err(_) => {
                return Err(DialFailure {
                    message: format!(
                        "no gateway answered on {addr} (TCP) within {handshake_timeout:?}; is TCP allowed?"
                    ),
                    answered: false,
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| failed(format!("bad server name `{name}`: {e}")))?;
        let tls = match tokio::time::timeout_at(
            deadline,
            tokio_rustls::TlsConnector::from(client).connect(server_name, tcp),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(failed(format!("{addr} (TCP): TLS handshake failed: {e}"))),
            Err(_) => return Err(failed(format!("{addr} (TCP): TLS handshake timed out"))),
        };
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let (requests, mut connection) =
            match tokio::time::timeout_at(deadline, client_builder().handshake(tls)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(failed(format!(
                        "{addr} (TCP): HTTP/2 handshake failed: {e}"
                    )));
                }
                Err(_) => return Err(failed(format!("{addr} (TCP): HTTP/2 handshake timed out"))),
            };
        let shared = Arc::new(Shared {
            rtt_us: AtomicU64::new(0),
            closed: watch::channel(None).0,
        });
        let ping = connection.ping_pong();
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let reason = tokio::select! {
                r = connection => match r {
                    Ok(()) => "the peer closed the connection".to_string(),
                    Err(e) => e.to_string(),
                },
                r = liveness(ping, &s, keep_alive, idle_timeout) => r,
            };
            s.closed.send_replace(Some(reason));
        })
        .abort_handle();
        Ok((
            TcpConn {
                requests,
                remote: addr,
                shared,
                task,
            },
            chain,
        ))
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// The smoothed PING round trip (zero before the first answer).
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.shared.rtt_us.load(Ordering::Relaxed))
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.closed.borrow().clone()
    }

    /// Waits until the connection ends; returns why.
    pub async fn closed(&self) -> String {
        let mut rx = self.shared.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => "closed".to_string(),
        }
    }

    /// Ends the connection now.
    pub fn close(&self, reason: &str) {
        self.shared
            .closed
            .send_if_modified(|r| r.is_none() && r.replace(reason.to_string()).is_none());
        self.task.abort();
    }

    /// Opens a tunnel stream: waits for the peer's stream credit (its
    /// concurrent-stream limit), as QUIC's `open_bi` does.
    pub async fn open(&self) -> Result<(SendHalf, RecvHalf), h2::Error> {
        let mut requests = self.requests.clone().ready().await?;
        let (response, send) =
            requests.send_request(request(STREAM_PATH, http::Method::POST), false)?;
        Ok((
            SendHalf::H2(Box::new(H2Send::new(send))),
            RecvHalf::H2(Box::new(H2Recv::response(response))),
        ))
    }

    /// Opens the control stream; its response body is the peer's
    /// announcements.
    pub async fn control(&self) -> Result<RecvHalf, h2::Error> {
        let mut requests = self.requests.clone().ready().await?;
        let (response, _) =
            requests.send_request(request(CONTROL_PATH, http::Method::GET), true)?;
        Ok(RecvHalf::H2(Box::new(H2Recv::response(response))))
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn request(path: &'static str, method: http::Method) -> http::Request<()> {
    let mut r = http::Request::new(());
    *r.method_mut() = method;
    // h2 sends the scheme and authority as pseudo-headers; the authority is
    // not a name anyone resolves (the TLS server name is what counts).
    *r.uri_mut() = match path {
        CONTROL_PATH => http::Uri::from_static("https://meshfed.internal/meshfed/control"),
        _ => http::Uri::from_static("https://meshfed.internal/meshfed/stream"),
    };
    r
}

/// PINGs the peer every `keep_alive`; returns (the connection is dead) when
/// one is not answered within `idle_timeout`. A dead peer is noticed at
/// most `keep_alive + idle_timeout` after its last answer, as on QUIC.
pub async fn liveness_loop(
    ping: Option<h2::PingPong>,
    rtt_us: &AtomicU64,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        let sent = Instant::now();
        match tokio::time::timeout(idle_timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {
                let sample = sent.elapsed().as_micros() as u64;
                let old = rtt_us.load(Ordering::Relaxed);
                // RFC 6298's smoothing (7/8 old, 1/8 new), as QUIC's.
                let rtt = if old == 0 {
                    sample
                } else {
                    (old * 7 + sample) / 8
                };
                rtt_us.store(rtt.max(1), Ordering::Relaxed);
            }
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => {
                return format!(
                    "no answer to a PING within {idle_timeout:?}; the peer is gone or the path is down"
                );
            }
        }
        tokio::time::sleep(keep_alive.saturating_sub(sent.elapsed())).await;
    }
}

async fn liveness(
    ping: Option<h2::PingPong>,
    shared: &Shared,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> String {
    liveness_loop(ping, &shared.rtt_us, keep_alive, idle_timeout).await
}

/// The dialed side's answer to a stream's request: `200`, its body to come.
pub fn accept_stream(respond: &mut h2::server::SendResponse<Bytes>) -> Result<SendHalf, h2::Error> {
    let send = respond.send_response(http::Response::new(()), false)?;
    Ok(SendHalf::H2(Box::new(H2Send::new(send))))
}
