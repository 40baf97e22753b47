//! How `read_paths` treats symlinks: a Kubernetes ConfigMap mount
//! (`name -> ..data/name`, `..data -> ..<version>`) is read as its files; a
//! link out of the directory is refused with a diagnostic, never read.

use std::os::unix::fs::symlink;

use meshfed_policy::fs::{Selection, read_paths};

const POLICY: &str = "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: ratings, namespace: default}\n";

#[test]
fn a_configmap_mount_is_read_through_its_data_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let version = dir.path().join("..2026_12_07_15_00_00.000000001");
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("exports.yaml"), POLICY).unwrap();
    symlink("..2026_12_07_15_00_00.000000001", dir.path().join("..data")).unwrap();
    symlink("..data/exports.yaml", dir.path().join("exports.yaml")).unwrap();

    let (files, diags) = read_paths(&[dir.path().to_path_buf()], &Selection::default());
    assert!(diags.is_empty(), "{diags:?}");
    assert_eq!(
        files.len(),
        1,
        "the file once, not again under ..data: {files:?}"
    );
    assert!(files[0].0.ends_with("/exports.yaml"), "{:?}", files[0].0);
    assert_eq!(files[0].1, POLICY.as_bytes());
}

#[test]
fn a_symlink_out_of_the_directory_is_refused_and_not_read() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.yaml"), "password: hunter2\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exports.yaml"), POLICY).unwrap();
    symlink(
        outside.path().join("secret.yaml"),
        dir.path().join("stolen.yaml"),
    )
    .unwrap();

    let (files, diags) = read_paths(&[dir.path().to_path_buf()], &Selection::default());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files
            .iter()
            .all(|(_, b)| !String::from_utf8_lossy(b).contains("hunter2"))
    );
    assert_eq!(diags.len(), 1, "{diags:?}");
    let d = diags[0].to_string();
    assert!(
        d.contains("stolen.yaml") && d.contains("outside the policy directory"),
        "{d}"
    );
    assert!(diags[0].is_error());
}

#[test]
fn a_dangling_symlink_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("exports.yaml"), POLICY).unwrap();
    symlink("missing.yaml", dir.path().join("gone.yaml")).unwrap();
    let (files, diags) = read_paths(&[dir.path().to_path_buf()], &Selection::default());
    assert_eq!(files.len(), 1);
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert!(diags[0].to_string().contains("gone.yaml"), "{}", diags[0]);
}
