//! The job file (TOML) and its validation into a [`JobPlan`], before any port is bound.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cohort_core::codec::DType;
use cohort_core::engine::{EngineConfig, ShardInfo};
use cohort_core::federated::{CohortSampling, DpMode, FederatedRules, FederatedTask};
use cohort_core::model::{ModelConfig, TensorSpec};
use cohort_core::outer::OuterOptimizerConfig;
use cohort_core::params::ParamLayout;
use cohort_core::privacy::PrivacyBudget;
use serde::Deserialize;

use crate::data::{DataManifest, TokenizerKind};

/// The job file as written by an operator. Unknown keys are errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    /// Directory written by `cohort-coordinator prepare` (relative paths are
    /// resolved against the job file's directory). Pretraining only: a
    /// federated job's data stays with its clients.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// Where checkpoints, metrics and the shard ledger are written.
    pub run_dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelSection,
    pub train: TrainSection,
    #[serde(default)]
    pub inner: InnerSection,
    /// The outer (server) optimizer. Default: DiLoCo's Nesterov SGD for
    /// pretraining, FedAvg (SGD with lr 1) for federated jobs.
    #[serde(default)]
    pub outer: Option<OuterOptimizerConfig>,
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Present for federated fine-tuning.
    #[serde(default)]
    pub federated: Option<FederatedSection>,
}

/// `[federated]`: fine-tuning across client sites whose data never leaves them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedSection {
    /// The enrollment file written by `prepare-federated`: one
    /// `[[client]]` with `name` and `token_sha256` per site.
    pub enrollment: PathBuf,
    /// Pretrained parameters to start from (a Cohort checkpoint); without
    /// it the model starts from its random initialisation.
    #[serde(default)]
    pub base_checkpoint: Option<PathBuf>,
    /// "lora" (adapters only travel) or "full".
    #[serde(default = "default_trainable")]
    pub trainable: TrainableKind,
    #[serde(default = "default_lora_rank")]
    pub lora_rank: u32,
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    /// How clients tokenize their text.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: TokenizerKind,
    /// "next-token" (sites hold text) or "classification" (sites hold
    /// labeled examples; a linear head over `num_classes` is trained too).
    #[serde(default = "default_task")]
    pub task: TaskKind,
    /// Classes of a classification task (labels 0..num_classes).
    #[serde(default)]
    pub num_classes: Option<u32>,
    /// Poisson sampling: each connected client joins a round with this
    /// probability (what the privacy accountant assumes).
    #[serde(default)]
    pub sample_rate: Option<f64>,
    /// Fixed-size cohorts instead (only without DP).
    #[serde(default)]
    pub cohort_size: Option<u32>,
    #[serde(default)]
    pub dp: DpSection,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrainableKind {
    Lora,
    Full,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    NextToken,
    Classification,
}

fn default_task() -> TaskKind {
    TaskKind::NextToken
}

fn default_trainable() -> TrainableKind {
    TrainableKind::Lora
}
fn default_lora_rank() -> u32 {
    4
}
fn default_lora_alpha() -> f64 {
    8.0
}
fn default_tokenizer() -> TokenizerKind {
    TokenizerKind::Byte
}

/// `[federated.dp]`: clipping, noise and the budget.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSection {
    pub mode: DpMode,
    /// L2 bound on each client's whole update (C); 0 disables clipping
    /// (mode "none" only).
    #[serde(default)]
    pub clip_norm: f64,
    /// σ: the released sum carries N(0, (σC)²) per coordinate.
    #[serde(default)]
    pub noise_multiplier: f64,
    /// The budget: no round is started that could take ε above this at δ.
    #[serde(default)]
    pub epsilon: Option<f64>,
    #[serde(default)]
    pub delta: Option<f64>,
}

impl Default for DpSection {
    fn default() -> Self {
        DpSection {
            mode: DpMode::Distributed,
            clip_norm: 0.0,
            noise_multiplier: 0.0,
            epsilon: None,
            delta: None,
        }
    }
}

/// One line of the enrollment file: a site, known by its token, by the name
/// on its client certificate, or both.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolledClient {
    name: String,
    #[serde(default)]
    token_sha256: Option<String>,
    /// Matched against the subject CN and the DNS names (SAN) of the
    /// certificate a client presents under mutual TLS, ignoring ASCII case.
    #[serde(default)]
    certificate_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentFile {
    #[serde(default)]
    client: Vec<EnrolledClient>,
}

/// What a federated job trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trainable {
    Full,
    Lora { rank: u32, alpha: f64 },
}

/// Parameters shared read-only by the engine's start and every base pull;
/// `Debug` prints the size, not the values.
#[derive(Clone)]
pub struct SharedParams(pub Arc<Vec<f32>>);

impl std::fmt::Debug for SharedParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedParams({} values)", self.0.len())
    }
}

impl FederatedPlan {
    /// Sites enrolled by certificate name only (no token): they can join only
    /// a coordinator that asks clients for certificates (mutual TLS).
    pub fn certificate_only_sites(&self) -> Vec<String> {
        let by_token: std::collections::BTreeSet<&String> = self.clients.values().collect();
        let mut sites: Vec<String> = self
            .certificate_names
            .values()
            .filter(|name| !by_token.contains(name))
            .cloned()
            .collect();
        sites.sort();
        sites
    }
}

