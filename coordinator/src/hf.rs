//! `export-hf` and `import-hf`: Cohort checkpoints to and from the Hugging Face GPT-2 layout
//! (`config.json` + `model.safetensors` for transformers' `GPT2LMHeadModel`, or a PEFT LoRA
//! adapter). The name and layout mapping is `cohort_core::hf_gpt2`; this module reads and
//! writes the files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use cohort_core::hf_gpt2::{
    classify_hf_name, decode_to_f32, hf_tensors, merge_lora, peft_name, HfDtype, HfError,
    HfGpt2Config, HfKey, LoraAdapters, PeftLoraConfig,
};
use cohort_core::model::ModelConfig;
use cohort_core::params::{init_params, ParamLayout};
use safetensors::tensor::{Dtype, TensorView};

use crate::checkpoint::{read_params, write_params, CheckpointError};
use crate::config::{ConfigError, JobFile, TrainableKind};
use crate::data::{replace_atomically, write_atomically, DataError};

/// Why an export or import cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum HfExportError {
    #[error(transparent)]
    Job(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Layout(#[from] HfError),
    #[error(transparent)]
    Write(#[from] DataError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
}

fn file_error(path: &Path, message: impl Into<String>) -> HfExportError {
    HfExportError::File {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// LoRA adapters read from a Cohort checkpoint (a federated LoRA job's `checkpoint-*`).
#[derive(Clone, Debug)]
pub struct LoraWeights {
    pub rank: u32,
    pub alpha: f64,
    /// Laid out as `model.lora_specs(rank)`.
    pub values: Vec<f32>,
}

/// A model to export: its configuration, its (base) parameters and, for a LoRA
/// fine-tune, its adapters.
#[derive(Clone, Debug)]
pub struct ExportSource {
    pub model: ModelConfig,
    /// Laid out as `model.tensor_specs()`.
    pub params: Vec<f32>,
    pub lora: Option<LoraWeights>,
    /// Where each part came from, for the log.
    pub described: String,
}

/// What `export-hf` was asked for (its flags).
#[derive(Clone, Debug, Default)]
pub struct ExportRequest {
    /// A job file: its model, LoRA settings, base checkpoint and run directory.
    pub job: Option<PathBuf>,
    /// The model, when there is no job file.
    pub model: Option<ModelConfig>,
    /// The model's parameters (a Cohort checkpoint).
    pub checkpoint: Option<PathBuf>,
    /// LoRA adapters to apply to `checkpoint`.
    pub lora_adapters: Option<PathBuf>,
    /// The adapters' alpha, when there is no job file.
    pub lora_alpha: Option<f64>,
}

/// How the export is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// `config.json` + `model.safetensors`, adapters merged into the weights.
    Merged,
    /// A PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) with its
    /// base model in `base/`.
    Peft,
}

/// The newest `checkpoint-NNNNNN.safetensors` in `run_dir`, by version.
pub fn newest_checkpoint(run_dir: &Path) -> Result<PathBuf, HfExportError> {
    let entries = std::fs::read_dir(run_dir).map_err(|source| HfExportError::Read {
        path: run_dir.to_owned(),
        source,
    })?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version: u64 = name
                .strip_prefix("checkpoint-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((version, entry.path()))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, path)| path)
        .ok_or_else(|| {
            file_error(
                run_dir,
                "has no checkpoint-*.safetensors (the job writes one when it ends); pass --checkpoint",
            )
        })
}

/// The rank of the LoRA adapters in the Cohort checkpoint at `path` (the first rows of
/// `h.0.attn.c_attn.lora_a`).
fn adapter_rank(path: &Path) -> Result<u32, HfExportError> {
    let bytes = read_file(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
    let info = header
        .tensors()
        .get("h.0.attn.c_attn.lora_a")
        .cloned()
        .ok_or_else(|| {
            file_error(
                path,
                "has no tensor h.0.attn.c_attn.lora_a: not LoRA adapters",
            )
        })?;
    info.shape
        .first()
        .and_then(|&rank| u32::try_from(rank).ok())
        .filter(|&rank| rank > 0)
        .ok_or_else(|| {
            file_error(
                path,
                format!("h.0.attn.c_attn.lora_a has shape {:?}", info.shape),
            )
        })
}

fn read_file(path: &Path) -> Result<Vec<u8>, HfExportError> {
    std::fs::read(path).map_err(|source| HfExportError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_lora(
    model: &ModelConfig,
    path: &Path,
    rank: Option<u32>,
    alpha: f64,
) -> Result<LoraWeights, HfExportError> {
    let rank = match rank {
        Some(rank) => rank,
        None => adapter_rank(path)?,
    };
    let values = read_params(path, &ParamLayout::new(&model.lora_specs(rank)))?;
    Ok(LoraWeights {
        rank,
        alpha,
        values,
    })
}

/// Works out the model, parameters and adapters of `request`. With a job file, what the
/// flags leave out comes from the job: its model; for a LoRA job its rank, alpha, base
/// (`federated.base_checkpoint`, or the seeded initialisation the job started from) and,
/// as adapters, the newest checkpoint in its run directory; otherwise the newest
/// checkpoint as the parameters.
pub fn resolve(request: &ExportRequest) -> Result<ExportSource, HfExportError> {
    let usage = |message: &str| Err(HfExportError::Usage(message.to_string()));
    let Some(job_path) = &request.job else {
        let Some(model) = request.model.clone() else {
            return usage("say which model: --job JOB.toml, or --model with --checkpoint");
        };
        let Some(checkpoint) = &request.checkpoint else {
            return usage("--checkpoint is required without --job");
        };
        let params = read_params(checkpoint, &ParamLayout::new(&model.tensor_specs()))?;
        let mut described = format!("parameters {}", checkpoint.display());
        let lora = match (&request.lora_adapters, request.lora_alpha) {
            (None, None) => None,
            (None, Some(_)) => return usage("--lora-alpha needs --lora-adapters"),
            (Some(_), None) => {
                return usage("--lora-adapters needs --lora-alpha (or a --job that sets it)")
            }
            (Some(path), Some(alpha)) => {
                if !(alpha.is_finite() && alpha > 0.0) {
                    return usage("--lora-alpha must be positive");
                }
                described.push_str(&format!(", LoRA adapters {}", path.display()));
                Some(read_lora(&model, path, None, alpha)?)
            }
        };
        return Ok(ExportSource {
            model,
            params,
            lora,
            described,
        });
    };
    if request.model.is_some() {
        return usage("--model and --job exclude each other: the job names its model");
    }
    if request.lora_alpha.is_some() {
        return usage(
            "--lora-alpha and --job exclude each other: the job sets federated.lora_alpha",
        );
    }
    let job = JobFile::load(job_path)?;
    if job
        .federated
        .as_ref()
        .is_some_and(|f| f.task == crate::config::TaskKind::Classification)
    {
        return usage(
            "this job trains a classification head, which the GPT-2 layout has no place for; \
             export-hf writes language models only",
        );
    }
    let model = job.model_config();
    model
        .validate()
        .map_err(|e| HfExportError::Usage(format!("{}: {e}", job_path.display())))?;
    let specs = model.tensor_specs();
    let layout = ParamLayout::new(&specs);
    let lora_section = job
        .federated
        .as_ref()
        .filter(|f| f.trainable == TrainableKind::Lora);
    let Some(section) = lora_section else {
        if request.lora_adapters.is_some() {
            return usage("--lora-adapters: this job does not train LoRA adapters");
        }
        let checkpoint = match &request.checkpoint {
            Some(path) => path.clone(),
            None => newest_checkpoint(&job.run_dir)?,
        };
        let params = read_params(&checkpoint, &layout)?;
        return Ok(ExportSource {
            model,
            params,
            lora: None,
            described: format!("parameters {}", checkpoint.display()),
        });
    };
    let (params, base_described) = match request
        .checkpoint
        .as_ref()
        .or(section.base_checkpoint.as_ref())
    {
        Some(path) => (
            read_params(path, &layout)?,
            format!("base {}", path.display()),
        ),
        // The base a LoRA job without base_checkpoint trains on (config.rs).
        None => (
            init_params(&specs, job.seed),
            format!("base: the job's initialisation (seed {})", job.seed),
        ),
    };
    let adapters = match &request.lora_adapters {
        Some(path) => path.clone(),
        None => newest_checkpoint(&job.run_dir)?,
    };
    let lora = read_lora(
        &model,
        &adapters,
        Some(section.lora_rank),
        section.lora_alpha,
    )?;
    Ok(ExportSource {
        model,
        params,
        lora: Some(lora),
        described: format!("{base_described}, LoRA adapters {}", adapters.display()),
    })
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    pub merged_adapters: bool,
}

/// safetensors wants `format = pt` in the metadata before transformers and PEFT will load
/// a file.
fn hf_metadata() -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "producer".to_string(),
            format!("cohort-coordinator {} export-hf", env!("CARGO_PKG_VERSION")),
        ),
    ])
}

/// Writes named f32 tensors (`(name, shape, values)`) as safetensors, atomically.
fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), HfExportError> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e.to_string()))?;
    let mut failure = None;
    replace_atomically(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, Some(hf_metadata()), tmp).map_err(|e| {
            let message = e.to_string();
            failure = Some(message.clone());
            std::io::Error::other(message)
        })
    })
    .map_err(|e| match failure.take() {
        Some(message) => file_error(path, message),
        None => HfExportError::Write(e),
    })
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), HfExportError> {
    let mut json = serde_json::to_vec_pretty(value).map_err(|e| file_error(path, e.to_string()))?;
    json.push(b'\n');
    write_atomically(path, &json)?;
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), HfExportError> {
    std::fs::create_dir_all(dir).map_err(|source| HfExportError::Read {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `config.json` and `model.safetensors` of `params` into `dir`.
fn write_model(
    dir: &Path,
    model: &ModelConfig,
    params: &[f32],
) -> Result<Vec<PathBuf>, HfExportError> {
    create_dir(dir)?;
    let layout = ParamLayout::new(&model.tensor_specs());
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = hf_tensors(model)
        .iter()
        .zip(layout.tensors())
        .map(|(tensor, slot)| {
            let values = &params[slot.offset..slot.offset + slot.numel];
            (
                tensor.hf_name.clone(),
                tensor.hf_shape.clone(),
                tensor.to_hf(values),
            )
        })
        .collect();
    let config = dir.join("config.json");
    write_json(&config, &HfGpt2Config::from_model(model))?;
    let weights = dir.join("model.safetensors");
    write_tensors(&weights, &tensors)?;
    Ok(vec![config, weights])
}

/// Writes `source` into `out` as `format`. Existing files of the same names are replaced.
pub fn export(
    source: &ExportSource,
    format: ExportFormat,
    out: &Path,
) -> Result<ExportReport, HfExportError> {
    match (format, &source.lora) {
        (ExportFormat::Merged, None) => Ok(ExportReport {
            files: write_model(out, &source.model, &source.params)?,
            tensors: source.model.tensor_specs().len(),
            merged_adapters: false,
        }),
        (ExportFormat::Merged, Some(lora)) => {
            let merged = merge_lora(
                &source.model,
                &source.params,
                LoraAdapters {
                    rank: lora.rank,
                    alpha: lora.alpha,
                    values: &lora.values,
                },
            )?;
            Ok(ExportReport {
                files: write_model(out, &source.model, &merged)?,
                tensors: source.model.tensor_specs().len(),
                merged_adapters: true,
            })
        }
        (ExportFormat::Peft, None) => Err(HfExportError::Usage(
            "--as-peft needs LoRA adapters (--lora-adapters, or a --job that trains them)".into(),
        )),
        (ExportFormat::Peft, Some(lora)) => {
            let base_dir = out.join("base");
            let mut files = write_model(&base_dir, &source.model, &source.params)?;
            // PEFT's AutoPeftModel loads the base from here; PeftModel.from_pretrained takes
            // any base model, so a moved export still loads.
            let base_path = std::fs::canonicalize(&base_dir).unwrap_or(base_dir);
            let config = out.join("adapter_config.json");
            write_json(
                &config,
                &PeftLoraConfig::new(lora.rank, lora.alpha, base_path.display().to_string()),
            )?;
            let layout = ParamLayout::new(&source.model.lora_specs(lora.rank));
            let tensors = layout
                .tensors()
                .iter()
                .map(|slot| {
                    let name = peft_name(&slot.name).ok_or_else(|| {
                        HfExportError::Usage(format!("{} is not a LoRA adapter", slot.name))
                    })?;
                    let values = lora.values[slot.offset..slot.offset + slot.numel].to_vec();
                    Ok((name, slot.shape.clone(), values))
                })
                .collect::<Result<Vec<_>, HfExportError>>()?;
            let weights = out.join("adapter_model.safetensors");
            write_tensors(&weights, &tensors)?;
            files.extend([config, weights]);
            Ok(ExportReport {
                files,
                tensors: tensors.len(),
                merged_adapters: false,
            })
        }
    }
}

/// What an import read and wrote.
#[derive(Clone, Debug)]
pub struct ImportReport {
    pub model: ModelConfig,
    pub tensors: usize,
    /// Saved buffers (the causal mask) and the tied `lm_head.weight`, skipped.
    pub skipped: Vec<String>,
}

fn hf_dtype(path: &Path, name: &str, dtype: Dtype) -> Result<HfDtype, HfExportError> {
    match dtype {
        Dtype::F32 => Ok(HfDtype::F32),
        Dtype::F16 => Ok(HfDtype::F16),
        Dtype::BF16 => Ok(HfDtype::BF16),
        other => Err(file_error(
            path,
            format!("tensor {name} is {other:?}; F32, F16 or BF16 expected"),
        )),
    }
}

/// Reads the GPT-2 `config.json` and `model.safetensors` in `hf_dir` and writes them as a
/// Cohort checkpoint (f32, Cohort's names and layout) at `out`: usable as a federated
/// job's `base_checkpoint` or a pretraining job's `train.init_checkpoint`. Refuses a
/// configuration that computes anything else than Cohort's GPT, an untied output head,
/// missing, misshapen, non-finite or unknown tensors.
pub fn import(hf_dir: &Path, out: &Path) -> Result<ImportReport, HfExportError> {
    let config_path = hf_dir.join("config.json");
    let config_text = read_file(&config_path)?;
    let config: HfGpt2Config = serde_json::from_slice(&config_text)
        .map_err(|e| file_error(&config_path, format!("not a GPT-2 config: {e}")))?;
    let model = config.to_model()?;
    let weights_path = hf_dir.join("model.safetensors");
    if !weights_path.exists() {
        let message = if hf_dir.join("model.safetensors.index.json").exists() {
            "not found: sharded checkpoints are not supported (save with a larger max_shard_size)"
        } else {
            "not found (a pytorch_model.bin must first be saved as safetensors: save_pretrained(dir, safe_serialization=True))"
        };
        return Err(file_error(&weights_path, message));
    }
    let bytes = read_file(&weights_path)?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_error(&weights_path, format!("not a safetensors file: {e}")))?;
    let plan: BTreeMap<String, _> = hf_tensors(&model)
        .into_iter()
        .map(|t| (t.cohort_name.clone(), t))
        .collect();
    let mut found: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut lm_head = None;
    let mut skipped = Vec::new();
    let mut unknown = Vec::new();
    for (name, view) in file.tensors() {
        let decode = || -> Result<Vec<f32>, HfExportError> {
            let dtype = hf_dtype(&weights_path, &name, view.dtype())?;
            Ok(decode_to_f32(dtype, view.data()))
        };
        match classify_hf_name(&name) {
            HfKey::Buffer => skipped.push(name),
            HfKey::LmHead => {
                lm_head = Some((view.shape().to_vec(), decode()?));
                skipped.push(name);
            }
            HfKey::Unknown => unknown.push(name),
            HfKey::Param(cohort) => {
                let Some(tensor) = plan.get(&cohort) else {
                    unknown.push(name);
                    continue;
                };
                if view.shape() != tensor.hf_shape.as_slice() {
                    return Err(file_error(
                        &weights_path,
                        format!(
                            "tensor {name} has shape {:?}, config.json implies {:?}",
                            view.shape(),
                            tensor.hf_shape
                        ),
                    ));
                }
                let values = decode()?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(file_error(
                        &weights_path,
                        format!("tensor {name} has a non-finite value at {i}"),
                    ));
                }
                if found.insert(cohort, tensor.from_hf(&values)).is_some() {
                    return Err(file_error(
                        &weights_path,
                        format!("tensor {name} appears twice (with and without `transformer.`)"),
                    ));
                }
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(file_error(
            &weights_path,
            format!(
                "has tensors that are not part of GPT2LMHeadModel: {}",
                unknown.join(", ")
            ),
        ));
    }
    let missing: Vec<&str> = plan
        .values()
        .filter(|t| !found.contains_key(&t.cohort_name))
        .map(|t| t.hf_name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(file_error(
            &weights_path,
            format!("is missing {}", missing.join(", ")),
        ));
    }
    if let Some((shape, values)) = lm_head {
        // Cohort's output head is the token embedding; an untied head cannot be kept.
        let wte = &found["wte"];
        let tied = shape == plan["wte"].hf_shape
            && values.len() == wte.len()
            && values
                .iter()
                .zip(wte)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !tied {
            return Err(file_error(
                &weights_path,
                "lm_head.weight differs from transformer.wte.weight: Cohort ties them",
            ));
        }
    }
    let layout = ParamLayout::new(&model.tensor_specs());
    let mut params = Vec::with_capacity(layout.total());
    for slot in layout.tensors() {
        params.extend_from_slice(&found[&slot.name]);
    }
    let metadata = HashMap::from([
        ("format".to_string(), "cohort-gpt-v1".to_string()),
        ("imported_from".to_string(), hf_dir.display().to_string()),
    ]);
    write_params(out, &layout, &params, metadata)?;
    Ok(ImportReport {
        model,
        tensors: layout.tensors().len(),
        skipped,
    })
}

/// `model` as a job file's `[model]` section.
pub fn model_section(model: &ModelConfig) -> String {
    format!(
        "[model]\nvocab_size = {}\ncontext_length = {}\nn_layer = {}\nn_head = {}\nd_model = {}\n",
        model.vocab_size, model.context_length, model.n_layer, model.n_head, model.d_model
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::checkpoint_path;
    use cohort_core::ids::Version;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 19,
            context_length: 8,
            n_layer: 2,
            n_head: 2,
            d_model: 8,
            dropout: 0.0,
        }
    }

    /// Parameters where every value is distinct, biases and LayerNorms included.
    fn params(model: &ModelConfig, salt: f32) -> Vec<f32> {
        (0..ParamLayout::new(&model.tensor_specs()).total())
            .map(|i| ((i as f32 + salt) * 0.618).sin() * 0.1)
            .collect()
    }

    fn write(path: &Path, specs: &[cohort_core::model::TensorSpec], values: &[f32]) {
        write_params(path, &ParamLayout::new(specs), values, HashMap::new()).unwrap();
    }

    /// Tensors by name: shape and f32 values.
    type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

    fn read_safetensors(path: &Path) -> Tensors {
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensors()
            .into_iter()
            .map(|(name, view)| {
                (
                    name,
                    (
                        view.shape().to_vec(),
                        bytemuck::pod_collect_to_vec(view.data()),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn export_then_import_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny();
        let mut values = params(&model, 0.0);
        values[3] = f32::MIN_POSITIVE;
        values[4] = -3.4e38;
        let source = ExportSource {
            model: model.clone(),
            params: values.clone(),
            lora: None,
            described: String::new(),
        };
        let out = dir.path().join("hf");
        let report = export(&source, ExportFormat::Merged, &out).unwrap();
        assert_eq!(report.files.len(), 2);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["n_embd"], 8);
        assert_eq!(config["activation_function"], "gelu_new");
        assert_eq!(config["tie_word_embeddings"], true);
        let tensors = read_safetensors(&out.join("model.safetensors"));
        assert_eq!(tensors.len(), model.tensor_specs().len());
        assert!(
            !tensors.contains_key("lm_head.weight"),
            "tied, like save_pretrained"
        );
        assert_eq!(tensors["transformer.h.1.mlp.c_fc.weight"].0, vec![8, 32]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(
            &std::fs::read(out.join("model.safetensors")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");

        let back = dir.path().join("back.safetensors");
        let imported = import(&out, &back).unwrap();
        assert_eq!(imported.model, model);
        let round_trip = read_params(&back, &ParamLayout::new(&model.tensor_specs())).unwrap();
        assert!(round_trip
            .iter()
            .zip(&values)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// `v` truncated to bf16 (its upper 16 bits).
    fn bf16_bits(v: f32) -> u16 {
        (v.to_bits() >> 16) as u16
    }

    #[test]
    fn import_accepts_bare_names_buffers_a_tied_head_and_half_precision() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny();
        let values = params(&model, 1.0);
        let layout = ParamLayout::new(&model.tensor_specs());
        // As the original `gpt2` repository stores it: GPT2Model names, the causal-mask
        // buffers, and here bf16 values and an explicit (tied) lm_head.
        let mut tensors = Vec::new();
        let mut wte_bf16 = Vec::new();
        for (t, slot) in hf_tensors(&model).iter().zip(layout.tensors()) {
            let hf: Vec<u8> = t
                .to_hf(&values[slot.offset..slot.offset + slot.numel])
                .iter()
                .flat_map(|&v| bf16_bits(v).to_le_bytes())
                .collect();
            if t.cohort_name == "wte" {
                wte_bf16 = hf.clone();
            }
            let name = t.hf_name.strip_prefix("transformer.").unwrap().to_string();
            tensors.push((name, Dtype::BF16, t.hf_shape.clone(), hf));
        }
        tensors.push(("lm_head.weight".into(), Dtype::BF16, vec![19, 8], wte_bf16));
        tensors.push(("h.0.attn.bias".into(), Dtype::F32, vec![1], vec![0; 4]));
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        let hf_dir = dir.path().join("hf");
        std::fs::create_dir(&hf_dir).unwrap();
        safetensors::tensor::serialize_to_file(views, None, &hf_dir.join("model.safetensors"))
            .unwrap();
        write_json(
            &hf_dir.join("config.json"),
            &HfGpt2Config::from_model(&model),
        )
        .unwrap();
        let out = dir.path().join("cohort.safetensors");
        let report = import(&hf_dir, &out).unwrap();
        assert_eq!(report.skipped.len(), 2, "{:?}", report.skipped);
        let imported = read_params(&out, &layout).unwrap();
        for (a, b) in imported.iter().zip(&values) {
            assert_eq!(a.to_bits(), u32::from(bf16_bits(*b)) << 16);
        }
    }

    #[test]
    fn import_refuses_an_untied_head_unknown_and_missing_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny();
        let hf = dir.path().join("hf");
        let source = ExportSource {
            model: model.clone(),
            params: params(&model, 2.0),
            lora: None,
            described: String::new(),
        };
        export(&source, ExportFormat::Merged, &hf).unwrap();
        let weights = hf.join("model.safetensors");
        let original = read_safetensors(&weights);
        let rewrite = |change: &dyn Fn(&mut Tensors)| {
            let mut tensors = original.clone();
            change(&mut tensors);
            let list: Vec<(String, Vec<usize>, Vec<f32>)> =
                tensors.into_iter().map(|(n, (s, v))| (n, s, v)).collect();
            write_tensors(&weights, &list).unwrap();
            import(&hf, &dir.path().join("out.safetensors"))
                .unwrap_err()
                .to_string()
        };
        let err = rewrite(&|t| {
            let (shape, mut values) = t["transformer.wte.weight"].clone();
            values[0] += 1.0;
            t.insert("lm_head.weight".into(), (shape, values));
        });
        assert!(err.contains("lm_head.weight differs"), "{err}");
        let err = rewrite(&|t| {
            t.insert("score.weight".into(), (vec![1], vec![0.0]));
        });
        assert!(err.contains("score.weight"), "{err}");
        let err = rewrite(&|t| {
            t.remove("transformer.h.1.ln_2.bias");
        });
        assert!(err.contains("missing transformer.h.1.ln_2.bias"), "{err}");
        let err = rewrite(&|t| {
            t.get_mut("transformer.h.0.attn.c_proj.bias").unwrap().1[2] = f32::NAN;
        });
        assert!(err.contains("non-finite"), "{err}");
        std::fs::remove_file(&weights).unwrap();
        let err = import(&hf, &dir.path().join("out.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors: not found"), "{err}");
    }

    #[test]
    fn a_lora_job_exports_its_base_plus_its_newest_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let model = ModelConfig::tiny_byte_level();
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let rank = 2;
        let lora_specs = model.lora_specs(rank);
        let lora_len = ParamLayout::new(&lora_specs).total();
        let older: Vec<f32> = vec![0.5; lora_len];
        let newer: Vec<f32> = (0..lora_len)
            .map(|i| (i as f32 * 0.1).cos() * 0.01)
            .collect();
        write(&checkpoint_path(&run_dir, Version(9)), &lora_specs, &older);
        write(&checkpoint_path(&run_dir, Version(10)), &lora_specs, &newer);
        let job = dir.path().join("job.toml");
        std::fs::write(
            &job,
            format!(
                "name = \"fed\"\nrun_dir = \"run\"\nseed = 5\n[model]\npreset = \"tiny\"\n\
                 [train]\nrounds = 1\ninner_steps = 1\n\
                 [federated]\nenrollment = \"enrollment.toml\"\nlora_rank = {rank}\nlora_alpha = 3.0\n"
            ),
        )
        .unwrap();
        let request = ExportRequest {
            job: Some(job.clone()),
            ..ExportRequest::default()
        };
        let source = resolve(&request).unwrap();
        // No base_checkpoint: the job's seeded initialisation.
        assert_eq!(source.params, init_params(&model.tensor_specs(), 5));
        let lora = source.lora.as_ref().unwrap();
        assert_eq!((lora.rank, lora.alpha), (rank, 3.0));
        assert_eq!(lora.values, newer, "the newest checkpoint");

        // PEFT: the base and the adapters under PEFT's names, unchanged.
        let out = dir.path().join("peft");
        export(&source, ExportFormat::Peft, &out).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["r"], 2);
        assert_eq!(config["lora_alpha"], 3.0);
        assert_eq!(config["fan_in_fan_out"], true);
        let adapters = read_safetensors(&out.join("adapter_model.safetensors"));
        assert_eq!(adapters.len(), lora_specs.len());
        let (shape, values) =
            &adapters["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"];
        assert_eq!(shape, &vec![64, 2]);
        let slot = ParamLayout::new(&lora_specs)
            .tensors()
            .iter()
            .find(|t| t.name == "h.1.mlp.c_proj.lora_b")
            .unwrap()
            .clone();
        assert_eq!(
            values.as_slice(),
            &newer[slot.offset..slot.offset + slot.numel]
        );
        assert!(out.join("base/model.safetensors").exists());

        // Flags that the job already answers are refused.
        let err = resolve(&ExportRequest {
            lora_alpha: Some(1.0),
            ..request.clone()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--lora-alpha and --job"), "{err}");
        let err = resolve(&ExportRequest {
            model: Some(model),
            ..request
        })
        .unwrap_err();
        assert!(err.to_string().contains("--model and --job"), "{err}");
    }

    #[test]
    fn a_pretraining_job_exports_its_newest_checkpoint_and_flags_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let model = ModelConfig::tiny_byte_level();
        let specs = model.tensor_specs();
        let job = dir.path().join("job.toml");
        std::fs::write(
            &job,
            "name = \"pre\"\nrun_dir = \"run\"\n[model]\npreset = \"tiny\"\n[train]\nrounds = 1\ninner_steps = 1\n",
        )
        .unwrap();
        let request = ExportRequest {
            job: Some(job),
            ..ExportRequest::default()
        };
        let err = resolve(&request).unwrap_err();
        assert!(matches!(err, HfExportError::Read { .. }), "{err}");
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let err = resolve(&request).unwrap_err();
        assert!(err.to_string().contains("pass --checkpoint"), "{err}");
        let values = params(&model, 3.0);
        write(&checkpoint_path(&run_dir, Version(200)), &specs, &values);
        write(
            &checkpoint_path(&run_dir, Version(30)),
            &specs,
            &params(&model, 4.0),
        );
        assert_eq!(resolve(&request).unwrap().params, values);

        let err = resolve(&ExportRequest {
            lora_adapters: Some(dir.path().join("x")),
            ..request
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not train LoRA"), "{err}");
        let bare = ExportRequest {
            model: Some(model.clone()),
            checkpoint: Some(checkpoint_path(&run_dir, Version(200))),
            ..ExportRequest::default()
        };
        assert_eq!(resolve(&bare).unwrap().params, values);
        let err = resolve(&ExportRequest {
            lora_adapters: Some(dir.path().join("x")),
            ..bare.clone()
        })
        .unwrap_err();
        assert!(err.to_string().contains("needs --lora-alpha"), "{err}");
        let err = export(
            &resolve(&bare).unwrap(),
            ExportFormat::Peft,
            &dir.path().join("p"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--as-peft needs LoRA"), "{err}");
    }
}
