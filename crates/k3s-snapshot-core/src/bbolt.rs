//! Native, read-only reader for bbolt database images (etcd's backend format).
//!
//! The file is memory-mapped and every structure is decoded with bounds-checked
//! slicing, so a truncated or damaged file produces a [`BoltError`] instead of a
//! panic. Mapped pages count towards the process's resident set, so once the
//! walks have touched [`RESIDENT_WINDOW`] bytes of pages the mapping's page-table
//! entries are dropped ([`Db::release`]): the bytes stay in the kernel's page
//! cache and fault back in unchanged, and the resident set stays bounded by the
//! window instead of growing to the file's size. Tree walks track every page they visit (a bitset sized by the meta
//! high-water mark, which is bounded by the file length) and limit their
//! recursion depth, so reference cycles and absurdly deep trees are reported as
//! corruption rather than looping or overflowing the stack.
//!
//! On-disk layout (all integers little-endian):
//! * page header, 16 bytes: `id u64, flags u16, count u16, overflow u32`;
//!   a page occupies `1 + overflow` consecutive pages.
//! * meta (pages 0 and 1, after the header): `magic u32, version u32,
//!   page_size u32, flags u32, root {pgid u64, sequence u64}, freelist u64,
//!   pgid u64, txid u64, checksum u64` — the checksum is FNV-1a/64 of the 56
//!   bytes before it.
//! * branch element, 16 bytes: `pos u32, ksize u32, pgid u64`.
//! * leaf element, 16 bytes: `flags u32, pos u32, ksize u32, vsize u32`.
//!   `pos` is relative to the start of the element itself.
//! * a leaf element with flag 0x01 is a nested bucket whose value starts with
//!   a bucket header `{root u64, sequence u64}`; `root == 0` means the bucket
//!   is inline and its (leaf) page follows the header inside the value.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Magic number stored in both meta pages.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The only data format version this reader understands.
pub const VERSION: u32 = 2;
/// Freelist page id meaning "freelist not persisted" (etcd runs with `NoFreelistSync`).
pub const NO_FREELIST: u64 = u64::MAX;
/// Size of a page header.
pub const PAGE_HEADER_SIZE: usize = 16;
/// Size of a bucket header (`root`, `sequence`).
pub const BUCKET_HEADER_SIZE: usize = 16;
/// Page flag of a branch page.
pub const FLAG_BRANCH: u16 = 0x01;
/// Page flag of a leaf page.
pub const FLAG_LEAF: u16 = 0x02;
/// Page flag of a meta page.
pub const FLAG_META: u16 = 0x04;
/// Page flag of a freelist page.
pub const FLAG_FREELIST: u16 = 0x10;
/// Leaf element flag marking a nested bucket.
pub const LEAF_FLAG_BUCKET: u32 = 0x01;
/// Maximum combined depth of b+tree levels and bucket nesting followed by a walk.
pub const MAX_DEPTH: u32 = 256;
/// Bytes of mapped pages a walk may touch before the mapping is released (see the module docs).
pub const RESIDENT_WINDOW: u64 = 8 << 20;

const META_SIZE: usize = 64;
const META_CHECKSUM_OFFSET: usize = 56;
const ELEMENT_SIZE: usize = 16;
const MIN_PAGE_SIZE: u32 = (PAGE_HEADER_SIZE + META_SIZE) as u32;
const MAX_PAGE_SIZE: u32 = 1 << 28;
/// Longest key prefix shown (hex) in error messages.
const KEY_SHOWN: usize = 32;

/// Errors from opening, reading or checking a bbolt image.
#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error("cannot read snapshot {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {} is not a bbolt database: {reason}", .path.display())]
    NotBolt { path: PathBuf, reason: String },
    #[error(
        "snapshot {} is truncated: {what} ends at byte {end} past the end of the file (len {len})",
        .path.display()
    )]
    Truncated { path: PathBuf, what: String, end: u64, len: u64 },
    #[error("snapshot {} is corrupt: page {page} (byte offset {offset}): {detail}", .path.display())]
    Corrupt { path: PathBuf, page: u64, offset: u64, detail: String },
}

/// A bucket header: root page id (0 for inline buckets) and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketHeader {
    pub root: u64,
    pub sequence: u64,
}

/// A decoded and validated meta page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub magic: u32,
    pub version: u32,
    pub page_size: u32,
    pub flags: u32,
    pub root: BucketHeader,
    pub freelist: u64,
    /// High-water mark: number of pages in use (`tx.Size() = pgid * page_size`).
    pub pgid: u64,
    pub txid: u64,
    pub checksum: u64,
}

fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

impl Meta {
    /// Decodes and validates (magic, version, checksum) a meta structure;
    /// `buf` starts right after the page header.
    pub fn parse(buf: &[u8]) -> Result<Meta, String> {
        let b = buf.get(..META_SIZE).ok_or_else(|| format!("only {} bytes, a meta needs {META_SIZE}", buf.len()))?;
        let r32 = |o| le_u32(b, o).unwrap_or(0);
        let r64 = |o| le_u64(b, o).unwrap_or(0);
        let m = Meta {
            magic: r32(0),
            version: r32(4),
            page_size: r32(8),
            flags: r32(12),
            root: BucketHeader { root: r64(16), sequence: r64(24) },
            freelist: r64(32),
            pgid: r64(40),
            txid: r64(48),
            checksum: r64(META_CHECKSUM_OFFSET),
        };
        if m.magic != MAGIC {
            return Err(format!("bad magic {:#010x} (want {MAGIC:#010x})", m.magic));
        }
        if m.version != VERSION {
            return Err(format!("unsupported version {} (want {VERSION})", m.version));
        }
        let sum = fnv1a64(&b[..META_CHECKSUM_OFFSET]);
        if sum != m.checksum {
            return Err(format!("checksum mismatch (stored {:#018x}, computed {sum:#018x})", m.checksum));
        }
        Ok(m)
    }
}

enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// Drops the page-table entries of `range` (all of the map when `None`).
    fn release(&self, range: Option<(usize, usize)>) {
        let Backing::Map(m) = self else { return };
        #[allow(unsafe_code)]
        // SAFETY: `MADV_DONTNEED` is destructive only for private, written
        // pages. This is a read-only shared mapping of a file: dropping its
        // page-table entries leaves the data in the page cache, and the next
        // access faults in the same bytes, so every outstanding `&[u8]` into
        // the map keeps seeing what it saw before.
        let r = unsafe {
            match range {
                None => m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed),
                Some((off, len)) => m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, len),
            }
        };
        // Advice is an optimisation: on failure the pages simply stay mapped.
        let _ = r;
    }
}

/// Where a page (or an inline bucket page) lives, for error messages.
#[derive(Debug, Clone, Copy)]
struct Loc {
    page: u64,
    offset: u64,
    inline: bool,
}

/// A decoded page header plus the bytes of the whole page span.
#[derive(Clone, Copy)]
struct Page<'a> {
    loc: Loc,
    flags: u16,
    count: u16,
    overflow: u32,
    buf: &'a [u8],
}

impl<'a> Page<'a> {
    fn check_count(&self) -> Result<(), String> {
        let need = usize::from(self.count).checked_mul(ELEMENT_SIZE).and_then(|n| n.checked_add(PAGE_HEADER_SIZE));
        match need {
            Some(n) if n <= self.buf.len() => Ok(()),
            _ => Err(format!("element count {} does not fit in the page ({} bytes)", self.count, self.buf.len())),
        }
    }

