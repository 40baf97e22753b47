//! The tunnel's wire format: frames on one QUIC stream.
//!
//! Pure and synchronous, so that it can be fuzzed without a runtime: bytes in,
//! [`Frame`]s out, and back. The format is specified in docs/tunnel.md; in
//! short, every frame is `type: u8 | length: u32 (big endian) | payload`, and
//! header-like payloads are a list of `tag: u8 | length: u16 | value` fields.
//!
//! The decoder is incremental ([`decode`] returns `Ok(None)` until a whole
//! frame is buffered) and refuses, before buffering it, any frame longer than
//! its type allows, so a peer cannot make us hold more than
//! [`MAX_DATA_FRAME`] bytes for one frame.
//!
//! It does not own streams or connections ([`crate::tunnel::link`]) nor what the
//! fields mean for routing ([`crate::proxy`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// The protocol version this build speaks, negotiated per connection with
/// ALPN (`meshfed/1`).
pub const VERSION: u8 = 1;

/// ALPN protocol ids, newest first. A peer that speaks only older versions
/// negotiates the newest one both know; a peer with none in common is refused
/// at the handshake (docs/tunnel.md, "Versions").
pub const ALPN: &[&[u8]] = &[b"meshfed/1"];

/// Largest header-like payload (OPEN, RESPONSE, TRAILERS, ERROR).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest DATA or ANNOUNCE payload.
pub const MAX_DATA_FRAME: usize = 1024 * 1024;
/// Most fields in one header block.
pub const MAX_FIELDS: usize = 512;

/// Bytes of a frame's header: its type and its payload's length.
pub const FRAME_HEADER: usize = 5;

mod ty {
    pub(super) const OPEN: u8 = 0x01;
    pub(super) const RESPONSE: u8 = 0x02;
    pub(super) const DATA: u8 = 0x03;
    pub(super) const TRAILERS: u8 = 0x04;
    pub(super) const ERROR: u8 = 0x05;
    pub(super) const ACCEPT: u8 = 0x06;
    pub(super) const ANNOUNCE: u8 = 0x07;
}

mod tag {
    pub(super) const KIND: u8 = 0x01;
    pub(super) const SERVICE: u8 = 0x02;
    pub(super) const PORT: u8 = 0x03;
    pub(super) const SUBSET: u8 = 0x04;
    pub(super) const SUBSET_LABEL: u8 = 0x05;
    pub(super) const CALLER: u8 = 0x06;
    pub(super) const SOURCE_VERSION: u8 = 0x07;
    pub(super) const SNI: u8 = 0x08;
    pub(super) const METHOD: u8 = 0x10;
    pub(super) const SCHEME: u8 = 0x11;
    pub(super) const AUTHORITY: u8 = 0x12;
    pub(super) const PATH: u8 = 0x13;
    pub(super) const HEADER: u8 = 0x14;
    pub(super) const STATUS: u8 = 0x20;
    /// Tags at or above this must be understood: an unknown one is an error.
    /// Below it, unknown tags are skipped (newer peers may add them).
    pub(super) const MUST_UNDERSTAND: u8 = 0x80;
}

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// One HTTP request and its response.
    Http,
    /// One TCP connection: after OPEN and ACCEPT, raw bytes both ways.
    Tcp,
}

/// The first frame of a stream, from the source gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    pub kind: StreamKind,
    /// Canonical destination host, e.g. `ratings.default.svc.cluster.local`.
    pub service: String,
    pub port: u16,
    /// The subset the source chose, if any, and the labels it selects.
    pub subset: Option<String>,
    pub subset_labels: Vec<(String, String)>,
    /// The caller's workload SPIFFE ID, when the local caller presented a
    /// certificate. The receiver accepts it only under the trust-domain rule.
    pub caller: Option<String>,
    /// The snapshot version the source routed with.
    pub source_version: Option<String>,
    /// For a TCP stream of TLS the source routed by SNI: the server name the
    /// caller's ClientHello asked for (AuthorizationPolicy
    /// `connection.sni`). Optional tag 0x08: older peers skip it.
    pub sni: Option<String>,
    /// For [`StreamKind::Http`].
    pub http: Option<RequestHead>,
}

/// An HTTP request's head.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestHead {
    pub method: Method,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// An HTTP response's head.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// Why a gateway refused or failed a stream. Travels in ERROR frames and
