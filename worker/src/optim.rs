//! Inner optimizers (AdamW as torch.optim.AdamW, plain SGD) whose state is plain tensors saved as safetensors.

use std::path::Path;

use tch::{Device, Kind, TchError, Tensor};

/// Which update rule the inner optimizer applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InnerKind {
    AdamW,
    Sgd,
}

/// Hyper-parameters of the inner optimizer (the job's `InnerOptimizer`).
#[derive(Clone, Debug, PartialEq)]
pub struct InnerConfig {
    pub kind: InnerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// AdamW: decoupled, only on tensors with at least two dimensions. SGD: L2 added to the gradient.
    pub weight_decay: f64,
    /// Global gradient L2-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Linear warm-up of the learning rate over this many inner steps.
    pub warmup_steps: u32,
}

impl InnerConfig {
    /// torch.optim.AdamW's defaults with the given learning rate.
    pub fn adamw(lr: f64) -> InnerConfig {
        InnerConfig {
            kind: InnerKind::AdamW,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 0.0,
            warmup_steps: 0,
        }
    }

    pub fn sgd(lr: f64) -> InnerConfig {
        InnerConfig {
            kind: InnerKind::Sgd,
            lr,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            weight_decay: 0.0,
            grad_clip: 0.0,
            warmup_steps: 0,
        }
    }
}

/// Why an optimizer step or its state file failed.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("torch error: {0}")]
    Torch(#[from] TchError),
    #[error("optimizer state {path}: {reason}")]
    State { path: String, reason: String },
    #[error("optimizer has {expected} parameters, step was given {actual}")]
    ParamCount { expected: usize, actual: usize },
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// The step number (1-based, counted across rounds).
    pub step: u64,
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
}

/// An inner optimizer that owns its state as tensors on the model's device.
pub struct InnerOptimizer {
    config: InnerConfig,
    names: Vec<String>,
    step: u64,
    /// AdamW first and second moments, one per parameter (empty for SGD).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl std::fmt::Debug for InnerOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerOptimizer")
            .field("config", &self.config)
            .field("step", &self.step)
            .field("parameters", &self.names.len())
            .finish()
    }
}

const STEP_KEY: &str = "step";

impl InnerOptimizer {
    /// Zero state for `params` (named, for the state file).
    pub fn new(
        config: InnerConfig,
        names: Vec<String>,
        params: &[Tensor],
    ) -> Result<InnerOptimizer, OptimError> {
        if names.len() != params.len() {
            return Err(OptimError::ParamCount {
                expected: names.len(),
                actual: params.len(),
            });
        }
        let (m, v) = match config.kind {
            InnerKind::AdamW => {
                let zeros = || -> Result<Vec<Tensor>, TchError> {
                    params.iter().map(|p| p.f_zeros_like()).collect()
                };
                (zeros()?, zeros()?)
            }
            InnerKind::Sgd => (Vec::new(), Vec::new()),
        };
        Ok(InnerOptimizer {
            config,
            names,
            step: 0,
            m,
            v,
        })
    }

    pub fn config(&self) -> &InnerConfig {
        &self.config
    }

    /// Steps taken so far (across rounds and restarts).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Learning rate of (1-based) step `step`: linear warm-up, then constant.
    pub fn lr_at(&self, step: u64) -> f64 {
        let warmup = u64::from(self.config.warmup_steps);
        if warmup == 0 || step >= warmup {
            self.config.lr
        } else {
            self.config.lr * step as f64 / warmup as f64
        }
    }

    /// Sets every parameter's gradient to zero (where one exists).
    pub fn zero_grad(params: &[Tensor]) {
        for p in params {
            p.shallow_clone().zero_grad();
        }
    }

