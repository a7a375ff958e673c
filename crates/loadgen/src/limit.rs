//! `loadgen snapshot`: the physical limit a snapshot save is measured against. It reads etcd's
//! Maintenance `Snapshot` stream with the same client library as `k3s-snapshot` and does nothing
//! else: either discards it, or writes it to a file with the save's write-back policy (start the
//! kernel's write-back every 16 MiB without waiting, one fsync at the end). No trailer check, no
//! rename, no metadata, no progress: anything a save does beyond this is its overhead.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

pub const USAGE: &str = "  loadgen snapshot --endpoints URL [--tls-dir DIR] [--out FILE]
                   (reads etcd's snapshot stream; discards it, or writes FILE and fsyncs it)";

/// As the save's `WRITEBACK_STEP`.
const WRITEBACK_STEP: u64 = 16 << 20;

pub async fn run(args: &[String]) -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--out" {
            out = Some(it.next().context("--out needs a file")?.into());
        } else {
            rest.push(flag.clone());
        }
    }
    let a = crate::parse(&rest)?;
    if a.endpoints.is_empty() {
        bail!("loadgen snapshot needs --endpoints\n{USAGE}");
    }
    let started = Instant::now();
    let mut client = crate::connect(&a).await?;
    let mut stream = client.snapshot().await.context("start etcd's snapshot stream")?;
    let mut file = match &out {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?),
        None => None,
    };
    let (mut bytes, mut kicked) = (0u64, 0u64);
    while let Some(msg) = stream.message().await.context("read etcd's snapshot stream")? {
        let blob = msg.blob();
        if let Some(f) = &mut file {
            f.write_all(blob).context("write the snapshot")?;
            if bytes + blob.len() as u64 - kicked >= WRITEBACK_STEP {
                start_writeback(f, kicked, bytes + blob.len() as u64 - kicked);
                kicked = bytes + blob.len() as u64;
            }
        }
        bytes += blob.len() as u64;
    }
    if let Some(f) = &file {
        f.sync_all().context("fsync the snapshot")?;
    }
    println!("{}", json!({ "bytes": bytes, "seconds": started.elapsed().as_secs_f64(), "file": out.is_some() }));
    Ok(())
}

fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor stays open while `file` is borrowed and the call reads no memory of
    // ours; a failure only leaves more for the final fsync.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}
