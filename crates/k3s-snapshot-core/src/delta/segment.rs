//! The segment file: written event by event ([`SegmentWriter`], through age when encrypting),
//! closed under its name with the SHA-256 trailer, verified and read back ([`verify`],
//! [`read_events`]).

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::encryption::Recipients;
use crate::store::{create_new_private, durable_rename, RemoveOnDrop};
use crate::{Error, Result};

use super::{Event, SegmentName, DELETE, PREFIX, PUT};

const MAGIC: &[u8; 8] = b"K3SDLT01";
const TRAILER: usize = 32;
/// Largest frame a reader accepts (etcd's default request limit is 1.5 MiB; a value can be no
/// larger than the request that wrote it, with room for etcd raising the limit).
pub const MAX_FRAME: u32 = 64 << 20;

/// Writes one segment: events are appended as they arrive (nothing is held in memory), then
/// [`SegmentWriter::finish`] adds the trailer, fsyncs and gives the file its name. Dropped
/// unfinished, the file is removed. With recipients everything goes through age on its way to the
/// `.part`, which then holds only ciphertext.
pub struct SegmentWriter {
    out: Sink,
    path: PathBuf,
    guard: Option<RemoveOnDrop>,
    hasher: Sha256,
    from: i64,
    to: i64,
    events: u64,
    bytes: u64,
}

/// Where a segment's bytes go: the file, or age in front of it.
enum Sink {
    Plain(BufWriter<std::fs::File>),
    Sealed(age::stream::StreamWriter<BufWriter<std::fs::File>>),
}

impl Sink {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(b),
            Sink::Sealed(w) => w.write_all(b),
        }
    }

    /// Ends the stream (age's last chunk) and returns the file, flushed.
    fn finish(self) -> std::io::Result<std::fs::File> {
        let buffered = match self {
            Sink::Plain(w) => w,
            Sink::Sealed(w) => w.finish()?,
        };
        buffered.into_inner().map_err(|e| e.into_error())
    }
}

