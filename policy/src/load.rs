//! From file contents to typed [`Resource`]s.
//!
//! Pure: the caller hands over (name, bytes) pairs. Each document is
//! dispatched on `apiVersion` and `kind`; mesh kinds are deserialized with
//! serde (unknown fields refused), foreign manifests and kinds that Istio's
//! own proxies enforce ([`crate::model::PROXY_KINDS`]) are skipped with a
//! warning, and every failure becomes a [`Diagnostic`] placed with the
//! document's position index. A bad document never stops the others.
//!
//! A Kubernetes `v1` `List` (what `kubectl get … -o yaml` prints) is
//! unpacked as `kubectl apply` does: each of its `items` loads as if it
//! were a document of its own, with positions inside the List. A List
//! inside a List is an error, so nothing in it can go unenforced.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::diag::{self, Code, Diagnostic};
use crate::model::{Kind, MESH_GROUPS, Manifest, Origin, PROXY_KINDS, Resource, Spec};
use crate::yaml::{self, Document, Pos, Positions, YamlError};

/// Default namespace for namespaced resources that do not name one, as
/// `kubectl apply` would pick.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What loading a set of files produced.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Resource>,
    pub diagnostics: Vec<Diagnostic>,
    /// Whether some document of a mesh kind, or of unknown kind, failed to
    /// load. Cross-resource references are then not checked, since a missing
    /// DestinationRule or Cluster would make every reference to it look
    /// wrong (a cascade of false errors).
    pub incomplete: bool,
    /// The YAML node budget of the commit, shared by all of its files.
    pub budget: yaml::NodeBudget,
}

/// Loads every resource from one file's bytes.
pub fn load_file(file: &str, bytes: &[u8], out: &mut Loaded) {
    let loaded = yaml::load_bytes_within(bytes, &mut out.budget);
    for (_, err) in &loaded.errors {
        out.diagnostics.push(yaml_diagnostic(file, err));
        out.incomplete = true;
    }
    let file: Arc<str> = Arc::from(file);
    for doc in loaded.documents {
        if is_list(&doc.value) {
            for (i, item) in list_items(&file, doc, &mut out.diagnostics)
                .into_iter()
                .enumerate()
            {
                load_one(&file, item, Some(i), out);
            }
        } else {
            load_one(&file, doc, None, out);
        }
    }
}

/// Loads one document, or one item of a List (`item`: its index).
fn load_one(file: &Arc<str>, doc: Document, item: Option<usize>, out: &mut Loaded) {
    let before = out.diagnostics.len();
    match load_document(file, doc, item, &mut out.diagnostics) {
        Some(r) => out.resources.push(r),
        None => {
            if diag::has_errors(&out.diagnostics[before..]) {
                out.incomplete = true;
            }
        }
    }
}

/// Whether a document is a Kubernetes `v1` `List`: what `kubectl get … -o
/// yaml` prints for several objects. `kubectl apply` unpacks it, so its
/// items are policy like any other document (an AuthorizationPolicy in a
/// List must be enforced, not skipped).
fn is_list(value: &Value) -> bool {
    str_field(value, "kind") == Some("List") && str_field(value, "apiVersion") == Some("v1")
}

/// The items of a `List` as documents of their own, each with its slice of
/// the position index, so that diagnostics point into the List. A List's
/// only fields are `apiVersion`, `kind`, `metadata` and `items`.
fn list_items(file: &str, doc: Document, diags: &mut Vec<Diagnostic>) -> Vec<Document> {
    let Document {
        index,
        value,
        positions,
    } = doc;
    let Value::Mapping(mut map) = value else {
        return Vec::new();
    };
    for key in map.keys() {
        let name = key.as_str().unwrap_or_default();
        if !matches!(name, "apiVersion" | "kind" | "metadata" | "items") {
            let mut path = String::new();
            yaml::push_key(&mut path, name);
            let mut d = Diagnostic::new(
                Code::UnknownField,
                file,
                positions.lookup(&path),
                format!("unknown field `{name}` in a List"),
            )
            .with_hint("a List holds `apiVersion: v1`, `kind: List`, `metadata` and `items`");
            d.field_path = path;
            diags.push(d);
        }
    }
    let items = match map.remove("items") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items,
        Some(_) => {
            let mut d = Diagnostic::new(
                Code::InvalidType,
                file,
                positions.lookup("items"),
                "a List's `items` must be a sequence of resources",
            );
            d.field_path = "items".into();
            diags.push(d);
            return Vec::new();
        }
    };
    let split = positions.split_sequence("items", items.len());
    items
        .into_iter()
        .zip(split)
        .map(|(value, positions)| Document {
            index,
            value,
            positions,
        })
        .collect()
}

