//! The training thread: owns the model and optimizer tensors and serves train/eval commands sent from async code.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cohort_core::model::ModelConfig;
use tch::{Device, Kind, Tensor};
use tracing::{debug, info};

use crate::data::{self, DataError};
use crate::federated::privatize::PrivatizeError;
use crate::model::{Gpt, ModelError};
use crate::optim::{InnerConfig, InnerOptimizer, OptimError};
use crate::tensor_thread::{TensorThread, ThreadError};
use crate::text::LocalDataError;

/// Everything the training thread needs, fixed for the lifetime of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerConfig {
    pub model: ModelConfig,
    pub inner: InnerConfig,
    /// Optimizer steps per round (H).
    pub inner_steps: u32,
    /// Sequences per forward/backward pass.
    pub micro_batch_size: u32,
    pub device: Device,
    /// libtorch intra-op threads; 0 leaves libtorch's default.
    pub threads: usize,
    /// Seeds libtorch's RNG (dropout).
    pub seed: u64,
    /// Where the inner optimizer state is loaded from at start and saved after each round.
    pub state_path: Option<PathBuf>,
}

/// Why a training or evaluation command failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error("invalid trainer configuration: {0}")]
    Config(String),
    #[error("the assigned shards ({shards}) hold no window of {context}+1 tokens")]
    NoWindows { shards: usize, context: usize },
    #[error("the loss became non-finite ({0}); lower the learning rate or enable grad_clip")]
    NonFiniteLoss(f64),
    #[error(transparent)]
    LocalData(#[from] LocalDataError),
    #[error(transparent)]
    Privatize(#[from] PrivatizeError),
    #[error(transparent)]
    Thread(#[from] ThreadError),
}

/// What a round of training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainStats {
    /// Token-weighted mean training loss over the round.
    pub mean_loss: f64,
    /// Target tokens trained on.
    pub tokens: u64,
    /// Wall time of the whole command (load, eval, train, export).
    pub seconds: f64,
    /// Held-out loss of the pulled parameters, when eval shards were given.
    pub eval_loss: Option<f64>,
    /// The weight of `eval_loss`: tokens, or examples for classification.
    pub eval_tokens: u64,
    /// Held-out accuracy of the pulled parameters (classification).
    pub eval_accuracy: Option<f64>,
    /// Optimizer steps taken this round.
    pub steps: u32,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Gradient norm (before clipping) of the last step.
    pub grad_norm: f64,
}

/// The pseudo-gradient Δ = pulled − trained, flat in spec order, and its stats.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutput {
    pub delta: Vec<f32>,
    pub stats: TrainStats,
}

/// Token-weighted mean cross-entropy over all windows of the eval shards.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalOutput {
    pub loss: f64,
    /// The weight of `loss`: tokens, or examples for classification.
    pub tokens: u64,
    /// The fraction of examples classified correctly (classification).
    pub accuracy: Option<f64>,
}

/// The synchronous trainer; lives on one thread (see [`TrainerHandle`]).
pub struct Trainer {
    config: TrainerConfig,
    model: Gpt,
    optimizer: InnerOptimizer,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("optimizer", &self.optimizer)
            .finish()
    }
}

impl Trainer {
    /// Builds the model and optimizer, loading saved optimizer state when `state_path` exists.
    pub fn new(config: TrainerConfig) -> Result<Trainer, TrainerError> {
        if config.inner_steps == 0 {
            return Err(TrainerError::Config(
                "inner_steps must be at least 1".into(),
            ));
        }
        if config.micro_batch_size == 0 {
            return Err(TrainerError::Config(
                "micro_batch_size must be at least 1".into(),
            ));
        }
        if config.threads > 0 {
            tch::set_num_threads(i32::try_from(config.threads).unwrap_or(i32::MAX));
        }
        tch::manual_seed(config.seed as i64);
        let model = Gpt::new(&config.model, config.device)?;
        let params: Vec<Tensor> = model
            .parameters()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        let mut optimizer =
            InnerOptimizer::new(config.inner.clone(), model.parameter_names(), &params)?;
        if let Some(path) = &config.state_path {
            if path.exists() {
                optimizer.load(path)?;
                info!(path = %path.display(), steps = optimizer.steps(), "inner optimizer state loaded");
            }
        }
        Ok(Trainer {
            config,
            model,
            optimizer,
        })
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Inner steps taken so far, across rounds.
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer.steps()
    }