/// The validated federated part of a job.
#[derive(Clone, Debug)]
pub struct FederatedPlan {
    pub trainable: Trainable,
    pub task: FederatedTask,
    /// SHA-256 (lowercase hex) of each enrolled token → the client's name.
    pub clients: BTreeMap<String, String>,
    /// Certificate name (ASCII lowercase) → the client's name, for sites
    /// enrolled by their client certificate (mutual TLS).
    pub certificate_names: BTreeMap<String, String>,
    /// The frozen model under LoRA adapters (empty for full fine-tuning).
    pub base_tensors: Vec<TensorSpec>,
    pub base_params: Option<SharedParams>,
    /// The parameters the engine starts from when a base checkpoint is given
    /// and the whole model is trained.
    pub initial_params: Option<SharedParams>,
    /// Per-coordinate noise each client adds before sending.
    pub client_noise_stddev: f64,
}

fn default_seed() -> u64 {
    1
}

/// Either a named preset or explicit sizes.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ModelSection {
    Preset { preset: ModelPreset },
    Explicit(ModelConfig),
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ModelPreset {
    Tiny,
    Gpt2Small,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Stop after this many committed rounds (0: no limit, then `epochs` must be set).
    #[serde(default)]
    pub rounds: u64,
    #[serde(default)]
    pub epochs: u64,
    /// Inner optimizer steps per round (H).
    pub inner_steps: u32,
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: u32,
    #[serde(default = "default_one")]
    pub shards_per_worker: u32,
    #[serde(default = "default_dtype")]
    pub update_dtype: DType,
    /// Evaluate on the held-out split every this many rounds (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Evaluate on at most this many held-out shards (the first ones).
    #[serde(default = "default_eval_shards")]
    pub eval_max_shards: u32,
    /// Write a checkpoint to the run store every this many committed rounds
    /// (0: only at the end of the job and on shutdown).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Pretraining starts from these parameters (a Cohort checkpoint, e.g.
    /// one written by `import-hf`) instead of the seeded random
    /// initialisation; used only while the run has no checkpoint of its own
    /// (a resumed run continues from its newest one). Relative paths are
    /// resolved against the job file's directory. A federated job names its
    /// starting point in `federated.base_checkpoint` instead.
    #[serde(default)]
    pub init_checkpoint: Option<PathBuf>,
}

/// Every committed round is made durable by default (in the background; a
/// round committed while the previous write is still running is folded into
/// the next write). Large models may choose a larger K and trade the rounds
/// since the last write for the I/O.
fn default_checkpoint_every() -> u64 {
    1
}

fn default_eval_shards() -> u32 {
    4
}

