//! `k3s-snapshot etcd-snapshot` against real etcd 3.4.23 and 3.5.1, on local disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;
use tests::support::bin::{self, run, Run};
use tests::support::etcd::{etcdutl_restore, etcdutl_status, Etcd, EtcdVersion};
use tests::support::k3s;

/// `etcd-snapshot <args> --etcd-endpoints E --node-name n1 --dir D`
fn snap(etcd: &Etcd, dir: &Path, args: &[&str]) -> Command {
    let mut c = bin::cmd();
    c.arg("etcd-snapshot").args(args).args(["--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"]).arg(dir);
    c
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn ls_json(etcd: &Etcd, dir: &Path) -> Vec<serde_json::Value> {
    let r = run(&mut snap(etcd, dir, &["ls", "-o", "json"]));
    r.assert_ok();
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((list["apiVersion"].as_str(), list["kind"].as_str()), (Some("v1"), Some("List")), "{list}");
    list["items"].as_array().unwrap().clone()
}

#[test]
fn saved_snapshot_restores_with_etcdutl_and_has_etcds_revision() {
    for v in EtcdVersion::ALL {
        let etcd = Etcd::start(v);
        etcd.put_many("/registry/a/", 50);
        let _ = etcd.ctl(&["del", "/registry/a/00003"]);
        let revision = etcd.revision();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots");
        run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
        let names = files(&dir);
        assert_eq!(names.len(), 1, "{v:?}: {names:?}");
        assert!(names[0].starts_with("on-demand-n1-"), "{names:?}");
        let path = dir.join(&names[0]);
        let status = etcdutl_status(&path);
        assert_eq!(status["revision"].as_i64(), Some(revision), "{v:?}: {status}");
        let out = etcdutl_restore(&path, &tmp.path().join("restored"));
        assert!(out.status.success(), "{v:?}: restore with hash check: {}", String::from_utf8_lossy(&out.stderr));
        // metadata beside the snapshot dir, private modes
        let meta = tmp.path().join(".metadata").join(&names[0]);
        // A flat object of strings, which k3s reads into a map[string]string.
        let m: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&meta).unwrap()).expect("every value a string");
        assert_eq!(m["nodeName"], "n1");
        assert_eq!(m["etcdRevision"], revision.to_string());
        // The key count read back from the saved file, as etcdutl counts it, also in `ls -o json`.
        assert_eq!(m["totalKey"], status["totalKey"].to_string(), "{v:?}: {m:?}");
        let rows = ls_json(&etcd, &dir);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["spec"]["metadata"]["totalKey"], status["totalKey"].to_string(), "{v:?}: {}", rows[0]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }
}

#[test]
fn compressed_snapshot_is_a_zip_with_exactly_one_entry_named_like_the_file() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put_many("/k/", 20);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    run(&mut snap(&etcd, &dir, &["save", "--snapshot-compress"])).assert_ok();
    let names = files(&dir);
    assert_eq!(names.len(), 1, "{names:?}");
    let zip_name = &names[0];
    let base = zip_name.strip_suffix(".zip").expect("a .zip file");
    // inspect with Python's zipfile, an independent reader
    let out = Command::new("python3")
        .args(["-c", "import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); print('\\n'.join(i.filename+' '+str(i.compress_type) for i in z.infolist()))"])
        .arg(dir.join(zip_name))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listing.trim(), format!("{base} 8"), "one deflate (8) entry named {base}");
    // and the entry is a valid snapshot
    let x = Command::new("python3")
        .args(["-c", "import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"])
        .arg(dir.join(zip_name))
        .arg(tmp.path().join("x"))
        .status()
        .unwrap();
    assert!(x.success());
    etcdutl_status(&tmp.path().join("x").join(base));
}

#[test]
fn two_saves_in_the_same_second_do_not_collide() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let mut a = snap(&etcd, &dir, &["save"]).spawn().unwrap();
    let mut b = snap(&etcd, &dir, &["save"]).spawn().unwrap();
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    assert_eq!(files(&dir).len(), 3, "{:?}", files(&dir));
}

/// Timestamp in a snapshot name.
fn name_ts(name: &str) -> i64 {
    name.trim_end_matches(".zip").rsplit('-').next().unwrap().parse().unwrap()
}

