//! The cluster token, `K10<sha256 hex of the cluster CA PEM>::server:<secret>` as k3s writes it.
//!
//! The CA hash lets a joiner check the CA it fetched over the supervisor API before trusting it;
//! the secret authenticates it. Snapshot metadata stores [`Token::metadata_hash`], the short hash
//! of the secret only, so that a restore onto a fresh data dir (new CA, same `--token`) does not
//! warn, and a restore with another secret does.

use sha2::{Digest, Sha256};

use crate::layout::DataDir;
use crate::{Error, Result};

const PREFIX: &str = "K10";
const SEPARATOR: &str = "::server:";

/// A cluster token. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    ca_hash: Option<String>,
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("ca_hash", &self.ca_hash).field("secret", &"<redacted>").finish()
    }
}

/// Lowercase hex SHA-256 of the cluster CA as served by `/cacerts`.
pub fn ca_hash(ca_pem: &[u8]) -> String {
    hex::encode(Sha256::digest(ca_pem))
}

/// The metadata token hash of a token given in any form (full or bare secret).
pub fn metadata_token_hash(token: &str) -> String {
    k3s_snapshot_core::name::token_hash(Token::parse(token).secret())
}

impl Token {
    /// Parses the full form, or takes the whole string as a bare secret (`--token mysecret`).
    /// `K10<hash>::server:` with nothing after it parses to an empty secret (never to the whole
    /// string, which anyone can compute from `/cacerts`); [`Token::is_empty`] tells.
    pub fn parse(s: &str) -> Token {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix(PREFIX) {
            if let Some((hash, secret)) = rest.split_once(SEPARATOR) {
                if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Token { ca_hash: Some(hash.to_ascii_lowercase()), secret: secret.trim().to_string() };
                }
            }
        }
        Token { ca_hash: None, secret: s.to_string() }
    }

    /// A token with no secret authenticates nobody and is refused wherever one is taken.
    pub fn is_empty(&self) -> bool {
        self.secret.is_empty()
    }

    /// A new random secret bound to a CA.
    pub fn generate(ca_pem: &[u8]) -> Token {
        let bytes: [u8; 16] = rand::random();
        Token { ca_hash: Some(ca_hash(ca_pem)), secret: hex::encode(bytes) }
    }

    /// The same secret bound to a CA: what a joiner stores once the CA it fetched passed the check.
    pub fn bound_to(&self, ca_pem: &[u8]) -> Token {
        Token { ca_hash: Some(ca_hash(ca_pem)), secret: self.secret.clone() }
    }

    /// Writes `server/token` (0600), replacing what is there.
    pub fn store(&self, dd: &DataDir) -> Result<()> {
        k3s_snapshot_core::store::write_file_atomic(&dd.token(), format!("{}\n", self.full()).as_bytes())?;
        Ok(())
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn ca_hash(&self) -> Option<&str> {
        self.ca_hash.as_deref()
    }

    /// `K10<hash>::server:<secret>`, or the bare secret when no CA is bound.
    pub fn full(&self) -> String {
        match &self.ca_hash {
            Some(h) => format!("{PREFIX}{h}{SEPARATOR}{}", self.secret),
            None => self.secret.clone(),
        }
    }

    /// What snapshot metadata records: `name::token_hash` of the secret.
    pub fn metadata_hash(&self) -> String {
        k3s_snapshot_core::name::token_hash(&self.secret)
    }

    /// Whether a presented credential (full token or bare secret) is this token, compared in
    /// constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let p = Token::parse(presented);
        if self.is_empty() || p.is_empty() {
            return false;
        }
        if let (Some(a), Some(b)) = (&p.ca_hash, &self.ca_hash) {
            if !ct_eq(a.as_bytes(), b.as_bytes()) {
                return false;
            }
        }
        ct_eq(p.secret.as_bytes(), self.secret.as_bytes())
    }

    /// Loads `server/token`, or creates it: from `--token` when given, else a random secret.
    /// A `--token` whose secret differs from the stored one is refused, as k3s refuses to start
    /// with a token that does not match its data.
    pub fn ensure(dd: &DataDir, given: Option<&str>, ca_pem: &[u8]) -> Result<Token> {
        let path = dd.token();
        let hash = ca_hash(ca_pem);
        let stored = match std::fs::read_to_string(&path) {
            Ok(s) => Some(Token::parse(&s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Io { action: "read token", path, cause: e }),
        };
        if stored.as_ref().is_some_and(Token::is_empty) {
            return Err(Error::Token(format!(
                "{} holds no token secret (it is empty, or ends in '::server:' with nothing after it): write the cluster's token into it, or remove it and start with --token (K3S_TOKEN) or none to have one generated",
                path.display()
            )));
        }
        let given = given.filter(|g| !g.trim().is_empty()).map(Token::parse);
        if given.as_ref().is_some_and(Token::is_empty) {
            return Err(Error::Token(
                "--token ends in '::server:' with no secret after it: give the whole token of the cluster".into(),
            ));
        }
        if let Some(g) = &given {
            if let Some(h) = g.ca_hash() {
                if h != hash {
                    return Err(Error::Token(format!(
                        "--token carries CA hash {h} but this server's CA hashes to {hash}; give the bare secret or the token of this cluster"
                    )));
                }
            }
        }
        let token = match (stored, given) {
            (Some(s), Some(g)) if s.secret != g.secret => {
                return Err(Error::Token(format!(
                    "--token does not match the token stored in {}; start with the original token, or remove that file if the cluster's data was made with the new one",
                    path.display()
                )))
            }
            (Some(s), _) => s,
            (None, Some(g)) => g,
            (None, None) => Token::generate(ca_pem),
        };
        let token = Token { ca_hash: Some(hash), secret: token.secret };
        let want = format!("{}\n", token.full());
        if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
            k3s_snapshot_core::store::write_file_atomic(&path, want.as_bytes())?;
        }
        Ok(token)
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_form_round_trips() {
        let t = Token::generate(b"ca");
        let p = Token::parse(&t.full());
        assert_eq!(p, t);
        assert!(t.full().starts_with("K10"));
        assert!(t.full().contains("::server:"));
        assert!(t.matches(&t.full()));
        assert!(t.matches(t.secret()));
        assert!(!t.matches("nope"));
    }

    #[test]
    fn bare_secret_is_a_token_without_ca() {
        let t = Token::parse("mysecret");
        assert_eq!((t.ca_hash(), t.secret()), (None, "mysecret"));
        assert_eq!(metadata_token_hash("mysecret"), k3s_snapshot_core::name::token_hash("mysecret"));
    }

    #[test]
    fn metadata_hash_ignores_the_ca() {
        let a = Token::parse(&format!("K10{}::server:s3cr3t", "a".repeat(64)));
        let b = Token::parse("s3cr3t");
        assert_eq!(a.metadata_hash(), b.metadata_hash());
        assert!(!format!("{a:?}").contains("s3cr3t"));
    }

    #[test]
    fn an_empty_secret_matches_nothing() {
        let hash = "b".repeat(64);
        let empty = Token::parse(&format!("K10{hash}::server:"));
        assert!(empty.is_empty());
        assert!(!empty.matches(""));
        assert!(!empty.matches(&format!("K10{hash}::server:")));
        let t = Token::parse("s3cr3t");
        assert!(!t.matches(""));
        assert!(!t.matches(&format!("K10{hash}::server:")));
        assert!(Token::parse("  ").is_empty());
    }

    #[test]
    fn ensure_refuses_an_empty_or_secretless_token_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        std::fs::create_dir_all(dd.server()).unwrap();
        for content in ["".to_string(), " \n".to_string(), format!("K10{}::server:\n", ca_hash(b"ca"))] {
            std::fs::write(dd.token(), &content).unwrap();
            let err = Token::ensure(&dd, None, b"ca").unwrap_err().to_string();
            assert!(err.contains("holds no token secret") && err.contains("--token"), "{content:?}: {err}");
            assert_eq!(std::fs::read_to_string(dd.token()).unwrap(), content, "the file is left as it was");
        }
        std::fs::remove_file(dd.token()).unwrap();
        let err = Token::ensure(&dd, Some(&format!("K10{}::server:", ca_hash(b"ca"))), b"ca").unwrap_err();
        assert!(err.to_string().contains("no secret"), "{err}");
    }

    #[test]
    fn ensure_generates_then_reuses_and_refuses_another_secret() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        std::fs::create_dir_all(dd.server()).unwrap();
        let t1 = Token::ensure(&dd, None, b"ca").unwrap();
        let t2 = Token::ensure(&dd, None, b"ca").unwrap();
        assert_eq!(t1, t2);
        assert!(Token::ensure(&dd, Some(t1.secret()), b"ca").is_ok());
        let err = Token::ensure(&dd, Some("other"), b"ca").unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert!(!err.contains(t1.secret()));
    }
}
