//! Native, read-only reader for bbolt database images (etcd's backend format).
//!
//! The file is memory-mapped and every structure is decoded with bounds-checked
//! slicing, so a truncated or damaged file produces a [`BoltError`] instead of a
//! panic. Mapped pages count towards the process's resident set, so once the
//! walks have touched [`RESIDENT_WINDOW`] bytes of pages the mapping's page-table
//! entries are dropped ([`Db::release`]): the bytes stay in the kernel's page
//! cache and fault back in unchanged, and the resident set stays bounded by the
//! window instead of growing to the file's size. Tree walks track every page they visit (a bitset sized by the meta
//! high-water mark, which is bounded by the file length) and limit their
//! recursion depth, so reference cycles and absurdly deep trees are reported as
//! corruption rather than looping or overflowing the stack.
//!
//! On-disk layout (all integers little-endian):
//! * page header, 16 bytes: `id u64, flags u16, count u16, overflow u32`;
//!   a page occupies `1 + overflow` consecutive pages.
//! * meta (pages 0 and 1, after the header): `magic u32, version u32,
//!   page_size u32, flags u32, root {pgid u64, sequence u64}, freelist u64,
//!   pgid u64, txid u64, checksum u64` — the checksum is FNV-1a/64 of the 56
//!   bytes before it.
//! * branch element, 16 bytes: `pos u32, ksize u32, pgid u64`.
//! * leaf element, 16 bytes: `flags u32, pos u32, ksize u32, vsize u32`.
//!   `pos` is relative to the start of the element itself.
//! * a leaf element with flag 0x01 is a nested bucket whose value starts with
//!   a bucket header `{root u64, sequence u64}`; `root == 0` means the bucket
//!   is inline and its (leaf) page follows the header inside the value.
//!
//! The parts: [`layout`] (the page format both sides share), [`reader`] ([`Db`], [`Bucket`]),
//! [`checker`] (the whole-image structure check), `edits` (what the writers take and give),
//! [`writer`] (a bulk rewrite of an image with edits), `commit` ([`writer::append_commit`]: a few keys committed as bbolt commits a
//! transaction, e.g. the revision bump of a restore), [`append`] (keys streamed onto a bucket's right
//! edge in one commit: the native replay of delta segments).

use std::path::PathBuf;

pub mod append;
pub mod checker;
mod commit;
mod edits;
pub mod layout;
pub mod reader;
#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;
pub mod writer;

pub use checker::{Checker, Visitor};
pub use layout::*;
pub use reader::{Bucket, Db, Value};

/// Errors from opening, reading or checking a bbolt image.
#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error("cannot read snapshot {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {} is not a bbolt database: {reason}", .path.display())]
    NotBolt { path: PathBuf, reason: String },
    #[error(
        "snapshot {} is truncated: {what} ends at byte {end} past the end of the file (len {len})",
        .path.display()
    )]
    Truncated { path: PathBuf, what: String, end: u64, len: u64 },
    #[error("snapshot {} is corrupt: page {page} (byte offset {offset}): {detail}", .path.display())]
    Corrupt { path: PathBuf, page: u64, offset: u64, detail: String },
}
