//! Cohort's pretraining worker: a GPT in tch trained on leased shards, driven over gRPC by the coordinator.
//!
//! Modules:
//! - [`device`]: `--device auto|cpu|cuda|cuda:N`, never falling back silently.
//! - [`model`]: the GPT, its variables named as `cohort_core::model`'s specs.
//! - [`optim`]: inner AdamW/SGD with tensor state saved as safetensors.
//! - [`data`]: token shards and training windows.
//! - [`trainer`]: the training thread that owns every tensor.
//! - [`client`]: the gRPC loop against the coordinator.

pub mod client;
pub mod data;
pub mod device;
pub mod model;
pub mod optim;
pub mod trainer;
