//! The Cohort coordinator: owns the global model, leases shards to workers,
//! aggregates their pushes and publishes new versions over gRPC.
//!
//! Modules:
//! - [`config`]: the job file and its validation into a [`config::JobPlan`].
//! - [`data`]: `prepare` (text to token shards) and the data manifest.
//! - [`federated_data`]: `prepare-federated`, Shakespeare split into client
//!   sites by (play, role), with per-client splits, tokens and enrollment.
//! - [`server`]: runs a job on a bound listener until it ends.
//! - [`tls`]: TLS on the gRPC port (mutual TLS with a client CA) and the
//!   refusal to serve plaintext beyond loopback.
//! - [`dev_certs`]: the `dev-certs` subcommand, a development CA and
//!   certificates for a coordinator and its clients.
//! - [`identity`]: who a federated client site is: enrollment token,
//!   client certificate name, and the binding of a session to that certificate.
//! - [`service`]: the tonic service, thin adapters over the engine.
//! - [`actor`]: the single owner of the round engine, and its handle.
//! - [`observe`]: Prometheus metrics (`/metrics`) and run progress.
//! - [`status`]: the `status` subcommand: the Status RPC as a table or JSON.
//! - [`plot`]: the `plot` subcommand: loss and epsilon curves from `metrics.jsonl`.
//! - [`convert`]: wire types to domain types, domain errors to gRPC statuses.
//! - [`planning`]: the `privacy` planning subcommand (epsilon for sigma, sigma for epsilon).
//! - [`checkpoint`]: safetensors checkpoints and run records.
//! - [`hf`]: `export-hf`/`import-hf`, checkpoints to and from the Hugging Face
//!   GPT-2 layout (transformers, PEFT).
//! - [`store`]: the run directory's SQLite store of the job and its
//!   checkpoints, from which a restarted coordinator resumes.
//!
//! It does not link libtorch: it runs on CPU-only hosts.

pub mod actor;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod data;
pub mod dev_certs;
pub mod federated_data;
pub mod hf;
pub mod identity;
pub mod observe;
pub mod planning;
pub mod plot;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod tls;
