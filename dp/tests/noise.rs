//! Tests of `add_gaussian_noise`: the noise's moments, the error of a
//! noised aggregate, every refused input, the threaded path, and the
//! rounding-sensitivity formula against OpenDP's own privacy map.
//!
//! OpenDP draws from OpenSSL's CSPRNG, which cannot be seeded, so the
//! statistical checks are not reproducible draws: each allows at least 5
//! standard errors of its estimator. For an estimator that is close to
//! normal (all of these are averages of thousands of independent terms) a
//! 5-standard-error miss has probability 2 Φ(-5) ≈ 5.7e-7, so with the
//! dozen such checks here a false failure is expected about once in
//! 100 000 runs.

use cohort_dp::{
    add_gaussian_noise, rounding_sensitivity, NoiseError, NoiseOptions, NoiseReport,
    DEFAULT_GRANULARITY_LOG2, MIN_GRANULARITY_LOG2,
};

/// Standard errors allowed by every statistical check (see the file docs).
const STANDARD_ERRORS: f64 = 5.0;

/// Samples per distribution check. With n draws of a normal variable the
/// sample standard deviation has standard error σ / sqrt(2 n) (0.35% of σ
/// here, so 5 standard errors is a 1.8% band) and the mean σ / sqrt(n).
const SAMPLES: usize = 40_000;

fn options(threads: usize) -> NoiseOptions {
    NoiseOptions {
        threads,
        granularity_log2: DEFAULT_GRANULARITY_LOG2,
    }
}

