//! Writing a bbolt image, two ways:
//!
//! - [`append_commit`]: a few keys, committed as bbolt commits a transaction (copies of the
//!   touched pages appended, then a new meta in the other slot). Milliseconds on any size; only
//!   for the shapes it knows (appends to a paged bucket, any edit of an inline one), which is what
//!   the restore's revision bump needs.
//! - [`write_image`] / [`rewrite_file`]: every bucket and key of a [`Db`] copied into a new file
//!   with [`Edits`] applied on the way, the file replaced atomically (new file, fsync, check,
//!   rename, fsync of the directory). Any shape, any edit; it reads and writes the whole db.
//!
//! The bulk load writes each page once, in key order, bottom-up: leaves packed full as they fill,
//! then each branch level over the first keys of the level below, a nested bucket's pages before
//! the parent leaf that holds its header. The result is compacted and defragmented (what
//! `etcdutl defrag` makes), and it is checked with the reader before it replaces anything.
//! (The first version of the revision bump used it alone; on a 1.2 GiB db that cost 3.5 s, which
//! is why the append commit exists.)
//!
//! Layout of the result: pages 0 and 1 are the metas (same content, the source's txid + 1), page
//! 2 an empty freelist when the source persisted one (etcd may run without), then the data pages.
//! Empty buckets are written inline, as bbolt creates them; all others get their own pages.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub use super::commit::append_commit;
pub(super) use super::commit::{encode_freelist, merge_freelist};
use super::edits::KeyEdits;
pub use super::edits::{Edits, WriteError, Written, MAX_KEY_SIZE, MAX_VALUE_SIZE};
use super::layout::*;
use super::reader::{Bucket, Db, Value};
use super::BoltError;

/// A leaf element being collected: flags, key, value.
type Elem<'k> = (u32, &'k [u8], Cow<'k, [u8]>);
type OwnEdits<'k> = std::iter::Peekable<std::collections::btree_map::Iter<'k, Vec<u8>, Option<Vec<u8>>>>;
type ChildEdits<'k> = std::iter::Peekable<std::collections::btree_map::Iter<'k, Vec<u8>, KeyEdits>>;
/// An edit of the key the source holds next: the own edit (`Some(None)` deletes) and the edits
/// of the child bucket of that name.
type Hits<'k> = (Option<&'k Option<Vec<u8>>>, Option<&'k KeyEdits>);
/// One entry of [`dump`]: bucket path, key, and the value (`None` for a nested bucket, whose key
/// carries `#seq=N`).
pub type DumpEntry = (Vec<Vec<u8>>, Vec<u8>, Option<Vec<u8>>);

/// Writes `src` with `edits` applied into a new file `dest` (which must not exist), fsynced.
pub fn write_image(src: &Db, dest: &Path, edits: &Edits) -> Result<Written, WriteError> {
    write_image_emptying(src, dest, edits, &[])
}

/// [`write_image`], with the top-level buckets named in `emptied` written empty (their sequence
/// kept): an image of everything but, say, etcd's keys, whatever their size, in milliseconds.
pub fn write_image_emptying(src: &Db, dest: &Path, edits: &Edits, emptied: &[&[u8]]) -> Result<Written, WriteError> {
    edits.validate()?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| WriteError::Io { action: "create", path: dest.into(), source })?;
    let ps = src.page_size() as usize;
    let persist_freelist = src.meta().freelist != NO_FREELIST;
    let first_data = if persist_freelist { 3 } else { 2 };
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, file),
        path: dest.to_path_buf(),
        ps,
        next: first_data,
        scratch: Vec::new(),
        roots_seen: HashSet::new(),
        src_path: src.path().to_path_buf(),
        emptied: emptied.iter().map(|b| b.to_vec()).collect(),
    };
    // Metas and freelist are written last, over this placeholder.
    out.write(&vec![0u8; ps * first_data as usize])?;
    out.next = first_data;
    let root = out.bucket(Some(src.root()), Some(&edits.buckets), None, 0, true)?;
    let Root::Paged(root_page) = root else { unreachable!("the root bucket is always paged") };
    let pages = out.next;
    let mut head = Vec::with_capacity(ps * first_data as usize);
    let meta = Meta {
        magic: MAGIC,
        version: VERSION,
        page_size: ps as u32,
        flags: 0,
        root: BucketHeader { root: root_page, sequence: src.root().sequence() },
        freelist: if persist_freelist { 2 } else { NO_FREELIST },
        pgid: pages,
        txid: src.meta().txid.wrapping_add(1),
        checksum: 0,
    };
    for id in 0..2u64 {
        encode_page_header(&mut head, id, FLAG_META, 0, 0);
        head.extend_from_slice(&meta.encode());
        head.resize(ps * (id as usize + 1), 0);
    }
    if persist_freelist {
        encode_page_header(&mut head, 2, FLAG_FREELIST, 0, 0);
        head.resize(ps * 3, 0);
    }
    let io = |action, source| WriteError::Io { action, path: dest.to_path_buf(), source };
    let file = out.w.into_inner().map_err(|e| io("write", e.into_error()))?;
    std::os::unix::fs::FileExt::write_all_at(&file, &head, 0).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("fsync", e))?;
    Ok(Written { pages, size: pages * ps as u64 })
}

