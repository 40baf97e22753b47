//! Position-aware, bounded YAML loading.
//!
//! serde_yaml reports positions only for its own syntax errors, and a serde
//! derive stops at the first error. So this module parses each file once with
//! a YAML event parser (yaml-rust2), and builds two things per document:
//! - a [`serde_yaml::Value`], from which the typed resources are deserialized;
//! - a [`Positions`] index from field path (`spec.http[0].route[1].weight`) to
//!   the line and column where that field starts.
//!
//! Every later stage (schema errors found by serde, semantic rules) reports a
//! field path, and the index turns it into `FILE:LINE:COL`.
//!
//! Hostile input is bounded here, before anything else sees it: file size,
//! nesting depth, node count and alias expansion all have limits, and a
//! document that breaks one is an error, never a panic, a hang or unbounded
//! memory. Documents are split at `---` lines before parsing, so that a syntax
//! error in one document does not hide the others.
//!
//! This module does no I/O: it takes text.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_yaml::{Mapping, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

/// Largest file the loader accepts, in bytes.
pub const MAX_FILE_BYTES: usize = 8 * 1024 * 1024;
/// Deepest nesting of mappings and sequences in one document. Kubernetes
/// resources rarely go past 12.
pub const MAX_DEPTH: usize = 64;
/// Most nodes one commit may produce, all of its files together
/// ([`NodeBudget`]), counting every alias expansion, and counting each
/// [`BYTES_PER_NODE`] bytes of scalar text as one more node, so that aliases
/// to long strings cannot amplify memory either.
///
/// Sized for the smallest shipped memory limit: a node costs about 120
/// bytes expanded (measured: 2,000,000 nodes peaked at 251 MB), so the
/// budget's worst case is about 70 MB, which a gateway loading
/// `--policy-dir` under its 128 MiB limit survives (tests/tests/
/// syncer_hostile.rs). Real policy is far below it: the 10,000-resource
/// federation of the validation benchmark is about 520,000 nodes.
pub const MAX_NODES: usize = 600_000;

/// What is left of one commit's node budget: every file of the commit is
/// loaded against the same one, so that many small alias bombs cost what
/// one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeBudget {
    left: usize,
}

impl Default for NodeBudget {
    /// A full budget of [`MAX_NODES`].
    fn default() -> Self {
        NodeBudget { left: MAX_NODES }
    }
}

impl NodeBudget {
    /// Nodes still allowed.
    pub fn left(&self) -> usize {
        self.left
    }
}
/// Scalar text weighs one node per this many bytes in [`MAX_NODES`].
pub const BYTES_PER_NODE: usize = 32;

/// A position in a source file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

/// Field path → position of that field in one document.
///
/// For a mapping entry the position is that of its key (where a reader looks
/// for the field); for a sequence item, that of the item.
#[derive(Debug, Default, Clone)]
pub struct Positions {
    map: HashMap<String, Pos>,
    /// Where the document starts (its first node).
    pub start: Pos,
}

impl Positions {
    /// The position of `path`, or of its nearest ancestor that the document
    /// spells out (a missing field is reported at its parent).
    pub fn lookup(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.map.get(p) {
                return *pos;
            }
            match parent_path(p) {
                Some(parent) => p = parent,
                None => return self.start,
            }
        }
    }

    /// Whether the document spells out `path` itself.
    pub fn contains(&self, path: &str) -> bool {
        self.map.contains_key(path)
    }

    fn insert(&mut self, path: String, pos: Pos) {
        self.map.entry(path).or_insert(pos);
    }

    /// Splits the index of a document whose top-level `field` is a sequence
    /// into one index per item, as if each item were a document of its own
    /// (`items[2].spec.hosts[0]` becomes `spec.hosts[0]` of item 2). Used for
    /// `kind: List`. One pass over the index, whatever the number of items.
    pub fn split_sequence(&self, field: &str, count: usize) -> Vec<Positions> {
        let mut out: Vec<Positions> = (0..count)
            .map(|i| {
                let mut p = String::from(field);
                push_index(&mut p, i);
                Positions {
                    map: HashMap::new(),
                    start: self.lookup(&p),
                }
            })
            .collect();
        let prefix = format!("{field}[");
        for (path, pos) in &self.map {
            let Some(rest) = path.strip_prefix(&prefix) else {
                continue;
            };
            let Some((index, inner)) = rest.split_once(']') else {
                continue;
            };
            let Some(item) = index.parse::<usize>().ok().and_then(|i| out.get_mut(i)) else {
                continue;
            };
            let inner = inner.strip_prefix('.').unwrap_or(inner);
            if !inner.is_empty() {
                item.map.insert(inner.to_string(), *pos);
            }
        }
        out
    }
}

