//! `cohort-coordinator privacy`: answers privacy planning questions without
//! running anything — ε for a given σ, or the smallest σ for a target ε.

use cohort_core::privacy::{epsilon, noise_multiplier_for, PrivacyError};
use serde::Serialize;

/// What the operator asks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PrivacyQuestion {
    /// ε spent by `rounds` rounds at this noise multiplier.
    Epsilon { noise_multiplier: f64 },
    /// The smallest noise multiplier whose ε stays within this target.
    NoiseMultiplier { target_epsilon: f64 },
}

/// The answer, printed as text or JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrivacyAnswer {
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub rounds: u64,
    pub delta: f64,
    pub epsilon: f64,
    /// The Rényi order at which the bound is tightest.
    pub optimal_order: f64,
    pub accountant: &'static str,
}

pub fn answer(
    question: PrivacyQuestion,
    sample_rate: f64,
    rounds: u64,
    delta: f64,
) -> Result<PrivacyAnswer, PrivacyError> {
    let noise_multiplier = match question {
        PrivacyQuestion::Epsilon { noise_multiplier } => noise_multiplier,
        PrivacyQuestion::NoiseMultiplier { target_epsilon } => {
            noise_multiplier_for(target_epsilon, sample_rate, rounds, delta)?
        }
    };
    let report = epsilon(noise_multiplier, sample_rate, rounds, delta)?;
    Ok(PrivacyAnswer {
        noise_multiplier,
        sample_rate,
        rounds,
        delta,
        epsilon: report.epsilon,
        optimal_order: report.order,
        accountant:
            "RDP of the Poisson-subsampled Gaussian (Mironov et al. 2019), CKS20 conversion",
    })
}

impl std::fmt::Display for PrivacyAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epsilon = {:.4} at delta = {:e} after {} rounds with sample rate {} and noise multiplier {:.4} (optimal Renyi order {})",
            self.epsilon, self.delta, self.rounds, self.sample_rate, self.noise_multiplier, self.optimal_order
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sigma_found_for_a_target_meets_it() {
        let found = answer(
            PrivacyQuestion::NoiseMultiplier {
                target_epsilon: 8.0,
            },
            0.01,
            1000,
            1e-5,
        )
        .unwrap();
        assert!(found.epsilon <= 8.0, "{found}");
        let slightly_less = answer(
            PrivacyQuestion::Epsilon {
                noise_multiplier: found.noise_multiplier * 0.99,
            },
            0.01,
            1000,
            1e-5,
        )
        .unwrap();
        assert!(slightly_less.epsilon > 8.0, "{slightly_less}");
    }

    #[test]
    fn bad_input_is_an_error_not_a_number() {
        let q = answer(
            PrivacyQuestion::Epsilon {
                noise_multiplier: 1.0,
            },
            1.5,
            10,
            1e-5,
        );
        assert!(q.is_err());
        let delta = answer(
            PrivacyQuestion::Epsilon {
                noise_multiplier: 1.0,
            },
            0.1,
            10,
            0.0,
        );
        assert!(delta.is_err());
        let sigma = answer(
            PrivacyQuestion::Epsilon {
                noise_multiplier: -1.0,
            },
            0.1,
            10,
            1e-5,
        );
        assert!(sigma.is_err());
    }
}
