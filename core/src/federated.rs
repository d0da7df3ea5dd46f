//! The rules of a federated fine-tuning job: how a round's cohort is drawn,
//! where the differential-privacy noise goes, and what each round costs.
//!
//! The round engine ([`crate::engine`]) applies these rules; this module only
//! states them, so that the job file, the coordinator and the tests agree on
//! one definition of, say, "the noise a client adds in distributed mode".
//!
//! Notation: C is the clip norm, σ the noise multiplier, m the fewest pushes a
//! round accepts (`min_participants`), k the number that arrived, N the
//! enrolled clients and q the Poisson sampling rate.

use serde::{Deserialize, Serialize};

use crate::privacy::{PrivacyBudget, SampledGaussianRound};
use crate::rng::SplitMix64;

/// How a round's cohort is drawn from the clients that are connected.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CohortSampling {
    /// Every connected client independently with probability `rate`: what
    /// the accountant's amplification by sampling assumes.
    Poisson { rate: f64 },
    /// `size` clients uniformly without replacement. Not covered by the
    /// accountant, so only allowed without differential privacy.
    Fixed { size: usize },
}

/// Where the Gaussian noise is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// No noise: updates may still be clipped; nothing is accounted.
    None,
    /// Each client adds N(0, (σC)²/m): a released sum of k ≥ m updates
    /// carries N(0, kσ²C²/m), at least the central amount. Private against
    /// whoever sees the sum; against the coordinator it needs secure
    /// aggregation, which Cohort does not (yet) provide.
    Distributed,
    /// Each client adds the full N(0, (σC)²): every update is private on its
    /// own, even against the coordinator, at √k times the noise in the sum.
    Local,
    /// Clients clip; the coordinator adds N(0, (σC)²) to the clipped sum
    /// (DP-FedAvg, McMahan et al. 2018). Trusts the coordinator.
    Central,
}

/// What the clients learn from their local data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FederatedTask {
    /// Next-token prediction on each site's text.
    NextToken,
    /// Sequence classification of each site's labeled examples with a
    /// linear head (`ModelConfig::classifier_specs`) on the model's mean
    /// final hidden state.
    Classification { num_classes: u32 },
}

impl FederatedTask {
    /// The most classes a classification job may have.
    pub const MAX_CLASSES: u32 = 1024;

    /// The classes of a classification task; `None` for next-token.
    pub fn num_classes(&self) -> Option<u32> {
        match *self {
            FederatedTask::NextToken => None,
            FederatedTask::Classification { num_classes } => Some(num_classes),
        }
    }
}

/// The federated part of a job, as the engine enforces it.
#[derive(Clone, Debug, PartialEq)]
pub struct FederatedRules {
    pub sampling: CohortSampling,
    /// The population the sampling rate applies to (the enrollment list).
    pub enrolled_clients: usize,
    /// L2 bound on each update (all tensors together); 0: not clipped.
    pub clip_norm: f64,
    pub dp_mode: DpMode,
    /// σ; 0 without DP.
    pub noise_multiplier: f64,
    /// Refuse rounds that would spend more; required with DP.
    pub budget: Option<PrivacyBudget>,
    /// Secret seed of the cohort draws (the accountant assumes the cohort
    /// is not known to whoever sees the release).
    pub sampling_seed: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FederatedRulesError {
    #[error("federated.sample_rate must be in (0, 1], got {0}")]
    SampleRate(f64),
    #[error("federated.cohort_size ({size}) must be at least federated.min_clients ({min})")]
    CohortSize { size: usize, min: usize },
    #[error("fixed-size cohorts (federated.cohort_size) are not covered by the privacy accountant, which assumes Poisson sampling; use federated.sample_rate with dp mode {0:?}")]
    FixedSizeWithDp(DpMode),
    #[error(
        "federated.enrolled clients ({enrolled}) are fewer than federated.min_clients ({min})"
    )]
    TooFewEnrolled { enrolled: usize, min: usize },
    #[error("dp.clip_norm must be positive and finite with dp mode {mode:?}, got {value}")]
    ClipNorm { mode: DpMode, value: f64 },
    #[error("dp.noise_multiplier must be positive and finite with dp mode {mode:?}, got {value}")]
    NoiseMultiplier { mode: DpMode, value: f64 },
    #[error("dp mode {0:?} needs a privacy budget (dp.epsilon, dp.delta)")]
    NoBudget(DpMode),
    #[error("dp.noise_multiplier is {0} but dp mode is none: set a mode or remove it")]
    NoiseWithoutMode(f64),
}

