//! Cohort's GPT in the Hugging Face GPT-2 layout (transformers' `GPT2LMHeadModel`):
//! tensor names, the Conv1D transposes, `config.json`, merging LoRA adapters into the
//! weights, and PEFT's adapter names. No IO: the coordinator reads and writes the files.
//!
//! The two models compute the same function (checked against transformers in
//! `tests/tests/hf_export.rs`):
//! - GPT-2's MLP activation `gelu_new` is `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, the
//!   tanh approximation the worker computes with `gelu(x, approximate="tanh")`.
//! - LayerNorm ε is 1e-5 on both sides (`layer_norm_epsilon`).
//! - Attention scores are scaled by `1/√head_dim` (`scale_attn_weights = true`, not by the
//!   layer index) with a causal mask, as the worker's `scaled_dot_product_attention(is_causal)`.
//! - The output head is the token embedding (`tie_word_embeddings = true`).
//!
//! Layout: HF keeps every tensor under `transformer.` with the same inner names as Cohort,
//! except that the embeddings are `wte.weight`/`wpe.weight` (Cohort: `wte`/`wpe`) and the
//! four projections are Conv1D layers whose weight is stored `[in, out]`, the transpose of
//! Cohort's (and PyTorch `Linear`'s) `[out, in]`. Biases and LayerNorms are unchanged.

use serde::{Deserialize, Serialize};

pub use crate::model::LAYER_NORM_EPSILON;
use crate::model::{ModelConfig, ModelConfigError, TensorSpec};
use crate::params::ParamLayout;

/// transformers' name for GPT-2's tanh-approximated GELU.
pub const ACTIVATION_FUNCTION: &str = "gelu_new";

/// Other names transformers gives the same function (`gelu_pytorch_tanh` is PyTorch's own
/// kernel for it); accepted on import.
const TANH_GELU_NAMES: [&str; 3] = [ACTIVATION_FUNCTION, "gelu_pytorch_tanh", "gelu_python_tanh"];

/// GPT-2's `<|endoftext|>`, its BOS and EOS token, with the GPT-2 tokenizer's vocabulary.
const GPT2_END_OF_TEXT: u32 = 50256;
const GPT2_VOCAB_SIZE: u32 = 50257;

/// The projections that GPT-2 implements as Conv1D (weight `[in, out]`) and that LoRA adapts.
pub const PROJECTIONS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// PEFT's `target_modules` for those projections (`c_proj` names both `attn.c_proj` and
/// `mlp.c_proj`).
pub const PEFT_TARGET_MODULES: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// Why a Hugging Face model or adapter cannot be mapped to or from Cohort's.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HfError {
    #[error("config.json: {field} is {actual}, Cohort's GPT needs {expected}")]
    UnsupportedConfig {
        field: &'static str,
        actual: String,
        expected: String,
    },
    #[error("config.json describes an invalid model: {0}")]
    Model(#[from] ModelConfigError),
    #[error("{what} has {actual} values, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
}

/// `config.json` of a `GPT2LMHeadModel`. Missing keys take transformers' `GPT2Config`
/// defaults when read; unknown keys (tokenizer ids, task parameters) are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HfGpt2Config {
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: u32,
    pub n_positions: u32,
    /// transformers < 3 called the context `n_ctx`; some tools still read it.
    #[serde(default)]
    pub n_ctx: Option<u32>,
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    /// MLP width; `None` means 4 × `n_embd`.
    #[serde(default)]
    pub n_inner: Option<u32>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub attn_pdrop: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default = "default_true")]
    pub use_cache: bool,
    /// The dtype of `model.safetensors` (transformers < 5 reads `torch_dtype`).
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_architectures() -> Vec<String> {
    vec!["GPT2LMHeadModel".to_string()]
}
fn default_model_type() -> String {
    "gpt2".to_string()
}
fn default_activation() -> String {
    ACTIVATION_FUNCTION.to_string()
}
fn default_epsilon() -> f64 {
    LAYER_NORM_EPSILON
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}

