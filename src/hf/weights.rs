//! The tensors of a HF GPT-2 directory, mapped to our names and layout:
//! `model.safetensors`, or the shards named by `model.safetensors.index.json`
//! (memory-mapped, so a model is read once, tensor by tensor). Every
//! parameter keeps its source dtype (f32, f16 or bf16), so the checkpoint
//! stores the same bits; Conv1D weights are transposed to (out, in).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{dtype_name, is_conv1d, PREFIX};
use crate::model::config::Config;
use crate::model::params::{self, param_shapes};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors of a HF directory, with each tensor's role.
pub struct HfTensors {
    st: MmapedSafetensors,
    /// Our parameter name -> the file's name for it.
    params: HashMap<String, String>,
    /// The file's name for `lm_head.weight`, when it stores one.
    lm_head: Option<String>,
    /// Where the tensors came from, for messages.
    source: String,
}

/// What a tensor of a GPT2LMHeadModel file is, by its name without prefix.
enum Role {
    Param,
    LmHead,
    /// The causal-mask buffers old `transformers` versions saved.
    Buffer,
}

fn role(name: &str) -> Role {
    if name == params::LM_HEAD {
        Role::LmHead
    } else if params::is_block(name)
        && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"))
    {
        Role::Buffer
    } else {
        Role::Param
    }
}

/// `model.safetensors`, else every shard the index names (each once).
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.exists() {
        bail!(
            "{} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (pytorch_model.bin is not read: \
             save the model with save_pretrained(dir, safe_serialization=True))",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let map = json["weight_map"].as_object().with_context(|| {
        format!(
            "{}: weight_map is missing or not an object",
            index.display()
        )
    })?;
    let files: BTreeSet<&str> = map
        .values()
        .map(|v| v.as_str().context("weight_map values must be file names"))
        .collect::<anyhow::Result<_>>()?;
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(shard_name(f)?);
            match p.exists() {
                true => Ok(p),
                false => bail!(
                    "shard {f} named by {INDEX_FILE} is missing from {}",
                    dir.display()
                ),
            }
        })
        .collect()
}

/// A shard's name as the index gives it, accepted only as a plain file
/// name inside the model directory: an absolute path or one with `..` or
/// a separator could make the import read any file on the machine.
fn shard_name(f: &str) -> anyhow::Result<&str> {
    let plain = Path::new(f).components().count() == 1
        && matches!(
            Path::new(f).components().next(),
            Some(std::path::Component::Normal(_))
        );
    match plain {
        true => Ok(f),
        false => bail!("{INDEX_FILE}: weight_map names `{f}`, which is not a file name inside the model directory"),
    }
}