/// A Kubernetes quantity (as k3s prints sizes) back to a number.
fn quantity_value(q: &str) -> u64 {
    let (digits, mult) = match q.chars().last() {
        Some('k') => (&q[..q.len() - 1], 1_000),
        Some('M') => (&q[..q.len() - 1], 1_000_000),
        Some('G') => (&q[..q.len() - 1], 1_000_000_000),
        _ => (q, 1),
    };
    digits.parse::<u64>().unwrap_or_else(|_| panic!("not a quantity: {q}")) * mult
}

#[test]
fn ls_prints_the_table_json_and_yaml_of_k3s() {
    let etcd = Etcd::start(EtcdVersion::V3_4);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    run(&mut snap(&etcd, &dir, &["save", "--snapshot-compress"])).assert_ok();
    let mut names = files(&dir);
    names.sort_by_key(|n| (name_ts(n), n.clone()));

    // The table: created in local time (Tokyo has no DST, so the offset is known), k3s's order.
    let table = run(snap(&etcd, &dir, &["ls"]).env("TZ", "Asia/Tokyo"));
    table.assert_ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["Name", "Location", "Size", "Created"]);
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    let shown: Vec<&str> = lines[1..].iter().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(shown, names, "sorted by created then name");
    for (n, row) in names.iter().zip(&lines[1..]) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], format!("file://{}", dir.join(n).display()));
        assert_eq!(cols[2], std::fs::metadata(dir.join(n)).unwrap().len().to_string());
        let created = chrono::DateTime::parse_from_rfc3339(cols[3]).unwrap_or_else(|e| panic!("{}: {e}", cols[3]));
        assert_eq!(created.offset().local_minus_utc(), 9 * 3600, "local time: {}", cols[3]);
        assert_eq!(created.timestamp(), name_ts(n));
    }
    // The columns line up (Go's tabwriter): every row's Location starts where the header's does.
    let at = lines[0].find("Location").unwrap();
    assert!(lines[1..].iter().all(|l| l[at..].starts_with("file://")), "{}", table.stdout);

    // JSON: a v1 List of k3s.cattle.io/v1 ETCDSnapshotFile items, field by field as k3s prints it.
    let items = ls_json(&etcd, &dir);
    assert_eq!(items.len(), 2);
    for (n, e) in names.iter().zip(&items) {
        assert_eq!(e["kind"], "ETCDSnapshotFile");
        assert_eq!(e["apiVersion"], "k3s.cattle.io/v1");
        assert_eq!(e["metadata"]["name"], format!("local-{n}"));
        assert_eq!(e["metadata"]["labels"]["etcd.k3s.cattle.io/snapshot-storage-node"], "n1");
        assert_eq!(e["spec"]["snapshotName"], n.as_str());
        assert_eq!(e["spec"]["nodeName"], "n1");
        assert_eq!(e["spec"]["location"], format!("file://{}", dir.join(n).display()));
        assert!(e["spec"].get("s3").is_none(), "{e}");
        let bytes = std::fs::read(dir.join(n)).unwrap();
        let size = e["status"]["size"].as_str().expect("a quantity string");
        assert_eq!(quantity_value(size), bytes.len() as u64);
        let created = chrono::DateTime::parse_from_rfc3339(e["status"]["creationTime"].as_str().unwrap()).unwrap();
        assert_eq!((created.timestamp(), created.offset().local_minus_utc()), (name_ts(n), 0));
        assert_eq!(e["status"]["readyToUse"], true);
        // Our metadata, as k3s would show the .metadata document it reads: strings only.
        let md = e["spec"]["metadata"].as_object().unwrap();
        assert!(md.values().all(|v| v.is_string()), "{e}");
        assert_eq!(md["sha256"], hex::encode(sha2::Sha256::digest(&bytes)));
        assert_eq!(md["compressed"], n.ends_with(".zip").to_string());
    }

    let yaml = run(&mut snap(&etcd, &dir, &["ls", "-o", "yaml"]));
    yaml.assert_ok();
    assert!(yaml.stdout.starts_with("apiVersion: v1\nitems:\n"), "keys sorted as kubectl's printer: {}", yaml.stdout);
    let doc: serde_json::Value = serde_yaml::from_str(&yaml.stdout).unwrap();
    assert_eq!(doc["kind"], "List");
    let from_yaml: Vec<&str> =
        doc["items"].as_array().unwrap().iter().map(|i| i["spec"]["snapshotName"].as_str().unwrap()).collect();
    assert_eq!(from_yaml, names);
    assert_eq!(doc["items"][0]["status"]["size"], items[0]["status"]["size"], "the size is a string in YAML too");
    // the aliases
    run(&mut snap(&etcd, &dir, &["list"])).assert_ok();
    run(&mut snap(&etcd, &dir, &["l"])).assert_ok();
}

