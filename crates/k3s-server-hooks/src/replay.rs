//! The restore side of continuous backup: which delta segments follow the restored snapshot
//! ([`plan`], in the reset's checks), and replaying them into the restored data ([`replay`],
//! before the swap): natively, straight into the restored db
//! ([`k3s_snapshot_core::delta_replay`], at disk speed), or on a private etcd, one transaction
//! per revision (`--cluster-reset-restore-replay etcd`, and the fallback for a db the native
//! replay does not write into; the tests use it as the oracle the native result must equal).
//!
//! The private etcd runs on the scratch dir with loopback-only client and peer URLs on free
//! ports, so nothing outside can reach it. Each original revision becomes one transaction of its
//! puts and deletes, so revision numbers, create revisions and versions come out as they were;
//! each transaction's revision is checked against the segment's. Leases: a key's lease that the
//! snapshot does not know (granted after it) is granted again with its original id and a TTL of
//! [`REPLAYED_LEASE_TTL_SECS`]: its keys stay leased and expire unless an owner keeps the lease
//! alive, as they would have in the lost cluster once their owner stopped; no key is left bound to
//! a lease that does not exist.
//!
//! Encrypted segments (`.seg.age`) are decrypted with `--etcd-snapshot-encryption-identity-file`
//! into scratch files in the reset's scratch dir during [`plan`], so a missing or wrong identity
//! and a truncated or altered segment (age's authentication) are refused with the other checks,
//! before anything changes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{LeaseGrantOptions, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use k3s_snapshot_core::delta::{self, SegmentName};
use k3s_snapshot_core::encryption::{self, IDENTITY_FLAG};
use k3s_snapshot_core::store::{create_private_dir, ScratchFile, SnapshotStore};
use tokio_util::sync::CancellationToken;

use crate::config::{ReplayWith, ServerConfig};
use crate::etcd_proc::{EtcdBinaries, EtcdLaunch, EtcdProcess};
use crate::{Error, Result};

/// TTL given to a lease that the snapshot does not know, granted again during the replay.
pub const REPLAYED_LEASE_TTL_SECS: i64 = 60;

/// The segments to replay, verified, on local disk (in plaintext: an encrypted one as the scratch
/// file it was decrypted to, removed with the plan).
#[derive(Debug)]
pub struct DeltaPlan {
    pub base: i64,
    pub reached: i64,
    pub segments: Vec<(SegmentName, PathBuf)>,
    /// The plaintext of encrypted segments, removed when the plan is dropped.
    _decrypted: Vec<ScratchFile>,
}

fn reset_err(m: String) -> Error {
    Error::Reset(m)
}

/// Whether the reset replays deltas at all.
pub fn wanted(cfg: &ServerConfig) -> bool {
    let r = &cfg.restore;
    r.deltas || r.to_revision.is_some() || r.to_time.is_some()
}

/// Finds the chain after `base` (the restored db's revision) in S3 (with `--etcd-s3`) or the
/// snapshot dir, fetches S3 segments into `into`, and verifies every one. With
/// `--cluster-reset-restore-to-revision` the chain must reach it exactly; otherwise a gap ends
/// the replay where it is, and the log says so. With the base's `history` (etcd's cluster ID
/// from its metadata), only segments of that history follow it.
pub async fn plan(cfg: &ServerConfig, base: i64, history: Option<u64>, into: &Path) -> Result<DeltaPlan> {
    let to_rev = cfg.restore.to_revision;
    let to_time = cfg.restore.to_time;
    if to_rev.is_some_and(|n| n < base) {
        return Err(reset_err(format!(
            "the snapshot is at revision {base}, after --cluster-reset-restore-to-revision {}; choose an older snapshot (or `latest`, which picks one at or below it); nothing was changed",
            to_rev.unwrap_or_default()
        )));
    }
    let local = cfg.snapshot_store();
    let remote: Option<&Arc<dyn SnapshotStore>> = cfg.snapshots.remote.as_ref();
    let segments = match remote {
        Some(store) => delta::list_segments(store.as_ref()).await.map_err(|e| {
            reset_err(format!("cannot list delta segments in {}: {e}; nothing was changed", store.describe()))
        })?,
        None => delta::list_segments(&local).await.map_err(|e| {
            reset_err(format!("cannot list delta segments in {}: {e}; nothing was changed", local.describe()))
        })?,
    };
    let (chain, reached) = delta::chain_after(base, history, &segments, to_rev, to_time);
    if let Some(n) = to_rev {
        if reached < n {
            return Err(reset_err(format!(
                "the delta segments after the snapshot (revision {base}) reach only revision {reached}, not {n}: a gap or a missing segment; nothing was changed"
            )));
        }
    }
    let later = segments.iter().filter(|s| s.follows_history(history) && s.from > reached + 1).count();
    if later > 0 && to_rev.is_none() && to_time.is_none() {
        tracing::warn!(
            reached,
            later_segments = later,
            "the delta chain stops at revision {reached}: later segments exist after a gap (a compaction or downtime started a new chain); the replay stops there"
        );
    }
    if let Some(s) = chain.iter().find(|s| s.encrypted) {
        if cfg.identities.is_none() {
            return Err(need_identity(&s.file));
        }
    }
    let (mut out, mut decrypted) = (Vec::new(), Vec::new());
    if remote.is_some() || chain.iter().any(|s| s.encrypted) {
        create_private_dir(into)?;
    }
    for s in chain {
        let mut path = match remote {
            Some(store) => {
                let dest = into.join(&s.file);
                fetch(store.as_ref(), &s.file, &dest).await?;
                dest
            }
            None => local.dir().join(&s.file),
        };
        if s.encrypted {
            let plain = decrypt(cfg, &path, into, &s.file).await?;
            if remote.is_some() {
                let _ = std::fs::remove_file(&path);
            }
            path = plain.path().to_path_buf();
            decrypted.push(plain);
        }
        let (name, p) = (s.clone(), path.clone());
        tokio::task::spawn_blocking(move || delta::verify(&p, &name))
            .await
            .map_err(|e| reset_err(format!("verify task failed: {e}")))?
            .map_err(|e| reset_err(format!("{e}; nothing was changed")))?;
        out.push((s.clone(), path));
    }
    tracing::info!(base, reached, segments = out.len(), "delta segments to replay after the snapshot");
    Ok(DeltaPlan { base, reached, segments: out, _decrypted: decrypted })
}

