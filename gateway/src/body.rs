//! HTTP bodies across the tunnel.
//!
//! [`TunnelBody`] reads DATA and TRAILERS frames from a tunnel stream as an
//! `http_body::Body`, without a task per body: frames are decoded straight
//! from the stream's buffer in `poll_frame`. [`pump`] is the other
//! direction: it writes any body to a stream as frames, then finishes the
//! stream. Together they carry streaming bodies and trailers (gRPC status)
//! across the hop.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame as BodyFrame};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::body_budget::{BodyBudget, BodyPermit, OverBudget};
use crate::tunnel::link::StreamGuard;
use crate::tunnel::stream::{RecvHalf, SendHalf};
use crate::wire::frame::{self, Frame, Refusal};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type the proxy hands around.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body of bytes.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Why a tunneled body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("peer stream failed: {0}")]
    Read(#[from] std::io::Error),
    #[error("peer sent a malformed frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("peer gateway refused mid-stream ({}): {}", .0.refusal.reason(), .0.message)]
    Refused(frame::StreamError),
    #[error("unexpected frame in a body")]
    Unexpected,
    #[error("request body refused: {0}")]
    OverBudget(OverBudget),
}

/// A body read from DATA and TRAILERS frames on a tunnel stream.
///
/// A DATA frame is handed on a part at a time, as its bytes arrive, so the
/// body never buffers a whole frame (up to [`frame::MAX_DATA_FRAME`], 1 MiB,
/// which a peer could otherwise make every stream hold).
pub struct TunnelBody {
    recv: RecvHalf,
    buf: BytesMut,
    /// Payload bytes of the DATA frame being read that have not arrived.
    data_left: usize,
    done: bool,
    /// How much the next read reserves: [`FIRST_READ`], doubled by each
    /// read that fills half of it, up to the body's read buffer.
    want: usize,
    _guard: Option<StreamGuard>,
    gate: Option<Box<Gate>>,
}

/// What holds a peer's request body to the budget of bodies in flight
/// ([`crate::body_budget`]) and to one chunk in the endpoint connection's hands
/// at a time.
struct Gate {
    budget: BodyBudget,
    peer: Arc<str>,
    permit: Option<BodyPermit>,
    refused: Arc<OnceLock<OverBudget>>,
    held: Arc<Held>,
}

/// Whether the chunk last handed out is still held by its reader (hyper,
/// until the bytes are written to the endpoint's socket).
#[derive(Default)]
struct Held {
    out: AtomicBool,
    waker: AtomicWaker,
}

impl Held {
    /// True when no chunk is held; else the task is woken once it is let go.
    fn poll_free(&self, cx: &Context<'_>) -> bool {
        if !self.out.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        !self.out.load(Ordering::Acquire)
    }
}

/// A chunk that tells its [`Held`] when the last reference to it goes.
struct Tracked {
    chunk: Bytes,
    held: Arc<Held>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.chunk
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.held.out.store(false, Ordering::Release);
        self.held.waker.wake();
    }
}

/// Read buffer of a body: 64 KiB for throughput, 16 KiB for a peer's
/// request body, whose memory a peer controls (many may stall at once).
const READ_BUFFER: usize = 64 * 1024;
const GATED_READ_BUFFER: usize = 16 * 1024;
/// What a body's first read reserves: most bodies are small, and a 64 KiB
/// buffer per response was a large allocation (and its free) per request.
/// A body that keeps filling its reads reaches the full buffer in four.
const FIRST_READ: usize = 4 * 1024;

impl std::fmt::Debug for TunnelBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelBody")
            .field("done", &self.done)
            .finish()
    }
}

impl TunnelBody {
    /// `buf` holds bytes already read past the head frame.
    pub fn new(recv: RecvHalf, buf: BytesMut, guard: Option<StreamGuard>) -> Self {
        TunnelBody {
            recv,
            buf,
            data_left: 0,
            done: false,
            want: FIRST_READ,
            _guard: guard,
            gate: None,
        }
    }

