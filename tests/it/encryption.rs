//! Encrypted snapshots (issue 15): age on our side, checked with the stock `age` CLI and etcd's own
//! tools; S3 server-side encryption, checked on a server that keeps it (moto's).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k3s_snapshot_core::store::{PutOptions, SnapshotStore};
use sha2::Digest;
use tests::support::age::{self, AgeKey};
use tests::support::bin::{self, run};
use tests::support::etcd::{etcdutl_status, Etcd, EtcdVersion};
use tests::support::moto::MotoServer;
use tests::support::s3::S3Server;
use tests::support::server::{all_keys, assert_reset_done, block_on, files, kv, put, save, wait_until, DataDir};

tests::on_both_versions!(encrypted_zip_restores_with_the_identity_and_leaves_no_plaintext);

/// `etcd-snapshot <args>` against `etcd` with a local dir and the S3 flags of `s3`'s `snaps`.
fn snap(etcd: &Etcd, dir: &Path, s3: &S3Server, args: &[&str]) -> Command {
    let mut c = bin::cmd();
    c.arg("etcd-snapshot")
        .args(args)
        .args(["--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"])
        .arg(dir)
        .args(s3.server_flags("snaps"));
    c
}

/// Decrypts `src` with the age CLI, unzips it when it is a `.zip.age`, and checks the result with
/// `etcdutl snapshot status`; returns etcdutl's status.
fn decrypt_and_check(key: &AgeKey, src: &Path, work: &Path) -> serde_json::Value {
    let name = src.file_name().unwrap().to_string_lossy().into_owned();
    let plain = work.join(name.strip_suffix(".age").expect("an .age name"));
    age::decrypt(key, src, &plain);
    let db = if name.ends_with(".zip.age") {
        let mut a = zip::ZipArchive::new(std::fs::File::open(&plain).unwrap()).unwrap();
        assert_eq!(a.len(), 1);
        let mut e = a.by_index(0).unwrap();
        let db = work.join(e.name());
        std::io::copy(&mut e, &mut std::fs::File::create(&db).unwrap()).unwrap();
        db
    } else {
        plain
    };
    etcdutl_status(&db)
}

fn metadata(dir: &Path, name: &str) -> std::collections::BTreeMap<String, String> {
    serde_json::from_slice(&std::fs::read(dir.join("../.metadata").join(name)).unwrap()).unwrap()
}

