//! Compilation: validated resources → one cluster's [`Snapshot`].
//!
//! Compilation is pure and deterministic: it reads only its arguments, orders
//! everything it emits, and never uses a hash map's iteration order, so the
//! same resources give the same bytes and the same hash, whatever the order
//! of files. It runs only on resources that validated without errors; on
//! anything unexpected it falls back to a default rather than panicking.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::Options;
use crate::model::{self, Resource, Spec};
use crate::snapshot::*;
use crate::syntax::parse_duration;
use crate::validate::federation::vs_applies_to_mesh;
use crate::validate::fields::GRPC_STATUS;
use crate::validate::{DRY_RUN_ANNOTATION, applies_to, canonical_host, targets};

/// Compiles the snapshot of `cluster` at `version`.
pub fn compile(resources: &[Resource], cluster: &str, version: &str, opts: &Options) -> Snapshot {
    let mut sorted: Vec<&Resource> = resources.iter().collect();
    sorted.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    let declared: BTreeSet<String> = sorted
        .iter()
        .filter(|r| matches!(r.spec, Spec::Cluster(_)))
        .map(|r| r.name.clone())
        .collect();
    let view: Vec<&Resource> = sorted
        .iter()
        .copied()
        .filter(|r| declared.is_empty() || applies_to(r, cluster))
        .collect();

    let mut p = ClusterPolicy {
        cluster: cluster.to_string(),
        domain: opts.domain.clone(),
        trust_domain: opts.trust_domain.clone(),
        ..Default::default()
    };
    for r in &sorted {
        if let Spec::Cluster(c) = &r.spec {
            p.clusters
                .entry(r.name.clone())
                .or_insert_with(|| ClusterInfo {
                    gateways: c.gateways.clone(),
                    locality: c.locality.as_ref().map(|l| Locality {
                        region: l.region.clone(),
                        zone: l.zone.clone(),
                        subzone: l.subzone.clone(),
                    }),
                    trust_domain: c
                        .trust_domain
                        .clone()
                        .unwrap_or_else(|| opts.trust_domain.clone()),
                    network: c.network.clone(),
                });
        }
        if let Spec::ServiceExport(_) = &r.spec {
            // Exports are federation-wide knowledge: every gateway must know
            // where a service is reachable, not only its own cluster's.
            let host = canonical_host(&r.name, &r.namespace, &opts.domain);
            let from: BTreeSet<String> = match targets(r) {
                Some(t) => t,
                None if declared.is_empty() => BTreeSet::from([cluster.to_string()]),
                None => declared.clone(),
            };
            p.exports.entry(host).or_default().extend(from);
        }
    }
    for r in &view {
        let src = source_ref(r);
        match &r.spec {
            Spec::VirtualService(vs) if vs_applies_to_mesh(vs) => {
                let compiled = HostRoutes {
                    source: src,
                    http: vs.http.iter().map(|h| http_route(h, r, opts)).collect(),
                    tcp: vs.tcp.iter().map(|t| tcp_route(t, r, opts)).collect(),
                };
                for h in &vs.hosts {
                    p.routes
                        .entry(canonical_host(h, &r.namespace, &opts.domain))
                        .or_insert_with(|| compiled.clone());
                }
            }
            Spec::DestinationRule(dr) => {
                let top = dr.traffic_policy.clone().unwrap_or_default();
                let policy = DestinationPolicy {
                    source: src,
                    traffic_policy: traffic_policy(&top),
                    subsets: dr
                        .subsets
                        .iter()
                        .map(|s| {
                            let merged = merge(&top, s.traffic_policy.as_ref());
                            (
                                s.name.clone(),
                                Subset {
                                    labels: s.labels.clone(),
                                    traffic_policy: traffic_policy(&merged),
                                },
                            )
                        })
                        .collect(),
                };
                p.destinations
                    .entry(canonical_host(&dr.host, &r.namespace, &opts.domain))
                    .or_insert(policy);
            }
            Spec::ServiceEntry(se) => {
                let entry = service_entry(se, r, src);
                // Partial wildcards (`*x`) were warned about: the gateways
                // match whole labels only.
                for h in se
                    .hosts
                    .iter()
                    .filter(|h| crate::validate::fields::partial_wildcard(h).is_none())
                {
                    p.service_entries
                        .entry(canonical_host(h, &r.namespace, &opts.domain))
                        .or_insert_with(|| entry.clone());
                }
            }
            Spec::AuthorizationPolicy(ap) => {
                if let Some(a) = authz(ap, r, src, opts) {
                    p.authz.push(a);
                }
            }
            _ => {}
        }
    }
    p.mtls = mtls(&view, opts);
    let mut snap = Snapshot::new(version, p);
    snap.origins = view
        .iter()
        .map(|r| {
            let pos = r.origin.positions.lookup("metadata.name");
            (
                source_ref(r).key(),
                format!("{}:{}", r.origin.file, pos.line),
            )
        })
        .collect();
    snap
}

