//! What an operator installs: the release tarball (`cargo xtask dist`; `cargo xtask test` packs
//! the debug binary the same way and names it in `K3S_SNAPSHOT_DIST`), extracted as the README
//! says (`tar -xzf … -C ROOT`): its completions load in bash, its man pages render with
//! `man -l`, its systemd unit passes `systemd-analyze verify`, the server speaks the sd_notify
//! protocol to a real unix datagram socket, and every metric the dashboard and the alert rules
//! use is one a running server's `/metrics` exports.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::server::{block_on, connect, wait_until, DataDir, Server};

/// The tarball under test.
fn tarball() -> PathBuf {
    let p = std::env::var_os("K3S_SNAPSHOT_DIST").map(PathBuf::from).unwrap_or_else(|| {
        panic!("K3S_SNAPSHOT_DIST is not set: run the suite with `cargo xtask test`, which packs the tarball (or `cargo xtask dist` and point K3S_SNAPSHOT_DIST at it)")
    });
    assert!(p.is_file(), "{} does not exist: run `cargo xtask test` (or `cargo xtask dist`)", p.display());
    p
}

/// A program the tests use, found on PATH, or a failure naming what installs it.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} is not installed: run `cargo xtask provision` (it installs Debian {package}) or `cargo xtask test`"
        )
    })
}

/// The tarball extracted into a fresh root, as an operator extracts it into `/`.
fn extracted() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new("tar").arg("-xzf").arg(tarball()).arg("-C").arg(root.path()).output().unwrap();
    assert!(out.status.success(), "tar -xzf failed: {}", String::from_utf8_lossy(&out.stderr));
    root
}

const MAN: &str = "usr/local/share/man/man1";
const UNIT: &str = "usr/local/lib/systemd/system/k3s-snapshot.service";
const BASH: &str = "usr/local/share/bash-completion/completions/k3s-snapshot";
const DOC: &str = "usr/local/share/doc/k3s-snapshot";

