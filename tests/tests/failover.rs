//! Cluster-level ejection across clusters, with real gateways and backends:
//! when outlier detection at west's gateway ejects every endpoint of a
//! service, west announces none healthy and east's gateway stops opening
//! streams to west within 1 s, then comes back when the ejection ends.
//! What east sends is counted where it lands: west's inbound streams
//! (`meshfed_requests_total{direction="inbound"}` at west).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshfed_tests::federation::*;
use meshfed_tests::{patient, wait_for};

/// Streams west's gateway received from east.
fn west_inbound(west: &GatewayProcess) -> f64 {
    west.metric(
        "meshfed_requests_total",
        &["direction=\"inbound\"", "source_cluster=\"east\""],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_endpoints_are_all_ejected_gets_no_first_tries_within_1s_and_returns() {
    // West's only endpoint answers 503 while `failing`.
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    let (west_backend, _tw) = serve_fn(move |_req: Request<Incoming>| {
        let failing = flag.load(Ordering::SeqCst);
        async move {
            hyper::Response::builder()
                .status(if failing { 503 } else { 200 })
                .body(Full::new(Bytes::from_static(b"west")))
                .unwrap()
        }
    })
    .await;
    let (east_backend, _te) = http_backend("east").await;

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (east_port, west_port) = (free_udp_port(), free_udp_port());
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    // Half the calls pin west's subset; the DestinationRule's outlier
    // detection (applied by west's gateway to its endpoints) ejects after 3
    // consecutive 5xx for 4 s (longer than the 2.5 s watched below, so the
    // ejection does not end while it is watched), and may eject the whole pool.
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: ratings, namespace: default}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings, namespace: default}}
spec:
  host: ratings
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 4s, maxEjectionPercent: 100}}
  subsets:
  - {{name: east, labels: {{topology.istio.io/cluster: east}}}}
  - {{name: west, labels: {{topology.istio.io/cluster: west}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings, subset: east}}, weight: 50}}
    - {{destination: {{host: ratings, subset: west}}, weight: 50}}
",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &[west_port])
        ),
    )
    .unwrap();
    let (east_eps, west_eps) = (dir.path().join("east.yaml"), dir.path().join("west.yaml"));
    discovery_file(
        &east_eps,
        &[("ratings.default", vec![(east_backend, vec![])])],
    );
    discovery_file(
        &west_eps,
        &[("ratings.default", vec![(west_backend, vec![])])],
    );
    let spec = |cluster: &str, port: u16, eps: &std::path::Path| GatewaySpec {
        cluster: cluster.into(),
        id: "gw-0".into(),
        tls_dir: pki.gateway(cluster, "gw-0"),
        policy_dir: policy.clone(),
        discovery: Some(eps.to_path_buf()),
        tunnel_port: port,
        work_dir: dir.path().to_path_buf(),
        extra_args: vec![],
    };
    let west = Arc::new(GatewayProcess::start(&spec("west", west_port, &west_eps)));
    let east = GatewayProcess::start(&spec("east", east_port, &east_eps));
    east.wait_links("west", 1);

    // Steady calls through east, one at a time, for the whole test.
    let served_by_west = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (served_by_west, stop, via) = (served_by_west.clone(), stop.clone(), east.outbound);
        tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            while !stop.load(Ordering::SeqCst) {
                let req = Request::get(format!("http://{via}/"))
                    .header("host", "ratings")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
                {
                    let ok = resp.status() == 200;
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                    if ok && body.is_ok_and(|b| &b[..] == b"west") {
                        served_by_west.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let w = west.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            "west serves part of the split",
            Duration::from_secs(10),
            || {
                if west_inbound(&w) >= 20.0 {
                    Ok(())
                } else {
                    Err("too few streams at west")
                }
            },
        )
        .unwrap();
    })
    .await
    .unwrap();

    // West's endpoint starts failing; west's gateway ejects it.
    failing.store(true, Ordering::SeqCst);
    let w = west.clone();
    let samples = tokio::task::spawn_blocking(move || {
        let ejected_at = wait_for("west ejects its endpoint", Duration::from_secs(10), || {
            if w.metric("meshfed_outlier_ejected", &["ratings"]) >= 1.0 {
                Ok(Instant::now())
            } else {
                Err("not ejected")
            }
        })
        .unwrap();
        // Follow the streams east opens to west for 2.5 s after it.
        let mut samples = Vec::new();
        while ejected_at.elapsed() < Duration::from_millis(2500) {
            samples.push((ejected_at.elapsed(), west_inbound(&w)));
            std::thread::sleep(Duration::from_millis(20));
        }
        samples
    })
    .await
    .unwrap();
    let last = samples.last().unwrap().1;
    let settled = samples
        .iter()
        .find(|(_, n)| *n == last)
        .map(|(t, _)| *t)
        .unwrap();
    let deadline = patient(Duration::from_millis(1000)) + Duration::from_millis(250);
    assert!(
        settled <= deadline,
        "east still opened streams to west {settled:?} after the ejection (at most 1 s, \
         with {deadline:?} allowed on this machine): {samples:?}"
    );
    // Not a vacuous pass: east was sending to west until the ejection.
    assert!(samples.first().unwrap().1 >= 20.0);

    // The endpoint recovers; when its ejection ends (4 s), west announces
    // it healthy and east sends west its share again.
    failing.store(false, Ordering::SeqCst);
    let before = served_by_west.load(Ordering::SeqCst);
    let w = west.clone();
    let counted = served_by_west.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            "east sends to west again after the ejection",
            Duration::from_secs(8),
            || {
                let n = counted.load(Ordering::SeqCst);
                if n >= before + 5 && west_inbound(&w) > last {
                    Ok(())
                } else {
                    Err(format!("{} more answers from west", n - before))
                }
            },
        )
        .unwrap();
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
}
