//! `--cluster-reset [--cluster-reset-restore-path=PATH]` (SPEC §6).
//!
//! A snapshot must carry etcd's SHA-256 trailer (what the Maintenance `Snapshot` API and
//! `etcdctl snapshot save` write) and pass the native bbolt check: a file without a trailer (a
//! copy of `member/snap/db`, or a truncated download) is refused rather than restored with
//! `--skip-hash-check`, because nothing could then tell a torn file from a whole one.
//!
//! [`prepare`] runs every check and changes nothing but the snapshot dir (a download or a zip
//! extraction lands there) and the scratch dir `db/etcd-restore.tmp`: while the snapshot is checked
//! natively (sha256 and bbolt structure, on two threads), the snapshot is already restored into
//! that scratch dir: `etcdutl snapshot restore` (or etcd 3.4's `etcdctl`) restores a probe of it
//! without the keys, which gives the member's WAL and snap files and shows what the tool changes
//! in the db, while the kernel copies the full image and the same changes are committed into it
//! ([`k3s_snapshot_core::restore_db`]); what that cannot express is restored by the tool whole.
//! If either fails, the dir is removed once
//! both are done, and so it is when the [`ResetPlan`] is dropped unused. [`execute`] then fsyncs
//! the restored dir, renames it to `db/etcd-restore` (complete), and swaps: `etcd-old` →
//! `etcd-old-<secs>`, `etcd` → `etcd-old`, `etcd-restore` → `etcd`, each rename fsynced. A crash at any point leaves either the old data in
//! `db/etcd`, or the new data complete in `db/etcd-restore` with `db/etcd` gone, which
//! [`recover_interrupted`] (run at every start) moves into place. Without a path, `db/etcd` is
//! copied to `db/etcd-old.tmp`, which becomes `etcd-old` the same way, and etcd runs with
//! `--force-new-cluster`. Either way etcd is started as the only member, checked, stopped, and
//! `reset-flag` is written.
//!
//! For crash tests, `K3S_SNAPSHOT_TEST_RESET_ABORT_AFTER=N` aborts the process right after step N
//! (1 restored or copied, 2 old `etcd-old` moved aside, 3 `etcd` moved or copy in place, 4 new
//! `etcd` in place); `bump` aborts right after the revision bump in the scratch dir.

use std::path::{Path, PathBuf};

use k3s_snapshot_core::metadata::{MetadataDoc, SnapshotMetadata};
use k3s_snapshot_core::store::{create_private_dir, durable_rename, sync_dir, write_file_atomic, Placed};
use k3s_snapshot_core::{compress, encryption, integrity, name};
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::etcd_proc::{run_tool, EtcdBinaries, EtcdLaunch, EtcdProcess};
use crate::layout::DataDir;
use crate::notify;
use crate::token::Token;
use crate::{Error, Result};

/// Logged (exactly) when a reset is done.
pub const RESET_DONE: &str = "Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. Backup and delete ${datadir}/server/db on each peer etcd server and rejoin the nodes";

const ABORT_ENV: &str = "K3S_SNAPSHOT_TEST_RESET_ABORT_AFTER";

/// The refusal of a second bare `--cluster-reset` while `reset-flag` exists (exact text of k3s).
/// A reset with `--cluster-reset-restore-path` does not look at the flag, as in k3s.
pub fn previously_reset_message(dd: &DataDir) -> String {
    format!(
        "Managed etcd cluster membership was previously reset, please remove the cluster-reset flag and start normally. If you need to perform another cluster reset, you must first manually delete the file at {}",
        dd.reset_flag().display()
    )
}

fn abort_point(step: u32) {
    crate::crash::point(ABORT_ENV, &step.to_string());
}

fn remove_dir_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io { action: "remove", path: p.into(), cause: e }),
    }
}

fn has_member(dir: &Path) -> bool {
    dir.join("member").is_dir()
}

/// Cleans what an interrupted reset left: temporary dirs go; a complete restore whose swap was cut
/// short after `db/etcd` moved away is moved into place; one whose swap never began is dropped
/// (the old data is still in `db/etcd`). `db/etcd` itself is never deleted here: when it has no
/// `member` dir that can be seen (gone, not a dir, or not stat-able: a dangling link to a disk
/// not mounted, a permission, an I/O error) an empty dir is removed and anything else is moved
/// aside to `etcd-old-<secs>` before the restore takes its place.
pub fn recover_interrupted(dd: &DataDir) -> Result<()> {
    for tmp in [dd.etcd_restore_tmp(), dd.etcd_old_tmp()] {
        if tmp.exists() {
            tracing::warn!(dir = %tmp.display(), "removing what an interrupted cluster reset left");
            remove_dir_if_exists(&tmp)?;
        }
    }
    let restored = dd.etcd_restore();
    if restored.exists() {
        let member = dd.etcd().join("member");
        match std::fs::metadata(&member) {
            Ok(m) if m.is_dir() => {
                tracing::warn!(dir = %restored.display(), "an interrupted cluster reset never swapped its restore in; keeping the current data and removing it");
                remove_dir_if_exists(&restored)?;
            }
            seen => {
                if let Err(e) = &seen {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(member = %member.display(), error = %e, "cannot tell whether the current etcd data is whole");
                    }
                }
                set_aside(dd, &dd.etcd())?;
                durable_rename(&restored, &dd.etcd())?;
                tracing::warn!(dir = %dd.etcd().display(), "completed the swap of an interrupted cluster reset: the restored data is in place");
            }
        }
    }
    Ok(())
}

