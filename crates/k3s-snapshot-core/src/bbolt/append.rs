//! Appending keys at the right edge of one top-level bucket, streamed, committed as one bbolt
//! transaction ([`Appender`]): what a replay of etcd's changes into its `key` bucket is, since
//! that bucket is keyed by revision and a chain's events come in revision order.
//!
//! The old tree's right edge (its last leaf and the branch pages above it) is read once; the
//! stream of new keys continues that leaf, and each level keeps only the page it is filling, so
//! memory is a page per level whatever the number of keys. Pages are filled to `fill` of the page
//! size (etcd appends with bbolt's fill percent at 0.9), written after the old high-water mark as
//! they fill. Nothing of the old tree is modified: the pages of the old right edge, the root
//! bucket's leaf and the old freelist page are replaced by new copies and listed in the new
//! freelist (when the file keeps one). [`Appender::commit`] fsyncs the new pages and only then
//! writes a new meta into the other slot; until then the file reads exactly as before (a crash
//! leaves only unreferenced pages past the old end; an appender dropped uncommitted cuts them off).

use std::fs::File;
use std::path::{Path, PathBuf};

use super::commit::write_meta;
use super::layout::*;
use super::reader::Db;
use super::writer::{encode_freelist, merge_freelist, Edits, Out, Root, WriteError, Written};

/// A branch level being filled: its elements (first key of the child, child page), their
/// encoded size, and how many pages the level has written.
#[derive(Default)]
struct Level {
    elems: Vec<(Vec<u8>, u64)>,
    size: usize,
    written: u64,
}

/// Appends keys after the last key of a top-level bucket; see the module docs.
pub struct Appender {
    path: PathBuf,
    out: Out,
    bucket: Vec<u8>,
    sequence: u64,
    threshold: usize,
    leaf: Vec<(Vec<u8>, Vec<u8>)>,
    leaf_size: usize,
    /// Branch levels over the leaves, lowest first.
    levels: Vec<Level>,
    /// Pages of the old tree that the commit replaces.
    freed: Vec<u64>,
    last: Option<Vec<u8>>,
    original_len: u64,
    appended: u64,
    committed: bool,
}

/// Why a db cannot take an [`Appender`] (the caller uses a slower general path instead).
pub type Unsupported = String;

fn source(path: &Path, detail: String) -> WriteError {
    WriteError::Source { detail, path: path.into() }
}