/// becomes the `x-meshfed-error` response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The service is not exported from the destination cluster.
    NotExported,
    /// No route for the request.
    NoRoute,
    /// No healthy endpoint (or none in the requested subset).
    NoHealthyEndpoint,
    /// Authorization denied the caller.
    Unauthorized,
    /// Connecting to the endpoint failed.
    ConnectFailed,
    /// A connection pool or stream limit is full.
    Overloaded,
    /// The destination's snapshot is older than the source's; retry.
    StaleConfig,
    /// The stream's header was malformed or violated a rule.
    BadRequest,
    /// The upstream did not answer in time.
    Timeout,
    /// The endpoint reset the request or connection.
    UpstreamReset,
    /// Anything else; a bug.
    Internal,
}

impl Refusal {
    const ALL: [Refusal; 11] = [
        Refusal::NotExported,
        Refusal::NoRoute,
        Refusal::NoHealthyEndpoint,
        Refusal::Unauthorized,
        Refusal::ConnectFailed,
        Refusal::Overloaded,
        Refusal::StaleConfig,
        Refusal::BadRequest,
        Refusal::Timeout,
        Refusal::UpstreamReset,
        Refusal::Internal,
    ];

    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            Refusal::NotExported => 1,
            Refusal::NoRoute => 2,
            Refusal::NoHealthyEndpoint => 3,
            Refusal::Unauthorized => 4,
            Refusal::ConnectFailed => 5,
            Refusal::Overloaded => 6,
            Refusal::StaleConfig => 7,
            Refusal::BadRequest => 8,
            Refusal::Timeout => 9,
            Refusal::UpstreamReset => 10,
            Refusal::Internal => 11,
        }
    }

    pub fn from_code(code: u16) -> Refusal {
        Self::ALL
            .into_iter()
            .find(|r| r.code() == code)
            .unwrap_or(Refusal::Internal)
    }

    /// The token in `x-meshfed-error` and in metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NotExported => "not-exported",
            Refusal::NoRoute => "no-route",
            Refusal::NoHealthyEndpoint => "no-healthy-endpoint",
            Refusal::Unauthorized => "unauthorized",
            Refusal::ConnectFailed => "connect-failed",
            Refusal::Overloaded => "overloaded",
            Refusal::StaleConfig => "stale-config",
            Refusal::BadRequest => "bad-request",
            Refusal::Timeout => "upstream-timeout",
            Refusal::UpstreamReset => "upstream-reset",
            Refusal::Internal => "internal",
        }
    }

    /// The HTTP status a caller sees.
    pub fn http_status(self) -> StatusCode {
        match self {
            Refusal::NotExported | Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::Unauthorized => StatusCode::FORBIDDEN,
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::ConnectFailed | Refusal::UpstreamReset => StatusCode::BAD_GATEWAY,
            Refusal::NoHealthyEndpoint | Refusal::Overloaded | Refusal::StaleConfig => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An ERROR frame: a refusal and a human message.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamError {
    pub refusal: Refusal,
    pub message: String,
}

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Open(Box<Open>),
    Response(Box<ResponseHead>),
    Data(Bytes),
    Trailers(HeaderMap),
    Error(StreamError),
    /// The destination accepted a TCP stream; raw bytes follow.
    Accept,
    /// An endpoint announcement (see [`super::announce`]).
    Announce(Bytes),
}

/// Why bytes are not a valid frame. Each is a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("frame type 0x{ty:02x} of {len} bytes exceeds the limit of {limit}")]
    TooLarge { ty: u8, len: usize, limit: usize },
    #[error("header block has more than {MAX_FIELDS} fields")]
    TooManyFields,
    #[error("field 0x{tag:02x} is truncated")]
    Truncated { tag: u8 },
    #[error("unknown must-understand field 0x{0:02x}")]
    UnknownCriticalField(u8),
    #[error("field 0x{tag:02x} is malformed: {why}")]
    Malformed { tag: u8, why: &'static str },
    #[error("missing field: {0}")]
    Missing(&'static str),
}

/// Appends the encoding of `frame` to `out`. A frame the decoder would
/// refuse (a head over [`MAX_HEADER_BLOCK`] or [`MAX_FIELDS`], a payload over
/// [`MAX_DATA_FRAME`]) is not written: `out` is left as it was and the
/// caller gets the same error the peer would have raised, so it can answer
/// the request itself (a 400 for oversized headers) instead of sending
/// something the peer refuses.
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
    match frame {
        Frame::Data(b) | Frame::Announce(b) => {
            let t = if matches!(frame, Frame::Data(_)) {
                ty::DATA
            } else {
                ty::ANNOUNCE
            };
            if b.len() > MAX_DATA_FRAME {
                return Err(FrameError::TooLarge {
                    ty: t,
                    len: b.len(),
                    limit: MAX_DATA_FRAME,
                });
            }
            put_frame_header(out, t, b.len());
            out.extend_from_slice(b);
            Ok(())
        }
        Frame::Accept => {
            put_frame_header(out, ty::ACCEPT, 0);
            Ok(())
        }
        Frame::Open(o) => block(out, ty::OPEN, |f| encode_open(o, f)),
        Frame::Response(r) => block(out, ty::RESPONSE, |f| {
            f.put_u16(tag::STATUS, r.status.as_u16());
            f.headers(&r.headers);
        }),
        Frame::Trailers(h) => block(out, ty::TRAILERS, |f| f.headers(h)),
        Frame::Error(e) => {
            let msg = truncate_utf8(&e.message, MAX_HEADER_BLOCK - 2);
            put_frame_header(out, ty::ERROR, 2 + msg.len());
            out.put_u16(e.refusal.code());
            out.extend_from_slice(msg.as_bytes());
            Ok(())
        }
    }
}

/// The frame header for a DATA frame of `len` bytes, for writers that send
/// the payload separately (no copy).
pub fn data_header(len: usize) -> [u8; FRAME_HEADER] {
    let mut h = [0u8; FRAME_HEADER];
    h[0] = ty::DATA;
    h[1..].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

fn put_frame_header(out: &mut BytesMut, ty: u8, len: usize) {
    out.reserve(FRAME_HEADER + len);
    out.put_u8(ty);
    out.put_u32(len as u32);
}

/// Writes a header-like frame whose length is known only after its fields;
/// takes it back if it breaks a limit.
fn block(
    out: &mut BytesMut,
    ty: u8,
    fields: impl FnOnce(&mut Fields<'_>),
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u8(ty);
    out.put_u32(0);
    let mut f = Fields { out, count: 0 };
    fields(&mut f);
    let count = f.count;
    let len = out.len() - start - FRAME_HEADER;
    if count > MAX_FIELDS {
        out.truncate(start);
        return Err(FrameError::TooManyFields);
    }
    if len > MAX_HEADER_BLOCK {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            ty,
            len,
            limit: MAX_HEADER_BLOCK,
        });
    }
    out[start + 1..start + FRAME_HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

struct Fields<'a> {
    out: &'a mut BytesMut,
    count: usize,
}

impl Fields<'_> {
    fn put(&mut self, tag: u8, value: &[u8]) {
        // Values over u16 cannot be encoded; header values that large are
        // refused by the proxy before they get here, so cut rather than panic.
        let value = &value[..value.len().min(u16::MAX as usize)];
        self.out.put_u8(tag);
        self.out.put_u16(value.len() as u16);
        self.out.extend_from_slice(value);
        self.count += 1;
    }

    fn put_u16(&mut self, tag: u8, v: u16) {
        self.put(tag, &v.to_be_bytes());
    }

    fn pair(&mut self, tag: u8, name: &[u8], value: &[u8]) {
        let total = 2 + name.len() + value.len();
        let total = total.min(u16::MAX as usize);
        self.out.put_u8(tag);
        self.out.put_u16(total as u16);
        self.out.put_u16(name.len() as u16);
        self.out.extend_from_slice(name);
        self.out
            .extend_from_slice(&value[..value.len().min(total - 2 - name.len())]);
        self.count += 1;
    }

    fn headers(&mut self, h: &HeaderMap) {
        for (name, value) in h {
            self.pair(tag::HEADER, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

fn encode_open(o: &Open, f: &mut Fields<'_>) {
    f.put(
        tag::KIND,
        &[match o.kind {
            StreamKind::Http => 1,
            StreamKind::Tcp => 2,
        }],
    );
    f.put(tag::SERVICE, o.service.as_bytes());
    f.put_u16(tag::PORT, o.port);
    if let Some(s) = &o.subset {
        f.put(tag::SUBSET, s.as_bytes());
    }
    for (k, v) in &o.subset_labels {
        f.pair(tag::SUBSET_LABEL, k.as_bytes(), v.as_bytes());
    }
    if let Some(c) = &o.caller {
        f.put(tag::CALLER, c.as_bytes());
    }
    if let Some(v) = &o.source_version {
        f.put(tag::SOURCE_VERSION, v.as_bytes());
    }
    if let Some(s) = &o.sni {
        f.put(tag::SNI, s.as_bytes());
    }
    if let Some(h) = &o.http {
        f.put(tag::METHOD, h.method.as_str().as_bytes());
        f.put(tag::SCHEME, h.scheme.as_bytes());
        f.put(tag::AUTHORITY, h.authority.as_bytes());
        f.put(tag::PATH, h.path.as_bytes());
        f.headers(&h.headers);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The payload length of the DATA frame whose header starts `buf`:
/// `Ok(None)` when `buf` does not start with a whole DATA header (too
/// short, or another frame type). It lets a body be read a part of a frame
/// at a time, so that a reader never buffers a whole 1 MiB frame.
pub fn data_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < FRAME_HEADER || buf[0] != ty::DATA {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_DATA_FRAME {
        return Err(FrameError::TooLarge {
            ty: ty::DATA,
            len,
            limit: MAX_DATA_FRAME,
        });
    }
    Ok(Some(len))
}

/// Decodes one frame from the front of `buf`, consuming it. Returns
/// `Ok(None)` when `buf` does not yet hold a whole frame.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < FRAME_HEADER {
        return Ok(None);
    }
    let ty = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let limit = match ty {
        ty::DATA | ty::ANNOUNCE => MAX_DATA_FRAME,
        ty::OPEN | ty::RESPONSE | ty::TRAILERS | ty::ERROR => MAX_HEADER_BLOCK,
        ty::ACCEPT => 0,
        other => return Err(FrameError::UnknownType(other)),
    };
    if len > limit {
        return Err(FrameError::TooLarge { ty, len, limit });
    }
    if buf.len() < FRAME_HEADER + len {
        buf.reserve(FRAME_HEADER + len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER);
    let payload = buf.split_to(len).freeze();
    let frame = match ty {
        ty::DATA => Frame::Data(payload),
        ty::ANNOUNCE => Frame::Announce(payload),
        ty::ACCEPT => Frame::Accept,
        ty::ERROR => decode_error(payload)?,
        ty::OPEN => Frame::Open(Box::new(decode_open(payload)?)),
        ty::RESPONSE => Frame::Response(Box::new(decode_response(payload)?)),
        ty::TRAILERS => {
            let mut headers = HeaderMap::new();
            for field in fields(payload) {
                let (t, v) = field?;
                match t {
                    tag::HEADER => push_header(&mut headers, v)?,
                    t => skip_unknown(t)?,
                }
            }
            Frame::Trailers(headers)
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    Ok(Some(frame))
}

fn decode_error(mut payload: Bytes) -> Result<Frame, FrameError> {
    if payload.len() < 2 {
        return Err(FrameError::Truncated { tag: 0 });
    }
    let code = payload.get_u16();
    // Invalid UTF-8 is replaced, which can make the text longer; cut it
    // back so that what we decode is something we could encode.
    let message = String::from_utf8_lossy(&payload);
    Ok(Frame::Error(StreamError {
        refusal: Refusal::from_code(code),
        message: truncate_utf8(&message, MAX_HEADER_BLOCK - 2).to_string(),
    }))
}

/// Iterates `(tag, value)` fields of a header block.
fn fields(mut payload: Bytes) -> impl Iterator<Item = Result<(u8, Bytes), FrameError>> {
    let mut count = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || payload.is_empty() {
            return None;
        }
        count += 1;
        if count > MAX_FIELDS {
            failed = true;
            return Some(Err(FrameError::TooManyFields));
        }
        if payload.len() < 3 {
            failed = true;
            return Some(Err(FrameError::Truncated { tag: payload[0] }));
        }
        let t = payload.get_u8();
        let len = payload.get_u16() as usize;
        if payload.len() < len {
            failed = true;
            return Some(Err(FrameError::Truncated { tag: t }));
        }
        Some(Ok((t, payload.split_to(len))))
    })
}

fn skip_unknown(tag: u8) -> Result<(), FrameError> {
    if tag >= tag::MUST_UNDERSTAND {
        Err(FrameError::UnknownCriticalField(tag))
    } else {
        Ok(())
    }
}

fn utf8(tag: u8, v: Bytes) -> Result<String, FrameError> {
    String::from_utf8(v.to_vec()).map_err(|_| FrameError::Malformed {
        tag,
        why: "not UTF-8",
    })
}

fn u16_of(tag: u8, v: &[u8]) -> Result<u16, FrameError> {
    match v {
        [a, b] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(FrameError::Malformed {
            tag,
            why: "expected 2 bytes",
        }),
    }
}

fn split_pair(tag: u8, mut v: Bytes) -> Result<(Bytes, Bytes), FrameError> {
    if v.len() < 2 {
        return Err(FrameError::Truncated { tag });
    }
    let n = v.get_u16() as usize;
    if v.len() < n {
        return Err(FrameError::Truncated { tag });
    }
    let name = v.split_to(n);
    Ok((name, v))
}

fn push_header(headers: &mut HeaderMap, v: Bytes) -> Result<(), FrameError> {
    let (name, value) = split_pair(tag::HEADER, v)?;
    let name = HeaderName::from_bytes(&name).map_err(|_| FrameError::Malformed {
        tag: tag::HEADER,
        why: "invalid header name",
    })?;
    let value = HeaderValue::from_maybe_shared(value).map_err(|_| FrameError::Malformed {
        tag: tag::HEADER,
        why: "invalid header value",
    })?;
    headers.append(name, value);
    Ok(())
}

fn decode_open(payload: Bytes) -> Result<Open, FrameError> {
    let mut kind = None;
    let mut service = None;
    let mut port = None;
    let mut subset = None;
    let mut subset_labels = Vec::new();
    let mut caller = None;
    let mut source_version = None;
    let mut sni = None;
    let mut method = None;
    let mut scheme = None;
    let mut authority = None;
    let mut path = None;
    let mut headers = HeaderMap::new();
    for field in fields(payload) {
        let (t, v) = field?;
        match t {
            tag::KIND => {
                kind = Some(match v.as_ref() {
                    [1] => StreamKind::Http,
                    [2] => StreamKind::Tcp,
                    _ => {
                        return Err(FrameError::Malformed {
                            tag: t,
                            why: "unknown stream kind",
                        });
                    }
                })
            }
            tag::SERVICE => service = Some(utf8(t, v)?),
            tag::PORT => port = Some(u16_of(t, &v)?),
            tag::SUBSET => subset = Some(utf8(t, v)?),
            tag::SUBSET_LABEL => {
                let (k, val) = split_pair(t, v)?;
                subset_labels.push((utf8(t, k)?, utf8(t, val)?));
            }
            tag::CALLER => caller = Some(utf8(t, v)?),
            tag::SOURCE_VERSION => source_version = Some(utf8(t, v)?),
            tag::SNI => sni = Some(utf8(t, v)?),
            tag::METHOD => {
                method = Some(Method::from_bytes(&v).map_err(|_| FrameError::Malformed {
                    tag: t,
                    why: "invalid method",
                })?)
            }
            tag::SCHEME => scheme = Some(utf8(t, v)?),
            tag::AUTHORITY => authority = Some(utf8(t, v)?),
            tag::PATH => path = Some(utf8(t, v)?),
            tag::HEADER => push_header(&mut headers, v)?,
            t => skip_unknown(t)?,
        }
    }
    let kind = kind.ok_or(FrameError::Missing("stream kind"))?;
    let http = match kind {
        StreamKind::Tcp => None,
        StreamKind::Http => Some(RequestHead {
            method: method.ok_or(FrameError::Missing("method"))?,
            scheme: scheme.ok_or(FrameError::Missing("scheme"))?,
            authority: authority.ok_or(FrameError::Missing("authority"))?,
            path: path.ok_or(FrameError::Missing("path"))?,
            headers,
        }),
    };
    Ok(Open {
        kind,
        service: service.ok_or(FrameError::Missing("service"))?,
        port: port.ok_or(FrameError::Missing("port"))?,
        subset,
        subset_labels,
        caller,
        source_version,
        sni,
        http,
    })
}

fn decode_response(payload: Bytes) -> Result<ResponseHead, FrameError> {
    let mut status = None;
    let mut headers = HeaderMap::new();
    for field in fields(payload) {
        let (t, v) = field?;
        match t {
            tag::STATUS => {
                let code = u16_of(t, &v)?;
                status = Some(
                    StatusCode::from_u16(code).map_err(|_| FrameError::Malformed {
                        tag: t,
                        why: "status out of range",
                    })?,
                );
            }
            tag::HEADER => push_header(&mut headers, v)?,
            t => skip_unknown(t)?,
        }
    }
    Ok(ResponseHead {
        status: status.ok_or(FrameError::Missing("status"))?,
        headers,
    })
}

#[cfg(test)]
mod tests;
