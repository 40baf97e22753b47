//! One tunnel stream's two halves, whatever transport carries the link.
//!
//! A stream is a QUIC bidirectional stream on a QUIC link, or one HTTP/2
//! stream on a TCP link (docs/tunnel.md, "Transports"). Both carry the same
//! tunnel framing ([`crate::wire::frame`]); the proxy sees [`SendHalf`] and
//! [`RecvHalf`] and the few operations it uses: write a chunk, finish,
//! reset with a code, learn that the peer stopped reading; read a chunk,
//! stop reading.
//!
//! Enum dispatch, not `Box<dyn>`: the QUIC variant holds quinn's stream as
//! it is, so a QUIC stream costs no allocation and no indirect call more
//! than before. The HTTP/2 variant is boxed, so that it does not make every
//! QUIC stream (and every future that holds one) bigger.
//!
//! It does not own the links ([`super::link`]) nor what streams carry
//! ([`crate::proxy`], [`crate::body`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use quinn::VarInt;
use tokio::io::{AsyncRead, ReadBuf};

/// The sending half of a tunnel stream.
#[derive(Debug)]
pub enum SendHalf {
    Quic(quinn::SendStream),
    H2(Box<H2Send>),
}

/// The receiving half of a tunnel stream.
#[derive(Debug)]
pub enum RecvHalf {
    Quic(quinn::RecvStream),
    H2(Box<H2Recv>),
}

impl From<quinn::SendStream> for SendHalf {
    fn from(s: quinn::SendStream) -> Self {
        SendHalf::Quic(s)
    }
}

impl From<quinn::RecvStream> for RecvHalf {
    fn from(r: quinn::RecvStream) -> Self {
        RecvHalf::Quic(r)
    }
}

/// Why a write (or a finish) failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Quic(#[from] quinn::WriteError),
    #[error("{0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("{}", h2_message(.0))]
    H2(#[from] h2::Error),
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Quic(#[from] quinn::ReadError),
    #[error("{}", h2_message(.0))]
    H2(#[from] h2::Error),
    #[error("stream longer than {0} bytes")]
    TooLong(usize),
}

fn h2_message(e: &h2::Error) -> String {
    match e.reason() {
        Some(r) if e.is_reset() => format!("stream reset by peer (HTTP/2 code {})", u32::from(r)),
        _ => e.to_string(),
    }
}

/// An HTTP/2 error as an I/O error, with the kinds quinn gives its own
/// (a reset is `ConnectionReset`), which [`crate::body`] tells apart.
fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_reset() || e.is_go_away() {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, h2_message(&e))
    } else if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    } else {
        std::io::Error::new(std::io::ErrorKind::NotConnected, e.to_string())
    }
}

impl SendHalf {
    /// Writes all of `buf`.
    ///
    /// Not an `async fn`: the QUIC write's future is returned as it is,
    /// with no state of ours around it, so that a QUIC write costs what it
    /// did before (the request path's futures are size-checked); the
    /// HTTP/2 one is boxed.
    pub fn write_all<'a>(
        &'a mut self,
        buf: &'a [u8],
    ) -> impl Future<Output = Result<(), WriteError>> + 'a {
        match self {
            SendHalf::Quic(s) => {
                Either::Left(s.write_all(buf).map(|r| r.map_err(WriteError::from)))
            }
            SendHalf::H2(s) => Either::Right(
                Box::pin(s.write(Bytes::copy_from_slice(buf))).map(|r| r.map_err(WriteError::from)),
            ),
        }
    }

    /// Writes `chunk` without copying it (as [`Self::write_all`], the
    /// QUIC future as it is).
    pub fn write_chunk(
        &mut self,
        chunk: Bytes,
    ) -> impl Future<Output = Result<(), WriteError>> + '_ {
        match self {
            SendHalf::Quic(s) => {
                Either::Left(s.write_chunk(chunk).map(|r| r.map_err(WriteError::from)))
            }
            SendHalf::H2(s) => {
                Either::Right(Box::pin(s.write(chunk)).map(|r| r.map_err(WriteError::from)))
            }
        }
    }

    /// Ends the stream cleanly (QUIC FIN, HTTP/2 END_STREAM).
    pub fn finish(&mut self) -> Result<(), WriteError> {
        match self {
            SendHalf::Quic(s) => Ok(s.finish()?),
            SendHalf::H2(s) => Ok(s.inner.send_data(Bytes::new(), true)?),
        }
    }

    /// Abandons the stream with `code` (QUIC RESET_STREAM; HTTP/2
    /// RST_STREAM, which ends both directions).
    pub fn reset(&mut self, code: u32) {
        match self {
            SendHalf::Quic(s) => {
                let _ = s.reset(VarInt::from_u32(code));
            }
            SendHalf::H2(s) => s.inner.send_reset(h2::Reason::from(code)),
        }
    }

    /// Resolves when the peer stops reading the stream (QUIC STOP_SENDING,
    /// HTTP/2 RST_STREAM), with its code, or when the link is lost (`None`).
    pub async fn stopped(&mut self) -> Option<u32> {
        match self {
            SendHalf::Quic(s) => match s.stopped().await {
                Ok(Some(code)) => Some(u32::try_from(code.into_inner()).unwrap_or(u32::MAX)),
                Ok(None) | Err(_) => None,
            },
            SendHalf::H2(s) => std::future::poll_fn(|cx| s.inner.poll_reset(cx))
                .await
                .ok()
                .map(u32::from),
        }
    }
}

