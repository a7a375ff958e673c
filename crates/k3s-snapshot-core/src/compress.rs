//! Zip compression in k3s's layout: `<file>.zip` holds exactly one deflate entry named `<file>`.
//!
//! Two writers: [`compress_file`] zips a saved snapshot (the zip crate, which seeks back to put
//! the sizes in the entry's header), and [`ZipStream`] writes the same one-entry zip front to back
//! for an encrypted save, whose output (an age stream) cannot seek.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::name::ZIP_SUFFIX;
use crate::store::{ensure_free_space, Placed, ScratchFile};
use crate::{Error, Result};

/// Compresses `raw` into `raw.zip` (through a scratch file, fsync, rename that never replaces an
/// existing file) and returns the zip's path. The raw file is left for the caller to remove once
/// the zip is in place.
pub fn compress_file(raw: &Path) -> Result<PathBuf> {
    let entry = raw
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{} has no file name", raw.display())))?
        .to_string();
    let mut zip_path = raw.as_os_str().to_owned();
    zip_path.push(ZIP_SUFFIX);
    let zip_path = PathBuf::from(zip_path);
    let zerr = |detail: String| Error::Zip { path: zip_path.clone(), detail };
    let scratch = ScratchFile::create(&zip_path)?;
    let mut zw = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, scratch.file()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(std::fs::metadata(raw).map(|m| m.len() >= u32::MAX as u64).unwrap_or(true))
        .unix_permissions(0o600);
    zw.start_file(entry.as_str(), opts).map_err(|e| zerr(e.to_string()))?;
    let mut input = BufReader::with_capacity(1 << 20, File::open(raw).map_err(Error::io("open", raw))?);
    std::io::copy(&mut input, &mut zw).map_err(Error::io("compress", raw))?;
    let mut w = zw.finish().map_err(|e| zerr(e.to_string()))?;
    w.flush().map_err(Error::io("write", scratch.path()))?;
    drop(w);
    scratch.sync()?;
    match scratch.place()? {
        Placed::New(p) => Ok(p),
        Placed::Identical(p) => Ok(p),
        Placed::Kept { existing, .. } => Err(zerr(format!(
            "{} appeared while compressing and is not this snapshot; it was left as it is and the uncompressed snapshot is kept",
            existing.display()
        ))),
    }
}

/// A zip holding one deflated entry, written front to back into a writer that cannot seek (the
/// age stream of an encrypted save, so that no plaintext reaches the disk): the entry's local
/// header has no sizes or CRC-32 (general purpose flag bit 3), a data descriptor after the data
/// carries them, then the central directory and its end record. Every zip reader (Go's
/// archive/zip in k3s, the zip crate, Info-ZIP's unzip) reads this layout. With `zip64` the sizes
/// are 64-bit (ZIP64 extra fields and end records): asked for when the entry may reach 4 GiB.
pub struct ZipStream<W: Write> {
    deflate: flate2::write::DeflateEncoder<Counted<W>>,
    crc: crc32fast::Hasher,
    size: u64,
    entry: String,
    zip64: bool,
    dos_time: (u16, u16),
}

/// A writer that counts what passes through it.
struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

const LOCAL_HEADER_SIG: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const CENTRAL_HEADER_SIG: u32 = 0x0201_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const END_SIG: u32 = 0x0605_4b50;
/// Sizes and CRC-32 follow the data (general purpose flag bit 3).
const FLAG_DATA_DESCRIPTOR: u16 = 0x0008;
const METHOD_DEFLATE: u16 = 8;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// Date and time in MS-DOS form (UTC), as zip headers carry them.
fn dos_time(t: chrono::DateTime<chrono::Utc>) -> (u16, u16) {
    use chrono::{Datelike, Timelike};
    let time = ((t.hour() << 11) | (t.minute() << 5) | (t.second() / 2)) as u16;
    let year = t.year().clamp(1980, 2107) as u32 - 1980;
    let date = ((year << 9) | (t.month() << 5) | t.day()) as u16;
    (time, date)
}

