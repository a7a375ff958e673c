//! Feeds arbitrary bytes to the snapshot reader: opening, the structural check,
//! the etcd status computation and the bucket accessors must return errors on
//! bad input, never panic, loop forever or overflow the stack. The writer takes the
//! same input: an image the reader accepts is rewritten (with an edit, as the revision
//! bump makes), and the result must pass the check and read back the same entries.
#![no_main]

use std::path::Path;

use k3s_snapshot_core::bbolt::writer::{dump, write_image, Edits};
use k3s_snapshot_core::bbolt::{BoltError, Db, Value};
use k3s_snapshot_core::status;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let name = Path::new("fuzz.db");
    let _ = status::status_from_bytes(name, data.to_vec());

    let Ok(db) = Db::from_bytes(name, data.to_vec(), None) else {
        return;
    };
    let _ = db.check();
    let root = db.root();
    let _ = root.get(b"key");
    let _ = root.for_each(|name, v| {
        if let Value::Bucket(b) = v {
            let _ = b.get(name);
            let _ = b.for_each(|k, _| {
                let _ = b.get(k);
                Ok::<_, BoltError>(())
            });
        }
        Ok::<_, BoltError>(())
    });

    let Ok(()) = db.check() else { return };
    let Ok(before) = dump(&db) else { return };
    let out = std::env::temp_dir().join(format!("k3s-snapshot-fuzz-rewrite-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut edits = Edits::default();
    edits.put(b"meta", b"scheduledCompactRev", b"x");
    if write_image(&db, &out, &edits).is_ok() {
        let new = Db::open(&out).expect("a written image opens");
        new.check().expect("a written image passes the check");
        let after = dump(&new).expect("a written image reads");
        let untouched = |e: &&(Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>)| {
            !(e.0.first().is_some_and(|b| b == b"meta") || (e.0.is_empty() && e.1.starts_with(b"meta#")))
        };
        let a: Vec<_> = before.iter().filter(untouched).collect();
        let b: Vec<_> = after.iter().filter(untouched).collect();
        assert_eq!(a, b, "the rewrite changed entries it was not asked to change");
    }
    let _ = std::fs::remove_file(&out);
});