impl SegmentWriter {
    /// Starts `<dir>/.delta-open-<node>.part` (a leftover of a crash is replaced), encrypted to
    /// `recipients` when given.
    pub fn create(dir: &Path, node: &str, recipients: Option<&Recipients>) -> Result<SegmentWriter> {
        let path = dir.join(format!(".{PREFIX}open-{node}.part"));
        let _ = std::fs::remove_file(&path);
        let file = create_new_private(&path).map_err(Error::io("create", &path))?;
        let guard = Some(RemoveOnDrop::new(path.clone()));
        let buffered = BufWriter::with_capacity(256 << 10, file);
        let out = match recipients {
            Some(r) => Sink::Sealed(r.encrypt_to(buffered)?),
            None => Sink::Plain(buffered),
        };
        let mut w = SegmentWriter { out, guard, path, hasher: Sha256::new(), from: 0, to: 0, events: 0, bytes: 0 };
        w.write(MAGIC)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.hasher.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).map_err(Error::io("write", &self.path))
    }

    /// Appends one event; revisions must not go backwards.
    pub fn append(&mut self, ev: &Event) -> Result<()> {
        let rev = ev.revision();
        if rev < self.to || rev < 1 {
            return Err(Error::Invalid(format!("delta event at revision {rev} after revision {}", self.to)));
        }
        if self.events == 0 {
            self.from = rev;
        }
        self.to = rev;
        self.events += 1;
        let body = ev.encode_to_vec();
        self.write(&(body.len() as u32).to_le_bytes())?;
        self.write(&body)
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// First and last revision so far.
    pub fn range(&self) -> (i64, i64) {
        (self.from, self.to)
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// Plaintext bytes written so far (without the trailer).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Adds the trailer (and, encrypted, age's last chunk), fsyncs, and renames the file to its
    /// segment name in the same dir. Returns the name, the path and the file's size.
    pub fn finish(mut self, node: &str, closed: i64, history: Option<u64>) -> Result<(SegmentName, PathBuf, u64)> {
        let sum = std::mem::take(&mut self.hasher).finalize();
        self.write(&sum)?;
        let SegmentWriter { out, path, guard, from, to, .. } = self;
        let encrypted = matches!(out, Sink::Sealed(_));
        let file = out.finish().map_err(Error::io("write", &path))?;
        file.sync_all().map_err(Error::io("fsync", &path))?;
        let size = file.metadata().map_err(Error::io("stat", &path))?.len();
        drop(file);
        let name = SegmentName::new(from, to, node, closed, encrypted).in_history(history);
        let dest = path.with_file_name(&name.file);
        durable_rename(&path, &dest)?;
        if let Some(g) = guard {
            g.disarm();
        }
        Ok((name, dest, size))
    }
}

/// Checks a segment file's magic, frames and SHA-256 trailer, and that its events cover exactly
/// the revisions its name says, each one; returns the number of events.
pub fn verify(path: &Path, name: &SegmentName) -> Result<u64> {
    let mut n = 0;
    let mut last = name.from - 1;
    read_events(path, |ev| {
        let rev = ev.revision();
        if rev != last && rev != last + 1 {
            return Err(format!("revision {rev} follows {last}: a gap"));
        }
        last = rev;
        n += 1;
        Ok(())
    })?;
    if n == 0 || last != name.to {
        return Err(bad(path, format!("its events end at revision {last}, its name says {}", name.to)));
    }
    Ok(n)
}

fn bad(path: &Path, detail: String) -> Error {
    Error::Invalid(format!("delta segment {} is damaged: {detail}; it cannot be replayed", path.display()))
}

/// Calls `f` for each event of the segment at `path` after checking its trailer: one pass to
/// hash, one to decode, so nothing is applied from a file that turns out torn.
pub fn read_events(path: &Path, mut f: impl FnMut(Event) -> std::result::Result<(), String>) -> Result<()> {
    read_events_while(path, |ev| f(ev).map(|()| true))
}

/// [`read_events`], stopping (normally, the rest unread) when `f` returns `false`: a replay that
/// has reached its target revision inside the segment.
pub fn read_events_while(path: &Path, mut f: impl FnMut(Event) -> std::result::Result<bool, String>) -> Result<()> {
    let len = std::fs::metadata(path).map_err(Error::io("read", path))?.len();
    if len < (MAGIC.len() + TRAILER) as u64 {
        return Err(bad(path, format!("{len} bytes is shorter than a segment can be")));
    }
    let body_len = len - TRAILER as u64;
    let open = || std::fs::File::open(path).map_err(Error::io("read", path));
    let mut r = std::io::BufReader::with_capacity(256 << 10, open()?);
    let mut hasher = Sha256::new();
    let mut left = body_len;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = buf.len().min(left as usize);
        r.read_exact(&mut buf[..want]).map_err(Error::io("read", path))?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    let mut trailer = [0u8; TRAILER];
    r.read_exact(&mut trailer).map_err(Error::io("read", path))?;
    if hasher.finalize().as_slice() != trailer {
        return Err(bad(path, "its SHA-256 trailer does not match".into()));
    }
    let mut r = std::io::BufReader::with_capacity(256 << 10, open()?).take(body_len);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(Error::io("read", path))?;
    if &magic != MAGIC {
        return Err(bad(path, "it does not start with K3SDLT01".into()));
    }
    let mut at = MAGIC.len() as u64;
    let mut frame = Vec::new();
    while at < body_len {
        let mut l = [0u8; 4];
        r.read_exact(&mut l).map_err(|_| bad(path, format!("a frame header at byte {at} is cut")))?;
        let l = u32::from_le_bytes(l);
        if l > MAX_FRAME || u64::from(l) > body_len - at - 4 {
            return Err(bad(path, format!("a frame at byte {at} claims {l} bytes")));
        }
        frame.resize(l as usize, 0);
        r.read_exact(&mut frame).map_err(Error::io("read", path))?;
        let ev = Event::decode(frame.as_slice()).map_err(|e| bad(path, format!("frame at byte {at}: {e}")))?;
        if ev.kv.is_none() || !(ev.r#type == PUT || ev.r#type == DELETE) {
            return Err(bad(path, format!("frame at byte {at} is not a put or delete event")));
        }
        if !f(ev).map_err(|d| bad(path, d))? {
            return Ok(());
        }
        at += 4 + u64::from(l);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::KeyValue;

    fn put(rev: i64, key: &str, value: &str) -> Event {
        Event {
            r#type: PUT,
            kv: Some(KeyValue {
                key: key.into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                value: value.into(),
                lease: 0,
            }),
        }
    }

    #[test]
    fn written_segments_read_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), "n1", None).unwrap();
        let evs = vec![put(5, "a", "1"), put(6, "b", "2"), put(6, "c", "3"), put(7, "a", "4")];
        for e in &evs {
            w.append(e).unwrap();
        }
        let (name, path, bytes) = w.finish("n1", 42, None).unwrap();
        assert_eq!((name.from, name.to), (5, 7));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        assert_eq!(verify(&path, &name).unwrap(), 4);
        let mut got = Vec::new();
        read_events(&path, |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, evs);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no .part left");

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(verify(&path, &name).unwrap_err().to_string().contains("trailer"));
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(verify(&path, &name).is_err());
    }

    #[test]
    fn an_unfinished_segment_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), "n1", None).unwrap();
        w.append(&put(3, "a", "1")).unwrap();
        assert!(w.append(&put(2, "a", "1")).is_err(), "revisions never go backwards");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn encrypted_segments_hold_only_ciphertext_and_decrypt_to_the_plain_format() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = age::x25519::Identity::generate();
        let rf = dir.path().join("r.txt");
        std::fs::write(&rf, format!("{}\n", id.to_public())).unwrap();
        let recipients = Recipients::from_file(&rf).unwrap();
        let idf = dir.path().join("k.txt");
        use age::secrecy::ExposeSecret;
        std::fs::write(&idf, format!("{}\n", id.to_string().expose_secret())).unwrap();
        std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ids = crate::encryption::Identities::from_file(&idf).unwrap();

        let segs = dir.path().join("segs");
        std::fs::create_dir(&segs).unwrap();
        let mut w = SegmentWriter::create(&segs, "n1", Some(&recipients)).unwrap();
        // Enough events for several age chunks, and a value that would show in plaintext.
        let evs: Vec<Event> = (0..3000).map(|i| put(10 + i / 3, "/registry/secret", "hunter2-plain")).collect();
        for e in &evs {
            w.append(e).unwrap();
            let part = std::fs::read(segs.join(".delta-open-n1.part")).unwrap();
            assert!(!part.windows(13).any(|x| x == b"hunter2-plain"), "plaintext reached the .part");
        }
        let (name, path, bytes) = w.finish("n1", 42, None).unwrap();
        assert!(name.encrypted && name.file.ends_with(".seg.age"), "{}", name.file);
        assert_eq!((name.from, name.to), (10, 10 + 2999 / 3));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        let stored = std::fs::read(&path).unwrap();
        assert!(stored.starts_with(crate::encryption::AGE_MAGIC));
        assert!(!stored.windows(8).any(|x| x == MAGIC));
        assert_eq!(std::fs::read_dir(&segs).unwrap().count(), 1, "only the .seg.age");

        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let plain = crate::encryption::decrypt_to_scratch(&path, &out, Some(&ids), &name.file).unwrap();
        assert_eq!(plain.target(), out.join(name.file.strip_suffix(".age").unwrap()));
        assert_eq!(verify(plain.path(), &name).unwrap(), 3000);
        let mut got = Vec::new();
        read_events(plain.path(), |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, evs);
    }
}
