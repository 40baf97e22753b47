//! Diagnostics: what is wrong, where, and what to try.
//!
//! Every problem the engine finds becomes a [`Diagnostic`] with a stable
//! [`Code`], a file, a 1-based line and column, and the field path inside the
//! resource. The text form is the one compilers use, so editors and CI log
//! viewers link it:
//!
//! ```text
//! reviews.yaml:14:11: error[weights-sum]: route weights sum to 90, not 100 (at spec.http[1].route)
//! ```
//!
//! The codes are documented in docs/policy-reference.md, which a test keeps in
//! sync with [`Code::ALL`].

use std::fmt;

use serde::Serialize;

/// How bad a diagnostic is. Errors make a policy invalid; warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

macro_rules! codes {
    ($($variant:ident = $name:literal, $sev:ident, $doc:literal;)*) => {
        /// A stable diagnostic code. The names never change meaning; new ones
        /// may be added.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code { $(#[doc = $doc] $variant,)* }

        impl Code {
            /// Every code, in documentation order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as printed: `error[<this>]`.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// The severity this code always has.
            pub fn severity(self) -> Severity {
                match self { $(Code::$variant => Severity::$sev,)* }
            }

            /// One line on what the code means.
            pub fn summary(self) -> &'static str {
                match self { $(Code::$variant => $doc,)* }
            }
        }
    };
}

codes! {
    // Input
    Io = "io", Error, "A file or directory could not be read.";
    TooLarge = "file-too-large", Error, "A file is larger than the loader's limit (8 MiB).";
    NotText = "not-text", Error, "A file is not UTF-8 text, or holds NUL bytes (a binary file?).";
    YamlSyntax = "yaml-syntax", Error, "A document is not valid YAML.";
    YamlLimit = "yaml-limit", Error, "A document nests deeper than 64 levels, or a commit's files together expand to more than 600,000 nodes through aliases, counting 32 bytes of text as a node (an alias bomb).";
    DuplicateKey = "duplicate-key", Error, "A mapping has the same key twice; YAML forbids it and tools disagree on which wins.";
    // Schema
    NotAResource = "not-a-resource", Error, "A document is not a mapping with `apiVersion` and `kind`.";
    UnknownKind = "unknown-kind", Error, "A kind or version inside a mesh API group (networking.istio.io, security.istio.io, multicluster.x-k8s.io, meshfed.io) that meshfed does not know.";
    Foreign = "foreign-resource", Warning, "A manifest outside the mesh API groups (a Deployment, a ConfigMap...) is skipped.";
    ProxyKind = "istio-proxy-kind", Warning, "An Istio kind that Istio's own proxies enforce (Gateway, Sidecar, EnvoyFilter, WorkloadEntry, WorkloadGroup, ProxyConfig, RequestAuthentication, Telemetry, WasmPlugin), or a VirtualService bound only to Istio gateways (no `mesh`), is skipped: meshfed does not apply it. `meshfed-policy validate --strict-kinds` makes it an error.";
    UnknownField = "unknown-field", Error, "A field that the kind does not have; usually a typo or a wrong indentation.";
    InvalidType = "invalid-type", Error, "A field has the wrong type, an unknown enum value, or is missing while required.";
    MissingField = "missing-field", Error, "A required field is absent or empty.";
    // Values
    InvalidName = "invalid-name", Error, "A name, namespace, label or annotation is not a valid Kubernetes name.";
    InvalidHost = "invalid-host", Error, "A host is not a valid DNS name or `*.`-wildcard.";
    InvalidDuration = "invalid-duration", Error, "A duration is not like `250ms`, `1.5s`, `2m` or `1h30m`, or is out of range.";
    InvalidPercent = "invalid-percent", Error, "A percentage is outside 0..100.";
    OutOfRange = "out-of-range", Error, "A number is outside its allowed range (ports 1..65535, status codes 200..599...).";
    InvalidRegex = "invalid-regex", Error, "A regex does not compile (meshfed uses the Rust `regex` crate, RE2 syntax, anchored as in Istio), or is longer than 1,024 bytes (Istio's limit).";
    StringMatchOneOf = "string-match-one-of", Error, "A StringMatch must have exactly one of `exact`, `prefix` or `regex`.";
    InvalidValue = "invalid-value", Error, "A value is malformed: a retryOn policy, a header name, a principal, a path pattern, an authorization condition...";
    InvalidAddress = "invalid-address", Error, "A Cluster gateway address is not `host:port`.";
    Unsupported = "unsupported-field", Error, "A valid Istio field that meshfed does not enforce and that affects security, so the policy fails closed (requestPrincipals, ipBlocks, CUSTOM actions...).";
    NotEnforced = "not-enforced", Warning, "A valid Istio field that meshfed does not enforce; it does not affect security, so it is ignored.";
    Ambiguous = "ambiguous-host", Warning, "A host looks like a short name with a namespace (`reviews.default`); Istio takes it as a fully qualified name.";
    // Federation
    WeightsSum = "weights-sum", Error, "A route with several destinations has weights that do not sum to 100.";
    UnknownSubset = "unknown-subset", Error, "A route names a subset that no DestinationRule for that host defines (for a cluster that the route applies to).";
    UnknownCluster = "unknown-cluster", Error, "A cluster is referenced (subset label `topology.istio.io/cluster`, annotation `meshfed.io/clusters`) but no `Cluster` declares it.";
    DuplicateResource = "duplicate-resource", Error, "Two resources have the same kind, namespace and name.";
    DuplicateSubset = "duplicate-subset", Error, "A DestinationRule defines the same subset name twice.";
    DuplicateAddress = "duplicate-address", Error, "Two clusters list the same gateway address.";
    Conflict = "conflict", Error, "Two resources claim the same thing for one cluster (two VirtualServices for a host, two DestinationRules for a host, two mesh-wide PeerAuthentications); Istio picks one silently, meshfed refuses.";
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One problem, with its place.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    /// Dotted path of the field inside the resource; empty for file-level
    /// problems.
    pub field_path: String,
    /// `Kind namespace/name` of the resource, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// What to try, when there is something better to say than the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A diagnostic at a file position, with the code's severity.
    pub fn new(code: Code, file: &str, pos: crate::yaml::Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_string(),
            line: pos.line,
            column: pos.column,
            severity: code.severity(),
            code,
            message: message.into(),
            field_path: String::new(),
            resource: None,
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}[{}]: {}",
            self.file, self.line, self.column, self.severity, self.code, self.message
        )?;
        if !self.field_path.is_empty() {
            write!(f, " (at {})", self.field_path)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  = hint: {hint}")?;
        }
        Ok(())
    }
}

/// Whether any diagnostic is an error.
pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(Diagnostic::is_error)
}

/// The code reference, as docs/policy-reference.md holds it.
pub fn codes_markdown() -> String {
    let mut s = String::from(
        "# Policy diagnostic codes\n\n\
         Generated by `meshfed-policy codes --format markdown`; a test keeps this file in sync.\n\n\
         Every diagnostic prints as `FILE:LINE:COL: SEVERITY[CODE]: message (at field.path)`.\n\
         Codes are stable: a code never changes meaning.\n\n\
         | code | severity | meaning |\n|---|---|---|\n",
    );
    for c in Code::ALL {
        s.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.as_str(),
            c.severity(),
            c.summary()
        ));
    }
    s
}
