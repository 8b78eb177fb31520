//! Durable state files: one way to write a file so a crash leaves either the old or the new version (a
//! fsynced temporary file renamed over it, then the directory fsynced).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Moves a state file this build cannot read (another version's, or damaged) aside to
/// `<name>.unreadable-<unix seconds>`, so that starting anew never overwrites it; logs where it went.
pub fn set_aside(path: &Path, why: &dyn std::fmt::Display) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".unreadable-{}", crate::clock::unix_seconds()));
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            error = %why,
            file = %path.display(),
            kept = %Path::new(&aside).display(),
            "could not read a state file; it is kept aside and a new one started"
        ),
        Err(e) => tracing::error!(
            error = %why,
            file = %path.display(),
            move_error = %e,
            "could not read a state file nor move it aside"
        ),
    }
}

/// Flushes the named files of `dir` that exist, then `dir` itself, to stable storage: files someone else
/// wrote (an operator's copy) must be on disk before an index that names them is. A file system that
/// cannot sync (`EINVAL`, `EROFS`) has nothing of ours to flush and is not an error.
pub fn sync_files(dir: &Path, names: &[&str]) -> std::io::Result<()> {
    let sync = |path: &Path| match std::fs::File::open(path).and_then(|f| f.sync_all()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EROFS)) => Ok(()),
        other => other,
    };
    for name in names {
        sync(&dir.join(name))?;
    }
    sync(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

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
