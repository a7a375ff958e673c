//! `${data-dir}/server/db/etcd/config`: etcd's own YAML configuration file, in the shape k3s
//! writes it for its embedded etcd (k3s's `executor.ETCDConfig.ToConfigFile`: the file lives in
//! etcd's data dir, keys are etcd's flag names in alphabetical order, TLS settings nested under
//! `client-transport-security` and `peer-transport-security`, `--etcd-arg` values merged in as
//! keys). The server writes it and starts etcd with `--config-file`; `etcd-snapshot --data-dir`
//! reads it to find etcd, on our nodes and on real k3s nodes alike.
//!
//! Reading takes only what a client needs (the client URLs and `trusted-ca-file`) and ignores
//! every other key, so a file of any k3s or etcd version is understood. The client certificate is
//! not in the file (its `cert-file`/`key-file` are etcd's own serving pair): like k3s's own
//! `etcd-snapshot`, a client uses `server/tls/etcd/client.{crt,key}` of the data dir.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_yaml::{Mapping, Value};

use crate::{Error, Result};

/// etcd's configuration file. Field names are etcd's keys; the file is written with its keys
/// sorted, as k3s (which marshals through JSON) writes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdConfigFile {
    pub name: String,
    pub data_dir: PathBuf,
    /// Comma-separated, as etcd takes them.
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub listen_peer_urls: String,
    pub initial_advertise_peer_urls: String,
    pub initial_cluster: String,
    pub initial_cluster_state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub listen_metrics_urls: String,
    pub client_transport_security: TransportSecurity,
    pub peer_transport_security: TransportSecurity,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub force_new_cluster: bool,
    /// Milliseconds.
    pub heartbeat_interval: u64,
    /// Milliseconds.
    pub election_timeout: u64,
    pub logger: String,
    pub log_outputs: Vec<String>,
    /// `--etcd-arg` values as `key=value` (leading dashes allowed), merged in last so that they
    /// override (see [`extra_arg_value`]).
    #[serde(skip)]
    pub extra_args: Vec<String>,
}

/// `client-transport-security` / `peer-transport-security`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransportSecurity {
    pub cert_file: PathBuf,
    pub client_cert_auth: bool,
    pub key_file: PathBuf,
    pub trusted_ca_file: PathBuf,
}

/// Sorts the keys of every mapping, recursively.
fn sorted(v: Value) -> Value {
    match v {
        Value::Mapping(m) => {
            let mut entries: Vec<(Value, Value)> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            entries.sort_by_key(|e| key_text(&e.0));
            Value::Mapping(entries.into_iter().collect())
        }
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// etcd reads its config file with a YAML 1.1 parser, where a plain `n`, `yes`, `on` or `off` is a
/// boolean; serde_yaml writes YAML 1.2, which leaves such strings unquoted. A node named `n` then
/// made etcd refuse the file ("cannot unmarshal bool into ... name of type string"). Every plain
/// scalar (a mapping value or a list item) that YAML 1.1 reads as a boolean is quoted.
fn quote_yaml11_words(text: &str) -> String {
    const WORDS: &[&str] =
        &["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"];
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let split = body.rfind(": ").map(|i| i + 2).or_else(|| {
            let item = body.trim_start();
            item.starts_with("- ").then(|| body.len() - item.len() + 2)
        });
        match split {
            Some(at) if WORDS.contains(&&body[at..]) => {
                out.push_str(&body[..at]);
                out.push('\'');
                out.push_str(&body[at..]);
                out.push('\'');
                out.push_str(&line[body.len()..]);
            }
            _ => out.push_str(line),
        }
    }
    out
}

fn key_text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| serde_yaml::to_string(v).unwrap_or_default())
}

/// Keys whose etcd type is a string even when the value looks like a number or a duration.
const STRING_KEYS: &[&str] = &["auto-compaction-retention", "auto-compaction-mode"];

/// The YAML value of one `--etcd-arg` for etcd's config file. etcd reads the file as JSON into
/// typed fields, so the type matters: `true`/`false` become booleans, integers numbers, Go
/// durations (`5s`, `1m30s`, `500ms`) nanoseconds (etcd's duration fields are integers of
/// nanoseconds in the file), everything else a string. A key without `=` is a boolean flag set
/// to true.
pub fn extra_arg_value(arg: &str) -> (String, Value) {
    let (key, value) = match arg.split_once('=') {
        Some((k, v)) => (k.trim_start_matches('-').to_string(), Some(v)),
        None => (arg.trim_start_matches('-').to_string(), None),
    };
    let Some(value) = value else { return (key, Value::Bool(true)) };
    if STRING_KEYS.contains(&key.as_str()) {
        return (key, Value::String(value.into()));
    }
    let v = match value.to_ascii_lowercase().as_str() {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(i) = value.parse::<i64>() {
                Value::Number(i.into())
            } else if let Some(ns) = go_duration_nanos(value) {
                Value::Number(ns.into())
            } else {
                Value::String(value.into())
            }
        }
    };
    (key, v)
}

