//! The gateway's module layers, held by a test.
//!
//! The top-level modules of `gateway/src` form layers that only point down
//! (issue 16; ARCHITECTURE.md has the picture). [`LAYERS`] gives each its
//! layer; the test derives the module graph from the source (`crate::MODULE`
//! paths outside `#[cfg(test)]` code: tests may reach anywhere) and fails,
//! naming the file and the edge,
//!
//! - when an edge points to a higher layer;
//! - when modules form a cycle (even inside one layer);
//! - when a top-level module is missing from [`LAYERS`] (a new module picks
//!   its layer), or [`LAYERS`] names one that no longer exists.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of `gateway/src` and its layer. A module may use
/// modules of its own layer (without a cycle) or lower ones, never higher.
const LAYERS: &[(&str, u8)] = &[
    // 0 base: registry plumbing, limits, backoff, and plain data and codecs
    // (no I/O of their own).
    ("metrics", 0),
    ("limits", 0),
    ("backoff", 0),
    ("body_budget", 0),
    ("retry_budget", 0),
    ("endpoints", 0),
    ("wire", 0),
    // 1 decisions: pure, no I/O, no sockets, no `state::Gateway`, no
    // response writing.
    ("authz", 1),
    ("peer_auth", 1),
    ("route", 1),
    // 2 I/O: links, listeners, discovery sources, upstream clients,
    // bodies and the responses the gateway writes itself, tracing.
    ("accept", 2),
    ("body", 2),
    ("changes", 2),
    ("discovery", 2),
    ("respond", 2),
    ("trace", 2),
    ("tunnel", 2),
    ("upstream", 2),
    // 3 state: the shared gateway state and the config client that applies
    // snapshots to it.
    ("state", 3),
    ("control", 3),
    // 4 data path.
    ("proxy", 4),
    // 5 side tasks beside the data path.
    ("mirror", 5),
    // 6 wiring.
    ("admin", 6),
    ("run", 6),
];

/// The top-level modules of `gateway/src` (files and directories).
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".rs").unwrap_or(&name).to_string();
            (stem != "lib" && stem != "main").then_some(stem)
        })
        .collect()
}

