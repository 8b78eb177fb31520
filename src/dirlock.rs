//! One process per data directory. A single process keeps its state in files beside `feedback.sqlite`
//! (`registry.json`, `rollouts.json`, `jobs.json`) and rewrites them whole; a second process on the same
//! directory would overwrite the first's changes and run its queued jobs again. Each holder takes an
//! exclusive advisory lock on `<dir>/flywheel.lock`, which the operating system drops when the process
//! ends however it ends, so a `kill -9` leaves nothing stale behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "flywheel.lock";

/// Why the data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another process holds the directory.
    #[error(
        "the data directory {} is in use by another flywheel process ({holder}): stop it first, or give this \
         one its own --data-dir",
        dir.display()
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// What the holder wrote into the lock file: its process id, host, command and start time.
        holder: String,
    },
    /// The lock file could not be created, locked or written.
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The data directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes `dir` (creating it if need be) for this process, which runs `command` (`serve`, `migrate`):
    /// fails at once, naming the holder, when another process has it.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self, DirLockError> {
        let io = |source| DirLockError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Not truncated on open: until the lock is ours, the file names the holder.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // Best effort: a holder that has not written yet is still a holder.
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(DirLockError::Held {
                    dir: dir.to_owned(),
                    holder: if holder.is_empty() {
                        "it has not said which".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let me = format!(
            "pid {} on {}, flywheel {command}, since {}",
            std::process::id(),
            host_name(),
            crate::clock::rfc3339(crate::clock::unix_seconds())
        );
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(me.as_bytes()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// This machine's name (a pod's, on Kubernetes), or "localhost" where the system does not say.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first =
            DataDirLock::acquire(&data, "serve").expect("the directory is created and taken");
        // Locks on separate opens of the file exclude each other within one process too.
        match DataDirLock::acquire(&data, "migrate") {
            Err(DirLockError::Held { holder, .. }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id()))
                        && holder.contains("flywheel serve"),
                    "{holder}"
                );
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        let second = DataDirLock::acquire(&data, "migrate").expect("free once dropped");
        let written = std::fs::read_to_string(data.join(LOCK_FILE)).unwrap();
        assert!(written.contains("flywheel migrate"), "{written}");
        assert!(
            !written.contains("serve"),
            "the old holder is overwritten: {written}"
        );
        drop(second);
    }
}
