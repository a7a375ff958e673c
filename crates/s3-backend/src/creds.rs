//! Where the S3 credentials come from: the chain k3s uses.
//!
//! Read in k3s's `pkg/etcd/s3/s3.go` (`GetClient`) and minio-go's `pkg/credentials` (`chain.go`,
//! `static.go`, `file_aws_credentials.go`, `iam_aws.go`): k3s builds
//! `credentials.NewChainCredentials([Static{flags}, FileAWSCredentials{}, IAM{}])`, where the
//! flags `--etcd-s3-access-key`/`--etcd-s3-secret-key`/`--etcd-s3-session-token` also read
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`. The chain takes the first
//! link that yields an access key, ignores the links' errors, and when none yields anything it
//! signs nothing: requests go anonymous. Here, in the same order:
//!
//! 1. the flags (or their environment variables): both keys, plus the session token if given;
//! 2. the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `$HOME/.aws/credentials`),
//!    profile `AWS_PROFILE` (else `default`; a `[profile NAME]` section is accepted too, as
//!    minio-go does): `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`. A missing
//!    file or profile moves on; a file that cannot be read or parsed is an error naming the file
//!    (minio-go would skip it silently; an operator who wrote one wants to hear it is broken);
//! 3. the instance role, through IMDSv2 (`PUT /latest/api/token`, then
//!    `GET /latest/meta-data/iam/security-credentials/` and `.../<role>` with the token) at
//!    `http://169.254.169.254` or `AWS_EC2_METADATA_SERVICE_ENDPOINT`, unless
//!    `AWS_EC2_METADATA_DISABLED=true`. Each request is bounded by [`IMDS_TIMEOUT`] and
//!    [`IMDS_MAX_BODY`]. These credentials expire: they are fetched when first needed (never
//!    while a store is built, so a server starts while the service is unreachable), refreshed
//!    before they expire, and a failed lookup is tried again after [`IMDS_RETRY_AFTER`].
//!    IMDSv1 (no token) is not used.
//!
//! Nothing found: anonymous requests, as in k3s (a public bucket works). When S3 then refuses
//! them, the error says which sources were tried and what each said ([`Keyring::describe`]).
//!
//! Secrets never leave this module in text: [`Key`]'s `Debug` is redacted, and messages about a
//! file or an answer say where and what is wrong, never what it held.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::time::Instant;

use crate::config::S3Config;
use crate::error::innermost_detail;

/// The instance metadata service of EC2 (and of most clouds that imitate it).
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// Bound on each request to the metadata service (the AWS SDKs use 1 s).
pub const IMDS_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on each answer of the metadata service.
pub const IMDS_MAX_BODY: usize = 64 << 10;
/// After a failed instance-role lookup, the next request waits this long before trying again.
pub const IMDS_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Instance-role credentials are refreshed this long before they expire (or at half their
/// remaining life, when that is shorter).
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Lifetime asked for the IMDSv2 session token (6 hours, as minio-go asks).
const TOKEN_TTL_SECS: &str = "21600";
/// Largest shared credentials file read.
const MAX_FILE: u64 = 1 << 20;

/// The links of the chain after the flags. The library never reads the environment by itself:
/// the binary fills this with [`CredentialChain::from_env`]; [`Default`] consults nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialChain {
    /// The shared credentials file; `None`: not consulted.
    pub shared_file: Option<PathBuf>,
    /// Its profile; empty means `default`.
    pub profile: String,
    /// Base URL of the instance metadata service; `None`: the instance role is not consulted.
    pub imds_endpoint: Option<String>,
}

