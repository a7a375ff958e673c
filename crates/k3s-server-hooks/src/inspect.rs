//! Opening a snapshot for `etcd-snapshot inspect`: found and fetched as a restore finds and
//! fetches it (a path, a name in the snapshot dir, or in S3 with `--s3`; `latest`, with
//! `--to-revision`/`--to-time` picking as the reset picks), decrypted (age) and unzipped into a
//! private scratch dir `${data-dir}/server/inspect/<pid>-<random>`, removed when the
//! [`Opened`] is dropped. Nothing is restored and no etcd is started: the image is read in place.
//!
//! With `--deltas`, `--to-revision N` or `--to-time T`, the chain after the snapshot is planned,
//! fetched and verified by the reset's own code ([`crate::replay::plan`]) and replayed natively
//! ([`k3s_snapshot_core::delta_replay::replay`]) into a copy of the image in the scratch dir,
//! which is what is then read. A `--to-revision` at or below the snapshot's own revision needs
//! no chain: the snapshot's older revisions are read directly (what compaction left of them).

use std::path::{Path, PathBuf};

use k3s_snapshot_core::{compress, delta_replay, encryption, name};

use crate::config::{RestoreDeltas, ServerConfig};
use crate::verify::{make_scratch, Scratch};
use crate::{Error, Result};

/// What to open: the snapshot and chain a drill of the same request would restore.
pub use crate::verify::DrillRequest as InspectRequest;

/// A snapshot ready to read; its scratch files go when it is dropped.
pub struct Opened {
    /// The bbolt image to read (the snapshot itself, or a scratch copy).
    pub db: PathBuf,
    /// Bytes of the image (without etcd's sha256 trailer).
    pub image_len: u64,
    /// The snapshot's file name, for what is printed.
    pub name: String,
    /// The revision to read the state at (`None`: the image's newest).
    pub at: Option<i64>,
    /// (base, reached, segments) when a chain was replayed.
    pub replayed: Option<(i64, i64, usize)>,
    _scratch: Scratch,
    _files: Vec<k3s_snapshot_core::store::ScratchFile>,
}

fn err(m: String) -> Error {
    Error::Config(format!("inspect: {m}"))
}

/// `${data-dir}/server/inspect`.
pub fn scratch_parent(cfg: &ServerConfig) -> PathBuf {
    cfg.data_dir.server().join("inspect")
}

