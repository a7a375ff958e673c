//! `cargo xtask dist`: the release tarball an operator installs.
//!
//! Builds the release binary (protoc comes vendored, nothing else is needed), asks it for the
//! files generated from its clap definitions (man pages, completions, the example config:
//! `k3s-snapshot generate-dist-files`), and packs them with the static files of `deploy/`, the
//! README and the LICENSE into `target/dist/k3s-snapshot-<version>-<host triple>.tar.gz` plus
//! `<same>.sha256` (`sha256sum -c` format). The archive holds regular files only, all under
//! `usr/local/` (no directory entries, so extracting it with `tar -xzf … -C /` never changes
//! the mode of an existing directory), owned by root, 0755 for the binary and 0644 for the rest,
//! in a sorted order with one modification time (`SOURCE_DATE_EPOCH`, else the commit's time),
//! so the same commit and binary give the same bytes.
//!
//! The shipped binary has no debug information (`objcopy --strip-debug`; its symbol table stays,
//! so panics still name functions): the release profile's line tables (`debug =
//! "line-tables-only"`, about 5x the stripped size) go into `<same>.debug` beside the tarball
//! (`objcopy --only-keep-debug`), with its own `<same>.debug.sha256`, and the binary carries a
//! `.gnu_debuglink` naming that file (and its CRC-32), so gdb, addr2line or eu-stack find it in
//! the binary's directory or under `/usr/lib/debug/usr/local/bin/` and symbolise a crash
//! report. objcopy is GNU binutils, which every machine that links Rust has (gcc needs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::Digest;

use crate::provision::{self, workspace_root};
use crate::run_checked;

/// Where each shipped file goes in the archive, and its mode.
struct Entry {
    archive: String,
    source: PathBuf,
    mode: u32,
}

pub fn run(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask dist (no arguments; writes target/dist/)");
    }
    let root = workspace_root();
    let protoc = provision::protoc()?;
    let mut build = Command::new(crate::cargo());
    build.current_dir(&root).args(["build", "--release", "--locked", "-p", "k3s-snapshot-cli"]);
    for (k, v) in protoc.env() {
        build.env(k, v);
    }
    run_checked(&mut build, "build the release binary")?;
    let tarball = package(&root.join("target/release/k3s-snapshot"), &root.join("target/dist"))?;
    println!("{}", tarball.display());
    println!("{}", sha_path(&tarball).display());
    let debug = debug_path(&tarball);
    println!("{}", debug.display());
    println!("{}", sha_path(&debug).display());
    Ok(())
}

/// `<name>.debug` beside `<name>.tar.gz`: the shipped binary's debug information.
pub fn debug_path(tarball: &Path) -> PathBuf {
    let name = tarball.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    tarball.with_file_name(format!("{}.debug", name.strip_suffix(".tar.gz").unwrap_or(name)))
}