fn source_ref(r: &Resource) -> SourceRef {
    SourceRef {
        kind: r.kind.to_string(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from((d.as_nanos() + 500_000) / 1_000_000).unwrap_or(u64::MAX)
}

fn dur_ms(s: Option<&String>) -> Option<u64> {
    s.and_then(|s| parse_duration(s).ok()).map(ms)
}

fn ppm(p: Option<&model::Percent>, legacy: Option<i64>) -> u32 {
    match (p, legacy) {
        (Some(p), _) => (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        (None, Some(v)) => u32::try_from(v.clamp(0, 100)).unwrap_or(0) * 10_000,
        (None, None) => PPM,
    }
}

fn string_match(m: &model::StringMatch) -> Option<StringMatch> {
    if let Some(v) = &m.exact {
        Some(StringMatch::Exact(v.clone()))
    } else if let Some(v) = &m.prefix {
        Some(StringMatch::Prefix(v.clone()))
    } else {
        m.regex.as_ref().map(|v| StringMatch::Regex(v.clone()))
    }
}

fn match_map(m: &BTreeMap<String, model::StringMatch>) -> BTreeMap<String, StringMatch> {
    m.iter()
        .filter_map(|(k, v)| string_match(v).map(|v| (k.to_ascii_lowercase(), v)))
        .collect()
}

fn header_ops(h: Option<&model::Headers>) -> (HeaderOps, HeaderOps) {
    let conv = |o: &Option<model::HeaderOperations>| {
        o.as_ref()
            .map(|o| HeaderOps {
                set: o.set.clone(),
                add: o.add.clone(),
                remove: o.remove.clone(),
            })
            .unwrap_or_default()
    };
    h.map(|h| (conv(&h.request), conv(&h.response)))
        .unwrap_or_default()
}

fn port16(p: Option<model::PortSelector>) -> Option<u16> {
    p.and_then(|p| p.number).and_then(|n| u16::try_from(n).ok())
}

fn weighted(
    d: &model::Destination,
    weight: Option<i64>,
    count: usize,
    r: &Resource,
    opts: &Options,
) -> WeightedDestination {
    WeightedDestination {
        host: canonical_host(&d.host, &r.namespace, &opts.domain),
        subset: d.subset.clone(),
        port: port16(d.port),
        // One destination takes all traffic whatever its weight says.
        weight: if count == 1 {
            100
        } else {
            u32::try_from(weight.unwrap_or(0)).unwrap_or(0)
        },
        ..Default::default()
    }
}

fn http_route(h: &model::HttpRoute, r: &Resource, opts: &Options) -> HttpRoute {
    let (mut request_headers, response_headers) = header_ops(h.headers.as_ref());
    // Setting `:authority` is how Istio users rewrite the authority (Envoy
    // applies it so); the gateway edits only regular headers, so it becomes
    // the route's authority rewrite.
    let set_authority = request_headers.set.remove(":authority");
    let retries = match &h.retries {
        Some(rt) => RetryPolicy {
            attempts: u32::try_from(rt.attempts).unwrap_or(0),
            per_try_timeout_ms: dur_ms(rt.per_try_timeout.as_ref()),
            retry_on: match &rt.retry_on {
                Some(on) => on
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                None => RetryPolicy::istio_default().retry_on,
            },
        },
        None => RetryPolicy::istio_default(),
    };
    let fault = h.fault.as_ref().map(|f| Fault {
        delay: f.delay.as_ref().and_then(|d| {
            Some(FaultDelay {
                delay_ms: dur_ms(d.fixed_delay.as_ref())?,
                percent_ppm: ppm(d.percentage.as_ref(), d.percent),
            })
        }),
        abort: f.abort.as_ref().and_then(|a| {
            let status = match (&a.http_status, &a.grpc_status) {
                (Some(s), _) => AbortStatus::Http(u16::try_from(*s).ok()?),
                (None, Some(g)) => AbortStatus::Grpc(GRPC_STATUS.iter().find(|(n, _)| n == g)?.1),
                _ => return None,
            };
            Some(FaultAbort {
                status,
                percent_ppm: ppm(a.percentage.as_ref(), None),
            })
        }),
    });
    let mut mirrors = Vec::new();
    if let Some(m) = &h.mirror {
        mirrors.push(Mirror {
            host: canonical_host(&m.host, &r.namespace, &opts.domain),
            subset: m.subset.clone(),
            port: port16(m.port),
            percent_ppm: ppm(
                h.mirror_percentage.as_ref(),
                h.mirror_percent.map(i64::from),
            ),
        });
    }
    for m in &h.mirrors {
        mirrors.push(Mirror {
            host: canonical_host(&m.destination.host, &r.namespace, &opts.domain),
            subset: m.destination.subset.clone(),
            port: port16(m.destination.port),
            percent_ppm: ppm(m.percentage.as_ref(), None),
        });
    }
    HttpRoute {
        name: h.name.clone().unwrap_or_default(),
        matches: h
            .matches
            .iter()
            .map(|m| HttpMatch {
                uri: m.uri.as_ref().and_then(string_match),
                scheme: m.scheme.as_ref().and_then(string_match),
                method: m.method.as_ref().and_then(string_match),
                authority: m.authority.as_ref().and_then(string_match),
                headers: match_map(&m.headers),
                without_headers: match_map(&m.without_headers),
                query_params: m
                    .query_params
                    .iter()
                    .filter_map(|(k, v)| string_match(v).map(|v| (k.clone(), v)))
                    .collect(),
                port: m.port.and_then(|p| u16::try_from(p).ok()),
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
                ignore_uri_case: m.ignore_uri_case,
            })
            .collect(),
        destinations: h
            .route
            .iter()
            .map(|d| {
                let (rq, rs) = header_ops(d.headers.as_ref());
                WeightedDestination {
                    request_headers: rq,
                    response_headers: rs,
                    ..weighted(&d.destination, d.weight, h.route.len(), r, opts)
                }
            })
            .collect(),
        timeout_ms: dur_ms(h.timeout.as_ref()),
        retries,
        fault: fault.filter(|f| f.delay.is_some() || f.abort.is_some()),
        mirrors,
        request_headers,
        response_headers,
        rewrite: match (&h.rewrite, set_authority) {
            (None, None) => None,
            (rw, set) => Some(Rewrite {
                uri: rw.as_ref().and_then(|rw| rw.uri.clone()),
                authority: rw.as_ref().and_then(|rw| rw.authority.clone()).or(set),
            }),
        },
    }
}

fn tcp_route(t: &model::TcpRoute, r: &Resource, opts: &Options) -> TcpRoute {
    let mut ports: Vec<u16> = t
        .matches
        .iter()
        .filter_map(|m| m.port.and_then(|p| u16::try_from(p).ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let source_labels = t
        .matches
        .iter()
        .find(|m| !m.source_labels.is_empty())
        .map(|m| m.source_labels.clone())
        .unwrap_or_default();
    TcpRoute {
        ports,
        source_labels,
        destinations: t
            .route
            .iter()
            .map(|d| weighted(&d.destination, d.weight, t.route.len(), r, opts))
            .collect(),
    }
}

/// Istio's subset override: each of the four parts replaces the top-level
/// one as a whole when the subset sets it.
fn merge(top: &model::TrafficPolicy, sub: Option<&model::TrafficPolicy>) -> model::TrafficPolicy {
    let Some(sub) = sub else { return top.clone() };
    model::TrafficPolicy {
        load_balancer: sub
            .load_balancer
            .clone()
            .or_else(|| top.load_balancer.clone()),
        connection_pool: sub
            .connection_pool
            .clone()
            .or_else(|| top.connection_pool.clone()),
        outlier_detection: sub
            .outlier_detection
            .clone()
            .or_else(|| top.outlier_detection.clone()),
        tls: sub.tls.clone().or_else(|| top.tls.clone()),
        port_level_settings: if sub.port_level_settings.is_empty() {
            top.port_level_settings.clone()
        } else {
            sub.port_level_settings.clone()
        },
        tunnel: None,
        proxy_protocol: None,
    }
}

fn traffic_policy(tp: &model::TrafficPolicy) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: tp
            .load_balancer
            .as_ref()
            .map(load_balancer)
            .unwrap_or_default(),
        connection_pool: tp
            .connection_pool
            .as_ref()
            .map(connection_pool)
            .unwrap_or_default(),
        outlier_detection: tp.outlier_detection.as_ref().map(outlier),
        tls: tp.tls.as_ref().map(tls),
        ports: tp
            .port_level_settings
            .iter()
            .filter_map(|pl| {
                let port = port16(pl.port)?;
                Some((
                    port,
                    PortPolicy {
                        load_balancer: pl.load_balancer.as_ref().map(load_balancer),
                        connection_pool: pl.connection_pool.as_ref().map(connection_pool),
                        outlier_detection: pl.outlier_detection.as_ref().map(outlier),
                        tls: pl.tls.as_ref().map(tls),
                    },
                ))
            })
            .collect(),
    }
}

fn load_balancer(lb: &model::LoadBalancerSettings) -> LoadBalancer {
    use model::SimpleLb;
    LoadBalancer {
        algorithm: match lb.simple.unwrap_or_default() {
            SimpleLb::RoundRobin => LbAlgorithm::RoundRobin,
            SimpleLb::Random => LbAlgorithm::Random,
            SimpleLb::LeastConn
            | SimpleLb::LeastRequest
            | SimpleLb::Unspecified
            | SimpleLb::Passthrough => LbAlgorithm::LeastRequest,
        },
        locality: lb.locality_lb_setting.as_ref().map(|l| LocalityLb {
            enabled: l.enabled.unwrap_or(true),
            distribute: l
                .distribute
                .iter()
                .map(|d| (d.from.clone(), d.to.clone()))
                .collect(),
            failover: l
                .failover
                .iter()
                .map(|f| (f.from.clone(), f.to.clone()))
                .collect(),
            failover_priority: l.failover_priority.clone(),
        }),
    }
}

fn u32_of(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn connection_pool(c: &model::ConnectionPoolSettings) -> ConnectionPool {
    let tcp = c.tcp.clone().unwrap_or_default();
    let http = c.http.clone().unwrap_or_default();
    ConnectionPool {
        max_connections: u32_of(tcp.max_connections),
        connect_timeout_ms: dur_ms(tcp.connect_timeout.as_ref()),
        max_connection_duration_ms: dur_ms(tcp.max_connection_duration.as_ref()),
        // `0s` is Istio's "no idle timeout".
        tcp_idle_timeout_ms: dur_ms(tcp.idle_timeout.as_ref()).filter(|ms| *ms > 0),
        http1_max_pending_requests: u32_of(http.http1_max_pending_requests),
        http2_max_requests: u32_of(http.http2_max_requests),
        // Istio: 0 means unlimited.
        max_requests_per_connection: u32_of(http.max_requests_per_connection).filter(|v| *v > 0),
        max_retries: u32_of(http.max_retries),
        http_idle_timeout_ms: dur_ms(http.idle_timeout.as_ref()),
        max_concurrent_streams: u32_of(http.max_concurrent_streams),
    }
}

/// Istio's outlier detection defaults: 5 consecutive 5xx, 10s interval, 30s
/// base ejection, at most 10% ejected, panic threshold 0%.
fn outlier(o: &model::OutlierDetection) -> OutlierDetection {
    let five_xx = u32_of(o.consecutive_5xx_errors).or(
        if o.consecutive_gateway_errors.is_none() && o.consecutive_errors.is_none() {
            Some(5)
        } else {
            None
        },
    );
    OutlierDetection {
        consecutive_5xx_errors: five_xx.filter(|v| *v > 0),
        consecutive_gateway_errors: u32_of(o.consecutive_gateway_errors.or(o.consecutive_errors))
            .filter(|v| *v > 0),
        interval_ms: dur_ms(o.interval.as_ref()).unwrap_or(10_000),
        base_ejection_time_ms: dur_ms(o.base_ejection_time.as_ref()).unwrap_or(30_000),
        max_ejection_percent: u32_of(o.max_ejection_percent).unwrap_or(10),
        min_health_percent: u32_of(o.min_health_percent).unwrap_or(0),
    }
}

fn tls(t: &model::ClientTlsSettings) -> EndpointTls {
    EndpointTls {
        mode: match t.mode.unwrap_or_default() {
            model::TlsMode::Disable => EndpointTlsMode::Disable,
            model::TlsMode::Simple => EndpointTlsMode::Simple,
            model::TlsMode::Mutual => EndpointTlsMode::Mutual,
            model::TlsMode::IstioMutual => EndpointTlsMode::IstioMutual,
        },
        client_certificate: t.client_certificate.clone(),
        private_key: t.private_key.clone(),
        ca_certificates: t.ca_certificates.clone(),
        subject_alt_names: t.subject_alt_names.clone(),
        sni: t.sni.clone(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    }
}

fn service_entry(se: &model::ServiceEntrySpec, r: &Resource, source: SourceRef) -> ServiceEntry {
    ServiceEntry {
        source,
        namespace: r.namespace.clone(),
        internal: se.location == Some(model::SeLocation::MeshInternal),
        resolution: match se.resolution.unwrap_or_default() {
            model::SeResolution::None => Resolution::None,
            model::SeResolution::Static => Resolution::Static,
            model::SeResolution::Dns => Resolution::Dns,
            model::SeResolution::DnsRoundRobin => Resolution::DnsRoundRobin,
        },
        addresses: se.addresses.clone(),
        ports: se
            .ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    number: u16::try_from(p.number?).ok()?,
                    protocol: p
                        .protocol
                        .as_deref()
                        .map_or_else(|| "TCP".into(), str::to_ascii_uppercase),
                    name: p.name.clone(),
                    target_port: p.target_port.and_then(|t| u16::try_from(t).ok()),
                })
            })
            .collect(),
        endpoints: se
            .endpoints
            .iter()
            .map(|e| Endpoint {
                address: e.address.clone(),
                ports: e
                    .ports
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), u16::try_from(*v).ok()?)))
                    .collect(),
                labels: e.labels.clone(),
                locality: e.locality.clone(),
                weight: e.weight,
            })
            .collect(),
        subject_alt_names: se.subject_alt_names.clone(),
    }
}