    /// A peer's request body, held to `budget` as `peer` (its SPIFFE ID):
    /// it takes a place at its first byte of data (or holds `permit`,
    /// taken already) and gives it back at its end. Past the budget it
    /// fails with [`BodyError::OverBudget`], also left in the returned
    /// cell. It reads 16 KiB at a time and hands on one chunk at a time, so
    /// a stalled body holds at most about 16 KiB here.
    pub fn gated(
        recv: RecvHalf,
        buf: BytesMut,
        budget: BodyBudget,
        peer: Arc<str>,
        permit: Option<BodyPermit>,
    ) -> (Self, Arc<OnceLock<OverBudget>>) {
        let refused = Arc::new(OnceLock::new());
        let mut body = TunnelBody::new(recv, buf, None);
        body.gate = Some(Box::new(Gate {
            budget,
            peer,
            permit,
            refused: refused.clone(),
            held: Arc::default(),
        }));
        (body, refused)
    }

    /// Hands on a chunk of data, taking a place in the budget first.
    fn admit(&mut self, chunk: Bytes) -> Result<BodyFrame<Bytes>, BodyError> {
        let Some(g) = self.gate.as_mut() else {
            return Ok(BodyFrame::data(chunk));
        };
        if g.permit.is_none() {
            match g.budget.try_acquire(&g.peer) {
                Ok(p) => g.permit = Some(p),
                Err(e) => {
                    let _ = g.refused.set(e);
                    self.done = true;
                    return Err(BodyError::OverBudget(e));
                }
            }
        }
        g.held.out.store(true, Ordering::Release);
        let held = g.held.clone();
        Ok(BodyFrame::data(Bytes::from_owner(Tracked { chunk, held })))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BodyError>>> {
        if let Some(g) = &self.gate
            && !g.held.poll_free(cx)
        {
            return Poll::Pending;
        }
        loop {
            // Inside a DATA frame: hand on what has arrived of it.
            if self.data_left > 0 && !self.buf.is_empty() {
                let n = self.data_left.min(self.buf.len());
                self.data_left -= n;
                let chunk = self.buf.split_to(n).freeze();
                return Poll::Ready(Some(self.admit(chunk)));
            }
            if self.data_left == 0 {
                match frame::data_len(&self.buf) {
                    Ok(Some(len)) => {
                        self.buf.advance(frame::FRAME_HEADER);
                        self.data_left = len;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
                match frame::decode(&mut self.buf) {
                    Ok(Some(Frame::Data(b))) => {
                        if b.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(self.admit(b)));
                    }
                    Ok(Some(Frame::Trailers(t))) => {
                        self.done = true;
                        return Poll::Ready(Some(Ok(BodyFrame::trailers(t))));
                    }
                    Ok(Some(Frame::Error(e))) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(BodyError::Refused(e))));
                    }
                    Ok(Some(_)) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(BodyError::Unexpected)));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
            }
            let max = if self.gate.is_some() {
                GATED_READ_BUFFER
            } else {
                READ_BUFFER
            };
            let want = self.want.min(max);
            if self.buf.capacity() - self.buf.len() < want / 4 {
                self.buf.reserve(want);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.recv),
                cx,
                &mut self.buf
            ));
            if let Ok(n) = n
                && n >= want / 2
            {
                self.want = (want * 2).min(max);
            }
            match n {
                Ok(0) => {
                    self.done = true;
                    if self.buf.is_empty() && self.data_left == 0 {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(BodyError::Read(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "stream ended inside a frame",
                    )))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let r = this.poll_next(cx);
        // An ended body gives its place back at once, not when hyper drops it.
        if this.done
            && let Some(g) = this.gate.as_mut()
        {
            g.permit = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Reads the first frame of a stream (a head: OPEN, RESPONSE, ACCEPT or
/// ERROR). Returns it with whatever bytes followed it.
///
/// The buffer starts at 1 KiB, which holds a usual head, and grows to what
/// a bigger one declares: a peer may open 10,000 streams at once and fill
/// each buffer with its body's first bytes, so its first size is paid
/// 10,000 times (4 KiB was 40 MB of a 128 MiB gateway).
pub async fn read_head(recv: &mut RecvHalf) -> Result<(Frame, BytesMut), BodyError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(f) = frame::decode(&mut buf)? {
            return Ok((f, buf));
        }
        let n = tokio_util::io::read_buf(recv, &mut buf).await?;
        if n == 0 {
            return Err(BodyError::Read(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stream ended before its head",
            )));
        }
    }
}

/// Whether a request's body is known to be empty already: its stream ended
/// right after the head. Takes, without waiting, whatever has arrived after
/// the head into `rest` (call it with `rest` empty). A body that has neither
/// started nor ended is not empty: it may start at any time.
pub fn ended_after_head(recv: &mut RecvHalf, rest: &mut BytesMut) -> bool {
    use futures_util::FutureExt;
    matches!(
        tokio_util::io::read_buf(recv, rest).now_or_never(),
        Some(Ok(0))
    )
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteFrameError {
    #[error("{0}")]
    Encode(#[from] frame::FrameError),
    #[error("peer stream: {0}")]
    Write(#[from] crate::tunnel::stream::WriteError),
}

/// Writes a head frame. A head over the wire limits is refused here, before
/// anything is sent.
pub async fn write_frame(send: &mut SendHalf, f: &Frame) -> Result<(), WriteFrameError> {
    let mut buf = BytesMut::with_capacity(512);
    frame::encode(f, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Writes an ERROR frame and finishes the stream.
pub async fn refuse(send: &mut SendHalf, refusal: Refusal, message: impl Into<String>) {
    let f = Frame::Error(frame::StreamError {
        refusal,
        message: message.into(),
    });
    let _ = write_frame(send, &f).await;
    let _ = send.finish();
}

/// Writes `body` as DATA frames and trailers, then finishes the stream. A
/// body error becomes an ERROR frame (so the peer sees a failure, not a
/// clean end), and the stream is reset if the peer went away.
pub async fn pump<B>(body: B, send: &mut SendHalf) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pump_inner(body, send, false).await
}

/// [`pump`] for a caller's request body: when the caller fails it, the
/// destination must not blame its endpoint. A malformed body becomes an
/// ERROR frame with [`Refusal::BadRequest`]; a caller that went away resets
/// the stream (the destination sees its source cancel).
pub async fn pump_request<B>(body: B, send: &mut SendHalf) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pump_inner(body, send, true).await
}

async fn pump_inner<B>(mut body: B, send: &mut SendHalf, request: bool) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    while let Some(next) = body.frame().await {
        let f = match next {
            Ok(f) => f,
            Err(e) => {
                let e: BoxError = e.into();
                match (request, CallerFault::of(&*e)) {
                    (false, _) => refuse(send, Refusal::UpstreamReset, e.to_string()).await,
                    (true, CallerFault::Malformed) => {
                        refuse(send, Refusal::BadRequest, format!("request body: {e}")).await
                    }
                    (true, CallerFault::Aborted) => {
                        send.reset(0);
                    }
                }
                return Err(e);
            }
        };
        match f.into_data() {
            Ok(mut data) => {
                // DATA frames are at most MAX_DATA_FRAME; split bigger chunks.
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(frame::MAX_DATA_FRAME));
                    let header = frame::data_header(part.len());
                    send.write_all(&header).await?;
                    send.write_chunk(part).await?;
                }
            }
            Err(f) => {
                if let Ok(trailers) = f.into_trailers() {
                    write_frame(send, &Frame::Trailers(trailers)).await?;
                }
            }
        }
    }
    send.finish()?;
    Ok(())
}

/// How a caller (a local one, or the remote one behind a peer's stream)
/// failed its own request body. Neither is the endpoint's fault: it is
/// answered as the caller's (`400 bad-request`, `499 source-cancelled`, as
/// Envoy and nginx do) and never counts toward outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerFault {
    /// The body broke the protocol: bad chunked framing, a malformed
    /// tunnel frame, more than a limit allows.
    Malformed,
    /// The caller stopped sending: it closed or reset its connection or
    /// stream before the body was complete.
    Aborted,
}

