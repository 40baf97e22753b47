//! `meshfed-syncer`: the syncer binary.
//!
//! Parses its settings once (a config file, then environment variables,
//! then flags), reports every problem together, then runs: Git mirror →
//! last good snapshots restored → HTTP listener (webhook, status, metrics)
//! and gRPC config server bound → ready file → sync loop. SIGTERM or SIGINT
//! stops it cleanly. `meshfed-syncer status` is the rollout client.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use meshfed_policy::syntax::parse_duration;
use meshfed_syncer::git::{
    GitSource, RemoteAuth, Secret, SourceConfig, TokenStyle, TrustedSigners,
};
use meshfed_syncer::metrics::Metrics;
use meshfed_syncer::pipeline::{Pipeline, SyncState};
use meshfed_syncer::rollout::{Published, Rollout};
use meshfed_syncer::status::{self, ClientConfig, RolloutState, StatusApi, exit};
use meshfed_syncer::waves::Waves;
use meshfed_syncer::{server, trigger};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// meshfed's syncer: pulls mesh policy from a Git repository, validates the
/// whole federation, compiles one snapshot per commit and per cluster, pushes
/// it over gRPC to every gateway, and tracks which gateways applied which
/// commit.
///
/// Without a subcommand it runs the syncer. Settings come from --config (a
/// YAML map of long flag names to values), then environment variables, then
/// flags (the last wins). Every address accepts port 0; --ready-file then
/// reports the ports the OS picked.
#[derive(Debug, Parser)]
#[command(name = "meshfed-syncer", version, long_version = LONG_VERSION.as_str())]
#[command(args_conflicts_with_subcommands = true, after_long_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,

    /// Log format on stderr; verbosity follows RUST_LOG.
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        env = "MESHFED_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the syncer's state, or a commit's rollout: which clusters and
    /// gateways applied it, rejected it, or are pending, and where its
    /// rollout waves stand. With --wait, block until it is live everywhere.
    /// Exit codes: 0 shown / live everywhere (every wave passed), 1 NACKed
    /// by a gateway, rejected or held by the syncer, halted, or rolled back
    /// (the gate is named), 2 usage error or syncer unreachable, 3
    /// --timeout passed while pending or progressing.
    Status(StatusArgs),
    /// Override a commit's rollout through the waves of the repository's
    /// RolloutPolicy: `resume SHA` opens a halted or rolled-back wave again
    /// with its gates overridden (or skips the gates of the wave baking
    /// now); `abort SHA` sends every cluster the commit reached back to its
    /// last good snapshot. Needs the syncer's token (--token-file) when it
    /// has one. Exit codes: 0 done, 1 refused (the answer says why), 2
    /// usage error or syncer unreachable.
    Rollout(RolloutArgs),
}

#[derive(Debug, Args)]
struct RolloutArgs {
    #[arg(value_enum)]
    action: RolloutAction,

    /// The commit (4 to 40 hex digits) being rolled out.
    #[arg(value_name = "SHA")]
    commit: String,