fn mode(m: Option<&model::MutualTls>) -> Option<MtlsMode> {
    match m.and_then(|m| m.mode).unwrap_or_default() {
        model::MtlsMode::Unset => None,
        model::MtlsMode::Disable => Some(MtlsMode::Disable),
        model::MtlsMode::Permissive => Some(MtlsMode::Permissive),
        model::MtlsMode::Strict => Some(MtlsMode::Strict),
    }
}

fn mtls(view: &[&Resource], opts: &Options) -> MtlsPolicy {
    let mut p = MtlsPolicy::default();
    let pas: Vec<(&Resource, &model::PeerAuthenticationSpec)> = view
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::PeerAuthentication(pa) => Some((*r, pa)),
            _ => None,
        })
        .collect();
    let has_selector = |pa: &model::PeerAuthenticationSpec| {
        pa.selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    };
    for (r, pa) in &pas {
        if !has_selector(pa)
            && r.namespace == opts.root_namespace
            && let Some(m) = mode(pa.mtls.as_ref())
        {
            p.mesh = m;
        }
    }
    for (r, pa) in &pas {
        if !has_selector(pa)
            && r.namespace != opts.root_namespace
            && let Some(m) = mode(pa.mtls.as_ref())
        {
            p.namespaces.insert(r.namespace.clone(), m);
        }
    }
    for (r, pa) in &pas {
        if has_selector(pa) {
            let inherited = p.namespaces.get(&r.namespace).copied().unwrap_or(p.mesh);
            let own = mode(pa.mtls.as_ref()).unwrap_or(inherited);
            p.workloads.push(WorkloadMtls {
                source: source_ref(r),
                namespace: r.namespace.clone(),
                selector: pa
                    .selector
                    .as_ref()
                    .map(|s| s.match_labels.clone())
                    .unwrap_or_default(),
                mode: own,
                ports: pa
                    .port_level_mtls
                    .iter()
                    .flatten()
                    .filter_map(|(port, m)| {
                        Some((u16::try_from(*port).ok()?, mode(Some(m)).unwrap_or(own)))
                    })
                    .collect(),
            });
        }
    }
    p
}

