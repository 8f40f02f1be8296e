//! AdamW (Loshchilov & Hutter) over named parameters, with its state
//! (step count and both moments) open for checkpoints — the reason it lives
//! here and not in tch, whose optimizers cannot export their state.
//!
//! Weight decay is decoupled and applies to weight matrices and kernels
//! (two or more dimensions), not to biases or gains.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's dVAE settings.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// Takes the trainable parameters, sorted by name so the state layout is
    /// the same in every process.
    pub fn new(mut named: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .filter(|(_, p)| p.requires_grad())
            .map(|(name, param)| ParamState {
                decay: param.dim() >= 2,
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
            })
            .collect();
        Self {
            config,
            params,
            step: 0,
        }
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
        }
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self) -> f64 {
        let squares: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.param.grad())
            .filter(Tensor::defined)
            .map(|g| g.square().sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        Tensor::stack(&squares, 0)
            .sum(Kind::Float)
            .sqrt()
            .double_value(&[])
    }

    /// Scales gradients so their global norm is at most `max_norm`;
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for p in &mut self.params {
                let mut g = p.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(scale);
                }
            }
        }
        norm
    }

    /// One update at learning rate `lr`. Parameters without a gradient are
    /// left alone (their moments do not move either).
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2 = 1.0 - beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.exp_avg.lerp_(&g, 1.0 - beta1);
                let _ = p.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = p.exp_avg_sq.addcmul_(&(&g * (1.0 - beta2)), &g);
                if p.decay && weight_decay > 0.0 {
                    let _ = p.param.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let denom = (&p.exp_avg_sq / bias2).sqrt() + eps;
                let _ = p.param.addcdiv_(&(&p.exp_avg * (-lr / bias1)), &denom);
            }
        });
    }

    /// The optimizer state as named tensors (`NAME.exp_avg`,
    /// `NAME.exp_avg_sq`) plus the step count, for checkpoints.
    pub fn state(&self) -> (u64, Vec<(String, Tensor)>) {
        let tensors = self
            .params
            .iter()
            .flat_map(|p| {
                [
                    (format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()),
                    (
                        format!("{}.exp_avg_sq", p.name),
                        p.exp_avg_sq.shallow_clone(),
                    ),
                ]
            })
            .collect();
        (self.step, tensors)
    }

    /// Restores a state exported by [`AdamW::state`]; every moment must be
    /// present with the parameter's shape.
    pub fn load_state(&mut self, step: u64, tensors: &[(String, Tensor)]) -> Result<(), String> {
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        for p in &mut self.params {
            for (suffix, dst) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{}.{suffix}", p.name);
                let src = find(&key).ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                if src.size() != dst.size() {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        src.size(),
                        dst.size()
                    ));
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
            .view([1, values.len() as i64])
            .set_requires_grad(true)
    }

    /// Reference AdamW in plain f64 for one scalar.
    fn reference(mut p: f64, grads: &[f64], lr: f64, cfg: AdamWConfig) -> f64 {
        let (mut m, mut v) = (0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            p *= 1.0 - lr * cfg.weight_decay;
            let (mh, vh) = (m / (1.0 - cfg.beta1.powi(t)), v / (1.0 - cfg.beta2.powi(t)));
            p -= lr * mh / (vh.sqrt() + cfg.eps);
        }
        p
    }

    #[test]
    fn matches_the_reference_update() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let w = param(&[0.5, -1.5]);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], cfg);
        let mut grads = [vec![], vec![]];
        for step in 0..5 {
            opt.zero_grad();
            // loss = sum(w³) + step·sum(w): gradient 3w² + step.
            let loss = w.pow_tensor_scalar(3).sum(Kind::Float) + w.sum(Kind::Float) * step as f64;
            loss.backward();
            let g = Vec::<f32>::try_from(w.grad().flatten(0, -1)).unwrap();
            grads[0].push(g[0] as f64);
            grads[1].push(g[1] as f64);
            opt.step(0.01);
        }
        let got = Vec::<f32>::try_from(w.detach().flatten(0, -1)).unwrap();
        for (i, start) in [0.5, -1.5].into_iter().enumerate() {
            let want = reference(start, &grads[i], 0.01, cfg);
            assert!(
                (got[i] as f64 - want).abs() < 1e-5,
                "param {i}: {} vs {want}",
                got[i]
            );
        }
        assert_eq!(opt.steps_taken(), 5);
    }

    #[test]
    fn biases_are_not_decayed() {
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("b".into(), b.shallow_clone())], cfg);
        (&b * 0.0).sum(Kind::Float).backward(); // zero gradient
        opt.step(0.1);
        assert!(b.detach().eq(1.0).all().int64_value(&[]) == 1);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let w = param(&[3.0, 4.0]);
        let mut opt = AdamW::new(
            vec![("w".into(), w.shallow_clone())],
            AdamWConfig::default(),
        );
        (&w * &w).sum(Kind::Float).backward(); // gradient (6, 8), norm 10
        assert!((opt.clip_grad_norm(1.0) - 10.0).abs() < 1e-5);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let run = |split: Option<u64>| {
            tch::manual_seed(0);
            let w = param(&[0.3, 0.7, -0.2]);
            let mut opt = AdamW::new(
                vec![("w".into(), w.shallow_clone())],
                AdamWConfig::default(),
            );
            for step in 0..6u64 {
                if Some(step) == split {
                    // Rebuild the optimizer from its exported state.
                    let (n, state) = opt.state();
                    let state: Vec<_> = state.into_iter().map(|(k, t)| (k, t.copy())).collect();
                    opt = AdamW::new(
                        vec![("w".into(), w.shallow_clone())],
                        AdamWConfig::default(),
                    );
                    opt.load_state(n, &state).unwrap();
                }
                opt.zero_grad();
                (w.pow_tensor_scalar(2) * (step + 1) as f64)
                    .sum(Kind::Float)
                    .backward();
                opt.step(0.05);
            }
            w.detach()
        };
        assert!(
            run(None).equal(&run(Some(3))),
            "bitwise equal after a state round trip"
        );
        let mut opt = AdamW::new(vec![("w".into(), param(&[1.0]))], AdamWConfig::default());
        let err = opt.load_state(1, &[]).unwrap_err();
        assert!(err.contains("w.exp_avg"), "{err}");
    }
}
