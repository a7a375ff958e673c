//! `${data-dir}/server/db/etcd/config` is etcd's own YAML config file, on a real k3s node and on
//! ours: `etcd-snapshot --data-dir` finds a TLS etcd from a file written the way k3s writes it
//! (and from the `endpoints:` file of earlier versions of ours), and our server writes the same
//! format and runs etcd from it, on etcd 3.5.1 and 3.4.23.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k3s_snapshot_core::etcd::EtcdClientConfig;
use tests::support::bin;
use tests::support::etcd::{free_port, EtcdVersion};
use tests::support::server::{block_on, etcd_pids, files, DataDir};

tests::on_both_versions!(
    etcd_snapshot_finds_etcd_from_a_config_file_written_as_k3s_writes_it,
    our_server_writes_etcd_config_and_runs_etcd_from_it,
);

/// A CA (cert PEM, issuer) with the given common name.
fn ca(cn: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(p, key))
}

/// Writes `<dir>/<name>.crt` and `.key`, a leaf signed by `issuer`.
fn leaf(dir: &Path, name: &str, issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, sans: &[&str], server: bool) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.use_authority_key_identifier_extension = true;
    p.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// `server/tls/etcd/` with k3s's file names and roles (pkg/daemons/control/deps/deps.go):
/// `server-ca` signs etcd's serving pair `server-client` and the tools' pair `client`;
/// `peer-ca` signs `peer-server-client`.
fn k3s_etcd_tls(data_dir: &Path, node_ip: &str) -> PathBuf {
    let tls = data_dir.join("server/tls/etcd");
    std::fs::create_dir_all(&tls).unwrap();
    let (server_ca, server_issuer) = ca("etcd-server-ca");
    let (peer_ca, peer_issuer) = ca("etcd-peer-ca");
    std::fs::write(tls.join("server-ca.crt"), server_ca).unwrap();
    std::fs::write(tls.join("peer-ca.crt"), peer_ca).unwrap();
    let sans = ["localhost", "127.0.0.1", node_ip];
    leaf(&tls, "server-client", &server_issuer, &sans, true);
    leaf(&tls, "client", &server_issuer, &[], false);
    leaf(&tls, "peer-server-client", &peer_issuer, &sans, true);
    tls
}

/// The config file as k3s writes it on a node whose address is `ip`, with free ports instead of
/// 2379-2382. Read from k3s: pkg/daemons/executor/executor.go (`ETCDConfig`, `ToConfigFile`: the
/// struct marshalled by sigs.k8s.io/yaml, so through JSON with keys sorted; written to
/// `<data-dir>/server/db/etcd/config`, the etcd data dir's `config`) and pkg/etcd/etcd.go
/// (`cluster()`: listen-client-urls loopback then node address, advertise-client-urls the node
/// address, client-transport-security with etcd's serving pair `server-client` and
/// `server-ca`, peer-transport-security with `peer-server-client` and `peer-ca`, snapshot-count
/// 10000, election-timeout 5000, heartbeat-interval 500, logger zap, log-outputs [stderr],
/// listen-client-http-urls on loopback, experimental-initial-corrupt-check true and the watch
/// progress notify interval, a time.Duration of 5 s as JSON nanoseconds).
fn k3s_config(data_dir: &Path, ip: &str, name: &str, ports: (u16, u16, u16, u16)) -> String {
    let (client, peer, metrics, http) = ports;
    let d = data_dir.display();
    format!(
        "advertise-client-urls: https://{ip}:{client}
client-transport-security:
  cert-file: {d}/server/tls/etcd/server-client.crt
  client-cert-auth: true
  key-file: {d}/server/tls/etcd/server-client.key
  trusted-ca-file: {d}/server/tls/etcd/server-ca.crt
data-dir: {d}/server/db/etcd
election-timeout: 5000
experimental-initial-corrupt-check: true
experimental-watch-progress-notify-interval: 5000000000
heartbeat-interval: 500
initial-advertise-peer-urls: https://{ip}:{peer}
initial-cluster: {name}=https://{ip}:{peer}
initial-cluster-state: new
listen-client-http-urls: https://127.0.0.1:{http}
listen-client-urls: https://127.0.0.1:{client},https://{ip}:{client}
listen-metrics-urls: http://127.0.0.1:{metrics}
listen-peer-urls: https://127.0.0.1:{peer},https://{ip}:{peer}
log-outputs:
- stderr
logger: zap
name: {name}
peer-transport-security:
  cert-file: {d}/server/tls/etcd/peer-server-client.crt
  client-cert-auth: true
  key-file: {d}/server/tls/etcd/peer-server-client.key
  trusted-ca-file: {d}/server/tls/etcd/peer-ca.crt
snapshot-count: 10000
socket-options: {{}}
"
    )
}

/// etcd started the way k3s's executor starts it: from the config file alone. Killed on drop.
struct K3sEtcd {
    child: Child,
    log: PathBuf,
}

