//! The code reference users read is the one the engine uses.

#[test]
fn policy_reference_lists_every_diagnostic_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy-reference.md");
    let on_disk = std::fs::read_to_string(path).expect("docs/policy-reference.md exists");
    assert_eq!(
        on_disk,
        meshfed_policy::diag::codes_markdown(),
        "docs/policy-reference.md is stale: run `cargo run -p meshfed-policy -- codes --format markdown > docs/policy-reference.md`"
    );
}
