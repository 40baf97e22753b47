//! `--config FILE`: a YAML map of long flag names to values, turned into
//! command-line arguments placed in front of the real ones, so that
//! precedence is config file, then environment, then flags. One copy for
//! every binary, so the rules cannot drift apart again:
//!
//! - a key is a long flag name (`poll-interval`, `tls-dir`); an unknown key
//!   is an error, and `config` itself is ignored;
//! - a string or a number is that flag's value;
//! - `true`/`false` turns a switch (a flag without a value) on or leaves it
//!   off, and is passed as the value `true`/`false` to a flag that takes one;
//! - a list gives a flag that may be repeated (`exclude: [charts/**, tmp/**]`)
//!   one value per item; every item must be a string, number or boolean. A
//!   list for a flag that takes one value is an error, not "the last wins";
//! - anything else (a map, `null`) is an error;
//! - a setting whose environment variable is set is left to the environment.
//!
//! Every problem in the file is reported together, each naming the file and
//! the key. This module does not validate values: clap does, as for flags.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::Command;

/// The command line `argv` with the settings of its config file in front.
/// The file is named by `--config FILE`, `--config=FILE`, or else the
/// environment variable `config_env`; without one, `argv` is returned as
/// is. `env` reads the environment (tests pass their own).
pub fn args_with_config(
    cmd: &Command,
    argv: Vec<OsString>,
    config_env: &str,
    env: &dyn Fn(&OsStr) -> Option<OsString>,
) -> Result<Vec<OsString>, String> {
    let flag = argv
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| argv.get(i + 1))
        .cloned()
        .or_else(|| {
            argv.iter()
                .find_map(|a| a.to_str()?.strip_prefix("--config=").map(OsString::from))
        })
        .or_else(|| env(OsStr::new(config_env)));
    let Some(path) = flag else {
        return Ok(argv);
    };
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let front = settings_as_args(cmd, &text, &path.display().to_string(), env)?;
    let mut out = vec![argv.first().cloned().unwrap_or_default()];
    out.extend(front);
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

/// The arguments that the config file `text` (shown as `shown`) stands
/// for, or every problem found in it, one per line.
pub fn settings_as_args(
    cmd: &Command,
    text: &str,
    shown: &str,
    env: &dyn Fn(&OsStr) -> Option<OsString>,
) -> Result<Vec<OsString>, String> {
    use serde_yaml::Value;
    let map: std::collections::BTreeMap<String, Value> = match serde_yaml::from_str(text) {
        Ok(map) => map,
        Err(e) => {
            return Err(format!(
                "config file {shown}: {e} (a config file is a YAML map of long flag names to \
                 values, e.g. `log-format: json`)"
            ));
        }
    };
    let mut front = Vec::new();
    let mut problems = Vec::new();
    for (key, value) in map {
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            problems.push(format!(
                "{shown}: unknown setting `{key}` (settings are the long flag names)"
            ));
            continue;
        };
        if key == "config" {
            continue;
        }
        if arg.get_env().is_some_and(|var| env(var).is_some()) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let repeatable = matches!(
            arg.get_action(),
            clap::ArgAction::Append | clap::ArgAction::Count
        );
        let values: Vec<String> = match value {
            Value::Bool(b) if !takes_value => {
                // A switch is present or absent.
                if b {
                    front.push(OsString::from(format!("--{key}")));
                }
                continue;
            }
            Value::Sequence(items) if repeatable && takes_value => {
                let mut values = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match scalar(item) {
                        Ok(v) => values.push(v),
                        Err(other) => problems.push(format!(
                            "{shown}: `{key}` item {}: must be a string, number or boolean, \
                             not {other}",
                            i + 1
                        )),
                    }
                }
                values
            }
            Value::Sequence(_) => {
                problems.push(format!(
                    "{shown}: `{key}` takes one value, not a list (only flags that may be \
                     repeated take a list)"
                ));
                continue;
            }
            other => match scalar(other) {
                Ok(v) => vec![v],
                Err(other) => {
                    problems.push(format!(
                        "{shown}: `{key}` must be a string, number or boolean{}, not {other}",
                        if repeatable { " or a list of them" } else { "" }
                    ));
                    continue;
                }
            },
        };
        for v in values {
            front.push(OsString::from(format!("--{key}")));
            front.push(OsString::from(v));
        }
    }
    if problems.is_empty() {
        Ok(front)
    } else {
        Err(problems.join("\n"))
    }
}

/// A scalar as the text of a flag's value, or what the value was instead.
fn scalar(v: serde_yaml::Value) -> Result<String, &'static str> {
    use serde_yaml::Value;
    match v {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Err("empty (null)"),
        Value::Sequence(_) => Err("a list"),
        Value::Mapping(_) => Err("a map"),
        Value::Tagged(_) => Err("a tagged value"),
    }
}

#[cfg(test)]
mod tests;
