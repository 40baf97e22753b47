//! One request, start to finish: building it from the spec, getting a
//! connection from the pool (dialling or redialling as needed), sending it,
//! reading the whole response, and classifying the outcome. Scheduling,
//! timeouts and counting are the caller's.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, TE};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{LoadSpec, Protocol, SpecError};

type Body = Full<Bytes>;

/// Why a request failed; its `Display` is the reason the report counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    Status(u16),
    GrpcStatus(String),
    GrpcStatusMissing,
    Timeout,
    Connect,
    Reset,
    Protocol,
    Overload,
    InvalidSpec(SpecError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "status {code}"),
            Failure::GrpcStatus(code) => write!(f, "grpc-status {code}"),
            Failure::GrpcStatusMissing => f.write_str("grpc-status missing"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Connect => f.write_str("connect"),
            Failure::Reset => f.write_str("reset"),
            Failure::Protocol => f.write_str("protocol"),
            Failure::Overload => f.write_str("overload"),
            Failure::InvalidSpec(e) => write!(f, "invalid spec: {e}"),
        }
    }
}

impl From<hyper::Error> for Failure {
    /// An error on an established connection: the server's bytes made no
    /// sense (`protocol`), or the connection or stream broke (`reset`).
    fn from(e: hyper::Error) -> Self {
        if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
            Failure::Protocol
        } else {
            Failure::Reset
        }
    }
}

/// How one request ended.
#[derive(Debug)]
pub(super) struct Completed {
    /// The response status, when a whole response arrived.
    pub status: Option<u16>,
    /// The value of the tallied response header, when asked for; `(none)`
    /// when the response lacked it.
    pub tally: Option<String>,
    pub result: Result<(), Failure>,
}

impl Completed {
    pub fn failed(failure: Failure) -> Self {
        Completed {
            status: None,
            tally: None,
            result: Err(failure),
        }
    }
}

/// The parts of every request, validated and built once.
#[derive(Debug)]
pub(super) struct Template {
    protocol: Protocol,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    tally: Option<HeaderName>,
}

impl Template {
    pub fn new(spec: &LoadSpec) -> Result<Self, SpecError> {
        let invalid = |what: &str, e: &dyn fmt::Display| SpecError(format!("{what}: {e}"));
        if !spec.path.starts_with('/') {
            return Err(SpecError(format!(
                "path {:?} must start with '/'",
                spec.path
            )));
        }
        let authority = HeaderValue::from_str(&spec.authority)
            .map_err(|e| invalid(&format!("authority {:?}", spec.authority), &e))?;
        // HTTP/1.1 sends the path (origin form) and a Host header; HTTP/2
        // needs scheme and authority in the URI to fill in the pseudo-headers.
        let (uri, version) = match spec.protocol {
            Protocol::Http1 => (spec.path.parse::<Uri>(), Version::HTTP_11),
            Protocol::Http2 | Protocol::Grpc => (
                format!("http://{}{}", spec.authority, spec.path).parse::<Uri>(),
                Version::HTTP_2,
            ),
        };
        let uri = uri.map_err(|e| {
            invalid(
                &format!("authority {:?} and path {:?}", spec.authority, spec.path),
                &e,
            )
        })?;

        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| invalid(&format!("header name {name:?}"), &e))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|e| invalid(&format!("value of header {name}"), &e))?;
            headers.append(name, value);
        }
        let mut defaults = Vec::new();
        if spec.protocol == Protocol::Http1 {
            defaults.push((HOST, authority));
        }
        if spec.protocol == Protocol::Grpc {
            defaults.push((CONTENT_TYPE, HeaderValue::from_static("application/grpc")));
            defaults.push((TE, HeaderValue::from_static("trailers")));
        }
        for (name, value) in defaults {
            if !headers.contains_key(&name) {
                headers.insert(name, value);
            }
        }

        let tally = match &spec.tally_header {
            None => None,
            Some(name) => Some(
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|e| invalid(&format!("tally header {name:?}"), &e))?,
            ),
        };
        let (method, body) = match spec.protocol {
            Protocol::Grpc => (Method::POST, grpc_frame(spec.body_bytes)),
            Protocol::Http1 | Protocol::Http2 if spec.body_bytes == 0 => {
                (Method::GET, Bytes::new())
            }
            Protocol::Http1 | Protocol::Http2 => {
                (Method::POST, Bytes::from(vec![0u8; spec.body_bytes]))
            }
        };
        Ok(Template {
            protocol: spec.protocol,
            method,
            uri,
            version,
            headers,
            body,
            tally,
        })
    }

    fn request(&self) -> Request<Body> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// Reads the whole response and decides whether it succeeded.
    async fn finish(&self, response: Response<Incoming>) -> Completed {
        let (head, mut body) = response.into_parts();
        let tally = self
            .tally
            .as_ref()
            .map(|name| match head.headers.get(name) {
                Some(value) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
                None => "(none)".to_string(),
            });
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
                Err(e) => return Completed::failed(e.into()),
            }
        }
        let result = match self.protocol {
            Protocol::Http1 | Protocol::Http2 => http_result(head.status),
            Protocol::Grpc => grpc_result(head.status, &head.headers, trailers.as_ref()),
        };
        Completed {
            status: Some(head.status.as_u16()),
            tally,
            result,
        }
    }
}