    fn elem_range(&self, i: usize, pos: u32, ksize: u32, vsize: u32) -> Option<(usize, usize, usize)> {
        let eo = PAGE_HEADER_SIZE.checked_add(i.checked_mul(ELEMENT_SIZE)?)?;
        let ks = eo.checked_add(usize::try_from(pos).ok()?)?;
        let ke = ks.checked_add(usize::try_from(ksize).ok()?)?;
        let ve = ke.checked_add(usize::try_from(vsize).ok()?)?;
        if ve > self.buf.len() {
            return None;
        }
        Some((ks, ke, ve))
    }

    /// Branch element `i`: (key, child page id).
    fn branch(&self, i: usize) -> Result<(&'a [u8], u64), String> {
        let eo = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
        let (pos, ksize, pgid) = match (le_u32(self.buf, eo), le_u32(self.buf, eo + 4), le_u64(self.buf, eo + 8)) {
            (Some(p), Some(k), Some(g)) => (p, k, g),
            _ => return Err(format!("branch element {i} lies outside the page")),
        };
        let (ks, ke, _) = self.elem_range(i, pos, ksize, 0).ok_or_else(|| {
            format!(
                "branch element {i} key (pos {pos}, size {ksize}) runs past the end of the page ({} bytes)",
                self.buf.len()
            )
        })?;
        Ok((&self.buf[ks..ke], pgid))
    }

    /// Leaf element `i`: (flags, key, value).
    fn leaf(&self, i: usize) -> Result<(u32, &'a [u8], &'a [u8]), String> {
        let eo = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
        let (flags, pos, ksize, vsize) =
            match (le_u32(self.buf, eo), le_u32(self.buf, eo + 4), le_u32(self.buf, eo + 8), le_u32(self.buf, eo + 12))
            {
                (Some(f), Some(p), Some(k), Some(v)) => (f, p, k, v),
                _ => return Err(format!("leaf element {i} lies outside the page")),
            };
        let (ks, ke, ve) = self.elem_range(i, pos, ksize, vsize).ok_or_else(|| {
            format!(
                "leaf element {i} (pos {pos}, key size {ksize}, value size {vsize}) runs past the end of the page ({} bytes)",
                self.buf.len()
            )
        })?;
        Ok((flags, &self.buf[ks..ke], &self.buf[ke..ve]))
    }
}

fn show_key(k: &[u8]) -> String {
    if k.len() > KEY_SHOWN {
        format!("{}... ({} bytes)", hex::encode(&k[..KEY_SHOWN]), k.len())
    } else {
        hex::encode(k)
    }
}

fn flags_name(flags: u16) -> String {
    match flags {
        FLAG_BRANCH => "branch".into(),
        FLAG_LEAF => "leaf".into(),
        FLAG_META => "meta".into(),
        FLAG_FREELIST => "freelist".into(),
        f => format!("unknown<{f:#04x}>"),
    }
}

/// An open, read-only bbolt image.
pub struct Db {
    path: PathBuf,
    backing: Backing,
    image_len: usize,
    page_size: u32,
    meta: Meta,
    meta_page: u64,
    /// Bytes of pages handed out by [`Db::page`] since the last release.
    touched: AtomicU64,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.path)
            .field("image_len", &self.image_len)
            .field("page_size", &self.page_size)
            .field("meta", &self.meta)
            .field("meta_page", &self.meta_page)
            .finish()
    }
}

impl Db {
    /// Opens a bbolt file; the whole file is the database image.
    pub fn open(path: &Path) -> Result<Db, BoltError> {
        let file = File::open(path).map_err(|source| BoltError::Io { path: path.to_path_buf(), source })?;
        Self::open_file(path, &file, None)
    }

    /// Opens a bbolt file whose database image is only the first `image_len`
    /// bytes (e.g. an etcd snapshot followed by its sha256 trailer).
    pub fn open_image(path: &Path, image_len: u64) -> Result<Db, BoltError> {
        let file = File::open(path).map_err(|source| BoltError::Io { path: path.to_path_buf(), source })?;
        Self::open_file(path, &file, Some(image_len))
    }

