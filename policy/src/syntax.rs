//! Lexical rules for the values users write: durations, percentages,
//! Kubernetes names and labels, DNS hosts, `host:port` addresses, header
//! names. Each check returns `Err(reason)` with a message fit for a
//! diagnostic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Parses a duration as Istio accepts it: a sequence of decimal numbers with
/// units, like `250ms`, `1.5s`, `2m`, `1h30m`. Units: `ns`, `us` (`µs`),
/// `ms`, `s`, `m`, `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.starts_with('-') {
        return Err(format!("duration `{s}` is negative"));
    }
    let mut rest = t;
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!(
                "duration `{s}` must be numbers with units, like `250ms`, `1.5s` or `1m30s`"
            ));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("duration `{s}` has a malformed number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => {
                return Err(format!(
                    "duration `{s}` has no unit; write e.g. `{}s`",
                    &t[..num_len.min(t.len())]
                ));
            }
            u => {
                return Err(format!(
                    "duration `{s}` has unknown unit `{u}`; use ns, us, ms, s, m or h"
                ));
            }
        };
        total_ns += number * scale;
        rest = &rest[unit_len..];
    }
    // Cap at ten years: anything longer is a typo, and it keeps the
    // arithmetic exact in u64 nanoseconds.
    if !total_ns.is_finite() || total_ns > 10.0 * 365.0 * 86400e9 {
        return Err(format!("duration `{s}` is out of range"));
    }
    Ok(Duration::from_nanos(total_ns.round() as u64))
}

/// Percentages are 0..=100.
pub fn check_percent(v: f64) -> Result<(), String> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("percentage {v} is outside 0..100"))
    }
}

/// Why `s` is not a DNS-1123 label (lowercase alphanumerics and `-`, at
/// most 63 characters, starting and ending with an alphanumeric), or `None`
/// when it is one. The one copy of the rule: the policy's names and the
/// identity crate's SPIFFE IDs (namespaces, cluster names) both use it.
pub fn dns_label_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("it is empty");
    }
    if s.len() > 63 {
        return Some("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("only lowercase letters, digits and `-` are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some("it must start and end with a letter or digit");
    }
    None
}