fn authz(
    ap: &model::AuthorizationPolicySpec,
    r: &Resource,
    source: SourceRef,
    opts: &Options,
) -> Option<AuthzPolicy> {
    let action = match ap.action.unwrap_or_default() {
        model::AuthzAction::Allow => AuthzAction::Allow,
        model::AuthzAction::Deny => AuthzAction::Deny,
        model::AuthzAction::Audit => AuthzAction::Audit,
        // Refused by validation; never compiled.
        model::AuthzAction::Custom => return None,
    };
    let selector = ap
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    // In the root namespace a policy is mesh-wide; with a selector, it
    // selects matching workloads of every namespace (Istio's semantics).
    let scope = if r.namespace == opts.root_namespace {
        AuthzScope::Mesh
    } else if !selector.is_empty() {
        AuthzScope::Workload
    } else {
        AuthzScope::Namespace
    };
    let ports = |v: &[String]| {
        v.iter()
            .filter_map(|p| p.parse().ok())
            .collect::<Vec<u16>>()
    };
    // Istio's short `serviceAccounts` form `name` means the policy's own
    // namespace; the gateway matches `namespace/name` only.
    let qualify = |v: &[String]| {
        v.iter()
            .map(|sa| {
                if sa.contains('/') {
                    sa.clone()
                } else {
                    format!("{}/{sa}", r.namespace)
                }
            })
            .collect::<Vec<_>>()
    };
    // A trust domain is the first segment of a principal; validation
    // refused the forms that have no principal pattern (and trust domains
    // beside principals), so `td` → `td/*` and `td*`/`*` stay as they are.
    let by_trust_domain = |principals: &[String], tds: &[String]| {
        if tds.is_empty() {
            return principals.to_vec();
        }
        tds.iter()
            .map(|td| {
                if td.ends_with('*') {
                    td.clone()
                } else {
                    format!("{td}/*")
                }
            })
            .collect::<Vec<_>>()
    };
    Some(AuthzPolicy {
        dry_run: r
            .annotations
            .get(DRY_RUN_ANNOTATION)
            .is_some_and(|v| v == "true"),
        source,
        namespace: r.namespace.clone(),
        scope,
        selector,
        action,
        rules: ap
            .rules
            .iter()
            .map(|rule| AuthzRule {
                from: rule
                    .sources()
                    .iter()
                    .map(|f| AuthzSource {
                        principals: by_trust_domain(&f.source.principals, &f.source.trust_domains),
                        not_principals: by_trust_domain(
                            &f.source.not_principals,
                            &f.source.not_trust_domains,
                        ),
                        namespaces: f.source.namespaces.clone(),
                        not_namespaces: f.source.not_namespaces.clone(),
                        service_accounts: qualify(&f.source.service_accounts),
                        not_service_accounts: qualify(&f.source.not_service_accounts),
                    })
                    .collect(),
                to: rule
                    .operations()
                    .iter()
                    .map(|t| AuthzOperation {
                        hosts: t.operation.hosts.clone(),
                        not_hosts: t.operation.not_hosts.clone(),
                        ports: ports(&t.operation.ports),
                        not_ports: ports(&t.operation.not_ports),
                        methods: t.operation.methods.clone(),
                        not_methods: t.operation.not_methods.clone(),
                        paths: t.operation.paths.clone(),
                        not_paths: t.operation.not_paths.clone(),
                    })
                    .collect(),
                when: rule
                    .conditions()
                    .iter()
                    .map(|w| AuthzCondition {
                        key: w.key.clone(),
                        values: w.values.clone(),
                        not_values: w.not_values.clone(),
                    })
                    .collect(),
            })
            .collect(),
    })
}
