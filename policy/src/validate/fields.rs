//! Per-resource rules: everything that can be checked by looking at one
//! resource alone.

use std::collections::{BTreeMap, BTreeSet};

use crate::Options;
use crate::diag::{Code, Diagnostic};
use crate::model::*;
use crate::syntax;

use super::{CLUSTERS_ANNOTATION, DRY_RUN_ANNOTATION, diag};

/// Istio's retryOn conditions that meshfed enforces, HTTP and gRPC.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status names accepted by `fault.abort.grpcStatus`, with their codes.
pub const GRPC_STATUS: &[(&str, u32)] = &[
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

/// `when` keys that meshfed enforces. `request.headers[<name>]` is matched
/// separately.
pub const WHEN_KEYS: &[&str] = &[
    "source.principal",
    "source.namespace",
    "source.cluster",
    "destination.port",
    "connection.sni",
];

/// `when` keys that Istio has and meshfed cannot enforce; security-relevant,
/// so they fail closed.
const WHEN_UNSUPPORTED: &[&str] = &[
    "source.ip",
    "remote.ip",
    "destination.ip",
    "request.auth.",
    "experimental.",
];

struct Check<'a> {
    r: &'a Resource,
    out: &'a mut Vec<Diagnostic>,
}

impl Check<'_> {
    fn report(&mut self, code: Code, path: &str, msg: impl Into<String>) {
        self.out.push(diag(self.r, code, path, msg));
    }

    fn report_hint(&mut self, code: Code, path: &str, msg: impl Into<String>, hint: &str) {
        self.out.push(diag(self.r, code, path, msg).with_hint(hint));
    }

    fn lexical(&mut self, code: Code, path: &str, res: Result<(), String>) {
        if let Err(e) = res {
            self.report(code, path, e);
        }
    }

    /// A duration that must be at least 1 ms.
    fn duration(&mut self, path: &str, value: Option<&String>) {
        if let Some(v) = value {
            match syntax::parse_duration(v) {
                Ok(d) if d.as_nanos() > 0 && d.as_nanos() < 1_000_000 => self.report(
                    Code::InvalidDuration,
                    path,
                    format!("duration `{v}` is below the 1ms minimum"),
                ),
                Ok(d) if d.is_zero() => self.report(
                    Code::InvalidDuration,
                    path,
                    format!("duration `{v}` must be positive"),
                ),
                Ok(_) => {}
                Err(e) => self.report(Code::InvalidDuration, path, e),
            }
        }
    }

    fn percent(&mut self, path: &str, p: Option<&Percent>) {
        if let Some(p) = p {
            self.lexical(
                Code::InvalidPercent,
                &format!("{path}.value"),
                syntax::check_percent(p.value),
            );
        }
    }

    fn range(&mut self, path: &str, v: Option<i64>, lo: i64, hi: i64, what: &str) {
        if let Some(v) = v
            && (v < lo || v > hi)
        {
            self.report(
                Code::OutOfRange,
                path,
                format!("{what} {v} is outside {lo}..{hi}"),
            );
        }
    }

    fn port(&mut self, path: &str, v: Option<u32>) {
        self.range(path, v.map(i64::from), 1, 65535, "port");
    }

    fn labels(&mut self, path: &str, labels: &BTreeMap<String, String>) {
        for (k, v) in labels {
            let mut p = path.to_string();
            crate::yaml::push_key(&mut p, k);
            self.lexical(Code::InvalidName, &p, syntax::check_label_key(k));
            self.lexical(Code::InvalidName, &p, syntax::check_label_value(v));
        }
    }

    fn not_enforced(&mut self, path: &str, field: &str, why: &str) {
        self.report(
            Code::NotEnforced,
            path,
            format!("`{field}` is not enforced by meshfed and is ignored: {why}"),
        );
    }

    fn unsupported(&mut self, path: &str, field: &str, hint: &str) {
        self.report_hint(
            Code::Unsupported,
            path,
            format!("`{field}` is not supported by meshfed; it affects security, so the policy is refused rather than enforced partly"),
            hint,
        );
    }

    fn string_match(&mut self, path: &str, m: &StringMatch) {
        let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            self.report(
                Code::StringMatchOneOf,
                path,
                format!(
                    "a StringMatch needs exactly one of `exact`, `prefix`, `regex`; it has {set}"
                ),
            );
        }
        for (field, v) in [("prefix", &m.prefix), ("regex", &m.regex)] {
            if v.as_deref() == Some("") {
                self.report_hint(
                    Code::InvalidValue,
                    &format!("{path}.{field}"),
                    format!("an empty `{field}` match is refused by Istio"),
                    "remove the match to match anything",
                );
            }
        }
        if let Some(re) = m.regex.as_deref().filter(|r| !r.is_empty()) {
            self.regex(&format!("{path}.regex"), re);
        }
    }

    fn regex(&mut self, path: &str, re: &str) {
        if re.len() > MAX_REGEX_LEN {
            self.report(
                Code::InvalidRegex,
                path,
                format!(
                    "regex is {} bytes; Istio allows at most {MAX_REGEX_LEN}",
                    re.len()
                ),
            );
        } else if let Err(e) = check_regex(re) {
            self.report(
                Code::InvalidRegex,
                path,
                format!("regex `{re}` does not compile: {e}"),
            );
        }
    }

    fn host(&mut self, path: &str, host: &str, allow_star: bool) {
        if host.is_empty() {
            self.report(Code::MissingField, path, "host is required");
        } else {
            self.lexical(
                Code::InvalidHost,
                path,
                syntax::check_host(host, allow_star),
            );
        }
    }

    fn destination(&mut self, path: &str, d: &Destination) {
        self.host(&format!("{path}.host"), &d.host, false);
        if let Some(s) = &d.subset {
            self.lexical(
                Code::InvalidName,
                &format!("{path}.subset"),
                syntax::check_dns_label(s),
            );
        }
        if let Some(p) = &d.port {
            match p.number {
                None => self.report(
                    Code::MissingField,
                    &format!("{path}.port"),
                    "port.number is required",
                ),
                n => self.port(&format!("{path}.port.number"), n),
            }
        }
    }

    /// Header edits. `route_level`: a route's own `request.set` may name
    /// `:authority`, which compile turns into the route's authority rewrite
    /// (what Envoy does with it); any other pseudo-header is refused, since
    /// the gateway cannot edit it.
    fn headers(&mut self, path: &str, h: Option<&Headers>, route_level: bool) {
        let Some(h) = h else { return };
        for (side, ops) in [("request", &h.request), ("response", &h.response)] {
            let Some(ops) = ops else { continue };
            for (verb, names) in [
                ("set", ops.set.keys().collect::<Vec<_>>()),
                ("add", ops.add.keys().collect()),
                ("remove", ops.remove.iter().collect()),
            ] {
                for n in names {
                    let p = format!("{path}.{side}.{verb}");
                    if route_level && side == "request" && verb == "set" && n == ":authority" {
                        continue;
                    }
                    self.lexical(Code::InvalidValue, &p, syntax::check_header_name(n));
                }
            }
        }
    }

    fn weights(&mut self, path: &str, weights: impl Iterator<Item = Option<i64>>) {
        let w: Vec<Option<i64>> = weights.collect();
        for (i, v) in w.iter().enumerate() {
            self.range(&format!("{path}[{i}].weight"), *v, 0, 100, "weight");
        }
        if w.len() > 1 {
            let sum: i64 = w.iter().map(|v| v.unwrap_or(0)).sum();
            if sum != 100 {
                self.report_hint(
                    Code::WeightsSum,
                    path,
                    format!("route weights sum to {sum}, not 100"),
                    "with several destinations, give each a weight; they must add up to 100",
                );
            }
        }
    }
}

