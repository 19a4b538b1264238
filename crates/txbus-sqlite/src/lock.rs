//! One process per store file: an exclusive lock on a file beside the database.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use txbus_core::store::Error;

/// Held for as long as the store is open; the OS releases it if the process dies.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn acquire(db: &Path) -> Result<Self, Error> {
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)
            .map_err(|e| {
                Error::backend(
                    format!("opening lock file {}", Path::new(&name).display()),
                    e,
                )
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(Error::Locked {
                path: db.display().to_string(),
            }),
            Err(TryLockError::Error(e)) => Err(Error::backend("locking the store file", e)),
        }
    }
}
