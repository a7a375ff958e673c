//! `etcd-snapshot inspect` (issue 31) on real etcd 3.5.1 and 3.4.23: snapshots holding the
//! encodings the API server writes (built here with the protobuf types of the `k8s-pb` crate,
//! an independent source from the descriptors the binary decodes with, wrapped in
//! `k8s\0` + `runtime.Unknown`; a custom resource as JSON; Secrets encrypted at rest with
//! aescbc and secretbox), read back as kubectl shows them, exported for `kubectl apply`, and
//! diffed after a delete, an update and a re-create, against another snapshot and the live
//! cluster; zipped, age-encrypted and S3 sources. Hostile values are in `hostile/inspect.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use prost::Message;
use tests::support::age;
use tests::support::bin::{self, Run};
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::s3::S3Server;
use tests::support::server::{block_on, connect, DataDir};

use crate::deltas::{identity_flag, recipients_flag, revision, shipping_flags, strs, wait_following, wait_shipped};

tests::on_both_versions!(
    objects_read_back_as_kubectl_shows_them_and_export_for_apply,
    diff_after_delete_update_and_recreate_against_a_snapshot_and_the_live_cluster,
    zipped_encrypted_and_s3_snapshots_inspect_like_plain_ones,
    a_secret_at_a_revision_inside_an_encrypted_s3_chain,
);

/// The aescbc and secretbox keys of the tests' EncryptionConfiguration.
pub(crate) const AESCBC_KEY: [u8; 32] = [0x11; 32];
pub(crate) const SECRETBOX_KEY: [u8; 32] = [0x22; 32];