/// Why `s` is not a DNS-1123 subdomain (dot-separated labels, at most 253
/// characters), or `None` when it is one. Shared as [`dns_label_problem`].
pub fn dns_subdomain_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("it is empty");
    }
    if s.len() > 253 {
        return Some("it is longer than 253 characters");
    }
    if s.split('.').any(|label| dns_label_problem(label).is_some()) {
        return Some(
            "only lowercase letters, digits, `-` and `.` are allowed, and each \
             dot-separated part must start and end with a letter or digit",
        );
    }
    None
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, at most 63 characters,
/// starting and ending with an alphanumeric. Namespaces, subset and cluster
/// names use it.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    match dns_label_problem(s) {
        None => Ok(()),
        Some(_) if s.is_empty() => Err("must not be empty".into()),
        Some(_) if s.len() > 63 => Err(format!("`{s}` is longer than 63 characters")),
        Some(_) => Err(format!(
            "`{s}` is not a DNS-1123 label (lowercase letters, digits and `-`, not at either end)"
        )),
    }
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253 characters.
/// Resource names use it.
pub fn check_dns_subdomain(s: &str) -> Result<(), String> {
    match dns_subdomain_problem(s) {
        None => Ok(()),
        Some(_) if s.is_empty() => Err("must not be empty".into()),
        Some(_) if s.len() > 253 => Err(format!("`{s}` is longer than 253 characters")),
        Some(_) => Err(format!(
            "`{s}` is not a DNS-1123 subdomain (lowercase letters, digits, `-` and `.`)"
        )),
    }
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name at
/// most 63 characters of alphanumerics, `-`, `_`, `.`.
pub fn check_label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        check_dns_subdomain(p).map_err(|e| format!("label key prefix: {e}"))?;
    }
    if name.is_empty() {
        return Err(format!("label key `{s}` has an empty name"));
    }
    check_label_value(name).map_err(|_| {
        format!("label key `{s}` is not valid (at most 63 alphanumerics, `-`, `_`, `.`)")
    })
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_`, `.`,
/// starting and ending with an alphanumeric.
pub fn check_label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let ok = s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label value `{s}` is not valid (at most 63 alphanumerics, `-`, `_`, `.`, alphanumeric at both ends)"
        ))
    }
}

/// A host in a VirtualService, DestinationRule or ServiceEntry: a DNS name
/// (short names allowed), optionally starting with `*.`; `*` alone only where
/// `allow_star`.
pub fn check_host(s: &str, allow_star: bool) -> Result<(), String> {
    if s == "*" {
        return if allow_star {
            Ok(())
        } else {
            Err("`*` is not allowed here; name a host".into())
        };
    }
    let name = s.strip_prefix("*.").unwrap_or(s);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("host `{s}` is not a valid DNS name"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "host `{s}` is not a valid DNS name (a wildcard is only allowed as a leading `*.`)"
            ));
        }
    }
    Ok(())
}

/// A gateway address: `host:port`, with a DNS name, an IPv4 address or a
/// bracketed IPv6 address, and a port in 1..=65535.
pub fn check_host_port(s: &str) -> Result<(), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return if sa.port() == 0 {
            Err(format!("address `{s}` has port 0"))
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "address `{s}` has no port; write `host:port`, e.g. `{s}:15443`"
        ));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => {
            return Err(format!(
                "address `{s}` has an invalid port `{port}` (1..65535)"
            ));
        }
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "IPv6 address `{s}` needs brackets: `[{host}]:{port}`"
        ));
    }
    if host.contains('*') {
        return Err(format!("address `{s}` cannot be a wildcard"));
    }
    check_host(host, false).map_err(|_| format!("address `{s}` has an invalid host `{host}`"))
}

/// An HTTP header name: a non-empty RFC 9110 token, lowercase as in HTTP/2.
pub fn check_header_name(s: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if s.is_empty() || !s.bytes().all(token) {
        return Err(format!("`{s}` is not a valid HTTP header name"));
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "header name `{s}` must be lowercase (HTTP/2 lowercases every header name); write `{}`",
            s.to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// Why `s` is not a SPIFFE trust domain (lowercase letters, digits, `.`,
/// `-` and `_`, at most 255 bytes), or `None` when it is one. The one copy
/// of the rule: a `Cluster`'s `spec.trustDomain` and the identity crate's
/// SPIFFE IDs both use it.
pub fn trust_domain_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("it is empty")
    } else if s.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        Some("only lowercase letters, digits, `.`, `-` and `_` are allowed (no port, no user)")
    } else {
        None
    }
}

/// A trust domain, e.g. `cluster.local` or `west.example.org`.
pub fn check_trust_domain(s: &str) -> Result<(), String> {
    match trust_domain_problem(s) {
        None => Ok(()),
        Some(_) => Err(format!(
            "trust domain `{s}` must be lowercase letters, digits, `-`, `.` and `_`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_istio_forms_and_reject_others() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in [
            "",
            "10",
            "ten s",
            "5 parsecs",
            "-1s",
            "1.2.3s",
            "1x",
            "99999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn host_port_needs_a_port_and_a_valid_host() {
        for good in [
            "gw.west.example.com:15443",
            "10.0.2.10:15443",
            "[::1]:15443",
            "gw:1",
        ] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        for bad in [
            "gw.west",
            "gw:0",
            "gw:70000",
            "::1:15443",
            "*.x:1",
            "bad host:1",
            ":15443",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_allow_short_names_and_leading_wildcards_only() {
        for good in [
            "reviews",
            "reviews.default.svc.cluster.local",
            "*.example.com",
        ] {
            assert!(check_host(good, false).is_ok(), "{good}");
        }
        for bad in ["", "a..b", "foo.*.com", "-a.com", "*"] {
            assert!(check_host(bad, false).is_err(), "{bad}");
        }
        assert!(check_host("*", true).is_ok());
    }

    #[test]
    fn labels_follow_kubernetes_syntax() {
        assert!(check_label_key("topology.istio.io/cluster").is_ok());
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("Bad/Key").is_err());
        assert!(check_label_key("a/").is_err());
        assert!(check_label_value("v1").is_ok());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("-v1").is_err());
        assert!(check_label_value(&"x".repeat(64)).is_err());
    }

    #[test]
    fn names_follow_dns_1123() {
        assert!(check_dns_label("east-1").is_ok());
        assert!(check_dns_label("East").is_err());
        assert!(check_dns_label("-east").is_err());
        assert!(check_dns_subdomain("reviews.v2").is_ok());
        assert!(check_dns_subdomain("reviews..v2").is_err());
    }

    #[test]
    fn header_names_are_lowercase_tokens() {
        assert!(check_header_name("user-agent").is_ok());
        assert!(check_header_name("User-Agent").is_err());
        assert!(check_header_name("bad header").is_err());
    }

    #[test]
    fn percent_is_bounded() {
        assert!(check_percent(0.0).is_ok());
        assert!(check_percent(100.0).is_ok());
        assert!(check_percent(100.1).is_err());
        assert!(check_percent(f64::NAN).is_err());
    }
}
