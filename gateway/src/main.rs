//! `meshfed-gateway`: the east-west gateway binary.
//!
//! Parses its settings once (a config file, then environment variables, then
//! flags; problems are reported together), then runs the gateway
//! ([`meshfed_gateway::run`]). `meshfed-gateway certs ...` manages
//! certificates ([`meshfed_gateway::identity::cli`]).

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use meshfed_gateway::run::RunConfig;
use meshfed_gateway::{admin, proxy, tunnel};

/// `meshfed-gateway mirror`: the binary's own module, beside `main`.
#[cfg(feature = "kube")]
#[path = "main/mirror.rs"]
mod mirror_command;

/// jemalloc, not the system allocator, with its background thread: after a
/// burst of connections glibc's malloc kept the pages it had touched (3,000
/// stalled callers took RSS from 19 to 79 MiB, still 79 MiB after they
/// closed), while jemalloc's decay gave them back (87 → 28 MiB within 8 s).
/// mimalloc was tried too: 30 MiB idle, 32 KiB per stalled caller, nothing
/// returned within 8 s. See docs/operations.md, "Caller connections".
///
/// Its options are compiled in (`.cargo/config.toml` sets
/// `JEMALLOC_SYS_WITH_MALLOC_CONF`; `_RJEM_MALLOC_CONF` in the environment
/// overrides them at run time):
/// - `tcache_gc_incr_bytes:2097152`. Each thread cache runs a garbage
///   collection pass (flushing part of every bin back to its arena) each
///   time its thread has allocated this many bytes, by default 64 KiB. A
///   proxied request allocates about that much (read buffers, the tunnel's
///   frames, the response body), so the default ran a pass per request:
///   2.3–2.5k instructions on each gateway, 3.7% of the pair's cost per
///   request (docs/benchmarks.md, "jemalloc's thread-cache GC"). At 2 MiB
///   it runs about once per 30 requests. Each bin's size is bounded either
///   way: this moves when the cache is trimmed, not how large it may grow.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// meshfed's east-west gateway: links this cluster to the gateways of other
/// clusters over QUIC with mutual TLS, and routes service-to-service calls
/// (HTTP/1.1, HTTP/2, gRPC, TCP) across them, following the policy snapshot
/// for its cluster.
///
/// Settings come from --config (a YAML map of flag names to values; a list
/// only for a repeatable flag, e.g. `kube-namespace: [a, b]`), then
/// environment variables, then flags (the last wins). Every address accepts
/// port 0; --ready-file then reports the ports the OS picked.
#[derive(Debug, Parser)]
#[command(name = "meshfed-gateway", version, long_version = LONG_VERSION.as_str())]
#[command(after_long_help = AFTER_HELP, args_override_self = true)]
struct Cli {
    /// Read settings from this YAML file (`cluster: east`, `tls-dir: /etc/meshfed/tls`...);
    /// environment variables and flags override it.
    #[arg(long, value_name = "FILE", env = "MESHFED_GATEWAY_CONFIG")]
    config: Option<PathBuf>,

    /// The cluster this gateway belongs to: a `Cluster` declared in the policy
    /// repository. Its certificate must be issued by that cluster's CA.
    #[arg(long, value_name = "NAME", env = "MESHFED_CLUSTER")]
    cluster: String,

    /// This gateway's ID, unique within its cluster (the host name if unset).
    #[arg(long, value_name = "ID", env = "MESHFED_GATEWAY_ID")]
    gateway_id: Option<String>,

    /// Directory with bundle.pem (trust anchors), cert.pem (this gateway's
    /// certificate and its cluster's intermediate) and key.pem, as written by
    /// `meshfed-gateway certs gateway`. Reloaded when the files change (seen
    /// through inotify, a Secret volume's `..data` swap included; checked
    /// every 30 s regardless).
    #[arg(long, value_name = "DIR", env = "MESHFED_TLS_DIR")]
    tls_dir: PathBuf,