fn need_identity(file: &str) -> Error {
    reset_err(format!(
        "delta segment {file} is encrypted (age): give {IDENTITY_FLAG} with the private key of one of its recipients; nothing was changed"
    ))
}

/// Decrypts the segment at `path` into a scratch file in `into`, streaming.
async fn decrypt(cfg: &ServerConfig, path: &Path, into: &Path, file: &str) -> Result<ScratchFile> {
    let (src, dir, ids, shown) = (path.to_path_buf(), into.to_path_buf(), cfg.identities.clone(), file.to_string());
    tokio::task::spawn_blocking(move || encryption::decrypt_to_scratch(&src, &dir, ids.as_deref(), &shown))
        .await
        .map_err(|e| reset_err(format!("decryption task failed: {e}")))?
        .map_err(|e| match e {
            k3s_snapshot_core::Error::Decrypt { detail, .. } => {
                reset_err(format!("delta segment {file} cannot be decrypted: {detail}; nothing was changed"))
            }
            k3s_snapshot_core::Error::NeedIdentity { .. } => need_identity(file),
            e => e.into(),
        })
}

async fn fetch(store: &dyn SnapshotStore, key: &str, dest: &Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (_, mut body) = store.get(key).await?;
    let mut f = tokio::fs::File::create(dest).await.map_err(Error::io("create", dest))?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| reset_err(format!("downloading {key}: {e}")))?;
        f.write_all(&chunk).await.map_err(Error::io("write", dest))?;
    }
    f.flush().await.map_err(Error::io("write", dest))?;
    Ok(())
}

/// Replays `plan` into the restored data dir `data_dir`: natively into its db
/// ([`k3s_snapshot_core::delta_replay`]), or on a private etcd (`--cluster-reset-restore-replay
/// etcd`, or when the db has a shape the native replay does not write into).
pub async fn replay(
    cfg: &ServerConfig,
    bins: &EtcdBinaries,
    launch: &EtcdLaunch,
    data_dir: &Path,
    plan: &DeltaPlan,
    cancel: &CancellationToken,
) -> Result<()> {
    if plan.segments.is_empty() {
        return Ok(());
    }
    let mode = cfg.restore.replay_with;
    if mode != ReplayWith::Etcd {
        match replay_native(data_dir, plan).await? {
            None => return Ok(()),
            Some(why) if mode == ReplayWith::Native => {
                return Err(reset_err(format!(
                    "the restored db cannot be replayed into natively ({why}); --cluster-reset-restore-replay=auto or etcd replays on a private etcd; nothing was changed"
                )))
            }
            Some(why) => tracing::info!(reason = %why, "the native replay does not write into this db; replaying on a private etcd"),
        }
    }
    replay_on_etcd(cfg, bins, launch, data_dir, plan, cancel).await
}