impl HfGpt2Config {
    /// The `config.json` of `model` exported as f32. Dropout is 0 (an exported model is
    /// for inference or further fine-tuning; set the `*_pdrop` keys to taste). BOS/EOS are
    /// GPT-2's `<|endoftext|>` when the vocabulary is the GPT-2 tokenizer's, else unset
    /// (Cohort's byte-level vocabulary has no special tokens).
    pub fn from_model(model: &ModelConfig) -> HfGpt2Config {
        let end_of_text = (model.vocab_size == GPT2_VOCAB_SIZE).then_some(GPT2_END_OF_TEXT);
        HfGpt2Config {
            architectures: default_architectures(),
            model_type: default_model_type(),
            vocab_size: model.vocab_size,
            n_positions: model.context_length,
            n_ctx: Some(model.context_length),
            n_embd: model.d_model,
            n_layer: model.n_layer,
            n_head: model.n_head,
            n_inner: None,
            activation_function: default_activation(),
            layer_norm_epsilon: LAYER_NORM_EPSILON,
            resid_pdrop: 0.0,
            embd_pdrop: 0.0,
            attn_pdrop: 0.0,
            initializer_range: default_initializer_range(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            bos_token_id: end_of_text,
            eos_token_id: end_of_text,
            use_cache: true,
            torch_dtype: Some("float32".to_string()),
        }
    }

    /// The Cohort model this configuration describes, or why there is none: every
    /// setting that changes the function computed must be the one Cohort's GPT has.
    /// `reorder_and_upcast_attn` (a half-precision detail) is accepted either way.
    pub fn to_model(&self) -> Result<ModelConfig, HfError> {
        let unsupported = |field: &'static str, actual: String, expected: String| {
            Err(HfError::UnsupportedConfig {
                field,
                actual,
                expected,
            })
        };
        if self.model_type != "gpt2" {
            return unsupported(
                "model_type",
                format!("{:?}", self.model_type),
                "\"gpt2\"".into(),
            );
        }
        if !TANH_GELU_NAMES.contains(&self.activation_function.as_str()) {
            return unsupported(
                "activation_function",
                format!("{:?}", self.activation_function),
                format!("the tanh GELU ({TANH_GELU_NAMES:?})"),
            );
        }
        if self.layer_norm_epsilon != LAYER_NORM_EPSILON {
            return unsupported(
                "layer_norm_epsilon",
                self.layer_norm_epsilon.to_string(),
                LAYER_NORM_EPSILON.to_string(),
            );
        }
        if let Some(inner) = self.n_inner {
            if u64::from(inner) != 4 * u64::from(self.n_embd) {
                return unsupported(
                    "n_inner",
                    inner.to_string(),
                    format!("null or 4 × n_embd = {}", 4 * u64::from(self.n_embd)),
                );
            }
        }
        if !self.scale_attn_weights {
            return unsupported("scale_attn_weights", "false".into(), "true".into());
        }
        if self.scale_attn_by_inverse_layer_idx {
            return unsupported(
                "scale_attn_by_inverse_layer_idx",
                "true".into(),
                "false".into(),
            );
        }
        if !self.tie_word_embeddings {
            return unsupported(
                "tie_word_embeddings",
                "false".into(),
                "true (the output head is the token embedding)".into(),
            );
        }
        let model = ModelConfig {
            vocab_size: self.vocab_size,
            context_length: self.n_positions,
            n_layer: self.n_layer,
            n_head: self.n_head,
            d_model: self.n_embd,
            dropout: 0.0,
        };
        model.validate()?;
        Ok(model)
    }
}

/// One Cohort parameter and where it lives in a Hugging Face `model.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    /// Cohort's name (`h.0.attn.c_attn.weight`).
    pub cohort_name: String,
    /// HF's name (`transformer.h.0.attn.c_attn.weight`).
    pub hf_name: String,
    /// Cohort's shape (`[out, in]` for a projection weight).
    pub cohort_shape: Vec<usize>,
    /// HF's shape (`[in, out]` for a Conv1D weight).
    pub hf_shape: Vec<usize>,
    /// Whether the values are transposed between the two (the Conv1D weights).
    pub transposed: bool,
}

impl HfTensor {
    fn new(spec: &TensorSpec) -> HfTensor {
        let transposed = is_conv1d_weight(&spec.name);
        let hf_shape = if transposed {
            spec.shape.iter().rev().copied().collect()
        } else {
            spec.shape.clone()
        };
        HfTensor {
            cohort_name: spec.name.clone(),
            hf_name: hf_name(&spec.name),
            cohort_shape: spec.shape.clone(),
            hf_shape,
            transposed,
        }
    }

    /// `values` (Cohort's layout, row-major) in HF's layout.
    pub fn to_hf(&self, values: &[f32]) -> Vec<f32> {
        if self.transposed {
            transpose(values, self.cohort_shape[0], self.cohort_shape[1])
        } else {
            values.to_vec()
        }
    }