    /// Global L2 norm of the gradients; scales them down to `max_norm` when above it
    /// (as torch.nn.utils.clip_grad_norm_). Returns the norm before clipping.
    pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64, OptimError> {
        let norm = tch::no_grad(|| -> Result<f64, TchError> {
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| p.f_grad())
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(Tensor::defined)
                .collect();
            if grads.is_empty() {
                return Ok(0.0);
            }
            // Per-tensor norms stay on the device; one synchronisation for the total.
            let norms: Vec<Tensor> = grads
                .iter()
                .map(|g| g.f_norm()?.f_to_kind(Kind::Double))
                .collect::<Result<_, _>>()?;
            let norm = Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?;
            if max_norm > 0.0 {
                let coef = max_norm / (norm + 1e-6);
                if coef < 1.0 {
                    for mut g in grads {
                        let _ = g.f_mul_scalar_(coef)?;
                    }
                }
            }
            Ok(norm)
        })?;
        Ok(norm)
    }

    /// Clips (if configured) and applies one update to `params` from their gradients.
    pub fn step(&mut self, params: &[Tensor]) -> Result<StepInfo, OptimError> {
        if params.len() != self.names.len() {
            return Err(OptimError::ParamCount {
                expected: self.names.len(),
                actual: params.len(),
            });
        }
        let grad_norm = Self::clip_grad_norm(params, self.config.grad_clip)?;
        self.step += 1;
        let step = self.step;
        let lr = self.lr_at(step);
        let c = self.config.clone();
        tch::no_grad(|| -> Result<(), TchError> {
            for (i, param) in params.iter().enumerate() {
                let g = param.f_grad()?;
                if !g.defined() {
                    continue;
                }
                let mut p = param.shallow_clone();
                match c.kind {
                    InnerKind::AdamW => {
                        if c.weight_decay != 0.0 && p.dim() >= 2 {
                            let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                        }
                        let m = &mut self.m[i];
                        let v = &mut self.v[i];
                        let _ = m.f_lerp_(&g, 1.0 - c.beta1)?;
                        let _ = v.f_mul_scalar_(c.beta2)?;
                        let _ = v.f_add_(&g.f_mul(&g)?.f_mul_scalar(1.0 - c.beta2)?)?;
                        let bc1 = 1.0 - c.beta1.powf(step as f64);
                        let bc2 = 1.0 - c.beta2.powf(step as f64);
                        let denom = v.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(c.eps)?;
                        let update = m.f_div(&denom)?.f_mul_scalar(lr / bc1)?;
                        let _ = p.f_sub_(&update)?;
                    }
                    InnerKind::Sgd => {
                        let update = if c.weight_decay != 0.0 {
                            g.f_add(&p.f_mul_scalar(c.weight_decay)?)?
                        } else {
                            g
                        };
                        let _ = p.f_sub_(&update.f_mul_scalar(lr)?)?;
                    }
                }
            }
            Ok(())
        })?;
        Ok(StepInfo {
            step,
            lr,
            grad_norm,
        })
    }

    /// Writes the state (step, and AdamW's m and v) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let err = |reason: String| OptimError::State {
            path: path.display().to_string(),
            reason,
        };
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(1 + 2 * self.m.len());
        tensors.push((
            STEP_KEY.to_string(),
            Tensor::f_from_slice(&[self.step as i64])?,
        ));
        for (name, (m, v)) in self.names.iter().zip(self.m.iter().zip(&self.v)) {
            tensors.push((
                format!("m.{name}"),
                m.f_to_device(Device::Cpu)?.f_contiguous()?,
            ));
            tensors.push((
                format!("v.{name}"),
                v.f_to_device(Device::Cpu)?.f_contiguous()?,
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        Tensor::write_safetensors(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| err(format!("cannot rename into place: {e}")))?;
        Ok(())
    }

    /// Replaces the state with the one saved at `path`; names and shapes must match.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let err = |reason: String| OptimError::State {
            path: path.display().to_string(),
            reason,
        };
        let mut saved: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(path)?.into_iter().collect();
        let step = saved
            .remove(STEP_KEY)
            .ok_or_else(|| err("no step counter".into()))?;
        if step.kind() != Kind::Int64 || step.numel() != 1 {
            return Err(err("step counter is not one int64".into()));
        }
        let step = step.f_int64_value(&[0])?;
        let step = u64::try_from(step).map_err(|_| err(format!("negative step {step}")))?;
        let mut m = Vec::with_capacity(self.m.len());
        let mut v = Vec::with_capacity(self.v.len());
        for (name, (cur_m, cur_v)) in self.names.iter().zip(self.m.iter().zip(&self.v)) {
            for (prefix, cur, out) in [("m", cur_m, &mut m), ("v", cur_v, &mut v)] {
                let key = format!("{prefix}.{name}");
                let t = saved
                    .remove(&key)
                    .ok_or_else(|| err(format!("no tensor {key}")))?;
                if t.size() != cur.size() || t.kind() != cur.kind() {
                    return Err(err(format!(
                        "{key} is {:?} {:?}, expected {:?} {:?}",
                        t.kind(),
                        t.size(),
                        cur.kind(),
                        cur.size()
                    )));
                }
                out.push(t.f_to_device(cur.device())?);
            }
        }
        if let Some(extra) = saved.keys().next() {
            return Err(err(format!(
                "unexpected tensor {extra} (saved for a different model or optimizer?)"
            )));
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values)
            .view(shape)
            .set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, grad: &[f32]) {
        // d/dp sum(p * g) = g
        InnerOptimizer::zero_grad(std::slice::from_ref(p));
        let g = Tensor::from_slice(grad).view(p.size().as_slice());
        (p * g).sum(Kind::Float).backward();
    }

    fn values(t: &Tensor) -> Vec<f64> {
        let flat = t.detach().view([-1]);
        (0..flat.numel() as i64)
            .map(|i| flat.double_value(&[i]))
            .collect()
    }

    /// torch.optim.AdamW by hand, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference_adamw(
        p: &mut [f64],
        m: &mut [f64],
        v: &mut [f64],
        g: &[f64],
        step: i32,
        lr: f64,
        decay: bool,
        c: &InnerConfig,
    ) {
        for i in 0..p.len() {
            if decay {
                p[i] *= 1.0 - lr * c.weight_decay;
            }
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
            let bc1 = 1.0 - c.beta1.powi(step);
            let bc2 = 1.0 - c.beta2.powi(step);
            p[i] -= lr / bc1 * m[i] / ((v[i] / bc2).sqrt() + c.eps);
        }
    }

    #[test]
    fn two_adamw_steps_match_torch_semantics() {
        let mut config = InnerConfig::adamw(0.1);
        config.weight_decay = 0.5;
        config.warmup_steps = 2;
        // Large enough that adding eps before the bias correction (or inside the sqrt) would fail.
        config.eps = 1e-3;
        let w = param(&[1.0, -2.0, 0.5, 3.0], &[2, 2]);
        let b = param(&[0.25, -0.75], &[2]);
        let mut opt = InnerOptimizer::new(
            config.clone(),
            vec!["w".into(), "b".into()],
            &[w.shallow_clone(), b.shallow_clone()],
        )
        .unwrap();
        let grads_w = [[0.1, -0.2, 0.3, 1.5], [-0.4, 0.05, 0.3, -1.0]];
        let grads_b = [[2.0, -0.001], [1.0, 0.5]];
        let (mut rw, mut mw, mut vw) = (vec![1.0, -2.0, 0.5, 3.0], vec![0.0; 4], vec![0.0; 4]);
        let (mut rb, mut mb, mut vb) = (vec![0.25, -0.75], vec![0.0; 2], vec![0.0; 2]);
        for step in 0..2 {
            set_grad(&w, &grads_w[step].map(|x| x as f32));
            set_grad(&b, &grads_b[step].map(|x| x as f32));
            let info = opt.step(&[w.shallow_clone(), b.shallow_clone()]).unwrap();
            if step == 0 {
                // By hand for w[0]: g = 0.1, lr = 0.05, decay 0.5: p = 1 * (1 - 0.025) = 0.975;
                // m̂ = 0.1, v̂ = 0.01, update = 0.05 * 0.1 / (sqrt(0.01) + 1e-3).
                let want = 0.975 - 0.05 * 0.1 / (0.1 + 1e-3);
                assert!((values(&w)[0] - want).abs() < 1e-6, "{:?}", values(&w));
            }
            // Warm-up: lr/2 on step 1, lr on step 2.
            let lr = 0.1 * (step + 1) as f64 / 2.0;
            assert_eq!(info.step, step as u64 + 1);
            assert!((info.lr - lr).abs() < 1e-15);
            reference_adamw(
                &mut rw,
                &mut mw,
                &mut vw,
                &grads_w[step],
                step as i32 + 1,
                lr,
                true,
                &config,
            );
            reference_adamw(
                &mut rb,
                &mut mb,
                &mut vb,
                &grads_b[step],
                step as i32 + 1,
                lr,
                false,
                &config,
            );
        }
        for (got, want) in values(&w).iter().zip(&rw).chain(values(&b).iter().zip(&rb)) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        let a = param(&[0.0, 0.0], &[2]);
        let b = param(&[0.0], &[1]);
        set_grad(&a, &[3.0, 0.0]);
        set_grad(&b, &[4.0]);
        let norm =
            InnerOptimizer::clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let ga = values(&a.grad());
        let gb = values(&b.grad());
        assert!(
            (ga[0] - 0.6).abs() < 1e-5 && (gb[0] - 0.8).abs() < 1e-5,
            "{ga:?} {gb:?}"
        );
    }

    #[test]
    fn sgd_steps_against_the_gradient() {
        let p = param(&[1.0, 2.0], &[2]);
        let mut opt = InnerOptimizer::new(
            InnerConfig::sgd(0.5),
            vec!["p".into()],
            &[p.shallow_clone()],
        )
        .unwrap();
        set_grad(&p, &[1.0, -4.0]);
        opt.step(&[p.shallow_clone()]).unwrap();
        assert_eq!(values(&p), vec![0.5, 4.0]);
    }

    #[test]
    fn state_survives_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("inner.safetensors");
        let w = param(&[1.0, -2.0, 0.5, 3.0], &[2, 2]);
        let names = vec!["h.0.w".to_string()];
        let mut opt = InnerOptimizer::new(
            InnerConfig::adamw(0.01),
            names.clone(),
            &[w.shallow_clone()],
        )
        .unwrap();
        for _ in 0..3 {
            set_grad(&w, &[0.3, -0.1, 2.0, 0.7]);
            opt.step(&[w.shallow_clone()]).unwrap();
        }
        opt.save(&path).unwrap();
        let mut restored = InnerOptimizer::new(
            InnerConfig::adamw(0.01),
            names.clone(),
            &[w.shallow_clone()],
        )
        .unwrap();
        restored.load(&path).unwrap();
        assert_eq!(restored.steps(), 3);
        assert_eq!(values(&restored.m[0]), values(&opt.m[0]));
        assert_eq!(values(&restored.v[0]), values(&opt.v[0]));
        assert!(values(&restored.v[0]).iter().all(|&x| x > 0.0));
        // The same next step from both.
        let w2 = w.detach().copy().set_requires_grad(true);
        set_grad(&w, &[0.1, 0.1, 0.1, 0.1]);
        set_grad(&w2, &[0.1, 0.1, 0.1, 0.1]);
        opt.step(&[w.shallow_clone()]).unwrap();
        restored.step(&[w2.shallow_clone()]).unwrap();
        assert_eq!(values(&w), values(&w2));
        // A state for another shape is refused with a reason.
        let other = param(&[1.0, 2.0], &[2]);
        let mut wrong = InnerOptimizer::new(InnerConfig::adamw(0.01), names, &[other]).unwrap();
        let err = wrong.load(&path).unwrap_err().to_string();
        assert!(err.contains("expected"), "{err}");
        assert!(wrong.load(&dir.path().join("missing")).is_err());
    }
}