/// The native replay into `data_dir`'s db; `Some(why)` when the db has a shape it does not
/// write into (nothing changed).
async fn replay_native(data_dir: &Path, plan: &DeltaPlan) -> Result<Option<String>> {
    use k3s_snapshot_core::delta_replay::{self, Outcome};
    let db = data_dir.join("member/snap/db");
    let paths: Vec<PathBuf> = plan.segments.iter().map(|(_, p)| p.clone()).collect();
    let (base, reached) = (plan.base, plan.reached);
    tracing::info!(
        from = base + 1,
        to = reached,
        segments = paths.len(),
        "replaying delta segments into the restored db"
    );
    let started = std::time::Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        delta_replay::replay(&db, base, reached, &refs, REPLAYED_LEASE_TTL_SECS)
    })
    .await
    .map_err(|e| reset_err(format!("replay task failed: {e}")))?
    .map_err(|e| reset_err(format!("replaying delta segments: {e}; nothing was changed")))?;
    match outcome {
        Outcome::Unsupported(why) => Ok(Some(why)),
        Outcome::Replayed(r) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                revision = reached,
                revisions = r.revisions,
                events = r.events,
                leases_granted_again = r.leases.len(),
                seconds = format!("{secs:.2}"),
                revisions_per_second = (r.revisions as f64 / secs.max(1e-6)) as u64,
                "replayed the delta segments into the restored db"
            );
            Ok(None)
        }
    }
}

/// Replays `plan` into the restored data dir `data_dir` on a private etcd, then stops it.
async fn replay_on_etcd(
    cfg: &ServerConfig,
    bins: &EtcdBinaries,
    launch: &EtcdLaunch,
    data_dir: &Path,
    plan: &DeltaPlan,
    cancel: &CancellationToken,
) -> Result<()> {
    let port = |what: &str| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| reset_err(format!("no free loopback port for the replay's {what}: {e}")))
    };
    let peer = format!("https://127.0.0.1:{}", port("peer URL")?);
    let mut private = launch.clone();
    private.data_dir = data_dir.to_path_buf();
    private.client_url = format!("https://127.0.0.1:{}", port("client URL")?);
    private.initial_cluster = format!("{}={peer}", private.name);
    private.peer_url = peer;
    private.metrics_url = None;
    private.force_new_cluster = false;
    // A DeleteRange of many keys is one revision of many delete events: one transaction here.
    private.extra_args.push("max-txn-ops=1000000".into());
    private.extra_args.push("max-request-bytes=67108864".into());
    let client = private.client_config();
    tracing::info!(
        from = plan.base + 1,
        to = plan.reached,
        segments = plan.segments.len(),
        "replaying delta segments on a private etcd"
    );
    let started = std::time::Instant::now();
    let mut etcd = EtcdProcess::start(bins, &private).await?;
    let result = async {
        let conn = etcd.wait_ready(&client, cfg.etcd_ready_timeout, cancel).await?;
        apply(conn.client, plan).await
    }
    .await;
    let stopped = etcd.stop(cfg.etcd_stop_grace).await;
    let replayed = result?;
    stopped?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        revision = plan.reached,
        transactions = replayed,
        seconds = format!("{secs:.2}"),
        revisions_per_second = ((plan.reached - plan.base) as f64 / secs.max(1e-6)) as u64,
        "replayed the delta segments on a private etcd"
    );
    Ok(())
}

async fn apply(mut client: etcd_client::Client, plan: &DeltaPlan) -> Result<u64> {
    let fail = |m: String| reset_err(format!("replaying delta segments: {m}; nothing was changed"));
    let now = client.get(vec![0u8], None).await.map_err(|e| fail(e.to_string()))?;
    let at = now.header().map_or(0, |h| h.revision());
    if at != plan.base {
        return Err(fail(format!("the restored etcd is at revision {at}, the chain starts after {}", plan.base)));
    }
    // The private etcd's lessor runs: a lease of the snapshot expires after its TTL, and its
    // keys' deletion would be a revision the chain does not have. Every lease is kept alive
    // until the replay ends; the chain itself holds the deletes of the leases that did expire.
    let mut keeper = LeaseKeeper::new(client.clone());
    let base_leases: Vec<i64> =
        client.leases().await.map_err(|e| fail(e.to_string()))?.leases().iter().map(|l| l.id()).collect();
    for id in &base_leases {
        keeper.keep(*id).await.map_err(|e| fail(format!("keeping lease {id:x} of the snapshot alive: {e}")))?;
    }
    let mut leases: HashSet<i64> = base_leases.into_iter().collect();
    let outcome = async {
        let mut txns = 0u64;
        let mut rev = plan.base;
        for (name, path) in &plan.segments {
            if rev >= plan.reached {
                break;
            }
            txns += apply_segment(&mut client, &mut keeper, &mut leases, plan.reached, &mut rev, name, path).await?;
        }
        if rev != plan.reached {
            return Err(fail(format!("the replay ended at revision {rev}, expected {}", plan.reached)));
        }
        Ok(txns)
    }
    .await;
    keeper.stop().await;
    outcome
}

