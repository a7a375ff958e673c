//! Hostile files (issue 14): zip bombs, restores next to a different snapshot of the same name,
//! symbolic links planted at the names we write, directories that others own or can write to,
//! foreign `.part` files, and data dirs left too open. Real etcd and a real s3s-fs throughout.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use tests::support::bin::{self, Run};
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::s3::{S3Server, SECRET_KEY};
use tests::support::server::{
    all_keys, assert_reset_done, files, kv, put, save, server_with_uploaded_snapshot, DataDir,
};

/// The one `error:` line of a failed run.
#[track_caller]
fn error_line(r: &Run) -> String {
    assert!(!r.ok(), "expected a failure\nstderr:\n{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected exactly one error line:\n{}", r.stderr);
    lines[0].to_string()
}

fn reset_with(dd: &DataDir, path: &Path, extra: &[&str]) -> Run {
    let restore = format!("--cluster-reset-restore-path={}", path.display());
    let mut args = vec!["--cluster-reset", restore.as_str()];
    args.extend(extra);
    dd.run(&args)
}

/// Files in the snapshot dir, the metadata dir and `db/` that a refused restore must not leave.
#[track_caller]
fn assert_nothing_left(dd: &DataDir) {
    assert_eq!(files(&dd.snapshots()), Vec::<String>::new(), "left in the snapshot dir");
    assert_eq!(files(&dd.db().join(".metadata")), Vec::<String>::new(), "left in the metadata dir");
    let db = files(&dd.db());
    assert!(!db.iter().any(|f| f.starts_with("etcd-restore") || f.starts_with("etcd-old")), "{db:?}");
    assert!(!dd.db().join("reset-flag").exists());
}

/// A reset from `zip` that must be refused: exit 1, one error line naming the zip, nothing left
/// behind. Returns the error line.
#[track_caller]
fn refused_reset(dd: &DataDir, zip: &Path) -> String {
    let r = reset_with(dd, zip, &[]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let line = error_line(&r);
    assert!(line.contains(&zip.display().to_string()), "{line}");
    assert_nothing_left(dd);
    line
}

fn find(hay: &[u8], sig: &[u8], from: usize) -> Option<usize> {
    hay[from..].windows(sig.len()).position(|w| w == sig).map(|p| p + from)
}

/// Rewrites the uncompressed size that a one-entry zip declares, in its local header and its
/// central directory (through the zip64 extra field when `declared` needs it; the zip must then
/// have been written with the zip64 fields, see [`zip64_of`]).
fn declare_size(path: &Path, declared: u64) {
    let mut z = std::fs::read(path).unwrap();
    let local = find(&z, b"PK\x03\x04", 0).expect("a local header");
    let central = find(&z, b"PK\x01\x02", local + 30).expect("a central directory header");
    let u32_at = |z: &[u8], at: usize| u32::from_le_bytes(z[at..at + 4].try_into().unwrap());
    let u16_at = |z: &[u8], at: usize| u16::from_le_bytes(z[at..at + 2].try_into().unwrap()) as usize;
    if u32_at(&z, central + 24) == u32::MAX {
        // Zip64: the extra field (id 1) holds the uncompressed size first.
        let (name_len, extra_len) = (u16_at(&z, central + 28), u16_at(&z, central + 30));
        let mut at = central + 46 + name_len;
        let end = at + extra_len;
        while at < end {
            let (id, len) = (u16_at(&z, at), u16_at(&z, at + 2));
            if id == 1 {
                z[at + 4..at + 12].copy_from_slice(&declared.to_le_bytes());
                std::fs::write(path, &z).unwrap();
                return;
            }
            at += 4 + len;
        }
        panic!("no zip64 extra field in {}", path.display());
    }
    let small = u32::try_from(declared).expect("a size beyond 4 GiB needs a zip64 entry");
    z[local + 22..local + 26].copy_from_slice(&small.to_le_bytes());
    z[central + 24..central + 28].copy_from_slice(&small.to_le_bytes());
    std::fs::write(path, &z).unwrap();
}

/// A zip whose single entry carries zip64 size fields.
fn zip64_of(path: &Path, name: &str, data: &[u8]) {
    let mut zw = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).large_file(true);
    zw.start_file(name, opts).unwrap();
    zw.write_all(data).unwrap();
    zw.finish().unwrap();
}

/// A real etcd snapshot, small (a fresh etcd with one key): its length is exactly the bbolt
/// high-water mark times the page size plus the 32-byte sha256, the most its header allows.
fn small_real_snapshot() -> Vec<u8> {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put("k", "v");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snaps");
    snap_cmd(&etcd, &dir, &["save", "--name", "small"]).assert_ok();
    let saved = files(&dir);
    assert_eq!(saved.len(), 1, "{saved:?}");
    let bytes = std::fs::read(dir.join(&saved[0])).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    // Page 0: 16-byte page header, then the meta: page size at +8, high-water mark at +40.
    let (page_size, pgid) = (u32_at(16 + 8), u64_at(16 + 40));
    assert_eq!(pgid * page_size + 32, bytes.len() as u64, "a snapshot is exactly as long as its header says");
    bytes
}

