//! SSE-C: server-side encryption with a key the customer keeps
//! (`--etcd-s3-sse-customer-key-file FILE`). S3 encrypts each object with the 256-bit key sent in
//! the request and forgets the key; every request that writes or reads the object's bytes (PUT,
//! multipart initiation, each part, completion, GET, HEAD) must send it again:
//! `x-amz-server-side-encryption-customer-algorithm: AES256`, `-customer-key` (base64) and
//! `-customer-key-MD5` (base64 of its MD5, so S3 can tell a wrong key from a damaged header).
//!
//! The key never leaves this module in text: `Debug` shows the file and the key's MD5 (which S3
//! itself reports), errors name the file and what is wrong with it. Objects written with it also
//! carry the MD5 as user metadata ([`KEY_MD5_META`]), so that a reader without the key, or with
//! another one, is told so in one line even by a server that does not enforce SSE-C.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;

/// User metadata (without `x-amz-meta-`) naming the customer key's MD5 an object was written with.
pub(crate) const KEY_MD5_META: &str = "k3s-sse-customer-key-md5";

/// A 256-bit customer key read from its file.
#[derive(Clone)]
pub struct CustomerKey {
    path: PathBuf,
    /// The key, base64.
    key: String,
    /// Its MD5, base64.
    md5: String,
}

impl fmt::Debug for CustomerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomerKey").field("path", &self.path).field("md5", &self.md5).finish_non_exhaustive()
    }
}

impl CustomerKey {
    /// Reads the key: 32 raw bytes (`openssl rand 32 > FILE`), or their base64 (`openssl rand
    /// -base64 32`) or hex (`openssl rand -hex 32`) on one line. Refused when group or others may
    /// read the file, as an age identity is.
    pub fn from_file(path: &Path) -> Result<CustomerKey, String> {
        let shown = path.display();
        let flag = "--etcd-s3-sse-customer-key-file";
        let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read {flag} {shown}: {e}"))?;
        // The opened file's mode, so that a symlinked key (a mounted secret) is judged by its target.
        let md = f.metadata().map_err(|e| format!("cannot read {flag} {shown}: {e}"))?;
        if !md.is_file() {
            return Err(format!("{flag} {shown} is not a file"));
        }
        if md.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{flag} {shown} may be read by group or others (mode {:o}); chmod 600 it",
                md.permissions().mode() & 0o777
            ));
        }
        let mut raw = Vec::new();
        f.by_ref().take(1024).read_to_end(&mut raw).map_err(|e| format!("cannot read {flag} {shown}: {e}"))?;
        let key = parse_key(&raw).ok_or_else(|| {
            format!("{flag} {shown} does not hold a 256-bit key: give 32 raw bytes (openssl rand 32), or their base64 or hex on one line")
        })?;
        let md5 = minio::s3::utils::md5sum_hash(&key);
        Ok(CustomerKey { path: path.to_path_buf(), key: base64::engine::general_purpose::STANDARD.encode(key), md5 })
    }

    /// The file the key came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key's MD5 (base64), as S3 reports it.
    pub fn md5(&self) -> &str {
        &self.md5
    }

    /// The headers of every request on an object's bytes.
    pub(crate) fn headers(&self) -> [(&'static str, String); 3] {
        [
            ("x-amz-server-side-encryption-customer-algorithm", "AES256".to_string()),
            ("x-amz-server-side-encryption-customer-key", self.key.clone()),
            ("x-amz-server-side-encryption-customer-key-md5", self.md5.clone()),
        ]
    }
}

fn parse_key(raw: &[u8]) -> Option<[u8; 32]> {
    if let Ok(k) = <[u8; 32]>::try_from(raw) {
        return Some(k);
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    let decoded = match text.len() {
        64 => hex::decode(text).ok()?,
        _ => base64::engine::general_purpose::STANDARD.decode(text).ok()?,
    };
    <[u8; 32]>::try_from(decoded.as_slice()).ok()
}

/// Whether reading an object written with `written_with` (its [`KEY_MD5_META`], if any) can work
/// with `key`; `Err` says why not, in a line that ends with what to do.
pub(crate) fn check_key(written_with: Option<&str>, key: Option<&CustomerKey>) -> Result<(), String> {
    match (written_with, key) {
        (None, _) => Ok(()),
        (Some(_), None) => Err("it is encrypted with a customer key (SSE-C) and none was given; pass --etcd-s3-sse-customer-key-file with the key it was written with".into()),
        (Some(w), Some(k)) if w == k.md5() => Ok(()),
        (Some(w), Some(k)) => Err(format!(
            "it was encrypted with another customer key (SSE-C, key MD5 {w}) than the one in {} (key MD5 {}); pass the key it was written with",
            k.path().display(),
            k.md5()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(content: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn raw_base64_and_hex_keys_are_the_same_key() {
        let raw = [7u8; 32];
        let b64 = format!("{}\n", base64::engine::general_purpose::STANDARD.encode(raw));
        let hexed = format!("{}\n", hex::encode(raw));
        let keys: Vec<CustomerKey> = [raw.to_vec(), b64.into_bytes(), hexed.into_bytes()]
            .iter()
            .map(|c| CustomerKey::from_file(key_file(c, 0o600).path()).unwrap())
            .collect();
        assert!(keys.iter().all(|k| k.key == keys[0].key && k.md5 == keys[0].md5));
        let h = keys[0].headers();
        assert_eq!(h[0].1, "AES256");
        assert_eq!(h[2].1, minio::s3::utils::md5sum_hash(&raw));
    }

    #[test]
    fn bad_key_files_are_refused_without_showing_them() {
        for (content, mode, want) in [
            (vec![1u8; 31], 0o600, "does not hold a 256-bit key"),
            (b"not-a-key-hidden-value\n".to_vec(), 0o600, "does not hold a 256-bit key"),
            (vec![1u8; 32], 0o640, "chmod 600"),
        ] {
            let f = key_file(&content, mode);
            let e = CustomerKey::from_file(f.path()).unwrap_err();
            assert!(e.contains(want) && e.contains("--etcd-s3-sse-customer-key-file"), "{e}");
            assert!(!e.contains("hidden-value"), "{e}");
        }
        let k = CustomerKey::from_file(key_file(&[9u8; 32], 0o600).path()).unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.key), "{shown}");
    }

    #[test]
    fn a_missing_or_other_key_is_named() {
        let k = CustomerKey::from_file(key_file(&[9u8; 32], 0o600).path()).unwrap();
        assert!(check_key(None, None).is_ok());
        assert!(check_key(Some(k.md5()), Some(&k)).is_ok());
        assert!(check_key(Some(k.md5()), None).unwrap_err().contains("--etcd-s3-sse-customer-key-file"));
        assert!(check_key(Some("other"), Some(&k)).unwrap_err().contains("another customer key"));
    }
}