/// Checks that a regex compiles the way the gateway will compile it:
/// anchored (Istio matches the whole value), RE2 syntax, within a 1 MiB
/// program. Parsing is cheap and catches syntax errors; the full compile,
/// which costs ~50µs, only runs for patterns that could blow the size limit
/// (counted repetitions or long patterns).
pub fn check_regex(re: &str) -> Result<(), String> {
    let anchored = format!("^(?:{re})$");
    let first_line = |e: &dyn std::fmt::Display| {
        let detail = e.to_string();
        detail
            .lines()
            .last()
            .unwrap_or("invalid regex")
            .trim()
            .trim_start_matches("error: ")
            .to_string()
    };
    regex_syntax::ParserBuilder::new()
        .nest_limit(64)
        .build()
        .parse(&anchored)
        .map_err(|e| first_line(&e))?;
    if re.contains('{') || re.len() > 256 {
        regex::RegexBuilder::new(&anchored)
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
            .map_err(|e| first_line(&e))?;
    }
    Ok(())
}

/// Runs every per-resource rule on `r`.
pub fn check(r: &Resource, opts: &Options, out: &mut Vec<Diagnostic>) {
    let mut c = Check { r, out };
    meta(&mut c);
    match &r.spec {
        Spec::Cluster(s) => cluster(&mut c, s),
        Spec::ServiceExport(_) => {}
        Spec::ServiceEntry(s) => service_entry(&mut c, s),
        Spec::DestinationRule(s) => destination_rule(&mut c, s),
        Spec::VirtualService(s) => virtual_service(&mut c, s),
        Spec::PeerAuthentication(s) => peer_authentication(&mut c, s, opts),
        Spec::AuthorizationPolicy(s) => authorization_policy(&mut c, s),
        Spec::RolloutPolicy(s) => rollout_policy(&mut c, s),
    }
}

/// The longest bake time a wave may have: a rollout is meant to end.
pub const MAX_BAKE_TIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn rollout_policy(c: &mut Check<'_>, s: &RolloutPolicySpec) {
    if s.waves.is_empty() {
        c.report_hint(
            Code::MissingField,
            "spec.waves",
            "a RolloutPolicy needs at least one wave",
            "list the waves in order, e.g. `waves: [{clusters: [edge], bakeTime: 5m}, {clusters: [west]}]`; clusters in no wave form a last wave",
        );
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, w) in s.waves.iter().enumerate() {
        if w.clusters.is_empty() {
            c.report(
                Code::MissingField,
                &format!("spec.waves[{i}].clusters"),
                format!("wave {} names no cluster", i + 1),
            );
        }
        for (j, name) in w.clusters.iter().enumerate() {
            let p = format!("spec.waves[{i}].clusters[{j}]");
            c.lexical(Code::InvalidName, &p, syntax::check_dns_label(name));
            if let Some(first) = seen.insert(name, i) {
                c.report(
                    Code::InvalidValue,
                    &p,
                    format!(
                        "cluster `{name}` is already in wave {}; a cluster belongs to one wave",
                        first + 1
                    ),
                );
            }
        }
        let p = format!("spec.waves[{i}].bakeTime");
        if let Some(v) = &w.bake_time {
            match syntax::parse_duration(v) {
                Ok(d) if d > MAX_BAKE_TIME => c.report(
                    Code::InvalidDuration,
                    &p,
                    format!("bake time `{v}` is over the 24h maximum"),
                ),
                Ok(_) => {}
                Err(e) => c.report(Code::InvalidDuration, &p, e),
            }
        }
    }
    let g = &s.gates;
    if g.min_requests == Some(0) {
        c.report(
            Code::OutOfRange,
            "spec.gates.minRequests",
            "minRequests must be at least 1",
        );
    }
    for (field, v) in [
        ("maxSuccessRateDrop", g.max_success_rate_drop),
        ("maxDenialRateIncrease", g.max_denial_rate_increase),
    ] {
        if let Some(v) = v
            && !(0.0..=100.0).contains(&v)
        {
            c.report(
                Code::InvalidPercent,
                &format!("spec.gates.{field}"),
                format!("{field} is {v}; it is in percentage points, 0 to 100"),
            );
        }
    }
    for (field, v, hint) in [
        (
            "maxP99IncreasePercent",
            g.max_p99_increase_percent,
            "50 = 1.5x",
        ),
        ("p99FloorMs", g.p99_floor_ms, "milliseconds"),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v >= 0.0)
        {
            c.report(
                Code::OutOfRange,
                &format!("spec.gates.{field}"),
                format!("{field} is {v}; it must be 0 or more ({hint})"),
            );
        }
    }
}

fn meta(c: &mut Check<'_>) {
    let r = c.r;
    if r.name.is_empty() {
        c.report(
            Code::MissingField,
            "metadata.name",
            "metadata.name is required",
        );
    } else if r.kind == Kind::Cluster {
        c.lexical(
            Code::InvalidName,
            "metadata.name",
            syntax::check_dns_label(&r.name),
        );
    } else {
        c.lexical(
            Code::InvalidName,
            "metadata.name",
            syntax::check_dns_subdomain(&r.name),
        );
    }
    if r.kind.namespaced() {
        c.lexical(
            Code::InvalidName,
            "metadata.namespace",
            syntax::check_dns_label(&r.namespace),
        );
    }
    c.labels("metadata.labels", &r.labels);
    if let Some(v) = r.annotations.get(CLUSTERS_ANNOTATION) {
        let path = "metadata.annotations[\"meshfed.io/clusters\"]";
        let names: Vec<&str> = v.split(',').map(str::trim).collect();
        if names.iter().all(|n| n.is_empty()) {
            c.report(
                Code::InvalidValue,
                path,
                "`meshfed.io/clusters` is empty; list clusters (`east,west`) or remove the annotation",
            );
        } else {
            for n in names {
                if let Err(e) = syntax::check_dns_label(n) {
                    c.report(Code::InvalidName, path, format!("cluster name {e}"));
                }
            }
        }
    }
}

fn cluster(c: &mut Check<'_>, s: &ClusterSpec) {
    if s.gateways.is_empty() {
        c.report_hint(
            Code::MissingField,
            "spec.gateways",
            "a Cluster needs at least one gateway address",
            "list `host:port` of each gateway, e.g. `gw.west.example.com:15443`",
        );
    }
    let mut seen = BTreeSet::new();
    for (i, g) in s.gateways.iter().enumerate() {
        let p = format!("spec.gateways[{i}]");
        c.lexical(Code::InvalidAddress, &p, syntax::check_host_port(g));
        if !seen.insert(g) {
            c.report(
                Code::DuplicateAddress,
                &p,
                format!("gateway address `{g}` is listed twice"),
            );
        }
    }
    if let Some(td) = &s.trust_domain {
        c.lexical(
            Code::InvalidName,
            "spec.trustDomain",
            syntax::check_trust_domain(td),
        );
    }
    if let Some(l) = &s.locality {
        if l.region.is_empty() && (!l.zone.is_empty() || !l.subzone.is_empty()) {
            c.report(
                Code::MissingField,
                "spec.locality",
                "locality.region is required when zone or subzone is set",
            );
        }
        if l.zone.is_empty() && !l.subzone.is_empty() {
            c.report(
                Code::MissingField,
                "spec.locality",
                "locality.zone is required when subzone is set",
            );
        }
    }
}

