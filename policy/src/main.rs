//! `meshfed-policy`: validate, compile and diff mesh policy offline.
//!
//! A thin shell over the library: read files, call [`meshfed_policy::analyze`],
//! print, and pick the exit code. Usable as a CI step and as a pre-commit
//! hook (see the README).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::{Analysis, Code, Options, Severity, analyze};

/// Validate and compile meshfed mesh policy (Istio VirtualService,
/// DestinationRule, ServiceEntry, PeerAuthentication, AuthorizationPolicy,
/// MCS ServiceExport, and meshfed Cluster) from YAML files.
///
/// Exit codes: 0 valid (warnings allowed), 1 invalid, 2 usage or I/O error;
/// `diff --exit-code` adds 3, a change (see `meshfed-policy diff --help`).
#[derive(Debug, Parser)]
#[command(name = "meshfed-policy", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check every *.yaml and *.yml under each PATH, recursively, and report
    /// every problem as FILE:LINE:COL: error[CODE]: message (at field.path).
    #[command(
        after_help = "Examples:\n  meshfed-policy validate policy/\n  meshfed-policy validate policy/ --strict-kinds   (refuse Gateway, Sidecar, EnvoyFilter...)\n  meshfed-policy validate . --exclude 'charts/**' --format json\n  meshfed-policy validate -q changed.yaml other.yaml   (as a pre-commit hook; see the README)"
    )]
    Validate {
        #[command(flatten)]
        input: Input,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Treat warnings as errors (exit 1).
        #[arg(long)]
        deny_warnings: bool,
        /// Treat kinds that Istio's proxies enforce and meshfed skips
        /// (Gateway, Sidecar, EnvoyFilter, RequestAuthentication...,
        /// VirtualServices bound only to Istio gateways) as errors
        /// (`istio-proxy-kind`), for repositories meant for meshfed alone.
        #[arg(long)]
        strict_kinds: bool,
        /// Print only errors, and no summary line.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Print what one cluster's gateways would receive: the compiled
    /// snapshot ("what will east see?"). A repository that declares no
    /// `Cluster` is a single-cluster mesh and compiles for any name.
    #[command(
        after_help = "Examples:\n  meshfed-policy compile examples/multicluster-failover --cluster east\n  meshfed-policy compile policy/ --cluster west --format json --snapshot-version $(git rev-parse HEAD)"
    )]
    Compile {
        #[command(flatten)]
        input: Input,
        /// The cluster to compile for.
        #[arg(long)]
        cluster: String,
        /// The version stamped on the snapshot (the syncer uses the commit SHA).
        #[arg(long, value_name = "VERSION", default_value = "local")]
        snapshot_version: String,
        /// `text`: a summary; `json`: the snapshot, indented; `canonical`:
        /// the exact bytes gateways receive.
        #[arg(long, value_enum, default_value_t = CompileFormat::Text)]
        format: CompileFormat,
    },
    /// Show what changes for each cluster's gateways between two versions of
    /// the policy: OLD and NEW are directories, or commits of the Git
    /// repository around the current directory (any revision git
    /// understands: a SHA, `HEAD~1`, `origin/main`; a directory of that name
    /// wins). The change is computed from the compiled snapshots, so
    /// reordering, moving resources between files, comments and whitespace
    /// are "no effective change". See docs/diff.md.
    ///
    /// Exit codes (as `git diff`): 0 the diff was shown (with --exit-code:
    /// and no cluster's policy changes), 1 OLD or NEW is invalid (its
    /// errors are shown, as `validate` shows them), 2 usage or I/O error
    /// (an unknown commit, an unreadable directory, an undeclared
    /// --cluster), 3 with --exit-code: some cluster's policy changes.
    #[command(
        after_help = "Examples:\n  meshfed-policy diff HEAD~1 HEAD\n  meshfed-policy diff origin/main HEAD --path mesh/ --format markdown > comment.md\n  meshfed-policy diff HEAD mesh/ --cluster east     (the last commit against the working tree)\n  meshfed-policy diff old-policy/ new-policy/ --format json --exit-code"
    )]
    Diff(diff_cli::DiffArgs),
    /// List the diagnostic codes and what they mean.
    Codes {
        /// `text` or `markdown` (docs/policy-reference.md is generated with it).
        #[arg(long, value_enum, default_value_t = CodesFormat::Text)]
        format: CodesFormat,
    },
}

