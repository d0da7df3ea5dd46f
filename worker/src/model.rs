//! The GPT decoder in tch, its variables named exactly as `cohort_core::model::ModelConfig::tensor_specs()`,
//! optionally with frozen base weights and trainable LoRA adapters ([`crate::lora`]).

use cohort_core::model::ModelConfig;
use cohort_core::params::ParamLayout;
use tch::{nn, Device, Kind, Reduction, TchError, Tensor};

use crate::lora::{adapted_linear, LoraAdapters, LoraConfig};

const LAYER_NORM_EPS: f64 = cohort_core::model::LAYER_NORM_EPSILON;

/// Why the model cannot be built, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model configuration: {0}")]
    Config(#[from] cohort_core::model::ModelConfigError),
    #[error("flat parameter buffer has {actual} values, the model has {expected}")]
    ParamCount { expected: usize, actual: usize },
    #[error("input has {actual} positions, more than the context length {context}")]
    TooLong { actual: i64, context: i64 },
    #[error("LoRA needs a rank of at least 1 and a positive alpha, got {0:?}")]
    Lora(LoraConfig),
    #[error("a classifier needs 2 to {max} classes, got {0}", max = cohort_core::federated::FederatedTask::MAX_CLASSES)]
    Classes(u32),
    #[error("this model has no classification head")]
    NoHead,
    #[error("{0}")]
    Batch(String),
    #[error("torch error: {0}")]
    Torch(#[from] TchError),
}

struct Block {
    ln_1_w: Tensor,
    ln_1_b: Tensor,
    c_attn_w: Tensor,
    c_attn_b: Tensor,
    attn_proj_w: Tensor,
    attn_proj_b: Tensor,
    ln_2_w: Tensor,
    ln_2_b: Tensor,
    c_fc_w: Tensor,
    c_fc_b: Tensor,
    mlp_proj_w: Tensor,
    mlp_proj_b: Tensor,
}

/// A GPT-2-style decoder (pre-LayerNorm, causal attention, GELU MLP, tied embeddings).
pub struct Gpt {
    config: ModelConfig,
    layout: ParamLayout,
    vs: nn::VarStore,
    /// Every parameter in spec order (shallow clones of the VarStore's variables).
    params: Vec<Tensor>,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f_w: Tensor,
    ln_f_b: Tensor,
    /// With LoRA, the base parameters are frozen and only these train.
    lora: Option<LoraAdapters>,
    /// A classification head (`cls_head.weight`, `cls_head.bias`), always trainable.
    head: Option<[Tensor; 2]>,
    /// What trains, in push order: the adapters (LoRA) or every parameter, then the head.
    trainable: Vec<Tensor>,
    trainable_layout: ParamLayout,
}

/// What a federated model trains besides (or instead of) every base parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModelOptions {
    /// Train LoRA adapters on a frozen base.
    pub lora: Option<LoraConfig>,
    /// Add a classification head over this many classes.
    pub num_classes: Option<u32>,
}

impl std::fmt::Debug for Gpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt")
            .field("config", &self.config)
            .field("parameters", &self.layout.total())
            .field("lora", &self.lora)
            .field("classes", &self.head.as_ref().map(|[_, b]| b.size()[0]))
            .field("device", &self.vs.device())
            .finish()
    }
}

/// Creates a zero-filled variable whose VarStore name is `name` (dots become sub-paths);
/// a frozen one (`trainable` false) does not require gradients.
pub(crate) fn add_var(root: &nn::Path, name: &str, shape: &[usize], trainable: bool) -> Tensor {
    let mut parts: Vec<&str> = name.split('.').collect();
    let last = parts.pop().unwrap_or(name);
    let mut path = root.clone();
    for part in parts {
        path = path.sub(part);
    }
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    if trainable {
        path.zeros(last, &dims)
    } else {
        path.zeros_no_train(last, &dims)
    }
}

