//! Corpus -> documents -> token stream, cached on disk, and seeded batches.
//!
//! Files are plain text or `.gz`. A file is one document, except that a
//! `books.tsv` beside it (columns split, bytes, title; the layout of
//! ../shared/data/gutenberg) splits it into its books. Documents are joined
//! with `<|endoftext|>`. Encoding runs on all threads over newline-aligned
//! chunks and is cached as u16/u32 by a key of the files and the tokenizer.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("corpus file {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read corpus file {path}: {msg}")]
    Unreadable { path: PathBuf, msg: String },
    #[error("corpus file {path} is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("the corpus is empty (no text in {0})")]
    Empty(String),
    #[error("the {split} split has {have} tokens; a batch needs at least block_size + 1 = {need}")]
    TooShort {
        split: &'static str,
        have: usize,
        need: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

type Result<T> = std::result::Result<T, DataError>;

/// Reads one corpus file (plain or gzip) as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(DataError::Missing(path.to_path_buf()));
    }
    let unreadable = |e: std::io::Error| DataError::Unreadable {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let raw = std::fs::read(path).map_err(unreadable)?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(unreadable)?;
        out
    } else {
        raw
    };
    String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Splits `text` into the books listed in a sibling `books.tsv` when the
/// sizes of the rows of this split ("train" for train.txt.gz) add up to the
/// file (books joined by "\n\n"); otherwise the file is one document.
fn split_documents(path: &Path, text: String) -> Vec<String> {
    let split = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .unwrap_or("");
    let tsv = path.with_file_name("books.tsv");
    let Ok(index) = std::fs::read_to_string(&tsv) else {
        return vec![text];
    };
    let sizes: Vec<usize> = index
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split('\t');
            (cols.next()? == split).then_some(())?;
            cols.next()?.parse().ok()
        })
        .collect();
    let total: usize = sizes.iter().sum::<usize>() + 2 * sizes.len().saturating_sub(1);
    if sizes.is_empty() || total.abs_diff(text.len()) > 2 {
        return vec![text];
    }
    let mut docs = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for s in sizes {
        let end = (at + s).min(text.len());
        match text.get(at..end) {
            Some(d) => docs.push(d.to_string()),
            None => return vec![text],
        }
        at = end + 2;
    }
    docs
}

/// Reads every file and returns its documents.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    if paths.is_empty() {
        return Err(DataError::Empty("no files given".into()));
    }
    let mut docs = Vec::new();
    for p in paths {
        let text = read_text(p)?;
        if !text.trim().is_empty() {
            docs.extend(split_documents(p, text));
        }
    }
    if docs.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::Empty(names.join(", ")));
    }
    Ok(docs)
}

/// Encodes documents in parallel, each followed by `<|endoftext|>`.
pub fn encode_documents(tok: &Tokenizer, docs: &[String]) -> Result<Vec<u32>> {
    const CHUNK: usize = 1 << 16;
    let mut pieces: Vec<(usize, &str)> = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let mut rest = doc.as_str();
        while !rest.is_empty() {
            let mut cut = rest.len().min(CHUNK);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut < rest.len() {
                cut = rest[..cut].rfind('\n').map_or(cut, |i| i + 1);
            }
            pieces.push((d, &rest[..cut]));
            rest = &rest[cut..];
        }
    }
    let texts: Vec<&str> = pieces.iter().map(|p| p.1).collect();
    let encoded = tok
        .encode_batch(&texts)
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let mut out = Vec::with_capacity(encoded.iter().map(Vec::len).sum::<usize>() + docs.len());
    for (i, ids) in encoded.into_iter().enumerate() {
        out.extend(ids);
        if pieces.get(i + 1).is_none_or(|next| next.0 != pieces[i].0) {
            out.push(tok.eot());
        }
    }
    Ok(out)
}

/// FNV-1a, for cache keys (stable across builds, unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub const FNV_SEED: u64 = 0xcbf29ce484222325;

fn cache_key(paths: &[PathBuf], tok: &Tokenizer) -> u64 {
    let mut h = FNV_SEED;
    for p in paths {
        h = fnv1a(p.to_string_lossy().as_bytes(), h);
        if let Ok(m) = std::fs::metadata(p) {
            h = fnv1a(&m.len().to_le_bytes(), h);
            if let Ok(t) = m.modified() {
                let secs = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                h = fnv1a(&secs.to_le_bytes(), h);
            }
        }
    }
    fnv1a(tok.to_json().unwrap_or_default().as_bytes(), h)
}

