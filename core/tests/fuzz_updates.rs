//! Property-based fuzzing of update decoding and validation: arbitrary bytes
//! and arbitrary chunk sequences never panic, never fold anything invalid, and
//! never disturb the round — a clean push afterwards commits exactly.

use std::time::{Duration, Instant};

use cohort_core::codec::{decode_into, encode, DType, FiniteValues};
use cohort_core::engine::{
    EngineConfig, PushHeader, PushStats, RoundEngine, ShardInfo, Task, WorkerInfo,
};
use cohort_core::ids::{RoundId, ShardId, Version, WorkerId};
use cohort_core::model::{Init, TensorSpec};
use cohort_core::outer::OuterOptimizerConfig;
use proptest::prelude::*;

fn engine() -> RoundEngine {
    let tensors = vec![
        TensorSpec {
            name: "a".into(),
            shape: vec![3, 5],
            init: Init::Zeros,
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![7],
            init: Init::Zeros,
        },
        TensorSpec {
            name: "c".into(),
            shape: vec![2, 2, 2],
            init: Init::Zeros,
        },
    ];
    let config = EngineConfig {
        tensors,
        update_dtype: DType::F32,
        lease: Duration::from_secs(60),
        round_deadline: Duration::from_secs(600),
        min_workers: 2,
        min_participants: 2,
        max_workers_per_round: 0,
        shards_per_worker: 1,
        max_rounds: 1,
        max_epochs: 0,
        eval_every: 0,
        outer: OuterOptimizerConfig::Average,
        max_chunk_elems: 6,
        seed: 1,
        federated: None,
    };
    let shards = (0..4)
        .map(|i| ShardInfo {
            id: ShardId(i),
            file_name: format!("s{i}"),
            num_tokens: 9,
        })
        .collect();
    RoundEngine::new(
        config,
        shards,
        vec![],
        (0..30).map(|i| i as f32 * 0.5).collect(),
    )
    .unwrap()
}

fn header(round: RoundId) -> PushHeader {
    PushHeader {
        round,
        base_version: Version(0),
        dtype: DType::F32,
        stats: PushStats {
            mean_loss: 1.0,
            tokens: 8,
            train_seconds: 0.1,
            eval_loss: None,
            eval_tokens: 0,
            eval_accuracy: None,
        },
    }
}

/// Pushes `values` (30 of them) as well-formed chunks of at most 6.
fn clean_push(e: &mut RoundEngine, worker: WorkerId, round: RoundId, values: &[f32], now: Instant) {
    e.begin_push(worker, header(round), now).unwrap();
    let sizes = [15usize, 7, 8];
    let mut flat = 0;
    for (tensor, &numel) in sizes.iter().enumerate() {
        let mut offset = 0;
        while offset < numel {
            let len = (numel - offset).min(6);
            let chunk = FiniteValues::new(values[flat..flat + len].to_vec()).unwrap();
            e.push_chunk(worker, tensor, offset, &chunk, len * 4)
                .unwrap();
            offset += len;
            flat += len;
        }
    }
    e.finish_push(worker, now).unwrap();
}

#[derive(Debug, Clone)]
enum Garbage {
    Chunk {
        tensor: usize,
        offset: usize,
        bytes: Vec<u8>,
    },
    Finish,
    Abort,
    Begin,
}

fn garbage() -> impl Strategy<Value = Garbage> {
    prop_oneof![
        4 => (0usize..5, 0usize..20, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(tensor, offset, bytes)| Garbage::Chunk { tensor, offset, bytes }),
        1 => Just(Garbage::Finish),
        1 => Just(Garbage::Abort),
        1 => Just(Garbage::Begin),
    ]
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_yields_only_finite_values(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        bf16 in any::<bool>(),
    ) {
        let dtype = if bf16 { DType::Bf16 } else { DType::F32 };
        let mut out = Vec::new();
        if decode_into(dtype, &bytes, &mut out).is_ok() {
            prop_assert_eq!(out.len() * dtype.size_bytes(), bytes.len());
            prop_assert!(out.iter().all(|x| x.is_finite()));
            // What decodes re-encodes to the same bytes (f32) or a bf16 of equal value.
            let again = encode(dtype, &out);
            prop_assert_eq!(again, bytes);
        }
    }

    /// Whatever worker A sends, the round ends with exactly init - mean(clean
    /// updates): nothing A sent that was invalid or incomplete was kept.
    #[test]
    fn garbage_from_one_worker_never_reaches_the_aggregate(
        ops in prop::collection::vec(garbage(), 0..40),
        clean_a in prop::collection::vec(-1.0f32..1.0, 30),
        clean_b in prop::collection::vec(-1.0f32..1.0, 30),
    ) {
        let now = Instant::now();
        let mut e = engine();
        let (a, _) = e.join(WorkerInfo::default(), now);
        let (b, _) = e.join(WorkerInfo::default(), now);
        let round = match e.next_task(a, now).unwrap() {
            Task::Train { round, .. } => round,
            other => panic!("{other:?}"),
        };
        let b_trains = matches!(e.next_task(b, now).unwrap(), Task::Train { .. });
        prop_assert!(b_trains);
        let initial = e.global_params().as_slice().to_vec();
        for op in ops {
            // Every call may fail; none may panic.
            match op {
                Garbage::Begin => { let _ = e.begin_push(a, header(round), now); }
                Garbage::Finish => { let _ = e.finish_push(a, now); }
                Garbage::Abort => e.abort_push(a, &cohort_core::engine::EngineError::StreamFailed("test".into())),
                Garbage::Chunk { tensor, offset, bytes } => {
                    let mut values = Vec::new();
                    if decode_into(DType::F32, &bytes, &mut values).is_ok() {
                        let values = FiniteValues::new(values).unwrap();
                        let _ = e.push_chunk(a, tensor, offset, &values, bytes.len());
                    }
                }
            }
            prop_assert_eq!(e.version(), Version(0), "nothing commits before b pushes");
        }
        // Whatever state A left, a clean exchange now commits exactly.
        e.abort_push(a, &cohort_core::engine::EngineError::StreamFailed("test".into()));
        let a_already_pushed = matches!(
            e.begin_push(a, header(round), now),
            Err(cohort_core::engine::EngineError::AlreadyPushed { .. })
        );
        e.abort_push(a, &cohort_core::engine::EngineError::StreamFailed("test".into()));
        prop_assume!(!a_already_pushed, "random ops formed a complete valid push");
        clean_push(&mut e, a, round, &clean_a, now);
        clean_push(&mut e, b, round, &clean_b, now);
        prop_assert_eq!(e.version(), Version(1));
        let expected: Vec<f32> =
            (0..30).map(|i| initial[i] - (0.0 + clean_a[i] + clean_b[i]) * 0.5).collect();
        prop_assert_eq!(e.global_params().as_slice(), expected.as_slice());
    }
}

#[test]
fn a_push_from_a_worker_that_never_joined_is_refused() {
    let now = Instant::now();
    let mut e = engine();
    let stranger = WorkerId(42);
    assert!(e.begin_push(stranger, header(RoundId(1)), now).is_err());
    let values = FiniteValues::new(vec![1.0]).unwrap();
    assert!(e.push_chunk(stranger, 0, 0, &values, 4).is_err());
    assert!(e.finish_push(stranger, now).is_err());
}