/// The parent of a field path, if it has one.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if let Some(inner) = path.strip_suffix("\"]") {
        // `a["x.y"]`: cut at the opening `["`.
        return inner.rfind("[\"").map(|i| &path[..i]);
    }
    if path.ends_with(']') {
        // `a[3]`: cut at the `[`.
        return path.rfind('[').map(|i| &path[..i]);
    }
    Some(path.rfind('.').map_or("", |i| &path[..i]))
}

/// Appends a mapping key to a path: `.key`, or `["key"]` when the key has
/// characters that would make the path ambiguous.
pub fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push_str("[\"");
        for c in key.chars() {
            if c == '"' || c == '\\' {
                path.push('\\');
            }
            path.push(c);
        }
        path.push_str("\"]");
    }
}

/// Appends a sequence index to a path.
pub fn push_index(path: &mut String, index: usize) {
    let _ = write!(path, "[{index}]");
}

/// One YAML document, with its value and its position index.
#[derive(Debug)]
pub struct Document {
    /// 0-based index of the document in its file.
    pub index: usize,
    /// The document's content.
    pub value: Value,
    /// Field path → position.
    pub positions: Positions,
}

/// Why a document (or a file) could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("file is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("file is not UTF-8 text (is it a binary file?)")]
    NotUtf8 { pos: Pos },
    #[error("YAML syntax error: {message}")]
    Syntax { pos: Pos, message: String },
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep { pos: Pos },
    #[error(
        "the commit's YAML expands to more than {MAX_NODES} nodes, its files together (an alias \
         bomb, or more policy than the gateways' memory limit allows); nothing of it is applied"
    )]
    TooManyNodes { pos: Pos },
    #[error("alias refers to unknown anchor")]
    UnknownAnchor { pos: Pos },
    #[error("duplicate key `{key}` (first at line {first_line})")]
    DuplicateKey {
        pos: Pos,
        key: String,
        first_line: usize,
    },
    #[error("mapping keys must be scalars")]
    ComplexKey { pos: Pos },
}

impl YamlError {
    /// Where the problem is, if known.
    pub fn pos(&self) -> Pos {
        match self {
            YamlError::TooLarge { .. } => Pos { line: 1, column: 1 },
            YamlError::NotUtf8 { pos }
            | YamlError::Syntax { pos, .. }
            | YamlError::TooDeep { pos }
            | YamlError::TooManyNodes { pos }
            | YamlError::UnknownAnchor { pos }
            | YamlError::DuplicateKey { pos, .. }
            | YamlError::ComplexKey { pos } => *pos,
        }
    }
}

/// The outcome of loading one file: the documents that loaded, and one error
/// per document that did not (with that document's index).
#[derive(Debug, Default)]
pub struct Loaded {
    pub documents: Vec<Document>,
    pub errors: Vec<(usize, YamlError)>,
}

/// Loads every document of a file from raw bytes, with a budget of its own.
pub fn load_bytes(bytes: &[u8]) -> Loaded {
    load_bytes_within(bytes, &mut NodeBudget::default())
}

