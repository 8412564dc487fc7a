//! The shipped model (models/default): small enough for git and for serving
//! on 2 cores, loads with its drafter, and samples from it are made of
//! English words. Speed itself is measured by `gpt-serve bench`, not here.

#[path = "common/skip.rs"]
mod skip;

use std::collections::HashSet;
use std::path::PathBuf;

use candle_core::Device;
use gpt_serve::checkpoint;
use gpt_serve::decode::proposer::Plain;
use gpt_serve::decode::{GenParams, Generator};
use gpt_serve::drafter::Drafter;
use gpt_serve::sampling::SamplingParams;

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default")
}

/// Lower-cased runs of ASCII letters.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

#[test]
fn the_shipped_model_is_small_enough_to_commit_and_to_serve_on_two_cores() {
    let dir = shipped();
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        bytes <= 40 << 20,
        "models/default holds {bytes} bytes (limit 40 MiB)"
    );
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let cfg = &loaded.config.model;
    // Decode cost grows with the weights read per token: the `small` preset
    // (13.9 M parameters) is where our f32 decode still beats PyTorch eager
    // on 2 cores (bench/plain-vs-reference.md); the shipped 6 x 384 has 12.3 M.
    assert!(
        cfg.n_params() <= 15_000_000,
        "{} parameters",
        cfg.n_params()
    );
    assert_eq!(loaded.config.dtype, "f16", "weights are stored f16");
    assert!(cfg.exits.len() >= 2, "the served model has early exits");
    let model = loaded.cpu(loaded.serving_dtype()).unwrap();
    Drafter::load(&dir.join(checkpoint::DRAFTER_FILE), cfg.vocab_size).unwrap();
    let prompt = loaded.tokenizer.encode("The old house stood").unwrap();
    let params = GenParams {
        max_tokens: 24,
        stop_at_eot: false,
        ..Default::default()
    };
    let (mut g, _) =
        Generator::new(&model, Box::new(Plain), &prompt, params, u32::MAX, None).unwrap();
    assert_eq!(g.run().unwrap().len(), 24);
}

#[test]
fn samples_of_the_shipped_model_are_mostly_english_words() {
    let val = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gutenberg/val.txt.gz");
    if !val.exists() {
        skip::skip(&format!(
            "{} is absent (the dictionary comes from it)",
            val.display()
        ));
        return;
    }
    // Words of books the model never saw.
    let known: HashSet<String> = words(&gpt_serve::train::data::read_text(&val).unwrap())
        .into_iter()
        .collect();
    let loaded = checkpoint::load(&shipped(), &Device::Cpu).unwrap();
    let model = loaded.cpu(loaded.serving_dtype()).unwrap();
    let (mut total, mut found) = (0usize, 0usize);
    for (i, start) in [
        "It was a dark night, and",
        "The king said to his son",
        "She opened the door and",
    ]
    .iter()
    .enumerate()
    {
        for seed in 0..4 {
            let prompt = loaded.tokenizer.encode(start).unwrap();
            let params = GenParams {
                max_tokens: 64,
                sampling: SamplingParams {
                    temperature: 0.8,
                    seed: 100 * i as u64 + seed,
                    ..Default::default()
                },
                stop_at_eot: false,
                ..Default::default()
            };
            let (mut g, _) =
                Generator::new(&model, Box::new(Plain), &prompt, params, u32::MAX, None).unwrap();
            let ids: Vec<u32> = g.run().unwrap().iter().map(|t| t.id).collect();
            let w = words(&loaded.tokenizer.decode(&ids).unwrap());
            total += w.len();
            found += w.iter().filter(|w| known.contains(*w)).count();
        }
    }
    let share = found as f64 / total as f64;
    eprintln!("{found} of {total} sampled words are words of the val split ({share:.3})");
    // Measured: the CPU-trained 6 x 256 models (val loss 5.27 / 4.96) 0.818 /
    // 0.863; the GPU-trained 6 x 384 one (3.81) 0.960. The bar sits between,
    // so that shipping a model like the earlier ones fails.
    assert!(
        share >= 0.93,
        "only {share:.3} of the sampled words are English words"
    );
}