impl FederatedRules {
    /// Checks the rules against `min_participants` (m).
    pub fn validate(&self, min_participants: usize) -> Result<(), FederatedRulesError> {
        match self.sampling {
            CohortSampling::Poisson { rate } if !(rate > 0.0 && rate <= 1.0) => {
                return Err(FederatedRulesError::SampleRate(rate));
            }
            CohortSampling::Fixed { size } if size < min_participants => {
                return Err(FederatedRulesError::CohortSize {
                    size,
                    min: min_participants,
                });
            }
            CohortSampling::Fixed { .. } if self.dp_mode != DpMode::None => {
                return Err(FederatedRulesError::FixedSizeWithDp(self.dp_mode));
            }
            _ => {}
        }
        if self.enrolled_clients < min_participants {
            return Err(FederatedRulesError::TooFewEnrolled {
                enrolled: self.enrolled_clients,
                min: min_participants,
            });
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if self.dp_mode == DpMode::None {
            if self.noise_multiplier != 0.0 {
                return Err(FederatedRulesError::NoiseWithoutMode(self.noise_multiplier));
            }
            if !(self.clip_norm == 0.0 || positive(self.clip_norm)) {
                return Err(FederatedRulesError::ClipNorm {
                    mode: self.dp_mode,
                    value: self.clip_norm,
                });
            }
            return Ok(());
        }
        if !positive(self.clip_norm) {
            return Err(FederatedRulesError::ClipNorm {
                mode: self.dp_mode,
                value: self.clip_norm,
            });
        }
        if !positive(self.noise_multiplier) {
            return Err(FederatedRulesError::NoiseMultiplier {
                mode: self.dp_mode,
                value: self.noise_multiplier,
            });
        }
        if self.budget.is_none() {
            return Err(FederatedRulesError::NoBudget(self.dp_mode));
        }
        Ok(())
    }

    /// The expected cohort size, which divides the (noised) sum: q·N for
    /// Poisson sampling, the size for fixed cohorts. Dividing by the count
    /// that happened to arrive would reveal it.
    pub fn expected_cohort(&self) -> f64 {
        match self.sampling {
            CohortSampling::Poisson { rate } => rate * self.enrolled_clients as f64,
            CohortSampling::Fixed { size } => size as f64,
        }
    }

    /// Whether every round is released whatever arrives (central DP: the
    /// coordinator's noise alone suffices), so that the release decision
    /// never depends on who was sampled.
    pub fn releases_every_round(&self) -> bool {
        self.dp_mode == DpMode::Central
    }

    /// Standard deviation each client adds per coordinate.
    pub fn client_noise_stddev(&self, min_participants: usize) -> f64 {
        let central = self.noise_multiplier * self.clip_norm;
        match self.dp_mode {
            DpMode::Distributed => central / (min_participants.max(1) as f64).sqrt(),
            DpMode::Local => central,
            DpMode::None | DpMode::Central => 0.0,
        }
    }

    /// Standard deviation the coordinator adds to the sum per coordinate.
    pub fn central_noise_stddev(&self) -> f64 {
        match self.dp_mode {
            DpMode::Central => self.noise_multiplier * self.clip_norm,
            _ => 0.0,
        }
    }

    /// The noise multiplier of a released sum holding `shares` updates
    /// (sensitivity C): the noise actually in it, never the noise expected.
    pub fn effective_noise_multiplier(&self, shares: usize, min_participants: usize) -> f64 {
        let sigma = self.noise_multiplier;
        match self.dp_mode {
            DpMode::None => 0.0,
            DpMode::Distributed => sigma * (shares as f64 / min_participants.max(1) as f64).sqrt(),
            DpMode::Local => sigma * (shares as f64).sqrt(),
            DpMode::Central => sigma,
        }
    }

    /// What releasing a sum of `shares` updates costs, or `None` without DP.
    pub fn round_cost(
        &self,
        shares: usize,
        min_participants: usize,
    ) -> Option<SampledGaussianRound> {
        let CohortSampling::Poisson { rate } = self.sampling else {
            return None;
        };
        (self.dp_mode != DpMode::None).then(|| SampledGaussianRound {
            sampling_rate: rate,
            noise_multiplier: self.effective_noise_multiplier(shares, min_participants),
        })
    }

    /// Draws a cohort from `clients` (in a fixed order).
    pub fn sample_cohort<T: Copy>(&self, clients: &[T], rng: &mut SplitMix64) -> Vec<T> {
        match self.sampling {
            CohortSampling::Poisson { rate } => clients
                .iter()
                .copied()
                .filter(|_| rng.next_f64() < rate)
                .collect(),
            CohortSampling::Fixed { size } => {
                let mut all = clients.to_vec();
                rng.shuffle(&mut all);
                all.truncate(size);
                all
            }
        }
    }
}

/// The federated part of a committed round's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct FederatedRoundSummary {
    /// Clients drawn into the cohort.
    pub sampled: usize,
    /// Mean L2 norm of the updates as received (clipped, noised by mode).
    pub mean_update_norm: f64,
    /// Noise multiplier of the released sum (0 without DP).
    pub noise_multiplier: f64,
    /// Epsilon spent after this round, at the budget's delta.
    pub epsilon_spent: Option<f64>,
    pub epsilon_budget: Option<f64>,
    pub delta: Option<f64>,
    /// Local DP only: the guarantee each client's own updates give it
    /// against anyone, the coordinator included, if it took part in every
    /// round so far: the Gaussian mechanism with sensitivity 2C (any two of
    /// its datasets; no amplification, the coordinator knows who was
    /// sampled), composed over the rounds.
    pub local_epsilon_per_client: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(mode: DpMode) -> FederatedRules {
        FederatedRules {
            sampling: CohortSampling::Poisson { rate: 0.5 },
            enrolled_clients: 8,
            clip_norm: 1.0,
            dp_mode: mode,
            noise_multiplier: if mode == DpMode::None { 0.0 } else { 1.2 },
            budget: Some(PrivacyBudget {
                epsilon: 8.0,
                delta: 1e-5,
            }),
            sampling_seed: 3,
        }
    }

