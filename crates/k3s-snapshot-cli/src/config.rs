//! The YAML config file (`--config/-c`, `K3S_CONFIG_FILE`, default `/etc/rancher/k3s/config.yaml`).
//!
//! Precedence is command line > environment > file > default. clap handles the first two and the
//! last; the file fills in the rest: after a first parse, every file key whose flag was not set on
//! the command line or from the environment is appended to the arguments as `--key=value`, and
//! the whole command line is parsed again. Keys are the long flag names (or their aliases).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

pub const DEFAULT_CONFIG: &str = "/etc/rancher/k3s/config.yaml";

/// The outcome of merging: the new argument list and warnings to log once logging is up.
pub struct Merged {
    pub argv: Vec<OsString>,
    pub warnings: Vec<String>,
}

/// Which config file applies: `--config`/`-c` or `K3S_CONFIG_FILE` (must exist), else the
/// default path if it exists.
fn config_path(matches: &ArgMatches) -> Option<(PathBuf, bool)> {
    if let Some(p) = find_config(matches) {
        return Some((p, true));
    }
    let d = PathBuf::from(DEFAULT_CONFIG);
    d.exists().then_some((d, false))
}

fn find_config(m: &ArgMatches) -> Option<PathBuf> {
    if let Ok(Some(p)) = m.try_get_one::<PathBuf>("config") {
        if m.value_source("config") != Some(ValueSource::DefaultValue) {
            return Some(p.clone());
        }
    }
    let (_, sub) = m.subcommand()?;
    find_config(sub)
}

/// The subcommand chain of a parse: e.g. `["etcd-snapshot", "save"]`.
fn chain(m: &ArgMatches) -> Vec<(String, ArgMatches)> {
    let mut out = Vec::new();
    let mut cur = m.clone();
    while let Some((name, sub)) = cur.subcommand() {
        let sub = sub.clone();
        out.push((name.to_string(), sub.clone()));
        cur = sub;
    }
    out
}

/// Merges the config file into `argv`. `cmd` is the full clap command.
pub fn merge(cmd: Command, argv: Vec<OsString>) -> anyhow::Result<Merged> {
    let matches = match cmd.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        // Let the real parse report usage errors, help and version.
        Err(_) => return Ok(Merged { argv, warnings: Vec::new() }),
    };
    let Some((path, explicit)) = config_path(&matches) else {
        return Ok(Merged { argv, warnings: Vec::new() });
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Ok(Merged {
                argv,
                warnings: vec![format!("config file {} is not readable, ignored", path.display())],
            })
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read config file {}; fix --config", path.display())),
    };
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("config file {} is not valid YAML", path.display()))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return Ok(Merged { argv, warnings: Vec::new() }),
        _ => bail!("config file {} must be a mapping of flag names to values", path.display()),
    };
    let links = chain(&matches);
    let Some((first, _)) = links.first() else {
        return Ok(Merged { argv, warnings: Vec::new() });
    };
    // The command whose flags the file sets, and the matches at every level below it (global
    // flags propagate, so a flag counts as set if any level says so).
    let sub_cmd = cmd.find_subcommand(first).expect("parsed subcommand exists").clone();
    let mut all_cmds = vec![sub_cmd.clone()];
    let mut c = sub_cmd.clone();
    for (name, _) in links.iter().skip(1) {
        if let Some(s) = c.find_subcommand(name) {
            c = s.clone();
            all_cmds.push(c.clone());
        }
    }
    let mut extra: Vec<OsString> = Vec::new();
    let mut warnings = Vec::new();
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            warnings.push(format!("config file {}: key {k:?} is not a string, ignored", path.display()));
            continue;
        };
        let arg = all_cmds.iter().find_map(|c| {
            c.get_arguments()
                .find(|a| a.get_long() == Some(key) || a.get_all_aliases().is_some_and(|al| al.contains(&key)))
                .cloned()
        });
        let Some(arg) = arg else {
            warnings.push(format!("config file {}: unknown key {key:?} ignored", path.display()));
            continue;
        };
        let id = arg.get_id().as_str();
        let set_elsewhere = links.iter().any(|(_, m)| {
            matches!(m.try_contains_id(id), Ok(true))
                && matches!(m.value_source(id), Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable))
        });
        if set_elsewhere {
            continue;
        }
        let long = arg.get_long().unwrap_or(key);
        let is_flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count);
        let values: Vec<String> = match v {
            serde_yaml::Value::Sequence(seq) => seq.iter().filter_map(scalar).collect(),
            other => scalar(&other).into_iter().collect(),
        };
        for value in values {
            if is_flag {
                match value.as_str() {
                    "true" => extra.push(format!("--{long}").into()),
                    "false" => {}
                    _ => bail!("config file {}: {key} must be true or false, not {value:?}", path.display()),
                }
            } else {
                extra.push(format!("--{long}={value}").into());
            }
        }
    }
    // Insert right after the first subcommand's name, so the values belong to it.
    let mut argv = argv;
    let pos = argv.iter().position(|a| a.to_str() == Some(first.as_str())).map(|p| p + 1).unwrap_or(argv.len());
    argv.splice(pos..pos, extra);
    Ok(Merged { argv, warnings })
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The default data dir: `/var/lib/rancher/k3s` for root, `~/.rancher/k3s` otherwise.
pub use k3s_server_hooks::layout::default_data_dir;

/// The node name default: the host name.
pub fn default_node_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// Parses durations like `5m`, `30s`, `1h`, `500ms`, `1h30m`, or plain seconds; at most a year.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return k3s_server_hooks::schedule::parse_go_duration(&format!("{s}s"));
    }
    k3s_server_hooks::schedule::parse_go_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("30").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("18446744073709551615s").unwrap_err().contains("too long"));
        assert!(parse_duration("18446744073709551615").unwrap_err().contains("too long"));
        assert!(parse_duration("9999999999999999h").unwrap_err().contains("too long"));
    }
}
