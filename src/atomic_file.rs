//! Atomic, durable file writes (temporary file, fsync, rename, fsync of the
//! directory), with no tensor crate behind them: the checkpoint, the
//! tokenizer and the drafter all save through here, so `drafter/` has no
//! path to candle.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that a reader sees the old file or the whole
/// new one, never a part, and the new one survives a power cut once this
/// returns: write a temporary beside it, fsync, rename, fsync the directory.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = fresh_tmp_path(path)?;
    // create_new (O_CREAT | O_EXCL) never follows a symlink: one planted at
    // the temporary's name after `fresh_tmp_path` removed it is an error,
    // not a write through it.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    rename_durably(&tmp, path)
}

/// Renames a written and synced `tmp` over `path`, then fsyncs the
/// directory so that the rename itself is on disk.
pub fn rename_durably(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    sync_dir(parent(path))
}

/// Fsyncs the file at `path` (written by code that does not sync it).
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Fsyncs a directory, making the creations, renames and removals in it
/// durable. A no-op where directories cannot be opened (not Unix).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The temporary file beside `path` (`<name>.tmp`).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// [`tmp_path`], with whatever was left at that name removed first: a file
/// from an interrupted write, or a symlink planted there, which is removed
/// itself and never followed (so a write cannot land in its target).
pub fn fresh_tmp_path(path: &Path) -> std::io::Result<PathBuf> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(tmp),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write(&p, b"old").unwrap();
        write(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(!tmp_path(&p).exists());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("a.json");
        std::os::unix::fs::symlink(&victim, tmp_path(&p)).unwrap();
        write(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(tmp_path(&p)).is_err());
    }
}