    /// `values` (HF's layout, row-major) in Cohort's layout.
    pub fn from_hf(&self, values: &[f32]) -> Vec<f32> {
        if self.transposed {
            transpose(values, self.hf_shape[0], self.hf_shape[1])
        } else {
            values.to_vec()
        }
    }
}

/// Whether the Cohort parameter `name` is a projection weight (a Conv1D in GPT-2).
fn is_conv1d_weight(name: &str) -> bool {
    name.strip_suffix(".weight")
        .is_some_and(|stem| PROJECTIONS.iter().any(|p| stem.ends_with(p)))
}

/// HF's name for the Cohort parameter `name`.
pub fn hf_name(cohort_name: &str) -> String {
    match cohort_name {
        "wte" | "wpe" => format!("transformer.{cohort_name}.weight"),
        other => format!("transformer.{other}"),
    }
}

/// What a tensor name in a Hugging Face GPT-2 checkpoint is, for import.
#[derive(Clone, Debug, PartialEq)]
pub enum HfKey {
    /// A model parameter, by its Cohort name.
    Param(String),
    /// `lm_head.weight`: must equal the token embedding (tied).
    LmHead,
    /// A non-parameter buffer that older transformers saved (`h.N.attn.bias`, the causal
    /// mask, and `h.N.attn.masked_bias`): ignored.
    Buffer,
    /// Anything else.
    Unknown,
}

/// Classifies an HF tensor name. Both `GPT2LMHeadModel` names (`transformer.h.0...`) and
/// bare `GPT2Model` names (`h.0...`, as in the original `gpt2` repository) are accepted.
pub fn classify_hf_name(name: &str) -> HfKey {
    if name == "lm_head.weight" {
        return HfKey::LmHead;
    }
    let inner = name.strip_prefix("transformer.").unwrap_or(name);
    match inner {
        "wte.weight" => HfKey::Param("wte".into()),
        "wpe.weight" => HfKey::Param("wpe".into()),
        _ if inner.ends_with(".attn.bias") || inner.ends_with(".attn.masked_bias") => HfKey::Buffer,
        _ if inner.starts_with("h.") || inner.starts_with("ln_f.") => {
            HfKey::Param(inner.to_string())
        }
        _ => HfKey::Unknown,
    }
}

/// Every parameter of `model` in spec order, with its HF name and layout.
pub fn hf_tensors(model: &ModelConfig) -> Vec<HfTensor> {
    model.tensor_specs().iter().map(HfTensor::new).collect()
}

/// `src` (`rows × cols`, row-major) transposed to `cols × rows`.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose of a {rows}×{cols} matrix"
    );
    let mut out = vec![0f32; src.len()];
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &value) in row.iter().enumerate() {
            out[c * rows + r] = value;
        }
    }
    out
}

/// The element types a Hugging Face checkpoint may store; all are read as f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

impl HfDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            HfDtype::F32 => 4,
            HfDtype::F16 | HfDtype::BF16 => 2,
        }
    }
}

/// Little-endian `bytes` of `dtype` as f32 (exact: every f16 and bf16 is an f32).
pub fn decode_to_f32(dtype: HfDtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        HfDtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        HfDtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        HfDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// LoRA adapters in Cohort's `lora_specs` layout, with the settings they were trained with.
#[derive(Clone, Copy, Debug)]
pub struct LoraAdapters<'a> {
    pub rank: u32,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Laid out as `model.lora_specs(rank)`.
    pub values: &'a [f32],
}