    /// File mode: a policy repository to load, validate and compile for this
    /// cluster, and to follow (checked when inotify reports a change, and
    /// every 30 s regardless): a bad edit is refused and the previous
    /// snapshot stays. For a ConfigMap volume, name its `..data` link.
    /// Exclusive with --syncer.
    #[arg(
        long,
        value_name = "DIR",
        env = "MESHFED_POLICY_DIR",
        required_unless_present = "syncer",
        conflicts_with = "syncer"
    )]
    policy_dir: Option<PathBuf>,

    /// Syncer mode: the syncer's gRPC address (HOST:PORT, default port
    /// 15012). The gateway subscribes over mTLS with its certificate from
    /// --tls-dir, applies each snapshot it is sent and ACKs or NACKs it,
    /// and reconnects with backoff, keeping its last good snapshot.
    /// Ready once a snapshot is applied. On SIGTERM it says goodbye as the
    /// drain starts, so the syncer stops waiting for it in rollouts.
    /// Exclusive with --policy-dir.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "MESHFED_SYNCER",
        requires = "syncer_issuer"
    )]
    syncer: Option<String>,

    /// Syncer mode, required: the cluster whose intermediate CA issued the
    /// syncer's certificate (`certs syncer --ca <that cluster's CA>`). A
    /// syncer certificate issued by any other cluster's CA is refused, so
    /// holding one cluster's (or edge site's) CA does not let anyone push
    /// policy to every cluster. See docs/identity.md.
    #[arg(
        long,
        value_name = "CLUSTER",
        env = "MESHFED_SYNCER_ISSUER",
        requires = "syncer"
    )]
    syncer_issuer: Option<String>,

    /// The only SPIFFE ID accepted as the syncer (default:
    /// spiffe://<our trust domain>/meshfed/syncer/syncer, as issued by
    /// `meshfed-gateway certs syncer --id syncer`).
    #[arg(long, value_name = "SPIFFE_ID", env = "MESHFED_SYNCER_ID", requires = "syncer",
          value_parser = parse_syncer_id)]
    syncer_id: Option<meshfed_gateway::identity::SpiffeId>,

    /// Syncer mode: keep the last applied snapshot here (written atomically
    /// before each ACK) and start from it, so the gateway serves even when
    /// the syncer is unreachable at start. Kubernetes discovery: keep the
    /// last endpoint set here too, and serve it when the API server cannot
    /// be listed at start (docs/kubernetes.md).
    #[arg(long, value_name = "DIR", env = "MESHFED_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Static discovery: a YAML file of this cluster's services and endpoints
    /// (see docs), followed on change (inotify on the file and its directory,
    /// so a ConfigMap's `..data` swap is seen; checked every 30 s
    /// regardless). Endpoints named by host (not IP) need
    /// the `dns` feature.
    #[arg(long, value_name = "FILE", env = "MESHFED_DISCOVERY_FILE")]
    discovery_file: Option<PathBuf>,

    /// Kubernetes discovery: Services, EndpointSlices and Pods from the API
    /// server (in-cluster service account, or KUBECONFIG), followed with
    /// watches. Exclusive with --discovery-file. See docs/kubernetes.md.
    /// Needs the `kube` feature.
    #[arg(long, value_name = "BOOL", env = "MESHFED_KUBERNETES", action = clap::ArgAction::Set,
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          conflicts_with = "discovery_file")]
    kubernetes: bool,

    /// Kubernetes discovery with this kubeconfig file (implies --kubernetes).
    /// Needs the `kube` feature.
    #[arg(
        long,
        value_name = "FILE",
        env = "MESHFED_KUBECONFIG",
        conflicts_with = "discovery_file"
    )]
    kubeconfig: Option<PathBuf>,

    /// Namespaces Kubernetes discovery watches besides those the policy
    /// names (repeatable or comma-separated), e.g. those of callers that
    /// call short names. Needs the `kube` feature.
    #[arg(
        long,
        value_name = "NS",
        env = "MESHFED_KUBE_NAMESPACES",
        value_delimiter = ','
    )]
    kube_namespace: Vec<String>,

    /// Which namespaces Kubernetes discovery watches: `policy`, those the
    /// applied policy names (exported services, route, mirror and
    /// DestinationRule hosts, sourceNamespace matches, authorization and
    /// PeerAuthentication namespaces) plus --kube-namespace, following each
    /// new snapshot; or `all`, every namespace. Services elsewhere are
    /// unknown to the gateway with `policy`. Needs the `kube` feature.
    #[arg(long, value_name = "SCOPE", env = "MESHFED_KUBE_WATCH_SCOPE",
          default_value = "policy",
          value_parser = ["policy", "all"])]
    kube_watch_scope: String,

    /// Also require a ServiceExport object (multicluster.x-k8s.io/v1alpha1)
    /// in this cluster for each service Git exports from it; Git still
    /// decides what may be exported. Needs the `kube` feature.
    #[arg(long, value_name = "BOOL", env = "MESHFED_KUBE_SERVICE_EXPORTS",
          action = clap::ArgAction::Set, num_args = 0..=1, default_value = "false",
          default_missing_value = "true")]
    kube_service_exports: bool,

    /// Create mirror Services (`<svc>-<cluster>`, `<svc>-clusterset`) for
    /// remote exports in this process, pointing at this gateway's outbound
    /// Service NAME.NAMESPACE (its ready pods); the gateway's ServiceAccount
    /// then needs write access. deploy/ runs `meshfed-gateway mirror`
    /// instead, so that the gateway only reads. Needs Kubernetes discovery
    /// (the `kube` feature).
    #[arg(long, value_name = "NAME.NAMESPACE", env = "MESHFED_MIRROR_SERVICES",
          value_parser = parse_service_ref)]
    mirror_services: Option<(String, String)>,

    /// Ports of a mirror Service when the exporting cluster's gateways
    /// announce none (an older release, or static discovery) and this
    /// cluster has no Service of the same name to copy them from
    /// (comma-separated). Needs the `kube` feature.
    #[arg(
        long,
        value_name = "PORTS",
        env = "MESHFED_MIRROR_PORTS",
        value_delimiter = ',',
        default_value = "80"
    )]
    mirror_ports: Vec<u16>,

    /// Address of the tunnel that peer gateways connect to: QUIC on this UDP
    /// port, and TCP links (HTTP/2 over mutual TLS) on the same TCP port.
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

    /// A file holding a bearer token the admin API requires (except
    /// /healthz and /readyz). Required when --admin-addr is not loopback.
    #[arg(long, value_name = "FILE", env = "MESHFED_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,

    /// After the drain grace, the outbound listener and every port mapping
    /// stop accepting and peers are told the gateway drains; this is how
    /// long in-flight requests and connections then get to finish.
    #[arg(long, value_name = "DURATION", env = "MESHFED_DRAIN_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    drain_timeout: Duration,

    /// On SIGTERM (or SIGINT), /readyz turns 503 `draining` at once, but
    /// every listener (outbound, port mappings, tunnel) keeps accepting and
    /// serving for this long, so that load balancers that follow readiness
    /// (EndpointSlices, then kube-proxy on every node) stop sending new
    /// connections before the listeners close; then the drain
    /// (--drain-timeout). A second signal ends the grace early; a gateway
    /// that was never ready skips it. Keep terminationGracePeriodSeconds
    /// above grace + 2 × drain timeout + 2 s. 0s: drain at once (no load balancer
    /// in front, e.g. an edge site's single gateway). See docs/kubernetes.md.
    #[arg(long, value_name = "DURATION", env = "MESHFED_DRAIN_GRACE", default_value = "10s",
          value_parser = parse_duration)]
    drain_grace: Duration,

    /// How long a caller connection of the outbound listener may go without
    /// a request. HTTP/1: from when it waits for a request head until the
    /// head is complete (slowloris), which also bounds a kept-alive
    /// connection's idle time. HTTP/2: with no request in flight; it is then
    /// closed with GOAWAY (and dropped up to 5 s later if the caller does not
    /// answer). Counted in meshfed_refusals_total{stage="listener"} as
    /// `header-timeout`, or `idle-timeout` for an HTTP/2 connection that had
    /// served requests. The admin listener bounds its HTTP/1 clients the
    /// same way.
    #[arg(long, value_name = "DURATION", env = "MESHFED_HEADER_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    header_timeout: Duration,

    /// The most caller connections held at once, over the outbound listener
    /// and every port mapping. Past it, new connections are reset at once
    /// and counted in meshfed_refusals_total{stage="listener",
    /// reason="connection-limit"}. The default fits the shipped 128 MiB
    /// memory limit with every connection stalled mid-request-head; raise it
    /// with the memory limit (about 24 KiB per stalled connection). Lowered at start
    /// when the open-files limit cannot hold a descriptor per connection
    /// plus a reserve for the admin server, peers, upstreams and files.
    #[arg(long, value_name = "N", env = "MESHFED_MAX_CONNECTIONS",
          default_value_t = meshfed_gateway::accept::DEFAULT_MAX_CONNECTIONS,
          value_parser = parse_max_connections)]
    max_connections: usize,

    /// The most request bodies one peer gateway (one certificate) may have
    /// in flight to local endpoints at once: requests whose body has
    /// started and not ended, e.g. uploads and gRPC client streams. Past
    /// it, a peer's new body is refused at once with `Overloaded` (503 at
    /// the source) and counted in meshfed_refusals_total{stage="stream",
    /// reason="body-limit"}. The default fits the shipped 128 MiB memory
    /// limit with every body stalled (about 60 KB each, docs/tunnel.md,
    /// "One peer's memory budget"); raise it with the memory limit.
    #[arg(long, value_name = "N", env = "MESHFED_MAX_PEER_REQUEST_BODIES",
          default_value_t = meshfed_gateway::body_budget::DEFAULT_PEER_BODIES,
          value_parser = parse_max_bodies)]
    max_peer_request_bodies: usize,

    /// The most request bodies from all peer gateways in flight to local
    /// endpoints at once (see --max-peer-request-bodies), so that several
    /// hostile peers together still fit the memory limit.
    #[arg(long, value_name = "N", env = "MESHFED_MAX_REQUEST_BODIES",
          default_value_t = meshfed_gateway::body_budget::DEFAULT_BODIES,
          value_parser = parse_max_bodies)]
    max_request_bodies: usize,

    /// The tunnel links' congestion controller. `cubic` (the default) reads
    /// every loss as congestion; `bbr` paces by measured bandwidth and RTT
    /// and keeps its rate through random loss, for lossy edge links
    /// (radio, satellite): at 5% loss and 200 ms RTT it cut p99 by 3 to 5×
    /// here. CUBIC stays the default because BBR cost about 15% of bulk
    /// throughput on a clean link and quinn calls its BBR experimental.
    /// Each link's loss over the last 30 s and a random-loss verdict are
    /// in /peers and meshfed_peer_random_loss, and a warning names this
    /// flag when a link needs it (docs/operations.md, "Lossy links").
    #[arg(long, value_enum, value_name = "CC", env = "MESHFED_CONGESTION_CONTROL",
          default_value_t = CongestionControl::Cubic)]
    congestion_control: CongestionControl,

    /// What the links this gateway dials run over. `quic` is QUIC on UDP;
    /// `tcp` is HTTP/2 over mutual TLS 1.3 on TCP, on the tunnel's port
    /// number, for networks that drop UDP. `auto` chooses per link: it
    /// dials QUIC, and TCP too if QUIC has not connected within 250 ms
    /// (happy eyeballs); the first up wins, QUIC on a tie. A link on TCP
    /// tries QUIC again every 700 ms and moves new streams to it once it
    /// answers, while streams open on TCP finish there (docs/tunnel.md,
    /// "Transports"). A gateway serves both transports whatever this says,
    /// so peers may choose differently.
    #[arg(long, value_enum, value_name = "TRANSPORT", env = "MESHFED_LINK_TRANSPORT",
          default_value_t = LinkTransportArg::Auto)]
    link_transport: LinkTransportArg,

    /// How long Kubernetes discovery's first list may take before the
    /// endpoint set persisted in --state-dir serves instead (and a warning
    /// repeats). Hidden: the default, 30s, is the one documented; tests
    /// shorten it.
    #[arg(long, value_name = "DURATION", env = "MESHFED_KUBE_SYNC_TIMEOUT", default_value = "30s",
          value_parser = parse_duration, hide = true)]
    kube_sync_timeout: Duration,

    /// The sliding window over which each link's loss ratio and random-loss
    /// verdict are computed (/peers, meshfed_peer_loss_ratio,
    /// meshfed_peer_random_loss). Hidden: the default, 30s, is the one
    /// documented; tests shorten it.
    #[arg(long, value_name = "DURATION", env = "MESHFED_LOSS_WINDOW", default_value = "30s",
          value_parser = parse_loss_window, hide = true)]
    loss_window: Duration,

    /// Threads that run the data plane. The default, 1, is the cheapest per
    /// request: every task of a call (caller connection, QUIC stream, link
    /// driver, upstream connection) runs on one thread, with no cross-thread
    /// wake-ups, which cost more CPU than the proxying itself on small
    /// machines (docs/benchmarks.md). One thread serves about 12,000 small
    /// HTTP/1.1 req/s on this project's 2-core benchmark box; give a busy
    /// gateway more (0 means one per CPU).
    #[arg(
        long,
        value_name = "N",
        env = "MESHFED_WORKER_THREADS",
        default_value_t = 1
    )]
    worker_threads: usize,

    /// Local callers: `plaintext` (TLS from callers is routed by SNI,
    /// untouched), or `mutual` (TLS callers present a workload certificate of
    /// this cluster; its identity travels to the destination). Whether
    /// plaintext callers are also admitted is the destination's
    /// PeerAuthentication (STRICT, PERMISSIVE, DISABLE); see docs/traffic.md.
    #[arg(
        long,
        value_name = "MODE",
        env = "MESHFED_OUTBOUND_TLS",
        default_value = "plaintext"
    )]
    outbound_tls: OutboundTls,

    /// The namespace of plaintext local callers whose address does not tell
    /// theirs: their short names (`ratings`, one label) resolve in it.
    /// Unset (the default), the gateway takes a plaintext caller's
    /// namespace from its address among the local endpoints (a pod's IP
    /// belongs to one namespace) and refuses a short name it cannot place
    /// with 400, naming `name.<namespace>` to call instead; it never
    /// guesses `default`. A caller with a workload certificate is in its
    /// certificate's namespace. Set it where every local caller is in one
    /// namespace, e.g. an edge site; short --tcp-port-map hosts need it.
    /// An empty value unsets it (e.g. over a config file's).
    #[arg(long, value_name = "NAMESPACE", env = "MESHFED_CALLER_NAMESPACE",
          value_parser = parse_namespace)]
    caller_namespace: Option<String>,

    /// A listener of its own for one service port, as opaque TCP:
    /// `LISTEN=HOST:PORT`, e.g. `15432=db.default:5432` (repeatable). Use it
    /// for protocols that cannot be detected, such as server-first ones.
    #[arg(
        long,
        value_name = "MAP",
        env = "MESHFED_TCP_PORT_MAP",
        value_delimiter = ','
    )]
    tcp_port_map: Vec<meshfed_gateway::run::TcpMap>,

    /// DNS suffix of in-cluster service names.
    #[arg(
        long,
        value_name = "DOMAIN",
        env = "MESHFED_DOMAIN",
        default_value = "cluster.local"
    )]
    domain: String,

    /// The mesh's shared trust domain.
    #[arg(
        long,
        value_name = "TD",
        env = "MESHFED_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,

    /// Once listening, write the bound addresses to this file as JSON, so that
    /// tests and scripts can use port 0.
    #[arg(long, value_name = "PATH", env = "MESHFED_READY_FILE")]
    ready_file: Option<PathBuf>,

    /// Distributed tracing: send spans over OTLP/gRPC to this collector
    /// (http://HOST:PORT, usually port 4317). Off when unset: no spans, no
    /// exporter, and trace headers pass through the gateway untouched.
    /// Needs the `otel` feature.
    #[arg(long, value_name = "URL", env = "MESHFED_OTLP_ENDPOINT",
          value_parser = meshfed_gateway::trace::parse_endpoint)]
    otlp_endpoint: Option<String>,

    /// Percentage of requests that arrive without a sampling decision
    /// whose trace is recorded (0 to 100). A caller's decision (traceparent
    /// flags, B3) is always followed. 1–5 in production; 100 in tests.
    #[arg(long, value_name = "PERCENT", env = "MESHFED_TRACE_SAMPLING",
          default_value = "1", value_parser = meshfed_gateway::trace::parse_sampling)]
    trace_sampling: f64,

    /// Log format on stderr; verbosity follows RUST_LOG.
    #[arg(
        long,
        value_name = "FORMAT",
        env = "MESHFED_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutboundTls {
    /// Plaintext HTTP and TCP; TLS is passed through by SNI.
    Plaintext,
    /// mTLS with workload certificates.
    Mutual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LinkTransportArg {
    /// QUIC preferred, TCP per link where QUIC does not answer, back to
    /// QUIC when it does.
    Auto,
    /// QUIC over UDP.
    Quic,
    /// HTTP/2 over mutual TLS on TCP.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CongestionControl {
    /// CUBIC: every loss is congestion.
    Cubic,
    /// BBR: paced by measured bandwidth and RTT; for lossy links.
    Bbr,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

const AFTER_HELP: &str = "\
Default ports (Istio's):
  15443/udp  QUIC tunnel between gateways
  15001/tcp  outbound listener (HTTP/1.1, HTTP/2, gRPC, TLS by SNI, CONNECT)
  15020/tcp  admin: /healthz /readyz /metrics /config_dump /peers /mirror/view (localhost)

Policy comes from --policy-dir (file mode) or --syncer (syncer mode, with
--syncer-issuer, --syncer-id and --state-dir); see docs/delivery.md.

Certificates: meshfed-gateway certs --help
Mirror controller (its own Deployment, least privilege): meshfed-gateway mirror --help

Tracing: --otlp-endpoint http://collector:4317 [--trace-sampling 1]; W3C
traceparent and B3 are propagated; see docs/observability.md.

Cargo features (all in the default build; --version lists this binary's):
  kube  Kubernetes discovery, ServiceExports, mirror Services (--kube*, --mirror-*)
  dns   host names in the discovery file, ServiceEntries and Cluster gateways
  otel  span export over OTLP (--otlp-endpoint)
A flag whose feature is missing is refused at start. The edge build without
them: cargo build -p meshfed-gateway --no-default-features (docs/operations.md).

Exit codes: 0 after a clean drain, 1 when the gateway cannot start, 2 for a usage error.";

/// The syncer's gRPC port when --syncer names none (as istiod's 15012).
const DEFAULT_SYNCER_PORT: u16 = 15012;

/// `-V` prints the crate version; `--version` also names the snapshot schema
/// this build accepts from the syncer, and the build's cargo features.
static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (policy snapshot schema {}; features: {})",
        env!("CARGO_PKG_VERSION"),
        meshfed_policy::snapshot::SCHEMA,
        BUILT.names()
    )
});

