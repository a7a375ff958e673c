//! Values the API server encrypted at rest (`k8s:enc:<provider>:v1:<key name>:` then the
//! ciphertext), decrypted with the keys of an `EncryptionConfiguration` file (k3s writes it at
//! `${data-dir}/server/cred/encryption-config.json`).
//!
//! - `aescbc`: a 16-byte IV, then AES-CBC with PKCS#7 padding (AES-128/192/256 by key length);
//! - `secretbox`: a 24-byte nonce, then NaCl's secretbox (XSalsa20-Poly1305, the 16-byte tag
//!   first), a 32-byte key.
//!
//! Other providers (`aesgcm`, `kms`) are recognised and reported as encrypted, never decrypted.
//! Key material never appears in `Debug`, errors or logs.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;

use crate::{Error, Result};

/// The prefix every encrypted value starts with.
pub const PREFIX: &[u8] = b"k8s:enc:";

/// The encryption keys of an `EncryptionConfiguration`, by provider and key name.
#[derive(Default)]
pub struct KeyRing {
    keys: HashMap<(String, String), Vec<u8>>,
    source: String,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<String> = self.keys.keys().map(|(p, n)| format!("{p}/{n}")).collect();
        names.sort();
        f.debug_struct("KeyRing").field("source", &self.source).field("keys", &names).finish()
    }
}

/// What the prefix of an encrypted value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub provider: String,
    pub key_name: String,
    pub data: &'a [u8],
}

/// Splits `k8s:enc:<provider>:v1:<name>:<data>` (kms: `k8s:enc:kms:v1:<name>:`, v2 likewise);
/// `None` when the value does not start with [`PREFIX`] or the prefix is cut short.
pub fn envelope(value: &[u8]) -> Option<Envelope<'_>> {
    let rest = value.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(4, |&b| b == b':');
    let provider = parts.next()?;
    let _version = parts.next()?;
    let name = parts.next()?;
    let data = parts.next()?;
    Some(Envelope {
        provider: String::from_utf8_lossy(provider).into_owned(),
        key_name: String::from_utf8_lossy(name).into_owned(),
        data,
    })
}

#[derive(serde::Deserialize)]
struct Config {
    #[serde(default)]
    resources: Vec<Resource>,
}

#[derive(serde::Deserialize)]
struct Resource {
    #[serde(default)]
    providers: Vec<HashMap<String, serde_yaml::Value>>,
}

#[derive(serde::Deserialize)]
struct KeyList {
    #[serde(default)]
    keys: Vec<NamedKey>,
}

#[derive(serde::Deserialize)]
struct NamedKey {
    name: String,
    secret: String,
}

impl KeyRing {
    /// Reads an `EncryptionConfiguration` (JSON or YAML). Errors name the file and the key,
    /// never the secret.
    pub fn from_file(path: &Path) -> Result<KeyRing> {
        let bad = |detail: String| {
            Error::Invalid(format!(
                "encryption config {}: {detail}; give the API server's EncryptionConfiguration (k3s: server/cred/encryption-config.json)",
                path.display()
            ))
        };
        let text = std::fs::read_to_string(path).map_err(Error::io("read", path))?;
        let cfg: Config =
            serde_yaml::from_str(&text).map_err(|e| bad(format!("not an EncryptionConfiguration ({e})")))?;
        let mut keys = HashMap::new();
        for r in cfg.resources {
            for p in r.providers {
                for (provider, body) in p {
                    if provider != "aescbc" && provider != "secretbox" {
                        continue;
                    }
                    let list: KeyList = serde_yaml::from_value(body)
                        .map_err(|e| bad(format!("provider {provider}: its keys do not read ({e})")))?;
                    for k in list.keys {
                        let secret = base64::engine::general_purpose::STANDARD
                            .decode(k.secret.trim())
                            .map_err(|_| bad(format!("key {} of {provider} is not base64", k.name)))?;
                        let ok = match provider.as_str() {
                            "aescbc" => matches!(secret.len(), 16 | 24 | 32),
                            _ => secret.len() == 32,
                        };
                        if !ok {
                            return Err(bad(format!("key {} of {provider} has {} bytes", k.name, secret.len())));
                        }
                        keys.insert((provider.clone(), k.name), secret);
                    }
                }
            }
        }
        Ok(KeyRing { keys, source: path.display().to_string() })
    }

    /// A ring holding one key (tests, and callers with a key from elsewhere).
    pub fn with_key(provider: &str, name: &str, secret: Vec<u8>) -> KeyRing {
        let mut keys = HashMap::new();
        keys.insert((provider.to_string(), name.to_string()), secret);
        KeyRing { keys, source: "given key".into() }
    }

    /// Decrypts an encrypted value; the error says why in one line (no key of that name, a
    /// provider that cannot be decrypted here, a wrong key or damaged data).
    pub fn decrypt(&self, env: &Envelope<'_>) -> std::result::Result<Vec<u8>, String> {
        let key = match env.provider.as_str() {
            "aescbc" | "secretbox" => {
                self.keys.get(&(env.provider.clone(), env.key_name.clone())).ok_or_else(|| {
                    format!(
                        "encrypted with {} key {:?}, which {} does not hold",
                        env.provider, env.key_name, self.source
                    )
                })?
            }
            p => return Err(format!("encrypted by the {p} provider, which is not decrypted offline")),
        };
        match env.provider.as_str() {
            "aescbc" => aescbc(key, env.data),
            _ => secretbox(key, env.data),
        }
    }
}

