//! The YAML config file (`--config/-c`, `K3S_CONFIG_FILE`, default `/etc/rancher/k3s/config.yaml`).
//!
//! Precedence is command line > environment > file > default. clap handles the first two and the
//! last; the file fills in the rest: after a first parse, every file key whose flag was not set on
//! the command line or from the environment is appended to the arguments as `--key=value`, and
//! the whole command line is parsed again. Keys are the long flag names (or their aliases).
//!
//! Drop-ins, as k3s reads them (k3s #7568): every `*.yaml` in `<config>.d/` beside the file
//! (`/etc/rancher/k3s/config.yaml.d/`), in lexical order after the file itself; a later file's
//! key replaces an earlier one's, and a key ending in `+` (`etcd-arg+:`) appends to the list
//! the earlier files gave.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

pub const DEFAULT_CONFIG: &str = "/etc/rancher/k3s/config.yaml";

/// The outcome of merging: the new argument list and warnings to log once logging is up.
pub struct Merged {
    pub argv: Vec<OsString>,
    pub warnings: Vec<String>,
}

/// Which config file applies: `--config`/`-c` or `K3S_CONFIG_FILE` (must exist), else the
/// default path if it or its drop-in dir exists.
fn config_path(matches: &ArgMatches) -> Option<(PathBuf, bool)> {
    if let Some(p) = find_config(matches) {
        return Some((p, true));
    }
    let d = PathBuf::from(DEFAULT_CONFIG);
    (d.exists() || drop_in_dir(&d).is_dir()).then_some((d, false))
}

/// `<config>.d`: `config.yaml.d` beside `config.yaml`.
fn drop_in_dir(config: &std::path::Path) -> PathBuf {
    let mut d = config.as_os_str().to_owned();
    d.push(".d");
    PathBuf::from(d)
}

/// One YAML document of flag names to values; empty for an empty file.
fn read_mapping(path: &std::path::Path) -> anyhow::Result<serde_yaml::Mapping> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}; fix --config", path.display()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("config file {} is not valid YAML", path.display()))?;
    match doc {
        serde_yaml::Value::Mapping(m) => Ok(m),
        serde_yaml::Value::Null => Ok(serde_yaml::Mapping::new()),
        _ => bail!("config file {} must be a mapping of flag names to values", path.display()),
    }
}

