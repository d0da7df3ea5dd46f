//! L2 clipping of a whole update, and the largest norm an honest client's
//! clipped-and-noised update can have.
//!
//! A client clips its update Δ (all tensors together, as one vector) to norm
//! at most C, then may add Gaussian noise z ~ N(0, s² I_d). The coordinator
//! cannot see Δ and z apart, but it can bound their sum: the Euclidean norm
//! is 1-Lipschitz, so by Gaussian concentration (e.g. Vershynin,
//! *High-Dimensional Probability*, Thm. 5.2.2 with E‖z‖ ≤ s√d)
//!
//! ```text
//!     P(‖z‖ ≥ s (√d + t)) ≤ exp(−t² / 2).
//! ```
//!
//! and, for ‖Δ‖ ≤ C, the cross term ⟨Δ, z⟩ ~ N(0, s²‖Δ‖²) exceeds s C t with
//! probability at most exp(−t² / 2). Since
//! ‖Δ + z‖² = ‖Δ‖² + 2⟨Δ, z⟩ + ‖z‖², an honest update satisfies
//!
//! ```text
//!     ‖Δ + z‖ ≤ sqrt(C² + 2 s C t + s² (√d + t)²)
//! ```
//!
//! except with probability at most 2·exp(−t² / 2). With t = [`NOISE_TAIL_T`]
//! = 12 that is 2e^−72 ≈ 1·10^−31 per update. An update above the bound
//! (times 1 + [`ROUNDING_SLACK`] for f32 rounding) was not produced by
//! clipping plus the advertised noise, and is refused.

/// The tail parameter `t` of the noise-norm bound (see the module docs).
pub const NOISE_TAIL_T: f64 = 12.0;

/// Relative slack for f32 rounding in the client's clip and encode.
pub const ROUNDING_SLACK: f64 = 1e-4;

/// The lattice the clients' exact noise sampler works on (cohort-dp's
/// default granularity 2^-30): it rounds each value to a multiple of it (at
/// most half a step each, so ‖·‖ moves by at most 2^-31 √d) and rounds the
/// standard deviation up to a multiple of it. The bound allows both.
pub const NOISE_LATTICE: f64 = 1.0 / (1u64 << 30) as f64;

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    sum_of_squares(values).sqrt()
}

/// Σ v², accumulated in f64 (chunks of an update add up exactly enough).
pub fn sum_of_squares(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// What clipping did to an update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clipped {
    /// Norm before clipping.
    pub norm: f64,
    /// The factor the update was multiplied by (1 when it was within bound).
    pub scale: f64,
}

/// Scales `values` so that their L2 norm is at most `clip_norm`
/// (`min(1, C / ‖v‖)`, as DP-SGD and DP-FedAvg do). `clip_norm` must be
/// positive and finite.
pub fn clip_l2(values: &mut [f32], clip_norm: f64) -> Clipped {
    assert!(
        clip_norm.is_finite() && clip_norm > 0.0,
        "clip norm must be positive and finite, got {clip_norm}"
    );
    let norm = l2_norm(values);
    if norm <= clip_norm {
        return Clipped { norm, scale: 1.0 };
    }
    let scale = clip_norm / norm;
    let factor = scale as f32;
    for v in values.iter_mut() {
        *v *= factor;
    }
    Clipped { norm, scale }
}

/// The largest norm an honest update of `dims` coordinates can have when it
/// was clipped to `clip_norm` and then noised with standard deviation
/// `noise_stddev` per coordinate; see the module docs.
pub fn update_norm_bound(clip_norm: f64, noise_stddev: f64, dims: usize) -> f64 {
    let lattice = if noise_stddev > 0.0 {
        NOISE_LATTICE
    } else {
        0.0
    };
    let (c, s, t) = (clip_norm, noise_stddev + lattice, NOISE_TAIL_T);
    let noise = s * ((dims as f64).sqrt() + t);
    let rounding = lattice * (dims as f64).sqrt();
    (c * c + 2.0 * s * c * t + noise * noise).sqrt() * (1.0 + ROUNDING_SLACK) + rounding
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let mut rng = SplitMix64::new(7);
        for scale in [0.01f32, 1.0, 100.0] {
            let original: Vec<f32> = (0..1000)
                .map(|_| rng.next_normal() as f32 * scale)
                .collect();
            let mut clipped = original.clone();
            let outcome = clip_l2(&mut clipped, 1.0);
            let after = l2_norm(&clipped);
            assert!(after <= 1.0 + 1e-6, "norm {after} after clipping to 1");
            assert!((outcome.norm - l2_norm(&original)).abs() < 1e-9 * outcome.norm);
            if outcome.norm <= 1.0 {
                assert_eq!(clipped, original);
            } else {
                assert!((after - 1.0).abs() < 1e-5);
                // Same direction: every coordinate scaled by the same factor.
                for (c, o) in clipped.iter().zip(&original) {
                    assert!((c - o * outcome.scale as f32).abs() <= 1e-6 * o.abs().max(1e-30));
                }
            }
        }
    }

    #[test]
    fn honest_noise_stays_inside_the_bound_and_inflated_updates_do_not() {
        let mut rng = SplitMix64::new(11);
        let dims = 10_000;
        let (clip, stddev) = (1.0, 0.05);
        let bound = update_norm_bound(clip, stddev, dims);
        for _ in 0..20 {
            let mut update: Vec<f32> = (0..dims).map(|_| rng.next_normal() as f32).collect();
            clip_l2(&mut update, clip);
            for v in &mut update {
                *v += (rng.next_normal() * stddev) as f32;
            }
            assert!(l2_norm(&update) <= bound);
        }
        // The noise norm is about s√d = 5 and the bound
        // sqrt(1 + 1.2 + 0.05² · 112²) ≈ 5.79; an honest update is about
        // sqrt(1 + 25) ≈ 5.10, one clipped to 4 instead of 1 about 6.40.
        assert!((bound - 5.7933).abs() < 1e-3, "{bound}");
        let mut update: Vec<f32> = (0..dims).map(|_| rng.next_normal() as f32).collect();
        clip_l2(&mut update, 4.0);
        for v in &mut update {
            *v += (rng.next_normal() * stddev) as f32;
        }
        assert!(l2_norm(&update) > bound, "{} <= {bound}", l2_norm(&update));
    }
}