/// The optional parts a binary was built with: cargo features of this
/// package (docs/operations.md, "Build features").
#[derive(Debug, Clone, Copy)]
struct Features {
    kube: bool,
    dns: bool,
    otel: bool,
}

/// This binary's features.
const BUILT: Features = Features {
    kube: cfg!(feature = "kube"),
    dns: cfg!(feature = "dns"),
    otel: cfg!(feature = "otel"),
};

impl Features {
    /// `kube, dns, otel`, or `none`.
    fn names(self) -> String {
        let on: Vec<&str> = [("kube", self.kube), ("dns", self.dns), ("otel", self.otel)]
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect();
        if on.is_empty() {
            "none".into()
        } else {
            on.join(", ")
        }
    }
}

/// The settings that need a feature `built` lacks: one message per missing
/// feature, naming the flags and the build command that includes it. The
/// flags stay known to every build, so a config file or unit written for
/// the full build is refused with a reason rather than as unknown.
fn missing_features(cli: &Cli, matches: &clap::ArgMatches, built: Features) -> Vec<String> {
    let explicit = |id: &str| {
        matches
            .value_source(id)
            .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue)
    };
    let kube = [
        ("--kubernetes", cli.kubernetes),
        ("--kubeconfig", cli.kubeconfig.is_some()),
        ("--kube-namespace", !cli.kube_namespace.is_empty()),
        (
            "--kube-watch-scope",
            explicit("kube_watch_scope") && cli.kube_watch_scope != "policy",
        ),
        ("--kube-service-exports", cli.kube_service_exports),
        ("--mirror-services", cli.mirror_services.is_some()),
        (
            "--mirror-ports",
            explicit("mirror_ports") && !cli.mirror_ports.is_empty(),
        ),
    ];
    let otel = [("--otlp-endpoint", cli.otlp_endpoint.is_some())];
    let mut out = Vec::new();
    for (feature, have, flags) in [
        ("kube", built.kube, &kube[..]),
        ("otel", built.otel, &otel[..]),
    ] {
        let used: Vec<&str> = flags
            .iter()
            .filter_map(|(flag, set)| set.then_some(*flag))
            .collect();
        if !have && !used.is_empty() {
            out.push(format!(
                "{} {} the `{feature}` feature, and this meshfed-gateway was built without it \
                 (features: {}); build one with it: cargo build -p meshfed-gateway --features {feature}",
                used.join(", "),
                if used.len() == 1 { "needs" } else { "need" },
                built.names()
            ));
        }
    }
    out
}