    /// The syncer's HTTP address.
    #[arg(
        long,
        value_name = "URL",
        env = "MESHFED_SYNCER_HTTP",
        default_value = "http://127.0.0.1:15014"
    )]
    server: String,

    /// File holding the bearer token of the syncer's HTTP API.
    #[arg(long, value_name = "FILE", env = "MESHFED_HTTP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RolloutAction {
    /// Open the halted or rolled-back wave again, gates overridden; or skip
    /// the gates of the wave baking now.
    Resume,
    /// Send every cluster the commit reached back to its last good snapshot.
    Abort,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Read settings from this file (YAML: long flag names to values);
    /// environment variables and flags override it.
    #[arg(long, value_name = "FILE", env = "MESHFED_SYNCER_CONFIG")]
    config: Option<PathBuf>,

    /// The Git remote that holds the mesh policy: a local path, file://,
    /// git://, http(s):// or ssh:// (or user@host:path). Credentials in the
    /// URL are never logged; prefer --git-token-file.
    #[arg(long, value_name = "URL", env = "MESHFED_REPO")]
    repo: Option<String>,

    /// The branch to follow, or a full ref (refs/tags/prod). Force-pushes
    /// are followed.
    #[arg(
        long,
        value_name = "NAME",
        env = "MESHFED_BRANCH",
        default_value = "main"
    )]
    branch: String,

    /// Only read policy under this directory of the repository (the root by
    /// default).
    #[arg(long, value_name = "DIR", env = "MESHFED_REPO_PATH")]
    path: Option<PathBuf>,

    /// Only read files matching these globs (relative to --path), e.g.
    /// `mesh/**`. Repeat or separate with commas. Default: every *.yaml and
    /// *.yml file; hidden directories are never read.
    #[arg(
        long,
        value_name = "GLOB",
        env = "MESHFED_INCLUDE",
        value_delimiter = ','
    )]
    include: Vec<String>,

    /// Skip files matching these globs (relative to --path), e.g.
    /// `charts/**`. Repeat or separate with commas.
    #[arg(
        long,
        value_name = "GLOB",
        env = "MESHFED_EXCLUDE",
        value_delimiter = ','
    )]
    exclude: Vec<String>,

    /// How often to fetch when no webhook arrives, e.g. `30s` or `2m`.
    #[arg(long, value_name = "DURATION", env = "MESHFED_POLL_INTERVAL",
          default_value = "30s", value_parser = parse_duration)]
    poll_interval: Duration,

    /// File holding the webhook's secret (GitHub/Gitea HMAC key, GitLab
    /// token). Without it POST /hooks/git answers 401 and only polling
    /// triggers fetches.
    #[arg(long, value_name = "FILE", env = "MESHFED_WEBHOOK_SECRET_FILE")]
    webhook_secret_file: Option<PathBuf>,

    /// File holding a token for an HTTP(S) remote. The environment
    /// variable MESHFED_GIT_TOKEN may hold the token itself instead.
    #[arg(long, value_name = "FILE", env = "MESHFED_GIT_TOKEN_FILE")]
    git_token_file: Option<PathBuf>,

    /// How the token is sent: `basic` (user name + token as password;
    /// GitHub, GitLab, Gitea) or `bearer` (an Authorization header).
    #[arg(
        long,
        value_name = "STYLE",
        env = "MESHFED_GIT_TOKEN_STYLE",
        default_value = "basic"
    )]
    git_token_style: TokenStyleArg,

    /// The user name for basic auth when the URL has none
    /// (default `x-access-token`), or for SSH (default `git`).
    #[arg(long, value_name = "NAME", env = "MESHFED_GIT_USER")]
    git_user: Option<String>,

    /// Private key file for an SSH remote (unencrypted). The host must be in
    /// ~/.ssh/known_hosts.
    #[arg(long, value_name = "FILE", env = "MESHFED_SSH_KEY")]
    ssh_key: Option<PathBuf>,

    /// Accept only commits signed with SSH signatures (git's gpg.format=ssh)
    /// by a key in --trusted-keys; others are rejected like invalid policy.
    #[arg(long, env = "MESHFED_REQUIRE_SIGNED", requires = "trusted_keys")]
    require_signed: bool,

    /// Trusted signing keys: OpenSSH public keys or git allowed-signers
    /// lines, one per line. OpenPGP keys are refused (not supported).
    #[arg(
        long,
        value_name = "FILE",
        env = "MESHFED_TRUSTED_KEYS",
        requires = "require_signed"
    )]
    trusted_keys: Option<PathBuf>,

    /// The most one fetch may bring, in bytes (suffixes Ki, Mi, Gi): bytes
    /// received from a network remote, or the new objects' uncompressed size
    /// from a local one. A bigger fetch is refused, reported in `status`,
    /// and the last good snapshots stay in force. The default fits the
    /// syncer's 512 MiB memory limit.
    #[arg(long, value_name = "BYTES", env = "MESHFED_MAX_FETCH_BYTES",
          default_value = "128Mi", value_parser = parse_bytes)]
    max_fetch_bytes: u64,

    /// The most one fetch may take, e.g. `60s`: connecting to the remote,
    /// and each wait for it to answer, fail after this long, and a transfer
    /// still running then is aborted. A timed-out fetch is reported in
    /// `status` like any failed fetch, and the last good snapshots stay in
    /// force. SIGTERM does not wait for a fetch in progress beyond 5 s.
    #[arg(long, value_name = "DURATION", env = "MESHFED_FETCH_TIMEOUT",
          default_value = "60s", value_parser = parse_duration)]
    fetch_timeout: Duration,

    /// Hold a valid commit that deletes more than this percentage of the
    /// last good commit's resources (its Clusters, exports and policies);
    /// it goes live once a commit containing it carries the trailer
    /// `Meshfed-Allow-Deletion: true`. 100 turns the safeguard off.
    #[arg(long, value_name = "PERCENT", env = "MESHFED_MAX_DELETION_PERCENT",
          default_value_t = meshfed_syncer::pipeline::DEFAULT_MAX_DELETION_PERCENT,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    max_deletion_percent: u8,

    /// How many gateway ids one gateway certificate may hold (replicas that
    /// share a certificate each have their own --gateway-id). A new id past
    /// it replaces the certificate's longest-disconnected one, or is refused
    /// when all are connected.
    #[arg(long, value_name = "N", env = "MESHFED_MAX_GATEWAYS_PER_IDENTITY",
          default_value_t = meshfed_syncer::rollout::DEFAULT_MAX_IDS_PER_IDENTITY)]
    max_gateways_per_identity: usize,

    /// Directory for the Git mirror and the last good snapshots, which a
    /// restarted syncer serves before its first fetch.
    #[arg(long, value_name = "DIR", env = "MESHFED_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// TCP address of the gRPC config server that gateways stream snapshots
    /// from (mTLS).
    #[arg(long, value_name = "ADDR", env = "MESHFED_GRPC_ADDR",
          default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, server::DEFAULT_GRPC_PORT)))]
    grpc_addr: SocketAddr,

    /// The syncer's credentials for the config server's mTLS: bundle.pem,
    /// cert.pem, key.pem (`meshfed-gateway certs syncer`).
    #[arg(long, value_name = "DIR", env = "MESHFED_TLS_DIR")]
    tls_dir: Option<PathBuf>,

    /// Run without the gRPC config server (no gateway can subscribe): to
    /// check a repository's commits and serve their status only.
    #[arg(long, env = "MESHFED_NO_GRPC", conflicts_with = "tls_dir")]
    no_grpc: bool,

    /// TCP address of the HTTP listener: webhook, status API, metrics.
    /// Localhost by default; bound elsewhere (to receive webhooks), the status
    /// API and metrics require --http-token-file.
    #[arg(long, value_name = "ADDR", env = "MESHFED_HTTP_ADDR",
          default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, status::DEFAULT_HTTP_PORT)))]
    http_addr: SocketAddr,

    /// File holding the bearer token that /status, /rollout and /metrics
    /// require (the webhook needs its signature instead).
    #[arg(long, value_name = "FILE", env = "MESHFED_HTTP_TOKEN_FILE")]
    http_token_file: Option<PathBuf>,

    /// HTTP/2 keep-alive PING interval on every gateway's config
    /// connection. With --keepalive-timeout it bounds how long a dead or
    /// frozen gateway (killed host, SIGSTOP, cut network) still shows as
    /// connected: at most interval + timeout.
    #[arg(long, value_name = "DURATION", env = "MESHFED_KEEPALIVE_INTERVAL",
          default_value = "5s", value_parser = parse_duration)]
    keepalive_interval: Duration,

    /// A gateway connection whose keep-alive PING is not answered within
    /// this is closed and the gateway marked disconnected.
    #[arg(long, value_name = "DURATION", env = "MESHFED_KEEPALIVE_TIMEOUT",
          default_value = "5s", value_parser = parse_duration)]
    keepalive_timeout: Duration,

    /// A gateway still counts for rollouts this long after it was last
    /// seen (a disconnected one counts as pending). A gateway that drains
    /// says goodbye and stops counting at once, so this covers only
    /// gateways that vanished without one (killed, cut off).
    #[arg(long, value_name = "DURATION", env = "MESHFED_KNOWN_WINDOW",
          default_value = "10m", value_parser = parse_duration)]
    known_window: Duration,

    /// The record of a gateway not seen for this long (gone without a
    /// goodbye, or left with one) is removed from memory and from
    /// gateways.json, so records do not pile up with every rollout's pod
    /// names. At least --known-window.
    #[arg(long, value_name = "DURATION", env = "MESHFED_FORGET_GATEWAYS_AFTER",
          default_value = "24h", value_parser = parse_duration)]
    forget_gateways_after: Duration,

    /// How long a client of the HTTP listener (webhook, /status, /metrics)
    /// may take to send a request head, and a webhook its body; also how
    /// long a kept-alive connection may sit idle. A slow or stalled client
    /// is then disconnected (the webhook answers 408 to a stalled body).
    #[arg(long, value_name = "DURATION", env = "MESHFED_HEADER_TIMEOUT",
          default_value = "10s", value_parser = parse_duration)]
    header_timeout: Duration,

    /// The mesh's DNS suffix for in-cluster service names.
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
        value_name = "DOMAIN",
        env = "MESHFED_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,

    /// Once listening, write the bound addresses to this file as JSON
    /// ({"http": ..., "grpc": ...}), so that tests and scripts can use port 0.
    #[arg(long, value_name = "PATH", env = "MESHFED_READY_FILE")]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TokenStyleArg {
    Basic,
    Bearer,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The syncer's HTTP address.
    #[arg(
        long,
        value_name = "URL",
        env = "MESHFED_SYNCER_HTTP",
        default_value = "http://127.0.0.1:15014"
    )]
    server: String,

    /// Wait until every known gateway of the clusters the commit targets has
    /// applied SHA, or a later commit that contains it; then exit 0.
    #[arg(long, value_name = "SHA")]
    wait: Option<String>,

    /// With --wait: give up after this long with exit code 3, naming the
    /// pending gateways.
    #[arg(long, value_name = "DURATION", requires = "wait",
          default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,

    /// File holding the bearer token of the syncer's status API.
    #[arg(long, value_name = "FILE", env = "MESHFED_HTTP_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// Print the raw JSON instead of a table.
    #[arg(long)]
    json: bool,
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
  15012/tcp  gRPC config server (mTLS)
  15014/tcp  HTTP: POST /hooks/git (signed), GET /status, /rollout/SHA, /metrics,
             POST /rollout/SHA/resume|abort (localhost)