fn virtual_service(c: &mut Check<'_>, s: &VirtualServiceSpec) {
    if s.hosts.is_empty() {
        // Istio reads it as a delegate, which only a root VirtualService's
        // `delegate` reaches; meshfed does not follow `delegate`, so its
        // routes apply nowhere (as when no root names it).
        c.not_enforced(
            "spec.hosts",
            "a VirtualService without hosts (a delegate)",
            "delegation is not followed; give the routes hosts of their own",
        );
    }
    let mut seen = BTreeSet::new();
    for (i, h) in s.hosts.iter().enumerate() {
        c.host(&format!("spec.hosts[{i}]"), h, true);
        if !seen.insert(h.to_ascii_lowercase()) {
            c.report(
                Code::InvalidValue,
                &format!("spec.hosts[{i}]"),
                format!("host `{h}` is listed twice"),
            );
        }
    }
    if !s.gateways.is_empty() && !s.gateways.iter().any(|g| g == "mesh") {
        c.report_hint(
            Code::ProxyKind,
            "spec.gateways",
            format!(
                "skipping VirtualService {}: bound only to Istio gateways ({}), enforced by Istio's proxies; meshfed does not apply it",
                c.r.name,
                s.gateways.join(", ")
            ),
            "add `mesh` to `gateways` to apply it east-west",
        );
    }
    if !s.export_to.is_empty() {
        c.not_enforced(
            "spec.exportTo",
            "exportTo",
            "config visibility is federation-wide; use the `meshfed.io/clusters` annotation",
        );
    }
    if !s.tls.is_empty() {
        c.not_enforced(
            "spec.tls",
            "tls",
            "SNI routes are not supported yet; TLS traffic follows `tcp` routes",
        );
    }
    if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
        c.report(
            Code::MissingField,
            "spec",
            "a VirtualService needs `http` or `tcp` routes",
        );
    }
    for (i, h) in s.http.iter().enumerate() {
        http_route(c, &format!("spec.http[{i}]"), h);
    }
    for (i, t) in s.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        for (j, m) in t.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            c.port(&format!("{mp}.port"), m.port);
            c.labels(&format!("{mp}.sourceLabels"), &m.source_labels);
            if !m.destination_subnets.is_empty() {
                c.not_enforced(
                    &format!("{mp}.destinationSubnets"),
                    "destinationSubnets",
                    "TCP routes match by port",
                );
            }
            if m.source_subnet.is_some() {
                c.not_enforced(
                    &format!("{mp}.sourceSubnet"),
                    "sourceSubnet",
                    "TCP routes match by port",
                );
            }
            if !m.gateways.is_empty() {
                c.not_enforced(
                    &format!("{mp}.gateways"),
                    "gateways",
                    "meshfed routes mesh traffic only",
                );
            }
        }
        if t.route.is_empty() {
            c.report(
                Code::MissingField,
                &format!("{path}.route"),
                "a TCP route needs at least one destination",
            );
        }
        for (j, d) in t.route.iter().enumerate() {
            c.destination(&format!("{path}.route[{j}].destination"), &d.destination);
        }
        c.weights(&format!("{path}.route"), t.route.iter().map(|d| d.weight));
    }
}

