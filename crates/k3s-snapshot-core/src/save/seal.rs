//! The [`Sealer`] thread: etcd's messages, in batches, written to `<file>.part` with plain
//! blocking writes, through the zip stream and age when asked, with the page cache written back
//! as it goes.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::tee::Recent;
use crate::compress;
use crate::encryption::Recipients;
use crate::transfer::start_writeback;
use crate::{Error, Result};

/// What the [`Sealer`] thread is told.
pub(super) enum SealMsg {
    /// Before the first byte, when compressing: whether the zip needs 64-bit sizes.
    Zip64(bool),
    Data(Bytes),
    /// The snapshot is whole and verified: write the last chunk and fsync.
    End,
}

/// What the writer thread wrote.
pub(super) struct Sealed {
    pub(super) len: u64,
    /// Of the encrypted file.
    pub(super) sha256: Option<[u8; 32]>,
}

/// The file under the age stream: counts and hashes the encrypted bytes as they reach it. age
/// writes whole 64 KiB chunks, so every byte counted in `written` is in the file, where the tee
/// can read it.
struct Tap {
    file: std::fs::File,
    written: Arc<AtomicU64>,
    /// Of the encrypted bytes; a plain file's hash comes from the trailer check.
    sha: Option<sha2::Sha256>,
    /// Where the write-back not yet started begins ([`WRITEBACK_STEP`]).
    kicked: u64,
}

/// Every this many bytes the kernel is asked to start writing the file to disk
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so that the fsync at the end
/// finds little left to write instead of the whole snapshot.
const WRITEBACK_STEP: u64 = 16 << 20;

impl std::io::Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.file.write(buf)?;
        if let Some(sha) = &mut self.sha {
            sha.update(&buf[..n]);
        }
        let total = self.written.fetch_add(n as u64, Ordering::Release) + n as u64;
        if total - self.kicked >= WRITEBACK_STEP {
            start_writeback(&self.file, self.kicked, total - self.kicked);
            self.kicked = total;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes the file on a thread of its own (zipping and encrypting it when the save is encrypted),
/// so that the writes, deflate and ChaCha20-Poly1305 run beside the receiving of etcd's stream
/// rather than on the async runtime. etcd's messages
/// are gathered into [`SEAL_BATCH`] batches first: one channel message (and thread wakeup) per
/// 32 KiB message cost more than a tenth of the encryption's own time.
pub(super) struct Sealer {
    tx: tokio::sync::mpsc::Sender<SealMsg>,
    batch: bytes::BytesMut,
    task: tokio::task::JoinHandle<Result<Sealed>>,
    written: Arc<AtomicU64>,
    /// The age header and payload nonce, written when the stream starts.
    pub(super) header_len: u64,
}

/// A streamed zip of a snapshot this large or larger (or of unknown size) gets 64-bit sizes: deflate
/// may grow incompressible data a little, and the headers follow it.
pub(super) const ZIP64_ABOVE: u64 = u32::MAX as u64 - (64 << 20);

/// Bytes of etcd's stream handed to the sealer at a time.
pub(super) const SEAL_BATCH: usize = 256 << 10;

/// Batches waiting for the sealer: at most this many (2 MiB) are in memory.
pub(super) const SEAL_QUEUE: usize = 8;

impl Sealer {
    /// Writes `file` through age to `recipients` (zipped first with `zip_entry`), or as it
    /// comes without recipients.
    pub(super) fn start(
        file: std::fs::File,
        part: &Path,
        recipients: Option<&Recipients>,
        zip_entry: Option<String>,
        recent: Option<Arc<Recent>>,
    ) -> Result<Sealer> {
        use sha2::Digest;
        let written = Arc::new(AtomicU64::new(0));
        let out = match recipients {
            Some(r) => {
                let tap = Tap { file, written: written.clone(), sha: Some(sha2::Sha256::new()), kicked: 0 };
                Out::Age(r.encrypt_to(tap)?)
            }
            None => Out::Plain(Tap { file, written: written.clone(), sha: None, kicked: 0 }),
        };
        let header_len = written.load(Ordering::Acquire);
        let (tx, rx) = tokio::sync::mpsc::channel(SEAL_QUEUE);
        let part = part.to_path_buf();
        let task = tokio::task::spawn_blocking(move || seal(out, zip_entry, recent, rx, &part));
        Ok(Sealer { tx, batch: bytes::BytesMut::new(), task, written, header_len })
    }

    /// Bytes of the encrypted file on disk so far.
    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub(super) async fn send(&mut self, msg: SealMsg) -> Result<()> {
        if self.tx.send(msg).await.is_ok() {
            return Ok(());
        }
        // The thread stopped: its error says why.
        match (&mut self.task).await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Err(Error::Invalid("the encryption thread ended early".into())),
            Err(e) => Err(Error::Invalid(format!("the encryption thread failed: {e}"))),
        }
    }

    /// Adds a piece of etcd's stream, sending a batch when one is full.
    pub(super) async fn push(&mut self, data: &[u8]) -> Result<()> {
        if self.batch.is_empty() {
            self.batch.reserve(SEAL_BATCH.max(data.len()));
        }
        self.batch.extend_from_slice(data);
        if self.batch.len() >= SEAL_BATCH {
            let full = self.batch.split().freeze();
            self.send(SealMsg::Data(full)).await?;
        }
        Ok(())
    }

    pub(super) async fn finish(mut self) -> Result<Sealed> {
        if !self.batch.is_empty() {
            let rest = self.batch.split().freeze();
            self.send(SealMsg::Data(rest)).await?;
        }
        self.send(SealMsg::End).await?;
        drop(self.tx);
        self.task.await.map_err(|e| Error::Invalid(format!("the encryption thread failed: {e}")))?
    }
}