Environment: MESHFED_GIT_TOKEN may hold the Git token itself (never logged).

Exit codes of the syncer: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when it
fails while running, 2 for a usage or configuration error.
Exit codes of `status`: 0 shown, or with --wait live on every known gateway
(and, with a RolloutPolicy, every wave passed); 1 NACKed by a gateway,
rejected or held by the syncer, halted, or rolled back by a gate (named) or
an operator; 2 usage error or syncer unreachable; 3 --timeout passed while
pending or progressing (the gateways or the wave are named).
Exit codes of `rollout resume|abort`: 0 done, 1 refused, 2 usage error or
syncer unreachable.

See docs/syncer.md.";

/// `-V` prints the crate version; `--version` also names the snapshot schema
/// this build writes for gateways.
static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (policy snapshot schema {})",
        env!("CARGO_PKG_VERSION"),
        meshfed_policy::snapshot::SCHEMA
    )
});

fn main() -> ExitCode {
    let args = match args_with_config() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshfed-syncer: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    meshfed_identity::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshfed-syncer: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Some(Command::Status(a)) => ExitCode::from(runtime.block_on(status_command(a))),
        Some(Command::Rollout(a)) => ExitCode::from(runtime.block_on(rollout_command(a))),
        None => {
            let settings = match Settings::check(cli.run) {
                Ok(s) => s,
                Err(problems) => {
                    eprintln!(
                        "meshfed-syncer: cannot start:\n  - {}",
                        problems.join("\n  - ")
                    );
                    return ExitCode::from(2);
                }
            };
            // Before anything uses libgit2.
            meshfed_syncer::git::timeouts::set(settings.source.fetch_timeout);
            let outcome = runtime.block_on(run(settings));
            // A fetch still in libgit2 (a blocking thread) must not hold
            // the exit: dropping the runtime would wait for it.
            runtime.shutdown_timeout(Duration::from_millis(500));
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("meshfed-syncer: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Everything `run` needs, checked.
struct Settings {
    source: SourceConfig,
    max_deletion_percent: u8,
    poll: Duration,
    webhook_secret: Option<Secret>,
    http_token: Option<Secret>,
    state_dir: PathBuf,
    grpc: Option<(SocketAddr, PathBuf)>,
    http_addr: SocketAddr,
    known_window: Duration,
    forget_gateways_after: Duration,
    header_timeout: Duration,
    server: server::ServerSettings,
    opts: meshfed_policy::Options,
    ready_file: Option<PathBuf>,
}

fn read_secret(path: &Path, what: &str, problems: &mut Vec<String>) -> Option<Secret> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim())),
        Ok(_) => {
            problems.push(format!("{what} {} is empty", path.display()));
            None
        }
        Err(e) => {
            problems.push(format!("cannot read {what} {}: {e}", path.display()));
            None
        }
    }
}

