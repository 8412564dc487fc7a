//! The drafter file: the drafter serialised as JSON, written atomically,
//! and loaded with every check a served model needs (format versions, the
//! vocabulary size, class and feature counts, the trees' indices), each
//! failure a [`DrafterError`] naming the file.

use std::path::Path;

use super::ngram::Ngrams;
use super::{features, gbdt, Drafter, FORMAT_VERSION, N_POINTERS};

#[derive(Debug, thiserror::Error)]
pub enum DrafterError {
    #[error("drafter file {path} cannot be read: {msg}")]
    Read { path: String, msg: String },
    #[error("drafter file {path} is corrupt or truncated: {msg}")]
    Corrupt { path: String, msg: String },
    #[error(
        "drafter file {path} has format version {found}; this build reads version {FORMAT_VERSION}"
    )]
    Version { path: String, found: u32 },
    #[error("drafter file {path} was trained for vocab_size {found}, the model has {expected}")]
    Vocab {
        path: String,
        found: usize,
        expected: usize,
    },
    #[error("n-gram table file {path} {msg}")]
    Ngrams { path: String, msg: String },
    #[error("drafter file {path}: {field} {msg}")]
    Field {
        path: String,
        field: &'static str,
        msg: String,
    },
}

/// The longest draft chain a drafter file may ask for: a verify step's
/// rows are bounded by the engine's row budget (64 by default), and each
/// sequence allocates per drafted row.
pub const MAX_K_MAX: usize = 64;