/// Loads every document of a file from raw bytes against the `budget` of
/// the commit it belongs to.
pub fn load_bytes_within(bytes: &[u8], budget: &mut NodeBudget) -> Loaded {
    if bytes.len() > MAX_FILE_BYTES {
        return Loaded {
            documents: Vec::new(),
            errors: vec![(
                0,
                YamlError::TooLarge {
                    size: bytes.len(),
                    limit: MAX_FILE_BYTES,
                },
            )],
        };
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => load_str_within(text, budget),
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let column = good.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            Loaded {
                documents: Vec::new(),
                errors: vec![(
                    0,
                    YamlError::NotUtf8 {
                        pos: Pos { line, column },
                    },
                )],
            }
        }
    }
}

/// Loads every document of a file, with a budget of its own.
pub fn load_str(text: &str) -> Loaded {
    load_str_within(text, &mut NodeBudget::default())
}

/// Loads every document of a file against the `budget` of its commit. A
/// leading UTF-8 byte order mark (as some Windows editors write) is skipped,
/// as kubectl does.
pub fn load_str_within(text: &str, budget: &mut NodeBudget) -> Loaded {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Loaded::default();
    if text.len() > MAX_FILE_BYTES {
        out.errors.push((
            0,
            YamlError::TooLarge {
                size: text.len(),
                limit: MAX_FILE_BYTES,
            },
        ));
        return out;
    }
    if let Some(i) = text.find('\0') {
        let good = &text[..i];
        let line = good.matches('\n').count() + 1;
        let column = good.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        out.errors.push((
            0,
            YamlError::NotUtf8 {
                pos: Pos { line, column },
            },
        ));
        return out;
    }
    for (index, (line_offset, chunk)) in split_documents(text).into_iter().enumerate() {
        match parse_chunk(chunk, line_offset, &mut budget.left) {
            Ok(docs) => {
                for (value, positions) in docs {
                    out.documents.push(Document {
                        index,
                        value,
                        positions,
                    });
                }
            }
            Err(e) => {
                let stop = matches!(e, YamlError::TooManyNodes { .. });
                out.errors.push((index, e));
                if stop {
                    break;
                }
            }
        }
    }
    out
}

/// Splits a stream at lines that start with `---` (document markers), so
/// that each document parses on its own. Returns (lines before, text).
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let is_marker = line.starts_with("---")
            && line[3..]
                .chars()
                .next()
                .is_none_or(|c| c == ' ' || c == '\t' || c == '\r' || c == '\n');
        if is_marker && offset > start {
            chunks.push((start_line, &text[start..offset]));
            start = offset;
            start_line = line_no;
        }
        offset += line.len();
    }
    if offset > start || chunks.is_empty() {
        chunks.push((start_line, &text[start..]));
    }
    chunks
}

enum Frame {
    Map {
        map: Mapping,
        path: String,
        /// The pending key and its field path, until its value arrives.
        key: Option<(Value, String)>,
        anchor: usize,
        nodes: usize,
        height: usize,
    },
    Seq {
        seq: Vec<Value>,
        path: String,
        anchor: usize,
        nodes: usize,
        height: usize,
    },
}

struct Anchored {
    value: Value,
    nodes: usize,
    height: usize,
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    positions: Positions,
    done: Option<Value>,
    line_offset: usize,
}

impl Builder {
    fn pos(&self, m: &yaml_rust2::scanner::Marker) -> Pos {
        Pos {
            line: m.line() + self.line_offset,
            column: m.col() + 1,
        }
    }

    /// The path for the next node, and whether that node is a mapping key.
    fn next_path(&self) -> (String, bool) {
        match self.stack.last() {
            None => (String::new(), false),
            Some(Frame::Seq { seq, path, .. }) => {
                let mut p = path.clone();
                push_index(&mut p, seq.len());
                (p, false)
            }
            Some(Frame::Map { key: None, .. }) => (String::new(), true),
            Some(Frame::Map {
                key: Some((_, p)), ..
            }) => (p.clone(), false),
        }
    }