impl Settings {
    fn check(a: RunArgs) -> Result<Settings, Vec<String>> {
        let mut problems = Vec::new();
        let repo = a.repo.clone().unwrap_or_else(|| {
            problems.push("--repo is required (the Git remote holding the mesh policy)".into());
            String::new()
        });
        let state_dir = a.state_dir.clone().unwrap_or_else(|| {
            problems.push(
                "--state-dir is required (the Git mirror and the last good snapshots live there)"
                    .into(),
            );
            PathBuf::new()
        });
        if a.state_dir.is_some()
            && let Err(e) = std::fs::create_dir_all(&state_dir)
        {
            problems.push(format!(
                "cannot create --state-dir {}: {e}",
                state_dir.display()
            ));
        }
        let selection = match meshfed_policy::fs::Selection::new(&a.include, &a.exclude) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("--include/--exclude: {e}"));
                Default::default()
            }
        };
        let token = match (&a.git_token_file, std::env::var("MESHFED_GIT_TOKEN")) {
            (Some(p), _) => read_secret(p, "--git-token-file", &mut problems),
            (None, Ok(t)) if !t.trim().is_empty() => Some(Secret::new(t.trim())),
            _ => None,
        };
        if let Some(k) = &a.ssh_key
            && !k.is_file()
        {
            problems.push(format!("--ssh-key {} is not a readable file", k.display()));
        }
        let signers = match (&a.trusted_keys, a.require_signed) {
            (Some(p), true) => match TrustedSigners::load(p) {
                Ok(s) => Some(s),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            },
            _ => None,
        };
        let webhook_secret = a
            .webhook_secret_file
            .as_deref()
            .and_then(|p| read_secret(p, "--webhook-secret-file", &mut problems));
        let http_token = a
            .http_token_file
            .as_deref()
            .and_then(|p| read_secret(p, "--http-token-file", &mut problems));
        if !a.http_addr.ip().is_loopback() && http_token.is_none() {
            problems.push(format!(
                "--http-addr {} is not a loopback address, so /status and /metrics would be \
                 exposed: set --http-token-file (the webhook stays public and signed)",
                a.http_addr
            ));
        }
        let grpc = match (&a.tls_dir, a.no_grpc) {
            (Some(d), _) => Some((a.grpc_addr, d.clone())),
            (None, true) => None,
            (None, false) => {
                problems.push(
                    "--tls-dir is required: the config server serves gateways over mTLS with the \
                     syncer's credentials (`meshfed-gateway certs syncer`); or --no-grpc to run \
                     without it"
                        .into(),
                );
                None
            }
        };
        if a.max_gateways_per_identity == 0 {
            problems.push("--max-gateways-per-identity must be at least 1".into());
        }
        if a.forget_gateways_after < a.known_window {
            problems.push(format!(
                "--forget-gateways-after ({:?}) must be at least --known-window ({:?}): a record \
                 must outlive the window in which its gateway still counts",
                a.forget_gateways_after, a.known_window
            ));
        }
        if a.max_fetch_bytes == 0 {
            problems.push("--max-fetch-bytes must be more than 0".into());
        }
        if a.poll_interval.is_zero() {
            problems.push("--poll-interval must be more than 0".into());
        }
        if a.fetch_timeout < Duration::from_millis(100) {
            problems.push("--fetch-timeout must be at least 100ms".into());
        }
        for (flag, d) in [
            ("--keepalive-interval", a.keepalive_interval),
            ("--keepalive-timeout", a.keepalive_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!(
                    "{flag} must be more than 0 (it bounds how long a dead gateway looks connected)"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let style = match a.git_token_style {
            TokenStyleArg::Basic => TokenStyle::Basic,
            TokenStyleArg::Bearer => TokenStyle::Bearer,
        };
        Ok(Settings {
            source: SourceConfig {
                url: repo,
                reference: a.branch,
                path: a.path,
                selection,
                auth: RemoteAuth {
                    token,
                    token_style: style,
                    user: a.git_user,
                    ssh_key: a.ssh_key,
                },
                mirror: state_dir.join("mirror.git"),
                signers,
                max_fetch_bytes: a.max_fetch_bytes,
                fetch_timeout: a.fetch_timeout,
            },
            max_deletion_percent: a.max_deletion_percent,
            poll: a.poll_interval,
            webhook_secret,
            http_token,
            state_dir,
            grpc,
            http_addr: a.http_addr,
            known_window: a.known_window,
            forget_gateways_after: a.forget_gateways_after,
            header_timeout: a.header_timeout,
            server: server::ServerSettings {
                keepalive_interval: a.keepalive_interval,
                keepalive_timeout: a.keepalive_timeout,
                admission: meshfed_syncer::rollout::Admission {
                    max_ids_per_identity: a.max_gateways_per_identity,
                    known_window: a.known_window,
                },
                ..server::ServerSettings::default()
            },
            opts: meshfed_policy::Options {
                domain: a.domain,
                trust_domain: a.trust_domain,
                ..Default::default()
            },
            ready_file: a.ready_file,
        })
    }
}

async fn run(s: Settings) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let source = {
        let cfg = s.source.clone();
        tokio::task::spawn_blocking(move || GitSource::open(cfg)).await??
    };
    let source = Arc::new(source);
    tracing::info!(
        repo = %source.display_url(),
        reference = %source.config().remote_ref(),
        path = ?source.config().path,
        poll = ?s.poll,
        webhook = s.webhook_secret.is_some(),
        signatures = source.config().signers.is_some(),
        "syncer starting"
    );

    let mut registry = Registry::with_prefix("meshfed");
    let metrics = Arc::new(Metrics::default());
    metrics.register(&mut registry);
    let (publish_tx, publish_rx) = watch::channel::<Option<Arc<Published>>>(None);
    let state = Arc::new(SyncState::default());
    let (rollout, problem) = Rollout::persistent(&s.state_dir);
    if let Some(p) = problem {
        tracing::warn!("{p}");
    }
    let known = rollout.gateways().len();
    if known > 0 {
        tracing::info!(
            gateways = known,
            "gateway records restored; they count as pending until they reconnect"
        );
    }
    let saver = tokio::spawn(rollout.clone().keep_saved());
    let pruner = tokio::spawn(rollout.clone().keep_pruned(s.forget_gateways_after));
    let golden = meshfed_syncer::golden::Golden::default();
    let waves = Arc::new(
        Waves::new(
            publish_tx.clone(),
            rollout.clone(),
            golden.clone(),
            s.known_window,
            Some(s.state_dir.clone()),
        )
        .with_metrics(metrics.clone()),
    );
    let pipeline = Arc::new(
        Pipeline::new(
            source.clone(),
            s.opts.clone(),
            s.state_dir.clone(),
            publish_tx,
            state.clone(),
            metrics.clone(),
        )
        .with_max_deletion_percent(s.max_deletion_percent)
        .with_waves(waves.clone()),
    );
    match pipeline.restore()? {
        Some(c) => {
            tracing::info!(commit = %c, "serving the last good snapshots from the state directory until the first fetch")
        }
        None => tracing::info!(
            "no last good snapshots yet; gateways wait for the first accepted commit"
        ),
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let grpc_bound = match &s.grpc {
        Some((addr, tls_dir)) => {
            let creds = meshfed_identity::Credentials::load(tls_dir).with_context(|| {
                format!(
                    "loading the syncer's credentials from --tls-dir {}",
                    tls_dir.display()
                )
            })?;
            tracing::info!(id = %creds.id, "config server identity");
            let refusals = Arc::new(meshfed_identity::HandshakeRefusals::new());
            let tls = server::tls_config(&creds, refusals)?;
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("binding the gRPC config server on {addr}; is the port in use?")
            })?;
            let bound = listener.local_addr()?;
            let config_server = server::ConfigServer::with_settings(
                rollout.clone(),
                publish_rx.clone(),
                s.server.clone(),
            )
            .with_golden(golden.clone());
            config_server.register(&mut registry);
            let mut stop = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = config_server.serve(listener, tls, shutdown).await {
                    tracing::error!(error = %e, "the config server stopped");
                }
            }));
            Some(bound)
        }
        None => {
            tracing::warn!("--no-grpc: the config server is off; no gateway can subscribe");
            None
        }
    };

    let http_listener = TcpListener::bind(s.http_addr).await.with_context(|| {
        format!(
            "binding the HTTP listener on {}; is the port in use?",
            s.http_addr
        )
    })?;
    let http_bound = http_listener.local_addr()?;
    let trigger = Arc::new(trigger::Trigger::new());
    let api = Arc::new(StatusApi {
        state: state.clone(),
        rollout: rollout.clone(),
        source: source.clone(),
        published: publish_rx.clone(),
        trigger: trigger.clone(),
        metrics: metrics.clone(),
        registry: Arc::new(registry),
        webhook_secret: s.webhook_secret.clone(),
        token: s.http_token.clone(),
        known_window: s.known_window,
        header_timeout: s.header_timeout,
        waves: waves.clone(),
    });
    tasks.push(tokio::spawn(waves.clone().drive(shutdown_rx.clone())));
    tasks.push(tokio::spawn(api.serve(http_listener, shutdown_rx.clone())));
    tracing::info!(http = %http_bound, grpc = ?grpc_bound, "listening");

    if let Some(path) = &s.ready_file {
        let doc = serde_json::json!({
            "http": http_bound.to_string(),
            "grpc": grpc_bound.map(|a| a.to_string()),
        });
        meshfed_cli::fs::write_atomic(path, doc.to_string().as_bytes())
            .with_context(|| format!("writing --ready-file {}", path.display()))?;
    }

    let sync_loop = tokio::spawn(trigger::run(
        pipeline.clone(),
        trigger,
        s.poll,
        shutdown_rx.clone(),
    ));

    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    // A sync in progress (a blocking libgit2 call) may finish, for at most
    // SYNC_GRACE: a fetch hung on a silent remote is left behind, and the
    // runtime is shut down without waiting for it (`main`).
    let deadline = Duration::from_secs(10);
    let started = Instant::now();
    if tokio::time::timeout(SYNC_GRACE, sync_loop).await.is_err() {
        tracing::warn!(grace = ?SYNC_GRACE, "a sync (fetch) is still running at shutdown; not waiting for it");
    }
    for t in tasks {
        let left = deadline.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, t).await;
    }
    saver.abort();
    pruner.abort();
    if let Err(e) = rollout.save() {
        tracing::warn!(error = %e, "cannot save the gateway records");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long SIGTERM waits for a sync in progress.
const SYNC_GRACE: Duration = Duration::from_secs(5);

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// One line a waiting `status --wait` prints when it changes.
fn progress_line(v: &status::RolloutView) -> String {
    format!("{}: {}", v.state.as_str(), v.detail)
}

async fn rollout_command(a: RolloutArgs) -> u8 {
    let mut problems = Vec::new();
    let token = a
        .token_file
        .as_deref()
        .and_then(|p| read_secret(p, "--token-file", &mut problems));
    if !(4..=40).contains(&a.commit.len()) || !a.commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        problems.push(format!(
            "`{}` is not a commit SHA (4 to 40 hex digits)",
            a.commit
        ));
    }
    if !problems.is_empty() {
        eprintln!("meshfed-syncer rollout: {}", problems.join("; "));
        return exit::ERROR;
    }
    let client = ClientConfig {
        server: a.server.clone(),
        token,
    };
    let action = match a.action {
        RolloutAction::Resume => "resume",
        RolloutAction::Abort => "abort",
    };
    match client.override_rollout(&a.commit, action).await {
        Ok(line) => {
            println!("{line}");
            exit::OK
        }
        Err(status::ClientError::Status { status, body })
            if status == http::StatusCode::CONFLICT || status == http::StatusCode::NOT_FOUND =>
        {
            eprintln!("meshfed-syncer rollout {action}: refused: {body}");
            exit::FAILED
        }
        Err(e) => {
            eprintln!("meshfed-syncer rollout {action}: {e}");
            exit::ERROR
        }
    }
}