#[test]
fn k3s_metadata_and_our_earlier_typed_metadata_are_read_locally() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put_many("/registry/k3s/", 5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    // A snapshot k3s took on this node a minute ago, with its extra metadata beside it.
    let theirs = format!("on-demand-n1-{}", chrono::Utc::now().timestamp() - 60);
    k3s::snapshot(&etcd, &dir, &theirs);
    k3s::write_local_metadata(&dir, &theirs, k3s::EXTRA_METADATA);
    // One of ours, whose document an earlier version wrote in the typed form.
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    let ours = files(&dir).into_iter().find(|f| *f != theirs).unwrap();
    let bytes = std::fs::read(dir.join(&ours)).unwrap();
    let typed = serde_json::json!({
        "name": ours, "nodeName": "n1", "size": bytes.len(), "createdAt": "2024-05-01T10:00:00.123Z",
        "compressed": false, "sha256": hex::encode(sha2::Sha256::digest(&bytes)), "etcdRevision": 7, "totalKey": 3,
    });
    std::fs::write(tmp.path().join(".metadata").join(&ours), serde_json::to_vec(&typed).unwrap()).unwrap();

    let r = run(&mut snap(&etcd, &dir, &["ls", "-o", "json"]));
    r.assert_ok();
    assert!(!r.stderr.contains("unreadable metadata"), "{}", r.stderr);
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let item =
        |n: &str| list["items"].as_array().unwrap().iter().find(|i| i["spec"]["snapshotName"] == n).cloned().unwrap();
    let k3s_doc: serde_json::Value = serde_json::from_slice(k3s::EXTRA_METADATA).unwrap();
    assert_eq!(item(&theirs)["spec"]["metadata"], k3s_doc, "k3s's map, as k3s shows it");
    let md = &item(&ours)["spec"]["metadata"];
    assert_eq!((md["etcdRevision"].as_str(), md["size"].as_str()), (Some("7"), Some(bytes.len().to_string().as_str())));

    // No sha256 is known for k3s's snapshot: its trailer vouches for it.
    let r = run(&mut snap(&etcd, &dir, &["status", &theirs]));
    r.assert_ok();
    assert!(r.stdout.contains("verified"), "{}", r.stdout);
}

#[test]
fn prune_keeps_the_newest_of_its_name_and_never_touches_other_files() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    for _ in 0..4 {
        run(&mut snap(&etcd, &dir, &["save", "--name", "keep"])).assert_ok();
    }
    run(&mut snap(&etcd, &dir, &["save", "--name", "other"])).assert_ok();
    let foreign = ["keep-n1-notanumber", "keep-n1-1.txt", "notes.txt", "keep-n1-5.part"];
    for f in foreign {
        std::fs::write(dir.join(f), b"not a snapshot").unwrap();
    }
    let mut before: Vec<String> =
        files(&dir).into_iter().filter(|f| f.starts_with("keep-n1-") && !foreign.contains(&f.as_str())).collect();
    before.sort_by_key(|f| f.rsplit('-').next().unwrap().parse::<i64>().unwrap());
    assert_eq!(before.len(), 4);
    run(&mut snap(&etcd, &dir, &["prune", "--name", "keep", "--snapshot-retention", "2"])).assert_ok();
    let after = files(&dir);
    for old in &before[..2] {
        assert!(!after.contains(old), "{old} should be pruned: {after:?}");
        assert!(!tmp.path().join(".metadata").join(old).exists(), "metadata of {old} should be gone");
    }
    for new in &before[2..] {
        assert!(after.contains(new), "{new} should be kept: {after:?}");
    }
    for f in foreign {
        assert!(after.contains(&f.to_string()), "{f} is not ours and must stay");
    }
    assert_eq!(after.iter().filter(|f| f.starts_with("other-")).count(), 1);
}

