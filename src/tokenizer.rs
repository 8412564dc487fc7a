//! Text <-> token ids, wrapping a Hugging Face `tokenizers` byte-level BPE.
//!
//! The checkpoint carries `tokenizer.json`; `train` either learns a BPE on the
//! corpus (small vocabularies suit small models) or builds GPT-2's from its
//! `vocab.json` + `merges.txt`. Both reserve `<|endoftext|>`, which joins
//! documents so the model learns to stop. [`StreamDecoder`] turns a growing
//! list of ids into text pieces that never split a multi-byte UTF-8 character.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer, TokenizerBuilder};

pub const EOT: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer file {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("tokenizer has no `{EOT}` token")]
    NoEot,
    #[error("tokenizer: {0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, TokenizerError>;

fn other<E: std::fmt::Display>(e: E) -> TokenizerError {
    TokenizerError::Other(e.to_string())
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    eot: u32,
    /// Whether each token's text starts a new word (begins with a space or
    /// newline); drafter features use it.
    word_start: Vec<bool>,
    /// Bytes of the longest token's text: a text of `b` bytes has at least
    /// `b / max_token_bytes` tokens.
    max_token_bytes: usize,
}

impl Tokenizer {
    fn wrap(inner: HfTokenizer) -> Result<Self> {
        let eot = inner.token_to_id(EOT).ok_or(TokenizerError::NoEot)?;
        let n = inner.get_vocab_size(true);
        let texts: Vec<String> = (0..n as u32)
            .map(|id| inner.decode(&[id], false).unwrap_or_default())
            .collect();
        let word_start = texts
            .iter()
            .map(|s| s.starts_with([' ', '\n', '\t']))
            .collect();
        // A lone byte of a multi-byte character decodes to U+FFFD (3
        // bytes): an overestimate, which keeps the bound safe.
        let max_token_bytes = texts.iter().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self {
            inner,
            eot,
            word_start,
            max_token_bytes,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = HfTokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::wrap(inner)
    }

    /// GPT-2's tokenizer from a directory holding `vocab.json` and `merges.txt`.
    pub fn gpt2(dir: &Path) -> Result<Self> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| TokenizerError::Load {
                path: dir.display().to_string(),
                msg: e.to_string(),
            })?;
        let mut t = HfTokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        t.with_decoder(Some(ByteLevel::default()));
        t.add_special_tokens(&[AddedToken::from(EOT, true)]);
        Self::wrap(t)
    }

    /// Trains a byte-level BPE of `vocab_size` tokens (EOT included) on `texts`.
    pub fn train_bpe<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
    ) -> Result<Self> {
        if vocab_size < 257 + 1 {
            return Err(TokenizerError::Other(format!(
                "vocab_size must be at least 258 for a byte-level BPE (256 bytes + {EOT}), got {vocab_size}"
            )));
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut t = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(other)?;
        t.train(&mut trainer, texts).map_err(other)?;
        let json = t.to_string(false).map_err(other)?;
        let inner: HfTokenizer = json.parse().map_err(other)?;
        Self::wrap(inner)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        crate::atomic_file::write(path, json.as_bytes()).map_err(other)
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(other)
    }

    pub fn eot(&self) -> u32 {
        self.eot
    }

    /// Bytes of the longest token's text.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn word_start(&self) -> &[bool] {
        &self.word_start
    }

    /// Encodes text; `<|endoftext|>` in the text is the special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(other)?
            .get_ids()
            .to_vec())
    }

    /// Encodes many texts on all threads.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(other)
    }

    /// The text of one token (may be a partial UTF-8 character, shown as U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Byte length of each token's decoded text when decoded in sequence;
    /// used for `text_offset` in logprobs.
    pub fn token_texts(&self, ids: &[u32]) -> Vec<String> {
        let mut dec = StreamDecoder::new();
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            out.push(dec.push(self, id));
        }
        out
    }
}

/// Incremental decoding that holds back bytes of an unfinished UTF-8
/// character, so streamed pieces concatenate to the full decode.
#[derive(Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Length of the text already emitted (decode of `ids[..read]`).
    emitted: usize,
    prefix_start: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the newly completed text ("" while a character
    /// is unfinished).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        // Decode from a few tokens back so the byte-level decoder sees the
        // pieces of a split character together.
        let window = &self.ids[self.prefix_start..];
        let text = tok.decode(window).unwrap_or_default();
        if text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        // Restart the window once everything decoded cleanly.
        self.prefix_start = self.ids.len();
        self.emitted = 0;
        new
    }

    /// Whatever is still held back (an unfinished character at the end).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let text = tok
            .decode(&self.ids[self.prefix_start..])
            .unwrap_or_default();
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        self.prefix_start = self.ids.len();
        self.emitted = 0;
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained() -> Tokenizer {
        let text =
            "the cat sat on the mat. the dog sat on the log. ünïcödé and 日本語 text.\n".repeat(20);
        Tokenizer::train_bpe([text.as_str()].into_iter(), 300).unwrap()
    }

    #[test]
    fn bpe_round_trips_text_and_reserves_eot() {
        let t = trained();
        let s = "the cat sat on the log. 日本語";
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
        let ids = t.encode("a<|endoftext|>b").unwrap();
        assert!(ids.contains(&t.eot()));
    }

    #[test]
    fn streaming_decode_never_splits_a_character() {
        let t = trained();
        let s = "x 日本語 ü!";
        let ids = t.encode(s).unwrap();
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for id in ids {
            let piece = d.push(&t, id);
            assert!(!piece.contains('\u{FFFD}'), "piece {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.flush(&t));
        assert_eq!(out, s);
    }

    #[test]
    fn a_too_small_vocab_is_refused_with_the_limit() {
        let e = Tokenizer::train_bpe(["abc"].into_iter(), 100)
            .err()
            .unwrap();
        assert!(e.to_string().contains("at least 258"));
    }
}