impl CredentialChain {
    /// The chain as the AWS SDKs and minio-go configure it from the environment:
    /// `AWS_SHARED_CREDENTIALS_FILE` (a leading `~/` is the home directory) or
    /// `$HOME/.aws/credentials`, `AWS_PROFILE` or `default`, `AWS_EC2_METADATA_SERVICE_ENDPOINT` or
    /// [`DEFAULT_IMDS_ENDPOINT`], none at all with `AWS_EC2_METADATA_DISABLED=true`.
    pub fn from_env() -> CredentialChain {
        Self::from_vars(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()).filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> CredentialChain {
        let home = var("HOME").map(PathBuf::from);
        let shared_file = match var("AWS_SHARED_CREDENTIALS_FILE") {
            Some(p) => match (p.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => Some(h.join(rest)),
                _ => Some(PathBuf::from(p)),
            },
            None => home.map(|h| h.join(".aws").join("credentials")),
        };
        let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let disabled = var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let imds_endpoint = (!disabled)
            .then(|| var("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.into()));
        CredentialChain { shared_file, profile, imds_endpoint }
    }

    fn profile(&self) -> &str {
        if self.profile.is_empty() {
            "default"
        } else {
            &self.profile
        }
    }
}

/// One set of credentials. `Debug` shows the access key only.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Key {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Key {
    pub fn provider(&self) -> minio::s3::creds::StaticProvider {
        minio::s3::creds::StaticProvider::new(&self.access_key, &self.secret_key, self.session_token.as_deref())
    }
}

/// Where a [`Key`] came from, for messages (no secret in here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Flags,
    File { path: PathBuf, profile: String },
    InstanceRole { endpoint: String, role: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flags => {
                f.write_str("--etcd-s3-access-key/--etcd-s3-secret-key (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
            }
            Origin::File { path, profile } => {
                write!(f, "profile {profile} of the shared credentials file {}", path.display())
            }
            Origin::InstanceRole { endpoint, role } => write!(f, "instance role {role} (from {endpoint})"),
        }
    }
}

/// Credentials and where they came from.
#[derive(Debug)]
pub(crate) struct Found {
    pub key: Key,
    pub origin: Origin,
    /// When the credentials stop working (instance roles only).
    pub expires: Option<DateTime<Utc>>,
    /// When to fetch new ones (instance roles only).
    refresh_at: Option<DateTime<Utc>>,
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
    imds: Option<Imds>,
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
            imds: None,
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
        match &chain.shared_file {
            None => notes.push("no shared credentials file (HOME and AWS_SHARED_CREDENTIALS_FILE unset)".into()),
            Some(path) => match read_shared_file(path, chain.profile())? {
                FileLookup::Found(key) => {
                    let origin = Origin::File { path: path.clone(), profile: chain.profile().to_string() };
                    keyring.fixed = Some(Arc::new(Found { key, origin, expires: None, refresh_at: None }));
                    return Ok(keyring);
                }
                FileLookup::Nothing(note) => notes.push(note),
            },
        }
        match &chain.imds_endpoint {
            None => notes.push("instance role lookup off (AWS_EC2_METADATA_DISABLED)".into()),
            Some(endpoint) => keyring.imds = Some(Imds::new(endpoint)?),
        }
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
        let imds = self.imds.as_ref()?;
        if let Some(f) = self.usable_without_lookup() {
            return f;
        }
        let _one_at_a_time = self.refresh.lock().await;
        if let Some(f) = self.usable_without_lookup() {
            return f;
        }
        let started = Instant::now();
        let res = imds.fetch().await;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match res {
            Ok(found) => {
                tracing::debug!(origin = %found.origin, expires = ?found.expires, duration_ms = started.elapsed().as_millis() as u64, "s3 credentials from the instance role");
                state.found = Some(Arc::new(found));
                state.error = None;
                state.retry_at = None;
            }
            Err(e) => {
                let error = format!("instance role at {}: {e}", imds.base);
                let still_valid = state.found.as_ref().filter(|f| f.expires.is_some_and(|x| x > Utc::now()));
                match still_valid {
                    Some(f) => {
                        tracing::warn!(error = %error, expires = ?f.expires, "cannot refresh the s3 credentials of the instance role; using the current ones until they expire")
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
            if f.refresh_at.is_some_and(|r| r > now) {
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
        match (&self.imds, &state.error, &state.found) {
            (Some(_), Some(e), Some(old)) => tried.push(format!(
                "{e} (its last credentials expired at {})",
                old.expires.map(|x| x.to_rfc3339()).unwrap_or_default()
            )),
            (Some(_), Some(e), None) => tried.push(e.clone()),
            (Some(imds), None, _) => tried.push(format!("instance role at {}: not asked yet", imds.base)),
            (None, _, _) => {}
        }
        format!(
            "anonymous requests: no credentials found ({}); set --etcd-s3-access-key and --etcd-s3-secret-key, a [{}] profile in the shared credentials file (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), or give the instance a role",
            tried.join("; "),
            self.profile
        )
    }
}

/// What the shared credentials file says for a profile.
#[derive(Debug)]
enum FileLookup {
    Found(Key),
    /// Nothing usable; the note says why (for messages).
    Nothing(String),
}

/// Reads `profile` from the shared credentials file at `path`.
fn read_shared_file(path: &Path, profile: &str) -> Result<FileLookup, String> {
    let shown = path.display();
    let fix = "fix it, or point AWS_SHARED_CREDENTIALS_FILE elsewhere";
    let text = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileLookup::Nothing(format!("no shared credentials file at {shown}")))
        }
        Err(e) => {
            return Err(format!("cannot read the shared credentials file {shown}: {}; {fix}", innermost_detail(&e)))
        }
        Ok(m) if !m.is_file() => return Err(format!("the shared credentials file {shown} is not a file; {fix}")),
        Ok(m) if m.len() > MAX_FILE => {
            return Err(format!("the shared credentials file {shown} is larger than {} KiB; {fix}", MAX_FILE >> 10))
        }
        Ok(_) => std::fs::read(path)
            .map_err(|e| format!("cannot read the shared credentials file {shown}: {}; {fix}", innermost_detail(&e)))?,
    };
    let text =
        String::from_utf8(text).map_err(|_| format!("the shared credentials file {shown} is not UTF-8 text; {fix}"))?;
    let sections =
        parse_ini(&text).map_err(|e| format!("the shared credentials file {shown} is malformed: {e}; {fix}"))?;
    let Some(keys) = sections.get(profile).or_else(|| sections.get(&format!("profile {profile}"))) else {
        return Ok(FileLookup::Nothing(format!("no profile {profile} in {shown}")));
    };
    let get = |k: &str| {
        keys.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone()).filter(|v| !v.is_empty())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key), Some(secret_key)) => {
            Ok(FileLookup::Found(Key { access_key, secret_key, session_token: get("aws_session_token") }))
        }
        (None, None) => Ok(FileLookup::Nothing(format!(
            "profile {profile} in {shown} has no aws_access_key_id (credential_process, sso and role_arn are not supported)"
        ))),
        (Some(_), None) => Err(format!(
            "profile {profile} in the shared credentials file {shown} has aws_access_key_id but no aws_secret_access_key; add it"
        )),
        (None, Some(_)) => Err(format!(
            "profile {profile} in the shared credentials file {shown} has aws_secret_access_key but no aws_access_key_id; add it"
        )),
    }
}

