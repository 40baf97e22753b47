//! Network namespaces for partition tests: one namespace per cluster, each
//! with two veth links to the test's own namespace.
//!
//! ```text
//!  test namespace                                 namespace of cluster i
//!  ───────────────                                ──────────────────────
//!  bridge mfpbr 10.213.0.1/24 ── mfpw<i> ═══ wan0 10.213.0.(10+i)   tunnel, syncer
//!  mfpl<i> 10.214.i.1/24      ══════════════ lan0 10.214.i.2        outbound, admin
//! ```
//!
//! The **WAN** link joins every cluster (and the syncer, which listens on
//! the bridge address) on one bridge: tunnels and config delivery cross
//! it. The **LAN** link is the cluster's own network: its local clients and
//! backends (run by the test in its namespace, bound to `10.214.i.1`)
//! and the admin API. [`Net::cut`] takes a cluster's WAN port down (the
//! peer sees no carrier and every datagram is dropped, a black hole as a
//! real partition is); its LAN stays, so its local traffic can go on.
//!
//! [`Net::block_udp`] is a firewall that drops UDP only (nftables, in the
//! cluster's namespace: every UDP datagram arriving on its WAN is dropped
//! without a word, as a network that blocks UDP does), for tests of TCP
//! links; it needs the `nft` command (Debian package nftables, which
//! `.ci/run` installs).
//!
//! Everything is created with the `ip` command and removed on drop, panics
//! included. Namespaces and links from a run that was killed are removed by
//! the next one (they carry the `mfp` prefix). Only one [`Net`] exists at a
//! time per process (a lock); across processes the tests that use it run in
//! nextest's `serial` group.
//!
//! This module owns the topology only; the gateways run in it through
//! [`crate::federation::Launch`].

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const BRIDGE: &str = "mfpbr";

/// Why a topology cannot be built here.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs `ip ARGS`; its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all)
}

/// Removes what a killed run left behind.
fn sweep() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next()
                && name.starts_with("mfp-")
            {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }
    let _ = ip(&["link", "delete", BRIDGE]);
    for i in 0..16 {
        let _ = ip(&["link", "delete", &format!("mfpw{i}")]);
        let _ = ip(&["link", "delete", &format!("mfpl{i}")]);
    }
}

/// One cluster's namespace.
#[derive(Debug, Clone)]
pub struct Site {
    pub cluster: String,
    /// The namespace's name (for `ip netns exec`).
    pub ns: String,
    /// The cluster's WAN address (its tunnel binds here).
    pub wan: IpAddr,
    /// The cluster's LAN address (outbound and admin bind here).
    pub lan: IpAddr,
    /// The test's address on that LAN (local backends bind here).
    pub lan_host: IpAddr,
    wan_port: String,
}

impl Site {
    /// `ip netns exec <ns>`, the prefix that runs a command inside.
    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

/// The topology; removed on drop.
#[derive(Debug)]
pub struct Net {
    pub sites: Vec<Site>,
    /// The test namespace's address on the WAN bridge (the syncer binds
    /// here).
    pub bridge: IpAddr,
    _lock: MutexGuard<'static, ()>,
}

impl Net {
    /// One namespace per cluster, linked as the module docs draw.
    ///
    /// # Errors
    ///
    /// [`Unsupported`] when this process is not root or `ip netns` does
    /// not work here; the message says which.
    pub fn new(clusters: &[&str]) -> Result<Net, Unsupported> {
        let lock = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if uid != "0" {
            return Err(Unsupported(format!(
                "network namespaces need root (uid is {uid:?})"
            )));
        }
        sweep();
        let mut net = Net {
            sites: Vec::new(),
            bridge: IpAddr::V4(Ipv4Addr::new(10, 213, 0, 1)),
            _lock: lock,
        };
        net.build(clusters).map_err(Unsupported)?;
        Ok(net)
    }

    /// [`Net::new`] for a test that must run: when namespaces cannot be
    /// built here it panics with the reason and the fix, so a CI that lost
    /// root or iproute2 fails loudly instead of passing without testing.
    /// `None` only when the operator opted out explicitly with
    /// `MESHFED_SKIP_NETNS=1` (a developer machine without root).
    pub fn require(clusters: &[&str]) -> Option<Net> {
        match Net::new(clusters) {
            Ok(net) => Some(net),
            Err(e) if std::env::var_os("MESHFED_SKIP_NETNS").is_some_and(|v| v == "1") => {
                eprintln!("SKIPPED (MESHFED_SKIP_NETNS=1): {e}");
                None
            }
            Err(e) => panic!(
                "cannot build network namespaces: {e}. This test needs root and \
                 `ip netns` (Debian package iproute2); run it as root (CI does), \
                 or set MESHFED_SKIP_NETNS=1 to skip it knowingly"
            ),
        }
    }