/// A zip (the zip crate, as any zip tool writes one) of one deflated entry `name`: `prefix`, then
/// `zeros` zero bytes.
fn zip_of_prefix_and_zeros(path: &Path, name: &str, prefix: &[u8], zeros: usize) {
    let mut zw = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(1))
        .large_file(false);
    zw.start_file(name, opts).unwrap();
    zw.write_all(prefix).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len());
        zw.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    zw.finish().unwrap();
}

/// The most bytes any file a refused reset writes may reach: the kernel enforces it
/// (`RLIMIT_FSIZE` through util-linux's `prlimit`; a write past it kills the process with
/// SIGXFSZ), so a test under it cannot pass while the extraction writes the bomb out.
const FILE_SIZE_LIMIT: u64 = 16 << 20;

/// [`reset_with`] under [`FILE_SIZE_LIMIT`].
fn reset_with_file_size_limit(dd: &DataDir, zip: &Path) -> Run {
    let restore = format!("--cluster-reset-restore-path={}", zip.display());
    let inner = dd.command(&["--cluster-reset", restore.as_str()]);
    let mut c = std::process::Command::new("prlimit");
    c.arg(format!("--fsize={FILE_SIZE_LIMIT}")).arg("--").arg(inner.get_program()).args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    bin::run(&mut c)
}

/// As [`refused_reset`], under [`FILE_SIZE_LIMIT`]: a run that wrote past it died of SIGXFSZ
/// (no exit code) instead of refusing.
#[track_caller]
fn refused_reset_within_file_size_limit(dd: &DataDir, zip: &Path) -> String {
    let r = reset_with_file_size_limit(dd, zip);
    assert_eq!(r.code, Some(1), "killed by a signal means it wrote past {FILE_SIZE_LIMIT} bytes:\n{}", r.stderr);
    let line = error_line(&r);
    assert!(line.contains(&zip.display().to_string()), "{line}");
    assert_nothing_left(dd);
    line
}

#[test]
fn zip_bomb_inflating_past_its_declared_size_is_refused_and_leaves_nothing() {
    let snapshot = small_real_snapshot();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let entry = "etcd-snapshot-node-a-1700000000";
    let bomb = tmp.path().join(format!("{entry}.zip"));
    // 512 MiB of zeros after a real snapshot deflate to about half a MiB; the entry says it holds
    // just the snapshot.
    zip_of_prefix_and_zeros(&bomb, entry, &snapshot, 512 << 20);
    declare_size(&bomb, snapshot.len() as u64);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 4 << 20);

    let line = refused_reset_within_file_size_limit(&dd, &bomb);
    assert!(line.contains(&format!("inflates beyond the {} bytes it declares", snapshot.len())), "{line}");
}

/// Issue 25.3: an entry that honestly declares far more than its bbolt header allows was written
/// out in full (capped only by the free space) before the restore refused it.
#[test]
fn zip_entry_longer_than_its_bbolt_header_allows_stops_after_two_pages() {
    let snapshot = small_real_snapshot();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let entry = "etcd-snapshot-node-a-1700000000";
    let zip = tmp.path().join(format!("{entry}.zip"));
    let zeros = 256usize << 20;
    zip_of_prefix_and_zeros(&zip, entry, &snapshot, zeros);

    let line = refused_reset_within_file_size_limit(&dd, &zip);
    let declared = snapshot.len() + zeros;
    assert!(
        line.contains(&format!(
            "declares {declared} bytes, but its bbolt header says the snapshot holds at most {}",
            snapshot.len()
        )),
        "{line}"
    );
}

/// Issue 25.3: a zip named like a snapshot whose entry is no bbolt file at all (here 50 MiB of
/// text) is refused at its first page, before anything is written.
#[test]
fn zip_entry_that_is_no_bbolt_file_is_refused_at_its_first_page() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let entry = "etcd-snapshot-node-a-1700000000";
    let zip = tmp.path().join(format!("{entry}.zip"));
    zip_of_prefix_and_zeros(&zip, entry, &b"this is no etcd snapshot\n".repeat(2 << 20), 0);

    let line = refused_reset_within_file_size_limit(&dd, &zip);
    assert!(line.contains("its first page is not a bbolt meta page (bad magic"), "{line}");
}