fn http_route(c: &mut Check<'_>, path: &str, h: &HttpRoute) {
    for (j, m) in h.matches.iter().enumerate() {
        let mp = format!("{path}.match[{j}]");
        for (field, sm) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(sm) = sm {
                c.string_match(&format!("{mp}.{field}"), sm);
            }
        }
        for (field, map) in [
            ("headers", &m.headers),
            ("withoutHeaders", &m.without_headers),
        ] {
            for (name, sm) in map {
                let mut p = format!("{mp}.{field}");
                crate::yaml::push_key(&mut p, name);
                c.lexical(Code::InvalidValue, &p, syntax::check_header_name(name));
                c.string_match(&p, sm);
            }
        }
        for (name, sm) in &m.query_params {
            let mut p = format!("{mp}.queryParams");
            crate::yaml::push_key(&mut p, name);
            c.string_match(&p, sm);
        }
        c.port(&format!("{mp}.port"), m.port);
        c.labels(&format!("{mp}.sourceLabels"), &m.source_labels);
        if let Some(ns) = &m.source_namespace {
            c.lexical(
                Code::InvalidName,
                &format!("{mp}.sourceNamespace"),
                syntax::check_dns_label(ns),
            );
        }
        if !m.gateways.is_empty() {
            c.not_enforced(
                &format!("{mp}.gateways"),
                "gateways",
                "meshfed routes mesh traffic only",
            );
        }
    }
    let has_action = h.redirect.is_some() || h.direct_response.is_some() || h.delegate.is_some();
    for (field, v) in [
        ("redirect", &h.redirect),
        ("directResponse", &h.direct_response),
        ("delegate", &h.delegate),
    ] {
        if v.is_some() {
            c.not_enforced(
                &format!("{path}.{field}"),
                field,
                "requests this rule matches get a 502 with `x-meshfed-error: no-route` instead",
            );
        }
    }
    if h.route.is_empty() && !has_action {
        c.report(
            Code::MissingField,
            &format!("{path}.route"),
            "an HTTP route needs at least one destination",
        );
    }
    for (k, d) in h.route.iter().enumerate() {
        let dp = format!("{path}.route[{k}]");
        c.destination(&format!("{dp}.destination"), &d.destination);
        c.headers(&format!("{dp}.headers"), d.headers.as_ref(), false);
    }
    c.weights(&format!("{path}.route"), h.route.iter().map(|d| d.weight));
    c.duration(&format!("{path}.timeout"), h.timeout.as_ref());
    if let Some(r) = &h.retries {
        let rp = format!("{path}.retries");
        c.range(
            &format!("{rp}.attempts"),
            Some(r.attempts),
            0,
            100,
            "retry attempts",
        );
        c.duration(&format!("{rp}.perTryTimeout"), r.per_try_timeout.as_ref());
        if let Some(on) = &r.retry_on {
            for cond in on.split(',').map(str::trim) {
                let is_status =
                    cond.len() == 3 && cond.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s));
                if !is_status && !RETRY_ON.contains(&cond) {
                    let hint = crate::load::closest(cond, RETRY_ON)
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| {
                            format!(
                                "known conditions: {}, or an HTTP status like `503`",
                                RETRY_ON.join(", ")
                            )
                        });
                    c.report_hint(
                        Code::InvalidValue,
                        &format!("{rp}.retryOn"),
                        format!("unknown retryOn condition `{cond}`"),
                        &hint,
                    );
                }
            }
        }
        if r.retry_remote_localities.is_some() {
            c.not_enforced(
                &format!("{rp}.retryRemoteLocalities"),
                "retryRemoteLocalities",
                "retries may go to any healthy endpoint the load balancer picks",
            );
        }
    }
    if let Some(f) = &h.fault {
        let fp = format!("{path}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            c.report(Code::MissingField, &fp, "a fault needs `delay` or `abort`");
        }
        if let Some(d) = &f.delay {
            let dp = format!("{fp}.delay");
            if d.exponential_delay.is_some() {
                c.report(
                    Code::InvalidValue,
                    &format!("{dp}.exponentialDelay"),
                    "exponentialDelay is not supported (nor by Istio); use fixedDelay",
                );
            }
            if d.fixed_delay.is_none() {
                c.report(Code::MissingField, &dp, "delay.fixedDelay is required");
            }
            c.duration(&format!("{dp}.fixedDelay"), d.fixed_delay.as_ref());
            c.percent(&format!("{dp}.percentage"), d.percentage.as_ref());
            c.range(&format!("{dp}.percent"), d.percent, 0, 100, "percent");
        }
        if let Some(a) = &f.abort {
            let ap = format!("{fp}.abort");
            let n = [
                a.http_status.is_some(),
                a.grpc_status.is_some(),
                a.http2_error.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if n != 1 {
                c.report(Code::InvalidValue, &ap, format!("an abort needs exactly one of `httpStatus`, `grpcStatus`, `http2Error`; it has {n}"));
            }
            c.range(
                &format!("{ap}.httpStatus"),
                a.http_status,
                200,
                599,
                "HTTP status",
            );
            if let Some(g) = &a.grpc_status
                && !GRPC_STATUS.iter().any(|(name, _)| name == g)
            {
                c.report(
                    Code::InvalidValue,
                    &format!("{ap}.grpcStatus"),
                    format!("unknown gRPC status `{g}`; use a name like UNAVAILABLE"),
                );
            }
            if a.http2_error.is_some() {
                c.report(
                    Code::InvalidValue,
                    &format!("{ap}.http2Error"),
                    "http2Error aborts are not supported; use httpStatus or grpcStatus",
                );
            }
            c.percent(&format!("{ap}.percentage"), a.percentage.as_ref());
        }
    }
    if let Some(m) = &h.mirror {
        c.destination(&format!("{path}.mirror"), m);
    }
    if h.mirror.is_some() && !h.mirrors.is_empty() {
        c.report(
            Code::InvalidValue,
            &format!("{path}.mirrors"),
            "use either `mirror` or `mirrors`, not both",
        );
    }
    if h.mirror.is_none() && (h.mirror_percentage.is_some() || h.mirror_percent.is_some()) {
        c.report(
            Code::InvalidValue,
            &format!("{path}.mirrorPercentage"),
            "mirrorPercentage needs `mirror`",
        );
    }
    c.percent(
        &format!("{path}.mirrorPercentage"),
        h.mirror_percentage.as_ref(),
    );
    c.range(
        &format!("{path}.mirrorPercent"),
        h.mirror_percent.map(i64::from),
        0,
        100,
        "mirrorPercent",
    );
    for (k, m) in h.mirrors.iter().enumerate() {
        c.destination(&format!("{path}.mirrors[{k}].destination"), &m.destination);
        c.percent(
            &format!("{path}.mirrors[{k}].percentage"),
            m.percentage.as_ref(),
        );
    }
    if h.cors_policy.is_some() {
        c.not_enforced(
            &format!("{path}.corsPolicy"),
            "corsPolicy",
            "CORS is the application's concern here",
        );
    }
    c.headers(&format!("{path}.headers"), h.headers.as_ref(), true);
    let set_authority = h
        .headers
        .as_ref()
        .and_then(|hd| hd.request.as_ref())
        .and_then(|rq| rq.set.get(":authority"));
    if let Some(a) = set_authority {
        let p = format!("{path}.headers.request.set");
        c.lexical(
            Code::InvalidHost,
            &p,
            syntax::check_host(a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h), false),
        );
        if h.rewrite.as_ref().is_some_and(|rw| rw.authority.is_some()) {
            c.report(
                Code::InvalidValue,
                &p,
                "set `:authority` or `rewrite.authority`, not both",
            );
        }
    }
    if let Some(rw) = &h.rewrite {
        let rp = format!("{path}.rewrite");
        if let Some(u) = &rw.uri
            && !u.starts_with('/')
        {
            c.report(
                Code::InvalidValue,
                &format!("{rp}.uri"),
                format!("rewrite.uri `{u}` must start with `/`"),
            );
        }
        if let Some(a) = &rw.authority {
            c.lexical(
                Code::InvalidHost,
                &format!("{rp}.authority"),
                syntax::check_host(a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h), false),
            );
        }
        if rw.uri_regex_rewrite.is_some() {
            c.not_enforced(
                &format!("{rp}.uriRegexRewrite"),
                "uriRegexRewrite",
                "only prefix rewrites (`rewrite.uri`) are applied",
            );
        }
    }
}

fn destination_rule(c: &mut Check<'_>, s: &DestinationRuleSpec) {
    c.host("spec.host", &s.host, false);
    if let Some(tp) = &s.traffic_policy {
        traffic_policy(c, "spec.trafficPolicy", tp);
    }
    let mut names = BTreeMap::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if sub.name.is_empty() {
            c.report(
                Code::MissingField,
                &format!("{p}.name"),
                "subset name is required",
            );
        } else {
            c.lexical(
                Code::InvalidName,
                &format!("{p}.name"),
                syntax::check_dns_label(&sub.name),
            );
            if let Some(first) = names.insert(sub.name.clone(), i) {
                c.report(
                    Code::DuplicateSubset,
                    &format!("{p}.name"),
                    format!(
                        "subset `{}` is already defined at spec.subsets[{first}]",
                        sub.name
                    ),
                );
            }
        }
        c.labels(&format!("{p}.labels"), &sub.labels);
        if let Some(tp) = &sub.traffic_policy {
            traffic_policy(c, &format!("{p}.trafficPolicy"), tp);
        }
    }
    if !s.export_to.is_empty() {
        c.not_enforced(
            "spec.exportTo",
            "exportTo",
            "config visibility is federation-wide; use the `meshfed.io/clusters` annotation",
        );
    }
    if s.workload_selector.is_some() {
        c.not_enforced(
            "spec.workloadSelector",
            "workloadSelector",
            "gateways apply DestinationRules to every caller",
        );
    }
}

fn traffic_policy(c: &mut Check<'_>, path: &str, tp: &TrafficPolicy) {
    policy_parts(
        c,
        path,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    let mut ports = BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let p = format!("{path}.portLevelSettings[{i}]");
        match pl.port.and_then(|x| x.number) {
            None => c.report(
                Code::MissingField,
                &format!("{p}.port"),
                "portLevelSettings needs port.number",
            ),
            Some(n) => {
                c.port(&format!("{p}.port.number"), Some(n));
                if !ports.insert(n) {
                    c.report(
                        Code::InvalidValue,
                        &format!("{p}.port.number"),
                        format!("port {n} has settings twice"),
                    );
                }
            }
        }
        policy_parts(
            c,
            &p,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
        );
    }
    if tp.tunnel.is_some() {
        c.not_enforced(
            &format!("{path}.tunnel"),
            "tunnel",
            "meshfed links are its own QUIC tunnels",
        );
    }
    if tp.proxy_protocol.is_some() {
        c.not_enforced(
            &format!("{path}.proxyProtocol"),
            "proxyProtocol",
            "not sent to endpoints",
        );
    }
}