/// Replaces the bbolt file at `path` by its rewrite with `edits`: written beside it under a
/// temporary name, fsynced, checked with the reader, renamed over `path`, and the directory
/// fsynced. A crash at any point leaves `path` as it was or as it is meant to be, never torn; a
/// failure removes the temporary file.
pub fn rewrite_file(path: &Path, edits: &Edits) -> Result<Written, WriteError> {
    let src = Db::open(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.rewrite-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = write_image(&src, &tmp, edits).and_then(|w| {
        let new = Db::open(&tmp)?;
        new.check()?;
        Ok(w)
    });
    drop(src);
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let perms = std::fs::metadata(path).map(|m| m.permissions()).ok();
    if let Some(p) = perms {
        let _ = std::fs::set_permissions(&tmp, p);
    }
    std::fs::rename(&tmp, path).map_err(|source| WriteError::Io {
        action: "rename over",
        path: path.into(),
        source,
    })?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| WriteError::Io {
        action: "fsync",
        path: dir.into(),
        source,
    })?;
    Ok(written)
}

/// A written bucket: its own pages, or (empty) inline.
pub(super) enum Root {
    Paged(u64),
    Inline,
}

pub(super) struct Out {
    pub(super) w: BufWriter<File>,
    path: PathBuf,
    pub(super) ps: usize,
    /// Id of the next page written.
    pub(super) next: u64,
    scratch: Vec<u8>,
    /// Root pages of the source's buckets already copied: a page shared by two buckets (or a
    /// bucket nested in itself) is a corrupt source, refused before it multiplies the work.
    roots_seen: HashSet<u64>,
    src_path: PathBuf,
    /// Top-level buckets written without their contents ([`write_image_emptying`]).
    emptied: HashSet<Vec<u8>>,
}

/// The leaf being filled and the first keys of the leaves written so far.
struct Filling<'k> {
    elems: Vec<Elem<'k>>,
    size: usize,
    level: Vec<(&'k [u8], u64)>,
}

impl Out {
    /// Writes pages into `file` (at `path`, an image of page size `ps`) from page `next` on,
    /// sequentially: how a commit appends after the high-water mark.
    pub(super) fn append_to(file: File, path: &Path, ps: usize, next: u64) -> Result<Out, WriteError> {
        use std::io::Seek;
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(next * ps as u64)).map_err(|source| WriteError::Io {
            action: "seek",
            path: path.into(),
            source,
        })?;
        Ok(Out {
            w: BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            ps,
            next,
            scratch: Vec::new(),
            roots_seen: HashSet::new(),
            src_path: path.to_path_buf(),
            emptied: HashSet::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.w.write_all(bytes).map_err(|source| WriteError::Io { action: "write", path: self.path.clone(), source })
    }

    /// Writes a page of `size` unpadded bytes that `encode` appends given its id and overflow.
    pub(super) fn page(&mut self, size: usize, encode: impl FnOnce(&mut Vec<u8>, u64, u32)) -> Result<u64, WriteError> {
        let span = size.div_ceil(self.ps).max(1);
        let overflow = u32::try_from(span - 1).map_err(|_| WriteError::Edit("an element larger than 16 TiB".into()))?;
        let id = self.next;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        encode(&mut buf, id, overflow);
        debug_assert_eq!(buf.len(), size);
        buf.resize(span * self.ps, 0);
        let r = self.write(&buf);
        self.scratch = buf;
        r?;
        self.next += span as u64;
        Ok(id)
    }

    fn push<'k>(
        &mut self,
        f: &mut Filling<'k>,
        flags: u32,
        key: &'k [u8],
        value: Cow<'k, [u8]>,
    ) -> Result<(), WriteError> {
        let need = ELEMENT_SIZE + key.len() + value.len();
        if !f.elems.is_empty() && (f.size + need > self.ps || f.elems.len() == usize::from(u16::MAX)) {
            self.flush_leaf(f)?;
        }
        f.size += need;
        f.elems.push((flags, key, value));
        Ok(())
    }