#[test]
fn zip_declaring_more_than_the_free_space_is_refused_before_writing() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let entry = "etcd-snapshot-node-a-1700000000";
    let zip = tmp.path().join(format!("{entry}.zip"));
    zip64_of(&zip, entry, &[0u8; 4096]);
    // 1 EiB: more than any test machine has free.
    declare_size(&zip, 1 << 60);

    let line = refused_reset(&dd, &zip);
    assert!(line.contains("not enough space"), "{line}");
    assert!(line.contains(&format!("it needs {} bytes", 1u64 << 60)), "{line}");
    assert!(line.contains(&dd.snapshots().display().to_string()), "{line}");
}

#[test]
fn zip_restore_leaves_a_different_local_snapshot_with_the_entry_name_byte_identical() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("in-zip", "1")]);
    let zip = save(&dd, &["--snapshot-compress"]);
    put(&dd, &[("only-local", "2")]);
    let other = save(&dd, &[]);
    s.stop();
    // The zip goes elsewhere; a different, valid snapshot takes the name of the zip's entry.
    let entry = zip.file_stem().unwrap().to_string_lossy().into_owned();
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join(zip.file_name().unwrap());
    std::fs::rename(&zip, &moved).unwrap();
    let local = dd.snapshots().join(&entry);
    std::fs::rename(&other, &local).unwrap();
    let before = std::fs::read(&local).unwrap();

    let r = reset_with(&dd, &moved, &[]);
    assert_reset_done(&r, &dd);
    assert!(std::fs::read(&local).unwrap() == before, "the local snapshot {} was replaced", local.display());
    assert!(r.stderr.contains("it was kept as it is"), "no log line says what happened:\n{}", r.stderr);
    assert_eq!(files(&dd.snapshots()), vec![entry], "a scratch file was left");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("in-zip", "1")]), "not restored from the zip");
    s.stop();
}

#[test]
fn s3_restore_download_leaves_a_same_named_different_local_file_intact() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let flags = s3.server_flags("snaps");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let (s, snap, name) = server_with_uploaded_snapshot(&dd, &flags);
    put(&dd, &[("only-local", "2")]);
    let other = save(&dd, &[]);
    s.stop();
    // The local file named like the object now holds another snapshot.
    std::fs::rename(&other, &snap).unwrap();
    let before = std::fs::read(&snap).unwrap();

    let mut args = vec!["--cluster-reset".to_string(), format!("--cluster-reset-restore-path={name}")];
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = dd.run(&args);
    assert_reset_done(&r, &dd);
    assert!(!r.stderr.contains(SECRET_KEY));
    assert!(std::fs::read(&snap).unwrap() == before, "the download replaced the local {}", snap.display());
    assert!(r.stderr.contains("it was kept as it is"), "no log line says what happened:\n{}", r.stderr);
    assert!(!files(&dd.snapshots()).iter().any(|f| f.ends_with(".part")), "{:?}", files(&dd.snapshots()));
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("from-s3", "1")]), "not restored from the object");
    s.stop();
}

/// `etcd-snapshot <args> --etcd-endpoints E --node-name n1 --dir D`
fn snap_cmd(etcd: &Etcd, dir: &Path, args: &[&str]) -> Run {
    let mut c = bin::cmd();
    c.arg("etcd-snapshot").args(args).args(["--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"]).arg(dir);
    bin::run(&mut c)
}

fn private_dir(p: &Path) {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).unwrap();
}