fn sha256_hex(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// The interop promise: what we store, locally and in S3, plain and zipped, is an age file
/// the stock CLI decrypts with the operator's key into a snapshot that etcdutl accepts; nothing
/// unencrypted is written on the way; the metadata and `ls` say it is encrypted and to whom.
#[test]
fn encrypted_on_demand_snapshots_decrypt_with_the_age_cli_local_and_from_s3() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put_many("/registry/secrets/", 40);
    // Larger than a part, so the upload follows the encrypted file in one streamed request.
    etcd.load_mib("/registry/big/", 24);
    let revision = etcd.revision();
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let key = age::keygen(tmp.path(), "ops");
    let dir = tmp.path().join("snapshots");
    let recipients = format!("--snapshot-encryption-recipients-file={}", key.recipients.display());
    for compress in [false, true] {
        let mut args = vec!["save", recipients.as_str()];
        if compress {
            args.push("--snapshot-compress");
        }
        let before = files(&dir);
        let out = run(snap(&etcd, &dir, &s3, &args).env("K3S_SNAPSHOT_LOG", "debug"));
        out.assert_ok();
        // The upload follows the encrypted file as it is written; unzipped, in one request of
        // the length announced up front (a wrong length made it fail at the end and start over).
        assert!(!out.stderr.contains("uploading the saved file"), "the pipelined upload failed: {}", out.stderr);
        if !compress {
            assert!(out.stderr.contains("uploaded in one streamed request"), "{}", out.stderr);
        }
        let new: Vec<String> = files(&dir).into_iter().filter(|f| !before.contains(f)).collect();
        assert_eq!(new.len(), 1, "one file, the encrypted one: {new:?}");
        let name = &new[0];
        let suffix = if compress { ".zip.age" } else { ".age" };
        assert!(name.starts_with("on-demand-n1-") && name.ends_with(suffix), "{name}");
        let local = dir.join(name);
        assert!(age::is_age_file(&local), "{name} is not an age file");

        let m = metadata(&dir, name);
        assert_eq!((m["encrypted"].as_str(), m["encryptionRecipients"].as_str()), ("true", key.public.as_str()));
        assert_eq!(m["sha256"], sha256_hex(&local), "the sha256 of the stored (encrypted) bytes");
        assert_eq!(m["size"], std::fs::metadata(&local).unwrap().len().to_string());
        assert_eq!(m["compressed"], compress.to_string());

        let work = tempfile::tempdir().unwrap();
        let st = decrypt_and_check(&key, &local, work.path());
        assert_eq!(st["revision"].as_i64(), Some(revision), "{st}");

        // The S3 copy, downloaded with our store (which checks it against its metadata), then
        // decrypted by the age CLI.
        let from_s3 = tempfile::tempdir().unwrap();
        let store = block_on(s3_backend::S3Store::connect(&s3.config("snaps"))).unwrap();
        let got = block_on(s3_backend::download_snapshot(&store, name, from_s3.path(), None)).unwrap();
        assert_eq!(sha256_hex(&got), m["sha256"], "the S3 object is the local file");
        let st = decrypt_and_check(&key, &got, work.path());
        assert_eq!(st["revision"].as_i64(), Some(revision), "{st}");

        // `status` reads it with the identity, and names the flag without one.
        let id = format!("--snapshot-encryption-identity-file={}", key.identity.display());
        let out = run(&mut snap(&etcd, &dir, &s3, &["status", name, "-o", "json", &id]));
        out.assert_ok();
        let ours: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(ours["revision"].as_i64(), Some(revision), "{ours}");
        let out = run(&mut snap(&etcd, &dir, &s3, &["status", name]));
        out.assert_fails_with("--etcd-snapshot-encryption-identity-file");
        let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one line: {}", out.stderr);
        assert!(errors[0].contains(name.as_str()), "{}", errors[0]);
    }
    // Nothing but the encrypted snapshots in the snapshot dir: no plaintext, no .part left.
    assert!(files(&dir).iter().all(|f| f.ends_with(".age")), "{:?}", files(&dir));

    // `ls -o json` shows it, for the local and the S3 rows alike, with the public key only.
    let out = run(&mut snap(&etcd, &dir, &s3, &["ls", "-o", "json"]));
    out.assert_ok();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{list}");
    for item in items {
        assert_eq!(item["spec"]["metadata"]["encrypted"], "true", "{item}");
        assert_eq!(item["spec"]["metadata"]["encryptionRecipients"], key.public.as_str(), "{item}");
    }
    assert!(!out.stdout.contains(&key.secret()), "a private key in ls");
    // Retention treats .age names like the others.
    let out = run(&mut snap(&etcd, &dir, &s3, &["prune", "--snapshot-retention=1", "--s3-retention=1"]));
    out.assert_ok();
    assert_eq!(files(&dir).len(), 1, "{:?}", files(&dir));
    let remaining = files(&s3.root.join("snaps")).into_iter().filter(|f| f.ends_with(".age")).count();
    assert_eq!(remaining, 1, "{:?}", files(&s3.root.join("snaps")));
}