    fn flush_leaf(&mut self, f: &mut Filling<'_>) -> Result<(), WriteError> {
        if f.elems.is_empty() {
            return Ok(());
        }
        let elems: Vec<(u32, &[u8], &[u8])> = f.elems.iter().map(|(fl, k, v)| (*fl, *k, v.as_ref())).collect();
        let id = self.page(f.size, |buf, id, ov| encode_leaf(buf, id, ov, &elems))?;
        f.level.push((f.elems[0].1, id));
        f.elems.clear();
        f.size = PAGE_HEADER_SIZE;
        Ok(())
    }

    /// Branch levels over `level` until one page is the root.
    fn branches(&mut self, mut level: Vec<(&[u8], u64)>) -> Result<u64, WriteError> {
        while level.len() > 1 {
            let mut next = Vec::new();
            let mut cur: Vec<(&[u8], u64)> = Vec::new();
            let mut size = PAGE_HEADER_SIZE;
            for (k, id) in level {
                let need = ELEMENT_SIZE + k.len();
                // At least two children per branch page, so every level is smaller than the last.
                if cur.len() >= 2 && (size + need > self.ps || cur.len() == usize::from(u16::MAX)) {
                    let page = self.page(size, |buf, pid, ov| encode_branch(buf, pid, ov, &cur))?;
                    next.push((cur[0].0, page));
                    cur.clear();
                    size = PAGE_HEADER_SIZE;
                }
                size += need;
                cur.push((k, id));
            }
            let page = self.page(size, |buf, pid, ov| encode_branch(buf, pid, ov, &cur))?;
            next.push((cur[0].0, page));
            level = next;
        }
        Ok(level[0].1)
    }