    /// Adds a finished node to its parent.
    fn attach(
        &mut self,
        value: Value,
        nodes: usize,
        height: usize,
        pos: Pos,
        anchor: usize,
    ) -> Result<(), YamlError> {
        if anchor != 0 {
            self.anchors.insert(
                anchor,
                Anchored {
                    value: value.clone(),
                    nodes,
                    height,
                },
            );
        }
        match self.stack.last_mut() {
            None => self.done = Some(value),
            Some(Frame::Seq {
                seq,
                nodes: n,
                height: h,
                ..
            }) => {
                seq.push(value);
                *n += nodes;
                *h = (*h).max(height + 1);
            }
            Some(Frame::Map {
                map,
                key,
                path,
                nodes: n,
                height: h,
                ..
            }) => match key.take() {
                None => {
                    let text = match &value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => String::new(),
                        _ => return Err(YamlError::ComplexKey { pos }),
                    };
                    let mut p = path.clone();
                    push_key(&mut p, &text);
                    if map.contains_key(&value) {
                        let first_line = self.positions.lookup(&p).line;
                        return Err(YamlError::DuplicateKey {
                            pos,
                            key: text,
                            first_line,
                        });
                    }
                    if map.is_empty() {
                        // A block mapping's start event is marked after its
                        // first key; the key's own position is where a
                        // reader sees the mapping begin.
                        if path.is_empty() {
                            self.positions.start = pos;
                        } else if path.ends_with(']') {
                            self.positions.map.insert(path.clone(), pos);
                        }
                    }
                    self.positions.insert(p.clone(), pos);
                    // Keys count too: an aliased mapping copies them.
                    *n += nodes;
                    *key = Some((value, p));
                }
                Some((k, _)) => {
                    map.insert(k, value);
                    *n += nodes;
                    *h = (*h).max(height + 1);
                }
            },
        }
        Ok(())
    }
}

fn parse_chunk(
    chunk: &str,
    line_offset: usize,
    budget: &mut usize,
) -> Result<Vec<(Value, Positions)>, YamlError> {
    let mut parser = Parser::new_from_str(chunk);
    let mut docs = Vec::new();
    let mut b = Builder {
        stack: Vec::new(),
        anchors: HashMap::new(),
        positions: Positions::default(),
        done: None,
        line_offset,
    };
    let mut started = false;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| YamlError::Syntax {
            pos: Pos {
                line: e.marker().line() + line_offset,
                column: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        let pos = b.pos(&mark);
        match event {
            Event::StreamStart | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                started = false;
                b.positions = Positions::default();
                b.anchors.clear();
            }
            Event::DocumentEnd => {
                if let Some(v) = b.done.take() {
                    docs.push((v, std::mem::take(&mut b.positions)));
                }
            }
            Event::Alias(id) => {
                let Some(a) = b.anchors.get(&id) else {
                    return Err(YamlError::UnknownAnchor { pos });
                };
                if a.nodes > *budget {
                    return Err(YamlError::TooManyNodes { pos });
                }
                if b.stack.len() + a.height > MAX_DEPTH {
                    return Err(YamlError::TooDeep { pos });
                }
                *budget -= a.nodes;
                let (v, n, h) = (a.value.clone(), a.nodes, a.height);
                record_path(&mut b, pos, &mut started);
                b.attach(v, n, h, pos, 0)?;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let cost = 1 + text.len() / BYTES_PER_NODE;
                take_budget(budget, cost, pos)?;
                record_path(&mut b, pos, &mut started);
                let v = resolve_scalar(text, style, tag.as_ref());
                b.attach(v, cost, 0, pos, anchor)?;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                take_budget(budget, 1, pos)?;
                if b.stack.len() >= MAX_DEPTH {
                    return Err(YamlError::TooDeep { pos });
                }
                let (path, is_key) = b.next_path();
                if is_key {
                    return Err(YamlError::ComplexKey { pos });
                }
                record_path(&mut b, pos, &mut started);
                b.stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        seq: Vec::new(),
                        path,
                        anchor,
                        nodes: 1,
                        height: 0,
                    }
                } else {
                    Frame::Map {
                        map: Mapping::new(),
                        path,
                        key: None,
                        anchor,
                        nodes: 1,
                        height: 0,
                    }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, nodes, height, anchor) = match b.stack.pop() {
                    Some(Frame::Seq {
                        seq,
                        anchor,
                        nodes,
                        height,
                        ..
                    }) => (Value::Sequence(seq), nodes, height, anchor),
                    Some(Frame::Map {
                        map,
                        anchor,
                        nodes,
                        height,
                        ..
                    }) => (Value::Mapping(merge_keys(map)), nodes, height, anchor),
                    None => {
                        return Err(YamlError::Syntax {
                            pos,
                            message: "unbalanced end of collection".into(),
                        });
                    }
                };
                b.attach(value, nodes, height, pos, anchor)?;
            }
        }
    }
    Ok(docs)
}

