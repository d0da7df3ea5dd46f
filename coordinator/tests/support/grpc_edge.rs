//! What the gRPC-edge tests share: a job served in-process on 127.0.0.1:0,
//! well-formed update chunks, and the assertion that a call was refused with
//! a given status. Used by `service.rs`, `limits.rs` and
//! `federated_service.rs` (each with `MAX_CHUNK_BYTES` = 1024).

// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use cohort_coordinator::actor::JobOutcome;
use cohort_coordinator::config::JobPlan;
use cohort_coordinator::server;
use cohort_core::codec::{encode, DType};
use cohort_core::params::ParamLayout;
use cohort_proto::v1 as pb;
use tonic::{Code, Status};

use crate::session_client::Client;

/// The chunk size of every job these tests serve.
pub const MAX_CHUNK_BYTES: usize = 1024;

/// A coordinator serving a job; dropping it stops the server.
pub struct Running {
    pub addr: String,
    pub outcome: tokio::task::JoinHandle<JobOutcome>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn start(plan: JobPlan) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let outcome = tokio::spawn(async move {
        server::run(listener, plan, async {
            let _ = stopped.await;
        })
        .await
        .expect("server ran")
    });
    Running {
        addr,
        outcome,
        _stop: stop,
    }
}

pub fn chunk(tensor_index: u32, offset: u64, data: Vec<u8>) -> pb::UpdateChunk {
    pb::UpdateChunk {
        kind: Some(pb::update_chunk::Kind::Chunk(pb::TensorChunk {
            tensor_index,
            offset,
            data: data.into(),
        })),
    }
}

/// The whole update as well-formed f32 chunks of at most `MAX_CHUNK_BYTES`, in order.
pub fn chunks(layout: &ParamLayout, values: &[f32]) -> Vec<pb::UpdateChunk> {
    let per = MAX_CHUNK_BYTES / 4;
    let mut out = Vec::new();
    for (index, slot) in layout.tensors().iter().enumerate() {
        let mut offset = 0;
        while offset < slot.numel {
            let len = per.min(slot.numel - offset);
            let part = &values[slot.offset + offset..slot.offset + offset + len];
            out.push(chunk(index as u32, offset as u64, encode(DType::F32, part)));
            offset += len;
        }
    }
    out
}

pub async fn push(
    c: &mut Client,
    messages: Vec<pb::UpdateChunk>,
) -> Result<pb::PushUpdateResponse, Status> {
    c.push_update(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
pub fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, needle: &str) {
    match result {
        Ok(ok) => panic!("expected {code:?} ({needle}), got {ok:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{:?} does not mention {needle:?}",
                status.message()
            );
        }
    }
}