#[test]
fn tarball_holds_the_usr_tree_and_its_checksum_matches() {
    let tarball = tarball();
    let name = tarball.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("k3s-snapshot-") && name.ends_with("-x86_64-unknown-linux-gnu.tar.gz"),
        "tarball name {name}"
    );
    let bytes = std::fs::read(&tarball).unwrap();
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let sha_file = std::fs::read_to_string(format!("{}.sha256", tarball.display())).unwrap();
    assert_eq!(sha_file, format!("{sum}  {name}\n"), "the .sha256 file is in `sha256sum -c` format");

    // Regular files only, all under usr/local, owned by root.
    let listing = Command::new("tar").arg("-tvzf").arg(&tarball).output().unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    for line in listing.lines() {
        assert!(line.starts_with('-') && line.contains(" root/root ") && line.contains(" usr/local/"), "{line}");
    }

    let root = extracted();
    let r = root.path();
    let binary = r.join("usr/local/bin/k3s-snapshot");
    assert_eq!(std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777, 0o755);
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("k3s-snapshot "), "{version:?}");
    for f in [
        UNIT,
        BASH,
        "usr/local/share/zsh/site-functions/_k3s-snapshot",
        "usr/local/share/fish/vendor_completions.d/k3s-snapshot.fish",
        "usr/local/share/doc/k3s-snapshot/README.md",
        "usr/local/share/doc/k3s-snapshot/grafana/k3s-snapshot.json",
        "usr/local/share/doc/k3s-snapshot/prometheus/alerts.yaml",
    ] {
        let meta = std::fs::metadata(r.join(f)).unwrap_or_else(|e| panic!("{f}: {e}\n{listing}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o644, "{f}");
    }
    // The installed README's relative links (to ARCHITECTURE, BENCHMARKS and docs/) resolve in
    // the installed copy, as do those of the documents it links to.
    let mut pages = vec![r.join(DOC).join("README.md")];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(page) = pages.pop() {
        if !seen.insert(page.clone()) {
            continue;
        }
        let text = std::fs::read_to_string(&page).unwrap();
        for target in text.split("](").skip(1).filter_map(|t| t.split(')').next()) {
            let path = target.split('#').next().unwrap();
            if path.is_empty() || path.contains("://") || !path.ends_with(".md") {
                continue;
            }
            let linked = page.parent().unwrap().join(path);
            assert!(linked.is_file(), "{} links to {target}, which the tarball lacks\n{listing}", page.display());
            pages.push(linked.canonicalize().unwrap());
        }
    }
    assert!(seen.len() > 10, "the README's links were followed: {seen:?}");
    let license = std::fs::read_to_string(r.join(DOC).join("LICENSE")).unwrap();
    assert!(license.contains("Apache License") && license.contains("Version 2.0, January 2004"));
    // What the binary prints is what was packed (generated from the same clap definitions).
    for (shell, file) in [
        ("bash", BASH),
        ("zsh", "usr/local/share/zsh/site-functions/_k3s-snapshot"),
        ("fish", "usr/local/share/fish/vendor_completions.d/k3s-snapshot.fish"),
    ] {
        let printed = Command::new(&binary).args(["completion", shell]).output().unwrap();
        assert!(printed.status.success());
        assert_eq!(printed.stdout, std::fs::read(r.join(file)).unwrap(), "completion {shell}");
    }
    // The example config: every key commented out, parsed by the binary itself without a
    // complaint once uncommented (the server's keys; etcd-snapshot's are listed after them).
    let example = std::fs::read_to_string(r.join(DOC).join("config.yaml")).unwrap();
    assert!(example.lines().all(|l| l.is_empty() || l.starts_with('#')), "everything is commented out");
    assert!(example.contains("\n#etcd-snapshot-schedule-cron: 0 */12 * * *\n"), "{example}");
}

/// `(name, type, address)` of every section of an ELF file, as `readelf -S -W` lists them.
fn sections(elf: &Path) -> Vec<(String, String, u64)> {
    let out = Command::new(tool("readelf", "binutils")).args(["-S", "-W"]).arg(elf).output().unwrap();
    assert!(out.status.success(), "readelf -S {}: {}", elf.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('[')?.split_once(']').map(|(_, rest)| rest.to_string()))
        .filter_map(|rest| {
            let mut w = rest.split_whitespace();
            let (name, kind) = (w.next()?.to_string(), w.next()?.to_string());
            Some((name, kind, u64::from_str_radix(w.next()?, 16).ok()?))
        })
        .collect()
}

/// Issue 25.5: the binary shipped without its debug information (115 MB with line tables, 22
/// stripped), which lies beside the tarball with its own checksum; the binary links to it and a
/// crash address resolves to a source line through that link only.
#[test]
fn the_shipped_binary_is_stripped_and_its_debug_information_lies_beside_the_tarball() {
    let tarball = tarball();
    let name = tarball.file_name().unwrap().to_string_lossy().into_owned();
    let debug_name = format!("{}.debug", name.strip_suffix(".tar.gz").unwrap());
    let debug = tarball.with_file_name(&debug_name);
    assert!(debug.is_file(), "no {} beside the tarball", debug.display());
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&debug).unwrap()));
    let sha_file = std::fs::read_to_string(format!("{}.sha256", debug.display())).unwrap();
    assert_eq!(sha_file, format!("{sum}  {debug_name}\n"), "the debug file's .sha256, `sha256sum -c` format");

    let root = extracted();
    let bin_dir = root.path().join("usr/local/bin");
    let binary = bin_dir.join("k3s-snapshot");
    let shipped = sections(&binary);
    assert!(shipped.iter().any(|(n, ..)| n == ".text"), "{shipped:?}");
    // `.debug_gdb_scripts` is no debug information: 34 bytes naming gdb's Rust pretty-printers,
    // loaded with the program (it has an address) and read by rustc's `main` shim.
    let debug_sections: Vec<_> = shipped
        .iter()
        .filter(|(n, _, addr)| n.starts_with(".debug_") && !(n == ".debug_gdb_scripts" && *addr != 0))
        .collect();
    assert!(debug_sections.is_empty(), "the shipped binary has debug sections: {debug_sections:?}");
    assert!(shipped.iter().any(|(n, ..)| n == ".gnu_debuglink"), "no .gnu_debuglink: {shipped:?}");
    let link = Command::new(tool("readelf", "binutils"))
        .args(["-W", "--string-dump=.gnu_debuglink"])
        .arg(&binary)
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains(&debug_name), "the debuglink does not name {debug_name}:\n{link}");
    let kept = sections(&debug);
    for wanted in [".debug_line", ".debug_info"] {
        assert!(
            kept.iter().any(|(n, t, _)| n == wanted && t == "PROGBITS"),
            "{} has no {wanted} with contents: {kept:?}",
            debug.display()
        );
    }

    // A function's address, from the symbol table the binary keeps, resolves to its source file
    // only once the debug file is where the link says (beside the binary).
    let nm = Command::new(tool("nm", "binutils")).arg("-C").arg(&binary).output().unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    let addr = nm
        .lines()
        .filter_map(|l| {
            let mut w = l.splitn(3, ' ');
            let (addr, kind, sym) = (w.next()?, w.next()?, w.next()?);
            let sym = sym.split("::h").next().unwrap_or(sym);
            (kind.eq_ignore_ascii_case("t") && sym.ends_with("k3s_snapshot_core::compress::extract_to_scratch"))
                .then(|| format!("0x{addr}"))
        })
        .next()
        .unwrap_or_else(|| panic!("no extract_to_scratch in the symbol table"));
    let addr2line = |what: &str| {
        let out = Command::new(tool("addr2line", "binutils")).arg("-e").arg(&binary).arg(&addr).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        eprintln!("addr2line {addr} {what}: {text}");
        text
    };
    let without = addr2line("without the debug file");
    assert!(without.starts_with("??"), "the shipped binary itself has line tables: {without}");
    std::fs::copy(&debug, bin_dir.join(&debug_name)).unwrap();
    let with = addr2line("with the debug file beside the binary");
    assert!(with.contains("compress.rs:"), "not symbolised through the debuglink: {with}");
}

