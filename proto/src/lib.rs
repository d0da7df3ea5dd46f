//! Generated types and gRPC stubs for the `cohort.v1` protocol.
//!
//! Modules: [`v1`] (messages, `coordinator_client`, `coordinator_server`),
//! [`session`] (how a worker's session token travels in metadata).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// HTTP/2 frame size both ends of a Cohort connection use. Measured on
/// loopback here: 256 KiB chunks with 1 MiB frames and one connection per
/// worker moved 8 × 40 MB in 0.30 s against 0.46 s with tonic's defaults
/// (raw TCP: 0.25 s).
pub const HTTP2_MAX_FRAME_SIZE: u32 = 1 << 20;

pub mod session;

pub mod v1 {
    tonic::include_proto!("cohort.v1");
}