/// The base parameters with every adapter merged in: `W + (alpha / rank) · B A` for each
/// projection weight `W` `[out, in]`, `A` `[rank, in]`, `B` `[out, rank]`, summed in f64
/// and rounded once. Everything else is copied.
pub fn merge_lora(
    model: &ModelConfig,
    base: &[f32],
    adapters: LoraAdapters<'_>,
) -> Result<Vec<f32>, HfError> {
    let base_layout = ParamLayout::new(&model.tensor_specs());
    let lora_layout = ParamLayout::new(&model.lora_specs(adapters.rank));
    for (what, layout, values) in [
        ("base parameters", &base_layout, base),
        ("LoRA adapters", &lora_layout, adapters.values),
    ] {
        if values.len() != layout.total() {
            return Err(HfError::Length {
                what,
                expected: layout.total(),
                actual: values.len(),
            });
        }
    }
    let scale = adapters.alpha / f64::from(adapters.rank);
    let rank = adapters.rank as usize;
    let mut merged = base.to_vec();
    let slot = |layout: &ParamLayout, name: &str| {
        layout
            .tensors()
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is in the model's specs"))
    };
    for layer in 0..model.n_layer {
        for proj in PROJECTIONS {
            let w = slot(&base_layout, &format!("h.{layer}.{proj}.weight"));
            let a = slot(&lora_layout, &format!("h.{layer}.{proj}.lora_a"));
            let b = slot(&lora_layout, &format!("h.{layer}.{proj}.lora_b"));
            let (out, inp) = (w.shape[0], w.shape[1]);
            let a = &adapters.values[a.offset..a.offset + a.numel];
            let b = &adapters.values[b.offset..b.offset + b.numel];
            let w = &mut merged[w.offset..w.offset + w.numel];
            for o in 0..out {
                let b_row = &b[o * rank..(o + 1) * rank];
                for i in 0..inp {
                    let low_rank: f64 = b_row
                        .iter()
                        .enumerate()
                        .map(|(k, &b_ok)| f64::from(b_ok) * f64::from(a[k * inp + i]))
                        .sum();
                    let cell = &mut w[o * inp + i];
                    *cell = (f64::from(*cell) + scale * low_rank) as f32;
                }
            }
        }
    }
    Ok(merged)
}

/// PEFT's name for the Cohort adapter `h.{i}.{proj}.lora_a` / `.lora_b`, as PEFT saves it in
/// `adapter_model.safetensors` (`base_model.model.transformer.h.{i}.{proj}.lora_A.weight`).
/// PEFT's `lora_A` is `[rank, in]` and `lora_B` `[out, rank]` for Conv1D layers too, the
/// shapes Cohort uses, so the values are copied unchanged; `fan_in_fan_out = true` only
/// tells PEFT to transpose `B A` when it merges into the `[in, out]` Conv1D weight.
pub fn peft_name(cohort_adapter_name: &str) -> Option<String> {
    let (stem, which) = if let Some(stem) = cohort_adapter_name.strip_suffix(".lora_a") {
        (stem, "lora_A")
    } else {
        (cohort_adapter_name.strip_suffix(".lora_b")?, "lora_B")
    };
    Some(format!(
        "base_model.model.transformer.{stem}.{which}.weight"
    ))
}

/// `adapter_config.json` of a PEFT LoRA adapter for a `GPT2LMHeadModel`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeftLoraConfig {
    pub peft_type: String,
    pub task_type: String,
    /// Where the base model is (a directory or a hub id).
    pub base_model_name_or_path: String,
    pub r: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    /// GPT-2's Conv1D weights are `[in, out]`.
    pub fan_in_fan_out: bool,
    pub bias: String,
    pub use_rslora: bool,
    pub inference_mode: bool,
}

