//! `gpt-serve import-hf` on a small random `GPT2LMHeadModel` made by
//! `transformers` (tests/fixtures/hf/tiny-gpt2, from
//! scripts/make_hf_fixture.py): its logits on both forward paths, the
//! `export-hf` round trip bit for bit, sharded and legacy layouts, clear
//! errors for malformed directories, frozen-backbone exit training, and a
//! drafter trained on the imported model, speculating with plain output in
//! decoding and through the HTTP server.
//! Needs no `../shared/data`: the training text is the prose fixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use gpt_serve::checkpoint;
use gpt_serve::decode::proposer::{Plain, TreeDrafter};
use gpt_serve::decode::{GenParams, Generator, TokenOut};
use gpt_serve::drafter::Drafter;
use gpt_serve::hf::{export::export_hf, import::import_hf, import::import_hf_as};
use gpt_serve::model::cpu::WeightDtype;
use gpt_serve::serving::engine::{Backend, EngineConfig};
use gpt_serve::serving::metrics::Metrics;
use gpt_serve::serving::server::{self, ServeOptions};
use gpt_serve::train::{self, TrainOptions};

/// Largest absolute logit difference allowed against `transformers` (f64).
const LOGIT_TOL: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/hf/tiny-gpt2")
}

fn read_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A copy of the fixture (without its reference logits) whose config and
/// tensors `edit` changes.
fn variant(
    edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut tensors = read_st(&fixture().join("model.safetensors"));
    edit(&mut config, &mut tensors);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    if !tensors.is_empty() {
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    }
    dir
}

/// Imports `src` into a fresh directory.
fn import(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ck");
    import_hf(src, &out).unwrap();
    (tmp, out)
}

fn import_err(src: &Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    format!("{:#}", import_hf(src, &tmp.path().join("ck")).unwrap_err())
}

/// Every element's bits, after an exact widening to f32 (f16 and bf16
/// widen injectively), with the dtype.
fn bits(t: &Tensor) -> (DType, Vec<u32>) {
    let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (
        t.dtype(),
        v.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
    )
}

/// The fixed inputs (2 x 16 ids) and transformers' logits on them.
fn reference() -> (Vec<Vec<u32>>, Tensor) {
    let r = read_st(&fixture().join("reference.safetensors"));
    let ids: Vec<Vec<u32>> = r["input_ids"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|x| x as u32).collect())
        .collect();
    (ids, r["logits"].clone())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn imported_logits_match_transformers_on_the_candle_path() {
    let (_tmp, out) = import(&fixture());
    let loaded = checkpoint::load(&out, &Device::Cpu).unwrap();
    let model = loaded.model(&Device::Cpu).unwrap();
    let (ids, want) = reference();
    let x = Tensor::new(ids, &Device::Cpu).unwrap();
    let got = model.forward_all_exits(&x).unwrap().pop().unwrap();
    let diff = max_diff(&got, &want);
    eprintln!("candle path: max |logit diff| vs transformers {diff:e}");
    assert!(diff <= LOGIT_TOL, "max diff {diff}");
}

#[test]
fn imported_logits_match_transformers_on_the_cpu_fast_path() {
    let (_tmp, out) = import(&fixture());
    let loaded = checkpoint::load(&out, &Device::Cpu).unwrap();
    let model = loaded.cpu(WeightDtype::F32).unwrap();
    let (ids, want) = reference();
    for (b, row) in ids.iter().enumerate() {
        let mut cache = model.new_cache();
        let mut s = model.embed(row, 0).unwrap();
        model
            .run_blocks(&mut s, model.cfg.n_layer, &mut cache)
            .unwrap();
        let logits = model.exit_logits(&s, 0, 0..row.len()).unwrap();
        let got = Tensor::from_vec(logits, want.get(b).unwrap().shape(), &Device::Cpu).unwrap();
        let diff = max_diff(&got, &want.get(b).unwrap());
        eprintln!("fast path, row {b}: max |logit diff| vs transformers {diff:e}");
        assert!(diff <= LOGIT_TOL, "row {b}: max diff {diff}");
    }
}

