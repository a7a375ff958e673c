//! Keeps the documents' commands honest: every `k3s-snapshot …` command line in a fenced shell
//! block of README.md, BENCHMARKS.md, ARCHITECTURE.md and docs/**/*.md must name a subcommand
//! path that exists, and every flag it uses must exist on that subcommand (or be global). Every
//! `cargo xtask TASK` line must name a task xtask dispatches, and its flags must be flags xtask's
//! source knows. Values are not checked (the documents use placeholders such as `D` or `...`).

use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::Cli;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The markdown files whose shell blocks are checked, relative to the workspace root.
fn documents() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files: Vec<PathBuf> =
        ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"].iter().map(|f| root.join(f)).collect();
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Logical lines of the fenced blocks tagged `sh`, `bash`, `shell`, `console` or untagged, with
/// `\` continuations joined, each with its 1-based line number.
fn shell_lines(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut shell = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            if in_block {
                if let Some(p) = pending.take() {
                    out.push(p);
                }
                in_block = false;
            } else {
                in_block = true;
                let lang = info.trim();
                shell = matches!(lang, "" | "sh" | "bash" | "shell" | "console");
            }
            continue;
        }
        if !in_block || !shell {
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        let body = line.trim();
        let body = body.strip_prefix("$ ").unwrap_or(body);
        if let Some(cont) = body.strip_suffix('\\') {
            text.push_str(cont);
            text.push(' ');
            pending = Some((start, text));
        } else {
            text.push_str(body);
            out.push((start, text));
        }
    }
    out
}

/// Splits a line into words as a shell would for our purpose: quotes group (and are removed), an
/// unquoted `#` at the start of a word begins a comment, which ends the line.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut has_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                has_word = true;
            }
            None if c.is_whitespace() => {
                if has_word || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                has_word = false;
            }
            None if c == '#' && cur.is_empty() && !has_word => break,
            None => cur.push(c),
        }
    }
    if has_word || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The simple commands of a line: split at `|`, `||`, `&&`, `;` and `&` outside the brackets and
/// parentheses that synopsis lines use (`[--prefix P]`, `(--prefix … | --namespace NS)`).
fn commands(words: &[String]) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new()];
    let mut depth = 0i32;
    for w in words {
        if depth == 0 && matches!(w.as_str(), "|" | "||" | "&&" | ";" | "&") {
            out.push(Vec::new());
            continue;
        }
        depth += w.chars().filter(|c| matches!(c, '[' | '(')).count() as i32;
        depth -= w.chars().filter(|c| matches!(c, ']' | ')')).count() as i32;
        depth = depth.max(0);
        out.last_mut().expect("one command at least").push(w.clone());
    }
    out.retain(|c| !c.is_empty());
    out
}

/// The words after the program, once `VAR=value` prefixes, `sudo`, `env` and `time` are skipped,
/// and the program's base name.
fn program(cmd: &[String]) -> Option<(&str, &[String])> {
    let mut i = 0;
    while i < cmd.len() {
        let w = cmd[i].as_str();
        let assignment = w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
        if assignment || matches!(w, "sudo" | "env" | "time" | "exec") {
            i += 1;
            continue;
        }
        let name = w.rsplit('/').next().unwrap_or(w);
        return Some((name, &cmd[i + 1..]));
    }
    None
}

/// Removes the synopsis brackets around a word: `[--limit` → `--limit`, `json]` → `json`.
fn bare(word: &str) -> &str {
    word.trim_start_matches(['[', '(']).trim_end_matches([']', ')'])
}

/// Checks one `k3s-snapshot` command line against the clap definitions.
fn check_k3s_snapshot(root: &clap::Command, args: &[String]) -> Result<(), String> {
    let mut cmd = root;
    let mut path = vec![root.get_name().to_string()];
    let mut descending = true;
    let mut i = 0;
    while i < args.len() {
        let w = bare(&args[i]);
        i += 1;
        if w.is_empty() || w == "|" || w == "..." || w == "…" {
            continue;
        }
        if matches!(w, ">" | ">>" | "<" | "2>" | "2>>") {
            // A redirection: the next word is a file name.
            i += 1;
            continue;
        }
        if w.starts_with(['>', '<']) || w.starts_with("2>") {
            continue;
        }
        if let Some(long) = w.strip_prefix("--") {
            if long.is_empty() {
                descending = false;
                continue;
            }
            let (name, inline) = match long.split_once('=') {
                Some((n, _)) => (n, true),
                None => (long, false),
            };
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name)));
            let Some(arg) = arg else {
                return Err(format!("`{}` has no flag --{name}", path.join(" ")));
            };
            if !inline && arg.get_action().takes_values() {
                // The value, unless the synopsis closes a bracket right after the flag.
                if !args[i - 1].ends_with([']', ')']) {
                    i += 1;
                }
            }
            continue;
        }
        if let Some(shorts) = w.strip_prefix('-') {
            if shorts.is_empty() || shorts.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let c = shorts.chars().next().expect("not empty");
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_short() == Some(c) || a.get_all_short_aliases().is_some_and(|al| al.contains(&c)));
            let Some(arg) = arg else {
                return Err(format!("`{}` has no flag -{c}", path.join(" ")));
            };
            if shorts.len() == 1 && arg.get_action().takes_values() && !args[i - 1].ends_with([']', ')']) {
                i += 1;
            }
            continue;
        }
        if descending && cmd.has_subcommands() {
            if let Some(sub) = cmd.find_subcommand(w) {
                cmd = sub;
                path.push(sub.get_name().to_string());
                continue;
            }
            if cmd.get_positionals().next().is_none() {
                return Err(format!("`{}` has no subcommand {w}", path.join(" ")));
            }
        }
        // A positional value: no subcommand follows one.
        descending = false;
    }
    if cmd.is_subcommand_required_set() && cmd.has_subcommands() && path.len() == 1 {
        return Err("no subcommand".into());
    }
    Ok(())
}

