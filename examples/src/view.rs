//! What the demo shows: the live view (plain ANSI, redrawn in place on a
//! terminal, printed as blocks otherwise) and the copy-pasteable commands.
//! It reads the traffic clients' records and asks the gateways (admin API)
//! and the syncer what they run; it changes nothing.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::federation::{Federation, get, short};
use crate::repo::sh_quote;
use crate::traffic::{Summary, Traffic};

/// The window the live view summarizes: short, so that a commit shows
/// within a second.
const WINDOW: Duration = Duration::from_secs(1);

/// One line per client: who calls what through which gateway, and how it
/// goes.
pub fn client_lines(traffic: &Traffic, from: Instant, to: Instant) -> Vec<String> {
    traffic
        .clients
        .iter()
        .map(|c| {
            let s = c.summary(from, to);
            let state = if c.is_paused() { " (paused)" } else { "" };
            format!(
                "  {:<5} {:>11} → {:<8}{}\n        {}\n        split: {}{}",
                c.spec.cluster,
                c.spec.caller,
                c.spec.authority,
                state,
                stats_text(&s),
                if s.split.is_empty() {
                    "-".to_string()
                } else {
                    s.split_text()
                },
                failures_text(&s),
            )
        })
        .collect()
}

/// `120.0 req/s  success 100.0%  p50 1.2 ms  p99 4.0 ms`.
pub fn stats_text(s: &Summary) -> String {
    format!(
        "{:>6.1} req/s  success {:>6}  p50 {:>8}  p99 {:>8}",
        s.rate(),
        s.success_pct()
            .map_or("-".to_string(), |p| format!("{p:.1}%")),
        ms(s.p50),
        ms(s.p99),
    )
}

fn failures_text(s: &Summary) -> String {
    if s.failures.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = s
        .failures
        .iter()
        .map(|(k, v)| format!("{v} × {k}"))
        .collect();
    format!("\n        failed: {}", parts.join(", "))
}