    fn context(&self) -> usize {
        self.config.model.context_length as usize
    }

    fn load_shards(&self, paths: &[PathBuf]) -> Result<Vec<Vec<u32>>, TrainerError> {
        paths
            .iter()
            .map(|p| data::load_shard(p, self.config.model.vocab_size).map_err(TrainerError::from))
            .collect()
    }

    fn batch_tensors(&self, windows: &[&[u32]]) -> Result<(Tensor, Tensor), TrainerError> {
        batch_tensors(windows, self.context(), self.config.device)
    }

    fn evaluate_loaded(&self, eval_shards: &[PathBuf]) -> Result<EvalOutput, TrainerError> {
        let shards = self.load_shards(eval_shards)?;
        let context = self.context();
        let windows: Vec<&[u32]> = shards
            .iter()
            .flat_map(|s| data::windows(s, context))
            .collect();
        if windows.is_empty() {
            return Err(TrainerError::NoWindows {
                shards: eval_shards.len(),
                context,
            });
        }
        evaluate_windows(&self.model, &windows, self.config.micro_batch_size as usize)
    }

    /// Loads `params` and evaluates them on `eval_shards`.
    pub fn eval(
        &mut self,
        params: &[f32],
        eval_shards: &[PathBuf],
    ) -> Result<EvalOutput, TrainerError> {
        self.model.load_flat(params)?;
        self.evaluate_loaded(eval_shards)
    }

    /// Loads `params`, optionally evaluates them, runs `inner_steps` optimizer steps over
    /// all windows of `shards` and returns Δ = params − trained.
    pub fn train(
        &mut self,
        params: Vec<f32>,
        shards: &[PathBuf],
        eval_shards: &[PathBuf],
    ) -> Result<TrainOutput, TrainerError> {
        let start = Instant::now();
        self.model.load_flat(&params)?;
        let eval = if eval_shards.is_empty() {
            None
        } else {
            Some(self.evaluate_loaded(eval_shards)?)
        };

        let context = self.context();
        let tokens = self.load_shards(shards)?;
        let windows: Vec<&[u32]> = tokens
            .iter()
            .flat_map(|s| data::windows(s, context))
            .collect();
        if windows.is_empty() {
            return Err(TrainerError::NoWindows {
                shards: shards.len(),
                context,
            });
        }
        let vars: Vec<Tensor> = self
            .model
            .parameters()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        let device = self.config.device;
        let mut loss_acc = Tensor::f_zeros([], (Kind::Double, device))?;
        let mut last = None;
        let batches = data::split_evenly(windows.len(), self.config.inner_steps as usize);
        for range in &batches {
            let batch = &windows[range.clone()];
            let batch_tokens = (batch.len() * context) as f64;
            InnerOptimizer::zero_grad(&vars);
            for micro in batch.chunks(self.config.micro_batch_size as usize) {
                let (inputs, targets) = self.batch_tensors(micro)?;
                let loss_sum = self.model.loss_sum(&inputs, &targets, true)?;
                // Each micro-batch contributes its share of the batch's target tokens, so the
                // accumulated gradient is that of the batch-mean loss.
                loss_sum.f_div_scalar(batch_tokens)?.f_backward()?;
                loss_acc = loss_acc.f_add(&loss_sum.f_detach()?.f_to_kind(Kind::Double)?)?;
            }
            let info = self.optimizer.step(&vars)?;
            debug!(
                step = info.step,
                lr = info.lr,
                grad_norm = info.grad_norm,
                windows = batch.len(),
                "inner step"
            );
            last = Some(info);
        }
        InnerOptimizer::zero_grad(&vars);
        let trained_tokens = (windows.len() * context) as u64;
        let mean_loss = loss_acc.f_double_value(&[])? / trained_tokens as f64;
        if !mean_loss.is_finite() {
            return Err(TrainerError::NonFiniteLoss(mean_loss));
        }
        let after = self.model.export_flat()?;
        let mut delta = params;
        for (d, a) in delta.iter_mut().zip(&after) {
            *d -= a;
        }
        if let Some(path) = &self.config.state_path {
            self.optimizer.save(path)?;
        }
        let (lr, grad_norm) = last.map_or((0.0, 0.0), |i| (i.lr, i.grad_norm));
        Ok(TrainOutput {
            delta,
            stats: TrainStats {
                mean_loss,
                tokens: trained_tokens,
                seconds: start.elapsed().as_secs_f64(),
                eval_loss: eval.map(|e| e.loss),
                eval_tokens: eval.map_or(0, |e| e.tokens),
                eval_accuracy: None,
                steps: batches.len() as u32,
                lr,
                grad_norm,
            },
        })
    }

