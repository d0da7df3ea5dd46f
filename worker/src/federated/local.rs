//! The federated client's local trainer (on the tensor thread): evaluates the pulled global
//! model on the site's held-out data, runs E local steps on batches sampled from its
//! training data (text windows for next-token prediction, labeled examples for
//! classification) with a fresh optimizer, and returns the privatized update
//! Δ = global − local over the trainable tensors only.

use std::time::Instant;

use cohort_core::model::ModelConfig;
use cohort_core::rng::SplitMix64;
use tch::{Device, Kind, Tensor};
use tracing::debug;

use super::privatize::{privatize, PrivacyConfig, Privatized};
use crate::data;
use crate::labeled::{Example, LabeledExamples};
use crate::lora::LoraConfig;
use crate::model::{ClassBatch, Gpt, ModelOptions};
use crate::optim::{InnerConfig, InnerOptimizer};
use crate::text::LocalText;
use crate::trainer::{
    batch_tensors, evaluate_examples, evaluate_windows, EvalOutput, TrainStats, TrainerError,
};

/// Everything the local trainer needs, fixed for the lifetime of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalConfig {
    pub model: ModelConfig,
    /// `Some`: train LoRA adapters on a frozen base; `None`: train every parameter.
    pub lora: Option<LoraConfig>,
    /// `Some`: a classification job with this many classes (a head is trained too).
    pub num_classes: Option<u32>,
    pub inner: InnerConfig,
    /// Optimizer steps per round (E).
    pub local_steps: u32,
    /// Windows per step.
    pub micro_batch_size: u32,
    pub device: Device,
    /// libtorch intra-op threads; 0 leaves libtorch's default.
    pub threads: usize,
    /// Seeds libtorch's RNG (dropout) and, mixed with the round, the window sampling.
    pub seed: u64,
    pub privacy: PrivacyConfig,
}

/// What a round produced: the update to send, its statistics and what privatizing did.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundOutput {
    /// Δ = global − local over the trainable tensors, clipped and noised.
    pub delta: Vec<f32>,
    pub stats: TrainStats,
    pub privacy: Privatized,
}

/// What a site trains on, tokenized; it never leaves the site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SiteData {
    /// Text for next-token prediction.
    Text(LocalText),
    /// Labeled examples for classification.
    Labeled(LabeledExamples),
}

impl SiteData {
    fn describe(&self) -> String {
        match self {
            SiteData::Text(t) => format!("{} train / {} test tokens", t.train.len(), t.test.len()),
            SiteData::Labeled(l) => {
                format!("{} train / {} test examples", l.train.len(), l.test.len())
            }
        }
    }
}

/// The model and the site's tokenized data; lives on the tensor thread.
pub struct LocalTrainer {
    config: LocalConfig,
    model: Gpt,
    data: SiteData,
    base_loaded: bool,
}

impl std::fmt::Debug for LocalTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTrainer")
            .field("config", &self.config)
            .field("model", &self.model)
            .field("data", &self.data.describe())
            .field("base_loaded", &self.base_loaded)
            .finish()
    }
}

/// The training items of a round: text windows or labeled examples.
enum TrainItems<'a> {
    Windows(Vec<&'a [u32]>),
    Examples(&'a [Example]),
}

impl TrainItems<'_> {
    fn len(&self) -> usize {
        match self {
            TrainItems::Windows(w) => w.len(),
            TrainItems::Examples(e) => e.len(),
        }
    }
}

/// Visits windows in a shuffled order, reshuffling after each pass.
struct WindowSampler {
    order: Vec<usize>,
    next: usize,
    rng: SplitMix64,
}

impl WindowSampler {
    fn new(count: usize, seed: u64) -> WindowSampler {
        let mut rng = SplitMix64::new(seed);
        let mut order: Vec<usize> = (0..count).collect();
        rng.shuffle(&mut order);
        WindowSampler {
            order,
            next: 0,
            rng,
        }
    }