#[test]
fn retention_counts_snapshots_of_a_renamed_node_and_keeps_foreign_files() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    // Before the host was renamed, k3s wrote two `keep` snapshots there as `old-host` (one with
    // extra metadata), minutes ago (k3s #8099: they used to stay forever).
    let now = chrono::Utc::now().timestamp();
    let old: Vec<String> = [600, 300].iter().map(|ago| format!("keep-old-host-{}", now - ago)).collect();
    for o in &old {
        k3s::snapshot(&etcd, &dir, o);
    }
    k3s::write_local_metadata(&dir, &old[0], k3s::EXTRA_METADATA);
    // Files with the prefix that are not snapshots of ours, old as they may be, are never touched.
    let foreign = ["keep-old-host-notanumber", "keep-old-host-100.db", "keep-n1-1.zip.part", "keep-old-host"];
    for f in foreign {
        std::fs::write(dir.join(f), b"not a snapshot").unwrap();
    }
    for _ in 0..2 {
        run(&mut snap(&etcd, &dir, &["save", "--name", "keep"])).assert_ok();
    }
    let ours: Vec<String> =
        files(&dir).into_iter().filter(|f| f.starts_with("keep-n1-") && !foreign.contains(&f.as_str())).collect();
    assert_eq!(ours.len(), 2, "{:?}", files(&dir));

    let r = run(&mut snap(&etcd, &dir, &["prune", "--name", "keep", "--snapshot-retention", "2"]));
    r.assert_ok();
    let after = files(&dir);
    for o in &old {
        assert!(!after.contains(o), "{o} of the old node name is beyond the 2 newest: {after:?}");
        assert!(r.stdout.contains(o.as_str()), "reported: {}", r.stdout);
    }
    assert!(!tmp.path().join(".metadata").join(&old[0]).exists(), "its metadata goes with it");
    for n in &ours {
        assert!(after.contains(n), "{n} is among the 2 newest: {after:?}");
    }
    for f in foreign {
        assert!(after.contains(&f.to_string()), "{f} is not ours and must stay: {after:?}");
    }
}

#[test]
fn delete_removes_the_file_and_its_metadata() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    let name = files(&dir).remove(0);
    assert!(tmp.path().join(".metadata").join(&name).exists());
    run(&mut snap(&etcd, &dir, &["delete", &name])).assert_ok();
    assert!(files(&dir).is_empty());
    assert!(!tmp.path().join(".metadata").join(&name).exists());
}

#[test]
fn delete_of_a_name_that_is_not_there_warns_naming_it_and_succeeds() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    let kept = files(&dir).remove(0);
    // As k3s: a warning naming the snapshot, exit 0, and the other names still deleted.
    let r = run(&mut snap(&etcd, &dir, &["delete", "on-demand-n1-1", &kept]));
    r.assert_ok();
    let warning: Vec<&str> = r.stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warning.len(), 1, "{}", r.stderr);
    assert!(warning[0].contains("snapshot on-demand-n1-1 not found"), "{}", r.stderr);
    assert!(files(&dir).is_empty(), "the existing one is deleted: {:?}", files(&dir));
    let r = run(&mut snap(&etcd, &dir, &["delete", &kept]));
    r.assert_ok();
    assert!(r.stderr.contains(&format!("snapshot {kept} not found")), "{}", r.stderr);
}

#[test]
fn delete_refuses_names_with_a_path() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(tmp.path().join("x"), b"precious").unwrap();
    for bad in ["../x", "a/b", ".."] {
        let r = run(&mut snap(&etcd, &dir, &["delete", bad]));
        r.assert_fails_with("invalid snapshot name");
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    }
    assert_eq!(std::fs::read(tmp.path().join("x")).unwrap(), b"precious");
}

fn assert_nothing_written(dir: &Path) {
    let left: Vec<String> = files(dir);
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");
}

