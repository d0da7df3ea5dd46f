//! The outer (server) optimizer: turns the round's mean pseudo-gradient into
//! the next global parameters. Pretraining uses DiLoCo's SGD with Nesterov
//! momentum (Douillard et al. 2023: lr 0.7, momentum 0.9); federated jobs use
//! FedAvg (SGD), FedAvgM (heavy-ball momentum) or FedAdam (Reddi et al. 2021,
//! "Adaptive Federated Optimization").
//!
//! The pseudo-gradient is always global − local, so every optimizer here
//! *descends* along it.

use serde::{Deserialize, Serialize};

/// Which outer optimizer the job uses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OuterOptimizerConfig {
    /// The next parameters are the mean of the workers' local parameters
    /// (equivalent to SGD with lr 1.0).
    Average,
    /// theta -= lr * mean_delta.
    Sgd { lr: f32 },
    /// PyTorch's SGD with Nesterov momentum: m = mu*m + g; theta -= lr*(g + mu*m).
    Nesterov { lr: f32, momentum: f32 },
    /// Heavy-ball momentum (FedAvgM, Hsu et al. 2019): m = mu*m + g; theta -= lr*m.
    Momentum { lr: f32, momentum: f32 },
    /// FedAdam (Reddi et al. 2021, Algorithm 2, without bias correction):
    /// m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g²; theta -= lr * m / (sqrt(v) + tau).
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
}

