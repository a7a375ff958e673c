//! The credential chain resolved for one store ([`Keyring`]): the flags or a shared file once,
//! when the store is built; otherwise the first configured dynamic source (credential_process,
//! web identity, container, instance role), asked when a request needs credentials and again
//! before they expire, and what each link said, for messages.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use crate::config::S3Config;
use crate::creds_container::Container;
use crate::creds_file::{read_profile, FileKind, FileLookup};
use crate::creds_imds::Imds;
use crate::creds_process::Process;
use crate::creds_source::{Found, Key, Origin};
use crate::creds_web::WebIdentity;

/// After a failed instance-role lookup, the next request waits this long before trying again.
pub const IMDS_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The link that fetches credentials when a request needs them, and again before they expire.
pub(crate) enum Dynamic {
    Process(Process),
    WebIdentity(WebIdentity),
    Container(Container),
    Imds(Imds),
}

impl Dynamic {
    async fn fetch(&self) -> Result<Found, String> {
        match self {
            Dynamic::Process(p) => p.fetch().await,
            Dynamic::WebIdentity(w) => w.fetch().await,
            Dynamic::Container(c) => c.fetch().await,
            Dynamic::Imds(i) => i.fetch().await,
        }
    }

    /// What this link is, for messages.
    fn name(&self) -> String {
        match self {
            Dynamic::Process(p) => p.name(),
            Dynamic::WebIdentity(w) => w.name(),
            Dynamic::Container(c) => c.name(),
            Dynamic::Imds(i) => format!("instance role at {}", i.base),
        }
    }
}

/// The latest outcome of the instance-role lookup.
#[derive(Default)]
struct RoleState {
    found: Option<Arc<Found>>,
    /// Why the last lookup failed.
    error: Option<String>,
    /// No new lookup before this (after a failure).
    retry_at: Option<Instant>,
}

/// The credential chain of one store: resolves once what needs no network, and the instance
/// role when a request needs it.
pub(crate) struct Keyring {
    /// From the flags or the file, found when the store was built.
    fixed: Option<Arc<Found>>,
    /// What the links before the instance role said, for messages.
    notes: Vec<String>,
    dynamic: Option<Dynamic>,
    /// The profile looked up in the file, for messages.
    profile: String,
    state: RwLock<RoleState>,
    refresh: tokio::sync::Mutex<()>,
}

impl Keyring {
    /// Reads the flags and the shared credentials file; prepares the instance-role lookup.
    /// Fails only on what the configuration gets wrong: an unreadable or malformed file, a profile
    /// with half a key, an endpoint that is not a URL.
    pub fn new(cfg: &S3Config) -> Result<Keyring, String> {
        let chain = &cfg.credential_chain;
        let mut notes = Vec::new();
        let mut keyring = Keyring {
            fixed: None,
            notes: Vec::new(),
            dynamic: None,
            profile: chain.profile().to_string(),
            state: RwLock::new(RoleState::default()),
            refresh: tokio::sync::Mutex::new(()),
        };
        if !cfg.access_key.is_empty() && !cfg.secret_key.is_empty() {
            let key = Key {
                access_key: cfg.access_key.clone(),
                secret_key: cfg.secret_key.clone(),
                session_token: (!cfg.session_token.is_empty()).then(|| cfg.session_token.clone()),
            };
            keyring.fixed = Some(Arc::new(Found { key, origin: Origin::Flags, expires: None, refresh_at: None }));
            return Ok(keyring);
        }
        notes.push("no --etcd-s3-access-key or AWS_ACCESS_KEY_ID".to_string());
        let files = [(&chain.shared_file, FileKind::Credentials), (&chain.config_file, FileKind::Config)];
        for (file, kind) in files {
            let Some(path) = file else {
                if kind == FileKind::Credentials {
                    notes.push("no shared credentials file (HOME and AWS_SHARED_CREDENTIALS_FILE unset)".into());
                }
                continue;
            };
            match read_profile(path, chain.profile(), kind)? {
                FileLookup::Found(key) => {
                    let origin = Origin::File { path: path.clone(), profile: chain.profile().to_string() };
                    keyring.fixed = Some(Arc::new(Found { key, origin, expires: None, refresh_at: None }));
                    return Ok(keyring);
                }
                FileLookup::Process(command) => {
                    let source = format!("profile {} of {}", chain.profile(), path.display());
                    keyring.dynamic = Some(Dynamic::Process(Process::new(command, source)));
                    keyring.notes = notes;
                    return Ok(keyring);
                }
                // A config file that is not there is the usual case; not worth a note.
                FileLookup::Missing(_) if kind == FileKind::Config => {}
                FileLookup::Missing(note) | FileLookup::Nothing(note) => notes.push(note),
            }
        }
        keyring.dynamic = if let Some(web) = &chain.web_identity {
            Some(Dynamic::WebIdentity(WebIdentity::new(web.clone(), &cfg.region)?))
        } else if let Some(container) = &chain.container {
            notes.push("no web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN unset)".into());
            Some(Dynamic::Container(Container::new(container.clone())?))
        } else {
            notes.push("no web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN unset)".into());
            notes.push("no container credentials (AWS_CONTAINER_CREDENTIALS_FULL_URI and _RELATIVE_URI unset)".into());
            match &chain.imds_endpoint {
                None => {
                    notes.push("instance role lookup off (AWS_EC2_METADATA_DISABLED)".into());
                    None
                }
                Some(endpoint) => Some(Dynamic::Imds(Imds::new(endpoint)?)),
            }
        };
        keyring.notes = notes;
        Ok(keyring)
    }

