//! Sharded gradients (ZeRO-2, `run.sharding = "gradients"`): each rank
//! keeps the gradient of only the elements it updates, about 1/W of them,
//! and never holds the whole gradient at once.
//!
//! How: the parameters have no `.grad` between steps. A hook on each one
//! ([`dalle_autograd::on_accumulated`]) runs as soon as backward has
//! written its gradient: it adds the gradient into a staging buffer for
//! each bucket the parameter overlaps and drops it. When every parameter
//! of a bucket has arrived, the bucket is reduce-scattered (scaled first,
//! as data parallelism scales every rank's gradient by its share of the
//! global batch), this rank's shard is added into the optimizer's compact
//! gradient buffer and the staging buffer is freed, all while backward
//! goes on with the rest of the model. Held at once: this rank's shard of
//! the gradient plus the buckets in flight.
//!
//! Every rank must run the same collectives in the same order, so buckets
//! are reduced in one fixed order each pass (micro-batch) in turn: a
//! bucket that completes out of turn waits for those before it. The order
//! is the one backward completes them in, learnt as PyTorch's DDP learns
//! its bucket order: the first step guesses (the reverse of the flat
//! layout, which sorts parameters by name, so it may hold most buckets
//! until backward ends, still without a whole gradient during the forward
//! pass), records the order buckets completed in, and rank 0's order is
//! then broadcast once for every rank to use from the next step on. A rank with fewer passes than another this step
//! (it skipped bad samples) reduces zeros for the missing ones when the
//! step ends ([`GradShards::finish`]), and so does a rank whose parameter
//! got no gradient (its bucket is reduced with what it has).
//!
//! Exactness: with one pass per step the reduced shards are bitwise those
//! of unsharded data parallelism (the same buckets, scaled and reduced the
//! same way), so parameters stay bitwise equal to it. With several passes
//! each is reduced on its own, as ZeRO-2 does to keep its memory bound, so
//! the sum over passes is taken after the sum over ranks: equal up to
//! rounding.

use crate::ddp::{Buckets, Reduction, SharedLink, lock};
use crate::optim::AdamW;
use crate::{Result, TrainError};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use tch::Tensor;

/// The hooks of one optimizer's parameters and what they share. Dropping
/// it removes the hooks (which hold the shared state, and with it the
/// parameters: without this the two would keep each other alive).
pub struct GradShards {
    state: Arc<Mutex<State>>,
    leaves: Vec<Tensor>,
}

/// One parameter as the hooks see it.
struct Member {
    name: String,
    leaf: Tensor,
    /// Each bucket it overlaps: (bucket, elements of the parameter, where
    /// they go in the bucket).
    spans: Vec<(usize, Range<i64>, i64)>,
}

/// One bucket of one flat buffer.
struct Bucket {
    flat: usize,
    range: Range<i64>,
    /// This rank's shard of the bucket (absolute elements of the flat
    /// buffer), and where it lives in the compact gradient buffer.
    shard: Range<i64>,
    compact_at: i64,
    /// The members overlapping it.
    members: Vec<usize>,
    /// Which of them arrived since the bucket was last reduced.
    arrived: Vec<bool>,
    /// The bucket's gradient so far, allocated when its first member
    /// arrives and freed when it is reduced.
    staging: Option<Tensor>,
}

impl Bucket {
    fn complete(&self) -> bool {
        self.arrived.iter().all(|&a| a)
    }
}

/// What the step in progress needs.
#[derive(Clone, Copy)]
struct StepPlan {
    /// This rank's share of the global batch.
    scale: f64,
    /// Samples over every rank.
    samples: usize,
    /// Passes the rank with the most runs: each runs a full cycle of
    /// reductions.
    passes: usize,
}

struct State {
    link: SharedLink,
    members: Vec<Member>,
    buckets: Vec<Bucket>,
    /// The optimizer's compact gradient buffers, one per flat buffer.
    compact: Vec<Tensor>,
    /// Reductions done this step: the next is of bucket
    /// `order[done % buckets]`.
    done: usize,
    /// The fixed order buckets are reduced in, each pass.
    order: Vec<usize>,
    /// Whether `order` is the learnt one, and until it is, the order
    /// buckets completed in this step.
    learnt: bool,
    completed: Vec<usize>,
    step: Option<StepPlan>,
    /// The first failure inside a hook (which cannot return it), reported
    /// when the step ends.
    failure: Option<TrainError>,
    /// Elements of staging buffers alive now, and the most this step.
    staged: i64,
    staged_peak: i64,
    /// The most of the last finished step.
    last_staged_peak: i64,
}