pub fn ms(d: Option<Duration>) -> String {
    d.map_or("-".to_string(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

/// Each gateway's applied commit and links, from its admin API.
pub fn gateway_lines(fed: &Federation) -> Vec<String> {
    fed.gateways
        .iter()
        .map(|g| {
            let applied = fed
                .applied(g)
                .map_or("down".to_string(), |v| short(&v).to_string());
            let (want, transports) = (fed.want_links(g), fed.link_transports(g));
            format!(
                "  {:<8} applied {:<12}  links {}/{want} {:<14}  outbound {}  admin {}",
                g.name(),
                applied,
                transports.len(),
                by_transport(&transports),
                g.outbound,
                g.admin
            )
        })
        .collect()
}

/// What a gateway's available links run over, e.g. `(2 quic)` or `(1 quic,
/// 1 tcp)`: a link where UDP is blocked shows as `tcp` until it moves back
/// to QUIC.
pub fn by_transport(transports: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for t in transports {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    format!("({})", parts.join(", "))
}

/// The commands a user can paste into another terminal.
pub fn commands(fed: &Federation) -> String {
    let east = &fed.gateway("east")[0];
    let creds = fed.workload_creds("east", "productpage");
    let c = |f: &str| sh_quote(&creds.join(f).to_string_lossy());
    let port = east.outbound.port();
    let name = east.server_name();
    let syncer = fed.bins.path("meshfed-syncer");
    let repo = sh_quote(&fed.repo.dir.to_string_lossy());
    format!(
        "\
Try it (in another terminal):

  # Call reviews through east's gateway as productpage (STRICT mTLS: a workload certificate)
  curl -s --cacert {bundle} --cert {cert} --key {key} \\
       --resolve {name}:{port}:127.0.0.1 -H 'Host: reviews' https://{name}:{port}/ -D - -o /dev/null
  # ... internal users always get v2:
  curl -s --cacert {bundle} --cert {cert} --key {key} \\
       --resolve {name}:{port}:127.0.0.1 -H 'Host: reviews' -H 'user-type: internal' https://{name}:{port}/ -D - -o /dev/null
  # Without a certificate the gateway refuses (403, x-meshfed-error: mtls-required):
  curl -si -H 'Host: reviews' http://127.0.0.1:{port}/

  # Change the canary and commit: the post-commit hook tells the syncer
  cd {repo}
  sed -i 's/weight: 95/weight: 50/; s/weight: 5$/weight: 50/' reviews-canary.yaml
  git commit -am 'reviews: half of the traffic to v2'

  # Wait until every gateway has applied it (exit 0), or see why not (1: rejected or NACKed)
  {syncer} status --server http://{http} --wait $(git -C {repo} rev-parse HEAD) --timeout 30s
  {syncer} status --server http://{http}

  # What a gateway runs, its links and metrics
  curl -s http://{admin}/config_dump | head -c 600; echo
  curl -s http://{admin}/peers
  curl -s http://{admin}/metrics | grep '^meshfed_requests_total'

  Logs: {work}/logs   Policy repository: {repo}
",
        bundle = c("bundle.pem"),
        cert = c("cert.pem"),
        key = c("key.pem"),
        syncer = sh_quote(&syncer.to_string_lossy()),
        http = fed.syncer_http,
        admin = east.admin,
        work = fed.work.display(),
    )
}

/// The live view, until the process is stopped (Ctrl-C).
pub fn run(fed: &Federation, traffic: &Traffic) -> ! {
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last_block = Instant::now() - Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = Instant::now();
        // Without a terminal (piped to a file), print a block every 5 s.
        if !tty && now.duration_since(last_block) < Duration::from_secs(5) {
            continue;
        }
        last_block = now;
        let head = fed.repo.head().unwrap_or_default();
        let rollout = fed
            .rollout(&head)
            .ok()
            .and_then(|r| r["state"].as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let syncer_status = get(fed.syncer_http, "/status")
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok());
        let rejected = syncer_status
            .as_ref()
            .and_then(|s| s.pointer("/rejected/0"))
            .map(|r| {
                let diag = r
                    .pointer("/diagnostics/0")
                    .map(|d| {
                        format!(
                            "{}:{}:{}: {}",
                            d["file"].as_str().unwrap_or("?"),
                            d["line"],
                            d["column"],
                            d["message"].as_str().unwrap_or("")
                        )
                    })
                    .unwrap_or_else(|| r["reason"].as_str().unwrap_or("").to_string());
                format!(
                    "\n  last rejected commit {}: {diag}",
                    short(r["commit"].as_str().unwrap_or("?"))
                )
            })
            .unwrap_or_default();
        let mut screen = String::new();
        if tty {
            screen.push_str("\x1b[H\x1b[2J");
        }
        screen.push_str(&format!(
            "meshfed demo: 3 clusters on loopback, up {:.0} s (Ctrl-C stops everything)\n\n\
             Policy: HEAD {} on main, rollout {rollout}{rejected}\n\n\
             Traffic, last {} s (each client calls through its own cluster's gateways):\n",
            started.elapsed().as_secs_f64(),
            short(&head),
            WINDOW.as_secs()
        ));
        for l in client_lines(
            traffic,
            now - WINDOW - Duration::from_millis(300),
            now - Duration::from_millis(300),
        ) {
            screen.push_str(&l);
            screen.push('\n');
        }
        screen.push_str("\nGateways:\n");
        for l in gateway_lines(fed) {
            screen.push_str(&l);
            screen.push('\n');
        }
        screen.push('\n');
        if tty {
            screen.push_str(&commands(fed));
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(screen.as_bytes());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn links_are_summed_by_transport() {
        let t =
            |v: &[&str]| super::by_transport(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&[]), "");
        assert_eq!(t(&["quic", "quic"]), "(2 quic)");
        assert_eq!(t(&["tcp", "quic", "quic"]), "(2 quic, 1 tcp)");
    }
}
