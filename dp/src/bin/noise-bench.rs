//! Measures the throughput of `add_gaussian_noise` by vector size, thread
//! count and granularity, and prints a Markdown table.
//!
//! `cargo run --release -p cohort-dp --bin noise-bench [-- OPTIONS]`
//!
//! Options (lists are comma-separated): `--sizes 10000,100000,1000000`,
//! `--threads 1,2`, `--k -16,-30,-50` (the granularity exponents), and
//! `--quick` for sizes 10000,100000 only.

use std::time::Instant;

use cohort_dp::{add_gaussian_noise, NoiseError, NoiseOptions};

/// Noise standard deviation used throughout (a noise multiplier of 1 on a
/// clip norm of 0.01); the sampler's cost barely depends on it.
const STDDEV: f64 = 0.01;

/// The value of `--name` in `args` parsed as a comma-separated list, or
/// `default`.
fn list_arg<T: std::str::FromStr + Clone>(args: &[String], name: &str, default: &[T]) -> Vec<T> {
    let Some(position) = args.iter().position(|arg| arg == name) else {
        return default.to_vec();
    };
    let Some(value) = args.get(position + 1) else {
        eprintln!("{name} needs a comma-separated list");
        std::process::exit(2);
    };
    value
        .split(',')
        .map(|item| {
            item.trim().parse().unwrap_or_else(|_| {
                eprintln!("{name}: cannot parse {item:?}");
                std::process::exit(2);
            })
        })
        .collect()
}

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
    let args: Vec<String> = std::env::args().collect();
    let default_sizes: &[usize] = if args.iter().any(|arg| arg == "--quick") {
        &[10_000, 100_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    let sizes = list_arg(&args, "--sizes", default_sizes);
    let thread_counts = list_arg(&args, "--threads", &[1usize, 2]);
    let granularities_log2 = list_arg(&args, "--k", &[-16i32, -30, -50]);
    let cores = NoiseOptions::default().threads;
    println!("stddev {STDDEV}, {cores} cores available");
    println!();
    println!("| elements | threads | k | wall s | elements/s | µs/element/thread |");
    println!("|---:|---:|---:|---:|---:|---:|");

    // Warm up OpenSSL's DRBG and the allocator.
    let mut warm = update(4096);
    add_gaussian_noise(&mut warm, STDDEV, &NoiseOptions::default())?;

    for &len in &sizes {
        for &threads in &thread_counts {
            for &granularity_log2 in &granularities_log2 {
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