    /// The credentials found without the network (flags or file), if any.
    pub fn fixed(&self) -> Option<Arc<Found>> {
        self.fixed.clone()
    }

    /// The credentials to sign the next request with; `None`: anonymous. Looks up the instance
    /// role when that is the source and its credentials are missing or due for a refresh; a lookup
    /// that fails leaves the previous credentials in use until they expire.
    pub async fn current(&self) -> Option<Arc<Found>> {
        if let Some(f) = &self.fixed {
            return Some(f.clone());
        }
        let source = self.dynamic.as_ref()?;
        if let Some(f) = self.usable_without_lookup() {
            return f;
        }
        let _one_at_a_time = self.refresh.lock().await;
        if let Some(f) = self.usable_without_lookup() {
            return f;
        }
        let started = Instant::now();
        let res = source.fetch().await;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match res {
            Ok(found) => {
                tracing::debug!(origin = %found.origin, expires = ?found.expires, duration_ms = started.elapsed().as_millis() as u64, "s3 credentials fetched");
                state.found = Some(Arc::new(found));
                state.error = None;
                state.retry_at = None;
            }
            Err(e) => {
                let error = format!("{}: {e}", source.name());
                let still_valid = state.found.as_ref().filter(|f| f.expires.is_some_and(|x| x > Utc::now()));
                match still_valid {
                    Some(f) => {
                        tracing::warn!(error = %error, expires = ?f.expires, "cannot refresh the s3 credentials; using the current ones until they expire")
                    }
                    None => {
                        tracing::warn!(error = %error, "no s3 credentials found; sending anonymous requests")
                    }
                }
                state.error = Some(error);
                state.retry_at = Some(Instant::now() + IMDS_RETRY_AFTER);
            }
        }
        Self::valid(&state)
    }