    /// Saves the inner optimizer state to `path`.
    pub fn save_state(&self, path: &Path) -> Result<(), TrainerError> {
        Ok(self.optimizer.save(path)?)
    }
}

/// `[m, T]` inputs and targets on `device` from `m` windows of `context + 1` tokens.
pub(crate) fn batch_tensors(
    windows: &[&[u32]],
    context: usize,
    device: Device,
) -> Result<(Tensor, Tensor), TrainerError> {
    let t = context as i64;
    let flat: Vec<i64> = windows
        .iter()
        .flat_map(|w| w.iter().map(|&x| i64::from(x)))
        .collect();
    let all = Tensor::f_from_slice(&flat)?
        .f_view([windows.len() as i64, t + 1])?
        .f_to_device(device)?;
    let inputs = all.f_narrow(1, 0, t)?.f_contiguous()?;
    let targets = all.f_narrow(1, 1, t)?.f_contiguous()?;
    Ok((inputs, targets))
}

/// Token-weighted mean loss of `model` over `windows` (at least one), in micro-batches of
/// `micro_batch_size`, without gradients.
pub(crate) fn evaluate_windows(
    model: &Gpt,
    windows: &[&[u32]],
    micro_batch_size: usize,
) -> Result<EvalOutput, TrainerError> {
    let context = model.config().context_length as usize;
    let device = model.device();
    let sum = tch::no_grad(|| -> Result<f64, TrainerError> {
        // Accumulated on the device: one synchronisation at the end.
        let mut sum = Tensor::f_zeros([], (Kind::Double, device))?;
        for micro in windows.chunks(micro_batch_size.max(1)) {
            let (inputs, targets) = batch_tensors(micro, context, device)?;
            let loss = model.loss_sum(&inputs, &targets, false)?;
            sum = sum.f_add(&loss.f_to_kind(Kind::Double)?)?;
        }
        Ok(sum.f_double_value(&[])?)
    })?;
    let tokens = (windows.len() * context) as u64;
    Ok(EvalOutput {
        loss: sum / tokens as f64,
        tokens,
        accuracy: None,
    })
}

/// Example-weighted mean loss and accuracy of `model`'s classifier over `examples` (at
/// least one), in micro-batches of `micro_batch_size`, without gradients.
pub(crate) fn evaluate_examples(
    model: &Gpt,
    examples: &[crate::labeled::Example],
    micro_batch_size: usize,
) -> Result<EvalOutput, TrainerError> {
    let device = model.device();
    let (sum, correct) = tch::no_grad(|| -> Result<(f64, i64), TrainerError> {
        // Accumulated on the device: one synchronisation at the end.
        let mut sum = Tensor::f_zeros([], (Kind::Double, device))?;
        let mut correct = Tensor::f_zeros([], (Kind::Int64, device))?;
        for micro in examples.chunks(micro_batch_size.max(1)) {
            let refs: Vec<&crate::labeled::Example> = micro.iter().collect();
            let batch = crate::model::ClassBatch::new(&refs, device)?;
            let (loss, right) = model.classification_eval_sums(&batch)?;
            sum = sum.f_add(&loss.f_to_kind(Kind::Double)?)?;
            correct = correct.f_add(&right)?;
        }
        Ok((sum.f_double_value(&[])?, correct.f_int64_value(&[])?))
    })?;
    let n = examples.len() as u64;
    Ok(EvalOutput {
        loss: sum / n.max(1) as f64,
        tokens: n,
        accuracy: Some(correct as f64 / n.max(1) as f64),
    })
}