    /// `size` distinct window indices (at most the number of windows).
    fn batch(&mut self, size: usize) -> Vec<usize> {
        let size = size.min(self.order.len());
        let mut batch = Vec::with_capacity(size);
        while batch.len() < size {
            if self.next == self.order.len() {
                self.rng.shuffle(&mut self.order);
                self.next = 0;
            }
            let index = self.order[self.next];
            self.next += 1;
            if !batch.contains(&index) {
                batch.push(index);
            }
        }
        batch
    }
}

/// The sampling seed of `round`: the job's seed mixed with the round number.
fn round_seed(seed: u64, round: u64) -> u64 {
    seed ^ round.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl LocalTrainer {
    /// Builds the model (all zero until pulled) over the site's data, which must be of the
    /// job's kind (labeled examples for a classification job, text otherwise).
    pub fn new(config: LocalConfig, data: SiteData) -> Result<LocalTrainer, TrainerError> {
        if config.local_steps == 0 || config.micro_batch_size == 0 {
            return Err(TrainerError::Config(
                "local_steps and micro_batch_size must be at least 1".into(),
            ));
        }
        if config.threads > 0 {
            tch::set_num_threads(i32::try_from(config.threads).unwrap_or(i32::MAX));
        }
        match (&data, config.num_classes) {
            (SiteData::Text(_), None) | (SiteData::Labeled(_), Some(_)) => {}
            (SiteData::Text(_), Some(_)) => {
                return Err(TrainerError::Config(
                    "a classification job needs labeled examples (train.jsonl, test.jsonl)".into(),
                ))
            }
            (SiteData::Labeled(_), None) => {
                return Err(TrainerError::Config(
                    "a next-token job needs text (train.txt, test.txt)".into(),
                ))
            }
        }
        tch::manual_seed(config.seed as i64);
        let model = Gpt::with_options(
            &config.model,
            ModelOptions {
                lora: config.lora,
                num_classes: config.num_classes,
            },
            config.device,
        )?;
        Ok(LocalTrainer {
            base_loaded: config.lora.is_none(),
            config,
            model,
            data,
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// Whether the frozen base still has to be loaded (LoRA only).
    pub fn needs_base(&self) -> bool {
        !self.base_loaded
    }

    /// Loads the frozen base model (LoRA only; laid out as the model's tensor specs).
    pub fn load_base(&mut self, base: &[f32]) -> Result<(), TrainerError> {
        if self.model.lora().is_none() {
            return Err(TrainerError::Config(
                "only a LoRA model has a separate base".into(),
            ));
        }
        self.model.load_flat(base)?;
        self.base_loaded = true;
        Ok(())
    }

    fn ready(&self) -> Result<(), TrainerError> {
        if self.base_loaded {
            Ok(())
        } else {
            Err(TrainerError::Config(
                "the frozen base model has not been loaded".into(),
            ))
        }
    }

    fn context(&self) -> usize {
        self.config.model.context_length as usize
    }

    fn evaluate_loaded(&self) -> Result<EvalOutput, TrainerError> {
        let micro = self.config.micro_batch_size as usize;
        match &self.data {
            SiteData::Text(text) => {
                let windows: Vec<&[u32]> = data::windows(&text.test, self.context()).collect();
                evaluate_windows(&self.model, &windows, micro)
            }
            SiteData::Labeled(labeled) => evaluate_examples(&self.model, &labeled.test, micro),
        }
    }

    /// Loads the trainable `params` and evaluates the model on the site's test text.
    pub fn evaluate(&mut self, params: &[f32]) -> Result<EvalOutput, TrainerError> {
        self.ready()?;
        self.model.load_trainable_flat(params)?;
        self.evaluate_loaded()
    }

    /// One federated round from the pulled trainable `global` parameters.
    pub fn round(&mut self, round: u64, global: Vec<f32>) -> Result<RoundOutput, TrainerError> {
        let start = Instant::now();
        self.ready()?;
        self.model.load_trainable_flat(&global)?;
        let eval = self.evaluate_loaded()?;

        let context = self.context();
        let items = match &self.data {
            SiteData::Text(text) => {
                TrainItems::Windows(data::windows(&text.train, context).collect())
            }
            SiteData::Labeled(labeled) => TrainItems::Examples(&labeled.train),
        };
        let vars: Vec<Tensor> = self
            .model
            .trainable_parameters()
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        // A fresh optimizer every round, as in FedAvg: no state crosses rounds.
        let mut optimizer = InnerOptimizer::new(
            self.config.inner.clone(),
            self.model.trainable_names(),
            &vars,
        )?;
        let mut sampler = WindowSampler::new(items.len(), round_seed(self.config.seed, round));
        let device = self.config.device;
        let mut loss_acc = Tensor::f_zeros([], (Kind::Double, device))?;
        // The loss is a mean over predicted tokens (text) or examples (classification).
        let mut loss_weight = 0.0;
        let mut trained_tokens = 0u64;
        let mut last = None;
        for _ in 0..self.config.local_steps {
            let picks = sampler.batch(self.config.micro_batch_size as usize);
            InnerOptimizer::zero_grad(&vars);
            let (loss_sum, weight, tokens) = match &items {
                TrainItems::Windows(windows) => {
                    let batch: Vec<&[u32]> = picks.iter().map(|&i| windows[i]).collect();
                    let (inputs, targets) = batch_tensors(&batch, context, device)?;
                    let tokens = (batch.len() * context) as u64;
                    let loss = self.model.loss_sum(&inputs, &targets, true)?;
                    (loss, tokens as f64, tokens)
                }
                TrainItems::Examples(examples) => {
                    let batch: Vec<&Example> = picks.iter().map(|&i| &examples[i]).collect();
                    let batch = ClassBatch::new(&batch, device)?;
                    let loss = self.model.classification_loss_sum(&batch, true)?;
                    (loss, picks.len() as f64, batch.tokens)
                }
            };
            loss_sum.f_div_scalar(weight)?.f_backward()?;
            loss_acc = loss_acc.f_add(&loss_sum.f_detach()?.f_to_kind(Kind::Double)?)?;
            loss_weight += weight;
            let info = optimizer.step(&vars)?;
            debug!(
                step = info.step,
                lr = info.lr,
                grad_norm = info.grad_norm,
                "local step"
            );
            trained_tokens += tokens;
            last = Some(info);
        }
        InnerOptimizer::zero_grad(&vars);
        let mean_loss = loss_acc.f_double_value(&[])? / loss_weight;
        if !mean_loss.is_finite() {
            return Err(TrainerError::NonFiniteLoss(mean_loss));
        }
        let local = self.model.export_trainable_flat()?;
        let mut delta = global;
        for (d, l) in delta.iter_mut().zip(&local) {
            *d -= l;
        }
        let privacy = privatize(&mut delta, &self.config.privacy)?;
        let (lr, grad_norm) = last.map_or((0.0, 0.0), |i| (i.lr, i.grad_norm));
        Ok(RoundOutput {
            delta,
            stats: TrainStats {
                mean_loss,
                tokens: trained_tokens,
                seconds: start.elapsed().as_secs_f64(),
                eval_loss: Some(eval.loss),
                eval_tokens: eval.tokens,
                eval_accuracy: eval.accuracy,
                steps: self.config.local_steps,
                lr,
                grad_norm,
            },
            privacy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labeled::LabeledExamples;
    use crate::text::TokenizerKind;
    use cohort_core::clip::l2_norm;
    use cohort_core::params::init_params;
    use std::path::Path;

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            context_length: 8,
            n_layer: 1,
            n_head: 2,
            d_model: 16,
            dropout: 0.0,
        }
    }

    const LORA: LoraConfig = LoraConfig {
        rank: 2,
        alpha: 4.0,
    };

    fn text() -> SiteData {
        let train = "the quick brown fox jumps over the lazy dog. ".repeat(8);
        let test = "the lazy dog sleeps. the quick fox runs.";
        SiteData::Text(
            LocalText::from_texts(
                TokenizerKind::Byte,
                8,
                (Path::new("train.txt"), &train),
                (Path::new("test.txt"), test),
            )
            .unwrap(),
        )
    }

    fn test_tokens(trainer: &LocalTrainer) -> usize {
        match &trainer.data {
            SiteData::Text(text) => text.test.len(),
            SiteData::Labeled(_) => unreachable!("a text site"),
        }
    }

    /// Two classes a bag of bytes separates: praise (1) and complaints (0).
    fn reviews() -> SiteData {
        let line =
            |text: &str, label: u32| format!("{{\"text\": \"{text}\", \"label\": {label}}}\n");
        let mut train = String::new();
        for text in ["good", "great", "so good", "great!", "good!"] {
            train += &line(text, 1);
        }
        for text in ["bad", "awful", "so bad", "awful!", "bad!"] {
            train += &line(text, 0);
        }
        let test = line("great", 1) + &line("good", 1) + &line("bad", 0) + &line("awful", 0);
        SiteData::Labeled(
            LabeledExamples::from_jsonl(
                TokenizerKind::Byte,
                8,
                2,
                (Path::new("train.jsonl"), &train),
                (Path::new("test.jsonl"), &test),
            )
            .unwrap(),
        )
    }

    fn config(lora: Option<LoraConfig>, clip_norm: f64) -> LocalConfig {
        LocalConfig {
            model: tiny(),
            lora,
            inner: InnerConfig::adamw(1e-2),
            local_steps: 4,
            micro_batch_size: 3,
            num_classes: None,
            device: Device::Cpu,
            threads: 1,
            seed: 7,
            privacy: PrivacyConfig {
                clip_norm,
                noise_stddev: 0.0,
                noise_threads: 1,
            },
        }
    }

    fn lora_trainer(clip_norm: f64) -> (LocalTrainer, Vec<f32>) {
        let mut trainer = LocalTrainer::new(config(Some(LORA), clip_norm), text()).unwrap();
        assert!(trainer.needs_base());
        let adapters = init_params(&tiny().lora_specs(LORA.rank), 2);
        let err = trainer.round(1, adapters.clone()).unwrap_err();
        assert!(err.to_string().contains("base"), "{err}");
        trainer
            .load_base(&init_params(&tiny().tensor_specs(), 1))
            .unwrap();
        assert!(!trainer.needs_base());
        (trainer, adapters)
    }

    #[test]
    fn a_lora_round_returns_an_update_of_exactly_the_adapters() {
        let (mut trainer, adapters) = lora_trainer(0.0);
        let out = trainer.round(1, adapters.clone()).unwrap();
        assert_eq!(
            out.delta.len(),
            tiny()
                .lora_specs(LORA.rank)
                .iter()
                .map(|s| s.numel())
                .sum::<usize>()
        );
        assert!(out.delta.iter().all(|d| d.is_finite()));
        assert!(l2_norm(&out.delta) > 0.0);
        assert!(!out.privacy.clipped);
        assert_eq!(out.stats.tokens, 4 * 3 * 8);
        assert_eq!(out.stats.steps, 4);
        let eval_loss = out.stats.eval_loss.unwrap();
        assert!((eval_loss - 256f64.ln()).abs() < 0.5, "{eval_loss}");
        assert_eq!(
            out.stats.eval_tokens,
            (test_tokens(&trainer) as u64 - 1) / 8 * 8
        );
        // The same round from the same parameters is the same update (seeded sampling,
        // fresh optimizer).
        let again = trainer.round(1, adapters.clone()).unwrap();
        assert_eq!(again.delta, out.delta);
        // Evaluation of the pulled parameters is the round's eval loss.
        let evaluated = trainer.evaluate(&adapters).unwrap();
        assert_eq!(evaluated.loss, eval_loss);
    }

    #[test]
    fn a_classification_round_sends_adapters_and_head_and_learns_the_classes() {
        let classify = |lora| LocalConfig {
            num_classes: Some(2),
            local_steps: 6,
            ..config(lora, 0.0)
        };
        // The data must be of the job's kind.
        let err = LocalTrainer::new(classify(Some(LORA)), text()).unwrap_err();
        assert!(err.to_string().contains("train.jsonl"), "{err}");
        let err = LocalTrainer::new(config(Some(LORA), 0.0), reviews()).unwrap_err();
        assert!(err.to_string().contains("train.txt"), "{err}");

        let mut trainer = LocalTrainer::new(classify(Some(LORA)), reviews()).unwrap();
        trainer
            .load_base(&init_params(&tiny().tensor_specs(), 1))
            .unwrap();
        let mut specs = tiny().lora_specs(LORA.rank);
        specs.extend(tiny().classifier_specs(2));
        let mut global = init_params(&specs, 2);
        let head = tiny()
            .classifier_specs(2)
            .iter()
            .map(|s| s.numel())
            .sum::<usize>();
        let mut accuracies = Vec::new();
        let mut losses = Vec::new();
        for round in 0..5 {
            let out = trainer.round(round, global.clone()).unwrap();
            assert_eq!(out.delta.len(), global.len());
            assert_eq!(out.stats.eval_tokens, 4, "weighted by the 4 test examples");
            let accuracy = out.stats.eval_accuracy.unwrap();
            assert!(
                [0.0, 0.25, 0.5, 0.75, 1.0].contains(&accuracy),
                "{accuracy}"
            );
            // The head trains in every round.
            assert!(out.delta[global.len() - head..].iter().any(|&d| d != 0.0));
            accuracies.push(accuracy);
            losses.push(out.stats.eval_loss.unwrap());
            for (g, d) in global.iter_mut().zip(&out.delta) {
                *g -= d;
            }
        }
        let last = trainer.evaluate(&global).unwrap();
        assert_eq!(last.accuracy, Some(1.0), "{accuracies:?} {losses:?}");
        assert!(last.loss < losses[0] - 0.2, "{losses:?} then {}", last.loss);
    }

    #[test]
    fn the_update_is_clipped_to_the_bound() {
        let (mut trainer, adapters) = lora_trainer(1e-3);
        let out = trainer.round(3, adapters).unwrap();
        assert!(out.privacy.clipped, "{:?}", out.privacy);
        assert!(out.privacy.norm > 1e-3);
        let norm = l2_norm(&out.delta);
        assert!(norm <= 1e-3 * (1.0 + 1e-6), "{norm}");
        assert!((out.privacy.sent_norm - norm).abs() < 1e-9);
    }

    #[test]
    fn full_fine_tuning_sends_every_parameter_and_lowers_the_loss() {
        let mut trainer = LocalTrainer::new(config(None, 0.0), text()).unwrap();
        assert!(!trainer.needs_base());
        let mut global = init_params(&tiny().tensor_specs(), 4);
        let mut eval_losses = Vec::new();
        for round in 0..4 {
            let out = trainer.round(round, global.clone()).unwrap();
            assert_eq!(out.delta.len(), tiny().parameter_count());
            eval_losses.push(out.stats.eval_loss.unwrap());
            for (g, d) in global.iter_mut().zip(&out.delta) {
                *g -= d;
            }
        }
        assert!(eval_losses[3] < eval_losses[0] - 0.3, "{eval_losses:?}");
    }

    #[test]
    fn sampled_batches_hold_distinct_windows_and_cover_each_pass() {
        let mut sampler = WindowSampler::new(5, 1);
        let mut seen = [0; 5];
        for _ in 0..5 {
            let batch = sampler.batch(2);
            assert_eq!(batch.len(), 2);
            assert_ne!(batch[0], batch[1]);
            for i in batch {
                seen[i] += 1;
            }
        }
        // Two passes, less a window skipped where a reshuffle would repeat one in a batch.
        assert!(seen.iter().all(|&c| (1..=3).contains(&c)), "{seen:?}");
        assert_eq!(seen.iter().sum::<i32>(), 10);
        assert_eq!(WindowSampler::new(2, 1).batch(4).len(), 2);
    }
}
