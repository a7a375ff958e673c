//! What an etcd key and value mean to Kubernetes: the resource, namespace and name in a key
//! (`/registry/<resource>/[<namespace>/]<name>`, `/registry/<group>/<resource>/…` for groups
//! stored under their name, `/registry/services/specs/…` and `/registry/services/endpoints/…`),
//! a value decoded ([`decode`]: encrypted at rest, protobuf, JSON, text or bytes), and an object
//! made fit for `kubectl apply` ([`for_apply`]).

use serde_json::Value as Json;

use super::at_rest::{self, KeyRing};
use super::proto;

/// The object a key names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectRef {
    /// `secrets`, `deployments`, `widgets.example.com`, …
    pub resource: String,
    pub namespace: Option<String>,
    pub name: String,
}

/// The object under `/registry/` that `key` names; `None` for other keys (leases of masters,
/// ranges, keys outside `/registry/`).
pub fn object_ref(key: &[u8]) -> Option<ObjectRef> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix("/registry/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    let (resource, tail) = match segs.as_slice() {
        ["services", kind @ ("specs" | "endpoints"), tail @ ..] => {
            (if *kind == "specs" { "services".to_string() } else { "endpoints".to_string() }, tail)
        }
        [group, res, tail @ ..] if group.contains('.') => (format!("{res}.{group}"), tail),
        [res, tail @ ..] => (res.to_string(), tail),
        [] => return None,
    };
    match tail {
        [name] if !name.is_empty() => Some(ObjectRef { resource, namespace: None, name: name.to_string() }),
        [ns, name] if !ns.is_empty() && !name.is_empty() => {
            Some(ObjectRef { resource, namespace: Some(ns.to_string()), name: name.to_string() })
        }
        _ => None,
    }
}

/// A value, decoded as far as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A Kubernetes object as kubectl shows it (`protobuf` or `json` as stored); `decrypted`
    /// names the provider and key when it was encrypted at rest.
    Object {
        json: Json,
        stored_as: &'static str,
        decrypted: Option<String>,
    },
    /// A protobuf object of a kind the compiled descriptors do not have.
    Undecoded {
        api_version: String,
        kind: String,
        raw_len: usize,
    },
    /// Encrypted at rest, and not decrypted (no `--encryption-config`, or why not).
    Encrypted {
        provider: String,
        key_name: String,
        why: String,
    },
    Text(String),
    Binary(Vec<u8>),
}

