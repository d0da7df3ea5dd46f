//! The coordinator's job spec, validated against what this worker builds: the pretraining job
//! ([`validate_job`]) and the federated fine-tuning job ([`validate_federated_job`]).

use cohort_core::codec::DType;
use cohort_core::federated::FederatedTask;
use cohort_core::model::{ModelConfig, TensorSpec};
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;

use crate::connection::ClientError;
use crate::lora::LoraConfig;
use crate::optim::{InnerConfig, InnerKind};
use crate::text::TokenizerKind;

/// A validated pretraining job spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub name: String,
    pub model: ModelConfig,
    pub inner: InnerConfig,
    pub inner_steps: u32,
    pub micro_batch_size: u32,
    pub update_dtype: DType,
    pub max_chunk_bytes: usize,
    pub seed: u64,
    pub layout: ParamLayout,
}

fn bad(reason: String) -> ClientError {
    ClientError::JobSpec(reason)
}

fn model_config(spec: &pb::JobSpec) -> Result<ModelConfig, ClientError> {
    let m = spec
        .model
        .as_ref()
        .ok_or_else(|| bad("no model config".into()))?;
    let model = ModelConfig {
        vocab_size: m.vocab_size,
        context_length: m.context_length,
        n_layer: m.n_layer,
        n_head: m.n_head,
        d_model: m.d_model,
        dropout: m.dropout,
    };
    model.validate().map_err(|e| bad(e.to_string()))?;
    Ok(model)
}

/// The job's tensor list `listed` (the field `field`) must be `ours`, name for name and
/// shape for shape.
fn check_tensors(
    field: &str,
    listed: &[pb::TensorSpec],
    ours: &[TensorSpec],
) -> Result<(), ClientError> {
    if listed.len() != ours.len() {
        return Err(bad(format!(
            "job lists {} {field}, the worker's model has {} (incompatible model definitions)",
            listed.len(),
            ours.len()
        )));
    }
    for (index, (theirs, ours)) in listed.iter().zip(ours).enumerate() {
        let shape: Vec<usize> = theirs.shape.iter().map(|&d| d as usize).collect();
        if theirs.name != ours.name || shape != ours.shape {
            return Err(bad(format!(
                "{field} {index} is {} {:?} in the job but {} {:?} in the worker's model",
                theirs.name, theirs.shape, ours.name, ours.shape
            )));
        }
    }
    Ok(())
}

fn inner_config(spec: &pb::JobSpec) -> Result<InnerConfig, ClientError> {
    let inner = spec
        .inner
        .as_ref()
        .ok_or_else(|| bad("no inner optimizer".into()))?;
    let kind = match pb::InnerOptimizerKind::try_from(inner.kind) {
        Ok(pb::InnerOptimizerKind::InnerOptimizerAdamw) => InnerKind::AdamW,
        Ok(pb::InnerOptimizerKind::InnerOptimizerSgd) => InnerKind::Sgd,
        _ => return Err(bad(format!("unknown inner optimizer kind {}", inner.kind))),
    };
    let finite_non_negative = |name: &str, x: f64| {
        if x.is_finite() && x >= 0.0 {
            Ok(())
        } else {
            Err(bad(format!(
                "inner.{name} must be finite and non-negative, got {x}"
            )))
        }
    };
    finite_non_negative("lr", inner.lr)?;
    finite_non_negative("eps", inner.eps)?;
    finite_non_negative("weight_decay", inner.weight_decay)?;
    finite_non_negative("grad_clip", inner.grad_clip)?;
    if kind == InnerKind::AdamW {
        for (name, beta) in [("beta1", inner.beta1), ("beta2", inner.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(bad(format!("inner.{name} must be in [0, 1), got {beta}")));
            }
        }
    }
    Ok(InnerConfig {
        kind,
        lr: inner.lr,
        beta1: inner.beta1,
        beta2: inner.beta2,
        eps: inner.eps,
        weight_decay: inner.weight_decay,
        grad_clip: inner.grad_clip,
        warmup_steps: inner.warmup_steps,
    })
}

