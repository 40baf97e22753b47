//! Properties that must hold for every input, checked with proptest:
//! the engine never panics, whatever the bytes, and compilation is a pure
//! function of the resources (file order, names and repetition do not
//! change the bytes).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use meshfed_policy::fs::{Selection, read_paths};
use meshfed_policy::{Options, Snapshot, analyze};
use proptest::prelude::*;

fn example_files() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    read_paths(&[dir], &Selection::default()).0
}

/// Analyzes, and compiles every cluster when valid; checks that a compiled
/// snapshot survives its own encoding.
fn exercise(files: Vec<(String, Vec<u8>)>) {
    let opts = Options::default();
    let a = analyze(files, &opts);
    if a.is_valid() {
        let clusters = a.clusters();
        let names: Vec<String> = if clusters.is_empty() {
            vec!["c".into()]
        } else {
            clusters.into_iter().collect()
        };
        for c in names {
            let s = a.compile(&c, "v", &opts).expect("valid analysis compiles");
            assert_eq!(Snapshot::decode(&s.encode()).expect("decodes"), s);
        }
    }
    for d in &a.diagnostics {
        assert!(d.line >= 1 && d.column >= 1, "{d}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        exercise(vec![("fuzz.yaml".into(), bytes)]);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[ -~\n\t]{0,512}") {
        exercise(vec![("fuzz.yaml".into(), text.into_bytes())]);
    }

    /// Mutations of real policy: flipped bytes, cut files, dropped lines.
    #[test]
    fn mutated_examples_never_panic(
        pick in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        drop_line in any::<prop::sample::Index>(),
    ) {
        let files = example_files();
        let (name, mut bytes) = files[pick.index(files.len())].clone();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let mut lines: Vec<&str> = text.lines().collect();
        if !lines.is_empty() {
            lines.remove(drop_line.index(lines.len()));
        }
        let mut joined = lines.join("\n").into_bytes();
        joined.truncate(cut.index(joined.len() + 1));
        exercise(vec![(name, joined)]);
    }

    /// The same resources in any file order, under any file names, give the
    /// same bytes for every cluster.
    #[test]
    fn compile_is_deterministic(seed in any::<u64>(), weights in proptest::collection::vec(0u32..=100, 1..6)) {
        let opts = Options::default();
        let mut files = example_files()
            .into_iter()
            .filter(|(n, _)| n.contains("multicluster-failover"))
            .collect::<Vec<_>>();
        // One more generated split, to vary the content.
        let total: u32 = weights.iter().sum();
        if total > 0 && weights.len() > 1 {
            let mut w: Vec<u32> = weights.iter().map(|x| x * 100 / total).collect();
            let rest = 100 - w.iter().sum::<u32>();
            w[0] += rest;
            let routes: Vec<String> = w.iter().enumerate().map(|(i, x)| format!("{{destination: {{host: svc{i}}}, weight: {x}}}")).collect();
            files.push(("gen.yaml".into(), format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: gen}}\nspec:\n  hosts: [gen]\n  http: [{{route: [{}]}}]\n",
                routes.join(", ")
            ).into_bytes()));
        }
        let a = analyze(files.clone(), &opts);
        prop_assert!(a.is_valid(), "{:#?}", a.diagnostics);
        // Shuffle, deterministically from the seed.
        let mut shuffled = files;
        let n = shuffled.len();
        for i in (1..n).rev() {
            let j = (seed.rotate_left(i as u32) as usize) % (i + 1);
            shuffled.swap(i, j);
        }
        let b = analyze(shuffled, &opts);
        for c in ["east", "west"] {
            let x = a.compile(c, "v1", &opts).unwrap();
            let y = b.compile(c, "v1", &opts).unwrap();
            prop_assert_eq!(&x.policy, &y.policy);
            prop_assert_eq!(&x.content_hash, &y.content_hash);
            prop_assert_eq!(x.encode(), a.compile(c, "v1", &opts).unwrap().encode());
        }
    }
}
