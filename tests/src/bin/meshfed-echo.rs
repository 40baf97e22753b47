//! `meshfed-echo`: a TCP echo server for tests (the soak's backend). It
//! prints the address it listens on, then writes back every byte each
//! connection sends and closes its side after the client closes its own.
//! A process of its own so that its descriptors count against its own
//! open-files limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use clap::Parser;

/// A TCP echo server.
#[derive(Debug, Parser)]
#[command(name = "meshfed-echo", version)]
struct Cli {
    /// Address to listen on (port 0 picks one; it is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    println!("{}", listener.local_addr()?);
    meshfed_tests::soak::serve_echo(listener, Arc::new(AtomicUsize::new(0))).await;
    Ok(())
}
