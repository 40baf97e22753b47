//! `meshfed-gateway certs ...`: the operator's commands to build and read
//! the CA hierarchy and the credentials directories.
//!
//! On-disk layout (docs/identity.md has the worked example):
//! - a CA directory (`certs anchor`, `certs intermediate`): `ca.pem` (the
//!   CA's certificate), `ca.key` (its key, mode 0600) and `bundle.pem` (the
//!   anchors that everything issued below it trusts: for an anchor, itself;
//!   for an intermediate, a copy of its anchor directory's `bundle.pem`);
//! - a credentials directory (`certs gateway|workload|syncer`): `bundle.pem`,
//!   `cert.pem` (leaf then intermediate) and `key.pem` (mode 0600), which
//!   [`super::store::Credentials::load`] reads as is.
//!
//! This module is a thin shell: issuance is [`super::certs`], the checks are
//! [`super::store`] and [`super::verify`]. It owns arguments, files and
//! messages only.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use rustls::pki_types::UnixTime;

use super::certs::{
    self, CertInfo, IssuedCert, Issuer, IssuerKind, OutFile, Validity, certs_from_pem,
};
use super::spiffe::SpiffeId;
use super::store::{BUNDLE_FILE, CERT_FILE, Credentials, KEY_FILE};
use super::verify::{PeerRole, TrustBundle, peer_identity};

/// A CA's certificate in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// A CA's private key in a CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

const LAYOUT_HELP: &str = "\
Directories:
  CA directory (anchor, intermediate):  ca.pem  ca.key (0600)  bundle.pem
  credentials (gateway, workload, syncer):  bundle.pem  cert.pem (leaf + intermediate)  key.pem (0600)
  A credentials directory is what a gateway loads, and what a Kubernetes Secret mounts.

Example:
  meshfed-gateway certs anchor --out ca/root
  meshfed-gateway certs intermediate --ca ca/root --cluster east --out ca/east
  meshfed-gateway certs gateway --ca ca/east --cluster east --id gw-0 --out creds/east-gw-0
  meshfed-gateway certs inspect creds/east-gw-0/cert.pem --bundle creds/east-gw-0/bundle.pem

Exit codes: 0 done, 1 refused or failed (nothing half-written), 2 usage error.";

/// Build and read meshfed's certificates: a trust anchor, one intermediate CA
/// per cluster, and leaves for gateways, workloads and the syncer.
///
/// Every key is ECDSA P-256 and written at mode 0600. Existing files are never
/// overwritten unless --force is given.
#[derive(Debug, Parser)]
#[command(name = "certs", bin_name = "meshfed-gateway certs", after_long_help = LAYOUT_HELP)]
pub struct CertsCli {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// The `certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a trust anchor (self-signed root CA): writes DIR/ca.pem, DIR/ca.key
    /// and DIR/bundle.pem.
    Anchor(AnchorArgs),
    /// Issue a cluster's intermediate CA under an anchor. It carries the URI SAN
    /// spiffe://<td>/meshfed/cluster/<cluster>, which is how every peer learns
    /// the cluster of the leaves it issues.
    Intermediate(IntermediateArgs),
    /// Issue a gateway's credentials under its cluster's intermediate:
    /// spiffe://<td>/meshfed/cluster/<cluster>/gateway/<id>, DNS name
    /// <cluster>.cluster.meshfed.internal.
    Gateway(GatewayArgs),
    /// Issue a workload's credentials under its cluster's intermediate:
    /// spiffe://<td>/ns/<namespace>/sa/<service-account>, as Istio names it.
    Workload(WorkloadArgs),
    /// Issue the syncer's credentials under the intermediate of the cluster it
    /// runs in: spiffe://<td>/meshfed/syncer/<id>, DNS name syncer.meshfed.internal.
    Syncer(SyncerArgs),
    /// Concatenate trust anchors into one bundle, for rotation: peers trust
    /// leaves under any anchor of their bundle.
    Bundle(BundleArgs),
    /// Print what certificates say: SPIFFE ID, cluster, issuer, validity; with
    /// --bundle, also whether the chain passes meshfed's trust rules.
    Inspect(InspectArgs),
}

/// `certs anchor`.
#[derive(Debug, Args)]
pub struct AnchorArgs {
    /// Directory to write ca.pem, ca.key and bundle.pem into (made at mode 0700).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The anchor's common name.
    #[arg(long, value_name = "CN", default_value = "meshfed root CA")]
    pub name: String,
    /// Validity in days.
    #[arg(long, value_name = "N", default_value_t = 3650,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Overwrite existing files (atomically, file by file).
    #[arg(long)]
    pub force: bool,
}

