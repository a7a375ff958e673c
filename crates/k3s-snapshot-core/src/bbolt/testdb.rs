//! Builder of small synthetic bbolt images, for tests only.

use super::*;

pub(crate) struct Builder {
    pub ps: usize,
    pub pages: Vec<Vec<u8>>,
}

fn header(id: u64, flags: u16, count: u16, overflow: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(PAGE_HEADER_SIZE);
    encode_page_header(&mut h, id, flags, count, overflow);
    h
}

/// Encodes a leaf page body (header + elements + data), unpadded.
pub(crate) fn leaf_bytes(id: u64, elems: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_leaf(&mut out, id, 0, elems);
    out
}

fn branch_bytes(id: u64, elems: &[(&[u8], u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_branch(&mut out, id, 0, elems);
    out
}

/// Value of a bucket element: header plus optional inline leaf page.
pub(crate) fn bucket_value(root: u64, seq: u64, inline: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
    encode_bucket_value(root, seq, inline)
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
        let meta = Meta {
            magic: MAGIC,
            version: VERSION,
            page_size: self.ps as u32,
            flags: 0,
            root: BucketHeader { root, sequence: 0 },
            freelist,
            pgid: self.pages.len() as u64,
            txid,
            checksum: 0,
        };
        let mut m = header(id, FLAG_META, 0, 0);
        m.extend_from_slice(&meta.encode());
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

/// Page size of [`sample`].
pub(crate) const SAMPLE_PS: usize = 512;

pub(crate) struct Sample {
    pub bytes: Vec<u8>,
    pub leaf_b1: u64,
    pub leaf_b2: u64,
    pub branch_b: u64,
    pub bucket_c: u64,
    pub root: u64,
}

/// root -> {"a": inline {k1,k2}, "b": branch -> 2 leaves (one overflowing), "c": leaf with nested inline "n"}
pub(crate) fn sample() -> Sample {
    let mut b = Builder::new(SAMPLE_PS);
    let big = vec![0xabu8; 1500];
    let leaf_b1 = b.leaf(&[(0, b"b1", b"x"), (0, b"b2", &big)]);
    let leaf_b2 = b.leaf(&[(0, b"b5", b"y"), (0, b"b6", b"z")]);
    let branch_b = b.branch(&[(b"b1", leaf_b1), (b"b5", leaf_b2)]);
    let nested = bucket_value(0, 3, &[(0, b"deep", b"v")]);
    let bucket_c = b.leaf(&[(0, b"c1", b"1"), (LEAF_FLAG_BUCKET, b"n", &nested)]);
    let a = bucket_value(0, 0, &[(0, b"k1", b"v1"), (0, b"k2", b"v2")]);
    let bv = bucket_value(branch_b, 7, &[]);
    let cv = bucket_value(bucket_c, 0, &[]);
    let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"a", &a), (LEAF_FLAG_BUCKET, b"b", &bv), (LEAF_FLAG_BUCKET, b"c", &cv)]);
    Sample { bytes: b.finish(root, NO_FREELIST), leaf_b1, leaf_b2, branch_b, bucket_c, root }
}

/// A small deterministic generator (xorshift64*), so failures replay from the seed.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// The model of an image with top-level buckets only: bucket → key → value.
pub(crate) type Model = std::collections::BTreeMap<Vec<u8>, std::collections::BTreeMap<Vec<u8>, Vec<u8>>>;

/// What `db` holds, as a [`Model`] (panics on a nested bucket).
pub(crate) fn model_of(db: &Db) -> Model {
    let mut m = Model::new();
    for (path, k, v) in super::writer::dump(db).unwrap() {
        match (path.as_slice(), v) {
            ([], None) => {
                let name = String::from_utf8_lossy(&k).split("#seq=").next().unwrap().as_bytes().to_vec();
                m.entry(name).or_default();
            }
            ([b], Some(v)) => {
                m.entry(b.clone()).or_default().insert(k, v);
            }
            other => panic!("unexpected entry {other:?}"),
        }
    }
    m
}
