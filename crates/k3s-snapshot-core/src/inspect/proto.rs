//! Kubernetes' protobuf storage encoding, decoded to the JSON that kubectl shows.
//!
//! The API server stores built-in objects as `k8s\0` followed by a `runtime.Unknown` (typeMeta
//! apiVersion and kind, raw, contentEncoding, contentType) whose `raw` is the object in protobuf.
//! The message types come from `k8s.fds`: a `FileDescriptorSet` compiled with protoc
//! (`--include_imports`, no source info) from the upstream `generated.proto` files of Kubernetes
//! 1.36 (k8s.io/api, apimachinery, apiextensions-apiserver, kube-aggregator) for every stable
//! group (core, apps, batch, networking, rbac, storage, policy, autoscaling v1/v2, discovery,
//! coordination, scheduling, certificates, admissionregistration, node, events, flowcontrol,
//! apiextensions, apiregistration). The field names of those files are the JSON names, so a
//! generic walk over a [`prost_reflect::DynamicMessage`] gives kubectl's JSON, with these types
//! written as their Go JSON marshallers write them: `Time` (RFC 3339, seconds; zero is `null`),
//! `MicroTime` (RFC 3339 with microseconds), `Duration` (Go's `1h2m3s`), `Quantity` (its string),
//! `IntOrString` (a number or a string), `RawExtension`/`JSON`/`FieldsV1` (the embedded JSON),
//! `bytes` (base64, as Secret `data`).
//!
//! The API server's protobuf writer always writes the non-pointer fields, empty or not, so a
//! generic walk sees `generateName: ""` where kubectl's `omitempty` shows nothing. Empty strings,
//! `false` and empty lists and maps are therefore left out; zero numbers are kept (a pointer field
//! such as `replicas: 0` means something), except `generation: 0`, which Go leaves out.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage, Value};
use serde_json::{Map, Value as Json};

static FDS: &[u8] = include_bytes!("k8s.fds");

/// The magic before a protobuf-encoded object.
pub const MAGIC: &[u8] = b"k8s\0";

struct Types {
    pool: DescriptorPool,
    /// (`<group's first label>.<version>`, kind) → message.
    by_kind: HashMap<(String, String), MessageDescriptor>,
}

fn types() -> &'static Types {
    static T: OnceLock<Types> = OnceLock::new();
    T.get_or_init(|| {
        let pool = DescriptorPool::decode(FDS).expect("the compiled Kubernetes descriptors decode");
        let mut by_kind = HashMap::new();
        for m in pool.all_messages() {
            let pkg = m.package_name();
            let mut parts = pkg.rsplit('.');
            if let (Some(v), Some(g)) = (parts.next(), parts.next()) {
                by_kind.insert((format!("{g}.{v}"), m.name().to_string()), m.clone());
            }
        }
        Types { pool, by_kind }
    })
}

/// The message type of `kind` in `api_version` (`v1`, `apps/v1`, `rbac.authorization.k8s.io/v1`).
pub fn message_for(api_version: &str, kind: &str) -> Option<MessageDescriptor> {
    let (group, version) = api_version.split_once('/').unwrap_or(("core", api_version));
    let label = group.split('.').next().unwrap_or(group).replace('-', "_");
    types().by_kind.get(&(format!("{label}.{version}"), kind.to_string())).cloned()
}

/// The decoded `runtime.Unknown` envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unknown {
    pub api_version: String,
    pub kind: String,
    pub raw: Vec<u8>,
    pub content_encoding: String,
    pub content_type: String,
}

/// Decodes the envelope after [`MAGIC`].
pub fn unknown(body: &[u8]) -> Result<Unknown, String> {
    let t = types();
    let desc = t.pool.get_message_by_name("apimachinery.pkg.runtime.Unknown").expect("runtime.Unknown is compiled in");
    let m =
        DynamicMessage::decode(desc, body).map_err(|e| format!("the runtime.Unknown envelope does not decode: {e}"))?;
    let s = |m: &DynamicMessage, f: &str| {
        m.get_field_by_name(f).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    };
    let tm = m.get_field_by_name("typeMeta").and_then(|v| v.as_message().cloned());
    Ok(Unknown {
        api_version: tm.as_ref().map(|t| s(t, "apiVersion")).unwrap_or_default(),
        kind: tm.as_ref().map(|t| s(t, "kind")).unwrap_or_default(),
        raw: m.get_field_by_name("raw").and_then(|v| v.as_bytes().map(|b| b.to_vec())).unwrap_or_default(),
        content_encoding: s(&m, "contentEncoding"),
        content_type: s(&m, "contentType"),
    })
}

/// Decodes `raw` as `desc` into kubectl's JSON, with `apiVersion` and `kind` first.
pub fn to_json(desc: MessageDescriptor, raw: &[u8], api_version: &str, kind: &str) -> Result<Json, String> {
    let m = DynamicMessage::decode(desc, raw).map_err(|e| format!("the {kind} protobuf does not decode: {e}"))?;
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Json::String(api_version.into()));
    obj.insert("kind".into(), Json::String(kind.into()));
    if let Json::Object(rest) = message(&m) {
        obj.extend(rest);
    }
    Ok(Json::Object(obj))
}

