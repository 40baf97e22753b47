//! DNS resolution in a gateway built without the `dns` feature: IP
//! addresses only.
//!
//! The same interface as the hickory-based resolver (`dns.rs`, compiled
//! with the feature), so that its callers (the discovery file, ServiceEntry
//! endpoints, the dial of a peer gateway) need no gates of their own. An IP
//! literal (`10.0.0.1:80`, `[fd00::1]:80`) is returned as is; anything
//! else is refused with [`DnsError::NotBuilt`], which names the feature and
//! the build command. A discovery file with a host name therefore stops the
//! gateway at start, and a peer gateway named by host is reported on every
//! dial; an edge site that lists addresses runs without hickory.

use std::net::SocketAddr;
use std::time::Duration;

/// How often callers that poll ask again (as with the `dns` feature).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Why a target could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error(
        "`{target}` is a host name, and this gateway was built without the `dns` feature \
         (hickory-resolver), so it resolves no names: write an IP address (10.0.0.1:80, \
         [fd00::1]:80), or use a gateway built with it \
         (`cargo build -p meshfed-gateway --features dns`)"
    )]
    NotBuilt { target: String },
}

/// The resolver of a build without DNS: literals only.
#[derive(Debug)]
pub struct Resolver {
    _private: (),
}

impl Resolver {
    /// The process-wide resolver.
    pub fn shared() -> &'static Resolver {
        static SHARED: Resolver = Resolver { _private: () };
        &SHARED
    }

    /// The address of an IP literal `target`; a host name is refused.
    pub async fn resolve_host_port(&self, target: &str) -> Result<Vec<SocketAddr>, DnsError> {
        match target.parse::<SocketAddr>() {
            Ok(addr) => Ok(vec![addr]),
            Err(_) => Err(DnsError::NotBuilt {
                target: target.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_resolve_and_names_are_refused_naming_the_feature() {
        let r = Resolver::shared();
        assert_eq!(
            r.resolve_host_port("10.0.0.1:80").await.ok(),
            Some(vec![SocketAddr::from(([10, 0, 0, 1], 80))])
        );
        assert!(r.resolve_host_port("[fd00::1]:80").await.is_ok());
        let e = r
            .resolve_host_port("gw.west.example.com:15443")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("gw.west.example.com:15443")
                && e.contains("`dns` feature")
                && e.contains("cargo build -p meshfed-gateway --features dns"),
            "{e}"
        );
    }
}