    /// Maps an already opened file. `image_len` defaults to the file length.
    pub fn open_file(path: &Path, file: &File, image_len: Option<u64>) -> Result<Db, BoltError> {
        let io_err = |source| BoltError::Io { path: path.to_path_buf(), source };
        let len = file.metadata().map_err(io_err)?.len();
        if len == 0 {
            return Err(BoltError::NotBolt { path: path.to_path_buf(), reason: "the file is empty".into() });
        }
        if usize::try_from(len).is_err() {
            return Err(BoltError::NotBolt {
                path: path.to_path_buf(),
                reason: format!("file of {len} bytes cannot be mapped on this platform"),
            });
        }
        #[allow(unsafe_code)]
        // SAFETY: the map is read-only and only ever accessed through bounds-checked
        // slices of its reported length. Like bbolt itself (and every reader of a
        // mapped file) we rely on the file not being truncated by another process
        // while it is open; snapshot files are immutable once written.
        let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }.map_err(io_err)?;
        Self::from_backing(path.to_path_buf(), Backing::Map(map), image_len)
    }

    /// Uses an in-memory image (tests, fuzzing). `name` is used in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>, image_len: Option<u64>) -> Result<Db, BoltError> {
        Self::from_backing(name.into(), Backing::Owned(bytes), image_len)
    }

    fn from_backing(path: PathBuf, backing: Backing, image_len: Option<u64>) -> Result<Db, BoltError> {
        let total = backing.bytes().len();
        let image_len = match image_len {
            None => total,
            Some(l) => usize::try_from(l).ok().filter(|&l| l <= total).ok_or_else(|| BoltError::Truncated {
                path: path.clone(),
                what: "the database image".into(),
                end: l,
                len: total as u64,
            })?,
        };
        let data = &backing.bytes()[..image_len];
        let (page_size, meta, meta_page) = Self::read_metas(&path, data)?;
        let db = Db { path, backing, image_len, page_size, meta, meta_page, touched: AtomicU64::new(0) };
        db.validate_meta()?;
        Ok(db)
    }

    /// Determines the page size and picks the meta with the highest valid txid.
    fn read_metas(path: &Path, data: &[u8]) -> Result<(u32, Meta, u64), BoltError> {
        let meta_at = |off: usize| -> Result<Meta, String> {
            let start = off.checked_add(PAGE_HEADER_SIZE).ok_or("offset overflow")?;
            match data.get(start..) {
                Some(b) if b.len() >= META_SIZE => Meta::parse(b),
                _ => Err(format!("the file ends before byte {}", start + META_SIZE)),
            }
        };
        // Page size: from meta 0, else probe for meta 1 at power-of-two offsets
        // up to 16 MiB, as bbolt does (bbolt starts at 1 KiB; 512 is also tried).
        let first = meta_at(0);
        let page_size = match &first {
            Ok(m) => Some(m.page_size),
            Err(_) => {
                let mut found = None;
                for shift in 9..=24u32 {
                    let pos = 1usize << shift;
                    if pos.saturating_add(1024) >= data.len() {
                        break;
                    }
                    if let Ok(m) = meta_at(pos) {
                        found = Some(m.page_size);
                        break;
                    }
                }
                found
            }
        };
        let Some(page_size) = page_size else {
            let e0 = first.err().unwrap_or_default();
            return Err(BoltError::NotBolt {
                path: path.to_path_buf(),
                reason: format!("meta page 0: {e0}; no valid meta page 1 found at any page size"),
            });
        };
        if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(BoltError::NotBolt {
                path: path.to_path_buf(),
                reason: format!("meta declares an unusable page size of {page_size} bytes"),
            });
        }
        let m0 = meta_at(0);
        let m1 = meta_at(page_size as usize);
        let (meta, page) = match (m0, m1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    (b, 1)
                } else {
                    (a, 0)
                }
            }
            (Ok(a), Err(_)) => (a, 0),
            (Err(_), Ok(b)) => (b, 1),
            (Err(e0), Err(e1)) => {
                return Err(BoltError::NotBolt {
                    path: path.to_path_buf(),
                    reason: format!("meta page 0: {e0}; meta page 1: {e1}"),
                })
            }
        };
        Ok((page_size, meta, page))
    }

    fn validate_meta(&self) -> Result<(), BoltError> {
        let m = &self.meta;
        let ps = u64::from(self.page_size);
        if m.pgid < 2 {
            return Err(self.corrupt_at(self.meta_page, format!("meta high-water mark {} is below 2", m.pgid)));
        }
        let end = m.pgid.checked_mul(ps);
        match end {
            Some(e) if e <= self.image_len as u64 => Ok(()),
            _ => Err(BoltError::Truncated {
                path: self.path.clone(),
                what: format!("page {} (the last page below the meta high-water mark)", m.pgid - 1),
                end: end.unwrap_or(u64::MAX),
                len: self.image_len as u64,
            }),
        }
    }

    /// Path (or name) of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The meta in effect (highest valid txid).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Which meta page (0 or 1) is in effect.
    pub fn meta_page(&self) -> u64 {
        self.meta_page
    }

    /// `tx.Size()`: high-water mark times page size.
    pub fn size(&self) -> u64 {
        self.meta.pgid.saturating_mul(u64::from(self.page_size))
    }

    /// Length of the database image in bytes.
    pub fn image_len(&self) -> u64 {
        self.image_len as u64
    }

    /// The database image bytes.
    pub fn image(&self) -> &[u8] {
        self.backing.bytes().get(..self.image_len).unwrap_or(&[])
    }

    /// Releases the resident pages of the whole mapping (no-op for in-memory
    /// images). Borrowed slices stay valid and unchanged; see the module docs.
    pub fn release(&self) {
        self.touched.store(0, Ordering::Relaxed);
        self.backing.release(None);
    }

    /// Releases the resident pages of `image()[start..start + len]`.
    pub fn release_range(&self, start: usize, len: usize) {
        self.backing.release(Some((start, len)));
    }

    fn note_touched(&self, bytes: usize) {
        let before = self.touched.fetch_add(bytes as u64, Ordering::Relaxed);
        if before + bytes as u64 >= RESIDENT_WINDOW {
            self.release();
        }
    }

    /// Bytes of the file after the database image (e.g. etcd's sha256 trailer).
    pub fn bytes_after_image(&self) -> &[u8] {
        self.backing.bytes().get(self.image_len..).unwrap_or(&[])
    }

    /// The root bucket.
    pub fn root(&self) -> Bucket<'_> {
        Bucket { db: self, header: self.meta.root, inline: None, loc: self.meta_loc() }
    }

    /// Structural check of the whole database (like bbolt's `tx.Check`):
    /// returns the first problem found.
    pub fn check(&self) -> Result<(), BoltError> {
        let mut c = Checker::new(self)?;
        c.check_bucket(&self.root())?;
        c.finish()
    }

    fn meta_loc(&self) -> Loc {
        Loc { page: self.meta_page, offset: self.meta_page * u64::from(self.page_size), inline: false }
    }

    fn corrupt_at(&self, page: u64, detail: String) -> BoltError {
        BoltError::Corrupt {
            path: self.path.clone(),
            page,
            offset: page.saturating_mul(u64::from(self.page_size)),
            detail,
        }
    }

    fn corrupt(&self, loc: Loc, detail: impl Into<String>) -> BoltError {
        let detail = detail.into();
        BoltError::Corrupt {
            path: self.path.clone(),
            page: loc.page,
            offset: loc.offset,
            detail: if loc.inline { format!("inline bucket page: {detail}") } else { detail },
        }
    }

    /// Byte offset of `s` inside the image (only meaningful for subslices of it).
    fn offset_of(&self, s: &[u8]) -> u64 {
        (s.as_ptr() as usize).wrapping_sub(self.backing.bytes().as_ptr() as usize) as u64
    }

    /// Reads page `id` (with its overflow pages), validating id and bounds.
    fn page(&self, id: u64) -> Result<Page<'_>, BoltError> {
        let ps = u64::from(self.page_size);
        let hwm = self.meta.pgid;
        let offset = id.saturating_mul(ps);
        let loc = Loc { page: id, offset, inline: false };
        if id >= hwm {
            return Err(self.corrupt(loc, format!("page id is at or above the high-water mark {hwm}")));
        }
        let data = self.image();
        let hdr = usize::try_from(offset).ok().and_then(|o| data.get(o..o.checked_add(PAGE_HEADER_SIZE)?)).ok_or_else(
            || BoltError::Truncated {
                path: self.path.clone(),
                what: format!("page {id}"),
                end: offset.saturating_add(PAGE_HEADER_SIZE as u64),
                len: self.image_len as u64,
            },
        )?;
        let hid = le_u64(hdr, 0).unwrap_or(0);
        let flags = le_u16(hdr, 8).unwrap_or(0);
        let count = le_u16(hdr, 10).unwrap_or(0);
        let overflow = le_u32(hdr, 12).unwrap_or(0);
        if hid != id {
            return Err(self.corrupt(loc, format!("page header says it is page {hid}")));
        }
        let last = id.checked_add(u64::from(overflow));
        if last.is_none_or(|l| l >= hwm) {
            return Err(self
                .corrupt(loc, format!("page with {overflow} overflow pages extends past the high-water mark {hwm}")));
        }
        let end = (u64::from(overflow) + 1).checked_mul(ps).and_then(|s| s.checked_add(offset));
        let buf =
            end.and_then(|e| usize::try_from(e).ok()).and_then(|e| data.get(offset as usize..e)).ok_or_else(|| {
                BoltError::Truncated {
                    path: self.path.clone(),
                    what: format!("page {id}"),
                    end: end.unwrap_or(u64::MAX),
                    len: self.image_len as u64,
                }
            })?;
        self.note_touched(buf.len());
        Ok(Page { loc, flags, count, overflow, buf })
    }

    /// Decodes an inline bucket page stored in `bytes` (the value after the bucket header).
    fn inline_page<'a>(&'a self, bytes: &'a [u8], parent: Loc) -> Result<Page<'a>, BoltError> {
        let loc = Loc { page: parent.page, offset: self.offset_of(bytes), inline: true };
        if bytes.len() < PAGE_HEADER_SIZE {
            return Err(self.corrupt(loc, format!("only {} bytes, shorter than a page header", bytes.len())));
        }
        let flags = le_u16(bytes, 8).unwrap_or(0);
        let count = le_u16(bytes, 10).unwrap_or(0);
        if flags != FLAG_LEAF {
            return Err(self.corrupt(loc, format!("page type is {}, expected leaf", flags_name(flags))));
        }
        Ok(Page { loc, flags, count, overflow: 0, buf: bytes })
    }

    fn bucket_from_value<'a>(&'a self, key: &[u8], value: &'a [u8], loc: Loc) -> Result<Bucket<'a>, BoltError> {
        let (Some(root), Some(sequence)) = (le_u64(value, 0), le_u64(value, 8)) else {
            return Err(self.corrupt(
                loc,
                format!(
                    "bucket {} has a {}-byte value, shorter than the {BUCKET_HEADER_SIZE}-byte bucket header",
                    show_key(key),
                    value.len()
                ),
            ));
        };
        let inline = if root == 0 { Some(value.get(BUCKET_HEADER_SIZE..).unwrap_or(&[])) } else { None };
        Ok(Bucket { db: self, header: BucketHeader { root, sequence }, inline, loc })
    }
}

