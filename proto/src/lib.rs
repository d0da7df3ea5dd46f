//! Generated types and gRPC stubs for the `cohort.v1` protocol.
//!
//! Modules: [`v1`] (messages, `coordinator_client`, `coordinator_server`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("cohort.v1");
}