async fn status_command(a: StatusArgs) -> u8 {
    let mut problems = Vec::new();
    let token = a
        .token_file
        .as_deref()
        .and_then(|p| read_secret(p, "--token-file", &mut problems));
    if !problems.is_empty() {
        eprintln!("meshfed-syncer status: {}", problems.join("; "));
        return exit::ERROR;
    }
    let client = ClientConfig {
        server: a.server.clone(),
        token,
    };
    let Some(sha) = a.wait else {
        return match client.status().await {
            Ok(doc) if a.json => {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                exit::OK
            }
            Ok(doc) => {
                print!("{}", status::render_status(&doc));
                exit::OK
            }
            Err(e) => {
                eprintln!("meshfed-syncer status: {e}");
                exit::ERROR
            }
        };
    };
    if !(4..=40).contains(&sha.len()) || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        eprintln!("meshfed-syncer status: --wait `{sha}` is not a commit SHA (4 to 40 hex digits)");
        return exit::ERROR;
    }
    let deadline = Instant::now() + a.timeout;
    let mut last = None;
    let mut last_err = None;
    loop {
        match client.rollout(&sha).await {
            Ok(v) => {
                let done = match v.state {
                    RolloutState::Live => Some(exit::OK),
                    RolloutState::Nacked
                    | RolloutState::Rejected
                    | RolloutState::Held
                    | RolloutState::RolledBack
                    | RolloutState::Halted => Some(exit::FAILED),
                    RolloutState::Pending | RolloutState::Unknown | RolloutState::Progressing => {
                        if let Some(prev) = &last
                            && !a.json
                            && progress_line(prev) != progress_line(&v)
                        {
                            eprintln!("{}", progress_line(&v));
                        } else if last.is_none() && !a.json {
                            eprintln!("{}", progress_line(&v));
                        }
                        None
                    }
                };
                if let Some(code) = done {
                    print_view(&v, a.json);
                    return code;
                }
                last = Some(v);
            }
            // Auth and usage errors will not fix themselves.
            Err(e @ (status::ClientError::Url(_) | status::ClientError::Status { .. })) => {
                eprintln!("meshfed-syncer status: {e}");
                return exit::ERROR;
            }
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200).min(deadline - Instant::now())).await;
    }
    match (last, last_err) {
        (Some(v), _) => {
            print_view(&v, a.json);
            let pending = v.gateways_in(status::GatewayState::Pending);
            eprintln!(
                "meshfed-syncer status: timed out after {:?}: {}",
                a.timeout,
                if pending.is_empty() {
                    v.detail.clone()
                } else {
                    format!("pending: {}", pending.join(", "))
                }
            );
            exit::TIMEOUT
        }
        (None, Some(e)) => {
            eprintln!("meshfed-syncer status: {e}");
            exit::ERROR
        }
        (None, None) => exit::TIMEOUT,
    }
}