/// A bucket (the root bucket, a paged nested bucket, or an inline bucket).
#[derive(Clone, Copy)]
pub struct Bucket<'a> {
    db: &'a Db,
    header: BucketHeader,
    inline: Option<&'a [u8]>,
    /// Page holding the bucket header (for error messages).
    loc: Loc,
}

impl fmt::Debug for Bucket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("root", &self.header.root)
            .field("sequence", &self.header.sequence)
            .field("inline", &self.inline.is_some())
            .finish()
    }
}

/// A value read from a bucket.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Data(&'a [u8]),
    Bucket(Bucket<'a>),
}

impl<'a> Bucket<'a> {
    /// The bucket's sequence number.
    pub fn sequence(&self) -> u64 {
        self.header.sequence
    }

    /// Root page id (0 for inline buckets).
    pub fn root_page(&self) -> u64 {
        self.header.root
    }

    /// Whether the bucket is stored inline in its parent's leaf.
    pub fn is_inline(&self) -> bool {
        self.inline.is_some()
    }

    /// Calls `f` for every key of this bucket in key order (nested buckets are
    /// passed as [`Value::Bucket`] and not descended into). Pages are bounds-
    /// and cycle-checked; key order is verified as in [`Db::check`].
    pub fn for_each<E: From<BoltError>>(
        &self,
        mut f: impl FnMut(&'a [u8], Value<'a>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut c = Checker::bare(self.db);
        c.walk_bucket(self, &mut |_, k, v| f(k, v))
    }

    /// Looks up `key` in this bucket.
    pub fn get(&self, key: &[u8]) -> Result<Option<Value<'a>>, BoltError> {
        let db = self.db;
        let mut page = match self.inline {
            Some(bytes) => db.inline_page(bytes, self.loc)?,
            None => {
                if self.header.root < 2 {
                    return Err(
                        db.corrupt(self.loc, format!("bucket root page {} is not a data page", self.header.root))
                    );
                }
                db.page(self.header.root)?
            }
        };
        for _ in 0..MAX_DEPTH {
            page.check_count().map_err(|d| db.corrupt(page.loc, d))?;
            let n = usize::from(page.count);
            match page.flags {
                FLAG_BRANCH => {
                    if n == 0 {
                        return Err(db.corrupt(page.loc, "branch page has no elements"));
                    }
                    // Last element whose key is <= key (or the first one).
                    let (mut lo, mut hi) = (0usize, n);
                    while lo < hi {
                        let mid = lo + (hi - lo) / 2;
                        let (k, _) = page.branch(mid).map_err(|d| db.corrupt(page.loc, d))?;
                        if k <= key {
                            lo = mid + 1;
                        } else {
                            hi = mid;
                        }
                    }
                    let idx = lo.saturating_sub(1);
                    let (_, child) = page.branch(idx).map_err(|d| db.corrupt(page.loc, d))?;
                    if child < 2 {
                        return Err(db.corrupt(page.loc, format!("branch element {idx} points to page {child}")));
                    }
                    page = db.page(child)?;
                }
                FLAG_LEAF => {
                    let (mut lo, mut hi) = (0usize, n);
                    while lo < hi {
                        let mid = lo + (hi - lo) / 2;
                        let (flags, k, v) = page.leaf(mid).map_err(|d| db.corrupt(page.loc, d))?;
                        match k.cmp(key) {
                            std::cmp::Ordering::Less => lo = mid + 1,
                            std::cmp::Ordering::Greater => hi = mid,
                            std::cmp::Ordering::Equal => {
                                return if flags & LEAF_FLAG_BUCKET != 0 {
                                    Ok(Some(Value::Bucket(db.bucket_from_value(k, v, page.loc)?)))
                                } else {
                                    Ok(Some(Value::Data(v)))
                                };
                            }
                        }
                    }
                    return Ok(None);
                }
                f => {
                    return Err(db.corrupt(page.loc, format!("page type is {}, expected branch or leaf", flags_name(f))))
                }
            }
        }
        Err(db.corrupt(page.loc, format!("b+tree deeper than {MAX_DEPTH} levels")))
    }

    /// Looks up the nested bucket `name`; `None` if absent or not a bucket.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'a>>, BoltError> {
        Ok(match self.get(name)? {
            Some(Value::Bucket(b)) => Some(b),
            _ => None,
        })
    }
}

/// Compact bitset over page ids; out-of-range ids read as unset and are never stored.
struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    fn new(n: u64) -> BitSet {
        let words = usize::try_from(n.div_ceil(64)).unwrap_or(0);
        BitSet { words: vec![0; words] }
    }

    fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64).ok().and_then(|w| self.words.get(w)).is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64) {
        if let Some(w) = usize::try_from(i / 64).ok().and_then(|w| self.words.get_mut(w)) {
            *w |= 1u64 << (i % 64);
        }
    }
}

/// Callback used by [`Checker::walk_bucket`]: receives the checker (to descend
/// into nested buckets), the key and the value of each element in key order.
pub type Visitor<'v, 'a, E> = dyn FnMut(&mut Checker<'a>, &'a [u8], Value<'a>) -> Result<(), E> + 'v;

/// Structural checker / ordered walker. Each page may be visited once per
/// checker; a second reference to a page is reported as corruption.
pub struct Checker<'a> {
    db: &'a Db,
    reachable: BitSet,
    freed: BitSet,
    freelist_loaded: bool,
    depth: u32,
    /// Work budget: in a sound image every element header and every key and
    /// data value occupies its own bytes, so a walk can never see more
    /// elements than `image_len / 16` nor more key+value bytes than
    /// `image_len`. Exceeding either means elements overlap (which could
    /// otherwise make a crafted file take exponential time).
    elements_left: u64,
    bytes_left: u64,
}