/// An INI file's sections, each a list of `key = value` in file order. Sections that appear
/// twice are merged.
type Sections = std::collections::HashMap<String, Vec<(String, String)>>;

/// Parses the INI dialect of the AWS shared files: `[section]` headers, `key = value` (or
/// `key: value`), comment lines starting with `#` or `;`, blank lines. Values are taken as they
/// are (no inline comments, as botocore reads them); indented lines are nested settings of the
/// config file and kept as keys of their section. Errors name the line, never its content.
fn parse_ini(text: &str) -> Result<Sections, String> {
    let mut sections = Sections::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(format!("line {n} opens a [section] that is not closed"));
            };
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            if name.is_empty() {
                return Err(format!("line {n} is a section without a name"));
            }
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(at) = line.find(['=', ':']) else {
            return Err(format!("line {n} is neither a [section] nor key = value"));
        };
        let (key, value) = (line[..at].trim(), line[at + 1..].trim());
        if key.is_empty() {
            return Err(format!("line {n} has a value without a key"));
        }
        let Some(section) = &current else {
            return Err(format!("line {n} sets a key before any [section]"));
        };
        sections.entry(section.clone()).or_default().push((key.to_string(), value.to_string()));
    }
    Ok(sections)
}

/// The IMDSv2 client.
struct Imds {
    /// `http://host[:port]`, no trailing slash.
    base: String,
    http: reqwest::Client,
}