/// Mean and sample standard deviation (divisor n - 1).
fn mean_and_std(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let values: Vec<f64> = values.into_iter().collect();
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

/// Asserts that `n` draws of noise with standard deviation `stddev` have
/// a plausible mean and standard deviation.
fn assert_moments(label: &str, noise: &[f64], stddev: f64) {
    let n = noise.len() as f64;
    let (mean, std) = mean_and_std(noise.iter().copied());
    let mean_tolerance = STANDARD_ERRORS * stddev / n.sqrt();
    let std_tolerance = STANDARD_ERRORS * stddev / (2.0 * n).sqrt();
    assert!(
        mean.abs() <= mean_tolerance,
        "{label}: mean {mean} of {n} draws, allowed ±{mean_tolerance}"
    );
    assert!(
        (std - stddev).abs() <= std_tolerance,
        "{label}: std {std} of {n} draws, expected {stddev} ± {std_tolerance}"
    );
}

/// Deterministic pseudo-random values in [-1, 1) (a 64-bit LCG).
fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn noise_added_to_zeros_has_zero_mean_and_the_requested_stddev() {
    for stddev in [0.5, 3e-4] {
        let mut values = vec![0.0f32; SAMPLES];
        let report = add_gaussian_noise(&mut values, stddev, &options(2)).unwrap();
        // The lattice rounds the standard deviation up by less than 2^-30.
        assert!(report.stddev >= stddev && report.stddev - stddev <= report.granularity);
        assert_eq!(report.elements, SAMPLES);
        let noise: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        assert_moments(&format!("stddev {stddev}"), &noise, stddev);
    }
}

#[test]
fn noise_on_values_off_the_lattice_has_the_requested_stddev() {
    // A coarse lattice (2^-10) so that rounding the inputs is visible: the
    // residual is noise plus a rounding error of at most 2^-11 per value,
    // which shifts the mean by at most 2^-11 and the std by at most
    // 2^-11 as well; both are added to the tolerances.
    let stddev = 0.25;
    let granularity_log2 = -10;
    let input = pseudo_random(SAMPLES, 7);
    let mut values = input.clone();
    let report = add_gaussian_noise(
        &mut values,
        stddev,
        &NoiseOptions {
            threads: 2,
            granularity_log2,
        },
    )
    .unwrap();
    assert_eq!(report.stddev, stddev, "0.25 is on the lattice 2^-10 Z");
    let residual: Vec<f64> = values
        .iter()
        .zip(&input)
        .map(|(&noised, &x)| f64::from(noised) - f64::from(x))
        .collect();
    let rounding = 2f64.powi(granularity_log2 - 1);
    let n = SAMPLES as f64;
    let (mean, std) = mean_and_std(residual.iter().copied());
    assert!(mean.abs() <= STANDARD_ERRORS * stddev / n.sqrt() + rounding);
    assert!((std - stddev).abs() <= STANDARD_ERRORS * stddev / (2.0 * n).sqrt() + rounding);
    // Every output is a lattice point (the noise never leaves 2^k Z, and
    // these values are exactly representable in f32).
    let scale = 2f32.powi(-granularity_log2);
    assert!(values.iter().all(|v| (v * scale).fract() == 0.0));
}

/// Central DP: n clipped updates are summed, the sum gets noise of
/// standard deviation σ C, and the average is sum / n. Its error against
/// the exact average has RMS σ C / n per coordinate.
#[test]
fn noised_average_of_clipped_updates_has_rms_error_sigma_c_over_n() {
    let dimension = 10_000;
    let clip_norm = 0.5f64;
    let noise_multiplier = 1.0;
    for clients in [10usize, 100] {
        let mut sum = vec![0.0f32; dimension];
        for client in 0..clients {
            let mut update = pseudo_random(dimension, client as u64 + 1);
            let norm = update
                .iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt();
            let factor = (clip_norm / norm).min(1.0) as f32;
            for (total, value) in sum.iter_mut().zip(&mut update) {
                *total += *value * factor;
            }
        }
        let mut noised = sum.clone();
        let report =
            add_gaussian_noise(&mut noised, noise_multiplier * clip_norm, &options(2)).unwrap();
        let n = clients as f64;
        let error_sq: f64 = noised
            .iter()
            .zip(&sum)
            .map(|(&noisy, &exact)| ((f64::from(noisy) - f64::from(exact)) / n).powi(2))
            .sum();
        let rms = (error_sq / dimension as f64).sqrt();
        let expected = noise_multiplier * clip_norm / n;
        // The RMS of d normal errors has standard error expected / sqrt(2 d);
        // lattice rounding (2^-31) and f32 rounding of the sums (about
        // 1e-7 relative) are far below that.
        let tolerance = STANDARD_ERRORS * expected / (2.0 * dimension as f64).sqrt();
        assert!(
            (rms - expected).abs() <= tolerance,
            "{clients} clients: RMS error {rms}, expected {expected} ± {tolerance}"
        );
        assert!(report.stddev - noise_multiplier * clip_norm <= report.granularity);
    }
}

#[test]
fn threaded_noise_matches_one_thread_and_touches_every_element() {
    // 5 full batches of 4096 plus a short one, so that threads get
    // unequal parts and the last part is short.
    let len = 5 * 4096 + 1234;
    let stddev = 1.0;
    let mut draws = Vec::new();
    for threads in [1, 4] {
        let mut values = vec![0.0f32; len];
        let report = add_gaussian_noise(&mut values, stddev, &options(threads)).unwrap();
        assert_eq!(report.threads, threads);
        // A coordinate stays exactly 0 only if its noise is 0, which has
        // probability about 1 / (sqrt(2 π) 2^30) ≈ 4e-10 per coordinate.
        if let Some(index) = values.iter().position(|&v| v == 0.0) {
            panic!("{threads} threads: coordinate {index} got no noise");
        }
        let noise: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        assert_moments(&format!("{threads} threads"), &noise, stddev);
        draws.push(mean_and_std(noise).1);
    }
    // The two sample stds differ by a normal variable with standard error
    // stddev * sqrt(2 / (2 len)).
    let tolerance = STANDARD_ERRORS * stddev * (1.0 / len as f64).sqrt();
    assert!(
        (draws[0] - draws[1]).abs() <= tolerance,
        "std with 1 thread {} vs 4 threads {}, allowed ±{tolerance}",
        draws[0],
        draws[1]
    );
}

#[test]
fn more_threads_than_batches_and_tiny_inputs_are_fine() {
    for len in [0usize, 1, 4095, 4096, 4097] {
        let mut values = vec![1.0f32; len];
        let report = add_gaussian_noise(&mut values, 1.0, &options(64)).unwrap();
        assert_eq!(report.elements, len);
        assert_eq!(report.threads, len.div_ceil(4096).max(1));
        assert!(values.iter().all(|&v| v.is_finite() && v != 1.0) || len == 0);
    }
}

#[test]
fn every_bad_input_gives_its_error() {
    let mut values = vec![0.5f32; 8];
    for stddev in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let error = add_gaussian_noise(&mut values, stddev, &options(1)).unwrap_err();
        assert!(
            matches!(error, NoiseError::Stddev { value } if value.to_bits() == stddev.to_bits()),
            "stddev {stddev}: {error:?}"
        );
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut with_bad = vec![0.5f32; 8];
        with_bad[5] = bad;
        let error = add_gaussian_noise(&mut with_bad, 1.0, &options(1)).unwrap_err();
        assert!(
            matches!(error, NoiseError::NonFiniteValue { index: 5, value } if value.to_bits() == bad.to_bits()),
            "{error:?}"
        );
        assert_eq!(with_bad[0], 0.5, "refused inputs are left untouched");
    }
    assert_eq!(
        add_gaussian_noise(&mut values, 1.0, &options(0)),
        Err(NoiseError::ZeroThreads)
    );
    for (stddev, granularity_log2) in [
        (1.0, MIN_GRANULARITY_LOG2 - 1),
        (1.0, i32::MIN),
        // 2^-9 > 1e-3: the lattice is coarser than the noise.
        (1e-3, -9),
        (1.0, 1),
        (1.0, i32::MAX),
        // stddev / 2^-149 overflows f64.
        (f64::MAX, MIN_GRANULARITY_LOG2),
    ] {
        let options = NoiseOptions {
            threads: 1,
            granularity_log2,
        };
        assert_eq!(
            add_gaussian_noise(&mut values, stddev, &options),
            Err(NoiseError::Granularity {
                granularity_log2,
                stddev
            }),
        );
    }
    assert_eq!(values, vec![0.5f32; 8], "refused inputs are left untouched");

    // Noise of standard deviation 1e40 on f32::MAX leaves f32 in all but
    // about 3% of draws; all 64 staying finite has probability ~1e-100.
    let mut huge = vec![f32::MAX; 64];
    let error = add_gaussian_noise(
        &mut huge,
        1e40,
        &NoiseOptions {
            threads: 1,
            granularity_log2: 100,
        },
    )
    .unwrap_err();
    assert!(
        matches!(error, NoiseError::Overflow { index } if index < 64),
        "{error:?}"
    );
}