impl Decoded {
    /// The object's kind, when known.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Decoded::Object { json, .. } => json.get("kind").and_then(Json::as_str),
            Decoded::Undecoded { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// Decodes a value. An error is one line saying what in the value is wrong (a truncated or
/// altered protobuf, an envelope that lies about its length, nesting too deep).
pub fn decode(value: &[u8], keys: Option<&KeyRing>) -> Result<Decoded, String> {
    let mut decrypted = None;
    let plain;
    let value = match at_rest::envelope(value) {
        Some(env) => {
            let Some(ring) = keys else {
                return Ok(Decoded::Encrypted {
                    provider: env.provider,
                    key_name: env.key_name,
                    why: "give --encryption-config to decrypt it".into(),
                });
            };
            match ring.decrypt(&env) {
                Ok(p) => {
                    decrypted = Some(format!("{}/{}", env.provider, env.key_name));
                    plain = p;
                    &plain[..]
                }
                Err(why) => return Ok(Decoded::Encrypted { provider: env.provider, key_name: env.key_name, why }),
            }
        }
        None if value.starts_with(at_rest::PREFIX) => return Err("a k8s:enc: prefix cut short".into()),
        None => value,
    };
    if let Some(body) = value.strip_prefix(proto::MAGIC) {
        let u = proto::unknown(body)?;
        if !u.content_encoding.is_empty() {
            return Err(format!("content encoding {:?} is not decoded", u.content_encoding));
        }
        let Some(desc) = proto::message_for(&u.api_version, &u.kind) else {
            return Ok(Decoded::Undecoded { api_version: u.api_version, kind: u.kind, raw_len: u.raw.len() });
        };
        let json = proto::to_json(desc, &u.raw, &u.api_version, &u.kind)?;
        return Ok(Decoded::Object { json, stored_as: "protobuf", decrypted });
    }
    if value.first() == Some(&b'{') {
        return match serde_json::from_slice::<Json>(value) {
            Ok(json) if json.is_object() => Ok(Decoded::Object { json, stored_as: "json", decrypted }),
            Ok(_) => Err("a JSON value that is not an object".into()),
            Err(e) => Err(format!("JSON that does not parse: {e}")),
        };
    }
    Ok(match std::str::from_utf8(value) {
        Ok(s) => Decoded::Text(s.to_string()),
        Err(_) => Decoded::Binary(value.to_vec()),
    })
}

/// Whether `kind` (as given to `--kind`: `Secret`, `secret`, `secrets`) names this object.
pub fn kind_matches(wanted: &str, r: &ObjectRef, d: &Decoded) -> bool {
    let w = wanted.to_ascii_lowercase();
    let res = r.resource.split('.').next().unwrap_or(&r.resource);
    d.kind().is_some_and(|k| k.eq_ignore_ascii_case(&w)) || res == w || res == format!("{w}s")
}

/// The object made fit to re-apply: the fields the API server sets (`resourceVersion`, `uid`,
/// `creationTimestamp`, `managedFields`, `selfLink`, `generation`, `deletionTimestamp`,
/// `deletionGracePeriodSeconds`) and `status` removed.
pub fn for_apply(mut obj: Json) -> Json {
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
        if let Some(m) = o.get_mut("metadata").and_then(Json::as_object_mut) {
            for f in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "managedFields",
                "selfLink",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                m.remove(f);
            }
        }
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(res: &str, ns: Option<&str>, name: &str) -> Option<ObjectRef> {
        Some(ObjectRef { resource: res.into(), namespace: ns.map(Into::into), name: name.into() })
    }

    #[test]
    fn registry_keys_name_their_objects() {
        assert_eq!(
            object_ref(b"/registry/secrets/kube-system/k3s-serving"),
            r("secrets", Some("kube-system"), "k3s-serving")
        );
        assert_eq!(object_ref(b"/registry/namespaces/prod"), r("namespaces", None, "prod"));
        assert_eq!(
            object_ref(b"/registry/services/specs/default/kubernetes"),
            r("services", Some("default"), "kubernetes")
        );
        assert_eq!(
            object_ref(b"/registry/services/endpoints/default/kubernetes"),
            r("endpoints", Some("default"), "kubernetes")
        );
        assert_eq!(object_ref(b"/registry/example.com/widgets/ns1/w"), r("widgets.example.com", Some("ns1"), "w"));
        assert_eq!(object_ref(b"/registry/ranges/serviceips"), r("ranges", None, "serviceips"));
        assert_eq!(object_ref(b"/registry/a/b/c/d"), None);
        assert_eq!(object_ref(b"/other/x"), None);
        assert_eq!(object_ref(b"/registry/\xff"), None);
    }

    #[test]
    fn plain_values_are_text_json_or_bytes_and_encrypted_ones_are_never_printed() {
        assert_eq!(decode(b"hello", None).unwrap(), Decoded::Text("hello".into()));
        assert_eq!(decode(b"\xff\x00", None).unwrap(), Decoded::Binary(vec![0xff, 0]));
        assert!(matches!(decode(br#"{"kind":"Widget"}"#, None).unwrap(), Decoded::Object { stored_as: "json", .. }));
        assert!(decode(b"{\"kind\":", None).unwrap_err().contains("JSON"));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(decode(format!("{{\"a\":{deep}}}").as_bytes(), None).is_err());
        let enc = at_rest::encrypt_for_tests("aescbc", "k1", &[1; 32], &[2; 16], b"k8s\0x");
        assert!(matches!(decode(&enc, None).unwrap(), Decoded::Encrypted { .. }));
        assert!(decode(b"k8s:enc:aescbc", None).is_err());
    }

    #[test]
    fn apply_form_drops_server_fields_and_status() {
        let o = serde_json::json!({"kind":"ConfigMap","metadata":{"name":"a","uid":"u","resourceVersion":"5","creationTimestamp":"t","managedFields":[],"labels":{"x":"y"}},"status":{},"data":{"k":"v"}});
        assert_eq!(
            for_apply(o),
            serde_json::json!({"kind":"ConfigMap","metadata":{"name":"a","labels":{"x":"y"}},"data":{"k":"v"}})
        );
    }
}
