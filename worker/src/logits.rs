//! Cohort's own forward pass on given tokens, from checkpoint files: the reference that
//! exported models are checked against (`cohort-worker logits`, used by
//! `tests/tests/hf_export.rs` to compare with transformers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cohort_core::model::{ModelConfig, TensorSpec};
use cohort_core::params::ParamLayout;
use tch::{Device, Kind, Tensor};

use crate::lora::LoraConfig;
use crate::model::{Gpt, ModelError};

/// Why logits cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum LogitsError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("token {token} is outside the vocabulary (0..{vocab})")]
    Token { token: i64, vocab: u32 },
    #[error("no tokens given")]
    NoTokens,
}

fn file_error(path: &Path, message: impl Into<String>) -> LogitsError {
    LogitsError::File {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// LoRA adapters from a checkpoint file; their rank is read from the file.
#[derive(Clone, Debug)]
pub struct AdapterFile {
    pub path: PathBuf,
    pub alpha: f64,
}

/// The tensors of a safetensors checkpoint, by name.
fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, LogitsError> {
    Ok(Tensor::read_safetensors(path)
        .map_err(|e| file_error(path, e.to_string()))?
        .into_iter()
        .collect())
}

/// The tensors `specs` names, f32, laid end to end in spec order.
fn flatten(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    specs: &[TensorSpec],
) -> Result<Vec<f32>, LogitsError> {
    let layout = ParamLayout::new(specs);
    let mut flat = vec![0f32; layout.total()];
    for slot in layout.tensors() {
        let tensor = tensors
            .get(&slot.name)
            .ok_or_else(|| file_error(path, format!("has no tensor {}", slot.name)))?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        if shape != slot.shape {
            return Err(file_error(
                path,
                format!(
                    "tensor {} is {shape:?}, the model needs {:?}",
                    slot.name, slot.shape
                ),
            ));
        }
        tensor
            .f_to_kind(Kind::Float)
            .and_then(|t| t.f_contiguous())
            .and_then(|t| {
                t.f_copy_data(&mut flat[slot.offset..slot.offset + slot.numel], slot.numel)
            })
            .map_err(|e| file_error(path, format!("tensor {}: {e}", slot.name)))?;
    }
    Ok(flat)
}

/// Logits `[tokens.len()][vocab_size]` of `model` with the parameters in `checkpoint`
/// (Cohort names) and, optionally, LoRA adapters, on CPU in f32, without dropout.
pub fn logits(
    model: &ModelConfig,
    checkpoint: &Path,
    adapters: Option<&AdapterFile>,
    tokens: &[i64],
) -> Result<Vec<Vec<f32>>, LogitsError> {
    if tokens.is_empty() {
        return Err(LogitsError::NoTokens);
    }
    if let Some(&token) = tokens
        .iter()
        .find(|&&t| t < 0 || t >= i64::from(model.vocab_size))
    {
        return Err(LogitsError::Token {
            token,
            vocab: model.vocab_size,
        });
    }
    let base = flatten(
        checkpoint,
        &read_tensors(checkpoint)?,
        &model.tensor_specs(),
    )?;
    let mut gpt = match adapters {
        None => Gpt::new(model, Device::Cpu)?,
        Some(file) => {
            let tensors = read_tensors(&file.path)?;
            let rank = tensors
                .get("h.0.attn.c_attn.lora_a")
                .and_then(|a| a.size().first().copied())
                .ok_or_else(|| file_error(&file.path, "has no tensor h.0.attn.c_attn.lora_a"))?;
            let rank = u32::try_from(rank).map_err(|_| file_error(&file.path, "bad rank"))?;
            let mut gpt = Gpt::with_lora(
                model,
                LoraConfig {
                    rank,
                    alpha: file.alpha,
                },
                Device::Cpu,
            )?;
            gpt.load_trainable_flat(&flatten(&file.path, &tensors, &model.lora_specs(rank))?)?;
            gpt
        }
    };
    gpt.load_flat(&base)?;
    let input = Tensor::from_slice(tokens).view([1, tokens.len() as i64]);
    let output = tch::no_grad(|| gpt.forward(&input, false))?;
    let vocab = model.vocab_size as usize;
    let mut flat = vec![0f32; tokens.len() * vocab];
    output
        .f_contiguous()
        .and_then(|t| t.f_copy_data(&mut flat, tokens.len() * vocab))
        .map_err(ModelError::from)?;
    Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_core::params::init_params;

    #[test]
    fn logits_match_the_model_loaded_directly() {
        let dir = tempfile::tempdir().unwrap();
        let model = ModelConfig {
            vocab_size: 23,
            context_length: 8,
            n_layer: 1,
            n_head: 2,
            d_model: 8,
            dropout: 0.0,
        };
        let specs = model.tensor_specs();
        let params = init_params(&specs, 4);
        let mut gpt = Gpt::new(&model, Device::Cpu).unwrap();
        gpt.load_flat(&params).unwrap();
        let path = dir.path().join("model.safetensors");
        let named: Vec<(String, Tensor)> = gpt
            .parameter_names()
            .into_iter()
            .zip(gpt.parameters().iter().map(Tensor::shallow_clone))
            .collect();
        Tensor::write_safetensors(&named, &path).unwrap();
        let tokens = [3i64, 1, 4, 1, 5];
        let got = logits(&model, &path, None, &tokens).unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(got[0].len(), 23);
        let want = gpt
            .forward(&Tensor::from_slice(&tokens).view([1, 5]), false)
            .unwrap();
        assert_eq!(want.double_value(&[0, 4, 7]) as f32, got[4][7]);
        assert!(matches!(
            logits(&model, &path, None, &[23]),
            Err(LogitsError::Token { token: 23, .. })
        ));
        let err = logits(&model, &dir.path().join("nope"), None, &tokens).unwrap_err();
        assert!(matches!(err, LogitsError::File { .. }), "{err}");
    }
}
