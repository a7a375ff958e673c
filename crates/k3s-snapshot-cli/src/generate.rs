//! What a release ships beside the binary, generated from the clap definitions so that it cannot
//! drift from `--help`: shell completions (`k3s-snapshot completion bash|zsh|fish`), man pages and
//! an example `config.yaml` with every key the config file accepts (`k3s-snapshot
//! generate-dist-files DIR`, which `cargo xtask dist` runs; not a clap subcommand, so nothing
//! generated here mentions it).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use clap::{Arg, ArgAction, Command};

/// The shells `completion` prints a script for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl CompletionShell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }

    /// The file name each shell loads for `k3s-snapshot` from its completion directory.
    pub fn file_name(self) -> &'static str {
        match self {
            CompletionShell::Bash => "k3s-snapshot",
            CompletionShell::Zsh => "_k3s-snapshot",
            CompletionShell::Fish => "k3s-snapshot.fish",
        }
    }
}

/// The completion script for `shell`.
pub fn completion(mut cmd: Command, shell: CompletionShell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, BIN, &mut out);
    if shell == CompletionShell::Bash {
        // clap_complete's bash script (4.6, clap issue #6421) names the state of a subcommand
        // `k3s__snapshot__subcmd__server` while walking the words, but labels its case arms
        // `k3s__subcmd__snapshot__subcmd__server` (the bin name's hyphen escaped as a subcommand
        // separator), so nothing after a subcommand ever completed. Spell the arms as the walk
        // does; once clap fixes it this finds nothing to replace. The dist test completes
        // `k3s-snapshot etcd-snapshot s<TAB>` in a real bash.
        let walk = BIN.replace('-', "__");
        let arms = BIN.replace('-', "__subcmd__");
        let text = String::from_utf8_lossy(&out).replace(&format!("{arms}__subcmd__"), &format!("{walk}__subcmd__"));
        out = text.into_bytes();
    }
    out
}

const BIN: &str = "k3s-snapshot";

/// Writes `man/*.1` (the binary and every visible subcommand: `k3s-snapshot-server.1`,
/// `k3s-snapshot-etcd-snapshot-save.1`, …), `completions/<file per shell>` and `config.yaml`.
pub fn write_dist_files(cmd: Command, out: &Path) -> anyhow::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("cannot write man pages to {}", man.display()))?;
    for shell in [CompletionShell::Bash, CompletionShell::Zsh, CompletionShell::Fish] {
        let path = completions.join(shell.file_name());
        std::fs::write(&path, completion(cmd.clone(), shell))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let path = out.join("config.yaml");
    std::fs::write(&path, config_example(&cmd)).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Args a config file sets in `cmd` and its subcommands, as [`crate::config::merge`] looks them
/// up, less `config` itself and hidden (test-only) flags. Each comes with the subcommand path it
/// belongs to below `cmd` (empty for `cmd`'s own).
fn file_args(cmd: &Command) -> Vec<(String, Arg)> {
    let mut out: Vec<(String, Arg)> = cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some() && a.get_id() != "config" && !a.is_hide_set())
        .map(|a| (String::new(), a.clone()))
        .collect();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        for (path, a) in file_args(sub) {
            let path = if path.is_empty() { sub.get_name().to_string() } else { format!("{} {path}", sub.get_name()) };
            out.push((path, a));
        }
    }
    out
}

/// `key: value` as YAML, commented out: the default, `false` for a switch, `[]` for a list,
/// else the value's name as a placeholder.
fn example_line(long: &str, arg: &Arg) -> String {
    let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    let value = match arg.get_action() {
        ArgAction::SetTrue => "false".to_string(),
        ArgAction::Append if defaults.is_empty() => "[]".to_string(),
        _ => match defaults.first() {
            Some(d) if d.parse::<i64>().is_ok() => d.clone(),
            Some(d) => serde_yaml::to_string(&serde_yaml::Value::String(d.clone()))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| format!("{d:?}")),
            None => {
                let name = arg.get_value_names().and_then(|n| n.first()).map(|n| n.to_string());
                format!("<{}>", name.unwrap_or_else(|| long.to_string()).to_ascii_uppercase().replace('-', "_"))
            }
        },
    };
    format!("#{long}: {value}\n")
}

/// The help text as comment lines, with possible values, environment variable and aliases;
/// `only_for`: the `etcd-snapshot` subcommands that read a key no other command has.
fn describe(out: &mut String, arg: &Arg, only_for: &[String]) {
    let help = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
    comment(out, &help);
    let values: Vec<String> =
        arg.get_possible_values().iter().filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_string()).collect();
    if !values.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue) {
        comment(out, &format!("One of: {}", values.join(", ")));
    }
    if let Some(env) = arg.get_env() {
        comment(out, &format!("Environment: {}", env.to_string_lossy()));
    }
    let aliases = arg.get_visible_aliases().unwrap_or_default();
    if !aliases.is_empty() {
        comment(out, &format!("Also accepted as: {}", aliases.join(", ")));
    }
    let only_for: Vec<String> =
        only_for.iter().filter(|p| !p.is_empty()).map(|p| format!("etcd-snapshot {p}")).collect();
    if !only_for.is_empty() {
        comment(out, &format!("Read by: {}", only_for.join(", ")));
    }
}

