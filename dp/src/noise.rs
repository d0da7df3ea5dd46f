//! Adds exact discrete Gaussian noise to `f32` vectors with OpenDP's
//! `make_gaussian`, spread over OS threads.
//!
//! # How the noise is drawn
//!
//! [`add_gaussian_noise`] never draws a floating-point normal. For a
//! granularity `2^k` ([`NoiseOptions::granularity_log2`]) it runs OpenDP's
//! proven float pipeline (`make_gaussian` over a vector domain of `f32`):
//!
//! 1. each input `x_i` is rounded, exactly, to the nearest multiple of
//!    `2^k` (ties go up), `x_i ≈ n_i 2^k`;
//! 2. `z_i ~ N_Z(0, s^2)`, the discrete Gaussian on the integers, is drawn
//!    with the exact sampler of Canonne, Kamath and Steinke 2020 (rational
//!    arithmetic, OpenSSL's CSPRNG), where `s = ceil(stddev / 2^k)`;
//! 3. `(n_i + z_i) 2^k` is rounded to the nearest `f32`.
//!
//! The noise therefore lives on the lattice `2^k Z` and has standard
//! deviation `s 2^k`, the requested `stddev` rounded up to a multiple of
//! `2^k` ([`NoiseReport::stddev`]; more noise is always safe, and with the
//! default `k` the increase is below `1e-5` relative for `stddev >= 1e-4`).
//! The variance of `N_Z(0, s^2)` is below `s^2`, but only by a relative
//! `2e-7` at `s = 1` (the smallest [`add_gaussian_noise`] allows) and by
//! less than `1e-15` from `s = 2` on.
//!
//! # Sensitivity adjustment for the rounding
//!
//! Step 1 moves each coordinate by at most `2^(k-1)`, so two inputs at L2
//! distance `Δ` (the clip norm `C` for one user's update) can end up
//! further apart on the lattice. For a `d`-dimensional input the worst case
//! is
//!
//! ```text
//! Δ_lattice <= Δ + r,    r = (2^k - 2^-149) sqrt(d)
//! ```
//!
//! where `2^-149` is the spacing of `f32` values near 0 (OpenDP's
//! `get_rounding_distance`; [`rounding_sensitivity`] returns the slightly
//! larger `2^k sqrt(d)`). The release is then `ρ`-zCDP with
//! `ρ = (Δ + r)^2 / (2 stddev^2)` ([`NoiseReport::zcdp_rho`]), i.e. a
//! Gaussian mechanism with noise multiplier `stddev / (Δ + r)` rather than
//! `stddev / Δ` ([`NoiseReport::effective_noise_multiplier`]), and that
//! smaller multiplier is what a privacy ledger should be charged with.
//! (That `ρ` is the guarantee of one release, sampling rate 1, and is a
//! theorem for the discrete Gaussian: Canonne, Kamath and Steinke 2020.
//! Charging `cohort_core::privacy`'s Poisson-subsampled RDP with the same
//! multiplier treats the discrete Gaussian like the continuous one, which
//! this crate does not prove for sampling rates below 1.)
//!
//! With the default `k = -30`, `2^k ≈ 9.3e-10`: for a 1M-parameter update
//! `r ≈ 9.3e-7`, for 100M parameters `r ≈ 9.3e-6`, i.e. at most about
//! `1e-4` of a clip norm `C` of 0.1 and `1e-5` of `C = 1`: negligible, but
//! reported so that callers can account for it exactly.
//!
//! The vector is noised in independent batches (one OpenDP measurement per
//! batch length and thread), each with its own rounding distance
//! `(2^k - 2^-149) sqrt(d_j)`. That changes nothing: by Minkowski's
//! inequality `sqrt(Σ_j (Δ_j + r_j)^2) <= Δ + r` whenever `Σ_j Δ_j^2 <= Δ^2`
//! and `Σ_j d_j = d`, so the batches together are as private as one
//! measurement over the whole vector.
//!
//! # Throughput and the granularity
//!
//! OpenDP's sampler costs roughly 10–20 µs per coordinate in release builds
//! (about half of it in OpenSSL's `RAND_priv_bytes`, which it calls for
//! every few random bits, the rest in exact rational arithmetic), nearly
//! independent of `k` and of the batch size; the `noise-bench` binary
//! measures it. Work is therefore split over [`NoiseOptions::threads`] OS
//! threads, each building its own measurements (OpenDP measurements are not
//! `Send`).

use std::num::NonZeroUsize;

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

/// The default granularity exponent `k` (noise on the lattice `2^k Z`); see
/// the module docs for why `-30`.
pub const DEFAULT_GRANULARITY_LOG2: i32 = -30;

