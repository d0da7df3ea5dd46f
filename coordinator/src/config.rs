//! The job file (TOML) and its validation into a [`JobPlan`], before any port is bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_core::codec::DType;
use cohort_core::engine::{EngineConfig, ShardInfo};
use cohort_core::model::ModelConfig;
use cohort_core::outer::OuterOptimizerConfig;
use serde::Deserialize;

use crate::data::{DataManifest, TokenizerKind};

/// The job file as written by an operator. Unknown keys are errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    /// Directory written by `cohort-coordinator prepare` (relative paths are
    /// resolved against the job file's directory).
    pub data_dir: PathBuf,
    /// Where checkpoints, metrics and the shard ledger are written.
    pub run_dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelSection,
    pub train: TrainSection,
    #[serde(default)]
    pub inner: InnerSection,
    #[serde(default)]
    pub outer: OuterOptimizerConfig,
    #[serde(default)]
    pub cluster: ClusterSection,
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
}

fn default_checkpoint_every() -> u64 {
    10
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
        if job.data_dir.is_relative() {
            job.data_dir = normalize(&base.join(&job.data_dir));
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
        self.outer
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
            outer: self.outer,
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
        })
    }
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
}
