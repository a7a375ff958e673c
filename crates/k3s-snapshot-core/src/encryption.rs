//! Client-side encryption of snapshots in the age v1 format (`age-encryption.org/v1`) with X25519
//! recipients, through the `age` crate, so that the stock `age` CLI decrypts what we write
//! (`age -d -i key.txt snapshot.age > snapshot`) and we decrypt what it writes.
//!
//! - [`Recipients`]: the public keys of `--etcd-snapshot-encryption-recipients-file`, one
//!   `age1…` per line, `#` comments and blank lines ignored, as `age -R` reads them.
//! - [`Identities`]: the private keys of `--etcd-snapshot-encryption-identity-file`
//!   (`AGE-SECRET-KEY-1…` lines, as `age-keygen` writes them and `age -i` reads them). The file is
//!   refused when its group or others may read or write it. Keys never appear in errors, logs or
//!   `Debug`: messages name the file and the line number, never the line.
//! - [`decrypt_to_scratch`]: an age file → a scratch file beside its final name, streaming; age's
//!   authentication (the header MAC and every 64 KiB chunk's tag) refuses a wrong identity, a
//!   truncated file or an altered byte, and nothing is left behind then.
//!
//! The save side ([`crate::save`]) writes through [`Recipients::encrypt_to`].

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::name::AGE_SUFFIX;
use crate::store::{ensure_free_space, ScratchFile};
use crate::{Error, Result};

/// The first line of every age v1 file.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// Flag named in messages about the recipients file.
pub const RECIPIENTS_FLAG: &str = "--etcd-snapshot-encryption-recipients-file";
/// Flag named in messages about the identity file.
pub const IDENTITY_FLAG: &str = "--etcd-snapshot-encryption-identity-file";

/// age's payload: a 16-byte nonce, then chunks of 64 KiB of plaintext, each with a 16-byte tag;
/// the last chunk may be shorter (and is empty only for an empty plaintext).
#[cfg(test)]
const NONCE_LEN: u64 = 16;
const CHUNK: u64 = 64 * 1024;
const TAG: u64 = 16;

/// How many bytes an age stream writes for `plain` bytes after [`Recipients::encrypt_to`]
/// returns: the header and the payload's nonce are written by then, the sealed chunks follow.
pub fn len_after_start(plain: u64) -> u64 {
    let chunks = plain.div_ceil(CHUNK).max(1);
    plain + chunks * TAG
}

/// The public keys snapshots are encrypted to.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
    source: PathBuf,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipients").field("file", &self.source).field("keys", &self.public_keys()).finish()
    }
}

fn key_file_error(flag: &'static str, path: &Path, detail: impl Into<String>) -> Error {
    Error::KeyFile { flag, path: path.to_path_buf(), detail: detail.into() }
}

/// The lines of a key file that hold a key: (1-based line number, trimmed text).
fn key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

impl Recipients {
    /// Reads a recipients file (`age -R`'s format, X25519 keys only).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            key_file_error(
                RECIPIENTS_FLAG,
                path,
                format!("cannot be read ({e}); give a file of age public keys, one per line"),
            )
        })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut keys = Vec::new();
        for (n, line) in key_lines(text) {
            if line.starts_with("AGE-SECRET-KEY-") {
                return Err(key_file_error(
                    RECIPIENTS_FLAG,
                    path,
                    format!("line {n} is a private key; give the public keys (`age-keygen -y` prints them) and keep the private key for {IDENTITY_FLAG}"),
                ));
            }
            let key = age::x25519::Recipient::from_str(line).map_err(|why| {
                key_file_error(
                    RECIPIENTS_FLAG,
                    path,
                    format!(
                        "line {n} is not an age X25519 public key (age1…): {why}; only X25519 recipients are supported"
                    ),
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(key_file_error(RECIPIENTS_FLAG, path, "holds no public key; add one age1… key per line"));
        }
        Ok(Recipients { keys, source: path.to_path_buf() })
    }

    /// The public keys, `age1…`, as recorded in the metadata.
    pub fn public_keys(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.to_string()).collect()
    }

    /// Starts an age file in `out` (the header and the payload nonce are written at once) and
    /// returns the writer that encrypts what it is given. [`age::stream::StreamWriter::finish`]
    /// must be called to write the last chunk.
    pub fn encrypt_to<W: Write>(&self, out: W) -> Result<age::stream::StreamWriter<W>> {
        let encryptor = age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
            .map_err(|e| Error::Invalid(format!("cannot encrypt to the keys of {RECIPIENTS_FLAG}: {e}")))?;
        encryptor.wrap_output(out).map_err(Error::io("write", "the encrypted snapshot"))
    }
}

