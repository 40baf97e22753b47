//! The gateway's module graph, held to a ratchet.
//!
//! Issue 16 wants layers that only point down. Today most top-level modules
//! of `gateway/src` still form one dependency cycle, so this test cannot
//! yet demand none. It does the next best thing: it derives the graph from
//! the source (`crate::MODULE` paths outside `#[cfg(test)]` code), and
//!
//! - fails when a new edge appears *inside* a cycle (new coupling between
//!   modules that already depend on each other), naming it;
//! - fails when a listed edge is gone, so that [`KNOWN_CYCLE_EDGES`] only
//!   ever shrinks: delete the line, and the layer it freed stays freed;
//! - fails when a module that is outside every cycle today joins one.
//!
//! Edges that point down (out of every cycle) are free to come and go.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Edges `from -> to` between top-level modules that lie on a cycle today.
/// Remove lines as the architecture step breaks them; never add one.
const KNOWN_CYCLE_EDGES: &[(&str, &str)] = &[
    // Moved out of `proxy` (body, respond, upstream): the same edges, renamed.
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

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
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
                edges.insert(m);
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

/// Whether `to` reaches `from` (so `from -> to` lies on a cycle).
fn reaches(g: &BTreeMap<String, BTreeSet<String>>, to: &str, from: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![to.to_string()];
    while let Some(m) = stack.pop() {
        if m == from {
            return true;
        }
        if seen.insert(m.clone())
            && let Some(next) = g.get(&m)
        {
            stack.extend(next.iter().cloned());
        }
    }
    false
}

#[test]
fn the_gateways_module_cycles_only_shrink() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    let on_cycle: BTreeSet<(String, String)> = g
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from.clone(), to.clone())))
        .filter(|(from, to)| reaches(&g, to, from))
        .collect();
    let known: BTreeSet<(String, String)> = KNOWN_CYCLE_EDGES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = on_cycle.difference(&known).collect();
    let gone: Vec<_> = known.difference(&on_cycle).collect();
    assert!(
        new.is_empty(),
        "new dependencies inside a module cycle of gateway/src (from -> to): {new:?}. \
         Layers must only point down (ARCHITECTURE.md): move the shared piece into a lower \
         module instead of importing upward"
    );
    assert!(
        gone.is_empty(),
        "these cycle edges are gone, well done: delete them from KNOWN_CYCLE_EDGES in \
         gateway/tests/layers.rs so they cannot come back: {gone:?}"
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