#[derive(Debug, Args)]
struct Input {
    /// Files or directories to read (directories recursively).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

/// What to read and the mesh-wide settings, for every command that reads
/// policy.
#[derive(Debug, Args)]
struct Settings {
    /// Only read files matching this glob, relative to each PATH (repeatable).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Skip files matching this glob, relative to each PATH (repeatable),
    /// e.g. `charts/**` for Helm templates. Globs filter what is found under
    /// a directory; a file named on the command line is always read.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// DNS suffix of in-cluster service names.
    #[arg(long, env = "MESHFED_DOMAIN", default_value = "cluster.local")]
    domain: String,
    /// The mesh's shared trust domain.
    #[arg(long, env = "MESHFED_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Istio's root namespace (policies there without a selector are mesh-wide).
    #[arg(long, env = "MESHFED_ROOT_NAMESPACE", default_value = "istio-system")]
    root_namespace: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompileFormat {
    Text,
    Json,
    Canonical,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CodesFormat {
    Text,
    Markdown,
}

mod diff_cli;

const EXIT_INVALID: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // `meshfed-policy ... | head`: the reader left; that is not a failure.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshfed-policy: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

impl Settings {
    fn selection(&self) -> anyhow::Result<Selection> {
        Ok(Selection::new(&self.include, &self.exclude)?)
    }

    fn options(&self) -> Options {
        Options {
            domain: self.domain.clone(),
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
        }
    }
}

fn load(input: &Input) -> anyhow::Result<(Analysis, Options, bool)> {
    let sel = input.settings.selection()?;
    let opts = input.settings.options();
    let (files, io) = read_paths(&input.paths, &sel);
    let io_failed = !io.is_empty() && io.iter().any(|d| d.code == Code::Io);
    let mut a = analyze(files, &opts);
    a.diagnostics.extend(io);
    a.diagnostics.sort();
    Ok((a, opts, io_failed))
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Validate {
            input,
            format,
            deny_warnings,
            strict_kinds,
            quiet,
        } => {
            let (mut a, _, io_failed) = load(&input)?;
            if strict_kinds {
                for d in &mut a.diagnostics {
                    if d.code == Code::ProxyKind {
                        d.severity = Severity::Error;
                    }
                }
            }
            let failed = !a.is_valid() || (deny_warnings && a.warning_count() > 0);
            match format {
                Format::Json => {
                    let report = serde_json::json!({
                        "valid": !failed,
                        "files": a.files,
                        "resources": a.resources.len(),
                        "errors": a.error_count(),
                        "warnings": a.warning_count(),
                        "clusters": a.clusters(),
                        "diagnostics": a.diagnostics,
                    });
                    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
                }
                Format::Text => {
                    for d in &a.diagnostics {
                        if !quiet || d.severity == Severity::Error {
                            writeln!(out, "{d}")?;
                        }
                    }
                    if !quiet {
                        writeln!(
                            out,
                            "{}: {} file(s), {} resource(s), {} cluster(s): {} error(s), {} warning(s)",
                            if io_failed {
                                "incomplete (some paths could not be read)"
                            } else if failed {
                                "invalid"
                            } else {
                                "valid"
                            },
                            a.files,
                            a.resources.len(),
                            a.clusters().len(),
                            a.error_count(),
                            a.warning_count()
                        )?;
                    }
                }
            }
            Ok(if io_failed {
                EXIT_USAGE
            } else if failed {
                EXIT_INVALID
            } else {
                0
            })
        }
        Command::Compile {
            input,
            cluster,
            snapshot_version,
            format,
        } => {
            let (a, opts, io_failed) = load(&input)?;
            if io_failed || !a.is_valid() {
                for d in a.diagnostics.iter().filter(|d| d.is_error()) {
                    eprintln!("{d}");
                }
                eprintln!("meshfed-policy: not compiled: {} error(s)", a.error_count());
                return Ok(if io_failed { EXIT_USAGE } else { EXIT_INVALID });
            }
            let snap = match a.compile(&cluster, &snapshot_version, &opts) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("meshfed-policy: {e}");
                    return Ok(EXIT_USAGE);
                }
            };
            match format {
                CompileFormat::Json => writeln!(out, "{}", snap.to_pretty_json())?,
                CompileFormat::Canonical => out.write_all(&snap.encode())?,
                CompileFormat::Text => print_summary(&mut out, &snap)?,
            }
            Ok(0)
        }
        Command::Diff(args) => diff_cli::run(&args, &mut out),
        Command::Codes { format } => {
            match format {
                CodesFormat::Text => {
                    for c in Code::ALL {
                        writeln!(
                            out,
                            "{:<22} {:<8} {}",
                            c.as_str(),
                            c.severity().to_string(),
                            c.summary()
                        )?;
                    }
                }
                CodesFormat::Markdown => write!(out, "{}", meshfed_policy::diag::codes_markdown())?,
            }
            Ok(0)
        }
    }
}

