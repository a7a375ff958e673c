//! One server per data dir: an exclusive `flock` on `server/k3s-snapshot.lock`, held for the life
//! of the process (and released by the kernel if it dies, so a crash never leaves a stale lock).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg};

use crate::layout::DataDir;
use crate::{Error, Result};

/// The held lock; dropping it releases the data dir.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
}

impl DataDirLock {
    /// Takes the lock without waiting; refused with [`Error::Locked`] when another process holds it.
    pub fn acquire(dd: &DataDir) -> Result<Self> {
        k3s_snapshot_core::store::create_private_dir(&dd.server())?;
        let path = dd.lock();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // Never through a symbolic link planted at the name.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("open lock file", &path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                // The pid is for people looking at the file; the lock itself is what counts.
                let _ = lock.set_len(0);
                let _ = writeln!(&mut *lock, "{}", std::process::id());
                Ok(DataDirLock { _lock: lock })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(Error::Locked { data_dir: dd.root().to_path_buf(), lock: path })
            }
            Err((_, errno)) => Err(Error::Io { action: "lock", path, cause: errno.into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_data_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        let l = DataDirLock::acquire(&dd).unwrap();
        let err = DataDirLock::acquire(&dd).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        drop(l);
        DataDirLock::acquire(&dd).unwrap();
    }
}