/// Splits `bin` into `stripped` (no `.debug_*` sections, a `.gnu_debuglink` to `debug`) and
/// `debug` (only the debug information), with GNU objcopy.
fn split_debug(bin: &Path, stripped: &Path, debug: &Path) -> Result<()> {
    let objcopy = std::env::var_os("OBJCOPY").map(PathBuf::from).unwrap_or_else(|| "objcopy".into());
    let run = |args: &[&std::ffi::OsStr], what: &str| -> Result<()> {
        let mut c = Command::new(&objcopy);
        c.args(args);
        let out = c.output().with_context(|| {
            format!("cannot run {}: install GNU binutils (Debian `binutils`, which gcc depends on)", objcopy.display())
        })?;
        if !out.status.success() {
            bail!("{} failed to {what}: {}", objcopy.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    run(&["--only-keep-debug".as_ref(), bin.as_os_str(), debug.as_os_str()], "keep the debug information")?;
    // Not a program: objcopy gives it the binary's mode.
    std::fs::set_permissions(debug, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .with_context(|| format!("cannot chmod {}", debug.display()))?;
    // `--strip-debug` keeps `.debug_gdb_scripts`: it is part of the loaded image (rustc's `main`
    // reads it), 34 bytes naming gdb's Rust pretty-printers, not debug information.
    let link = format!("--add-gnu-debuglink={}", debug.display());
    run(&["--strip-debug".as_ref(), link.as_ref(), bin.as_os_str(), stripped.as_os_str()], "strip the binary")?;
    Ok(())
}

/// `<tarball>.sha256`
pub fn sha_path(tarball: &Path) -> PathBuf {
    let mut p = tarball.as_os_str().to_owned();
    p.push(".sha256");
    PathBuf::from(p)
}

/// The host's target triple (`rustc -vV`), which the binary was built for.
fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc).arg("-vV").output().with_context(|| format!("cannot run {rustc} -vV"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .with_context(|| format!("{rustc} -vV names no host triple"))
}

/// One modification time for every entry: `SOURCE_DATE_EPOCH`, else the commit's time, else now.
fn archive_mtime(root: &Path) -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()) {
        return t;
    }
    let commit = Command::new("git").current_dir(root).args(["log", "-1", "--format=%ct"]).output();
    if let Some(t) = commit.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()) {
        return t;
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Packs `bin` and everything that ships with it into `out_dir`; returns the tarball's path.
/// `cargo xtask test` runs this on the debug binary, so the suite checks the archive's contents.
pub fn package(bin: &Path, out_dir: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let said = Command::new(bin).arg("--version").output().with_context(|| format!("cannot run {}", bin.display()))?;
    let said = String::from_utf8_lossy(&said.stdout).trim().to_string();
    if said != format!("k3s-snapshot {version}") {
        bail!("{} says {said:?}, not k3s-snapshot {version}: build it from this workspace", bin.display());
    }
    let name = format!("k3s-snapshot-{version}-{}", host_triple()?);
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let staging = out_dir.join(format!(".{name}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    let mut generate = Command::new(bin);
    generate.arg("generate-dist-files").arg(&staging);
    run_checked(&mut generate, "generate man pages, completions and the example config")?;
    let result = (|| {
        // The debug file gets its final name only once the archive is written; the debuglink
        // names just the file, so it is made under that name in the staging dir.
        let debug_name = format!("{name}.debug");
        let (stripped, debug) = (staging.join("k3s-snapshot"), staging.join(&debug_name));
        split_debug(bin, &stripped, &debug)?;
        let tarball = write_archive(&root, &stripped, &staging, out_dir, &name)?;
        let shipped = debug_path(&tarball);
        std::fs::rename(&debug, &shipped).with_context(|| format!("cannot rename to {}", shipped.display()))?;
        write_sha256(&shipped)?;
        eprintln!("xtask: wrote {} (the binary's debug information)", shipped.display());
        Ok(tarball)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// `<file>.sha256` in `sha256sum -c` format; returns the hex digest.
fn write_sha256(file: &Path) -> Result<String> {
    let mut f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", file.display()))?;
    let sum = hex(&h.finalize());
    let file_name = file.file_name().and_then(|n| n.to_str()).context("file name")?;
    std::fs::write(sha_path(file), format!("{sum}  {file_name}\n"))?;
    Ok(sum)
}

fn entries(root: &Path, bin: &Path, generated: &Path) -> Result<Vec<Entry>> {
    let file = |archive: &str, source: PathBuf| Entry { archive: format!("usr/local/{archive}"), source, mode: 0o644 };
    let mut out = vec![Entry { archive: "usr/local/bin/k3s-snapshot".into(), source: bin.to_path_buf(), mode: 0o755 }];
    let man = generated.join("man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .with_context(|| format!("cannot read {}", man.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    pages.sort();
    for p in pages {
        let n = p.file_name().and_then(|n| n.to_str()).context("man page name")?.to_string();
        out.push(file(&format!("share/man/man1/{n}"), p));
    }
    let c = generated.join("completions");
    out.push(file("share/bash-completion/completions/k3s-snapshot", c.join("k3s-snapshot")));
    out.push(file("share/zsh/site-functions/_k3s-snapshot", c.join("_k3s-snapshot")));
    out.push(file("share/fish/vendor_completions.d/k3s-snapshot.fish", c.join("k3s-snapshot.fish")));
    out.push(file("lib/systemd/system/k3s-snapshot.service", root.join("deploy/systemd/k3s-snapshot.service")));
    let doc = "share/doc/k3s-snapshot";
    out.push(file(&format!("{doc}/config.yaml"), generated.join("config.yaml")));
    out.push(file(&format!("{doc}/grafana/k3s-snapshot.json"), root.join("deploy/grafana/k3s-snapshot.json")));
    out.push(file(&format!("{doc}/prometheus/alerts.yaml"), root.join("deploy/prometheus/alerts.yaml")));
    out.push(file(&format!("{doc}/README.md"), root.join("README.md")));
    // What the README links to, so its links work in the installed copy too.
    for f in ["ARCHITECTURE.md", "BENCHMARKS.md"] {
        out.push(file(&format!("{doc}/{f}"), root.join(f)));
    }
    for p in markdown_under(&root.join("docs"))? {
        let rel = p.strip_prefix(root).context("a doc outside the workspace")?.to_string_lossy().into_owned();
        out.push(file(&format!("{doc}/{rel}"), p));
    }
    out.push(file(&format!("{doc}/LICENSE"), root.join("LICENSE")));
    out.sort_by(|a, b| a.archive.cmp(&b.archive));
    Ok(out)
}

fn write_archive(root: &Path, bin: &Path, generated: &Path, out_dir: &Path, name: &str) -> Result<PathBuf> {
    let tarball = out_dir.join(format!("{name}.tar.gz"));
    let part = out_dir.join(format!(".{name}.tar.gz.part"));
    let mtime = archive_mtime(root);
    {
        let f = std::fs::File::create(&part).with_context(|| format!("cannot create {}", part.display()))?;
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
        let mut tar = tar::Builder::new(gz);
        for e in entries(root, bin, generated)? {
            let data = std::fs::read(&e.source).with_context(|| format!("cannot read {}", e.source.display()))?;
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(e.mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_username("root")?;
            h.set_groupname("root")?;
            h.set_mtime(mtime);
            tar.append_data(&mut h, &e.archive, data.as_slice())
                .with_context(|| format!("cannot add {} to the archive", e.archive))?;
        }
        let gz = tar.into_inner().context("cannot finish the archive")?;
        gz.finish().context("cannot finish the archive")?.sync_all()?;
    }
    std::fs::rename(&part, &tarball).with_context(|| format!("cannot rename to {}", tarball.display()))?;
    let sum = write_sha256(&tarball)?;
    let len = std::fs::metadata(&tarball)?.len();
    eprintln!("xtask: wrote {} ({len} bytes, sha256 {sum})", tarball.display());
    Ok(tarball)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every `.md` file under `dir`, sorted.
fn markdown_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                found.push(p);
            }
        }
    }
    found.sort();
    Ok(found)
}
