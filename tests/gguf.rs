//! `gpt-serve export-gguf` read back by an independent GGUF v3 reader
//! (written here from ggml's `docs/gguf.md`, not from the writer): the
//! header, the metadata llama.cpp's gpt2 loader reads, every tensor's
//! dims, type and aligned offset, and the quantized bytes equal to what
//! the quantizer serves. No Python, no llama.cpp.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use gpt_serve::checkpoint::{self, CheckpointConfig};
use gpt_serve::gguf::export::export_gguf;
use gpt_serve::model::config::{Config, Exit};
use gpt_serve::model::gpt::init_weights;
use gpt_serve::model::quant::{QMatrix, QuantKind};

/// A metadata value as read (scalars widened).
#[derive(Debug, Clone, PartialEq)]
enum Kv {
    Int(i64),
    F32(f32),
    Str(String),
    Arr(Vec<Kv>),
}

#[derive(Debug)]
struct Info {
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn str(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    fn value(&mut self, ty: u32) -> Kv {
        match ty {
            0 | 7 => Kv::Int(self.take(1)[0] as i64),
            4 => Kv::Int(self.u32() as i64),
            5 => Kv::Int(self.u32() as i32 as i64),
            6 => Kv::F32(f32::from_bits(self.u32())),
            8 => Kv::Str(self.str()),
            9 => {
                let (ty, n) = (self.u32(), self.u64());
                Kv::Arr((0..n).map(|_| self.value(ty)).collect())
            }
            10 => Kv::Int(self.u64() as i64),
            t => panic!("unexpected gguf value type {t}"),
        }
    }
}

/// The file's metadata, tensor infos, and the data section's start.
fn read(b: &[u8]) -> (HashMap<String, Kv>, HashMap<String, Info>, usize) {
    let mut r = Reader { b, at: 0 };
    assert_eq!(r.take(4), b"GGUF");
    assert_eq!(r.u32(), 3, "version");
    let (n_tensors, n_kv) = (r.u64(), r.u64());
    let kv = (0..n_kv)
        .map(|_| {
            let k = r.str();
            let ty = r.u32();
            (k, r.value(ty))
        })
        .collect();
    let infos = (0..n_tensors)
        .map(|_| {
            let name = r.str();
            let n = r.u32();
            let dims = (0..n).map(|_| r.u64()).collect();
            let (ty, offset) = (r.u32(), r.u64());
            (name, Info { dims, ty, offset })
        })
        .collect();
    (kv, infos, r.at.next_multiple_of(32))
}

/// A 2-layer, 64-wide baseline model with an early exit, saved as f32.
fn checkpoint_dir() -> (tempfile::TempDir, Config, HashMap<String, Tensor>) {
    let mut cfg = Config::preset("tiny").unwrap();
    cfg.n_embd = 64;
    cfg.n_head = 2;
    cfg.n_layer = 2;
    cfg.vocab_size = 300;
    cfg.block_size = 40;
    cfg.exits = [(1, 0.3), (2, 0.7)]
        .map(|(block, weight)| Exit { block, weight })
        .to_vec();
    let mut w: Vec<(String, Tensor)> = init_weights(&cfg, 3, &Device::Cpu).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    let tok = gpt_serve::tokenizer::Tokenizer::train_bpe(
        ["some text for a tokenizer, some more text."].into_iter(),
        280,
    )
    .unwrap();
    let ck = CheckpointConfig::new(cfg.clone(), "f32");
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &ck, &w, &tok).unwrap();
    (dir, cfg, w.into_iter().collect())
}

fn values(w: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    w[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_q8_0_export_holds_gpt2_metadata_aligned_tensors_and_the_served_blocks() {
    let (dir, cfg, w) = checkpoint_dir();
    let out = dir.path().join("m.gguf");
    export_gguf(dir.path(), &out, "q8_0").unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let (kv, infos, data) = read(&bytes);
    assert_eq!(kv["general.architecture"], Kv::Str("gpt2".into()));
    assert_eq!(kv["general.file_type"], Kv::Int(7));
    assert_eq!(kv["gpt2.block_count"], Kv::Int(2));
    assert_eq!(kv["gpt2.embedding_length"], Kv::Int(64));
    assert_eq!(kv["gpt2.feed_forward_length"], Kv::Int(256));
    assert_eq!(kv["gpt2.context_length"], Kv::Int(40));
    let Kv::Arr(tokens) = &kv["tokenizer.ggml.tokens"] else {
        panic!("tokens")
    };
    assert_eq!(tokens.len(), 300, "one token per vocab_size entry");
    // token_embd, position_embd, 2 x (2 norms + 4 linears) x (weight + bias),
    // output_norm (weight + bias), output: the early exit is left out.
    assert_eq!(infos.len(), 2 + 2 * 12 + 2 + 1);
    assert!(infos.keys().all(|n| !n.contains("exits")));
    for (name, i) in &infos {
        assert_eq!(i.offset % 32, 0, "{name} is not 32-byte aligned");
    }
    let qkv = &infos["blk.1.attn_qkv.weight"];
    assert_eq!((qkv.dims.as_slice(), qkv.ty), (&[64u64, 192][..], 8));
    let want = QMatrix::from_out_in(
        "q",
        QuantKind::Q8_0,
        &values(&w, "h.1.attn.c_attn.weight"),
        (192, 64),
        None,
    )
    .unwrap()
    .to_bytes();
    let at = data + qkv.offset as usize;
    assert_eq!(
        &bytes[at..at + want.len()],
        &want[..],
        "Q8_0 bytes differ from the quantizer's"
    );
    let emb = &infos["token_embd.weight"];
    assert_eq!(
        (emb.dims.as_slice(), emb.ty),
        (&[64u64, 300][..], 0),
        "lookup stays f32"
    );
    let out_w = &infos["output.weight"];
    assert_eq!((out_w.dims.as_slice(), out_w.ty), (&[64u64, 300][..], 8));
    let norm = &infos["blk.0.ffn_norm.bias"];
    let at = data + norm.offset as usize;
    let got: Vec<f32> = bytes[at..at + 256]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, values(&w, "h.0.ln_2.bias"));
    let _ = cfg;
}

#[test]
fn q4_0_and_f16_exports_store_matrices_in_their_type_and_a_bad_weights_value_is_refused() {
    let (dir, _, _) = checkpoint_dir();
    for (name, ty, ftype) in [("q4_0", 2u32, 2i64), ("f16", 1, 1)] {
        let out = dir.path().join(format!("{name}.gguf"));
        export_gguf(dir.path(), &out, name).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let (kv, infos, data) = read(&bytes);
        assert_eq!(kv["general.file_type"], Kv::Int(ftype), "{name}");
        assert_eq!(infos["blk.0.ffn_down.weight"].ty, ty, "{name}");
        assert_eq!(infos["blk.0.ffn_down.weight"].dims, [256, 64], "{name}");
        assert_eq!(
            infos.contains_key("output.weight"),
            name == "q4_0",
            "{name}"
        );
        let end = infos.values().map(|i| i.offset).max().unwrap() as usize;
        assert!(data + end < bytes.len(), "{name}: data section truncated");
    }
    let err = export_gguf(dir.path(), &dir.path().join("x.gguf"), "q5_1").unwrap_err();
    assert!(err.to_string().contains("`q5_1`"), "{err}");
}
