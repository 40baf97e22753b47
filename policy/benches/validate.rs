//! Validation and compilation cost on a large federation: 10,000 resources
//! (2,500 services, each with a ServiceExport, a DestinationRule with
//! version and cluster subsets, a VirtualService with a header match, a
//! regex match and a three-way split, and an AuthorizationPolicy) across 5
//! clusters, in 100 files. Budget (design.md): validate 10,000 resources in
//! at most 1 s.
//!
//! Run: `cargo bench -p meshfed-policy --bench validate`.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use meshfed_policy::{Options, analyze};

const SERVICES: usize = 2_500;
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

/// 100 files of 25 services each, plus a file of clusters.
fn federation() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = (0..100)
        .map(|f| {
            let body: Vec<String> = (f * 25..(f + 1) * 25).map(service).collect();
            (format!("services/{f:03}.yaml"), body.join("---\n"))
        })
        .collect();
    let clusters: Vec<String> = CLUSTERS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata: {{name: {c}}}\nspec: {{gateways: ['gw.{c}.example.com:15443', '10.0.{i}.10:15443']}}\n"
            )
        })
        .collect();
    files.push(("clusters.yaml".into(), clusters.join("---\n")));
    files
}

fn bench(c: &mut Criterion) {
    let files = federation();
    let opts = Options::default();
    let a = analyze(files.iter().map(|(n, t)| (n, t)), &opts);
    assert!(
        a.is_valid(),
        "{:#?}",
        &a.diagnostics[..a.diagnostics.len().min(5)]
    );
    assert_eq!(a.resources.len(), SERVICES * 4 + CLUSTERS.len());
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    eprintln!(
        "federation: {} resources, {} files, {} KiB",
        a.resources.len(),
        files.len(),
        bytes / 1024
    );

    let mut g = c.benchmark_group("policy_10k_resources");
    g.sample_size(10);
    g.bench_function("validate", |b| {
        b.iter(|| black_box(analyze(files.iter().map(|(n, t)| (n, t)), &opts)))
    });
    g.bench_function("compile_one_cluster", |b| {
        b.iter(|| black_box(a.compile("east", "v", &opts)))
    });
    g.bench_function("validate_and_compile_all_clusters", |b| {
        b.iter(|| {
            let a = analyze(files.iter().map(|(n, t)| (n, t)), &opts);
            for cluster in CLUSTERS {
                black_box(a.compile(cluster, "v", &opts).map(|s| s.encode()).ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