impl PeftLoraConfig {
    pub fn new(rank: u32, alpha: f64, base_model_name_or_path: String) -> PeftLoraConfig {
        PeftLoraConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path,
            r: rank,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules: PEFT_TARGET_MODULES.iter().map(|m| m.to_string()).collect(),
            fan_in_fan_out: true,
            bias: "none".into(),
            // Scale alpha / r, as Cohort's; rsLoRA would scale alpha / √r.
            use_rslora: false,
            inference_mode: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::init_params;

    #[test]
    fn names_follow_gpt2lmheadmodel() {
        let model = ModelConfig::tiny_byte_level();
        let tensors = hf_tensors(&model);
        assert_eq!(tensors.len(), model.tensor_specs().len());
        let by_name = |name: &str| tensors.iter().find(|t| t.cohort_name == name).unwrap();
        assert_eq!(by_name("wte").hf_name, "transformer.wte.weight");
        assert_eq!(by_name("wpe").hf_name, "transformer.wpe.weight");
        assert_eq!(by_name("ln_f.bias").hf_name, "transformer.ln_f.bias");
        let c_attn = by_name("h.1.attn.c_attn.weight");
        assert_eq!(c_attn.hf_name, "transformer.h.1.attn.c_attn.weight");
        assert_eq!(c_attn.cohort_shape, vec![192, 64]);
        assert_eq!(c_attn.hf_shape, vec![64, 192]);
        assert!(c_attn.transposed);
        assert_eq!(by_name("h.0.mlp.c_proj.weight").hf_shape, vec![256, 64]);
        for name in ["wte", "wpe", "h.0.attn.c_attn.bias", "h.0.ln_2.weight"] {
            assert!(!by_name(name).transposed, "{name}");
            assert_eq!(by_name(name).hf_shape, by_name(name).cohort_shape);
        }
        assert_eq!(tensors.iter().filter(|t| t.transposed).count(), 4 * 2);
        // Every HF name classifies back to its Cohort name, with or without the prefix.
        for t in &tensors {
            assert_eq!(
                classify_hf_name(&t.hf_name),
                HfKey::Param(t.cohort_name.clone())
            );
            let bare = t.hf_name.strip_prefix("transformer.").unwrap();
            assert_eq!(classify_hf_name(bare), HfKey::Param(t.cohort_name.clone()));
        }
        assert_eq!(classify_hf_name("lm_head.weight"), HfKey::LmHead);
        assert_eq!(classify_hf_name("h.3.attn.bias"), HfKey::Buffer);
        assert_eq!(
            classify_hf_name("transformer.h.3.attn.masked_bias"),
            HfKey::Buffer
        );
        assert_eq!(classify_hf_name("score.weight"), HfKey::Unknown);
    }

    #[test]
    fn conv1d_weights_round_trip_through_the_transpose() {
        let model = ModelConfig::tiny_byte_level();
        let t = hf_tensors(&model)
            .into_iter()
            .find(|t| t.cohort_name == "h.0.mlp.c_fc.weight")
            .unwrap();
        let values: Vec<f32> = (0..t.cohort_shape.iter().product::<usize>())
            .map(|i| i as f32)
            .collect();
        let hf = t.to_hf(&values);
        // Cohort [out, in][o][i] == HF [in, out][i][o].
        let (out, inp) = (t.cohort_shape[0], t.cohort_shape[1]);
        assert_eq!(hf[5 * out + 7], values[7 * inp + 5]);
        assert_eq!(t.from_hf(&hf), values);
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }

    #[test]
    fn config_round_trips_and_matches_gpt2_small() {
        let small = HfGpt2Config::from_model(&ModelConfig::gpt2_small());
        assert_eq!(small.n_embd, 768);
        assert_eq!(small.n_positions, 1024);
        assert_eq!(small.n_ctx, Some(1024));
        assert_eq!(small.eos_token_id, Some(50256));
        assert_eq!(small.activation_function, "gelu_new");
        assert_eq!(small.layer_norm_epsilon, 1e-5);
        assert!(small.tie_word_embeddings);
        assert_eq!(small.architectures, ["GPT2LMHeadModel"]);
        assert_eq!(small.to_model().unwrap(), ModelConfig::gpt2_small());
        let tiny = HfGpt2Config::from_model(&ModelConfig::tiny_byte_level());
        assert_eq!(tiny.bos_token_id, None);
        let json = serde_json::to_string(&tiny).unwrap();
        let back: HfGpt2Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, tiny);
        assert_eq!(back.to_model().unwrap(), ModelConfig::tiny_byte_level());
    }

    #[test]
    fn a_minimal_config_takes_gpt2_defaults_and_unknown_keys_are_ignored() {
        let config: HfGpt2Config = serde_json::from_str(
            r#"{"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                "n_head": 12, "task_specific_params": {"text-generation": {"max_length": 50}}}"#,
        )
        .unwrap();
        assert_eq!(config.to_model().unwrap(), ModelConfig::gpt2_small());
    }

