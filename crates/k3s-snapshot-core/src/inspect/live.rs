//! The live cluster's side of `inspect diff --live`: etcd's keys under a prefix, read in pages
//! of [`PAGE`] keys at one revision (the first page's), kept as a [`fingerprint`] per key so
//! that memory grows with the number of keys, not with the values.

use std::collections::BTreeMap;

use etcd_client::GetOptions;

use super::at_rest::KeyRing;
use super::fingerprint;
use crate::etcd::EtcdConnection;
use crate::{Error, Result};

/// Keys per range request.
pub const PAGE: i64 = 500;

/// The end of the range of keys starting with `prefix` (`\0`, every key, for an empty one).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The live keys under `prefix` and the revision they were read at.
pub async fn fingerprints(
    conn: &mut EtcdConnection,
    prefix: &[u8],
    keys: Option<&KeyRing>,
) -> Result<(i64, BTreeMap<Vec<u8>, [u8; 32]>)> {
    let end = prefix_end(prefix);
    let mut out = BTreeMap::new();
    // etcd refuses an empty key: every key starts at `\0`.
    let mut from = if prefix.is_empty() { vec![0] } else { prefix.to_vec() };
    let mut revision = 0;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = conn
            .client
            .get(from.clone(), Some(opts))
            .await
            .map_err(|cause| Error::Etcd { endpoints: conn.endpoints.clone(), cause })?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let Some(last) = resp.kvs().last().map(|kv| kv.key().to_vec()) else { break };
        for kv in resp.kvs() {
            out.insert(kv.key().to_vec(), fingerprint(kv.value(), keys));
        }
        if !resp.more() {
            break;
        }
        from = last;
        from.push(0);
    }
    Ok((revision, out))
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_ends() {
        assert_eq!(super::prefix_end(b"/registry/"), b"/registry0");
        assert_eq!(super::prefix_end(b"a\xff"), b"b");
        assert_eq!(super::prefix_end(b""), b"\0");
    }
}