/// The async side's handle to the training thread. Dropping it stops the thread
/// once any command in flight has finished.
#[derive(Debug)]
pub struct TrainerHandle {
    thread: TensorThread<Trainer>,
    config: TrainerConfig,
}

impl TrainerHandle {
    /// Starts the training thread and waits until the model and optimizer are built.
    pub async fn spawn(config: TrainerConfig) -> Result<TrainerHandle, TrainerError> {
        let thread_config = config.clone();
        let thread =
            TensorThread::spawn("cohort-trainer", move || Trainer::new(thread_config)).await?;
        Ok(TrainerHandle { thread, config })
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// See [`Trainer::train`].
    pub async fn train(
        &self,
        params: Vec<f32>,
        shards: Vec<PathBuf>,
        eval_shards: Vec<PathBuf>,
    ) -> Result<TrainOutput, TrainerError> {
        self.thread
            .run(move |t| t.train(params, &shards, &eval_shards))
            .await?
    }

    /// See [`Trainer::eval`].
    pub async fn eval(
        &self,
        params: Vec<f32>,
        eval_shards: Vec<PathBuf>,
    ) -> Result<EvalOutput, TrainerError> {
        self.thread
            .run(move |t| t.eval(&params, &eval_shards))
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::InnerConfig;
    use cohort_core::params::init_params;
    use cohort_core::shard_file;

    fn tiny_model() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            context_length: 16,
            n_layer: 1,
            n_head: 2,
            d_model: 32,
            dropout: 0.0,
        }
    }

    fn config(inner: InnerConfig, inner_steps: u32, micro_batch_size: u32) -> TrainerConfig {
        TrainerConfig {
            model: tiny_model(),
            inner,
            inner_steps,
            micro_batch_size,
            device: Device::Cpu,
            threads: 1,
            seed: 1,
            state_path: None,
        }
    }

