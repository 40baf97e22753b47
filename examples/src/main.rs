//! `meshfed-demo`: a whole federation on loopback, from the real binaries.
//!
//! Three clusters (east; west with two gateways; edge), certificates from a
//! fresh trust anchor, bookinfo-style services, a syncer following a fresh
//! Git repository seeded from examples/ (a post-commit hook sends it a
//! signed webhook), and traffic from a workload in each cluster. Without
//! flags it shows a live view and the commands to try; `--tour` runs the
//! scripted steps and exits 0 only if every expectation held.
//!
//! Module map: `procs` (binaries and child processes), `federation`
//! (starting and asking the processes), `repo` (the policy repository),
//! `hook` (the signed webhook), `traffic` (the clients), `view` (the live
//! view and commands), `tour` (the scripted steps).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod federation;
mod hook;
mod procs;
mod repo;
mod tour;
mod traffic;
mod view;

use federation::Federation;
use procs::{Bins, Supervisor};
use traffic::{ClientSpec, Traffic};

/// A local meshfed federation with live traffic: three clusters of real
/// gateways, a syncer following a Git repository, and sample services.
#[derive(Debug, Parser)]
#[command(name = "meshfed-demo", version, after_help = AFTER_HELP)]
struct Cli {
    /// Run the scripted tour (baseline, canary commit, invalid commit, west
    /// killed, west back, rollout waves and a bad commit rolled back at the
    /// first), print a summary table, and exit: 0 if every expectation
    /// held, 1 otherwise.
    #[arg(long)]
    tour: bool,
    /// Where to put certificates, the repository, state and logs (default:
    /// a new temporary directory, removed at exit unless --keep).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the work directory at exit.
    #[arg(long)]
    keep: bool,
    /// Requests per second from each cluster's client.
    #[arg(long, default_value_t = 80)]
    rate: u32,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send the syncer a push event for the repository in the current
    /// directory, signed like GitHub's webhooks (what the demo repository's
    /// post-commit hook runs).
    Hook {
        /// The syncer's webhook URL, e.g. http://127.0.0.1:15014/hooks/git.
        #[arg(long)]
        url: String,
        /// The file holding the shared secret.
        #[arg(long)]
        secret_file: PathBuf,
    },
}

const AFTER_HELP: &str = "\
The binaries meshfed-gateway, meshfed-syncer, meshfed-policy and meshfed-backend
must sit beside this one: `cargo build --release` (or `cargo run --release --bin
meshfed-demo`, which builds them all).

Exit codes: 0 done (tour: every step passed), 1 a step failed or the demo could
not start, 130 stopped by Ctrl-C or SIGTERM.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Hook { url, secret_file }) = &cli.command {
        return match hook::run(url, secret_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "meshfed-demo hook: {e:#} (the commit is made; the syncer's poll will find it)"
                );
                ExitCode::from(1)
            }
        };
    }
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("meshfed-demo: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Starts everything, runs the tour or the live view, and stops everything
/// whatever happens. `Ok(false)`: a tour step failed.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bins = Bins::beside_me()?;
    let (work, temp) = match &cli.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("meshfed-demo.")
                .tempdir()
                .context("creating a temporary work directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let work = std::fs::canonicalize(&work).unwrap_or(work);
    let remove_work = temp.is_some() && !cli.keep;
    // The directory is removed explicitly (or kept), not by the guard.
    if let Some(t) = temp {
        let _ = t.keep();
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let sup = Arc::new(Supervisor::new(&work));

    // Ctrl-C and SIGTERM: stop every child, tidy up, exit 130. The main
    // thread may be blocked waiting on a child, so this does not wait for it.
    {
        let sup = sup.clone();
        let work = work.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("\nmeshfed-demo: stopping every process...");
            sup.shutdown(Duration::from_secs(3));
            finish(&work, remove_work);
            std::process::exit(130);
        });
    }

    println!("meshfed-demo: work directory {}", work.display());
    let result = (|| -> anyhow::Result<bool> {
        let fed = Federation::start(&work, bins, sup.clone(), &|s| println!("  starting {s}"))?;
        let clients = fed_clients(&fed, cli.rate);
        let traffic = Traffic::start(rt.handle(), clients, |cluster, sa| {
            fed.workload_creds(cluster, sa)
        })?;
        if cli.tour {
            println!(
                "\nmeshfed-demo tour: east → reviews as productpage, west → reviews as productpage,\n\
                 edge → ratings as reviews; {} req/s each, mutual TLS to the local gateway.",
                cli.rate
            );
            let steps = tour::run(&fed, &traffic)?;
            println!("\n{}", tour::table(&steps));
            let ok = steps.iter().all(|s| s.pass);
            if !ok {
                println!(
                    "meshfed-demo tour: a step failed; logs were in {}/logs",
                    work.display()
                );
            }
            Ok(ok)
        } else {
            println!("\n{}", view::commands(&fed));
            std::thread::sleep(Duration::from_secs(2));
            view::run(&fed, &traffic)
        }
    })();
    sup.shutdown(Duration::from_secs(3));
    if result.is_err() && remove_work {
        eprintln!(
            "meshfed-demo: the work directory is kept for its logs: {}",
            work.display()
        );
        rt.shutdown_background();
        return result;
    }
    finish(&work, remove_work);
    rt.shutdown_background();
    result
}

/// One client per cluster, through that cluster's gateways.
fn fed_clients(fed: &Federation, rate: u32) -> Vec<ClientSpec> {
    let spec = |cluster: &str, caller: &str, authority: &str| ClientSpec {
        cluster: cluster.into(),
        caller: caller.into(),
        authority: authority.into(),
        targets: fed.gateway(cluster).iter().map(|g| g.outbound).collect(),
        server_name: format!("{cluster}.cluster.meshfed.internal"),
        rate,
    };
    vec![
        spec("east", "productpage", "reviews"),
        spec("west", "productpage", "reviews"),
        spec("edge", "reviews", "ratings"),
    ]
}

fn finish(work: &std::path::Path, remove: bool) {
    if remove {
        let _ = std::fs::remove_dir_all(work);
    } else {
        println!("meshfed-demo: kept {}", work.display());
    }
}