impl<W: Write> ZipStream<W> {
    /// Writes the local header of `entry` into `out`; the data follows through [`Write`].
    pub fn new(out: W, entry: &str, zip64: bool) -> std::io::Result<Self> {
        let dos_time = dos_time(chrono::Utc::now());
        let mut out = Counted { inner: out, n: 0 };
        let mut h = Vec::with_capacity(30 + entry.len() + 20);
        h.extend(LOCAL_HEADER_SIG.to_le_bytes());
        h.extend(if zip64 { 45u16 } else { 20u16 }.to_le_bytes());
        h.extend(FLAG_DATA_DESCRIPTOR.to_le_bytes());
        h.extend(METHOD_DEFLATE.to_le_bytes());
        h.extend(dos_time.0.to_le_bytes());
        h.extend(dos_time.1.to_le_bytes());
        h.extend(0u32.to_le_bytes()); // CRC-32: in the data descriptor
        let unknown = if zip64 { u32::MAX } else { 0 };
        h.extend(unknown.to_le_bytes()); // compressed size
        h.extend(unknown.to_le_bytes()); // uncompressed size
        h.extend((entry.len() as u16).to_le_bytes());
        h.extend(if zip64 { 20u16 } else { 0u16 }.to_le_bytes());
        h.extend(entry.as_bytes());
        if zip64 {
            h.extend(ZIP64_EXTRA_ID.to_le_bytes());
            h.extend(16u16.to_le_bytes());
            h.extend([0u8; 16]);
        }
        out.write_all(&h)?;
        Ok(ZipStream {
            deflate: flate2::write::DeflateEncoder::new(out, flate2::Compression::default()),
            crc: crc32fast::Hasher::new(),
            size: 0,
            entry: entry.to_string(),
            zip64,
            dos_time,
        })
    }

    /// Ends the data, writes the data descriptor and the central directory, and returns the
    /// writer. Without `zip64`, an entry (or zip) that reached 4 GiB is an error.
    pub fn finish(self) -> std::io::Result<W> {
        let ZipStream { deflate, crc, size, entry, zip64, dos_time } = self;
        let mut out = deflate.finish()?;
        let crc = crc.finalize();
        let header_len = 30 + entry.len() as u64 + if zip64 { 20 } else { 0 };
        let compressed = out.n - header_len;
        let too_big = |what: &str| {
            std::io::Error::other(format!(
                "the zip {what} reached 4 GiB, which needs zip64; this is a bug in the size estimate"
            ))
        };
        if !zip64 && (size >= u32::MAX as u64 || compressed >= u32::MAX as u64) {
            return Err(too_big("entry"));
        }
        let mut d = Vec::with_capacity(24);
        d.extend(DATA_DESCRIPTOR_SIG.to_le_bytes());
        d.extend(crc.to_le_bytes());
        if zip64 {
            d.extend(compressed.to_le_bytes());
            d.extend(size.to_le_bytes());
        } else {
            d.extend((compressed as u32).to_le_bytes());
            d.extend((size as u32).to_le_bytes());
        }
        out.write_all(&d)?;

        let cd_offset = out.n;
        let mut c = Vec::with_capacity(46 + entry.len() + 20);
        c.extend(CENTRAL_HEADER_SIG.to_le_bytes());
        let version: u16 = if zip64 { 45 } else { 20 };
        c.extend(((3u16 << 8) | version).to_le_bytes()); // made by: Unix
        c.extend(version.to_le_bytes());
        c.extend(FLAG_DATA_DESCRIPTOR.to_le_bytes());
        c.extend(METHOD_DEFLATE.to_le_bytes());
        c.extend(dos_time.0.to_le_bytes());
        c.extend(dos_time.1.to_le_bytes());
        c.extend(crc.to_le_bytes());
        if zip64 {
            c.extend(u32::MAX.to_le_bytes());
            c.extend(u32::MAX.to_le_bytes());
        } else {
            c.extend((compressed as u32).to_le_bytes());
            c.extend((size as u32).to_le_bytes());
        }
        c.extend((entry.len() as u16).to_le_bytes());
        c.extend(if zip64 { 20u16 } else { 0u16 }.to_le_bytes());
        c.extend(0u16.to_le_bytes()); // comment
        c.extend(0u16.to_le_bytes()); // disk
        c.extend(0u16.to_le_bytes()); // internal attributes
        c.extend(((0o100600u32) << 16).to_le_bytes()); // a regular file, 0600
        c.extend(0u32.to_le_bytes()); // the local header is at 0
        c.extend(entry.as_bytes());
        if zip64 {
            c.extend(ZIP64_EXTRA_ID.to_le_bytes());
            c.extend(16u16.to_le_bytes());
            c.extend(size.to_le_bytes());
            c.extend(compressed.to_le_bytes());
        }
        let cd_len = c.len() as u64;
        out.write_all(&c)?;

        let mut e = Vec::with_capacity(98);
        if zip64 {
            let end64_offset = out.n;
            e.extend(ZIP64_END_SIG.to_le_bytes());
            e.extend(44u64.to_le_bytes());
            e.extend(((3u16 << 8) | 45).to_le_bytes());
            e.extend(45u16.to_le_bytes());
            e.extend(0u32.to_le_bytes());
            e.extend(0u32.to_le_bytes());
            e.extend(1u64.to_le_bytes());
            e.extend(1u64.to_le_bytes());
            e.extend(cd_len.to_le_bytes());
            e.extend(cd_offset.to_le_bytes());
            e.extend(ZIP64_LOCATOR_SIG.to_le_bytes());
            e.extend(0u32.to_le_bytes());
            e.extend(end64_offset.to_le_bytes());
            e.extend(1u32.to_le_bytes());
        } else if cd_offset >= u32::MAX as u64 {
            return Err(too_big("file"));
        }
        e.extend(END_SIG.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        e.extend(1u16.to_le_bytes());
        e.extend(1u16.to_le_bytes());
        e.extend((cd_len as u32).to_le_bytes());
        e.extend((cd_offset.min(u32::MAX as u64) as u32).to_le_bytes());
        e.extend(0u16.to_le_bytes()); // comment
        out.write_all(&e)?;
        out.flush()?;
        Ok(out.inner)
    }
}

impl<W: Write> Write for ZipStream<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.deflate.write(buf)?;
        self.crc.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.deflate.flush()
    }
}

