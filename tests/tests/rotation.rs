//! Trust-anchor rotation under load, step for step as docs/rotation.md
//! says, with zero failed requests (istio #30947 is the failure this
//! prevents). Every gateway's credentials live in a Kubernetes
//! Secret-volume layout (files are symlinks into `..data`, itself a
//! symlink swapped atomically), so `cert.pem` and `key.pem` change
//! together, as a Secret update presents them.
//!
//! A reload keeps established links, so after the leaves change (step 3)
//! and after the old anchor goes (step 4) the destination's gateways are
//! restarted one at a time with SIGTERM: the new handshakes then really
//! use the new material, both as client and as server.
//!
//! Runs in nextest's `serial` group (load).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshfed_tests::federation::*;
use meshfed_tests::load::{self, LoadSpec, Protocol};

/// A Secret volume: `bundle.pem`, `cert.pem`, `key.pem` → `..data/<f>`.
struct Volume {
    dir: PathBuf,
    version: u32,
}

impl Volume {
    fn new(dir: &Path, creds: &Path) -> Volume {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = Volume {
            dir: dir.to_path_buf(),
            version: 0,
        };
        v.publish(
            &creds.join("bundle.pem"),
            &creds.join("cert.pem"),
            &creds.join("key.pem"),
        );
        for f in ["bundle.pem", "cert.pem", "key.pem"] {
            symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
        v
    }

    /// A new version of all three files, swapped in atomically.
    fn publish(&mut self, bundle: &Path, cert: &Path, key: &Path) {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let d = self.dir.join(&name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(bundle, d.join("bundle.pem")).unwrap();
        std::fs::copy(cert, d.join("cert.pem")).unwrap();
        std::fs::copy(key, d.join("key.pem")).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn current(&self, f: &str) -> PathBuf {
        self.dir.join(format!("..v{}", self.version)).join(f)
    }
}

fn reloads(gw: &GatewayProcess) -> usize {
    std::fs::read_to_string(&gw.log)
        .unwrap_or_default()
        .matches("certificates reloaded")
        .count()
}

fn refusals(gws: &[&GatewayProcess]) -> f64 {
    gws.iter()
        .map(|g| g.metric("meshfed_handshake_refusals_total", &[]))
        .sum()
}

async fn until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + meshfed_tests::patient(within);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_rotating_the_trust_anchor_with_overlap_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old = Pki::named(&d.join("old"), "meshfed root CA 1");
    let (east_port, west_ports) = (free_udp_port(), [free_udp_port(), free_udp_port()]);
    let policy = d.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(
        policy.join("p.yaml"),
        format!(
            "{}{}apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ratings, namespace: default}}\n",
            cluster_yaml("east", &[east_port]),
            cluster_yaml("west", &west_ports)
        ),
    )
    .unwrap();
    let (backend, _b) = http_backend("ratings-west").await;
    let eps = d.join("west.yaml");
    discovery_file(&eps, &[("ratings.default", vec![(backend, vec![])])]);
    let gws: [(&str, &str, u16); 3] = [
        ("west", "gw-0", west_ports[0]),
        ("west", "gw-1", west_ports[1]),
        ("east", "gw-0", east_port),
    ];
    let mut volumes: Vec<Volume> = gws
        .iter()
        .map(|(c, id, _)| Volume::new(&d.join(format!("vol-{c}-{id}")), &old.gateway(c, id)))
        .collect();
    let specs: Vec<GatewaySpec> = gws
        .iter()
        .zip(&volumes)
        .map(|((c, id, port), v)| GatewaySpec {
            cluster: c.to_string(),
            id: id.to_string(),
            tls_dir: v.dir.clone(),
            policy_dir: policy.clone(),
            discovery: (*c == "west").then(|| eps.clone()),
            tunnel_port: *port,
            work_dir: d.to_path_buf(),
            extra_args: vec!["--drain-timeout".into(), "10s".into()],
        })
        .collect();
    let mut procs: Vec<GatewayProcess> = specs.iter().map(GatewayProcess::start).collect();
    procs[2].wait_links("west", 2);

    let mut spec = LoadSpec::new(procs[2].outbound, "ratings", Protocol::Http1);
    spec.rate = 500;
    spec.duration = Duration::MAX;
    spec.connections = 32;
    spec.timeout = Duration::from_secs(10);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let load = tokio::spawn(load::run_until(spec, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Publishes each gateway's next files and waits for every reload.
    async fn roll(
        procs: &[GatewayProcess],
        volumes: &mut [Volume],
        next: impl Fn(usize, &Volume) -> (PathBuf, PathBuf, PathBuf),
    ) {
        let before: Vec<usize> = procs.iter().map(reloads).collect();
        for (i, v) in volumes.iter_mut().enumerate() {
            let (b, c, k) = next(i, v);
            v.publish(&b, &c, &k);
        }
        until("every gateway reloads", Duration::from_secs(10), || {
            procs.iter().zip(&before).all(|(p, n)| reloads(p) > *n)
        })
        .await;
    }
    async fn restart_west(procs: &mut [GatewayProcess], specs: &[GatewaySpec]) {
        for i in 0..2 {
            assert_eq!(procs[i].terminate(), Some(0), "{}", procs[i].log_tail());
            let spec = specs[i].clone();
            procs[i] = tokio::task::spawn_blocking(move || GatewayProcess::start(&spec))
                .await
                .unwrap();
            let east = &procs[2];
            until("east relinks west", Duration::from_secs(15), || {
                east.links_up("west") == 2
            })
            .await;
        }
    }

    // 1. The new anchor.
    let new = Pki::named(&d.join("new"), "meshfed root CA 2");
    // 2. Every bundle holds both anchors.
    let both = d.join("both.pem");
    certs(&[
        "bundle",
        &d.join("old/ca/root/ca.pem").to_string_lossy(),
        &d.join("new/ca/root/ca.pem").to_string_lossy(),
        "--out",
        &both.to_string_lossy(),
    ]);
    roll(&procs, &mut volumes, |_, v| {
        (both.clone(), v.current("cert.pem"), v.current("key.pem"))
    })
    .await;
    // 3. New intermediates and leaves under the new anchor, bundle still
    //    both; then new handshakes.
    let fresh: Vec<PathBuf> = gws.iter().map(|(c, id, _)| new.gateway(c, id)).collect();
    roll(&procs, &mut volumes, |i, _| {
        (
            both.clone(),
            fresh[i].join("cert.pem"),
            fresh[i].join("key.pem"),
        )
    })
    .await;
    restart_west(&mut procs, &specs).await;
    // 4. The old anchor goes; then new handshakes again.
    let new_only = d.join("new/ca/root/bundle.pem");
    roll(&procs, &mut volumes, |_, v| {
        (
            new_only.clone(),
            v.current("cert.pem"),
            v.current("key.pem"),
        )
    })
    .await;
    restart_west(&mut procs, &specs).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let _ = stop.send(());
    let report = load.await.unwrap();
    eprintln!("{report}");
    let all: Vec<&GatewayProcess> = procs.iter().collect();
    assert_eq!(refusals(&all), 0.0, "no handshake was refused");
    assert_eq!(report.failed, 0, "{report}");
    // The links now run on the new anchor alone: a gateway of the old PKI
    // is refused.
    // (It trusts both anchors, so it accepts west and goes on to present
    // its old chain, which west must refuse.)
    let stale = old.gateway("east", "stale");
    std::fs::copy(&both, stale.join("bundle.pem")).unwrap();
    let mut intruder_spec = specs[2].clone();
    intruder_spec.id = "stale".into();
    intruder_spec.tls_dir = stale;
    intruder_spec.tunnel_port = free_udp_port();
    let intruder = GatewayProcess::start(&intruder_spec);
    let west = &procs[0];
    until(
        "west refuses the old anchor",
        Duration::from_secs(10),
        || west.metric("meshfed_handshake_refusals_total", &["unknown_ca"]) >= 1.0,
    )
    .await;
    assert_eq!(intruder.links_up("west"), 0);
}