fn http_result(status: StatusCode) -> Result<(), Failure> {
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(Failure::Status(status.as_u16()))
    }
}

/// A gRPC call succeeded when the response is 200 and `grpc-status` is 0;
/// the status sits in the trailers, or in the headers of a trailers-only
/// response.
fn grpc_result(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Result<(), Failure> {
    if status != StatusCode::OK {
        return Err(Failure::Status(status.as_u16()));
    }
    let grpc_status = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"));
    match grpc_status.map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string()) {
        None => Err(Failure::GrpcStatusMissing),
        Some(code) if code == "0" => Ok(()),
        Some(code) => Err(Failure::GrpcStatus(code)),
    }
}

/// The largest protobuf field number: a field no real message declares.
const PADDING_FIELD: u64 = (1 << 29) - 1;

/// One gRPC length-prefixed message (uncompressed) of `size` bytes.
pub(super) fn grpc_frame(size: usize) -> Bytes {
    let message = grpc_message(size);
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    frame.put_slice(&message);
    frame.freeze()
}

/// A protobuf message of exactly `size` bytes (at least 6 unless 0): one
/// length-delimited field numbered [`PADDING_FIELD`], full of zeros.
pub(super) fn grpc_message(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let tag = (PADDING_FIELD << 3) | 2;
    let tag_len = varint_len(tag);
    // The length prefix's size depends on the length. Where no minimal
    // encoding fits exactly (e.g. 134 bytes), the prefix is padded with a
    // redundant continuation byte, which decoders accept.
    let (len_len, payload) = (1..=10)
        .find_map(|len_len| {
            let payload = size.checked_sub(tag_len + len_len)?;
            (varint_len(payload as u64) <= len_len).then_some((len_len, payload))
        })
        .unwrap_or((1, 0));
    let mut out = Vec::with_capacity(tag_len + len_len + payload);
    put_varint(&mut out, tag, tag_len);
    put_varint(&mut out, payload as u64, len_len);
    out.resize(out.len() + payload, 0);
    out
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Appends `v` as a varint of exactly `len` bytes (`len >= varint_len(v)`).
fn put_varint(out: &mut Vec<u8>, mut v: u64, len: usize) {
    for _ in 1..len {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push((v & 0x7f) as u8);
}

/// A spec's connection pool and request template.
#[derive(Debug)]
pub(super) struct Client {
    template: Template,
    pool: Pool,
}

#[derive(Debug)]
enum Pool {
    Http1(Http1Pool),
    Http2(Http2Pool),
}

impl Client {
    pub fn new(spec: &LoadSpec) -> Result<Self, SpecError> {
        let template = Template::new(spec)?;
        let connections = spec.connections.max(1);
        let pool = match spec.protocol {
            Protocol::Http1 => Pool::Http1(Http1Pool {
                target: spec.target,
                slots: Semaphore::new(connections.min(Semaphore::MAX_PERMITS)),
                idle: Mutex::new(Vec::new()),
            }),
            Protocol::Http2 | Protocol::Grpc => Pool::Http2(Http2Pool {
                target: spec.target,
                slots: (0..connections)
                    .map(|_| tokio::sync::Mutex::default())
                    .collect(),
            }),
        };
        Ok(Client { template, pool })
    }

    /// Sends request number `seq` and reads its response. Not bounded in
    /// time: the caller applies the timeout.
    pub async fn call(&self, seq: u64) -> Completed {
        let result = match &self.pool {
            Pool::Http1(pool) => pool.call(&self.template).await,
            Pool::Http2(pool) => pool.call(&self.template, seq).await,
        };
        result.unwrap_or_else(Completed::failed)
    }
}

async fn dial(target: SocketAddr) -> Result<TokioIo<TcpStream>, Failure> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|_| Failure::Connect)?;
    // Small requests must not wait for Nagle; failing to set it only costs
    // latency.
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

/// HTTP/1.1: idle keep-alive connections, and a semaphore with one permit
/// per connection that may exist.
#[derive(Debug)]
struct Http1Pool {
    target: SocketAddr,
    slots: Semaphore,
    idle: Mutex<Vec<http1::SendRequest<Body>>>,
}

impl Http1Pool {
    async fn call(&self, template: &Template) -> Result<Completed, Failure> {
        // Queue for a connection (see the module docs); never closed.
        let _slot = self.slots.acquire().await.map_err(|_| Failure::Connect)?;
        let (mut conn, reused) = match self.take_idle().await {
            Some(conn) => (conn, true),
            None => (self.dial().await?, false),
        };
        let response = match conn.try_send_request(template.request()).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                // The server closed a kept-alive connection before our
                // request left: safe to retry once on a fresh one.
                Some(req) if reused => {
                    conn = self.dial().await?;
                    conn.send_request(req).await?
                }
                _ => return Err(e.into_error().into()),
            },
        };
        let completed = template.finish(response).await;
        // Only a connection whose response was read to the end can carry
        // the next request.
        if completed.status.is_some() {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
        Ok(completed)
    }

    /// The most recently used idle connection that is still open and ready.
    async fn take_idle(&self) -> Option<http1::SendRequest<Body>> {
        loop {
            let conn = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let mut conn = conn?;
            if !conn.is_closed() && conn.ready().await.is_ok() {
                return Some(conn);
            }
        }
    }

    async fn dial(&self) -> Result<http1::SendRequest<Body>, Failure> {
        let io = dial(self.target).await?;
        let (mut conn, driver) = http1::handshake(io).await.map_err(|_| Failure::Connect)?;
        // The driver ends with the connection; its error, if any, reaches
        // the request in flight.
        tokio::spawn(async move {
            let _ = driver.await;
        });
        conn.ready().await.map_err(|_| Failure::Connect)?;
        Ok(conn)
    }
}