fn policy_parts(
    c: &mut Check<'_>,
    path: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    od: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        let p = format!("{path}.loadBalancer");
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            c.report(
                Code::InvalidValue,
                &p,
                "use either `simple` or `consistentHash`, not both",
            );
        }
        if lb.simple == Some(SimpleLb::Passthrough) {
            c.not_enforced(
                &format!("{p}.simple"),
                "PASSTHROUGH",
                "the gateway balances with LEAST_REQUEST instead",
            );
        }
        if lb.consistent_hash.is_some() {
            c.not_enforced(
                &format!("{p}.consistentHash"),
                "consistentHash",
                "the gateway balances with LEAST_REQUEST instead",
            );
        }
        if lb.warmup_duration_secs.is_some() {
            c.not_enforced(
                &format!("{p}.warmupDurationSecs"),
                "warmupDurationSecs",
                "new endpoints get full weight at once",
            );
        }
        if let Some(w) = &lb.warmup {
            let wp = format!("{p}.warmup");
            if w.duration.is_none() {
                c.report(
                    Code::MissingField,
                    &format!("{wp}.duration"),
                    "`warmup` needs a `duration`",
                );
            }
            c.duration(&format!("{wp}.duration"), w.duration.as_ref());
            if let Some(m) = w.minimum_percent
                && !(0.0..=100.0).contains(&m)
            {
                c.report(
                    Code::OutOfRange,
                    &format!("{wp}.minimumPercent"),
                    format!("minimumPercent {m} is outside 0..100"),
                );
            }
            if let Some(a) = w.aggression
                && !(a >= 1.0 && a.is_finite())
            {
                c.report(
                    Code::OutOfRange,
                    &format!("{wp}.aggression"),
                    format!("aggression {a} must be at least 1"),
                );
            }
            if lb.warmup_duration_secs.is_some() {
                c.report(
                    Code::InvalidValue,
                    &wp,
                    "use either `warmup` or `warmupDurationSecs`, not both",
                );
            }
            c.not_enforced(&wp, "warmup", "new endpoints get full weight at once");
        }
        if lb.zone_aware_lb_setting.is_some() {
            c.not_enforced(
                &format!("{p}.zoneAwareLbSetting"),
                "zoneAwareLbSetting",
                "the gateway prefers endpoints by `localityLbSetting` only",
            );
        }
        if let Some(l) = &lb.locality_lb_setting {
            let lp = format!("{p}.localityLbSetting");
            if !l.distribute.is_empty() && !l.failover.is_empty() {
                c.report(
                    Code::InvalidValue,
                    &lp,
                    "use either `distribute` or `failover`, not both",
                );
            }
            for (i, d) in l.distribute.iter().enumerate() {
                let dp = format!("{lp}.distribute[{i}]");
                if d.from.is_empty() {
                    c.report(
                        Code::MissingField,
                        &format!("{dp}.from"),
                        "distribute.from is required",
                    );
                }
                let sum: u64 = d.to.values().map(|v| u64::from(*v)).sum();
                if sum != 100 {
                    c.report(
                        Code::WeightsSum,
                        &format!("{dp}.to"),
                        format!("locality weights sum to {sum}, not 100"),
                    );
                }
            }
            for (i, f) in l.failover.iter().enumerate() {
                let fp = format!("{lp}.failover[{i}]");
                if f.from.is_empty() || f.to.is_empty() {
                    c.report(
                        Code::MissingField,
                        &fp,
                        "failover needs `from` and `to` regions",
                    );
                } else if f.from == f.to {
                    c.report(
                        Code::InvalidValue,
                        &fp,
                        format!("failover from `{}` to itself", f.from),
                    );
                }
            }
        }
    }
    if let Some(pool) = pool {
        let p = format!("{path}.connectionPool");
        if let Some(t) = &pool.tcp {
            let tp = format!("{p}.tcp");
            c.range(
                &format!("{tp}.maxConnections"),
                t.max_connections,
                1,
                u32::MAX.into(),
                "maxConnections",
            );
            c.duration(&format!("{tp}.connectTimeout"), t.connect_timeout.as_ref());
            c.duration(
                &format!("{tp}.maxConnectionDuration"),
                t.max_connection_duration.as_ref(),
            );
            // `0s` turns the idle timeout off, as in Istio.
            if t.idle_timeout
                .as_deref()
                .and_then(|d| syntax::parse_duration(d).ok())
                != Some(std::time::Duration::ZERO)
            {
                c.duration(&format!("{tp}.idleTimeout"), t.idle_timeout.as_ref());
            }
            if t.idle_timeout.is_some() {
                c.not_enforced(
                    &format!("{tp}.idleTimeout"),
                    "tcp.idleTimeout",
                    "the gateways keep idle TCP streams open until either side closes",
                );
            }
            if t.tcp_keepalive.is_some() {
                c.not_enforced(
                    &format!("{tp}.tcpKeepalive"),
                    "tcpKeepalive",
                    "the gateway uses its own keepalive settings",
                );
            }
        }
        if let Some(h) = &pool.http {
            let hp = format!("{p}.http");
            for (field, v) in [
                ("http1MaxPendingRequests", h.http1_max_pending_requests),
                ("http2MaxRequests", h.http2_max_requests),
                ("maxRequestsPerConnection", h.max_requests_per_connection),
                ("maxRetries", h.max_retries),
                ("maxConcurrentStreams", h.max_concurrent_streams),
            ] {
                c.range(&format!("{hp}.{field}"), v, 0, u32::MAX.into(), field);
            }
            c.duration(&format!("{hp}.idleTimeout"), h.idle_timeout.as_ref());
            if let Some(k) = &h.http2_keep_alive {
                let kp = format!("{hp}.http2KeepAlive");
                c.duration(&format!("{kp}.interval"), k.interval.as_ref());
                c.duration(&format!("{kp}.timeout"), k.timeout.as_ref());
                c.not_enforced(
                    &kp,
                    "http2KeepAlive",
                    "the gateway uses its own keepalive settings",
                );
            }
            if h.h2_upgrade_policy
                .is_some_and(|u| u != H2UpgradePolicy::Default)
            {
                c.not_enforced(
                    &format!("{hp}.h2UpgradePolicy"),
                    "h2UpgradePolicy",
                    "endpoints are reached with the caller's protocol",
                );
            }
        }
    }
    if let Some(od) = od {
        let p = format!("{path}.outlierDetection");
        for (field, v) in [
            ("consecutiveErrors", od.consecutive_errors),
            ("consecutive5xxErrors", od.consecutive_5xx_errors),
            ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
        ] {
            c.range(&format!("{p}.{field}"), v, 0, u32::MAX.into(), field);
        }
        c.duration(&format!("{p}.interval"), od.interval.as_ref());
        c.duration(
            &format!("{p}.baseEjectionTime"),
            od.base_ejection_time.as_ref(),
        );
        c.range(
            &format!("{p}.maxEjectionPercent"),
            od.max_ejection_percent,
            0,
            100,
            "maxEjectionPercent",
        );
        c.range(
            &format!("{p}.minHealthPercent"),
            od.min_health_percent,
            0,
            100,
            "minHealthPercent",
        );
        if od.consecutive_local_origin_failures.is_some()
            || od.split_external_local_origin_errors.is_some()
        {
            c.not_enforced(
                &p,
                "consecutiveLocalOriginFailures",
                "local-origin failures count as gateway errors",
            );
        }
    }
    if let Some(t) = tls {
        let p = format!("{path}.tls");
        let mode = t.mode.unwrap_or_default();
        if t.credential_name.is_some() {
            c.unsupported(
                &format!("{p}.credentialName"),
                "credentialName",
                "give file paths in clientCertificate, privateKey and caCertificates",
            );
        }
        if mode == TlsMode::Mutual
            && t.credential_name.is_none()
            && (t.client_certificate.is_none() || t.private_key.is_none())
        {
            c.report(
                Code::MissingField,
                &p,
                "MUTUAL needs clientCertificate and privateKey",
            );
        }
        if matches!(mode, TlsMode::Disable | TlsMode::IstioMutual)
            && (t.client_certificate.is_some()
                || t.private_key.is_some()
                || t.ca_certificates.is_some())
        {
            c.report(
                Code::InvalidValue,
                &p,
                format!("certificate files are only used with SIMPLE or MUTUAL, not {mode:?}"),
            );
        }
        if t.insecure_skip_verify == Some(true) && t.ca_certificates.is_some() {
            // Istio refuses it: which one wins is not what either says.
            c.report_hint(
                Code::InvalidValue,
                &format!("{p}.insecureSkipVerify"),
                "`insecureSkipVerify: true` cannot be set with `caCertificates`",
                "remove `insecureSkipVerify` to verify the server against caCertificates",
            );
        }
    }
}