/// Token stream of `paths`, from the cache in `cache_dir` when present.
pub fn load_tokens(
    paths: &[PathBuf],
    tok: &Tokenizer,
    cache_dir: Option<&Path>,
) -> Result<Vec<u32>> {
    let wide = tok.vocab_size() > u16::MAX as usize;
    let file = cache_dir.map(|d| {
        d.join(format!(
            "tokens-{:016x}.{}",
            cache_key(paths, tok),
            if wide { "u32" } else { "u16" }
        ))
    });
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            return Ok(if wide {
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                    .collect()
            });
        }
    }
    let docs = read_documents(paths)?;
    let tokens = encode_documents(tok, &docs)?;
    if let Some(f) = &file {
        let bytes: Vec<u8> = if wide {
            tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
        } else {
            tokens
                .iter()
                .flat_map(|t| (*t as u16).to_le_bytes())
                .collect()
        };
        // A cache that cannot be written only costs time next run.
        if std::fs::create_dir_all(f.parent().unwrap_or(Path::new("."))).is_ok() {
            let _ = crate::checkpoint::write_atomic(f, &bytes);
        }
    }
    Ok(tokens)
}

/// Splits documents into train and val reproducibly: with 20+ documents,
/// about `val_frac` of them by a seeded hash of their index (at least one);
/// with fewer, the last `val_frac` of the token stream.
pub fn split_by_document(
    docs: Vec<String>,
    val_frac: f64,
    seed: u64,
) -> (Vec<String>, Vec<String>) {
    if docs.len() < 20 {
        return (docs, vec![]);
    }
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        let h = fnv1a(&(i as u64 ^ seed.rotate_left(17)).to_le_bytes(), FNV_SEED);
        if (h % 10_000) as f64 / 10_000.0 < val_frac {
            val.push(d);
        } else {
            train.push(d);
        }
    }
    if val.is_empty() {
        val.push(train.pop().expect("20+ documents"));
    }
    (train, val)
}

/// A seeded batch of `b` windows of `t + 1` tokens: inputs and targets,
/// (b * t) each, row-major. Batch `step` of a run is always the same.
pub fn batch(tokens: &[u32], b: usize, t: usize, seed: u64, step: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ step.wrapping_mul(0x9E3779B97F4A7C15));
    let mut x = Vec::with_capacity(b * t);
    let mut y = Vec::with_capacity(b * t);
    for _ in 0..b {
        let start = rng.random_range(0..tokens.len() - t);
        x.extend_from_slice(&tokens[start..start + t]);
        y.extend_from_slice(&tokens[start + 1..start + t + 1]);
    }
    (x, y)
}

/// Checks that a split can fill one window of `block` tokens.
pub fn check_len(split: &'static str, tokens: &[u32], block: usize) -> Result<()> {
    if tokens.len() < block + 1 {
        return Err(DataError::TooShort {
            split,
            have: tokens.len(),
            need: block + 1,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let e = read_text(Path::new("/nonexistent/x.txt")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.txt"));
    }

    #[test]
    fn non_utf8_input_is_reported_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, b"abc\xff\xfe").unwrap();
        let e = read_text(&p).unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 3"), "{e}");
    }

    #[test]
    fn gz_files_are_read() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all("hello world".as_bytes()).unwrap();
        std::fs::write(&p, enc.finish().unwrap()).unwrap();
        assert_eq!(read_text(&p).unwrap(), "hello world");
    }

    #[test]
    fn books_tsv_splits_a_file_into_books() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("books.tsv"),
            "split\tbytes\tbook\ntrain\t3\ta\ntrain\t4\tb\nval\t9\tc\n",
        )
        .unwrap();
        let p = dir.path().join("train.txt");
        std::fs::write(&p, "abc\n\ndefg").unwrap();
        assert_eq!(
            read_documents(&[p]).unwrap(),
            vec!["abc".to_string(), "defg".to_string()]
        );
    }

    #[test]
    fn encoding_chunks_split_only_at_character_boundaries() {
        let doc = "é“".repeat(40_000);
        let tok = Tokenizer::train_bpe([doc.as_str()].into_iter(), 300).unwrap();
        let ids = encode_documents(&tok, std::slice::from_ref(&doc)).unwrap();
        assert_eq!(tok.decode(&ids[..ids.len() - 1]).unwrap(), doc);
    }

    #[test]
    fn batches_are_reproducible_and_shifted_by_one() {
        let tokens: Vec<u32> = (0..1000).collect();
        let (x, y) = batch(&tokens, 4, 16, 7, 3);
        assert_eq!((x.clone(), y.clone()), batch(&tokens, 4, 16, 7, 3));
        assert!(x.iter().zip(&y).all(|(a, b)| a + 1 == *b));
        assert_ne!(x, batch(&tokens, 4, 16, 7, 4).0);
    }

    #[test]
    fn document_split_is_reproducible_and_disjoint() {
        let docs: Vec<String> = (0..200).map(|i| format!("doc {i}")).collect();
        let (tr, va) = split_by_document(docs.clone(), 0.1, 1);
        assert_eq!((tr.clone(), va.clone()), split_by_document(docs, 0.1, 1));
        assert_eq!(tr.len() + va.len(), 200);
        assert!(!va.is_empty() && va.len() < 50);
    }
}
