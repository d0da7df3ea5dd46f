//! LoRA adapters (Hu et al. 2021) on the GPT's attention and MLP projections, named and shaped
//! exactly as `cohort_core::model::ModelConfig::lora_specs`: a projection with weight `W`
//! `[out, in]` and bias `b` computes `W x + b + (alpha / r) · B (A x)`, `A` `[r, in]`, `B`
//! `[out, r]`. The base model is frozen; only `A` and `B` train.

use cohort_core::model::ModelConfig;
use cohort_core::params::ParamLayout;
use tch::{nn, TchError, Tensor};

use crate::model::add_var;

/// Rank and scale of the adapters (the job's `LoraSpec`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: u32,
    /// The adapter output is scaled by `alpha / rank`.
    pub alpha: f64,
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / f64::from(self.rank)
    }
}

/// One projection's adapter pair.
pub(crate) struct Adapter {
    /// `[r, in]`.
    pub(crate) a: Tensor,
    /// `[out, r]`.
    pub(crate) b: Tensor,
}

/// A linear layer `x Wᵀ + b`, plus `scale · (x Aᵀ) Bᵀ` when adapted.
pub(crate) fn adapted_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    adapter: Option<(&Adapter, f64)>,
) -> Result<Tensor, TchError> {
    let base = x.f_linear(weight, Some(bias))?;
    match adapter {
        None => Ok(base),
        Some((adapter, scale)) => {
            let low_rank = x
                .f_linear(&adapter.a, None::<Tensor>)?
                .f_linear(&adapter.b, None::<Tensor>)?;
            base.f_add(&low_rank.f_mul_scalar(scale)?)
        }
    }
}

/// The adapters of one transformer block, one per projection.
pub(crate) struct BlockAdapters {
    pub(crate) c_attn: Adapter,
    pub(crate) attn_proj: Adapter,
    pub(crate) c_fc: Adapter,
    pub(crate) mlp_proj: Adapter,
}

/// Every adapter of the model, as trainable variables of the model's VarStore.
pub struct LoraAdapters {
    config: LoraConfig,
    layout: ParamLayout,
    /// In `lora_specs` order (shallow clones of the VarStore's variables).
    params: Vec<Tensor>,
    pub(crate) blocks: Vec<BlockAdapters>,
}

impl std::fmt::Debug for LoraAdapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapters")
            .field("config", &self.config)
            .field("parameters", &self.layout.total())
            .finish()
    }
}

impl LoraAdapters {
    /// Adds zero-filled trainable adapters for `model` under `root`; load real values with
    /// the model's `load_trainable_flat`.
    pub(crate) fn new(root: &nn::Path, model: &ModelConfig, config: LoraConfig) -> LoraAdapters {
        let specs = model.lora_specs(config.rank);
        let params: Vec<Tensor> = specs
            .iter()
            .map(|spec| add_var(root, &spec.name, &spec.shape, true))
            .collect();
        // Spec order: per layer, (a, b) for c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj.
        let adapter = |i: usize| Adapter {
            a: params[i].shallow_clone(),
            b: params[i + 1].shallow_clone(),
        };
        let blocks = (0..model.n_layer as usize)
            .map(|layer| {
                let base = 8 * layer;
                BlockAdapters {
                    c_attn: adapter(base),
                    attn_proj: adapter(base + 2),
                    c_fc: adapter(base + 4),
                    mlp_proj: adapter(base + 6),
                }
            })
            .collect();
        LoraAdapters {
            config,
            layout: ParamLayout::new(&specs),
            params,
            blocks,
        }
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The adapter variables in `lora_specs` order.
    pub fn parameters(&self) -> &[Tensor] {
        &self.params
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Gpt;
    use crate::optim::{InnerConfig, InnerOptimizer};
    use cohort_core::params::init_params;
    use tch::{Device, Kind};

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 37,
            context_length: 8,
            n_layer: 2,
            n_head: 2,
            d_model: 16,
            dropout: 0.0,
        }
    }

    const LORA: LoraConfig = LoraConfig {
        rank: 4,
        alpha: 8.0,
    };