fn print_summary(out: &mut impl Write, s: &meshfed_policy::Snapshot) -> std::io::Result<()> {
    let p = &s.policy;
    writeln!(out, "cluster {} at version {}", p.cluster, s.version)?;
    writeln!(out, "content hash {}", s.content_hash)?;
    writeln!(
        out,
        "mesh mTLS {:?}, trust domain {}",
        p.mtls.mesh, p.trust_domain
    )?;
    writeln!(out, "\nclusters ({}):", p.clusters.len())?;
    for (name, c) in &p.clusters {
        writeln!(
            out,
            "  {name:<16} gateways {}  trust domain {}",
            c.gateways.join(", "),
            c.trust_domain
        )?;
    }
    writeln!(out, "\nexported services ({}):", p.exports.len())?;
    for (host, from) in &p.exports {
        writeln!(
            out,
            "  {host:<48} from {}",
            from.iter().cloned().collect::<Vec<_>>().join(", ")
        )?;
    }
    writeln!(out, "\nroutes ({} hosts):", p.routes.len())?;
    for (host, r) in &p.routes {
        let key = r.source.key();
        let at = s.origins.get(&key).map(String::as_str).unwrap_or("?");
        writeln!(out, "  {host}  ({key}, {at})")?;
        for (i, h) in r.http.iter().enumerate() {
            let dests: Vec<String> = h
                .destinations
                .iter()
                .map(|d| {
                    format!(
                        "{}{} {}%",
                        short(&d.host),
                        d.subset
                            .as_deref()
                            .map(|s| format!("/{s}"))
                            .unwrap_or_default(),
                        d.weight
                    )
                })
                .collect();
            let matches = if h.matches.is_empty() {
                "any request".to_string()
            } else {
                format!("{} match(es)", h.matches.len())
            };
            writeln!(out, "    http[{i}] {matches:<14} -> {}", dests.join(", "))?;
        }
        for (i, t) in r.tcp.iter().enumerate() {
            let dests: Vec<String> = t
                .destinations
                .iter()
                .map(|d| format!("{} {}%", short(&d.host), d.weight))
                .collect();
            writeln!(
                out,
                "    tcp[{i}] ports {:?} -> {}",
                t.ports,
                dests.join(", ")
            )?;
        }
    }
    writeln!(out, "\ndestination rules ({}):", p.destinations.len())?;
    for (host, d) in &p.destinations {
        writeln!(
            out,
            "  {host:<48} subsets {}",
            d.subsets.keys().cloned().collect::<Vec<_>>().join(", ")
        )?;
    }
    writeln!(
        out,
        "\nservice entries ({}), authorization policies ({})",
        p.service_entries.len(),
        p.authz.len()
    )?;
    for a in &p.authz {
        writeln!(
            out,
            "  {:?} {}/{} ({:?}, {} rule(s)){}",
            a.action,
            a.namespace,
            a.source.name,
            a.scope,
            a.rules.len(),
            if a.dry_run {
                " dry-run: counted, not enforced"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

fn short(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