fn parse_syncer_id(s: &str) -> Result<meshfed_gateway::identity::SpiffeId, String> {
    use meshfed_gateway::identity::SpiffeId;
    match SpiffeId::parse(s).map_err(|e| e.to_string())? {
        id @ SpiffeId::Syncer { .. } => Ok(id),
        other => Err(format!(
            "`{other}` is not a syncer ID; write spiffe://<trust-domain>/meshfed/syncer/<id>"
        )),
    }
}

pub(crate) fn parse_service_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('.') {
        Some((name, ns)) if !name.is_empty() && !ns.is_empty() && !ns.contains('.') => {
            Ok((name.to_string(), ns.to_string()))
        }
        _ => Err(format!(
            "`{s}` is not NAME.NAMESPACE, e.g. meshfed-gateway.meshfed-system"
        )),
    }
}

/// A Kubernetes namespace name: a DNS label; "" (unset) too.
fn parse_namespace(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    let ok = s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a namespace name (lowercase letters, digits and '-', at most 63), e.g. bookinfo"
        ))
    }
}

fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a positive number of connections, e.g. 4096"
        )),
    }
}

fn parse_max_bodies(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a positive number of request bodies, e.g. 1000"
        )),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    meshfed_policy::syntax::parse_duration(s)
}

/// A loss window: at least a second (10 samples of 100 ms), at most an hour.
fn parse_loss_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
        return Err(format!(
            "`{s}`: the loss window must be between 1s and 1h, e.g. 30s"
        ));
    }
    Ok(d)
}