/// The finest granularity OpenDP accepts for `f32` inputs: `2^-149`, the
/// spacing of subnormal `f32` values.
pub const MIN_GRANULARITY_LOG2: i32 = -149;

/// Coordinates per OpenDP invocation. Larger batches do not make the
/// sampler faster (its cost is per coordinate); this only bounds the
/// temporary copies.
const BATCH_LEN: usize = 4096;

/// How [`add_gaussian_noise`] draws its noise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoiseOptions {
    /// OS threads to spread the sampling over (at least 1). Fewer are used
    /// when the input has fewer than `threads` batches of 4096 values.
    pub threads: usize,
    /// `k`: noise is drawn on the lattice `2^k Z` and inputs are rounded to
    /// it. At least [`MIN_GRANULARITY_LOG2`], and `2^k` may not exceed the
    /// standard deviation.
    pub granularity_log2: i32,
}

impl Default for NoiseOptions {
    /// One thread per available core and [`DEFAULT_GRANULARITY_LOG2`].
    fn default() -> Self {
        NoiseOptions {
            threads: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            granularity_log2: DEFAULT_GRANULARITY_LOG2,
        }
    }
}

/// What [`add_gaussian_noise`] did, with the numbers a privacy report
/// needs.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseReport {
    /// Number of coordinates noised.
    pub elements: usize,
    /// The standard deviation asked for.
    pub requested_stddev: f64,
    /// The standard deviation of the noise drawn: `requested_stddev`
    /// rounded up to a multiple of [`Self::granularity`].
    pub stddev: f64,
    /// `k` of the lattice `2^k Z`.
    pub granularity_log2: i32,
    /// `2^k`.
    pub granularity: f64,
    /// `2^k sqrt(elements)`: how much rounding the input to the lattice
    /// can add to its L2 sensitivity (see the module docs).
    pub rounding_sensitivity: f64,
    /// Threads actually used.
    pub threads: usize,
}

impl NoiseReport {
    /// The zCDP parameter `ρ = (Δ + r)^2 / (2 stddev^2)` of this release
    /// for an input of L2 sensitivity `l2_sensitivity` (`Δ`), with `r` the
    /// [`Self::rounding_sensitivity`].
    pub fn zcdp_rho(&self, l2_sensitivity: f64) -> f64 {
        let distance = l2_sensitivity + self.rounding_sensitivity;
        distance * distance / (2.0 * self.stddev * self.stddev)
    }

    /// The noise multiplier to charge a privacy accountant with, for an
    /// input clipped to L2 norm `clip_norm`: `stddev / (clip_norm + r)`.
    pub fn effective_noise_multiplier(&self, clip_norm: f64) -> f64 {
        self.stddev / (clip_norm + self.rounding_sensitivity)
    }
}

/// Why [`add_gaussian_noise`] refused or failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NoiseError {
    #[error("noise standard deviation must be positive and finite, got {value}")]
    Stddev { value: f64 },
    #[error("input value #{index} is {value}; values to noise must be finite")]
    NonFiniteValue { index: usize, value: f32 },
    #[error("the number of noise threads must be at least 1")]
    ZeroThreads,
    #[error(
        "granularity 2^{granularity_log2} is unusable for standard deviation {stddev}: \
         k must be at least {MIN_GRANULARITY_LOG2} and 2^k at most the standard deviation"
    )]
    Granularity { granularity_log2: i32, stddev: f64 },
    #[error("noised value #{index} overflowed f32")]
    Overflow { index: usize },
    #[error("opendp failed while {context}: {variant}: {message}")]
    OpenDp {
        context: &'static str,
        variant: String,
        message: String,
    },
}

impl NoiseError {
    fn opendp(context: &'static str, error: opendp::error::Error) -> NoiseError {
        NoiseError::OpenDp {
            context,
            variant: error.variant.to_string(),
            message: error.message.unwrap_or_default(),
        }
    }
}

/// `2^k sqrt(dimension)`: an upper bound on how much rounding a
/// `dimension`-long `f32` vector to the lattice `2^k Z` can add to its L2
/// sensitivity (OpenDP's exact figure is `(2^k - 2^-149) sqrt(dimension)`).
/// See the module docs.
pub fn rounding_sensitivity(dimension: usize, granularity_log2: i32) -> f64 {
    // sqrt of a usize above 2^53 and the product may round down by an ulp
    // or two; nudge up so the result stays an upper bound.
    let bound = 2f64.powi(granularity_log2) * (dimension as f64).sqrt();
    bound * (1.0 + 4.0 * f64::EPSILON)
}