fn locked(state: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl GradShards {
    /// Lays out `optimizer`'s buckets (as `layout` splits them) and hooks
    /// every parameter.
    pub(crate) fn install(optimizer: &AdamW, layout: Buckets, link: SharedLink) -> Result<Self> {
        let mut buckets = Vec::new();
        let mut first_bucket = Vec::new();
        for (flat, &elements) in optimizer.flat_lengths().iter().enumerate() {
            first_bucket.push(buckets.len());
            let mut compact_at = 0;
            for (range, shard) in layout.of(elements).zip(layout.owned(elements)) {
                buckets.push(Bucket {
                    flat,
                    shard: shard.clone(),
                    compact_at,
                    range,
                    members: Vec::new(),
                    arrived: Vec::new(),
                    staging: None,
                });
                compact_at += shard.end - shard.start;
            }
        }
        let mut members = Vec::new();
        for (index, (name, leaf, flat, elements)) in optimizer.layout().into_iter().enumerate() {
            let mut spans = Vec::new();
            let last = first_bucket.get(flat + 1).copied().unwrap_or(buckets.len());
            for (b, bucket) in buckets
                .iter_mut()
                .enumerate()
                .take(last)
                .skip(first_bucket[flat])
            {
                let (from, to) = (
                    bucket.range.start.max(elements.start),
                    bucket.range.end.min(elements.end),
                );
                if from < to {
                    spans.push((
                        b,
                        from - elements.start..to - elements.start,
                        from - bucket.range.start,
                    ));
                    bucket.members.push(index);
                    bucket.arrived.push(false);
                }
            }
            members.push(Member { name, leaf, spans });
        }
        let leaves: Vec<Tensor> = members.iter().map(|m| m.leaf.shallow_clone()).collect();
        let state = Arc::new(Mutex::new(State {
            link,
            order: (0..buckets.len()).rev().collect(),
            learnt: false,
            completed: Vec::new(),
            members,
            buckets,
            compact: optimizer.flat_grads(),
            done: 0,
            step: None,
            failure: None,
            staged: 0,
            staged_peak: 0,
            last_staged_peak: 0,
        }));
        for (index, leaf) in leaves.iter().enumerate() {
            let state = state.clone();
            dalle_autograd::on_accumulated(leaf, Box::new(move || locked(&state).arrive(index)))
                .map_err(|e| TrainError::Collective(format!("hooking the gradients: {e}")))?;
        }
        Ok(Self { state, leaves })
    }

    /// A step begins: this rank's gradients are scaled by `scale`, and
    /// `passes` cycles of reductions run over the step.
    pub(crate) fn begin(&self, scale: f64, samples: usize, passes: usize) {
        locked(&self.state).step = Some(StepPlan {
            scale,
            samples,
            passes,
        });
    }

    /// The step's backward passes are over: reduces every bucket the
    /// cycles still owe (what backward left of them, or zeros), so every
    /// rank has run the same collectives; returns the global sample count.
    pub(crate) fn finish(&self) -> Result<usize> {
        locked(&self.state).finish()
    }

    /// The most gradient elements the last finished step held in buckets
    /// waiting for their reduction at once (beyond this rank's shard): the
    /// memory sharded gradients add, at most the whole gradient.
    pub fn last_step_staged_peak(&self) -> i64 {
        locked(&self.state).last_staged_peak
    }
}

impl Drop for GradShards {
    fn drop(&mut self) {
        for leaf in &self.leaves {
            let _ = dalle_autograd::clear_accumulated(leaf);
        }
    }
}

impl State {
    /// Member `index`'s gradient is in its `.grad`: take it, then reduce
    /// whatever buckets are due.
    fn arrive(&mut self, index: usize) {
        if self.failure.is_some() {
            return;
        }
        if self.step.is_none() {
            let name = &self.members[index].name;
            self.failure = Some(TrainError::Collective(format!(
                "`{name}` got a gradient outside a training step: with sharded gradients \
                 every backward must follow DataParallel::begin_step"
            )));
            return;
        }
        let member = &self.members[index];
        let grad = member.leaf.grad();
        if grad.defined() {
            let grad = grad.detach().reshape([-1]);
            for (b, elements, at) in &member.spans {
                let bucket = &mut self.buckets[*b];
                let len = elements.end - elements.start;
                if bucket.staging.is_none() {
                    self.staged += bucket.range.end - bucket.range.start;
                    self.staged_peak = self.staged_peak.max(self.staged);
                }
                let staging = bucket.staging.get_or_insert_with(|| {
                    Tensor::zeros(
                        [bucket.range.end - bucket.range.start],
                        (grad.kind(), grad.device()),
                    )
                });
                tch::no_grad(|| {
                    let _ =
                        staging
                            .narrow(0, *at, len)
                            .g_add_(&grad.narrow(0, elements.start, len));
                });
                let slot = bucket.members.iter().position(|&m| m == index);
                bucket.arrived[slot.expect("a member of its own bucket")] = true;
                if !self.learnt && bucket.complete() && !self.completed.contains(b) {
                    self.completed.push(*b);
                }
            }
        }
        if let Err(e) = dalle_autograd::drop_grad(&member.leaf) {
            self.failure = Some(TrainError::Collective(format!("dropping a gradient: {e}")));
            return;
        }
        if let Err(e) = self.reduce_due(false) {
            self.failure = Some(e);
        }
    }

    /// Reduces buckets in the fixed order while the next one is complete
    /// (or, with `all`, until every cycle of the step is done).
    fn reduce_due(&mut self, all: bool) -> Result<()> {
        let plan = self.step.expect("reductions happen inside a step");
        let owed = plan.passes * self.buckets.len();
        while self.done < owed {
            let b = self.order[self.done % self.buckets.len()];
            if !all && !self.buckets[b].complete() {
                break;
            }
            self.reduce(b, plan.scale)?;
            self.done += 1;
        }
        Ok(())
    }

    /// Reduce-scatters bucket `b`'s staging (zeros if nothing arrived),
    /// adds this rank's shard into the compact gradient and frees it.
    fn reduce(&mut self, b: usize, scale: f64) -> Result<()> {
        let bucket = &mut self.buckets[b];
        let len = bucket.range.end - bucket.range.start;
        let compact = &self.compact[bucket.flat];
        let staging = match bucket.staging.take() {
            Some(staging) => {
                self.staged -= len;
                staging
            }
            None => Tensor::zeros([len], (compact.kind(), compact.device())),
        };
        bucket.arrived.iter_mut().for_each(|a| *a = false);
        lock(&self.link).reduce(&staging, Reduction::Scatter(scale))?;
        let shard = bucket.shard.end - bucket.shard.start;
        tch::no_grad(|| {
            let _ = compact
                .narrow(0, bucket.compact_at, shard)
                .g_add_(&staging.narrow(0, bucket.shard.start - bucket.range.start, shard));
        });
        Ok(())
    }

    /// Adopts rank 0's completion order of the first step (its buckets
    /// that never completed last, in the guessed order): the same on every
    /// rank whatever each saw.
    fn learn_order(&mut self) -> Result<()> {
        let mut order = std::mem::take(&mut self.completed);
        for b in self.order.iter() {
            if !order.contains(b) {
                order.push(*b);
            }
        }
        let mut bytes: Vec<u8> = order
            .iter()
            .flat_map(|&b| (b as u32).to_le_bytes())
            .collect();
        lock(&self.link).broadcast(&mut bytes, 0, "agreeing on the gradient buckets' order")?;
        let order: Vec<usize> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        if sorted != (0..self.buckets.len()).collect::<Vec<_>>() {
            return Err(TrainError::Collective(
                "rank 0's order of the gradient buckets is not one of this rank's buckets: do \
                 the ranks train the same model?"
                    .into(),
            ));
        }
        self.order = order;
        self.learnt = true;
        Ok(())
    }

    fn finish(&mut self) -> Result<usize> {
        let result = self.finish_cycles();
        self.step = None;
        self.done = 0;
        self.last_staged_peak = std::mem::take(&mut self.staged_peak);
        self.staged = 0;
        for bucket in &mut self.buckets {
            bucket.staging = None;
            bucket.arrived.iter_mut().for_each(|a| *a = false);
        }
        result
    }

    fn finish_cycles(&mut self) -> Result<usize> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        let Some(plan) = self.step else {
            return Err(TrainError::Collective(
                "a step with sharded gradients ended without DataParallel::begin_step".into(),
            ));
        };
        self.reduce_due(true)?;
        if !self.learnt {
            self.learn_order()?;
        }
        // A gradient that came after its bucket's last reduction of the
        // step (a parameter whose gradient backward accumulates more than
        // once per pass) would be lost: refuse it.
        if let Some(bucket) = self.buckets.iter().find(|b| b.arrived.iter().any(|&a| a)) {
            let late: Vec<&str> = bucket
                .members
                .iter()
                .zip(&bucket.arrived)
                .filter(|(_, a)| **a)
                .map(|(&m, _)| self.members[m].name.as_str())
                .collect();
            return Err(TrainError::Collective(format!(
                "sharded gradients: {} got gradients after their bucket's last reduction of the \
                 step (more accumulations than backward passes); train with run.sharding = \
                 \"optimizer\"",
                late.join(", ")
            )));
        }
        Ok(plan.samples)
    }
}