/// Nanoseconds of a Go duration string (`1h2m3.5s`, `250ms`, `10us`), or `None`.
fn go_duration_nanos(s: &str) -> Option<i64> {
    let mut rest = s;
    let mut total: f64 = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    (total <= i64::MAX as f64).then_some(total as i64)
}

impl EtcdConfigFile {
    /// The file's text: keys sorted, `--etcd-arg` values merged in (overriding).
    pub fn to_yaml(&self) -> String {
        let mut v = serde_yaml::to_value(self).expect("etcd config serializes");
        if let Value::Mapping(m) = &mut v {
            for arg in &self.extra_args {
                let (k, val) = extra_arg_value(arg);
                if !k.is_empty() {
                    m.insert(Value::String(k), val);
                }
            }
        }
        quote_yaml11_words(&serde_yaml::to_string(&sorted(v)).expect("etcd config serializes"))
    }

    /// Writes the file (0600, atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::store::write_file_atomic(path, self.to_yaml().as_bytes())
    }
}

/// What a client of the etcd described by a config file needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSide {
    /// The URL to connect to.
    pub endpoint: String,
    /// `client-transport-security.trusted-ca-file`, when set.
    pub trusted_ca_file: Option<PathBuf>,
    /// `client-transport-security.client-cert-auth`.
    pub client_cert_auth: bool,
}

/// Whether a parsed config file is etcd's (as opposed to the `endpoints:` file earlier versions
/// of ours wrote).
pub fn is_etcd_config(doc: &Mapping) -> bool {
    ["listen-client-urls", "advertise-client-urls"].iter().any(|k| doc.contains_key(*k))
}

fn get_str<'a>(m: &'a Mapping, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

/// Reads the client side of an etcd config file: the endpoint ([`pick_endpoint`]) and the CA.
pub fn client_side(doc: &Mapping, path: &Path) -> Result<ClientSide> {
    let listen = get_str(doc, "listen-client-urls").unwrap_or_default();
    let advertise = get_str(doc, "advertise-client-urls").unwrap_or_default();
    let endpoint = pick_endpoint(listen, advertise).ok_or_else(|| {
        Error::Invalid(format!(
            "etcd config {} names no client URL (listen-client-urls, advertise-client-urls); pass --etcd-endpoints",
            path.display()
        ))
    })?;
    let security = doc.get("client-transport-security").and_then(Value::as_mapping);
    let trusted_ca_file = security.and_then(|s| get_str(s, "trusted-ca-file")).map(PathBuf::from);
    let client_cert_auth = security.and_then(|s| s.get("client-cert-auth")).and_then(Value::as_bool).unwrap_or(false);
    Ok(ClientSide { endpoint, trusted_ca_file, client_cert_auth })
}

/// `quota-backend-bytes` of the etcd config file of a data dir (`server/db/etcd/config`), when
/// the file sets it (etcd's default applies otherwise, see `maintenance::effective_quota`).
pub fn quota_backend_bytes(data_dir: &Path) -> Option<i64> {
    let text = std::fs::read(data_dir.join("server/db/etcd/config")).ok()?;
    let doc: Mapping = serde_yaml::from_slice(&text).ok()?;
    quota_in(&doc)
}

fn quota_in(doc: &Mapping) -> Option<i64> {
    match doc.get("quota-backend-bytes")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `quota-backend-bytes` among `--etcd-arg` values (the last one wins, as in the config file).
pub fn quota_in_args(args: &[String]) -> Option<i64> {
    let mut doc = Mapping::new();
    for a in args {
        let (k, v) = extra_arg_value(a);
        doc.insert(Value::String(k), v);
    }
    quota_in(&doc)
}

/// The host of a URL, without brackets: `https://[::1]:2379` → `::1`.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h))
}