    /// `Some(answer)` when no lookup is due: fresh credentials, or a recent failure.
    fn usable_without_lookup(&self) -> Option<Option<Arc<Found>>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let now = Utc::now();
        if let Some(f) = &state.found {
            // Credentials without an expiry (a credential_process may give such) are kept.
            if f.refresh_at.is_some_and(|r| r > now) || f.expires.is_none() {
                return Some(Some(f.clone()));
            }
        }
        if state.retry_at.is_some_and(|r| r > Instant::now()) {
            return Some(Self::valid(&state));
        }
        None
    }

    fn valid(state: &RoleState) -> Option<Arc<Found>> {
        state.found.clone().filter(|f| f.expires.is_none_or(|x| x > Utc::now()))
    }

    /// For an error message: whose credentials S3 refused, or which sources were tried and what
    /// they said when the requests went anonymous. One line, no secret.
    pub fn describe(&self) -> String {
        if let Some(f) = &self.fixed {
            return format!("the credentials of {}", f.origin);
        }
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = Self::valid(&state) {
            return format!("the credentials of {}", f.origin);
        }
        let mut tried = self.notes.clone();
        match (&self.dynamic, &state.error, &state.found) {
            (Some(_), Some(e), Some(old)) => tried.push(format!(
                "{e} (its last credentials expired at {})",
                old.expires.map(|x| x.to_rfc3339()).unwrap_or_default()
            )),
            (Some(_), Some(e), None) => tried.push(e.clone()),
            (Some(source), None, _) => tried.push(format!("{}: not asked yet", source.name())),
            (None, _, _) => {}
        }
        format!(
            "anonymous requests: no credentials found ({}); set --etcd-s3-access-key and --etcd-s3-secret-key, a [{}] profile (keys or credential_process) in the shared credentials file (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), web identity (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN), container credentials (AWS_CONTAINER_CREDENTIALS_FULL_URI), or give the instance a role",
            tried.join("; "),
            self.profile
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::CredentialChain;
    use crate::creds_container::ContainerConfig;
    use crate::creds_source::tests::file;
    use crate::creds_web::WebIdentityConfig;

    fn cfg(chain: CredentialChain) -> S3Config {
        S3Config { bucket: "b".into(), credential_chain: chain, ..S3Config::default() }
    }

    #[tokio::test]
    async fn flags_win_over_the_file_and_the_file_over_the_role() {
        let f = file("[default]\naws_access_key_id=FILEKEY\naws_secret_access_key=S\n");
        let chain = CredentialChain {
            shared_file: Some(f.path().into()),
            profile: String::new(),
            imds_endpoint: Some("http://127.0.0.1:9".into()),
            ..CredentialChain::default()
        };
        let flags = S3Config { access_key: "FLAGKEY".into(), secret_key: "X".into(), ..cfg(chain.clone()) };
        let k = Keyring::new(&flags).unwrap();
        assert_eq!(k.current().await.unwrap().origin, Origin::Flags);
        let k = Keyring::new(&cfg(chain)).unwrap();
        let found = k.current().await.unwrap();
        assert_eq!(found.key.access_key, "FILEKEY");
        assert!(k.describe().contains("profile default of the shared credentials file"), "{}", k.describe());
    }

    #[tokio::test]
    async fn credential_process_of_the_profile_runs_and_its_failures_are_named() {
        let doc = r#"{"Version": 1, "AccessKeyId": "PROCKEY", "SecretAccessKey": "hidden-secret", "SessionToken": "hidden-token", "Expiration": "2099-01-01T00:00:00Z"}"#;
        let f = file(&format!("[profile backup]\ncredential_process = printf '%s' '{doc}'\n"));
        let chain = CredentialChain {
            config_file: Some(f.path().into()),
            profile: "backup".into(),
            ..CredentialChain::default()
        };
        let k = Keyring::new(&cfg(chain.clone())).unwrap();
        let found = k.current().await.unwrap();
        assert_eq!(
            (found.key.access_key.as_str(), found.key.session_token.as_deref()),
            ("PROCKEY", Some("hidden-token"))
        );
        assert!(found.origin.to_string().starts_with("credential_process of profile backup"), "{}", found.origin);
        for (cmd, want) in [
            ("echo hidden-secret >&2; exit 3", "it failed"),
            ("echo '{\"Version\": 2}'", "\"Version\": 1"),
            ("echo '{\"Version\": 1, \"AccessKeyId\": \"A\"}'", "have no SecretAccessKey"),
        ] {
            std::fs::write(f.path(), format!("[profile backup]\ncredential_process = {cmd}\n")).unwrap();
            let k = Keyring::new(&cfg(chain.clone())).unwrap();
            assert!(k.current().await.is_none());
            let d = k.describe();
            assert!(d.contains(want) && d.contains("credential_process of profile backup"), "{cmd}: {d}");
            assert!(!d.contains("hidden-secret"), "{d}");
        }
    }

    #[tokio::test]
    async fn web_identity_comes_before_container_credentials_and_they_before_the_instance_role() {
        let web = WebIdentityConfig {
            token_file: "/nonexistent/token".into(),
            role_arn: "arn:aws:iam::1:role/r".into(),
            session_name: None,
            sts_endpoint: Some("http://127.0.0.1:9".into()),
        };
        let container =
            ContainerConfig { url: "http://127.0.0.1:9/creds".into(), auth_token: None, auth_token_file: None };
        let imds = Some("http://127.0.0.1:9".to_string());
        let all = CredentialChain {
            web_identity: Some(web),
            container: Some(container.clone()),
            imds_endpoint: imds.clone(),
            ..CredentialChain::default()
        };
        let d = Keyring::new(&cfg(all)).unwrap().describe();
        assert!(d.contains("web identity (arn:aws:iam::1:role/r") && d.contains("not asked yet"), "{d}");
        let no_web =
            CredentialChain { container: Some(container), imds_endpoint: imds.clone(), ..CredentialChain::default() };
        let d = Keyring::new(&cfg(no_web)).unwrap().describe();
        assert!(
            d.contains("no web identity") && d.contains("container credentials at http://127.0.0.1:9/creds"),
            "{d}"
        );
        let role = CredentialChain { imds_endpoint: imds, ..CredentialChain::default() };
        let d = Keyring::new(&cfg(role)).unwrap().describe();
        assert!(d.contains("no container credentials") && d.contains("instance role at"), "{d}");
    }

    #[tokio::test]
    async fn nothing_found_is_anonymous_and_says_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let chain = CredentialChain {
            shared_file: Some(dir.path().join("credentials")),
            profile: "backup".into(),
            imds_endpoint: None,
            ..CredentialChain::default()
        };
        let k = Keyring::new(&cfg(chain)).unwrap();
        assert!(k.current().await.is_none());
        let d = k.describe();
        assert!(d.contains("no --etcd-s3-access-key or AWS_ACCESS_KEY_ID"), "{d}");
        assert!(d.contains("no shared credentials file at"), "{d}");
        assert!(d.contains("AWS_EC2_METADATA_DISABLED"), "{d}");
    }
}
