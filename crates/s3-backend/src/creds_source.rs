//! What every credentials source shares: the credentials it yields ([`Key`]) with where they came
//! from ([`Origin`]) and when they expire ([`Found`]), the bounded HTTP client of the sources that
//! ask a service, the JSON credentials document they answer, and when to refresh.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::error::innermost_detail;

/// Bound on each answer of the metadata service.
pub const IMDS_MAX_BODY: usize = 64 << 10;
/// Instance-role credentials are refreshed this long before they expire (or at half their
/// remaining life, when that is shorter).
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

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
    WebIdentity { role_arn: String },
    Container { url: String },
    Process { source: String },
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
            Origin::WebIdentity { role_arn } => write!(f, "role {role_arn} assumed with the web identity token"),
            Origin::Container { url } => write!(f, "container credentials (from {url})"),
            Origin::Process { source } => write!(f, "credential_process of {source}"),
        }
    }
}

/// Credentials and where they came from.
#[derive(Debug)]
pub(crate) struct Found {
    pub key: Key,
    pub origin: Origin,
    /// When the credentials stop working (`None` for fixed ones, and for a source that gave none).
    pub expires: Option<DateTime<Utc>>,
    /// When to fetch new ones; `None`: never.
    pub refresh_at: Option<DateTime<Utc>>,
}

/// An HTTP client for a credentials source: bounded, no redirects; through the environment's
/// proxies (which `--etcd-s3-proxy` sets) only when `via_proxy` (STS), never for the link-local
/// services.
pub(crate) fn http_client(timeout: Duration, via_proxy: bool) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(concat!("k3s-snapshot/", env!("CARGO_PKG_VERSION")));
    if !via_proxy {
        b = b.no_proxy();
    }
    b.build().map_err(|e| format!("cannot set up the credentials client: {}", innermost_detail(&e)))
}

/// Sends `req` and returns its answer's body as text, bounded in size ([`IMDS_MAX_BODY`]) and,
/// by the client, in time. An answer that is not a success is an error naming its status, unless
/// `error_bodies` (STS explains its refusals in the body).
pub(crate) async fn bounded_text(
    req: reqwest::RequestBuilder,
    what: &str,
    timeout: Duration,
    error_bodies: bool,
) -> Result<String, String> {
    let fail = |e: reqwest::Error| {
        if e.is_timeout() {
            format!("no answer to {what} within {}s", timeout.as_secs())
        } else if e.is_connect() {
            format!("cannot connect: {}", innermost_detail(&e))
        } else {
            format!("{what} failed: {}", innermost_detail(&e))
        }
    };
    let resp = req.send().await.map_err(fail)?;
    let status = resp.status();
    if !status.is_success() && !error_bodies {
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

/// A JSON credentials document, as an instance role, a container agent and a credential_process
/// write it. No `Debug`: it holds the secret.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDoc {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
    /// `Token` (instance role, container) or `SessionToken` (credential_process).
    #[serde(default, alias = "SessionToken")]
    token: Option<String>,
    #[serde(default)]
    expiration: Option<String>,
}

/// The credentials in `body`, a JSON document from `what`, or why not (never quoting it).
/// `require_expiration`: temporary credentials that do not say when they end are refused.
pub(crate) fn json_credentials(
    body: &str,
    what: &str,
    require_expiration: bool,
    origin: Origin,
) -> Result<Found, String> {
    // serde's messages may quote the input: only the position is shown.
    let doc: CredentialsDoc = serde_json::from_str(body).map_err(|e| {
        format!("{what} are not a JSON credentials document (error at line {} column {})", e.line(), e.column())
    })?;
    if doc.code.as_deref().is_some_and(|c| c != "Success") {
        return Err(format!("{what} are not available (their Code is not Success)"));
    }
    let missing = |field: &str| format!("{what} have no {field}");
    let access_key = doc.access_key_id.filter(|s| !s.is_empty()).ok_or_else(|| missing("AccessKeyId"))?;
    let secret_key = doc.secret_access_key.filter(|s| !s.is_empty()).ok_or_else(|| missing("SecretAccessKey"))?;
    let now = Utc::now();
    let expires = match doc.expiration.filter(|e| !e.trim().is_empty()) {
        None if require_expiration => return Err(missing("Expiration")),
        None => None,
        Some(x) => Some(
            DateTime::parse_from_rfc3339(x.trim())
                .map_err(|_| format!("{what} have an Expiration that is not an RFC 3339 time"))?
                .with_timezone(&Utc),
        ),
    };
    if let Some(x) = expires.filter(|x| *x <= now) {
        return Err(format!("{what} expired at {}", x.to_rfc3339()));
    }
    let key = Key { access_key, secret_key, session_token: doc.token.filter(|t| !t.is_empty()) };
    Ok(Found { key, origin, expires, refresh_at: expires.map(|x| refresh_at(now, x)) })
}

/// When credentials fetched at `now` that expire at `expires` are refreshed: [`REFRESH_BEFORE`]
/// before they expire, or halfway there when they live shorter than twice that.
pub(crate) fn refresh_at(now: DateTime<Utc>, expires: DateTime<Utc>) -> DateTime<Utc> {
    let life = (expires - now).to_std().unwrap_or_default();
    let margin = REFRESH_BEFORE.min(life / 2);
    expires - chrono::Duration::from_std(margin).unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An environment of these pairs.
    pub(crate) fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    pub(crate) fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
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
}