/// `k8s\0` + `runtime.Unknown` around `obj`, as the API server's protobuf storage writes it.
pub(crate) fn k8s_value(api_version: &str, kind: &str, obj: &impl Message) -> Vec<u8> {
    let u = Unknown {
        type_meta: Some(TypeMeta { api_version: Some(api_version.into()), kind: Some(kind.into()) }),
        raw: Some(obj.encode_to_vec()),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut v = b"k8s\0".to_vec();
    v.extend(u.encode_to_vec());
    v
}

/// ObjectMeta as the API server stores it: the non-pointer fields written even when empty, a
/// uid, a creation time and managed fields (which `export` must remove).
pub(crate) fn stored_meta(name: &str, ns: &str, labels: &[(&str, &str)]) -> meta::ObjectMeta {
    meta::ObjectMeta {
        name: Some(name.into()),
        generate_name: Some(String::new()),
        namespace: Some(ns.into()),
        self_link: Some(String::new()),
        uid: Some(format!("uid-{name}")),
        resource_version: Some(String::new()),
        generation: Some(0),
        creation_timestamp: Some(meta::Time { seconds: Some(1_714_573_920), nanos: Some(0) }),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        managed_fields: vec![meta::ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            operation: Some("Update".into()),
            api_version: Some("v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(meta::FieldsV1 { raw: Some(br#"{"f:data":{}}"#.to_vec()) }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(crate) fn secret(name: &str, password: &str) -> Vec<u8> {
    let s = core::Secret {
        metadata: Some(stored_meta(name, "prod", &[])),
        data: [("password".to_string(), password.as_bytes().to_vec())].into(),
        r#type: Some("Opaque".into()),
        immutable: None,
        string_data: BTreeMap::new(),
    };
    k8s_value("v1", "Secret", &s)
}

fn deployment(image: &str, replicas: i32) -> Vec<u8> {
    let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
    let d = apps::Deployment {
        metadata: Some(stored_meta("web", "prod", &[("app", "web")])),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(replicas),
            selector: Some(meta::LabelSelector { match_labels: labels.clone(), ..Default::default() }),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta { labels, ..Default::default() }),
                spec: Some(core::PodSpec {
                    containers: vec![core::Container {
                        name: Some("web".into()),
                        image: Some(image.into()),
                        ports: vec![core::ContainerPort {
                            container_port: Some(80),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: Some(apps::DeploymentStatus { replicas: Some(replicas), ..Default::default() }),
    };
    k8s_value("apps/v1", "Deployment", &d)
}

/// A value as Kubernetes' aescbc provider stores it (`k8s:enc:aescbc:v1:key1:`, the IV, then
/// AES-256-CBC with PKCS#7 padding), the ciphertext made by the stock `openssl enc`, so the
/// decryption is checked against a writer that is not ours.
fn aescbc_by_openssl(key: &[u8; 32], iv: &[u8; 16], plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["enc", "-aes-256-cbc", "-K", &hex::encode(key), "-iv", &hex::encode(iv)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("openssl cannot run ({e}): run `cargo xtask provision` (it installs Debian openssl)")
        });
    child.stdin.take().unwrap().write_all(plain).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl enc failed");
    let mut v = b"k8s:enc:aescbc:v1:key1:".to_vec();
    v.extend_from_slice(iv);
    v.extend_from_slice(&out.stdout);
    v
}

/// The objects of the tests' `prod` namespace: key → value.
pub(crate) fn prod_objects() -> Vec<(String, Vec<u8>)> {
    let ns = core::Namespace { metadata: Some(stored_meta("prod", "", &[])), ..Default::default() };
    let cm = core::ConfigMap {
        metadata: Some(stored_meta("app-config", "prod", &[("tier", "backend")])),
        data: [("LOG_LEVEL".to_string(), "debug".to_string())].into(),
        ..Default::default()
    };
    let enc = |provider: &str, key: &[u8; 32], nonce: &[u8], name: &str| {
        k3s_snapshot_core::inspect::at_rest::encrypt_for_tests(provider, "key1", key, nonce, &secret(name, "s3cr3t"))
    };
    vec![
        ("/registry/namespaces/prod".into(), k8s_value("v1", "Namespace", &ns)),
        ("/registry/configmaps/prod/app-config".into(), k8s_value("v1", "ConfigMap", &cm)),
        ("/registry/secrets/prod/db".into(), secret("db", "hunter2")),
        ("/registry/secrets/prod/cbc".into(), aescbc_by_openssl(&AESCBC_KEY, &[3; 16], &secret("cbc", "s3cr3t"))),
        ("/registry/secrets/prod/box".into(), enc("secretbox", &SECRETBOX_KEY, &[4; 24], "box")),
        ("/registry/deployments/prod/web".into(), deployment("nginx:1.25", 3)),
        (
            "/registry/example.com/widgets/prod/w1".into(),
            br#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w1","namespace":"prod","uid":"u1"},"spec":{"size":3}}"#.to_vec(),
        ),
    ]
}

/// k3s's EncryptionConfiguration with both keys.
pub(crate) fn encryption_config(dir: &Path) -> PathBuf {
    let b = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    let p = dir.join("encryption-config.json");
    let doc = serde_json::json!({"kind":"EncryptionConfiguration","apiVersion":"apiserver.config.k8s.io/v1","resources":[{"resources":["secrets"],"providers":[
        {"aescbc":{"keys":[{"name":"key1","secret":b(&AESCBC_KEY)}]}},
        {"secretbox":{"keys":[{"name":"key1","secret":b(&SECRETBOX_KEY)}]}},
        {"identity":{}}]}]});
    std::fs::write(&p, doc.to_string()).unwrap();
    p
}

/// Writes byte values into etcd.
pub(crate) fn put_bytes(etcd: &Etcd, kvs: &[(String, Vec<u8>)]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
        for (k, v) in kvs {
            c.put(k.as_bytes(), v.clone(), None).await.unwrap();
        }
    });
}

pub(crate) fn delete(etcd: &Etcd, key: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
        c.delete(key, None).await.unwrap();
    });
}

/// `etcd-snapshot save --name NAME` into `dir`; the saved file.
pub(crate) fn save(etcd: &Etcd, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "save", "--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--name", name, "--dir"]);
    c.arg(dir).args(extra);
    bin::run(&mut c).assert_ok();
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}-")))
        .collect();
    found.sort();
    found.pop().expect("the snapshot was saved")
}

/// `etcd-snapshot inspect ARGS --dir DIR` (a data dir under `dir` for the scratch files).
pub(crate) fn inspect(dir: &Path, args: &[&str]) -> Run {
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "inspect"]).args(args).arg("--dir").arg(dir).arg("--data-dir").arg(dir.join("dd"));
    bin::run(&mut c)
}

