//! Atomic file writes (temporary file, fsync, rename), with no tensor
//! crate behind them: the checkpoint, the tokenizer and the drafter all
//! save through here, so `drafter/` has no path to candle.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that a reader sees the old file or the whole
/// new one, never a part: write a temporary beside it, fsync, rename.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The temporary file beside `path` (`<name>.tmp`).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
