//! Restore drills (`etcd-snapshot verify`, `server --etcd-snapshot-verify-schedule`): a backup is
//! proven by restoring it the way a disaster would, with the reset's own code ([`reset::prepare`]
//! and [`reset::replay_into_scratch`]: the download, decryption, zip extraction, checks, restore
//! and chain replay), into a private scratch dir, then starting a private etcd on it on loopback
//! (no peers; nothing of the live data dir is touched) and checking that
//! 1. etcd opens it and answers at the snapshot's revision (or the replay's target);
//! 2. its `HashKV` at a revision equals the live cluster's at that revision, recorded right after
//!    the save (the snapshot's metadata) or at the end of a delta segment (the segment's
//!    metadata); without a recorded hash the content is not compared, and the report says so;
//! 3. how long it took, end to end: the measured recovery time (RTO), from the start until the
//!    restored etcd answered at the right revision (the content comparison after it is not part
//!    of a recovery).
//!
//! The scratch dir is `${data-dir}/server/verify/<pid>-<random>`: outside `server/db`, so a
//! server starting on the data dir never takes a drill's etcd for one of its own orphans. Its free
//! space must be at least twice the snapshot's size. It is removed afterwards, on failure and on
//! cancellation too; one left by a killed process (its pid gone) is removed by the next drill.
//! A failed drill changes nothing; a successful one records `verifiedAt`, `verifiedRTO`,
//! `verifiedRevision` and `verifiedHashKV` in the snapshot's metadata document where it was read
//! from ([`record`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k3s_snapshot_core::delta::SegmentName;
use k3s_snapshot_core::metadata::{LiveHash, MetadataDoc, Verified};
use k3s_snapshot_core::store::{create_private_dir, ensure_free_space, SnapshotStore};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{ReplayWith, RestoreDeltas, ServerConfig};
use crate::etcd_proc::{EtcdBinaries, EtcdProcess};
use crate::layout::DataDir;
use crate::{reset, tls, Error};

/// For tests: `etcd-ready` holds a drill once its etcd answered, until it is interrupted.
const PAUSE_ENV: &str = "K3S_SNAPSHOT_TEST_VERIFY_PAUSE";

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct DrillRequest {
    /// `latest`, a snapshot name (in S3 when the configuration has it, else in the snapshot dir),
    /// or a path.
    pub target: String,
    /// Replay the delta chain after the snapshot.
    pub deltas: bool,
    pub to_revision: Option<i64>,
    /// Unix seconds.
    pub to_time: Option<i64>,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    /// Not done, and not a failure (the content, without a recorded live hash).
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

/// What a drill found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    /// The snapshot restored (its file name), once known.
    pub snapshot: Option<String>,
    /// Where it was read from.
    pub store: String,
    pub checks: Vec<Check>,
    /// The revision the restored etcd answered at.
    pub revision: Option<i64>,
    /// The `HashKV` that matched the cluster's, when content was compared.
    pub hash_kv: Option<u32>,
    /// Revision at which content was compared.
    pub compared_at: Option<i64>,
    /// The measured recovery time, when etcd came up at the right revision.
    pub rto_seconds: Option<f64>,
    pub ok: bool,
    #[serde(skip)]
    from_remote: bool,
}

impl DrillReport {
    fn push(&mut self, name: &'static str, outcome: Outcome, detail: impl Into<String>) {
        let detail = detail.into();
        match outcome {
            Outcome::Failed => tracing::warn!(check = name, "restore drill: {detail}"),
            _ => tracing::info!(check = name, "restore drill: {detail}"),
        }
        self.checks.push(Check { name, outcome, detail });
    }

    fn fail(&mut self, name: &'static str, detail: impl Into<String>) -> &mut Self {
        self.push(name, Outcome::Failed, detail);
        self
    }

    /// The first failure, in one line.
    pub fn failure(&self) -> Option<String> {
        self.checks.iter().find(|c| c.outcome == Outcome::Failed).map(|c| format!("{}: {}", c.name, c.detail))
    }

    /// Whether content was compared and matched.
    pub fn content_compared(&self) -> bool {
        self.hash_kv.is_some()
    }
}