    /// Writes one bucket: the source's entries (when there is a source) merged with `own` edits,
    /// and, at the root, with the buckets that `children` edits (creating those the source lacks).
    pub(super) fn bucket<'k>(
        &mut self,
        src: Option<Bucket<'k>>,
        children: Option<&'k BTreeMap<Vec<u8>, KeyEdits>>,
        own: Option<&'k KeyEdits>,
        depth: u32,
        is_root: bool,
    ) -> Result<Root, WriteError> {
        if depth > MAX_DEPTH {
            return Err(WriteError::Source {
                detail: format!("buckets nested deeper than {MAX_DEPTH}"),
                path: self.src_path.clone(),
            });
        }
        let mut f = Filling { elems: Vec::new(), size: PAGE_HEADER_SIZE, level: Vec::new() };
        let mut own_iter = own.map(|o| o.iter().peekable());
        let mut child_iter = children.map(|c| c.iter().peekable());

        // Emits the edits (own keys and, at the root, new child buckets) ordered before `until`
        // (all of them with `None`); an edit of `until` itself is returned for the caller to apply.
        fn drain<'k>(
            out: &mut Out,
            f: &mut Filling<'k>,
            own_iter: &mut Option<OwnEdits<'k>>,
            child_iter: &mut Option<ChildEdits<'k>>,
            until: Option<&[u8]>,
            depth: u32,
        ) -> Result<Hits<'k>, WriteError> {
            let before = |k: &[u8]| until.is_none_or(|u| k < u);
            loop {
                let next_own = own_iter.as_mut().and_then(|i| i.peek().map(|(k, _)| k.as_slice()));
                let next_child = child_iter.as_mut().and_then(|i| i.peek().map(|(k, _)| k.as_slice()));
                let take_own = match (next_own, next_child) {
                    (Some(o), Some(c)) => o <= c,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                let k = if take_own { next_own } else { next_child }.expect("peeked");
                if !before(k) {
                    break;
                }
                if take_own {
                    let (k, v) = own_iter.as_mut().and_then(Iterator::next).expect("peeked");
                    if let Some(v) = v {
                        out.push(f, 0, k, Cow::Borrowed(v))?;
                    }
                } else {
                    let (k, e) = child_iter.as_mut().and_then(Iterator::next).expect("peeked");
                    let value = out.sub_bucket(None, Some(e), 0, depth + 1)?;
                    out.push(f, LEAF_FLAG_BUCKET, k, Cow::Owned(value))?;
                }
            }
            let Some(u) = until else { return Ok((None, None)) };
            let own_hit = match own_iter.as_mut().and_then(|i| i.peek()) {
                Some((k, _)) if k.as_slice() == u => own_iter.as_mut().and_then(Iterator::next).map(|(_, v)| v),
                _ => None,
            };
            let child_hit = match child_iter.as_mut().and_then(|i| i.peek()) {
                Some((k, _)) if k.as_slice() == u => child_iter.as_mut().and_then(Iterator::next).map(|(_, e)| e),
                _ => None,
            };
            Ok((own_hit, child_hit))
        }

        if let Some(src) = src {
            src.for_each(|k: &'k [u8], v: Value<'k>| -> Result<(), WriteError> {
                let (own_hit, child_hit) = drain(self, &mut f, &mut own_iter, &mut child_iter, Some(k), depth)?;
                match (v, own_hit) {
                    (Value::Data(_), Some(Some(new))) => self.push(&mut f, 0, k, Cow::Borrowed(new)),
                    (Value::Data(_), Some(None)) => Ok(()),
                    (Value::Data(d), None) => self.push(&mut f, 0, k, Cow::Borrowed(d)),
                    (Value::Bucket(_), Some(_)) => Err(WriteError::Edit(format!(
                        "key {} names a nested bucket, not a value",
                        String::from_utf8_lossy(k)
                    ))),
                    (Value::Bucket(b), None) => {
                        let src = Some(b).filter(|_| !(is_root && self.emptied.contains(k)));
                        let value = self.sub_bucket(src, child_hit, b.sequence(), depth + 1)?;
                        self.push(&mut f, LEAF_FLAG_BUCKET, k, Cow::Owned(value))
                    }
                }
            })?;
        }
        drain(self, &mut f, &mut own_iter, &mut child_iter, None, depth)?;
        self.flush_leaf(&mut f)?;
        if f.level.is_empty() {
            if !is_root {
                return Ok(Root::Inline);
            }
            let id = self.page(PAGE_HEADER_SIZE, |buf, id, ov| encode_leaf(buf, id, ov, &[]))?;
            return Ok(Root::Paged(id));
        }
        let level = std::mem::take(&mut f.level);
        Ok(Root::Paged(self.branches(level)?))
    }

    /// A nested bucket's pages, then the value its parent stores (header, inline page if empty).
    fn sub_bucket<'k>(
        &mut self,
        src: Option<Bucket<'k>>,
        own: Option<&'k KeyEdits>,
        sequence: u64,
        depth: u32,
    ) -> Result<Vec<u8>, WriteError> {
        if let Some(b) = src.filter(|b| !b.is_inline()) {
            if !self.roots_seen.insert(b.root_page()) {
                return Err(WriteError::Source {
                    detail: format!("page {} is the root of two buckets", b.root_page()),
                    path: self.src_path.clone(),
                });
            }
        }
        Ok(match self.bucket(src, None, own, depth, false)? {
            Root::Paged(root) => encode_bucket_value(root, sequence, &[]),
            Root::Inline => encode_bucket_value(0, sequence, &[]),
        })
    }
}

/// Every bucket and key of `db`, depth first in key order: `(bucket path, key, Some(value))` for
/// values, `(bucket path, name, None)` for nested buckets (with their sequence in the path entry).
pub fn dump(db: &Db) -> Result<Vec<DumpEntry>, BoltError> {
    dump_except(db, &[])
}

