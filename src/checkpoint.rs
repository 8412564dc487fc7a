//! The one on-disk format: a self-contained checkpoint directory.
//!
//! ```text
//! config.json        {"format_version", "model": Config, "dtype", "training": {...}}
//! model.safetensors  weights with GPT-2 names (f32, or f16 to halve the size)
//! tokenizer.json     Hugging Face tokenizer
//! drafter.json       the tree drafter (optional)
//! ```
//! Every file is written atomically and durably (temp file, fsync, rename,
//! fsync of the directory), so a crash never leaves a half-written file
//! where a good one was. A training run also keeps `snapshots/step-N/`
//! beside these (weights, optimizer moments, trainer state), each set whole
//! or absent, for exact resume: see [`crate::train::snapshot`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::model::config::Config;
use crate::model::gpt::Gpt;
use crate::tokenizer::Tokenizer;

pub const FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const DRAFTER_FILE: &str = "drafter.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "checkpoint directory {0} does not exist (train one with `gpt-serve train --out DIR`)"
    )]
    MissingDir(PathBuf),
    #[error("checkpoint file {0} is missing")]
    MissingFile(PathBuf),
    #[error("checkpoint file {path} cannot be read: {msg}")]
    Unreadable { path: PathBuf, msg: String },
    #[error("checkpoint file {path} is corrupt: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    /// A sound checkpoint whose weights the asked dtype cannot hold.
    #[error("checkpoint {path}: {source}")]
    Quantize {
        path: PathBuf,
        source: Box<crate::model::cpu::LoadError>,
    },
    #[error(
        "checkpoint {path} has format version {found}; this build reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "cannot write {path}: {msg} (check that its directory is writable and has space; \
         the file it would replace is kept)"
    )]
    Write { path: PathBuf, msg: String },
}

type Result<T> = std::result::Result<T, CheckpointError>;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CheckpointConfig {
    pub format_version: u32,
    pub model: Config,
    /// Storage dtype of model.safetensors ("f32", "f16", or "bf16" for
    /// imported bf16 models); loading upcasts (exactly) to f32.
    pub dtype: String,
    /// Free-form training metadata (command, steps, tokens, losses, time).
    #[serde(default)]
    pub training: serde_json::Value,
    /// The weight storage `--weights auto` serves when it is not the
    /// storage dtype's: `q8_0` or `q4_0`, set by `import-hf --dtype`.
    /// The tensors stay f32/f16/bf16 in model.safetensors and are quantized
    /// at load: quantizing is deterministic and takes milliseconds, so
    /// every load serves the same blocks, while the one on-disk format (and
    /// training, export-hf, and `--weights f32` for a reference) keeps
    /// working on the unrounded values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

impl CheckpointConfig {
    /// The config of `model` stored as `dtype` ("f32", "f16"), with no
    /// training metadata and no quantized default.
    pub fn new(model: Config, dtype: &str) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            model,
            dtype: dtype.into(),
            training: serde_json::Value::Null,
            weights: None,
        }
    }

    /// The dtype model.safetensors is stored in.
    pub fn storage_dtype(&self) -> DType {
        match self.dtype.as_str() {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            _ => DType::F32,
        }
    }
}

/// Writes `bytes` to `path` via a temp file in the same directory + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic_file::write(path, bytes).map_err(|e| CheckpointError::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Saves tensors as safetensors atomically and durably, casting to `dtype`.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)], dtype: DType) -> Result<()> {
    let werr = |e: candle_core::Error| CheckpointError::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<std::result::Result<_, candle_core::Error>>()
        .map_err(werr)?;
    // A leftover or planted file at the temporary name is removed first, so
    // the save below cannot write through a symlink.
    let tmp = crate::atomic_file::fresh_tmp_path(path).map_err(|e| CheckpointError::Write {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    candle_core::safetensors::save(&map, &tmp).map_err(werr)?;
    // safetensors writes 0600; checkpoints are meant to be shared (and read
    // by a container's non-root user).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
    }
    crate::atomic_file::sync_file(&tmp)
        .and_then(|()| crate::atomic_file::rename_durably(&tmp, path))
        .map_err(|e| CheckpointError::Write {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

/// Loads a safetensors file as f32 tensors.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(CheckpointError::MissingFile(path.to_path_buf()));
    }
    let corrupt = |e: candle_core::Error| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let map = candle_core::safetensors::load(path, device).map_err(corrupt)?;
    map.into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32).map_err(corrupt)?)))
        .collect()
}

pub fn save_config(dir: &Path, cfg: &CheckpointConfig) -> Result<()> {
    let json = serde_json::to_string_pretty(cfg).expect("config serializes");
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}

