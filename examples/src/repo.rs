//! The demo's policy repository: a fresh local Git repository seeded from
//! the example policy repositories (embedded at build time), with a
//! post-commit hook that tells the syncer about every commit with a signed
//! webhook (`meshfed-demo hook`).
//!
//! Seed: `bookinfo-canary` (STRICT mTLS, reviews canary 95/5 with internal
//! users on v2, reviews authorization) and `multicluster-failover`'s
//! ratings (a 70/30 east/west split with retries and outlier detection);
//! `clusters.yaml` and `exports.yaml` are written for the loopback
//! federation, because the examples' gateway addresses are not loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::federation::{CLUSTERS, Gateway};

/// The files copied from examples/, by name in the demo repository.
pub const SEED: &[(&str, &str)] = &[
    (
        "mesh-mtls.yaml",
        include_str!("../bookinfo-canary/mesh-mtls.yaml"),
    ),
    (
        "reviews-authz.yaml",
        include_str!("../bookinfo-canary/reviews-authz.yaml"),
    ),
    (
        "reviews-canary.yaml",
        include_str!("../bookinfo-canary/reviews-canary.yaml"),
    ),
    (
        "reviews-destination-rule.yaml",
        include_str!("../bookinfo-canary/reviews-destination-rule.yaml"),
    ),
    (
        "ratings.yaml",
        include_str!("../multicluster-failover/ratings.yaml"),
    ),
];

const EXPORTS: &str = "\
# Services the clusters share. Only exported services are reachable across
# clusters (ratings is exported in ratings.yaml).
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: reviews
  namespace: default
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: details
  namespace: default
";

const README: &str = "\
# meshfed demo policy repository

Made by `meshfed-demo`, seeded from examples/bookinfo-canary and
examples/multicluster-failover. Every commit on `main` reaches the syncer at
once through `.git/hooks/post-commit` (a GitHub-style signed webhook).

- clusters.yaml: east, west (two gateways) and edge, on loopback
- exports.yaml: reviews and details are shared across clusters
- reviews-*.yaml, mesh-mtls.yaml: the bookinfo canary, STRICT mTLS, authz
- ratings.yaml: ratings split 70/30 between east and west, with failover

Try: change the weights in reviews-canary.yaml and `git commit -am canary`.
`meshfed-demo --tour` adds rollout.yaml (a RolloutPolicy: edge first,
then west, then east, each wave gated on the gateways' golden metrics).
";

/// The rollout waves the tour's step 6 commits as `rollout.yaml`: edge
/// first, then west, then east (a cluster in no wave is in a last wave,
/// not baked). Bakes are seconds, not the minutes a real federation would
/// bake for, to keep the tour short; the p99 gate's floor is a second, so
/// that a busy laptop's loopback latency never fails a good commit (the
/// success-rate and denial gates judge at the defaults).
pub const ROLLOUT: &str = "\
# Rollout waves: a commit reaches edge first, then west, then east. Each
# wave bakes while the syncer's gates compare its gateways' golden metrics
# for the services the commit changes with those before the wave; a failed
# gate sends the wave's clusters back to their last good snapshot.
# (Bakes are short for the demo; minutes are usual.)
apiVersion: meshfed.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: waves
spec:
  waves:
    - clusters: [edge]
      bakeTime: 4s
    - clusters: [west]
      bakeTime: 2s
  gates:
    minRequests: 50
    p99FloorMs: 1000
";

/// The demo repository.
#[derive(Debug, Clone)]
pub struct Repo {
    pub dir: PathBuf,
}

impl Repo {
    /// Creates and seeds the repository, with one commit on `main`.
    pub fn create(dir: &Path, gateways: &[Gateway]) -> anyhow::Result<Repo> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let repo = Repo {
            dir: dir.to_path_buf(),
        };
        repo.git(&["init", "-q", "-b", "main"])?;
        // Local identity, so that commits made by hand work on a machine
        // without a git configuration.
        repo.git(&["config", "user.name", "meshfed demo"])?;
        repo.git(&["config", "user.email", "demo@meshfed.invalid"])?;
        repo.git(&["config", "commit.gpgsign", "false"])?;
        let mut files: Vec<(String, String)> = SEED
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        files.push(("clusters.yaml".into(), clusters_yaml(gateways)));
        files.push(("exports.yaml".into(), EXPORTS.into()));
        files.push(("README.md".into(), README.into()));
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        repo.commit("seed: bookinfo-canary and multicluster-failover", &refs)?;
        Ok(repo)
    }

    /// Installs `.git/hooks/post-commit`: `meshfed-demo hook` signs and
    /// sends a push event to the syncer.
    pub fn install_hook(&self, syncer_http: SocketAddr, secret: &Path) -> anyhow::Result<()> {
        let me = std::env::current_exe().context("cannot find the demo's own executable")?;
        let hook = self.dir.join(".git/hooks/post-commit");
        let text = format!(
            "#!/bin/sh\n\
             # Installed by meshfed-demo: every commit notifies the syncer with a\n\
             # webhook signed like GitHub's (X-Hub-Signature-256, HMAC-SHA256).\n\
             exec {} hook --url {} --secret-file {}\n",
            sh_quote(&me.to_string_lossy()),
            sh_quote(&format!("http://{syncer_http}/hooks/git")),
            sh_quote(&secret.to_string_lossy()),
        );
        std::fs::write(&hook, text).with_context(|| format!("writing {}", hook.display()))?;
        let status = Command::new("chmod").arg("+x").arg(&hook).status()?;
        if !status.success() {
            bail!("chmod +x {} failed", hook.display());
        }
        Ok(())
    }

    /// Writes `files`, commits them (the hook fires) and returns the SHA.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> anyhow::Result<String> {
        for (name, text) in files {
            let path = self.dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            self.git(&["add", name])?;
        }
        self.git(&["commit", "-q", "-m", message])?;
        self.head()
    }

    pub fn head(&self) -> anyhow::Result<String> {
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn read(&self, name: &str) -> anyhow::Result<String> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(&self.dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .context("running git (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "git {} in {} failed: {}",
                args.join(" "),
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// The `Cluster` documents for the loopback federation.
fn clusters_yaml(gateways: &[Gateway]) -> String {
    let mut s =
        String::from("# The federation, on loopback: each gateway's QUIC tunnel address.\n");
    for (i, (cluster, _, region, zone)) in CLUSTERS.iter().enumerate() {
        let addrs: Vec<String> = gateways
            .iter()
            .filter(|g| g.cluster == *cluster)
            .map(|g| format!("\"{}\"", g.tunnel))
            .collect();
        if i > 0 {
            s.push_str("---\n");
        }
        s.push_str(&format!(
            "apiVersion: meshfed.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {cluster}\n\
             spec:\n  gateways: [{}]\n  locality: {{region: {region}, zone: {zone}}}\n",
            addrs.join(", ")
        ));
    }
    s
}

/// Quotes a string for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