#[test]
fn dead_or_wrong_endpoint_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let port = tests::support::etcd::free_port();
    for endpoint in [format!("http://127.0.0.1:{port}"), "127.0.0.1:2379".to_string()] {
        let r = run(bin::cmd().args(["etcd-snapshot", "save", "--etcd-endpoints", &endpoint, "--dir"]).arg(&dir));
        r.assert_fails_with("etcd");
        assert_eq!(r.code, Some(1));
        assert!(r.stderr.contains(&endpoint) || r.stderr.contains("127.0.0.1"), "names the endpoint: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().filter(|l| l.starts_with("error")).count(), 1, "{}", r.stderr);
        assert_nothing_written(&dir);
    }
}

#[test]
fn etcd_killed_mid_stream_leaves_no_snapshot() {
    for v in EtcdVersion::ALL {
        let mut etcd = Etcd::start(v);
        etcd.load_mib("/big/", 300);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots");
        let mut child = snap(&etcd, &dir, &["save"])
            .env("K3S_SNAPSHOT_LOG", "debug")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until bytes are arriving (a .part file that grows), then kill etcd.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let growing = files(&dir).iter().any(|f| {
                f.ends_with(".part") && std::fs::metadata(dir.join(f)).map(|m| m.len() > 1 << 20).unwrap_or(false)
            });
            if growing {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "save never started writing");
            if child.try_wait().unwrap().is_some() {
                let out: Run = child.wait_with_output().unwrap().into();
                panic!("save finished before etcd could be killed: {:?}\n{}\n{}", out.code, out.stdout, out.stderr);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        etcd.kill();
        let out: Run = child.wait_with_output().unwrap().into();
        out.assert_fails_with("etcd snapshot stream");
        assert_eq!(out.code, Some(1));
        assert_nothing_written(&dir);
        assert!(files(&tmp.path().join(".metadata")).is_empty());
    }
}

#[test]
fn unwritable_snapshot_dir_is_a_clear_error() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    // A path below a regular file can never be created, even by root.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let dir: PathBuf = blocker.join("snapshots");
    let r = run(&mut snap(&etcd, &dir, &["save"]));
    r.assert_fails_with(&dir.display().to_string());
    assert_eq!(r.code, Some(1));
}

#[test]
fn retention_that_is_not_a_number_is_a_usage_error() {
    let r = run(bin::cmd().args(["etcd-snapshot", "prune", "--snapshot-retention", "five"]));
    r.assert_fails_with("five");
    assert_eq!(r.code, Some(2));
}

#[test]
fn unknown_output_format_is_a_usage_error() {
    let r = run(bin::cmd().args(["etcd-snapshot", "ls", "-o", "xml"]));
    r.assert_fails_with("xml");
    assert_eq!(r.code, Some(2));
}

#[test]
fn config_file_is_below_env_and_command_line_and_unknown_keys_warn() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "etcd-snapshot-dir: {}\nname: fromfile\nnode-name: filenode\nsnapshot-compress: true\nno-such-key: 1\n",
            dir.display()
        ),
    )
    .unwrap();
    let base = |c: &mut Command| {
        c.args(["etcd-snapshot", "save", "--etcd-endpoints", &etcd.endpoint, "--config"]).arg(&cfg);
    };
    // file only
    let mut c = bin::cmd();
    base(&mut c);
    let r = run(&mut c);
    r.assert_ok();
    assert!(r.stderr.contains("unknown key \"no-such-key\""), "warns: {}", r.stderr);
    assert!(
        files(&dir).iter().any(|f| f.starts_with("fromfile-filenode-") && f.ends_with(".zip")),
        "{:?}",
        files(&dir)
    );
    // env beats file
    let mut c = bin::cmd();
    base(&mut c);
    c.env("K3S_NODE_NAME", "envnode");
    run(&mut c).assert_ok();
    assert!(files(&dir).iter().any(|f| f.starts_with("fromfile-envnode-")), "{:?}", files(&dir));
    // command line beats env and file
    let mut c = bin::cmd();
    base(&mut c);
    c.env("K3S_NODE_NAME", "envnode").args(["--node-name", "clinode", "--name", "cli"]);
    run(&mut c).assert_ok();
    assert!(files(&dir).iter().any(|f| f.starts_with("cli-clinode-")), "{:?}", files(&dir));
}