/// Clears `dir`'s name without deleting anything in it: nothing there, fine; an empty directory
/// is removed; anything else (files, a symbolic link, a dir that cannot be read) is renamed to
/// `etcd-old-<unix secs>` in `db/`.
fn set_aside(dd: &DataDir, dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Reset(format!(
                "cannot stat {} ({e}), so the interrupted cluster reset in {} cannot be completed; nothing was changed: make {} readable (or move it away) and start again",
                dir.display(),
                dd.etcd_restore().display(),
                dir.display()
            )))
        }
        Ok(m) if m.is_dir() && std::fs::remove_dir(dir).is_ok() => return Ok(()),
        Ok(_) => {}
    }
    let target = aside_name(dd);
    durable_rename(dir, &target)?;
    tracing::warn!(from = %dir.display(), to = %target.display(), "moved aside what was left in place of the etcd data");
    Ok(())
}

/// `db/etcd-old-<unix secs>`, with `-<n>` when taken.
fn aside_name(dd: &DataDir) -> PathBuf {
    let secs = chrono::Utc::now().timestamp();
    let mut target = dd.db().join(format!("etcd-old-{secs}"));
    let mut n = 1;
    while std::fs::symlink_metadata(&target).is_ok() {
        target = dd.db().join(format!("etcd-old-{secs}-{n}"));
        n += 1;
    }
    target
}

/// What the checks found.
#[derive(Debug)]
pub struct ResetPlan {
    /// Where the verified, restored snapshot is on disk; `None` for a reset of the existing data,
    /// and when it was restored from a scratch copy because a different file has its name.
    pub snapshot: Option<PathBuf>,
    /// The snapshot, already restored into `db/etcd-restore.tmp` (removed if the plan is dropped).
    restored: Option<ScratchDir>,
    /// Delta segments to replay after the snapshot (continuous backup), verified.
    deltas: Option<crate::replay::DeltaPlan>,
    /// The snapshot's metadata document, when it is ours.
    pub metadata: Option<SnapshotMetadata>,
}

impl ResetPlan {
    /// The delta chain the restore replays after the snapshot, when it replays one.
    pub fn deltas(&self) -> Option<&crate::replay::DeltaPlan> {
        self.deltas.as_ref()
    }
}

/// A directory removed when dropped, unless kept.
#[derive(Debug)]
struct ScratchDir(Option<PathBuf>);

impl ScratchDir {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = remove_dir_if_exists(&p);
        }
    }
}