/// Finds, fetches, decrypts and unzips the snapshot, and replays its chain when asked.
pub async fn open(base: &ServerConfig, req: &InspectRequest) -> Result<Opened> {
    let scratch = make_scratch(&scratch_parent(base))?;
    let mut cfg = base.clone();
    cfg.drill_scratch = Some(scratch.0.clone());
    cfg.restore = RestoreDeltas {
        deltas: req.deltas,
        to_revision: req.to_revision,
        to_time: req.to_time,
        replay_with: crate::config::ReplayWith::Native,
    };
    let (target, remote) = crate::verify::resolve(&cfg, &req.target).await?;
    let file_name = Path::new(&target).file_name().map_or(target.clone(), |f| f.to_string_lossy().into_owned());
    if let Some(t) = req.to_time {
        if name::parse(&file_name).is_some_and(|n| n.timestamp >= t) {
            return Err(err(format!(
                "snapshot {file_name} was taken at or after --to-time: it may hold later changes; choose an older snapshot, or `latest`, which picks one taken before it"
            )));
        }
    }
    let mut files = Vec::new();
    let work = cfg.restore_work_dir();
    k3s_snapshot_core::store::create_private_dir(&work)?;
    let (mut path, named) = if remote {
        let fetch = cfg.snapshots.remote_fetch.clone().ok_or_else(|| err("no S3 configuration".into()))?;
        if encryption::has_age_suffix(Path::new(&target)) && cfg.identities.is_none() {
            return Err(k3s_snapshot_core::Error::NeedIdentity { name: target.clone() }.into());
        }
        let f = fetch(target.clone(), work.clone()).await?;
        let p = f.path().to_path_buf();
        let named = f.target().to_path_buf();
        files.push(f);
        (p, named)
    } else {
        match std::fs::metadata(&target) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(err(format!("{target} is not a file; give a snapshot file or name"))),
            Err(e) => {
                return Err(err(format!("cannot read snapshot {target}: {e}; `etcd-snapshot ls` lists the snapshots")))
            }
        }
        (PathBuf::from(&target), PathBuf::from(&target))
    };
    let metadata = crate::reset::local_metadata(&named);
    let named_file = named.file_name().map_or(String::new(), |f| f.to_string_lossy().into_owned());
    let mut plain_name = named_file.clone();
    if encryption::has_age_suffix(&named) || encryption::is_encrypted(&path)? {
        plain_name = encryption::decrypted_name(&named_file).to_string();
        let (src, dir, ids, s) = (path.clone(), work.clone(), cfg.identities.clone(), named.display().to_string());
        let f = tokio::task::spawn_blocking(move || encryption::decrypt_to_scratch(&src, &dir, ids.as_deref(), &s))
            .await
            .map_err(|e| err(format!("decryption task failed: {e}")))??;
        path = f.path().to_path_buf();
        files.push(f);
    }
    if plain_name.ends_with(".zip") {
        let (src, dir) = (path.clone(), work.clone());
        let f = tokio::task::spawn_blocking(move || compress::extract_to_scratch(&src, &dir))
            .await
            .map_err(|e| err(format!("extraction task failed: {e}")))??;
        path = f.path().to_path_buf();
        files.push(f);
    }
    let len = std::fs::metadata(&path).map_err(Error::io("read", &path))?.len();
    let trailer = k3s_snapshot_core::integrity::TRAILER_LEN as u64;
    let image_len = if len % 512 == trailer { len - trailer } else { len };
    let own = {
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            let db = k3s_snapshot_core::bbolt::Db::open_image(&p, image_len)
                .map_err(|e| k3s_snapshot_core::Error::Invalid(format!("{}: {e}", p.display())))?;
            k3s_snapshot_core::revision::current_revision(&db)
        })
        .await
        .map_err(|e| err(format!("revision task failed: {e}")))??
    };
    let wants_chain = crate::replay::wanted(&cfg) && req.to_revision.is_none_or(|n| n > own);
    let mut opened = Opened {
        db: path.clone(),
        image_len,
        name: file_name,
        at: req.to_revision,
        replayed: None,
        _scratch: scratch,
        _files: files,
    };
    if !wants_chain {
        return Ok(opened);
    }
    // The chain is replayed into a copy of the image (never into the snapshot itself).
    let copy = opened._scratch.0.join("db");
    {
        let (src, dst) = (path.clone(), copy.clone());
        tokio::task::spawn_blocking(move || copy_image(&src, &dst, image_len))
            .await
            .map_err(|e| err(format!("copy task failed: {e}")))??;
    }
    let history = metadata.as_ref().and_then(|m| m.cluster_id.as_deref()).and_then(|h| u64::from_str_radix(h, 16).ok());
    let plan = crate::replay::plan(&cfg, own, history, &opened._scratch.0.join(".deltas")).await?;
    let paths: Vec<PathBuf> = plan.segments.iter().map(|(_, p)| p.clone()).collect();
    if !paths.is_empty() {
        let (db, reached) = (copy.clone(), plan.reached);
        let outcome = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            delta_replay::replay(&db, own, reached, &refs, crate::replay::REPLAYED_LEASE_TTL_SECS)
        })
        .await
        .map_err(|e| err(format!("replay task failed: {e}")))??;
        if let delta_replay::Outcome::Unsupported(why) = outcome {
            return Err(err(format!("the chain cannot be replayed natively into this snapshot ({why})")));
        }
    }
    opened.replayed = Some((own, plan.reached, plan.segments.len()));
    opened.image_len = std::fs::metadata(&copy).map_err(Error::io("read", &copy))?.len();
    opened.db = copy;
    Ok(opened)
}

/// The first `len` bytes of `src` into a new private file `dst`.
fn copy_image(src: &Path, dst: &Path, len: u64) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = std::fs::File::open(src).map_err(Error::io("read", src))?.take(len);
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(Error::io("create", dst))?;
    std::io::copy(&mut from, &mut to).map_err(Error::io("write", dst))?;
    Ok(())
}