impl CallerFault {
    /// Classifies a body error by its cause chain.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> CallerFault {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(e) = next {
            if let Some(b) = e.downcast_ref::<BodyError>() {
                return match b {
                    BodyError::Read(_) => CallerFault::Aborted,
                    BodyError::Refused(se) if se.refusal == Refusal::BadRequest => {
                        CallerFault::Malformed
                    }
                    BodyError::Refused(_) => CallerFault::Aborted,
                    BodyError::Frame(_) | BodyError::Unexpected => CallerFault::Malformed,
                    // Refused here, not the endpoint's fault either.
                    BodyError::OverBudget(_) => CallerFault::Aborted,
                };
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    // hyper's decoder: bad chunk sizes, extensions, trailers.
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                        CallerFault::Malformed
                    }
                    _ => CallerFault::Aborted,
                };
            }
            if e.is::<http_body_util::LengthLimitError>() {
                return CallerFault::Malformed;
            }
            next = e.source();
        }
        CallerFault::Aborted
    }

    /// The status recorded (and answered, if the caller still listens).
    pub fn status(self) -> http::StatusCode {
        match self {
            CallerFault::Malformed => http::StatusCode::BAD_REQUEST,
            // nginx's "client closed request"; Envoy records the same.
            CallerFault::Aborted => {
                http::StatusCode::from_u16(499).unwrap_or(http::StatusCode::BAD_REQUEST)
            }
        }
    }

    /// The token in `x-meshfed-error` and in metrics.
    pub fn reason(self) -> &'static str {
        match self {
            CallerFault::Malformed => Refusal::BadRequest.reason(),
            CallerFault::Aborted => "source-cancelled",
        }
    }
}