impl Appender {
    /// Opens `path` to append to its top-level bucket `bucket`, filling pages to `fill` (0.5 to
    /// 1.0) of the page size. `Ok(Err(why))` when the image has a shape this does not handle: a
    /// root bucket over more than one leaf, no such bucket, a nested bucket inside it, or a
    /// persisted freelist that fails its check.
    pub fn open(path: &Path, bucket: &[u8], fill: f64) -> Result<Result<Appender, Unsupported>, WriteError> {
        let db = Db::open(path)?;
        let meta = *db.meta();
        let ps = db.page_size() as usize;
        if meta.freelist != NO_FREELIST {
            if let Err(e) = super::Checker::new(&db) {
                return Ok(Err(format!("its freelist fails its check: {e}")));
            }
        }
        let root = db.page(meta.root.root)?;
        if root.flags != FLAG_LEAF {
            return Ok(Err("its root bucket spans more than one page".into()));
        }
        let mut header = None;
        for i in 0..usize::from(root.count) {
            let (f, k, v) = root.leaf(i).map_err(|d| source(path, d))?;
            if k == bucket && f & LEAF_FLAG_BUCKET != 0 {
                header = Some(v);
            }
        }
        let Some(value) = header else {
            return Ok(Err(format!("it has no bucket {}", String::from_utf8_lossy(bucket))));
        };
        let root_pg = le_u64(value, 0).unwrap_or(0);
        let sequence = le_u64(value, 8).unwrap_or(0);
        let mut leaf = Vec::new();
        let mut levels = Vec::new();
        let mut freed = Vec::new();
        let nested = || Ok(Err(format!("its bucket {} holds a nested bucket", String::from_utf8_lossy(bucket))));
        if root_pg == 0 {
            let page = db.inline_page(value.get(BUCKET_HEADER_SIZE..).unwrap_or_default(), root.loc)?;
            for i in 0..usize::from(page.count) {
                let (f, k, v) = page.leaf(i).map_err(|d| source(path, d))?;
                if f & LEAF_FLAG_BUCKET != 0 {
                    return nested();
                }
                leaf.push((k.to_vec(), v.to_vec()));
            }
        } else {
            // The right edge, root first; the levels are kept lowest first.
            let mut id = root_pg;
            loop {
                let page = db.page(id)?;
                freed.extend(id..=id + u64::from(page.overflow));
                if freed.len() > MAX_DEPTH as usize * 64 {
                    return Err(source(path, "the right edge of the tree is deeper than bbolt allows".into()));
                }
                match page.flags {
                    FLAG_BRANCH if page.count > 0 => {
                        let n = usize::from(page.count);
                        let mut level = Level::default();
                        for i in 0..n - 1 {
                            let (k, c) = page.branch(i).map_err(|d| source(path, d))?;
                            level.size += ELEMENT_SIZE + k.len();
                            level.elems.push((k.to_vec(), c));
                        }
                        levels.insert(0, level);
                        id = page.branch(n - 1).map_err(|d| source(path, d))?.1;
                    }
                    FLAG_LEAF => {
                        for i in 0..usize::from(page.count) {
                            let (f, k, v) = page.leaf(i).map_err(|d| source(path, d))?;
                            if f & LEAF_FLAG_BUCKET != 0 {
                                return nested();
                            }
                            leaf.push((k.to_vec(), v.to_vec()));
                        }
                        break;
                    }
                    f => return Err(source(path, format!("page {id} of the bucket's right edge has flags {f:#x}"))),
                }
            }
        }
        for l in &mut levels {
            l.size += PAGE_HEADER_SIZE;
        }
        let last = leaf.last().map(|(k, _)| k.clone()).or_else(|| levels.first()?.elems.last().map(|(k, _)| k.clone()));
        let leaf_size = PAGE_HEADER_SIZE + leaf.iter().map(|(k, v)| ELEMENT_SIZE + k.len() + v.len()).sum::<usize>();
        drop(db);
        let io = |action: &'static str| move |source| WriteError::Io { action, path: path.to_path_buf(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io("open"))?;
        let original_len = file.metadata().map_err(io("stat"))?.len();
        let out = Out::append_to(file, path, ps, meta.pgid)?;
        let threshold = ((ps as f64) * fill.clamp(0.5, 1.0)) as usize;
        Ok(Ok(Appender {
            path: path.to_path_buf(),
            out,
            bucket: bucket.to_vec(),
            sequence,
            threshold,
            leaf,
            leaf_size,
            levels,
            freed,
            last,
            original_len,
            appended: 0,
            committed: false,
        }))
    }

    /// The bucket's last key before anything was appended, or the last appended one.
    pub fn last_key(&self) -> Option<&[u8]> {
        self.last.as_deref()
    }

    /// Keys appended so far.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Appends `key` (which must sort after every key of the bucket) with `value`.
    pub fn push(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), WriteError> {
        if key.is_empty() || key.len() > super::writer::MAX_KEY_SIZE {
            return Err(WriteError::Edit(format!("key of {} bytes", key.len())));
        }
        if self.last.as_ref().is_some_and(|l| key.as_slice() <= l.as_slice()) {
            return Err(WriteError::Edit(format!(
                "key {} does not sort after the bucket's last key {}",
                hex::encode(&key),
                hex::encode(self.last.as_deref().unwrap_or_default())
            )));
        }
        let need = ELEMENT_SIZE + key.len() + value.len();
        if !self.leaf.is_empty() && (self.leaf_size + need > self.threshold || self.leaf.len() == usize::from(u16::MAX))
        {
            self.flush_leaf()?;
        }
        self.leaf_size += need;
        self.last = Some(key.clone());
        self.leaf.push((key, value));
        self.appended += 1;
        Ok(())
    }

