//! The SHA-256 trailer of etcd snapshots, checked while streaming.
//!
//! etcd's Maintenance `Snapshot` stream is the bbolt image followed by 32 bytes: the SHA-256 of the
//! image. [`TrailerCheck`] hashes bytes as they pass, always holding back the last 32 so that they
//! can be compared at the end, and releases bytes to the writer only once they are known to be
//! image bytes. The trailer itself is kept in the file, as `etcdctl snapshot save` does, so that
//! `etcdutl snapshot restore` can verify it again.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

pub const TRAILER_LEN: usize = 32;

/// See [`TrailerCheck::digests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    /// SHA-256 of every byte.
    pub stream: [u8; 32],
    /// The last 32 bytes, when they are the SHA-256 of the bytes before them.
    pub verified_trailer: Option<[u8; 32]>,
}

/// Streaming SHA-256 check with a 32-byte hold-back.
pub struct TrailerCheck {
    image: Sha256,
    held: Vec<u8>,
    total: u64,
}

impl Default for TrailerCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl TrailerCheck {
    pub fn new() -> Self {
        TrailerCheck { image: Sha256::new(), held: Vec::with_capacity(2 * TRAILER_LEN), total: 0 }
    }

    /// Feeds a chunk; everything but the last 32 bytes seen so far is image and is hashed.
    pub fn update(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if chunk.len() >= TRAILER_LEN {
            self.image.update(&self.held);
            self.held.clear();
            let (body, tail) = chunk.split_at(chunk.len() - TRAILER_LEN);
            self.image.update(body);
            self.held.extend_from_slice(tail);
        } else {
            self.held.extend_from_slice(chunk);
            if self.held.len() > TRAILER_LEN {
                let extra = self.held.len() - TRAILER_LEN;
                self.image.update(&self.held[..extra]);
                self.held.drain(..extra);
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Like [`TrailerCheck::finish`], and also returns the SHA-256 of every byte fed (image and
    /// trailer: the snapshot file's checksum), taken from the same pass over the image rather than
    /// a second hash of the whole stream.
    pub fn finish_with_stream_sha256(self, name: &str) -> Result<[u8; 32]> {
        let mut stream = self.image.clone();
        stream.update(&self.held);
        self.finish(name)?;
        Ok(stream.finalize().into())
    }

    /// What one pass over a file gave, without judging it: the SHA-256 of every byte fed, and,
    /// when the bytes fed end in their image's SHA-256 (an etcd snapshot with a good trailer), that
    /// digest. A download computes both as the bytes land, so that neither the object's checksum
    /// nor the snapshot's trailer needs a second pass over the file.
    pub fn digests(self) -> Digests {
        let mut stream = self.image.clone();
        stream.update(&self.held);
        let image: [u8; 32] = self.image.finalize().into();
        let verified_trailer =
            (self.held.len() == TRAILER_LEN && self.total >= 1024 && image.as_slice() == self.held.as_slice())
                .then_some(image);
        Digests { stream: stream.finalize().into(), verified_trailer }
    }

    /// Compares the held-back 32 bytes with the hash of everything before them.
    pub fn finish(self, name: &str) -> Result<()> {
        if self.held.len() < TRAILER_LEN || self.total < 1024 {
            return Err(Error::Truncated {
                name: name.to_string(),
                detail: format!("only {} bytes arrived, too short to hold a database and its sha256", self.total),
            });
        }
        let actual = self.image.finalize();
        if actual.as_slice() != self.held.as_slice() {
            return Err(Error::Checksum {
                name: name.to_string(),
                expected: hex::encode(&self.held),
                actual: hex::encode(actual),
            });
        }
        Ok(())
    }
}

/// SHA-256 of a whole file, streamed, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(image: &[u8]) -> Vec<u8> {
        let mut v = image.to_vec();
        v.extend_from_slice(&Sha256::digest(image));
        v
    }

    #[test]
    fn trailer_verifies_whatever_the_chunking() {
        let image: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let s = stream(&image);
        for chunk in [1, 5, 31, 32, 33, 100, 4096, 10_000] {
            let mut c = TrailerCheck::new();
            for part in s.chunks(chunk) {
                c.update(part);
            }
            c.finish("t").unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
        }
    }

    #[test]
    fn stream_sha256_is_the_hash_of_every_byte_fed() {
        let image: Vec<u8> = (0..9000u32).map(|i| (i * 13) as u8).collect();
        let s = stream(&image);
        for chunk in [1, 31, 32, 33, 4096] {
            let mut c = TrailerCheck::new();
            for part in s.chunks(chunk) {
                c.update(part);
            }
            let got = c.finish_with_stream_sha256("t").unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            assert_eq!(got.as_slice(), Sha256::digest(&s).as_slice(), "chunk {chunk}");
        }
        let mut bad = s.clone();
        bad[10] ^= 1;
        let mut c = TrailerCheck::new();
        c.update(&bad);
        assert!(matches!(c.finish_with_stream_sha256("t"), Err(Error::Checksum { .. })));
    }

    #[test]
    fn digests_give_the_file_hash_and_a_trailer_only_when_it_matches() {
        let image: Vec<u8> = (0..9000u32).map(|i| (i * 11) as u8).collect();
        let s = stream(&image);
        for chunk in [1, 31, 32, 33, 4096] {
            let mut c = TrailerCheck::new();
            for part in s.chunks(chunk) {
                c.update(part);
            }
            let d = c.digests();
            assert_eq!(d.stream.as_slice(), Sha256::digest(&s).as_slice(), "chunk {chunk}");
            assert_eq!(d.verified_trailer.map(|t| t.to_vec()), Some(Sha256::digest(&image).to_vec()), "chunk {chunk}");
        }
        let mut bad = s.clone();
        bad[10] ^= 1;
        let mut c = TrailerCheck::new();
        c.update(&bad);
        let d = c.digests();
        assert_eq!(d.verified_trailer, None);
        assert_eq!(d.stream.as_slice(), Sha256::digest(&bad).as_slice());
    }

    #[test]
    fn flipped_byte_fails_the_check() {
        let image = vec![3u8; 4096];
        let mut s = stream(&image);
        s[100] ^= 1;
        let mut c = TrailerCheck::new();
        c.update(&s);
        assert!(matches!(c.finish("t"), Err(Error::Checksum { .. })));
    }

    #[test]
    fn short_stream_is_truncated() {
        let mut c = TrailerCheck::new();
        c.update(&[0u8; 40]);
        assert!(matches!(c.finish("t"), Err(Error::Truncated { .. })));
    }
}