/// The save path writes no plaintext at all: a large snapshot (a few MiB) is encrypted as it
/// streams, so no prefix of etcd's bytes ever lands in the snapshot dir, and the `.part` is an age
/// file from its first byte (checked while the save runs).
#[test]
fn no_plaintext_reaches_the_disk_while_saving() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.load_mib("/big/", 24);
    let tmp = tempfile::tempdir().unwrap();
    let key = age::keygen(tmp.path(), "ops");
    let dir = tmp.path().join("snapshots");
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "save", "--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"])
        .arg(&dir)
        .arg(format!("--etcd-snapshot-encryption-recipients-file={}", key.recipients.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut seen_part = false;
    loop {
        for f in files(&dir) {
            assert!(f.ends_with(".age") || f.ends_with(".age.part"), "{f}: only age files are written");
            let mut head = Vec::new();
            if let Ok(file) = std::fs::File::open(dir.join(&f)) {
                std::io::Read::read_to_end(&mut std::io::Read::take(file, 64), &mut head).unwrap();
            }
            // bbolt's first page holds its meta magic 0xED0CDAED near the start.
            assert!(!head.windows(4).any(|w| w == [0xED, 0xDA, 0x0C, 0xED]), "{f} holds plaintext");
            if f.ends_with(".part") && head.len() >= 21 {
                assert!(head.starts_with(b"age-encryption.org/v1"), "{f} is not an age file");
                seen_part = true;
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(child.wait().unwrap().success());
    assert!(seen_part, "the .part file was never seen while the 24 MiB save ran");
    let names = files(&dir);
    assert_eq!(names.len(), 1, "{names:?}");
    let work = tempfile::tempdir().unwrap();
    decrypt_and_check(&key, &dir.join(&names[0]), work.path());
}

/// A scheduled snapshot of an encrypting server, and its S3 copy, decrypt with the age CLI; then
/// the S3 copy restores by object name with the identity.
#[test]
fn encrypted_scheduled_snapshot_decrypts_and_restores_by_s3_name() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(EtcdVersion::V3_5);
    let keys = tempfile::tempdir().unwrap();
    let key = age::keygen(keys.path(), "ops");
    let mut flags = s3.server_flags("snaps");
    flags.push(format!("--etcd-snapshot-encryption-recipients-file={}", key.recipients.display()));
    flags.push("--etcd-snapshot-schedule-cron=@every 1s".into());
    flags.push("--etcd-snapshot-retention=0".into());
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = dd.start(&args);
    put(&dd, &[("/registry/secrets/db-password", "hunter2")]);
    let object = |s3: &S3Server| {
        files(&s3.root.join("snaps"))
            .into_iter()
            .find(|f| f.starts_with("etcd-snapshot-node-a-") && f.ends_with(".age"))
    };
    // A snapshot taken after the key was written: the ones before may not hold it.
    let first = files(&dd.snapshots());
    wait_until("a scheduled snapshot in s3", Duration::from_secs(60), || {
        object(&s3).is_some_and(|o| !first.contains(&o))
            && files(&dd.snapshots().join("../.metadata")).iter().any(|m| object(&s3).as_deref() == Some(m.as_str()))
    });
    assert!(!s.log_text().contains(&key.secret()), "a private key in the server's log");
    s.stop();
    let name = object(&s3).unwrap();
    let local = dd.snapshots().join(&name);
    assert!(local.is_file(), "{name} not in {:?}", files(&dd.snapshots()));
    assert!(files(&dd.snapshots()).iter().all(|f| f.ends_with(".age")), "{:?}", files(&dd.snapshots()));
    let work = tempfile::tempdir().unwrap();
    decrypt_and_check(&key, &local, work.path());
    decrypt_and_check(&key, &s3.root.join("snaps").join(&name), work.path());

    // Restore from the bucket by name: the local copy goes away first, so it is downloaded.
    for f in files(&dd.snapshots()) {
        std::fs::remove_file(dd.snapshots().join(f)).unwrap();
    }
    let id = format!("--etcd-snapshot-encryption-identity-file={}", key.identity.display());
    let mut reset = s3.server_flags("snaps");
    reset.extend(["--cluster-reset".to_string(), format!("--cluster-reset-restore-path={name}"), id]);
    let args: Vec<&str> = reset.iter().map(String::as_str).collect();
    let r = dd.run(&args);
    assert_reset_done(&r, &dd);
    assert!(!r.stderr.contains(&key.secret()));
    // The download keeps its (encrypted) name; no plaintext stays.
    assert_eq!(files(&dd.snapshots()), vec![name.clone()]);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("/registry/secrets/db-password", "hunter2")]));
    s.stop();
}