fn yaml_diagnostic(file: &str, err: &YamlError) -> Diagnostic {
    let code = match err {
        YamlError::TooLarge { .. } => Code::TooLarge,
        YamlError::NotUtf8 { .. } => Code::NotText,
        YamlError::Syntax { .. }
        | YamlError::ComplexKey { .. }
        | YamlError::UnknownAnchor { .. } => Code::YamlSyntax,
        YamlError::TooDeep { .. } | YamlError::TooManyNodes { .. } => Code::YamlLimit,
        YamlError::DuplicateKey { .. } => Code::DuplicateKey,
    };
    let d = Diagnostic::new(code, file, err.pos(), err.to_string());
    match err {
        YamlError::TooLarge { .. } => {
            d.with_hint("split the file, or exclude it with --exclude if it is not mesh policy")
        }
        YamlError::NotUtf8 { .. } => d.with_hint("exclude binary files with --exclude"),
        _ => d,
    }
}

fn str_field<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

fn load_document(
    file: &Arc<str>,
    doc: Document,
    item: Option<usize>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Resource> {
    let Document {
        index,
        value,
        positions,
    } = doc;
    let at = |path: &str| positions.lookup(path);
    let what = match item {
        Some(i) => format!("item {i} of the List in document {}", index + 1),
        None => format!("document {}", index + 1),
    };
    if value.is_null() {
        if item.is_some() {
            diags.push(Diagnostic::new(
                Code::NotAResource,
                file,
                positions.start,
                format!("{what} is empty"),
            ));
        }
        return None; // an empty document, e.g. a trailing `---`
    }
    if !value.is_mapping() {
        diags.push(Diagnostic::new(
            Code::NotAResource,
            file,
            positions.start,
            format!("{what} is not a mapping"),
        ));
        return None;
    }
    let (Some(api_version), Some(kind)) = (
        str_field(&value, "apiVersion").map(str::to_string),
        str_field(&value, "kind").map(str::to_string),
    ) else {
        let missing = if str_field(&value, "apiVersion").is_none() {
            "apiVersion"
        } else {
            "kind"
        };
        let mut d = Diagnostic::new(
            Code::NotAResource,
            file,
            at(missing),
            format!("{what} has no string `{missing}`"),
        );
        d.field_path = missing.to_string();
        diags.push(d);
        return None;
    };
    if item.is_some() && kind == "List" && api_version == "v1" {
        // kubectl unpacks one level; a List in a List is refused rather
        // than skipped, so that nothing inside it goes unenforced.
        diags.push(Diagnostic::new(
            Code::NotAResource,
            file,
            at("kind"),
            "a List inside a List is not supported; put its items in the outer List",
        ));
        return None;
    }
    let (group, version) = api_version
        .rsplit_once('/')
        .unwrap_or(("", api_version.as_str()));
    if PROXY_KINDS
        .iter()
        .any(|(g, kinds)| *g == group && kinds.contains(&kind.as_str()))
    {
        let name = value
            .get("metadata")
            .and_then(|m| str_field(m, "name"))
            .unwrap_or("<unnamed>");
        let mut d = Diagnostic::new(
            Code::ProxyKind,
            file,
            at("kind"),
            format!(
                "skipping {kind} {name} ({api_version}): enforced by Istio's proxies; meshfed does not apply it"
            ),
        );
        d.field_path = "kind".into();
        diags.push(d);
        return None;
    }
    let Some((_, versions, kinds)) = MESH_GROUPS.iter().find(|(g, _, _)| *g == group) else {
        let name = value
            .get("metadata")
            .and_then(|m| str_field(m, "name"))
            .unwrap_or("<unnamed>");
        diags.push(Diagnostic::new(
            Code::Foreign,
            file,
            at("kind"),
            format!("skipping {kind} {name} ({api_version}): not mesh policy"),
        ));
        return None;
    };
    let known_kind = kinds.iter().copied().find(|k| k.as_str() == kind);
    let problem = match known_kind {
        None => Some(format!(
            "unknown kind `{kind}` in {group}; meshfed reads {}",
            kinds
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(_) if !versions.contains(&version) => Some(format!(
            "unknown version `{api_version}` for {kind}; meshfed reads {}",
            versions
                .iter()
                .map(|v| format!("{group}/{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(_) => None,
    };
    let (Some(kind), None) = (known_kind, &problem) else {
        let mut d = Diagnostic::new(
            Code::UnknownKind,
            file,
            at(if known_kind.is_some() {
                "apiVersion"
            } else {
                "kind"
            }),
            problem.unwrap_or_default(),
        );
        d.field_path = "kind".into();
        diags.push(d);
        return None;
    };

    let positions = Arc::new(positions);
    let origin = Origin {
        file: file.clone(),
        document: index,
        positions: positions.clone(),
    };
    let loaded = match kind {
        Kind::Cluster => typed(value, &origin, diags).map(|(m, s)| (m, Spec::Cluster(s))),
        Kind::ServiceExport => {
            typed(value, &origin, diags).map(|(m, s)| (m, Spec::ServiceExport(s)))
        }
        Kind::ServiceEntry => typed(value, &origin, diags).map(|(m, s)| (m, Spec::ServiceEntry(s))),
        Kind::DestinationRule => {
            typed(value, &origin, diags).map(|(m, s)| (m, Spec::DestinationRule(s)))
        }
        Kind::VirtualService => {
            typed(value, &origin, diags).map(|(m, s)| (m, Spec::VirtualService(s)))
        }
        Kind::PeerAuthentication => {
            typed(value, &origin, diags).map(|(m, s)| (m, Spec::PeerAuthentication(s)))
        }
        Kind::AuthorizationPolicy => {
            typed(value, &origin, diags).map(|(m, s)| (m, Spec::AuthorizationPolicy(s)))
        }
        Kind::RolloutPolicy => {
            typed(value, &origin, diags).map(|(m, s)| (m, Spec::RolloutPolicy(s)))
        }
    };
    let (meta, spec) = loaded?;
    let namespace = if kind.namespaced() {
        meta.namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
    } else {
        if meta.namespace.is_some() {
            let mut d = Diagnostic::new(
                Code::InvalidValue,
                file,
                positions.lookup("metadata.namespace"),
                format!("{kind} is cluster-scoped and takes no namespace"),
            );
            d.field_path = "metadata.namespace".into();
            diags.push(d);
        }
        String::new()
    };
    Some(Resource {
        kind,
        api_version: api_version.to_string(),
        name: meta.name,
        namespace,
        labels: meta.labels,
        annotations: meta.annotations,
        spec,
        origin,
    })
}

/// Deserializes a manifest. On failure, reports serde's first error at the
/// field path where it happened.
fn typed<S: DeserializeOwned + Default>(
    value: Value,
    origin: &Origin,
    diags: &mut Vec<Diagnostic>,
) -> Option<(crate::model::ObjectMeta, S)> {
    match serde_path_to_error::deserialize::<_, Manifest<S>>(value) {
        Ok(m) => Some((m.metadata, m.spec.unwrap_or_default())),
        Err(e) => {
            let path = render_path(e.path());
            diags.push(schema_diagnostic(
                &origin.file,
                &origin.positions,
                &path,
                e.inner(),
            ));
            None
        }
    }
}

/// Renders a serde_path_to_error path in the same syntax as the position
/// index.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => yaml::push_index(&mut out, *index),
            Segment::Map { key } | Segment::Enum { variant: key } => yaml::push_key(&mut out, key),
            Segment::Unknown => {}
        }
    }
    out
}

fn schema_diagnostic(
    file: &str,
    positions: &Positions,
    path: &str,
    err: &serde_yaml::Error,
) -> Diagnostic {
    let msg = err.to_string();
    // serde's messages: "unknown field `x`, expected one of `a`, `b`",
    // "missing field `x`", "invalid type: ...", "unknown variant `X`, ...".
    let (code, message, hint) = if let Some(rest) = msg.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest
            .split("expected one of ")
            .nth(1)
            .or_else(|| rest.split("expected ").nth(1))
            .map(|s| s.split(", ").map(|x| x.trim_matches('`')).collect())
            .unwrap_or_default();
        let hint = closest(field, &expected).map(|s| format!("did you mean `{s}`?"));
        (Code::UnknownField, format!("unknown field `{field}`"), hint)
    } else if msg.starts_with("missing field") {
        (Code::MissingField, msg.clone(), None)
    } else if msg.contains("expected a string") && msg.starts_with("invalid type: integer") {
        let hint = "a duration needs a unit, like `5s` or `250ms`; any other value: quote it";
        (Code::InvalidType, msg.clone(), Some(hint.to_string()))
    } else {
        (Code::InvalidType, msg.clone(), None)
    };
    let pos = field_pos(positions, path, code, &msg);
    let mut d = Diagnostic::new(code, file, pos, message);
    d.field_path = path.to_string();
    d.hint = hint;
    d
}

/// For an unknown field, serde's path ends at the parent mapping; point at
/// the field itself when the document has it.
fn field_pos(positions: &Positions, path: &str, code: Code, msg: &str) -> Pos {
    if code == Code::UnknownField
        && let Some(field) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
    {
        let mut p = path.to_string();
        yaml::push_key(&mut p, field);
        if positions.contains(&p) {
            return positions.lookup(&p);
        }
    }
    positions.lookup(path)
}

/// The candidate closest to `word`, if close enough to be a likely typo.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| {
            (
                strsim::jaro_winkler(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                *c,
            )
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
