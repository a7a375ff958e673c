//! The page format both the reader and the writer speak: constants, the meta structure with its
//! checksum, and little-endian field access. All integers on disk are little-endian.

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
pub const RESIDENT_WINDOW: u64 = 2 << 20;

pub(crate) const META_SIZE: usize = 64;
pub(crate) const META_CHECKSUM_OFFSET: usize = 56;
pub(crate) const ELEMENT_SIZE: usize = 16;
pub(crate) const MIN_PAGE_SIZE: u32 = (PAGE_HEADER_SIZE + META_SIZE) as u32;
pub(crate) const MAX_PAGE_SIZE: u32 = 1 << 28;
/// Longest key prefix shown (hex) in error messages.
pub(crate) const KEY_SHOWN: usize = 32;

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

pub(super) fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(super) fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

pub(super) fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> Option<u64> {
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

impl Meta {
    /// The 64 bytes of this meta (after the page header), with the checksum computed afresh.
    pub fn encode(&self) -> [u8; META_SIZE] {
        let mut b = [0u8; META_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.root.root.to_le_bytes());
        b[24..32].copy_from_slice(&self.root.sequence.to_le_bytes());
        b[32..40].copy_from_slice(&self.freelist.to_le_bytes());
        b[40..48].copy_from_slice(&self.pgid.to_le_bytes());
        b[48..56].copy_from_slice(&self.txid.to_le_bytes());
        let sum = fnv1a64(&b[..META_CHECKSUM_OFFSET]);
        b[META_CHECKSUM_OFFSET..].copy_from_slice(&sum.to_le_bytes());
        b
    }
}

/// Appends a page header.
pub(crate) fn encode_page_header(out: &mut Vec<u8>, id: u64, flags: u16, count: u16, overflow: u32) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&overflow.to_le_bytes());
}

/// Appends a leaf page (header, elements, then keys and values), unpadded. Each element's `pos`
/// counts from the element itself.
pub(crate) fn encode_leaf(out: &mut Vec<u8>, id: u64, overflow: u32, elems: &[(u32, &[u8], &[u8])]) {
    let start = out.len();
    let data = encode_leaf_head(out, id, overflow, elems);
    for (_, k, v) in elems {
        out.extend_from_slice(k);
        out.extend_from_slice(v);
    }
    debug_assert_eq!(out.len() - start, data);
}

/// Appends a leaf page's header and elements, without the keys and values that follow them;
/// returns the page's unpadded length once they are written after it, in order.
pub(crate) fn encode_leaf_head(out: &mut Vec<u8>, id: u64, overflow: u32, elems: &[(u32, &[u8], &[u8])]) -> usize {
    let n = elems.len();
    encode_page_header(out, id, FLAG_LEAF, n as u16, overflow);
    let mut data = PAGE_HEADER_SIZE + n * ELEMENT_SIZE;
    for (i, (flags, k, v)) in elems.iter().enumerate() {
        let pos = data - (PAGE_HEADER_SIZE + i * ELEMENT_SIZE);
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(pos as u32).to_le_bytes());
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        data += k.len() + v.len();
    }
    data
}

/// Appends a branch page (header, elements, then keys), unpadded.
pub(crate) fn encode_branch(out: &mut Vec<u8>, id: u64, overflow: u32, elems: &[(&[u8], u64)]) {
    let n = elems.len();
    encode_page_header(out, id, FLAG_BRANCH, n as u16, overflow);
    let mut data = PAGE_HEADER_SIZE + n * ELEMENT_SIZE;
    for (i, (k, pgid)) in elems.iter().enumerate() {
        let pos = data - (PAGE_HEADER_SIZE + i * ELEMENT_SIZE);
        out.extend_from_slice(&(pos as u32).to_le_bytes());
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&pgid.to_le_bytes());
        data += k.len();
    }
    for (k, _) in elems {
        out.extend_from_slice(k);
    }
}

/// A bucket element's value: the header, then for an inline bucket (`root == 0`) its leaf page.
pub(crate) fn encode_bucket_value(root: u64, sequence: u64, inline: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
    let mut v = root.to_le_bytes().to_vec();
    v.extend_from_slice(&sequence.to_le_bytes());
    if root == 0 {
        encode_leaf(&mut v, 0, 0, inline);
    }
    v
}