/// The private keys that decrypt snapshots.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
    source: PathBuf,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").field("file", &self.source).field("keys", &self.keys.len()).finish()
    }
}

impl Identities {
    /// Reads an identity file (`age-keygen`'s output; `age -i`'s format, X25519 keys). Refused
    /// when group or others have any permission on it: `chmod 600` it.
    pub fn from_file(path: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let mut f = std::fs::File::open(path).map_err(|e| {
            key_file_error(IDENTITY_FLAG, path, format!("cannot be read ({e}); give the file age-keygen wrote"))
        })?;
        // The mode of what was opened (a symbolic link, as Kubernetes mounts secrets, is followed).
        let mode = f.metadata().map_err(Error::io("stat", path))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(key_file_error(
                IDENTITY_FLAG,
                path,
                format!(
                    "is accessible by group or others (mode {:o}); it holds private keys: run `chmod 600 {}`",
                    mode & 0o7777,
                    path.display()
                ),
            ));
        }
        let mut text = String::new();
        f.read_to_string(&mut text).map_err(|e| {
            key_file_error(IDENTITY_FLAG, path, format!("cannot be read ({e}); give the file age-keygen wrote"))
        })?;
        let parsed = Self::parse(&text, path);
        // The text held the keys; wipe it rather than leave it in freed memory.
        zeroize_string(&mut text);
        parsed
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut keys = Vec::new();
        for (n, line) in key_lines(text) {
            let key = age::x25519::Identity::from_str(line).map_err(|why| {
                let hint = if line.starts_with("age1") {
                    "it is a public key: give the private key file (age-keygen's output)"
                } else {
                    "only X25519 identities (AGE-SECRET-KEY-1…) are supported"
                };
                key_file_error(IDENTITY_FLAG, path, format!("line {n} is not an age identity ({why}); {hint}"))
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(key_file_error(IDENTITY_FLAG, path, "holds no private key; give the file age-keygen wrote"));
        }
        Ok(Identities { keys, source: path.to_path_buf() })
    }

    /// The file the keys came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// Overwrites a string's bytes in place (its buffer is reused, not reallocated), then empties it.
fn zeroize_string(s: &mut String) {
    let len = s.len();
    s.clear();
    s.extend(std::iter::repeat_n('\0', len));
    s.clear();
}

/// Whether `path`'s file name ends in `.age`.
pub fn has_age_suffix(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(AGE_SUFFIX))
}

/// Whether `path` is an age file: its name ends in `.age`, or it starts with age's first line
/// (a file renamed by hand is still recognised).
pub fn is_encrypted(path: &Path) -> Result<bool> {
    if has_age_suffix(path) {
        return Ok(true);
    }
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let mut head = [0u8; AGE_MAGIC.len()];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io { action: "read", path: path.into(), cause: e }),
        }
    }
    Ok(got == head.len() && head == AGE_MAGIC)
}

/// The name a decrypted file takes: without `.age` (`x.zip.age` → `x.zip`).
pub fn decrypted_name(file: &str) -> &str {
    file.strip_suffix(AGE_SUFFIX).unwrap_or(file)
}

