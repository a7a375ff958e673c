//! Walking every page of an image once: bounds, cycles, depth, key order, freelist ([`Checker`]).

use super::layout::*;
use super::reader::{flags_name, show_key, Bucket, Db, Loc, Page, Value};
use super::BoltError;

// The reader's whole-image check and key walk are the checker's walks.
impl Db {
    /// Structural check of the whole database (like bbolt's `tx.Check`):
    /// returns the first problem found.
    pub fn check(&self) -> Result<(), BoltError> {
        let mut c = Checker::new(self)?;
        c.check_bucket(&self.root())?;
        c.finish()
    }
}

impl<'a> Bucket<'a> {
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
}

/// Compact bitset over page ids; out-of-range ids read as unset and are never stored.
pub(super) struct BitSet {
    pub(super) words: Vec<u64>,
}

impl BitSet {
    pub(super) fn new(n: u64) -> BitSet {
        let words = usize::try_from(n.div_ceil(64)).unwrap_or(0);
        BitSet { words: vec![0; words] }
    }

    pub(super) fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64).ok().and_then(|w| self.words.get(w)).is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    pub(super) fn set(&mut self, i: u64) {
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
    pub(super) db: &'a Db,
    pub(super) reachable: BitSet,
    pub(super) freed: BitSet,
    pub(super) freelist_loaded: bool,
    pub(super) depth: u32,
    /// Work budget: in a sound image every element header and every key and
    /// data value occupies its own bytes, so a walk can never see more
    /// elements than `image_len / 16` nor more key+value bytes than
    /// `image_len`. Exceeding either means elements overlap (which could
    /// otherwise make a crafted file take exponential time).
    pub(super) elements_left: u64,
    pub(super) bytes_left: u64,
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

    pub(super) fn bare(db: &'a Db) -> Checker<'a> {
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

    pub(super) fn charge(&mut self, loc: Loc, bytes: usize) -> Result<(), BoltError> {
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

    pub(super) fn check_order(
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
    pub(super) fn walk_page<E: From<BoltError>>(
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

    pub(super) fn walk_branch<E: From<BoltError>>(
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

    pub(super) fn walk_leaf<E: From<BoltError>>(
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