#[test]
fn completions_load_in_bash_and_complete_subcommands() {
    let root = extracted();
    let file = root.path().join(BASH);
    // The function `complete -p` names is called as bash calls it for `k3s-snapshot etcd-snapshot s<TAB>`.
    let script = format!(
        "source '{}' && spec=$(complete -p k3s-snapshot) && echo \"$spec\" && fn=${{spec##*-F }} && fn=${{fn%% *}} && \
         COMP_WORDS=(k3s-snapshot etcd-snapshot s) COMP_CWORD=2 COMP_LINE='k3s-snapshot etcd-snapshot s' COMP_POINT=29 && \
         \"$fn\" k3s-snapshot s etcd-snapshot && echo \"REPLY ${{COMPREPLY[*]}}\"",
        file.display()
    );
    let out = Command::new(tool("bash", "bash")).args(["--norc", "--noprofile", "-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bash failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("complete ") && l.ends_with(" k3s-snapshot")), "{stdout}");
    let reply = stdout.lines().find_map(|l| l.strip_prefix("REPLY ")).expect("completion ran");
    let words: Vec<&str> = reply.split_whitespace().collect();
    assert!(words.contains(&"save") && words.contains(&"status"), "completing `etcd-snapshot s`: {words:?}");
}

/// The man page names of the subcommands `bin <path> --help` lists, recursively.
fn visible_commands(bin: &Path, path: &mut Vec<String>, out: &mut Vec<String>) {
    let help = std::process::Command::new(bin).args(path.iter()).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout).into_owned();
    let names: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n != "help")
        .collect();
    for n in names {
        path.push(n);
        out.push(format!("k3s-snapshot-{}.1", path.join("-")));
        visible_commands(bin, path, out);
        path.pop();
    }
}

#[test]
fn man_pages_render_with_man_l() {
    let root = extracted();
    let man = tool("man", "man-db");
    let dir = root.path().join(MAN);
    let mut found: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    found.sort();
    // Every command `--help` lists, at every level, and nothing else.
    let mut want = vec!["k3s-snapshot.1".to_string()];
    visible_commands(&root.path().join("usr/local/bin/k3s-snapshot"), &mut Vec::new(), &mut want);
    assert!(want.contains(&"k3s-snapshot-etcd-snapshot-save.1".to_string()), "{want:?}");
    want.sort();
    assert_eq!(found, want, "no hidden command gets a page, every visible one does");
    for (page, needle) in [
        ("k3s-snapshot-server.1", "--etcd-snapshot-schedule-cron"),
        ("k3s-snapshot-etcd-snapshot-save.1", "--etcd-endpoints"),
        ("k3s-snapshot.1", "etcd-snapshot"),
    ]
    .into_iter()
    .chain(want.iter().map(|p| (p.as_str(), "NAME")))
    {
        let out = Command::new(&man)
            .args(["-P", "cat", "-l"])
            .arg(dir.join(page))
            .env("MANWIDTH", "100")
            .env("LANG", "C.UTF-8")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -l {page}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "man -l {page} warned: {}", String::from_utf8_lossy(&out.stderr));
        // nroff may hyphenate or use a Unicode hyphen; compare with ASCII hyphens.
        let plain = text.replace(['\u{2010}', '\u{2212}'], "-");
        assert!(plain.contains(needle), "{page} lacks {needle:?}:\n{plain}");
    }
}