fn default_micro_batch() -> u32 {
    32
}
fn default_one() -> u32 {
    1
}
fn default_dtype() -> DType {
    DType::F32
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InnerKind {
    Adamw,
    Sgd,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InnerSection {
    pub kind: InnerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub warmup_steps: u32,
}

impl Default for InnerSection {
    fn default() -> Self {
        InnerSection {
            kind: InnerKind::Adamw,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            warmup_steps: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub min_workers: u32,
    pub min_participants: u32,
    pub max_workers_per_round: u32,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    pub round_deadline_ms: u64,
    /// Largest chunk of a pull or push, in bytes.
    pub max_chunk_bytes: u32,
    /// A push whose next chunk takes longer than this is aborted.
    pub chunk_timeout_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            min_workers: 1,
            min_participants: 1,
            max_workers_per_round: 0,
            lease_ms: 15_000,
            heartbeat_ms: 3_000,
            round_deadline_ms: 30 * 60 * 1000,
            max_chunk_bytes: 256 * 1024,
            chunk_timeout_ms: 30_000,
        }
    }
}

/// A job file that failed validation; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read job file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("job file: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("data directory {path}: {source}")]
    Data {
        path: PathBuf,
        source: crate::data::DataError,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// A validated job: everything the coordinator needs, checked against the data on disk.
#[derive(Clone, Debug)]
pub struct JobPlan {
    pub name: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub model: ModelConfig,
    pub tokenizer: TokenizerKind,
    pub inner: InnerSection,
    pub inner_steps: u32,
    pub micro_batch_size: u32,
    pub heartbeat_interval: Duration,
    pub chunk_timeout: Duration,
    pub max_chunk_bytes: u32,
    /// Checkpoint every this many committed rounds; 0: only at the end and on shutdown.
    pub checkpoint_every: u64,
    pub engine: EngineConfig,
    pub train_shards: Vec<ShardInfo>,
    pub eval_shards: Vec<ShardInfo>,
    /// Pretraining's starting parameters (`train.init_checkpoint`); `None`:
    /// the seeded initialisation. A federated job's are in [`FederatedPlan`].
    pub initial_params: Option<SharedParams>,
    pub federated: Option<FederatedPlan>,
}

/// Removes `.` and `name/..` pairs without touching the filesystem, so logs
/// show `runs/x` rather than `jobs/../runs/x`.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

impl JobFile {
    pub fn load(path: &Path) -> Result<JobFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<JobFile, ConfigError> {
        let mut job: JobFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if job.data_dir.is_relative() && !job.data_dir.as_os_str().is_empty() {
            job.data_dir = normalize(&base.join(&job.data_dir));
        }
        if let Some(f) = &mut job.federated {
            if f.enrollment.is_relative() {
                f.enrollment = normalize(&base.join(&f.enrollment));
            }
            if let Some(path) = &mut f.base_checkpoint {
                if path.is_relative() {
                    *path = normalize(&base.join(&*path));
                }
            }
        }
        if let Some(path) = &mut job.train.init_checkpoint {
            if path.is_relative() {
                *path = normalize(&base.join(&*path));
            }
        }
        if job.run_dir.is_relative() {
            job.run_dir = normalize(&base.join(&job.run_dir));
        }
        Ok(job)
    }

    pub fn model_config(&self) -> ModelConfig {
        match &self.model {
            ModelSection::Preset {
                preset: ModelPreset::Tiny,
            } => ModelConfig::tiny_byte_level(),
            ModelSection::Preset {
                preset: ModelPreset::Gpt2Small,
            } => ModelConfig::gpt2_small(),
            ModelSection::Explicit(config) => config.clone(),
        }
    }

    /// Checks every field and the data directory; nothing is bound or written.
    pub fn validate(self) -> Result<JobPlan, ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        let model = self.model_config();
        model
            .validate()
            .map_err(|e| invalid("model", e.to_string()))?;
        let t = &self.train;
        if t.inner_steps == 0 {
            return Err(invalid("train.inner_steps", "must be at least 1"));
        }
        if t.micro_batch_size == 0 {
            return Err(invalid("train.micro_batch_size", "must be at least 1"));
        }
        if t.shards_per_worker == 0 {
            return Err(invalid("train.shards_per_worker", "must be at least 1"));
        }
        if t.rounds == 0 && t.epochs == 0 {
            return Err(invalid(
                "train.rounds",
                "set train.rounds or train.epochs, or the job never ends",
            ));
        }
        let i = &self.inner;
        if !(i.lr.is_finite() && i.lr > 0.0) {
            return Err(invalid(
                "inner.lr",
                format!("must be positive, got {}", i.lr),
            ));
        }
        for (field, value) in [("inner.beta1", i.beta1), ("inner.beta2", i.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(invalid(field, format!("must be in [0, 1), got {value}")));
            }
        }
        if !(i.eps.is_finite() && i.eps > 0.0) {
            return Err(invalid(
                "inner.eps",
                format!("must be positive, got {}", i.eps),
            ));
        }
        if !(i.weight_decay.is_finite() && i.weight_decay >= 0.0) {
            return Err(invalid(
                "inner.weight_decay",
                format!("must be non-negative, got {}", i.weight_decay),
            ));
        }
        if !(i.grad_clip.is_finite() && i.grad_clip >= 0.0) {
            return Err(invalid(
                "inner.grad_clip",
                format!("must be non-negative (0 disables), got {}", i.grad_clip),
            ));
        }
        let outer = self.outer.unwrap_or(match self.federated {
            Some(_) => OuterOptimizerConfig::Sgd { lr: 1.0 },
            None => OuterOptimizerConfig::default(),
        });
        outer
            .validate()
            .map_err(|e| invalid("outer", e.to_string()))?;
        let c = &self.cluster;
        if c.min_workers == 0 {
            return Err(invalid("cluster.min_workers", "must be at least 1"));
        }
        if c.min_participants == 0 {
            return Err(invalid("cluster.min_participants", "must be at least 1"));
        }
        if c.max_workers_per_round != 0 && c.min_participants > c.max_workers_per_round {
            return Err(invalid(
                "cluster.min_participants",
                format!(
                    "{} can never be met with max_workers_per_round = {}",
                    c.min_participants, c.max_workers_per_round
                ),
            ));
        }
        if c.min_participants > c.min_workers {
            return Err(invalid(
                "cluster.min_participants",
                format!(
                    "{} exceeds cluster.min_workers ({}): a round starts once min_workers are live and could never reach its quorum",
                    c.min_participants, c.min_workers
                ),
            ));
        }
        if c.heartbeat_ms == 0 || c.heartbeat_ms >= c.lease_ms {
            return Err(invalid(
                "cluster.heartbeat_ms",
                format!(
                    "must be positive and below lease_ms ({}), got {}",
                    c.lease_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.round_deadline_ms == 0 {
            return Err(invalid("cluster.round_deadline_ms", "must be positive"));
        }
        if c.chunk_timeout_ms == 0 {
            return Err(invalid("cluster.chunk_timeout_ms", "must be positive"));
        }
        if !(1024..=4 * 1024 * 1024 - 64 * 1024).contains(&c.max_chunk_bytes) {
            return Err(invalid(
                "cluster.max_chunk_bytes",
                format!(
                    "must be between 1 KiB and 4 MiB - 64 KiB (gRPC's message limit), got {}",
                    c.max_chunk_bytes
                ),
            ));
        }

        if self.federated.is_some() && t.init_checkpoint.is_some() {
            return Err(invalid(
                "train.init_checkpoint",
                "a federated job starts from federated.base_checkpoint",
            ));
        }
        if let Some(section) = &self.federated {
            return self
                .clone()
                .validate_federated(section.clone(), model, outer);
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                "is required for pretraining (the directory `cohort-coordinator prepare` wrote)",
            ));
        }
        let manifest = DataManifest::load(&self.data_dir).map_err(|source| ConfigError::Data {
            path: self.data_dir.clone(),
            source,
        })?;
        if manifest.vocab_size > model.vocab_size {
            return Err(invalid(
                "model.vocab_size",
                format!(
                    "{} is smaller than the data's vocabulary ({}, tokenizer {:?})",
                    model.vocab_size, manifest.vocab_size, manifest.tokenizer
                ),
            ));
        }
        let train_shards = manifest.train_shards();
        let mut eval_shards = manifest.eval_shards();
        eval_shards.truncate(t.eval_max_shards as usize);
        let min_tokens = model.context_length as u64 + 1;
        if let Some(short) = train_shards.iter().find(|s| s.num_tokens < min_tokens) {
            return Err(invalid(
                "model.context_length",
                format!(
                    "shard {} has {} tokens, fewer than one window of context_length + 1 = {min_tokens}",
                    short.file_name, short.num_tokens
                ),
            ));
        }

        let tensors = model.tensor_specs();
        let initial_params = match &t.init_checkpoint {
            Some(path) => Some(SharedParams(Arc::new(
                crate::checkpoint::read_params(path, &ParamLayout::new(&tensors))
                    .map_err(|e| invalid("train.init_checkpoint", e.to_string()))?,
            ))),
            None => None,
        };
        let update_dtype = t.update_dtype;
        let engine = EngineConfig {
            tensors,
            update_dtype,
            lease: Duration::from_millis(c.lease_ms),
            round_deadline: Duration::from_millis(c.round_deadline_ms),
            min_workers: c.min_workers as usize,
            min_participants: c.min_participants as usize,
            max_workers_per_round: c.max_workers_per_round as usize,
            shards_per_worker: t.shards_per_worker as usize,
            max_rounds: t.rounds,
            max_epochs: t.epochs,
            eval_every: t.eval_every,
            outer,
            max_chunk_elems: c.max_chunk_bytes as usize / update_dtype.size_bytes(),
            seed: self.seed,
            federated: None,
        };
        Ok(JobPlan {
            name: self.name,
            data_dir: self.data_dir,
            run_dir: self.run_dir,
            model,
            tokenizer: manifest.tokenizer,
            inner: self.inner,
            inner_steps: t.inner_steps,
            micro_batch_size: t.micro_batch_size,
            heartbeat_interval: Duration::from_millis(c.heartbeat_ms),
            chunk_timeout: Duration::from_millis(c.chunk_timeout_ms),
            max_chunk_bytes: c.max_chunk_bytes,
            checkpoint_every: t.checkpoint_every,
            engine,
            train_shards,
            eval_shards,
            initial_params,
            federated: None,
        })
    }

    /// The federated half of [`Self::validate`]: enrollment, base model,
    /// trainable tensors, sampling and DP.
    fn validate_federated(
        self,
        section: FederatedSection,
        model: ModelConfig,
        outer: OuterOptimizerConfig,
    ) -> Result<JobPlan, ConfigError> {
        let t = &self.train;
        let c = &self.cluster;
        if t.epochs != 0 || t.rounds == 0 {
            return Err(invalid(
                "train.rounds",
                "a federated job runs train.rounds rounds (> 0); train.epochs does not apply",
            ));
        }
        if section.tokenizer.vocab_size() > model.vocab_size {
            return Err(invalid(
                "model.vocab_size",
                format!(
                    "{} is smaller than the {:?} tokenizer's vocabulary ({})",
                    model.vocab_size,
                    section.tokenizer,
                    section.tokenizer.vocab_size()
                ),
            ));
        }
        let enrollment = load_enrollment(&section.enrollment)?;
        let sampling = match (section.sample_rate, section.cohort_size) {
            (Some(rate), None) => CohortSampling::Poisson { rate },
            (None, Some(size)) => CohortSampling::Fixed {
                size: size as usize,
            },
            _ => {
                return Err(invalid(
                    "federated.sample_rate",
                    "set exactly one of federated.sample_rate (Poisson, q in (0, 1]) and federated.cohort_size",
                ))
            }
        };
        let dp = &section.dp;
        let budget = match (dp.epsilon, dp.delta) {
            (Some(epsilon), Some(delta)) => {
                let budget = PrivacyBudget { epsilon, delta };
                budget
                    .validate()
                    .map_err(|e| invalid("federated.dp.epsilon", e.to_string()))?;
                Some(budget)
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "federated.dp.epsilon",
                    "set both federated.dp.epsilon and federated.dp.delta, or neither",
                ))
            }
        };
        let rules = FederatedRules {
            sampling,
            enrolled_clients: enrollment.sites,
            clip_norm: dp.clip_norm,
            dp_mode: dp.mode,
            noise_multiplier: dp.noise_multiplier,
            budget,
            // The cohort draws must not be predictable from the job file.
            sampling_seed: secret_seed()?,
        };
        rules
            .validate(c.min_participants as usize)
            .map_err(|e| invalid("federated", e.to_string()))?;
        let trainable = match section.trainable {
            TrainableKind::Full => Trainable::Full,
            TrainableKind::Lora => {
                if section.lora_rank == 0 || section.lora_rank > model.d_model {
                    return Err(invalid(
                        "federated.lora_rank",
                        format!(
                            "must be in 1..={} (d_model), got {}",
                            model.d_model, section.lora_rank
                        ),
                    ));
                }
                if !(section.lora_alpha.is_finite() && section.lora_alpha > 0.0) {
                    return Err(invalid(
                        "federated.lora_alpha",
                        format!("must be positive, got {}", section.lora_alpha),
                    ));
                }
                Trainable::Lora {
                    rank: section.lora_rank,
                    alpha: section.lora_alpha,
                }
            }
        };
        let task = match (section.task, section.num_classes) {
            (TaskKind::NextToken, None) => FederatedTask::NextToken,
            (TaskKind::NextToken, Some(_)) => return Err(invalid(
                "federated.num_classes",
                "only a classification task has classes (set federated.task = \"classification\")",
            )),
            (TaskKind::Classification, None) => {
                return Err(invalid(
                    "federated.num_classes",
                    "a classification task needs the number of classes (labels 0..num_classes)",
                ))
            }
            (TaskKind::Classification, Some(k)) => {
                if !(2..=FederatedTask::MAX_CLASSES).contains(&k) {
                    return Err(invalid(
                        "federated.num_classes",
                        format!("must be in 2..={}, got {k}", FederatedTask::MAX_CLASSES),
                    ));
                }
                FederatedTask::Classification { num_classes: k }
            }
        };
        let head = task
            .num_classes()
            .map_or_else(Vec::new, |k| model.classifier_specs(k));
        let model_tensors = model.tensor_specs();
        let base = match &section.base_checkpoint {
            Some(path) => Some(SharedParams(Arc::new(
                crate::checkpoint::read_params(path, &ParamLayout::new(&model_tensors))
                    .map_err(|e| invalid("federated.base_checkpoint", e.to_string()))?,
            ))),
            None => None,
        };
        let (mut tensors, base_tensors, base_params, initial_params) = match trainable {
            Trainable::Full => {
                // A pretrained model under a fresh head: the head starts from
                // its own initialisation.
                let initial = base.map(|base| {
                    let mut params = base.0.as_ref().clone();
                    params.extend(cohort_core::params::init_params(&head, self.seed));
                    SharedParams(Arc::new(params))
                });
                (model_tensors, Vec::new(), None, initial)
            }
            Trainable::Lora { rank, .. } => {
                let base = base.unwrap_or_else(|| {
                    SharedParams(Arc::new(cohort_core::params::init_params(
                        &model_tensors,
                        self.seed,
                    )))
                });
                (model.lora_specs(rank), model_tensors, Some(base), None)
            }
        };
        tensors.extend(head);
        let update_dtype = t.update_dtype;
        if update_dtype != DType::F32 {
            // bf16 rounding of a clipped update could carry it past C.
            return Err(invalid(
                "train.update_dtype",
                "a federated job's updates travel as f32 (bf16 rounding could push a clipped update past clip_norm)",
            ));
        }
        let client_noise_stddev = rules.client_noise_stddev(c.min_participants as usize);
        let engine = EngineConfig {
            tensors,
            update_dtype,
            lease: Duration::from_millis(c.lease_ms),
            round_deadline: Duration::from_millis(c.round_deadline_ms),
            min_workers: c.min_workers as usize,
            min_participants: c.min_participants as usize,
            max_workers_per_round: 0,
            shards_per_worker: 1,
            max_rounds: t.rounds,
            max_epochs: 0,
            eval_every: 0,
            outer,
            max_chunk_elems: c.max_chunk_bytes as usize / update_dtype.size_bytes(),
            seed: self.seed,
            federated: Some(rules),
        };
        Ok(JobPlan {
            name: self.name,
            data_dir: self.data_dir,
            run_dir: self.run_dir,
            model,
            tokenizer: section.tokenizer,
            inner: self.inner,
            inner_steps: t.inner_steps,
            micro_batch_size: t.micro_batch_size,
            heartbeat_interval: Duration::from_millis(c.heartbeat_ms),
            chunk_timeout: Duration::from_millis(c.chunk_timeout_ms),
            max_chunk_bytes: c.max_chunk_bytes,
            checkpoint_every: t.checkpoint_every,
            engine,
            train_shards: Vec::new(),
            eval_shards: Vec::new(),
            initial_params: None,
            federated: Some(FederatedPlan {
                trainable,
                task,
                clients: enrollment.tokens,
                certificate_names: enrollment.certificate_names,
                base_tensors,
                base_params,
                initial_params,
                client_noise_stddev,
            }),
        })
    }
}

/// 64 bits from the operating system's CSPRNG.
fn secret_seed() -> Result<u64, ConfigError> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| invalid("federated", format!("cannot read /dev/urandom: {e}")))?;
    Ok(u64::from_le_bytes(bytes))
}

