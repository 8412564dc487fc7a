//! Writes the tiny checkpoints and the batch that `scripts/torch_reference.py`
//! computes PyTorch reference tensors for (tests/fixtures/ref/).
use candle_core::Device;
use gpt_serve::checkpoint::{self, CheckpointConfig};
use gpt_serve::model::config::{Config, Dwa, Exit, ExitHead};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new("tests/fixtures/ref");
    let text = "a small text for a small tokenizer, with small words. ".repeat(20);
    let tok = gpt_serve::tokenizer::Tokenizer::train_bpe([text.as_str()].into_iter(), 260)?;
    let mut base = Config::preset("tiny")?;
    base.vocab_size = 260;
    base.block_size = 16;
    base.exits = vec![
        Exit {
            block: 2,
            weight: 0.3,
        },
        Exit {
            block: 3,
            weight: 0.7,
        },
    ];
    let mut full = base.clone();
    full.exit_head = ExitHead::Own;
    full.dwa = Some(Dwa {
        dilation: 1,
        period: 1,
    });
    full.x0_skip = true;
    for (name, cfg, seed) in [("baseline", base, 11u64), ("full", full, 12)] {
        let mut w = gpt_serve::model::gpt::init_weights(&cfg, seed, &Device::Cpu)?;
        // Move DWA/skip weights off identity so the reference exercises them.
        for (n, t) in &mut w {
            if n.ends_with(".dwa") || n.ends_with(".skip") {
                *t = (t.clone() + 0.25)?;
            }
        }
        let ck = CheckpointConfig::new(cfg, "f32");
        checkpoint::save(&root.join(name), &ck, &w, &tok)?;
    }
    let x: Vec<u32> = (0..2 * 12).map(|i| (i * 37 + 5) % 260).collect();
    let y: Vec<u32> = (0..2 * 12).map(|i| (i * 53 + 11) % 260).collect();
    std::fs::write(
        root.join("batch.json"),
        serde_json::json!({"shape": [2, 12], "x": x, "y": y}).to_string(),
    )?;
    Ok(())
}
