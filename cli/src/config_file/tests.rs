use std::ffi::{OsStr, OsString};

use clap::{Arg, ArgAction, Command};

use super::*;

/// The shapes of flag both binaries have: a single value, a repeatable
/// list, a switch, a boolean that takes a value, and one with an env var.
fn command() -> Command {
    Command::new("t")
        .arg(Arg::new("config").long("config"))
        .arg(Arg::new("poll-interval").long("poll-interval"))
        .arg(
            Arg::new("exclude")
                .long("exclude")
                .action(ArgAction::Append)
                .value_delimiter(','),
        )
        .arg(
            Arg::new("require-signed")
                .long("require-signed")
                .action(ArgAction::SetTrue),
        )
        .arg(
            Arg::new("kubernetes")
                .long("kubernetes")
                .action(ArgAction::Set)
                .num_args(0..=1),
        )
        .arg(Arg::new("tls-dir").long("tls-dir").env("T_TLS_DIR"))
}

fn no_env(_: &OsStr) -> Option<OsString> {
    None
}

fn args(text: &str) -> Result<Vec<String>, String> {
    settings_as_args(&command(), text, "c.yaml", &no_env).map(|v| {
        v.into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    })
}

#[test]
fn scalars_switches_and_lists_of_repeatable_flags_become_arguments() {
    let got = args(
        "poll-interval: 1m\nexclude: [charts/**, 7, true]\nrequire-signed: true\n\
         kubernetes: false\ntls-dir: /t\nconfig: ignored\n",
    )
    .unwrap();
    assert_eq!(
        got,
        [
            "--exclude",
            "charts/**",
            "--exclude",
            "7",
            "--exclude",
            "true",
            "--kubernetes",
            "false",
            "--poll-interval",
            "1m",
            "--require-signed",
            "--tls-dir",
            "/t",
        ]
    );
    // The parsed command line is what the flags would have given.
    let m = command()
        .try_get_matches_from(std::iter::once("t".to_owned()).chain(got))
        .unwrap();
    assert_eq!(
        m.get_many::<String>("exclude").unwrap().collect::<Vec<_>>(),
        ["charts/**", "7", "true"]
    );
    assert!(m.get_flag("require-signed"));
    // A switch set to false is left off.
    assert_eq!(
        args("require-signed: false\n").unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_list_for_a_single_value_flag_is_refused_naming_the_key() {
    let e = args("poll-interval: [1m, 2m]\n").unwrap_err();
    assert!(
        e.contains("c.yaml: `poll-interval` takes one value, not a list"),
        "{e}"
    );
}

#[test]
fn list_items_that_are_not_scalars_are_refused_not_dropped() {
    let e = args("exclude: [charts/**, {a: 1}, null]\n").unwrap_err();
    assert!(
        e.contains("`exclude` item 2: must be a string, number or boolean, not a map"),
        "{e}"
    );
    assert!(e.contains("`exclude` item 3") && e.contains("null"), "{e}");
}

#[test]
fn every_problem_is_reported_together() {
    let e = args("nope: 1\ntls-dir: {a: 1}\npoll-interval: [1m]\n").unwrap_err();
    assert_eq!(e.lines().count(), 3, "{e}");
    assert!(e.contains("unknown setting `nope`"), "{e}");
    assert!(
        e.contains("`tls-dir` must be a string, number or boolean, not a map"),
        "{e}"
    );
}

#[test]
fn a_setting_whose_environment_variable_is_set_is_left_to_the_environment() {
    let env = |k: &OsStr| (k == "T_TLS_DIR").then(|| OsString::from("/env"));
    let got = settings_as_args(&command(), "tls-dir: /file\n", "c.yaml", &env).unwrap();
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn the_file_is_found_by_flag_then_by_environment_and_goes_in_front() {
    let dir = std::env::temp_dir().join(format!("meshfed-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.yaml");
    std::fs::write(&file, "poll-interval: 1m\n").unwrap();
    let argv = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    let path = file.to_string_lossy().into_owned();
    let by_flag = args_with_config(
        &command(),
        argv(&["t", "--config", &path, "--poll-interval", "2m"]),
        "T_CONFIG",
        &no_env,
    )
    .unwrap();
    assert_eq!(
        by_flag,
        argv(&[
            "t",
            "--poll-interval",
            "1m",
            "--config",
            &path,
            "--poll-interval",
            "2m"
        ])
    );
    let env = |k: &OsStr| (k == "T_CONFIG").then(|| file.clone().into_os_string());
    let by_env = args_with_config(&command(), argv(&["t"]), "T_CONFIG", &env).unwrap();
    assert_eq!(by_env, argv(&["t", "--poll-interval", "1m"]));
    let none = args_with_config(&command(), argv(&["t", "-x"]), "T_CONFIG", &no_env).unwrap();
    assert_eq!(none, argv(&["t", "-x"]));
    let _ = std::fs::remove_dir_all(&dir);
}