/// The enrolled sites, by the credentials they can join with.
#[derive(Clone, Debug, Default)]
struct Enrollment {
    /// Token SHA-256 (lowercase hex) → site name.
    tokens: BTreeMap<String, String>,
    /// Certificate name (ASCII lowercase) → site name.
    certificate_names: BTreeMap<String, String>,
    /// How many sites are enrolled.
    sites: usize,
}

/// The longest certificate name accepted (a DNS name's limit).
const MAX_CERTIFICATE_NAME: usize = 253;

/// Reads the enrollment file. Each `[[client]]` has a unique, non-empty
/// `name` and at least one of `token_sha256` (64 hex digits) and
/// `certificate_name` (printable, no spaces, at most 253 bytes); no token
/// and no certificate name (ignoring ASCII case) is enrolled twice.
fn load_enrollment(path: &Path) -> Result<Enrollment, ConfigError> {
    let field = "federated.enrollment";
    let file_name = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("cannot read {file_name}: {e}")))?;
    let file: EnrollmentFile =
        toml::from_str(&text).map_err(|e| invalid(field, format!("{file_name}: {e}")))?;
    if file.client.is_empty() {
        return Err(invalid(field, format!("{file_name} enrolls no clients")));
    }
    let mut enrollment = Enrollment::default();
    let mut names = std::collections::BTreeSet::new();
    for client in file.client {
        let name = client.name;
        if name.trim().is_empty() {
            return Err(invalid(
                field,
                format!("{file_name}: a [[client]] has an empty name"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(invalid(
                field,
                format!("{file_name}: client name {name:?} is enrolled twice"),
            ));
        }
        if client.token_sha256.is_none() && client.certificate_name.is_none() {
            return Err(invalid(
                field,
                format!(
                    "{file_name}: client {name:?} has neither token_sha256 nor certificate_name; \
                     give one or both"
                ),
            ));
        }
        if let Some(hash) = client.token_sha256 {
            let hash = hash.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    field,
                    format!("{file_name}: client {name:?}: token_sha256 must be 64 hex digits"),
                ));
            }
            if let Some(other) = enrollment.tokens.insert(hash, name.clone()) {
                return Err(invalid(
                    field,
                    format!("{file_name}: clients {other:?} and {name:?} have the same token"),
                ));
            }
        }
        if let Some(certificate_name) = client.certificate_name {
            if certificate_name.is_empty()
                || certificate_name.len() > MAX_CERTIFICATE_NAME
                || !certificate_name.chars().all(|c| c.is_ascii_graphic())
            {
                return Err(invalid(
                    field,
                    format!(
                        "{file_name}: client {name:?}: certificate_name {certificate_name:?} must be \
                         1 to {MAX_CERTIFICATE_NAME} printable ASCII characters without spaces \
                         (a certificate's CN or DNS name)"
                    ),
                ));
            }
            let key = certificate_name.to_ascii_lowercase();
            if let Some(other) = enrollment.certificate_names.insert(key, name.clone()) {
                return Err(invalid(
                    field,
                    format!(
                        "{file_name}: clients {other:?} and {name:?} have the same certificate_name \
                         {certificate_name:?} (names are compared ignoring ASCII case)"
                    ),
                ));
            }
        }
        enrollment.sites += 1;
    }
    Ok(enrollment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_job_file_without_dot_dots() {
        assert_eq!(
            normalize(Path::new("jobs/../runs/x")),
            PathBuf::from("runs/x")
        );
        assert_eq!(normalize(Path::new("./a/./b/../c")), PathBuf::from("a/c"));
        assert_eq!(normalize(Path::new("../up")), PathBuf::from("../up"));
        assert_eq!(normalize(Path::new("a/..")), PathBuf::from("."));
    }

    const TOKEN_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// A valid federated job file in `dir`, with `edit` applied to its text.
    fn federated_job(dir: &Path, edit: impl Fn(String) -> String) -> Result<JobPlan, ConfigError> {
        std::fs::write(
            dir.join("enrollment.toml"),
            format!(
                "[[client]]\nname = \"a\"\ntoken_sha256 = \"{TOKEN_HASH}\"\n[[client]]\nname = \"b\"\ntoken_sha256 = \"{}\"\n",
                "1".repeat(64)
            ),
        )
        .unwrap();
        let text = edit(
            r#"
name = "fed"
run_dir = "run"
[model]
preset = "tiny"
[train]
rounds = 3
inner_steps = 2
[cluster]
min_workers = 2
min_participants = 2
[federated]
enrollment = "enrollment.toml"
sample_rate = 0.5
[federated.dp]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon = 8.0
delta = 1e-5
"#
            .to_string(),
        );
        JobFile::parse(&text, &dir.join("job.toml"))?.validate()
    }

    fn field_of(result: Result<JobPlan, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { field, message }) => format!("{field}: {message}"),
            Err(other) => other.to_string(),
            Ok(_) => "accepted".to_string(),
        }
    }

    #[test]
    fn a_valid_federated_job_plans_lora_adapters_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let plan = federated_job(dir.path(), |t| t).unwrap();
        let f = plan.federated.as_ref().unwrap();
        assert_eq!(f.clients.get(TOKEN_HASH).map(String::as_str), Some("a"));
        assert!(plan.engine.tensors.iter().all(|t| t.name.contains("lora")));
        assert_eq!(f.base_tensors.len(), plan.model.tensor_specs().len());
        assert_eq!(
            f.client_noise_stddev, 0.0,
            "central mode: clients do not add noise"
        );
        assert_eq!(
            plan.engine.outer,
            OuterOptimizerConfig::Sgd { lr: 1.0 },
            "FedAvg by default"
        );
    }

    #[test]
    fn a_classification_job_trains_and_sends_its_head_last() {
        let dir = tempfile::tempdir().unwrap();
        let classify = |t: String| {
            t.replace(
                "sample_rate = 0.5",
                "sample_rate = 0.5\ntask = \"classification\"\nnum_classes = 3",
            )
        };
        let plan = federated_job(dir.path(), classify).unwrap();
        let head = plan.model.classifier_specs(3);
        let f = plan.federated.as_ref().unwrap();
        assert_eq!(f.task, FederatedTask::Classification { num_classes: 3 });
        let tensors = &plan.engine.tensors;
        assert_eq!(tensors.len(), plan.model.lora_specs(4).len() + 2);
        assert_eq!(&tensors[tensors.len() - 2..], &head[..]);
        assert_eq!(head[0].shape, vec![3, plan.model.d_model as usize]);

        // Full fine-tuning from a pretrained checkpoint: the model's values,
        // then a freshly initialised head.
        let model_specs = plan.model.tensor_specs();
        let pretrained: Vec<f32> = (0..ParamLayout::new(&model_specs).total())
            .map(|i| (i % 97) as f32 * 1e-3)
            .collect();
        let checkpoint = dir.path().join("base.safetensors");
        crate::checkpoint::write_params(
            &checkpoint,
            &ParamLayout::new(&model_specs),
            &pretrained,
            Default::default(),
        )
        .unwrap();
        let full = |t: String| {
            classify(t).replace(
                "enrollment = \"enrollment.toml\"",
                "enrollment = \"enrollment.toml\"\ntrainable = \"full\"\nbase_checkpoint = \"base.safetensors\"",
            )
        };
        let plan = federated_job(dir.path(), full).unwrap();
        let f = plan.federated.as_ref().unwrap();
        assert_eq!(plan.engine.tensors.len(), model_specs.len() + 2);
        let initial = f.initial_params.as_ref().unwrap().0.clone();
        assert_eq!(
            initial.len(),
            ParamLayout::new(&plan.engine.tensors).total()
        );
        assert_eq!(&initial[..pretrained.len()], &pretrained[..]);
        let weight = &initial[pretrained.len()..pretrained.len() + 3 * 64];
        assert!(weight.iter().any(|&w| w != 0.0), "the head is initialised");
        assert!(initial[initial.len() - 3..].iter().all(|&b| b == 0.0));
    }

    #[test]
    fn every_broken_federated_setting_names_its_field() {
        let dir = tempfile::tempdir().unwrap();
        type Edit = Box<dyn Fn(String) -> String>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "q outside (0, 1]",
                Box::new(|t| t.replace("sample_rate = 0.5", "sample_rate = 1.5")),
                "sample_rate must be in (0, 1]",
            ),
            (
                "sigma <= 0",
                Box::new(|t| t.replace("noise_multiplier = 1.0", "noise_multiplier = 0.0")),
                "noise_multiplier must be positive",
            ),
            (
                "fixed-size cohorts with DP",
                Box::new(|t| t.replace("sample_rate = 0.5", "cohort_size = 2")),
                "not covered by the privacy accountant",
            ),
            (
                "a pretraining start in a federated job",
                Box::new(|t| {
                    t.replace(
                        "inner_steps = 2",
                        "inner_steps = 2\ninit_checkpoint = \"x.safetensors\"",
                    )
                }),
                "train.init_checkpoint: a federated job starts from federated.base_checkpoint",
            ),
            (
                "classes without a classification task",
                Box::new(|t| t.replace("sample_rate = 0.5", "sample_rate = 0.5\nnum_classes = 2")),
                "federated.num_classes: only a classification task has classes",
            ),
            (
                "a classification task without classes",
                Box::new(|t| {
                    t.replace(
                        "sample_rate = 0.5",
                        "sample_rate = 0.5\ntask = \"classification\"",
                    )
                }),
                "federated.num_classes: a classification task needs the number of classes",
            ),
            (
                "a single class",
                Box::new(|t| {
                    t.replace(
                        "sample_rate = 0.5",
                        "sample_rate = 0.5\ntask = \"classification\"\nnum_classes = 1",
                    )
                }),
                "federated.num_classes: must be in 2..=1024, got 1",
            ),
            (
                "an unknown task",
                Box::new(|t| {
                    t.replace(
                        "sample_rate = 0.5",
                        "sample_rate = 0.5\ntask = \"regression\"",
                    )
                }),
                "unknown variant `regression`",
            ),
            (
                "both sampling settings",
                Box::new(|t| t.replace("sample_rate = 0.5", "sample_rate = 0.5\ncohort_size = 2")),
                "exactly one of federated.sample_rate",
            ),
            (
                "a budget without delta",
                Box::new(|t| t.replace("delta = 1e-5", "")),
                "federated.dp.epsilon: set both",
            ),
            (
                "bf16 updates",
                Box::new(|t| {
                    t.replace(
                        "inner_steps = 2",
                        "inner_steps = 2\nupdate_dtype = \"bf16\"",
                    )
                }),
                "train.update_dtype",
            ),
            (
                "more clients needed than enrolled",
                Box::new(|t| {
                    t.replace("min_workers = 2", "min_workers = 3")
                        .replace("min_participants = 2", "min_participants = 3")
                }),
                "enrolled clients (2) are fewer",
            ),
            (
                "a missing enrollment file",
                Box::new(|t| t.replace("enrollment.toml", "missing.toml")),
                "federated.enrollment: cannot read",
            ),
            (
                "a missing base checkpoint",
                Box::new(|t| {
                    t.replace(
                        "sample_rate = 0.5",
                        "sample_rate = 0.5\nbase_checkpoint = \"nope.safetensors\"",
                    )
                }),
                "federated.base_checkpoint",
            ),
            (
                "a LoRA rank above d_model",
                Box::new(|t| t.replace("sample_rate = 0.5", "sample_rate = 0.5\nlora_rank = 65")),
                "federated.lora_rank",
            ),
            (
                "epochs in a federated job",
                Box::new(|t| t.replace("rounds = 3", "epochs = 1")),
                "train.rounds",
            ),
            (
                "an unknown key",
                Box::new(|t| {
                    t.replace("sample_rate = 0.5", "sample_rate = 0.5\nsampel_rate = 0.1")
                }),
                "unknown field `sampel_rate`",
            ),
            (
                "an unknown DP mode",
                Box::new(|t| t.replace("mode = \"central\"", "mode = \"centre\"")),
                "unknown variant `centre`",
            ),
        ];
        for (what, edit, needle) in cases {
            let got = field_of(federated_job(dir.path(), edit));
            assert!(
                got.contains(needle),
                "{what}: {got:?} does not contain {needle:?}"
            );
        }
    }

    #[test]
    fn a_malformed_enrollment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hash = |c: char| format!("token_sha256 = \"{}\"\n", c.to_string().repeat(64));
        let cases = [
            (
                "[[client]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n".to_string(),
                "client \"a\": token_sha256 must be 64 hex digits",
            ),
            (String::new(), "enrolls no clients"),
            (
                format!(
                    "[[client]]\nname = \"a\"\n{}[[client]]\nname = \"a\"\n{}",
                    hash('1'),
                    hash('2')
                ),
                "client name \"a\" is enrolled twice",
            ),
            (
                format!(
                    "[[client]]\nname = \"a\"\n{}[[client]]\nname = \"b\"\n{}",
                    hash('1'),
                    hash('1')
                ),
                "clients \"a\" and \"b\" have the same token",
            ),
            (
                format!("[[client]]\nname = \" \"\n{}", hash('1')),
                "empty name",
            ),
            (
                "[[client]]\nname = \"a\"\n".to_string(),
                "client \"a\" has neither token_sha256 nor certificate_name",
            ),
            (
                "[[client]]\nname = \"a\"\ncertificate_name = \"\"\n".to_string(),
                "certificate_name \"\" must be 1 to 253 printable ASCII",
            ),
            (
                "[[client]]\nname = \"a\"\ncertificate_name = \"client 01\"\n".to_string(),
                "without spaces",
            ),
            (
                format!(
                    "[[client]]\nname = \"a\"\ncertificate_name = \"{}\"\n",
                    "x".repeat(254)
                ),
                "must be 1 to 253",
            ),
            (
                "[[client]]\nname = \"a\"\ncertificate_name = \"client-01\"\n\
                 [[client]]\nname = \"b\"\ncertificate_name = \"Client-01\"\n"
                    .to_string(),
                "clients \"a\" and \"b\" have the same certificate_name \"Client-01\"",
            ),
            (
                "[[client]]\nname = \"a\"\ncertificate = \"client-01\"\n".to_string(),
                "unknown field `certificate`",
            ),
            (
                "[[client]]\nname = \"a\"\ncertificate_name = 7\n".to_string(),
                "invalid type",
            ),
        ];
        for (enrollment, needle) in cases {
            let path = dir.path().join("enrollment.toml");
            std::fs::write(&path, &enrollment).unwrap();
            let err = load_enrollment(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} does not contain {needle}");
            assert!(
                err.contains("enrollment.toml"),
                "{err} does not name the file"
            );
        }
    }

    #[test]
    fn sites_enroll_by_token_certificate_name_or_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enrollment.toml");
        std::fs::write(
            &path,
            format!(
                "[[client]]\nname = \"a\"\ntoken_sha256 = \"{TOKEN_HASH}\"\n\
                 [[client]]\nname = \"b\"\ncertificate_name = \"Client-02\"\n\
                 [[client]]\nname = \"c\"\ntoken_sha256 = \"{}\"\ncertificate_name = \"client-03\"\n",
                "A".repeat(64)
            ),
        )
        .unwrap();
        let enrollment = load_enrollment(&path).unwrap();
        assert_eq!(enrollment.sites, 3);
        assert_eq!(enrollment.tokens.len(), 2);
        assert_eq!(enrollment.tokens["a".repeat(64).as_str()], "c");
        assert_eq!(enrollment.certificate_names["client-02"], "b");
        assert_eq!(enrollment.certificate_names["client-03"], "c");
    }
}