#[test]
fn status_equals_etcdutl_field_for_field_and_reads_zips() {
    for v in EtcdVersion::ALL {
        let etcd = Etcd::start(v);
        etcd.put_many("/registry/st/", 40);
        let _ = etcd.ctl(&["del", "--prefix", "/registry/st/0001"]);
        let _ = etcd.ctl(&["lease", "grant", "600"]);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots");
        run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
        run(&mut snap(&etcd, &dir, &["save", "--snapshot-compress"])).assert_ok();
        let names = files(&dir);
        let raw = names.iter().find(|n| !n.ends_with(".zip")).unwrap();
        let zip = names.iter().find(|n| n.ends_with(".zip")).unwrap();
        let theirs = etcdutl_status(&dir.join(raw));
        for target in [raw.clone(), dir.join(raw).display().to_string()] {
            let r = run(&mut snap(&etcd, &dir, &["status", &target, "-o", "json"]));
            r.assert_ok();
            let ours: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            assert_eq!(ours, theirs, "{v:?} {target}");
        }
        // the zip holds a snapshot of the same etcd at a later or equal revision
        let r = run(&mut snap(&etcd, &dir, &["status", zip, "-o", "json"]));
        r.assert_ok();
        let z: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert!(z["revision"].as_i64() >= theirs["revision"].as_i64());
        assert_eq!(files(&dir).len(), 2, "status leaves no work files behind: {:?}", files(&dir));
        run(&mut snap(&etcd, &dir, &["status", raw])).assert_ok();
    }
}

#[test]
fn status_refuses_corrupt_truncated_and_foreign_files() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put_many("/k/", 20);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    let good = dir.join(files(&dir).remove(0));
    let bytes = std::fs::read(&good).unwrap();
    let bad = tmp.path().join("bad");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("flipped", flipped),
        ("truncated", bytes[..bytes.len() / 3].to_vec()),
        ("foreign", b"this is not a bbolt database at all".repeat(200)),
    ];
    for (what, content) in cases {
        std::fs::write(&bad, content).unwrap();
        let r = run(bin::cmd().args(["etcd-snapshot", "status"]).arg(&bad));
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        assert!(r.stderr.contains(&bad.display().to_string()), "{what}: names the file: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
    }
}

#[test]
fn status_checks_the_sha256_unless_told_to_skip_it() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put("/marker", "value-that-gets-a-flipped-byte");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    run(&mut snap(&etcd, &dir, &["save"])).assert_ok();
    let good = dir.join(files(&dir).remove(0));
    let r = run(bin::cmd().args(["etcd-snapshot", "status"]).arg(&good));
    r.assert_ok();
    assert!(r.stdout.contains(" verified"), "{}", r.stdout);

    // One byte of a value changed: every page is still well formed, only the hash can tell.
    let mut bytes = std::fs::read(&good).unwrap();
    let needle = b"value-that-gets-a-flipped-byte";
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the value is in the snapshot");
    bytes[at] = b'V';
    let bad = tmp.path().join("bad");
    std::fs::write(&bad, &bytes).unwrap();
    let r = run(bin::cmd().args(["etcd-snapshot", "status"]).arg(&bad));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("failed its sha256 integrity check"), "{}", r.stderr);
    let r = run(bin::cmd().args(["etcd-snapshot", "status", "--skip-hash-check"]).arg(&bad));
    r.assert_ok();
    assert!(r.stdout.contains(" not checked"), "{}", r.stdout);
}

#[test]
fn sigterm_during_a_save_leaves_no_part_and_no_snapshot() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.load_mib("/big/", 300);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let mut child = snap(&etcd, &dir, &["save"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !files(&dir)
        .iter()
        .any(|f| f.ends_with(".part") && std::fs::metadata(dir.join(f)).map(|m| m.len() > 1 << 20).unwrap_or(false))
    {
        assert!(std::time::Instant::now() < deadline, "save never started writing");
        if child.try_wait().unwrap().is_some() {
            let out: Run = child.wait_with_output().unwrap().into();
            panic!("save finished before it could be signalled: {}", out.stderr);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out: Run = child.wait_with_output().unwrap().into();
    out.assert_fails_with("cancelled");
    assert_eq!(out.code, Some(1));
    assert_nothing_written(&dir);
    assert!(files(&tmp.path().join(".metadata")).is_empty());
}