#[test]
fn systemd_unit_verifies_and_says_how_it_stops() {
    let analyze = tool("systemd-analyze", "systemd");
    let root = extracted();
    let r = root.path();
    // The targets the unit orders itself after come from this machine's systemd.
    let system_units = Path::new("/usr/lib/systemd/system");
    assert!(system_units.join("multi-user.target").is_file(), "no systemd units: run `cargo xtask provision`");
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let cp = Command::new("cp").arg("-a").arg(system_units).arg(r.join("usr/lib/systemd/")).status().unwrap();
    assert!(cp.success());
    let verify = |root: &Path| {
        Command::new(&analyze)
            .arg(format!("--root={}", root.display()))
            .arg("verify")
            .arg(root.join(UNIT))
            // Documentation=man:k3s-snapshot-server(1) is checked against the shipped page.
            .env("MANPATH", root.join("usr/local/share/man"))
            .output()
            .unwrap()
    };
    let out = verify(r);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");

    let unit = std::fs::read_to_string(r.join(UNIT)).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/k3s-snapshot server",
        "KillMode=mixed",
        "Restart=always",
        "LimitNOFILE=1048576",
        "ProtectSystem=strict",
        "StateDirectory=rancher/k3s",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // The check has teeth: without the binary it installs, the same unit fails to verify.
    std::fs::remove_file(r.join("usr/local/bin/k3s-snapshot")).unwrap();
    let out = verify(r);
    assert!(!out.status.success(), "verify must fail without the binary");
    assert!(String::from_utf8_lossy(&out.stderr).contains("k3s-snapshot"), "{out:?}");
}

/// Datagrams the server sent to `sock`, read until one has `want` (each datagram is one
/// notification: newline-separated assignments).
fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want} within {timeout:?}; got {seen:?}");
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }
}

#[test]
fn server_notifies_ready_once_etcd_is_healthy_and_stopping_on_sigterm() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let sock_path = dd.tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut cmd = dd.command(&["--etcd-disable-snapshots"]);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let mut server = dd.spawn_command(cmd);
    let mut seen = Vec::new();
    recv_until(&sock, "READY=1", Duration::from_secs(120), &mut seen);
    // Checked at once, with no retry: READY=1 means etcd answers over TLS and the API serves.
    block_on(async {
        let mut c = connect(&dd).await;
        c.client.status().await.expect("etcd answers its status right after READY=1");
        let ping = server.http().get(format!("{}/ping", server.api())).send().await.expect("the api answers");
        assert_eq!(ping.status().as_u16(), 200);
    });
    let before_ready = &seen[..seen.len() - 1];
    assert!(before_ready.iter().any(|m| m.contains("STATUS=starting etcd")), "{seen:?}");
    assert!(!before_ready.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    assert!(seen.last().unwrap().contains("STATUS=running: etcd healthy"), "{seen:?}");
    assert!(server.log_text().contains("server is running"));

    server.sigterm();
    recv_until(&sock, "STOPPING=1", Duration::from_secs(30), &mut seen);
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", server.log_text());
}

#[test]
fn a_restore_reports_its_steps_as_status_lines() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let snap = tests::support::server::save(&dd, &[]);
    s.stop();
    let sock_path = dd.tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let restore = format!("--cluster-reset-restore-path={}", snap.display());
    let mut cmd = dd.command(&["--cluster-reset", &restore]);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let run = bin::run(&mut cmd);
    tests::support::server::assert_reset_done(&run, &dd);
    let mut seen = Vec::new();
    recv_until(
        &sock,
        "STATUS=cluster reset done: start again without --cluster-reset",
        Duration::from_secs(5),
        &mut seen,
    );
    let statuses: Vec<&str> = seen.iter().flat_map(|m| m.lines()).filter_map(|l| l.strip_prefix("STATUS=")).collect();
    for step in ["restore: checking ", "restore: moving the restored data into ", "cluster reset: starting etcd"] {
        assert!(statuses.iter().any(|s| s.starts_with(step)), "no status {step:?}: {statuses:?}");
    }
    assert!(!seen.iter().any(|m| m.lines().any(|l| l == "READY=1")), "a reset is not a running server: {seen:?}");
}

