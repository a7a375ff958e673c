//! `inspect` on values nobody should have written: a truncated protobuf, a length prefix far
//! past the value's end, bytes that are not UTF-8, JSON nested past any sane depth, an
//! encrypted value cut short. Each gives one error line naming its key; every other object is
//! still printed, and the command exits 1 at the end.

use tests::support::etcd::{Etcd, EtcdVersion};

use crate::inspect::{inspect, prod_objects, put_bytes, save};

tests::on_both_versions!(hostile_values_are_one_error_line_each_and_the_rest_is_exported,);

fn hostile_values_are_one_error_line_each_and_the_rest_is_exported(v: EtcdVersion) {
    let etcd = Etcd::start(v);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snaps");
    put_bytes(&etcd, &prod_objects());
    let good = prod_objects().into_iter().find(|(k, _)| k.ends_with("app-config")).unwrap().1;
    let mut huge = b"k8s\0".to_vec();
    huge.extend([0x12, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
    huge.extend([0u8; 16]);
    let deep = format!("{{\"kind\":\"Widget\",\"spec\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let bad: Vec<(String, Vec<u8>)> = vec![
        ("/registry/configmaps/prod/truncated".into(), good[..good.len() - 7].to_vec()),
        ("/registry/configmaps/prod/huge-length".into(), huge),
        ("/registry/configmaps/prod/not-utf8".into(), b"{\xff\xfe}".to_vec()),
        ("/registry/configmaps/prod/deep".into(), deep.into_bytes()),
        ("/registry/secrets/prod/cut".into(), b"k8s:enc:aescbc:v1:key1:short".to_vec()),
    ];
    put_bytes(&etcd, &bad);
    let snap = save(&etcd, &dir, "h", &[]).display().to_string();
    let cfg = crate::inspect::encryption_config(tmp.path()).display().to_string();
    let r = inspect(&dir, &["export", &snap, "--namespace", "prod", "--encryption-config", &cfg]);
    assert_eq!(r.code, Some(1), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    for (k, _) in &bad {
        let lines: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with(&format!("error: {k}: "))).collect();
        assert_eq!(lines.len(), 1, "one line for {k}:\n{}", r.stderr);
    }
    assert!(r.stderr.contains("5 key(s) could not be read"), "{}", r.stderr);
    for name in ["app-config", "db", "cbc", "box", "web", "w1"] {
        assert!(r.stdout.contains(&format!("  name: {name}\n")), "{name} still exported:\n{}", r.stdout);
    }
    // Listing never decodes values: every key is there.
    let keys = inspect(&dir, &["keys", &snap, "--prefix", "/registry/configmaps/prod/"]);
    keys.assert_ok();
    assert_eq!(keys.stdout.lines().count(), 1 + 5, "{}", keys.stdout);
}