/// Logits of the final head for a fixed prompt.
fn final_logits(model: &gpt_serve::model::cpu::CpuGpt) -> Vec<f32> {
    let row: Vec<u32> = (0..12).map(|i| (i * 31 + 7) % 300).collect();
    let mut cache = model.new_cache();
    let mut s = model.embed(&row, 0).unwrap();
    model
        .run_blocks(&mut s, model.cfg.n_layer, &mut cache)
        .unwrap();
    model.exit_logits(&s, 0, 0..row.len()).unwrap()
}

#[test]
fn import_with_dtype_q8_0_keeps_the_tensors_and_serves_q8_0_under_weights_auto() {
    let (_plain_tmp, plain) = import(&fixture());
    let tmp = tempfile::tempdir().unwrap();
    let q8 = tmp.path().join("ck");
    let c = import_hf_as(&fixture(), &q8, "q8_0").unwrap();
    assert_eq!(c.weights.as_deref(), Some("q8_0"));
    let plain_st = read_st(&plain.join("model.safetensors"));
    let q8_st = read_st(&q8.join("model.safetensors"));
    for (n, t) in &plain_st {
        assert_eq!(
            bits(t),
            bits(&q8_st[n]),
            "{n}: tensors are stored unrounded"
        );
    }
    let loaded = checkpoint::load(&q8, &Device::Cpu).unwrap();
    assert_eq!(loaded.serving_dtype(), WeightDtype::Q8_0);
    assert_eq!(loaded.weight_dtype("auto").unwrap(), WeightDtype::Q8_0);
    let reference = checkpoint::load(&plain, &Device::Cpu).unwrap();
    assert_eq!(reference.serving_dtype(), WeightDtype::F32);
    let want = final_logits(&reference.cpu(WeightDtype::Q8_0).unwrap());
    assert_eq!(
        final_logits(&loaded.cpu(loaded.serving_dtype()).unwrap()),
        want
    );
    assert_ne!(
        final_logits(&reference.cpu(WeightDtype::F32).unwrap()),
        want
    );
}

#[test]
fn import_with_an_unknown_dtype_or_a_config_naming_an_unknown_weights_value_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        import_hf_as(&fixture(), &tmp.path().join("a"), "q5_1").unwrap_err()
    );
    assert!(
        err.contains("`q5_1`") && err.contains("q8_0, q4_0"),
        "{err}"
    );
    let out = tmp.path().join("b");
    import_hf_as(&fixture(), &out, "q4_0").unwrap();
    let path = out.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"weights\": \"q4_0\""), "{text}");
    std::fs::write(&path, text.replace("\"q4_0\"", "\"q9\"")).unwrap();
    let err = checkpoint::load(&out, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("field `weights`") && err.contains("`q9`"),
        "{err}"
    );
}

#[test]
fn import_then_export_gives_every_parameter_back_bit_for_bit_in_its_dtype() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let src = variant(|_, t| {
            for v in t.values_mut() {
                *v = v.to_dtype(dtype).unwrap();
            }
        });
        let (tmp, out) = import(src.path());
        export_hf(&out, &tmp.path().join("hf")).unwrap();
        let before = read_st(&src.path().join("model.safetensors"));
        let after = read_st(&tmp.path().join("hf/model.safetensors"));
        let mut names: Vec<&String> = before.keys().collect();
        names.sort();
        assert_eq!(names, {
            let mut a: Vec<&String> = after.keys().collect();
            a.sort();
            a
        });
        for n in names {
            assert_eq!(bits(&before[n]), bits(&after[n]), "{dtype:?}: {n}");
        }
    }
}