#[test]
fn opendp_failures_are_wrapped_with_context() {
    let error = NoiseError::OpenDp {
        context: "sampling noise",
        variant: "FailedFunction".to_owned(),
        message: "OpenSSL error".to_owned(),
    };
    assert_eq!(
        error.to_string(),
        "opendp failed while sampling noise: FailedFunction: OpenSSL error"
    );
}

/// Our ρ for a clip norm C, with the rounding sensitivity 2^k sqrt(d),
/// matches the ρ of OpenDP's own privacy map for the measurement we run
/// (which adds (2^k - 2^-149) sqrt(d)), and is never below it.
#[test]
fn zcdp_rho_matches_the_opendp_privacy_map() {
    use opendp::domains::{AtomDomain, VectorDomain};
    use opendp::measurements::make_gaussian;
    use opendp::measures::ZeroConcentratedDivergence;
    use opendp::metrics::L2Distance;

    for dimension in [1usize, 4096, 1_000_000, 100_000_000] {
        for granularity_log2 in [-30, -16, -8] {
            for (clip_norm, stddev) in [(0.1, 0.1), (1.0, 0.5), (0.01, 0.03)] {
                let granularity = 2f64.powi(granularity_log2);
                let report = NoiseReport {
                    elements: dimension,
                    requested_stddev: stddev,
                    stddev: (stddev / granularity).ceil() * granularity,
                    granularity_log2,
                    granularity,
                    rounding_sensitivity: rounding_sensitivity(dimension, granularity_log2),
                    threads: 1,
                };
                let measurement = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    VectorDomain::new(AtomDomain::<f32>::new_non_nan()).with_size(dimension),
                    L2Distance::<f64>::default(),
                    report.stddev,
                    Some(granularity_log2),
                )
                .unwrap();
                let opendp_rho = measurement.map(&clip_norm).unwrap();
                let ours = report.zcdp_rho(clip_norm);
                let relative = ours / opendp_rho - 1.0;
                assert!(
                    (-1e-12..=1e-12).contains(&relative),
                    "d {dimension}, k {granularity_log2}, C {clip_norm}: \
                     ours {ours}, opendp {opendp_rho}"
                );
                let multiplier = report.effective_noise_multiplier(clip_norm);
                let rho_from_multiplier = 1.0 / (2.0 * multiplier * multiplier);
                assert!((rho_from_multiplier / ours - 1.0).abs() < 1e-12);
            }
        }
    }
    // With the default k the adjustment is negligible next to C ~ 0.1 even
    // for 100M parameters.
    let r = rounding_sensitivity(100_000_000, DEFAULT_GRANULARITY_LOG2);
    assert!(r < 1e-5 && r / 0.1 < 1e-4, "{r}");
}
