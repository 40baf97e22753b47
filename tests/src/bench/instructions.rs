//! The `instructions` scenario (issue 17): per-request costs that the
//! noise of a shared 2-core machine cannot move, for meshfed's gateway pair
//! and for the HAProxy pair of the other data-path scenarios (HTTP/1.1 in,
//! HTTP/2 over mutual TLS 1.3 between the two, one thread each):
//!
//! - **user-space instructions per request**, both processes of the pair
//!   under `valgrind --tool=callgrind`. After a warm-up, the counters are
//!   zeroed (`callgrind_control -z`), N requests run, both processes dump
//!   (`callgrind_control -d`); then the pair idles for as long as the N
//!   requests took and dumps again. (load − idle) / N cancels startup (not
//!   in either window) and timers (in both), and is given per side and for
//!   the pair;
//! - **syscalls per request**, the same windows with `strace -c -f`
//!   attached to each process (not under valgrind), load − idle;
//! - **a profile**: the top functions by self and by inclusive
//!   instructions of each meshfed process in the load window
//!   (`callgrind_annotate`).
//!
//! The load generator is in this process and the same for both pairs: one
//! HTTP/1.1 keep-alive connection, requests one after another (`GET /`, 1
//! KB answers from the in-process [`Backend`]). Sequential requests make
//! every request pay its own wake-ups on every process, with nothing
//! batched, so the count is the same whatever the machine's load.
//!
//! The meshfed gateways run with `RUST_LOG=info`, a deployment's default
//! (the other scenarios' gateways log at debug).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::rig::{self, AUTHORITY, BODY_BYTES, Backend, HAPROXY_MISSING, HaproxyPair, MeshfedPair};
use super::{Context, Section, Table};
use crate::federation::Pki;

/// Requests before the counters are zeroed: connections, the HAProxy
/// pair's h2 connection and every lazy structure exist by then.
const WARMUP: usize = 50;
/// Rows of each profile table.
const TOP: usize = 12;
/// Self rows above this share of a window are frames active at the dump
/// (see [`annotate`]).
const ACTIVE_FRAME: f64 = 0.9;
/// How long one request may take under valgrind before the run fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The tools this scenario runs, and what provides them.
const TOOLS: [(&str, &str); 4] = [
    ("valgrind", "valgrind"),
    ("callgrind_control", "valgrind"),
    ("callgrind_annotate", "valgrind"),
    ("strace", "strace"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Meshfed,
    Haproxy,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Meshfed => "meshfed",
            System::Haproxy => "haproxy",
        }
    }

    /// The sides' names as the pair's starter passes them to a wrapper,
    /// caller side first.
    fn sides(self) -> [&'static str; 2] {
        match self {
            System::Meshfed => ["east", "west"],
            System::Haproxy => ["a", "b"],
        }
    }
}

/// A running pair of either kind.
enum Pair {
    Meshfed(Box<MeshfedPair>),
    Haproxy(HaproxyPair),
}

impl Pair {
    /// Starts `system`'s pair, each process under `wrap(side)` (for
    /// meshfed, after `env RUST_LOG=info`).
    fn start(
        system: System,
        ctx: &Context,
        dir: &Path,
        pki: &Pki,
        backend: &Backend,
        wrap: &dyn Fn(&str) -> Vec<String>,
    ) -> anyhow::Result<Pair> {
        std::fs::create_dir_all(dir)?;
        Ok(match system {
            System::Meshfed => {
                let wrap = |side: &str| {
                    let mut v = rig::deployed_log_level(side);
                    v.extend(wrap(side));
                    v
                };
                Pair::Meshfed(Box::new(MeshfedPair::start_wrapped(
                    dir,
                    pki,
                    backend,
                    None,
                    &ctx.gateway_args,
                    &wrap,
                )?))
            }
            System::Haproxy => Pair::Haproxy(HaproxyPair::start_wrapped(
                dir,
                pki,
                backend,
                None,
                wrap,
                // valgrind's start (reading OpenSSL's symbols) is slow.
                Duration::from_secs(120),
            )?),
        })
    }

    /// Where callers send HTTP/1.1.
    fn http(&self) -> SocketAddr {
        match self {
            Pair::Meshfed(p) => p.a.outbound,
            Pair::Haproxy(p) => p.http,
        }
    }

    /// Caller side's and destination side's pids.
    fn pids(&self) -> [u32; 2] {
        match self {
            Pair::Meshfed(p) => p.pids(),
            Pair::Haproxy(p) => p.pids(),
        }
    }
}