/// HTTP/2: a fixed number of multiplexed connections, used round robin.
/// Each slot numbers its connections, so that a request whose connection
/// failed redials only if no one has yet.
#[derive(Debug)]
struct Http2Pool {
    target: SocketAddr,
    slots: Vec<tokio::sync::Mutex<Slot>>,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u64,
    conn: Option<http2::SendRequest<Body>>,
}

impl Http2Pool {
    async fn call(&self, template: &Template, seq: u64) -> Result<Completed, Failure> {
        let index = usize::try_from(seq % self.slots.len() as u64).unwrap_or(0);
        let (generation, mut conn) = self.connection(index, None).await?;
        let response = match conn.try_send_request(template.request()).await {
            Ok(response) => response,
            Err(mut e) => match e.take_message() {
                // Never sent (the connection closed under us, e.g. GOAWAY):
                // retry once on a fresh connection.
                Some(req) => {
                    let (_, mut conn) = self.connection(index, Some(generation)).await?;
                    conn.send_request(req).await?
                }
                None => return Err(e.into_error().into()),
            },
        };
        Ok(template.finish(response).await)
    }

    /// The connection in slot `index` and its generation, dialled if the
    /// slot is empty, its connection closed, or it is still the `broken`
    /// generation. Requests for the same slot wait for one dial rather than
    /// each dialling.
    async fn connection(
        &self,
        index: usize,
        broken: Option<u64>,
    ) -> Result<(u64, http2::SendRequest<Body>), Failure> {
        let slot = self.slots.get(index).ok_or(Failure::Connect)?;
        let mut slot = slot.lock().await;
        if let Some(conn) = &slot.conn
            && broken != Some(slot.generation)
            && !conn.is_closed()
        {
            return Ok((slot.generation, conn.clone()));
        }
        slot.conn = None;
        let io = dial(self.target).await?;
        let (conn, driver) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            let _ = driver.await;
        });
        slot.generation += 1;
        slot.conn = Some(conn.clone());
        Ok((slot.generation, conn))
    }
}