/// `certs intermediate`.
#[derive(Debug, Args)]
pub struct IntermediateArgs {
    /// The anchor's CA directory (ca.pem, ca.key, bundle.pem).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// The cluster this CA issues for: a `Cluster` of the policy repository.
    #[arg(long, value_name = "NAME")]
    pub cluster: String,
    /// The cluster's SPIFFE trust domain.
    #[arg(long, value_name = "TD", default_value = super::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Directory to write ca.pem, ca.key and bundle.pem into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Validity in days (never beyond the anchor's).
    #[arg(long, value_name = "N", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// What every leaf command takes.
#[derive(Debug, Args)]
pub struct LeafArgs {
    /// The cluster intermediate's CA directory (ca.pem, ca.key, bundle.pem).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// Directory to write bundle.pem, cert.pem and key.pem into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Validity in days (never beyond the intermediate's).
    #[arg(long, value_name = "N", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// An extra DNS name for the certificate (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// `certs gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway's cluster; must be the intermediate's (a check against
    /// pointing --ca at the wrong cluster).
    #[arg(long, value_name = "NAME")]
    pub cluster: String,
    /// The gateway's ID, unique within its cluster (as --gateway-id).
    #[arg(long, value_name = "ID")]
    pub id: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub leaf: LeafArgs,
}

/// `certs workload`.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// The workload's Kubernetes namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    /// The workload's Kubernetes service account.
    #[arg(long, value_name = "SA")]
    pub service_account: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub leaf: LeafArgs,
}

/// `certs syncer`.
#[derive(Debug, Args)]
pub struct SyncerArgs {
    /// The syncer instance's ID.
    #[arg(long, value_name = "ID")]
    pub id: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub leaf: LeafArgs,
}

/// `certs bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// PEM files holding trust anchors (ca.pem or bundle.pem of anchor directories).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// The bundle to write; it may be one of the inputs, with --force.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Overwrite --out if it exists (atomically).
    #[arg(long)]
    pub force: bool,
}

/// `certs inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A PEM file of certificates: ca.pem, cert.pem or bundle.pem.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Also verify the chain in FILE against this bundle, with meshfed's trust
    /// rules (exit 1 if it fails).
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
}