/// A drill's (or an inspection's) scratch dir, removed (with everything in it) when dropped.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the restore drill's scratch dir");
            }
        }
    }
}

/// `${data-dir}/server/verify`: where drills make their scratch dirs.
pub fn scratch_parent(dd: &DataDir) -> PathBuf {
    dd.server().join("verify")
}

/// Removes scratch dirs whose drill is gone (the pid in their name no longer runs).
fn remove_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split_once('-').and_then(|(p, _)| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(dir = %e.path().display(), "removing the scratch dir of a restore drill that did not finish");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A new private dir `<pid>-<random>` in `parent`, after removing those of processes gone.
pub(crate) fn make_scratch(parent: &Path) -> crate::Result<Scratch> {
    create_private_dir(parent)?;
    remove_stale(parent);
    let dir = parent.join(format!("{}-{:016x}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir(&dir).map_err(Error::io("create", &dir))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(Error::io("chmod", &dir))?;
    }
    Ok(Scratch(dir))
}

fn free_port() -> crate::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Config(format!("no free loopback port for the restore drill's etcd: {e}")))
}

/// The reset's configuration for a drill: `base`'s stores, identities and etcd binaries, the
/// restore into `scratch`, no revision bump, etcd on loopback only, on free ports, without the
/// operator's `--etcd-arg`s (they may name listen URLs or dirs).
fn drill_config(base: &ServerConfig, scratch: &Path, target: &str, req: &DrillRequest) -> crate::Result<ServerConfig> {
    let mut cfg = base.clone();
    let lo = IpAddr::from([127, 0, 0, 1]);
    cfg.drill_scratch = Some(scratch.to_path_buf());
    cfg.cluster_reset = true;
    cfg.cluster_reset_restore_path = Some(target.to_string());
    cfg.cluster_reset_restore_bump_revision = 0;
    cfg.restore = RestoreDeltas {
        deltas: req.deltas,
        to_revision: req.to_revision,
        to_time: req.to_time,
        replay_with: ReplayWith::Auto,
    };
    cfg.server_url = None;
    cfg.bind_address = lo;
    cfg.advertise_address = lo;
    cfg.etcd_client_port = free_port()?;
    cfg.etcd_peer_port = free_port()?;
    cfg.etcd_args = Vec::new();
    cfg.etcd_expose_metrics = false;
    cfg.snapshots.schedule = None;
    Ok(cfg)
}

/// The snapshot a drill of `req.target` restores: `latest` resolved as a reset resolves it, a
/// bare name in S3 (with S3) or the snapshot dir, a path as given.
pub(crate) async fn resolve(cfg: &ServerConfig, target: &str) -> crate::Result<(String, bool)> {
    let remote = cfg.snapshots.remote.is_some();
    if target == "latest" {
        return Ok((reset::latest_snapshot(cfg).await?, remote));
    }
    if target.contains('/') {
        return Ok((target.to_string(), false));
    }
    k3s_snapshot_core::name::validate_file_name(target).map_err(|e| Error::Config(format!("verify: {e}")))?;
    if remote {
        return Ok((target.to_string(), true));
    }
    Ok((cfg.snapshot_store().dir().join(target).display().to_string(), false))
}

/// The stored size of the snapshot, for the free-space check.
async fn stored_size(cfg: &ServerConfig, target: &str, remote: bool) -> crate::Result<u64> {
    if remote {
        let store = cfg.snapshots.remote.as_ref().expect("remote");
        return match store.head(target).await? {
            Some(o) => Ok(o.size),
            None => Err(Error::Config(format!(
                "snapshot {target} is not in {}; `etcd-snapshot ls` lists the snapshots",
                store.describe()
            ))),
        };
    }
    match std::fs::metadata(target) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(_) => Err(Error::Config(format!("{target} is not a file; give a snapshot file or name"))),
        Err(e) => {
            Err(Error::Config(format!("cannot read snapshot {target}: {e}; `etcd-snapshot ls` lists the snapshots")))
        }
    }
}

