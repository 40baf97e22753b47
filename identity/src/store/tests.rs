use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::certs::{self, IssuedCert, OutFile, Validity};
use crate::testutil::{Federation, TD, TempDir, window};

fn write_creds(dir: &Path, bundle: &str, leaf: &IssuedCert) {
    let files = [
        OutFile {
            name: BUNDLE_FILE,
            contents: bundle,
            secret: false,
        },
        OutFile {
            name: CERT_FILE,
            contents: &leaf.chain_pem,
            secret: false,
        },
        OutFile {
            name: KEY_FILE,
            contents: &leaf.key_pem,
            secret: true,
        },
    ];
    certs::write_files(dir, &files, true).unwrap();
}

#[test]
fn credentials_load_from_a_directory_and_know_their_id_and_cluster() {
    let fed = Federation::new("root");
    let tmp = TempDir::new("load");
    let leaf = fed.gateway("east", "gw-0");
    write_creds(tmp.path(), fed.bundle(), &leaf);

    let creds = Credentials::load(tmp.path()).unwrap();

    assert_eq!(creds.id, SpiffeId::gateway(TD, "east", "gw-0").unwrap());
    assert_eq!(creds.cluster, "east");
    assert_eq!(creds.trust_domain, TD);
    assert_eq!((creds.anchors.len(), creds.chain.len()), (1, 2));
    let leaf_end = certs::CertInfo::parse(&leaf.der, "leaf").unwrap().not_after;
    assert!(creds.not_after <= leaf_end);
    let debug = format!("{creds:?}");
    assert!(
        debug.contains("<redacted>") && !debug.contains("PRIVATE KEY"),
        "{debug}"
    );
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_naming_key_pem() {
    let fed = Federation::new("root");
    let tmp = TempDir::new("mismatch");
    let mut leaf = fed.gateway("east", "gw-0");
    leaf.key_pem = fed.gateway("east", "gw-1").key_pem;
    write_creds(tmp.path(), fed.bundle(), &leaf);

    let e = Credentials::load(tmp.path()).unwrap_err();

    assert!(matches!(e, StoreError::KeyMismatch { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains("key.pem: the private key does not match"),
        "{message}"
    );
    assert!(message.contains("cert.pem"), "{message}");
}

#[test]
fn a_chain_that_our_own_rules_refuse_stops_the_load_naming_cert_and_bundle() {
    let fed = Federation::new("root");
    let foreign = Federation::new("foreign");
    let forged = {
        let id = SpiffeId::gateway(TD, "east", "gw-0").unwrap();
        certs::issue_leaf_unchecked(&fed.west, &id, &[], Validity::days(1)).unwrap()
    };
    let expired = {
        let id = SpiffeId::gateway(TD, "east", "gw-0").unwrap();
        certs::issue_leaf(&fed.east, &id, &[], window(-3, -1)).unwrap()
    };
    let cases = [
        (
            foreign.gateway("east", "gw-0"),
            "not issued under any anchor",
        ),
        (forged, "claims cluster `east`"),
        (expired, "has expired"),
    ];
    for (leaf, expected) in cases {
        let tmp = TempDir::new("untrusted");
        write_creds(tmp.path(), fed.bundle(), &leaf);

        let e = Credentials::load(tmp.path()).unwrap_err().to_string();

        assert!(e.contains("cert.pem is not trusted by"), "{e}");
        assert!(e.contains("bundle.pem"), "{e}");
        assert!(e.contains(expected), "{e}");
    }
}

#[test]
fn a_missing_or_empty_file_is_refused_naming_it() {
    let fed = Federation::new("root");
    let tmp = TempDir::new("missing");
    write_creds(tmp.path(), fed.bundle(), &fed.gateway("east", "gw-0"));
    std::fs::write(tmp.path().join(BUNDLE_FILE), "").unwrap();
    let e = Credentials::load(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("bundle.pem: ") && e.contains("no `-----BEGIN CERTIFICATE-----`"),
        "{e}"
    );

    let leaf = fed.gateway("east", "gw-1");
    std::fs::write(tmp.path().join(BUNDLE_FILE), &leaf.cert_pem).unwrap();
    let e = Credentials::load(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("bundle.pem: anchor #1") && e.contains("is not a CA"),
        "{e}"
    );

    std::fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();
    let e = Credentials::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("cannot read") && e.contains("key.pem"), "{e}");
}

/// A Kubernetes Secret volume: the files are links through `..data`, which
/// the kubelet swaps atomically to a new timestamped directory.
struct SecretVolume<'a> {
    dir: &'a Path,
}

impl SecretVolume<'_> {
    fn new(dir: &Path) -> SecretVolume<'_> {
        for file in [BUNDLE_FILE, CERT_FILE, KEY_FILE] {
            symlink(Path::new("..data").join(file), dir.join(file)).unwrap();
        }
        SecretVolume { dir }
    }

    fn publish(&self, version: &str, bundle: &str, leaf: &IssuedCert) {
        let data = format!("..{version}");
        write_creds(&self.dir.join(&data), bundle, leaf);
        let tmp = self.dir.join("..data_tmp");
        symlink(&data, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn gateway_id(creds: &Credentials) -> String {
    match &creds.id {
        SpiffeId::Gateway { id, .. } => id.clone(),
        other => panic!("not a gateway: {other}"),
    }
}

#[tokio::test]
async fn watch_follows_an_atomic_symlink_swap_and_keeps_the_old_credentials_on_an_invalid_one() {
    let fed = Federation::new("root");
    let tmp = TempDir::new("watch");
    let volume = SecretVolume::new(tmp.path());
    volume.publish("v1", fed.bundle(), &fed.gateway("east", "gw-1"));
    let interval = Duration::from_millis(20);
    let patience = meshfed_tests::patient(Duration::from_secs(10));

    let (mut rx, task) = watch(tmp.path().to_owned(), interval).unwrap();
    assert_eq!(gateway_id(&rx.borrow()), "gw-1");

    volume.publish("v2", fed.bundle(), &fed.gateway("east", "gw-2"));
    tokio::time::timeout(patience, rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gateway_id(&rx.borrow_and_update()), "gw-2");

    // Invalid: a key that is not the certificate's. Nothing may be
    // published however long it stays; the next valid set goes through.
    let mut bad = fed.gateway("east", "gw-3");
    bad.key_pem = fed.gateway("east", "gw-x").key_pem;
    volume.publish("v3", fed.bundle(), &bad);
    tokio::time::sleep(interval * 10).await;
    assert!(!rx.has_changed().unwrap());
    assert_eq!(gateway_id(&rx.borrow()), "gw-2");

    volume.publish("v4", fed.bundle(), &fed.gateway("east", "gw-4"));
    tokio::time::timeout(patience, rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gateway_id(&rx.borrow_and_update()), "gw-4");

    drop(rx);
    tokio::time::timeout(patience, task).await.unwrap().unwrap();
}

#[test]
fn watch_refuses_to_start_on_invalid_credentials() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = TempDir::new("watch-invalid");
    let e = rt
        .block_on(async { watch(tmp.path().to_owned(), Duration::from_secs(1)) })
        .unwrap_err();
    assert!(e.to_string().contains("bundle.pem"), "{e}");
}

/// Issue 21, item 18: with every descriptor taken, reading the credentials
/// fails with EMFILE; the error must say so and not send the operator after
/// valid files. Run in a child process (this test binary again), because
/// taking every descriptor would break tests running beside it.
#[test]
fn out_of_descriptors_a_credentials_read_blames_the_open_files_limit_not_the_files() {
    const CHILD: &str = "MESHFED_TEST_EMFILE_CHILD";
    const NAME: &str = "store::tests::out_of_descriptors_a_credentials_read_blames_the_open_files_limit_not_the_files";
    if let Some(dir) = std::env::var_os(CHILD) {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(64),
                maximum: hard,
            },
        )
        .unwrap();
        let mut held = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            held.push(f);
        }
        let e = Credentials::load(Path::new(&dir)).unwrap_err();
        println!("EXHAUSTION={:?}", e.exhaustion());
        println!("ERROR={e}");
        drop(held);
        return;
    }
    let fed = Federation::new("root");
    let tmp = TempDir::new("emfile");
    write_creds(tmp.path(), fed.bundle(), &fed.gateway("east", "gw-0"));
    // Valid files: the failure below is the limit's alone.
    Credentials::load(tmp.path()).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let error = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ERROR="))
        .unwrap_or_else(|| panic!("the child printed no error: {stdout}"));
    assert!(
        error.contains("too many open files") && error.contains("not a problem with the file"),
        "{error}"
    );
    assert!(
        !error.contains("a credentials directory holds"),
        "the error still sends the operator to the files: {error}"
    );
    assert!(stdout.contains("EXHAUSTION=Some("), "{stdout}");
}
