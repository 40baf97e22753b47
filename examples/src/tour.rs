//! `meshfed-demo --tour`: the scripted, non-interactive walk through what
//! meshfed does, with an expectation per step. Each step measures on the
//! real traffic and the real processes; the summary table says what was
//! expected, what was measured, and whether it held. Any failed
//! expectation makes the demo exit non-zero (after stopping everything).
//!
//! Steps: (1) the baseline split; (2) a canary commit: time until every
//! gateway ACKed, and the new split; (3) an invalid commit: the syncer's
//! `FILE:LINE` rejection, and not one failed request; (4) both of west's
//! gateways killed: failover time and errors; (5) west's gateways back;
//! (6) rollout waves declared (edge, then west, then east), then a valid
//! commit that sends all of ratings to a broken subset: rolled back at
//! wave 1 by the syncer's gates, with the failed requests counted per
//! caller's cluster and the gateways that ever applied it.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::federation::{Federation, short};
use crate::repo::ROLLOUT;
use crate::traffic::{Client, Outcome, Record, Summary, Traffic};
use crate::view::stats_text;

/// How long each measurement window lasts.
const MEASURE: Duration = Duration::from_secs(4);

/// One step's result.
#[derive(Debug)]
pub struct Step {
    pub name: &'static str,
    pub expected: String,
    pub measured: String,
    pub pass: bool,
}