/// A caller's request body that remembers whether, and how, it failed:
/// what lets [`crate::upstream`] tell a caller's fault from an
/// endpoint's when a request to the endpoint fails.
pub struct Watched {
    body: ProxyBody,
    fault: std::sync::Arc<std::sync::OnceLock<CallerFault>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("fault", &self.fault.get())
            .finish_non_exhaustive()
    }
}

impl Watched {
    /// `body`, watched; the cell is set at the body's first error.
    pub fn wrap(body: ProxyBody) -> (ProxyBody, std::sync::Arc<std::sync::OnceLock<CallerFault>>) {
        let fault = std::sync::Arc::new(std::sync::OnceLock::new());
        let watched = Watched {
            body,
            fault: fault.clone(),
        };
        (watched.boxed_unsync(), fault)
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BoxError>>> {
        let r = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if let Some(Err(e)) = &r {
            let _ = self.fault.set(CallerFault::of(&**e));
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper_body_error(kind: std::io::ErrorKind) -> BoxError {
        // What hyper's server hands a service for a broken request body: a
        // body error caused by its decoder's io::Error.
        struct E(std::io::Error);
        impl std::fmt::Debug for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "body error")
            }
        }
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error reading a body from connection")
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        Box::new(E(std::io::Error::new(kind, "x")))
    }

    #[test]
    fn a_callers_body_errors_are_told_apart_by_cause() {
        use std::io::ErrorKind::*;
        assert_eq!(
            CallerFault::of(&*hyper_body_error(InvalidInput)),
            CallerFault::Malformed,
            "bad chunk size"
        );
        assert_eq!(
            CallerFault::of(&*hyper_body_error(InvalidData)),
            CallerFault::Malformed
        );
        assert_eq!(
            CallerFault::of(&*hyper_body_error(UnexpectedEof)),
            CallerFault::Aborted,
            "upload stopped early"
        );
        let reset: BoxError = Box::new(BodyError::Read(std::io::Error::new(
            ConnectionReset,
            "stream reset by peer",
        )));
        assert_eq!(CallerFault::of(&*reset), CallerFault::Aborted);
        let refused: BoxError = Box::new(BodyError::Refused(frame::StreamError {
            refusal: Refusal::BadRequest,
            message: "request body: bad chunk".into(),
        }));
        assert_eq!(CallerFault::of(&*refused), CallerFault::Malformed);
        assert_eq!(CallerFault::Aborted.status().as_u16(), 499);
        assert_eq!(CallerFault::Malformed.reason(), "bad-request");
    }

    #[tokio::test]
    async fn a_watched_body_records_its_first_error() {
        let failing = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
            Ok(BodyFrame::data(Bytes::from_static(b"abc"))),
            Err(hyper_body_error(std::io::ErrorKind::InvalidInput)),
        ]))
        .boxed_unsync();
        let (mut body, fault) = Watched::wrap(failing);
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        assert_eq!(fault.get(), None);
        assert!(body.frame().await.is_some_and(|f| f.is_err()));
        assert_eq!(fault.get(), Some(&CallerFault::Malformed));
    }
}