impl Drop for K3sEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `client` reaches etcd (a status answer over TLS with the client certificate).
fn wait_ready(etcd: &mut K3sEtcd, client: &EtcdClientConfig) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if block_on(client.connect()).is_ok() {
            return;
        }
        if let Some(st) = etcd.child.try_wait().unwrap() {
            panic!("etcd exited ({st}):\n{}", std::fs::read_to_string(&etcd.log).unwrap_or_default());
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not answer within 60s:\n{}",
            std::fs::read_to_string(&etcd.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn revision_of(r: &bin::Run) -> i64 {
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    v["revision"].as_i64().unwrap()
}

fn etcd_snapshot_finds_etcd_from_a_config_file_written_as_k3s_writes_it(v: EtcdVersion) {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("k3s");
    let ip = "127.0.0.2";
    let tls = k3s_etcd_tls(&data_dir, ip);
    let etcd_dir = data_dir.join("server/db/etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let config = etcd_dir.join("config");
    let ports = (free_port(), free_port(), free_port(), free_port());
    std::fs::write(&config, k3s_config(&data_dir, ip, "node1-3f2a9c1e", ports)).unwrap();

    let log = tmp.path().join("etcd.log");
    let child = Command::new(v.etcd())
        .arg(format!("--config-file={}", config.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut etcd = K3sEtcd { child, log };
    // What k3s's own tools use: loopback, `server-ca.crt`, `client.{crt,key}`.
    let k3s_client = EtcdClientConfig {
        endpoints: vec![format!("https://127.0.0.1:{}", ports.0)],
        cacert: Some(tls.join("server-ca.crt")),
        cert: Some(tls.join("client.crt")),
        key: Some(tls.join("client.key")),
    };
    wait_ready(&mut etcd, &k3s_client);
    let revision = block_on(async {
        let mut c = k3s_client.connect().await.unwrap();
        c.client.put("/registry/k3s-node", "yes", None).await.unwrap().header().unwrap().revision()
    });

    // Found from the file: the loopback listener, trusted-ca-file, the tools' pair beside it.
    let found = EtcdClientConfig::for_data_dir(&data_dir).unwrap();
    assert_eq!(found, k3s_client);

    let dd = data_dir.display().to_string();
    let save = |name: &str| {
        let r = bin::run(
            bin::cmd()
                .args(["etcd-snapshot", "save", "--data-dir", &dd, "--node-name", "node1"])
                .args(["--name", name]),
        );
        r.assert_ok();
        let snaps = files(&data_dir.join("server/db/snapshots"));
        let file = snaps.into_iter().find(|f| f.starts_with(&format!("{name}-node1-"))).expect("the snapshot");
        let status = bin::run(bin::cmd().args(["etcd-snapshot", "status", "-o", "json", "--data-dir", &dd]).arg(&file));
        status.assert_ok();
        assert_eq!(revision_of(&status), revision, "the snapshot is not of this etcd");
    };
    save("from-k3s-config");

    // The `endpoints:` file an earlier version of our server wrote is still read.
    k3s_client.save(&config).unwrap();
    save("from-old-config");
    drop(etcd);
}

fn yaml(path: &Path) -> serde_json::Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn our_server_writes_etcd_config_and_runs_etcd_from_it(v: EtcdVersion) {
    let dd = DataDir::on(v, "node-a", "127.0.0.3");
    let s = dd.start(&["--etcd-disable-snapshots", "--etcd-arg=quota-backend-bytes=4294967296"]);
    let root = dd.path();
    let config = dd.db().join("etcd/config");
    let c = yaml(&config);
    let tls = root.join("server/tls/etcd");
    let at = |f: &str| tls.join(f).display().to_string();
    assert_eq!(c["name"], "node-a");
    assert_eq!(c["data-dir"], dd.db().join("etcd").display().to_string());
    assert_eq!(
        c["listen-client-urls"],
        format!("https://127.0.0.1:{p},https://127.0.0.3:{p}", p = dd.client_port),
        "loopback beside the node address, as k3s"
    );
    assert_eq!(c["advertise-client-urls"], format!("https://127.0.0.3:{}", dd.client_port));
    assert_eq!(c["initial-cluster"], format!("node-a=https://127.0.0.3:{}", dd.peer_port));
    assert_eq!(c["initial-cluster-state"], "new");
    assert_eq!(c["client-transport-security"]["cert-file"], at("server-client.crt"));
    assert_eq!(c["client-transport-security"]["key-file"], at("server-client.key"));
    assert_eq!(c["client-transport-security"]["trusted-ca-file"], at("server-ca.crt"));
    assert_eq!(c["client-transport-security"]["client-cert-auth"], true);
    assert_eq!(c["peer-transport-security"]["cert-file"], at("peer-server-client.crt"));
    assert_eq!(c["peer-transport-security"]["trusted-ca-file"], at("peer-ca.crt"));
    assert_eq!(c["peer-transport-security"]["client-cert-auth"], true);
    assert_eq!(c["logger"], "zap");
    assert_eq!(c["quota-backend-bytes"], 4294967296i64, "--etcd-arg goes into the file");

    // etcd runs from the file alone, as k3s runs it.
    let pids = etcd_pids(&root);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
    assert_eq!(args[1..], [format!("--config-file={}", config.display())]);

    // Tools find it: loopback, the tools' client pair.
    let found = EtcdClientConfig::for_data_dir(&root).unwrap();
    assert_eq!(found.endpoints, [format!("https://127.0.0.1:{}", dd.client_port)]);
    assert_eq!(found.cert.as_deref(), Some(tls.join("client.crt").as_path()));
    block_on(async {
        let mut conn = found.connect().await.unwrap();
        conn.client.put("from-the-config", "yes", None).await.unwrap();
    });
    s.stop();
}