impl<'a> Checker<'a> {
    /// A checker for a full consistency check: loads the freelist (if
    /// persisted) and accounts for the meta and freelist pages.
    pub fn new(db: &'a Db) -> Result<Checker<'a>, BoltError> {
        let mut c = Checker::bare(db);
        c.freed = BitSet::new(db.meta.pgid);
        c.reachable.set(0);
        c.reachable.set(1);
        let fl = db.meta.freelist;
        if fl != NO_FREELIST {
            let hwm = db.meta.pgid;
            if fl < 2 || fl >= hwm {
                return Err(
                    db.corrupt(db.meta_loc(), format!("meta freelist page {fl} is outside the data pages [2, {hwm})"))
                );
            }
            let p = db.page(fl)?;
            if p.flags != FLAG_FREELIST {
                return Err(db.corrupt(p.loc, format!("page type is {}, expected freelist", flags_name(p.flags))));
            }
            for i in 0..=u64::from(p.overflow) {
                c.reachable.set(fl + i);
            }
            let (first, count) = if p.count == 0xFFFF {
                let n = le_u64(p.buf, PAGE_HEADER_SIZE)
                    .ok_or_else(|| db.corrupt(p.loc, "freelist count lies outside the page"))?;
                (1u64, n)
            } else {
                (0u64, u64::from(p.count))
            };
            let end = first
                .checked_add(count)
                .and_then(|n| n.checked_mul(8))
                .and_then(|n| n.checked_add(PAGE_HEADER_SIZE as u64));
            if end.is_none_or(|e| e > p.buf.len() as u64) {
                return Err(db.corrupt(
                    p.loc,
                    format!("freelist of {count} ids does not fit in the page ({} bytes)", p.buf.len()),
                ));
            }
            for i in first..first + count {
                let id = le_u64(p.buf, PAGE_HEADER_SIZE + (i as usize) * 8).unwrap_or(0);
                if id < 2 || id >= hwm {
                    return Err(
                        db.corrupt(p.loc, format!("freelist lists page {id}, outside the data pages [2, {hwm})"))
                    );
                }
                if c.freed.get(id) {
                    return Err(db.corrupt(p.loc, format!("freelist lists page {id} twice")));
                }
                c.freed.set(id);
            }
            c.freelist_loaded = true;
        }
        Ok(c)
    }

    fn bare(db: &'a Db) -> Checker<'a> {
        Checker {
            db,
            reachable: BitSet::new(db.meta.pgid),
            freed: BitSet::new(0),
            freelist_loaded: false,
            depth: 0,
            elements_left: db.image_len() / ELEMENT_SIZE as u64,
            bytes_left: db.image_len(),
        }
    }

    /// After all buckets were walked: with a persisted freelist every page
    /// below the high-water mark must be either reachable or free.
    pub fn finish(self) -> Result<(), BoltError> {
        if !self.freelist_loaded {
            return Ok(());
        }
        let hwm = self.db.meta.pgid;
        for (wi, (r, f)) in self.reachable.words.iter().zip(&self.freed.words).enumerate() {
            let missing = !(r | f);
            if missing == 0 {
                continue;
            }
            let id = wi as u64 * 64 + u64::from(missing.trailing_zeros());
            if id < hwm {
                return Err(self.db.corrupt_at(id, "page is neither reachable nor in the freelist".into()));
            }
        }
        Ok(())
    }

    /// Checks a bucket and, recursively, all buckets nested in it.
    pub fn check_bucket(&mut self, b: &Bucket<'a>) -> Result<(), BoltError> {
        self.walk_bucket(b, &mut |c: &mut Checker<'a>, _k, v| match v {
            Value::Bucket(sub) => c.check_bucket(&sub),
            Value::Data(_) => Ok(()),
        })
    }

    /// Walks bucket `b` in key order, checking every page it owns, and calls
    /// `visit` for each of its elements. Nested buckets are only checked if
    /// `visit` descends into them (e.g. via [`Checker::check_bucket`]).
    pub fn walk_bucket<E: From<BoltError>>(&mut self, b: &Bucket<'a>, visit: &mut Visitor<'_, 'a, E>) -> Result<(), E> {
        let db = self.db;
        if self.depth >= MAX_DEPTH {
            return Err(db.corrupt(b.loc, format!("buckets nested deeper than {MAX_DEPTH} levels")).into());
        }
        self.depth += 1;
        let r = match b.inline {
            Some(bytes) => match db.inline_page(bytes, b.loc) {
                Ok(p) => self.walk_leaf(p, None, None, visit).map(|_| ()),
                Err(e) => Err(e.into()),
            },
            None => self.walk_page(b.header.root, b.loc, None, None, visit).map(|_| ()),
        };
        self.depth -= 1;
        r
    }

    fn charge(&mut self, loc: Loc, bytes: usize) -> Result<(), BoltError> {
        match (self.elements_left.checked_sub(1), self.bytes_left.checked_sub(bytes as u64)) {
            (Some(e), Some(b)) => {
                self.elements_left = e;
                self.bytes_left = b;
                Ok(())
            }
            _ => Err(self
                .db
                .corrupt(loc, "elements overlap: the walk found more elements or key/value bytes than the file holds")),
        }
    }

    fn check_order(
        &self,
        loc: Loc,
        kind: &str,
        i: usize,
        key: &[u8],
        prev: Option<&[u8]>,
        max: Option<&[u8]>,
    ) -> Result<(), BoltError> {
        if let Some(prev) = prev {
            if i == 0 && prev > key {
                return Err(self.db.corrupt(
                    loc,
                    format!(
                        "first {kind} key {} is below its key {} in the parent branch",
                        show_key(key),
                        show_key(prev)
                    ),
                ));
            }
            if i > 0 && prev >= key {
                return Err(self.db.corrupt(
                    loc,
                    format!(
                        "{kind} key[{i}] {} is not greater than the preceding key {}",
                        show_key(key),
                        show_key(prev)
                    ),
                ));
            }
        }
        if let Some(max) = max {
            if key >= max {
                return Err(self.db.corrupt(
                    loc,
                    format!(
                        "{kind} key[{i}] {} is not below the next key {} in the parent branch",
                        show_key(key),
                        show_key(max)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Walks the subtree rooted at `pgid`; returns the largest key seen.
    fn walk_page<E: From<BoltError>>(
        &mut self,
        pgid: u64,
        from: Loc,
        min: Option<&'a [u8]>,
        max: Option<&'a [u8]>,
        visit: &mut Visitor<'_, 'a, E>,
    ) -> Result<Option<&'a [u8]>, E> {
        let db = self.db;
        if self.depth >= MAX_DEPTH {
            return Err(db.corrupt(from, format!("b+tree deeper than {MAX_DEPTH} levels")).into());
        }
        let hwm = db.meta.pgid;
        if pgid < 2 || pgid >= hwm {
            return Err(db.corrupt(from, format!("references page {pgid}, outside the data pages [2, {hwm})")).into());
        }
        if self.reachable.get(pgid) {
            return Err(db.corrupt(from, format!("page {pgid} is referenced more than once")).into());
        }
        let p = db.page(pgid)?;
        for id in pgid..=pgid + u64::from(p.overflow) {
            if self.reachable.get(id) {
                return Err(db.corrupt(from, format!("page {id} is referenced more than once")).into());
            }
            if self.freed.get(id) {
                return Err(db.corrupt_at(id, "page is reachable but listed in the freelist".into()).into());
            }
            self.reachable.set(id);
        }
        self.depth += 1;
        let r = match p.flags {
            FLAG_BRANCH => self.walk_branch(p, min, max, visit),
            FLAG_LEAF => self.walk_leaf(p, min, max, visit),
            f => Err(db.corrupt(p.loc, format!("page type is {}, expected branch or leaf", flags_name(f))).into()),
        };
        self.depth -= 1;
        r
    }

    fn walk_branch<E: From<BoltError>>(
        &mut self,
        p: Page<'a>,
        min: Option<&'a [u8]>,
        max: Option<&'a [u8]>,
        visit: &mut Visitor<'_, 'a, E>,
    ) -> Result<Option<&'a [u8]>, E> {
        let db = self.db;
        p.check_count().map_err(|d| db.corrupt(p.loc, d))?;
        let n = usize::from(p.count);
        if n == 0 {
            return Err(db.corrupt(p.loc, "branch page has no elements").into());
        }
        let mut running = min;
        let mut last = None;
        let (mut key, mut child) = p.branch(0).map_err(|d| db.corrupt(p.loc, d))?;
        for i in 0..n {
            self.charge(p.loc, key.len())?;
            self.check_order(p.loc, "branch", i, key, running, max)?;
            let next = if i + 1 < n { Some(p.branch(i + 1).map_err(|d| db.corrupt(p.loc, d))?) } else { None };
            let upper = next.map(|(k, _)| k).or(max);
            let sub_max = self.walk_page(child, p.loc, Some(key), upper, visit)?;
            last = sub_max.or(Some(key));
            running = last;
            if let Some((k, c)) = next {
                key = k;
                child = c;
            }
        }
        Ok(last)
    }

    fn walk_leaf<E: From<BoltError>>(
        &mut self,
        p: Page<'a>,
        min: Option<&'a [u8]>,
        max: Option<&'a [u8]>,
        visit: &mut Visitor<'_, 'a, E>,
    ) -> Result<Option<&'a [u8]>, E> {
        let db = self.db;
        p.check_count().map_err(|d| db.corrupt(p.loc, d))?;
        let mut running = min;
        for i in 0..usize::from(p.count) {
            let (flags, key, value) = p.leaf(i).map_err(|d| db.corrupt(p.loc, d))?;
            let data_len = if flags & LEAF_FLAG_BUCKET != 0 { 0 } else { value.len() };
            self.charge(p.loc, key.len() + data_len)?;
            self.check_order(p.loc, "leaf", i, key, running, max)?;
            running = Some(key);
            let v = if flags & LEAF_FLAG_BUCKET != 0 {
                Value::Bucket(db.bucket_from_value(key, value, p.loc)?)
            } else {
                Value::Data(value)
            };
            visit(self, key, v)?;
        }
        Ok(running.filter(|_| p.count > 0))
    }
}

/// Builder of small synthetic bbolt images, for tests only.
#[cfg(test)]
pub(crate) mod testdb {
    use super::*;

    pub(crate) struct Builder {
        pub ps: usize,
        pub pages: Vec<Vec<u8>>,
    }

    fn header(id: u64, flags: u16, count: u16, overflow: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(PAGE_HEADER_SIZE);
        h.extend_from_slice(&id.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        h.extend_from_slice(&overflow.to_le_bytes());
        h
    }

    /// Encodes a leaf page body (header + elements + data), unpadded.
    pub(crate) fn leaf_bytes(id: u64, elems: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
        let n = elems.len();
        let mut out = header(id, FLAG_LEAF, n as u16, 0);
        let mut data = Vec::new();
        for (i, (flags, k, v)) in elems.iter().enumerate() {
            let eo = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
            let pos = PAGE_HEADER_SIZE + n * ELEMENT_SIZE + data.len() - eo;
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&(pos as u32).to_le_bytes());
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            data.extend_from_slice(k);
            data.extend_from_slice(v);
        }
        out.extend_from_slice(&data);
        out
    }

    fn branch_bytes(id: u64, elems: &[(&[u8], u64)]) -> Vec<u8> {
        let n = elems.len();
        let mut out = header(id, FLAG_BRANCH, n as u16, 0);
        let mut data = Vec::new();
        for (i, (k, pgid)) in elems.iter().enumerate() {
            let eo = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
            let pos = PAGE_HEADER_SIZE + n * ELEMENT_SIZE + data.len() - eo;
            out.extend_from_slice(&(pos as u32).to_le_bytes());
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&pgid.to_le_bytes());
            data.extend_from_slice(k);
        }
        out.extend_from_slice(&data);
        out
    }

    /// Value of a bucket element: header plus optional inline leaf page.
    pub(crate) fn bucket_value(root: u64, seq: u64, inline: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
        let mut v = root.to_le_bytes().to_vec();
        v.extend_from_slice(&seq.to_le_bytes());
        if root == 0 {
            v.extend_from_slice(&leaf_bytes(0, inline));
        }
        v
    }

    impl Builder {
        pub(crate) fn new(ps: usize) -> Builder {
            Builder { ps, pages: vec![vec![0; ps], vec![0; ps]] }
        }

        /// Stores `body` (whose header id is patched) at the next free page id.
        pub(crate) fn put(&mut self, mut body: Vec<u8>) -> u64 {
            let id = self.pages.len() as u64;
            let span = body.len().div_ceil(self.ps).max(1);
            body[0..8].copy_from_slice(&id.to_le_bytes());
            body[12..16].copy_from_slice(&((span - 1) as u32).to_le_bytes());
            body.resize(span * self.ps, 0);
            for chunk in body.chunks(self.ps) {
                self.pages.push(chunk.to_vec());
            }
            id
        }

        pub(crate) fn leaf(&mut self, elems: &[(u32, &[u8], &[u8])]) -> u64 {
            self.put(leaf_bytes(0, elems))
        }

        pub(crate) fn branch(&mut self, elems: &[(&[u8], u64)]) -> u64 {
            self.put(branch_bytes(0, elems))
        }

        pub(crate) fn freelist(&mut self, ids: &[u64]) -> u64 {
            let mut b = header(0, FLAG_FREELIST, ids.len() as u16, 0);
            for id in ids {
                b.extend_from_slice(&id.to_le_bytes());
            }
            self.put(b)
        }

        pub(crate) fn meta_bytes(&self, id: u64, root: u64, freelist: u64, txid: u64) -> Vec<u8> {
            let mut m = header(id, FLAG_META, 0, 0);
            m.extend_from_slice(&MAGIC.to_le_bytes());
            m.extend_from_slice(&VERSION.to_le_bytes());
            m.extend_from_slice(&(self.ps as u32).to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&root.to_le_bytes());
            m.extend_from_slice(&0u64.to_le_bytes());
            m.extend_from_slice(&freelist.to_le_bytes());
            m.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
            m.extend_from_slice(&txid.to_le_bytes());
            let sum = fnv1a64(&m[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + META_CHECKSUM_OFFSET]);
            m.extend_from_slice(&sum.to_le_bytes());
            m.resize(self.ps, 0);
            m
        }

        /// The image: meta 0 (txid) and meta 1 (txid - 1) both pointing at `root`.
        pub(crate) fn finish(&self, root: u64, freelist: u64) -> Vec<u8> {
            let mut out = self.meta_bytes(0, root, freelist, 10);
            out.extend_from_slice(&self.meta_bytes(1, root, freelist, 9));
            for p in &self.pages[2..] {
                out.extend_from_slice(p);
            }
            out
        }
    }

    pub(crate) fn page_off(ps: usize, id: u64) -> usize {
        ps * id as usize
    }
}

#[cfg(test)]
mod tests {
    use super::testdb::*;
    use super::*;

    const PS: usize = 512;

    struct Sample {
        bytes: Vec<u8>,
        leaf_b1: u64,
        leaf_b2: u64,
        branch_b: u64,
        bucket_c: u64,
        root: u64,
    }

    /// root -> {"a": inline {k1,k2}, "b": branch -> 2 leaves (one overflowing), "c": leaf with nested inline "n"}
    fn sample() -> Sample {
        let mut b = Builder::new(PS);
        let big = vec![0xabu8; 1500];
        let leaf_b1 = b.leaf(&[(0, b"b1", b"x"), (0, b"b2", &big)]);
        let leaf_b2 = b.leaf(&[(0, b"b5", b"y"), (0, b"b6", b"z")]);
        let branch_b = b.branch(&[(b"b1", leaf_b1), (b"b5", leaf_b2)]);
        let nested = bucket_value(0, 3, &[(0, b"deep", b"v")]);
        let bucket_c = b.leaf(&[(0, b"c1", b"1"), (LEAF_FLAG_BUCKET, b"n", &nested)]);
        let a = bucket_value(0, 0, &[(0, b"k1", b"v1"), (0, b"k2", b"v2")]);
        let bv = bucket_value(branch_b, 7, &[]);
        let cv = bucket_value(bucket_c, 0, &[]);
        let root =
            b.leaf(&[(LEAF_FLAG_BUCKET, b"a", &a), (LEAF_FLAG_BUCKET, b"b", &bv), (LEAF_FLAG_BUCKET, b"c", &cv)]);
        Sample { bytes: b.finish(root, NO_FREELIST), leaf_b1, leaf_b2, branch_b, bucket_c, root }
    }

    fn open(bytes: Vec<u8>) -> Result<Db, BoltError> {
        Db::from_bytes("/t/snap.db", bytes, None)
    }

    fn check_err(bytes: Vec<u8>) -> String {
        match open(bytes).and_then(|db| db.check()) {
            Ok(()) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn reads_synthetic_database() {
        let s = sample();
        let db = open(s.bytes).unwrap();
        assert_eq!(db.page_size(), PS as u32);
        assert_eq!(db.meta().txid, 10);
        assert_eq!(db.meta_page(), 0);
        db.check().unwrap();
        let root = db.root();
        let mut names = Vec::new();
        root.for_each(|k, v| {
            assert!(matches!(v, Value::Bucket(_)));
            names.push(k.to_vec());
            Ok::<_, BoltError>(())
        })
        .unwrap();
        assert_eq!(names, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let a = root.bucket(b"a").unwrap().unwrap();
        assert!(a.is_inline());
        assert!(matches!(a.get(b"k2").unwrap(), Some(Value::Data(b"v2"))));
        assert!(a.get(b"k3").unwrap().is_none());
        let b = root.bucket(b"b").unwrap().unwrap();
        assert_eq!(b.sequence(), 7);
        let mut keys = Vec::new();
        b.for_each(|k, _| {
            keys.push(k.to_vec());
            Ok::<_, BoltError>(())
        })
        .unwrap();
        assert_eq!(keys, vec![b"b1".to_vec(), b"b2".to_vec(), b"b5".to_vec(), b"b6".to_vec()]);
        match b.get(b"b2").unwrap() {
            Some(Value::Data(v)) => assert_eq!(v.len(), 1500),
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.get(b"b6").unwrap(), Some(Value::Data(b"z"))));
        assert!(b.get(b"b0").unwrap().is_none());
        assert!(b.get(b"b3").unwrap().is_none());
        let n = root.bucket(b"c").unwrap().unwrap().bucket(b"n").unwrap().unwrap();
        assert_eq!(n.sequence(), 3);
        assert!(matches!(n.get(b"deep").unwrap(), Some(Value::Data(b"v"))));
        assert!(root.bucket(b"zz").unwrap().is_none());
    }

    #[test]
    fn falls_back_to_the_other_meta() {
        let s = sample();
        // Corrupt meta 0's checksummed area: meta 1 (txid 9) is used.
        let mut bytes = s.bytes.clone();
        bytes[PAGE_HEADER_SIZE + 48] ^= 1;
        let db = open(bytes).unwrap();
        assert_eq!(db.meta_page(), 1);
        assert_eq!(db.meta().txid, 9);
        db.check().unwrap();
        // Destroy meta 0 entirely: the page size is found by probing.
        let mut bytes = s.bytes.clone();
        bytes[..PS].fill(0);
        let db = open(bytes).unwrap();
        assert_eq!((db.meta_page(), db.page_size()), (1, PS as u32));
        db.check().unwrap();
        // Meta 1 broken, meta 0 fine.
        let mut bytes = s.bytes;
        bytes[PS + PAGE_HEADER_SIZE] ^= 0xff;
        let db = open(bytes).unwrap();
        assert_eq!(db.meta_page(), 0);
    }

    #[test]
    fn rejects_files_that_are_not_bbolt() {
        for bytes in
            [vec![], vec![0u8; 10], vec![0u8; 1 << 16], (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect()]
        {
            let e = open(bytes).unwrap_err().to_string();
            assert!(e.starts_with("snapshot /t/snap.db is not a bbolt database: "), "{e}");
        }
        let mut bytes = sample().bytes;
        bytes[PAGE_HEADER_SIZE] ^= 0xff;
        bytes[PS + PAGE_HEADER_SIZE] ^= 0xff;
        let e = open(bytes).unwrap_err().to_string();
        assert!(e.contains("meta page 0: bad magic"), "{e}");
    }

    #[test]
    fn reports_truncation() {
        let bytes = sample().bytes;
        let len = bytes.len();
        let e = open(bytes[..len - 100].to_vec()).unwrap_err().to_string();
        let hwm = len / PS;
        assert_eq!(
            e,
            format!(
                "snapshot /t/snap.db is truncated: page {} (the last page below the meta high-water mark) ends at byte {len} past the end of the file (len {})",
                hwm - 1,
                len - 100
            )
        );
        for cut in 0..len {
            assert!(open(bytes[..cut].to_vec()).and_then(|db| db.check()).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn detects_bad_references() {
        let s = sample();
        let ps = PS;
        // Branch element 1 of bucket b points to page 0.
        let mut bytes = s.bytes.clone();
        put_u64(&mut bytes, page_off(ps, s.branch_b) + 16 + 16 + 8, 0);
        let e = check_err(bytes);
        assert!(e.contains(&format!("page {} (byte offset {})", s.branch_b, s.branch_b as usize * ps)), "{e}");
        assert!(e.contains("references page 0, outside the data pages"), "{e}");
        // ... to itself (cycle).
        let mut bytes = s.bytes.clone();
        put_u64(&mut bytes, page_off(ps, s.branch_b) + 16 + 16 + 8, s.branch_b);
        let e = check_err(bytes);
        assert!(e.contains("referenced more than once"), "{e}");
        // ... to the first leaf again (shared page).
        let mut bytes = s.bytes.clone();
        put_u64(&mut bytes, page_off(ps, s.branch_b) + 16 + 16 + 8, s.leaf_b1);
        assert!(check_err(bytes).contains(&format!("page {} is referenced more than once", s.leaf_b1)));
        // ... past the high-water mark.
        let mut bytes = s.bytes.clone();
        put_u64(&mut bytes, page_off(ps, s.branch_b) + 16 + 16 + 8, 1 << 40);
        assert!(check_err(bytes).contains("references page 1099511627776, outside"));
        // Page header id disagrees.
        let mut bytes = s.bytes.clone();
        put_u64(&mut bytes, page_off(ps, s.leaf_b2), 999);
        let e = check_err(bytes);
        assert!(
            e.contains(&format!("page {} (byte offset", s.leaf_b2)) && e.contains("page header says it is page 999"),
            "{e}"
        );
        // Overflow past the high-water mark.
        let mut bytes = s.bytes.clone();
        let o = page_off(ps, s.leaf_b2) + 12;
        bytes[o..o + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(check_err(bytes).contains("extends past the high-water mark"));
        // Wrong page type for a child.
        let mut bytes = s.bytes.clone();
        let o = page_off(ps, s.leaf_b2) + 8;
        bytes[o..o + 2].copy_from_slice(&FLAG_FREELIST.to_le_bytes());
        assert!(check_err(bytes).contains("page type is freelist, expected branch or leaf"));
        // Root page id out of range in the meta.
        let b = Builder::new(ps);
        let mut bytes = b.finish(0, NO_FREELIST);
        bytes.extend(vec![0u8; ps]);
        let e = check_err(bytes);
        assert!(e.contains("page 0 (byte offset 0): references page 0"), "{e}");
    }

    #[test]
    fn detects_bad_counts_and_offsets() {
        let s = sample();
        let mut bytes = s.bytes.clone();
        let o = page_off(PS, s.leaf_b2) + 10;
        bytes[o..o + 2].copy_from_slice(&200u16.to_le_bytes());
        assert!(check_err(bytes).contains("element count 200 does not fit in the page (512 bytes)"));
        let mut bytes = s.bytes.clone();
        let o = page_off(PS, s.leaf_b2) + 16 + 12; // vsize of element 0
        bytes[o..o + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_err(bytes).contains("runs past the end of the page"));
        let mut bytes = s.bytes.clone();
        let o = page_off(PS, s.branch_b) + 10;
        bytes[o..o + 2].copy_from_slice(&0u16.to_le_bytes());
        assert!(check_err(bytes).contains("branch page has no elements"));
        // Bucket value too short to hold a bucket header: shrink "c"'s vsize.
        let mut bytes = s.bytes.clone();
        let o = page_off(PS, s.root) + 16 + 2 * 16 + 12;
        bytes[o..o + 4].copy_from_slice(&8u32.to_le_bytes());
        assert!(check_err(bytes).contains("shorter than the 16-byte bucket header"));
        // Inline page with a branch type.
        let mut bytes = s.bytes.clone();
        let o = page_off(PS, s.bucket_c);
        let pos = bytes.windows(4).skip(o).position(|w| w == b"deep").unwrap() + o;
        // The inline page header starts 16 (header) + 16 (1 element) + 0 bytes before "deep".
        let hdr = pos - 32;
        bytes[hdr + 8..hdr + 10].copy_from_slice(&FLAG_BRANCH.to_le_bytes());
        let e = check_err(bytes);
        assert!(
            e.contains(&format!("page {} (byte offset {hdr}): inline bucket page: page type is branch", s.bucket_c)),
            "{e}"
        );
    }

    #[test]
    fn detects_key_order_violations() {
        let mut b = Builder::new(PS);
        let leaf = b.leaf(&[(0, b"b", b""), (0, b"a", b"")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &bucket_value(leaf, 0, &[]))]);
        let e = check_err(b.finish(root, NO_FREELIST));
        assert!(e.contains("leaf key[1] 61 is not greater than the preceding key 62"), "{e}");

        let mut b = Builder::new(PS);
        let leaf = b.leaf(&[(0, b"a", b""), (0, b"a", b"")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &bucket_value(leaf, 0, &[]))]);
        assert!(check_err(b.finish(root, NO_FREELIST)).contains("is not greater than the preceding key"));

        // Child's first key below its branch key.
        let mut b = Builder::new(PS);
        let l1 = b.leaf(&[(0, b"a", b"")]);
        let l2 = b.leaf(&[(0, b"c", b"")]);
        let br = b.branch(&[(b"b", l1), (b"c", l2)]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &bucket_value(br, 0, &[]))]);
        assert!(check_err(b.finish(root, NO_FREELIST))
            .contains("first leaf key 61 is below its key 62 in the parent branch"));

        // Child's key not below the next branch key.
        let mut b = Builder::new(PS);
        let l1 = b.leaf(&[(0, b"a", b""), (0, b"d", b"")]);
        let l2 = b.leaf(&[(0, b"c", b"")]);
        let br = b.branch(&[(b"a", l1), (b"c", l2)]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &bucket_value(br, 0, &[]))]);
        assert!(check_err(b.finish(root, NO_FREELIST))
            .contains("leaf key[1] 64 is not below the next key 63 in the parent branch"));

        // Inline bucket out of order.
        let mut b = Builder::new(PS);
        let v = bucket_value(0, 0, &[(0, b"z", b""), (0, b"y", b"")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &v)]);
        assert!(check_err(b.finish(root, NO_FREELIST)).contains("inline bucket page: leaf key[1]"));
    }

    #[test]
    fn deep_chains_do_not_overflow_the_stack() {
        let mut b = Builder::new(PS);
        let mut child = b.leaf(&[(0, b"k", b"v")]);
        for _ in 0..(MAX_DEPTH + 50) {
            child = b.branch(&[(b"k", child)]);
        }
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &bucket_value(child, 0, &[]))]);
        let db = open(b.finish(root, NO_FREELIST)).unwrap();
        assert!(db.check().unwrap_err().to_string().contains("b+tree deeper than 256 levels"));
        let x = db.root().bucket(b"x").unwrap().unwrap();
        assert!(x.get(b"k").unwrap_err().to_string().contains("deeper than"));

        // Deeply nested inline buckets.
        let mut v = bucket_value(0, 0, &[(0, b"k", b"v")]);
        for _ in 0..(MAX_DEPTH + 10) {
            v = bucket_value(0, 0, &[(LEAF_FLAG_BUCKET, b"n", &v)]);
        }
        let mut b = Builder::new(PS);
        let root = b.put(leaf_bytes(0, &[(LEAF_FLAG_BUCKET, b"x", &v)]));
        let e = check_err(b.finish(root, NO_FREELIST));
        assert!(e.contains("buckets nested deeper than 256 levels"), "{e}");
    }