    fn tokens() -> Tensor {
        Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]).view([2, 8])
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// A base model and an adapted one with the same base weights and the adapters of
    /// `lora_specs` (B = 0 at init).
    fn models() -> (Gpt, Gpt, Vec<f32>, Vec<f32>) {
        let config = tiny();
        let base_params = init_params(&config.tensor_specs(), 5);
        let adapter_params = init_params(&config.lora_specs(LORA.rank), 6);
        let mut base = Gpt::new(&config, Device::Cpu).unwrap();
        base.load_flat(&base_params).unwrap();
        let mut adapted = Gpt::with_lora(&config, LORA, Device::Cpu).unwrap();
        adapted.load_flat(&base_params).unwrap();
        adapted.load_trainable_flat(&adapter_params).unwrap();
        (base, adapted, base_params, adapter_params)
    }

    #[test]
    fn adapter_variables_match_the_specs_and_only_they_train() {
        let config = tiny();
        let model = Gpt::with_lora(&config, LORA, Device::Cpu).unwrap();
        let specs = config.lora_specs(LORA.rank);
        let vars = model.var_store().variables();
        assert_eq!(vars.len(), config.tensor_specs().len() + specs.len());
        let trainable = model.var_store().trainable_variables();
        assert_eq!(trainable.len(), specs.len());
        let adapters = model.lora().unwrap();
        assert_eq!(model.trainable_parameters().len(), specs.len());
        for (spec, param) in specs.iter().zip(adapters.parameters()) {
            let var = vars
                .get(&spec.name)
                .unwrap_or_else(|| panic!("no variable named {}", spec.name));
            let shape: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
            assert_eq!(shape, spec.shape, "{}", spec.name);
            assert_eq!(param.data_ptr(), var.data_ptr(), "{}", spec.name);
            assert!(var.requires_grad(), "{}", spec.name);
        }
        for spec in config.tensor_specs() {
            assert!(!vars[&spec.name].requires_grad(), "{} is frozen", spec.name);
        }
        assert_eq!(vars["h.1.mlp.c_proj.lora_a"].size(), vec![4, 64]);
        assert_eq!(vars["h.1.attn.c_attn.lora_b"].size(), vec![48, 4]);
        assert_eq!(
            model.trainable_names(),
            specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_adapted_model_starts_as_the_base_model() {
        let (base, adapted, _, _) = models();
        let want = base.forward(&tokens(), false).unwrap();
        let got = adapted.forward(&tokens(), false).unwrap();
        assert_eq!(
            max_abs_diff(&want, &got),
            0.0,
            "B = 0 must add exactly nothing"
        );
    }

    #[test]
    fn a_nonzero_adapter_equals_merged_weights() {
        let config = tiny();
        let (_, mut adapted, base_params, mut adapter_params) = models();
        // Give every B non-zero values.
        for (slot, spec) in adapted
            .trainable_layout()
            .clone()
            .tensors()
            .iter()
            .zip(config.lora_specs(LORA.rank))
        {
            if spec.name.ends_with(".lora_b") {
                let values = &mut adapter_params[slot.offset..slot.offset + slot.numel];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = ((slot.offset + i) as f32 * 0.37).sin() * 0.2;
                }
            }
        }
        adapted.load_trainable_flat(&adapter_params).unwrap();
        // W' = W + (alpha / r) B A, merged into a plain model.
        let mut merged_params = base_params.clone();
        let base_layout = ParamLayout::new(&config.tensor_specs());
        let lora_layout = adapted.trainable_layout().clone();
        let tensor = |layout: &ParamLayout, flat: &[f32], name: &str| {
            let slot = layout.tensors().iter().find(|t| t.name == name).unwrap();
            let dims: Vec<i64> = slot.shape.iter().map(|&d| d as i64).collect();
            Tensor::from_slice(&flat[slot.offset..slot.offset + slot.numel])
                .view(dims.as_slice())
                .to_kind(Kind::Double)
        };
        for layer in 0..config.n_layer {
            for proj in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
                let w_name = format!("h.{layer}.{proj}.weight");
                let w = tensor(&base_layout, &base_params, &w_name);
                let a = tensor(
                    &lora_layout,
                    &adapter_params,
                    &format!("h.{layer}.{proj}.lora_a"),
                );
                let b = tensor(
                    &lora_layout,
                    &adapter_params,
                    &format!("h.{layer}.{proj}.lora_b"),
                );
                let merged = (w + b.matmul(&a) * LORA.scale()).to_kind(Kind::Float);
                let slot = base_layout
                    .tensors()
                    .iter()
                    .find(|t| t.name == w_name)
                    .unwrap();
                merged.view([-1]).copy_data(
                    &mut merged_params[slot.offset..slot.offset + slot.numel],
                    slot.numel,
                );
            }
        }
        let mut plain = Gpt::new(&config, Device::Cpu).unwrap();
        plain.load_flat(&merged_params).unwrap();
        let want = plain.forward(&tokens(), false).unwrap();
        let got = adapted.forward(&tokens(), false).unwrap();
        let base_out = {
            let mut base = Gpt::new(&config, Device::Cpu).unwrap();
            base.load_flat(&base_params).unwrap();
            base.forward(&tokens(), false).unwrap()
        };
        assert!(
            max_abs_diff(&base_out, &got) > 1e-3,
            "the adapters must matter"
        );
        let diff = max_abs_diff(&want, &got);
        assert!(diff < 1e-5, "adapted vs merged: {diff}");
    }

    #[test]
    fn training_changes_only_the_adapters() {
        let (_, adapted, base_params, adapter_params) = models();
        let params: Vec<Tensor> = adapted
            .trainable_parameters()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        let mut optimizer =
            InnerOptimizer::new(InnerConfig::adamw(1e-2), adapted.trainable_names(), &params)
                .unwrap();
        let t = tokens();
        for _ in 0..3 {
            InnerOptimizer::zero_grad(&params);
            let loss = adapted
                .loss_sum(&t.narrow(1, 0, 7), &t.narrow(1, 1, 7), true)
                .unwrap();
            loss.backward();
            optimizer.step(&params).unwrap();
        }
        assert_eq!(
            adapted.export_flat().unwrap(),
            base_params,
            "the base is frozen"
        );
        let after = adapted.export_trainable_flat().unwrap();
        let changed = after
            .iter()
            .zip(&adapter_params)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            changed > after.len() / 2,
            "{changed} of {} changed",
            after.len()
        );
    }
}