impl RecvHalf {
    /// The next chunk of at most `max` bytes, in order; `None` at the end.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, ReadError> {
        match self {
            RecvHalf::Quic(r) => Ok(r.read_chunk(max, true).await?.map(|c| c.bytes)),
            RecvHalf::H2(r) => Ok(std::future::poll_fn(|cx| r.poll_chunk(cx, max)).await?),
        }
    }

    /// Everything to the end of the stream, at most `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read_chunk(usize::MAX).await? {
            if out.len() + chunk.len() > limit {
                return Err(ReadError::TooLong(limit));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Stops reading: the peer learns it with `code` (QUIC STOP_SENDING).
    /// HTTP/2 has no such frame: the data the stream holds and any that
    /// arrives is dropped and its window given back; the sending half's
    /// [`SendHalf::reset`] ends the stream for the peer.
    pub fn stop(&mut self, code: u32) {
        match self {
            RecvHalf::Quic(r) => {
                let _ = r.stop(VarInt::from_u32(code));
            }
            RecvHalf::H2(r) => r.stop(),
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RecvHalf::Quic(r) => Pin::new(r).poll_read(cx, buf),
            RecvHalf::H2(r) => {
                let chunk = ready!(r.poll_chunk(cx, buf.remaining())).map_err(h2_io)?;
                if let Some(chunk) = chunk {
                    buf.put_slice(&chunk);
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// The sending half of an HTTP/2 tunnel stream.
#[derive(Debug)]
pub struct H2Send {
    inner: h2::SendStream<Bytes>,
}

impl H2Send {
    pub fn new(inner: h2::SendStream<Bytes>) -> Self {
        H2Send { inner }
    }

    /// Sends `data` as the peer's window allows: at most what it grants at
    /// a time is handed to h2, so a slow reader holds back the writer
    /// rather than h2 buffering without bound.
    async fn write(&mut self, mut data: Bytes) -> Result<(), h2::Error> {
        while !data.is_empty() {
            self.inner.reserve_capacity(data.len());
            // Capacity already assigned is used at once: h2's
            // `poll_capacity` wakes only when capacity grows, so waiting
            // on it with capacity in hand could wait forever.
            let granted = match self.inner.capacity() {
                0 => match std::future::poll_fn(|cx| self.inner.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(e),
                    None => return Err(h2::Reason::STREAM_CLOSED.into()),
                },
                n => n,
            };
            let part = data.split_to(granted.min(data.len()));
            self.inner.send_data(part, false)?;
        }
        Ok(())
    }
}

/// The receiving half of an HTTP/2 tunnel stream. On the dialer's side it
/// starts as the response still to come (the dialed side answers each
/// stream with a `200` head at once, then its frames).
#[derive(Debug)]
pub struct H2Recv {
    state: H2RecvState,
    /// What is left of the last DATA frame.
    pending: Bytes,
}

#[derive(Debug)]
enum H2RecvState {
    Waiting(h2::client::ResponseFuture),
    Open(h2::RecvStream),
    Done,
}

impl H2Recv {
    /// The dialed side's half: the request body.
    pub fn open(recv: h2::RecvStream) -> Self {
        H2Recv {
            state: H2RecvState::Open(recv),
            pending: Bytes::new(),
        }
    }

    /// The dialer's half: the response body, once its head arrives.
    pub fn response(fut: h2::client::ResponseFuture) -> Self {
        H2Recv {
            state: H2RecvState::Waiting(fut),
            pending: Bytes::new(),
        }
    }

    fn stop(&mut self) {
        self.state = H2RecvState::Done;
        self.pending = Bytes::new();
    }

    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, h2::Error>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(max.max(1));
                return Poll::Ready(Ok(Some(self.pending.split_to(n))));
            }
            match &mut self.state {
                H2RecvState::Waiting(fut) => {
                    let resp = ready!(Pin::new(fut).poll(cx));
                    let resp = match resp {
                        Ok(r) => r,
                        Err(e) => {
                            self.state = H2RecvState::Done;
                            return Poll::Ready(Err(e));
                        }
                    };
                    if resp.status() != http::StatusCode::OK {
                        self.state = H2RecvState::Done;
                        return Poll::Ready(Err(h2::Reason::PROTOCOL_ERROR.into()));
                    }
                    self.state = H2RecvState::Open(resp.into_body());
                }
                H2RecvState::Open(recv) => match ready!(recv.poll_data(cx)) {
                    Some(Ok(data)) => {
                        // The window is given back as the data is taken
                        // from h2, so what h2 holds per stream is bounded
                        // by the window and what waits here by one frame.
                        let _ = recv.flow_control().release_capacity(data.len());
                        self.pending = data;
                    }
                    Some(Err(e)) => {
                        self.state = H2RecvState::Done;
                        return Poll::Ready(Err(e));
                    }
                    None => {
                        self.state = H2RecvState::Done;
                        return Poll::Ready(Ok(None));
                    }
                },
                H2RecvState::Done => return Poll::Ready(Ok(None)),
            }
        }
    }
}
