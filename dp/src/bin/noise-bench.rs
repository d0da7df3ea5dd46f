//! Measures the throughput of `add_gaussian_noise` by vector size, thread
//! count and granularity, and prints a Markdown table.
//!
//! `cargo run --release -p cohort-dp --bin noise-bench [-- --quick]`
//! (`--quick` skips the 1M-element rows).

use std::time::Instant;

use cohort_dp::{add_gaussian_noise, NoiseError, NoiseOptions};

/// Noise standard deviation used throughout (a noise multiplier of 1 on a
/// clip norm of 0.01); the sampler's cost barely depends on it.
const STDDEV: f64 = 0.01;

const GRANULARITIES_LOG2: [i32; 3] = [-16, -30, -50];

/// Deterministic inputs in [-1e-3, 1e-3], off the lattice, so that the
/// rounding step does real work.
fn update(len: usize) -> Vec<f32> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (unit - 0.5) * 2e-3
        })
        .collect()
}

fn main() -> Result<(), NoiseError> {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let sizes: &[usize] = if quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    let cores = NoiseOptions::default().threads;
    println!("stddev {STDDEV}, {cores} cores available");
    println!();
    println!("| elements | threads | k | wall s | elements/s | µs/element/thread |");
    println!("|---:|---:|---:|---:|---:|---:|");

    // Warm up OpenSSL's DRBG and the allocator.
    let mut warm = update(4096);
    add_gaussian_noise(&mut warm, STDDEV, &NoiseOptions::default())?;

    for &len in sizes {
        for threads in [1, 2] {
            for granularity_log2 in GRANULARITIES_LOG2 {
                let options = NoiseOptions {
                    threads,
                    granularity_log2,
                };
                let mut values = update(len);
                let start = Instant::now();
                let report = add_gaussian_noise(&mut values, STDDEV, &options)?;
                let wall = start.elapsed().as_secs_f64();
                std::hint::black_box(&values);
                let rate = len as f64 / wall;
                let per_element = wall * 1e6 * report.threads as f64 / len as f64;
                println!(
                    "| {len} | {} | {granularity_log2} | {wall:.2} | {rate:.0} | {per_element:.1} |",
                    report.threads
                );
            }
        }
    }
    Ok(())
}