    fn write_shard(dir: &Path, name: &str, tokens: &[u32]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, shard_file::encode(tokens, 256)).unwrap();
        path
    }

    /// k·T+1 tokens of a noisy pseudo-random sequence (different per `salt`).
    fn random_tokens(windows: usize, salt: u64) -> Vec<u32> {
        let mut rng = cohort_core::rng::SplitMix64::new(salt);
        (0..windows * 16 + 1)
            .map(|_| (rng.next_u64() % 256) as u32)
            .collect()
    }

    #[test]
    fn data_parallel_equivalence_with_one_sgd_step() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_shard(dir.path(), "a.bin", &random_tokens(4, 1));
        let b = write_shard(dir.path(), "b.bin", &random_tokens(4, 2));
        let params = init_params(&tiny_model().tensor_specs(), 11);
        // Micro-batches of 3 split the 4- and 8-window batches unevenly on purpose.
        let run = |shards: &[PathBuf]| {
            let mut trainer = Trainer::new(config(InnerConfig::sgd(0.5), 1, 3)).unwrap();
            trainer.train(params.clone(), shards, &[]).unwrap()
        };
        let da = run(std::slice::from_ref(&a));
        let db = run(std::slice::from_ref(&b));
        let both = run(&[a.clone(), b.clone()]);
        assert_eq!(both.stats.tokens, 128);
        assert_eq!(both.stats.steps, 1);
        let mut max_err = 0f64;
        let mut max_delta = 0f64;
        for ((x, y), z) in da.delta.iter().zip(&db.delta).zip(&both.delta) {
            let mean = (f64::from(*x) + f64::from(*y)) / 2.0;
            max_err = max_err.max((mean - f64::from(*z)).abs());
            max_delta = max_delta.max(f64::from(*z).abs());
        }
        assert!(max_err < 1e-5, "max |mean(Δa, Δb) − Δab| = {max_err}");
        assert!(max_delta > 1e-3, "deltas too small to compare: {max_delta}");
        // The mean loss is token-weighted across the shards too.
        let mean_loss = (da.stats.mean_loss + db.stats.mean_loss) / 2.0;
        assert!((mean_loss - both.stats.mean_loss).abs() < 1e-5);
    }

    #[tokio::test]
    async fn rounds_on_repetitive_data_lower_the_loss_and_keep_optimizer_state() {
        let dir = tempfile::tempdir().unwrap();
        let pattern: Vec<u32> = (0..8 * 16 + 1).map(|i| (i % 8) as u32 * 3 + 65).collect();
        let shard = write_shard(dir.path(), "train.bin", &pattern);
        let eval = write_shard(dir.path(), "eval.bin", &pattern[..33]);
        let state = dir.path().join("state/inner.safetensors");
        let mut cfg = config(InnerConfig::adamw(1e-2), 4, 2);
        cfg.inner.grad_clip = 1.0;
        cfg.inner.warmup_steps = 2;
        cfg.state_path = Some(state.clone());
        let handle = TrainerHandle::spawn(cfg.clone()).await.unwrap();
        let mut params = init_params(&tiny_model().tensor_specs(), 5);
        let mut losses = Vec::new();
        let mut eval_losses = Vec::new();
        for _ in 0..4 {
            let out = handle
                .train(params.clone(), vec![shard.clone()], vec![eval.clone()])
                .await
                .unwrap();
            assert_eq!(out.stats.tokens, 8 * 16);
            assert_eq!(out.stats.steps, 4);
            assert_eq!(out.stats.eval_tokens, 32);
            eval_losses.push(out.stats.eval_loss.unwrap());
            losses.push(out.stats.mean_loss);
            // The outer step of plain averaging with one worker: global −= Δ.
            for (p, d) in params.iter_mut().zip(&out.delta) {
                *p -= d;
            }
        }
        // Before any training the model is near uniform over the vocabulary.
        assert!(
            (eval_losses[0] - 256f64.ln()).abs() < 0.5,
            "{eval_losses:?}"
        );
        assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
        assert!(losses[3] < losses[0] * 0.7, "{losses:?}");
        assert!(eval_losses[3] < eval_losses[0] * 0.5, "{eval_losses:?}");
        let evaluated = handle
            .eval(params.clone(), vec![eval.clone()])
            .await
            .unwrap();
        assert_eq!(evaluated.tokens, 32);
        assert!(
            evaluated.loss < eval_losses[3],
            "{evaluated:?} {eval_losses:?}"
        );
        drop(handle);
        // The state was saved after every round and a new trainer resumes from it.
        let resumed = Trainer::new(cfg).unwrap();
        assert_eq!(resumed.optimizer_steps(), 16);
    }

    #[test]
    fn fewer_windows_than_steps_and_bad_shards() {
        let dir = tempfile::tempdir().unwrap();
        let shard = write_shard(dir.path(), "s.bin", &random_tokens(2, 3));
        let params = init_params(&tiny_model().tensor_specs(), 1);
        let mut trainer = Trainer::new(config(InnerConfig::sgd(0.1), 5, 4)).unwrap();
        let out = trainer
            .train(params.clone(), std::slice::from_ref(&shard), &[])
            .unwrap();
        assert_eq!(out.stats.steps, 2);
        assert_eq!(trainer.optimizer_steps(), 2);
        let err = trainer
            .train(params.clone(), &[dir.path().join("missing.bin")], &[])
            .unwrap_err();
        assert!(
            matches!(err, TrainerError::Data(DataError::Read { .. })),
            "{err}"
        );
        let short = write_shard(dir.path(), "short.bin", &[1, 2, 3]);
        let err = trainer.train(params.clone(), &[short], &[]).unwrap_err();
        assert!(matches!(err, TrainerError::NoWindows { .. }), "{err}");
        let err = trainer
            .train(params[1..].to_vec(), &[shard], &[])
            .unwrap_err();
        assert!(
            matches!(err, TrainerError::Model(ModelError::ParamCount { .. })),
            "{err}"
        );
    }
}