    fn build(&mut self, clusters: &[&str]) -> Result<(), String> {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", "10.213.0.1/24", "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        for (i, cluster) in clusters.iter().enumerate() {
            let ns = format!("mfp-{}-{cluster}", std::process::id());
            ip(&["netns", "add", &ns])?;
            let (w, l) = (format!("mfpw{i}"), format!("mfpl{i}"));
            let wan = Ipv4Addr::new(10, 213, 0, 10 + i as u8);
            let lan = Ipv4Addr::new(10, 214, i as u8, 2);
            let lan_host = Ipv4Addr::new(10, 214, i as u8, 1);
            self.sites.push(Site {
                cluster: cluster.to_string(),
                ns: ns.clone(),
                wan: wan.into(),
                lan: lan.into(),
                lan_host: lan_host.into(),
                wan_port: w.clone(),
            });
            ip(&[
                "link", "add", &w, "type", "veth", "peer", "name", "wan0", "netns", &ns,
            ])?;
            ip(&[
                "link", "add", &l, "type", "veth", "peer", "name", "lan0", "netns", &ns,
            ])?;
            ip(&["link", "set", &w, "master", BRIDGE])?;
            ip(&["link", "set", &w, "up"])?;
            ip(&["addr", "add", &format!("{lan_host}/24"), "dev", &l])?;
            ip(&["link", "set", &l, "up"])?;
            ip_ns(&ns, &["link", "set", "lo", "up"])?;
            ip_ns(&ns, &["addr", "add", &format!("{wan}/24"), "dev", "wan0"])?;
            ip_ns(&ns, &["link", "set", "wan0", "up"])?;
            ip_ns(&ns, &["addr", "add", &format!("{lan}/24"), "dev", "lan0"])?;
            ip_ns(&ns, &["link", "set", "lan0", "up"])?;
        }
        Ok(())
    }

    pub fn site(&self, cluster: &str) -> &Site {
        self.sites
            .iter()
            .find(|s| s.cluster == cluster)
            .unwrap_or_else(|| panic!("no site {cluster}"))
    }

    /// Partitions `cluster` from the WAN: its bridge port goes down.
    ///
    /// # Panics
    ///
    /// If `ip` fails.
    pub fn cut(&self, cluster: &str) {
        let port = &self.site(cluster).wan_port;
        ip(&["link", "set", port, "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Heals the partition of `cluster`.
    ///
    /// # Panics
    ///
    /// If `ip` fails.
    pub fn restore(&self, cluster: &str) {
        let port = &self.site(cluster).wan_port;
        ip(&["link", "set", port, "up"]).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The nftables table [`Net::block_udp`] adds in a cluster's namespace.
const UDP_BLOCK_TABLE: &str = "mfp_udp_block";

/// Runs `nft CMD` inside namespace `ns`; its stdout.
fn nft_ns(ns: &str, cmd: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", cmd])
        .output()
        .map_err(|e| format!("running ip netns exec {ns} nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("No such file") || err.contains("exec of \"nft\" failed") {
            " (is nftables installed? `apt-get install nftables`; .ci/run installs it)"
        } else {
            ""
        };
        Err(format!("nft {cmd:?} in {ns}: {}{hint}", err.trim()))
    }
}

impl Net {
    /// Drops every UDP datagram arriving on `cluster`'s WAN, silently
    /// (no ICMP): with it on both ends, UDP between two clusters is
    /// blocked and TCP is not. [`Net::allow_udp`] undoes it.
    ///
    /// # Panics
    ///
    /// If `nft` fails; the message says whether it is missing.
    pub fn block_udp(&self, cluster: &str) {
        let ns = &self.site(cluster).ns;
        for cmd in [
            format!("add table inet {UDP_BLOCK_TABLE}"),
            format!(
                "add chain inet {UDP_BLOCK_TABLE} input {{ type filter hook input priority 0; policy accept; }}"
            ),
            format!(
                "add rule inet {UDP_BLOCK_TABLE} input iifname \"wan0\" meta l4proto udp counter drop"
            ),
        ] {
            nft_ns(ns, &cmd).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Undoes [`Net::block_udp`].
    ///
    /// # Panics
    ///
    /// If `nft` fails.
    pub fn allow_udp(&self, cluster: &str) {
        let ns = &self.site(cluster).ns;
        nft_ns(ns, &format!("delete table inet {UDP_BLOCK_TABLE}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// UDP datagrams [`Net::block_udp`] has dropped in `cluster` so far (0
    /// when not blocked): a test shows with it that the block was met.
    pub fn udp_dropped(&self, cluster: &str) -> u64 {
        let ns = &self.site(cluster).ns;
        let Ok(rules) = nft_ns(ns, &format!("list table inet {UDP_BLOCK_TABLE}")) else {
            return 0;
        };
        rules
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Established TCP connections in `cluster`'s namespace to `dst`
    /// (`ss`), e.g. a gateway's TCP links to a peer's tunnel address.
    ///
    /// # Panics
    ///
    /// If `ss` cannot run.
    pub fn tcp_connections_to(&self, cluster: &str, dst: std::net::SocketAddr) -> usize {
        let ns = &self.site(cluster).ns;
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
            .output()
            .unwrap_or_else(|e| panic!("running ss in {ns}: {e}"));
        assert!(
            out.status.success(),
            "ss in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dst = dst.to_string();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(dst.as_str()))
            .count()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its ends of the veth pairs, and with
        // them the pairs.
        for s in &self.sites {
            let _ = ip(&["netns", "delete", &s.ns]);
        }
        let _ = ip(&["link", "delete", BRIDGE]);
    }
}