fn micro_batch_size(spec: &pb::JobSpec) -> Result<u32, ClientError> {
    if spec.micro_batch_size == 0 {
        return Err(bad("micro_batch_size must be at least 1".into()));
    }
    Ok(spec.micro_batch_size)
}

fn max_chunk_bytes(spec: &pb::JobSpec) -> Result<usize, ClientError> {
    let max_chunk_bytes = spec.max_chunk_bytes as usize;
    if max_chunk_bytes < 4 {
        return Err(bad(format!(
            "max_chunk_bytes must hold at least one f32, got {max_chunk_bytes}"
        )));
    }
    Ok(max_chunk_bytes)
}

/// Checks a pretraining job spec against what this worker builds; refuses anything it cannot
/// train exactly.
pub fn validate_job(spec: &pb::JobSpec) -> Result<Job, ClientError> {
    let model = model_config(spec)?;
    let specs = model.tensor_specs();
    check_tensors("tensors", &spec.tensors, &specs)?;
    let inner = inner_config(spec)?;
    if spec.inner_steps == 0 {
        return Err(bad("inner_steps must be at least 1".into()));
    }
    let micro_batch_size = micro_batch_size(spec)?;
    let update_dtype = match pb::DType::try_from(spec.update_dtype) {
        Ok(pb::DType::DtypeF32) => DType::F32,
        Ok(pb::DType::DtypeBf16) => DType::Bf16,
        _ => return Err(bad(format!("unknown update dtype {}", spec.update_dtype))),
    };
    let max_chunk_bytes = max_chunk_bytes(spec)?;
    Ok(Job {
        name: spec.job_name.clone(),
        layout: ParamLayout::new(&specs),
        model,
        inner,
        inner_steps: spec.inner_steps,
        micro_batch_size,
        update_dtype,
        max_chunk_bytes,
        seed: spec.seed,
    })
}

/// Which parameters a federated client trains and sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TrainableSet {
    /// Every model parameter.
    Full,
    /// LoRA adapters on a frozen base model.
    Lora(LoraConfig),
}

/// Where the job adds differential-privacy noise (the client only needs its own stddev,
/// the mode is logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpMode {
    None,
    Distributed,
    Local,
    Central,
}

/// A validated federated fine-tuning job spec.
#[derive(Clone, Debug, PartialEq)]
pub struct FederatedJob {
    pub name: String,
    pub model: ModelConfig,
    pub tokenizer: TokenizerKind,
    pub inner: InnerConfig,
    /// Windows per local step.
    pub micro_batch_size: u32,
    pub max_chunk_bytes: usize,
    pub seed: u64,
    pub trainable: TrainableSet,
    /// Next-token prediction on text, or classification of labeled examples.
    pub task: FederatedTask,
    /// The trainable tensors (`JobSpec.tensors`): pulled each round, pushed as the update.
    pub layout: ParamLayout,
    /// The frozen base model (`FederatedSpec.base_tensors`), pulled once; LoRA only.
    pub base_layout: Option<ParamLayout>,
    /// Local optimizer steps per round (E).
    pub local_steps: u32,
    /// L2 bound on the whole update; 0: no clipping.
    pub clip_norm: f64,
    pub dp_mode: DpMode,
    /// Per-coordinate standard deviation of the noise the client adds; 0: none.
    pub noise_stddev: f64,
}