    fn flush_leaf(&mut self) -> Result<(), WriteError> {
        if self.leaf.is_empty() {
            return Ok(());
        }
        let refs: Vec<(u32, &[u8], &[u8])> = self.leaf.iter().map(|(k, v)| (0, k.as_slice(), v.as_slice())).collect();
        let id = self.out.page(self.leaf_size, |buf, id, ov| encode_leaf(buf, id, ov, &refs))?;
        let first = std::mem::take(&mut self.leaf[0].0);
        self.leaf.clear();
        self.leaf_size = PAGE_HEADER_SIZE;
        self.push_branch(0, first, id)
    }

    fn push_branch(&mut self, level: usize, key: Vec<u8>, child: u64) -> Result<(), WriteError> {
        while self.levels.len() <= level {
            self.levels.push(Level { size: PAGE_HEADER_SIZE, ..Level::default() });
        }
        let need = ELEMENT_SIZE + key.len();
        let l = &self.levels[level];
        // At least two children per branch page, so every level is smaller than the one below.
        if l.elems.len() >= 2 && (l.size + need > self.threshold || l.elems.len() == usize::from(u16::MAX)) {
            self.flush_branch(level)?;
        }
        let l = &mut self.levels[level];
        l.size += need;
        l.elems.push((key, child));
        Ok(())
    }

    fn flush_branch(&mut self, level: usize) -> Result<(), WriteError> {
        let l = &mut self.levels[level];
        let elems = std::mem::take(&mut l.elems);
        let size = std::mem::replace(&mut l.size, PAGE_HEADER_SIZE);
        l.written += 1;
        let refs: Vec<(&[u8], u64)> = elems.iter().map(|(k, c)| (k.as_slice(), *c)).collect();
        let id = self.out.page(size, |buf, id, ov| encode_branch(buf, id, ov, &refs))?;
        let first = elems.into_iter().next().map(|(k, _)| k).unwrap_or_default();
        self.push_branch(level + 1, first, id)
    }

    /// Writes what is still being filled, the new root bucket leaf (with `others`, puts and
    /// deletes of other top-level buckets, applied: an inline bucket re-encoded, a paged one
    /// written anew) and the freelist, fsyncs, then writes the new meta and fsyncs again.
    pub fn commit(mut self, others: &Edits) -> Result<Written, WriteError> {
        let path = self.path.clone();
        self.flush_leaf()?;
        let mut i = 0;
        let root = loop {
            let Some(l) = self.levels.get(i) else {
                // Nothing at all: an empty bucket (only when nothing was there or appended).
                break self.out.page(PAGE_HEADER_SIZE, |buf, id, ov| encode_leaf(buf, id, ov, &[]))?;
            };
            if i + 1 == self.levels.len() && l.written == 0 && l.elems.len() == 1 {
                break l.elems[0].1;
            }
            if !l.elems.is_empty() {
                self.flush_branch(i)?;
            }
            i += 1;
        };
        let db = Db::open(&path)?;
        let meta = *db.meta();
        let rootp = db.page(meta.root.root)?;
        let mut root_elems: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::new();
        for i in 0..usize::from(rootp.count) {
            let (f, k, v) = rootp.leaf(i).map_err(|d| source(&path, d))?;
            root_elems.push((f, k.to_vec(), v.to_vec()));
        }
        let mut freed = std::mem::take(&mut self.freed);
        freed.extend(meta.root.root..=meta.root.root + u64::from(rootp.overflow));
        let find = |elems: &[(u32, Vec<u8>, Vec<u8>)], name: &[u8]| {
            elems
                .iter()
                .position(|(f, k, _)| k == name && f & LEAF_FLAG_BUCKET != 0)
                .ok_or_else(|| WriteError::Edit(format!("the image has no bucket {}", String::from_utf8_lossy(name))))
        };
        let at = find(&root_elems, &self.bucket)?;
        root_elems[at].2 = encode_bucket_value(root, self.sequence, &[]);
        for (name, keys) in &others.buckets {
            if name == &self.bucket {
                return Err(WriteError::Edit("the appended bucket cannot be edited in the same commit".into()));
            }
            let at = find(&root_elems, name)?;
            let b = db.root().bucket(name)?.ok_or_else(|| WriteError::Edit("bucket vanished".into()))?;
            let mut nested = false;
            b.for_each(|_, v| -> Result<(), WriteError> {
                nested |= matches!(v, super::Value::Bucket(_));
                Ok(())
            })?;
            if nested {
                return Err(WriteError::Edit(format!(
                    "bucket {} holds a nested bucket",
                    String::from_utf8_lossy(name)
                )));
            }
            if !b.is_inline() {
                collect_pages(&db, b.root_page(), &mut freed, 0)?;
            }
            let written = self.out.bucket(Some(b), None, Some(keys), 1, false)?;
            root_elems[at].2 = match written {
                Root::Paged(id) => encode_bucket_value(id, b.sequence(), &[]),
                Root::Inline => encode_bucket_value(0, b.sequence(), &[]),
            };
        }
        let refs: Vec<(u32, &[u8], &[u8])> =
            root_elems.iter().map(|(f, k, v)| (*f, k.as_slice(), v.as_slice())).collect();
        let size = PAGE_HEADER_SIZE + refs.iter().map(|(_, k, v)| ELEMENT_SIZE + k.len() + v.len()).sum::<usize>();
        let root_id = self.out.page(size, |buf, id, ov| encode_leaf(buf, id, ov, &refs))?;
        let ps = self.out.ps;
        let freelist = if meta.freelist == NO_FREELIST {
            NO_FREELIST
        } else {
            let ids = merge_freelist(&db, &path, freed)?
                .ok_or_else(|| source(&path, "its freelist lists a page in use".into()))?;
            let size = PAGE_HEADER_SIZE + 8 * (ids.len() + usize::from(ids.len() >= 0xFFFF));
            self.out.page(size, |buf, id, _| buf.extend_from_slice(&encode_freelist(id, &ids, ps)))?
        };
        drop(db);
        let new_meta = Meta {
            root: BucketHeader { root: root_id, sequence: meta.root.sequence },
            freelist,
            pgid: self.out.next,
            txid: meta.txid + 1,
            ..meta
        };
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| WriteError::Io { action, path, source }
        };
        use std::io::Write;
        self.out.w.flush().map_err(io("write"))?;
        let file: &File = self.out.w.get_ref();
        file.sync_all().map_err(io("fsync"))?;
        write_meta(file, &path, &new_meta, ps)?;
        self.committed = true;
        Ok(Written { pages: new_meta.pgid, size: new_meta.pgid * ps as u64 })
    }
}

