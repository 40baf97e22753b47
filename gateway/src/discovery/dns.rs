//! DNS resolution for discovery and for dialing peer gateways, with
//! hickory-resolver.
//!
//! It owns one process-wide [`Resolver`] ([`Resolver::shared`]): a hickory
//! resolver configured from `/etc/resolv.conf` (search domains, ndots,
//! timeouts) and `/etc/hosts`, plus a small table of the last answer for
//! every target it was asked about. Two callers use it:
//! - [`super::static_file`]: the endpoint hosts of the discovery file are
//!   resolved on each poll of the file;
//! - [`crate::tunnel::link`]: each dial of a peer gateway address from
//!   `Cluster.spec.gateways` resolves it again.
//!
//! Targets are `host:port` (A and AAAA, A first), an IP literal
//! (`10.0.0.1:80`, `[fd00::1]:80`; returned as is, never queried), or an SRV
//! name `_service._proto.name` (its targets' A/AAAA with the SRV ports,
//! lowest priority first, then heaviest weight first; weights order the
//! addresses but are not drawn at random, so that an unchanged answer gives
//! an unchanged endpoint set).
//!
//! Refresh rules. An answer is reused until its smallest TTL runs out, and
//! only then asked again: a caller that polls (the discovery file is checked
//! every second) follows DNS changes at TTL pace without querying more. The
//! TTL is clamped to [`MIN_REFRESH`] (1 s) ..= [`MAX_REFRESH`] (5 min), in
//! this table and in hickory's own cache, so a TTL of 0 cannot make us query
//! in a loop and a TTL of a day still notices a change within 5 min. A
//! failed lookup is not retried for [`MIN_REFRESH`] either.
//!
//! Grace rule. A name that stops resolving (timeout, SERVFAIL, even
//! NXDOMAIN) keeps its last good addresses for [`GRACE`] (5 min) after they
//! expired, with a warning, instead of emptying the endpoint set: removing
//! every endpoint because of a DNS blip is a classic self-inflicted outage.
//! After the grace period the error is returned and the addresses are gone.
//! A name that never resolved has no grace.
//!
//! It does not own endpoint sets or their channel: callers turn addresses
//! into [`crate::endpoints::Endpoint`]s. Kubernetes discovery will plug into the same
//! [`crate::endpoints::EndpointSet`] channel later, and may use this resolver for
//! ExternalName services. `/etc/resolv.conf` is read once, at first use.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// An answer is never asked again sooner than this.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// An answer is always asked again after this, whatever its TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// How long past their expiry the last good addresses of a failing name are
/// still served.
pub const GRACE: Duration = Duration::from_secs(300);

/// Why a target could not be resolved. The messages name the target, the
/// record type and, where one helps, what to check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error(
        "`{target}` is not host:port, [IPv6]:port or an SRV name (_service._proto.name): {reason}"
    )]
    Target {
        target: String,
        reason: &'static str,
    },
    #[error(
        "no {record} record for `{name}`: the name does not exist (NXDOMAIN); is it complete, or under a search domain of /etc/resolv.conf?"
    )]
    NxDomain { name: String, record: &'static str },
    #[error("`{name}` exists but has no {record} record; is it published with that type?")]
    NoRecords { name: String, record: &'static str },
    #[error("SRV `{name}`: no target resolved: {detail}")]
    SrvTargets { name: String, detail: String },
    #[error("{record} lookup of `{name}` failed: {source}{hint}")]
    Lookup {
        name: String,
        record: &'static str,
        source: Box<NetError>,
        hint: &'static str,
    },
    #[error("the DNS resolver could not be built: {0}")]
    Setup(Box<NetError>),
}

/// The addresses of a target and how long they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// In preference order: A before AAAA; for SRV, priority then weight.
    pub addrs: Vec<SocketAddr>,
    /// When to resolve again: the smallest TTL of the records used, clamped
    /// to [`MIN_REFRESH`] ..= [`MAX_REFRESH`].
    pub valid_until: Instant,
    /// The target failed to resolve and these are its last good addresses,
    /// served within the [`GRACE`] period.
    pub stale: bool,
}