impl Default for OuterOptimizerConfig {
    fn default() -> Self {
        OuterOptimizerConfig::Nesterov {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OuterConfigError {
    #[error("outer.lr must be positive and finite, got {0}")]
    LearningRate(f32),
    #[error("outer.momentum must be in [0, 1), got {0}")]
    Momentum(f32),
    #[error("outer.{field} must be in [0, 1), got {value}")]
    Beta { field: &'static str, value: f32 },
    #[error("outer.tau must be positive and finite, got {0}")]
    Tau(f32),
}

impl OuterOptimizerConfig {
    pub fn validate(&self) -> Result<(), OuterConfigError> {
        let lr_ok = |lr: f32| lr.is_finite() && lr > 0.0;
        let beta_ok = |b: f32| (0.0..1.0).contains(&b);
        match *self {
            OuterOptimizerConfig::Momentum { lr, .. } | OuterOptimizerConfig::Adam { lr, .. }
                if !lr_ok(lr) =>
            {
                Err(OuterConfigError::LearningRate(lr))
            }
            OuterOptimizerConfig::Momentum { momentum, .. } if !beta_ok(momentum) => {
                Err(OuterConfigError::Momentum(momentum))
            }
            OuterOptimizerConfig::Momentum { .. } => Ok(()),
            OuterOptimizerConfig::Adam { beta1, .. } if !beta_ok(beta1) => {
                Err(OuterConfigError::Beta {
                    field: "beta1",
                    value: beta1,
                })
            }
            OuterOptimizerConfig::Adam { beta2, .. } if !beta_ok(beta2) => {
                Err(OuterConfigError::Beta {
                    field: "beta2",
                    value: beta2,
                })
            }
            OuterOptimizerConfig::Adam { tau, .. } if !(tau.is_finite() && tau > 0.0) => {
                Err(OuterConfigError::Tau(tau))
            }
            OuterOptimizerConfig::Adam { .. } => Ok(()),
            OuterOptimizerConfig::Average => Ok(()),
            OuterOptimizerConfig::Sgd { lr } if !lr_ok(lr) => {
                Err(OuterConfigError::LearningRate(lr))
            }
            OuterOptimizerConfig::Sgd { .. } => Ok(()),
            OuterOptimizerConfig::Nesterov { lr, .. } if !lr_ok(lr) => {
                Err(OuterConfigError::LearningRate(lr))
            }
            OuterOptimizerConfig::Nesterov { momentum, .. } if !(0.0..1.0).contains(&momentum) => {
                Err(OuterConfigError::Momentum(momentum))
            }
            OuterOptimizerConfig::Nesterov { .. } => Ok(()),
        }
    }
}

impl OuterOptimizerConfig {
    /// How many parameter-sized state buffers the optimizer keeps: the
    /// momentum (Nesterov, heavy ball; Adam's first moment), then Adam's
    /// second moment.
    pub fn state_buffers(&self) -> usize {
        match self {
            OuterOptimizerConfig::Average | OuterOptimizerConfig::Sgd { .. } => 0,
            OuterOptimizerConfig::Nesterov { .. } | OuterOptimizerConfig::Momentum { .. } => 1,
            OuterOptimizerConfig::Adam { .. } => 2,
        }
    }
}

/// Names of the state buffers, in order, as checkpoints label them.
pub const STATE_BUFFER_NAMES: [&str; 2] = ["momentum", "second_moment"];

/// Outer optimizer with its state: `state_buffers()` parameter-sized buffers
/// stored back to back (empty for plain SGD and averaging).
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    config: OuterOptimizerConfig,
    state: Vec<f32>,
}

impl OuterOptimizer {
    pub fn new(config: OuterOptimizerConfig, len: usize) -> OuterOptimizer {
        OuterOptimizer {
            config,
            state: vec![0.0; config.state_buffers() * len],
        }
    }

    /// An optimizer resumed with its saved state. `None` when the state does
    /// not fit: `state_buffers() * len` values.
    pub fn with_state(
        config: OuterOptimizerConfig,
        len: usize,
        state: Vec<f32>,
    ) -> Option<OuterOptimizer> {
        (state.len() == config.state_buffers() * len).then_some(OuterOptimizer { config, state })
    }

    pub fn config(&self) -> OuterOptimizerConfig {
        self.config
    }

    /// The state buffers back to back (empty without state), for checkpoints.
    pub fn state(&self) -> &[f32] {
        &self.state
    }

    /// Computes the next parameters in place: on entry `sum_then_next` holds
    /// the sum of `count` pseudo-gradients (global - local), on exit the next
    /// global parameters.
    pub fn step(&mut self, global: &[f32], sum_then_next: &mut [f32], count: usize) {
        assert!(count > 0, "outer step over zero pushes");
        self.step_with_divisor(global, sum_then_next, count as f64);
    }

    /// Like [`Self::step`], but the sum is divided by `divisor` rather than
    /// by the number of pushes: DP-FedAvg divides the noised sum by the
    /// *expected* cohort size, since the count that arrived is not private.
    pub fn step_with_divisor(&mut self, global: &[f32], sum_then_next: &mut [f32], divisor: f64) {
        assert!(
            divisor.is_finite() && divisor > 0.0,
            "outer step with divisor {divisor}"
        );
        assert_eq!(global.len(), sum_then_next.len());
        let inv = (1.0 / divisor) as f32;
        let len = global.len();
        match self.config {
            OuterOptimizerConfig::Average => {
                for (out, &theta) in sum_then_next.iter_mut().zip(global) {
                    *out = theta - *out * inv;
                }
            }
            OuterOptimizerConfig::Sgd { lr } => {
                for (out, &theta) in sum_then_next.iter_mut().zip(global) {
                    *out = theta - lr * (*out * inv);
                }
            }
            OuterOptimizerConfig::Nesterov { lr, momentum: mu } => {
                for ((out, &theta), m) in sum_then_next
                    .iter_mut()
                    .zip(global)
                    .zip(self.state.iter_mut())
                {
                    let g = *out * inv;
                    *m = mu * *m + g;
                    *out = theta - lr * (g + mu * *m);
                }
            }
            OuterOptimizerConfig::Momentum { lr, momentum: mu } => {
                for ((out, &theta), m) in sum_then_next
                    .iter_mut()
                    .zip(global)
                    .zip(self.state.iter_mut())
                {
                    *m = mu * *m + *out * inv;
                    *out = theta - lr * *m;
                }
            }
            OuterOptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let (first, second) = self.state.split_at_mut(len);
                for (((out, &theta), m), v) in sum_then_next
                    .iter_mut()
                    .zip(global)
                    .zip(first.iter_mut())
                    .zip(second.iter_mut())
                {
                    let g = *out * inv;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *out = theta - lr * *m / (v.sqrt() + tau);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_gives_the_mean_of_local_parameters() {
        let global = [1.0f32, 2.0];
        let locals = [[0.0f32, 4.0], [2.0, 0.0]];
        let mut sum = [0.0f32; 2];
        for local in &locals {
            for i in 0..2 {
                sum[i] += global[i] - local[i];
            }
        }
        let mut opt = OuterOptimizer::new(OuterOptimizerConfig::Average, 2);
        opt.step(&global, &mut sum, 2);
        assert_eq!(sum, [1.0, 2.0]);
    }

    #[test]
    fn nesterov_matches_pytorch_sgd_semantics() {
        // Two steps with constant gradient 1, lr 0.5, mu 0.9:
        // m1 = 1, theta1 = 0 - 0.5*(1 + 0.9) = -0.95
        // m2 = 1.9, theta2 = -0.95 - 0.5*(1 + 1.71) = -2.305
        let mut opt = OuterOptimizer::new(
            OuterOptimizerConfig::Nesterov {
                lr: 0.5,
                momentum: 0.9,
            },
            1,
        );
        let mut buf = [1.0f32];
        opt.step(&[0.0], &mut buf, 1);
        assert!((buf[0] + 0.95).abs() < 1e-6);
        let theta = buf[0];
        let mut buf = [2.0f32]; // two pushes of gradient 1
        opt.step(&[theta], &mut buf, 2);
        assert!((buf[0] + 2.305).abs() < 1e-5, "{}", buf[0]);
    }

    #[test]
    fn heavy_ball_momentum_accumulates_without_lookahead() {
        // g = 1 twice, lr 0.5, mu 0.9: m1 = 1, theta1 = -0.5; m2 = 1.9, theta2 = -1.45.
        let mut opt = OuterOptimizer::new(
            OuterOptimizerConfig::Momentum {
                lr: 0.5,
                momentum: 0.9,
            },
            1,
        );
        let mut buf = [1.0f32];
        opt.step(&[0.0], &mut buf, 1);
        assert!((buf[0] + 0.5).abs() < 1e-6);
        let theta = buf[0];
        let mut buf = [4.0f32];
        opt.step_with_divisor(&[theta], &mut buf, 4.0);
        assert!((buf[0] + 1.45).abs() < 1e-6, "{}", buf[0]);
        assert_eq!(opt.state().len(), 1);
    }

    #[test]
    fn fed_adam_matches_a_hand_computation() {
        // g = 2 (sum 4 over divisor 2), b1 0.9, b2 0.99, tau 1e-3, lr 0.1:
        // m = 0.2, v = 0.04, theta = 1 - 0.1 * 0.2 / (0.2 + 0.001).
        let mut opt = OuterOptimizer::new(
            OuterOptimizerConfig::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            1,
        );
        let mut buf = [4.0f32];
        opt.step_with_divisor(&[1.0], &mut buf, 2.0);
        let expected = 1.0 - 0.1 * 0.2 / (0.2 + 0.001);
        assert!((buf[0] - expected).abs() < 1e-6, "{} vs {expected}", buf[0]);
        assert_eq!(opt.state().len(), 2);
        assert!((opt.state()[0] - 0.2).abs() < 1e-7);
        assert!((opt.state()[1] - 0.04).abs() < 1e-7);
    }

    #[test]
    fn fedavg_of_identical_updates_applies_that_update() {
        // Sum of 3 identical deltas divided by the expected cohort size 3.
        let mut opt = OuterOptimizer::new(OuterOptimizerConfig::Sgd { lr: 1.0 }, 2);
        let mut buf = [0.3f32, -0.6];
        opt.step_with_divisor(&[1.0, 1.0], &mut buf, 3.0);
        assert!((buf[0] - 0.9).abs() < 1e-6 && (buf[1] - 1.2).abs() < 1e-6);
    }

    #[test]
    fn state_must_fit_on_resume() {
        let adam = OuterOptimizerConfig::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        assert!(OuterOptimizer::with_state(adam, 3, vec![0.0; 6]).is_some());
        assert!(OuterOptimizer::with_state(adam, 3, vec![0.0; 3]).is_none());
        assert!(OuterOptimizer::with_state(OuterOptimizerConfig::Average, 3, vec![]).is_some());
    }

    #[test]
    fn invalid_settings_are_named() {
        assert_eq!(
            OuterOptimizerConfig::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 1.5,
                tau: 1e-3
            }
            .validate(),
            Err(OuterConfigError::Beta {
                field: "beta2",
                value: 1.5
            })
        );
        assert_eq!(
            OuterOptimizerConfig::Nesterov {
                lr: 0.7,
                momentum: 1.0
            }
            .validate(),
            Err(OuterConfigError::Momentum(1.0))
        );
        assert_eq!(
            OuterOptimizerConfig::Sgd { lr: -1.0 }.validate(),
            Err(OuterConfigError::LearningRate(-1.0))
        );
    }
}
