use super::testdb::*;
use super::*;

const PS: usize = 512;

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
    for bytes in [vec![], vec![0u8; 10], vec![0u8; 1 << 16], (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect()]
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
    assert!(
        check_err(b.finish(root, NO_FREELIST)).contains("first leaf key 61 is below its key 62 in the parent branch")
    );

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