/// Every page of the subtree at `id` (with overflow), appended to `out`.
fn collect_pages(db: &Db, id: u64, out: &mut Vec<u64>, depth: u32) -> Result<(), WriteError> {
    if depth > MAX_DEPTH {
        return Err(source(db.path(), format!("a tree deeper than {MAX_DEPTH}")));
    }
    let page = db.page(id)?;
    out.extend(id..=id + u64::from(page.overflow));
    if page.flags == FLAG_BRANCH {
        for i in 0..usize::from(page.count) {
            let (_, child) = page.branch(i).map_err(|d| source(db.path(), d))?;
            collect_pages(db, child, out, depth + 1)?;
        }
    }
    Ok(())
}

impl Drop for Appender {
    fn drop(&mut self) {
        if !self.committed {
            // Nothing references the pages written past the old end: cut them off (after the
            // buffer's last write, which would otherwise land past the cut).
            use std::io::Write;
            let _ = self.out.w.flush();
            let _ = self.out.w.get_ref().set_len(self.original_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdb::{model_of, Builder, Model, Rng};
    use super::super::writer::write_image;
    use super::*;

    fn revision_key(main: u64, sub: u64) -> Vec<u8> {
        let mut k = main.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&sub.to_be_bytes());
        k
    }

    /// An etcd-shaped image of page size `ps` holding `model` (buckets `key`, `lease`, `meta`),
    /// with a persisted (empty) freelist when `freelist`.
    fn image(dir: &Path, ps: usize, model: &Model, freelist: bool) -> PathBuf {
        let mut b = Builder::new(ps);
        let root = b.leaf(&[]);
        let fl = if freelist { b.freelist(&[]) } else { NO_FREELIST };
        let src = Db::from_bytes("empty.db", b.finish(root, fl), None).unwrap();
        let mut edits = Edits::default();
        for (bucket, keys) in model {
            edits.delete(bucket, b"\xff-absent");
            for (k, v) in keys {
                edits.put(bucket, k, v);
            }
        }
        let path = dir.join("db");
        write_image(&src, &path, &edits).unwrap();
        path
    }

    #[test]
    fn appended_keys_and_lease_edits_read_back_after_one_commit_on_any_tree_shape() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let ps = [512usize, 1024, 4096][rng.below(3) as usize];
            let freelist = rng.below(2) == 0;
            let mut model = Model::new();
            let base = rng.below(3000);
            for bucket in [&b"key"[..], b"lease", b"meta"] {
                model.entry(bucket.to_vec()).or_default();
            }
            for rev in 1..=base {
                let len = if rng.below(30) == 0 { 3 * ps } else { rng.below(200) as usize };
                let v = rng.bytes(len);
                model.get_mut(&b"key"[..]).unwrap().insert(revision_key(rev, 0), v);
            }
            let leases = if rng.below(2) == 0 { 4 } else { 400 };
            for _ in 0..rng.below(leases) {
                let (id, v) = (rng.next().to_be_bytes().to_vec(), rng.bytes(8));
                model.get_mut(&b"lease"[..]).unwrap().insert(id, v);
            }
            model.get_mut(&b"meta"[..]).unwrap().insert(b"consistent_index".to_vec(), 7u64.to_be_bytes().to_vec());
            let dir = tempfile::tempdir().unwrap();
            let path = image(dir.path(), ps, &model, freelist);

            let mut a = Appender::open(&path, b"key", 0.9).unwrap().expect("an etcd-shaped image");
            let n = rng.below(5000);
            for rev in base + 1..=base + n {
                for sub in 0..1 + rng.below(3) {
                    let mut k = revision_key(rev, sub);
                    if rng.below(10) == 0 {
                        k.push(b't');
                    }
                    let len = if rng.below(50) == 0 { 2 * ps + 7 } else { rng.below(300) as usize };
                    let v = rng.bytes(len);
                    a.push(k.clone(), v.clone()).unwrap();
                    model.get_mut(&b"key"[..]).unwrap().insert(k, v);
                }
            }
            let mut others = Edits::default();
            for _ in 0..rng.below(20) {
                let (id, v) = (rng.next().to_be_bytes(), rng.bytes(10));
                others.put(b"lease", &id, &v);
                model.get_mut(&b"lease"[..]).unwrap().insert(id.to_vec(), v);
            }
            let w = a.commit(&others).unwrap();
            let db = Db::open(&path).unwrap();
            db.check().unwrap_or_else(|e| panic!("seed {seed} (ps {ps}, freelist {freelist}): {e}"));
            assert_eq!(db.meta().pgid, w.pages);
            assert_eq!(model_of(&db), model, "seed {seed}: contents after the commit");
        }
    }

