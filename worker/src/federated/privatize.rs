//! What leaves a federated site: the update clipped to the job's L2 bound over all tensors
//! together and then, when the job asks for it, noised with Gaussian noise per coordinate.

use cohort_core::clip::{clip_l2, l2_norm};

/// The job's clipping bound and the client's noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrivacyConfig {
    /// L2 bound on the whole update; 0: no clipping.
    pub clip_norm: f64,
    /// Standard deviation of the noise added to each coordinate; 0: none.
    pub noise_stddev: f64,
}

/// What clipping and noising did to an update (norms only, never values).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Privatized {
    /// L2 norm before clipping.
    pub norm: f64,
    /// Whether the update was scaled down to `clip_norm`.
    pub clipped: bool,
    /// L2 norm after clipping, before noise.
    pub clipped_norm: f64,
    pub noise_stddev: f64,
    /// L2 norm of what is sent.
    pub sent_norm: f64,
}

/// Why an update could not be privatized.
#[derive(Debug, thiserror::Error)]
pub enum PrivatizeError {
    #[error("cannot add Gaussian noise of standard deviation {stddev}: {reason}")]
    Noise { stddev: f64, reason: String },
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
    if config.noise_stddev > 0.0 {
        add_noise(update, config.noise_stddev)?;
    }
    Ok(Privatized {
        norm,
        clipped,
        clipped_norm,
        noise_stddev: config.noise_stddev,
        sent_norm: if config.noise_stddev > 0.0 {
            l2_norm(update)
        } else {
            clipped_norm
        },
    })
}

fn add_noise(_update: &mut [f32], stddev: f64) -> Result<(), PrivatizeError> {
    Err(PrivatizeError::Noise {
        stddev,
        reason: "this build has no noise sampler yet (cohort-dp)".into(),
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
            },
        )
        .unwrap();
        assert_eq!(sent, original, "clip_norm 0 leaves the update alone");
        assert!(!report.clipped);
    }
}
