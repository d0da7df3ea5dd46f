//! Cohort's decision-making logic, free of IO.
//!
//! Nothing in this crate opens a file or socket, spawns a task or reads the
//! clock: time arrives as a parameter, bytes arrive as slices. That keeps every
//! rule about rounds, shards and aggregation testable in milliseconds.
//!
//! Modules:
//! - [`ids`]: newtypes for worker, round, shard and version identifiers.
//! - [`model`]: GPT model configuration and its parameter layout.
//! - [`params`]: flat parameter buffers, their layout and deterministic init.
//! - [`hf_gpt2`]: the Hugging Face GPT-2 layout: names, Conv1D transposes,
//!   `config.json`, LoRA merging and PEFT adapter names.
//! - [`codec`]: little-endian f32/bf16 tensor payloads, validated on decode.
//! - [`aggregate`]: the running sum that pushes fold into, with exact undo.
//! - [`clip`]: L2 clipping of updates and the norm bound for noised ones.
//! - [`outer`]: the outer optimizer (averaging, SGD, Nesterov momentum).
//! - [`scheduler`]: shard leasing with exactly-once consumption per epoch.
//! - [`federated`]: cohort sampling, DP modes and what a federated round costs.
//! - [`engine`]: the round state machine that ties them together.
//! - [`shard_file`]: the on-disk token shard format (encode/decode of bytes).
//! - [`rng`]: a small seeded PRNG so that runs are reproducible.
//! - [`privacy`]: differential-privacy accounting (RDP of the sampled Gaussian).

pub mod aggregate;
pub mod clip;
pub mod codec;
pub mod engine;
pub mod federated;
pub mod hf_gpt2;
pub mod ids;
pub mod model;
pub mod outer;
pub mod params;
pub mod privacy;
pub mod rng;
pub mod scheduler;
pub mod shard_file;