    #[test]
    fn an_appender_dropped_before_its_commit_leaves_the_file_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new();
        let keys = model.entry(b"key".to_vec()).or_default();
        for rev in 1..=500 {
            keys.insert(revision_key(rev, 0), vec![7u8; 100]);
        }
        let path = image(dir.path(), 4096, &model, true);
        let before = std::fs::read(&path).unwrap();
        let mut a = Appender::open(&path, b"key", 0.9).unwrap().unwrap();
        for rev in 501..=5000 {
            a.push(revision_key(rev, 0), vec![1u8; 300]).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() > before.len() as u64, "pages were written");
        drop(a);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn an_appender_refuses_keys_out_of_order_and_shapes_it_does_not_handle() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new();
        model.entry(b"key".to_vec()).or_default().insert(revision_key(5, 0), b"v".to_vec());
        let path = image(dir.path(), 4096, &model, false);
        let mut a = Appender::open(&path, b"key", 0.9).unwrap().unwrap();
        let e = a.push(revision_key(5, 0), b"again".to_vec()).unwrap_err();
        assert!(e.to_string().contains("does not sort after"), "{e}");
        assert!(a.push(revision_key(4, 9), b"older".to_vec()).is_err());
        a.push(revision_key(6, 0), b"ok".to_vec()).unwrap();
        drop(a);
        let why = Appender::open(&path, b"lease", 0.9).unwrap().err().expect("no lease bucket");
        assert!(why.contains("no bucket lease"), "{why}");
    }
}