/// Runs the tour; `Ok` holds every step's result (some may have failed),
/// `Err` means the tour could not go on.
pub fn run(fed: &Federation, traffic: &Traffic) -> anyhow::Result<Vec<Step>> {
    let east = traffic.client("east").context("no east client")?;
    let west = traffic.client("west").context("no west client")?;
    let edge = traffic.client("edge").context("no edge client")?;
    let mut steps = Vec::new();

    // Let connections come up before anything is judged.
    std::thread::sleep(Duration::from_millis(800));

    // 1. Baseline.
    heading("1. baseline: reviews canary 95/5, ratings 70/30 east/west");
    let (from, to) = measure();
    let (se, sw, sx) = (
        east.summary(from, to),
        west.summary(from, to),
        edge.summary(from, to),
    );
    show(&[("east", &se), ("west", &sw), ("edge", &sx)]);
    let pass = se.failed() == 0
        && sw.failed() == 0
        && sx.failed() == 0
        && se.share("reviews-v1") >= 85.0
        && sw.share("reviews-v1.east") >= 85.0
        && (60.0..=80.0).contains(&sx.share("ratings-v1.east"));
    steps.push(Step {
        name: "1 baseline split",
        expected: "reviews v1 ≥ 85% (east, west), ratings east 70±10%, 0 failed".into(),
        measured: format!(
            "v1 {:.1}% / {:.1}%, ratings east {:.1}%, {} failed",
            se.share("reviews-v1"),
            sw.share("reviews-v1"),
            sx.share("ratings-v1.east"),
            se.failed() + sw.failed() + sx.failed()
        ),
        pass,
    });

    // 2. Canary commit.
    heading("2. commit a canary: reviews v2 from 5% to 50%");
    let vs = fed.repo.read("reviews-canary.yaml")?;
    let canary = vs
        .replace("weight: 95", "weight: 50")
        .replace("weight: 5\n", "weight: 50\n");
    anyhow::ensure!(
        canary != vs,
        "reviews-canary.yaml has no 95/5 weights to change"
    );
    let t0 = Instant::now();
    let sha = fed.repo.commit(
        "reviews: canary v2 at 50%",
        &[("reviews-canary.yaml", &canary)],
    )?;
    let acked = fed
        .wait_live(&sha, Duration::from_secs(15))
        .map(|_| t0.elapsed());
    match &acked {
        Ok(d) => println!(
            "   commit {} live on every gateway {:.0} ms after `git commit` (hook → webhook → fetch → validate → gRPC → ACK)",
            short(&sha),
            d.as_secs_f64() * 1000.0
        ),
        Err(e) => println!("   commit {} not live: {e:#}", short(&sha)),
    }
    let status = status_wait(fed, &sha, "10s")?;
    std::thread::sleep(Duration::from_millis(300));
    let (from, to) = measure();
    let (se, sw) = (east.summary(from, to), west.summary(from, to));
    show(&[("east", &se), ("west", &sw)]);
    let near = |x: f64, want: f64| (x - want).abs() <= 10.0;
    let ack_ms = acked.as_ref().map(|d| d.as_secs_f64() * 1000.0).ok();
    let pass = ack_ms.is_some_and(|ms| ms <= 2000.0)
        && status.code == Some(0)
        && near(se.share("reviews-v2"), 50.0)
        && near(sw.share("reviews-v2"), 50.0)
        && se.failed() + sw.failed() == 0;
    steps.push(Step {
        name: "2 canary commit",
        expected: "all 4 gateways ACK ≤ 2 s; v2 50±10% (east, west); 0 failed".into(),
        measured: format!(
            "ACKed in {}; v2 {:.1}% / {:.1}%; {} failed",
            ack_ms.map_or("never".into(), |m| format!("{m:.0} ms")),
            se.share("reviews-v2"),
            sw.share("reviews-v2"),
            se.failed() + sw.failed()
        ),
        pass,
    });

    // 3. Invalid commit.
    heading("3. commit an invalid policy: weights that sum to 90");
    let good = sha.clone();
    let bad_text = canary.replacen("weight: 50", "weight: 40", 1);
    let t_bad = Instant::now();
    let bad = fed.repo.commit(
        "reviews: weights that do not add up",
        &[("reviews-canary.yaml", &bad_text)],
    )?;
    let r = fed.wait_decided(&bad, Duration::from_secs(15))?;
    let diag = r["diagnostics"]
        .as_array()
        .and_then(|d| d.first())
        .and_then(|d| d.as_str())
        .unwrap_or("")
        .to_string();
    println!(
        "   syncer: commit {} {}",
        short(&bad),
        r["state"].as_str().unwrap_or("?")
    );
    for d in r["diagnostics"].as_array().into_iter().flatten() {
        println!("   {}", d.as_str().unwrap_or("").replace('\n', "\n   "));
    }
    // Traffic keeps flowing on the last good commit.
    std::thread::sleep(Duration::from_secs(2));
    let to = Instant::now() - Duration::from_millis(300);
    let all: Vec<Summary> = [east, west, edge]
        .iter()
        .map(|c| c.summary(t_bad, to))
        .collect();
    let sent: usize = all.iter().map(|s| s.sent).sum();
    let failed: usize = all.iter().map(Summary::failed).sum();
    let still_good = fed
        .gateways
        .iter()
        .all(|g| fed.applied(g).as_deref() == Some(good.as_str()));
    println!(
        "   traffic since the commit: {sent} requests, {failed} failed; every gateway still on {}: {still_good}",
        short(&good)
    );
    let place = diag.split(": ").next().unwrap_or("").to_string();
    let pass = r["state"] == "rejected"
        && place.starts_with("reviews-canary.yaml:")
        && failed == 0
        && sent > 0
        && still_good;
    steps.push(Step {
        name: "3 invalid commit",
        expected: "rejected at FILE:LINE, gateways keep the canary, 0 failed".into(),
        measured: format!(
            "{} at {place}; {failed} of {sent} failed",
            r["state"].as_str().unwrap_or("?")
        ),
        pass,
    });
    // Put the good policy back, as an operator would (`git revert`).
    let fixed = fed.repo.commit(
        "reviews: restore the canary",
        &[("reviews-canary.yaml", &canary)],
    )?;
    fed.wait_live(&fixed, Duration::from_secs(15))?;
    println!("   restored the canary in {} (live)", short(&fixed));

    // 4. Kill west's gateways.
    heading("4. kill both of west's gateways (SIGKILL, no drain)");
    // West's own workloads lose their gateways with them; the question is
    // what happens to everyone else's calls to west.
    west.pause();
    let t_kill = Instant::now();
    for g in fed.gateway("west") {
        fed.kill_gateway(g);
    }
    std::thread::sleep(MEASURE);
    let end = Instant::now() - Duration::from_millis(300);
    let before = t_kill - Duration::from_secs(2);
    let records = edge.records(before, end);
    let affected_until = records
        .iter()
        .filter(|r| match &r.outcome {
            Outcome::Failed(_) => true,
            Outcome::Ok(by) => {
                r.latency > Duration::from_millis(250)
                    || (by.ends_with(".west") && r.sent >= t_kill)
            }
        })
        .map(|r| r.sent + r.latency)
        .max();
    let failover = affected_until
        .map(|t| t.saturating_duration_since(t_kill))
        .unwrap_or_default();
    let errors = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .count();
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &records {
        if let Outcome::Failed(why) = &r.outcome {
            *reasons.entry(why.as_str()).or_default() += 1;
        }
    }
    let after = edge.summary(
        (t_kill + failover + Duration::from_millis(50)).min(end),
        end,
    );
    let se = east.summary(before, end);
    println!(
        "   edge → ratings: failover in {:.0} ms, {errors} of {} requests failed",
        failover.as_secs_f64() * 1000.0,
        records.len()
    );
    for (why, n) in &reasons {
        println!("   edge → ratings failed during the failover: {n} × {why}");
    }
    show(&[("east", &se), ("edge", &after)]);
    // A hard kill fails the calls that were on the dead links until the
    // links are declared dead; the bound is on how long that lasts, and on
    // nothing failing afterwards.
    let pass = failover <= Duration::from_secs(3)
        && after.sent > 0
        && after.failed() == 0
        && after.share("ratings-v1.east") >= 99.9
        && se.failed() == 0;
    steps.push(Step {
        name: "4 west gateways killed",
        expected: "failover ≤ 3 s, then ratings 100% east, 0 failed; east unaffected".into(),
        measured: format!(
            "failover {:.0} ms, {errors} failed; then east {:.1}%, {} failed",
            failover.as_secs_f64() * 1000.0,
            after.share("ratings-v1.east"),
            after.failed(),
        ),
        pass,
    });

    // 5. Bring them back.
    heading("5. bring west's gateways back");
    let t_back = Instant::now();
    for g in fed.gateway("west") {
        fed.start_gateway(g)?;
    }
    for g in fed.gateway("west") {
        fed.wait_gateway_ready(g)?;
    }
    fed.wait_links(Duration::from_secs(20))?;
    let back = t_back.elapsed();
    west.resume();
    let head = fed.repo.head()?;
    let on_head = fed
        .gateway("west")
        .iter()
        .all(|g| fed.applied(g).as_deref() == Some(head.as_str()));
    println!(
        "   west/w1 and west/w2 ready and linked in {:.0} ms, on {}: {on_head}",
        back.as_secs_f64() * 1000.0,
        short(&head)
    );
    std::thread::sleep(Duration::from_millis(500));
    let (from, to) = measure();
    let (sw, sx) = (west.summary(from, to), edge.summary(from, to));
    show(&[("west", &sw), ("edge", &sx)]);
    let pass = on_head
        && (60.0..=80.0).contains(&sx.share("ratings-v1.east"))
        && sw.failed() == 0
        && sw.sent > 0
        && sx.failed() == 0;
    steps.push(Step {
        name: "5 west back",
        expected: "west on HEAD; ratings east 70±10% again; west's clients 0 failed".into(),
        measured: format!(
            "back in {:.0} ms; ratings east {:.1}%; west {} of {} failed",
            back.as_secs_f64() * 1000.0,
            sx.share("ratings-v1.east"),
            sw.failed(),
            sw.sent
        ),
        pass,
    });

    steps.push(bad_commit_rolled_back(fed, traffic)?);
    Ok(steps)
}