/// Applies a YAML merge key (`<<: *base` or `<<: [*a, *b]`): keys of the
/// merged mappings that the mapping does not set itself are copied in,
/// earlier mappings first, as YAML 1.1 and Kubernetes' parser do. A `<<`
/// whose value is not a mapping (or list of mappings) is left for the
/// schema to report as an unknown field.
fn merge_keys(mut map: Mapping) -> Mapping {
    let key = Value::String("<<".into());
    let sources = match map.get(&key) {
        Some(Value::Mapping(m)) => vec![m.clone()],
        Some(Value::Sequence(s)) if s.iter().all(Value::is_mapping) => {
            s.iter().filter_map(|v| v.as_mapping().cloned()).collect()
        }
        _ => return map,
    };
    map.remove(&key);
    for source in sources {
        for (k, v) in source {
            if !map.contains_key(&k) {
                map.insert(k, v);
            }
        }
    }
    map
}

/// Records the position of a node that is a value (not a mapping key).
fn record_path(b: &mut Builder, pos: Pos, started: &mut bool) {
    if !*started {
        b.positions.start = pos;
        *started = true;
    }
    if let Some(Frame::Seq { seq, path, .. }) = b.stack.last() {
        let mut p = path.clone();
        push_index(&mut p, seq.len());
        b.positions.insert(p, pos);
    }
}

fn take_budget(budget: &mut usize, cost: usize, pos: Pos) -> Result<(), YamlError> {
    if *budget < cost {
        return Err(YamlError::TooManyNodes { pos });
    }
    *budget -= cost;
    Ok(())
}

/// Resolves a scalar with the YAML 1.2 core schema, as serde_yaml does.
/// Quoted and block scalars are always strings.
fn resolve_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    if let Some(tag) = tag
        && (tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:")
    {
        match tag.suffix.as_str() {
            "str" => return Value::String(text),
            "null" => return Value::Null,
            _ => {}
        }
    }
    if style != TScalarStyle::Plain {
        return Value::String(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Number(f64::INFINITY.into());
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Number(f64::NEG_INFINITY.into()),
        ".nan" | ".NaN" | ".NAN" => return Value::Number(f64::NAN.into()),
        _ => {}
    }
    if let Some(n) = parse_int(&text) {
        return Value::Number(n);
    }
    if looks_like_float(&text)
        && let Ok(f) = text.parse::<f64>()
    {
        return Value::Number(f.into());
    }
    Value::String(text)
}

fn parse_int(s: &str) -> Option<serde_yaml::Number> {
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(d) = digits.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = digits.strip_prefix("0o") {
        (8, d)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = u64::from_str_radix(digits, radix).ok()?;
    if neg {
        let v = i64::try_from(magnitude).ok()?;
        Some((-v).into())
    } else {
        Some(magnitude.into())
    }
}

fn looks_like_float(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let mut chars = s.chars().peekable();
    let mut digits = 0;
    let mut dot = false;
    while let Some(c) = chars.peek().copied() {
        match c {
            '0'..='9' => digits += 1,
            '.' if !dot => dot = true,
            'e' | 'E' => break,
            _ => return false,
        }
        chars.next();
    }
    if digits == 0 {
        return false;
    }
    match chars.next() {
        None => true,
        Some(_) => {
            let rest: String = chars.collect();
            let rest = rest.strip_prefix(['-', '+']).unwrap_or(&rest);
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
        }
    }
}

#[cfg(test)]
mod tests;