/// Checks a federated job spec against what this client builds. A job without a
/// `FederatedSpec` is [`ClientError::NotFederated`].
pub fn validate_federated_job(spec: &pb::JobSpec) -> Result<FederatedJob, ClientError> {
    let federated = spec
        .federated
        .as_ref()
        .ok_or_else(|| ClientError::NotFederated {
            job: spec.job_name.clone(),
        })?;
    let model = model_config(spec)?;
    let tokenizer = match pb::Tokenizer::try_from(spec.tokenizer) {
        Ok(pb::Tokenizer::Byte) => TokenizerKind::Byte,
        Ok(pb::Tokenizer::Gpt2) => TokenizerKind::Gpt2,
        _ => return Err(bad(format!("unknown tokenizer {}", spec.tokenizer))),
    };
    if model.vocab_size < tokenizer.vocab_size() {
        return Err(bad(format!(
            "the {tokenizer} tokenizer needs a vocabulary of at least {}, the model has {}",
            tokenizer.vocab_size(),
            model.vocab_size
        )));
    }
    let trainable = match pb::Trainable::try_from(federated.trainable) {
        Ok(pb::Trainable::Full) => TrainableSet::Full,
        Ok(pb::Trainable::Lora) => {
            let lora = federated.lora.as_ref().ok_or_else(|| {
                bad("federated.trainable is LoRA but federated.lora is absent".into())
            })?;
            if lora.rank == 0 {
                return Err(bad("federated.lora.rank must be at least 1".into()));
            }
            if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
                return Err(bad(format!(
                    "federated.lora.alpha must be positive and finite, got {}",
                    lora.alpha
                )));
            }
            TrainableSet::Lora(LoraConfig {
                rank: lora.rank,
                alpha: lora.alpha,
            })
        }
        _ => {
            return Err(bad(format!(
                "unknown federated.trainable {}",
                federated.trainable
            )))
        }
    };
    let task = match pb::FederatedTask::try_from(federated.task) {
        Ok(pb::FederatedTask::NextToken) if federated.num_classes == 0 => FederatedTask::NextToken,
        Ok(pb::FederatedTask::NextToken) => {
            return Err(bad(format!(
                "a next-token job names {} classes",
                federated.num_classes
            )))
        }
        Ok(pb::FederatedTask::Classification) => {
            let k = federated.num_classes;
            if !(2..=FederatedTask::MAX_CLASSES).contains(&k) {
                return Err(bad(format!(
                    "a classification job needs 2 to {} classes, got {k}",
                    FederatedTask::MAX_CLASSES
                )));
            }
            FederatedTask::Classification { num_classes: k }
        }
        Err(_) => return Err(bad(format!("unknown federated.task {}", federated.task))),
    };
    let head = task
        .num_classes()
        .map_or_else(Vec::new, |k| model.classifier_specs(k));
    let (layout, base_layout) = match trainable {
        TrainableSet::Full => {
            let mut specs = model.tensor_specs();
            specs.extend(head);
            check_tensors("tensors", &spec.tensors, &specs)?;
            if !federated.base_tensors.is_empty() {
                return Err(bad(format!(
                    "a full fine-tuning job lists {} base tensors; only LoRA jobs have a base",
                    federated.base_tensors.len()
                )));
            }
            (ParamLayout::new(&specs), None)
        }
        TrainableSet::Lora(lora) => {
            let mut adapters = model.lora_specs(lora.rank);
            adapters.extend(head);
            check_tensors("adapter tensors", &spec.tensors, &adapters)?;
            let base = model.tensor_specs();
            check_tensors("base tensors", &federated.base_tensors, &base)?;
            (ParamLayout::new(&adapters), Some(ParamLayout::new(&base)))
        }
    };
    if federated.local_steps == 0 {
        return Err(bad("federated.local_steps must be at least 1".into()));
    }
    for (name, value) in [
        ("clip_norm", federated.clip_norm),
        ("client_noise_stddev", federated.client_noise_stddev),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(bad(format!(
                "federated.{name} must be finite and non-negative, got {value}"
            )));
        }
    }
    let dp_mode = match pb::DpMode::try_from(federated.dp_mode) {
        Ok(pb::DpMode::Unspecified | pb::DpMode::None) => DpMode::None,
        Ok(pb::DpMode::Distributed) => DpMode::Distributed,
        Ok(pb::DpMode::Local) => DpMode::Local,
        Ok(pb::DpMode::Central) => DpMode::Central,
        Err(_) => {
            return Err(bad(format!(
                "unknown federated.dp_mode {}",
                federated.dp_mode
            )))
        }
    };
    Ok(FederatedJob {
        name: spec.job_name.clone(),
        tokenizer,
        inner: inner_config(spec)?,
        micro_batch_size: micro_batch_size(spec)?,
        max_chunk_bytes: max_chunk_bytes(spec)?,
        seed: spec.seed,
        trainable,
        task,
        layout,
        base_layout,
        local_steps: federated.local_steps,
        clip_norm: federated.clip_norm,
        dp_mode,
        noise_stddev: federated.client_noise_stddev,
        model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 32,
            context_length: 4,
            n_layer: 1,
            n_head: 2,
            d_model: 4,
            dropout: 0.0,
        }
    }

    fn wire(specs: &[TensorSpec]) -> Vec<pb::TensorSpec> {
        specs
            .iter()
            .map(|t| pb::TensorSpec {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })
            .collect()
    }

    pub(crate) fn job_spec(model: &ModelConfig) -> pb::JobSpec {
        pb::JobSpec {
            federated: None,
            job_name: "t".into(),
            model: Some(pb::ModelConfig {
                vocab_size: model.vocab_size,
                context_length: model.context_length,
                n_layer: model.n_layer,
                n_head: model.n_head,
                d_model: model.d_model,
                dropout: model.dropout,
            }),
            inner: Some(pb::InnerOptimizer {
                kind: pb::InnerOptimizerKind::InnerOptimizerAdamw as i32,
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_clip: 1.0,
                warmup_steps: 10,
            }),
            inner_steps: 2,
            micro_batch_size: 4,
            update_dtype: pb::DType::DtypeBf16 as i32,
            tensors: wire(&model.tensor_specs()),
            tokenizer: pb::Tokenizer::Byte as i32,
            max_chunk_bytes: 64,
            seed: 3,
        }
    }

    #[test]
    fn job_spec_must_match_the_model() {
        let model = tiny();
        let job = validate_job(&job_spec(&model)).unwrap();
        assert_eq!(job.model, model);
        assert_eq!(job.update_dtype, DType::Bf16);
        assert_eq!(job.inner.kind, InnerKind::AdamW);
        assert_eq!(job.layout.total(), model.parameter_count());

        let mut renamed = job_spec(&model);
        renamed.tensors[3].name = "h.0.attn.qkv.weight".into();
        let err = validate_job(&renamed).unwrap_err().to_string();
        assert!(err.contains("h.0.attn.qkv.weight"), "{err}");
        let mut reshaped = job_spec(&model);
        reshaped.tensors[0].shape = vec![4, 32];
        assert!(matches!(
            validate_job(&reshaped),
            Err(ClientError::JobSpec(_))
        ));
        let mut missing = job_spec(&model);
        missing.tensors.pop();
        assert!(validate_job(&missing).is_err());
        let mut dtype = job_spec(&model);
        dtype.update_dtype = 0;
        assert!(validate_job(&dtype).is_err());
        let mut steps = job_spec(&model);
        steps.inner_steps = 0;
        assert!(validate_job(&steps).is_err());
    }

    /// A LoRA job on a byte-level model (vocabulary 256).
    fn lora_spec(rank: u32) -> pb::JobSpec {
        let model = ModelConfig {
            vocab_size: 256,
            ..tiny()
        };
        let mut spec = job_spec(&model);
        spec.tensors = wire(&model.lora_specs(rank));
        spec.federated = Some(pb::FederatedSpec {
            trainable: pb::Trainable::Lora as i32,
            lora: Some(pb::LoraSpec { rank, alpha: 8.0 }),
            local_steps: 3,
            clip_norm: 1.0,
            dp_mode: pb::DpMode::Distributed as i32,
            client_noise_stddev: 0.01,
            base_tensors: wire(&model.tensor_specs()),
            ..Default::default()
        });
        spec
    }

    #[test]
    fn a_classification_job_trains_its_head_after_the_adapters() {
        let mut spec = lora_spec(2);
        let mut tensors = full_model().lora_specs(2);
        tensors.extend(full_model().classifier_specs(3));
        spec.tensors = wire(&tensors);
        let f = spec.federated.as_mut().unwrap();
        f.task = pb::FederatedTask::Classification as i32;
        f.num_classes = 3;
        let job = validate_federated_job(&spec).unwrap();
        assert_eq!(job.task, FederatedTask::Classification { num_classes: 3 });
        // The adapters (128 values, as below), then the head: 3·4 + 3.
        assert_eq!(job.layout.total(), 128 + 15);

        // The head the spec lists must be the one the classes imply, and a
        // next-token job names no classes.
        for (edit, needle) in [
            (
                (|s: &mut pb::JobSpec| s.federated.as_mut().unwrap().num_classes = 2)
                    as fn(&mut pb::JobSpec),
                "cls_head.weight",
            ),
            (
                |s| s.federated.as_mut().unwrap().num_classes = 1,
                "2 to 1024 classes, got 1",
            ),
            (
                |s| s.federated.as_mut().unwrap().task = 0,
                "a next-token job names 3 classes",
            ),
            (
                |s| s.federated.as_mut().unwrap().task = 7,
                "unknown federated.task 7",
            ),
            (|s| drop(s.tensors.pop()), "9 adapter tensors"),
        ] {
            let mut broken = spec.clone();
            edit(&mut broken);
            let err = validate_federated_job(&broken).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn federated_jobs_list_adapters_and_base_or_the_whole_model() {
        let job = validate_federated_job(&lora_spec(2)).unwrap();
        assert_eq!(
            job.trainable,
            TrainableSet::Lora(LoraConfig {
                rank: 2,
                alpha: 8.0
            })
        );
        assert_eq!(job.tokenizer, TokenizerKind::Byte);
        // d = 4, r = 2: c_attn 2·4 + 12·2, attn.c_proj 2·4 + 4·2, c_fc 2·4 + 16·2,
        // mlp.c_proj 2·16 + 4·2.
        assert_eq!(job.layout.total(), 32 + 16 + 40 + 40);
        assert_eq!(
            job.base_layout.as_ref().map(ParamLayout::total),
            Some(job.model.parameter_count())
        );
        assert_eq!(
            (job.local_steps, job.clip_norm, job.noise_stddev),
            (3, 1.0, 0.01)
        );
        assert_eq!(job.dp_mode, DpMode::Distributed);

        let mut full = lora_spec(2);
        full.tensors = wire(&full_model().tensor_specs());
        if let Some(f) = full.federated.as_mut() {
            f.trainable = pb::Trainable::Full as i32;
            f.base_tensors.clear();
        }
        let job = validate_federated_job(&full).unwrap();
        assert_eq!(job.trainable, TrainableSet::Full);
        assert!(job.base_layout.is_none());

        let mut pretrain = lora_spec(2);
        pretrain.federated = None;
        let err = validate_federated_job(&pretrain).unwrap_err();
        assert!(matches!(err, ClientError::NotFederated { .. }), "{err}");
        assert!(err.to_string().contains("not a federated job"), "{err}");

        let mut wrong_rank = lora_spec(2);
        wrong_rank.tensors = wire(&full_model().lora_specs(3));
        let err = validate_federated_job(&wrong_rank).unwrap_err().to_string();
        assert!(err.contains("lora_a"), "{err}");

        let mut gpt2 = lora_spec(2);
        gpt2.tokenizer = pb::Tokenizer::Gpt2 as i32;
        let err = validate_federated_job(&gpt2).unwrap_err().to_string();
        assert!(err.contains("50257"), "{err}");

        for edit in [
            (|f: &mut pb::FederatedSpec| f.local_steps = 0) as fn(&mut pb::FederatedSpec),
            |f| f.clip_norm = f64::NAN,
            |f| f.client_noise_stddev = -1.0,
            |f| f.lora = None,
            |f| f.trainable = 0,
            |f| f.base_tensors.pop().map(drop).unwrap_or(()),
        ] {
            let mut spec = lora_spec(2);
            edit(spec.federated.as_mut().unwrap());
            assert!(validate_federated_job(&spec).is_err(), "{spec:?}");
        }
    }

    fn full_model() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            ..tiny()
        }
    }
}