fn message(m: &DynamicMessage) -> Json {
    let name = m.descriptor().full_name().to_string();
    if let Some(special) = special(&name, m) {
        return special;
    }
    let mut out = Map::new();
    for (f, v) in m.fields() {
        let j = value(v);
        let empty = match &j {
            Json::String(s) => s.is_empty(),
            Json::Bool(b) => !b,
            Json::Array(a) => a.is_empty(),
            Json::Object(o) => o.is_empty() && (f.is_map() || f.is_list()),
            Json::Number(n) => f.name() == "generation" && n.as_i64() == Some(0),
            Json::Null => false,
        };
        if !empty {
            out.insert(f.name().to_string(), j);
        }
    }
    Json::Object(out)
}

fn value(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::I32(n) => Json::from(*n),
        Value::I64(n) => Json::from(*n),
        Value::U32(n) => Json::from(*n),
        Value::U64(n) => Json::from(*n),
        Value::F32(n) => Json::from(f64::from(*n)),
        Value::F64(n) => Json::from(*n),
        Value::String(s) => Json::String(s.clone()),
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::EnumNumber(n) => Json::from(*n),
        Value::Message(m) => message(m),
        Value::List(l) => Json::Array(l.iter().map(value).collect()),
        Value::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    prost_reflect::MapKey::String(s) => s.clone(),
                    prost_reflect::MapKey::Bool(b) => b.to_string(),
                    prost_reflect::MapKey::I32(n) => n.to_string(),
                    prost_reflect::MapKey::I64(n) => n.to_string(),
                    prost_reflect::MapKey::U32(n) => n.to_string(),
                    prost_reflect::MapKey::U64(n) => n.to_string(),
                };
                out.insert(key, value(v));
            }
            Json::Object(out)
        }
    }
}

fn field<'a>(m: &'a DynamicMessage, name: &str) -> Option<std::borrow::Cow<'a, Value>> {
    m.get_field_by_name(name)
}

fn int(m: &DynamicMessage, name: &str) -> i64 {
    field(m, name).and_then(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from))).unwrap_or(0)
}

fn embedded_json(raw: &[u8]) -> Json {
    serde_json::from_slice(raw).unwrap_or_else(|_| Json::String(base64::engine::general_purpose::STANDARD.encode(raw)))
}

/// The types whose Go JSON form is not their fields.
fn special(name: &str, m: &DynamicMessage) -> Option<Json> {
    let short = name.rsplit('.').next().unwrap_or(name);
    let meta = name.starts_with("apimachinery.");
    Some(match short {
        "Time" | "MicroTime" if meta => {
            let (secs, nanos) = (int(m, "seconds"), int(m, "nanos"));
            if (secs == 0 && nanos == 0) || secs == -62_135_596_800 {
                return Some(Json::Null);
            }
            let t = chrono::DateTime::from_timestamp(secs, u32::try_from(nanos).unwrap_or(0))?;
            let s = if short == "Time" {
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            } else {
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            };
            Json::String(s)
        }
        "Duration" if meta => Json::String(go_duration(int(m, "duration"))),
        "Quantity" if meta => {
            Json::String(field(m, "string").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())
        }
        "IntOrString" if meta => {
            if int(m, "type") == 1 {
                Json::String(field(m, "strVal").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())
            } else {
                Json::from(int(m, "intVal"))
            }
        }
        "RawExtension" | "FieldsV1" | "JSON" => {
            let key = if short == "FieldsV1" { "Raw" } else { "raw" };
            let raw = field(m, key).and_then(|v| v.as_bytes().map(|b| b.to_vec())).unwrap_or_default();
            if raw.is_empty() {
                Json::Null
            } else {
                embedded_json(&raw)
            }
        }
        _ => return None,
    })
}

/// Go's `time.Duration.String()` for whole units (`1h0m0s`, `90s` → `1m30s`, `500ms`).
fn go_duration(nanos: i64) -> String {
    if nanos == 0 {
        return "0s".into();
    }
    let neg = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    if n < 1_000_000_000 {
        return match n {
            n if n % 1_000_000 == 0 => format!("{neg}{}ms", n / 1_000_000),
            n if n % 1_000 == 0 => format!("{neg}{}µs", n / 1_000),
            n => format!("{neg}{n}ns"),
        };
    }
    let (secs, frac) = (n / 1_000_000_000, n % 1_000_000_000);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let s = if frac == 0 { s.to_string() } else { format!("{s}.{}", format!("{frac:09}").trim_end_matches('0')) };
    match (h, m) {
        (0, 0) => format!("{neg}{s}s"),
        (0, m) => format!("{neg}{m}m{s}s"),
        (h, m) => format!("{neg}{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_every_stable_group_are_found() {
        for (av, k) in [
            ("v1", "Secret"),
            ("v1", "ConfigMap"),
            ("v1", "Namespace"),
            ("apps/v1", "Deployment"),
            ("rbac.authorization.k8s.io/v1", "ClusterRole"),
            ("networking.k8s.io/v1", "Ingress"),
            ("batch/v1", "CronJob"),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
            ("flowcontrol.apiserver.k8s.io/v1", "FlowSchema"),
        ] {
            assert!(message_for(av, k).is_some(), "{av} {k}");
        }
        assert!(message_for("apps/v1", "Secret").is_none());
        assert!(message_for("example.com/v1", "Widget").is_none());
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration(90_000_000_000), "1m30s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(500_000_000), "500ms");
    }
}