/// Step 6: rollout waves are declared (edge, then west, then east), then a
/// valid commit sends all of ratings to its broken v2 (every answer a
/// 503). The syncer publishes it to edge only; edge's gateway reports its
/// callers' failures, the success-rate gate fails, and the syncer sends
/// edge back to its last good snapshot by itself. Where the failures were
/// is counted by the demo's own clients, and whether west and east ever
/// applied the commit by their gateways' `meshfed_config_info`.
fn bad_commit_rolled_back(fed: &Federation, traffic: &Traffic) -> anyhow::Result<Step> {
    let east = traffic.client("east").context("no east client")?;
    let west = traffic.client("west").context("no west client")?;
    let edge = traffic.client("edge").context("no edge client")?;
    heading("6. declare rollout waves (edge, then west, then east); then break ratings, validly");
    let t_waves = Instant::now();
    let waves = fed.repo.commit(
        "rollout: edge first, then west, then east",
        &[("rollout.yaml", ROLLOUT)],
    )?;
    // This commit goes through the waves too (edge bakes 4 s, west 2 s).
    fed.wait_live(&waves, Duration::from_secs(30))?;
    println!(
        "   committed rollout.yaml in {}: waves edge (bake 4 s) → west (bake 2 s) → east; live everywhere {:.1} s later",
        short(&waves),
        t_waves.elapsed().as_secs_f64()
    );

    let ratings = fed.repo.read("ratings.yaml")?;
    let broken = all_ratings_to_v2(&ratings)?;
    let t_bad = Instant::now();
    let bad = fed
        .repo
        .commit("ratings: all of it to v2", &[("ratings.yaml", &broken)])?;
    println!(
        "   commit {}: 100% of ratings to subset v2 (valid; v2's endpoints answer 503)",
        short(&bad)
    );
    let r = fed.wait_decided(&bad, Duration::from_secs(30))?;
    let decided = t_bad.elapsed();
    let state = r["state"].as_str().unwrap_or("?").to_string();
    let reason = r["detail"].as_str().unwrap_or("").to_string();
    println!(
        "   syncer: {state} {:.1} s after `git commit`: {reason}",
        decided.as_secs_f64()
    );
    // Edge's gateway back on the last good snapshot.
    let x1 = fed.gateway("edge")[0];
    let back = if state == "rolled-back" {
        crate::federation::wait_until(
            "edge's gateway back on the last good commit",
            Duration::from_secs(15),
            || Ok((fed.applied(x1).as_deref() == Some(waves.as_str())).then(Instant::now)),
        )
    } else {
        Err(anyhow::anyhow!("the commit was not rolled back"))
    };
    let rolled_back_in = back.as_ref().ok().map(|t| t.duration_since(t_bad));
    // Let the last requests finish, then look at a window after it.
    std::thread::sleep(Duration::from_secs(2));
    let end = Instant::now() - Duration::from_millis(300);
    let failed_at = |c: &Client| -> Vec<Record> {
        c.records(t_bad, end)
            .into_iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .collect()
    };
    let (fx, fe, fw) = (failed_at(edge), failed_at(east), failed_at(west));
    let sent = edge.records(t_bad, end).len();
    let window = match (
        fx.iter().map(|r| r.sent).min(),
        fx.iter().map(|r| r.sent + r.latency).max(),
    ) {
        (Some(first), Some(last)) => format!(
            "from {:.1} s to {:.1} s after the commit",
            first.saturating_duration_since(t_bad).as_secs_f64(),
            last.saturating_duration_since(t_bad).as_secs_f64()
        ),
        _ => "none".into(),
    };
    let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &fx {
        if let Outcome::Failed(why) = &r.outcome {
            *reasons.entry(why.as_str()).or_default() += 1;
        }
    }
    println!(
        "   failed requests by the caller's cluster: edge {}, west {}, east {} (edge → ratings: {} of {sent}, {window})",
        fx.len(),
        fw.len(),
        fe.len(),
        fx.len()
    );
    for (why, n) in &reasons {
        println!("   edge → ratings failed: {n} × {why}");
    }
    match rolled_back_in {
        Some(d) => println!(
            "   edge/x1 back on {} {:.1} s after `git commit`",
            short(&waves),
            d.as_secs_f64()
        ),
        None => println!("   edge/x1 not back on {}", short(&waves)),
    }
    let mut applied_bad = Vec::new();
    for g in &fed.gateways {
        if fed.ever_applied(g, &bad)? {
            applied_bad.push(g.name());
        }
    }
    println!(
        "   gateways that ever applied {}: {}",
        short(&bad),
        if applied_bad.is_empty() {
            "none".to_string()
        } else {
            applied_bad.join(", ")
        }
    );
    let status = status_wait(fed, &bad, "10s")?;
    // After the rollback: edge's callers are fine again.
    let after = back
        .as_ref()
        .ok()
        .map(|t| edge.summary((*t + Duration::from_millis(500)).min(end), end));
    if let Some(a) = &after {
        show(&[("edge", a)]);
    }
    let pass = state == "rolled-back"
        && r["waves"]["failure"]["metric"] == "success_rate"
        && reason.contains("wave 1 of 3 (edge)")
        && rolled_back_in.is_some_and(|d| d <= Duration::from_secs(10))
        && !fx.is_empty()
        && fe.is_empty()
        && fw.is_empty()
        && applied_bad == ["edge/x1"]
        && status.code == Some(1)
        && status.text.contains("ROLLED BACK")
        && after
            .as_ref()
            .is_some_and(|a| a.sent > 0 && a.failed() == 0);
    Ok(Step {
        name: "6 bad commit rolled back",
        expected:
            "rolled back at wave 1 (edge) ≤ 10 s, failures at edge only, west/east never apply it"
                .into(),
        measured: format!(
            "{state} in {}; failed: edge {}, west {}, east {}; applied by {}",
            rolled_back_in.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            fx.len(),
            fw.len(),
            fe.len(),
            if applied_bad.is_empty() {
                "none".to_string()
            } else {
                applied_bad.join(", ")
            }
        ),
        pass,
    })
}