/// Every check, before anything changes (SPEC §6).
pub async fn prepare(cfg: &ServerConfig, bins: &EtcdBinaries) -> Result<ResetPlan> {
    let dd = &cfg.data_dir;
    let Some(given) = cfg.cluster_reset_restore_path.as_deref() else {
        notify::status("cluster reset: checking the etcd data");
        if !has_member(&dd.etcd()) {
            return Err(Error::Reset(format!(
                "there is no etcd data in {} to reset; give --cluster-reset-restore-path to restore a snapshot",
                dd.etcd().display()
            )));
        }
        return Ok(ResetPlan { snapshot: None, restored: None, deltas: None, metadata: None });
    };
    let latest;
    let given = if given == "latest" {
        latest = latest_snapshot(cfg).await?;
        latest.as_str()
    } else {
        given
    };
    if let Some(t) = cfg.restore.to_time {
        let file = Path::new(given).file_name().and_then(|f| f.to_str()).unwrap_or(given);
        if let Some(taken) = name::parse(file).map(|n| n.timestamp).filter(|&ts| ts >= t) {
            return Err(Error::Reset(format!(
                "snapshot {file} was taken at {}, not before --cluster-reset-restore-to-time {}: it may hold changes made after that time; choose an older snapshot (or `latest`, which picks one taken before it); nothing was changed",
                rfc3339(taken),
                rfc3339(t)
            )));
        }
    }
    if bins.etcdutl.is_none() && bins.etcdctl.is_none() {
        return Err(Error::Binary {
            program: "etcdutl or etcdctl".into(),
            detail: format!("neither is beside {}; install the etcd tools of the same version", bins.etcd.display()),
        });
    }
    let path = PathBuf::from(given);
    let local = match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Some(path.clone()),
        Ok(_) => return Err(Error::Reset(format!("restore path {given} is not a file; give a snapshot file"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::Io { action: "read snapshot", path, cause: e }),
    };
    // What is written here (a download, an extracted zip) goes to scratch files in the snapshot
    // dir, and takes its final name only once every check passed, never replacing a file.
    let (file, metadata, mut downloaded) = match local {
        Some(p) => {
            std::fs::File::open(&p).map_err(Error::io("read snapshot", &p))?;
            let md = local_metadata(&p);
            (p, md, None)
        }
        None => match &cfg.snapshots.remote_fetch {
            Some(fetch) => {
                name::validate_file_name(given).map_err(|e| Error::Reset(format!("restore path: {e}")))?;
                if encryption::has_age_suffix(Path::new(given)) && cfg.identities.is_none() {
                    return Err(k3s_snapshot_core::Error::NeedIdentity { name: given.to_string() }.into());
                }
                let work = work_dir(cfg)?;
                tracing::info!(snapshot = %given, "downloading the snapshot to restore");
                notify::status(&format!("restore: downloading {given}"));
                let scratch = fetch(given.to_string(), work).await?;
                let md = local_metadata(scratch.target());
                (scratch.path().to_path_buf(), md, Some(scratch))
            }
            None => {
                return Err(Error::Reset(format!(
                    "restore path {given} does not exist; give the path of a snapshot file (or, with --etcd-s3, the name of a snapshot in the bucket)"
                )))
            }
        },
    };
    let named_buf = downloaded.as_ref().map_or(file.clone(), |d| d.target().to_path_buf());
    let named = named_buf.as_path();
    // An age file is decrypted first, streaming, into a scratch file in the snapshot dir. Its
    // plaintext (and a zip's extracted entry) never takes a name: both are removed once the
    // restore is done, so only the encrypted file stays.
    let encrypted = encryption::has_age_suffix(named) || encryption::is_encrypted(&file)?;
    let decrypted = if encrypted {
        let dir = work_dir(cfg)?;
        let shown_name = named.display().to_string();
        let out = tokio::task::spawn_blocking({
            let (file, ids) = (file.clone(), cfg.identities.clone());
            move || encryption::decrypt_to_scratch(&file, &dir, ids.as_deref(), &shown_name)
        })
        .await
        .map_err(|e| Error::Reset(format!("decryption task failed: {e}")))??;
        tracing::info!(snapshot = %named.display(), "decrypted the snapshot");
        Some(out)
    } else {
        None
    };
    let plain_named = decrypted.as_ref().map_or(named, |d| d.target());
    let plain_file = decrypted.as_ref().map_or(file.as_path(), |d| d.path()).to_path_buf();
    let extracted = if plain_named.extension().is_some_and(|e| e == "zip") {
        let dir = work_dir(cfg)?;
        let out = tokio::task::spawn_blocking({
            let file = plain_file.clone();
            move || compress::extract_to_scratch(&file, &dir)
        })
        .await
        .map_err(|e| Error::Reset(format!("extraction task failed: {e}")))??;
        tracing::info!(zip = %plain_named.display(), snapshot = %out.path().display(), "extracted the snapshot");
        Some(out)
    } else {
        None
    };
    let raw = extracted.as_ref().map_or(plain_file.clone(), |x| x.path().to_path_buf());
    // A download hashed its bytes as they landed: when they are the file restored (not decrypted
    // or extracted), its trailer is known to match and the check reads the structure alone.
    // The download also wrote the image into a copy, which that hash read back: the restore
    // takes it as the member's db instead of copying the file again.
    let (hashed, image) = match (&mut downloaded, &decrypted, &extracted) {
        (Some(d), None, None) => (d.verified_trailer(), d.take_image_copy()),
        _ => (None, None),
    };
    let shown = extracted.as_ref().map_or(plain_named.to_path_buf(), |x| x.target().to_path_buf());
    let len = std::fs::metadata(&raw).map_err(|e| Error::Reset(format!("cannot read {}: {e}", raw.display())))?.len();
    if len % 512 != integrity::TRAILER_LEN as u64 {
        return Err(Error::Reset(format!(
            "snapshot {} has no sha256 trailer (its size is not a whole number of pages plus 32 bytes), so it is truncated or not an etcd snapshot; refusing to restore it, nothing was changed",
            shown.display()
        )));
    }
    // One read of the file: the sha256 trailer and, beside it, the bbolt structure natively, so a
    // snapshot whose trailer matches but whose pages are broken (a bad disk, a bug in whatever
    // wrote it) is refused here rather than by etcd after the swap. Meanwhile etcd's tool restores
    // it into the scratch dir. Both are waited for (so nothing still writes into the scratch dir
    // when the guard removes it), and the check's verdict is reported first.
    notify::status(&format!(
        "restore: checking {} and restoring it into {}",
        shown.display(),
        cfg.restore_tmp().display()
    ));
    let scratch = ScratchDir(Some(cfg.restore_tmp()));
    let check = async {
        let file = raw.clone();
        tokio::task::spawn_blocking(move || k3s_snapshot_core::status::check_hashed(&file, hashed))
            .await
            .map_err(|e| Error::Reset(format!("check task failed: {e}")))?
            .map_err(|e| Error::Reset(format!("{e}; refusing to restore it, nothing was changed")))?;
        tracing::info!(snapshot = %shown.display(), "snapshot verified");
        Ok::<(), Error>(())
    };
    let (checked, restored) = tokio::join!(check, restore_into_scratch(cfg, bins, &raw, image));
    checked?;
    restored?;
    let deltas = if crate::replay::wanted(cfg) {
        let tmp = cfg.restore_tmp();
        let db = tmp.join("member/snap/db");
        let base = tokio::task::spawn_blocking(move || {
            k3s_snapshot_core::bbolt::Db::open(&db)
                .map_err(|e| k3s_snapshot_core::Error::Invalid(e.to_string()))
                .and_then(|d| k3s_snapshot_core::revision::current_revision(&d))
        })
        .await
        .map_err(|e| Error::Reset(format!("revision task failed: {e}")))??;
        let history =
            metadata.as_ref().and_then(|m| m.cluster_id.as_deref()).and_then(|h| u64::from_str_radix(h, 16).ok());
        Some(crate::replay::plan(cfg, base, history, &tmp.join(".deltas")).await?)
    } else {
        None
    };
    // Verified and restored: now the downloaded and extracted files take their names, next to
    // (never over) what is there. A file kept under its scratch name is removed at the end.
    let mut kept = Vec::new();
    let mut snapshot = if downloaded.is_none() { Some(file.clone()) } else { None };
    // Plaintext of an encrypted snapshot is dropped (removed) here, never placed; a drill
    // places nothing (its scratch dir goes with everything in it).
    let extracted = if encrypted { None } else { extracted };
    let (downloaded, extracted) = if cfg.drill_scratch.is_some() { (None, None) } else { (downloaded, extracted) };
    drop(decrypted);
    for (what, f) in [("downloaded", downloaded), ("extracted", extracted)] {
        let Some(f) = f else { continue };
        let placed = tokio::task::spawn_blocking(move || f.place())
            .await
            .map_err(|e| Error::Reset(format!("placing the snapshot failed: {e}")))??;
        match placed {
            Placed::New(p) | Placed::Identical(p) => snapshot = Some(p),
            Placed::Kept { existing, scratch: copy } => {
                tracing::warn!(
                    existing = %existing.display(),
                    restored_from = %copy.path().display(),
                    "a different file named like the {what} snapshot is already in the snapshot dir; it was kept as it is, the snapshot was restored from a scratch copy that is now removed"
                );
                snapshot = None;
                kept.push(copy);
            }
        }
    }
    drop(kept);
    if let (Some(md), None) = (&metadata, &cfg.drill_scratch) {
        token_check(cfg, md);
    }
    Ok(ResetPlan { snapshot, restored: Some(scratch), deltas, metadata })
}

/// Where downloads, decryptions and extractions go (created 0700, checked as the snapshot dir is).
fn work_dir(cfg: &ServerConfig) -> Result<PathBuf> {
    match &cfg.drill_scratch {
        Some(_) => {
            let dir = cfg.restore_work_dir();
            create_private_dir(&dir)?;
            Ok(dir)
        }
        None => {
            let store = cfg.snapshot_store();
            store.ensure_dirs()?;
            Ok(store.dir().to_path_buf())
        }
    }
}

/// `--cluster-reset-restore-path latest`: the newest full snapshot, in S3 with `--etcd-s3` (a
/// fresh node with only S3 settings can recover the cluster) or else in the snapshot dir; with
/// `--cluster-reset-restore-to-revision N`, the newest whose recorded revision is at most N; with
/// `--cluster-reset-restore-to-time T`, the newest taken before T (names keep whole seconds).
pub(crate) async fn latest_snapshot(cfg: &ServerConfig) -> Result<String> {
    let local = cfg.snapshot_store();
    let (store, remote): (&dyn k3s_snapshot_core::store::SnapshotStore, bool) = match &cfg.snapshots.remote {
        Some(r) => (r.as_ref(), true),
        None => (&local, false),
    };
    let (to_rev, to_time) = (cfg.restore.to_revision, cfg.restore.to_time);
    let entries = k3s_snapshot_core::list::list_snapshots(store, to_rev.is_some()).await?;
    // A snapshot holds what etcd held when it was taken (the time in its name, as k3s names it,
    // in whole seconds): one named with the target's own second or later may hold changes made
    // after the target time.
    let pick = entries.iter().rev().find(|e| {
        let rev_ok = to_rev.is_none_or(|n| {
            e.metadata.as_ref().and_then(|d| d.ours()).and_then(|m| m.etcd_revision).is_some_and(|r| r <= n)
        });
        rev_ok && to_time.is_none_or(|t| e.created.timestamp() < t)
    });
    let Some(e) = pick else {
        let which = match (to_rev, to_time) {
            (Some(n), _) => format!(" at or below revision {n}"),
            (None, Some(t)) => format!(" taken before {} (--cluster-reset-restore-to-time)", rfc3339(t)),
            (None, None) => String::new(),
        };
        return Err(Error::Reset(format!(
            "--cluster-reset-restore-path latest: no snapshot{which} in {}; nothing was changed",
            store.describe()
        )));
    };
    tracing::info!(snapshot = %e.name, location = %e.location, "latest snapshot chosen for the restore");
    Ok(if remote { e.name.clone() } else { local.dir().join(&e.name).display().to_string() })
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map_or(unix.to_string(), |d| d.to_rfc3339())
}

/// Moves the restored db's revision forward by `--cluster-reset-restore-bump-revision` and marks
/// the past compacted ([`k3s_snapshot_core::revision`]), in the scratch dir, before anything
/// outside it changes: a failure or a crash leaves the scratch dir to be discarded.
async fn bump(cfg: &ServerConfig) -> Result<()> {
    let amount = cfg.cluster_reset_restore_bump_revision;
    if amount == 0 {
        tracing::info!("--cluster-reset-restore-bump-revision is 0: the restored revision is the snapshot's");
        return Ok(());
    }
    let db = cfg.restore_tmp().join("member/snap/db");
    let shown = db.clone();
    let bumped = tokio::task::spawn_blocking(move || k3s_snapshot_core::revision::bump_revision(&db, amount))
        .await
        .map_err(|e| Error::Reset(format!("bump task failed: {e}")))?
        .map_err(|e| {
            Error::Reset(format!(
                "cannot bump the revision of the restored {} ({e}); nothing was changed; --cluster-reset-restore-bump-revision=0 restores without it",
                shown.display()
            ))
        })?;
    tracing::info!(
        old_revision = bumped.old,
        new_revision = bumped.new,
        "moved the restored revision forward and marked every earlier revision compacted, so clients relist instead of trusting newer caches"
    );
    crate::crash::point(ABORT_ENV, "bump");
    Ok(())
}

/// `<dir>/../.metadata/<file>` of a local snapshot, when there and ours (k3s's own document, its
/// extra metadata, carries nothing the reset checks).
pub(crate) fn local_metadata(p: &Path) -> Option<SnapshotMetadata> {
    let file = p.file_name()?.to_str()?;
    let md = p.parent()?.parent()?.join(k3s_snapshot_core::metadata::METADATA_DIR).join(file);
    match MetadataDoc::parse(&std::fs::read(&md).ok()?) {
        Ok(MetadataDoc::Ours(m)) => Some(m),
        Ok(MetadataDoc::K3s(_)) => None,
        Err(e) => {
            tracing::warn!(metadata = %md.display(), error = %e, "unreadable snapshot metadata, ignored");
            None
        }
    }
}

/// Warns when the snapshot was taken with another token than this server's.
fn token_check(cfg: &ServerConfig, md: &SnapshotMetadata) {
    let Some(theirs) = md.token_hash.as_deref() else { return };
    let ours = cfg
        .token
        .clone()
        .or_else(|| std::fs::read_to_string(cfg.data_dir.token()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    match ours {
        None => tracing::warn!(
            snapshot = %md.name,
            snapshot_token_hash = %theirs,
            "the snapshot was taken by a server with a token, and this server has none yet (a new one will be generated); start with --token set to the original cluster's token"
        ),
        Some(t) => {
            let tok = Token::parse(&t);
            let candidates = [tok.metadata_hash(), name::token_hash(&t), name::token_hash(&tok.full())];
            if !candidates.iter().any(|c| c == theirs) {
                tracing::warn!(
                    snapshot = %md.name,
                    snapshot_token_hash = %theirs,
                    server_token_hash = %tok.metadata_hash(),
                    "the snapshot was taken with a different token than this server's; start with --token set to the token of the cluster the snapshot came from"
                );
            }
        }
    }
}

/// fsyncs every file and directory under `dir` (after a copy, before it is renamed into place).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(Error::io("read", dir))? {
        let entry = entry.map_err(Error::io("read", dir))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(Error::io("stat", &p))?;
        if ft.is_dir() {
            sync_tree(&p)?;
        } else if ft.is_file() {
            std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(Error::io("fsync", &p))?;
        }
    }
    sync_dir(dir)?;
    Ok(())
}

/// Moves an existing `etcd-old` aside to `etcd-old-<unix secs>` (never overwriting).
fn move_old_aside(dd: &DataDir) -> Result<()> {
    let old = dd.etcd_old();
    if !old.exists() {
        return Ok(());
    }
    let target = aside_name(dd);
    durable_rename(&old, &target)?;
    tracing::info!(from = %old.display(), to = %target.display(), "kept the previous etcd-old");
    Ok(())
}

/// Restores `snapshot` into `db/etcd-restore.tmp` as the only member, with this server's name and
/// peer URL (what [`ServerConfig::etcd_launch`] will start etcd with): natively for the db when it
/// can ([`restore_native`]), else with etcd's tool on the whole snapshot.
///
/// `image` is a copy of the snapshot's image made and verified as it was downloaded
/// ([`k3s_snapshot_core::store::ScratchFile::take_image_copy`]), taken instead of a copy.
async fn restore_into_scratch(
    cfg: &ServerConfig,
    bins: &EtcdBinaries,
    snapshot: &Path,
    image: Option<tempfile::NamedTempFile>,
) -> Result<()> {
    let tmp = cfg.restore_tmp();
    remove_dir_if_exists(&tmp)?;
    match restore_native(cfg, bins, snapshot, image).await {
        Ok(()) => return Ok(()),
        Err(Native::Refused(e)) => {
            remove_dir_if_exists(&tmp)?;
            return Err(e);
        }
        Err(Native::Declined(e)) => {
            tracing::info!(error = %e, "restoring the whole snapshot with etcd's tool instead");
            remove_dir_if_exists(&tmp)?;
        }
    }
    tracing::info!(snapshot = %snapshot.display(), into = %tmp.display(), "restoring the snapshot");
    restore_tool(cfg, bins, snapshot, &tmp).await
}

/// `etcdutl snapshot restore SNAPSHOT --data-dir DIR` (or `etcdctl`'s, for etcd 3.4) for this
/// server as the only member.
async fn restore_tool(cfg: &ServerConfig, bins: &EtcdBinaries, snapshot: &Path, dir: &Path) -> Result<()> {
    let peer_url = cfg.peer_url();
    let token = format!("k3s-snapshot-restore-{:016x}", rand::random::<u64>());
    tracing::info!(%token, "the restored member starts a new history under its own cluster token");
    let args = vec![
        "snapshot".to_string(),
        "restore".to_string(),
        snapshot.display().to_string(),
        format!("--data-dir={}", dir.display()),
        format!("--name={}", cfg.node_name),
        format!("--initial-cluster={}", cfg.initial_cluster_of_one()),
        format!("--initial-advertise-peer-urls={peer_url}"),
        // A cluster token of this restore's own, so the restored member gets a new cluster ID:
        // the ID is derived from the token and the peer URLs only, so without it a node restoring
        // its own snapshot would get the very ID of the history it rolls back, and delta segments
        // of both would look like one history.
        format!("--initial-cluster-token={token}"),
    ];
    let (program, envs): (&Path, &[(&str, &str)]) = match (&bins.etcdutl, &bins.etcdctl) {
        (Some(u), _) => (u, &[]),
        (None, Some(c)) => (c, &[("ETCDCTL_API", "3")]),
        (None, None) => unreachable!("checked in prepare"),
    };
    tracing::debug!(snapshot = %snapshot.display(), into = %dir.display(), tool = %program.display(), "running etcd's restore");
    run_tool(program, &args, envs)
        .await
        .map_err(|e| Error::Reset(format!("restoring {} failed, nothing was changed: {e}", snapshot.display())))
}

/// Why [`restore_native`] did not restore: it declined (etcd's tool restores the whole snapshot
/// instead), or it refused (the copy of the snapshot does not hash to its trailer; the tool would
/// copy on the same filesystem, so nothing is restored).
enum Native {
    Declined(Error),
    Refused(Error),
}

impl From<Error> for Native {
    fn from(e: Error) -> Self {
        Native::Declined(e)
    }
}

impl From<k3s_snapshot_core::Error> for Native {
    fn from(e: k3s_snapshot_core::Error) -> Self {
        Native::Declined(e.into())
    }
}

/// The restore with the db done natively ([`k3s_snapshot_core::restore_db`]): etcd's tool restores
/// a probe (the snapshot without its keys), which gives the member's WAL and snap files and shows
/// what the tool changes in the db; meanwhile the kernel copies the full image; the same changes
/// are committed into the copy, checked to read exactly as the tool left them, and the copy takes
/// the probe db's place. The snapshot's sha256 and structure are the concurrent check's job; the
/// copy is read back and must hash to the same trailer before anything is committed into it.
async fn restore_native(
    cfg: &ServerConfig,
    bins: &EtcdBinaries,
    snapshot: &Path,
    image: Option<tempfile::NamedTempFile>,
) -> std::result::Result<(), Native> {
    use k3s_snapshot_core::restore_db;
    let tmp = cfg.restore_tmp();
    let work = tmp.join(".probe");
    create_private_dir(&tmp)?;
    create_private_dir(&work)?;
    let (probe, probe_dir, full) = (work.join("probe.db"), work.join("etcd"), work.join("db"));
    let blocking = |what: &'static str, e: tokio::task::JoinError| Error::Reset(format!("{what} task failed: {e}"));
    let started = std::time::Instant::now();
    let copy = {
        let (snapshot, full) = (snapshot.to_path_buf(), full.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(copied) = adopt_image(&snapshot, image, &full)? {
                return Ok::<_, Native>((copied.len, started.elapsed(), started.elapsed()));
            }
            let copied = restore_db::copy_image(&snapshot, &full).map_err(Native::from)?;
            let copy_took = started.elapsed();
            restore_db::verify_copy(&snapshot, &full, &copied).map_err(|e| Native::Refused(e.into()))?;
            Ok::<_, Native>((copied.len, copy_took, started.elapsed()))
        })
    };
    let probed = async {
        let (snapshot, dest) = (snapshot.to_path_buf(), probe.clone());
        tokio::task::spawn_blocking(move || restore_db::write_probe(&snapshot, &dest))
            .await
            .map_err(|e| blocking("probe", e))??;
        restore_tool(cfg, bins, &probe, &probe_dir).await?;
        Ok::<_, Error>(started.elapsed())
    };
    let (copied, probed) = tokio::join!(copy, probed);
    let (copied, copy_took, verified_at) = copied.map_err(|e| blocking("copy", e))??;
    let probe_took = probed?;
    let restored_db = probe_dir.join("member/snap/db");
    let (probe_in, full_db) = (probe.clone(), full.clone());
    let restored = restored_db.clone();
    tokio::task::spawn_blocking(move || {
        use k3s_snapshot_core::bbolt::Db;
        let open =
            |p: &Path| Db::open(p).map_err(|e| k3s_snapshot_core::Error::Invalid(format!("{}: {e}", p.display())));
        let before =
            Db::open_image(&probe_in, std::fs::metadata(&probe_in).map(|m| m.len()).unwrap_or(0).saturating_sub(32))
                .map_err(|e| k3s_snapshot_core::Error::Invalid(format!("{}: {e}", probe_in.display())))?;
        let after = open(&restored)?;
        let edits = restore_db::edits_between(&before, &after)?;
        restore_db::apply(&full_db, &edits)?;
        if !restore_db::same_outside_key(&open(&full_db)?, &after)? {
            return Err(k3s_snapshot_core::Error::Invalid(
                "the restored db does not read as etcd's tool left the probe".into(),
            ));
        }
        Ok(())
    })
    .await
    .map_err(|e| blocking("restore", e))??;
    std::fs::rename(&full, &restored_db).map_err(Error::io("rename", &full))?;
    std::fs::rename(probe_dir.join("member"), tmp.join("member")).map_err(Error::io("rename", &probe_dir))?;
    remove_dir_if_exists(&work)?;
    tracing::info!(
        snapshot = %snapshot.display(),
        into = %tmp.display(),
        bytes = copied,
        copy = ?copy_took,
        copy_checked = ?verified_at,
        tool = ?probe_took,
        total = ?started.elapsed(),
        "restored the snapshot (member files by etcd's tool, the db copied and edited natively)"
    );
    Ok(())
}