    #[test]
    fn persisted_freelist_is_checked() {
        let build = |free: &[u64], extra_unused: bool| {
            let mut b = Builder::new(PS);
            let leaf = b.leaf(&[(0, b"k", b"v")]);
            let unused = b.leaf(&[]);
            let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &bucket_value(leaf, 0, &[]))]);
            let fl = b.freelist(free);
            if extra_unused {
                b.leaf(&[]);
            }
            (b.finish(root, fl), leaf, unused)
        };
        // Page 3 is unused and listed as free.
        let (bytes, _, unused) = build(&[3], false);
        assert_eq!(unused, 3);
        open(bytes).unwrap().check().unwrap();
        // Not listed: unreachable.
        let (bytes, _, _) = build(&[], false);
        assert!(check_err(bytes).contains("page 3 (byte offset 1536): page is neither reachable nor in the freelist"));
        // An extra page at the end that nobody references.
        let (bytes, _, _) = build(&[3], true);
        assert!(check_err(bytes).contains("page 6 (byte offset 3072): page is neither reachable"));
        // A reachable page listed as free.
        let (bytes, leaf, _) = build(&[3, 2], false);
        assert_eq!(leaf, 2);
        assert!(check_err(bytes).contains("page 2 (byte offset 1024): page is reachable but listed in the freelist"));
        // Listed twice, out of range.
        assert!(check_err(build(&[3, 3], false).0).contains("freelist lists page 3 twice"));
        assert!(check_err(build(&[3, 77], false).0).contains("freelist lists page 77, outside the data pages"));
    }

    /// A leaf page whose `n` elements are all buckets sharing one value.
    fn shared_leaf(n: usize, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&FLAG_LEAF.to_le_bytes());
        out.extend_from_slice(&(n as u16).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let keys_start = PAGE_HEADER_SIZE + n * ELEMENT_SIZE;
        let keys_end = keys_start + n;
        for i in 0..n {
            let eo = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
            let ks = keys_end - (i + 1);
            out.extend_from_slice(&LEAF_FLAG_BUCKET.to_le_bytes());
            out.extend_from_slice(&((ks - eo) as u32).to_le_bytes());
            out.extend_from_slice(&((i + 1) as u32).to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        for j in (0..n).rev() {
            out.push(j as u8 + 1);
        }
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn overlapping_elements_cannot_cause_exponential_work() {
        // 20 levels of inline buckets, each level's 20 elements sharing one value:
        // 20^20 visits without the work budget.
        let mut value = bucket_value(0, 0, &[(0, b"k", b"v")]);
        for _ in 0..20 {
            let page = shared_leaf(20, &value);
            value = 0u64.to_le_bytes().to_vec();
            value.extend_from_slice(&0u64.to_le_bytes());
            value.extend_from_slice(&page);
        }
        let mut b = Builder::new(4096);
        let root = b.put(shared_leaf(20, &value));
        let bytes = b.finish(root, NO_FREELIST);
        let t = std::time::Instant::now();
        let e = check_err(bytes.clone());
        assert!(e.contains("elements overlap"), "{e}");
        let db = open(bytes).unwrap();
        let r = db.root().for_each(|_, v| {
            if let Value::Bucket(b) = v {
                Checker::bare(&db).check_bucket(&b)?;
            }
            Ok::<_, BoltError>(())
        });
        assert!(r.is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Exercises every public read path; must never panic.
    fn exercise(bytes: Vec<u8>) {
        let Ok(db) = open(bytes) else { return };
        let _ = db.check();
        let root = db.root();
        let _ = root.for_each(|k, v| {
            if let Value::Bucket(b) = v {
                let _ = b.for_each(|_, _| Ok::<_, BoltError>(()));
                let _ = b.get(k);
                let _ = b.get(b"b5");
            }
            Ok::<_, BoltError>(())
        });
        let _ = root.get(b"b");
    }

    #[test]
    fn byte_flips_never_panic() {
        let bytes = sample().bytes;
        for i in 0..bytes.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= x;
                exercise(b);
            }
        }
        // Pseudo-random multi-byte damage.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed % b.len() as u64) as usize;
                b[i] = (seed >> 32) as u8;
            }
            exercise(b);
        }
    }
}
