//! HTTP bodies across the tunnel.
//!
//! [`TunnelBody`] reads DATA and TRAILERS frames from a QUIC stream as an
//! `http_body::Body`, without a task per body: frames are decoded straight
//! from the stream's buffer in `poll_frame`. [`pump`] is the other
//! direction: it writes any body to a stream as frames, then finishes the
//! stream. Together they carry streaming bodies and trailers (gRPC status)
//! across the hop.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame as BodyFrame};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use quinn::{RecvStream, SendStream};

use crate::tunnel::frame::{self, Frame, Refusal};
use crate::tunnel::link::StreamGuard;

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
}

/// A body read from DATA and TRAILERS frames on a QUIC stream.
pub struct TunnelBody {
    recv: RecvStream,
    buf: BytesMut,
    done: bool,
    _guard: Option<StreamGuard>,
}

impl std::fmt::Debug for TunnelBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelBody")
            .field("done", &self.done)
            .finish()
    }
}

impl TunnelBody {
    /// `buf` holds bytes already read past the head frame.
    pub fn new(recv: RecvStream, buf: BytesMut, guard: Option<StreamGuard>) -> Self {
        TunnelBody {
            recv,
            buf,
            done: false,
            _guard: guard,
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
        loop {
            match frame::decode(&mut this.buf) {
                Ok(Some(Frame::Data(b))) => {
                    if b.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(BodyFrame::data(b))));
                }
                Ok(Some(Frame::Trailers(t))) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(BodyFrame::trailers(t))));
                }
                Ok(Some(Frame::Error(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(BodyError::Refused(e))));
                }
                Ok(Some(_)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(BodyError::Unexpected)));
                }
                Ok(None) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            if this.buf.capacity() - this.buf.len() < 16 * 1024 {
                this.buf.reserve(64 * 1024);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.recv),
                cx,
                &mut this.buf
            ));
            match n {
                Ok(0) => {
                    this.done = true;
                    if this.buf.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(BodyError::Read(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "stream ended inside a frame",
                    )))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Reads the first frame of a stream (a head: OPEN, RESPONSE, ACCEPT or
/// ERROR). Returns it with whatever bytes followed it.
pub async fn read_head(recv: &mut RecvStream) -> Result<(Frame, BytesMut), BodyError> {
    let mut buf = BytesMut::with_capacity(4096);
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

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteFrameError {
    #[error("{0}")]
    Encode(#[from] frame::FrameError),
    #[error("peer stream: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Writes a head frame. A head over the wire limits is refused here, before
/// anything is sent.
pub async fn write_frame(send: &mut SendStream, f: &Frame) -> Result<(), WriteFrameError> {
    let mut buf = BytesMut::with_capacity(512);
    frame::encode(f, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Writes an ERROR frame and finishes the stream.
pub async fn refuse(send: &mut SendStream, refusal: Refusal, message: impl Into<String>) {
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
pub async fn pump<B>(mut body: B, send: &mut SendStream) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    while let Some(next) = body.frame().await {
        let f = match next {
            Ok(f) => f,
            Err(e) => {
                let e: BoxError = e.into();
                refuse(send, Refusal::UpstreamReset, e.to_string()).await;
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
