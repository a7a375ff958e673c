//! Opening an image (memory-mapped, or bytes) and reading it: [`Db`], [`Bucket`], [`Value`].

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::*;
use super::BoltError;

pub(super) enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// Drops the page-table entries of `range` (all of the map when `None`).
    pub(super) fn release(&self, range: Option<(usize, usize)>) {
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
pub(super) struct Loc {
    pub(super) page: u64,
    pub(super) offset: u64,
    pub(super) inline: bool,
}

/// A decoded page header plus the bytes of the whole page span.
#[derive(Clone, Copy)]
pub(super) struct Page<'a> {
    pub(super) loc: Loc,
    pub(super) flags: u16,
    pub(super) count: u16,
    pub(super) overflow: u32,
    pub(super) buf: &'a [u8],
}

impl<'a> Page<'a> {
    pub(super) fn check_count(&self) -> Result<(), String> {
        let need = usize::from(self.count).checked_mul(ELEMENT_SIZE).and_then(|n| n.checked_add(PAGE_HEADER_SIZE));
        match need {
            Some(n) if n <= self.buf.len() => Ok(()),
            _ => Err(format!("element count {} does not fit in the page ({} bytes)", self.count, self.buf.len())),
        }
    }

    pub(super) fn elem_range(&self, i: usize, pos: u32, ksize: u32, vsize: u32) -> Option<(usize, usize, usize)> {
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
    pub(super) fn branch(&self, i: usize) -> Result<(&'a [u8], u64), String> {
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
    pub(super) fn leaf(&self, i: usize) -> Result<(u32, &'a [u8], &'a [u8]), String> {
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

pub(super) fn show_key(k: &[u8]) -> String {
    if k.len() > KEY_SHOWN {
        format!("{}... ({} bytes)", hex::encode(&k[..KEY_SHOWN]), k.len())
    } else {
        hex::encode(k)
    }
}

pub(super) fn flags_name(flags: u16) -> String {
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
    pub(super) path: PathBuf,
    pub(super) backing: Backing,
    pub(super) image_len: usize,
    pub(super) page_size: u32,
    pub(super) meta: Meta,
    pub(super) meta_page: u64,
    /// Bytes of pages handed out by [`Db::page`] since the last release.
    pub(super) touched: AtomicU64,
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

    pub(super) fn from_backing(path: PathBuf, backing: Backing, image_len: Option<u64>) -> Result<Db, BoltError> {
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
    pub(super) fn read_metas(path: &Path, data: &[u8]) -> Result<(u32, Meta, u64), BoltError> {
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

    pub(super) fn validate_meta(&self) -> Result<(), BoltError> {
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

    /// Releases the resident pages under `s`, when `s` lies in the mapping (no-op otherwise).
    pub(super) fn release_slice(&self, s: &[u8]) {
        let base = self.backing.bytes().as_ptr() as usize;
        let start = s.as_ptr() as usize;
        if start >= base && start + s.len() <= base + self.backing.bytes().len() {
            self.backing.release(Some((start - base, s.len())));
        }
    }

    pub(super) fn note_touched(&self, bytes: usize) {
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

    pub(super) fn meta_loc(&self) -> Loc {
        Loc { page: self.meta_page, offset: self.meta_page * u64::from(self.page_size), inline: false }
    }

    pub(super) fn corrupt_at(&self, page: u64, detail: String) -> BoltError {
        BoltError::Corrupt {
            path: self.path.clone(),
            page,
            offset: page.saturating_mul(u64::from(self.page_size)),
            detail,
        }
    }

    pub(super) fn corrupt(&self, loc: Loc, detail: impl Into<String>) -> BoltError {
        let detail = detail.into();
        BoltError::Corrupt {
            path: self.path.clone(),
            page: loc.page,
            offset: loc.offset,
            detail: if loc.inline { format!("inline bucket page: {detail}") } else { detail },
        }
    }

    /// Byte offset of `s` inside the image (only meaningful for subslices of it).
    pub(super) fn offset_of(&self, s: &[u8]) -> u64 {
        (s.as_ptr() as usize).wrapping_sub(self.backing.bytes().as_ptr() as usize) as u64
    }

    /// Reads page `id` (with its overflow pages), validating id and bounds.
    pub(super) fn page(&self, id: u64) -> Result<Page<'_>, BoltError> {
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
    pub(super) fn inline_page<'a>(&'a self, bytes: &'a [u8], parent: Loc) -> Result<Page<'a>, BoltError> {
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

    pub(super) fn bucket_from_value<'a>(
        &'a self,
        key: &[u8],
        value: &'a [u8],
        loc: Loc,
    ) -> Result<Bucket<'a>, BoltError> {
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
    pub(super) db: &'a Db,
    pub(super) header: BucketHeader,
    pub(super) inline: Option<&'a [u8]>,
    /// Page holding the bucket header (for error messages).
    pub(super) loc: Loc,
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

    /// The bucket's root page (its inline page, or the page its header names).
    fn root_page_read(&self) -> Result<Page<'a>, BoltError> {
        let db = self.db;
        match self.inline {
            Some(bytes) => db.inline_page(bytes, self.loc),
            None if self.header.root < 2 => {
                Err(db.corrupt(self.loc, format!("bucket root page {} is not a data page", self.header.root)))
            }
            None => db.page(self.header.root),
        }
    }

    /// Looks up `key` in this bucket.
    pub fn get(&self, key: &[u8]) -> Result<Option<Value<'a>>, BoltError> {
        let db = self.db;
        let mut page = self.root_page_read()?;
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

    /// The greatest key of this bucket and its value, by the rightmost path (no full walk).
    pub fn last(&self) -> Result<Option<(&'a [u8], Value<'a>)>, BoltError> {
        let db = self.db;
        let mut page = self.root_page_read()?;
        for _ in 0..MAX_DEPTH {
            page.check_count().map_err(|d| db.corrupt(page.loc, d))?;
            let n = usize::from(page.count);
            match page.flags {
                FLAG_BRANCH if n > 0 => {
                    let (_, child) = page.branch(n - 1).map_err(|d| db.corrupt(page.loc, d))?;
                    if child < 2 {
                        return Err(db.corrupt(page.loc, format!("branch element {} points to page {child}", n - 1)));
                    }
                    page = db.page(child)?;
                }
                FLAG_BRANCH => return Err(db.corrupt(page.loc, "branch page has no elements")),
                FLAG_LEAF if n == 0 => return Ok(None),
                FLAG_LEAF => {
                    let (flags, k, v) = page.leaf(n - 1).map_err(|d| db.corrupt(page.loc, d))?;
                    return Ok(Some((
                        k,
                        if flags & LEAF_FLAG_BUCKET != 0 {
                            Value::Bucket(db.bucket_from_value(k, v, page.loc)?)
                        } else {
                            Value::Data(v)
                        },
                    )));
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