/// The YAML documents of `export`, parsed.
fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("\n---\n").map(|d| serde_yaml::from_str(d).unwrap()).collect()
}

fn objects_read_back_as_kubectl_shows_them_and_export_for_apply(v: EtcdVersion) {
    let etcd = Etcd::start(v);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snaps");
    put_bytes(&etcd, &prod_objects());
    put_bytes(&etcd, &[("/registry/other/plain".into(), b"just text".to_vec())]);
    let snap = save(&etcd, &dir, "a", &[]);
    let snap_s = snap.display().to_string();

    // keys: every key with its revision, version, lease and size.
    let keys = inspect(&dir, &["keys", &snap_s, "--prefix", "/registry/secrets/prod/"]);
    keys.assert_ok();
    let db_size = secret("db", "hunter2").len().to_string();
    let line = keys.stdout.lines().find(|l| l.ends_with("/registry/secrets/prod/db")).expect("db listed");
    assert!(line.split_whitespace().any(|w| w == db_size), "{line}");
    assert_eq!(keys.stdout.lines().count(), 4, "header and three secrets:\n{}", keys.stdout);

    // get: the Deployment as kubectl shows it (status kept; empty strings left out).
    let dep = inspect(&dir, &["get", &snap_s, "/registry/deployments/prod/web", "-o", "json"]);
    dep.assert_ok();
    let got: serde_json::Value = serde_json::from_str(&dep.stdout).unwrap();
    let expected = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "prod", "uid": "uid-web", "creationTimestamp": "2024-05-01T14:32:00Z",
            "labels": {"app": "web"},
            "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {}}}]},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.25", "ports": [{"containerPort": 80, "protocol": "TCP"}]}]}}},
        "status": {"replicas": 3}
    });
    assert_eq!(got, expected);

    // Encrypted Secrets: listed as encrypted without the config, never printed as garbage.
    let no_key = inspect(&dir, &["get", &snap_s, "/registry/secrets/prod/cbc"]);
    no_key.assert_fails_with("encrypted at rest (aescbc, key \"key1\"): give --encryption-config");
    assert!(no_key.stdout.is_empty(), "{}", no_key.stdout);

    // export: manifests to apply, decrypted with the config, server fields and status gone.
    let cfg = encryption_config(tmp.path());
    let cfg_s = cfg.display().to_string();
    let ex = inspect(&dir, &["export", &snap_s, "--namespace", "prod", "--encryption-config", &cfg_s]);
    ex.assert_ok();
    assert!(
        ex.stdout.starts_with(&format!("# from snapshot {} at revision ", snap.file_name().unwrap().to_string_lossy())),
        "{}",
        ex.stdout
    );
    let all = docs(&ex.stdout);
    let by_name = |kind: &str, name: &str| {
        all.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} in:\n{}", ex.stdout))
            .clone()
    };
    for d in &all {
        for f in ["uid", "resourceVersion", "creationTimestamp", "managedFields", "selfLink"] {
            assert!(d["metadata"].get(f).is_none(), "{f} left in {d}");
        }
        assert!(d.get("status").is_none(), "status left in {d}");
    }
    assert_eq!(
        by_name("Deployment", "web"),
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}},
            "spec": expected["spec"].clone()})
    );
    let pw = base64::engine::general_purpose::STANDARD.encode("s3cr3t");
    for name in ["cbc", "box"] {
        assert_eq!(
            by_name("Secret", name),
            serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "prod"}, "data": {"password": pw}, "type": "Opaque"})
        );
    }
    assert_eq!(by_name("ConfigMap", "app-config")["data"], serde_json::json!({"LOG_LEVEL": "debug"}));
    assert_eq!(by_name("Namespace", "prod")["metadata"], serde_json::json!({"name": "prod"}));
    assert_eq!(
        by_name("Widget", "w1"),
        serde_json::json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1", "namespace": "prod"}, "spec": {"size": 3}})
    );
    assert!(!ex.stdout.contains("just text"));

    // --kind narrows to one kind.
    let only = inspect(&dir, &["export", &snap_s, "--namespace", "prod", "--kind", "ConfigMap"]);
    only.assert_ok();
    assert_eq!(docs(&only.stdout).len(), 1, "{}", only.stdout);
}