/// `ratings.yaml` with a subset v2 (`version: v2`) and every request of
/// ratings routed to it: valid, and wrong.
fn all_ratings_to_v2(ratings: &str) -> anyhow::Result<String> {
    let split = concat!(
        "        - destination:\n",
        "            host: ratings\n",
        "            subset: east\n",
        "          weight: 70\n",
        "        - destination:\n",
        "            host: ratings\n",
        "            subset: west\n",
        "          weight: 30\n",
    );
    let to_v2 = concat!(
        "        - destination:\n",
        "            host: ratings\n",
        "            subset: v2\n",
    );
    let west = concat!(
        "    - name: west\n",
        "      labels:\n",
        "        topology.istio.io/cluster: west\n",
        "        version: v1\n",
    );
    let v2 = concat!(
        "    - name: v2\n",
        "      labels:\n",
        "        version: v2\n"
    );
    anyhow::ensure!(
        ratings.contains(split) && ratings.contains(west),
        "ratings.yaml has no 70/30 east/west split or no west subset to change"
    );
    Ok(ratings
        .replace(split, to_v2)
        .replace(west, &format!("{west}{v2}")))
}

/// `meshfed-syncer status --wait SHA --timeout T`, printed as a user would
/// see it.
fn status_wait(fed: &Federation, sha: &str, timeout: &str) -> anyhow::Result<StatusOut> {
    let out = std::process::Command::new(fed.bins.path("meshfed-syncer"))
        .args(["status", "--server", &format!("http://{}", fed.syncer_http)])
        .args(["--wait", sha, "--timeout", timeout])
        .output()
        .context("running meshfed-syncer status --wait")?;
    let code = out.status.code();
    println!(
        "   $ meshfed-syncer status --wait {}   (exit {})",
        short(sha),
        code.unwrap_or(-1)
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text.lines() {
        println!("   {l}");
    }
    Ok(StatusOut { code, text })
}

struct StatusOut {
    code: Option<i32>,
    text: String,
}

/// Waits one measurement window; returns it, ending a little in the past
/// so that the window's requests have finished.
fn measure() -> (Instant, Instant) {
    let from = Instant::now();
    std::thread::sleep(MEASURE + Duration::from_millis(300));
    (from, from + MEASURE)
}

fn heading(text: &str) {
    println!("\n== {text}");
}

fn show(rows: &[(&str, &Summary)]) {
    for (name, s) in rows {
        println!("   {name:<5} {}", stats_text(s));
        println!("         split: {}", s.split_text());
        for (why, n) in &s.failures {
            println!("         failed: {n} × {why}");
        }
    }
}

/// The summary table.
pub fn table(steps: &[Step]) -> String {
    let w0 = steps
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(4);
    let w1 = steps
        .iter()
        .map(|s| s.expected.chars().count())
        .max()
        .unwrap_or(8);
    let w2 = steps
        .iter()
        .map(|s| s.measured.chars().count())
        .max()
        .unwrap_or(8);
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = format!(
        "{}  {}  {}  RESULT\n",
        pad("STEP", w0),
        pad("EXPECTED", w1),
        pad("MEASURED", w2)
    );
    for s in steps {
        out.push_str(&format!(
            "{}  {}  {}  {}\n",
            pad(s.name, w0),
            pad(&s.expected, w1),
            pad(&s.measured, w2),
            if s.pass { "pass" } else { "FAIL" }
        ));
    }
    out
}
