//! `security.istio.io` kinds: PeerAuthentication and AuthorizationPolicy.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    pub mode: Option<MtlsMode>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// `None` when absent; `Some({})` is refused, as Istio's CRD does.
    #[serde(default, deserialize_with = "port_keys")]
    pub port_level_mtls: Option<BTreeMap<u32, MutualTls>>,
}

/// Port-keyed maps: a key may be written `8080:` or quoted `"8080":` (as
/// `kubectl get -o yaml` writes it); both mean port 8080.
fn port_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<u32, MutualTls>>, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
    #[serde(untagged)]
    enum Key {
        Number(u64),
        Text(String),
    }
    let raw = Option::<BTreeMap<Key, MutualTls>>::deserialize(d)?;
    let Some(raw) = raw else { return Ok(None) };
    let mut out = BTreeMap::new();
    for (k, v) in raw {
        let port = match &k {
            Key::Number(n) => u32::try_from(*n).ok(),
            Key::Text(s) => s.parse::<u32>().ok(),
        };
        let Some(port) = port else {
            let shown = match k {
                Key::Number(n) => n.to_string(),
                Key::Text(s) => s,
            };
            return Err(D::Error::custom(format!(
                "port key `{shown}` is not a port number"
            )));
        };
        if out.insert(port, v).is_some() {
            return Err(D::Error::custom(format!("port {port} is listed twice")));
        }
    }
    Ok(Some(out))
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<Value>,
    #[serde(default)]
    pub target_refs: Vec<Value>,
    /// Absent `rules` and `rules: []` differ in Istio only for ALLOW with no
    /// rules (matches nothing), which both spellings mean here too.
    #[serde(default)]
    pub rules: Vec<Rule>,
    pub action: Option<AuthzAction>,
    pub provider: Option<Value>,
}

/// An absent `from`, `to` or `when` (or `null`) matches anything; an empty
/// list (`from: []`) is refused by validation, as Istio does, rather than
/// read as "any source". Hence `Option`: the two must stay apart.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    #[serde(default)]
    pub when: Option<Vec<Condition>>,
}

impl Rule {
    /// The sources; none means any.
    pub fn sources(&self) -> &[RuleFrom] {
        self.from.as_deref().unwrap_or_default()
    }

    /// The operations; none means any.
    pub fn operations(&self) -> &[RuleTo] {
        self.to.as_deref().unwrap_or_default()
    }

    /// The conditions; none means none to hold.
    pub fn conditions(&self) -> &[Condition] {
        self.when.as_deref().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Istio 1.27+; compiled to principal patterns (`<td>/*`).
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}