/// The credentials document of an instance role. No `Debug`: it holds the secret.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleCredentials {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    expiration: Option<String>,
}

impl Imds {
    fn new(endpoint: &str) -> Result<Imds, String> {
        let bad = || format!("invalid AWS_EC2_METADATA_SERVICE_ENDPOINT {endpoint:?}: give http://host[:port]");
        let url = reqwest::Url::parse(endpoint.trim()).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(bad());
        }
        let base = url.as_str().trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            // Link-local, never through the S3 proxy (--etcd-s3-proxy sets the proxy variables).
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(IMDS_TIMEOUT)
            .timeout(IMDS_TIMEOUT)
            .user_agent(concat!("k3s-snapshot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the instance metadata client: {}", innermost_detail(&e)))?;
        Ok(Imds { base, http })
    }

    /// The role's current credentials, through IMDSv2.
    async fn fetch(&self) -> Result<Found, String> {
        let token = self
            .text(
                self.http
                    .put(format!("{}/latest/api/token", self.base))
                    .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS),
                "the session token request (PUT /latest/api/token)",
            )
            .await?;
        let token = token.trim();
        if token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the answer to PUT /latest/api/token is not a session token".into());
        }
        let list_url = format!("{}/latest/meta-data/iam/security-credentials/", self.base);
        let roles =
            self.text(self.http.get(&list_url).header("x-aws-ec2-metadata-token", token), "the role list").await?;
        let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Err("no instance role is attached to this instance".into());
        };
        // IAM role names: at most 64 of these characters. The name goes into a URL and messages.
        if role.len() > 64 || !role.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)) {
            return Err("the role list does not name an IAM role".into());
        }
        let body = self
            .text(
                self.http.get(format!("{list_url}{role}")).header("x-aws-ec2-metadata-token", token),
                "the role's credentials",
            )
            .await?;
        // serde's messages may quote the input: only the position is shown.
        let doc: RoleCredentials = serde_json::from_str(&body).map_err(|e| {
            format!(
                "the credentials of role {role} are not a JSON credentials document (error at line {} column {})",
                e.line(),
                e.column()
            )
        })?;
        if doc.code.as_deref().is_some_and(|c| c != "Success") {
            return Err(format!("the credentials of role {role} are not available (their Code is not Success)"));
        }
        let missing = |what: &str| format!("the credentials of role {role} have no {what}");
        let access_key = doc.access_key_id.filter(|s| !s.is_empty()).ok_or_else(|| missing("AccessKeyId"))?;
        let secret_key = doc.secret_access_key.filter(|s| !s.is_empty()).ok_or_else(|| missing("SecretAccessKey"))?;
        let expiration = doc.expiration.ok_or_else(|| missing("Expiration"))?;
        let expires = DateTime::parse_from_rfc3339(expiration.trim())
            .map_err(|_| format!("the credentials of role {role} have an Expiration that is not an RFC 3339 time"))?
            .with_timezone(&Utc);
        let now = Utc::now();
        if expires <= now {
            return Err(format!("the credentials of role {role} expired at {}", expires.to_rfc3339()));
        }
        let key = Key { access_key, secret_key, session_token: doc.token.filter(|t| !t.is_empty()) };
        let origin = Origin::InstanceRole { endpoint: self.base.clone(), role: role.to_string() };
        Ok(Found { key, origin, expires: Some(expires), refresh_at: Some(refresh_at(now, expires)) })
    }

    /// Sends `req` and returns its answer's body as text, bounded in time and size.
    async fn text(&self, req: reqwest::RequestBuilder, what: &str) -> Result<String, String> {
        let fail = |e: reqwest::Error| {
            if e.is_timeout() {
                format!("no answer to {what} within {}s", IMDS_TIMEOUT.as_secs())
            } else if e.is_connect() {
                format!("cannot connect: {}", innermost_detail(&e))
            } else {
                format!("{what} failed: {}", innermost_detail(&e))
            }
        };
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("{what} was answered with http {}", status.as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > IMDS_MAX_BODY as u64) {
            return Err(format!("the answer to {what} is larger than {} KiB", IMDS_MAX_BODY >> 10));
        }
        let mut body = Vec::new();
        let mut chunks = resp.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            body.extend_from_slice(&chunk.map_err(fail)?);
            if body.len() > IMDS_MAX_BODY {
                return Err(format!("the answer to {what} is larger than {} KiB", IMDS_MAX_BODY >> 10));
            }
        }
        String::from_utf8(body).map_err(|_| format!("the answer to {what} is not UTF-8 text"))
    }
}

