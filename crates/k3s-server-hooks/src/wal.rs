//! Which etcd member a data dir belongs to, read natively from its write-ahead log, without
//! starting etcd (which, started on data of a member the cluster no longer knows, only crash-loops).
//!
//! Every WAL file (`member/wal/<seq>-<index>.wal`) begins with a CRC record and then a metadata
//! record holding `etcdserverpb.Metadata { NodeID = 1, ClusterID = 2 }`; etcd writes both at the
//! head of each new file, so any file will do. Framing, as etcd's `wal/encoder.go` writes it: a
//! little-endian u64 whose low 56 bits are the record length and whose top byte, when its high
//! bit is set, holds the number of padding bytes (low 3 bits) that align the next frame to 8
//! bytes; then the `walpb.Record { Type = 1, Crc = 2, Data = 3 }` protobuf.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// `walpb` record types.
const METADATA_TYPE: u64 = 1;
/// A record larger than this at the head of a WAL file is not a metadata record.
const MAX_HEAD_RECORD: u64 = 1 << 20;
/// How many records at the head of a file are looked at before giving up.
const HEAD_RECORDS: usize = 8;

/// The member and cluster an etcd data dir belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalMember {
    pub member_id: u64,
    pub cluster_id: u64,
}

/// Reads the member of the etcd data dir `etcd_dir` (`server/db/etcd`) from the first WAL file.
pub fn member_of(etcd_dir: &Path) -> Result<WalMember> {
    let wal_dir = etcd_dir.join("member/wal");
    let mut files: Vec<_> = std::fs::read_dir(&wal_dir)
        .map_err(Error::io("read", &wal_dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    let first = files.first().ok_or_else(|| Error::Wal(format!("{} holds no .wal file", wal_dir.display())))?;
    let mut head = Vec::new();
    std::fs::File::open(first)
        .and_then(|f| f.take(MAX_HEAD_RECORD * 2).read_to_end(&mut head))
        .map_err(Error::io("read", first))?;
    metadata_from_head(&head).map_err(|detail| Error::Wal(format!("{}: {detail}", first.display())))
}

/// Finds the metadata record among the first records of a WAL file's bytes.
pub fn metadata_from_head(mut buf: &[u8]) -> std::result::Result<WalMember, String> {
    for _ in 0..HEAD_RECORDS {
        if buf.len() < 8 {
            break;
        }
        let len_field = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let len = len_field & !(0xffu64 << 56);
        let pad = if len_field >> 63 == 1 { (len_field >> 56) & 0x7 } else { 0 };
        if len == 0 {
            break;
        }
        if len > MAX_HEAD_RECORD || (8 + len + pad) as usize > buf.len() {
            return Err(format!("record of {len} bytes does not fit; not an etcd wal file"));
        }
        let record = &buf[8..8 + len as usize];
        buf = &buf[(8 + len + pad) as usize..];
        let (mut kind, mut data) = (0u64, &[][..]);
        for field in fields(record)? {
            match field {
                (1, Field::Varint(v)) => kind = v,
                (3, Field::Bytes(b)) => data = b,
                _ => {}
            }
        }
        if kind == METADATA_TYPE {
            let (mut member_id, mut cluster_id) = (0, 0);
            for field in fields(data)? {
                match field {
                    (1, Field::Varint(v)) => member_id = v,
                    (2, Field::Varint(v)) => cluster_id = v,
                    _ => {}
                }
            }
            if member_id == 0 {
                return Err("the metadata record carries no member id".into());
            }
            return Ok(WalMember { member_id, cluster_id });
        }
    }
    Err("no metadata record at the head of the file".into())
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &mut &[u8]) -> std::result::Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// The fields of one protobuf message (varint and length-delimited; fixed ones are skipped).
fn fields(mut buf: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((number, Field::Varint(varint(&mut buf)?))),
            2 => {
                let n = varint(&mut buf)? as usize;
                if n > buf.len() {
                    return Err("truncated field".into());
                }
                out.push((number, Field::Bytes(&buf[..n])));
                buf = &buf[n..];
            }
            1 => buf = buf.get(8..).ok_or("truncated field")?,
            5 => buf = buf.get(4..).ok_or("truncated field")?,
            w => return Err(format!("unexpected protobuf wire type {w}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A frame as etcd's encoder writes it.
    fn frame(kind: u64, crc: u32, data: &[u8]) -> Vec<u8> {
        let mut rec = Vec::new();
        put_varint(&mut rec, 1 << 3);
        put_varint(&mut rec, kind);
        put_varint(&mut rec, 2 << 3);
        put_varint(&mut rec, u64::from(crc));
        if !data.is_empty() {
            put_varint(&mut rec, (3 << 3) | 2);
            put_varint(&mut rec, data.len() as u64);
            rec.extend_from_slice(data);
        }
        let pad = (8 - rec.len() % 8) % 8;
        let mut len = rec.len() as u64;
        if pad != 0 {
            len |= (0x80 | pad as u64) << 56;
        }
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(&rec);
        out.extend(std::iter::repeat_n(0, pad));
        out
    }

    fn metadata(node: u64, cluster: u64) -> Vec<u8> {
        let mut m = Vec::new();
        put_varint(&mut m, 1 << 3);
        put_varint(&mut m, node);
        put_varint(&mut m, 2 << 3);
        put_varint(&mut m, cluster);
        m
    }

    #[test]
    fn reads_the_member_after_the_crc_record() {
        let mut wal = frame(4, 0, &[]);
        wal.extend(frame(METADATA_TYPE, 0xdead_beef, &metadata(0x8e9e_05c5_2164_694d, 0xcdf8_18194e3a8c32)));
        wal.extend(frame(5, 1, b"\x08\x00"));
        wal.extend(vec![0; 64]);
        let m = metadata_from_head(&wal).unwrap();
        assert_eq!(m, WalMember { member_id: 0x8e9e_05c5_2164_694d, cluster_id: 0xcdf8_18194e3a8c32 });
    }

    #[test]
    fn garbage_and_empty_files_are_errors() {
        assert!(metadata_from_head(&[0; 4096]).is_err());
        assert!(metadata_from_head(&[0xff; 64]).is_err());
        assert!(metadata_from_head(&frame(4, 0, &[])).is_err());
    }

    #[test]
    fn a_data_dir_without_wal_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("member/wal")).unwrap();
        let err = member_of(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("no .wal file"), "{err}");
    }
}
