//! What leaves a federated site: the update clipped to the job's L2 bound over all tensors
//! together and then, when the job asks for it, noised per coordinate with exact discrete
//! Gaussian noise from `cohort-dp` (never a floating-point normal).

use cohort_core::clip::{clip_l2, l2_norm};
use cohort_dp::{add_gaussian_noise, NoiseError, NoiseOptions, NoiseReport};

/// The job's clipping bound and the client's noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrivacyConfig {
    /// L2 bound on the whole update; 0: no clipping.
    pub clip_norm: f64,
    /// Standard deviation of the noise added to each coordinate; 0: none.
    pub noise_stddev: f64,
    /// Threads that draw the noise (0: one per core).
    pub noise_threads: usize,
}

/// What clipping and noising did to an update (norms only, never values).
#[derive(Clone, Debug, PartialEq)]
pub struct Privatized {
    /// L2 norm before clipping.
    pub norm: f64,
    /// Whether the update was scaled down to `clip_norm`.
    pub clipped: bool,
    /// L2 norm after clipping, before noise.
    pub clipped_norm: f64,
    /// The noise drawn (its standard deviation is the configured one rounded up to the
    /// sampler's lattice); `None` without noise.
    pub noise: Option<NoiseReport>,
    /// L2 norm of what is sent.
    pub sent_norm: f64,
}

/// Why an update could not be privatized.
#[derive(Debug, thiserror::Error)]
pub enum PrivatizeError {
    #[error("cannot add Gaussian noise of standard deviation {stddev} to the update: {source}")]
    Noise { stddev: f64, source: NoiseError },
}

/// Clips `update` in place to `config.clip_norm` (when positive) and adds the configured
/// noise.
pub fn privatize(update: &mut [f32], config: &PrivacyConfig) -> Result<Privatized, PrivatizeError> {
    let (norm, clipped, clipped_norm) = if config.clip_norm > 0.0 {
        let outcome = clip_l2(update, config.clip_norm);
        let clipped = outcome.scale < 1.0;
        let after = if clipped {
            l2_norm(update)
        } else {
            outcome.norm
        };
        (outcome.norm, clipped, after)
    } else {
        let norm = l2_norm(update);
        (norm, false, norm)
    };
    let noise = if config.noise_stddev > 0.0 {
        let mut options = NoiseOptions::default();
        if config.noise_threads > 0 {
            options.threads = config.noise_threads;
        }
        let report =
            add_gaussian_noise(update, config.noise_stddev, &options).map_err(|source| {
                PrivatizeError::Noise {
                    stddev: config.noise_stddev,
                    source,
                }
            })?;
        Some(report)
    } else {
        None
    };
    Ok(Privatized {
        norm,
        clipped,
        clipped_norm,
        sent_norm: if noise.is_some() {
            l2_norm(update)
        } else {
            clipped_norm
        },
        noise,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_core::rng::SplitMix64;

    fn update(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| rng.next_normal() as f32 * scale).collect()
    }

    #[test]
    fn clipping_bounds_the_whole_update() {
        for (scale, clip) in [(1.0f32, 0.5), (1e-3, 0.5), (10.0, 3.0)] {
            let original = update(1000, scale, 3);
            let mut sent = original.clone();
            let report = privatize(
                &mut sent,
                &PrivacyConfig {
                    clip_norm: clip,
                    noise_stddev: 0.0,
                    noise_threads: 1,
                },
            )
            .unwrap();
            assert!((report.norm - l2_norm(&original)).abs() < 1e-9 * report.norm.max(1.0));
            assert!(l2_norm(&sent) <= clip * (1.0 + 1e-6), "{report:?}");
            assert_eq!(report.clipped, report.norm > clip);
            assert_eq!(report.sent_norm, report.clipped_norm);
            if !report.clipped {
                assert_eq!(sent, original);
            }
        }
        let original = update(10, 5.0, 4);
        let mut sent = original.clone();
        let report = privatize(
            &mut sent,
            &PrivacyConfig {
                clip_norm: 0.0,
                noise_stddev: 0.0,
                noise_threads: 1,
            },
        )
        .unwrap();
        assert_eq!(sent, original, "clip_norm 0 leaves the update alone");
        assert!(!report.clipped);
    }

    #[test]
    fn noise_is_added_after_clipping_with_the_configured_stddev() {
        let dims = 20_000;
        let (clip, stddev) = (1.0, 0.01);
        let mut sent = update(dims, 1.0, 5);
        let report = privatize(
            &mut sent,
            &PrivacyConfig {
                clip_norm: clip,
                noise_stddev: stddev,
                noise_threads: 2,
            },
        )
        .unwrap();
        assert!(report.clipped);
        assert!((report.clipped_norm - clip).abs() < 1e-5);
        let noise = report.noise.clone().unwrap();
        assert_eq!(noise.elements, dims);
        assert!(noise.stddev >= stddev && noise.stddev < stddev * (1.0 + 1e-5));
        // ‖Δ + z‖² ≈ C² + d s², with standard deviation about s² sqrt(2d) + 2 s C.
        let expected = clip * clip + dims as f64 * stddev * stddev;
        let spread = stddev * stddev * (2.0 * dims as f64).sqrt() + 2.0 * stddev * clip;
        let got = report.sent_norm * report.sent_norm;
        assert!(
            (got - expected).abs() < 6.0 * spread,
            "{got} vs {expected} ± {spread}"
        );
        assert!((report.sent_norm - l2_norm(&sent)).abs() < 1e-12);
        assert!(
            report.sent_norm <= cohort_core::clip::update_norm_bound(clip, stddev, dims),
            "an honest update stays inside the coordinator's bound"
        );
        // A bad stddev is refused with the sampler's reason.
        let err = privatize(
            &mut sent,
            &PrivacyConfig {
                clip_norm: clip,
                noise_stddev: 1e-12,
                noise_threads: 1,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("granularity"), "{err}");
    }
}