/// Takes the download's image copy as `dest` (a rename: same filesystem), when its length is the
/// snapshot's image length; `None` when there is none or it cannot be renamed there (the snapshot
/// dir on another filesystem), and the caller copies the snapshot instead.
fn adopt_image(
    snapshot: &Path,
    image: Option<tempfile::NamedTempFile>,
    dest: &Path,
) -> std::result::Result<Option<k3s_snapshot_core::restore_db::CopiedImage>, Native> {
    use std::os::unix::fs::FileExt;
    let Some(image) = image else { return Ok(None) };
    let len = std::fs::metadata(snapshot).map_err(Error::io("read", snapshot))?.len();
    let Some(image_len) = len.checked_sub(integrity::TRAILER_LEN as u64) else { return Ok(None) };
    if image.as_file().metadata().map(|m| m.len()).ok() != Some(image_len) {
        return Ok(None);
    }
    let mut trailer = [0u8; integrity::TRAILER_LEN];
    std::fs::File::open(snapshot)
        .and_then(|f| f.read_exact_at(&mut trailer, image_len))
        .map_err(Error::io("read", snapshot))?;
    match image.persist_noclobber(dest) {
        Ok(_) => Ok(Some(k3s_snapshot_core::restore_db::CopiedImage { len: image_len, trailer })),
        Err(e) => {
            tracing::info!(error = %e.error, "the download's image copy cannot be moved into the restore; copying the snapshot instead");
            Ok(None)
        }
    }
}