    #[test]
    fn import_refuses_a_model_that_computes_something_else() {
        let base = HfGpt2Config::from_model(&ModelConfig::tiny_byte_level());
        type Change = Box<dyn Fn(&mut HfGpt2Config)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.activation_function = "relu".into()),
                "activation_function",
            ),
            (
                Box::new(|c| c.layer_norm_epsilon = 1e-6),
                "layer_norm_epsilon",
            ),
            (Box::new(|c| c.n_inner = Some(100)), "n_inner"),
            (
                Box::new(|c| c.scale_attn_by_inverse_layer_idx = true),
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                Box::new(|c| c.scale_attn_weights = false),
                "scale_attn_weights",
            ),
            (
                Box::new(|c| c.tie_word_embeddings = false),
                "tie_word_embeddings",
            ),
            (Box::new(|c| c.model_type = "gpt_neo".into()), "model_type"),
        ];
        for (change, field) in cases {
            let mut config = base.clone();
            change(&mut config);
            let err = config.to_model().unwrap_err();
            assert!(
                matches!(&err, HfError::UnsupportedConfig { field: f, .. } if *f == field),
                "{field}: {err}"
            );
        }
        let mut odd_heads = base.clone();
        odd_heads.n_head = 3;
        assert!(matches!(odd_heads.to_model(), Err(HfError::Model(_))));
        let mut same_gelu = base;
        same_gelu.activation_function = "gelu_pytorch_tanh".into();
        same_gelu.n_inner = Some(256);
        assert!(same_gelu.to_model().is_ok());
    }

    #[test]
    fn merging_adds_the_scaled_low_rank_product_to_each_projection() {
        let model = ModelConfig {
            vocab_size: 11,
            context_length: 4,
            n_layer: 1,
            n_head: 1,
            d_model: 2,
            dropout: 0.0,
        };
        let base = init_params(&model.tensor_specs(), 1);
        let rank = 1;
        let lora_layout = ParamLayout::new(&model.lora_specs(rank));
        let mut adapters = vec![0f32; lora_layout.total()];
        // c_attn: A = [1, 2] (1×2), B = [1, 0, 0, 0, 0, 3]ᵀ (6×1).
        let find = |name: &str| {
            lora_layout
                .tensors()
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .clone()
        };
        let a = find("h.0.attn.c_attn.lora_a");
        let b = find("h.0.attn.c_attn.lora_b");
        adapters[a.offset..a.offset + 2].copy_from_slice(&[1.0, 2.0]);
        adapters[b.offset] = 1.0;
        adapters[b.offset + 5] = 3.0;
        let merged = merge_lora(
            &model,
            &base,
            LoraAdapters {
                rank,
                alpha: 4.0,
                values: &adapters,
            },
        )
        .unwrap();
        let base_layout = ParamLayout::new(&model.tensor_specs());
        let w = base_layout
            .tensors()
            .iter()
            .find(|t| t.name == "h.0.attn.c_attn.weight")
            .unwrap();
        // Scale 4: row 0 gains 4·[1, 2], row 5 gains 4·3·[1, 2], the rest nothing.
        let diff: Vec<f32> = (0..w.numel)
            .map(|i| merged[w.offset + i] - base[w.offset + i])
            .collect();
        let want = [4.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 12.0, 24.0];
        for (got, want) in diff.iter().zip(want) {
            assert!((got - want).abs() < 1e-5, "{diff:?}");
        }
        // Nothing outside the adapted projection moved (B is zero elsewhere).
        let changed = merged.iter().zip(&base).filter(|(m, b)| m != b).count();
        assert_eq!(changed, 4);
        assert!(matches!(
            merge_lora(
                &model,
                &base[1..],
                LoraAdapters {
                    rank,
                    alpha: 4.0,
                    values: &adapters
                }
            ),
            Err(HfError::Length { .. })
        ));
    }

    #[test]
    fn half_precision_checkpoints_decode_exactly() {
        let values = [1.5f32, -0.25, 65504.0];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_to_f32(HfDtype::F32, &f32_bytes), values);
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(decode_to_f32(HfDtype::F16, &f16_bytes), values);
        let bf16_bytes: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(decode_to_f32(HfDtype::BF16, &bf16_bytes), [1.5, -0.25]);
        assert_eq!(HfDtype::BF16.size_bytes(), 2);
    }

    #[test]
    fn peft_names_and_config() {
        assert_eq!(
            peft_name("h.0.attn.c_attn.lora_a").unwrap(),
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
        );
        assert_eq!(
            peft_name("h.11.mlp.c_proj.lora_b").unwrap(),
            "base_model.model.transformer.h.11.mlp.c_proj.lora_B.weight"
        );
        assert_eq!(peft_name("h.0.attn.c_attn.weight"), None);
        // Every adapter of the model has a distinct PEFT name.
        let specs = ModelConfig::tiny_byte_level().lora_specs(4);
        let names: std::collections::BTreeSet<String> =
            specs.iter().map(|s| peft_name(&s.name).unwrap()).collect();
        assert_eq!(names.len(), specs.len());
        let config = PeftLoraConfig::new(4, 8.0, "base".into());
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["r"], 4);
        assert_eq!(json["lora_alpha"], 8.0);
        assert_eq!(json["fan_in_fan_out"], true);
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(
            json["target_modules"],
            serde_json::json!(["c_attn", "c_proj", "c_fc"])
        );
    }
}
