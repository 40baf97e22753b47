//! `meshfed-bench`: meshfed's benchmark harness. Each scenario starts what
//! it measures on loopback (the real binaries beside this one, or in
//! `$MESHFED_BIN_DIR`), prints its table, and writes markdown and JSON
//! under the results directory. Scenarios live in `meshfed_tests::bench`.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/meshfed-bench propagation
//! target/release/meshfed-bench instructions --iterations 2000   # needs valgrind, strace
//! target/release/meshfed-bench --quick          # every scenario, briefly (CI smoke)
//! MESHFED_BENCH_KEEP_SCRATCH=1 target/release/meshfed-bench instructions   # keeps logs and callgrind files
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshfed_tests::bench::{self, Context, Section};

/// meshfed's benchmark harness: runs scenarios against the real binaries on
/// loopback and writes a markdown report and JSON. Numbers are measured,
/// never asserted.
#[derive(Debug, Parser)]
#[command(name = "meshfed-bench")]
struct Cli {
    /// Scenarios to run (all when none is named); see --list.
    scenarios: Vec<String>,

    /// A smoke run: every scenario briefly, numbers not meaningful.
    #[arg(long)]
    quick: bool,

    /// Iterations per measured cell (each scenario has a default); for
    /// `instructions`, the number of requests counted (default 2,000).
    #[arg(long, value_name = "N")]
    iterations: Option<usize>,

    /// Where to write report.md and <scenario>.{md,json}.
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    out: PathBuf,

    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,

    /// A flag for every meshfed gateway the scenarios start, to compare
    /// settings (repeat it; e.g. `--gateway-arg=--congestion-control
    /// --gateway-arg=bbr`). Rows name the flags they ran with.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    gateway_arg: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    meshfed_identity::install_crypto_provider();
    let all = bench::scenarios();
    if cli.list {
        for s in &all {
            println!("{:<14} {}", s.name, s.about);
        }
        return ExitCode::SUCCESS;
    }
    let unknown: Vec<&String> = cli
        .scenarios
        .iter()
        .filter(|n| !all.iter().any(|s| s.name == n.as_str()))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "meshfed-bench: unknown scenario(s) {unknown:?}; known: {}",
            all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(2);
    }
    for name in ["meshfed-syncer", "meshfed-gateway"] {
        if let Err(e) = meshfed_tests::locate(name) {
            eprintln!("meshfed-bench: {e}");
            return ExitCode::from(2);
        }
    }
    let scratch = match tempfile::Builder::new().prefix("meshfed-bench").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("meshfed-bench: cannot create a scratch directory: {e}");
            return ExitCode::from(1);
        }
    };
    // MESHFED_BENCH_KEEP_SCRATCH=1 keeps the scratch directory (logs,
    // callgrind files) for a person to look at, and prints where it is.
    let scratch = if std::env::var_os("MESHFED_BENCH_KEEP_SCRATCH").is_some_and(|v| v == "1") {
        let kept = scratch.keep();
        eprintln!("meshfed-bench: keeping scratch files in {}", kept.display());
        Scratch::Kept(kept)
    } else {
        Scratch::Temporary(scratch)
    };
    let ctx = Context {
        quick: cli.quick,
        iterations: cli.iterations,
        scratch: scratch.path().to_path_buf(),
        gateway_args: cli.gateway_arg.clone(),
    };
    let mut sections: Vec<Section> = Vec::new();
    let mut failed = false;
    for s in all
        .iter()
        .filter(|s| cli.scenarios.is_empty() || cli.scenarios.iter().any(|n| n == s.name))
    {
        eprintln!("== {}", s.name);
        // A scenario that panics (a harness assertion, a process that would
        // not start) is reported like one that failed, and the others run.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (s.run)(&ctx))) {
            Ok(Ok(section)) => {
                println!("## {}\n\n{}", section.title, section.markdown);
                sections.push(section);
            }
            Ok(Err(e)) => {
                eprintln!("meshfed-bench: scenario {} failed: {e:#}", s.name);
                failed = true;
            }
            Err(_) => {
                eprintln!(
                    "meshfed-bench: scenario {} panicked (message above); going on with the rest",
                    s.name
                );
                failed = true;
            }
        }
    }
    match bench::write_results(&cli.out, cli.quick, &sections) {
        Ok(path) => eprintln!("report: {}", path.display()),
        Err(e) => {
            eprintln!(
                "meshfed-bench: cannot write results to {}: {e}",
                cli.out.display()
            );
            return ExitCode::from(1);
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The scratch directory: removed at exit unless kept.
enum Scratch {
    Temporary(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl Scratch {
    fn path(&self) -> &std::path::Path {
        match self {
            Scratch::Temporary(d) => d.path(),
            Scratch::Kept(p) => p,
        }
    }
}