/// `*x` (a wildcard that is not a whole leading label): the rest, `x`.
pub(crate) fn partial_wildcard(h: &str) -> Option<&str> {
    h.strip_prefix('*')
        .filter(|rest| !rest.is_empty() && !rest.starts_with('.'))
}

fn service_entry(c: &mut Check<'_>, s: &ServiceEntrySpec) {
    if s.hosts.is_empty() {
        c.report(
            Code::MissingField,
            "spec.hosts",
            "a ServiceEntry needs at least one host",
        );
    }
    for (i, h) in s.hosts.iter().enumerate() {
        match partial_wildcard(h) {
            // Istio accepts `*x`; the gateways match only whole labels
            // (`*.x`), so compile leaves the host out, and says so here.
            Some(rest) if syntax::check_host(rest, false).is_ok() => c.not_enforced(
                &format!("spec.hosts[{i}]"),
                &format!("partial wildcard host `{h}`"),
                "the gateways match `*.` wildcards only; this host is left out",
            ),
            _ => c.host(&format!("spec.hosts[{i}]"), h, false),
        }
    }
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = a.split_once('/').map_or(a.as_str(), |(ip, _)| ip);
        if ip.parse::<std::net::IpAddr>().is_err() {
            c.report(
                Code::InvalidValue,
                &format!("spec.addresses[{i}]"),
                format!("`{a}` is not an IP address or CIDR"),
            );
        }
    }
    if s.ports.is_empty() {
        // Istio accepts it (the entry then only adds a name); meshfed
        // routes a ServiceEntry by its ports, so it carries nothing.
        c.not_enforced(
            "spec.ports",
            "a ServiceEntry without ports",
            "the gateways route a ServiceEntry by its ports; list them to carry traffic",
        );
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        match p.number {
            None => c.report(
                Code::MissingField,
                &format!("{pp}.number"),
                "port number is required",
            ),
            n => c.port(&format!("{pp}.number"), n),
        }
        c.port(&format!("{pp}.targetPort"), p.target_port);
        if let Some(proto) = &p.protocol {
            // Istio's protocol names, read case-insensitively as Istio does.
            // MONGO, REDIS, MYSQL and THRIFT are carried as opaque TCP, as
            // Istio's proxies do unless a protocol filter is enabled.
            const PROTOCOLS: &[&str] = &[
                "HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS",
                "MYSQL", "THRIFT", "UDP",
            ];
            let upper = proto.to_ascii_uppercase();
            if !PROTOCOLS.contains(&upper.as_str()) {
                c.report(
                    Code::InvalidValue,
                    &format!("{pp}.protocol"),
                    format!("protocol `{proto}` is not one of {}", PROTOCOLS.join(", ")),
                );
            } else if upper == "UDP" {
                c.not_enforced(
                    &format!("{pp}.protocol"),
                    "protocol: UDP",
                    "the gateways carry TCP streams only; UDP to this port is not forwarded",
                );
            }
        }
        if let Some(n) = p.number
            && !numbers.insert(n)
        {
            c.report(
                Code::InvalidValue,
                &format!("{pp}.number"),
                format!("port number {n} is used twice (Istio refuses it)"),
            );
        }
        if !p.name.is_empty() && !names.insert(&p.name) {
            c.report(
                Code::InvalidValue,
                &format!("{pp}.name"),
                format!("port name `{}` is used twice", p.name),
            );
        }
    }
    let resolution = s.resolution.unwrap_or_default();
    if resolution == SeResolution::Static && s.endpoints.is_empty() && s.workload_selector.is_none()
    {
        c.report(
            Code::MissingField,
            "spec.endpoints",
            "resolution STATIC needs endpoints (or a workloadSelector)",
        );
    }
    // Istio's resolution/endpoint rules (ValidateServiceEntry).
    if s.workload_selector.is_some() && !s.endpoints.is_empty() {
        c.report(
            Code::InvalidValue,
            "spec.endpoints",
            "only one of `workloadSelector` or `endpoints` can be set",
        );
    } else if resolution == SeResolution::None && !s.endpoints.is_empty() {
        c.report_hint(
            Code::InvalidValue,
            "spec.endpoints",
            "resolution NONE (the default) cannot set endpoints",
            "set `resolution: STATIC` for IP endpoints or `DNS` for names",
        );
    } else if resolution == SeResolution::DnsRoundRobin && s.endpoints.len() > 1 {
        c.report_hint(
            Code::InvalidValue,
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN cannot have more than one endpoint",
            "use resolution DNS for several endpoints",
        );
    }
    if matches!(resolution, SeResolution::Dns | SeResolution::DnsRoundRobin) {
        for (i, a) in s.addresses.iter().enumerate() {
            if a.contains('/') {
                c.report(
                    Code::InvalidValue,
                    &format!("spec.addresses[{i}]"),
                    format!("CIDR address `{a}` is allowed only with resolution NONE or STATIC"),
                );
            }
        }
    }
    if let Some(serde_yaml::Value::Mapping(sel)) = &s.workload_selector
        && let Some(serde_yaml::Value::Mapping(labels)) = sel.get("labels")
    {
        for (k, v) in labels {
            let (k, v) = (
                k.as_str().unwrap_or_default(),
                v.as_str().unwrap_or_default(),
            );
            if k.contains('*') || v.contains('*') {
                let mut p = "spec.workloadSelector.labels".to_string();
                crate::yaml::push_key(&mut p, k);
                c.report(
                    Code::InvalidValue,
                    &p,
                    format!("`{k}: {v}`: a wildcard is not supported in a selector"),
                );
            }
        }
    }
    for (i, e) in s.endpoints.iter().enumerate() {
        let ep = format!("spec.endpoints[{i}]");
        if e.address.is_empty() {
            c.report(
                Code::MissingField,
                &format!("{ep}.address"),
                "endpoint address is required",
            );
        } else if e.address.starts_with("unix://") {
            c.report(
                Code::InvalidValue,
                &format!("{ep}.address"),
                "unix socket endpoints are not supported",
            );
        } else if resolution == SeResolution::Static
            && e.address.parse::<std::net::IpAddr>().is_err()
        {
            c.report(
                Code::InvalidValue,
                &format!("{ep}.address"),
                format!(
                    "resolution STATIC needs IP addresses; `{}` is not one (use resolution DNS)",
                    e.address
                ),
            );
        } else if e.address.parse::<std::net::IpAddr>().is_err() {
            c.lexical(
                Code::InvalidHost,
                &format!("{ep}.address"),
                syntax::check_host(&e.address, false),
            );
        }
        for (name, port) in &e.ports {
            let mut p = format!("{ep}.ports");
            crate::yaml::push_key(&mut p, name);
            c.port(&p, Some(*port));
            if !s.ports.iter().any(|sp| &sp.name == name) {
                c.report(
                    Code::InvalidValue,
                    &p,
                    format!("no port named `{name}` in spec.ports"),
                );
            }
        }
        c.labels(&format!("{ep}.labels"), &e.labels);
    }
    if s.workload_selector.is_some() {
        c.not_enforced(
            "spec.workloadSelector",
            "workloadSelector",
            "list endpoints, or use discovery",
        );
    }
    if !s.export_to.is_empty() {
        c.not_enforced(
            "spec.exportTo",
            "exportTo",
            "config visibility is federation-wide; use the `meshfed.io/clusters` annotation",
        );
    }
}