/// `text` as `# ` comment lines of at most 100 columns (words longer than that stay whole).
fn comment(out: &mut String, text: &str) {
    for para in text.lines() {
        let mut line = String::from("#");
        for word in para.split_whitespace() {
            if line.len() > 1 && line.len() + 1 + word.len() > 100 {
                let _ = writeln!(out, "{line}");
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        let _ = writeln!(out, "{line}");
    }
}

/// The example `config.yaml`: every key `server` reads from the file, then every key only
/// `etcd-snapshot` (or one of its subcommands) reads, each commented out with its help text.
pub fn config_example(cli: &Command) -> String {
    let mut out = String::from(
        "# k3s-snapshot config file: /etc/rancher/k3s/config.yaml, or --config / K3S_CONFIG_FILE.\n\
         # Generated from the command-line definitions (`k3s-snapshot --help`); nothing here is set.\n\
         # Keys are the long flag names; the command line wins over the environment, which wins\n\
         # over this file. Drop-ins in config.yaml.d/*.yaml are read after it in lexical order: a\n\
         # later key replaces an earlier one, and `key+:` appends to a list (`etcd-arg+:`).\n\
         # Lists: `etcd-arg: [quota-backend-bytes=8589934592]` or one item per line.\n",
    );
    let server = cli.find_subcommand("server").expect("the cli has server");
    let snapshot = cli.find_subcommand("etcd-snapshot").expect("the cli has etcd-snapshot");
    let server_args = file_args(server);
    let _ = writeln!(out, "\n# ---- k3s-snapshot server ----");
    for (_, arg) in &server_args {
        let long = arg.get_long().expect("file args have a long name");
        out.push('\n');
        describe(&mut out, arg, &[]);
        out.push_str(&example_line(long, arg));
    }
    // `etcd-snapshot` reads the same file: its keys that `server` does not also have.
    let known = |key: &str| server_args.iter().any(|(_, a)| crate::config::names_arg(a, key));
    let mut snapshot_cmds = vec![snapshot.clone()];
    snapshot_cmds.extend(snapshot.get_subcommands().cloned());
    let shared: Vec<&str> = server_args
        .iter()
        .filter_map(|(_, a)| a.get_long())
        .filter(|l| crate::config::lookup_key(&snapshot_cmds, l).is_some())
        .collect();
    out.push_str("\n# ---- k3s-snapshot etcd-snapshot ----\n");
    comment(&mut out, &format!("It reads these keys of the server's too: {}.", shared.join(", ")));
    // Keys several subcommands share (`output`: ls and status) are listed once, naming each.
    let mut only_snapshot: Vec<(String, Arg, Vec<String>)> = Vec::new();
    for (path, arg) in file_args(snapshot) {
        let long = arg.get_long().expect("file args have a long name").to_string();
        let aliases = arg.get_visible_aliases().unwrap_or_default();
        if known(&long) || aliases.iter().any(|a| known(a)) {
            continue;
        }
        match only_snapshot.iter_mut().find(|(l, _, _)| *l == long) {
            Some((_, _, paths)) => paths.push(path),
            None => only_snapshot.push((long, arg, vec![path])),
        }
    }
    for (long, arg, paths) in only_snapshot {
        out.push('\n');
        describe(&mut out, &arg, &paths);
        out.push_str(&example_line(&long, &arg));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The example with every key uncommented.
    fn uncommented() -> serde_yaml::Mapping {
        let text = config_example(&crate::Cli::command());
        let yaml: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#').filter(|r| !r.starts_with(' ') && !r.is_empty()))
            .map(|l| format!("{l}\n"))
            .collect();
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn config_example_has_every_server_key_and_only_keys_the_file_accepts() {
        let cli = crate::Cli::command();
        let keys: Vec<String> = uncommented().keys().map(|k| k.as_str().unwrap().to_string()).collect();
        let server = cli.find_subcommand("server").unwrap();
        for arg in server.get_arguments().filter(|a| !a.is_hide_set() && a.get_id() != "config") {
            let long = arg.get_long().unwrap();
            assert!(keys.iter().any(|k| k == long), "server flag --{long} is missing from the example");
        }
        for key in &keys {
            let accepted = ["server", "etcd-snapshot"].iter().any(|c| {
                // A key is accepted along the chain of the subcommands invoked, at any depth
                // (`etcd-snapshot inspect get` reads `encryption-config`).
                let mut cmds = vec![cli.find_subcommand(c).unwrap().clone()];
                let mut i = 0;
                while i < cmds.len() {
                    let subs: Vec<_> = cmds[i].get_subcommands().cloned().collect();
                    cmds.extend(subs);
                    i += 1;
                }
                crate::config::lookup_key(&cmds, key).is_some()
            });
            assert!(accepted, "the example has key {key:?}, which the config file does not accept");
        }
        for key in ["etcd-snapshot-schedule-cron", "etcd-s3-bucket", "etcd-endpoints", "name", "output"] {
            assert!(keys.iter().any(|k| k == key), "{key} missing: {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "config" || k == "etcd-snapshot-jitter"), "{keys:?}");
    }

    #[test]
    fn config_example_shows_defaults_as_values() {
        let m = uncommented();
        let get = |k: &str| m.get(k).cloned().unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(get("etcd-snapshot-schedule-cron"), serde_yaml::Value::String("0 */12 * * *".into()));
        assert_eq!(get("https-listen-port"), serde_yaml::Value::Number(6443.into()));
        assert_eq!(get("etcd-s3-timeout"), serde_yaml::Value::String("5m".into()));
        assert_eq!(get("etcd-snapshot-compress"), serde_yaml::Value::Bool(false));
        assert_eq!(get("etcd-arg"), serde_yaml::Value::Sequence(vec![]));
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        for shell in [CompletionShell::Bash, CompletionShell::Zsh, CompletionShell::Fish] {
            let text = String::from_utf8(completion(crate::Cli::command(), shell)).unwrap();
            for needle in ["etcd-snapshot", "server", "etcd-snapshot-schedule-cron", "completion"] {
                assert!(text.contains(needle), "{shell:?} lacks {needle}");
            }
            assert!(!text.contains("generate-dist-files"), "{shell:?} completes the hidden command");
        }
    }
}