/// Metric names a PromQL expression reads: identifiers that are not functions, keywords,
/// label names in `by (…)`/`on (…)` lists, or anything inside `{…}`, `[…]` or quotes.
fn promql_metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 13] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    ];
    // Aggregations may put `by (…)` between their name and their argument.
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to =
        |from: usize, close: char| chars[from..].iter().position(|c| *c == close).map_or(chars.len(), |p| from + p + 1);
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' {
            i = skip_to(i + 1, c);
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let called = j < chars.len() && chars[j] == '(' || AGGREGATIONS.contains(&word.as_str());
            if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str()) && called {
                i = skip_to(j + 1, ')');
            } else if !called && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_told_from_functions_labels_and_keywords() {
    let names = promql_metric_names(
        "time() - max by (instance) (a_total{store=\"s3\", x=~\"$i\"} or on (instance) b) > 2 * max by(instance)(c[5m] offset 1h) and on(instance) rate(d[$__rate_interval])",
    );
    assert_eq!(names, ["a_total", "b", "c", "d"]);
}

/// Every expression of the dashboard (`expr`, and the metric of `label_values(…)` queries).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query" | "definition", serde_json::Value::String(s)) if s.starts_with("label_values(") => {
                        let inner = &s["label_values(".len()..];
                        out.push(inner.split([',', ')']).next().unwrap().trim().to_string());
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn metric_names_of_running_server(s: &Server) -> Vec<String> {
    let text =
        block_on(async { s.http().get(format!("{}/metrics", s.api())).send().await.unwrap().text().await.unwrap() });
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap().to_string()).collect()
}

#[test]
fn dashboard_and_alert_metrics_all_exist_in_a_live_metrics() {
    let root = extracted();
    let doc = root.path().join(DOC);
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(doc.join("grafana/k3s-snapshot.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(doc.join("prometheus/alerts.yaml")).unwrap()).unwrap();
    let rules = alerts["groups"][0]["rules"].as_sequence().expect("a Prometheus rule file");
    for rule in rules {
        assert!(rule["alert"].is_string() && rule["labels"]["severity"].is_string(), "{rule:?}");
        exprs.push(rule["expr"].as_str().unwrap().to_string());
    }
    let used: std::collections::BTreeSet<String> = exprs.iter().flat_map(|e| promql_metric_names(e)).collect();
    assert!(used.len() >= 6, "the parse found too little: {used:?}");

    let dd = DataDir::new(EtcdVersion::V3_5);
    // The k3s_snapshot_delta_* series exist only on a server that ships delta segments.
    // The k3s_snapshot_verify_* series exist only with a drill schedule.
    let s = dd.start(&[
        "--etcd-snapshot-schedule-cron=@every 1s",
        "--etcd-snapshot-delta-interval=1s",
        "--etcd-snapshot-verify-schedule=@every 1h",
    ]);
    let taken = "k3s_snapshot_scheduled_taken_total{store=\"local\"} ";
    let read =
        || block_on(async { s.http().get(format!("{}/metrics", s.api())).send().await.unwrap().text().await.unwrap() });
    wait_until("a scheduled snapshot", Duration::from_secs(60), || {
        read().lines().any(|l| l.strip_prefix(taken).is_some_and(|v| v.trim() != "0"))
    });
    let exported = metric_names_of_running_server(&s);
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(n)).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}; exported: {exported:?}");
    // The alert's "twice the schedule" reads the schedule's gap from the server itself.
    assert!(read().lines().any(|l| l == "k3s_snapshot_schedule_interval_seconds 1"), "{}", read());
    // So does the delta lag rule's "three intervals".
    assert!(read().lines().any(|l| l == "k3s_snapshot_delta_interval_seconds 1"), "{}", read());
    assert!(used.iter().any(|n| n.starts_with("k3s_snapshot_delta_")), "no delta metric is used: {used:?}");
    // The drill rules' "twice the drill schedule" and the RTO panel.
    assert!(read().lines().any(|l| l == "k3s_snapshot_verify_schedule_interval_seconds 3600"), "{}", read());
    assert!(used.contains("k3s_snapshot_verify_last_rto_seconds"), "no RTO panel or rule: {used:?}");
    s.stop();
}