fn encrypted_zip_restores_with_the_identity_and_leaves_no_plaintext(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let keys = tempfile::tempdir().unwrap();
    let key = age::keygen(keys.path(), "ops");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1"), ("/registry/b", "2")]);
    let rec = format!("--etcd-snapshot-encryption-recipients-file={}", key.recipients.display());
    let plain = save(&dd, &[rec.as_str()]);
    let zipped = save(&dd, &[rec.as_str(), "--snapshot-compress"]);
    assert!(plain.to_string_lossy().ends_with(".age") && zipped.to_string_lossy().ends_with(".zip.age"));
    put(&dd, &[("/registry/c", "3")]);
    s.stop();
    let id = format!("--etcd-snapshot-encryption-identity-file={}", key.identity.display());
    for snap in [&zipped, &plain] {
        let before = files(&dd.snapshots());
        let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display()), &id]);
        assert_reset_done(&r, &dd);
        assert_eq!(files(&dd.snapshots()), before, "a decrypted or extracted copy was left");
        let s = dd.start(&["--etcd-disable-snapshots"]);
        assert_eq!(all_keys(&dd), kv(&[("/registry/a", "1"), ("/registry/b", "2")]), "{}", snap.display());
        s.stop();
    }
}

/// SSE: every way an object is written (one PUT, our signed streamed PUT, a multipart upload of
/// buffered or of streamed parts) asks S3 for the server-side encryption of `--etcd-s3-sse`, and S3 (moto's) keeps it.
#[test]
fn sse_headers_reach_the_s3_server_on_every_kind_of_put() {
    let moto = MotoServer::start();
    moto.create_bucket("snaps");
    for (sse, kms) in [
        (s3_backend::ServerSideEncryption::Aes256, None),
        (s3_backend::ServerSideEncryption::Kms { key_id: Some("alias/k3s-backups".into()) }, Some("alias/k3s-backups")),
    ] {
        let store = block_on(s3_backend::S3Store::connect(&s3_backend::S3Config {
            sse: Some(sse.clone()),
            // Bodies above 16 MiB of known length go up in streamed parts of 5 MiB.
            stream_limits: Some((16 << 20, 5 << 20)),
            ..moto.config("snaps")
        }))
        .unwrap();
        let body = |n: usize| {
            let data = bytes::Bytes::from(vec![0x5au8; n]);
            futures::StreamExt::boxed(futures::stream::iter(
                data.chunks(1 << 20).map(|c| Ok(data.slice_ref(c))).collect::<Vec<_>>(),
            ))
        };
        let opts = |hint: Option<u64>| PutOptions { size_hint: hint, ..PutOptions::default() };
        let cases = [
            ("small-n1-1", 1000usize, Some(1000u64)),    // one PUT
            ("streamed-n1-2", 12 << 20, Some(12 << 20)), // our signed streamed PUT
            ("multipart-n1-3", 20 << 20, None),          // multipart: size unknown
            ("parts-n1-4", 21 << 20, Some(21 << 20)),    // multipart of streamed parts
        ];
        for (key, n, hint) in cases {
            let stored = block_on(store.put(key, body(n), opts(hint))).unwrap();
            assert_eq!(stored, n as u64);
            let (_, got) = block_on(store.get(key)).unwrap();
            let got: Vec<bytes::Bytes> = block_on(futures::TryStreamExt::try_collect(got)).unwrap();
            assert!(got.concat() == vec![0x5au8; n], "{key}: the object reads back as it was sent");
            let d = block_on(store.head_details(key)).unwrap().expect("stored");
            let expected = match sse {
                s3_backend::ServerSideEncryption::Aes256 => "AES256",
                _ => "aws:kms",
            };
            assert_eq!(d.sse.as_deref(), Some(expected), "{key}: {d:?}");
            if let Some(k) = kms {
                assert!(d.sse_kms_key_id.as_deref().is_some_and(|id| id.contains(k)), "{key}: {d:?}");
            }
        }
    }
    // And from the command line, the snapshot and its metadata document.
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put("/k", "v");
    let tmp = tempfile::tempdir().unwrap();
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "save", "--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"])
        .arg(tmp.path().join("snapshots"))
        .args(moto.flags("snaps"))
        .args(["--s3-sse", "AES256"]);
    let out = run(&mut c);
    out.assert_ok();
    let name = files(&tmp.path().join("snapshots")).pop().unwrap();
    let store = block_on(s3_backend::S3Store::connect(&moto.config("snaps"))).unwrap();
    for key in [name.clone(), format!(".metadata/{name}")] {
        let d = block_on(store.head_details(&key)).unwrap().expect("uploaded");
        assert_eq!(d.sse.as_deref(), Some("AES256"), "{key}: {d:?}");
    }
}
