//! Aggregation throughput: folding a push into the running sum, beside plain
//! memory-bandwidth baselines measured in the same run, and the chunk decode.
//!
//! Groups (criterion, `Throughput::Bytes` = bytes of the pushed update):
//! - `aggregate/fold_push`: `Accumulator` begin → fold 256 KiB chunks → finish
//!   over P = 10M f32 (reads update + sum, writes undo + sum).
//! - `aggregate/add_baseline`: `sum[i] += x[i]` in the same chunks, no undo copy.
//! - `aggregate/memcpy`: `copy_from_slice` of the same bytes.
//! - `decode/*`: `codec::decode_into` of one 256 KiB wire chunk (f32, bf16), and
//!   the service's per-chunk path (fresh `Vec`, decode, `FiniteValues::new`).
//!
//! After criterion, a short manual timing loop (best of a few pushes) prints
//! fold GB/s beside the baseline and their ratio.
//!
//! `cargo bench -p cohort-coordinator --bench aggregation -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use cohort_core::aggregate::Accumulator;
use cohort_core::codec::{decode_into, encode, DType};
use cohort_core::engine::FiniteValues;
use cohort_core::rng::SplitMix64;
use criterion::{BenchmarkId, Criterion, Throughput};

/// Parameters of the model (f32).
const P: usize = 10_000_000;
/// Bytes per pushed chunk, as the coordinator's default `max_chunk_bytes`.
const CHUNK_BYTES: usize = 256 * 1024;
const CHUNK_ELEMS: usize = CHUNK_BYTES / 4;

fn random_update(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * 1e-3) as f32)
        .collect()
}

/// One whole push through the accumulator, as the engine folds it.
fn fold_push(acc: &mut Accumulator, update: &[f32]) {
    acc.begin_push().expect("no push open");
    for (i, chunk) in update.chunks(CHUNK_ELEMS).enumerate() {
        acc.fold(i * CHUNK_ELEMS, chunk).expect("chunk in order");
    }
    acc.finish_push().expect("push complete");
}

/// The same additions without validation or undo copy.
fn add_baseline(sum: &mut [f32], update: &[f32]) {
    for (s, x) in sum.chunks_mut(CHUNK_ELEMS).zip(update.chunks(CHUNK_ELEMS)) {
        for (s, x) in s.iter_mut().zip(x) {
            *s += x;
        }
    }
}

/// What `service::receive_push` does per chunk before the engine folds it.
fn service_decode(dtype: DType, wire: &[u8]) -> FiniteValues {
    let mut values = Vec::new();
    decode_into(dtype, wire, &mut values).expect("finite payload");
    FiniteValues::new(values).expect("finite values")
}

struct Buffers {
    update: Vec<f32>,
    acc: Accumulator,
    sum: Vec<f32>,
    dst: Vec<f32>,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            update: random_update(P, 7),
            acc: Accumulator::new(P),
            sum: vec![0.0; P],
            dst: vec![0.0; P],
        }
    }
}

fn bench_aggregate(c: &mut Criterion, b: &mut Buffers) {
    let mut group = c.benchmark_group("aggregate");
    group.throughput(Throughput::Bytes((P * 4) as u64));
    group.sample_size(20);
    group.bench_function(BenchmarkId::new("fold_push", "10M_f32"), |bench| {
        bench.iter(|| fold_push(&mut b.acc, black_box(&b.update)))
    });
    group.bench_function(BenchmarkId::new("add_baseline", "10M_f32"), |bench| {
        bench.iter(|| add_baseline(&mut b.sum, black_box(&b.update)))
    });
    group.bench_function(BenchmarkId::new("memcpy", "10M_f32"), |bench| {
        bench.iter(|| b.dst.copy_from_slice(black_box(&b.update)))
    });
    group.finish();
    black_box((b.acc.sum()[0], b.sum[0], b.dst[0]));
}

fn bench_decode(c: &mut Criterion, update: &[f32]) {
    let f32_wire = encode(DType::F32, &update[..CHUNK_ELEMS]);
    let bf16_wire = encode(DType::Bf16, &update[..CHUNK_BYTES / 2]);
    assert_eq!(f32_wire.len(), CHUNK_BYTES);
    assert_eq!(bf16_wire.len(), CHUNK_BYTES);
    let mut group = c.benchmark_group("decode");
    // Wire bytes: a 256 KiB chunk holds 64 Ki f32 or 128 Ki bf16 values.
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    let mut out = Vec::with_capacity(CHUNK_BYTES / 2);
    for (name, dtype, wire) in [
        ("f32", DType::F32, &f32_wire),
        ("bf16", DType::Bf16, &bf16_wire),
    ] {
        group.bench_function(BenchmarkId::new("decode_into", name), |bench| {
            bench.iter(|| {
                decode_into(dtype, black_box(wire), &mut out).expect("finite payload");
                black_box(out.len())
            })
        });
        group.bench_function(BenchmarkId::new("service_path", name), |bench| {
            bench.iter(|| service_decode(dtype, black_box(wire)))
        });
    }
    group.finish();
}

/// Best time of `reps` runs of `f`, after one warm-up run.
fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn print_ratio_table(b: &mut Buffers, reps: usize) {
    let bytes = P * 4;
    let fold = best_of(reps, || fold_push(&mut b.acc, black_box(&b.update)));
    let add = best_of(reps, || add_baseline(&mut b.sum, black_box(&b.update)));
    let copy = best_of(reps, || b.dst.copy_from_slice(black_box(&b.update)));
    let wire = encode(DType::F32, &b.update[..CHUNK_ELEMS]);
    let decode_reps = P / CHUNK_ELEMS;
    let decode = best_of(reps, || {
        for _ in 0..decode_reps {
            black_box(service_decode(DType::F32, black_box(&wire)));
        }
    });
    black_box((b.acc.sum()[0], b.sum[0], b.dst[0]));
    let (fold, add, copy) = (gbps(bytes, fold), gbps(bytes, add), gbps(bytes, copy));
    let decode = gbps(decode_reps * CHUNK_BYTES, decode);
    println!();
    println!("Aggregation of one push, P = {P} f32 ({} MB), 256 KiB chunks, best of {reps} (GB/s of update bytes)", bytes / 1_000_000);
    println!(
        "{:<34} {:>8} {:>14} {:>8}",
        "path", "GB/s", "baseline GB/s", "ratio"
    );
    println!(
        "{:<34} {:>8.2} {:>14.2} {:>8.2}",
        "fold (begin/fold/finish, undo)",
        fold,
        add,
        fold / add
    );
    println!(
        "{:<34} {:>8.2} {:>14.2} {:>8.2}",
        "fold vs memcpy",
        fold,
        copy,
        fold / copy
    );
    println!(
        "{:<34} {:>8.2} {:>14.2} {:>8.2}",
        "sum += x (no undo) vs memcpy",
        add,
        copy,
        add / copy
    );
    println!(
        "{:<34} {:>8.2} {:>14.2} {:>8.2}",
        "service decode f32 vs fold",
        decode,
        fold,
        decode / fold
    );
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let mut buffers = Buffers::new();
    let mut criterion = Criterion::default().configure_from_args();
    bench_aggregate(&mut criterion, &mut buffers);
    bench_decode(&mut criterion, &buffers.update);
    criterion.final_summary();
    print_ratio_table(&mut buffers, if quick { 1 } else { 10 });
}