#[test]
fn symlinks_planted_at_part_names_leave_the_victim_untouched() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put("k", "v");
    let tmp = tempfile::tempdir().unwrap();
    let (dir, meta) = (tmp.path().join("snapshots"), tmp.path().join(".metadata"));
    private_dir(&dir);
    private_dir(&meta);
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // Links at every name the next minute's saves write: the snapshot's own `.part` for the
    // first seconds (so the save moves on to a later name), the zip's and the metadata's after.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    for ts in now - 2..now + 90 {
        let base = format!("hostile-n1-{ts}");
        let mut at = vec![
            dir.join(format!("{base}.zip.part")),
            meta.join(format!("{base}.part")),
            meta.join(format!("{base}.zip.part")),
        ];
        if ts <= now + 3 {
            at.push(dir.join(format!("{base}.part")));
        }
        for p in at {
            std::os::unix::fs::symlink(&victim, p).unwrap();
        }
    }

    for extra in [&[][..], &["--snapshot-compress"][..]] {
        let mut args = vec!["save", "--name", "hostile"];
        args.extend(extra);
        let r = snap_cmd(&etcd, &dir, &args);
        if !r.ok() {
            // A refusal is fine if it says what and why on one line.
            let line = error_line(&r);
            assert!(line.contains(&dir.display().to_string()) || line.contains(&meta.display().to_string()), "{line}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "a save wrote through a planted link ({extra:?})");
    }
    // Whatever was saved is a regular file, snapshot and metadata alike.
    let saved: Vec<String> = files(&dir).into_iter().filter(|f| !f.ends_with(".part")).collect();
    assert_eq!(saved.len(), 2, "{:?}", files(&dir));
    for f in &saved {
        for p in [dir.join(f), meta.join(f)] {
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert!(md.file_type().is_file(), "{} is not a regular file", p.display());
            assert_eq!(md.mode() & 0o777, 0o600, "{}", p.display());
        }
    }
}

#[test]
fn metadata_or_snapshot_dir_that_others_own_or_can_write_is_refused_naming_it() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put("k", "v");
    let nobody = nix::unistd::Uid::from_raw(65534);
    // (which dir, its mode, whether it is given to another user, what the message says to do)
    let cases: [(&str, u32, bool, &str); 5] = [
        (".metadata", 0o777, false, "chmod 700"),
        (".metadata", 0o770, false, "chmod 700"),
        (".metadata", 0o700, true, "chown"),
        ("snaps", 0o707, false, "chmod 700"),
        ("snaps", 0o700, true, "chown"),
    ];
    for (which, mode, foreign, fix) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, meta) = (tmp.path().join("snaps"), tmp.path().join(".metadata"));
        let bad = tmp.path().join(which);
        std::fs::create_dir(&bad).unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(mode)).unwrap();
        if foreign {
            // The tests run as root, which writes anywhere: the check must look at the owner.
            nix::unistd::chown(&bad, Some(nobody), None).unwrap();
        }
        let r = snap_cmd(&etcd, &dir, &["save"]);
        assert_eq!(r.code, Some(1), "{which} {mode:o} foreign={foreign}: {}", r.stderr);
        let line = error_line(&r);
        assert!(line.contains(&bad.display().to_string()), "{line}");
        assert!(line.contains(fix), "{line}");
        assert!(files(&dir).is_empty() && files(&meta).is_empty(), "{which}: {:?} {:?}", files(&dir), files(&meta));
    }

    // Dirs it creates itself are private.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh/snaps");
    snap_cmd(&etcd, &dir, &["save"]).assert_ok();
    for d in [dir.clone(), tmp.path().join("fresh/.metadata")] {
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700, "{}", d.display());
    }

    // The server refuses to start on a metadata dir anyone can write to, before etcd starts.
    let dd = DataDir::new(EtcdVersion::V3_5);
    let md = dd.db().join(".metadata");
    std::fs::create_dir_all(&md).unwrap();
    std::fs::set_permissions(&md, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = dd.run(&["--etcd-disable-snapshots"]);
    let line = error_line(&r);
    assert!(line.contains(&md.display().to_string()) && line.contains("chmod 700"), "{line}");
}

fn age(p: &Path, by: Duration) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(SystemTime::now() - by).unwrap();
}

#[test]
fn server_start_removes_only_part_files_it_could_have_made() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let meta = dd.db().join(".metadata");
    private_dir(&dd.snapshots());
    private_dir(&meta);
    let foreign =
        [dd.snapshots().join("something.part"), meta.join("notes.part"), dd.snapshots().join("backup-2024.part")];
    let ours = [
        dd.snapshots().join("etcd-snapshot-node-123.part"),
        dd.snapshots().join("on-demand-node-a-5.zip.0123456789abcdef.part"),
        meta.join("on-demand-node-a-5.part"),
    ];
    for p in foreign.iter().chain(&ours) {
        std::fs::write(p, b"x").unwrap();
        // Stale: nothing has written to them for an hour.
        age(p, Duration::from_secs(3600));
    }
    dd.start(&["--etcd-disable-snapshots"]).stop();
    for p in &foreign {
        assert!(p.exists(), "a foreign file was deleted: {}", p.display());
    }
    for p in &ours {
        assert!(!p.exists(), "a stale partial file of ours was kept: {}", p.display());
    }
}

#[test]
fn server_start_tightens_loose_data_dir_snapshot_dir_and_token_modes() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    dd.start(&["--etcd-disable-snapshots"]).stop();
    let token = dd.path().join("server/token");
    let key = dd.path().join("server/tls/server-ca.key");
    let dirs =
        [dd.path(), dd.path().join("server"), dd.db(), dd.db().join("etcd"), dd.snapshots(), dd.db().join(".metadata")];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for f in [&token, &key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let log = s.log_text();
    s.stop();
    for d in &dirs {
        assert_eq!(std::fs::metadata(d).unwrap().mode() & 0o777, 0o700, "{}", d.display());
    }
    for f in [&token, &key] {
        assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600, "{}", f.display());
    }
    assert!(log.contains(&format!("{} had mode 0644", token.display())), "no warning names the token:\n{log}");
    assert!(!log.contains(&dd.token()), "the token leaked into the log");
}
