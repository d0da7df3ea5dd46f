//! The GPT model's configuration and the list of its parameters.
//!
//! The coordinator never runs the model, but it owns the global parameters:
//! it initialises them, validates pushes against their shapes and writes
//! checkpoints. So the parameter list is defined here, once, and the worker
//! builds its tch module to match it name for name (a worker test checks).

use serde::{Deserialize, Serialize};

/// LayerNorm ε of every LayerNorm in the model (GPT-2's `layer_norm_epsilon`); the worker
/// computes with it and the Hugging Face export writes it.
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// Architecture of a GPT-style decoder: causal self-attention, pre-LayerNorm,
/// GELU MLP (4× width), learned positions, tied input/output embeddings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: u32,
    pub context_length: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub d_model: u32,
    #[serde(default)]
    pub dropout: f32,
}

/// How a parameter is initialised (GPT-2's scheme).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal {
        std: f32,
    },
    Zeros,
    Ones,
}

/// One named parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Why a model configuration cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelConfigError {
    #[error("model.{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("model.d_model ({d_model}) must be divisible by model.n_head ({n_head})")]
    HeadsDoNotDivide { d_model: u32, n_head: u32 },
    #[error("model.dropout must be in [0, 1), got {0}")]
    Dropout(f32),
}

impl ModelConfig {
    /// The tiny default: trains on a laptop CPU in minutes.
    pub fn tiny_byte_level() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            context_length: 64,
            n_layer: 2,
            n_head: 4,
            d_model: 64,
            dropout: 0.0,
        }
    }

    /// GPT-2 small (124M parameters).
    pub fn gpt2_small() -> ModelConfig {
        ModelConfig {
            vocab_size: 50257,
            context_length: 1024,
            n_layer: 12,
            n_head: 12,
            d_model: 768,
            dropout: 0.0,
        }
    }

    pub fn validate(&self) -> Result<(), ModelConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("d_model", self.d_model),
        ] {
            if value == 0 {
                return Err(ModelConfigError::Zero { field });
            }
        }
        if !self.d_model.is_multiple_of(self.n_head) {
            return Err(ModelConfigError::HeadsDoNotDivide {
                d_model: self.d_model,
                n_head: self.n_head,
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelConfigError::Dropout(self.dropout));
        }
        Ok(())
    }

    /// The parameters in the order they are pulled, pushed and checkpointed.
    /// Linear weights are `[out, in]` (PyTorch's layout).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let d = self.d_model as usize;
        let std = 0.02f32;
        // GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        let proj_std = std / (2.0 * self.n_layer as f32).sqrt();
        let spec = |name: String, shape: Vec<usize>, init: Init| TensorSpec { name, shape, init };
        let mut specs = vec![
            spec(
                "wte".into(),
                vec![self.vocab_size as usize, d],
                Init::Normal { std },
            ),
            spec(
                "wpe".into(),
                vec![self.context_length as usize, d],
                Init::Normal { std: 0.01 },
            ),
        ];
        for layer in 0..self.n_layer {
            let p = |suffix: &str| format!("h.{layer}.{suffix}");
            specs.extend([
                spec(p("ln_1.weight"), vec![d], Init::Ones),
                spec(p("ln_1.bias"), vec![d], Init::Zeros),
                spec(
                    p("attn.c_attn.weight"),
                    vec![3 * d, d],
                    Init::Normal { std },
                ),
                spec(p("attn.c_attn.bias"), vec![3 * d], Init::Zeros),
                spec(
                    p("attn.c_proj.weight"),
                    vec![d, d],
                    Init::Normal { std: proj_std },
                ),
                spec(p("attn.c_proj.bias"), vec![d], Init::Zeros),
                spec(p("ln_2.weight"), vec![d], Init::Ones),
                spec(p("ln_2.bias"), vec![d], Init::Zeros),
                spec(p("mlp.c_fc.weight"), vec![4 * d, d], Init::Normal { std }),
                spec(p("mlp.c_fc.bias"), vec![4 * d], Init::Zeros),
                spec(
                    p("mlp.c_proj.weight"),
                    vec![d, 4 * d],
                    Init::Normal { std: proj_std },
                ),
                spec(p("mlp.c_proj.bias"), vec![d], Init::Zeros),
            ]);
        }
        specs.push(spec("ln_f.weight".into(), vec![d], Init::Ones));
        specs.push(spec("ln_f.bias".into(), vec![d], Init::Zeros));
        specs
    }

    pub fn parameter_count(&self) -> usize {
        self.tensor_specs().iter().map(TensorSpec::numel).sum()
    }

    /// LoRA adapters (Hu et al. 2021) on every attention and MLP projection,
    /// in the order they are pulled, pushed and checkpointed. For a base
    /// weight `h.{i}.{proj}.weight` of shape `[out, in]` the adapter is
    /// `h.{i}.{proj}.lora_a` `[rank, in]` and `h.{i}.{proj}.lora_b`
    /// `[out, rank]`; the layer computes `W x + (alpha / rank) B A x`. `B`
    /// starts at zero, so the adapted model starts as the base model.
    pub fn lora_specs(&self, rank: u32) -> Vec<TensorSpec> {
        let d = self.d_model as usize;
        let r = rank as usize;
        let mut specs = Vec::new();
        for layer in 0..self.n_layer {
            for (proj, out, inp) in [
                ("attn.c_attn", 3 * d, d),
                ("attn.c_proj", d, d),
                ("mlp.c_fc", 4 * d, d),
                ("mlp.c_proj", d, 4 * d),
            ] {
                specs.push(TensorSpec {
                    name: format!("h.{layer}.{proj}.lora_a"),
                    shape: vec![r, inp],
                    // PEFT's Kaiming-uniform draws from U(-1/sqrt(in), 1/sqrt(in)):
                    // the same standard deviation, as a normal.
                    init: Init::Normal {
                        std: 1.0 / (3.0 * inp as f32).sqrt(),
                    },
                });
                specs.push(TensorSpec {
                    name: format!("h.{layer}.{proj}.lora_b"),
                    shape: vec![out, r],
                    init: Init::Zeros,
                });
            }
        }
        specs
    }

    /// The linear head of a sequence classifier: `cls_head.weight`
    /// `[num_classes, d_model]` and `cls_head.bias` `[num_classes]`, applied
    /// to the final (layer-normed) hidden states averaged over the example's
    /// tokens. Trained and sent in every round of a classification job.
    pub fn classifier_specs(&self, num_classes: u32) -> Vec<TensorSpec> {
        let d = self.d_model as usize;
        let k = num_classes as usize;
        vec![
            TensorSpec {
                name: CLASSIFIER_WEIGHT.to_string(),
                shape: vec![k, d],
                init: Init::Normal { std: 0.02 },
            },
            TensorSpec {
                name: CLASSIFIER_BIAS.to_string(),
                shape: vec![k],
                init: Init::Zeros,
            },
        ]
    }
}

