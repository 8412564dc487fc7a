//! Cross-implementation check, llm.c style: logits of every exit, the
//! weighted loss and every parameter's gradient equal the PyTorch reference
//! written by scripts/torch_reference.py (committed, so CI needs no PyTorch),
//! within 1e-4 relative to each tensor's largest value.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gpt_serve::checkpoint;
use gpt_serve::model::gpt::Gpt;
use gpt_serve::train::losses::MultiExitLoss;

mod common;
use common::{max_abs, max_abs_diff};

fn close(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let scale = max_abs(reference);
    let diff = max_abs_diff(ours, reference);
    assert!(
        diff <= 1e-4 * scale + 1e-7,
        "{name}: max diff {diff} vs scale {scale}"
    );
}

fn check(name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ref")
        .join(name);
    let loaded = checkpoint::load(&dir, &Device::Cpu).unwrap();
    let reference =
        checkpoint::load_tensors(&dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let batch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("../batch.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Tensor {
        let v: Vec<u32> = batch[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        Tensor::from_vec(v, (2, 12), &Device::Cpu).unwrap()
    };
    let (x, y) = (ids("x"), ids("y"));
    let varmap = VarMap::new();
    let mut vars = Vec::new();
    for (n, t) in &loaded.weights {
        let v = Var::from_tensor(t).unwrap();
        varmap.data().lock().unwrap().insert(n.clone(), v.clone());
        vars.push((n.clone(), v));
    }
    let cfg = &loaded.config.model;
    let model = Gpt::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        false,
    )
    .unwrap();
    for (k, l) in model.forward_all_exits(&x).unwrap().iter().enumerate() {
        close(
            &format!("{name} logits of exit {k}"),
            l,
            &reference[&format!("logits.{k}")],
        );
    }
    let losses = model.loss(&x, &y).unwrap();
    close(
        &format!("{name} loss"),
        &losses.total.reshape(1).unwrap(),
        &reference["loss"],
    );
    let grads = losses.total.backward().unwrap();
    for (n, v) in &vars {
        close(
            &format!("{name} gradient of {n}"),
            grads.get(v.as_tensor()).unwrap(),
            &reference[&format!("grad.{n}")],
        );
    }
    assert_eq!(
        vars.len(),
        reference.keys().filter(|k| k.starts_with("grad.")).count()
    );
}

#[test]
fn baseline_logits_loss_and_gradients_match_pytorch() {
    check("baseline");
}

#[test]
fn dwa_skips_and_own_exit_heads_match_pytorch() {
    check("full");
}
