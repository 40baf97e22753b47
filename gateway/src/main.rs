//! `meshfed-gateway`: the east-west gateway binary.
//!
//! Today it only parses and checks its flags, then says plainly that the data
//! plane is not built and exits with code 2, so that no script, supervisor or
//! test mistakes it for a running gateway.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::LazyLock;

use clap::{Parser, ValueEnum};
use meshfed_gateway::{admin, proxy, tunnel};

/// Exit code when this build cannot do what was asked: the same code as a
/// usage error, because a caller that expected a gateway must not carry on.
const EXIT_NOT_BUILT: u8 = 2;

/// meshfed's east-west gateway: links this cluster to the gateways of other
/// clusters over QUIC with mutual TLS, and routes service-to-service calls
/// (HTTP/1.1, HTTP/2, gRPC, TCP) across them, following the snapshot that the
/// syncer compiles from the policy repository.
///
/// NOT BUILT YET: this build checks its flags and exits with code 2. The
/// options below are the intended interface; each part lands with its own
/// issue.
///
/// Settings come from --config, then environment variables, then flags (the
/// last wins). Every address accepts port 0; --ready-file then reports the
/// ports the OS picked.
#[derive(Debug, Parser)]
#[command(name = "meshfed-gateway", version, long_version = LONG_VERSION.as_str())]
#[command(after_long_help = AFTER_HELP)]
struct Cli {
    /// Read settings from this file; environment variables and flags override it.
    #[arg(long, value_name = "FILE", env = "MESHFED_GATEWAY_CONFIG")]
    config: Option<PathBuf>,

    /// The cluster this gateway belongs to: a `Cluster` declared in the policy
    /// repository. Its certificate must be issued by that cluster's CA.
    #[arg(long, value_name = "NAME", env = "MESHFED_CLUSTER")]
    cluster: Option<String>,

    /// This gateway's ID, unique within its cluster (the host name if unset).
    /// It appears in the gateway's SPIFFE ID and in rollout status.
    #[arg(long, value_name = "ID", env = "MESHFED_GATEWAY_ID")]
    gateway_id: Option<String>,

    /// The syncer's gRPC address (mTLS), e.g.
    /// `meshfed-syncer.meshfed-system.svc:15012`. Without it the gateway serves
    /// the last snapshot it applied.
    #[arg(long, value_name = "HOST:PORT", env = "MESHFED_SYNCER")]
    syncer: Option<String>,

    /// UDP address of the QUIC tunnel that peer gateways connect to.
    #[arg(long, value_name = "ADDR", env = "MESHFED_TUNNEL_ADDR",
          default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, tunnel::DEFAULT_PORT)))]
    tunnel_addr: SocketAddr,

    /// TCP address of the outbound listener that local clients call through.
    #[arg(long, value_name = "ADDR", env = "MESHFED_OUTBOUND_ADDR",
          default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, proxy::DEFAULT_OUTBOUND_PORT)))]
    outbound_addr: SocketAddr,

    /// TCP address of the admin server: health, readiness, metrics, config
    /// dump. Localhost by default; anywhere else it requires a token or mTLS.
    #[arg(long, value_name = "ADDR", env = "MESHFED_ADMIN_ADDR",
          default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, admin::DEFAULT_PORT)))]
    admin_addr: SocketAddr,

    /// Once listening, write the bound addresses to this file as JSON, so that
    /// tests and scripts can use port 0.
    #[arg(long, value_name = "PATH", env = "MESHFED_READY_FILE")]
    ready_file: Option<PathBuf>,

    /// Log format on stderr; verbosity follows RUST_LOG.
    #[arg(
        long,
        value_name = "FORMAT",
        env = "MESHFED_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

const AFTER_HELP: &str = "\
Default ports (Istio's):
  15443/udp  QUIC tunnel between gateways
  15001/tcp  outbound listener
  15020/tcp  admin and metrics (localhost)

Exit codes: 2 for a usage error, and for now always 2: the data plane is not built yet.";

/// `-V` prints the crate version; `--version` also names the snapshot schema
/// this build accepts from the syncer.
static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (policy snapshot schema {})",
        env!("CARGO_PKG_VERSION"),
        meshfed_policy::snapshot::SCHEMA
    )
});

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!(
        "meshfed-gateway: the data plane is not built yet, so this build cannot serve.\n\
         Its flags are parsed and checked (see --help), but nothing listens: the QUIC \
         tunnel, the outbound listener, the admin server and the config client each \
         land with their own issue."
    );
    ExitCode::from(EXIT_NOT_BUILT)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
