//! The draft head: a small network on the model's own hidden state that
//! guesses the final LayerNorm's output one position ahead (EAGLE-style
//! feature drafting, arXiv 2401.15077, without its attention layer):
//!
//! `f' = f + W2 gelu(W1 [f; wte[x]] + b1) + b2`, logits `wte f'`,
//!
//! where `f` is the final LayerNorm's output at the last position the
//! model verified and `x` the token committed after it. Chained, it drafts
//! several tokens from one verified position. Trained by `gpt-serve
//! train-head` on the train split to match the model's own next
//! distribution (`train::head`); stored beside the checkpoint as
//! [`HEAD_FILE`] with its description in [`HEAD_CONFIG_FILE`].
//!
//! Its matrices (and its copy of the tied output projection) are served as
//! [`SERVED_AS`] whatever the model's weights: a draft is only a guess, and
//! at one row reading the weights is the cost (docs/benchmarks.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::params;
use crate::model::quant::{KernelPath, QMatrix, QuantKind, Split};

pub const HEAD_FILE: &str = "draft-head.safetensors";
pub const HEAD_CONFIG_FILE: &str = "draft-head.json";
pub const FORMAT_VERSION: u32 = 1;
/// How the head's matrices are served (see the module doc): Q4_0 drafts
/// as well as Q8_0 (1.58-1.74 tokens per verify step at 0.8 against
/// 1.54-1.71) at 0.07-0.08 of a one-row step per draft against 0.08-0.15
/// (docs/benchmarks.md, "The draft head").
pub const SERVED_AS: QuantKind = QuantKind::Q4_0;
/// The tensors of [`HEAD_FILE`].
pub const W1: &str = "w1.weight";
pub const B1: &str = "w1.bias";
pub const W2: &str = "w2.weight";
pub const B2: &str = "w2.bias";

/// [`HEAD_CONFIG_FILE`]: what the head is and how it was trained.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct HeadConfig {
    pub format_version: u32,
    /// The model width it reads (`n_embd`).
    pub n_embd: usize,
    /// Width of its hidden layer.
    pub hidden: usize,
    /// Training figures (`train::head::Report`).
    #[serde(default)]
    pub report: serde_json::Value,
    /// The chance that the model draws a draft, from the draft's margin
    /// (absent: the drafter prices every draft at its running acceptance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// The chance that a head draft is the model's own draw, from its margin
/// (`sampling::choose_with_margin`): logistic in the margin, one fit for
/// the first draft of a chain and one for later drafts (given that their
/// parent was accepted). Fitted on the train split by `gpt-serve
/// calibrate-head` (`decode::calibrate`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Calibration {
    /// `[intercept, slope]` of the first draft's log-odds.
    pub first: [f64; 2],
    /// `[intercept, slope]` of a later draft's.
    pub later: [f64; 2],
    /// How it was fitted and how well it is calibrated.
    #[serde(default)]
    pub fit: serde_json::Value,
}

impl Calibration {
    /// The chance that the draft at `depth` (1 = first), margin `margin`,
    /// is accepted given that its parent was.
    pub fn accept(&self, depth: usize, margin: f32) -> f64 {
        let [a, b] = if depth <= 1 { self.first } else { self.later };
        1.0 / (1.0 + (-(a + b * f64::from(margin))).exp())
    }

