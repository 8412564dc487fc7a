//! `gpt-serve count-ngrams`: counts the drafter's n-gram continuation
//! tables (`drafter::ngram`) on the train split's text, writes them beside
//! the checkpoint's drafter file and names them there, so sampled drafts
//! rank the tables' successors as well as the trees' candidates.

use std::path::PathBuf;

use crate::checkpoint;
use crate::drafter::ngram::{Ngrams, MAX_BYTES};
use crate::drafter::Drafter;
use crate::tokenizer::Tokenizer;
use crate::train::data::load_tokens;

/// The table file's name beside `drafter.json`.
pub const NGRAMS_FILE: &str = "drafter-ngrams.bin";

#[derive(clap::Args, Debug)]
pub struct CountNgramsArgs {
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// Text to count on (the train split only: the tables must not see
    /// the text they are measured on).
    #[arg(long, default_value = "../shared/data/gutenberg/train.txt.gz")]
    pub data: PathBuf,
    /// Byte budget of the table file (at most the 8 MiB a drafter loads).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_bytes: usize,
    /// Share of the trees' outside mass given to the tables' successors.
    #[arg(long, default_value_t = 1.0)]
    pub weight: f32,
    /// Where the tokenized text is cached between runs.
    #[arg(long, default_value = "runs/cache")]
    pub cache_dir: PathBuf,
}

/// Counts, writes and links the tables.
pub fn run(a: &CountNgramsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.max_bytes <= MAX_BYTES,
        "--max-bytes {} is over the limit of {MAX_BYTES} a drafter loads",
        a.max_bytes
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.weight),
        "--weight {} must be in 0..=1",
        a.weight
    );
    let tok = Tokenizer::from_file(&a.model.join(checkpoint::TOKENIZER_FILE))?;
    let tokens = load_tokens(std::slice::from_ref(&a.data), &tok, Some(&a.cache_dir))?;
    let table = Ngrams::count(&tokens, tok.vocab_size(), a.max_bytes)
        .map_err(|e| anyhow::anyhow!("counting n-grams on {}: {e}", a.data.display()))?;
    let path = a.model.join(checkpoint::DRAFTER_FILE);
    let mut drafter = Drafter::load(&path, tok.vocab_size())?;
    let out = a.model.join(NGRAMS_FILE);
    table.save(&out)?;
    drafter.ngram_file = Some(NGRAMS_FILE.to_string());
    drafter.ngram_weight = a.weight;
    drafter.save(&path)?;
    let (bi, tri) = table.contexts();
    eprintln!(
        "count-ngrams: {} tokens; {bi} bigram and {tri} trigram contexts, {} bytes in {}",
        tokens.len(),
        std::fs::metadata(&out)?.len(),
        out.display()
    );
    Ok(())
}
