//! The durable run store: a SQLite database (`cohort.sqlite`, WAL) in the run
//! directory that names the job and indexes its checkpoints, beside the
//! safetensors files that hold the tensors.
//!
//! A checkpoint is one safetensors file with the global parameters (under
//! their spec names) and the outer momentum buffer (`outer.momentum.<name>`),
//! written atomically (temp file, fsync, rename, fsync of the directory).
//! Only once the file is durable is its row inserted, in one transaction with
//! its sha256 and the engine snapshot (JSON). The newest
//! [`KEEP_CHECKPOINTS`] rows are kept; older files are deleted after the
//! transaction commits. On resume the newest checkpoint whose file matches
//! its sha256 is used; a torn or corrupt one is skipped with a warning.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use cohort_core::engine::{tensor_identities, EngineSnapshot, ShardInfo, TensorIdentity};
use cohort_core::model::ModelConfig;
use cohort_core::outer::STATE_BUFFER_NAMES;
use cohort_core::params::ParamLayout;
use rusqlite::{params, Connection, OptionalExtension};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::config::JobPlan;
use crate::data::{replace_atomically, DataError};

/// The database file in the run directory.
pub const STORE_FILE: &str = "cohort.sqlite";
/// Checkpoints kept; older ones are deleted.
pub const KEEP_CHECKPOINTS: usize = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    spec TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL,
    next_round INTEGER NOT NULL,
    committed_rounds INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    file_name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    snapshot TEXT NOT NULL
);
-- The privacy ledger: one row per federated round charged, written (and
-- fsynced) before the round's aggregate is released. Append-only: spent
-- privacy never goes down, even for a round that was charged and then lost.
CREATE TABLE IF NOT EXISTS privacy_charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    shares INTEGER NOT NULL,
    sampling_rate REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    epsilon_after REAL NOT NULL,
    created_at_ms INTEGER NOT NULL
);
";

/// One row of the privacy ledger.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrivacyCharge {
    pub round: u64,
    pub shares: usize,
    pub cost: cohort_core::privacy::SampledGaussianRound,
    /// Epsilon spent once this round was charged (at the job's delta).
    pub epsilon_after: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("run store {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("checkpoint file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] DataError),
    #[error("serialising checkpoint {file}: {source}")]
    Serialize {
        file: String,
        source: safetensors::SafeTensorError,
    },
    #[error("{what} is not valid JSON: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("the run directory {run_dir} belongs to another job: {differences}. Use another run_dir, or delete {store} to start over")]
    JobMismatch {
        run_dir: PathBuf,
        store: PathBuf,
        differences: String,
    },
    #[error("--fresh: {store} already holds {checkpoints} checkpoints of this job; drop --fresh to resume, or delete the run directory")]
    NotFresh { store: PathBuf, checkpoints: usize },
}

/// What makes a run directory's checkpoints usable by a job: its name, model,
/// parameter tensors and training shards (hashed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub name: String,
    pub model: ModelConfig,
    pub tensors: Vec<TensorIdentity>,
    pub train_shards: usize,
    /// sha256 of the training shards' ids, file names and token counts.
    pub train_shards_sha256: String,
}

impl JobIdentity {
    pub fn of(plan: &JobPlan) -> JobIdentity {
        JobIdentity {
            name: plan.name.clone(),
            model: plan.model.clone(),
            tensors: tensor_identities(&plan.engine.tensors),
            train_shards: plan.train_shards.len(),
            train_shards_sha256: shards_sha256(&plan.train_shards),
        }
    }

    /// What differs from `stored`, in words; empty when nothing does.
    pub fn differences(&self, stored: &JobIdentity) -> Vec<String> {
        let mut out = Vec::new();
        if self.name != stored.name {
            out.push(format!(
                "name is {:?}, the store's is {:?}",
                self.name, stored.name
            ));
        }
        if self.model != stored.model {
            out.push(format!(
                "model is {:?}, the store's is {:?}",
                self.model, stored.model
            ));
        } else if self.tensors != stored.tensors {
            out.push("the parameter tensors differ".to_string());
        }
        if self.train_shards != stored.train_shards
            || self.train_shards_sha256 != stored.train_shards_sha256
        {
            out.push(format!(
                "training shards are {} (sha256 {}), the store's are {} (sha256 {})",
                self.train_shards,
                &self.train_shards_sha256[..12],
                stored.train_shards,
                &stored.train_shards_sha256[..stored.train_shards_sha256.len().min(12)]
            ));
        }
        out
    }
}