/// Adds discrete Gaussian noise of standard deviation `stddev` to every
/// coordinate of `values`, in place, on the lattice `2^k Z` with
/// `k = options.granularity_log2` (see the module docs for the exact
/// procedure, the rounded-up standard deviation and the sensitivity
/// adjustment). On error `values` may be partly noised and must be
/// discarded.
pub fn add_gaussian_noise(
    values: &mut [f32],
    stddev: f64,
    options: &NoiseOptions,
) -> Result<NoiseReport, NoiseError> {
    if !(stddev.is_finite() && stddev > 0.0) {
        return Err(NoiseError::Stddev { value: stddev });
    }
    if options.threads == 0 {
        return Err(NoiseError::ZeroThreads);
    }
    let k = options.granularity_log2;
    let granularity = 2f64.powi(k);
    if k < MIN_GRANULARITY_LOG2 || granularity > stddev {
        return Err(NoiseError::Granularity {
            granularity_log2: k,
            stddev,
        });
    }
    // Exact: scaling by a power of two, then rounding up to an integer.
    let lattice_scale = (stddev / granularity).ceil();
    let noise_stddev = lattice_scale * granularity;
    if !noise_stddev.is_finite() {
        return Err(NoiseError::Granularity {
            granularity_log2: k,
            stddev,
        });
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(NoiseError::NonFiniteValue { index, value });
    }

    let batches = values.len().div_ceil(BATCH_LEN);
    let threads = options.threads.min(batches).max(1);
    let part_len = batches.div_ceil(threads) * BATCH_LEN;
    if threads == 1 {
        noise_part(values, 0, noise_stddev, k)?;
    } else {
        std::thread::scope(|scope| {
            let workers: Vec<_> = values
                .chunks_mut(part_len)
                .enumerate()
                .map(|(part, chunk)| {
                    scope.spawn(move || noise_part(chunk, part * part_len, noise_stddev, k))
                })
                .collect();
            // Join all before reporting, so no thread outlives an error.
            let results: Vec<_> = workers
                .into_iter()
                .map(|worker| {
                    worker
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect();
            results.into_iter().collect::<Result<(), _>>()
        })?;
    }

    Ok(NoiseReport {
        elements: values.len(),
        requested_stddev: stddev,
        stddev: noise_stddev,
        granularity_log2: k,
        granularity,
        rounding_sensitivity: rounding_sensitivity(values.len(), k),
        threads,
    })
}

type GaussianMeasurement = opendp::core::Measurement<
    VectorDomain<AtomDomain<f32>>,
    L2Distance<f64>,
    ZeroConcentratedDivergence,
    Vec<f32>,
>;

/// OpenDP's Gaussian mechanism for `len`-long `f32` vectors.
fn build_measurement(
    len: usize,
    noise_stddev: f64,
    k: i32,
) -> Result<GaussianMeasurement, NoiseError> {
    make_gaussian(
        VectorDomain::new(AtomDomain::<f32>::new_non_nan()).with_size(len),
        L2Distance::<f64>::default(),
        noise_stddev,
        Some(k),
    )
    .map_err(|e| NoiseError::opendp("building the gaussian measurement", e))
}

/// Noises `part` (which starts at `offset` in the whole vector) batch by
/// batch on the calling thread.
fn noise_part(
    part: &mut [f32],
    offset: usize,
    noise_stddev: f64,
    k: i32,
) -> Result<(), NoiseError> {
    let mut full_batch: Option<GaussianMeasurement> = None;
    let mut batch_input = Vec::with_capacity(BATCH_LEN.min(part.len()));
    for (batch_index, batch) in part.chunks_mut(BATCH_LEN).enumerate() {
        let short_batch;
        let measurement = if batch.len() == BATCH_LEN {
            match &mut full_batch {
                Some(m) => &*m,
                slot @ None => &*slot.insert(build_measurement(BATCH_LEN, noise_stddev, k)?),
            }
        } else {
            short_batch = build_measurement(batch.len(), noise_stddev, k)?;
            &short_batch
        };
        batch_input.clear();
        batch_input.extend_from_slice(batch);
        let noised = measurement
            .invoke(&batch_input)
            .map_err(|e| NoiseError::opendp("sampling noise", e))?;
        if noised.len() != batch.len() {
            return Err(NoiseError::OpenDp {
                context: "sampling noise",
                variant: "length mismatch".to_owned(),
                message: format!("{} values in, {} out", batch.len(), noised.len()),
            });
        }
        for (i, (slot, value)) in batch.iter_mut().zip(noised).enumerate() {
            if !value.is_finite() {
                return Err(NoiseError::Overflow {
                    index: offset + batch_index * BATCH_LEN + i,
                });
            }
            *slot = value;
        }
    }
    Ok(())
}