fn aescbc(key: &[u8], data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, KeyIvInit};
    if data.len() < 32 || !data.len().is_multiple_of(16) {
        return Err(format!("aescbc data of {} bytes is not an IV and whole blocks", data.len()));
    }
    let (iv, ct) = data.split_at(16);
    let wrong = |_| "aescbc: the key does not decrypt it (wrong key or damaged data)".to_string();
    match key.len() {
        16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(key, iv)
            .map_err(|e| e.to_string())?
            .decrypt_padded_vec_mut::<Pkcs7>(ct)
            .map_err(wrong),
        24 => cbc::Decryptor::<aes::Aes192>::new_from_slices(key, iv)
            .map_err(|e| e.to_string())?
            .decrypt_padded_vec_mut::<Pkcs7>(ct)
            .map_err(wrong),
        _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(key, iv)
            .map_err(|e| e.to_string())?
            .decrypt_padded_vec_mut::<Pkcs7>(ct)
            .map_err(wrong),
    }
}

fn secretbox(key: &[u8], data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use crypto_secretbox::aead::{Aead, KeyInit};
    use crypto_secretbox::XSalsa20Poly1305;
    if data.len() < 24 + 16 {
        return Err(format!("secretbox data of {} bytes is shorter than a nonce and a tag", data.len()));
    }
    let (nonce, boxed) = data.split_at(24);
    let cipher = XSalsa20Poly1305::new_from_slice(key).map_err(|e| e.to_string())?;
    cipher
        .decrypt(nonce.into(), boxed)
        .map_err(|_| "secretbox: the key does not open it (wrong key or damaged data)".to_string())
}

/// Encrypts as the API server does (for tests: the same layouts, the other direction).
pub fn encrypt_for_tests(provider: &str, key_name: &str, key: &[u8], nonce: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut out = format!("k8s:enc:{provider}:v1:{key_name}:").into_bytes();
    out.extend_from_slice(nonce);
    match provider {
        "aescbc" => {
            use aes::cipher::{block_padding::Pkcs7, BlockEncryptMut, KeyIvInit};
            let ct = cbc::Encryptor::<aes::Aes256>::new_from_slices(key, nonce)
                .expect("32-byte key, 16-byte iv")
                .encrypt_padded_vec_mut::<Pkcs7>(plain);
            out.extend_from_slice(&ct);
        }
        _ => {
            use crypto_secretbox::aead::{Aead, KeyInit};
            let ct = crypto_secretbox::XSalsa20Poly1305::new_from_slice(key)
                .expect("32-byte key")
                .encrypt(nonce.into(), plain)
                .expect("secretbox seals");
            out.extend_from_slice(&ct);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_providers_round_trip_and_a_wrong_key_is_one_line() {
        let key = [7u8; 32];
        for (p, nonce) in [("aescbc", vec![1u8; 16]), ("secretbox", vec![2u8; 24])] {
            let v = encrypt_for_tests(p, "k1", &key, &nonce, b"k8s\0secret body");
            let env = envelope(&v).unwrap();
            assert_eq!((env.provider.as_str(), env.key_name.as_str()), (p, "k1"));
            let ring = KeyRing::with_key(p, "k1", key.to_vec());
            assert_eq!(ring.decrypt(&env).unwrap(), b"k8s\0secret body");
            let wrong = KeyRing::with_key(p, "k1", vec![8u8; 32]);
            let e = wrong.decrypt(&env).unwrap_err();
            assert!(e.contains("wrong key") && !e.contains('\n'), "{e}");
            let other = KeyRing::with_key(p, "k2", key.to_vec());
            assert!(other.decrypt(&env).unwrap_err().contains("\"k1\""));
        }
    }

    #[test]
    fn encryption_config_reads_k3s_json_and_debug_hides_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("encryption-config.json");
        let secret = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        std::fs::write(
            &f,
            format!(
                r#"{{"kind":"EncryptionConfiguration","apiVersion":"apiserver.config.k8s.io/v1","resources":[{{"resources":["secrets"],"providers":[{{"aescbc":{{"keys":[{{"name":"aescbckey","secret":"{secret}"}}]}}}},{{"identity":{{}}}}]}}]}}"#
            ),
        )
        .unwrap();
        let ring = KeyRing::from_file(&f).unwrap();
        let shown = format!("{ring:?}");
        assert!(shown.contains("aescbc/aescbckey") && !shown.contains(&secret), "{shown}");
        std::fs::write(&f, r#"{"resources":[{"providers":[{"aescbc":{"keys":[{"name":"k","secret":"c2hvcnQ="}]}}]}]}"#)
            .unwrap();
        let e = KeyRing::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("key k of aescbc has 5 bytes") && !e.contains("c2hvcnQ"), "{e}");
    }
}