fn peer_authentication(c: &mut Check<'_>, s: &PeerAuthenticationSpec, opts: &Options) {
    if let Some(sel) = &s.selector {
        c.labels("spec.selector.matchLabels", &sel.match_labels);
    }
    let has_selector = s
        .selector
        .as_ref()
        .is_some_and(|sel| !sel.match_labels.is_empty());
    let ports = s.port_level_mtls.as_ref();
    if ports.is_some_and(BTreeMap::is_empty) {
        c.report_hint(
            Code::InvalidValue,
            "spec.portLevelMtls",
            "`portLevelMtls` must list at least one port (Istio refuses `{}`)",
            "remove it, or add `<port>: {mode: ...}`",
        );
    } else if ports.is_some() && !has_selector {
        c.report(
            Code::InvalidValue,
            "spec.portLevelMtls",
            "portLevelMtls needs a workload selector, as in Istio",
        );
    }
    for port in ports.into_iter().flat_map(BTreeMap::keys) {
        let mut p = "spec.portLevelMtls".to_string();
        crate::yaml::push_key(&mut p, &port.to_string());
        c.port(&p, Some(*port));
    }
    if has_selector && c.r.namespace == opts.root_namespace {
        c.report(
            Code::InvalidValue,
            "spec.selector",
            format!("a PeerAuthentication in the root namespace `{}` is mesh-wide and takes no selector", opts.root_namespace),
        );
    }
}

/// Istio's limit on a regex's length (RE2 programs past it are refused).
const MAX_REGEX_LEN: usize = 1024;

fn authorization_policy(c: &mut Check<'_>, s: &AuthorizationPolicySpec) {
    if let Some(v) = c.r.annotations.get(DRY_RUN_ANNOTATION)
        && v != "true"
        && v != "false"
    {
        // A typo must not enforce (or silently not enforce) a policy meant
        // to be tried out first.
        c.report_hint(
            Code::InvalidValue,
            "metadata.annotations[\"istio.io/dry-run\"]",
            format!("`istio.io/dry-run` is `{v}`; it takes \"true\" or \"false\""),
            "quote it: `istio.io/dry-run: \"true\"`",
        );
    }
    if let Some(sel) = &s.selector {
        c.labels("spec.selector.matchLabels", &sel.match_labels);
    }
    match s.action {
        Some(AuthzAction::Custom) => c.unsupported("spec.action", "action: CUSTOM", "external authorization is not available; express the rule with ALLOW or DENY"),
        Some(AuthzAction::Audit) => c.not_enforced("spec.action", "action: AUDIT", "audit policies are logged, never block, and meshfed logs every authorization decision anyway"),
        _ => {}
    }
    if s.action == Some(AuthzAction::Deny) && s.rules.is_empty() {
        // It matches nothing, so it denies nothing: almost surely not what
        // its author meant (Istio refuses it too).
        c.report_hint(
            Code::InvalidValue,
            "spec.action",
            "a DENY policy needs at least one rule; without rules it denies nothing",
            "add `rules: [{}]` to deny every request to the selected workloads",
        );
    }
    if s.provider.is_some() {
        c.unsupported(
            "spec.provider",
            "provider",
            "external authorization is not available",
        );
    }
    if s.target_ref.is_some() || !s.target_refs.is_empty() {
        c.unsupported(
            "spec.targetRef",
            "targetRef",
            "select workloads with `selector.matchLabels`",
        );
    }
    for (i, rule) in s.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        for (field, empty) in [
            ("from", rule.from.as_ref().is_some_and(Vec::is_empty)),
            ("to", rule.to.as_ref().is_some_and(Vec::is_empty)),
            ("when", rule.when.as_ref().is_some_and(Vec::is_empty)),
        ] {
            if empty {
                // Istio refuses it; read as absent it would mean "any
                // source" (or operation), the opposite of what an empty
                // list of allowed sources says.
                c.report_hint(
                    Code::InvalidValue,
                    &format!("{rp}.{field}"),
                    format!("`{field}` must not be empty (`{field}: []` would otherwise read as \"any\")"),
                    &format!("remove `{field}` to match any, or list at least one entry"),
                );
            }
        }
        for (j, f) in rule.sources().iter().enumerate() {
            let sp = format!("{rp}.from[{j}].source");
            let src = &f.source;
            for (field, v) in [
                ("requestPrincipals", &src.request_principals),
                ("notRequestPrincipals", &src.not_request_principals),
                ("ipBlocks", &src.ip_blocks),
                ("notIpBlocks", &src.not_ip_blocks),
                ("remoteIpBlocks", &src.remote_ip_blocks),
                ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ] {
                if !v.is_empty() {
                    c.unsupported(
                        &format!("{sp}.{field}"),
                        field,
                        "match callers by `principals`, `namespaces` or `when: source.cluster`",
                    );
                }
            }
            let all = [
                &src.principals,
                &src.not_principals,
                &src.request_principals,
                &src.not_request_principals,
                &src.namespaces,
                &src.not_namespaces,
                &src.service_accounts,
                &src.not_service_accounts,
                &src.trust_domains,
                &src.not_trust_domains,
                &src.ip_blocks,
                &src.not_ip_blocks,
                &src.remote_ip_blocks,
                &src.not_remote_ip_blocks,
            ];
            if all.iter().all(|v| v.is_empty()) {
                c.report(
                    Code::InvalidValue,
                    &sp,
                    "an empty source matches nothing in Istio; remove it or fill it",
                );
            }
            for (field, v) in [
                ("principals", &src.principals),
                ("notPrincipals", &src.not_principals),
                ("namespaces", &src.namespaces),
                ("notNamespaces", &src.not_namespaces),
            ] {
                for (k, x) in v.iter().enumerate() {
                    pattern(c, &format!("{sp}.{field}[{k}]"), x);
                }
            }
            for (field, v) in [
                ("serviceAccounts", &src.service_accounts),
                ("notServiceAccounts", &src.not_service_accounts),
            ] {
                for (k, x) in v.iter().enumerate() {
                    // `name` alone is the policy's own namespace (Istio's
                    // short form); compile spells it out.
                    let (ns, sa) = x.split_once('/').unwrap_or(("-", x));
                    if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                        c.report(
                            Code::InvalidValue,
                            &format!("{sp}.{field}[{k}]"),
                            format!("service account `{x}` must be `namespace/name` or `name`"),
                        );
                    }
                }
            }
            for (field, v, principals) in [
                ("trustDomains", &src.trust_domains, &src.principals),
                (
                    "notTrustDomains",
                    &src.not_trust_domains,
                    &src.not_principals,
                ),
            ] {
                trust_domains(c, &sp, field, v, principals);
            }
            let by_account =
                !src.service_accounts.is_empty() || !src.not_service_accounts.is_empty();
            let by_identity = [
                &src.principals,
                &src.not_principals,
                &src.namespaces,
                &src.not_namespaces,
            ]
            .iter()
            .any(|v| !v.is_empty());
            if by_account && by_identity {
                // Istio's CRD refuses the mix: say which identity you mean.
                c.report_hint(
                    Code::InvalidValue,
                    &sp,
                    "`serviceAccounts` cannot be set with `principals` or `namespaces` in one source",
                    "put them in separate `from` entries (any of which matches)",
                );
            }
        }
        for (j, t) in rule.operations().iter().enumerate() {
            let op = format!("{rp}.to[{j}].operation");
            let o = &t.operation;
            let all = [
                &o.hosts,
                &o.not_hosts,
                &o.ports,
                &o.not_ports,
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
            ];
            if all.iter().all(|v| v.is_empty()) {
                c.report(
                    Code::InvalidValue,
                    &op,
                    "an empty operation matches nothing in Istio; remove it or fill it",
                );
            }
            for (field, v) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                for (k, x) in v.iter().enumerate() {
                    if x.parse::<u16>().map_or(true, |p| p == 0) {
                        c.report(
                            Code::OutOfRange,
                            &format!("{op}.{field}[{k}]"),
                            format!("port `{x}` is not a number in 1..65535"),
                        );
                    }
                }
            }
            for (field, v) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                for (k, x) in v.iter().enumerate() {
                    let p = format!("{op}.{field}[{k}]");
                    match crate::path_template::parse(x) {
                        // `{*}`/`{**}`: matched as Envoy's URI template.
                        Ok(Some(_)) => continue,
                        Ok(None) => {}
                        Err(e) => {
                            c.report_hint(
                                Code::InvalidValue,
                                &p,
                                format!("path `{x}`: {e}"),
                                e.hint(),
                            );
                            continue;
                        }
                    }
                    if !(x.starts_with('/') || x.starts_with('*')) {
                        c.report(
                            Code::InvalidValue,
                            &p,
                            format!("path `{x}` must start with `/` (or be a `*` pattern)"),
                        );
                    } else {
                        pattern(c, &p, x);
                    }
                }
            }
            for (field, v) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
            ] {
                for (k, x) in v.iter().enumerate() {
                    pattern(c, &format!("{op}.{field}[{k}]"), x);
                }
            }
        }
        for (j, w) in rule.conditions().iter().enumerate() {
            let wp = format!("{rp}.when[{j}]");
            condition(c, &wp, w);
        }
    }
}