/// Makes the restored scratch dir private and durable, then renames it to `db/etcd-restore`.
fn finish_restore(dd: &DataDir, scratch: ScratchDir) -> Result<()> {
    let tmp = dd.etcd_restore_tmp();
    set_private(&tmp)?;
    sync_tree(&tmp)?;
    durable_rename(&tmp, &dd.etcd_restore())?;
    scratch.keep();
    Ok(())
}

fn set_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(Error::io("chmod", dir))
}

/// Replays the plan's delta chain (if any) into the restored scratch dir, then drops the
/// segments' scratch copies: the same step for a reset and a drill.
pub(crate) async fn replay_into_scratch(
    cfg: &ServerConfig,
    bins: &EtcdBinaries,
    launch: &EtcdLaunch,
    plan: &ResetPlan,
    cancel: &CancellationToken,
) -> Result<()> {
    if let Some(d) = &plan.deltas {
        crate::replay::replay(cfg, bins, launch, &cfg.restore_tmp(), d, cancel).await?;
        let _ = std::fs::remove_dir_all(cfg.restore_tmp().join(".deltas"));
    }
    Ok(())
}

/// Performs the reset planned by [`prepare`]; logs [`RESET_DONE`] and returns `Ok` when done.
pub async fn execute(
    cfg: &ServerConfig,
    bins: &EtcdBinaries,
    mut launch: EtcdLaunch,
    mut plan: ResetPlan,
    cancel: &CancellationToken,
) -> Result<()> {
    let dd = &cfg.data_dir;
    match plan.restored.take() {
        Some(scratch) => {
            replay_into_scratch(cfg, bins, &launch, &plan, cancel).await?;
            bump(cfg).await?;
            notify::status(&format!("restore: moving the restored data into {}", dd.etcd().display()));
            finish_restore(dd, scratch)?;
            abort_point(1);
            move_old_aside(dd)?;
            abort_point(2);
            if dd.etcd().exists() {
                durable_rename(&dd.etcd(), &dd.etcd_old())?;
                tracing::info!(to = %dd.etcd_old().display(), "moved the current etcd data aside");
            }
            abort_point(3);
            durable_rename(&dd.etcd_restore(), &dd.etcd())?;
            abort_point(4);
        }
        None => {
            notify::status(&format!("cluster reset: copying {} aside", dd.etcd().display()));
            let tmp = dd.etcd_old_tmp();
            remove_dir_if_exists(&tmp)?;
            create_private_dir(&tmp)?;
            let (from, to) = (dd.etcd(), tmp.clone());
            tokio::task::spawn_blocking(move || {
                let opts = fs_extra::dir::CopyOptions::new().content_only(true).overwrite(true);
                fs_extra::dir::copy(&from, &to, &opts)
                    .map_err(|e| Error::Reset(format!("cannot copy {} to {}: {e}", from.display(), to.display())))?;
                sync_tree(&to)
            })
            .await
            .map_err(|e| Error::Reset(format!("copy task failed: {e}")))??;
            abort_point(1);
            move_old_aside(dd)?;
            abort_point(2);
            durable_rename(&tmp, &dd.etcd_old())?;
            tracing::info!(to = %dd.etcd_old().display(), "copied the current etcd data aside");
            abort_point(3);
            launch.force_new_cluster = true;
            abort_point(4);
        }
    }

    let client = launch.client_config();
    notify::status("cluster reset: starting etcd as the only member to check it");
    let mut etcd = EtcdProcess::start(bins, &launch).await?;
    let checked = async {
        let mut conn = etcd.wait_ready(&client, cfg.etcd_ready_timeout, cancel).await?;
        let members = conn
            .client
            .member_list()
            .await
            .map_err(|cause| k3s_snapshot_core::Error::Etcd { endpoints: conn.endpoints.clone(), cause })?;
        let n = members.members().len();
        if n != 1 {
            return Err(Error::Reset(format!("etcd came up with {n} members instead of 1")));
        }
        Ok(())
    }
    .await;
    etcd.stop(cfg.etcd_stop_grace).await?;
    checked?;
    write_file_atomic(&dd.reset_flag(), b"")?;
    tracing::info!("{RESET_DONE}");
    notify::status("cluster reset done: start again without --cluster-reset");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore left complete in `db/etcd-restore` by a crash, and a `db/etcd` whose `member`
    /// cannot be seen (a link to a disk that is not mounted) beside files of the operator's.
    /// Recovery used to `remove_dir_all` it.
    #[test]
    fn recovery_moves_an_etcd_dir_without_a_visible_member_aside_never_deleting_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("k3s"));
        std::fs::create_dir_all(dd.etcd_restore().join("member/wal")).unwrap();
        std::fs::create_dir_all(dd.etcd()).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("unmounted/etcd-member"), dd.etcd().join("member")).unwrap();
        std::fs::write(dd.etcd().join("precious"), b"keep me").unwrap();

        recover_interrupted(&dd).unwrap();

        assert!(dd.etcd().join("member/wal").is_dir(), "the restore is in place");
        assert!(!dd.etcd_restore().exists());
        let aside: Vec<PathBuf> = std::fs::read_dir(dd.db())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("etcd-old-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(aside[0].join("precious")).unwrap(), b"keep me");
        assert!(std::fs::symlink_metadata(aside[0].join("member")).unwrap().file_type().is_symlink());
    }

    /// An empty `db/etcd` (what a start creates) is simply replaced; a whole one keeps its place
    /// and the never-swapped restore goes.
    #[test]
    fn recovery_replaces_an_empty_etcd_dir_and_keeps_a_whole_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("k3s"));
        std::fs::create_dir_all(dd.etcd_restore().join("member/wal")).unwrap();
        std::fs::create_dir_all(dd.etcd()).unwrap();
        recover_interrupted(&dd).unwrap();
        assert!(dd.etcd().join("member/wal").is_dir());
        let names: Vec<String> = std::fs::read_dir(dd.db())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["etcd".to_string()]);

        std::fs::create_dir_all(dd.etcd_restore().join("member/snap")).unwrap();
        recover_interrupted(&dd).unwrap();
        assert!(dd.etcd().join("member/wal").is_dir() && !dd.etcd_restore().exists());
    }
}
