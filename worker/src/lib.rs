//! Cohort's worker: a GPT in tch, either trained on leased shards for pretraining or
//! fine-tuned on a site's private text as a federated client, driven over gRPC by the
//! coordinator.
//!
//! Modules:
//! - [`device`]: `--device auto|cpu|cuda|cuda:N`, never falling back silently.
//! - [`model`]: the GPT, its variables named as `cohort_core::model`'s specs.
//! - [`lora`]: LoRA adapters on the projections, named as `lora_specs`.
//! - [`logits`]: the model's logits for given tokens from checkpoint files (the
//!   reference for Hugging Face exports).
//! - [`optim`]: inner AdamW/SGD with tensor state saved as safetensors.
//! - [`data`]: token shards and training windows.
//! - [`text`]: a federated site's local text and its tokenization.
//! - [`tensor_thread`]: the thread that owns every tensor, driven from async code.
//! - [`trainer`]: the pretraining trainer on that thread.
//! - [`job`]: the coordinator's job spec, validated.
//! - [`connection`]: the gRPC channel, retries, heartbeats, pulls and pushes.
//! - [`client`]: the pretraining worker loop.
//! - [`federated`]: the federated client loop and its local trainer.

pub mod client;
pub mod connection;
pub mod data;
pub mod device;
pub mod federated;
pub mod job;
pub mod labeled;
pub mod logits;
pub mod lora;
pub mod model;
pub mod optim;
pub mod tensor_thread;
pub mod text;
pub mod trainer;