/// The classification head's weight, `[num_classes, d_model]`.
pub const CLASSIFIER_WEIGHT: &str = "cls_head.weight";
/// The classification head's bias, `[num_classes]`.
pub const CLASSIFIER_BIAS: &str = "cls_head.bias";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_124m_parameters() {
        // 124,439,808 is GPT-2 small with tied embeddings (Radford et al. 2019, HF config).
        assert_eq!(ModelConfig::gpt2_small().parameter_count(), 124_439_808);
    }

    #[test]
    fn lora_adapters_cover_every_projection() {
        let config = ModelConfig::tiny_byte_level();
        let specs = config.lora_specs(4);
        assert_eq!(specs.len(), 2 * 4 * 2);
        let base: std::collections::HashMap<String, Vec<usize>> = config
            .tensor_specs()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        for pair in specs.chunks(2) {
            let stem = pair[0].name.strip_suffix(".lora_a").unwrap();
            assert_eq!(pair[1].name, format!("{stem}.lora_b"));
            let weight = &base[&format!("{stem}.weight")];
            // B A has the base weight's shape [out, in].
            assert_eq!(pair[1].shape[0], weight[0]);
            assert_eq!(pair[0].shape[1], weight[1]);
            assert_eq!(pair[0].shape[0], 4);
            assert_eq!(pair[1].init, Init::Zeros);
        }
        // 2 layers x (4*(64+192) + 4*(64+64) + 4*(64+256) + 4*(256+64)) = 8192.
        assert_eq!(specs.iter().map(TensorSpec::numel).sum::<usize>(), 8192);
    }

    #[test]
    fn validation_names_the_field() {
        let mut config = ModelConfig::tiny_byte_level();
        config.n_head = 3;
        assert_eq!(
            config.validate(),
            Err(ModelConfigError::HeadsDoNotDivide {
                d_model: 64,
                n_head: 3
            })
        );
        config.n_head = 0;
        assert_eq!(
            config.validate(),
            Err(ModelConfigError::Zero { field: "n_head" })
        );
    }
}
