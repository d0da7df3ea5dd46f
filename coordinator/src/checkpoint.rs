//! Checkpoints and run records on disk: global parameters as safetensors,
//! the shard ledger and per-round metrics as JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cohort_core::ids::Version;
use cohort_core::params::ParamLayout;
use cohort_core::scheduler::Consumption;
use safetensors::tensor::{Dtype, TensorView};

use crate::data::{replace_atomically, write_atomically, DataError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("serialising checkpoint: {0}")]
    Serialize(#[from] safetensors::SafeTensorError),
    #[error(transparent)]
    Write(#[from] DataError),
    #[error("serialising {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {message}")]
    Mismatch { path: PathBuf, message: String },
}

/// The file name of the checkpoint for `version`.
pub fn checkpoint_path(run_dir: &Path, version: Version) -> PathBuf {
    run_dir.join(format!("checkpoint-{:06}.safetensors", version.0))
}

/// Writes the parameters of `version` as safetensors (f32, spec names and
/// shapes), atomically. `metadata` lands in the file's `__metadata__`.
pub fn write_params(
    path: &Path,
    layout: &ParamLayout,
    params: &[f32],
    metadata: HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let bytes: &[u8] = bytemuck::cast_slice(params);
    let views = layout
        .tensors()
        .iter()
        .map(|slot| {
            let data = &bytes[slot.offset * 4..(slot.offset + slot.numel) * 4];
            TensorView::new(Dtype::F32, slot.shape.clone(), data)
                .map(|view| (slot.name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Streamed to the file: no second copy of the model in memory.
    let mut failure = None;
    replace_atomically(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, Some(metadata), tmp).map_err(|e| {
            let message = e.to_string();
            failure = Some(e);
            std::io::Error::other(message)
        })
    })
    .map_err(|e| match failure.take() {
        Some(serialize) => CheckpointError::Serialize(serialize),
        None => CheckpointError::Write(e),
    })?;
    Ok(())
}

/// Reads the parameters named in `layout` from a safetensors checkpoint
/// (f32, the same names and shapes; extra tensors, such as optimizer state,
/// are ignored). Used to start fine-tuning from a pretrained model.
pub fn read_params(path: &Path, layout: &ParamLayout) -> Result<Vec<f32>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mismatch = |message: String| CheckpointError::Mismatch {
        path: path.to_owned(),
        message,
    };
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| mismatch(format!("not a safetensors file: {e}")))?;
    let mut params = vec![0f32; layout.total()];
    for slot in layout.tensors() {
        let view = tensors
            .tensor(&slot.name)
            .map_err(|_| mismatch(format!("has no tensor {}", slot.name)))?;
        if view.dtype() != Dtype::F32 || view.shape() != slot.shape.as_slice() {
            return Err(mismatch(format!(
                "tensor {} is {:?} {:?}, the model needs F32 {:?}",
                slot.name,
                view.dtype(),
                view.shape(),
                slot.shape
            )));
        }
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(mismatch(format!(
                "tensor {} has a non-finite value at {i}",
                slot.name
            )));
        }
        params[slot.offset..slot.offset + slot.numel].copy_from_slice(&values);
    }
    Ok(params)
}

/// Writes the shard ledger: which shard each round consumed, per epoch.
pub fn write_ledger(path: &Path, ledger: &[Consumption]) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(ledger).map_err(|source| CheckpointError::Json {
        what: "ledger",
        source,
    })?;
    write_atomically(path, &json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_core::model::ModelConfig;
    use cohort_core::params::init_params;

    #[test]
    fn checkpoint_round_trips_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let specs = ModelConfig::tiny_byte_level().tensor_specs();
        let layout = ParamLayout::new(&specs);
        let params = init_params(&specs, 9);
        let path = checkpoint_path(dir.path(), Version(3));
        let metadata = HashMap::from([("version".to_string(), "3".to_string())]);
        write_params(&path, &layout, &params, metadata).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let loaded = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(loaded.len(), specs.len());
        for slot in layout.tensors() {
            let view = loaded.tensor(&slot.name).unwrap();
            assert_eq!(view.shape(), slot.shape.as_slice());
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
            assert_eq!(
                values.as_slice(),
                &params[slot.offset..slot.offset + slot.numel]
            );
        }
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["version"], "3");
        assert_eq!(read_params(&path, &layout).unwrap(), params);
    }

    #[test]
    fn reading_a_checkpoint_of_another_model_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let specs = ModelConfig::tiny_byte_level().tensor_specs();
        let layout = ParamLayout::new(&specs);
        let path = checkpoint_path(dir.path(), Version(1));
        write_params(&path, &layout, &init_params(&specs, 1), HashMap::new()).unwrap();
        let mut bigger = ModelConfig::tiny_byte_level();
        bigger.d_model = 128;
        let other = ParamLayout::new(&bigger.tensor_specs());
        let err = read_params(&path, &other).unwrap_err().to_string();
        assert!(err.contains("wte") && err.contains("128"), "{err}");
        let missing = read_params(&dir.path().join("nope.safetensors"), &layout).unwrap_err();
        assert!(matches!(missing, CheckpointError::Read { .. }));
    }
}