/// [`dump`] without the contents of the top-level buckets named in `skipped` (their own entry,
/// with its sequence, stays).
pub fn dump_except(db: &Db, skipped: &[&[u8]]) -> Result<Vec<DumpEntry>, BoltError> {
    fn walk(
        b: Bucket<'_>,
        path: &mut Vec<Vec<u8>>,
        skipped: &[&[u8]],
        out: &mut Vec<DumpEntry>,
    ) -> Result<(), BoltError> {
        b.for_each(|k, v| {
            match v {
                Value::Data(d) => out.push((path.clone(), k.to_vec(), Some(d.to_vec()))),
                Value::Bucket(child) => {
                    let mut tag = k.to_vec();
                    tag.extend_from_slice(format!("#seq={}", child.sequence()).as_bytes());
                    out.push((path.clone(), tag, None));
                    if !(path.is_empty() && skipped.contains(&k)) {
                        path.push(k.to_vec());
                        walk(child, path, skipped, out)?;
                        path.pop();
                    }
                }
            }
            Ok::<(), BoltError>(())
        })
    }
    let mut out = Vec::new();
    walk(db.root(), &mut Vec::new(), skipped, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testdb::{bucket_value, model_of, sample, Builder, Model, Rng};
    use super::*;

    fn empty_db(ps: usize) -> Db {
        let mut b = Builder::new(ps);
        let root = b.leaf(&[]);
        Db::from_bytes("empty.db", b.finish(root, NO_FREELIST), None).unwrap()
    }

    fn write(src: &Db, edits: &Edits) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.db");
        let w = write_image(src, &dest, edits).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), w.size);
        let db = Db::open(&dest).unwrap();
        db.check().unwrap_or_else(|e| panic!("the written image fails the check: {e}"));
        (dir, db)
    }

    #[test]
    fn random_trees_read_back_identically_after_any_number_of_rewrites() {
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let ps = [512usize, 1024, 4096][rng.below(3) as usize];
            let mut model = Model::new();
            let mut edits = Edits::default();
            for _ in 0..1 + rng.below(5) {
                let name = format!("b{}", rng.below(8)).into_bytes();
                let keys = rng.below(400);
                model.entry(name.clone()).or_default();
                if keys == 0 {
                    // An empty bucket: an edit that deletes nothing creates it.
                    edits.delete(&name, b"absent");
                }
                for _ in 0..keys {
                    let klen = 1 + rng.below(40) as usize;
                    let k = rng.bytes(klen);
                    // Mostly small values, some spanning several pages.
                    let vlen = if rng.below(20) == 0 { rng.below(3 * ps as u64) } else { rng.below(64) } as usize;
                    let v = rng.bytes(vlen);
                    edits.put(&name, &k, &v);
                    model.get_mut(&name).unwrap().insert(k, v);
                }
            }
            let (_d1, first) = write(&empty_db(ps), &edits);
            assert_eq!(model_of(&first), model, "seed {seed}: first write");

            // A second pass over the written image: deletes and replacements in place.
            let mut more = Edits::default();
            for (b, keys) in model.iter_mut() {
                let victims: Vec<Vec<u8>> = keys.keys().filter(|_| rng.below(3) == 0).cloned().collect();
                for k in victims {
                    if rng.below(2) == 0 {
                        more.delete(b, &k);
                        keys.remove(&k);
                    } else {
                        let vlen = rng.below(100) as usize;
                        let v = rng.bytes(vlen);
                        more.put(b, &k, &v);
                        keys.insert(k, v);
                    }
                }
            }
            let (_d2, second) = write(&first, &more);
            assert_eq!(model_of(&second), model, "seed {seed}: second write");
            // A rewrite without edits changes nothing a reader sees.
            let (_d3, third) = write(&second, &Edits::default());
            assert_eq!(dump(&third).unwrap(), dump(&second).unwrap(), "seed {seed}: plain rewrite");
        }
    }

    #[test]
    fn nested_inline_and_branching_buckets_are_copied_with_their_sequences() {
        let src = Db::from_bytes("sample.db", sample().bytes, None).unwrap();
        let mut edits = Edits::default();
        edits.put(b"a", b"k0", b"new").delete(b"b", b"b2").put(b"d", b"fresh", b"1").delete(b"e", b"none");
        let (_dir, out) = write(&src, &edits);
        let got = dump(&out).unwrap();
        let want = {
            let mut w = dump(&src).unwrap();
            w.retain(|(p, k, _)| !(p == &vec![b"b".to_vec()] && k == b"b2"));
            w.insert(1, (vec![b"a".to_vec()], b"k0".to_vec(), Some(b"new".to_vec())));
            w.push((vec![], b"d#seq=0".to_vec(), None));
            w.push((vec![b"d".to_vec()], b"fresh".to_vec(), Some(b"1".to_vec())));
            w.push((vec![], b"e#seq=0".to_vec(), None));
            w
        };
        assert_eq!(got, want);
        assert!(out.root().bucket(b"e").unwrap().unwrap().is_inline(), "an empty bucket stays inline");
        assert_eq!(out.root().bucket(b"c").unwrap().unwrap().bucket(b"n").unwrap().unwrap().sequence(), 3);
    }

    /// An etcd-shaped image: a paged `key` bucket (`leaves` leaves under one branch, or a lone
    /// leaf), an inline `meta` bucket, and a freelist when `freelist` lists pages.
    fn etcd_like(leaves: usize, free: &[u64]) -> (tempfile::TempDir, std::path::PathBuf) {
        let mut b = Builder::new(512);
        let mut level = Vec::new();
        let keys: Vec<Vec<u8>> = (0..leaves * 3).map(|i| format!("rev{i:04}").into_bytes()).collect();
        for chunk in keys.chunks(3) {
            let elems: Vec<(u32, &[u8], &[u8])> = chunk.iter().map(|k| (0, k.as_slice(), &b"value"[..])).collect();
            level.push((chunk[0].clone(), b.leaf(&elems)));
        }
        let key_root = if level.len() == 1 {
            level[0].1
        } else {
            let refs: Vec<(&[u8], u64)> = level.iter().map(|(k, id)| (k.as_slice(), *id)).collect();
            b.branch(&refs)
        };
        // Free pages the freelist lists: unused ones after the data.
        let spare: Vec<u64> = free.iter().map(|_| b.leaf(&[])).collect();
        let fl = if free.is_empty() { NO_FREELIST } else { b.freelist(&spare) };
        let kv = bucket_value(key_root, 0, &[]);
        let meta = bucket_value(0, 0, &[(0, b"consistent_index", b"12345678"), (0, b"term", b"00000001")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"key", &kv), (LEAF_FLAG_BUCKET, b"meta", &meta)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b.finish(root, fl)).unwrap();
        (dir, path)
    }

    #[test]
    fn an_append_commit_adds_keys_after_the_last_and_into_inline_buckets_with_a_valid_freelist() {
        for (leaves, free) in [(1, &[][..]), (4, &[][..]), (4, &[1u64, 2][..]), (1, &[7u64][..])] {
            let (_dir, path) = etcd_like(leaves, free);
            let before = dump(&Db::open(&path).unwrap()).unwrap();
            let mut edits = Edits::default();
            edits.put(b"key", b"rev9999", b"").put(b"meta", b"scheduledCompactRev", b"xyz");
            let w = append_commit(&path, &edits).unwrap().expect("an etcd-shaped db is committed in place");
            let db = Db::open(&path).unwrap();
            db.check().unwrap_or_else(|e| panic!("{leaves} leaves, free {free:?}: {e}"));
            assert_eq!(db.meta().pgid, w.pages);
            let mut want = before.clone();
            let last_key = want.iter().rposition(|(p, _, _)| p == &vec![b"key".to_vec()]).unwrap();
            want.insert(last_key + 1, (vec![b"key".to_vec()], b"rev9999".to_vec(), Some(Vec::new())));
            let meta_at = want.iter().position(|(p, k, _)| p == &vec![b"meta".to_vec()] && k == b"term").unwrap();
            want.insert(meta_at, (vec![b"meta".to_vec()], b"scheduledCompactRev".to_vec(), Some(b"xyz".to_vec())));
            assert_eq!(dump(&db).unwrap(), want, "{leaves} leaves, free {free:?}");
        }
    }

    /// The rightmost leaf is written from the map through a bounded buffer: a leaf of values
    /// larger than that buffer (and than a page) must come out byte for byte, each value whole
    /// and in its place, and the pages after it (ancestors, root, freelist) where the meta says.
    #[test]
    fn an_append_commit_copies_a_leaf_of_values_larger_than_its_write_buffer() {
        let mut b = Builder::new(4096);
        // Distinct, position-dependent bytes, so a shifted or swapped run is seen.
        let value = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
        };
        let big: Vec<(Vec<u8>, Vec<u8>)> = [
            (b"rev0001".to_vec(), value(300 << 10, 1)),
            (b"rev0002".to_vec(), value(700 << 10, 2)),
            (b"rev0003".to_vec(), value(5000, 3)),
        ]
        .into_iter()
        .collect();
        let first = b.leaf(&[(0, b"rev0000", b"small")]);
        let elems: Vec<(u32, &[u8], &[u8])> = big.iter().map(|(k, v)| (0, k.as_slice(), v.as_slice())).collect();
        let last = b.leaf(&elems);
        let key_root = b.branch(&[(b"rev0000", first), (b"rev0001", last)]);
        let spare = b.leaf(&[]);
        let fl = b.freelist(&[spare]);
        let kv = bucket_value(key_root, 0, &[]);
        let meta = bucket_value(0, 0, &[(0, b"consistent_index", b"12345678")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"key", &kv), (LEAF_FLAG_BUCKET, b"meta", &meta)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b.finish(root, fl)).unwrap();
        let before = dump(&Db::open(&path).unwrap()).unwrap();

        let mut edits = Edits::default();
        edits.put(b"key", b"rev0004", &value(1000, 4)).put(b"meta", b"term", b"00000002");
        let w = append_commit(&path, &edits).unwrap().expect("committed in place");

        let db = Db::open(&path).unwrap();
        db.check().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), w.size, "the file ends at the new high-water mark");
        let mut want = before;
        want.insert(5, (vec![b"key".to_vec()], b"rev0004".to_vec(), Some(value(1000, 4))));
        want.push((vec![b"meta".to_vec()], b"term".to_vec(), Some(b"00000002".to_vec())));
        assert_eq!(dump(&db).unwrap(), want);
    }

    #[test]
    fn an_append_commit_declines_what_it_does_not_handle() {
        let (_dir, path) = etcd_like(4, &[]);
        let before = std::fs::read(&path).unwrap();
        for edits in [
            Edits::default().put(b"key", b"rev0001x", b"").clone(), // not after the last key
            Edits::default().delete(b"key", b"rev0001").clone(),
            Edits::default().put(b"absent", b"k", b"v").clone(),
        ] {
            assert!(append_commit(&path, &edits).unwrap().is_none());
            assert_eq!(std::fs::read(&path).unwrap(), before, "a declined commit writes nothing");
        }
    }

    /// Issue 26.8: the freelist page was trusted as read. Each crafted one is declined (the
    /// caller rewrites the file, which does not read it) and nothing is written.
    #[test]
    fn an_append_commit_declines_a_freelist_that_fails_its_check() {
        let ps = 512;
        let set_u16 = |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let set_u64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        type Craft = Box<dyn Fn(&mut Vec<u8>, usize, &Meta)>;
        let cases: Vec<(&str, Craft)> = vec![
            ("not a freelist page", Box::new(move |b, fl, _| set_u16(b, fl + 8, FLAG_LEAF))),
            ("count beyond the page", Box::new(move |b, fl, _| set_u16(b, fl + 10, 0xFFFE))),
            (
                "a huge count in the first slot",
                Box::new(move |b, fl, _| {
                    set_u16(b, fl + 10, 0xFFFF);
                    set_u64(b, fl + 16, u64::MAX / 4);
                }),
            ),
            ("an id past the high-water mark", Box::new(move |b, fl, m| set_u64(b, fl + 16, m.pgid + 5))),
            ("a meta page id", Box::new(move |b, fl, _| set_u64(b, fl + 16, 1))),
            (
                "an id twice",
                Box::new(move |b, fl, _| {
                    let first = u64::from_le_bytes(b[fl + 16..fl + 24].try_into().unwrap());
                    set_u64(b, fl + 24, first);
                }),
            ),
            ("the root page, in use", Box::new(move |b, fl, m| set_u64(b, fl + 16, m.root.root))),
            ("the freelist page itself", Box::new(move |b, fl, m| set_u64(b, fl + 16, m.freelist))),
        ];
        for (what, craft) in cases {
            let (_dir, path) = etcd_like(4, &[1, 2]);
            let meta = *Db::open(&path).unwrap().meta();
            let mut bytes = std::fs::read(&path).unwrap();
            craft(&mut bytes, meta.freelist as usize * ps, &meta);
            std::fs::write(&path, &bytes).unwrap();
            let mut edits = Edits::default();
            edits.put(b"key", b"rev9999", b"");
            let got = append_commit(&path, &edits).unwrap();
            assert!(got.is_none(), "{what}: committed over a crafted freelist: {got:?}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{what}: a declined commit writes nothing");
        }
    }

    #[test]
    fn a_crash_before_the_meta_is_written_leaves_the_old_database() {
        // The appended pages without the new meta: what a crash between the two fsyncs leaves.
        let (_dir, path) = etcd_like(4, &[3]);
        let old = dump(&Db::open(&path).unwrap()).unwrap();
        let copy = path.with_extension("committed");
        std::fs::copy(&path, &copy).unwrap();
        let mut edits = Edits::default();
        edits.put(b"key", b"rev9999", b"");
        append_commit(&copy, &edits).unwrap().unwrap();
        let committed = std::fs::read(&copy).unwrap();
        let original = std::fs::read(&path).unwrap();
        let mut torn = committed.clone();
        let ps = 512;
        torn[..2 * ps].copy_from_slice(&original[..2 * ps]);
        std::fs::write(&copy, &torn).unwrap();
        let db = Db::open(&copy).unwrap();
        db.check().unwrap();
        assert_eq!(dump(&db).unwrap(), old);
    }

    #[test]
    fn a_key_that_names_a_nested_bucket_cannot_be_overwritten() {
        let mut b = Builder::new(512);
        let inner = bucket_value(0, 0, &[(0, b"x", b"1")]);
        let outer = b.leaf(&[(LEAF_FLAG_BUCKET, b"inner", &inner)]);
        let ov = bucket_value(outer, 0, &[]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"outer", &ov)]);
        let src = Db::from_bytes("n.db", b.finish(root, NO_FREELIST), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut edits = Edits::default();
        edits.put(b"outer", b"inner", b"value");
        let err = write_image(&src, &dir.path().join("o.db"), &edits).unwrap_err();
        assert!(err.to_string().contains("names a nested bucket"), "{err}");
    }

    #[test]
    fn a_page_shared_by_two_buckets_is_refused_instead_of_copied_twice() {
        let mut b = Builder::new(512);
        let leaf = b.leaf(&[(0, b"k", b"v")]);
        let v = bucket_value(leaf, 0, &[]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &v), (LEAF_FLAG_BUCKET, b"y", &v)]);
        let src = Db::from_bytes("shared.db", b.finish(root, NO_FREELIST), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = write_image(&src, &dir.path().join("o.db"), &Edits::default()).unwrap_err();
        assert!(err.to_string().contains("root of two buckets"), "{err}");
    }

    #[test]
    fn rewrite_file_replaces_the_file_and_leaves_no_temporary() {
        let mut b = Builder::new(4096);
        let root = b.leaf(&[]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b.finish(root, NO_FREELIST)).unwrap();
        let mut edits = Edits::default();
        edits.put(b"meta", b"k", b"v");
        rewrite_file(&path, &edits).unwrap();
        let db = Db::open(&path).unwrap();
        db.check().unwrap();
        assert!(matches!(db.root().bucket(b"meta").unwrap().unwrap().get(b"k").unwrap(), Some(Value::Data(b"v"))));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("db")]);
        // A refused edit leaves the file as it was and no temporary either.
        let before = std::fs::read(&path).unwrap();
        let mut bad = Edits::default();
        bad.put(b"meta", b"", b"v");
        assert!(rewrite_file(&path, &bad).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