/// Copies `flat`, laid out as `layout`, into `params` (in layout order).
fn load_tensors(
    params: &[Tensor],
    layout: &ParamLayout,
    flat: &[f32],
    device: Device,
) -> Result<(), ModelError> {
    if flat.len() != layout.total() {
        return Err(ModelError::ParamCount {
            expected: layout.total(),
            actual: flat.len(),
        });
    }
    tch::no_grad(|| -> Result<(), ModelError> {
        for (param, slot) in params.iter().zip(layout.tensors()) {
            let dims: Vec<i64> = slot.shape.iter().map(|&d| d as i64).collect();
            let src = Tensor::f_from_slice(&flat[slot.offset..slot.offset + slot.numel])?
                .f_view(dims.as_slice())?
                .f_to_device(device)?;
            param.shallow_clone().f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Copies `params` out into one flat buffer laid out as `layout`.
fn export_tensors(params: &[Tensor], layout: &ParamLayout) -> Result<Vec<f32>, ModelError> {
    let mut flat = vec![0f32; layout.total()];
    tch::no_grad(|| -> Result<(), ModelError> {
        for (param, slot) in params.iter().zip(layout.tensors()) {
            let host = param
                .f_detach()?
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_contiguous()?;
            host.f_copy_data(&mut flat[slot.offset..slot.offset + slot.numel], slot.numel)?;
        }
        Ok(())
    })?;
    Ok(flat)
}

impl Gpt {
    /// Builds the model with all parameters zero and trainable; load real values with
    /// [`Gpt::load_flat`].
    pub fn new(config: &ModelConfig, device: Device) -> Result<Gpt, ModelError> {
        Gpt::with_options(config, ModelOptions::default(), device)
    }

    /// Builds the model with frozen base parameters and trainable LoRA adapters (`lora_specs`
    /// of `lora.rank`), all zero: load the base with [`Gpt::load_flat`] and the adapters with
    /// [`Gpt::load_trainable_flat`].
    pub fn with_lora(
        config: &ModelConfig,
        lora: LoraConfig,
        device: Device,
    ) -> Result<Gpt, ModelError> {
        Gpt::with_options(
            config,
            ModelOptions {
                lora: Some(lora),
                num_classes: None,
            },
            device,
        )
    }

    /// Builds the model, all zero, with LoRA adapters and/or a classification head as
    /// `options` says. The trainable layout is the adapters (or every parameter), then
    /// the head (`ModelConfig::classifier_specs`).
    pub fn with_options(
        config: &ModelConfig,
        options: ModelOptions,
        device: Device,
    ) -> Result<Gpt, ModelError> {
        if let Some(lora) = options.lora {
            if lora.rank == 0 || !(lora.alpha.is_finite() && lora.alpha > 0.0) {
                return Err(ModelError::Lora(lora));
            }
        }
        if let Some(k) = options.num_classes {
            if !(2..=cohort_core::federated::FederatedTask::MAX_CLASSES).contains(&k) {
                return Err(ModelError::Classes(k));
            }
        }
        let lora = options.lora;
        config.validate()?;
        let specs = config.tensor_specs();
        let layout = ParamLayout::new(&specs);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let params: Vec<Tensor> = specs
            .iter()
            .map(|spec| add_var(&root, &spec.name, &spec.shape, lora.is_none()))
            .collect();
        let lora = lora.map(|lora| LoraAdapters::new(&root, config, lora));
        let head_specs = options
            .num_classes
            .map_or_else(Vec::new, |k| config.classifier_specs(k));
        let head_params: Vec<Tensor> = head_specs
            .iter()
            .map(|spec| add_var(&root, &spec.name, &spec.shape, true))
            .collect();
        let (mut trainable, mut trainable_specs): (Vec<Tensor>, _) = match &lora {
            Some(l) => (
                l.parameters().iter().map(Tensor::shallow_clone).collect(),
                config.lora_specs(l.config().rank),
            ),
            None => (params.iter().map(Tensor::shallow_clone).collect(), specs),
        };
        trainable.extend(head_params.iter().map(Tensor::shallow_clone));
        trainable_specs.extend(head_specs);
        let head = match head_params.as_slice() {
            [w, b] => Some([w.shallow_clone(), b.shallow_clone()]),
            _ => None,
        };
        // Spec order: wte, wpe, then 12 tensors per layer, then ln_f.weight, ln_f.bias.
        let p = |i: usize| params[i].shallow_clone();
        let blocks = (0..config.n_layer as usize)
            .map(|layer| {
                let base = 2 + 12 * layer;
                Block {
                    ln_1_w: p(base),
                    ln_1_b: p(base + 1),
                    c_attn_w: p(base + 2),
                    c_attn_b: p(base + 3),
                    attn_proj_w: p(base + 4),
                    attn_proj_b: p(base + 5),
                    ln_2_w: p(base + 6),
                    ln_2_b: p(base + 7),
                    c_fc_w: p(base + 8),
                    c_fc_b: p(base + 9),
                    mlp_proj_w: p(base + 10),
                    mlp_proj_b: p(base + 11),
                }
            })
            .collect();
        let n = params.len();
        Ok(Gpt {
            config: config.clone(),
            layout,
            wte: p(0),
            wpe: p(1),
            blocks,
            ln_f_w: p(n - 2),
            ln_f_b: p(n - 1),
            lora,
            head,
            trainable,
            trainable_layout: ParamLayout::new(&trainable_specs),
            vs,
            params,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The parameters in spec order (they share storage with the VarStore).
    pub fn parameters(&self) -> &[Tensor] {
        &self.params
    }

    /// The parameter names in spec order.
    pub fn parameter_names(&self) -> Vec<String> {
        self.layout
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// Copies a flat buffer laid out as [`ParamLayout`] into the (base) model's variables.
    pub fn load_flat(&mut self, flat: &[f32]) -> Result<(), ModelError> {
        load_tensors(&self.params, &self.layout, flat, self.device())
    }

    /// Copies the (base) model's variables out into one flat buffer laid out as [`ParamLayout`].
    pub fn export_flat(&self) -> Result<Vec<f32>, ModelError> {
        export_tensors(&self.params, &self.layout)
    }

    /// The LoRA adapters, when the model has them.
    pub fn lora(&self) -> Option<&LoraAdapters> {
        self.lora.as_ref()
    }

    /// The parameters that train, in the order they are pulled and pushed: the adapters with
    /// LoRA, otherwise every parameter; then the classification head, if any.
    pub fn trainable_parameters(&self) -> &[Tensor] {
        &self.trainable
    }

    /// The layout of [`Gpt::trainable_parameters`].
    pub fn trainable_layout(&self) -> &ParamLayout {
        &self.trainable_layout
    }

    /// The number of classes of the classification head, if the model has one.
    pub fn num_classes(&self) -> Option<u32> {
        self.head.as_ref().map(|[_, b]| b.size()[0] as u32)
    }

    /// The names of [`Gpt::trainable_parameters`].
    pub fn trainable_names(&self) -> Vec<String> {
        self.trainable_layout()
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// Copies a flat buffer laid out as [`Gpt::trainable_layout`] into the trainable variables.
    pub fn load_trainable_flat(&mut self, flat: &[f32]) -> Result<(), ModelError> {
        load_tensors(
            self.trainable_parameters(),
            self.trainable_layout(),
            flat,
            self.device(),
        )
    }

    /// Copies the trainable variables out, laid out as [`Gpt::trainable_layout`].
    pub fn export_trainable_flat(&self) -> Result<Vec<f32>, ModelError> {
        export_tensors(self.trainable_parameters(), self.trainable_layout())
    }

    fn layer_norm(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor, TchError> {
        x.f_layer_norm(
            [self.config.d_model as i64],
            Some(weight),
            Some(bias),
            LAYER_NORM_EPS,
            true,
        )
    }

    /// Logits `[batch, time, vocab]` for token ids `idx` of shape `[batch, time]` (int64).
    pub fn forward(&self, idx: &Tensor, train: bool) -> Result<Tensor, ModelError> {
        let x = self.hidden(idx, train)?;
        Ok(x.f_linear(&self.wte, None::<Tensor>)?)
    }

    /// Class logits `[batch, classes]` for right-padded token ids `idx` `[batch, time]`
    /// whose real tokens `mask` (`[batch, time]`, 1.0 or 0.0, at least one per row) marks:
    /// the final hidden states averaged over the real tokens, through the head. Attention
    /// is causal, so padding after an example's tokens does not change them.
    pub fn class_logits(
        &self,
        idx: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        let [weight, bias] = self.head.as_ref().ok_or(ModelError::NoHead)?;
        let hidden = self.hidden(idx, train)?;
        let mask = mask.f_to_kind(hidden.kind())?;
        let summed = hidden.f_mul(&mask.f_unsqueeze(-1)?)?.f_sum_dim_intlist(
            [1i64].as_slice(),
            false,
            None::<Kind>,
        )?;
        let counts = mask
            .f_sum_dim_intlist([1i64].as_slice(), true, None::<Kind>)?
            .f_clamp_min(1.0)?;
        let pooled = summed.f_div(&counts)?;
        Ok(pooled.f_linear(weight, Some(bias))?)
    }

    /// Summed cross-entropy of the class logits against `labels` `[batch]` (int64).
    pub fn classification_loss_sum(
        &self,
        batch: &ClassBatch,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        let logits = self.class_logits(&batch.inputs, &batch.mask, train)?;
        Ok(classification_loss(&logits, batch)?)
    }

    /// The summed loss and, as a device scalar (no synchronisation), how many examples
    /// the argmax gets right; for evaluation.
    pub fn classification_eval_sums(
        &self,
        batch: &ClassBatch,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let logits = self.class_logits(&batch.inputs, &batch.mask, false)?;
        let correct = logits
            .f_argmax(-1, false)?
            .f_eq_tensor(&batch.labels)?
            .f_sum(Kind::Int64)?;
        Ok((classification_loss(&logits, batch)?, correct))
    }

    /// The final (layer-normed) hidden states `[batch, time, d_model]`.
    fn hidden(&self, idx: &Tensor, train: bool) -> Result<Tensor, ModelError> {
        let (batch, time) = idx.size2()?;
        let context = self.config.context_length as i64;
        if time > context {
            return Err(ModelError::TooLong {
                actual: time,
                context,
            });
        }
        let d = self.config.d_model as i64;
        let n_head = self.config.n_head as i64;
        let head_dim = d / n_head;
        let p = if train {
            self.config.dropout as f64
        } else {
            0.0
        };
        let dropout = |x: Tensor| -> Result<Tensor, TchError> {
            if p > 0.0 {
                x.f_dropout(p, train)
            } else {
                Ok(x)
            }
        };

        let pos = Tensor::f_arange(time, (Kind::Int64, self.device()))?;
        let tok_emb = Tensor::f_embedding(&self.wte, idx, -1, false, false)?;
        let pos_emb = Tensor::f_embedding(&self.wpe, &pos, -1, false, false)?;
        let mut x = dropout(tok_emb.f_add(&pos_emb)?)?;

        for (layer, block) in self.blocks.iter().enumerate() {
            let adapters = self.lora.as_ref().map(|l| (&l.blocks[layer], l.scale()));
            let h = self.layer_norm(&x, &block.ln_1_w, &block.ln_1_b)?;
            let qkv = adapted_linear(
                &h,
                &block.c_attn_w,
                &block.c_attn_b,
                adapters.map(|(a, s)| (&a.c_attn, s)),
            )?;
            let parts = qkv.f_split(d, 2)?;
            let heads = |t: &Tensor| -> Result<Tensor, TchError> {
                t.f_view([batch, time, n_head, head_dim])?.f_transpose(1, 2)
            };
            let (q, k, v) = match parts.as_slice() {
                [q, k, v] => (heads(q)?, heads(k)?, heads(v)?),
                _ => {
                    return Err(ModelError::Torch(TchError::Shape(format!(
                        "c_attn output split into {} parts, expected 3",
                        parts.len()
                    ))))
                }
            };
            let y = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                p,
                true,
                None,
                false,
            )?;
            let y = y
                .f_transpose(1, 2)?
                .f_contiguous()?
                .f_view([batch, time, d])?;
            let y = adapted_linear(
                &y,
                &block.attn_proj_w,
                &block.attn_proj_b,
                adapters.map(|(a, s)| (&a.attn_proj, s)),
            )?;
            x = x.f_add(&dropout(y)?)?;

            let h = self.layer_norm(&x, &block.ln_2_w, &block.ln_2_b)?;
            let h = adapted_linear(
                &h,
                &block.c_fc_w,
                &block.c_fc_b,
                adapters.map(|(a, s)| (&a.c_fc, s)),
            )?
            .f_gelu("tanh")?;
            let h = adapted_linear(
                &h,
                &block.mlp_proj_w,
                &block.mlp_proj_b,
                adapters.map(|(a, s)| (&a.mlp_proj, s)),
            )?;
            x = x.f_add(&dropout(h)?)?;
        }
        Ok(self.layer_norm(&x, &self.ln_f_w, &self.ln_f_b)?)
    }

    /// Summed (not averaged) cross-entropy of predicting `targets` from `inputs`, both `[batch, time]`.
    pub fn loss_sum(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        let logits = self.forward(inputs, train)?;
        let vocab = self.config.vocab_size as i64;
        Ok(logits.f_reshape([-1, vocab])?.f_cross_entropy_loss(
            &targets.f_reshape([-1])?,
            None::<Tensor>,
            Reduction::Sum,
            -100,
            0.0,
        )?)
    }
}

fn classification_loss(logits: &Tensor, batch: &ClassBatch) -> Result<Tensor, TchError> {
    logits.f_cross_entropy_loss(&batch.labels, None::<Tensor>, Reduction::Sum, -100, 0.0)
}

/// A batch of labeled examples on the model's device: token ids right-padded with 0 to the
/// longest example, the mask of real tokens and the labels.
pub struct ClassBatch {
    pub inputs: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
    /// Real (unpadded) tokens in the batch.
    pub tokens: u64,
}

impl ClassBatch {
    pub fn new(
        examples: &[&crate::labeled::Example],
        device: Device,
    ) -> Result<ClassBatch, ModelError> {
        let width = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        if width == 0 {
            return Err(ModelError::Batch(
                "a classification batch needs at least one non-empty example".into(),
            ));
        }
        let rows = examples.len();
        let mut ids = vec![0i64; rows * width];
        let mut mask = vec![0f32; rows * width];
        let mut tokens = 0u64;
        for (row, example) in examples.iter().enumerate() {
            if example.tokens.is_empty() {
                return Err(ModelError::Batch("an example has no tokens".into()));
            }
            for (col, &token) in example.tokens.iter().enumerate() {
                ids[row * width + col] = i64::from(token);
                mask[row * width + col] = 1.0;
            }
            tokens += example.tokens.len() as u64;
        }
        let labels: Vec<i64> = examples.iter().map(|e| i64::from(e.label)).collect();
        let shape = [rows as i64, width as i64];
        Ok(ClassBatch {
            inputs: Tensor::f_from_slice(&ids)?
                .f_view(shape)?
                .f_to_device(device)?,
            mask: Tensor::f_from_slice(&mask)?
                .f_view(shape)?
                .f_to_device(device)?,
            labels: Tensor::f_from_slice(&labels)?.f_to_device(device)?,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_core::params::init_params;

    pub(crate) fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 61,
            context_length: 8,
            n_layer: 2,
            n_head: 2,
            d_model: 16,
            dropout: 0.0,
        }
    }

    #[test]
    fn var_store_matches_the_spec() {
        let config = tiny();
        let model = Gpt::new(&config, Device::Cpu).unwrap();
        let specs = config.tensor_specs();
        let vars = model.var_store().variables();
        assert_eq!(vars.len(), specs.len());
        assert_eq!(model.var_store().trainable_variables().len(), specs.len());
        for (spec, param) in specs.iter().zip(model.parameters()) {
            let var = vars
                .get(&spec.name)
                .unwrap_or_else(|| panic!("no variable named {}", spec.name));
            let shape: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
            assert_eq!(shape, spec.shape, "{}", spec.name);
            assert_eq!(param.size(), var.size(), "{}", spec.name);
            assert_eq!(
                param.data_ptr(),
                var.data_ptr(),
                "{} is not the VarStore's",
                spec.name
            );
            assert_eq!(var.kind(), Kind::Float);
        }
        assert!(vars.contains_key("h.1.attn.c_attn.weight"));
        assert_eq!(vars["h.1.attn.c_attn.weight"].size(), vec![48, 16]);
    }

    #[test]
    fn load_then_export_round_trips_bit_exactly() {
        let config = tiny();
        let mut model = Gpt::new(&config, Device::Cpu).unwrap();
        let mut flat = init_params(&config.tensor_specs(), 7);
        // Values whose bits would be mangled by any conversion.
        flat[0] = f32::MIN_POSITIVE;
        flat[1] = -1.0e-38;
        flat[2] = 3.4e38;
        model.load_flat(&flat).unwrap();
        let out = model.export_flat().unwrap();
        assert_eq!(out.len(), flat.len());
        assert!(flat
            .iter()
            .zip(&out)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // The values landed in the right variables.
        let layout = model.layout().clone();
        let slot = layout
            .tensors()
            .iter()
            .find(|t| t.name == "h.0.mlp.c_fc.weight")
            .unwrap();
        let var = &model.var_store().variables()["h.0.mlp.c_fc.weight"];
        assert_eq!(var.double_value(&[1, 2]) as f32, flat[slot.offset + 16 + 2]);
        assert!(matches!(
            model.load_flat(&flat[1..]),
            Err(ModelError::ParamCount { .. })
        ));
    }

    #[test]
    fn forward_is_causal_and_shaped() {
        let config = tiny();
        let mut model = Gpt::new(&config, Device::Cpu).unwrap();
        model
            .load_flat(&init_params(&config.tensor_specs(), 3))
            .unwrap();
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9, 9]).view([1, 6]);
        let la = model.forward(&a, false).unwrap();
        let lb = model.forward(&b, false).unwrap();
        assert_eq!(la.size(), vec![1, 6, 61]);
        // Positions 0..3 see identical prefixes, so their logits agree; position 3 differs.
        let prefix_diff = (la.narrow(1, 0, 3) - lb.narrow(1, 0, 3))
            .abs()
            .max()
            .double_value(&[]);
        let later_diff = (la.narrow(1, 3, 1) - lb.narrow(1, 3, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(prefix_diff < 1e-6, "{prefix_diff}");
        assert!(later_diff > 1e-6, "{later_diff}");
        let too_long = Tensor::zeros([1, 9], (Kind::Int64, Device::Cpu));
        assert!(matches!(
            model.forward(&too_long, false),
            Err(ModelError::TooLong { .. })
        ));
        // An untrained model is close to uniform: loss near ln(vocab).
        let loss = model
            .loss_sum(&a.narrow(1, 0, 5), &a.narrow(1, 1, 5), false)
            .unwrap()
            .double_value(&[])
            / 5.0;
        assert!((loss - (61f64).ln()).abs() < 0.5, "{loss}");
    }
}