/// Source without the `#[cfg(test)]` module at its end (tests may reach
/// anywhere) and without comments.
fn non_test_code(text: &str) -> String {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module a piece of code names through `crate::`.
fn referenced(code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::B, c}`: the names at the group's top level.
            let mut depth = 0usize;
            let mut word = String::new();
            let mut at_item_start = true;
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_item_start = true,
                    c if (c.is_ascii_alphanumeric() || c == '_') && at_item_start && depth == 0 => {
                        word.push(c)
                    }
                    _ => {
                        if !word.is_empty() {
                            out.insert(std::mem::take(&mut word));
                            at_item_start = false;
                        }
                    }
                }
            }
            if !word.is_empty() {
                out.insert(word);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out.retain(|m| known.contains(m));
    out
}

/// `from -> to -> a file of `from` that names `to``.
type Graph = BTreeMap<String, BTreeMap<String, PathBuf>>;

fn graph(src: &Path) -> Graph {
    let known = modules(src);
    let mut g = Graph::new();
    for entry in walk(src) {
        let rel = entry.strip_prefix(src).unwrap();
        let file = rel.file_name().unwrap().to_string_lossy().to_string();
        if file == "tests.rs" || rel.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if !known.contains(&top) {
            continue;
        }
        let code = non_test_code(&std::fs::read_to_string(&entry).unwrap());
        let edges = g.entry(top.clone()).or_default();
        for m in referenced(&code, &known) {
            if m != top {
                edges
                    .entry(m)
                    .or_insert_with(|| Path::new("gateway/src").join(rel));
            }
        }
    }
    g
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// A cycle through `from`, as the modules on it, if there is one.
fn cycle_through(g: &Graph, from: &str) -> Option<Vec<String>> {
    // Depth-first search for a path back to `from`.
    fn go(
        g: &Graph,
        at: &str,
        from: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flat_map(|e| e.keys()) {
            if next == from {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if go(g, next, from, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_string()];
    go(g, from, from, &mut path, &mut BTreeSet::new()).then(|| {
        path.push(from.to_string());
        path
    })
}

#[test]
fn the_gateways_modules_form_layers_that_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let on_disk = modules(&src);
    let unplaced: Vec<_> = on_disk
        .iter()
        .filter(|m| !layer.contains_key(m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "top-level modules of gateway/src without a layer: {unplaced:?}. Give each its \
         place in LAYERS (gateway/tests/layers.rs) and in ARCHITECTURE.md's picture"
    );
    let gone: Vec<_> = layer.keys().filter(|m| !on_disk.contains(**m)).collect();
    assert!(
        gone.is_empty(),
        "LAYERS in gateway/tests/layers.rs names modules that gateway/src no longer has: {gone:?}"
    );
    let g = graph(&src);
    let mut upward = Vec::new();
    for (from, tos) in &g {
        for (to, file) in tos {
            let (lf, lt) = (layer[from.as_str()], layer[to.as_str()]);
            if lt > lf {
                upward.push(format!(
                    "{}: `{from}` (layer {lf}) uses `crate::{to}` (layer {lt})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "edges pointing up a layer in gateway/src:\n{}\nLayers must only point down \
         (ARCHITECTURE.md): move the shared piece into a lower module, or pass the \
         lower module what it needs, instead of importing upward",
        upward.join("\n")
    );
    let cycles = cycles(&g);
    assert!(
        cycles.is_empty(),
        "module cycles in gateway/src (each edge with the file that makes it):\n{}",
        cycles.join("\n")
    );
}

/// Every cycle of a graph, each edge with the file that makes it.
fn cycles(g: &Graph) -> Vec<String> {
    g.keys()
        .filter_map(|m| cycle_through(g, m))
        .map(|c| {
            let files: Vec<String> = c
                .windows(2)
                .map(|w| format!("{} ({})", w[0], g[&w[0]][&w[1]].display()))
                .collect();
            format!("{} -> {}", files.join(" -> "), c[c.len() - 1])
        })
        .collect()
}

/// The syncer's modules form no cycle either (its `rollout -> pipeline`
/// edge was the last; the atomic write is `meshfed_cli::fs` now). It is
/// checked here, beside the gateway's table, so one graph reader serves
/// both crates.
#[test]
fn the_syncers_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../syncer/src");
    let g = graph(&src);
    assert!(
        g.len() >= 5,
        "syncer/src: expected its modules (git, pipeline, rollout, ...), found {:?}",
        g.keys().collect::<Vec<_>>()
    );
    let cycles = cycles(&g);
    assert!(
        cycles.is_empty(),
        "module cycles in syncer/src (each edge with the file that makes it):\n{}",
        cycles.join("\n")
    );
}

/// The graph walk this test stands on finds a cycle and only a cycle.
#[test]
fn cycles_are_found_with_their_path() {
    let mut g = Graph::new();
    let f = PathBuf::from("f.rs");
    g.entry("a".into())
        .or_default()
        .insert("b".into(), f.clone());
    g.entry("b".into())
        .or_default()
        .insert("c".into(), f.clone());
    assert_eq!(cycle_through(&g, "a"), None);
    g.entry("c".into()).or_default().insert("a".into(), f);
    assert_eq!(
        cycle_through(&g, "a"),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

/// The parser this test stands on: group imports, nested groups, paths.
#[test]
fn crate_paths_name_their_top_level_module() {
    let known: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let code = "use crate::a::X;\nuse crate::{b::{Y, z}, c};\nfn f() { crate::d::g(); }";
    let got = referenced(code, &known);
    assert_eq!(got, known);
    let code = "use crate::{b::{a, c}};";
    let only_b: BTreeSet<String> = ["b".to_string()].into();
    assert_eq!(referenced(code, &known), only_b);
}