/// Where the writer thread sends etcd's stream.
enum Out {
    Plain(Tap),
    Age(age::stream::StreamWriter<Tap>),
    Zip(compress::ZipStream<age::stream::StreamWriter<Tap>>),
}

/// The writer thread: `[[zip →] age →] file`, until [`SealMsg::End`] (then the last chunk and an
/// fsync) or until the save drops its side (then it stops and writes nothing more).
fn seal(
    out: Out,
    zip_entry: Option<String>,
    recent: Option<Arc<Recent>>,
    mut rx: tokio::sync::mpsc::Receiver<SealMsg>,
    part: &Path,
) -> Result<Sealed> {
    use std::io::Write;
    let mut out = Some(out);
    let mut zip_entry = zip_entry;
    let mut start_zip = |out: &mut Option<Out>, zip64: bool| -> std::io::Result<()> {
        if let Some(entry) = zip_entry.take() {
            if let Some(Out::Age(age)) = out.take() {
                *out = Some(Out::Zip(compress::ZipStream::new(age, &entry, zip64)?));
            }
        }
        Ok(())
    };
    while let Some(msg) = rx.blocking_recv() {
        let step = match msg {
            SealMsg::Zip64(zip64) => start_zip(&mut out, zip64),
            SealMsg::Data(b) => {
                // No size was announced: a zip that may be large.
                start_zip(&mut out, true).and_then(|()| match out.as_mut() {
                    Some(Out::Plain(w)) => {
                        let at = w.written.load(Ordering::Acquire);
                        w.write_all(&b).map(|()| {
                            if let Some(r) = &recent {
                                r.push(at, b);
                            }
                        })
                    }
                    Some(Out::Age(w)) => w.write_all(&b),
                    Some(Out::Zip(w)) => w.write_all(&b),
                    None => Ok(()),
                })
            }
            SealMsg::End => {
                let _ = start_zip(&mut out, false);
                let tap = match out.take() {
                    Some(Out::Zip(z)) => z.finish().and_then(|a| a.finish()),
                    Some(Out::Age(a)) => a.finish(),
                    Some(Out::Plain(t)) => Ok(t),
                    None => Err(std::io::Error::other("nothing to finish")),
                };
                let tap = tap.map_err(Error::io("write", part))?;
                tap.file.sync_all().map_err(Error::io("fsync", part))?;
                use sha2::Digest;
                let len = tap.written.load(Ordering::Acquire);
                return Ok(Sealed { len, sha256: tap.sha.map(|s| s.finalize().into()) });
            }
        };
        if let Err(cause) = step {
            return Err(Error::Io { action: "write", path: part.to_path_buf(), cause });
        }
    }
    Err(Error::Cancelled)
}