/// Decrypts the age file `src` into a scratch file for `into_dir/<its name without .age>`
/// (see [`ScratchFile`]), streaming, and returns it fsynced. `shown` names the snapshot in
/// messages. Without identities, or when none of them opens the file, or when age's
/// authentication fails anywhere (a truncated or altered file), the error says so in one line
/// and nothing is left in `into_dir`.
pub fn decrypt_to_scratch(src: &Path, into_dir: &Path, ids: Option<&Identities>, shown: &str) -> Result<ScratchFile> {
    let Some(ids) = ids else {
        return Err(Error::NeedIdentity { name: shown.to_string() });
    };
    let fail = |detail: String| Error::Decrypt { name: shown.to_string(), detail };
    let file = std::fs::File::open(src).map_err(Error::io("open", src))?;
    let size = file.metadata().map_err(Error::io("stat", src))?.len();
    let decryptor = age::Decryptor::new_buffered(BufReader::with_capacity(1 << 20, file)).map_err(|e| match e {
        age::DecryptError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            fail("it ends inside its age header (truncated)".into())
        }
        age::DecryptError::Io(e) => fail(format!("cannot read it: {e}")),
        age::DecryptError::UnknownFormat => fail("it is an age file of a version this program does not know".into()),
        other => fail(format!("it is not a readable age file ({other})")),
    })?;
    if decryptor.is_scrypt() {
        return Err(fail("it is encrypted with a passphrase; snapshots are encrypted to X25519 keys".into()));
    }
    let mut reader = decryptor.decrypt(ids.keys.iter().map(|k| k as &dyn age::Identity)).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => fail(format!(
            "none of the keys in {} is one of its recipients; give the identity file of a key it was encrypted to ({IDENTITY_FLAG})",
            ids.source.display()
        )),
        age::DecryptError::InvalidMac | age::DecryptError::InvalidHeader => {
            fail("its age header failed authentication (the file was altered)".into())
        }
        other => fail(other.to_string()),
    })?;
    let file_name = src.file_name().and_then(|n| n.to_str()).unwrap_or(shown);
    let target = into_dir.join(decrypted_name(file_name));
    // The plaintext is never longer than the age file.
    ensure_free_space(into_dir, size, &format!("the decrypted {shown}"))?;
    let scratch = ScratchFile::create(&target)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, scratch.file());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(fail("it is truncated (age's last chunk is missing)".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(fail(format!("it is truncated or was altered: age authentication failed ({e})")))
            }
            Err(e) => return Err(fail(format!("cannot read it: {e}"))),
        };
        w.write_all(&buf[..n]).map_err(Error::io("write", scratch.path()))?;
    }
    w.flush().map_err(Error::io("write", scratch.path()))?;
    drop(w);
    scratch.sync()?;
    tracing::debug!(snapshot = %shown, to = %scratch.path().display(), "decrypted snapshot");
    Ok(scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> (String, String) {
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        use age::secrecy::ExposeSecret;
        (id.to_string().expose_secret().to_string(), public)
    }

    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn encrypt(r: &Recipients, plain: &[u8]) -> Vec<u8> {
        let mut w = r.encrypt_to(Vec::new()).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap()
    }

    /// A writer whose bytes can be looked at while age still holds it.
    #[derive(Clone, Default)]
    struct Shared(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn length_after_the_start_is_what_age_writes() {
        let (_, public) = keypair();
        let r = Recipients::parse(&public, Path::new("r")).unwrap();
        for n in [0usize, 1, 65535, 65536, 65537, 3 * 65536, 200_000] {
            // Each file has its own random header (age adds a "grease" stanza): measure what
            // this one wrote when it started, as the save does.
            let out = Shared::default();
            let mut w = r.encrypt_to(out.clone()).unwrap();
            let started = out.0.borrow().len();
            let mac_line_end = started - NONCE_LEN as usize;
            assert_eq!(out.0.borrow()[mac_line_end - 1], b'\n', "the nonce follows the MAC line");
            w.write_all(&vec![7u8; n]).unwrap();
            w.finish().unwrap();
            assert_eq!(out.0.borrow().len() as u64, started as u64 + len_after_start(n as u64), "{n} bytes");
        }
    }

    #[test]
    fn round_trip_through_a_scratch_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (secret, public) = keypair();
        let rf = tmp.path().join("recipients.txt");
        std::fs::write(&rf, format!("# backups\n\n{public}\n")).unwrap();
        let r = Recipients::from_file(&rf).unwrap();
        assert_eq!(r.public_keys(), vec![public.clone()]);
        let idf = tmp.path().join("key.txt");
        write_private(&idf, &format!("# created: now\n# public key: {public}\n{secret}\n"));
        let ids = Identities::from_file(&idf).unwrap();
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let src = tmp.path().join("s-n1-5.zip.age");
        std::fs::write(&src, encrypt(&r, &plain)).unwrap();
        assert!(is_encrypted(&src).unwrap());
        let renamed = tmp.path().join("renamed");
        std::fs::copy(&src, &renamed).unwrap();
        assert!(is_encrypted(&renamed).unwrap(), "recognised by its first line");
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let x = decrypt_to_scratch(&src, &out, Some(&ids), "s-n1-5.zip.age").unwrap();
        assert_eq!(x.target(), out.join("s-n1-5.zip"));
        assert_eq!(std::fs::read(x.path()).unwrap(), plain);
        drop(x);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "a scratch file goes when dropped");
        // Debug shows neither key material.
        let dbg = format!("{ids:?} {r:?}");
        assert!(!dbg.contains(&secret) && !dbg.contains("AGE-SECRET-KEY"), "{dbg}");
    }

    #[test]
    fn refusals_leave_nothing_and_never_show_a_key() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, public) = keypair();
        let (other_secret, _) = keypair();
        let r = Recipients::parse(&public, Path::new("r")).unwrap();
        let plain = vec![1u8; 200_000];
        let good = encrypt(&r, &plain);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let idf = tmp.path().join("other.txt");
        write_private(&idf, &format!("{other_secret}\n"));
        let wrong = Identities::from_file(&idf).unwrap();
        let case = |name: &str, bytes: &[u8], ids: Option<&Identities>| {
            let p = tmp.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = decrypt_to_scratch(&p, &out, ids, name).unwrap_err().to_string();
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{name}: {e}");
            assert!(!e.contains(&other_secret), "{e}");
            e
        };
        let e = case("a-b-1.age", &good, None);
        assert!(e.contains(IDENTITY_FLAG), "{e}");
        let e = case("a-b-2.age", &good, Some(&wrong));
        assert!(e.contains("none of the keys") && e.contains(IDENTITY_FLAG), "{e}");

        // The right key, but the file cut short or with a byte changed.
        let (secret, public) = keypair();
        let r = Recipients::parse(&public, Path::new("r")).unwrap();
        let good = encrypt(&r, &plain);
        let idf = tmp.path().join("right.txt");
        write_private(&idf, &format!("{secret}\n"));
        let right = Identities::from_file(&idf).unwrap();
        let e = case("a-b-3.age", &good[..good.len() - 100], Some(&right));
        assert!(e.contains("truncated"), "{e}");
        let e = case("a-b-4.age", &good[..good.len() - (64 * 1024 + 32)], Some(&right));
        assert!(e.contains("truncated"), "{e}");
        let mut tampered = good.clone();
        let at = tampered.len() - 5000;
        tampered[at] ^= 1;
        let e = case("a-b-5.age", &tampered, Some(&right));
        assert!(e.contains("altered"), "{e}");
        let e = case("a-b-6.age", &good[..40], Some(&right));
        assert!(e.contains("cannot be decrypted"), "{e}");
    }

    #[test]
    fn key_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (secret, public) = keypair();
        let idf = tmp.path().join("key.txt");
        std::fs::write(&idf, format!("{secret}\n")).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o700 | 0o010] {
            std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Identities::from_file(&idf).unwrap_err().to_string();
            assert!(e.contains("chmod 600") && e.contains(IDENTITY_FLAG), "{mode:o}: {e}");
            assert!(!e.contains(&secret));
        }
        std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(0o400)).unwrap();
        Identities::from_file(&idf).unwrap();

        let bad = tmp.path().join("bad.txt");
        write_private(&bad, &format!("{public}\n"));
        let e = Identities::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("public key"), "{e}");
        let e = Recipients::parse(&format!("# x\n{secret}\n"), Path::new("r.txt")).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("private key") && !e.contains(&secret), "{e}");
        let e = Recipients::parse("# nothing\n", Path::new("r.txt")).unwrap_err().to_string();
        assert!(e.contains("no public key") && e.contains(RECIPIENTS_FLAG), "{e}");
        let e = Recipients::parse("ssh-ed25519 AAAA", Path::new("r.txt")).unwrap_err().to_string();
        assert!(e.contains("X25519"), "{e}");
    }
}