/// Folds `next` into `into` with k3s's rules: a key replaces, `key+` appends to `key`'s list.
fn fold(into: &mut serde_yaml::Mapping, next: serde_yaml::Mapping) {
    use serde_yaml::Value;
    for (k, v) in next {
        let Some(base) = k.as_str().and_then(|k| k.strip_suffix('+')).map(|b| Value::String(b.to_string())) else {
            into.insert(k, v);
            continue;
        };
        let as_list = |v: Value| match v {
            Value::Sequence(s) => s,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        let mut list = into.remove(&base).map(as_list).unwrap_or_default();
        list.extend(as_list(v));
        into.insert(base, Value::Sequence(list));
    }
}

/// The config file and its drop-ins, folded in order; the files read, for messages.
fn load(path: &std::path::Path, explicit: bool) -> anyhow::Result<Option<serde_yaml::Mapping>> {
    let mut map = serde_yaml::Mapping::new();
    let mut found = false;
    match std::fs::metadata(path) {
        Ok(_) => {
            fold(&mut map, read_mapping(path)?);
            found = true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read config file {}; fix --config", path.display())),
    }
    let dir = drop_in_dir(path);
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
            .collect();
        files.sort();
        for f in files {
            fold(&mut map, read_mapping(&f)?);
            found = true;
        }
    }
    Ok(found.then_some(map))
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
    let links = chain(&matches);
    let Some((first, _)) = links.first() else {
        return Ok(Merged { argv, warnings: Vec::new() });
    };
    // The command whose flags the file sets, and the matches at every level below it (global
    // flags propagate, so a flag counts as set if any level says so).
    let sub_cmd = cmd.find_subcommand(first).expect("parsed subcommand exists").clone();
    // Commands that take no config file (`completion`) read none.
    if !sub_cmd.get_arguments().any(|a| a.get_id() == "config") {
        return Ok(Merged { argv, warnings: Vec::new() });
    }
    let Some((path, explicit)) = config_path(&matches) else {
        return Ok(Merged { argv, warnings: Vec::new() });
    };
    let map = match load(&path, explicit) {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(Merged { argv, warnings: Vec::new() }),
        Err(e)
            if !explicit
                && e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied) =>
        {
            return Ok(Merged {
                argv,
                warnings: vec![format!("config file {} is not readable, ignored", path.display())],
            })
        }
        Err(e) => return Err(e),
    };
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
        let Some(arg) = lookup_key(&all_cmds, key) else {
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

/// Whether the config-file key `key` names `arg`: its long name or one of its aliases.
pub fn names_arg(arg: &Arg, key: &str) -> bool {
    arg.get_long() == Some(key) || arg.get_all_aliases().is_some_and(|al| al.contains(&key))
}

/// The arg that the config-file key `key` sets among `cmds` (a subcommand and those below it).
pub fn lookup_key(cmds: &[Command], key: &str) -> Option<Arg> {
    cmds.iter().find_map(|c| c.get_arguments().find(|a| names_arg(a, key)).cloned())
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

    fn yaml(s: &str) -> serde_yaml::Mapping {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn drop_ins_replace_keys_and_plus_keys_append() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("config.yaml");
        std::fs::write(&cfg, "etcd-snapshot-retention: 5\netcd-arg: [a=1]\nnode-name: main\n").unwrap();
        let d = tmp.path().join("config.yaml.d");
        std::fs::create_dir(&d).unwrap();
        // Lexical order: 10 before 20; a non-yaml file is ignored.
        std::fs::write(d.join("20-last.yaml"), "etcd-snapshot-retention: 9\netcd-arg+: c=3\n").unwrap();
        std::fs::write(d.join("10-first.yaml"), "etcd-snapshot-retention: 7\netcd-arg+: [b=2]\n").unwrap();
        std::fs::write(d.join("99-notes.txt"), "etcd-snapshot-retention: 1\n").unwrap();
        let m = load(&cfg, true).unwrap().unwrap();
        assert_eq!(m, yaml("etcd-snapshot-retention: 9\netcd-arg: [a=1, b=2, c=3]\nnode-name: main\n"));
        // Drop-ins alone (no main file) count too, for the default path.
        std::fs::remove_file(&cfg).unwrap();
        let m = load(&cfg, false).unwrap().unwrap();
        assert_eq!(m, yaml("etcd-snapshot-retention: 9\netcd-arg: [b=2, c=3]\n"));
    }

    #[test]
    fn drop_ins_reach_the_parsed_flags() {
        use clap::CommandFactory;
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("config.yaml");
        std::fs::write(&cfg, "etcd-snapshot-retention: 5\n").unwrap();
        std::fs::create_dir(tmp.path().join("config.yaml.d")).unwrap();
        std::fs::write(tmp.path().join("config.yaml.d/50.yaml"), "etcd-snapshot-retention: 11\n").unwrap();
        let argv: Vec<OsString> = ["k3s-snapshot", "etcd-snapshot", "prune", "--config"]
            .iter()
            .map(OsString::from)
            .chain([cfg.into()])
            .collect();
        let merged = merge(crate::Cli::command(), argv).unwrap();
        let shown: Vec<String> = merged.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(shown.iter().any(|a| a.ends_with("retention=11")), "{shown:?}");
        assert!(!shown.iter().any(|a| a.ends_with("retention=5")), "{shown:?}");
    }

    #[test]
    fn encryption_and_sse_keys_of_the_config_file_reach_both_commands() {
        use clap::CommandFactory;
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("config.yaml");
        std::fs::write(
            &cfg,
            "etcd-snapshot-encryption-recipients-file: /r.txt\netcd-snapshot-encryption-identity-file: /k.txt\n\
             etcd-s3-sse: aws:kms\netcd-s3-sse-kms-key-id: alias/x\n",
        )
        .unwrap();
        for cmd in [&["etcd-snapshot", "save"][..], &["server"]] {
            let argv: Vec<OsString> = std::iter::once("k3s-snapshot")
                .chain(cmd.iter().copied())
                .chain(["--config"])
                .map(OsString::from)
                .chain([cfg.clone().into()])
                .collect();
            let merged = merge(crate::Cli::command(), argv).unwrap();
            assert!(merged.warnings.is_empty(), "{:?}", merged.warnings);
            let shown: Vec<String> = merged.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
            for want in ["recipients-file=/r.txt", "identity-file=/k.txt", "sse=aws:kms", "sse-kms-key-id=alias/x"] {
                assert!(shown.iter().any(|a| a.ends_with(want)), "{cmd:?}: {want} not in {shown:?}");
            }
        }
    }

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