/// The command line with the config file's settings in front, so that flags
/// override them; a setting whose environment variable is set is left to
/// the environment. The rules (one copy, shared with the syncer) are in
/// [`meshfed_cli::config_file`].
fn args_with_config() -> Result<Vec<OsString>, String> {
    meshfed_cli::config_file::args_with_config(
        &Cli::command(),
        std::env::args_os().collect(),
        "MESHFED_GATEWAY_CONFIG",
        &|k: &std::ffi::OsStr| std::env::var_os(k),
    )
}

/// The admin bearer token in `path`, trimmed; an empty or unreadable file
/// is an error naming it (the gateway's --admin-token-file, and the mirror
/// controller's --gateway-admin-token-file).
pub(crate) fn read_admin_token(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("admin token file {} is empty", path.display())),
        Err(e) => Err(format!(
            "cannot read admin token file {}: {e}",
            path.display()
        )),
    }
}

pub(crate) fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

fn main() -> ExitCode {
    meshfed_gateway::identity::cli::exit_if_certs_command();
    #[cfg(feature = "kube")]
    mirror_command::exit_if_mirror_command();
    #[cfg(not(feature = "kube"))]
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("mirror")) {
        eprintln!(
            "meshfed-gateway: `mirror` (the mirror controller) needs the `kube` feature; this binary was built without it"
        );
        return ExitCode::from(2);
    }
    let args = match args_with_config() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshfed-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let matches = Cli::command().get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_logging(cli.log_format);
    let missing = missing_features(&cli, &matches, BUILT);
    if !missing.is_empty() {
        for m in &missing {
            eprintln!("meshfed-gateway: {m}");
        }
        return ExitCode::from(2);
    }
    // Freed pages go back to the system by jemalloc's background thread
    // (dirty then muzzy decay, 10 s each), so an idle gateway shrinks too.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "jemalloc has no background thread; freed memory returns on the next allocations");
    }
    let admin_token = match cli
        .admin_token_file
        .as_deref()
        .map(read_admin_token)
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshfed-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if admin_token.is_none() && !cli.admin_addr.ip().is_loopback() {
        eprintln!(
            "meshfed-gateway: --admin-addr {} is not loopback; set --admin-token-file so the admin API is not open to the network",
            cli.admin_addr
        );
        return ExitCode::from(2);
    }
    let kube_wanted = cli.kubernetes || cli.kubeconfig.is_some();
    if cli.state_dir.is_some() && cli.syncer.is_none() && !kube_wanted {
        eprintln!(
            "meshfed-gateway: --state-dir keeps what the syncer (--syncer) or Kubernetes discovery (--kubernetes, --kubeconfig) sent last; add one of them, or drop --state-dir"
        );
        return ExitCode::from(2);
    }
    if !kube_wanted
        && (!cli.kube_namespace.is_empty()
            || cli.kube_watch_scope == "all"
            || cli.kube_service_exports
            || cli.mirror_services.is_some())
    {
        eprintln!(
            "meshfed-gateway: --kube-namespace, --kube-watch-scope, --kube-service-exports and --mirror-services need Kubernetes discovery; add --kubernetes (in a pod) or --kubeconfig FILE"
        );
        return ExitCode::from(2);
    }
    if cli.kube_watch_scope == "all" && !cli.kube_namespace.is_empty() {
        eprintln!(
            "meshfed-gateway: --kube-namespace adds namespaces to those the policy names, but --kube-watch-scope all watches every namespace already; drop one of them"
        );
        return ExitCode::from(2);
    }
    #[cfg(feature = "kube")]
    let kube = kube_wanted.then_some(meshfed_gateway::discovery::kube::KubeSettings {
        kubeconfig: cli.kubeconfig,
        namespaces: cli.kube_namespace,
        scope: if cli.kube_watch_scope == "all" {
            meshfed_gateway::discovery::kube::WatchScope::All
        } else {
            meshfed_gateway::discovery::kube::WatchScope::Policy
        },
        service_exports: cli.kube_service_exports,
        mirror_target: cli.mirror_services,
        mirror_ports: cli.mirror_ports,
        state_dir: cli.state_dir.clone(),
        sync_timeout: Some(cli.kube_sync_timeout),
    });
    let worker_threads = cli.worker_threads;
    let cfg = RunConfig {
        #[cfg(feature = "kube")]
        kube,
        cluster: cli.cluster,
        gateway_id: cli.gateway_id.unwrap_or_else(hostname),
        tls_dir: cli.tls_dir,
        policy_dir: cli.policy_dir,
        syncer: cli.syncer.map(|a| {
            if a.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                a
            } else {
                format!("{a}:{}", DEFAULT_SYNCER_PORT)
            }
        }),
        syncer_id: cli.syncer_id,
        syncer_issuer: cli.syncer_issuer,
        state_dir: cli.state_dir,
        discovery_file: cli.discovery_file,
        tunnel_addr: cli.tunnel_addr,
        outbound_addr: cli.outbound_addr,
        admin_addr: cli.admin_addr,
        admin_token,
        ready_file: cli.ready_file,
        drain_timeout: cli.drain_timeout,
        drain_grace: cli.drain_grace,
        header_timeout: cli.header_timeout,
        outbound_mutual_tls: cli.outbound_tls == OutboundTls::Mutual,
        tcp_maps: cli.tcp_port_map,
        caller_namespace: cli.caller_namespace.filter(|ns| !ns.is_empty()),
        tracing: meshfed_gateway::trace::Settings {
            otlp_endpoint: cli.otlp_endpoint,
            sampling_percent: cli.trace_sampling,
        },
        max_connections: cli.max_connections,
        max_peer_request_bodies: cli.max_peer_request_bodies,
        max_request_bodies: cli.max_request_bodies,
        congestion: match cli.congestion_control {
            CongestionControl::Cubic => meshfed_gateway::tunnel::link::Congestion::Cubic,
            CongestionControl::Bbr => meshfed_gateway::tunnel::link::Congestion::Bbr,
        },
        loss_window: cli.loss_window,
        link_transport: match cli.link_transport {
            LinkTransportArg::Auto => meshfed_gateway::tunnel::link::LinkTransport::Auto,
            LinkTransportArg::Quic => meshfed_gateway::tunnel::link::LinkTransport::Quic,
            LinkTransportArg::Tcp => meshfed_gateway::tunnel::link::LinkTransport::Tcp,
        },
        policy: meshfed_policy::Options {
            domain: cli.domain,
            trust_domain: cli.trust_domain,
            ..Default::default()
        },
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        runtime.worker_threads(worker_threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshfed-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(meshfed_gateway::run::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("meshfed-gateway: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub(crate) fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::{Cli, Features, missing_features};

    /// jemalloc was built with the options of `.cargo/config.toml`: a build
    /// outside the workspace (or a renamed variable) would drop them without
    /// a word.
    #[test]
    fn jemalloc_is_built_with_the_thread_cache_gc_interval() {
        // (read with its terminating NUL)
        let conf = tikv_jemalloc_ctl::config::malloc_conf::read().unwrap();
        assert!(
            conf.trim_end_matches('\0')
                .split(',')
                .any(|o| o == "tcache_gc_incr_bytes:2097152"),
            "jemalloc's compiled-in options are `{conf}`"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(flags: &[&str]) -> (Cli, clap::ArgMatches) {
        let base = ["meshfed-gateway", "--cluster", "edge", "--tls-dir", "/t"];
        let args = base
            .iter()
            .chain(["--policy-dir", "/p"].iter())
            .chain(flags);
        let matches = Cli::command().try_get_matches_from(args).unwrap();
        (Cli::from_arg_matches(&matches).unwrap(), matches)
    }

    /// The refusal a build without `kube` and `otel` gives (the minimal
    /// binary itself is run in tests/tests/minimal_gateway.rs).
    #[test]
    fn flags_of_a_missing_feature_are_refused_naming_it_and_the_build_command() {
        let none = Features {
            kube: false,
            dns: false,
            otel: false,
        };
        let all = Features {
            kube: true,
            dns: true,
            otel: true,
        };
        let (cli, m) = parse(&[
            "--kubernetes",
            "--mirror-services",
            "gw.meshfed",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
        ]);
        let refused = missing_features(&cli, &m, none);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0].starts_with("--kubernetes, --mirror-services need the `kube` feature")
                && refused[0].ends_with("cargo build -p meshfed-gateway --features kube"),
            "{}",
            refused[0]
        );
        assert!(
            refused[1].starts_with("--otlp-endpoint needs the `otel` feature")
                && refused[1].contains("(features: none)")
                && refused[1].ends_with("cargo build -p meshfed-gateway --features otel"),
            "{}",
            refused[1]
        );
        assert!(missing_features(&cli, &m, all).is_empty());

        // Defaults (and --kubernetes=false) ask for nothing; --mirror-ports
        // has a default, and only an explicit one is refused.
        let (cli, m) = parse(&["--kubernetes=false"]);
        assert!(missing_features(&cli, &m, none).is_empty());
        let (cli, m) = parse(&["--mirror-ports", "80"]);
        let refused = missing_features(&cli, &m, none);
        assert!(
            refused.len() == 1 && refused[0].starts_with("--mirror-ports needs the `kube` feature"),
            "{refused:?}"
        );
    }

    #[test]
    fn the_feature_list_reads_none_when_empty() {
        let some = Features {
            kube: false,
            dns: true,
            otel: true,
        };
        assert_eq!(some.names(), "dns, otel");
        let none = Features {
            kube: false,
            dns: false,
            otel: false,
        };
        assert_eq!(none.names(), "none");
    }
}