#[test]
fn hub_names_mask_buffers_and_a_tied_lm_head_import_as_the_same_weights() {
    let legacy = variant(|_, t| {
        let old: Vec<(String, Tensor)> = t.drain().collect();
        for (n, v) in old {
            t.insert(n.trim_start_matches("transformer.").to_string(), v);
        }
        t.insert("lm_head.weight".into(), t["wte.weight"].clone());
        let tril = Tensor::tril2(64, DType::F32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 64, 64))
            .unwrap();
        for i in 0..3 {
            t.insert(format!("h.{i}.attn.bias"), tril.clone());
            t.insert(
                format!("h.{i}.attn.masked_bias"),
                Tensor::new(-1e4f32, &Device::Cpu).unwrap(),
            );
        }
    });
    let (_a, want) = import(&fixture());
    let (_b, got) = import(legacy.path());
    let want = read_st(&want.join("model.safetensors"));
    let got = read_st(&got.join("model.safetensors"));
    assert_eq!(want.len(), got.len());
    for (n, t) in &want {
        assert_eq!(bits(t), bits(&got[n]), "{n}");
    }
}

#[test]
fn a_sharded_index_loads_as_the_single_file_does() {
    let sharded = variant(|_, t| t.clear());
    let all = read_st(&fixture().join("model.safetensors"));
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let shard: HashMap<&String, Tensor> = part.iter().map(|n| (*n, all[*n].clone())).collect();
        candle_core::safetensors::save(&shard, sharded.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let (_a, want) = import(&fixture());
    let (_b, got) = import(sharded.path());
    let (want, got) = (
        read_st(&want.join("model.safetensors")),
        read_st(&got.join("model.safetensors")),
    );
    for (n, t) in &want {
        assert_eq!(bits(t), bits(&got[n]), "{n}");
    }
}

#[test]
fn vocab_json_and_merges_txt_give_the_same_tokenizer() {
    let dir = variant(|_, _| {});
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let (_a, json) = import(&fixture());
    let (_b, files) = import(dir.path());
    let text = std::fs::read_to_string(root().join("tests/fixtures/prose.txt")).unwrap();
    let enc = |d: &Path| {
        checkpoint::load(d, &Device::Cpu)
            .unwrap()
            .tokenizer
            .encode(&text)
            .unwrap()
    };
    assert_eq!(enc(&json), enc(&files));
}

#[test]
fn a_missing_tensor_is_an_error_naming_it() {
    let dir = variant(|_, t| {
        t.remove("transformer.h.1.mlp.c_fc.bias");
    });
    let err = import_err(dir.path());
    assert!(
        err.contains("`transformer.h.1.mlp.c_fc.bias` is missing"),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_is_an_error_naming_the_tensor_and_both_shapes() {
    let dir = variant(|_, t| {
        let w = t["transformer.h.0.attn.c_attn.weight"]
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        t.insert("transformer.h.0.attn.c_attn.weight".into(), w);
    });
    let err = import_err(dir.path());
    assert!(
        err.contains("transformer.h.0.attn.c_attn.weight")
            && err.contains("[96, 32]")
            && err.contains("[32, 96]"),
        "{err}"
    );
}

#[test]
fn an_unknown_model_type_is_an_error_naming_the_field() {
    let dir = variant(|c, _| c["model_type"] = "gpt_neox".into());
    let err = import_err(dir.path());
    assert!(
        err.contains("model_type") && err.contains("gpt_neox"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_larger_than_the_weights_vocab_is_an_error() {
    let dir = variant(|c, t| {
        c["vocab_size"] = 200.into();
        let wte = t["transformer.wte.weight"].narrow(0, 0, 200).unwrap();
        t.insert("transformer.wte.weight".into(), wte);
    });
    let err = import_err(dir.path());
    assert!(
        err.contains("vocab mismatch") && err.contains("300 tokens") && err.contains("200"),
        "{err}"
    );
}

#[test]
fn an_untied_lm_head_is_refused() {
    let dir = variant(|c, t| {
        c["tie_word_embeddings"] = false.into();
        let head = (&t["transformer.wte.weight"] * 2.0).unwrap();
        t.insert("lm_head.weight".into(), head);
    });
    let err = import_err(dir.path());
    assert!(
        err.contains("lm_head.weight") && err.contains("untied"),
        "{err}"
    );
}

#[test]
fn import_refuses_a_non_empty_output_directory() {
    let (_tmp, out) = import(&fixture());
    let err = format!("{:#}", import_hf(&fixture(), &out).unwrap_err());
    assert!(err.contains("not empty"), "{err}");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    o: TrainOptions,
}

/// Trains tied exits after blocks 1 and 2 of the imported fixture on the
/// prose fixture, backbone frozen, with a small drafter.
fn train_exits(ck: &Path, out: &Path) -> train::TrainSummary {
    let more = [
        "--steps",
        "40",
        "--batch-size",
        "4",
        "--context",
        "32",
        "--lr",
        "3e-2",
        "--warmup",
        "5",
        "--eval-every",
        "0",
        "--drafter-prompts",
        "24",
        "--drafter-windows",
        "40",
        "--drafter-gen-tokens",
        "32",
        "--drafter-rounds",
        "20",
    ];
    frozen_train(ck, out, "1:0.1,2:0.2,3:0.7", &more).unwrap()
}

/// `gpt-serve train` on the prose fixture from `ck` with the backbone
/// frozen, exits `exits`, into `out`, with `more` arguments.
fn frozen_train(
    ck: &Path,
    out: &Path,
    exits: &str,
    more: &[&str],
) -> anyhow::Result<train::TrainSummary> {
    let prose = root().join("tests/fixtures/prose.txt");
    let mut args = vec![
        "train",
        prose.to_str().unwrap(),
        "--init-from",
        ck.to_str().unwrap(),
        "--freeze-backbone",
        "--exits",
        exits,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    train::run(Cli::try_parse_from(args).unwrap().o)
}

#[test]
fn frozen_backbone_training_changes_no_backbone_tensor_and_reports_agreement() {
    let (tmp, ck) = import(&fixture());
    let out = tmp.path().join("exits");
    let summary = train_exits(&ck, &out);
    let before = checkpoint::load_tensors(&ck.join("model.safetensors"), &Device::Cpu).unwrap();
    let after = checkpoint::load_tensors(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (n, t) in &before {
        assert_eq!(bits(t), bits(&after[n]), "backbone tensor {n} changed");
    }
    let ln_f = bits(&before["ln_f.weight"]);
    for b in [1, 2] {
        let ln = &after[&format!("exits.{b}.ln.weight")];
        assert_ne!(bits(ln), ln_f, "exit {b} did not train (still ln_f's copy)");
    }
    assert_eq!(after.len(), before.len() + 4);
    let blocks: Vec<usize> = summary.exit_agreement.iter().map(|a| a.0).collect();
    assert_eq!(blocks, vec![1, 2, 3]);
    assert_eq!(summary.exit_agreement[2].1, 1.0);
}

/// Prompts the drafter never saw (not from the training text).
const HELD_OUT: &str = "The carrier came up the lane at noon with a letter for the house. \
    Nobody in the village could say who had sent it, and my father would not open it \
    until the evening, when the lamps were lit and the doors were shut against the rain. \
    Then he read it aloud to us, slowly, as if every word cost him something.";

#[test]
fn a_save_dtype_that_would_round_the_frozen_backbone_is_refused() {
    let (tmp, ck) = import(&fixture());
    let out = tmp.path().join("exits");
    let more = ["--steps", "1", "--save-dtype", "f16"];
    let err = frozen_train(&ck, &out, "2:0.3,3:0.7", &more).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("--save-dtype f16") && err.contains("f32"),
        "{err}"
    );
}

/// The imported fixture with trained exits and drafter. On a model this
/// small a k-row verify costs nearly k plain steps, so the tuned threshold
/// may draft nothing; the threshold and the (guessed) verify costs are
/// fixed to test the drafter's predictions themselves.
fn with_drafter() -> (tempfile::TempDir, PathBuf, Drafter) {
    let (tmp, ck) = import(&fixture());
    let out = tmp.path().join("exits");
    train_exits(&ck, &out);
    let vocab = checkpoint::load_config(&out).unwrap().model.vocab_size;
    let mut drafter = Drafter::load(&out.join("drafter.json"), vocab).unwrap();
    drafter.threshold = 0.2;
    drafter.report = serde_json::Value::Null;
    (tmp, out, drafter)
}

#[test]
fn a_drafter_trained_on_the_imported_model_gets_drafts_accepted_with_plain_output() {
    let (_tmp, out, drafter) = with_drafter();
    let loaded = checkpoint::load(&out, &Device::Cpu).unwrap();
    let model = loaded.cpu(loaded.serving_dtype()).unwrap();
    let eot = loaded.tokenizer.eot();
    let ids = loaded.tokenizer.encode(HELD_OUT).unwrap();
    let (mut accepted, mut drafted) = (0, 0);
    for p in ids.chunks_exact(12) {
        let params = GenParams {
            max_tokens: 40,
            stop_at_eot: false,
            ..Default::default()
        };
        let plain_params = GenParams {
            speculate: false,
            ..params.clone()
        };
        let (mut plain, _) =
            Generator::new(&model, Box::new(Plain), p, plain_params, eot, None).unwrap();
        let (mut spec, _) = Generator::new(
            &model,
            Box::new(TreeDrafter::new(&drafter)),
            p,
            params,
            eot,
            None,
        )
        .unwrap();
        let ids = |o: Vec<TokenOut>| o.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(
            ids(plain.run().unwrap()),
            ids(spec.run().unwrap()),
            "prompt {p:?}"
        );
        accepted += spec.stats.accepted;
        drafted += spec.stats.drafted;
    }
    eprintln!("{accepted} of {drafted} drafts accepted");
    assert!(accepted > 0, "no draft accepted ({drafted} drafted)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_speculates_on_the_imported_model_with_plain_output() {
    let (_tmp, out, drafter) = with_drafter();
    let loaded = checkpoint::load(&out, &Device::Cpu).unwrap();
    let engine = EngineConfig {
        backend: Backend::Cpu(loaded.serving_dtype()),
        max_active: 4,
        max_batch_rows: gpt_serve::serving::engine::DEFAULT_MAX_BATCH_ROWS,
        cascade: false,
        draft_trees: false,
        // Each row costs a tenth of a one-row forward more: a lone
        // sequence's drafts then pay when likelier than 0.1, whatever the
        // timing of this machine (measured, the 3 x 32 model's rows cost
        // nearly a forward each and the engine may draft nothing).
        row_costs: Some(vec![(1, 1.0), (64, 7.3)]),
        exit_margin: gpt_serve::decode::DEFAULT_EXIT_MARGIN,
        kv_cache: Default::default(),
        suffix_cache: None,
        fault: None,
    };
    let metrics = Arc::new(Metrics::new());
    let state = server::build(
        loaded,
        Some(drafter),
        engine,
        "gpt2",
        metrics,
        ServeOptions::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/completions", listener.local_addr().unwrap());
    let serving = state.clone();
    tokio::spawn(async move { server::serve(listener, serving, std::future::pending()).await });
    state.wait_ready(Duration::from_secs(5)).await;
    let complete = |prompt: String, speculate: bool| {
        let body = serde_json::json!({"model": "gpt2", "prompt": prompt, "max_tokens": 40,
            "temperature": 0, "speculate": speculate, "spec_stats": true});
        let url = url.clone();
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v = r.json::<serde_json::Value>().await.unwrap();
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    // Four words each, one request at a time (a lone sequence drafts; a
    // batch drafts only where it pays): prompt and completion fit the
    // 64-position context.
    let words: Vec<&str> = HELD_OUT.split_whitespace().collect();
    let mut accepted = 0;
    for w in words.chunks_exact(4) {
        let plain = complete(w.join(" "), false).await;
        let spec = complete(w.join(" "), true).await;
        assert_eq!(
            plain["choices"][0]["text"], spec["choices"][0]["text"],
            "{w:?}"
        );
        accepted += spec["spec_stats"]["accepted"].as_u64().unwrap();
    }
    eprintln!("served: {accepted} drafts accepted");
    assert!(accepted > 0, "no draft accepted");
}