fn is_unspecified(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

/// The client URL to use, from etcd's `listen-client-urls` and `advertise-client-urls`: the
/// loopback one when etcd listens there (k3s listens on `https://127.0.0.1:2379` beside the
/// node's address, and its own tools connect there), else another loopback listener, else the
/// first advertised URL, else the first listener (a wildcard address replaced by loopback).
pub fn pick_endpoint(listen_client_urls: &str, advertise_client_urls: &str) -> Option<String> {
    let split = |s: &str| -> Vec<String> {
        s.split(',').map(str::trim).filter(|u| u.contains("://")).map(str::to_string).collect()
    };
    let listen = split(listen_client_urls);
    let advertise = split(advertise_client_urls);
    let loopback_exact = |u: &&String| url_host(u).is_some_and(|h| matches!(h, "127.0.0.1" | "::1" | "localhost"));
    let loopback_any = |u: &&String| {
        url_host(u).is_some_and(|h| h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
    };
    if let Some(u) = listen.iter().find(loopback_exact).or_else(|| listen.iter().find(loopback_any)) {
        return Some(u.clone());
    }
    if let Some(u) = advertise.first() {
        return Some(u.clone());
    }
    let first = listen.first()?;
    let host = url_host(first)?;
    if is_unspecified(host) {
        let loopback = if host.contains(':') { "[::1]" } else { "127.0.0.1" };
        let bracketed = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        return Some(first.replacen(&bracketed, loopback, 1));
    }
    Some(first.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_listener_is_preferred_in_either_order() {
        for listen in ["https://10.0.0.1:2379,https://127.0.0.1:2379", "https://127.0.0.1:2379,https://10.0.0.1:2379"] {
            assert_eq!(pick_endpoint(listen, "https://10.0.0.1:2379").as_deref(), Some("https://127.0.0.1:2379"));
        }
        assert_eq!(
            pick_endpoint("https://127.0.0.2:2379,https://127.0.0.1:2379", "").as_deref(),
            Some("https://127.0.0.1:2379")
        );
        assert_eq!(pick_endpoint("https://[::1]:2379", "").as_deref(), Some("https://[::1]:2379"));
        assert_eq!(pick_endpoint("https://127.0.0.5:3379", "").as_deref(), Some("https://127.0.0.5:3379"));
    }

    #[test]
    fn without_a_loopback_listener_the_advertised_url_then_a_wildcard_made_loopback() {
        assert_eq!(
            pick_endpoint("https://10.0.0.1:2379", "https://node1.example:2379").as_deref(),
            Some("https://node1.example:2379")
        );
        assert_eq!(pick_endpoint("https://0.0.0.0:2379", "").as_deref(), Some("https://127.0.0.1:2379"));
        assert_eq!(pick_endpoint("http://[::]:2379", "").as_deref(), Some("http://[::1]:2379"));
        assert_eq!(pick_endpoint("", ""), None);
    }

    #[test]
    fn strings_yaml_1_1_reads_as_booleans_are_quoted() {
        let cfg = EtcdConfigFile {
            name: "n".into(),
            extra_args: vec!["initial-cluster-state=new".into(), "log-level=on".into()],
            ..Default::default()
        };
        let text = cfg.to_yaml();
        assert!(text.contains("name: 'n'\n"), "{text}");
        assert!(text.contains("log-level: 'on'\n"), "{text}");
        assert!(text.contains("initial-cluster-state: new\n"), "{text}");
        let doc: Mapping = serde_yaml::from_str(&text).unwrap();
        assert_eq!(doc.get("name").and_then(Value::as_str), Some("n"));
        assert_eq!(quote_yaml11_words("log-outputs:\n- yes\n- stderr\n"), "log-outputs:\n- 'yes'\n- stderr\n");
    }

    #[test]
    fn the_file_is_written_with_sorted_keys_and_etcd_args_merged_in() {
        let cfg = EtcdConfigFile {
            name: "n1".into(),
            data_dir: "/d/server/db/etcd".into(),
            listen_client_urls: "https://127.0.0.1:2379,https://10.0.0.1:2379".into(),
            advertise_client_urls: "https://10.0.0.1:2379".into(),
            client_transport_security: TransportSecurity {
                cert_file: "/d/server/tls/etcd/server-client.crt".into(),
                key_file: "/d/server/tls/etcd/server-client.key".into(),
                trusted_ca_file: "/d/server/tls/etcd/server-ca.crt".into(),
                client_cert_auth: true,
            },
            heartbeat_interval: 100,
            election_timeout: 1000,
            logger: "zap".into(),
            log_outputs: vec!["stderr".into()],
            extra_args: vec![
                "quota-backend-bytes=8589934592".into(),
                "--auto-compaction-retention=1".into(),
                "election-timeout=5000".into(),
                "experimental-watch-progress-notify-interval=5s".into(),
                "enable-pprof".into(),
            ],
            ..Default::default()
        };
        let text = cfg.to_yaml();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.starts_with('-'))
            .filter_map(|l| l.split(':').next())
            .collect();
        let mut sorted_keys = keys.clone();
        sorted_keys.sort();
        assert_eq!(keys, sorted_keys, "{text}");
        let doc: Mapping = serde_yaml::from_str(&text).unwrap();
        assert_eq!(doc.get("quota-backend-bytes").and_then(Value::as_i64), Some(8589934592));
        assert_eq!(doc.get("auto-compaction-retention").and_then(Value::as_str), Some("1"));
        assert_eq!(doc.get("election-timeout").and_then(Value::as_u64), Some(5000), "an --etcd-arg overrides");
        assert_eq!(doc.get("experimental-watch-progress-notify-interval").and_then(Value::as_i64), Some(5_000_000_000));
        assert_eq!(doc.get("enable-pprof").and_then(Value::as_bool), Some(true));
        assert!(doc.get("force-new-cluster").is_none(), "false is left out");
        let side = client_side(&doc, Path::new("config")).unwrap();
        assert_eq!(side.endpoint, "https://127.0.0.1:2379");
        assert_eq!(side.trusted_ca_file.as_deref(), Some(Path::new("/d/server/tls/etcd/server-ca.crt")));
        assert!(side.client_cert_auth);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_nanos("1m30s"), Some(90_000_000_000));
        assert_eq!(go_duration_nanos("250ms"), Some(250_000_000));
        assert_eq!(go_duration_nanos("1.5h"), Some(5_400_000_000_000));
        for bad in ["", "5", "s", "5x", "abc"] {
            assert_eq!(go_duration_nanos(bad), None, "{bad}");
        }
    }
}