    #[test]
    fn distributed_noise_shares_add_up_to_at_least_the_central_noise() {
        let r = rules(DpMode::Distributed);
        let m = 3;
        let share = r.client_noise_stddev(m);
        for k in m..=8 {
            let total = share * (k as f64).sqrt();
            // The released sum's noise in units of C is sigma_eff.
            assert!((total - r.effective_noise_multiplier(k, m)).abs() < 1e-12);
            assert!(total >= r.noise_multiplier - 1e-12);
        }
        // Fewer shares than m would be less noise than promised.
        assert!(r.effective_noise_multiplier(2, m) < r.noise_multiplier);
    }

    #[test]
    fn each_mode_puts_the_noise_where_it_says() {
        let m = 3;
        let central = rules(DpMode::Central);
        assert_eq!(central.client_noise_stddev(m), 0.0);
        assert!((central.central_noise_stddev() - 1.2).abs() < 1e-12);
        let local = rules(DpMode::Local);
        assert!((local.client_noise_stddev(m) - 1.2).abs() < 1e-12);
        assert_eq!(local.central_noise_stddev(), 0.0);
        assert!((local.effective_noise_multiplier(4, m) - 2.4).abs() < 1e-12);
        assert_eq!(rules(DpMode::None).round_cost(4, m), None);
        assert_eq!(
            central.round_cost(4, m),
            Some(SampledGaussianRound {
                sampling_rate: 0.5,
                noise_multiplier: 1.2
            })
        );
        assert!((central.expected_cohort() - 4.0).abs() < 1e-12);
    }

    #[test]
    fn invalid_rules_are_named() {
        let mut r = rules(DpMode::Distributed);
        r.sampling = CohortSampling::Fixed { size: 4 };
        assert_eq!(
            r.validate(3),
            Err(FederatedRulesError::FixedSizeWithDp(DpMode::Distributed))
        );
        let mut r = rules(DpMode::Central);
        r.sampling = CohortSampling::Poisson { rate: 1.5 };
        assert_eq!(r.validate(3), Err(FederatedRulesError::SampleRate(1.5)));
        let mut r = rules(DpMode::Local);
        r.noise_multiplier = 0.0;
        assert!(matches!(
            r.validate(3),
            Err(FederatedRulesError::NoiseMultiplier { .. })
        ));
        let mut r = rules(DpMode::Local);
        r.budget = None;
        assert_eq!(
            r.validate(3),
            Err(FederatedRulesError::NoBudget(DpMode::Local))
        );
        assert_eq!(
            rules(DpMode::Central).validate(9),
            Err(FederatedRulesError::TooFewEnrolled {
                enrolled: 8,
                min: 9
            })
        );
        assert_eq!(rules(DpMode::None).validate(3), Ok(()));
    }

    #[test]
    fn poisson_cohorts_have_the_expected_size_on_average() {
        let r = rules(DpMode::Central);
        let clients: Vec<u32> = (0..8).collect();
        let mut rng = SplitMix64::new(r.sampling_seed);
        let draws = 4000;
        let total: usize = (0..draws)
            .map(|_| r.sample_cohort(&clients, &mut rng).len())
            .sum();
        // Mean 4, standard deviation of the mean sqrt(8 * 0.25 / 4000) ≈ 0.022.
        let mean = total as f64 / draws as f64;
        assert!((mean - 4.0).abs() < 0.12, "{mean}");
        let mut fixed = r.clone();
        fixed.sampling = CohortSampling::Fixed { size: 5 };
        let cohort = fixed.sample_cohort(&clients, &mut rng);
        assert_eq!(cohort.len(), 5);
        let mut unique = cohort.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 5);
    }
}
