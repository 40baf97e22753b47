//! One writer of mirrors per cluster: a `coordination.k8s.io/v1` Lease, as
//! client-go's leader election and Linkerd's service mirror take one.
//!
//! Every replica runs [`run`]; the one holding the Lease
//! `meshfed-mirror-<cluster>` in the gateway's namespace writes mirrors,
//! the others only watch. The holder renews every [`RETRY_PERIOD`]; a
//! replica takes the Lease once its holder has not renewed for
//! `leaseDurationSeconds` ([`LEASE_DURATION`]) as measured on the
//! replica's own clock since it last saw the Lease change (client-go's
//! "observed time", so that clock skew between nodes does not matter). A
//! holder that cannot renew for [`RENEW_DEADLINE`] (shorter than the
//! duration) stops writing before anyone else may start. Every write is
//! an update carrying the `resourceVersion` read, so two replicas racing
//! for an expired Lease cannot both win: the API server answers the
//! second with 409 Conflict.
//!
//! It does not own what the holder writes ([`super`]).

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

/// How long a Lease stays held without renewal (client-go's default).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long a holder keeps writing without a successful renewal.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often every replica tries to acquire or renew.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// The Lease of `cluster`'s mirror writers.
pub fn lease_name(cluster: &str) -> String {
    format!("meshfed-mirror-{cluster}")
}

/// Why one attempt to acquire or renew failed (beyond "someone else holds
/// it", which is no error).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "the gateway's ServiceAccount may not {op} Leases in namespace `{namespace}`; \
         grant get, create and update on leases.coordination.k8s.io there \
         (deploy/base/rbac.yaml, Role meshfed-gateway-mirror-lease): {source}"
    )]
    Forbidden {
        op: &'static str,
        namespace: String,
        source: kube::Error,
    },
    #[error("cannot {op} the mirror Lease `{namespace}/{name}`: {source}; retrying")]
    Api {
        op: &'static str,
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// What one replica knows of the Lease between attempts.
#[derive(Debug, Default)]
pub struct Elector {
    /// The resourceVersion last seen and when this replica first saw it.
    observed: Option<(String, Instant)>,
}

/// An RFC 3339 time with microseconds, as a `MicroTime` is written.
fn micro_time(t: SystemTime) -> String {
    let ms = meshfed_cli::time::rfc3339(t);
    // `...05.678Z` → `...05.678000Z`.
    match ms.strip_suffix('Z') {
        Some(head) => format!("{head}000Z"),
        None => ms,
    }
}

impl Elector {
    /// One attempt: `Ok(true)` when this replica holds the Lease after it.
    pub async fn try_acquire_or_renew(
        &mut self,
        api: &Api<Lease>,
        namespace: &str,
        name: &str,
        me: &str,
    ) -> Result<bool, LeaseError> {
        let err = |op: &'static str, e: kube::Error| match &e {
            kube::Error::Api(s) if s.code == 403 => LeaseError::Forbidden {
                op,
                namespace: namespace.to_string(),
                source: e,
            },
            _ => LeaseError::Api {
                op,
                namespace: namespace.to_string(),
                name: name.to_string(),
                source: e,
            },
        };
        let now = micro_time(SystemTime::now());
        let duration_s = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15);
        let Some(current) = api.get_opt(name).await.map_err(|e| err("get", e))? else {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "holderIdentity": me,
                    "leaseDurationSeconds": duration_s,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }))
            .map_err(|e| err("build", kube::Error::SerdeError(e)))?;
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another replica created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(err("create", e)),
            };
        };
        let rv = current.resource_version().unwrap_or_default();
        let seen_at = match &self.observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((rv.clone(), at));
                at
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        // A holder's own duration, within sane bounds (a hostile or broken
        // writer must not make it last forever).
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, |s| Duration::from_secs(s.clamp(1, 3600)));
        if !holder.is_empty() && holder != me && seen_at.elapsed() < held_for {
            return Ok(false);
        }
        let mine = holder == me;
        let mut next = current.clone();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let spec_json = json!({
            "holderIdentity": me,
            "leaseDurationSeconds": duration_s,
            "acquireTime": if mine {
                serde_json::to_value(&spec.acquire_time).unwrap_or(json!(now))
            } else {
                json!(now)
            },
            "renewTime": now,
            "leaseTransitions": if mine { transitions } else { transitions.saturating_add(1) },
        });
        next.spec = serde_json::from_value(spec_json)
            .map_err(|e| err("build", kube::Error::SerdeError(e)))?;
        match api.replace(name, &PostParams::default(), &next).await {
            Ok(written) => {
                // Our own write is the Lease's latest version.
                self.observed = Some((
                    written.resource_version().unwrap_or_default(),
                    Instant::now(),
                ));
                Ok(true)
            }
            // Renewed or taken by another replica since our read.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(err("update", e)),
        }
    }
}

/// Keeps trying to acquire or renew `namespace/name` as `me`, and says on
/// `leader` whether this replica may write. Ends when `leader` has no
/// receiver left.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    me: String,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut elector = Elector::default();
    let mut renewed: Option<Instant> = None;
    let mut failing = false;
    loop {
        if leader.is_closed() {
            return;
        }
        match elector
            .try_acquire_or_renew(&api, &namespace, &name, &me)
            .await
        {
            Ok(held) => {
                if failing {
                    tracing::info!(lease = %name, "the mirror Lease is reachable again");
                    failing = false;
                }
                renewed = held.then(Instant::now);
                set(&leader, held, &name, &me);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(lease = %name, error = %e, "cannot reach the mirror Lease");
                    failing = true;
                }
                // Keep writing only within the renew deadline.
                let still = renewed.is_some_and(|at| at.elapsed() < RENEW_DEADLINE);
                set(&leader, still, &name, &me);
            }
        }
        tokio::time::sleep(RETRY_PERIOD).await;
    }
}

fn set(leader: &watch::Sender<bool>, held: bool, name: &str, me: &str) {
    leader.send_if_modified(|cur| {
        if *cur == held {
            return false;
        }
        if held {
            tracing::info!(lease = %name, holder = %me, "this gateway holds the mirror Lease; it writes mirrors");
        } else {
            tracing::info!(lease = %name, "this gateway does not hold the mirror Lease; it only watches mirrors");
        }
        *cur = held;
        true
    });
}
