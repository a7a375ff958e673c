//! Snapshot artifacts exactly as real k3s writes them, for tests that check that this tool lives
//! beside k3s. Facts from k3s's source (read, not copied):
//! - pkg/etcd/snapshot.go: a snapshot is what etcd's `snapshot.Save` client writes (the
//!   Maintenance `Snapshot` stream, SHA-256 trailer included; `etcdctl snapshot save` is the
//!   same client), named `<name>-<node>-<unix secs>`. `saveSnapshotMetadata` writes the data of
//!   the `k3s-etcd-snapshot-extra-metadata` ConfigMap, a `map[string]string` marshalled by
//!   `encoding/json` (compact, keys sorted), to `<snapshot-dir>/../.metadata/<file>` with mode
//!   0700, only when that ConfigMap has data.
//! - pkg/etcd/s3/s3.go: the object is `folder/<file>`, the metadata `folder/.metadata/<file>`
//!   (content type `application/json`), both with user metadata under the canonical MIME names of
//!   `k3s-cluster-id`, `k3s-node-name` and `k3s-token-hash` (`K3s-Cluster-Id`, …).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use k3s_snapshot_core::store::{PutOptions, SnapshotStore};

use super::etcd::Etcd;
use super::s3::S3Server;

/// A `.metadata` document as k3s writes it: its extra-metadata ConfigMap's data.
pub const EXTRA_METADATA: &[u8] = br#"{"foo":"bar","team":"platform"}"#;

/// The token hash k3s would record (12 hex digits of a SHA-256), here of a made-up token.
pub const TOKEN_HASH: &str = "5e884898da28";

/// Takes a snapshot of `etcd` the way k3s does, into `dir/name` (mode 0600, as k3s chmods it).
pub fn snapshot(etcd: &Etcd, dir: &Path, name: &str) -> PathBuf {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).unwrap();
    let path = dir.join(name);
    let o = etcd.ctl(&["snapshot", "save", path.to_str().unwrap()]);
    assert!(o.status.success(), "etcdctl snapshot save: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// Writes k3s's `.metadata/<name>` beside `snapshot_dir`.
pub fn write_local_metadata(snapshot_dir: &Path, name: &str, doc: &[u8]) -> PathBuf {
    let md = snapshot_dir.parent().unwrap().join(".metadata");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&md).unwrap();
    let path = md.join(name);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o700).open(&path).unwrap();
    std::io::Write::write_all(&mut f, doc).unwrap();
    path
}

/// The user metadata k3s's minio client sends with both objects of a snapshot.
fn user_metadata(node: &str) -> Vec<(String, String)> {
    vec![
        ("K3s-Cluster-Id".into(), "2f5f3c8e-93f6-4c4b-9a83-5d1c7d6f0a11".into()),
        ("K3s-Node-Name".into(), node.into()),
        ("K3s-Token-Hash".into(), TOKEN_HASH.into()),
    ]
}

/// Uploads `file` (a snapshot k3s took on `node`) and, when given, its extra-metadata document,
/// under `folder` of `bucket`, as k3s's S3 client does.
pub fn upload(s3: &S3Server, bucket: &str, folder: &str, file: &Path, node: &str, metadata: Option<&[u8]>) {
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let body = Bytes::from(std::fs::read(file).unwrap());
    let content_type = if name.ends_with(".zip") { "application/zip" } else { "application/octet-stream" };
    super::server::block_on(async {
        let mut cfg = s3.config(bucket);
        cfg.folder = folder.into();
        let store = s3_backend::S3Store::connect(&cfg).await.unwrap();
        put(&store, &name, body, content_type, node).await;
        if let Some(doc) = metadata {
            put(&store, &format!(".metadata/{name}"), Bytes::copy_from_slice(doc), "application/json", node).await;
        }
    });
}

async fn put(store: &s3_backend::S3Store, key: &str, body: Bytes, content_type: &str, node: &str) {
    let opts = PutOptions {
        content_type: content_type.into(),
        user_metadata: user_metadata(node),
        size_hint: Some(body.len() as u64),
        ranges: None,
    };
    let stream = futures::StreamExt::boxed(futures::stream::once(async move { Ok(body) }));
    store.put(key, stream, opts).await.unwrap();
}
