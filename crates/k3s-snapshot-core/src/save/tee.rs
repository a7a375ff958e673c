//! The [`Tee`]: an upload that follows the file as the save writes it (with `pread` on its own
//! descriptor, at its own pace), so that a snapshot is read from etcd once and the save never
//! waits for the upload. A follower that keeps up with the save takes the newest bytes from
//! [`Recent`] instead: the batches the writer has just put in the file, shared rather than read
//! back (no copy out of the page cache, no blocking-pool handoff per read).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use crate::store::ByteStream;

/// How far the save has written its `.part` file, as the follower sees it.
#[derive(Clone, Default)]
struct Written {
    file: Option<Arc<std::fs::File>>,
    /// Bytes in the file (not in the writer's buffer).
    len: u64,
    /// The save finished: `len` is the whole snapshot.
    done: bool,
}

/// The save's side of an upload that follows the file being written. If the [`Tee`] is dropped
/// without [`Tee::finish`] (an error, a cancellation, a panic), the following stream yields an
/// error once it has read what was written, so that a store never completes a partial object.
pub struct Tee {
    tx: watch::Sender<Written>,
    recent: Arc<Recent>,
}

/// The last few batches the writer put in the file, each at its offset: what a follower that
/// keeps up with the save reads next. At most [`RECENT_BYTES`] are kept (the oldest go first);
/// a follower further behind reads the file. Only a plain save fills it (an encrypted file's
/// bytes are made on the writer thread and read back from the file).
#[derive(Default)]
pub(super) struct Recent {
    chunks: Mutex<VecDeque<(u64, Bytes)>>,
}

/// Bytes [`Recent`] keeps: a little more than the follower is woken for ([`FOLLOW_CHUNK`]).
const RECENT_BYTES: usize = 1 << 20;

impl Recent {
    /// `data` is in the file from `offset`.
    pub(super) fn push(&self, offset: u64, data: Bytes) {
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        chunks.push_back((offset, data));
        let mut kept: usize = chunks.iter().map(|(_, b)| b.len()).sum();
        while kept > RECENT_BYTES {
            match chunks.pop_front() {
                Some((_, b)) => kept -= b.len(),
                None => break,
            }
        }
    }

    /// The file's bytes from `offset` up to `until` (or fewer), if they are still here.
    fn take(&self, offset: u64, until: u64) -> Option<Bytes> {
        let chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let (start, data) = chunks.iter().find(|(o, b)| *o <= offset && offset < o + b.len() as u64)?;
        let from = (offset - start) as usize;
        let to = (until.min(start + data.len() as u64) - start) as usize;
        (from < to).then(|| data.slice(from..to))
    }
}

/// Bytes the follower reads at a time.
pub(super) const FOLLOW_CHUNK: u64 = 512 << 10;

/// A [`Tee`] and the [`ByteStream`] that follows the file the save writes, for
/// [`crate::store::SnapshotStore::put`]. The stream waits while it has caught up with the save;
/// the save never waits for the stream.
pub fn tee_channel() -> (Tee, ByteStream) {
    let (tx, rx) = watch::channel(Written::default());
    let recent = Arc::new(Recent::default());
    (Tee { tx, recent: recent.clone() }, follow(rx, recent, 0, None))
}