impl HfTensors {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let files = weight_files(dir)?;
        let source = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: the files are mapped read-only for the import's duration;
        // like every reader of a model file, it must not be rewritten meanwhile.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("{source} is not a safetensors file"))?;
        let mut params = HashMap::new();
        let mut lm_head = None;
        for (name, _) in st.tensors() {
            let ours = name.strip_prefix(PREFIX).unwrap_or(&name).to_string();
            match role(&ours) {
                Role::Param => {
                    params.insert(ours, name);
                }
                Role::LmHead => lm_head = Some(name),
                Role::Buffer => {}
            }
        }
        Ok(Self {
            st,
            params,
            lm_head,
            source,
        })
    }

    /// The file's name for our parameter `name` (with the prefix the file
    /// uses, for messages about tensors it lacks).
    fn file_name(&self, name: &str) -> String {
        match self.params.get(name) {
            Some(n) => n.clone(),
            None if self.params.values().any(|v| v.starts_with(PREFIX)) => {
                format!("{PREFIX}{name}")
            }
            None => name.to_string(),
        }
    }

    /// Refuses tensors the model has no place for (another architecture,
    /// or more blocks than config.json says).
    fn check_no_extra(&self, cfg: &Config) -> anyhow::Result<()> {
        let expected: BTreeSet<String> = param_shapes(cfg).into_iter().map(|(n, _)| n).collect();
        let mut extra: Vec<&String> = self
            .params
            .iter()
            .filter(|(k, _)| !expected.contains(*k))
            .map(|(_, v)| v)
            .collect();
        extra.sort();
        if let Some(first) = extra.first() {
            bail!(
                "{}: unexpected tensor `{first}` ({} in all) is not a GPT2LMHeadModel parameter for n_layer {}",
                self.source,
                extra.len(),
                cfg.n_layer
            );
        }
        Ok(())
    }

    /// The one dtype every parameter is stored in (f32, f16 or bf16).
    pub fn dtype(&self) -> anyhow::Result<DType> {
        let mut found: Option<(DType, &str)> = None;
        let mut names: Vec<&String> = self.params.values().collect();
        names.sort();
        for name in names {
            let view = self.st.get(name)?;
            let dt = DType::try_from(view.dtype())
                .ok()
                .filter(|d| dtype_name(*d).is_some())
                .with_context(|| {
                    format!(
                        "tensor `{name}` is {:?}; import-hf reads F32, F16 and BF16",
                        view.dtype()
                    )
                })?;
            match found {
                None => found = Some((dt, name)),
                Some((d, first)) if d != dt => bail!(
                    "tensor `{name}` is {dt:?} but `{first}` is {d:?}: every parameter must share one dtype"
                ),
                _ => {}
            }
        }
        Ok(found
            .with_context(|| format!("{} holds no parameters", self.source))?
            .0)
    }

    /// Loads parameter `name` (our name) checked against `shape` (ours),
    /// in our (out, in) layout and the source dtype.
    fn load(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        let file_name = self.file_name(name);
        if !self.params.contains_key(name) {
            bail!("{}: tensor `{file_name}` is missing", self.source);
        }
        let conv1d = is_conv1d(name);
        let want: Vec<usize> = match conv1d {
            true => shape.iter().rev().copied().collect(),
            false => shape.to_vec(),
        };
        let view = self.st.get(&file_name)?;
        if view.shape() != want.as_slice() {
            bail!(
                "tensor `{file_name}` has shape {:?}, expected {want:?}{}",
                view.shape(),
                if conv1d { " (Conv1D: in x out)" } else { "" }
            );
        }
        let t = self.st.load(&file_name, &Device::Cpu)?;
        Ok(match conv1d {
            true => t.t()?.contiguous()?,
            false => t,
        })
    }

    /// Every parameter of `cfg`'s model, in [`param_shapes`] order.
    pub fn params(&self, cfg: &Config) -> anyhow::Result<Vec<(String, Tensor)>> {
        self.check_no_extra(cfg)?;
        param_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| Ok((name.clone(), self.load(&name, &shape)?)))
            .collect()
    }

    /// Our final exit projects with `wte`: a stored `lm_head.weight` must
    /// equal it bit for bit, and an untied model must store one.
    pub fn check_lm_head(&self, wte: &Tensor, tied: bool) -> anyhow::Result<()> {
        let Some(name) = &self.lm_head else {
            if !tied {
                bail!(
                    "config.json: tie_word_embeddings is false but the weights have no {}",
                    params::LM_HEAD
                );
            }
            return Ok(());
        };
        let head = self.st.load(name, &Device::Cpu)?;
        if head.shape() != wte.shape() {
            bail!(
                "tensor `{name}` has shape {:?}, expected {:?} (that of {})",
                head.dims(),
                wte.dims(),
                params::WTE
            );
        }
        let diff = (head.to_dtype(DType::F32)? - wte.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        if diff != 0.0 {
            bail!(
                "tensor `{name}` differs from {} (tie_word_embeddings: {tied}): an untied LM head is not supported, our final head projects with wte",
                params::WTE
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_naming_a_shard_outside_the_model_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.safetensors"), b"").unwrap();
        for bad in ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", ".."] {
            let index = serde_json::json!({"weight_map": {"wte.weight": bad}});
            std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
            let e = weight_files(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("not a file name"),
                "{bad}: {e}"
            );
        }
        let index = serde_json::json!({"weight_map": {"wte.weight": "x.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        assert_eq!(
            weight_files(dir.path()).unwrap(),
            vec![dir.path().join("x.safetensors")]
        );
    }
}
