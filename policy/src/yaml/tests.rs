use super::*;

fn one(text: &str) -> Document {
    let mut l = load_str(text);
    assert!(l.errors.is_empty(), "unexpected errors: {:?}", l.errors);
    assert_eq!(l.documents.len(), 1);
    l.documents.remove(0)
}

#[test]
fn every_field_has_its_line_and_column() {
    let d = one("a:\n  b: 1\n  list:\n    - x\n    - y: 2\n");
    assert_eq!(d.positions.lookup("a"), Pos { line: 1, column: 1 });
    assert_eq!(d.positions.lookup("a.b"), Pos { line: 2, column: 3 });
    assert_eq!(d.positions.lookup("a.list[0]"), Pos { line: 4, column: 7 });
    assert_eq!(
        d.positions.lookup("a.list[1].y"),
        Pos { line: 5, column: 7 }
    );
}

#[test]
fn a_missing_field_is_placed_at_its_nearest_ancestor() {
    let d = one("spec:\n  http:\n    - route: []\n");
    assert_eq!(
        d.positions.lookup("spec.http[0].timeout"),
        Pos { line: 3, column: 7 }
    );
    assert_eq!(d.positions.lookup("nothing.here"), d.positions.start);
}

#[test]
fn keys_with_dots_and_slashes_are_quoted_in_paths() {
    let d = one("labels:\n  topology.istio.io/cluster: east\n");
    assert_eq!(
        d.positions.lookup("labels[\"topology.istio.io/cluster\"]"),
        Pos { line: 2, column: 3 }
    );
}

#[test]
fn documents_keep_their_index_and_absolute_lines() {
    let l = load_str("a: 1\n---\nb: 2\n---\n# only a comment\n---\nc: 3\n");
    assert!(l.errors.is_empty());
    let idx: Vec<usize> = l.documents.iter().map(|d| d.index).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert!(
        l.documents[2].value.is_null(),
        "a comment-only document is empty"
    );
    assert_eq!(
        l.documents[3].positions.lookup("c"),
        Pos { line: 7, column: 1 }
    );
}

#[test]
fn a_syntax_error_in_one_document_does_not_hide_the_others() {
    let l = load_str("a: 1\n---\nb: [unclosed\n---\nc: 3\n");
    assert_eq!(l.documents.len(), 2);
    assert_eq!(l.errors.len(), 1);
    assert_eq!(l.errors[0].0, 1);
    assert!(matches!(l.errors[0].1, YamlError::Syntax { .. }));
    assert_eq!(
        l.errors[0].1.pos().line,
        4,
        "error is reported at an absolute line"
    );
}

#[test]
fn scalars_resolve_with_the_yaml_1_2_core_schema() {
    let d = one(
        "i: 42\nn: -7\nh: 0x1f\nf: 1.5\ne: 1e3\nt: true\nnul: ~\ns: yes\nq: \"42\"\nv: 1.2.3\n",
    );
    let v = &d.value;
    assert_eq!(v["i"].as_u64(), Some(42));
    assert_eq!(v["n"].as_i64(), Some(-7));
    assert_eq!(v["h"].as_u64(), Some(31));
    assert_eq!(v["f"].as_f64(), Some(1.5));
    assert_eq!(v["e"].as_f64(), Some(1000.0));
    assert_eq!(v["t"].as_bool(), Some(true));
    assert!(v["nul"].is_null());
    assert_eq!(
        v["s"].as_str(),
        Some("yes"),
        "YAML 1.1 booleans stay strings"
    );
    assert_eq!(v["q"].as_str(), Some("42"));
    assert_eq!(v["v"].as_str(), Some("1.2.3"));
}

#[test]
fn aliases_expand_to_their_anchor() {
    let d = one("base: &b {x: 1}\nuse: *b\n");
    assert_eq!(d.value["use"]["x"].as_u64(), Some(1));
}

#[test]
fn merge_keys_copy_the_keys_a_mapping_does_not_set() {
    let d =
        one("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\nmany:\n  <<: [{z: 1}, {z: 2, w: 4}]\n");
    assert_eq!(d.value["use"]["x"].as_u64(), Some(1));
    assert_eq!(d.value["use"]["y"].as_u64(), Some(3));
    assert!(d.value["use"].get("<<").is_none());
    assert_eq!(d.value["many"]["z"].as_u64(), Some(1));
    assert_eq!(d.value["many"]["w"].as_u64(), Some(4));
}