/// One keep-alive HTTP/1.1 connection sending `GET /` one request at a
/// time: the same load generator for both pairs.
struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    async fn connect(target: SocketAddr) -> anyhow::Result<Client> {
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { send, driver })
    }

    /// `n` requests in sequence; the time they took. Any failure (status,
    /// short body, closed connection, timeout) fails the run: a count over
    /// failed requests would mean nothing.
    async fn run(&mut self, n: usize) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for i in 0..n {
            tokio::time::timeout(REQUEST_TIMEOUT, self.get())
                .await
                .with_context(|| format!("request {} of {n} took over {REQUEST_TIMEOUT:?}", i + 1))?
                .with_context(|| format!("request {} of {n}", i + 1))?;
        }
        Ok(start.elapsed())
    }

    async fn get(&mut self) -> anyhow::Result<()> {
        self.send.ready().await?;
        let req = Request::get("/")
            .header("host", AUTHORITY)
            .body(Full::new(Bytes::new()))?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() || body.len() != BODY_BYTES {
            bail!(
                "answer {status} with {} body bytes, expected 200 with {BODY_BYTES}",
                body.len()
            );
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Tools that are not installed, with their Debian package.
fn missing_tools() -> Vec<(&'static str, &'static str)> {
    TOOLS
        .iter()
        .copied()
        // Found is enough: `callgrind_annotate --version` exits with 255.
        .filter(|(tool, _)| {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect()
}

/// A window's counts, caller side and destination side.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    counts: [u64; 2],
    secs: f64,
}

/// (load − idle) / n per side.
fn per_request(load: &Window, idle: &Window, n: usize) -> [f64; 2] {
    [0, 1].map(|i| (load.counts[i] as f64 - idle.counts[i] as f64) / n as f64)
}

/// One system's callgrind measurement.
struct Callgrind {
    load: Window,
    idle: Window,
    /// The load window's dumps, caller side first (for the profile).
    load_dumps: [PathBuf; 2],
}

fn callgrind_control(flag: &str, pid: u32) -> anyhow::Result<()> {
    let out = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("OK") {
        bail!(
            "callgrind_control {flag} {pid} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The total instructions (`totals:`) of a callgrind dump.
fn callgrind_total(path: &Path) -> anyhow::Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{} has no `totals:` line", path.display()))
}

/// Dumps both processes' counters (resetting them); returns the dumps.
/// Dump files are `<out-file>.<k>` for the k-th dump of a process.
fn dump(pids: [u32; 2], out: &[PathBuf; 2], k: usize) -> anyhow::Result<[PathBuf; 2]> {
    for pid in pids {
        callgrind_control("-d", pid)?;
    }
    let files = [0, 1].map(|i| {
        let mut name = out[i].clone().into_os_string();
        name.push(format!(".{}.{k}", pids[i]));
        PathBuf::from(name)
    });
    for f in &files {
        crate::wait_for(
            &format!("callgrind writes {}", f.display()),
            Duration::from_secs(60),
            || callgrind_total(f),
        )?;
    }
    Ok(files)
}

fn measure_callgrind(
    system: System,
    ctx: &Context,
    dir: &Path,
    pki: &Pki,
    backend: &Backend,
    rt: &tokio::runtime::Runtime,
    n: usize,
) -> anyhow::Result<Callgrind> {
    let dir = dir.join(format!("callgrind-{}", system.name()));
    std::fs::create_dir_all(&dir)?;
    let out = system
        .sides()
        .map(|side| dir.join(format!("callgrind.{}-{side}", system.name())));
    let wrap = |side: &str| {
        vec![
            "valgrind".to_string(),
            "--tool=callgrind".to_string(),
            format!(
                "--callgrind-out-file={}.%p",
                dir.join(format!("callgrind.{}-{side}", system.name()))
                    .display()
            ),
        ]
    };
    eprintln!(
        "instructions: starting the {} pair under callgrind",
        system.name()
    );
    let pair = Pair::start(system, ctx, &dir, pki, backend, &wrap)?;
    let pids = pair.pids();
    let mut client = rt.block_on(Client::connect(pair.http()))?;
    rt.block_on(client.run(WARMUP)).context("warm-up")?;
    for pid in pids {
        callgrind_control("-z", pid)?;
    }
    eprintln!("instructions: {} requests through {}", n, system.name());
    let took = rt.block_on(client.run(n))?;
    let load_dumps = dump(pids, &out, 1)?;
    // The idle window: as long as the requests took, the connection open.
    let idle_start = Instant::now();
    std::thread::sleep(took);
    let idle_dumps = dump(pids, &out, 2)?;
    let idle_secs = idle_start.elapsed().as_secs_f64();
    drop(client);
    drop(pair);
    let total = |d: &[PathBuf; 2]| -> anyhow::Result<[u64; 2]> {
        Ok([callgrind_total(&d[0])?, callgrind_total(&d[1])?])
    };
    Ok(Callgrind {
        load: Window {
            counts: total(&load_dumps)?,
            secs: took.as_secs_f64(),
        },
        idle: Window {
            counts: total(&idle_dumps)?,
            secs: idle_secs,
        },
        load_dumps,
    })
}

/// One line of a `callgrind_annotate` listing.
#[derive(Debug, Clone, PartialEq)]
struct ProfileLine {
    ir: u64,
    percent: f64,
    function: String,
    object: String,
}

/// Parses `callgrind_annotate`'s function listing: lines such as
/// `52,000 (33.1%)  ./string/memmove.S:__memcpy_avx_unaligned_erms [/usr/lib/libc.so.6]`.
fn parse_annotate(text: &str) -> Vec<ProfileLine> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (num, rest) = l.split_once(" (")?;
            let ir: u64 = num.replace(',', "").parse().ok()?;
            let (pct, rest) = rest.split_once("%)")?;
            let percent: f64 = pct.trim().parse().ok()?;
            let rest = rest.trim();
            if rest == "PROGRAM TOTALS" {
                return None;
            }
            let (location, object) = match rest.rsplit_once(" [") {
                Some((loc, obj)) => (loc, obj.trim_end_matches(']')),
                None => (rest, ""),
            };
            // `file:function`; the file has no `:` (a function may).
            let function = location
                .split_once(':')
                .map_or(location, |(_, f)| f)
                .to_string();
            let object = Path::new(object)
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
            Some(ProfileLine {
                ir,
                percent,
                function,
                object,
            })
        })
        .collect()
}

/// The top functions of a dump by self or inclusive instructions.
///
/// A dump taken while the process runs (`callgrind_control -d`) lists the
/// frames on a thread's stack at that moment (thread start, tokio's worker
/// loop, the task it polls) with about all of the window's instructions
/// in the self view too; as no function of a proxy does most of its work
/// itself, self rows above [`ACTIVE_FRAME`] of `total` are those frames and
/// are left out. So are inclusive rows above it: they are the same frames,
/// which include everything, and say nothing.
fn annotate(dump: &Path, inclusive: bool, total: u64) -> anyhow::Result<Vec<ProfileLine>> {
    let out = Command::new("callgrind_annotate")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg("--auto=no")
        .arg("--threshold=100")
        .arg(dump)
        .output()
        .context("running callgrind_annotate")?;
    if !out.status.success() {
        bail!(
            "callgrind_annotate {} failed: {}",
            dump.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut lines = parse_annotate(&String::from_utf8_lossy(&out.stdout));
    lines.retain(|l| (l.ir as f64) < ACTIVE_FRAME * total as f64);
    lines.truncate(TOP);
    Ok(lines)
}

/// Shortens a demangled Rust name for a table: generic arguments are
/// elided past a length, and the pipe is escaped for markdown.
fn short(function: &str) -> String {
    const MAX: usize = 110;
    let f = function.replace('|', "\\|");
    if f.chars().count() <= MAX {
        return f;
    }
    let head: String = f.chars().take(MAX).collect();
    format!("{head}…")
}

// ---- syscalls ----------------------------------------------------------

/// `strace -c -f` attached to one process until [`Strace::finish`].
struct Strace {
    child: Child,
    out: PathBuf,
}

impl Strace {
    fn attach(pid: u32, out: PathBuf) -> anyhow::Result<Strace> {
        let err_path = out.with_extension("stderr");
        let err = std::fs::File::create(&err_path)?;
        let child = Command::new("strace")
            .args(["-c", "-f", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("starting strace")?;
        let mut s = Strace { child, out };
        // strace says "Process <pid> attached" once it traces the process.
        let attached = crate::wait_for(
            &format!("strace attaches to {pid}"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = s.child.try_wait() {
                    return Err(format!(
                        "strace exited with {status}: {}",
                        std::fs::read_to_string(&err_path).unwrap_or_default()
                    ));
                }
                let text = std::fs::read_to_string(&err_path).unwrap_or_default();
                if text.contains("attached") {
                    Ok(())
                } else {
                    Err(text)
                }
            },
        );
        if let Err(e) = attached {
            let _ = s.child.kill();
            let _ = s.child.wait();
            bail!("{e}");
        }
        Ok(s)
    }

    /// Detaches (SIGINT) and returns the counts per syscall.
    fn finish(mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let child = &mut self.child;
        crate::wait_for("strace detaches", Duration::from_secs(30), || {
            child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_string())
        })?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        Ok(parse_strace(&text))
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `strace -c`'s table: `% time seconds usecs/call calls [errors]
/// syscall` rows (errors may be blank), without the `total` row.
fn parse_strace(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let name = f[f.len() - 1];
        if name == "total" {
            continue;
        }
        if let Ok(n) = f[3].parse::<u64>() {
            *calls.entry(name.to_string()).or_insert(0) += n;
        }
    }
    calls
}

/// One system's syscall measurement: per side, per syscall, load and idle.
struct Syscalls {
    load: [BTreeMap<String, u64>; 2],
    idle: [BTreeMap<String, u64>; 2],
    load_secs: f64,
}

impl Syscalls {
    fn windows(&self) -> (Window, Window) {
        let sum = |m: &[BTreeMap<String, u64>; 2]| m.clone().map(|s| s.values().sum::<u64>());
        (
            Window {
                counts: sum(&self.load),
                secs: self.load_secs,
            },
            Window {
                counts: sum(&self.idle),
                secs: self.load_secs,
            },
        )
    }

    /// (load − idle) / n for each syscall, both sides together, largest
    /// first.
    fn per_request_by_call(&self, n: usize) -> Vec<(String, f64)> {
        let mut names: Vec<&String> = self
            .load
            .iter()
            .chain(&self.idle)
            .flat_map(|m| m.keys())
            .collect();
        names.sort();
        names.dedup();
        let get = |m: &[BTreeMap<String, u64>; 2], k: &str| -> f64 {
            m.iter()
                .map(|s| s.get(k).copied().unwrap_or(0) as f64)
                .sum()
        };
        let mut v: Vec<(String, f64)> = names
            .into_iter()
            .map(|k| {
                (
                    k.clone(),
                    (get(&self.load, k) - get(&self.idle, k)) / n as f64,
                )
            })
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}

fn measure_syscalls(
    system: System,
    ctx: &Context,
    dir: &Path,
    pki: &Pki,
    backend: &Backend,
    rt: &tokio::runtime::Runtime,
    n: usize,
) -> anyhow::Result<Syscalls> {
    let dir = dir.join(format!("strace-{}", system.name()));
    eprintln!("instructions: the {} pair under strace", system.name());
    let pair = Pair::start(system, ctx, &dir, pki, backend, &rig::unwrapped)?;
    let pids = pair.pids();
    let mut client = rt.block_on(Client::connect(pair.http()))?;
    rt.block_on(client.run(WARMUP)).context("warm-up")?;
    let attach = |window: &str| -> anyhow::Result<[Strace; 2]> {
        let sides = system.sides();
        Ok([
            Strace::attach(
                pids[0],
                dir.join(format!("strace-{window}-{}.txt", sides[0])),
            )?,
            Strace::attach(
                pids[1],
                dir.join(format!("strace-{window}-{}.txt", sides[1])),
            )?,
        ])
    };
    let finish = |[a, b]: [Strace; 2]| -> anyhow::Result<[BTreeMap<String, u64>; 2]> {
        Ok([a.finish()?, b.finish()?])
    };
    let tracing = attach("load")?;
    let took = rt.block_on(client.run(n))?;
    let load = finish(tracing)?;
    let tracing = attach("idle")?;
    std::thread::sleep(took);
    let idle = finish(tracing)?;
    drop(client);
    drop(pair);
    Ok(Syscalls {
        load,
        idle,
        load_secs: took.as_secs_f64(),
    })
}

// ---- the scenario ------------------------------------------------------

/// The `instructions` scenario.
pub fn run(ctx: &Context) -> anyhow::Result<Section> {
    let missing = missing_tools();
    if !missing.is_empty() {
        let tools: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
        let mut pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        pkgs.dedup();
        return Ok(Section::skipped(
            "instructions",
            &format!(
                "{} not installed (`apt-get install -y {}`); no instruction or syscall counts",
                tools.join(", "),
                pkgs.join(" ")
            ),
        ));
    }
    let n = ctx
        .iterations
        .unwrap_or(if ctx.quick { 200 } else { 2000 })
        .max(1);
    let dir = ctx.scratch.join("instructions");
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::new(&dir);
    let backend = Backend::start()?;
    let rt = rig::runtime(1)?;
    let mut systems = vec![System::Meshfed];
    let haproxy = rig::haproxy_available();
    if haproxy {
        systems.push(System::Haproxy);
    } else {
        eprintln!("instructions: {HAPROXY_MISSING}");
    }

    let mut cg = Vec::new();
    for &s in &systems {
        cg.push((s, measure_callgrind(s, ctx, &dir, &pki, &backend, &rt, n)?));
    }
    let mut sc = Vec::new();
    for &s in &systems {
        sc.push((s, measure_syscalls(s, ctx, &dir, &pki, &backend, &rt, n)?));
    }

    let mut md = format!(
        "{n} sequential HTTP/1.1 `GET /` (1 KB answers) on one keep-alive connection, after \
         {WARMUP} warm-up requests, minus an idle window as long as the requests took. \
         Instructions: user space, both processes under `valgrind --tool=callgrind` \
         (`callgrind_control -z`/`-d` around each window). Syscalls: `strace -c -f` attached \
         to each process (not under valgrind) for each window. Caller side = the process \
         the client talks to (meshfed A, HAProxy A); destination = the one in front of the \
         backend. Deterministic up to timer ticks: the machine's load does not move them.\n\n"
    );
    let mut t = Table::new(&[
        "system",
        "instructions/req caller",
        "destination",
        "pair",
        "load window Ir (caller, dest)",
        "idle window Ir (caller, dest)",
        "window s (load, idle)",
    ]);
    let mut rows = Vec::new();
    let mut pair_ir = BTreeMap::new();
    for (s, c) in &cg {
        let per = per_request(&c.load, &c.idle, n);
        pair_ir.insert(s.name(), per[0] + per[1]);
        t.row(vec![
            s.name().into(),
            format!("{:.0}", per[0]),
            format!("{:.0}", per[1]),
            format!("**{:.0}**", per[0] + per[1]),
            format!("{}, {}", c.load.counts[0], c.load.counts[1]),
            format!("{}, {}", c.idle.counts[0], c.idle.counts[1]),
            format!("{:.1}, {:.1}", c.load.secs, c.idle.secs),
        ]);
        rows.push(json!({
            "system": s.name(), "requests": n,
            "instructions_per_request": {"caller": per[0], "destination": per[1], "pair": per[0] + per[1]},
            "load_ir": c.load.counts, "idle_ir": c.idle.counts,
            "load_secs": c.load.secs, "idle_secs": c.idle.secs,
        }));
    }
    md.push_str(&t.markdown());
    let ratio = match (pair_ir.get("meshfed"), pair_ir.get("haproxy")) {
        (Some(m), Some(h)) if *h > 0.0 => Some(m / h),
        _ => None,
    };
    if let Some(r) = ratio {
        let _ = writeln!(
            md,
            "\nmeshfed / HAProxy, pair instructions per request: **{r:.2}×** (target ≤ 0.8×)."
        );
    }

    let mut t = Table::new(&[
        "system",
        "syscalls/req caller",
        "destination",
        "pair",
        "largest per request (pair)",
    ]);
    let mut sys_rows = Vec::new();
    let mut pair_sc = BTreeMap::new();
    for (s, c) in &sc {
        let (load, idle) = c.windows();
        let per = per_request(&load, &idle, n);
        pair_sc.insert(s.name(), per[0] + per[1]);
        let by_call = c.per_request_by_call(n);
        t.row(vec![
            s.name().into(),
            format!("{:.2}", per[0]),
            format!("{:.2}", per[1]),
            format!("**{:.2}**", per[0] + per[1]),
            by_call
                .iter()
                .take(6)
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
        sys_rows.push(json!({
            "system": s.name(), "requests": n,
            "syscalls_per_request": {"caller": per[0], "destination": per[1], "pair": per[0] + per[1]},
            "by_syscall_per_request": by_call.iter().map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>(),
            "load": c.load, "idle": c.idle, "window_secs": c.load_secs,
        }));
    }
    md.push('\n');
    md.push_str(&t.markdown());
    let sc_ratio = match (pair_sc.get("meshfed"), pair_sc.get("haproxy")) {
        (Some(m), Some(h)) if *h > 0.0 => Some(m / h),
        _ => None,
    };
    if let Some(r) = sc_ratio {
        let _ = writeln!(
            md,
            "\nmeshfed / HAProxy, pair syscalls per request: **{r:.2}×** (target < 1×)."
        );
    }
    if !haproxy {
        let _ = writeln!(md, "\n{HAPROXY_MISSING}.");
    }

    // The profile of each meshfed process in the load window.
    let mut profiles = Vec::new();
    if let Some((_, c)) = cg.iter().find(|(s, _)| *s == System::Meshfed) {
        let _ = writeln!(
            md,
            "\n### Profile: meshfed, load window ({n} requests plus the idle work of the window)\n\n\
             Instructions per request = the function's count in the load window / {n}. \
             Self excludes callees; inclusive includes them. Both leave out the frames on the \
             stack when the dump was taken (thread start, the tokio worker loop: rows of over \
             90% of the window, which callgrind_annotate lists with the whole window even as \
             self cost).\n"
        );
        for (i, side) in ["caller side (A)", "destination (B)"].iter().enumerate() {
            let total = c.load.counts[i].max(1) as f64;
            for inclusive in [false, true] {
                let lines = annotate(&c.load_dumps[i], inclusive, c.load.counts[i])?;
                let kind = if inclusive { "inclusive" } else { "self" };
                let _ = writeln!(md, "{side}, top {TOP} by {kind}:\n");
                let mut t = Table::new(&["Ir/req", "%", "function", "object"]);
                for l in &lines {
                    t.row(vec![
                        format!("{:.0}", l.ir as f64 / n as f64),
                        format!("{:.1}", l.ir as f64 / total * 100.0),
                        format!("`{}`", short(&l.function)),
                        l.object.clone(),
                    ]);
                }
                md.push_str(&t.markdown());
                md.push('\n');
                profiles.push(json!({
                    "side": side, "kind": kind,
                    "functions": lines.iter().map(|l| json!({
                        "ir": l.ir, "ir_per_request": l.ir as f64 / n as f64,
                        "function": l.function, "object": l.object,
                    })).collect::<Vec<_>>(),
                }));
            }
        }
    }

    Ok(Section {
        scenario: "instructions".into(),
        title: "Instructions and syscalls per request (issue 17)".into(),
        markdown: md,
        json: json!({
            "scenario": "instructions", "requests": n, "warmup": WARMUP,
            "instructions": rows, "ratio_pair_instructions_meshfed_over_haproxy": ratio,
            "syscalls": sys_rows, "ratio_pair_syscalls_meshfed_over_haproxy": sc_ratio,
            "profiles": profiles,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotate_listing_lines_are_parsed() {
        let text = "\
--------------------------------------------------------------------------------
Ir          file:function
--------------------------------------------------------------------------------
1,234,567 (100.0%)  PROGRAM TOTALS
52,000 (33.1%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:__memcpy_avx_unaligned_erms [/usr/lib/x86_64-linux-gnu/libc.so.6]
9,001 ( 5.7%)  ???:hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_loop [/t/meshfed-gateway]
.           ./csu/libc-start.c:__libc_start_main [/usr/lib/libc.so.6]
";
        let lines = parse_annotate(text);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].ir, 52_000);
        assert_eq!(lines[0].function, "__memcpy_avx_unaligned_erms");
        assert_eq!(lines[0].object, "libc.so.6");
        assert_eq!(
            lines[1].function,
            "hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_loop"
        );
        assert!((lines[1].percent - 5.7).abs() < 1e-9);
    }

    #[test]
    fn strace_summary_rows_are_summed_without_the_total() {
        let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.000400           2       200           epoll_wait
 30.00    0.000300           1       300       100 recvfrom
 30.00    0.000300           1       100           sendto
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           1       600       100 total
";
        let calls = parse_strace(text);
        assert_eq!(calls.get("epoll_wait"), Some(&200));
        assert_eq!(calls.get("recvfrom"), Some(&300));
        assert_eq!(calls.values().sum::<u64>(), 600);
        assert!(!calls.contains_key("total"));
    }

    #[test]
    fn per_request_subtracts_the_idle_window() {
        let load = Window {
            counts: [1_000_000, 500_000],
            secs: 1.0,
        };
        let idle = Window {
            counts: [200_000, 100_000],
            secs: 1.0,
        };
        assert_eq!(per_request(&load, &idle, 100), [8_000.0, 4_000.0]);
    }
}
