//! [`append_commit`]: a few keys committed into a bbolt file the way bbolt commits a transaction
//! (copies of the touched pages appended after the high-water mark, the freelist extended, then
//! a new meta in the other slot), and the freelist helpers the appender shares.

use std::collections::BTreeMap;
use std::path::Path;

use super::edits::{Edits, WriteError, Written};
use super::layout::*;
use super::reader::Db;

/// Commits `edits` the way bbolt commits a transaction, for the shape a revision bump has:
/// copies of the pages it touches are appended after the high-water mark, the pages they replace
/// go to the freelist (when the file keeps one), everything is fsynced, and only then a new meta
/// (txid + 1) is written into the other meta slot and fsynced. No page in use is modified, so a
/// crash at any point leaves the file as it was (the old meta still valid) or as it is meant to
/// be; a torn meta fails its checksum and the other one is used, as bbolt does.
///
/// Handled: a root bucket held in one leaf; edits to top-level buckets that are inline (their
/// value is re-encoded) or paged with only puts after their last key (the rightmost leaf is
/// copied with the new keys appended, possibly spanning more pages, and its ancestors copied with
/// the new child). Anything else returns `Ok(None)`, and the caller rewrites the file instead.
/// So does a persisted freelist that fails its check (a freelist page, its count within the page,
/// every id a data page below the high-water mark, none twice, none of the pages this commit
/// replaces, which are in use): the commit would hand those pages out as free, and the rewrite
/// does not read the freelist at all.
pub fn append_commit(path: &Path, edits: &Edits) -> Result<Option<Written>, WriteError> {
    edits.validate()?;
    let db = Db::open(path)?;
    let ps = db.page_size() as usize;
    let meta = *db.meta();
    if meta.freelist != NO_FREELIST {
        if let Err(e) = super::Checker::new(&db) {
            tracing::warn!(db = %path.display(), error = %e, "the freelist fails its check; rewriting the file instead of committing into it");
            return Ok(None);
        }
    }
    let mut next = meta.pgid;
    let mut freed: Vec<u64> = Vec::new();
    let mut new_pages: Vec<(u64, NewPage<'_>)> = Vec::new();
    let span = |len: usize| len.div_ceil(ps).max(1) as u64;
    // Appends a page (encoded with the id `next` had) and moves `next` past its span.
    fn alloc<'a>(page: NewPage<'a>, new_pages: &mut Vec<(u64, NewPage<'a>)>, next: &mut u64, ps: usize) -> u64 {
        let id = *next;
        *next += page.len().div_ceil(ps).max(1) as u64;
        new_pages.push((id, page));
        id
    }
    let root = db.page(meta.root.root)?;
    if root.flags != FLAG_LEAF {
        return Ok(None);
    }
    let mut root_elems: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::new();
    for i in 0..usize::from(root.count) {
        let (f, k, v) = root.leaf(i).map_err(|d| WriteError::Source { detail: d, path: path.into() })?;
        root_elems.push((f, k.to_vec(), v.to_vec()));
    }
    for (name, keys) in &edits.buckets {
        let Some(at) = root_elems.iter().position(|(f, k, _)| k == name && f & LEAF_FLAG_BUCKET != 0) else {
            return Ok(None);
        };
        let value = root_elems[at].2.clone();
        let root_pg = super::layout::le_u64(&value, 0).unwrap_or(0);
        let sequence = super::layout::le_u64(&value, 8).unwrap_or(0);
        if root_pg == 0 {
            // Inline: its leaf follows the header inside the value.
            let page = db.inline_page(&value[BUCKET_HEADER_SIZE..], root.loc)?;
            let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for i in 0..usize::from(page.count) {
                let (f, k, v) = page.leaf(i).map_err(|d| WriteError::Source { detail: d, path: path.into() })?;
                if f & LEAF_FLAG_BUCKET != 0 {
                    return Ok(None);
                }
                merged.insert(k.to_vec(), v.to_vec());
            }
            for (k, v) in keys {
                match v {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
            let elems: Vec<(u32, &[u8], &[u8])> = merged.iter().map(|(k, v)| (0, k.as_slice(), v.as_slice())).collect();
            root_elems[at].2 = encode_bucket_value(0, sequence, &elems);
            continue;
        }
        // Paged: only puts after the last key, appended to the rightmost leaf.
        if keys.values().any(Option::is_none) {
            return Ok(None);
        }
        let mut path_pages = Vec::new();
        let mut id = root_pg;
        loop {
            let page = db.page(id)?;
            path_pages.push(id);
            match page.flags {
                FLAG_BRANCH if page.count > 0 => {
                    id = page
                        .branch(usize::from(page.count) - 1)
                        .map_err(|d| WriteError::Source { detail: d, path: path.into() })?
                        .1;
                }
                FLAG_LEAF => break,
                _ => return Ok(None),
            }
            if path_pages.len() > MAX_DEPTH as usize {
                return Ok(None);
            }
        }
        // The leaf's keys and values stay in the map: a leaf of large values (four of 1 MiB
        // is a full one) is written from there, never copied into memory.
        let leaf = db.page(*path_pages.last().expect("a leaf"))?;
        let mut elems: Vec<(u32, &[u8], &[u8])> = Vec::with_capacity(usize::from(leaf.count) + keys.len());
        for i in 0..usize::from(leaf.count) {
            elems.push(leaf.leaf(i).map_err(|d| WriteError::Source { detail: d, path: path.into() })?);
        }
        if let (Some((_, last, _)), Some((first_new, _))) = (elems.last(), keys.iter().next()) {
            if first_new.as_slice() <= *last {
                return Ok(None);
            }
        }
        if elems.len() + keys.len() > usize::from(u16::MAX) {
            return Ok(None);
        }
        elems.extend(keys.iter().map(|(k, v)| (0, k.as_slice(), v.as_deref().unwrap_or_default())));
        let size = PAGE_HEADER_SIZE + elems.iter().map(|(_, k, v)| ELEMENT_SIZE + k.len() + v.len()).sum::<usize>();
        let overflow = (span(size) - 1) as u32;
        let mut child = alloc(NewPage::Leaf { size, overflow, elems }, &mut new_pages, &mut next, ps);
        // Ancestors, bottom-up: the same elements with the last child replaced.
        for &bid in path_pages.iter().rev().skip(1) {
            let b = db.page(bid)?;
            let mut belems: Vec<(Vec<u8>, u64)> = Vec::new();
            for i in 0..usize::from(b.count) {
                let (k, c) = b.branch(i).map_err(|d| WriteError::Source { detail: d, path: path.into() })?;
                belems.push((k.to_vec(), c));
            }
            belems.last_mut().expect("a branch with elements").1 = child;
            let refs: Vec<(&[u8], u64)> = belems.iter().map(|(k, c)| (k.as_slice(), *c)).collect();
            let size = PAGE_HEADER_SIZE + refs.iter().map(|(k, _)| ELEMENT_SIZE + k.len()).sum::<usize>();
            let id = next;
            let mut bytes = Vec::with_capacity(size);
            encode_branch(&mut bytes, id, (span(size) - 1) as u32, &refs);
            child = alloc(NewPage::Bytes(bytes), &mut new_pages, &mut next, ps);
        }
        for &old in &path_pages {
            let p = db.page(old)?;
            freed.extend(old..=old + u64::from(p.overflow));
        }
        root_elems[at].2 = encode_bucket_value(child, sequence, &[]);
    }
    // The root leaf, with the new bucket values.
    let refs: Vec<(u32, &[u8], &[u8])> = root_elems.iter().map(|(f, k, v)| (*f, k.as_slice(), v.as_slice())).collect();
    let size = PAGE_HEADER_SIZE + refs.iter().map(|(_, k, v)| ELEMENT_SIZE + k.len() + v.len()).sum::<usize>();
    let root_id = next;
    let mut bytes = Vec::with_capacity(size);
    encode_leaf(&mut bytes, root_id, (span(size) - 1) as u32, &refs);
    alloc(NewPage::Bytes(bytes), &mut new_pages, &mut next, ps);
    freed.extend(meta.root.root..=meta.root.root + u64::from(root.overflow));
    // The freelist, when the file keeps one: what it listed, the replaced pages, and itself.
    let freelist = if meta.freelist == NO_FREELIST {
        NO_FREELIST
    } else {
        let Some(ids) = merge_freelist(&db, path, freed)? else { return Ok(None) };
        alloc(NewPage::Bytes(encode_freelist(next, &ids, ps)), &mut new_pages, &mut next, ps)
    };
    let new_meta = Meta {
        root: BucketHeader { root: root_id, sequence: meta.root.sequence },
        freelist,
        pgid: next,
        txid: meta.txid + 1,
        ..meta
    };
    let io = |action: &'static str| move |source| WriteError::Io { action, path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io("open"))?;
    // New pages follow one another from the old high-water mark, outside what `db` maps and
    // reads: one buffered pass writes them, so no page is ever assembled whole in memory.
    use std::io::{Read, Seek, Write};
    let mut out = std::io::BufWriter::with_capacity(256 << 10, &file);
    out.seek(std::io::SeekFrom::Start(meta.pgid * ps as u64)).map_err(io("seek"))?;
    let mut at = meta.pgid;
    for (id, page) in &new_pages {
        debug_assert_eq!(*id, at, "the commit's pages are contiguous");
        match page {
            NewPage::Bytes(bytes) => out.write_all(bytes),
            NewPage::Leaf { size, overflow, elems } => (|| {
                let mut head = Vec::with_capacity(PAGE_HEADER_SIZE + elems.len() * ELEMENT_SIZE);
                let len = encode_leaf_head(&mut head, *id, *overflow, elems);
                debug_assert_eq!(len, *size);
                out.write_all(&head)?;
                for (_, k, v) in elems {
                    out.write_all(k)?;
                    out.write_all(v)?;
                    // Copied out: its mapped pages need not stay resident.
                    db.release_slice(v);
                }
                Ok(())
            })(),
        }
        .map_err(io("write"))?;
        let padded = span(page.len()) * ps as u64;
        std::io::copy(&mut std::io::repeat(0).take(padded - page.len() as u64), &mut out).map_err(io("write"))?;
        at += span(page.len());
    }
    out.flush().map_err(io("write"))?;
    drop(out);
    drop(db);
    file.sync_all().map_err(io("fsync"))?;
    write_meta(&file, path, &new_meta, ps)?;
    Ok(Some(Written { pages: next, size: next * ps as u64 }))
}

/// A page the commit appends: encoded in memory, or a leaf whose keys and values are borrowed
/// (from the map and the edits) and written straight after its encoded head.
enum NewPage<'a> {
    Bytes(Vec<u8>),
    Leaf { size: usize, overflow: u32, elems: Vec<(u32, &'a [u8], &'a [u8])> },
}

impl NewPage<'_> {
    /// The page's length, unpadded.
    fn len(&self) -> usize {
        match self {
            NewPage::Bytes(b) => b.len(),
            NewPage::Leaf { size, .. } => *size,
        }
    }
}

/// Writes `meta` into its slot (txid % 2) of `file` and fsyncs it: the last step of a commit,
/// once everything the meta points to is on disk.
pub(super) fn write_meta(file: &std::fs::File, path: &Path, meta: &Meta, ps: usize) -> Result<(), WriteError> {
    use std::os::unix::fs::FileExt;
    let io = |action: &'static str| move |source| WriteError::Io { action, path: path.to_path_buf(), source };
    let slot = meta.txid % 2;
    let mut page = Vec::with_capacity(ps);
    encode_page_header(&mut page, slot, FLAG_META, 0, 0);
    page.extend_from_slice(&meta.encode());
    page.resize(ps, 0);
    file.write_all_at(&page, slot * ps as u64).map_err(io("write"))?;
    file.sync_all().map_err(io("fsync"))
}

/// The ids the freelist of a commit lists: what the old one listed, the pages the commit
/// replaces (`freed`), and the old freelist page itself, sorted. `None` when the old freelist
/// lists a page that the commit replaces (those are in use: the freelist is wrong, and the caller
/// rewrites the file instead).
pub(super) fn merge_freelist(db: &Db, path: &Path, mut freed: Vec<u64>) -> Result<Option<Vec<u64>>, WriteError> {
    let meta = db.meta();
    let fl = db.page(meta.freelist)?;
    let (first, count) = if fl.count == 0xFFFF {
        (1usize, super::layout::le_u64(fl.buf, PAGE_HEADER_SIZE).unwrap_or(0) as usize)
    } else {
        (0, usize::from(fl.count))
    };
    freed.extend(meta.freelist..=meta.freelist + u64::from(fl.overflow));
    let in_use: std::collections::BTreeSet<u64> = freed.iter().copied().collect();
    for i in first..first + count {
        let id = super::layout::le_u64(fl.buf, PAGE_HEADER_SIZE + i * 8)
            .ok_or_else(|| WriteError::Source { detail: "freelist cut short".into(), path: path.into() })?;
        if in_use.contains(&id) {
            tracing::warn!(db = %path.display(), page = id, "the freelist lists a page in use; rewriting the file instead of committing into it");
            return Ok(None);
        }
        freed.push(id);
    }
    freed.sort_unstable();
    freed.dedup();
    Ok(Some(freed))
}

/// A freelist page with id `id` listing `ids` (a count of 0xFFFF says the real count is the
/// first element, as bbolt writes a long list), unpadded.
pub(super) fn encode_freelist(id: u64, ids: &[u64], ps: usize) -> Vec<u8> {
    let n = ids.len();
    let size = PAGE_HEADER_SIZE + 8 * (n + usize::from(n >= 0xFFFF));
    let overflow = (size.div_ceil(ps).max(1) - 1) as u32;
    let mut body = Vec::with_capacity(size);
    if n >= 0xFFFF {
        encode_page_header(&mut body, id, FLAG_FREELIST, 0xFFFF, overflow);
        body.extend_from_slice(&(n as u64).to_le_bytes());
    } else {
        encode_page_header(&mut body, id, FLAG_FREELIST, n as u16, overflow);
    }
    for f in ids {
        body.extend_from_slice(&f.to_le_bytes());
    }
    body
}