pub fn load_config(dir: &Path) -> Result<CheckpointConfig> {
    if !dir.is_dir() {
        return Err(CheckpointError::MissingDir(dir.to_path_buf()));
    }
    let path = dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|_| CheckpointError::MissingFile(path.clone()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            msg: e.to_string(),
        })?;
    let found = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as u32;
    if found != FORMAT_VERSION {
        return Err(CheckpointError::Version { path, found });
    }
    let cfg: CheckpointConfig =
        serde_json::from_value(value).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            msg: e.to_string(),
        })?;
    cfg.model.validate().map_err(|e| CheckpointError::Corrupt {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    if let Some(w) = &cfg.weights {
        w.parse::<crate::model::cpu::WeightDtype>()
            .map_err(|e| CheckpointError::Corrupt {
                path,
                msg: format!("field `weights`: {e}"),
            })?;
    }
    Ok(cfg)
}

/// Saves weights, config and tokenizer into `dir` (created if needed).
pub fn save(
    dir: &Path,
    cfg: &CheckpointConfig,
    weights: &[(String, Tensor)],
    tokenizer: &Tokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::Write {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    })?;
    save_tensors(&dir.join(WEIGHTS_FILE), weights, cfg.storage_dtype())?;
    save_tokenizer(dir, tokenizer)?;
    save_config(dir, cfg)
}

pub fn save_tokenizer(dir: &Path, tokenizer: &Tokenizer) -> Result<()> {
    let path = dir.join(TOKENIZER_FILE);
    let json = tokenizer.to_json().map_err(|e| CheckpointError::Write {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    write_atomic(&path, json.as_bytes())
}

/// A loaded checkpoint: config, tokenizer, weights (f32).
pub struct Loaded {
    pub config: CheckpointConfig,
    pub tokenizer: Tokenizer,
    pub weights: HashMap<String, Tensor>,
}

pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let config = load_config(dir)?;
    let tok_path = dir.join(TOKENIZER_FILE);
    if !tok_path.exists() {
        return Err(CheckpointError::MissingFile(tok_path));
    }
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| CheckpointError::Corrupt {
        path: tok_path.clone(),
        msg: e.to_string(),
    })?;
    if tokenizer.vocab_size() > config.model.vocab_size {
        return Err(CheckpointError::Corrupt {
            path: tok_path,
            msg: format!(
                "tokenizer has {} tokens, model vocab_size is {}",
                tokenizer.vocab_size(),
                config.model.vocab_size
            ),
        });
    }
    let weights = load_tensors(&dir.join(WEIGHTS_FILE), device)?;
    Ok(Loaded {
        config,
        tokenizer,
        weights,
    })
}

impl Loaded {
    /// Builds the CPU inference model ([`crate::model::cpu`]); weights the
    /// dtype cannot hold are [`CheckpointError::Quantize`], not corrupt.
    pub fn cpu(&self, dtype: crate::model::cpu::WeightDtype) -> Result<crate::model::cpu::CpuGpt> {
        use crate::model::cpu::{CpuGpt, LoadError};
        let path = PathBuf::from(WEIGHTS_FILE);
        CpuGpt::load(&self.config.model, &self.weights, dtype).map_err(|e| match e {
            LoadError::Tensor(e) => CheckpointError::Corrupt {
                path,
                msg: e.to_string(),
            },
            source => CheckpointError::Quantize {
                path,
                source: Box::new(source),
            },
        })
    }

    /// The weight storage `--weights auto` serves: the config's `weights`
    /// when set (`import-hf --dtype q8_0`), else the one that serves the
    /// checkpoint exactly: f16 when it was saved in f16 (no rounding beyond
    /// what is stored), else f32 (bf16 has a wider range than f16, so it is
    /// served as f32).
    pub fn serving_dtype(&self) -> crate::model::cpu::WeightDtype {
        if let Some(dt) = self.config.weights.as_deref().and_then(|w| w.parse().ok()) {
            return dt;
        }
        match self.config.dtype.as_str() {
            "f16" => crate::model::cpu::WeightDtype::F16,
            _ => crate::model::cpu::WeightDtype::F32,
        }
    }

    /// The storage a `--weights` / `--dtype` value names: `auto` is
    /// [`Loaded::serving_dtype`]; an unknown value is an error listing the
    /// accepted ones.
    pub fn weight_dtype(
        &self,
        s: &str,
    ) -> std::result::Result<crate::model::cpu::WeightDtype, String> {
        match s {
            "auto" => Ok(self.serving_dtype()),
            s => s.parse().map_err(|_| {
                format!(
                    "unknown --weights value `{s}` (expected one of: auto, {})",
                    crate::model::cpu::WeightDtype::NAMES.join(", ")
                )
            }),
        }
    }

    /// Builds the model for inference (fused kernels).
    pub fn model(&self, device: &Device) -> Result<Gpt> {
        let path = PathBuf::from(WEIGHTS_FILE);
        let vb = VarBuilder::from_tensors(self.weights.clone(), DType::F32, device);
        Gpt::new(&self.config.model, vb, true).map_err(|e| CheckpointError::Corrupt {
            path,
            msg: e.to_string(),
        })
    }
}