/// What a target string asks for.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Literal(SocketAddr),
    HostPort(&'a str, u16),
    Srv(&'a str),
}

impl<'a> Target<'a> {
    fn parse(target: &'a str) -> Result<Self, DnsError> {
        let bad = |reason| DnsError::Target {
            target: target.to_string(),
            reason,
        };
        if let Ok(addr) = target.parse::<SocketAddr>() {
            return Ok(Target::Literal(addr));
        }
        let mut labels = target.split('.');
        let srv = labels
            .next()
            .is_some_and(|l| l.len() > 1 && l.starts_with('_'))
            && labels
                .next()
                .is_some_and(|l| l.len() > 1 && l.starts_with('_'));
        if srv {
            if target.contains(':') {
                return Err(bad("an SRV name carries its ports; drop the `:port`"));
            }
            if labels.next().is_none_or(str::is_empty) {
                return Err(bad("the SRV name has no domain after _service._proto"));
            }
            return Ok(Target::Srv(target));
        }
        let Some((host, port)) = target.rsplit_once(':') else {
            return Err(bad("there is no `:port`"));
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("the port is not 0-65535"))?;
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if host.contains(':') || host.starts_with('[') {
            return Err(bad("an IPv6 address is written [address]:port"));
        }
        Ok(Target::HostPort(host, port))
    }
}

/// The last answer for one target.
#[derive(Debug, Default)]
struct Entry {
    /// The last good answer, fresh until its `valid_until`.
    good: Option<Resolved>,
    /// The last failure and when the next query may be sent.
    failed: Option<(DnsError, Instant)>,
}

impl Entry {
    fn is_dead(&self, now: Instant, grace: Duration) -> bool {
        self.good
            .as_ref()
            .is_none_or(|g| now >= g.valid_until + grace)
            && self.failed.as_ref().is_none_or(|(_, retry)| now >= *retry)
    }
}

/// A DNS resolver with TTL-bounded refresh and a grace period for failing
/// names. Cheap to share by reference; see [`Resolver::shared`].
#[derive(Debug)]
pub struct Resolver {
    inner: Result<TokioResolver, DnsError>,
    grace: Duration,
    table: Mutex<HashMap<String, Entry>>,
}

/// Options every resolver gets on top of its configuration: both address
/// families, A first (most clusters are IPv4, and a dial tries addresses in
/// order), and hickory's cache held to the refresh bounds.
fn bound(opts: &mut ResolverOpts) {
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.positive_min_ttl = Some(MIN_REFRESH);
    opts.positive_max_ttl = Some(MAX_REFRESH);
    opts.negative_min_ttl = Some(MIN_REFRESH);
    // A name that is created after an NXDOMAIN is seen within 30 s.
    opts.negative_max_ttl = Some(Duration::from_secs(30));
}

impl Resolver {
    /// The process-wide resolver, built from the system configuration at
    /// first use. hickory's cache and the grace table are shared by every
    /// caller.
    pub fn shared() -> &'static Resolver {
        static SHARED: OnceLock<Resolver> = OnceLock::new();
        SHARED.get_or_init(Resolver::from_system)
    }

    /// A resolver configured from `/etc/resolv.conf` and `/etc/hosts`. If
    /// the system configuration cannot be read, it logs a warning and uses
    /// hickory's default options with a name server on 127.0.0.1:53, which
    /// is what the C library does without a `nameserver` line (hickory's
    /// default `ResolverConfig` has no name server at all; a public resolver
    /// would leak internal names and could not answer them anyway).
    pub fn from_system() -> Self {
        let builder = match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system DNS configuration (/etc/resolv.conf); using 127.0.0.1:53 and default options");
                let config =
                    ResolverConfig::from_name_servers(vec![NameServerConfig::udp_and_tcp(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                    )]);
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            }
        };
        Self::build(builder, |_| {}).unwrap_or_else(|e| Resolver {
            inner: Err(e),
            grace: GRACE,
            table: Mutex::default(),
        })
    }

    /// A resolver that asks only the name server at `server` (UDP, then
    /// TCP, on its port), with no search domains and no `/etc/hosts`: for
    /// tests and for a dedicated discovery DNS server. A query times out
    /// after 1 s and is not retried.
    pub fn with_config(server: SocketAddr) -> Result<Self, DnsError> {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
            server.ip(),
            true,
            vec![udp, tcp],
        )]);
        let builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        Self::build(builder, |o| {
            o.use_hosts_file = ResolveHosts::Never;
            o.timeout = Duration::from_secs(1);
            o.attempts = 1;
        })
    }

    fn build(
        mut builder: hickory_resolver::ResolverBuilder<TokioRuntimeProvider>,
        tweak: impl FnOnce(&mut ResolverOpts),
    ) -> Result<Self, DnsError> {
        bound(builder.options_mut());
        tweak(builder.options_mut());
        Ok(Resolver {
            inner: Ok(builder.build().map_err(|e| DnsError::Setup(Box::new(e)))?),
            grace: GRACE,
            table: Mutex::default(),
        })
    }

    /// Sets how long past expiry the last good addresses of a failing name
    /// are served (default [`GRACE`]).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The addresses of `target` (`host:port`, an IP literal, or an SRV
    /// name), as [`Resolver::resolve`] gives them.
    pub async fn resolve_host_port(&self, target: &str) -> Result<Vec<SocketAddr>, DnsError> {
        Ok(self.resolve(target).await?.addrs)
    }

    /// Resolves `target`, from the table while its answer is fresh; see the
    /// module doc for the refresh and grace rules.
    pub async fn resolve(&self, target: &str) -> Result<Resolved, DnsError> {
        match Target::parse(target)? {
            Target::Literal(addr) => Ok(Resolved {
                addrs: vec![addr],
                valid_until: Instant::now() + MAX_REFRESH,
                stale: false,
            }),
            Target::HostPort(host, port) => {
                let key = format!("{}:{port}", host.to_ascii_lowercase());
                self.cached(key, self.query_host(host, port)).await
            }
            Target::Srv(name) => {
                let key = format!("SRV {}", name.to_ascii_lowercase());
                self.cached(key, self.query_srv(name)).await
            }
        }
    }

    fn hickory(&self) -> Result<&TokioResolver, DnsError> {
        self.inner.as_ref().map_err(Clone::clone)
    }

    /// Serves `key` from the table if fresh, else runs `query` (which is
    /// not polled at all otherwise) and applies the grace rule to its
    /// failure.
    async fn cached(
        &self,
        key: String,
        query: impl Future<Output = Result<Resolved, DnsError>>,
    ) -> Result<Resolved, DnsError> {
        let now = Instant::now();
        {
            let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = table.get_mut(&key) {
                if let Some(good) = entry.good.as_ref().filter(|g| now < g.valid_until) {
                    return Ok(good.clone());
                }
                if let Some((e, retry)) = entry.failed.clone()
                    && now < retry
                {
                    return self.stale_or(&key, entry, e, retry, now, false);
                }
            }
        }
        let result = query.await;
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if !table.contains_key(&key) {
            let grace = self.grace;
            table.retain(|_, e| !e.is_dead(now, grace));
        }
        let entry = table.entry(key.clone()).or_default();
        match result {
            Ok(resolved) => {
                if entry.failed.take().is_some() && entry.good.is_some() {
                    tracing::info!(name = %key, addrs = ?resolved.addrs, "DNS name resolves again");
                }
                entry.good = Some(resolved.clone());
                Ok(resolved)
            }
            Err(e) => {
                let retry = now + MIN_REFRESH;
                let first = entry.failed.is_none();
                entry.failed = Some((e.clone(), retry));
                self.stale_or(&key, entry, e, retry, now, first)
            }
        }
    }

    /// The last good addresses of `entry` if within the grace period, else
    /// the error (and the addresses are forgotten).
    fn stale_or(
        &self,
        key: &str,
        entry: &mut Entry,
        error: DnsError,
        retry: Instant,
        now: Instant,
        first_failure: bool,
    ) -> Result<Resolved, DnsError> {
        match &entry.good {
            Some(good) if now < good.valid_until + self.grace => {
                if first_failure {
                    tracing::warn!(
                        name = %key,
                        %error,
                        addrs = ?good.addrs,
                        grace_left_s = (good.valid_until + self.grace).saturating_duration_since(now).as_secs(),
                        "DNS name stopped resolving; keeping its last addresses for the grace period"
                    );
                }
                Ok(Resolved {
                    addrs: good.addrs.clone(),
                    valid_until: retry,
                    stale: true,
                })
            }
            Some(good) => {
                tracing::warn!(
                    name = %key,
                    %error,
                    addrs = ?good.addrs,
                    "DNS name still does not resolve after the grace period; dropping its last addresses"
                );
                entry.good = None;
                Err(error)
            }
            None => Err(error),
        }
    }

    /// A and AAAA of `host`, with `port`.
    async fn query_host(&self, host: &str, port: u16) -> Result<Resolved, DnsError> {
        const RECORD: &str = "A/AAAA";
        let lookup = self
            .hickory()?
            .lookup_ip(host)
            .await
            .map_err(|e| lookup_error(host, RECORD, e))?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for ip in lookup.iter() {
            let addr = SocketAddr::new(ip, port);
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(DnsError::NoRecords {
                name: host.to_string(),
                record: RECORD,
            });
        }
        Ok(Resolved {
            addrs,
            valid_until: clamp(lookup.valid_until()),
            stale: false,
        })
    }

    /// The SRV records of `name`, each target resolved through the table
    /// (so each has its own refresh and grace).
    async fn query_srv(&self, name: &str) -> Result<Resolved, DnsError> {
        let lookup = self
            .hickory()?
            .srv_lookup(name)
            .await
            .map_err(|e| lookup_error(name, "SRV", e))?;
        let mut records: Vec<(u16, u16, String, u16)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((
                    srv.priority,
                    srv.weight,
                    srv.target.to_ascii().to_ascii_lowercase(),
                    srv.port,
                )),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Err(DnsError::NoRecords {
                name: name.to_string(),
                record: "SRV",
            });
        }
        // Priority ascending, then weight descending, then a stable order.
        records.sort_by(|a, b| (a.0, b.1, &a.2, a.3).cmp(&(b.0, a.1, &b.2, b.3)));
        records.dedup();
        let mut out = Resolved {
            addrs: Vec::new(),
            valid_until: clamp(lookup.valid_until()),
            stale: false,
        };
        let mut failures = Vec::new();
        for (_, _, target, port) in records {
            // RFC 2782: a target of "." means "decidedly not available here".
            if target == "." {
                failures.push("the target is `.` (service not available)".to_string());
                continue;
            }
            let key = format!("{target}:{port}");
            match self.cached(key, self.query_host(&target, port)).await {
                Ok(r) => {
                    out.valid_until = out.valid_until.min(r.valid_until);
                    out.stale |= r.stale;
                    for a in r.addrs {
                        if !out.addrs.contains(&a) {
                            out.addrs.push(a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(srv = %name, %target, error = %e, "SRV target does not resolve; skipped");
                    failures.push(e.to_string());
                }
            }
        }
        if out.addrs.is_empty() {
            return Err(DnsError::SrvTargets {
                name: name.to_string(),
                detail: failures.join("; "),
            });
        }
        Ok(out)
    }
}

/// `valid_until` clamped to `now + MIN_REFRESH ..= now + MAX_REFRESH`.
fn clamp(valid_until: Instant) -> Instant {
    let now = Instant::now();
    let ttl = valid_until.saturating_duration_since(now);
    now + ttl.clamp(MIN_REFRESH, MAX_REFRESH)
}

fn lookup_error(name: &str, record: &'static str, source: NetError) -> DnsError {
    let name = name.to_string();
    if source.is_nx_domain() {
        return DnsError::NxDomain { name, record };
    }
    if source.is_no_records_found() {
        return DnsError::NoRecords { name, record };
    }
    let hint = match &source {
        NetError::Timeout | NetError::Io(_) => {
            "; is a name server of /etc/resolv.conf reachable (UDP and TCP port 53)?"
        }
        NetError::NoConnections => "; is a name server configured in /etc/resolv.conf?",
        _ => "",
    };
    DnsError::Lookup {
        name,
        record,
        source: Box::new(source),
        hint,
    }
}

#[cfg(test)]
mod tests;
