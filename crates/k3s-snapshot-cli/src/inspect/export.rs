//! `inspect export`: objects as manifests for `kubectl apply`, each with a `# from snapshot …`
//! comment, the fields the API server sets and `status` removed. By namespace it leaves out what
//! controllers re-create (objects with a controller owner reference, `events`, `endpoints`)
//! unless `--kind` names them.

use std::io::Write;

use k3s_snapshot_core::inspect::at_rest::KeyRing;
use k3s_snapshot_core::inspect::k8s::{self, Decoded};
use k3s_snapshot_core::inspect::{self as core};
use serde_json::Value as Json;

use super::{show_key, write_object, Failures, ObjectFormat, Source};

pub struct Selection {
    pub prefix: Option<String>,
    pub namespace: Option<String>,
    pub kind: Option<String>,
}

fn controlled(obj: &Json) -> bool {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Json::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r.get("controller").and_then(Json::as_bool) == Some(true)))
}

pub fn run(src: &Source, sel: &Selection, output: ObjectFormat, ring: Option<&KeyRing>) -> anyhow::Result<()> {
    let prefix = sel.prefix.clone().unwrap_or_else(|| "/registry/".into());
    let scan = core::state(&src.db, src.opened.at, prefix.as_bytes())?;
    let origin = src.describe(scan.revision);
    eprintln!("# {origin}");
    let mut out = std::io::stdout().lock();
    let mut failures = Failures::default();
    let (mut items, mut skipped, mut first) = (Vec::new(), 0usize, true);
    for (key, e) in &scan.keys {
        let Some(r) = k8s::object_ref(key) else { continue };
        if let Some(ns) = &sel.namespace {
            let is_ns = r.resource == "namespaces" && r.namespace.is_none() && &r.name == ns;
            if !is_ns && r.namespace.as_deref() != Some(ns.as_str()) {
                continue;
            }
        }
        let value = core::value_at(&src.db, e)?;
        let obj = match k8s::decode(value, ring) {
            Ok(Decoded::Object { json, .. }) => json,
            Ok(d @ Decoded::Undecoded { .. }) => {
                if sel.kind.as_deref().is_none_or(|k| k8s::kind_matches(k, &r, &d)) {
                    failures.report(
                        key,
                        &format!("a {} stored as protobuf, which this build does not decode", d.kind().unwrap_or("?")),
                    );
                }
                continue;
            }
            Ok(d @ Decoded::Encrypted { .. }) => {
                if let (true, Decoded::Encrypted { provider, key_name, why }) =
                    (sel.kind.as_deref().is_none_or(|k| k8s::kind_matches(k, &r, &d)), &d)
                {
                    failures.report(key, &format!("encrypted at rest ({provider}, key {key_name:?}): {why}"));
                }
                continue;
            }
            Ok(Decoded::Text(_) | Decoded::Binary(_)) => continue,
            Err(why) => {
                failures.report(key, &why);
                continue;
            }
        };
        let kind_ok = match &sel.kind {
            Some(k) => {
                let probe = Decoded::Object {
                    json: serde_json::json!({"kind": obj.get("kind")}),
                    stored_as: "",
                    decrypted: None,
                };
                k8s::kind_matches(k, &r, &probe)
            }
            None => {
                if sel.namespace.is_some()
                    && (matches!(r.resource.as_str(), "events" | "endpoints" | "events.events.k8s.io")
                        || controlled(&obj))
                {
                    skipped += 1;
                    false
                } else {
                    true
                }
            }
        };
        if !kind_ok {
            continue;
        }
        let comment = format!("# from {origin}: {} (mod revision {})", show_key(key), e.revision);
        let owners = obj.pointer("/metadata/ownerReferences").is_some();
        let obj = k8s::for_apply(obj);
        match output {
            ObjectFormat::Yaml => {
                if !first {
                    writeln!(out, "---")?;
                }
                first = false;
                writeln!(out, "{comment}")?;
                if owners {
                    writeln!(out, "# note: its ownerReferences name owners by uid; if they are gone, the garbage collector deletes it again")?;
                }
                write_object(&mut out, &obj, output)?;
            }
            ObjectFormat::Json => {
                eprintln!("{comment}");
                items.push(obj);
            }
        }
    }
    if output == ObjectFormat::Json {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        write_object(&mut out, &list, output)?;
    }
    if skipped > 0 {
        eprintln!("# left out {skipped} object(s) that controllers re-create (owned by a controller, events, endpoints); --kind exports them");
    }
    failures.finish()
}
