//! `meshfed-policy diff OLD NEW`: read both sides (a directory, or a commit
//! read with [`meshfed_policy::git`]), validate and compile each declared
//! cluster, and print [`meshfed_policy::diff`]'s report.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use meshfed_policy::diff::{REPORT_SCHEMA, Report, diff_clusters};
use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::{Analysis, Code, Diagnostic, Options, Snapshot, analyze};

use crate::{EXIT_INVALID, EXIT_USAGE, Settings};

/// With --exit-code: some cluster's policy changes.
const EXIT_CHANGED: u8 = 3;

/// The cluster name of a repository that declares no `Cluster`.
const SINGLE: &str = "mesh";

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The old side: a directory, or a commit.
    #[arg(value_name = "OLD")]
    old: String,
    /// The new side: a directory, or a commit.
    #[arg(value_name = "NEW")]
    new: String,
    /// Only this cluster (declared on either side).
    #[arg(long)]
    cluster: Option<String>,
    /// `text`: one line per change, `cluster: what changes`; `markdown`: for
    /// a pull-request comment; `json`: stable, documented in docs/diff.md.
    #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
    format: DiffFormat,
    /// For commits: only the files under this directory of the repository
    /// (the syncer's `--path`). Directories are read whole.
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
    /// For commits: the Git repository (default: the one around the current
    /// directory).
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// Exit 3 when some cluster's policy changes, 0 when none does.
    #[arg(long)]
    exit_code: bool,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DiffFormat {
    Text,
    Json,
    Markdown,
}

/// One side, read and analyzed.
struct Side {
    /// As given on the command line.
    spec: String,
    /// The commit it resolved to, when it is one.
    commit: Option<String>,
    analysis: Analysis,
}

impl Side {
    /// `HEAD~1 (3f2a9c1)`, or the directory as given.
    fn label(&self) -> String {
        match &self.commit {
            Some(c) if c.starts_with(&self.spec) => c[..c.len().min(12)].to_string(),
            Some(c) => format!("{} ({})", self.spec, &c[..c.len().min(12)]),
            None => self.spec.clone(),
        }
    }

    fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "spec": self.spec,
            "commit": self.commit,
            "valid": self.analysis.is_valid(),
            "errors": self.analysis.error_count(),
        });
        if !self.analysis.is_valid() {
            v["diagnostics"] = serde_json::to_value(
                self.analysis
                    .diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default();
        }
        v
    }
}

