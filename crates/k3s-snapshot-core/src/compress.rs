//! Zip compression in k3s's layout: `<file>.zip` holds exactly one deflate entry named `<file>`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::name::ZIP_SUFFIX;
use crate::store::{durable_rename, part_path, RemoveOnDrop};
use crate::{Error, Result};

/// Compresses `raw` into `raw.zip` (via `.part`, fsync, rename) and returns the zip's path.
/// The raw file is left for the caller to remove once the zip is in place.
pub fn compress_file(raw: &Path) -> Result<PathBuf> {
    let entry = raw
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("{} has no file name", raw.display())))?
        .to_string();
    let mut zip_path = raw.as_os_str().to_owned();
    zip_path.push(ZIP_SUFFIX);
    let zip_path = PathBuf::from(zip_path);
    let part = part_path(&zip_path);
    let guard = RemoveOnDrop::new(part.clone());
    let zerr = |detail: String| Error::Zip { path: zip_path.clone(), detail };
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&part)
        .map_err(Error::io("create", &part))?;
    let mut zw = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, out));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(std::fs::metadata(raw).map(|m| m.len() >= u32::MAX as u64).unwrap_or(true))
        .unix_permissions(0o600);
    zw.start_file(entry.as_str(), opts).map_err(|e| zerr(e.to_string()))?;
    let mut input = BufReader::with_capacity(1 << 20, File::open(raw).map_err(Error::io("open", raw))?);
    std::io::copy(&mut input, &mut zw).map_err(Error::io("compress", raw))?;
    let mut w = zw.finish().map_err(|e| zerr(e.to_string()))?;
    w.flush().map_err(Error::io("write", &part))?;
    w.get_ref().sync_all().map_err(Error::io("fsync", &part))?;
    drop(w);
    durable_rename(&part, &zip_path)?;
    guard.disarm();
    Ok(zip_path)
}

/// Extracts the single entry of a k3s snapshot zip into `into_dir` (via `.part` and rename) and
/// returns the extracted path. Refuses a zip with more or fewer than one entry, or whose entry
/// name has a path, so that nothing is ever written outside `into_dir`.
pub fn extract_single(zip_path: &Path, into_dir: &Path) -> Result<PathBuf> {
    let zerr = |detail: String| Error::Zip { path: zip_path.to_path_buf(), detail };
    let f = File::open(zip_path).map_err(Error::io("open", zip_path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| zerr(format!("not a readable zip ({e}); give a snapshot or a k3s snapshot .zip")))?;
    if archive.len() != 1 {
        return Err(zerr(format!("holds {} entries; a snapshot zip holds exactly one", archive.len())));
    }
    let mut entry = archive.by_index(0).map_err(|e| zerr(e.to_string()))?;
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
    let out_path = into_dir.join(&name);
    let part = part_path(&out_path);
    let guard = RemoveOnDrop::new(part.clone());
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&part)
        .map_err(Error::io("create", &part))?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    std::io::copy(&mut entry, &mut w).map_err(|e| zerr(format!("cannot extract {name}: {e}")))?;
    w.flush().map_err(Error::io("write", &part))?;
    w.get_ref().sync_all().map_err(Error::io("fsync", &part))?;
    drop(w);
    durable_rename(&part, &out_path)?;
    guard.disarm();
    Ok(out_path)
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
        let x = extract_single(&z, out.path()).unwrap();
        assert_eq!(std::fs::read(x).unwrap(), vec![7u8; 100_000]);
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
        let err = extract_single(&z, &out).unwrap_err().to_string();
        assert!(err.contains("has a path"), "{err}");
        assert!(!tmp.path().join("evil").exists());
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[test]
    fn zip_with_two_entries_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let z = tmp.path().join("x.zip");
        make_zip(&z, &["a", "b"]);
        let err = extract_single(&z, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("2 entries"), "{err}");
    }
}
