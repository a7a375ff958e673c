//! The native replay of a delta chain against its oracle, on etcd 3.5.1 and 3.4.23: a chain of
//! more than 10,000 revisions with puts of 1 KiB, overwrites, deletes, a DeleteRange of many keys
//! in one revision, transactions of many keys, leases granted, used and revoked inside the chain,
//! and a compaction inside it is restored twice from S3, once written straight into the db
//! (`--cluster-reset-restore-replay native`) and once on a private etcd (`etcd`). Both must read
//! the same, key for key (value, create and mod revision, version, lease), at the final revision
//! and at sampled earlier ones, etcd's `hashkv` must agree at each, the leases must be the same,
//! and both must equal the original cluster at every sampled revision it still holds.

use futures::StreamExt;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{assert_reset_done, block_on, connect, DataDir};

use crate::deltas::{restore_flags, revision, shipping_flags, strs, wait_following, wait_shipped};

tests::on_both_versions!(the_native_replay_reads_as_the_private_etcd_replay_key_for_key,);

/// Key, value, create revision, mod revision, version and lease of every key at a revision.
type Kv = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

fn keys_at(dd: &DataDir, rev: i64) -> Vec<Kv> {
    block_on(async {
        let mut kv = connect(dd).await.client.kv_client().max_decoding_message_size(256 << 20);
        let r = kv.get("", Some(etcd_client::GetOptions::new().with_all_keys().with_revision(rev))).await.unwrap();
        r.kvs()
            .iter()
            .map(|k| {
                (k.key().to_vec(), k.value().to_vec(), k.create_revision(), k.mod_revision(), k.version(), k.lease())
            })
            .collect()
    })
}

fn hash_kv(dd: &DataDir, rev: i64) -> u32 {
    block_on(async { connect(dd).await.client.hash_kv(rev).await.unwrap().hash() })
}

/// Lease ids and their granted TTLs.
fn leases(dd: &DataDir) -> Vec<(i64, i64)> {
    block_on(async {
        let mut c = connect(dd).await.client;
        let mut out = Vec::new();
        for l in c.leases().await.unwrap().leases() {
            let ttl = c.lease_time_to_live(l.id(), None).await.unwrap().granted_ttl();
            out.push((l.id(), ttl));
        }
        out.sort_unstable();
        out
    })
}

/// The chain's writes: 1 KiB puts over 3,000 keys (most of them overwrites), deletes, a
/// DeleteRange of 500 keys in one revision, transactions of 100 puts, leases (one revoked with
/// its keys, one left with keys), and a compaction in the middle. Returns the compacted revision.
async fn workload(c: &etcd_client::Client) -> i64 {
    let value = |i: usize| format!("{i:>1024}").into_bytes();
    let puts = |range: std::ops::Range<usize>| {
        futures::stream::iter(range)
            .map(|i| {
                let mut c = c.clone();
                async move { c.put(format!("/registry/pods/ns/p{:05}", i % 3_000), value(i), None).await.unwrap() }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
    };
    puts(0..6_000).await;
    let mut c = c.clone();
    for t in 0..20 {
        let ops: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| etcd_client::TxnOp::put(format!("/registry/configmaps/t{t:02}/c{i:03}"), value(i), None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let revoked = c.lease_grant(600, None).await.unwrap().id();
    let kept = c.lease_grant(900, None).await.unwrap().id();
    for i in 0..50 {
        let lease = if i % 2 == 0 { revoked } else { kept };
        let opts = etcd_client::PutOptions::new().with_lease(lease);
        c.put(format!("/registry/events/e{i:03}"), value(i), Some(opts)).await.unwrap();
    }
    let compacted = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(compacted, None).await.unwrap();
    puts(6_000..10_000).await;
    for i in (0..3_000).step_by(7) {
        c.delete(format!("/registry/pods/ns/p{i:05}"), None).await.unwrap();
    }
    let r = c.delete("/registry/configmaps/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    assert!(r.deleted() >= 500, "one DeleteRange of many keys ({} deleted)", r.deleted());
    c.lease_revoke(revoked).await.unwrap();
    puts(10_000..10_500).await;
    compacted
}

fn the_native_replay_reads_as_the_private_etcd_replay_key_for_key(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let s = dd.start(&strs(&shipping_flags(&s3)));
    wait_following(&s);
    let base = revision(&dd);
    let compacted = block_on(async { workload(&connect(&dd).await.client).await });
    let last = revision(&dd);
    assert!(last - base >= 10_000, "a chain of {} revisions", last - base);
    // Sampled revisions: spread over the chain, its first and its last.
    let samples: Vec<i64> = (0..8).map(|i| base + 1 + (last - base - 1) * i / 7).collect();
    let original: Vec<(i64, Vec<Kv>)> =
        samples.iter().filter(|&&r| r >= compacted).map(|&r| (r, keys_at(&dd, r))).collect();
    assert!(original.len() >= 3, "the original still holds some sampled revisions");
    wait_shipped(&s, last);
    s.stop();
    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();

    let restore = |how: &str| {
        let fresh = DataDir::new(v);
        let flags = restore_flags(
            &s3,
            &token,
            &[
                "--cluster-reset-restore-deltas".into(),
                "--cluster-reset-restore-bump-revision=0".into(),
                format!("--cluster-reset-restore-replay={how}"),
            ],
        );
        let r = fresh.run(&strs(&flags));
        assert_reset_done(&r, &fresh);
        let said = if how == "native" {
            "replayed the delta segments into the restored db"
        } else {
            "replaying delta segments on a private etcd"
        };
        assert!(r.stderr.contains(said), "{how}: the log says \"{said}\":\n{}", r.stderr);
        let s = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
        assert_eq!(revision(&fresh), last, "{how}: the restored revision");
        let at: Vec<(i64, Vec<Kv>, u32)> =
            samples.iter().map(|&r| (r, keys_at(&fresh, r), hash_kv(&fresh, r))).collect();
        let leased = leases(&fresh);
        s.stop();
        (at, leased)
    };
    let (native, native_leases) = restore("native");
    let (oracle, oracle_leases) = restore("etcd");
    for ((r, n, nh), (_, o, oh)) in native.iter().zip(&oracle) {
        assert_eq!(n.len(), o.len(), "revision {r}: the number of keys");
        assert!(n == o, "revision {r}: the native replay reads differently from the private etcd's");
        assert_eq!(nh, oh, "revision {r}: hashkv differs");
    }
    for (r, want) in &original {
        let (_, got, _) = native.iter().find(|(x, _, _)| x == r).unwrap();
        assert!(got == want, "revision {r}: the restore differs from the original cluster");
    }
    assert_eq!(native_leases, oracle_leases, "the leases");
    assert!(!native_leases.is_empty(), "the kept lease, granted inside the chain, is there");
}
