//! Zip compression in k3s's layout: `<file>.zip` holds exactly one deflate entry named `<file>`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::name::ZIP_SUFFIX;
use crate::store::{ensure_free_space, Placed, ScratchFile};
use crate::{Error, Result};

/// Compresses `raw` into `raw.zip` (through a scratch file, fsync, rename that never replaces an
/// existing file) and returns the zip's path. The raw file is left for the caller to remove once
/// the zip is in place.
pub fn compress_file(raw: &Path) -> Result<PathBuf> {
    let entry = raw
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{} has no file name", raw.display())))?
        .to_string();
    let mut zip_path = raw.as_os_str().to_owned();
    zip_path.push(ZIP_SUFFIX);
    let zip_path = PathBuf::from(zip_path);
    let zerr = |detail: String| Error::Zip { path: zip_path.clone(), detail };
    let scratch = ScratchFile::create(&zip_path)?;
    let mut zw = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, scratch.file()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(std::fs::metadata(raw).map(|m| m.len() >= u32::MAX as u64).unwrap_or(true))
        .unix_permissions(0o600);
    zw.start_file(entry.as_str(), opts).map_err(|e| zerr(e.to_string()))?;
    let mut input = BufReader::with_capacity(1 << 20, File::open(raw).map_err(Error::io("open", raw))?);
    std::io::copy(&mut input, &mut zw).map_err(Error::io("compress", raw))?;
    let mut w = zw.finish().map_err(|e| zerr(e.to_string()))?;
    w.flush().map_err(Error::io("write", scratch.path()))?;
    drop(w);
    scratch.sync()?;
    match scratch.place()? {
        Placed::New(p) => Ok(p),
        Placed::Identical(p) => Ok(p),
        Placed::Kept { existing, .. } => Err(zerr(format!(
            "{} appeared while compressing and is not this snapshot; it was left as it is and the uncompressed snapshot is kept",
            existing.display()
        ))),
    }
}

/// Extracts the single entry of a k3s snapshot zip into a scratch file in `into_dir` (see
/// [`ScratchFile`]; its target is `into_dir/<entry name>`) and returns it, fsynced, for the
/// caller to verify and then [`ScratchFile::place`]. Refuses, leaving nothing behind: a zip with
/// more or fewer than one entry, an entry name with a path (so nothing is ever written outside
/// `into_dir`), an entry that declares more than the free space of `into_dir`'s filesystem
/// (keeping [`crate::store::FREE_SPACE_MARGIN`]), and an entry that inflates to more (a zip bomb)
/// or fewer bytes than it declares. The output never exceeds the declared size.
pub fn extract_to_scratch(zip_path: &Path, into_dir: &Path) -> Result<ScratchFile> {
    let zerr = |detail: String| Error::Zip { path: zip_path.to_path_buf(), detail };
    let f = File::open(zip_path).map_err(Error::io("open", zip_path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| zerr(format!("not a readable zip ({e}); give a snapshot or a k3s snapshot .zip")))?;
    if archive.len() != 1 {
        return Err(zerr(format!("holds {} entries; a snapshot zip holds exactly one", archive.len())));
    }
    let entry = archive.by_index(0).map_err(|e| zerr(e.to_string()))?;
    let name = entry.name().to_string();
    if name.is_empty()
        || name.contains('/')
        || name.contains('\\')
        || name.contains("..")
        || name.starts_with('.')
        || entry.is_dir()
    {
        return Err(zerr(format!("entry {name:?} has a path; a snapshot zip holds one plain file name")));
    }
    crate::name::validate_file_name(&name).map_err(|e| zerr(e.to_string()))?;
    let declared = entry.size();
    ensure_free_space(into_dir, declared, &format!("entry {name} of {}", zip_path.display()))?;
    let scratch = ScratchFile::create(&into_dir.join(&name))?;
    let mut w = BufWriter::with_capacity(1 << 20, scratch.file());
    // One byte past the declared size is enough to tell a zip bomb; reading to the end of a
    // whole entry also makes the zip reader check its CRC-32.
    let mut limited = entry.take(declared.saturating_add(1));
    let n = std::io::copy(&mut limited, &mut w)
        .map_err(|e| zerr(format!("cannot extract {name}: {e}; nothing was kept")))?;
    if n > declared {
        return Err(zerr(format!(
            "entry {name} inflates beyond the {declared} bytes it declares (a zip bomb, or a corrupt zip); refusing it, nothing was kept"
        )));
    }
    if n < declared {
        return Err(zerr(format!(
            "entry {name} holds {n} bytes but declares {declared}; the zip is truncated or corrupt, nothing was kept"
        )));
    }
    w.flush().map_err(Error::io("write", scratch.path()))?;
    drop(w);
    scratch.sync()?;
    Ok(scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_holds_one_entry_named_like_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("on-demand-n-1");
        std::fs::write(&raw, vec![7u8; 100_000]).unwrap();
        let z = compress_file(&raw).unwrap();
        assert_eq!(z, tmp.path().join("on-demand-n-1.zip"));
        let mut a = zip::ZipArchive::new(File::open(&z).unwrap()).unwrap();
        assert_eq!(a.len(), 1);
        let e = a.by_index(0).unwrap();
        assert_eq!(e.name(), "on-demand-n-1");
        assert_eq!(e.compression(), zip::CompressionMethod::Deflated);
        drop(e);
        let out = tempfile::tempdir().unwrap();
        let x = extract_to_scratch(&z, out.path()).unwrap();
        assert_eq!(x.target(), out.path().join("on-demand-n-1"));
        assert_eq!(std::fs::read(x.path()).unwrap(), vec![7u8; 100_000]);
        let placed = x.place().unwrap();
        assert!(matches!(placed, Placed::New(_)), "{placed:?}");
        assert_eq!(std::fs::read(out.path().join("on-demand-n-1")).unwrap(), vec![7u8; 100_000]);
    }

    fn make_zip(path: &Path, entries: &[&str]) {
        let mut zw = zip::ZipWriter::new(File::create(path).unwrap());
        for e in entries {
            zw.start_file(*e, zip::write::SimpleFileOptions::default()).unwrap();
            zw.write_all(b"data").unwrap();
        }
        zw.finish().unwrap();
    }

    #[test]
    fn zip_entry_with_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let z = tmp.path().join("x.zip");
        make_zip(&z, &["../evil"]);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let err = extract_to_scratch(&z, &out).unwrap_err().to_string();
        assert!(err.contains("has a path"), "{err}");
        assert!(!tmp.path().join("evil").exists());
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn zip_with_two_entries_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let z = tmp.path().join("x.zip");
        make_zip(&z, &["a", "b"]);
        let err = extract_to_scratch(&z, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("2 entries"), "{err}");
    }
}