fn print_view(v: &status::RolloutView, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", status::render_rollout(v));
    }
}

/// The command line with the config file's settings in front, so that flags
/// override them; a setting whose environment variable is set is left to
/// the environment. The rules (one copy, shared with the gateway) are in
/// [`meshfed_cli::config_file`].
fn args_with_config() -> Result<Vec<OsString>, String> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // `status` has its own flags; a config file is for running the syncer.
    if argv.get(1).is_some_and(|a| a == "status") {
        return Ok(argv);
    }
    meshfed_cli::config_file::args_with_config(
        &Cli::command(),
        argv,
        "MESHFED_SYNCER_CONFIG",
        &|k: &std::ffi::OsStr| std::env::var_os(k),
    )
}

/// A byte count: digits with an optional binary suffix (`Ki`, `Mi`, `Gi`,
/// with or without a trailing `B`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (e.g. 134217728 or 128Mi)"))?;
    let shift = match unit.trim().trim_end_matches('B') {
        "" => 0,
        "Ki" | "K" | "k" => 10,
        "Mi" | "M" => 20,
        "Gi" | "G" => 30,
        _ => return Err(format!("`{s}`: unknown unit; use Ki, Mi or Gi")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn init_logging(format: LogFormat) {
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
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(super::parse_bytes("1024"), Ok(1024));
        assert_eq!(super::parse_bytes("128Mi"), Ok(128 << 20));
        assert_eq!(super::parse_bytes("2GiB"), Ok(2 << 30));
        assert!(super::parse_bytes("12 parsecs").is_err());
        assert!(super::parse_bytes("").is_err());
    }
}