impl Drafter {
    pub fn save(&self, path: &Path) -> Result<(), DrafterError> {
        let json = serde_json::to_vec(self).map_err(|e| DrafterError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        crate::atomic_file::write(path, &json).map_err(|e| DrafterError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// Loads and checks a drafter file for a model of `vocab_size`.
    pub fn load(path: &Path, vocab_size: usize) -> Result<Drafter, DrafterError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| DrafterError::Read {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| DrafterError::Corrupt {
                path: p.clone(),
                msg: e.to_string(),
            })?;
        let found = v.get("version").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
        if found != FORMAT_VERSION {
            return Err(DrafterError::Version { path: p, found });
        }
        let mut d: Drafter = serde_json::from_value(v).map_err(|e| DrafterError::Corrupt {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        if d.gbdt.version != gbdt::FORMAT_VERSION {
            return Err(DrafterError::Version {
                path: p,
                found: d.gbdt.version,
            });
        }
        if d.vocab_size != vocab_size {
            return Err(DrafterError::Vocab {
                path: p,
                found: d.vocab_size,
                expected: vocab_size,
            });
        }
        if d.gbdt.n_classes != d.classes.len() + N_POINTERS + 1
            || d.gbdt.n_features != features::N_FEATURES
        {
            return Err(DrafterError::Corrupt {
                path: p,
                msg: "class or feature counts disagree with the trees".into(),
            });
        }
        d.gbdt.validate().map_err(|e| DrafterError::Corrupt {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        d.check_fields()
            .map_err(|(field, msg)| DrafterError::Field {
                path: p,
                field,
                msg,
            })?;
        d.index();
        d.load_ngrams(path)?;
        Ok(d)
    }

    /// Loads the n-gram table file the drafter file names (a plain file
    /// name beside it); a drafter file that names none loads without.
    fn load_ngrams(&mut self, path: &Path) -> Result<(), DrafterError> {
        let Some(name) = &self.ngram_file else {
            return Ok(());
        };
        let plain = Path::new(name)
            .file_name()
            .is_some_and(|f| f == name.as_str());
        if !plain {
            return Err(DrafterError::Field {
                path: path.display().to_string(),
                field: "ngram_file",
                msg: format!("is {name:?}; it must be a file name beside the drafter file"),
            });
        }
        let table = Ngrams::load(&path.with_file_name(name), self.vocab_size)?;
        self.ngrams = Some(std::sync::Arc::new(table));
        Ok(())
    }
}

impl Drafter {
    /// The fields a file could set out of range, each checked against the
    /// limit it must keep: a class id outside the vocabulary would fail
    /// every sequence in a batch, a huge `k_max` would allocate per request.
    fn check_fields(&self) -> Result<(), (&'static str, String)> {
        let vocab = self.vocab_size;
        if let Some((i, t)) = self
            .classes
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err((
                "classes",
                format!("[{i}] = {t} is outside the vocabulary of {vocab}"),
            ));
        }
        if !(1..=MAX_K_MAX).contains(&self.k_max) {
            return Err((
                "k_max",
                format!("is {}; it must be 1..={MAX_K_MAX}", self.k_max),
            ));
        }
        if self.word_start.len() != vocab {
            let n = self.word_start.len();
            return Err((
                "word_start",
                format!("has {n} entries; the vocabulary has {vocab}"),
            ));
        }
        let unit = |field: &'static str, x: f32| match (0.0..=1.0).contains(&x) {
            true => Ok(()),
            false => Err((field, format!("is {x}; it must be a probability in 0..=1"))),
        };
        unit("threshold", self.threshold)?;
        unit("sibling_floor", self.sibling_floor)?;
        unit("ngram_weight", self.ngram_weight)?;
        if !(self.sample_sharpness.is_finite() && self.sample_sharpness > 0.0) {
            let s = self.sample_sharpness;
            return Err((
                "sample_sharpness",
                format!("is {s}; it must be finite and > 0"),
            ));
        }
        self.calibration.check().map_err(|e| ("calibration", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafter::features::{Tables, Verified};
    use crate::drafter::gbdt::Gbdt;

    /// A drafter over a 40-token vocabulary whose trees learned "next =
    /// last + 1" from rows its own feature code made.
    fn small_drafter() -> Drafter {
        let vocab = 40usize;
        let classes: Vec<u32> = (0..vocab as u32).collect();
        let tables = Tables::build((1..vocab as u32 - 1).map(|t| (Some(t - 1), t, t + 1)), 1);
        let n_classes = classes.len() + N_POINTERS + 1;
        let mut d = Drafter::new(
            vocab,
            classes,
            tables,
            Gbdt::constant(features::N_FEATURES, n_classes),
            vec![true; vocab],
            0.5,
            4,
        );
        let (mut rows, mut targets) = (vec![], vec![]);
        for start in 0..30u32 {
            let ctx: Vec<u32> = (start..start + 6).map(|t| t % 39).collect();
            let next = (start + 6) % 39;
            let (row, cand) = d.features(&ctx, Verified::default());
            targets.push(d.target(next, &cand));
            rows.push(row);
        }
        let p = gbdt::GbdtParams {
            rounds: 5,
            max_depth: 3,
            min_rows_leaf: 2,
            ..Default::default()
        };
        d.gbdt = Gbdt::fit(&rows, &targets, n_classes, (&[], &[]), &p).unwrap();
        d
    }

    #[test]
    fn a_saved_drafter_loads_back_with_identical_predictions() {
        let d = small_drafter();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("drafter.json");
        d.save(&path).unwrap();
        let back = Drafter::load(&path, 40).unwrap();
        for start in 0..30u32 {
            let ctx: Vec<u32> = (start..start + 6).map(|t| t % 39).collect();
            let (row, _) = d.features(&ctx, Verified::default());
            assert_eq!(d.gbdt.predict_proba(&row), back.gbdt.predict_proba(&row));
            assert_eq!(
                d.propose(&ctx, 4, Verified::default()),
                back.propose(&ctx, 4, Verified::default())
            );
        }
    }

    fn load_err(path: &Path, vocab: usize) -> String {
        match Drafter::load(path, vocab) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn truncated_corrupt_and_mismatched_drafter_files_are_clear_errors() {
        let d = small_drafter();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("drafter.json");
        d.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let load_bytes = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            load_err(&path, 40)
        };
        let e = load_bytes(&bytes[..bytes.len() / 2]);
        assert!(
            e.contains("corrupt or truncated") && e.contains("drafter.json"),
            "{e}"
        );
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["version"] = 1.into();
        let e = load_bytes(&serde_json::to_vec(&v).unwrap());
        assert!(e.contains("format version 1"), "{e}");
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["gbdt"]["trees"][0]["nodes"][0] = serde_json::json!({"Split": {"feature": 0, "threshold": 0.5, "left": 900, "right": 901}});
        let e = load_bytes(&serde_json::to_vec(&v).unwrap());
        assert!(e.contains("out of range"), "{e}");
        std::fs::write(&path, &bytes).unwrap();
        let e = load_err(&path, 50);
        assert!(e.contains("vocab_size 40") && e.contains("50"), "{e}");
        let e = load_err(&tmp.path().join("missing.json"), 40);
        assert!(
            e.contains("missing.json") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn a_drafter_field_out_of_range_is_refused_at_load_naming_the_field_and_the_limit() {
        let d = small_drafter();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("drafter.json");
        d.save(&path).unwrap();
        let good: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let cases: [(&str, serde_json::Value, &str); 5] = [
            (
                "classes",
                serde_json::json!([0, 1, 40]),
                "[2] = 40 is outside the vocabulary of 40",
            ),
            ("k_max", 1_000_000.into(), "must be 1..=64"),
            (
                "word_start",
                serde_json::json!([true]),
                "has 1 entries; the vocabulary has 40",
            ),
            ("threshold", 1.5.into(), "a probability in 0..=1"),
            ("sample_sharpness", 0.0.into(), "finite and > 0"),
        ];
        for (field, value, want) in cases {
            let mut v = good.clone();
            v[field] = value;
            if field == "classes" {
                // Keep the class count the trees were fitted for.
                let n = good["classes"].as_array().unwrap().len();
                let mut c: Vec<u32> = (0..n as u32).collect();
                c[2] = 40;
                v[field] = serde_json::json!(c);
            }
            std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
            let e = load_err(&path, 40);
            assert!(e.contains(field) && e.contains(want), "{field}: {e}");
        }
    }

    /// `small_drafter` saved in `dir` with an n-gram table file beside it.
    fn with_table(dir: &Path) -> std::path::PathBuf {
        let mut d = small_drafter();
        let text: Vec<u32> = (0..400u32).map(|i| (i * 7) % 40).collect();
        let table = Ngrams::count(&text, 40, 1 << 16).unwrap();
        table.save(&dir.join("ngrams.bin")).unwrap();
        d.ngram_file = Some("ngrams.bin".into());
        let path = dir.join("drafter.json");
        d.save(&path).unwrap();
        path
    }

    #[test]
    fn a_drafter_file_loads_the_table_it_names_and_an_older_one_loads_without() {
        let tmp = tempfile::tempdir().unwrap();
        let path = with_table(tmp.path());
        let d = Drafter::load(&path, 40).unwrap();
        assert!(d.ngrams.is_some());
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let old = v.as_object_mut().unwrap();
        old.remove("ngram_file");
        old.remove("ngram_weight");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let d = Drafter::load(&path, 40).unwrap();
        assert!(d.ngrams.is_none() && d.ngram_file.is_none());
        let ctx = [3u32, 10, 17];
        assert_eq!(
            d.estimate_wide(&ctx, Verified::default()),
            d.estimate(&ctx, Verified::default())
        );
    }

    #[test]
    fn a_missing_corrupt_or_misplaced_table_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = with_table(tmp.path());
        let table = tmp.path().join("ngrams.bin");
        let mut bytes = std::fs::read(&table).unwrap();
        bytes[30] ^= 0xff;
        std::fs::write(&table, &bytes).unwrap();
        let e = load_err(&path, 40);
        assert!(e.contains("ngrams.bin") && e.contains("checksum"), "{e}");
        std::fs::remove_file(&table).unwrap();
        let e = load_err(&path, 40);
        assert!(
            e.contains("ngrams.bin") && e.contains("cannot be read"),
            "{e}"
        );
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["ngram_file"] = "../ngrams.bin".into();
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load_err(&path, 40);
        assert!(e.contains("ngram_file") && e.contains("beside"), "{e}");
    }
}