/// The file the save writes from `start`, up to `end` (exclusive) or its end.
fn follow(rx: watch::Receiver<Written>, recent: Arc<Recent>, start: u64, end: Option<u64>) -> ByteStream {
    let stream = futures::stream::unfold((rx, start, false), move |(mut rx, offset, ended)| {
        let recent = recent.clone();
        async move {
            if ended || end.is_some_and(|e| offset >= e) {
                return None;
            }
            loop {
                let w = rx.borrow_and_update().clone();
                if let (Some(file), true) = (&w.file, offset < w.len) {
                    // `len` counts what the save handed to its writer; the last of it may still be on
                    // its way to the file, so a short read waits for the next step instead of failing.
                    let until = end.map_or(w.len, |e| e.min(w.len));
                    if let Some(data) = recent.take(offset, until) {
                        let n = data.len() as u64;
                        return Some((Ok(data), (rx, offset + n, false)));
                    }
                    let (file, len) = (file.clone(), (until - offset).min(FOLLOW_CHUNK) as usize);
                    let read = tokio::task::spawn_blocking(move || {
                        use std::os::unix::fs::FileExt;
                        let mut buf = vec![0u8; len];
                        file.read_at(&mut buf, offset).map(|n| {
                            buf.truncate(n);
                            buf
                        })
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    match read {
                        Ok(buf) if !buf.is_empty() => {
                            let n = buf.len() as u64;
                            return Some((Ok(Bytes::from(buf)), (rx, offset + n, false)));
                        }
                        Ok(_) if w.done => {
                            let e = std::io::Error::other("the snapshot file is shorter than what was written to it");
                            return Some((Err(e), (rx, offset, true)));
                        }
                        Ok(_) => {}
                        Err(e) => return Some((Err(e), (rx, offset, true))),
                    }
                } else if w.done {
                    // Caught up with a whole file. A range that reaches past its end is short (an
                    // error), except one starting exactly at the end: the check that nothing follows.
                    return match end {
                        Some(_) if !(offset == start && start == w.len) => Some((
                            Err(std::io::Error::other("the snapshot ended before the range asked for")),
                            (rx, offset, true),
                        )),
                        _ => None,
                    };
                }
                if rx.changed().await.is_err() {
                    // The save ended without finishing; what it finished is read first.
                    if rx.borrow().done {
                        continue;
                    }
                    let e = std::io::Error::other("the snapshot source stopped before the end");
                    return Some((Err(e), (rx, offset, true)));
                }
            }
        }
    });
    stream.boxed()
}

impl Tee {
    /// Streams of byte ranges of the file the save writes, each waiting for its bytes.
    pub fn ranges(&self) -> crate::store::Ranges {
        let (rx, recent) = (self.tx.subscribe(), self.recent.clone());
        crate::store::Ranges(Arc::new(move |offset, len| {
            follow(rx.clone(), recent.clone(), offset, Some(offset + len))
        }))
    }

    /// Where the writer of a plain save puts each batch once it is in the file.
    pub(super) fn recent(&self) -> Arc<Recent> {
        self.recent.clone()
    }

    /// The file the save writes, read through its own descriptor.
    pub(super) fn attach(&self, file: std::fs::File) {
        self.tx.send_modify(|w| w.file = Some(Arc::new(file)));
    }

    /// The file now holds `len` bytes.
    pub(super) fn advance(&self, len: u64) {
        self.tx.send_if_modified(|w| {
            let grew = len > w.len;
            w.len = w.len.max(len);
            grew
        });
    }

    /// The file is whole at `len` bytes; the stream ends once it has read them.
    pub(super) fn finish(self, len: u64) {
        self.tx.send_modify(|w| {
            w.len = len;
            w.done = true;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::TryStreamExt;

    use super::*;

    async fn read_all(s: ByteStream) -> std::io::Result<Vec<u8>> {
        let chunks: Vec<Bytes> = s.try_collect().await?;
        Ok(chunks.concat())
    }

    /// Ranges of the file a save writes: each waits for its bytes, reads exactly them, and the
    /// range at the end tells a whole file (nothing) from a longer one (bytes) or a short one.
    #[tokio::test]
    async fn ranges_follow_the_file_as_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.part");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        let (tee, body) = tee_channel();
        let ranges = tee.ranges();
        tee.attach(std::fs::File::open(&path).unwrap());
        // Asked for before any of their bytes exist.
        let middle = tokio::spawn(read_all((ranges.0)(1_000_000, 1_500_000)));
        let tail = tokio::spawn(read_all((ranges.0)(2_500_000, 500_000)));
        for (i, chunk) in data.chunks(700_000).enumerate() {
            f.write_all(chunk).unwrap();
            tee.advance(((i + 1) * 700_000).min(data.len()) as u64);
            tokio::task::yield_now().await;
        }
        let whole = data.len() as u64;
        tee.finish(whole);
        assert_eq!(middle.await.unwrap().unwrap(), &data[1_000_000..2_500_000]);
        assert_eq!(tail.await.unwrap().unwrap(), &data[2_500_000..]);
        assert_eq!(read_all(body).await.unwrap(), data, "the whole-body follower is unchanged");
        assert!(read_all((ranges.0)(whole, 1)).await.unwrap().is_empty(), "nothing follows a whole file");
        assert!(read_all((ranges.0)(whole - 10, 20)).await.is_err(), "a range past the end is short");
        assert_eq!(read_all((ranges.0)(whole - 10, 10)).await.unwrap(), &data[data.len() - 10..]);
    }

    /// A follower that keeps up takes the writer's newest batches from memory; one further
    /// behind than [`RECENT_BYTES`] reads the file. The file here holds only the first 3 MiB, so
    /// the last MiB can only come from memory, and the first MiB (long gone from memory) only
    /// from the file.
    #[tokio::test]
    async fn a_follower_takes_the_newest_batches_from_memory_and_older_bytes_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.part");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data[..3 << 20]).unwrap();
        let (tee, body) = tee_channel();
        let ranges = tee.ranges();
        tee.attach(std::fs::File::open(&path).unwrap());
        let recent = tee.recent();
        for (i, batch) in data.chunks(256 << 10).enumerate() {
            recent.push((i * (256 << 10)) as u64, Bytes::copy_from_slice(batch));
        }
        let kept: usize = recent.chunks.lock().unwrap().iter().map(|(_, b)| b.len()).sum();
        assert_eq!(kept, RECENT_BYTES, "memory keeps only the newest batches");
        tee.finish(data.len() as u64);
        assert_eq!(read_all(body).await.unwrap(), data);
        let (at, len) = ((3 << 20) + 100, 299_900);
        assert_eq!(read_all((ranges.0)(at, len)).await.unwrap(), &data[at as usize..(at + len) as usize]);
    }

    #[tokio::test]
    async fn a_range_fails_when_the_save_stops_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.part");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let (tee, _body) = tee_channel();
        let ranges = tee.ranges();
        tee.attach(std::fs::File::open(&path).unwrap());
        tee.advance(1000);
        let waiting = tokio::spawn(read_all((ranges.0)(500, 1000)));
        drop(tee);
        assert!(waiting.await.unwrap().is_err(), "a save that ends unfinished fails the range");
    }
}