/// When credentials fetched at `now` that expire at `expires` are refreshed: [`REFRESH_BEFORE`]
/// before they expire, or halfway there when they live shorter than twice that.
fn refresh_at(now: DateTime<Utc>, expires: DateTime<Utc>) -> DateTime<Utc> {
    let life = (expires - now).to_std().unwrap_or_default();
    let margin = REFRESH_BEFORE.min(life / 2);
    expires - chrono::Duration::from_std(margin).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_chain_is_read_from_the_environment_as_the_sdks_read_it() {
        let c = CredentialChain::from_vars(vars(&[("HOME", "/home/op")]));
        assert_eq!(c.shared_file, Some(PathBuf::from("/home/op/.aws/credentials")));
        assert_eq!(c.profile, "default");
        assert_eq!(c.imds_endpoint.as_deref(), Some(DEFAULT_IMDS_ENDPOINT));

        let c = CredentialChain::from_vars(vars(&[
            ("HOME", "/home/op"),
            ("AWS_SHARED_CREDENTIALS_FILE", "~/creds"),
            ("AWS_PROFILE", "backup"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9"),
        ]));
        assert_eq!(c.shared_file, Some(PathBuf::from("/home/op/creds")));
        assert_eq!(c.profile, "backup");
        assert_eq!(c.imds_endpoint.as_deref(), Some("http://127.0.0.1:9"));

        let c = CredentialChain::from_vars(vars(&[("AWS_EC2_METADATA_DISABLED", "TRUE")]));
        assert_eq!(c, CredentialChain { shared_file: None, profile: "default".into(), imds_endpoint: None });
    }

    #[test]
    fn ini_sections_keys_and_comments() {
        let text = "# comment\n; also\n[default]\naws_access_key_id = AKIA1\naws_secret_access_key=s3cr3t/+=\n\n[profile backup]\n  aws_access_key_id : AKIA2 \n[ spaced   name ]\nk=v=w\n[default]\naws_session_token = tok\n";
        let s = parse_ini(text).unwrap();
        assert_eq!(
            s["default"],
            vec![
                ("aws_access_key_id".to_string(), "AKIA1".to_string()),
                ("aws_secret_access_key".to_string(), "s3cr3t/+=".to_string()),
                ("aws_session_token".to_string(), "tok".to_string()),
            ]
        );
        assert_eq!(s["profile backup"], vec![("aws_access_key_id".to_string(), "AKIA2".to_string())]);
        assert_eq!(s["spaced name"], vec![("k".to_string(), "v=w".to_string())]);
    }

    #[test]
    fn malformed_ini_names_the_line_and_never_the_content() {
        for (text, want) in [
            ("[default\naws_secret_access_key = hidden-value", "line 1 opens a [section]"),
            ("aws_secret_access_key = hidden-value", "line 1 sets a key before any [section]"),
            ("[default]\nhidden-value", "line 2 is neither"),
            ("[default]\n= hidden-value", "line 2 has a value without a key"),
            ("[]\n", "line 1 is a section without a name"),
        ] {
            let e = parse_ini(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("hidden-value"), "{e}");
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn profiles_are_found_by_name_or_as_profile_name() {
        let f = file("[default]\naws_access_key_id=A\naws_secret_access_key=S\n[profile other]\nAWS_ACCESS_KEY_ID=B\naws_secret_access_key=T\naws_session_token=X\n[roles]\nrole_arn=arn\n");
        let FileLookup::Found(k) = read_shared_file(f.path(), "default").unwrap() else { panic!() };
        assert_eq!(k, Key { access_key: "A".into(), secret_key: "S".into(), session_token: None });
        let FileLookup::Found(k) = read_shared_file(f.path(), "other").unwrap() else { panic!() };
        assert_eq!(k, Key { access_key: "B".into(), secret_key: "T".into(), session_token: Some("X".into()) });
        let FileLookup::Nothing(n) = read_shared_file(f.path(), "missing").unwrap() else { panic!() };
        assert!(n.starts_with("no profile missing in"), "{n}");
        let FileLookup::Nothing(n) = read_shared_file(f.path(), "roles").unwrap() else { panic!() };
        assert!(n.contains("has no aws_access_key_id"), "{n}");
        let FileLookup::Nothing(n) = read_shared_file(&f.path().with_extension("absent"), "default").unwrap() else {
            panic!()
        };
        assert!(n.starts_with("no shared credentials file at"), "{n}");
    }

    #[test]
    fn half_a_key_and_broken_files_are_errors_naming_the_file() {
        let f = file("[default]\naws_access_key_id=A\n");
        let e = read_shared_file(f.path(), "default").unwrap_err();
        assert!(e.contains(&f.path().display().to_string()) && e.contains("no aws_secret_access_key"), "{e}");
        let f = file("[default]\naws_secret_access_key = hidden-value\nbroken line hidden-value\n");
        let e = read_shared_file(f.path(), "default").unwrap_err();
        assert!(e.contains(&f.path().display().to_string()) && e.contains("line 3"), "{e}");
        assert!(!e.contains("hidden-value"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_shared_file(dir.path(), "default").unwrap_err();
        assert!(e.contains("is not a file"), "{e}");
        let f = file("");
        std::fs::write(f.path(), b"[default]\n\xff\xfe\n").unwrap();
        assert!(read_shared_file(f.path(), "default").unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn refresh_comes_before_expiry() {
        let now = Utc::now();
        let hour = now + chrono::Duration::hours(1);
        assert_eq!(refresh_at(now, hour), hour - chrono::Duration::minutes(5));
        let short = now + chrono::Duration::seconds(60);
        assert_eq!(refresh_at(now, short), now + chrono::Duration::seconds(30));
    }

    #[test]
    fn imds_endpoints_must_be_plain_urls() {
        assert_eq!(Imds::new("http://127.0.0.1:8080/").unwrap().base, "http://127.0.0.1:8080");
        assert_eq!(Imds::new("http://[fd00:ec2::254]").unwrap().base, "http://[fd00:ec2::254]");
        for bad in ["169.254.169.254", "ftp://x", "http://x/latest", "http://u:p@x"] {
            let e = Imds::new(bad).err().unwrap();
            assert!(e.contains("AWS_EC2_METADATA_SERVICE_ENDPOINT"), "{e}");
        }
    }

    #[test]
    fn keys_never_show_their_secrets() {
        let k = Key {
            access_key: "AKIA".into(),
            secret_key: "hidden-secret".into(),
            session_token: Some("hidden-token".into()),
        };
        let f = Found { key: k, origin: Origin::Flags, expires: None, refresh_at: None };
        let d = format!("{f:?}");
        assert!(d.contains("AKIA") && !d.contains("hidden"), "{d}");
    }

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
    async fn nothing_found_is_anonymous_and_says_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let chain = CredentialChain {
            shared_file: Some(dir.path().join("credentials")),
            profile: "backup".into(),
            imds_endpoint: None,
        };
        let k = Keyring::new(&cfg(chain)).unwrap();
        assert!(k.current().await.is_none());
        let d = k.describe();
        assert!(d.contains("no --etcd-s3-access-key or AWS_ACCESS_KEY_ID"), "{d}");
        assert!(d.contains("no shared credentials file at"), "{d}");
        assert!(d.contains("AWS_EC2_METADATA_DISABLED"), "{d}");
    }
}
