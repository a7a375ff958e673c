//! Feeds arbitrary bytes to the snapshot reader: opening, the structural check,
//! the etcd status computation and the bucket accessors must return errors on
//! bad input, never panic, loop forever or overflow the stack.
#![no_main]

use std::path::Path;

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
});
