//! The outer optimizer: turns the round's mean pseudo-gradient into the next
//! global parameters (DiLoCo, Douillard et al. 2023: SGD with Nesterov
//! momentum, lr 0.7, momentum 0.9).

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
}

impl OuterOptimizerConfig {
    pub fn validate(&self) -> Result<(), OuterConfigError> {
        let lr_ok = |lr: f32| lr.is_finite() && lr > 0.0;
        match *self {
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

/// Outer optimizer with its state (the momentum buffer, if any).
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    config: OuterOptimizerConfig,
    momentum: Vec<f32>,
}

impl OuterOptimizer {
    pub fn new(config: OuterOptimizerConfig, len: usize) -> OuterOptimizer {
        let momentum = match config {
            OuterOptimizerConfig::Nesterov { .. } => vec![0.0; len],
            _ => Vec::new(),
        };
        OuterOptimizer { config, momentum }
    }

    /// An optimizer resumed with a saved momentum buffer. `None` when the
    /// buffer does not fit: `len` values with momentum, none without.
    pub fn with_momentum(
        config: OuterOptimizerConfig,
        len: usize,
        momentum: Vec<f32>,
    ) -> Option<OuterOptimizer> {
        let expected = match config {
            OuterOptimizerConfig::Nesterov { .. } => len,
            _ => 0,
        };
        (momentum.len() == expected).then_some(OuterOptimizer { config, momentum })
    }

    pub fn config(&self) -> OuterOptimizerConfig {
        self.config
    }

    /// The momentum buffer (empty without momentum), for checkpoints.
    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }

    /// Computes the next parameters in place: on entry `sum_then_next` holds
    /// the sum of `count` pseudo-gradients (global - local), on exit the next
    /// global parameters.
    pub fn step(&mut self, global: &[f32], sum_then_next: &mut [f32], count: usize) {
        assert!(count > 0, "outer step over zero pushes");
        assert_eq!(global.len(), sum_then_next.len());
        let inv = 1.0 / count as f32;
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
                    .zip(self.momentum.iter_mut())
                {
                    let g = *out * inv;
                    *m = mu * *m + g;
                    *out = theta - lr * (g + mu * *m);
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
    fn invalid_settings_are_named() {
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