/// xtask's tasks (the arms of its dispatch in `xtask/src/main.rs`) and every `"--flag"` string
/// literal in its source.
fn xtask_vocabulary() -> (Vec<String>, Vec<String>) {
    let dir = workspace_root().join("xtask/src");
    let main = std::fs::read_to_string(dir.join("main.rs")).expect("read xtask/src/main.rs");
    let tasks = main
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix('"')?;
            let (name, rest) = l.split_once('"')?;
            (rest.trim_start().starts_with("=>") && !name.is_empty()).then(|| name.to_string())
        })
        .collect();
    let mut flags = Vec::new();
    let mut dirs = vec![dir];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("read xtask source dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).expect("read xtask source");
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("--") && piece[2..].chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                        flags.push(piece.to_string());
                    }
                }
            }
        }
    }
    (tasks, flags)
}

fn check_xtask(tasks: &[String], flags: &[String], args: &[String]) -> Result<(), String> {
    let Some(task) = args.first().map(|t| bare(t)) else { return Err("no task".into()) };
    if !tasks.iter().any(|t| t == task) {
        return Err(format!("xtask has no task {task} (it has {})", tasks.join(", ")));
    }
    for w in &args[1..] {
        let w = bare(w);
        if let Some(flag) = w.strip_prefix("--").filter(|f| !f.is_empty()) {
            let flag = format!("--{}", flag.split_once('=').map_or(flag, |(n, _)| n));
            if !flags.contains(&flag) {
                return Err(format!("xtask {task} has no flag {flag}"));
            }
        }
    }
    Ok(())
}

/// Every problem in one markdown text, as `LINE: problem: the line`, and how many commands were
/// checked.
fn check(markdown: &str, root: &clap::Command, tasks: &[String], flags: &[String]) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut checked = 0;
    for (line, text) in shell_lines(markdown) {
        for cmd in commands(&words(&text)) {
            let result = match program(&cmd) {
                Some(("k3s-snapshot", args)) => check_k3s_snapshot(root, args),
                Some(("cargo", [x, args @ ..])) if x == "xtask" => check_xtask(tasks, flags, args),
                _ => continue,
            };
            checked += 1;
            if let Err(e) = result {
                out.push(format!("{line}: {e}: {text}"));
            }
        }
    }
    (out, checked)
}

fn problems(markdown: &str, root: &clap::Command, tasks: &[String], flags: &[String]) -> Vec<String> {
    check(markdown, root, tasks, flags).0
}

fn cli() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    cmd
}

#[test]
fn readme_and_docs_commands_exist_in_the_cli() {
    let root = cli();
    let (tasks, flags) = xtask_vocabulary();
    let base = workspace_root();
    let mut all = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("read {}: {e}", doc.display()));
        let (found, n) = check(&text, &root, &tasks, &flags);
        checked += n;
        let name = doc.strip_prefix(&base).unwrap_or(&doc).display().to_string();
        all.extend(found.into_iter().map(|p| format!("{name}:{p}")));
    }
    assert!(checked >= 40, "only {checked} commands checked: are the README and docs/ where they should be?");
    assert!(all.is_empty(), "commands in the documents that the CLI does not have:\n{}", all.join("\n"));
}

#[test]
fn readme_starts_with_the_two_set_up_commands() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("read README.md");
    let lines = shell_lines(&readme);
    let first: Vec<&str> = lines.iter().take(2).map(|(_, t)| t.split('#').next().unwrap_or("").trim()).collect();
    assert_eq!(first, ["cargo xtask demo", "cargo xtask test"], "the README's first commands");
}

#[test]
fn readme_check_refuses_what_the_cli_does_not_have() {
    let root = cli();
    let (tasks, flags) = xtask_vocabulary();
    let bad = |md: &str| problems(md, &root, &tasks, &flags);
    let good =
        "```sh\nK3S_TOKEN=x sudo k3s-snapshot etcd-snapshot save --s3 \\\n    --s3-bucket b --name n  # c --nope\n\
                k3s-snapshot etcd-snapshot ls -o json | jq . && k3s-snapshot etcd alarm list\n\
                k3s-snapshot etcd-snapshot inspect keys SNAP [--prefix /registry/] [-o json]\n\
                cargo xtask bench --runs 3 --only replay\n```\n";
    assert_eq!(bad(good), Vec::<String>::new());
    for md in [
        "```sh\nk3s-snapshot etcd-snapshot save --no-such-flag\n```\n",
        "```sh\nk3s-snapshot etcd-snapshot \\\n  ls --s3 --bogus\n```\n",
        "```sh\nk3s-snapshot etcd-snapshot frobnicate\n```\n",
        "```sh\nsudo k3s-snapshot server --cluster-reset --etcd-s3-bukket b\n```\n",
        "```sh\nk3s-snapshot etcd status -z\n```\n",
        "```sh\ncargo xtask deploy\n```\n",
        "```sh\ncargo xtask bench --no-such-flag\n```\n",
    ] {
        assert_eq!(bad(md).len(), 1, "not refused: {md}");
    }
    // Prose and other languages are not checked.
    assert!(bad("k3s-snapshot --nope\n```yaml\nk3s-snapshot --nope\n```\n").is_empty());
}
