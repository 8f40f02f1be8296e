//! Per-step scalars (losses, the gradient norm) that stay on the device
//! until a step that needs them on the host: a log line, a checkpoint, the
//! last step. Reading them every step would make the host wait for each
//! step's kernels to finish before it could queue the next step's, so on a
//! GPU the launch work of every step would add to its time instead of
//! overlapping it. Here the reads of a whole log window are one transfer
//! and one collective.
//!
//! Divergence is still caught at the step it happened: the first step
//! whose loss is not finite is reported, before any checkpoint of the
//! weights it produced is written (checkpoint steps read the window too).

use crate::ddp::DataParallel;
use crate::{Result, TrainError};
use tch::{Device, Kind, Tensor};

/// Scalars of steps not yet read, with what the host knew of each step.
pub struct Pending<H> {
    steps: Vec<PendingStep<H>>,
}

struct PendingStep<H> {
    step: u64,
    /// This rank's means over its samples, to be averaged over ranks; the
    /// first is the loss.
    local: Tensor,
    /// Values already the same on every rank (the global gradient norm).
    global: Tensor,
    samples: usize,
    host: H,
}

/// One step's scalars, read: `means` are the ranks' means weighted by
/// sample count, then the step's global values; `samples` is the global
/// sample count.
#[derive(Debug)]
pub struct Ready<H> {
    pub step: u64,
    pub means: Vec<f64>,
    pub samples: usize,
    pub host: H,
}

impl<H> Default for Pending<H> {
    fn default() -> Self {
        Self { steps: Vec::new() }
    }
}

impl<H> Pending<H> {
    /// Records step `step` (0-based) over `samples` local samples: `local`
    /// `(K,)` are this rank's means; `global` `(G,)` values that need no
    /// averaging (either may be empty). The first value, local or else
    /// global, is the loss. Both stay on their device, detached.
    pub fn push(&mut self, step: u64, local: &Tensor, global: &Tensor, samples: usize, host: H) {
        self.steps.push(PendingStep {
            step,
            local: local.detach().flatten(0, -1),
            global: global.detach().flatten(0, -1),
            samples,
            host,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Reads every pending step in one transfer, averages the local values
    /// over ranks in one collective (every rank must call this at the same
    /// steps), and empties the window. A step whose loss is not finite
    /// fails with [`TrainError::Diverged`], naming the first such step.
    pub fn drain(&mut self, ddp: &mut DataParallel) -> Result<Vec<Ready<H>>> {
        let steps = std::mem::take(&mut self.steps);
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Tensor> = steps
            .iter()
            .map(|s| {
                let device = s.local.device();
                Tensor::cat(&[&s.local, &s.global.to_device(device)], 0).to_kind(Kind::Double)
            })
            .collect();
        let host = Tensor::stack(&rows, 0).to_device(Device::Cpu);
        let width = host.size()[1] as usize;
        let flat = Vec::<f64>::try_from(host.flatten(0, -1))?;
        let local_width = steps[0].local.numel();
        let locals: Vec<Vec<f64>> = flat
            .chunks(width.max(1))
            .map(|row| row[..local_width].to_vec())
            .collect();
        let counts: Vec<usize> = steps.iter().map(|s| s.samples).collect();
        let averaged = ddp.global_means_of_steps(&locals, &counts)?;
        let mut ready = Vec::with_capacity(steps.len());
        for ((s, row), (mut means, samples)) in steps
            .into_iter()
            .zip(flat.chunks(width.max(1)))
            .zip(averaged)
        {
            means.extend_from_slice(&row[local_width..]);
            let loss = means[0];
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step: s.step, loss });
            }
            ready.push(Ready {
                step: s.step,
                means,
                samples,
                host: s.host,
            });
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    #[test]
    fn a_window_reads_back_every_step_in_order_with_its_host_record() {
        let mut ddp = DataParallel::solo();
        let mut pending = Pending::default();
        for step in 0..3u64 {
            let v = step as f32;
            pending.push(
                step,
                &scalars(&[v, 10.0 + v]),
                &scalars(&[0.5]),
                4,
                step * 100,
            );
        }
        let ready = pending.drain(&mut ddp).unwrap();
        assert!(pending.is_empty());
        assert_eq!(ready.len(), 3);
        for (i, r) in ready.iter().enumerate() {
            let v = i as f64;
            assert_eq!((r.step, r.samples, r.host), (i as u64, 4, i as u64 * 100));
            assert_eq!(r.means, vec![v, 10.0 + v, 0.5]);
        }
        assert!(pending.drain(&mut ddp).unwrap().is_empty());
    }

    #[test]
    fn the_first_step_with_a_loss_that_is_not_finite_is_named() {
        let mut ddp = DataParallel::solo();
        let mut pending = Pending::default();
        let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        for (step, loss) in [(7u64, 1.0f32), (8, f32::NAN), (9, f32::INFINITY)] {
            pending.push(step, &scalars(&[loss]), &empty, 2, ());
        }
        match pending.drain(&mut ddp) {
            Err(TrainError::Diverged { step, loss }) => assert!(step == 8 && loss.is_nan()),
            other => panic!("expected divergence at step 8, got {other:?}"),
        }
    }

    #[test]
    fn with_only_global_values_the_first_is_the_loss() {
        let mut ddp = DataParallel::solo();
        let mut pending = Pending::default();
        let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        pending.push(3, &empty, &scalars(&[2.5, 0.75, 1.0]), 8, ());
        let ready = pending.drain(&mut ddp).unwrap();
        assert_eq!(
            (ready[0].means.clone(), ready[0].samples),
            (vec![2.5, 0.75, 1.0], 8)
        );
        pending.push(4, &empty, &scalars(&[f32::NAN, 0.5, 1.0]), 8, ());
        match pending.drain(&mut ddp) {
            Err(TrainError::Diverged { step, .. }) => assert_eq!(step, 4),
            other => panic!("expected divergence at step 4, got {other:?}"),
        }
    }
}
