//! meshfed's policy engine: Istio-style mesh policy from a Git repository →
//! validated → one immutable [`Snapshot`] per cluster.
//!
//! The core is pure: no I/O, no clock, no threads. [`analyze`] takes file
//! names and bytes, and returns the typed resources and every diagnostic.
//! [`Analysis::compile`] turns a valid analysis into a cluster's snapshot. The
//! syncer, the gateway and the `meshfed-policy` CLI all call these functions;
//! none of them re-implements a rule.
//!
//! Modules, in pipeline order:
//! - [`fs`]: the thin shell that finds and reads files (the only I/O);
//! - [`yaml`]: bounded, position-aware YAML parsing;
//! - [`load`]: documents → typed [`model`] resources;
//! - [`validate`]: per-resource and federation-wide rules;
//! - [`compile`]: resources → [`snapshot::Snapshot`];
//! - [`diag`]: diagnostics and their stable codes;
//! - [`diff`]: the effective change between two compiled snapshots, per
//!   cluster (`meshfed-policy diff`);
//! - [`locality`]: the order in which a cluster tries the clusters that
//!   serve a service (shared by the gateway and [`diff`]);
//! - `git` (feature `git`, on by default): the policy files of a Git
//!   commit, bounded (shared by the syncer and `meshfed-policy diff`);
//! - [`rollout`]: the `RolloutPolicy` resolved into waves and gates
//!   (the syncer runs it);
//! - [`path_template`]: AuthorizationPolicy path templates (`{*}`, `{**}`),
//!   parsed for validation and matched by the gateway.

#![forbid(unsafe_code)]

pub mod compile;
pub mod diag;
pub mod diff;
pub mod fs;
#[cfg(feature = "git")]
pub mod git;
pub mod load;
pub mod locality;
pub mod model;
pub mod path_template;
pub mod rollout;
pub mod snapshot;
pub mod syntax;
pub mod validate;
pub mod yaml;

use std::collections::BTreeSet;

pub use diag::{Code, Diagnostic, Severity};
pub use model::Resource;
pub use snapshot::Snapshot;

/// Mesh-wide settings that are not in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// DNS suffix of in-cluster service names.
    pub domain: String,
    /// The shared trust domain of the mesh.
    pub trust_domain: String,
    /// Istio's root namespace: policies there without a selector are
    /// mesh-wide.
    pub root_namespace: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// The outcome of loading and validating a set of files.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Every resource that loaded, in file order.
    pub resources: Vec<Resource>,
    /// Every problem, sorted by file, line and column.
    pub diagnostics: Vec<Diagnostic>,
    /// How many files were read.
    pub files: usize,
}

/// Why a snapshot could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("the policy has {0} error(s); fix them first (run `meshfed-policy validate`)")]
    Invalid(usize),
    #[error("cluster `{name}` is not declared; declared clusters: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownCluster { name: String, known: Vec<String> },
}

/// Loads and validates files given as (name, bytes).
pub fn analyze<N, B>(files: impl IntoIterator<Item = (N, B)>, opts: &Options) -> Analysis
where
    N: AsRef<str>,
    B: AsRef<[u8]>,
{
    let mut loaded = load::Loaded::default();
    let mut count = 0;
    for (name, bytes) in files {
        count += 1;
        load::load_file(name.as_ref(), bytes.as_ref(), &mut loaded);
    }
    let mut a = Analysis {
        resources: loaded.resources,
        diagnostics: loaded.diagnostics,
        files: count,
    };
    let check_references = !loaded.incomplete;
    a.diagnostics
        .extend(validate::validate(&a.resources, opts, check_references));
    a.diagnostics.sort();
    a.diagnostics.dedup();
    a
}

impl Analysis {
    /// Whether there is no error (warnings are fine).
    pub fn is_valid(&self) -> bool {
        !diag::has_errors(&self.diagnostics)
    }

    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.diagnostics.len() - self.error_count()
    }

    /// The declared clusters, sorted.
    pub fn clusters(&self) -> BTreeSet<String> {
        self.resources
            .iter()
            .filter(|r| r.kind == model::Kind::Cluster)
            .map(|r| r.name.clone())
            .collect()
    }

    /// Compiles the snapshot of `cluster` at `version`. A repository that
    /// declares no cluster compiles for any name (a single-cluster mesh).
    pub fn compile(
        &self,
        cluster: &str,
        version: &str,
        opts: &Options,
    ) -> Result<Snapshot, CompileError> {
        if !self.is_valid() {
            return Err(CompileError::Invalid(self.error_count()));
        }
        let known = self.clusters();
        if !known.is_empty() && !known.contains(cluster) {
            return Err(CompileError::UnknownCluster {
                name: cluster.to_string(),
                known: known.into_iter().collect(),
            });
        }
        Ok(compile::compile(&self.resources, cluster, version, opts))
    }
}