    /// An error naming the field when a coefficient is not finite or a
    /// slope is negative (a wider margin cannot make a draft less likely).
    pub fn check(&self) -> Result<(), String> {
        for (name, [a, b]) in [("first", self.first), ("later", self.later)] {
            if !a.is_finite() || !b.is_finite() {
                return Err(format!("calibration.{name} must be finite, got [{a}, {b}]"));
            }
            if b < 0.0 {
                return Err(format!("calibration.{name}: slope {b} is negative"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("{path}: {msg}")]
    Bad { path: PathBuf, msg: String },
}

fn bad(path: &Path, msg: impl Into<String>) -> HeadError {
    HeadError::Bad {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The loaded head, ready to draft on the CPU.
pub struct DraftHead {
    w1: QMatrix,
    w2: QMatrix,
    lm_head: QMatrix,
    /// The token embeddings (vocab, n_embd), f32.
    wte: Vec<f32>,
    n_embd: usize,
    hidden: usize,
    vocab: usize,
    /// Its matmuls run on the thread team (as a quantized model's do)
    /// rather than on rayon's pool (as an f32/f16 model's do).
    team: bool,
    calibration: Option<Calibration>,
}

impl DraftHead {
    /// The head beside checkpoint `dir`, if it has one; `model` holds the
    /// checkpoint's weights (the head reads its token embeddings). A head
    /// for another width, or a corrupt file, is an error naming the file.
    pub fn load(dir: &Path, model: &HashMap<String, Tensor>) -> Result<Option<Self>, HeadError> {
        let cfg_path = dir.join(HEAD_CONFIG_FILE);
        if !cfg_path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(&cfg_path, e.to_string()))?;
        let cfg: HeadConfig =
            serde_json::from_str(&text).map_err(|e| bad(&cfg_path, e.to_string()))?;
        if let Some(c) = &cfg.calibration {
            c.check().map_err(|e| bad(&cfg_path, e))?;
        }
        if cfg.format_version != FORMAT_VERSION {
            let msg = format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                cfg.format_version
            );
            return Err(bad(&cfg_path, msg));
        }
        let path = dir.join(HEAD_FILE);
        let t = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| bad(&path, e.to_string()))?;
        let wte = model
            .get(params::WTE)
            .ok_or_else(|| bad(&path, format!("the checkpoint has no {}", params::WTE)))?;
        Self::from_tensors(&cfg, &t, wte)
            .map_err(|msg| bad(&path, msg))
            .map(Some)
    }

    /// From the head's tensors and the model's token embeddings.
    pub fn from_tensors(
        cfg: &HeadConfig,
        t: &HashMap<String, Tensor>,
        wte: &Tensor,
    ) -> Result<Self, String> {
        let (c, h) = (cfg.n_embd, cfg.hidden);
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let x = t
                .get(name)
                .ok_or_else(|| format!("tensor {name} is missing"))?;
            if x.dims() != shape {
                return Err(format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    x.dims()
                ));
            }
            let v = x
                .to_dtype(candle_core::DType::F32)
                .and_then(|x| x.flatten_all()?.to_vec1());
            v.map_err(|e| format!("tensor {name}: {e}"))
        };
        let (vocab, wc) = wte.dims2().map_err(|e| e.to_string())?;
        if wc != c {
            return Err(format!("head reads width {c}, the model's is {wc}"));
        }
        let q = |name: &str, w: &[f32], shape, b| {
            QMatrix::from_out_in(name, SERVED_AS, w, shape, Some(b)).map_err(|e| e.to_string())
        };
        let wte = get_f32(wte)?;
        Ok(DraftHead {
            w1: q(W1, &get(W1, &[h, 2 * c])?, (h, 2 * c), get(B1, &[h])?)?,
            w2: q(W2, &get(W2, &[c, h])?, (c, h), get(B2, &[c])?)?,
            lm_head: q(params::WTE, &wte, (vocab, c), vec![0.0; vocab])?,
            wte,
            n_embd: c,
            hidden: h,
            vocab,
            team: false,
            calibration: cfg.calibration.clone(),
        })
    }

    /// This head with its matmuls threaded as the model's are: on the
    /// team when `team` (a quantized model), else on rayon's pool. Mixed,
    /// each pays for the other: the team's worker spins 1 ms after a job,
    /// and with an f16 model a team-threaded head took a core from the
    /// model's rayon matmuls (0.80-0.90x plain at 0.8, against 1.07-1.17x
    /// on rayon; docs/benchmarks.md).
    pub fn threaded_like_model(mut self, team: bool) -> Self {
        self.team = team;
        self
    }

    /// `y = W x` for one row `x`, threaded as the model is.
    fn matvec(&self, w: &QMatrix, x: &[f32], y: &mut [f32]) {
        let split = match Split::for_product(1, x.len(), y.len()) {
            Split::Team(_) if !self.team => Split::Rayon,
            s => s,
        };
        w.forward_split(KernelPath::selected(), split, x, 1, y);
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// What its drafts' margins say of their acceptance, if calibrated.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// This head with `calibration` (what `calibrate-head` measures).
    pub fn with_calibration(mut self, calibration: Option<Calibration>) -> Self {
        self.calibration = calibration;
        self
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The guessed features one position after `f`, where `token` was
    /// committed; `None` for a token outside the vocabulary.
    pub fn next_features(&self, f: &[f32], token: u32) -> Option<Vec<f32>> {
        let c = self.n_embd;
        let e = self.wte.get(token as usize * c..(token as usize + 1) * c)?;
        let mut u = Vec::with_capacity(2 * c);
        u.extend_from_slice(f);
        u.extend_from_slice(e);
        let mut z = vec![0f32; self.hidden];
        self.matvec(&self.w1, &u, &mut z);
        // The model's vectorised GELU: libm's tanh here was 16 us of a
        // ~50 us draft (examples/head_profile.rs).
        crate::model::kernels::gelu_tanh(&mut z);
        let mut out = vec![0f32; c];
        self.matvec(&self.w2, &z, &mut out);
        out.iter_mut().zip(f).for_each(|(o, f)| *o += f);
        Some(out)
    }

    /// The tied output projection's logits for features `f`.
    pub fn logits(&self, f: &[f32], out: &mut [f32]) {
        self.matvec(&self.lm_head, f, out);
    }

    /// One draft after `token` from features `f`: the keyed draw of `sp`
    /// at `pos` from the head's logits with its margin
    /// (`sampling::choose_with_margin`), and the features the next draft
    /// starts from; `logits` is scratch of the vocabulary's size. None for
    /// a token outside the vocabulary.
    pub fn draw(
        &self,
        f: &[f32],
        token: u32,
        sp: &crate::sampling::SamplingParams,
        stream: u64,
        pos: usize,
        logits: &mut [f32],
    ) -> Option<(u32, f32, Vec<f32>)> {
        let next = self.next_features(f, token)?;
        self.logits(&next, logits);
        let (t, margin) = crate::sampling::choose_with_margin(logits, sp, stream, pos);
        Some((t, margin, next))
    }
}

fn get_f32(t: &Tensor) -> Result<Vec<f32>, String> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|x| x.flatten_all()?.to_vec1())
        .map_err(|e| e.to_string())
}

/// A random head of width `c` over `vocab` tokens: its config, tensors
/// and the token embeddings it reads; seeded, so each test sees the same.
#[cfg(test)]
pub(crate) fn random_parts(
    c: usize,
    hidden: usize,
    vocab: usize,
) -> (HeadConfig, HashMap<String, Tensor>, Tensor) {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let normal = rand_distr::Normal::new(0f32, 0.1).unwrap();
    let mut r = |shape: &[usize]| {
        let v: Vec<f32> = (0..shape.iter().product())
            .map(|_| normal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let cfg = HeadConfig {
        format_version: FORMAT_VERSION,
        n_embd: c,
        hidden,
        report: serde_json::Value::Null,
        calibration: None,
    };
    let t = [
        (W1, r(&[hidden, 2 * c])),
        (B1, r(&[hidden])),
        (W2, r(&[c, hidden])),
        (B2, r(&[c])),
    ];
    let t = t.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    let wte = r(&[vocab, c]);
    (cfg, t, wte)
}

#[cfg(test)]
mod tests {
    use super::random_parts as random;
    use super::*;

    #[test]
    fn a_checkpoint_without_a_head_config_has_no_head() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DraftHead::load(dir.path(), &HashMap::new())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_head_for_another_width_or_missing_a_tensor_is_refused_by_name() {
        let (cfg, mut t, wte) = random(32, 32, 40);
        let narrow = Tensor::zeros((40, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = DraftHead::from_tensors(&cfg, &t, &narrow).err().unwrap();
        assert!(e.contains("width 32") && e.contains("64"), "{e}");
        t.remove(W2);
        let e = DraftHead::from_tensors(&cfg, &t, &wte).err().unwrap();
        assert!(e.contains(W2), "{e}");
    }

    #[test]
    fn a_corrupt_head_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, _, wte) = random(32, 32, 40);
        std::fs::write(
            dir.path().join(HEAD_CONFIG_FILE),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join(HEAD_FILE), b"not safetensors").unwrap();
        let model = HashMap::from([(params::WTE.to_string(), wte)]);
        let e = DraftHead::load(dir.path(), &model)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(HEAD_FILE), "{e}");
    }

    /// GELU's tanh approximation with libm's tanh: the reference.
    fn gelu(x: f32) -> f32 {
        const S: f32 = 0.797_884_6; // sqrt(2 / pi)
        0.5 * x * (1.0 + (S * (x + 0.044_715 * x * x * x)).tanh())
    }

    #[test]
    fn a_calibration_with_a_negative_slope_is_an_error_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, t, wte) = random(32, 32, 40);
        let mut json = serde_json::to_value(&cfg).unwrap();
        json["calibration"] = serde_json::json!({"first": [0.1, 1.0], "later": [0.2, -0.5]});
        std::fs::write(dir.path().join(HEAD_CONFIG_FILE), json.to_string()).unwrap();
        candle_core::safetensors::save(&t, dir.path().join(HEAD_FILE)).unwrap();
        let model: HashMap<String, Tensor> = [(params::WTE.to_string(), wte)].into();
        let e = DraftHead::load(dir.path(), &model)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("calibration.later") && e.contains("-0.5"), "{e}");
        json["calibration"]["later"] = serde_json::json!([0.2, 0.5]);
        std::fs::write(dir.path().join(HEAD_CONFIG_FILE), json.to_string()).unwrap();
        let h = DraftHead::load(dir.path(), &model).unwrap().unwrap();
        let c = h.calibration().unwrap();
        assert!(
            c.accept(1, 3.0) > c.accept(1, 0.0),
            "wider margins, likelier"
        );
        assert!((c.accept(2, 0.0) - 1.0 / (1.0 + (-0.2f64).exp())).abs() < 1e-12);
    }

    #[test]
    fn the_next_features_are_the_residual_mlp_of_features_and_embedding() {
        let (cfg, t, wte) = random(32, 32, 40);
        let head = DraftHead::from_tensors(&cfg, &t, &wte).unwrap();
        let f: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let got = head.next_features(&f, 7).unwrap();
        // The same in f32 from the served (quantized) weights; only the
        // activations' 8-bit rounding separates the two.
        let v = |n: &str| t[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (w1, b1, w2, b2) = (head.w1.dequantize(), v(B1), head.w2.dequantize(), v(B2));
        let e = &wte.flatten_all().unwrap().to_vec1::<f32>().unwrap()[7 * 32..8 * 32];
        let u: Vec<f32> = f.iter().chain(e).copied().collect();
        let z: Vec<f32> = (0..32)
            .map(|o| gelu(b1[o] + (0..64).map(|i| w1[o * 64 + i] * u[i]).sum::<f32>()))
            .collect();
        for o in 0..32 {
            let want = f[o] + b2[o] + (0..32).map(|i| w2[o * 32 + i] * z[i]).sum::<f32>();
            assert!(
                (got[o] - want).abs() < 0.02,
                "output {o}: {} vs {want}",
                got[o]
            );
        }
        assert!(
            head.next_features(&f, 40).is_none(),
            "a token outside the vocabulary"
        );
    }
}
