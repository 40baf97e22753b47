//! Scenario `validation` (issue 8, scenario 7): `meshfed-policy validate`
//! on a generated repository of 10,000 resources (the same shapes as
//! policy/benches/validate.rs: 2,500 services, each with a ServiceExport, a
//! DestinationRule, a VirtualService and an AuthorizationPolicy, across 5
//! clusters in 100 files), timed as an operator runs it: the whole process,
//! wall clock. Budget (design.md): ≤ 1 s.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;

use super::{Context, Section, Stats, Table};

const CLUSTERS: [&str; 5] = ["east", "west", "north", "south", "edge"];

fn service(i: usize) -> String {
    let ns = format!("team-{}", i % 20);
    let a = CLUSTERS[i % 5];
    let b = CLUSTERS[(i + 1) % 5];
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: svc-{i}, namespace: {ns}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-{i}, namespace: {ns}}}
spec:
  host: svc-{i}
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 100, connectTimeout: 500ms}}
      http: {{http1MaxPendingRequests: 50, maxRequestsPerConnection: 10}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - name: {a}
    labels: {{topology.istio.io/cluster: {a}}}
  - name: {b}
    labels: {{topology.istio.io/cluster: {b}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{i}, namespace: {ns}}}
spec:
  hosts: [svc-{i}]
  http:
  - match:
    - headers:
        user-type: {{exact: internal}}
    - headers:
        user-agent: {{regex: '.*(mobile|tablet).*'}}
    route:
    - destination: {{host: svc-{i}, subset: v2}}
    timeout: 2s
  - route:
    - destination: {{host: svc-{i}, subset: v1}}
      weight: 60
    - destination: {{host: svc-{i}, subset: {a}}}
      weight: 30
    - destination: {{host: svc-{i}, subset: {b}}}
      weight: 10
    retries: {{attempts: 3, perTryTimeout: 500ms, retryOn: '5xx,connect-failure'}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: svc-{i}, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: svc-{i}}}}}
  rules:
  - from:
    - source: {{principals: ['cluster.local/ns/{ns}/sa/caller-*']}}
    to:
    - operation: {{methods: [GET, POST], paths: ['/api/*']}}
"
    )
}

/// Runs the scenario.
pub fn run(ctx: &Context) -> anyhow::Result<Section> {
    let repo = ctx.scratch.join("validation");
    std::fs::create_dir_all(repo.join("services"))?;
    for f in 0..100 {
        let body: Vec<String> = (f * 25..(f + 1) * 25).map(service).collect();
        std::fs::write(
            repo.join(format!("services/{f:03}.yaml")),
            body.join("---\n"),
        )?;
    }
    let clusters: Vec<String> = CLUSTERS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: {c}}}\nspec: {{gateways: ['gw.{c}.example.com:15443', '10.0.{i}.10:15443']}}\n"
            )
        })
        .collect();
    std::fs::write(repo.join("clusters.yaml"), clusters.join("---\n"))?;
    let policy = crate::locate("meshfed-policy")?;
    let n = ctx
        .iterations
        .unwrap_or(if ctx.quick { 1 } else { 5 })
        .max(1);
    let mut samples = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let out = Command::new(&policy)
            .arg("validate")
            .arg("-q")
            .arg(&repo)
            .output()?;
        let secs = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "meshfed-policy validate failed on the generated repo: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        samples.push(secs * 1e3);
    }
    let s = Stats::of(&samples).ok_or_else(|| anyhow::anyhow!("no samples"))?;
    let mut t = Table::new(&[
        "resources",
        "runs",
        "min ms",
        "median ms",
        "max ms",
        "budget",
    ]);
    t.row(vec![
        "10,005 (10,000 + 5 clusters)".into(),
        n.to_string(),
        format!("{:.0}", s.min),
        format!("{:.0}", s.p50),
        format!("{:.0}", s.max),
        format!(
            "≤ 1,000 ms: {}",
            if s.p50 <= 1000.0 { "met" } else { "missed" }
        ),
    ]);
    Ok(Section {
        scenario: "validation".into(),
        title: "Validation (scenario 7)".into(),
        markdown: format!(
            "`meshfed-policy validate -q` on a generated repo (2,500 services × ServiceExport, \
             DestinationRule, VirtualService, AuthorizationPolicy; 100 files), whole process, \
             wall clock.\n\n{}",
            t.markdown()
        ),
        json: json!({"scenario": "validation", "ms": s.json(), "samples_ms": samples}),
    })
}