pub fn run(args: &DiffArgs, out: &mut impl Write) -> anyhow::Result<u8> {
    let sel = args.settings.selection()?;
    let opts = args.settings.options();
    let mut repo: Option<git2::Repository> = None;
    let mut read = |spec: &str| -> anyhow::Result<Result<Side, String>> {
        read_side(spec, args, &sel, &opts, &mut repo)
    };
    let old = match read(&args.old)? {
        Ok(s) => s,
        Err(message) => {
            eprintln!("meshfed-policy: {message}");
            return Ok(EXIT_USAGE);
        }
    };
    let new = match read(&args.new)? {
        Ok(s) => s,
        Err(message) => {
            eprintln!("meshfed-policy: {message}");
            return Ok(EXIT_USAGE);
        }
    };
    if !old.analysis.is_valid() || !new.analysis.is_valid() {
        print_invalid(out, args.format, &old, &new)?;
        return Ok(EXIT_INVALID);
    }

    let declared: BTreeSet<String> = old
        .analysis
        .clusters()
        .into_iter()
        .chain(new.analysis.clusters())
        .collect();
    let names: BTreeSet<String> = match &args.cluster {
        Some(c) if declared.is_empty() || declared.contains(c) => BTreeSet::from([c.clone()]),
        Some(c) => {
            eprintln!(
                "meshfed-policy: cluster `{c}` is declared neither in {} nor in {}; declared clusters: {}",
                old.label(),
                new.label(),
                declared.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            return Ok(EXIT_USAGE);
        }
        None if declared.is_empty() => BTreeSet::from([SINGLE.to_string()]),
        None => declared,
    };
    let (Some(a), Some(b)) = (
        compile_all(&old, &names, &opts),
        compile_all(&new, &names, &opts),
    ) else {
        return Ok(EXIT_USAGE);
    };
    let report = diff_clusters(&a, &b);
    match args.format {
        DiffFormat::Text => {
            writeln!(out, "diff {} → {}", old.label(), new.label())?;
            write!(out, "{}", report.text())?;
        }
        DiffFormat::Markdown => write!(out, "{}", report.markdown(&old.label(), &new.label()))?,
        DiffFormat::Json => {
            let v = json_report(&old, &new, Some(&report));
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
    }
    Ok(if args.exit_code && report.changed() {
        EXIT_CHANGED
    } else {
        0
    })
}

fn json_report(old: &Side, new: &Side, report: Option<&Report>) -> serde_json::Value {
    serde_json::json!({
        "schema": REPORT_SCHEMA,
        "old": old.json(),
        "new": new.json(),
        "changed": report.map(Report::changed),
        "clusters": report.map(|r| serde_json::to_value(&r.clusters).unwrap_or_default()).unwrap_or_else(|| serde_json::json!([])),
    })
}

/// Every named cluster that `side` declares (or all of them, when it
/// declares none: a single-cluster mesh compiles for any name).
fn compile_all(
    side: &Side,
    names: &BTreeSet<String>,
    opts: &Options,
) -> Option<BTreeMap<String, Snapshot>> {
    let declared = side.analysis.clusters();
    let version = side.commit.as_deref().unwrap_or("local");
    let mut out = BTreeMap::new();
    for name in names {
        if !declared.is_empty() && !declared.contains(name) {
            continue;
        }
        match side.analysis.compile(name, version, opts) {
            Ok(s) => {
                out.insert(name.clone(), s);
            }
            Err(e) => {
                eprintln!("meshfed-policy: {}: {e}", side.label());
                return None;
            }
        }
    }
    Some(out)
}

fn print_invalid(
    out: &mut impl Write,
    format: DiffFormat,
    old: &Side,
    new: &Side,
) -> anyhow::Result<()> {
    let bad: Vec<(&str, &Side)> = [("OLD", old), ("NEW", new)]
        .into_iter()
        .filter(|(_, s)| !s.analysis.is_valid())
        .collect();
    fn errors(s: &Side) -> Vec<&Diagnostic> {
        s.analysis
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .collect()
    }
    match format {
        DiffFormat::Json => {
            let v = json_report(old, new, None);
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        DiffFormat::Text => {
            for (which, s) in bad {
                for d in errors(s) {
                    writeln!(out, "{d}")?;
                }
                writeln!(
                    out,
                    "{which} {} is invalid: {} error(s); no diff (run `meshfed-policy validate` on it)",
                    s.label(),
                    s.analysis.error_count()
                )?;
            }
        }
        DiffFormat::Markdown => {
            writeln!(out, "<!-- meshfed-policy-diff -->")?;
            for (which, s) in bad {
                writeln!(
                    out,
                    "### Mesh policy: {which} `{}` is invalid ({} error(s))\n",
                    s.label().replace('`', "'"),
                    s.analysis.error_count()
                )?;
                // A fence longer than any backtick run in the messages.
                writeln!(out, "`````text")?;
                for d in errors(s) {
                    writeln!(out, "{d}")?;
                }
                writeln!(out, "`````")?;
            }
        }
    }
    Ok(())
}

/// Reads one side. `Err(message)` is the user's mistake (exit 2): a
/// revision that names no commit, a `--path` missing at that commit.
fn read_side(
    spec: &str,
    args: &DiffArgs,
    sel: &Selection,
    opts: &Options,
    repo: &mut Option<git2::Repository>,
) -> anyhow::Result<Result<Side, String>> {
    let as_dir = Path::new(spec);
    if as_dir.is_dir() {
        let (files, io) = read_paths(&[as_dir.to_path_buf()], sel);
        if io.iter().any(|d| d.code == Code::Io) {
            for d in &io {
                eprintln!("{d}");
            }
            return Ok(Err(format!("cannot read `{spec}`")));
        }
        let mut analysis = analyze(files, opts);
        analysis.diagnostics.extend(io);
        analysis.diagnostics.sort();
        return Ok(Ok(Side {
            spec: spec.to_string(),
            commit: None,
            analysis,
        }));
    }
    if repo.is_none() {
        let at = args.repo.clone().unwrap_or_else(|| PathBuf::from("."));
        match git2::Repository::discover(&at) {
            Ok(r) => *repo = Some(r),
            Err(e) => {
                return Ok(Err(format!(
                    "`{spec}` is not a directory, and {} is not in a Git repository to read a commit from ({}); \
                     give a directory, or run inside the repository (or pass --repo)",
                    at.display(),
                    e.message()
                )));
            }
        }
    }
    let Some(repo) = repo.as_ref() else {
        bail!("no repository");
    };
    let oid = match meshfed_policy::git::resolve_commit(repo, spec) {
        Ok(oid) => oid,
        Err(e) => {
            return Ok(Err(format!(
                "`{spec}` is neither a directory nor a commit of {}: {}",
                repo.path().display(),
                e.message()
            )));
        }
    };
    let tree = meshfed_policy::git::read_tree(repo, oid, args.path.as_deref(), sel)
        .with_context(|| format!("reading commit {oid} ({spec})"))?;
    if tree.missing_path {
        let p = args.path.as_deref().unwrap_or(Path::new("")).display();
        return Ok(Err(format!(
            "--path `{p}` is not a directory at {spec} ({oid})"
        )));
    }
    let at = args
        .path
        .as_deref()
        .map_or(".".to_string(), |p| p.display().to_string());
    let extra = tree.diagnostics(&at);
    let mut analysis = analyze(tree.files, opts);
    analysis.diagnostics.extend(extra);
    analysis.diagnostics.sort();
    Ok(Ok(Side {
        spec: spec.to_string(),
        commit: Some(oid.to_string()),
        analysis,
    }))
}