/// Replays the revisions of one segment that come after `*rev`, up to `reached`.
async fn apply_segment(
    client: &mut etcd_client::Client,
    keeper: &mut LeaseKeeper,
    leases: &mut HashSet<i64>,
    reached: i64,
    rev: &mut i64,
    name: &SegmentName,
    path: &Path,
) -> Result<u64> {
    let fail = |m: String| reset_err(format!("replaying delta segments: {m}; nothing was changed"));
    // Decoding runs on a blocking thread; each revision's events come over a bounded channel.
    // When the replay has what it wants before the segment ends (a target revision in the
    // middle of it), it drops the receiver: the reader then stops, and that is not damage.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<delta::Event>>(16);
    let p = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch: Vec<delta::Event> = Vec::new();
        let mut receiver_gone = false;
        let r = delta::read_events(&p, |ev| {
            if batch.first().is_some_and(|b| b.revision() != ev.revision())
                && tx.blocking_send(std::mem::take(&mut batch)).is_err()
            {
                receiver_gone = true;
                return Err(STOPPED.into());
            }
            batch.push(ev);
            Ok(())
        });
        match r {
            Ok(()) => {
                if !batch.is_empty() {
                    let _ = tx.blocking_send(batch);
                }
                Ok(())
            }
            Err(_) if receiver_gone => Ok(()),
            Err(e) => Err(e),
        }
    });
    let mut txns = 0u64;
    let applied = async {
        while let Some(batch) = rx.recv().await {
            let want = batch[0].revision();
            if want <= *rev {
                continue; // segments may overlap where one node's ends inside another's
            }
            if reached < want {
                break;
            }
            let mut ops = Vec::with_capacity(batch.len());
            for ev in batch {
                let kv = ev.kv.expect("read_events checks kv");
                if ev.r#type == delta::DELETE {
                    ops.push(TxnOp::delete(kv.key, None));
                    continue;
                }
                let mut opts = None;
                if kv.lease != 0 {
                    if leases.insert(kv.lease) {
                        client
                            .lease_grant(REPLAYED_LEASE_TTL_SECS, Some(LeaseGrantOptions::new().with_id(kv.lease)))
                            .await
                            .map_err(|e| fail(format!("granting lease {:x} again: {e}", kv.lease)))?;
                        keeper
                            .keep(kv.lease)
                            .await
                            .map_err(|e| fail(format!("keeping lease {:x} alive: {e}", kv.lease)))?;
                    }
                    opts = Some(PutOptions::new().with_lease(kv.lease));
                }
                ops.push(TxnOp::put(kv.key, kv.value, opts));
            }
            let resp = client.txn(Txn::new().and_then(ops)).await.map_err(|e| fail(format!("revision {want}: {e}")))?;
            let got = resp.header().map_or(0, |h| h.revision());
            if got != want {
                return Err(fail(format!("{}: revision {want} replayed as {got}", name.file)));
            }
            *rev = want;
            txns += 1;
            if *rev == reached {
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(rx);
    let read = reader.await.map_err(|e| fail(format!("reader task failed: {e}")))?;
    applied?;
    read.map_err(|e| fail(e.to_string()))?;
    Ok(txns)
}

/// What the reader returns to `read_events` when the replay no longer wants events.
const STOPPED: &str = "the replay stopped reading";

/// Keeps leases of the private etcd alive while the replay runs: one keep-alive stream per
/// lease, renewed every third of its TTL.
struct LeaseKeeper {
    client: etcd_client::Client,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl LeaseKeeper {
    fn new(client: etcd_client::Client) -> LeaseKeeper {
        LeaseKeeper { client, stop: CancellationToken::new(), tasks: tokio::task::JoinSet::new() }
    }

    async fn keep(&mut self, id: i64) -> std::result::Result<(), etcd_client::Error> {
        let ttl = self.client.lease_time_to_live(id, None).await?.granted_ttl().max(1);
        let period = Duration::from_millis((ttl as u64 * 1000 / 3).clamp(200, 5_000));
        let (mut keeper, mut responses) = self.client.lease_keep_alive(id).await?;
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                let renewed = async {
                    keeper.keep_alive().await?;
                    responses.message().await
                };
                match renewed.await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(_) => {
                        tracing::warn!(lease = format!("{id:x}"), "a lease expired on the replay's etcd");
                        return;
                    }
                    Err(e) => {
                        if !stop.is_cancelled() {
                            tracing::warn!(lease = format!("{id:x}"), error = %e, "cannot keep a lease alive on the replay's etcd");
                        }
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
        Ok(())
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