/// Runs one drill. Never returns an error: every failure is a failed check in the report, which
/// names what to fix. Cancelled, it stops etcd, removes the scratch dir and reports a failure.
pub async fn drill(base: &ServerConfig, req: &DrillRequest, cancel: &CancellationToken) -> DrillReport {
    let mut report = DrillReport {
        snapshot: None,
        store: base.snapshots.remote.as_ref().map_or_else(|| base.snapshot_store().describe(), |r| r.describe()),
        checks: Vec::new(),
        revision: None,
        hash_kv: None,
        compared_at: None,
        rto_seconds: None,
        ok: false,
        from_remote: false,
    };
    let scratch = match make_scratch(&scratch_parent(&base.data_dir)) {
        Ok(s) => s,
        Err(e) => {
            report.fail("scratch", format!("{e}; check --data-dir"));
            return report;
        }
    };
    tokio::select! {
        () = run(base, req, &scratch.0, &mut report, cancel) => {}
        () = cancel.cancelled() => {
            report.fail("cancelled", "the drill was interrupted; its scratch dir and its etcd are removed");
        }
    }
    drop(scratch);
    report.ok = report.checks.iter().all(|c| c.outcome != Outcome::Failed);
    report
}

async fn run(
    base: &ServerConfig,
    req: &DrillRequest,
    scratch: &Path,
    report: &mut DrillReport,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let (target, remote) = match resolve(base, &req.target).await {
        Ok(t) => t,
        Err(e) => {
            report.fail("snapshot", e.to_string());
            return;
        }
    };
    report.from_remote = remote;
    let file = Path::new(&target).file_name().map_or(target.clone(), |f| f.to_string_lossy().into_owned());
    report.snapshot = Some(file.clone());
    let size = match stored_size(base, &target, remote).await {
        Ok(s) => s,
        Err(e) => {
            report.fail("snapshot", e.to_string());
            return;
        }
    };
    // A zip or an age file can hold more than its size: twice the stored size is the rule (the
    // extraction itself refuses an entry that would not fit).
    match ensure_free_space(scratch, size.saturating_mul(2), &format!("twice the snapshot {file}")) {
        Ok(()) => report.push(
            "scratch",
            Outcome::Ok,
            format!("{} has room for twice the snapshot's {}", scratch.display(), bytes(size)),
        ),
        Err(e) => {
            report.fail("scratch", format!("{e}; free space there or give --data-dir on a larger filesystem"));
            return;
        }
    }
    let cfg = match drill_config(base, scratch, &target, req) {
        Ok(c) => c,
        Err(e) => {
            report.fail("scratch", e.to_string());
            return;
        }
    };
    let bins = match EtcdBinaries::find(cfg.etcd_bin_dir.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            report.fail("etcd", e.to_string());
            return;
        }
    };
    // Fetch, decrypt, unzip, check and restore: the reset's own steps.
    let plan = match reset::prepare(&cfg, &bins).await {
        Ok(p) => p,
        Err(e) => {
            report.fail("restore", restore_advice(&e));
            return;
        }
    };
    let restored_at = started.elapsed();
    let base_revision = match restored_revision(&cfg).await {
        Ok(r) => r,
        Err(e) => {
            report.fail("restore", e);
            return;
        }
    };
    report.push(
        "restore",
        Outcome::Ok,
        format!(
            "{file} fetched, checked and restored at revision {base_revision} in {:.1}s",
            restored_at.as_secs_f64()
        ),
    );
    let tls_files = match tls::ensure(&DataDir::new(scratch.join("pki")), &cfg.node_name, &[cfg.advertise_address]) {
        Ok(t) => t,
        Err(e) => {
            report.fail("etcd", format!("certificates for the drill's etcd: {e}"));
            return;
        }
    };
    let mut launch = cfg.etcd_launch(tls_files);
    launch.data_dir = cfg.restore_tmp();
    let mut target_revision = base_revision;
    if let Some(d) = plan.deltas() {
        let history =
            plan.metadata.as_ref().and_then(|m| m.cluster_id.as_deref()).and_then(|h| u64::from_str_radix(h, 16).ok());
        if let Err(why) = chain_complete(&cfg, d, history).await {
            report.fail("chain", why);
            return;
        }
        let t = Instant::now();
        if let Err(e) = reset::replay_into_scratch(&cfg, &bins, &launch, &plan, cancel).await {
            report.fail("replay", e.to_string());
            return;
        }
        target_revision = d.reached;
        report.push(
            "replay",
            Outcome::Ok,
            format!(
                "{} segments replayed, revisions {}..={} in {:.1}s",
                d.segments.len(),
                d.base + 1,
                d.reached,
                t.elapsed().as_secs_f64()
            ),
        );
    }
    let client = launch.client_config();
    let mut etcd = match EtcdProcess::start(&bins, &launch).await {
        Ok(e) => e,
        Err(e) => {
            report.fail("etcd", e.to_string());
            return;
        }
    };
    let ready = etcd.wait_ready(&client, cfg.etcd_ready_timeout, cancel).await;
    let checked = match ready {
        Ok(mut conn) => {
            let recorded = plan.metadata.as_ref().and_then(|m| m.etcd_revision);
            let encrypted = plan.metadata.as_ref().is_some_and(|m| m.encrypted);
            match answered_revision(&mut conn).await {
                Err(e) => {
                    report.fail("etcd", format!("etcd started on the restored data but does not answer: {e}"));
                }
                Ok(got) => {
                    report.revision = Some(got);
                    if let Some(why) =
                        revision_mismatch(got, target_revision, recorded, encrypted, plan.deltas().is_some())
                    {
                        report.fail("etcd", why);
                    } else {
                        let rto = started.elapsed();
                        report.rto_seconds = Some(rto.as_secs_f64());
                        report.push(
                            "etcd",
                            Outcome::Ok,
                            format!("opened the restored data and answered at revision {got}"),
                        );
                        crate::crash::pause_point(PAUSE_ENV, "etcd-ready", cancel).await;
                        compare_content(&cfg, &plan, &mut conn, report).await;
                        report.push(
                            "rto",
                            Outcome::Ok,
                            format!("{:.1}s from the start until the restored etcd answered", rto.as_secs_f64()),
                        );
                    }
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    };
    let _ = etcd.stop(Duration::from_secs(10)).await;
    if let Err(e) = checked {
        match e {
            Error::Cancelled => report.fail("cancelled", "the drill was interrupted"),
            e => report.fail(
                "etcd",
                format!(
                    "etcd does not open the restored snapshot: {e}; the snapshot may need a newer etcd than {}",
                    bins.etcd.display()
                ),
            ),
        };
    }
}

/// The restored db's revision, read natively before etcd starts.
async fn restored_revision(cfg: &ServerConfig) -> Result<i64, String> {
    let db = cfg.restore_tmp().join("member/snap/db");
    tokio::task::spawn_blocking(move || {
        k3s_snapshot_core::bbolt::Db::open(&db)
            .map_err(|e| e.to_string())
            .and_then(|d| k3s_snapshot_core::revision::current_revision(&d).map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| format!("revision task failed: {e}"))?
}

async fn answered_revision(conn: &mut k3s_snapshot_core::etcd::EtcdConnection) -> Result<i64, String> {
    let r = conn.client.get(vec![0u8], None).await.map_err(|e| e.to_string())?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// Why the answered revision is wrong, if it is.
fn revision_mismatch(got: i64, want: i64, recorded: Option<i64>, encrypted: bool, replayed: bool) -> Option<String> {
    if got != want {
        return Some(format!(
            "the restored etcd answered at revision {got}, but the restore {} revision {want}",
            if replayed { "replayed to" } else { "holds" }
        ));
    }
    // etcd counts an empty key space as revision 1; its snapshot reads as revision 0.
    match recorded.map(|r| r.max(1)) {
        // An encrypted save records the revision etcd reported before the stream; its content
        // may be a little newer.
        Some(r) if encrypted && !replayed && got < r => Some(format!(
            "the restored etcd answered at revision {got}, older than the revision {r} its metadata records: the file is not the snapshot its metadata describes"
        )),
        Some(r) if !encrypted && !replayed && got != r => Some(format!(
            "the restored etcd answered at revision {got}, but the snapshot's metadata records revision {r}: the file is not the snapshot its metadata describes"
        )),
        _ => None,
    }
}

/// Compares the restored `HashKV` with the newest live hash recorded at or below the restored
/// revision: the last replayed segment's that has one, else the snapshot's.
async fn compare_content(
    cfg: &ServerConfig,
    plan: &reset::ResetPlan,
    conn: &mut k3s_snapshot_core::etcd::EtcdConnection,
    report: &mut DrillReport,
) {
    let mut recorded: Option<(LiveHash, String)> = None;
    if let Some(d) = plan.deltas() {
        let store = chain_store(cfg);
        for (seg, _) in d.segments.iter().rev() {
            if seg.to > d.reached {
                continue;
            }
            if let Some(h) = segment_hash(store.as_ref(), seg).await {
                recorded = Some((h, format!("at the end of segment {}", seg.file)));
                break;
            }
        }
    }
    if recorded.is_none() {
        recorded = plan.metadata.as_ref().and_then(|m| m.live_hash).map(|h| (h, "right after the save".to_string()));
    }
    let Some((want, when)) = recorded else {
        report.push(
            "content",
            Outcome::Skipped,
            "content not compared: the snapshot's metadata records no live hashkv (a snapshot taken by k3s or an older version); every other check ran",
        );
        return;
    };
    let got = async {
        let now = conn.client.hash_kv(0).await.map_err(|e| e.to_string())?;
        // The live hash was taken under the cluster's compaction at the time; a restored etcd
        // holding the same history hashes the same once compacted as far.
        if want.compact_revision > now.compact_version() && want.compact_revision <= want.revision {
            conn.client
                .compact(want.compact_revision, Some(etcd_client::CompactionOptions::new().with_physical()))
                .await
                .map_err(|e| format!("compacting to revision {}: {e}", want.compact_revision))?;
        }
        conn.client.hash_kv(want.revision).await.map(|r| r.hash()).map_err(|e| e.to_string())
    }
    .await;
    match got {
        Err(e) => {
            report.fail(
                "content",
                format!("cannot compute hashkv at revision {} on the restored etcd: {e}", want.revision),
            );
        }
        Ok(h) if h == want.hash => {
            report.hash_kv = Some(h);
            report.compared_at = Some(want.revision);
            report.push(
                "content",
                Outcome::Ok,
                format!("hashkv {h} at revision {} equals the cluster's, recorded {when}", want.revision),
            );
        }
        Ok(h) => {
            report.fail(
                "content",
                format!(
                    "the restored keyspace at revision {} hashes to {h}, but the cluster's hashed to {} ({when}): this is not the data the cluster held; do not restore it, and find where the file came from",
                    want.revision, want.hash
                ),
            );
        }
    }
}

/// Where the chain's segments were read from: S3 with S3, else the snapshot dir.
fn chain_store(cfg: &ServerConfig) -> std::sync::Arc<dyn SnapshotStore> {
    match &cfg.snapshots.remote {
        Some(r) => r.clone(),
        None => std::sync::Arc::new(cfg.snapshot_store()),
    }
}

async fn segment_hash(store: &dyn SnapshotStore, seg: &SegmentName) -> Option<LiveHash> {
    k3s_snapshot_core::list::read_metadata(store, &seg.file).await.and_then(|d| d.live_hash())
}

/// A chain that stops at a hole while later segments of its history exist, with no snapshot to
/// start them, has lost revisions: a drill fails where a reset only warns.
async fn chain_complete(cfg: &ServerConfig, d: &crate::replay::DeltaPlan, history: Option<u64>) -> Result<(), String> {
    if cfg.restore.to_revision.is_some() {
        return Ok(()); // the plan already required the chain to reach it exactly
    }
    let store = chain_store(cfg);
    let segments = k3s_snapshot_core::delta::list_segments(store.as_ref()).await.map_err(|e| e.to_string())?;
    let history = history.or_else(|| d.segments.first().and_then(|(s, _)| s.history));
    let to_time = cfg.restore.to_time;
    let Some(next) = segments
        .iter()
        .filter(|s| s.follows_history(history) && s.from > d.reached + 1 && to_time.is_none_or(|t| s.closed < t))
        .min_by_key(|s| s.from)
    else {
        return Ok(());
    };
    // A newer snapshot at or after the hole starts the later chain: no revision is lost.
    let snapshots = k3s_snapshot_core::list::list_snapshots(store.as_ref(), true).await.map_err(|e| e.to_string())?;
    let bridged = snapshots.iter().any(|s| {
        s.metadata
            .as_ref()
            .and_then(|m| m.ours())
            .and_then(|m| m.etcd_revision)
            .is_some_and(|r| r >= d.reached && r + 1 >= next.from)
    });
    if bridged {
        return Ok(());
    }
    Err(format!(
        "the delta chain has a hole: no segment in {} holds revisions {}..={} (the next one, {}, starts at {}); a restore would stop at revision {} and lose every later change. Find the missing segment (an upload that never happened, a deletion), or take a full snapshot now so that later restores start after the hole",
        store.describe(),
        d.reached + 1,
        next.from - 1,
        next.file,
        next.from,
        d.reached
    ))
}

/// A restore failure with what to do about it.
fn restore_advice(e: &Error) -> String {
    use k3s_snapshot_core::Error as Core;
    let text = e.to_string();
    let hint = match e {
        Error::Core(Core::NeedIdentity { .. } | Core::Decrypt { .. }) => "",
        Error::Core(Core::NotFound { .. }) => "",
        _ if text.contains("AccessDenied") || text.contains("Access Denied") || text.contains("403") => {
            "; the credentials may upload but not read: a restore needs s3:GetObject on the bucket"
        }
        _ => "",
    };
    format!("{text}{hint}")
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{n} bytes"),
    }
}

/// Records a successful drill in the snapshot's metadata document, in the store it was read from
/// (a document's keys this version does not know are kept). A snapshot without a document (a
/// file `etcdctl` saved) gets none: the result is in the report and `/metrics` only.
pub async fn record(base: &ServerConfig, report: &DrillReport) -> crate::Result<bool> {
    let (Some(file), true, Some(rto)) = (report.snapshot.as_deref(), report.ok, report.rto_seconds) else {
        return Ok(false);
    };
    let local;
    let store: &dyn SnapshotStore = match (&base.snapshots.remote, report.from_remote) {
        (Some(r), true) => r.as_ref(),
        _ => {
            local = base.snapshot_store();
            &local
        }
    };
    let Some(mut doc): Option<MetadataDoc> = k3s_snapshot_core::transfer::fetch_metadata(store, file).await? else {
        tracing::info!(
            snapshot = file,
            "the snapshot has no metadata document; the drill's result is not recorded with it"
        );
        return Ok(false);
    };
    doc.set_verified(Verified {
        at: chrono::Utc::now(),
        rto_ms: (rto * 1000.0).round() as u64,
        revision: report.revision.unwrap_or_default(),
        hash_kv: report.hash_kv,
    });
    k3s_snapshot_core::save::put_metadata_doc(store, file, &doc).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answered_revision_must_be_the_restores_and_the_metadatas() {
        assert_eq!(revision_mismatch(10, 10, Some(10), false, false), None);
        assert!(revision_mismatch(11, 10, Some(10), false, false).unwrap().contains("holds revision 10"));
        assert!(revision_mismatch(12, 12, Some(10), false, false).unwrap().contains("metadata records revision 10"));
        // Encrypted: the recorded revision may be a little older than the content.
        assert_eq!(revision_mismatch(12, 12, Some(10), true, false), None);
        assert!(revision_mismatch(9, 9, Some(10), true, false).is_some());
        // Replayed: the target is what counts.
        assert_eq!(revision_mismatch(50, 50, Some(10), false, true), None);
        assert!(revision_mismatch(49, 50, Some(10), false, true).unwrap().contains("replayed to"));
    }

    #[test]
    fn stale_scratch_dirs_of_gone_drills_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("999999999-00");
        let live = tmp.path().join(format!("{}-00", std::process::id()));
        let other = tmp.path().join("not-a-drill");
        for d in [&gone, &live, &other] {
            std::fs::create_dir_all(d.join("etcd")).unwrap();
        }
        remove_stale(tmp.path());
        assert!(!gone.exists() && live.exists() && other.exists());
    }
}