/// Extracts the single entry of a k3s snapshot zip into a scratch file in `into_dir` (see
/// [`ScratchFile`]; its target is `into_dir/<entry name>`) and returns it, fsynced, for the
/// caller to verify and then [`ScratchFile::place`]. Refuses, leaving nothing behind: a zip with
/// more or fewer than one entry, an entry name with a path (so nothing is ever written outside
/// `into_dir`), an entry that declares more than the free space of `into_dir`'s filesystem
/// (keeping [`crate::store::FREE_SPACE_MARGIN`]), an entry whose first page is not a bbolt meta
/// page (read before anything is written), an entry that declares more than its bbolt header
/// allows (see [`BboltLimit`]; known after its second page), and an entry that inflates to more
/// (a zip bomb) or fewer bytes than it declares. The output never exceeds the declared size, nor
/// two pages beyond the first once the entry turns out to be more than its header allows.
pub fn extract_to_scratch(zip_path: &Path, into_dir: &Path) -> Result<ScratchFile> {
    let zerr = |detail: String| Error::Zip { path: zip_path.to_path_buf(), detail };
    let f = File::open(zip_path).map_err(Error::io("open", zip_path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| zerr(format!("not a readable zip ({e}); give a snapshot or a k3s snapshot .zip")))?;
    if archive.len() != 1 {
        return Err(zerr(format!("holds {} entries; a snapshot zip holds exactly one", archive.len())));
    }
    let mut entry = archive.by_index(0).map_err(|e| zerr(e.to_string()))?;
    let name = entry.name().to_string();
    if name.is_empty()
        || name.contains('/')
        || name.contains('\\')
        || name.contains("..")
        || name.starts_with('.')
        || entry.is_dir()
    {
        return Err(zerr(format!("entry {name:?} has a path; a snapshot zip holds one plain file name")));
    }
    crate::name::validate_file_name(&name).map_err(|e| zerr(e.to_string()))?;
    let declared = entry.size();
    ensure_free_space(into_dir, declared, &format!("entry {name} of {}", zip_path.display()))?;
    let refuse = |what: String| zerr(format!("entry {name} {what}; refusing it, nothing was kept"));
    // The first page says whether this is a bbolt file at all, before anything is written.
    let mut head = [0u8; BboltLimit::HEAD];
    let got =
        read_full(&mut entry, &mut head).map_err(|e| zerr(format!("cannot extract {name}: {e}; nothing was kept")))?;
    let mut limit = BboltLimit::from_first_page(&head[..got]).map_err(&refuse)?;
    let scratch = ScratchFile::create(&into_dir.join(&name))?;
    let mut w = BufWriter::with_capacity(1 << 20, scratch.file());
    w.write_all(&head[..got]).map_err(Error::io("write", scratch.path()))?;
    // One byte past the declared size is enough to tell a zip bomb; reading to the end of a
    // whole entry also makes the zip reader check its CRC-32.
    let stop = declared.saturating_add(1);
    let mut n = got as u64;
    let mut buf = vec![0u8; 1 << 20];
    while n < stop {
        // Up to the end of the second meta first, then in whole buffers up to the stop.
        let until = if limit.is_final() { stop } else { stop.min(limit.second_meta_end()) };
        let want = (until - n).min(buf.len() as u64) as usize;
        let got = match entry.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(zerr(format!("cannot extract {name}: {e}; nothing was kept"))),
        };
        limit.observe(n, &buf[..got]);
        w.write_all(&buf[..got]).map_err(Error::io("write", scratch.path()))?;
        n += got as u64;
        if let Some(most) = limit.settle(n) {
            if declared > most {
                return Err(refuse(format!(
                    "declares {declared} bytes, but its bbolt header says the snapshot holds at most {most} (the high-water mark of {} pages of {} bytes, and the 32-byte sha256); a zip bomb or a corrupt zip",
                    limit.pages, limit.page_size
                )));
            }
        }
    }
    if n > declared {
        return Err(zerr(format!(
            "entry {name} inflates beyond the {declared} bytes it declares (a zip bomb, or a corrupt zip); refusing it, nothing was kept"
        )));
    }
    if n < declared {
        return Err(zerr(format!(
            "entry {name} holds {n} bytes but declares {declared}; the zip is truncated or corrupt, nothing was kept"
        )));
    }
    if !limit.is_final() {
        return Err(refuse(format!(
            "ends after {n} bytes, before the second meta page of a bbolt file of {}-byte pages; it is not an etcd snapshot",
            limit.page_size
        )));
    }
    w.flush().map_err(Error::io("write", scratch.path()))?;
    drop(w);
    scratch.sync()?;
    Ok(scratch)
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(k) => at += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// What a bbolt file says about its own size, learnt from its first two pages as they stream
/// past: page 0's meta gives the page size (a stream whose first page is not a meta page is no
/// bbolt file), and the larger high-water mark (`pgid`) of the two valid metas times the page
/// size is all the image a valid snapshot has; etcd's snapshot adds its 32-byte sha256. bbolt's
/// `Tx.WriteTo`, which etcd's Snapshot API streams, writes exactly `pgid * page size` bytes.
#[derive(Debug)]
pub struct BboltLimit {
    pub page_size: u32,
    /// The high-water mark in pages, once both metas were seen (page 0's alone before).
    pub pages: u64,
    meta1: Vec<u8>,
    settled: bool,
}

impl BboltLimit {
    /// Bytes of the first page that hold its header and meta.
    pub const HEAD: usize = crate::bbolt::PAGE_HEADER_SIZE + 64;

    /// Reads page 0's header and meta (the first [`Self::HEAD`] bytes of the stream).
    pub fn from_first_page(head: &[u8]) -> std::result::Result<BboltLimit, String> {
        let not_bolt =
            |why: String| format!("is not an etcd snapshot: its first page is not a bbolt meta page ({why})");
        if head.len() < Self::HEAD {
            return Err(not_bolt(format!("it holds only {} bytes", head.len())));
        }
        let meta = crate::bbolt::Meta::parse(&head[crate::bbolt::PAGE_HEADER_SIZE..]).map_err(not_bolt)?;
        let ps = meta.page_size;
        if !(crate::bbolt::layout::MIN_PAGE_SIZE..=crate::bbolt::layout::MAX_PAGE_SIZE).contains(&ps) {
            return Err(not_bolt(format!("an unusable page size of {ps} bytes")));
        }
        if meta.pgid < 2 || meta.pgid.checked_mul(u64::from(ps)).is_none() {
            return Err(not_bolt(format!("an impossible high-water mark of {} pages", meta.pgid)));
        }
        Ok(BboltLimit { page_size: ps, pages: meta.pgid, meta1: Vec::with_capacity(Self::HEAD), settled: false })
    }

    /// Where page 1's meta ends in the stream: the limit is known from there.
    pub fn second_meta_end(&self) -> u64 {
        u64::from(self.page_size) + Self::HEAD as u64
    }

    pub fn is_final(&self) -> bool {
        self.settled
    }

    /// Keeps the bytes of page 1's meta among `chunk`, which starts at stream offset `at`.
    pub fn observe(&mut self, at: u64, chunk: &[u8]) {
        if self.settled {
            return;
        }
        let (from, to) = (u64::from(self.page_size), self.second_meta_end());
        let end = at + chunk.len() as u64;
        let (s, e) = (at.max(from), end.min(to));
        if s < e {
            self.meta1.extend_from_slice(&chunk[(s - at) as usize..(e - at) as usize]);
        }
    }

    /// Once `n` bytes have passed and page 1's meta with them: the most bytes a valid snapshot of
    /// this header holds (returned once, when it becomes known).
    pub fn settle(&mut self, n: u64) -> Option<u64> {
        if self.settled || n < self.second_meta_end() {
            return None;
        }
        self.settled = true;
        if let Ok(m1) = crate::bbolt::Meta::parse(&self.meta1[crate::bbolt::PAGE_HEADER_SIZE.min(self.meta1.len())..]) {
            if m1.page_size == self.page_size && m1.pgid.checked_mul(u64::from(self.page_size)).is_some() {
                self.pages = self.pages.max(m1.pgid);
            }
        }
        Some(self.max_len())
    }

    /// `pages * page_size + 32`.
    pub fn max_len(&self) -> u64 {
        (self.pages * u64::from(self.page_size)).saturating_add(crate::integrity::TRAILER_LEN as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes shaped like an etcd snapshot of `pages` 4 KiB pages for extraction: both metas valid,
    /// a pattern after them, 32 bytes for the trailer (not a real sha256: extraction does not
    /// look at it). A bbolt file as far as [`BboltLimit`] can tell.
    fn snapshot_like(pages: usize) -> Vec<u8> {
        let mut b = crate::bbolt::testdb::Builder::new(4096);
        for i in 2..pages {
            b.put((0..4096u32).map(|j| (i as u32 * 7 + j) as u8).collect());
        }
        let mut out = b.finish(2, crate::bbolt::NO_FREELIST);
        out.extend_from_slice(&[9u8; 32]);
        out
    }

    #[test]
    fn zip_holds_one_entry_named_like_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("on-demand-n-1");
        let data = snapshot_like(25);
        std::fs::write(&raw, &data).unwrap();
        let z = compress_file(&raw).unwrap();
        assert_eq!(z, tmp.path().join("on-demand-n-1.zip"));
        let mut a = zip::ZipArchive::new(File::open(&z).unwrap()).unwrap();
        assert_eq!(a.len(), 1);
        let e = a.by_index(0).unwrap();
        assert_eq!(e.name(), "on-demand-n-1");
        assert_eq!(e.compression(), zip::CompressionMethod::Deflated);
        drop(e);
        let out = tempfile::tempdir().unwrap();
        let x = extract_to_scratch(&z, out.path()).unwrap();
        assert_eq!(x.target(), out.path().join("on-demand-n-1"));
        assert_eq!(std::fs::read(x.path()).unwrap(), data);
        let placed = x.place().unwrap();
        assert!(matches!(placed, Placed::New(_)), "{placed:?}");
        assert_eq!(std::fs::read(out.path().join("on-demand-n-1")).unwrap(), data);
    }

    fn make_zip(path: &Path, entries: &[&str]) {
        let mut zw = zip::ZipWriter::new(File::create(path).unwrap());
        for e in entries {
            zw.start_file(*e, zip::write::SimpleFileOptions::default()).unwrap();
            zw.write_all(b"data").unwrap();
        }
        zw.finish().unwrap();
    }

    #[test]
    fn zip_entry_with_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let z = tmp.path().join("x.zip");
        make_zip(&z, &["../evil"]);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let err = extract_to_scratch(&z, &out).unwrap_err().to_string();
        assert!(err.contains("has a path"), "{err}");
        assert!(!tmp.path().join("evil").exists());
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn streamed_zip_reads_back_whole_with_and_without_zip64() {
        let data = snapshot_like(171);
        for zip64 in [false, true] {
            let mut z = ZipStream::new(Vec::new(), "on-demand-n-9", zip64).unwrap();
            for chunk in data.chunks(32 * 1024) {
                z.write_all(chunk).unwrap();
            }
            let bytes = z.finish().unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("on-demand-n-9.zip");
            std::fs::write(&p, &bytes).unwrap();
            // The zip crate reads the central directory and checks the CRC-32 at the end.
            let mut a = zip::ZipArchive::new(File::open(&p).unwrap()).unwrap();
            assert_eq!(a.len(), 1);
            let mut e = a.by_index(0).unwrap();
            assert_eq!(
                (e.name(), e.size(), e.compression()),
                ("on-demand-n-9", data.len() as u64, zip::CompressionMethod::Deflated)
            );
            assert_eq!(e.unix_mode().map(|m| m & 0o777), Some(0o600));
            let mut back = Vec::new();
            e.read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "zip64 {zip64}");
            drop(e);
            let out = tempfile::tempdir().unwrap();
            let x = extract_to_scratch(&p, out.path()).unwrap();
            assert_eq!(std::fs::read(x.path()).unwrap(), data);
        }
    }

    #[test]
    fn zip_with_two_entries_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let z = tmp.path().join("x.zip");
        make_zip(&z, &["a", "b"]);
        let err = extract_to_scratch(&z, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("2 entries"), "{err}");
    }

    fn zip_of(path: &Path, name: &str, data: &[u8]) {
        let mut zw = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zw.start_file(name, opts).unwrap();
        zw.write_all(data).unwrap();
        zw.finish().unwrap();
    }

    #[test]
    fn an_entry_that_is_no_bbolt_file_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let z = tmp.path().join("etcd-snapshot-n-1.zip");
        for data in [vec![0u8; 3 << 20], b"PK not a database at all".repeat(1000), vec![1u8; 10]] {
            zip_of(&z, "etcd-snapshot-n-1", &data);
            let err = extract_to_scratch(&z, &out).unwrap_err().to_string();
            assert!(err.contains("its first page is not a bbolt meta page"), "{err}");
            assert!(err.contains(&z.display().to_string()), "{err}");
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        }
    }

    #[test]
    fn an_entry_longer_than_its_bbolt_header_allows_is_refused_after_two_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let z = tmp.path().join("etcd-snapshot-n-1.zip");
        let mut data = snapshot_like(6);
        let most = data.len() as u64;
        data.resize(most as usize + (8 << 20), 0);
        zip_of(&z, "etcd-snapshot-n-1", &data);
        let err = extract_to_scratch(&z, &out).unwrap_err().to_string();
        assert!(err.contains(&format!("declares {} bytes", data.len())), "{err}");
        assert!(err.contains(&format!("holds at most {most}")), "{err}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        // Exactly as long as the header allows: extracted.
        zip_of(&z, "etcd-snapshot-n-1", &data[..most as usize]);
        let x = extract_to_scratch(&z, &out).unwrap();
        assert_eq!(std::fs::metadata(x.path()).unwrap().len(), most);
    }

    #[test]
    fn a_larger_high_water_mark_in_meta_one_counts() {
        let mut data = snapshot_like(6);
        let mut limit = BboltLimit::from_first_page(&data[..BboltLimit::HEAD]).unwrap();
        assert_eq!(limit.max_len(), data.len() as u64);
        // Meta 1 says 9 pages.
        let mut m = crate::bbolt::Meta::parse(&data[4096 + 16..]).unwrap();
        m.pgid = 9;
        data[4096 + 16..4096 + 80].copy_from_slice(&m.encode());
        limit.observe(BboltLimit::HEAD as u64, &data[BboltLimit::HEAD..5000]);
        assert_eq!(limit.settle(4000), None);
        assert_eq!(limit.settle(5000), Some(9 * 4096 + 32));
        assert_eq!(limit.settle(6000), None, "once");
    }
}