fn shards_sha256(shards: &[ShardInfo]) -> String {
    let mut hasher = Sha256::new();
    for shard in shards {
        hasher.update(shard.id.0.to_le_bytes());
        hasher.update((shard.file_name.len() as u64).to_le_bytes());
        hasher.update(shard.file_name.as_bytes());
        hasher.update(shard.num_tokens.to_le_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String, std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// One row of the checkpoints table.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointRecord {
    pub id: i64,
    pub version: u64,
    pub next_round: u64,
    pub committed_rounds: u64,
    pub created_at_ms: u64,
    pub file_name: String,
    pub sha256: String,
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub record: CheckpointRecord,
    pub path: PathBuf,
    pub snapshot: EngineSnapshot,
    pub params: Vec<f32>,
    pub momentum: Vec<f32>,
    /// Newer checkpoints that were skipped, with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The store of one run directory.
#[derive(Debug)]
pub struct RunStore {
    run_dir: PathBuf,
    path: PathBuf,
    conn: Connection,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RunStore {
    /// Whether `run_dir` has a store.
    pub fn exists(run_dir: &Path) -> bool {
        run_dir.join(STORE_FILE).exists()
    }

    /// Opens (or creates) the store in `run_dir` (which must exist).
    pub fn open(run_dir: &Path) -> Result<RunStore, StoreError> {
        let path = run_dir.join(STORE_FILE);
        let sql = |source| StoreError::Sql {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        Ok(RunStore {
            run_dir: run_dir.to_owned(),
            path,
            conn,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a privacy charge in its own transaction; when this returns Ok
    /// the row is on disk (WAL, `synchronous = FULL`).
    pub fn charge_privacy(&mut self, charge: &PrivacyCharge) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.conn
            .execute(
                "INSERT INTO privacy_charges (round, shares, sampling_rate, noise_multiplier, epsilon_after, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    charge.round as i64,
                    charge.shares as i64,
                    charge.cost.sampling_rate,
                    charge.cost.noise_multiplier,
                    charge.epsilon_after,
                    now_ms() as i64,
                ],
            )
            .map_err(|source| StoreError::Sql { path, source })?;
        Ok(())
    }

    /// Every privacy charge, oldest first.
    pub fn privacy_charges(&self) -> Result<Vec<PrivacyCharge>, StoreError> {
        let sql = |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        };
        let mut statement = self
            .conn
            .prepare("SELECT round, shares, sampling_rate, noise_multiplier, epsilon_after FROM privacy_charges ORDER BY id")
            .map_err(sql)?;
        let rows = statement
            .query_map([], |row| {
                Ok(PrivacyCharge {
                    round: row.get::<_, i64>(0)? as u64,
                    shares: row.get::<_, i64>(1)? as usize,
                    cost: cohort_core::privacy::SampledGaussianRound {
                        sampling_rate: row.get(2)?,
                        noise_multiplier: row.get(3)?,
                    },
                    epsilon_after: row.get(4)?,
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// The job this store belongs to, if it has been recorded.
    pub fn job(&self) -> Result<Option<JobIdentity>, StoreError> {
        let spec: Option<String> = self
            .conn
            .query_row("SELECT spec FROM job WHERE id = 1", [], |row| row.get(0))
            .optional()
            .map_err(self.sql())?;
        spec.map(|text| {
            serde_json::from_str(&text).map_err(|source| StoreError::Json {
                what: "the stored job spec",
                source,
            })
        })
        .transpose()
    }

    /// Checks `identity` against the stored job. A store without checkpoints
    /// takes the new identity; one with checkpoints of another job is refused.
    pub fn claim(&mut self, identity: &JobIdentity) -> Result<(), StoreError> {
        if let Some(stored) = self.job()? {
            let differences = identity.differences(&stored);
            if !differences.is_empty() && !self.checkpoints()?.is_empty() {
                return Err(StoreError::JobMismatch {
                    run_dir: self.run_dir.clone(),
                    store: self.path.clone(),
                    differences: differences.join("; "),
                });
            }
        }
        let spec = serde_json::to_string(identity).map_err(|source| StoreError::Json {
            what: "the job spec",
            source,
        })?;
        self.conn
            .execute(
                "INSERT INTO job (id, spec, created_at_ms) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET spec = excluded.spec",
                params![spec, now_ms() as i64],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// Every checkpoint, newest first.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT id, version, next_round, committed_rounds, created_at_ms, file_name, sha256
                 FROM checkpoints ORDER BY id DESC",
            )
            .map_err(self.sql())?;
        let rows = statement
            .query_map([], |row| {
                Ok(CheckpointRecord {
                    id: row.get(0)?,
                    version: row.get::<_, i64>(1)? as u64,
                    next_round: row.get::<_, i64>(2)? as u64,
                    committed_rounds: row.get::<_, i64>(3)? as u64,
                    created_at_ms: row.get::<_, i64>(4)? as u64,
                    file_name: row.get(5)?,
                    sha256: row.get(6)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    /// Writes a checkpoint: the tensors file first (durably), then its row;
    /// then drops all but the newest [`KEEP_CHECKPOINTS`].
    pub fn write_checkpoint(
        &mut self,
        snapshot: &EngineSnapshot,
        layout: &ParamLayout,
        params: &[f32],
        momentum: &[f32],
    ) -> Result<CheckpointRecord, StoreError> {
        let created_at_ms = now_ms();
        let file_name = format!(
            "state-v{:06}-{created_at_ms}.safetensors",
            snapshot.version.0
        );
        let path = self.run_dir.join(&file_name);
        let mut metadata = HashMap::from([
            ("format".to_string(), "cohort-state-v1".to_string()),
            ("version".to_string(), snapshot.version.0.to_string()),
            ("next_round".to_string(), snapshot.next_round.to_string()),
        ]);
        metadata.insert("momentum".to_string(), (!momentum.is_empty()).to_string());
        write_state(&path, &file_name, layout, params, momentum, metadata)?;
        let sha256 = file_sha256(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let snapshot_json = serde_json::to_string(snapshot).map_err(|source| StoreError::Json {
            what: "the engine snapshot",
            source,
        })?;
        let path_for_errors = self.path.clone();
        let sql = move |source| StoreError::Sql {
            path: path_for_errors.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&sql)?;
        tx.execute(
            "INSERT INTO checkpoints
             (version, next_round, committed_rounds, created_at_ms, file_name, sha256, snapshot)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                snapshot.version.0 as i64,
                snapshot.next_round as i64,
                snapshot.committed_rounds as i64,
                created_at_ms as i64,
                file_name,
                sha256,
                snapshot_json
            ],
        )
        .map_err(&sql)?;
        let id = tx.last_insert_rowid();
        let old: Vec<String> = {
            let mut statement = tx
                .prepare("SELECT file_name FROM checkpoints ORDER BY id DESC LIMIT -1 OFFSET ?1")
                .map_err(&sql)?;
            let rows = statement
                .query_map([KEEP_CHECKPOINTS as i64], |row| row.get(0))
                .map_err(&sql)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(&sql)?
        };
        tx.execute(
            "DELETE FROM checkpoints WHERE id NOT IN
             (SELECT id FROM checkpoints ORDER BY id DESC LIMIT ?1)",
            [KEEP_CHECKPOINTS as i64],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        for name in old {
            if name != file_name {
                let _ = std::fs::remove_file(self.run_dir.join(name));
            }
        }
        Ok(CheckpointRecord {
            id,
            version: snapshot.version.0,
            next_round: snapshot.next_round,
            committed_rounds: snapshot.committed_rounds,
            created_at_ms,
            file_name,
            sha256,
        })
    }

    /// The newest checkpoint whose file is intact, verified against its
    /// sha256 and read back; newer, damaged ones are logged and skipped.
    pub fn load_latest(
        &self,
        layout: &ParamLayout,
    ) -> Result<Option<LoadedCheckpoint>, StoreError> {
        let mut skipped = Vec::new();
        for record in self.checkpoints()? {
            let path = self.run_dir.join(&record.file_name);
            match self.load(&record, &path, layout) {
                Ok((snapshot, params, momentum)) => {
                    return Ok(Some(LoadedCheckpoint {
                        record,
                        path,
                        snapshot,
                        params,
                        momentum,
                        skipped,
                    }))
                }
                Err(reason) => {
                    warn!(
                        file = %path.display(),
                        version = record.version,
                        reason = %reason,
                        "checkpoint is corrupt or torn; falling back to the previous one"
                    );
                    skipped.push((path, reason));
                }
            }
        }
        Ok(None)
    }

    fn load(
        &self,
        record: &CheckpointRecord,
        path: &Path,
        layout: &ParamLayout,
    ) -> Result<(EngineSnapshot, Vec<f32>, Vec<f32>), String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let sha256 = hex(&Sha256::digest(&bytes));
        if sha256 != record.sha256 {
            return Err(format!(
                "sha256 is {sha256}, the store recorded {}",
                record.sha256
            ));
        }
        let snapshot_json: String = self
            .conn
            .query_row(
                "SELECT snapshot FROM checkpoints WHERE id = ?1",
                [record.id],
                |row| row.get(0),
            )
            .map_err(|e| e.to_string())?;
        let snapshot: EngineSnapshot =
            serde_json::from_str(&snapshot_json).map_err(|e| e.to_string())?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        let mut params = vec![0f32; layout.total()];
        // The outer optimizer's state buffers, back to back (see
        // `cohort_core::outer::STATE_BUFFER_NAMES`).
        let names = tensors.names();
        let buffers = STATE_BUFFER_NAMES
            .iter()
            .take_while(|buffer| {
                let prefix = format!("outer.{buffer}.");
                names.iter().any(|name| name.starts_with(&prefix))
            })
            .count();
        let mut momentum = vec![0f32; buffers * layout.total()];
        for slot in layout.tensors() {
            let read = |name: &str, out: &mut [f32]| -> Result<(), String> {
                let view = tensors.tensor(name).map_err(|e| e.to_string())?;
                if view.dtype() != Dtype::F32 || view.shape() != slot.shape.as_slice() {
                    return Err(format!(
                        "tensor {name} is {:?} {:?}, expected F32 {:?}",
                        view.dtype(),
                        view.shape(),
                        slot.shape
                    ));
                }
                // One memcpy into place (safetensors is little-endian, as are
                // the hosts the coordinator runs on).
                bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(view.data());
                Ok(())
            };
            read(
                &slot.name,
                &mut params[slot.offset..slot.offset + slot.numel],
            )?;
            for (b, buffer) in STATE_BUFFER_NAMES.iter().take(buffers).enumerate() {
                let start = b * layout.total() + slot.offset;
                read(
                    &format!("outer.{buffer}.{}", slot.name),
                    &mut momentum[start..start + slot.numel],
                )?;
            }
        }
        Ok((snapshot, params, momentum))
    }
}

/// Writes parameters (and momentum, if any) as one safetensors file, atomically.
fn write_state(
    path: &Path,
    file_name: &str,
    layout: &ParamLayout,
    params: &[f32],
    momentum: &[f32],
    metadata: HashMap<String, String>,
) -> Result<(), StoreError> {
    let serialize = |source| StoreError::Serialize {
        file: file_name.to_string(),
        source,
    };
    let param_bytes: &[u8] = bytemuck::cast_slice(params);
    let momentum_bytes: &[u8] = bytemuck::cast_slice(momentum);
    let mut views = Vec::new();
    for slot in layout.tensors() {
        let range = slot.offset * 4..(slot.offset + slot.numel) * 4;
        views.push((
            slot.name.clone(),
            TensorView::new(Dtype::F32, slot.shape.clone(), &param_bytes[range.clone()])
                .map_err(serialize)?,
        ));
        let buffers = momentum.len() / layout.total().max(1);
        for (b, buffer) in STATE_BUFFER_NAMES.iter().take(buffers).enumerate() {
            let base = b * layout.total() * 4;
            views.push((
                format!("outer.{buffer}.{}", slot.name),
                TensorView::new(
                    Dtype::F32,
                    slot.shape.clone(),
                    &momentum_bytes[base + range.start..base + range.end],
                )
                .map_err(serialize)?,
            ));
        }
    }
    let mut failure = None;
    replace_atomically(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, Some(metadata), tmp).map_err(|e| {
            let message = e.to_string();
            failure = Some(e);
            std::io::Error::other(message)
        })
    })
    .map_err(|e| match failure.take() {
        Some(source) => serialize(source),
        None => StoreError::Write(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_core::engine::{EngineConfig, RoundEngine, ShardInfo};
    use cohort_core::ids::ShardId;
    use cohort_core::model::ModelConfig;
    use cohort_core::outer::OuterOptimizerConfig;
    use cohort_core::params::init_params;
    use std::time::Duration;

    fn engine() -> RoundEngine {
        let tensors = ModelConfig::tiny_byte_level().tensor_specs();
        let config = EngineConfig {
            tensors: tensors.clone(),
            update_dtype: cohort_core::codec::DType::F32,
            lease: Duration::from_secs(10),
            round_deadline: Duration::from_secs(60),
            min_workers: 1,
            min_participants: 1,
            max_workers_per_round: 0,
            shards_per_worker: 1,
            max_rounds: 5,
            max_epochs: 0,
            eval_every: 0,
            outer: OuterOptimizerConfig::default(),
            max_chunk_elems: 1 << 16,
            seed: 1,
            federated: None,
        };
        let shards = (0..3)
            .map(|i| ShardInfo {
                id: ShardId(i),
                file_name: format!("train-{i}.tok"),
                num_tokens: 100,
            })
            .collect();
        RoundEngine::new(config, shards, vec![], init_params(&tensors, 4)).unwrap()
    }

    #[test]
    fn checkpoints_round_trip_keep_three_and_skip_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine();
        let layout = e.layout().clone();
        let mut store = RunStore::open(dir.path()).unwrap();
        let mut momentum = vec![0.5f32; layout.total()];
        let mut written = Vec::new();
        for i in 0..5 {
            momentum[0] = i as f32;
            let mut snapshot = e.snapshot();
            snapshot.version = cohort_core::ids::Version(i);
            written.push(
                store
                    .write_checkpoint(&snapshot, &layout, e.global_params(), &momentum)
                    .unwrap(),
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let kept = store.checkpoints().unwrap();
        assert_eq!(
            kept.iter().map(|c| c.version).collect::<Vec<_>>(),
            vec![4, 3, 2]
        );
        assert!(!dir.path().join(&written[0].file_name).exists());
        assert!(!dir.path().join(&written[1].file_name).exists());
        let loaded = store.load_latest(&layout).unwrap().unwrap();
        assert_eq!(loaded.record.version, 4);
        assert_eq!(loaded.params.as_slice(), e.global_params().as_slice());
        assert_eq!((loaded.momentum[0], loaded.momentum[1]), (4.0, 0.5));
        assert!(loaded.skipped.is_empty());

        // A torn newest file: the previous checkpoint is used.
        let newest = dir.path().join(&written[4].file_name);
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let reopened = RunStore::open(dir.path()).unwrap();
        let loaded = reopened.load_latest(&layout).unwrap().unwrap();
        assert_eq!(loaded.record.version, 3);
        assert_eq!(loaded.momentum[0], 3.0);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].0, newest);
    }

    #[test]
    fn a_store_of_another_job_is_refused_naming_the_difference() {
        let dir = tempfile::tempdir().unwrap();
        let identity = JobIdentity {
            name: "a".into(),
            model: ModelConfig::tiny_byte_level(),
            tensors: tensor_identities(&ModelConfig::tiny_byte_level().tensor_specs()),
            train_shards: 3,
            train_shards_sha256: "ab".repeat(32),
        };
        let mut store = RunStore::open(dir.path()).unwrap();
        store.claim(&identity).unwrap();
        let mut other = identity.clone();
        other.name = "b".into();
        // No checkpoint yet: the store takes the new identity.
        store.claim(&other).unwrap();
        let e = engine();
        store
            .write_checkpoint(
                &e.snapshot(),
                e.layout(),
                e.global_params(),
                e.outer_optimizer().state(),
            )
            .unwrap();
        let mut bigger = other.clone();
        bigger.model.d_model *= 2;
        bigger.train_shards = 4;
        let message = store.claim(&bigger).unwrap_err().to_string();
        assert!(
            message.contains("model is") && message.contains("training shards are 4"),
            "{message}"
        );
        store.claim(&other).unwrap();
    }

    /// Recovery cost at GPT-2 small scale (124M parameters plus momentum):
    /// `cargo test -p cohort-coordinator --lib -- --ignored --nocapture gpt2`.
    #[test]
    #[ignore = "writes and reads 1 GB; run by hand to measure"]
    fn gpt2_small_checkpoint_write_and_recovery_time() {
        let dir = tempfile::tempdir().unwrap();
        let specs = ModelConfig::gpt2_small().tensor_specs();
        let layout = ParamLayout::new(&specs);
        let params = init_params(&specs, 1);
        let momentum = vec![0.25f32; layout.total()];
        let e = engine();
        let mut snapshot = e.snapshot();
        snapshot.tensors = tensor_identities(&specs);
        let mut store = RunStore::open(dir.path()).unwrap();
        let started = std::time::Instant::now();
        store
            .write_checkpoint(&snapshot, &layout, &params, &momentum)
            .unwrap();
        let write = started.elapsed();
        let record = store.checkpoints().unwrap().remove(0);
        let started = std::time::Instant::now();
        file_sha256(&dir.path().join(&record.file_name)).unwrap();
        eprintln!("sha256 alone {} ms", started.elapsed().as_millis());
        let started = std::time::Instant::now();
        let reopened = RunStore::open(dir.path()).unwrap();
        let loaded = reopened.load_latest(&layout).unwrap().unwrap();
        let load = started.elapsed();
        assert_eq!(loaded.params.len(), layout.total());
        eprintln!(
            "gpt2-small: {} parameters, checkpoint write {} ms, verify + load {} ms",
            layout.total(),
            write.as_millis(),
            load.as_millis()
        );
    }
}
