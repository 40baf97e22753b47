//! [`Changes`] on real directories: inotify on a tempdir, no clock faked
//! (the kernel's events are what is tested).

use std::os::unix::fs::symlink;
use std::sync::mpsc;
use std::time::Duration;

use super::*;

/// A watcher on its own thread, reporting each wake.
fn spawn(targets: Targets) -> (mpsc::Receiver<Wake>, bool) {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut c = Changes::new(Source::PolicyDir, targets);
        let _ = ready_tx.send(c.is_watching());
        loop {
            if tx.send(c.wait()).is_err() {
                return;
            }
        }
    });
    let watching = ready_rx.recv().expect("the watcher thread started");
    // The first wait returns at once: the check that covers changes made
    // before the watches were placed.
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(Wake::Armed));
    (rx, watching)
}

fn dir_targets(dir: &std::path::Path) -> Targets {
    let dir = dir.to_path_buf();
    Box::new(move || vec![dir.clone()])
}

const PATIENCE: Duration = Duration::from_secs(5);

#[test]
fn an_idle_directory_gives_no_wake_and_a_write_gives_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "a: 1\n").unwrap();
    let (rx, watching) = spawn(dir_targets(dir.path()));
    assert!(watching, "inotify could not be set up on a tempdir");
    // Reading the files (as a check does) is not a change.
    let _ = std::fs::read(dir.path().join("a.yaml")).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "woke with nothing changed"
    );
    std::fs::write(dir.path().join("a.yaml"), "a: 2\n").unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(Wake::Event));
}

#[test]
fn a_write_then_rename_wakes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "a: 1\n").unwrap();
    // The temporary file is written before watching starts: only the
    // rename is left to see.
    std::fs::write(dir.path().join(".a.yaml.swp"), "a: 2\n").unwrap();
    let (rx, _) = spawn(dir_targets(dir.path()));
    std::fs::rename(dir.path().join(".a.yaml.swp"), dir.path().join("a.yaml")).unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(Wake::Event));
}

/// A Kubernetes ConfigMap or Secret volume: `f -> ..data/f`, `..data ->
/// ..<timestamp>`; an update writes a new timestamped directory, points
/// `..data_tmp` at it and renames that onto `..data`.
#[test]
fn a_configmap_data_swap_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path();
    std::fs::create_dir(vol.join("..v1")).unwrap();
    std::fs::write(vol.join("..v1/endpoints.yaml"), "v: 1\n").unwrap();
    symlink("..v1", vol.join("..data")).unwrap();
    symlink("..data/endpoints.yaml", vol.join("endpoints.yaml")).unwrap();
    std::fs::create_dir(vol.join("..v2")).unwrap();
    std::fs::write(vol.join("..v2/endpoints.yaml"), "v: 2\n").unwrap();
    symlink("..v2", vol.join("..data_tmp")).unwrap();
    let file = vol.join("endpoints.yaml");
    let (rx, _) = spawn(Box::new(move || {
        vec![file.parent().unwrap().to_path_buf(), file.clone()]
    }));
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(Wake::Event));
}

#[test]
fn a_burst_of_writes_is_one_wake() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, _) = spawn(dir_targets(dir.path()));
    for i in 0..20 {
        std::fs::write(dir.path().join(format!("{i}.yaml")), "x: 1\n").unwrap();
    }
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(Wake::Event));
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "one burst woke more than once"
    );
}

#[test]
fn nothing_to_watch_falls_back_to_polling_every_second() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, watching) = spawn(dir_targets(&dir.path().join("missing")));
    assert!(!watching);
    assert_eq!(rx.recv_timeout(POLL * 3), Ok(Wake::Poll));
    // Once the directory exists, the watch is placed at a next wake, and
    // from then on a write is an event.
    std::fs::create_dir(dir.path().join("missing")).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    for i in 0.. {
        assert!(
            std::time::Instant::now() < deadline,
            "no event after the directory appeared"
        );
        std::fs::write(dir.path().join("missing/a.yaml"), format!("a: {i}\n")).unwrap();
        if rx.recv_timeout(POLL * 2) == Ok(Wake::Event) {
            break;
        }
    }
}

#[test]
fn too_many_directories_fall_back_to_polling() {
    let many: Vec<PathBuf> = (0..=MAX_WATCHES)
        .map(|i| PathBuf::from(format!("/{i}")))
        .collect();
    let err = arm(&many).unwrap_err();
    assert!(err.contains("over the limit"), "{err}");
}

#[test]
fn the_first_wait_returns_at_once_so_a_change_before_the_watches_is_not_missed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Changes::new(Source::EndpointsFile, dir_targets(dir.path()));
    let before = checks(Source::EndpointsFile);
    let start = std::time::Instant::now();
    assert_eq!(c.wait(), Wake::Armed);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        checks(Source::EndpointsFile),
        before + 1,
        "the first check is counted"
    );
}