#[test]
fn a_leading_byte_order_mark_is_skipped() {
    let d = one("\u{feff}a: 1\nb: 2\n");
    assert_eq!(d.value["a"].as_u64(), Some(1));
    assert_eq!(d.positions.lookup("b").line, 2);
}

#[test]
fn duplicate_keys_are_an_error() {
    let l = load_str("a: 1\nb: 2\na: 3\n");
    assert!(matches!(
        &l.errors[..],
        [(0, YamlError::DuplicateKey { key, first_line: 1, pos })] if key == "a" && pos.line == 3
    ));
}

#[test]
fn an_alias_bomb_is_refused_without_expanding_it() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let l = load_str(&text);
    assert!(l.documents.is_empty());
    assert!(matches!(
        l.errors[..],
        [(0, YamlError::TooManyNodes { .. })]
    ));
}

#[test]
fn deep_nesting_is_refused_without_recursion() {
    for text in [
        "[".repeat(200_000),
        "{a: ".repeat(100_000),
        (0..3_000)
            .map(|i| format!("{}- \n", " ".repeat(i)))
            .collect(),
    ] {
        let l = load_str(&text);
        assert!(l.documents.is_empty());
        assert!(
            matches!(
                l.errors[..],
                [(_, YamlError::TooDeep { .. } | YamlError::Syntax { .. })]
            ),
            "{:?}",
            l.errors
        );
    }
    let nested = format!(
        "{}1{}",
        "[".repeat(MAX_DEPTH + 1),
        "]".repeat(MAX_DEPTH + 1)
    );
    assert!(matches!(
        load_str(&nested).errors[..],
        [(0, YamlError::TooDeep { .. })]
    ));
    let ok = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert!(load_str(&ok).errors.is_empty());
}

#[test]
fn binary_garbage_is_an_error_not_a_crash() {
    let l = load_bytes(&[0x89, b'P', b'N', b'G', 0, 0xff, 0xfe, 1, 2, 3]);
    assert!(matches!(l.errors[..], [(0, YamlError::NotUtf8 { .. })]));
    let l = load_bytes(b"a: 1\nb: \x00\x01\n");
    assert!(matches!(
        l.errors[..],
        [(
            0,
            YamlError::NotUtf8 {
                pos: Pos { line: 2, column: 4 }
            }
        )]
    ));
}

#[test]
fn huge_files_are_refused_before_parsing() {
    let big = vec![b'#'; MAX_FILE_BYTES + 1];
    let l = load_bytes(&big);
    assert!(matches!(l.errors[..], [(0, YamlError::TooLarge { .. })]));
}

#[test]
fn node_budget_is_shared_by_the_documents_of_a_file() {
    // Each document is small; together they exceed the budget, and the
    // loader stops instead of going on.
    let doc = format!("[{}]\n---\n", vec!["1"; 100_000].join(","));
    let text = doc.repeat(MAX_NODES / 100_000 + 2);
    let l = load_str(&text);
    assert!(
        l.errors
            .iter()
            .any(|(_, e)| matches!(e, YamlError::TooManyNodes { .. }))
    );
    assert!(l.documents.len() < MAX_NODES / 100_000 + 2);
}

/// Issue 21, item 12: the budget is per commit. Five small alias bombs in
/// five files used to get 2,000,000 nodes each; now they share one budget
/// of MAX_NODES, and the files after it is spent are refused at once.
#[test]
fn the_node_budget_is_shared_by_the_files_of_a_commit() {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..5 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    // About 111,000 nodes each: under the budget alone.
    assert!(load_str(&bomb).errors.is_empty());
    let mut budget = NodeBudget::default();
    let mut refused = 0;
    for _ in 0..10 {
        let l = load_str_within(&bomb, &mut budget);
        if l.errors
            .iter()
            .any(|(_, e)| matches!(e, YamlError::TooManyNodes { .. }))
        {
            refused += 1;
        }
    }
    assert!(refused >= 5, "{refused} of 10 files refused");
    assert!(budget.left() < MAX_NODES / 5, "{budget:?}");
}