fn diff_after_delete_update_and_recreate_against_a_snapshot_and_the_live_cluster(v: EtcdVersion) {
    let etcd = Etcd::start(v);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snaps");
    put_bytes(&etcd, &prod_objects());
    let a = save(&etcd, &dir, "a", &[]);
    let at_a = etcd.revision();
    delete(&etcd, "/registry/configmaps/prod/app-config");
    put_bytes(&etcd, &[("/registry/secrets/prod/db".into(), secret("db", "changed"))]);
    delete(&etcd, "/registry/deployments/prod/web");
    put_bytes(&etcd, &[("/registry/deployments/prod/web".into(), deployment("nginx:1.27", 2))]);
    put_bytes(&etcd, &[("/registry/configmaps/prod/new".into(), b"{\"kind\":\"ConfigMap\"}".to_vec())]);
    let b = save(&etcd, &dir, "b", &[]);
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());

    let d = inspect(&dir, &["diff", &a_s, &b_s]);
    d.assert_ok();
    for line in [
        "- /registry/configmaps/prod/app-config",
        "+ /registry/configmaps/prod/new",
        "~ /registry/deployments/prod/web",
        "~ /registry/secrets/prod/db",
    ] {
        assert!(d.stdout.lines().any(|l| l == line), "{line} in:\n{}", d.stdout);
    }
    assert!(!d.stdout.contains("/registry/secrets/prod/cbc"), "unchanged keys are not listed:\n{}", d.stdout);
    let summary = |res: &str| {
        d.stdout
            .lines()
            .find(|l| l.starts_with(res) && l.contains(" prod "))
            .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>())
    };
    assert_eq!(summary("configmaps"), Some(vec!["1", "1", "0"]), "{}", d.stdout);
    assert_eq!(summary("deployments"), Some(vec!["0", "0", "1"]), "{}", d.stdout);

    // The snapshot B still holds both versions of the Secret; the state at A's revision inside
    // B is A's.
    let h = inspect(&dir, &["get", &b_s, "/registry/secrets/prod/db", "--history", "-o", "json"]);
    h.assert_ok();
    assert_eq!(h.stdout.matches("# revision ").count(), 2, "{}", h.stdout);
    let hunter = base64::engine::general_purpose::STANDARD.encode("hunter2");
    assert!(
        h.stdout.find(&hunter).unwrap()
            < h.stdout.find(&base64::engine::general_purpose::STANDARD.encode("changed")).unwrap()
    );
    let at = format!("{b_s}@{at_a}");
    let same = inspect(&dir, &["diff", &a_s, &at]);
    same.assert_ok();
    assert!(same.stdout.contains("(no differences)"), "{}", same.stdout);

    // Against the live cluster: one more change since B.
    delete(&etcd, "/registry/secrets/prod/box");
    let live = inspect(&dir, &["diff", &b_s, "--live", "--etcd-endpoints", &etcd.endpoint, "-o", "json"]);
    live.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&live.stdout).unwrap();
    assert_eq!(
        doc["changes"],
        serde_json::json!([{"key": "/registry/secrets/prod/box", "change": "removed", "resource": "secrets", "namespace": "prod", "name": "box"}])
    );
}

