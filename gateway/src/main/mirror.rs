//! `meshfed-gateway mirror`: the mirror controller as a process of its own
//! ([`meshfed_gateway::mirror::controller`]), part of the binary's `main`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshfed_gateway::discovery::kube::KubeSettings;
use meshfed_gateway::mirror::controller::{self, ControllerSettings};

/// meshfed's mirror controller: makes the mirror Services
/// (`<svc>-<cluster>`, `<svc>-clusterset`) of the services other clusters
/// export, pointing at the gateways' outbound Service, with a
/// ServiceAccount of its own, so that the internet-facing gateway needs no
/// write access to the cluster (docs/kubernetes.md, "Least privilege").
///
/// It reads what to mirror from the gateways (`GET /mirror/view` on the
/// admin port of each ready pod of --mirror-services, with the admin
/// token), and writes only while it holds the cluster's mirror Lease
/// (`meshfed-mirror-<cluster>` in the gateways' namespace).
#[derive(Debug, Parser)]
#[command(name = "meshfed-gateway mirror", version)]
pub struct MirrorCli {
    /// Read settings from this YAML file (flag names to values);
    /// environment variables and flags override it.
    #[arg(long, value_name = "FILE", env = "MESHFED_MIRROR_CONFIG")]
    config: Option<PathBuf>,

    /// The cluster it mirrors for: the gateways' --cluster. Unset: the
    /// cluster the gateways' first view names (they are found through
    /// this cluster's own --mirror-services).
    #[arg(long, value_name = "NAME", env = "MESHFED_CLUSTER")]
    cluster: Option<String>,

    /// Its ID in the mirror Lease (the pod name; the host name if unset).
    #[arg(long, value_name = "ID", env = "MESHFED_MIRROR_ID")]
    id: Option<String>,

    /// A kubeconfig file; without it, KUBECONFIG, ~/.kube/config, then the
    /// pod's service account.
    #[arg(long, value_name = "FILE", env = "MESHFED_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// The gateways' outbound Service NAME.NAMESPACE: the mirrors lead to
    /// its ready pods, and their admin ports give the view.
    #[arg(long, value_name = "NAME.NAMESPACE", env = "MESHFED_MIRROR_SERVICES",
          value_parser = crate::parse_service_ref)]
    mirror_services: (String, String),

    /// Ports of a mirror Service when the exporting cluster's gateways
    /// announce none and this cluster has no Service of the same name
    /// (comma-separated).
    #[arg(
        long,
        value_name = "PORTS",
        env = "MESHFED_MIRROR_PORTS",
        value_delimiter = ',',
        default_value = "80"
    )]
    mirror_ports: Vec<u16>,

    /// Namespaces watched besides those of the exports the gateways' views
    /// name and the gateways' own (repeatable or comma-separated).
    #[arg(
        long,
        value_name = "NS",
        env = "MESHFED_KUBE_NAMESPACES",
        value_delimiter = ','
    )]
    kube_namespace: Vec<String>,

    /// Which namespaces are watched: `policy`, those of the exports in the
    /// gateways' views (where mirrors are made) plus --kube-namespace, with
    /// the mirrors themselves watched in every namespace by their labels;
    /// or `all`, every namespace.
    #[arg(long, value_name = "SCOPE", env = "MESHFED_KUBE_WATCH_SCOPE",
          default_value = "policy",
          value_parser = ["policy", "all"])]
    kube_watch_scope: String,

    /// The gateways' admin port.
    #[arg(long, value_name = "PORT", env = "MESHFED_GATEWAY_ADMIN_PORT",
          default_value_t = meshfed_gateway::admin::DEFAULT_PORT)]
    gateway_admin_port: u16,

    /// A file holding the gateways' admin bearer token (their
    /// --admin-token-file).
    #[arg(long, value_name = "FILE", env = "MESHFED_GATEWAY_ADMIN_TOKEN_FILE")]
    gateway_admin_token_file: Option<PathBuf>,

    /// Where it serves /healthz, /readyz and /metrics (no secrets there, so
    /// no token).
    #[arg(long, value_name = "ADDR", env = "MESHFED_MIRROR_ADMIN_ADDR",
          default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, 15021)))]
    admin_addr: SocketAddr,

    /// Log format.
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "MESHFED_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: crate::LogFormat,
}

/// Runs `meshfed-gateway mirror ...` and exits, if that is the command.
pub fn exit_if_mirror_command() {
    if std::env::args_os().nth(1).as_deref() != Some(std::ffi::OsStr::new("mirror")) {
        return;
    }
    let args = match meshfed_cli::config_file::args_with_config(
        &<MirrorCli as clap::CommandFactory>::command(),
        std::env::args_os().skip(1).collect(),
        "MESHFED_MIRROR_CONFIG",
        &|k: &std::ffi::OsStr| std::env::var_os(k),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meshfed-gateway mirror: {e}");
            std::process::exit(2)
        }
    };
    let cli = MirrorCli::parse_from(args);
    let code = run(cli);
    std::process::exit(i32::from(code != ExitCode::SUCCESS))
}

fn run(cli: MirrorCli) -> ExitCode {
    crate::init_logging(cli.log_format);
    let admin_token = match cli
        .gateway_admin_token_file
        .as_deref()
        .map(crate::read_admin_token)
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshfed-gateway mirror: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = ControllerSettings {
        cluster: cli.cluster,
        id: cli.id.unwrap_or_else(crate::hostname),
        kube: KubeSettings {
            kubeconfig: cli.kubeconfig,
            namespaces: cli.kube_namespace,
            scope: if cli.kube_watch_scope == "all" {
                meshfed_gateway::discovery::kube::WatchScope::All
            } else {
                meshfed_gateway::discovery::kube::WatchScope::Policy
            },
            service_exports: false,
            mirror_target: Some(cli.mirror_services),
            mirror_ports: cli.mirror_ports,
            // The controller serves no endpoints: nothing to persist, and
            // it waits for the first full list before writing anything.
            state_dir: None,
            sync_timeout: None,
        },
        admin_port: cli.gateway_admin_port,
        admin_token,
        listen: cli.admin_addr,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshfed-gateway mirror: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = controller::run(settings) => r,
            _ = term.recv() => {
                // The Lease is not released: another controller takes it
                // over when it expires, as with the gateways.
                tracing::info!("SIGTERM: the mirror controller stops");
                Ok(())
            }
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "mirror controller failed");
            eprintln!("meshfed-gateway mirror: {e:#}");
            ExitCode::from(1)
        }
    }
}
