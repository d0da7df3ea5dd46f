//! Exact discrete Gaussian noise for model updates, drawn with OpenDP.
//!
//! The federated client worker noises its clipped update with
//! [`add_gaussian_noise`] (local DP), and the coordinator noises a clipped
//! sum with it in central-DP mode. The privacy accounting itself (RDP of
//! the subsampled Gaussian, the budget ledger) lives in
//! `cohort_core::privacy`; this crate only draws the noise and says how
//! much the lattice rounding adds to the sensitivity.
//!
//! Modules:
//! - [`noise`]: [`add_gaussian_noise`], its options, report and errors, and
//!   the granularity / rounding-sensitivity formula.

pub mod noise;

pub use noise::{
    add_gaussian_noise, rounding_sensitivity, NoiseError, NoiseOptions, NoiseReport,
    DEFAULT_GRANULARITY_LOG2, MIN_GRANULARITY_LOG2,
};
