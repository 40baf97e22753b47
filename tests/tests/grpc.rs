//! gRPC across clusters with tonic on both ends: unary and server-streaming
//! calls, non-OK statuses and trailers preserved through two gateways.
//!
//! No .proto is needed: the messages are raw bytes (a pass-through codec),
//! which is all the gateways see anyway.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshfed_tests::federation::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Request, Response, Status};

#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(Clone)]
struct Unary;

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            if msg.as_ref() == b"fail" {
                let mut s = Status::new(Code::ResourceExhausted, "quota spent in west");
                s.metadata_mut()
                    .insert("x-detail", "from-west".parse().unwrap());
                return Err(s);
            }
            let mut out = b"west:".to_vec();
            out.extend_from_slice(&msg);
            Ok(Response::new(Bytes::from(out)))
        })
    }
}

#[derive(Clone)]
struct Stream;

type Items = Pin<Box<dyn tokio_stream::Stream<Item = Result<Bytes, Status>> + Send>>;

impl tonic::server::ServerStreamingService<Bytes> for Stream {
    type Response = Bytes;
    type ResponseStream = Items;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Items>, Status>> + Send>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let n: usize = String::from_utf8_lossy(&req.into_inner())
                .parse()
                .unwrap_or(3);
            let mut items: Vec<Result<Bytes, Status>> = (0..n)
                .map(|i| Ok(Bytes::from(format!("item-{i}"))))
                .collect();
            items.push(Err(Status::new(Code::DataLoss, "stream cut on purpose")));
            let s: Items = Box::pin(tokio_stream::iter(items));
            Ok(Response::new(s))
        })
    }
}

/// A gRPC server (tonic's server machinery on hyper) in "west".
async fn grpc_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let resp = match req.uri().path() {
                            "/test.Echo/Unary" => {
                                tonic::server::Grpc::new(Raw).unary(Unary, req).await
                            }
                            "/test.Echo/Stream" => {
                                tonic::server::Grpc::new(Raw)
                                    .server_streaming(Stream, req)
                                    .await
                            }
                            _ => Status::unimplemented("no such method").into_http(),
                        };
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// east and west, with `grpc-echo` served in west and exported.
async fn setup() -> (tempfile::TempDir, GatewayProcess, GatewayProcess) {
    two_clusters("grpc-echo", grpc_backend().await, vec![])
}

async fn client(via: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{via}"))
        .unwrap()
        .origin("http://grpc-echo.default:50051".parse().unwrap())
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_calls_cross_clusters_with_their_status_and_metadata() {
    let (_dir, east, _west) = setup().await;
    let mut grpc = client(east.outbound).await;
    grpc.ready().await.unwrap();
    let ok: Response<Bytes> = grpc
        .unary(
            Request::new(Bytes::from_static(b"hello")),
            "/test.Echo/Unary".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap();
    assert_eq!(ok.into_inner().as_ref(), b"west:hello");

    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<Bytes, Bytes, Raw>(
            Request::new(Bytes::from_static(b"fail")),
            "/test.Echo/Unary".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "quota spent in west");
    assert_eq!(err.metadata().get("x-detail").unwrap(), "from-west");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_streaming_crosses_clusters_and_ends_with_the_servers_status() {
    let (_dir, east, _west) = setup().await;
    let mut grpc = client(east.outbound).await;
    grpc.ready().await.unwrap();
    let resp = grpc
        .server_streaming::<Bytes, Bytes, Raw>(
            Request::new(Bytes::from_static(b"5")),
            "/test.Echo/Stream".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(String::from_utf8_lossy(&m).into_owned()),
            Ok(None) => panic!("the stream ended without the server's error status"),
            Err(s) => break s,
        }
    };
    assert_eq!(got, ["item-0", "item-1", "item-2", "item-3", "item-4"]);
    assert_eq!(status.code(), Code::DataLoss);
    assert_eq!(status.message(), "stream cut on purpose");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_to_an_unknown_service_gets_a_grpc_status_not_an_http_error() {
    let (_dir, east, _west) = setup().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", east.outbound))
        .unwrap()
        .origin("http://nothing.default:50051".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<Bytes, Bytes, Raw>(
            Request::new(Bytes::new()),
            "/test.Echo/Unary".parse().unwrap(),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(err.metadata().get("x-meshfed-error").unwrap(), "no-route");
}