fn zipped_encrypted_and_s3_snapshots_inspect_like_plain_ones(v: EtcdVersion) {
    let etcd = Etcd::start(v);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snaps");
    put_bytes(&etcd, &prod_objects());
    let key = age::keygen(tmp.path(), "inspect");
    let (rcpt, id) = (key.recipients.display().to_string(), key.identity.display().to_string());
    let s3_flags: Vec<String> =
        s3.server_flags("snaps").into_iter().map(|f| f.replacen("--etcd-s3", "--s3", 1)).collect();
    let s3_args: Vec<&str> = s3_flags.iter().map(String::as_str).collect();
    let mut save_args = vec!["--snapshot-compress", "--snapshot-encryption-recipients-file", &rcpt];
    save_args.extend(&s3_args);
    let saved = save(&etcd, &dir, "enc", &save_args);
    let name = saved.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with(".zip.age"), "{name}");
    let want = "/registry/deployments/prod/web";
    // Local file (zip + age), by name in the snapshot dir, and from S3.
    let mut by_s3 = vec!["get", &name, want, "--snapshot-encryption-identity-file", &id];
    by_s3.extend(&s3_args);
    for args in [vec!["get", &name, want, "--snapshot-encryption-identity-file", &id], by_s3] {
        let r = inspect(&dir, &args);
        r.assert_ok();
        assert!(r.stdout.contains("image: nginx:1.25"), "{}", r.stdout);
    }
    let no_id = inspect(&dir, &["get", &name, want]);
    no_id.assert_fails_with("encryption-identity-file");
    assert!(std::fs::read_dir(dir.join("dd/server/inspect")).unwrap().next().is_none(), "scratch files are removed");
}

/// The walk-through of the README: a Secret as it was at a revision (and at a time) inside a
/// delta chain kept only in S3, encrypted with age, read on a node that has nothing but the S3
/// settings and the identity, then exported for `kubectl apply`.
fn a_secret_at_a_revision_inside_an_encrypted_s3_chain(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let key = age::keygen(dd.tmp.path(), "chain");
    let mut flags = shipping_flags(&s3);
    flags.push(recipients_flag(&key));
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    let put = |k: &str, val: Vec<u8>| {
        block_on(async { connect(&dd).await.client.put(k, val, None).await.unwrap() });
    };
    put("/registry/secrets/prod/db", secret("db", "hunter2"));
    let first = revision(&dd);
    let between = chrono::Utc::now() + chrono::Duration::seconds(3);
    while chrono::Utc::now() < between + chrono::Duration::seconds(2) {
        put("/registry/configmaps/prod/tick", b"{}".to_vec());
        // Pacing, not waiting for anything: the target time needs whole seconds of history
        // around it, written at a modest rate.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    put("/registry/secrets/prod/db", secret("db", "changed"));
    let last = revision(&dd);
    wait_shipped(&s, last);
    s.stop();

    let tmp = tempfile::tempdir().unwrap();
    let s3_flags = s3.server_flags("snaps");
    let id = identity_flag(&key);
    let get = |extra: &[&str]| {
        let mut args = vec!["get", "latest", "/registry/secrets/prod/db", "-o", "json", &id];
        args.extend(strs(&s3_flags));
        args.extend(extra);
        inspect(tmp.path(), &args)
    };
    let password = |r: &Run| {
        r.assert_ok();
        let o: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let b = o["data"]["password"].as_str().unwrap().to_string();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
    };
    let at_first = get(&["--to-revision", &first.to_string()]);
    assert_eq!(password(&at_first), "hunter2");
    assert!(at_first.stderr.contains("delta segments to revision"), "{}", at_first.stderr);
    assert_eq!(password(&get(&["--deltas"])), "changed");
    let t = between.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(password(&get(&["--to-time", &t])), "hunter2");
    // Beyond the chain's end: refused in one line.
    get(&["--to-revision", &(last + 1000).to_string()]).assert_fails_with("reach only revision");

    let mut args = vec!["export", "latest", "--prefix", "/registry/secrets/prod/", "--to-revision"];
    let first_s = first.to_string();
    args.push(&first_s);
    args.push(&id);
    args.extend(strs(&s3_flags));
    let ex = inspect(tmp.path(), &args);
    ex.assert_ok();
    assert!(ex.stdout.contains(&format!("at revision {first}: /registry/secrets/prod/db")), "{}", ex.stdout);
    assert!(ex.stdout.contains(&base64::engine::general_purpose::STANDARD.encode("hunter2")), "{}", ex.stdout);
}