/// `trustDomains`/`notTrustDomains`: compiled to principal patterns
/// (`td` → `td/*`, `td*` → `td*`, `*` → `*`), which the gateway matches. A
/// form that has no principal pattern (`*suffix`, or beside the same
/// source's principals, which it would have to intersect) is refused: read
/// as absent, it would widen an ALLOW or narrow a DENY.
fn trust_domains(c: &mut Check<'_>, sp: &str, field: &str, v: &[String], principals: &[String]) {
    if v.is_empty() {
        return;
    }
    let pfield = if field == "trustDomains" {
        "principals"
    } else {
        "notPrincipals"
    };
    if !principals.is_empty() {
        c.unsupported(
            &format!("{sp}.{field}"),
            &format!("{field} beside {pfield}"),
            &format!("put the trust domain in the principals (`<td>/ns/<ns>/sa/<sa>`), or move `{field}` to a `from` entry of its own"),
        );
    }
    for (k, x) in v.iter().enumerate() {
        let p = format!("{sp}.{field}[{k}]");
        if x.contains('/') {
            c.report(
                Code::InvalidValue,
                &p,
                format!("trust domain `{x}` must not contain `/`"),
            );
        } else if x.len() > 1 && x.starts_with('*') {
            c.unsupported(
                &p,
                &format!("a suffix trust domain pattern (`{x}`)"),
                "name the trust domain exactly, or by prefix (`td*`)",
            );
        } else {
            pattern(c, &p, x);
        }
    }
}

/// Istio's string patterns: exact, `prefix*`, `*suffix` or `*`.
fn pattern(c: &mut Check<'_>, path: &str, x: &str) {
    if x.is_empty() {
        c.report(Code::InvalidValue, path, "empty value matches nothing");
        return;
    }
    let inner = x.strip_prefix('*').unwrap_or(x);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if inner.contains('*') || (x.starts_with('*') && x.ends_with('*') && x.len() > 1) {
        c.report(
            Code::InvalidValue,
            path,
            format!("`{x}`: a wildcard is only allowed as a whole value, a prefix (`*x`) or a suffix (`x*`)"),
        );
    }
}

fn condition(c: &mut Check<'_>, path: &str, w: &Condition) {
    let key = w.key.as_str();
    if key.is_empty() {
        c.report(
            Code::MissingField,
            &format!("{path}.key"),
            "condition key is required",
        );
        return;
    }
    if w.values.is_empty() && w.not_values.is_empty() {
        c.report(
            Code::MissingField,
            path,
            "a condition needs `values` or `notValues`",
        );
    }
    for (field, v) in [("values", &w.values), ("notValues", &w.not_values)] {
        for (k, x) in v.iter().enumerate() {
            if x.is_empty() {
                c.report(
                    Code::InvalidValue,
                    &format!("{path}.{field}[{k}]"),
                    "empty value not allowed (Istio refuses it)",
                );
            }
        }
    }
    let header = key
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'));
    if let Some(h) = header {
        let kp = format!("{path}.key");
        match h.to_ascii_lowercase().as_str() {
            // Envoy's pseudo-headers: the authority (the `Host` of an
            // HTTP/1.1 request) and the method, as the request reaches the
            // destination.
            ":authority" | ":method" => {}
            ":path" => c.unsupported(
                &kp,
                key,
                "match the path with `to.operation.paths`/`notPaths` (the normalized path, \
                 without the query)",
            ),
            ":scheme" => c.unsupported(
                &kp,
                key,
                "the scheme is not carried to the destination gateway; match on ports or \
                 `connection.sni`",
            ),
            n if n.starts_with(':') => c.report_hint(
                Code::InvalidValue,
                &kp,
                format!("`{h}` is not a request pseudo-header"),
                "pseudo-headers are `:authority`, `:method`, `:path` and `:scheme`",
            ),
            n => c.lexical(Code::InvalidValue, &kp, syntax::check_header_name(n)),
        }
    } else if WHEN_UNSUPPORTED
        .iter()
        .any(|u| key == *u || (u.ends_with('.') && key.starts_with(u)))
    {
        c.unsupported(&format!("{path}.key"), key, "match on source.principal, source.namespace, source.cluster, request.headers[...], destination.port or connection.sni");
    } else if !WHEN_KEYS.contains(&key) {
        let hint = crate::load::closest(key, WHEN_KEYS)
            .map(|s| format!("did you mean `{s}`?"))
            .unwrap_or_else(|| {
                format!(
                    "known keys: {}, request.headers[<name>]",
                    WHEN_KEYS.join(", ")
                )
            });
        c.report_hint(
            Code::InvalidValue,
            &format!("{path}.key"),
            format!("unknown condition key `{key}`"),
            &hint,
        );
    } else if key == "destination.port" {
        for (k, v) in w.values.iter().chain(&w.not_values).enumerate() {
            if v.parse::<u16>().map_or(true, |p| p == 0) {
                c.report(
                    Code::OutOfRange,
                    &format!("{path}.values[{k}]"),
                    format!("port `{v}` is not a number in 1..65535"),
                );
            }
        }
    }
}
