//! Durable state files: one way to write a file so a crash leaves either the old or the new version (a
//! fsynced temporary file renamed over it, then the directory fsynced), and a [`SnapshotFile`] for state
//! that is snapshotted under a lock and written after the lock is released, so no request waits for a
//! disk while a writer holds the lock it needs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Writes `bytes` to `path` via a fsynced temporary file and a rename, then fsyncs the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::faults::before_durable_write(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    // A name of its own per call: two threads writing the same file must not rename each other's file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Names are unique per call, so a failed write must not leave its file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is the commit: a failed directory fsync after it must not make callers roll back state
    // that is already on disk.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(error = %e, path = %path.display(), "directory fsync after rename failed");
    }
    Ok(())
}

/// A state file written from numbered snapshots: callers take a snapshot and its number under their state
/// lock (see [`SnapshotFile::next_version`]), release the lock, then [`SnapshotFile::write`]; writes are
/// serialised here, and a snapshot older than the one on disk is skipped, so the file always ends at the
/// newest state even when writers finish out of order.
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    versions: AtomicU64,
    written: Mutex<u64>,
}

impl SnapshotFile {
    /// A snapshot file at `path` (not read or created until the first write).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            versions: AtomicU64::new(0),
            written: Mutex::new(0),
        }
    }

    /// Where the file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of a snapshot being taken now; call it under the lock that guards the state.
    pub fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Writes snapshot `version` unless a newer one is on disk already; returns whether it wrote.
    pub fn write(&self, version: u64, bytes: &[u8]) -> std::io::Result<bool> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if version <= *written {
            return Ok(false);
        }
        write_atomically(&self.path, bytes)?;
        *written = version;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_snapshot_never_overwrites_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::new(dir.path().join("state.json"));
        let (old, new) = (file.next_version(), file.next_version());
        assert!(file.write(new, b"new").unwrap());
        assert!(
            !file.write(old, b"old").unwrap(),
            "the stale snapshot is skipped"
        );
        assert_eq!(std::fs::read(file.path()).unwrap(), b"new");
        let newer = file.next_version();
        assert!(file.write(newer, b"newer").unwrap());
        assert_eq!(std::fs::read(file.path()).unwrap(), b"newer");
    }

    #[test]
    fn an_atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
