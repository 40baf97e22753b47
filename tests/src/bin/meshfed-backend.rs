//! `meshfed-backend`: a small HTTP/1.1 + HTTP/2 server for tests, the demo
//! and benchmarks. Every response carries `x-served-by: <name>`; GET answers
//! `--body-bytes` bytes; POST reads the whole body and answers
//! `<name>:<bytes received>`. `--status` sets the status of every answer
//! (the demo's broken subset answers 503).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A named HTTP backend (HTTP/1.1 and HTTP/2 prior knowledge).
#[derive(Debug, Parser)]
#[command(name = "meshfed-backend", version)]
struct Cli {
    /// Address to listen on (port 0 picks one; it is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The name returned in `x-served-by`.
    #[arg(long, default_value = "backend")]
    name: String,
    /// Size of GET response bodies.
    #[arg(long, default_value_t = 2)]
    body_bytes: usize,
    /// The status of every answer (e.g. 503 for a broken version).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
    status: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    println!("{}", listener.local_addr()?);
    let name: &'static str = Box::leak(cli.name.into_boxed_str());
    let body = Bytes::from(vec![b'x'; cli.body_bytes]);
    let status = hyper::StatusCode::from_u16(cli.status)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    let post = req.method() == hyper::Method::POST;
                    let mut incoming = req.into_body();
                    let mut n = 0usize;
                    while let Some(Ok(f)) = incoming.frame().await {
                        n += f.data_ref().map_or(0, |d| d.len());
                    }
                    let out = if post {
                        Bytes::from(format!("{name}:{n}"))
                    } else {
                        body
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header("x-served-by", name)
                        .body(Full::new(out))
                        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