/// Runs `meshfed-gateway certs ...` if that is the command line, and exits;
/// returns otherwise. `main` calls it first, so the `certs` commands work
/// beside the gateway's own flags.
pub fn exit_if_certs_command() {
    if std::env::args_os().nth(1).as_deref() != Some(OsStr::new("certs")) {
        return;
    }
    let cli = CertsCli::parse_from(std::env::args_os().skip(1));
    let code = match run(cli.command) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("meshfed-gateway certs: error: {e:#}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// Runs one `certs` command, printing what it wrote or found on stdout.
pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    super::install_crypto_provider();
    match cmd {
        CertsCommand::Anchor(args) => anchor(args),
        CertsCommand::Intermediate(args) => intermediate(args),
        CertsCommand::Gateway(args) => {
            let (issuer, _) = load_ca(&args.leaf.ca)?;
            let (cluster, td) = intermediate_of(&issuer, &args.leaf.ca)?;
            if args.cluster != cluster {
                bail!(
                    "{} is the CA of cluster `{cluster}`, not `{}`: a cluster's CA issues only for \
                     its own cluster; point --ca at `{}`'s intermediate directory",
                    args.leaf.ca.display(),
                    args.cluster,
                    args.cluster
                );
            }
            let id = SpiffeId::gateway(&td, &args.cluster, &args.id)?;
            leaf(&args.leaf, &issuer, &id)
        }
        CertsCommand::Workload(args) => {
            let (issuer, _) = load_ca(&args.leaf.ca)?;
            let (_, td) = intermediate_of(&issuer, &args.leaf.ca)?;
            let id = SpiffeId::workload(&td, &args.namespace, &args.service_account)?;
            leaf(&args.leaf, &issuer, &id)
        }
        CertsCommand::Syncer(args) => {
            let (issuer, _) = load_ca(&args.leaf.ca)?;
            let (_, td) = intermediate_of(&issuer, &args.leaf.ca)?;
            let id = SpiffeId::syncer(&td, &args.id)?;
            leaf(&args.leaf, &issuer, &id)
        }
        CertsCommand::Bundle(args) => bundle(args),
        CertsCommand::Inspect(args) => inspect(args),
    }
}

fn anchor(args: AnchorArgs) -> anyhow::Result<()> {
    let issued = certs::new_anchor(&args.name, Validity::days(args.days))?;
    let files = [
        OutFile {
            name: CA_CERT_FILE,
            contents: &issued.cert_pem,
            secret: false,
        },
        OutFile {
            name: CA_KEY_FILE,
            contents: &issued.key_pem,
            secret: true,
        },
        OutFile {
            name: BUNDLE_FILE,
            contents: &issued.cert_pem,
            secret: false,
        },
    ];
    certs::write_files(&args.out, &files, args.force)?;
    let info = CertInfo::parse(&issued.der, "anchor")?;
    println!(
        "trust anchor `{}`, valid until {}",
        info.subject, info.not_after_text
    );
    print_written(&args.out, &files);
    Ok(())
}

fn intermediate(args: IntermediateArgs) -> anyhow::Result<()> {
    let (issuer, bundle_pem) = load_ca(&args.ca)?;
    if *issuer.kind() != IssuerKind::Anchor {
        bail!(
            "{} holds a cluster intermediate, which cannot issue another (pathlen 0); \
             point --ca at the anchor's directory",
            args.ca.display()
        );
    }
    let anchors = certs_from_pem(bundle_pem.as_bytes(), "bundle")?;
    let own = certs_from_pem(issuer.cert_pem().as_bytes(), "anchor")?;
    if !own.iter().all(|a| anchors.contains(a)) {
        bail!(
            "{}/{BUNDLE_FILE} does not hold the anchor in {}/{CA_CERT_FILE}, so nothing issued \
             under it would be trusted; rebuild it with `meshfed-gateway certs bundle`",
            args.ca.display(),
            args.ca.display()
        );
    }
    let issued = certs::new_intermediate(
        &issuer,
        &args.cluster,
        &args.trust_domain,
        Validity::days(args.days),
    )?;
    let files = [
        OutFile {
            name: CA_CERT_FILE,
            contents: &issued.cert_pem,
            secret: false,
        },
        OutFile {
            name: CA_KEY_FILE,
            contents: &issued.key_pem,
            secret: true,
        },
        OutFile {
            name: BUNDLE_FILE,
            contents: &bundle_pem,
            secret: false,
        },
    ];
    certs::write_files(&args.out, &files, args.force)?;
    let id = SpiffeId::cluster_ca(&args.trust_domain, &args.cluster)?;
    println!(
        "intermediate CA of cluster `{}` ({id}), valid until {}",
        args.cluster,
        not_after_text(&issued)?
    );
    print_written(&args.out, &files);
    Ok(())
}

fn leaf(args: &LeafArgs, issuer: &Issuer, id: &SpiffeId) -> anyhow::Result<()> {
    let bundle_pem = read_text(&args.ca.join(BUNDLE_FILE))?;
    let issued = certs::issue_leaf(issuer, id, &args.dns_names, Validity::days(args.days))?;
    // Check the directory as a gateway will load it, before writing it.
    Credentials::from_pem(
        bundle_pem.as_bytes(),
        issued.chain_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .with_context(|| {
        format!(
            "the new credentials would not load with {}/{BUNDLE_FILE}; nothing written",
            args.ca.display()
        )
    })?;
    let files = [
        OutFile {
            name: BUNDLE_FILE,
            contents: &bundle_pem,
            secret: false,
        },
        OutFile {
            name: CERT_FILE,
            contents: &issued.chain_pem,
            secret: false,
        },
        OutFile {
            name: KEY_FILE,
            contents: &issued.key_pem,
            secret: true,
        },
    ];
    certs::write_files(&args.out, &files, args.force)?;
    println!(
        "{} {id}, valid until {}",
        id.kind(),
        not_after_text(&issued)?
    );
    print_written(&args.out, &files);
    Ok(())
}

fn bundle(args: BundleArgs) -> anyhow::Result<()> {
    let mut anchors = Vec::new();
    for file in &args.files {
        let pem = read_text(file)?;
        for der in certs_from_pem(pem.as_bytes(), &file.display().to_string())? {
            let info = CertInfo::parse(&der, &file.display().to_string())?;
            if !(info.is_ca && info.self_signed) {
                bail!(
                    "{}: `{}` is not a trust anchor (a self-signed CA); a bundle holds anchors \
                     only (an intermediate travels in cert.pem)",
                    file.display(),
                    info.subject
                );
            }
            if !anchors.contains(&der) {
                println!(
                    "anchor `{}`, valid until {}",
                    info.subject, info.not_after_text
                );
                anchors.push(der);
            }
        }
    }
    let pem: String = anchors.iter().map(certs::pem_of).collect();
    let (dir, name) = split_file(&args.out)?;
    certs::write_files(
        &dir,
        &[OutFile {
            name: &name,
            contents: &pem,
            secret: false,
        }],
        args.force,
    )?;
    println!("wrote {} ({} anchor(s))", args.out.display(), anchors.len());
    Ok(())
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let what = args.file.display().to_string();
    let chain = certs_from_pem(read_text(&args.file)?.as_bytes(), &what)?;
    let now = SystemTime::now();
    for (i, der) in chain.iter().enumerate() {
        let info = CertInfo::parse(der, &format!("{what} certificate #{}", i + 1))?;
        let role = match (info.is_ca, info.self_signed, info.cluster_ca()) {
            (true, true, _) => "trust anchor",
            (true, _, Some(_)) => "cluster intermediate CA",
            (true, _, None) => "CA (not a meshfed cluster CA)",
            (false, ..) => "leaf",
        };
        println!("{what} #{}: {role}", i + 1);
        match info.spiffe_id() {
            Some(Ok(id)) => {
                println!("  spiffe id:    {id}");
                println!("  trust domain: {}", id.trust_domain());
                if let Some(cluster) = id.cluster() {
                    println!("  cluster:      {cluster} (named by the certificate)");
                }
                if let Some(principal) = id.istio_principal() {
                    println!("  principal:    {principal}");
                }
            }
            Some(Err(e)) => println!("  spiffe id:    INVALID: {e}"),
            None if info.uris.is_empty() => println!("  spiffe id:    none"),
            None => println!("  spiffe id:    INVALID: several URI SANs {:?}", info.uris),
        }
        if !info.dns_names.is_empty() {
            println!("  dns names:    {}", info.dns_names.join(", "));
        }
        println!("  subject:      {}", info.subject);
        println!("  issuer:       {}", info.issuer);
        if let Some(len) = info.path_len {
            println!("  path length:  {len}");
        }
        println!("  not before:   {}", info.not_before_text);
        let status = if now > info.not_after {
            "EXPIRED".to_owned()
        } else if now < info.not_before {
            "NOT YET VALID".to_owned()
        } else {
            let left = info.not_after.duration_since(now).unwrap_or_default();
            format!("{} days left", left.as_secs() / 86_400)
        };
        println!("  not after:    {} ({status})", info.not_after_text);
        println!("  serial:       {}", info.serial);
    }
    if chain.len() >= 2 && !CertInfo::parse(&chain[0], &what)?.is_ca {
        match peer_identity(&chain) {
            Ok(peer) => println!(
                "identity: {}, cluster `{}` (from the issuing intermediate)",
                peer.id, peer.cluster
            ),
            Err(e) => println!("identity: INVALID: {e}"),
        }
    }
    if let Some(bundle_path) = &args.bundle {
        let anchors = certs_from_pem(
            read_text(bundle_path)?.as_bytes(),
            &bundle_path.display().to_string(),
        )?;
        let bundle = TrustBundle::new(&anchors)
            .with_context(|| format!("{}: unusable bundle", bundle_path.display()))?;
        let (leaf, rest) = chain
            .split_first()
            .with_context(|| format!("{what}: no certificate"))?;
        match bundle.verify(leaf, rest, UnixTime::now(), PeerRole::Server) {
            Ok(peer) => println!(
                "trusted by {} ({} anchor(s)): {peer}",
                bundle_path.display(),
                bundle.len()
            ),
            Err(e) => bail!("not trusted by {}: {e}", bundle_path.display()),
        }
    }
    Ok(())
}

/// Loads a CA directory's issuer and bundle.
fn load_ca(dir: &Path) -> anyhow::Result<(Issuer, String)> {
    let cert = read_text(&dir.join(CA_CERT_FILE))?;
    let key = read_text(&dir.join(CA_KEY_FILE))?;
    let bundle = read_text(&dir.join(BUNDLE_FILE))?;
    let issuer = Issuer::from_pem(&cert, &key)
        .with_context(|| format!("{}: not a usable CA directory", dir.display()))?;
    Ok((issuer, bundle))
}

fn intermediate_of(issuer: &Issuer, dir: &Path) -> anyhow::Result<(String, String)> {
    match issuer.kind() {
        IssuerKind::Intermediate {
            cluster,
            trust_domain,
        } => Ok((cluster.clone(), trust_domain.clone())),
        IssuerKind::Anchor => bail!(
            "{} holds the trust anchor; leaves are issued by a cluster's intermediate, because \
             that is where peers learn the cluster: run `meshfed-gateway certs intermediate` \
             first and point --ca at its directory",
            dir.display()
        ),
    }
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn split_file(path: &Path) -> anyhow::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_owned()))
}

fn not_after_text(issued: &IssuedCert) -> anyhow::Result<String> {
    Ok(CertInfo::parse(&issued.der, "new certificate")?.not_after_text)
}

fn print_written(dir: &Path, files: &[OutFile<'_>]) {
    for file in files {
        let mode = if file.secret { " (mode 0600)" } else { "" };
        println!("wrote {}{mode}", dir.join(file.name).display());
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::CertsCli;

    #[test]
    fn cli_definition_is_consistent() {
        CertsCli::command().debug_assert();
    }
}
