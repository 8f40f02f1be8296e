//! Gradient buckets reduced during backward, as soon as backward has
//! written them, through a hook on every parameter
//! ([`dalle_autograd::on_accumulated`], which runs right after a
//! parameter's gradient has been accumulated). Two uses:
//!
//! - **Overlap** (unsharded and ZeRO-1 training): the gradients live in
//!   the optimizer's flat buffers, as without hooks; a bucket whose every
//!   parameter has had its last pass's gradient is handed to a
//!   communication thread, which reduces it in place (the ring is its own
//!   threads' sockets) while backward computes the next ones. On NCCL the
//!   thread only queues each reduction on NCCL's stream, after the compute
//!   queued so far (an event), so buckets follow each other on the GPU with
//!   no host wait between them; the step waits once for the last. The step
//!   waits only for what is left when backward ends: the exposed
//!   communication the log line reports (on NCCL, measured from when the
//!   GPU has finished backward's kernels).
//! - **Sharded gradients** (ZeRO-2, `run.sharding = "gradients"`): the
//!   parameters have no `.grad` between steps. The hook adds each gradient
//!   into a staging buffer for each bucket the parameter overlaps and drops
//!   it; a complete bucket is reduce-scattered (on the backward thread),
//!   this rank's shard is added into the optimizer's compact gradient
//!   buffer and the staging buffer is freed. Held at once: this rank's
//!   shard of the gradient plus the buckets in flight, never the whole
//!   gradient. Each pass (micro-batch) is reduced on its own, as ZeRO-2
//!   does to keep that bound, so with several passes the sum over passes
//!   comes after the sum over ranks: equal to unsharded training up to
//!   rounding, and bitwise equal with one pass per step.
//!
//! Every rank must run the same collectives in the same order, so buckets
//! are reduced in one fixed order (each pass in turn, with sharded
//! gradients): a bucket that completes out of turn waits for those before
//! it. The order is the one backward completes them in. In the first step
//! each rank reduces buckets as they complete and records the order; at
//! its end rank 0's order is broadcast and every rank checks it saw the
//! same (autograd runs the same graph the same way on every rank), or the
//! step fails before any parameter changes: the reductions could have
//! paired different buckets. From then on every rank follows that order.
//! Buckets that never completed in the first step (a parameter without a
//! gradient) come last, in reverse layout order.
//!
//! A rank with fewer passes than another this step (it skipped bad
//! samples) reduces zeros for the missing ones when the step ends
//! ([`BucketHooks::finish`]), and a bucket with a parameter that got no
//! gradient is reduced then with what it has. A gradient that arrives
//! after its bucket's last reduction of the step would be lost, so the step
//! fails naming the parameter.

use crate::ddp::{Buckets, Reduction, SharedLink, lock};
use crate::optim::AdamW;
use crate::{Result, TrainError};
use std::ops::Range;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::Tensor;

/// What the hooks do with the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Reduce the flat gradient buffers in place, on a communication
    /// thread: all-reduced, or reduce-scattered for a sharded optimizer.
    Overlap { scatter: bool },
    /// Stage, reduce-scatter and keep this rank's shard (ZeRO-2).
    ShardGradients,
}

/// The hooks of one optimizer's parameters and what they share. Dropping
/// it removes the hooks (which hold the shared state, and with it the
/// parameters: without this the two would keep each other alive) and
/// stops the communication thread.
pub struct BucketHooks {
    state: Arc<Mutex<State>>,
    leaves: Vec<Tensor>,
    /// The communication thread's queue and its progress.
    comm: Option<CommThread>,
}

/// A bucket's slice of a flat gradient buffer and what to do with it, for
/// the communication thread.
type Job = (Tensor, Reduction);

/// One parameter as the hooks see it.
struct Member {
    name: String,
    leaf: Tensor,
    /// Each bucket it overlaps.
    spans: Vec<Span>,
}

/// Where part of a parameter lies in one bucket.
struct Span {
    bucket: usize,
    /// The parameter's place among the bucket's members.
    slot: usize,
    /// Elements of the parameter, and where they start in the bucket.
    elements: Range<i64>,
    at: i64,
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
    /// How often each of them arrived since the bucket was last reduced.
    arrived: Vec<usize>,
    /// Sharded gradients: the bucket's gradient so far, allocated when its
    /// first member arrives and freed when it is reduced.
    staging: Option<Tensor>,
}

/// What the step in progress needs.
#[derive(Clone, Copy)]
struct StepPlan {
    /// This rank's share of the global batch.
    scale: f64,
    /// Samples over every rank.
    samples: usize,
    /// This rank's backward passes.
    passes: usize,
    /// Passes of the rank with the most: with sharded gradients each runs
    /// a full cycle of reductions.
    most_passes: usize,
}

struct State {
    mode: Mode,
    link: SharedLink,
    members: Vec<Member>,
    buckets: Vec<Bucket>,
    /// The optimizer's gradient buffers, one per flat buffer (compact with
    /// sharded gradients).
    grads: Vec<Tensor>,
    /// Reductions started this step: the next is of bucket
    /// `order[done % buckets]`.
    done: usize,
    /// The fixed order buckets are reduced in: until it is learnt (after
    /// the first step), the order they completed in so far.
    order: Vec<usize>,
    learnt: bool,
    step: Option<StepPlan>,
    /// The first failure inside a hook (which cannot return it), reported
    /// when the step ends.
    failure: Option<TrainError>,
    /// Overlap: where complete buckets go, and the count of those not yet
    /// reduced.
    queue: Option<Sender<Job>>,
    progress: Option<Arc<Progress>>,
    /// Sharded gradients: elements of staging buffers alive now, and the
    /// most this step.
    staged: i64,
    staged_peak: i64,
    /// The most of the last finished step.
    last_staged_peak: i64,
    /// Gradients backward wrote after the step's first reduction had
    /// started (the work that overlapped communication), this step and in
    /// the last finished one.
    arrivals_after_start: usize,
    last_arrivals_after_start: usize,
}

fn locked(state: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The communication thread of overlapped reduction: it takes bucket
/// slices in the fixed order and reduces each in place.
struct CommThread {
    progress: Arc<Progress>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the communication thread has left to do, and its first failure.
#[derive(Default)]
pub(crate) struct Progress {
    inner: Mutex<ProgressInner>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressInner {
    queued: usize,
    failure: Option<TrainError>,
}

impl Progress {
    fn inner(&self) -> MutexGuard<'_, ProgressInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn queue_one(&self) {
        self.inner().queued += 1;
    }

    fn done_one(&self, result: Result<()>) {
        let mut inner = self.inner();
        inner.queued -= 1;
        if let Err(e) = result {
            inner.failure.get_or_insert(e);
        }
        self.changed.notify_all();
    }

    /// Waits until every queued bucket is reduced; returns the first
    /// failure since the last call.
    pub(crate) fn wait_idle(&self) -> Result<()> {
        let mut inner = self.inner();
        while inner.queued > 0 {
            inner = self
                .changed
                .wait(inner)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        match inner.failure.take() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

impl CommThread {
    fn start(link: SharedLink) -> (Self, Sender<Job>) {
        let (sender, receiver): (Sender<Job>, Receiver<Job>) = channel();
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        let thread = std::thread::Builder::new()
            .name("dalle-grad-comm".into())
            .spawn(move || {
                for (bucket, reduction) in receiver {
                    let result = lock(&link).reduce_overlapped(&bucket, reduction);
                    shared.done_one(result);
                }
            })
            .expect("starting the gradient communication thread");
        (
            Self {
                progress,
                thread: Some(thread),
            },
            sender,
        )
    }
}

impl BucketHooks {
    /// Lays out `optimizer`'s buckets (as `layout` splits them) and hooks
    /// every parameter.
    pub(crate) fn install(
        optimizer: &AdamW,
        layout: Buckets,
        link: SharedLink,
        mode: Mode,
    ) -> Result<Self> {
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
                    spans.push(Span {
                        bucket: b,
                        slot: bucket.members.len(),
                        elements: from - elements.start..to - elements.start,
                        at: from - bucket.range.start,
                    });
                    bucket.members.push(index);
                    bucket.arrived.push(0);
                }
            }
            members.push(Member { name, leaf, spans });
        }
        let (comm, queue) = match mode {
            Mode::Overlap { .. } => {
                let (comm, queue) = CommThread::start(link.clone());
                (Some(comm), Some(queue))
            }
            Mode::ShardGradients => (None, None),
        };
        let leaves: Vec<Tensor> = members.iter().map(|m| m.leaf.shallow_clone()).collect();
        let state = Arc::new(Mutex::new(State {
            mode,
            link,
            order: Vec::new(),
            learnt: false,
            members,
            buckets,
            grads: optimizer.flat_grads(),
            done: 0,
            step: None,
            failure: None,
            progress: comm.as_ref().map(|c| c.progress.clone()),
            queue,
            staged: 0,
            staged_peak: 0,
            last_staged_peak: 0,
            arrivals_after_start: 0,
            last_arrivals_after_start: 0,
        }));
        for (index, leaf) in leaves.iter().enumerate() {
            let state = state.clone();
            dalle_autograd::on_accumulated(leaf, Box::new(move || locked(&state).arrive(index)))
                .map_err(|e| TrainError::Collective(format!("hooking the gradients: {e}")))?;
        }
        Ok(Self {
            state,
            leaves,
            comm,
        })
    }

    /// Whether these hooks keep only this rank's shard of the gradients.
    pub(crate) fn shards_gradients(&self) -> bool {
        locked(&self.state).mode == Mode::ShardGradients
    }

    /// The communication thread's progress, for collectives of the
    /// training thread to wait on (they must not interleave with it).
    pub(crate) fn progress(&self) -> Option<Arc<Progress>> {
        self.comm.as_ref().map(|c| c.progress.clone())
    }

    /// A step begins: this rank's gradients are scaled by `scale`, it runs
    /// `passes` backward passes, and the rank with the most runs
    /// `most_passes`.
    pub(crate) fn begin(&self, scale: f64, samples: usize, passes: usize, most_passes: usize) {
        locked(&self.state).step = Some(StepPlan {
            scale,
            samples,
            passes,
            most_passes,
        });
    }

    /// Whether a step is in progress (begun and not finished).
    pub(crate) fn in_step(&self) -> bool {
        locked(&self.state).step.is_some()
    }

    /// The step's backward passes are over: starts the reductions the
    /// step still owes (what backward left of its buckets, or zeros), so
    /// every rank runs the same collectives, and waits for all of them;
    /// returns the global sample count and how long it waited.
    pub(crate) fn finish(&self) -> Result<(usize, Duration)> {
        let started = Instant::now();
        let mut state = locked(&self.state);
        let owed = state.start_owed();
        // The communication thread does not touch the state: waiting
        // with it locked is safe, and keeps hooks out meanwhile.
        let waited = match &self.comm {
            Some(comm) => comm.progress.wait_idle(),
            None => Ok(()),
        };
        // On NCCL the thread only queued the reductions: wait for them
        // here, once, and count only what follows the end of backward's
        // compute as waiting on communication.
        let on_device = waited.and_then(|()| lock(&state.link).wait_queued());
        let result = owed
            .and(on_device)
            .and_then(|exposed| state.close_step().map(|samples| (samples, exposed)));
        state.reset();
        result.map(|(samples, exposed)| (samples, exposed.unwrap_or_else(|| started.elapsed())))
    }

    /// The most gradient elements the last finished step held in buckets
    /// waiting for their reduction at once (beyond this rank's shard): the
    /// memory sharded gradients add, at most the whole gradient.
    pub fn last_step_staged_peak(&self) -> i64 {
        locked(&self.state).last_staged_peak
    }

    /// Gradients backward wrote, in the last finished step, after the
    /// step's first reduction had started: how much of backward overlapped
    /// communication (0: every reduction waited for the last gradient).
    pub fn last_step_arrivals_after_first_reduction(&self) -> usize {
        locked(&self.state).last_arrivals_after_start
    }
}

impl Drop for BucketHooks {
    fn drop(&mut self) {
        for leaf in &self.leaves {
            let _ = dalle_autograd::clear_accumulated(leaf);
        }
        // Closing the queue ends the communication thread.
        locked(&self.state).queue = None;
        if let Some(thread) = self.comm.as_mut().and_then(|c| c.thread.take()) {
            let _ = thread.join();
        }
    }
}

impl State {
    /// Member `index`'s gradient is in its `.grad`: take it (sharded
    /// gradients), then start whatever buckets are due.
    fn arrive(&mut self, index: usize) {
        if self.failure.is_some() {
            return;
        }
        if self.step.is_none() {
            if self.mode == Mode::ShardGradients {
                let name = &self.members[index].name;
                self.failure = Some(TrainError::Collective(format!(
                    "`{name}` got a gradient outside a training step: with sharded gradients \
                     every backward must follow DataParallel::begin_step"
                )));
            }
            // Overlap outside a step: the gradient stays in the flat
            // buffer and DataParallel::update reduces it afterwards.
            return;
        }
        if self.done > 0 {
            self.arrivals_after_start += 1;
        }
        if let Err(e) = self.take_gradient(index) {
            self.failure = Some(e);
            return;
        }
        if let Err(e) = self.start_due(false) {
            self.failure = Some(e);
        }
    }

    /// Counts member `index`'s arrival in each of its buckets; with sharded
    /// gradients adds its gradient into their staging and drops it.
    fn take_gradient(&mut self, index: usize) -> Result<()> {
        let member = &self.members[index];
        let shard = self.mode == Mode::ShardGradients;
        let grad = member.leaf.grad();
        if shard && !grad.defined() {
            return Ok(());
        }
        let grad = if shard {
            Some(grad.detach().reshape([-1]))
        } else {
            None
        };
        let needed = self.needed_arrivals();
        for span in &member.spans {
            let (b, elements, at) = (span.bucket, &span.elements, span.at);
            let bucket = &mut self.buckets[b];
            bucket.arrived[span.slot] += 1;
            if let Some(grad) = &grad {
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
                    let _ = staging
                        .narrow(0, at, len)
                        .g_add_(&grad.narrow(0, elements.start, len));
                });
            }
            if !self.learnt && bucket.complete(needed) && !self.order.contains(&b) {
                self.order.push(b);
            }
        }
        if shard {
            dalle_autograd::drop_grad(&member.leaf)
                .map_err(|e| TrainError::Collective(format!("dropping a gradient: {e}")))?;
        }
        Ok(())
    }

    /// Arrivals of every member that complete a bucket: one per pass with
    /// sharded gradients (each pass is reduced), the whole step's passes
    /// otherwise (the flat buffer holds their sum).
    fn needed_arrivals(&self) -> usize {
        match (self.mode, self.step) {
            (Mode::ShardGradients, _) => 1,
            (Mode::Overlap { .. }, Some(plan)) => plan.passes.max(1),
            (Mode::Overlap { .. }, None) => usize::MAX,
        }
    }

    /// Reductions the step runs: a cycle over the buckets per pass of the
    /// rank with the most with sharded gradients, one cycle otherwise.
    fn owed(&self) -> usize {
        let cycles = match (self.mode, self.step) {
            (Mode::ShardGradients, Some(plan)) => plan.most_passes,
            (Mode::Overlap { .. }, Some(_)) => 1,
            (_, None) => 0,
        };
        cycles * self.buckets.len()
    }

    /// Starts reductions in the fixed order while the next bucket is
    /// complete (or, with `all`, until the step owes none).
    fn start_due(&mut self, all: bool) -> Result<()> {
        let (owed, needed) = (self.owed(), self.needed_arrivals());
        if all {
            // Buckets that have not completed yet go last.
            for b in (0..self.buckets.len()).rev() {
                if !self.order.contains(&b) {
                    self.order.push(b);
                }
            }
        }
        while self.done < owed {
            let Some(&b) = self.order.get(self.done % self.buckets.len()) else {
                break;
            };
            if !all && !self.buckets[b].complete(needed) {
                break;
            }
            self.start(b)?;
            self.done += 1;
        }
        Ok(())
    }

    /// Starts the reduction of bucket `b`: hands its slice of the flat
    /// gradient to the communication thread, or reduce-scatters its
    /// staging (zeros if nothing arrived), adds this rank's shard into the
    /// compact gradient and frees it.
    fn start(&mut self, b: usize) -> Result<()> {
        let plan = self.step.expect("reductions happen inside a step");
        let bucket = &mut self.buckets[b];
        bucket.arrived.iter_mut().for_each(|a| *a = 0);
        let len = bucket.range.end - bucket.range.start;
        let grads = &self.grads[bucket.flat];
        if let Some(queue) = &self.queue {
            let slice = grads.narrow(0, bucket.range.start, len);
            let reduction = match self.mode {
                Mode::Overlap { scatter: true } => Reduction::Scatter(plan.scale),
                _ => Reduction::Sum(plan.scale),
            };
            if let Some(progress) = &self.progress {
                progress.queue_one();
            }
            return queue.send((slice, reduction)).map_err(|_| {
                TrainError::Collective("the gradient communication thread is gone".into())
            });
        }
        let staging = match bucket.staging.take() {
            Some(staging) => {
                self.staged -= len;
                staging
            }
            None => Tensor::zeros([len], (grads.kind(), grads.device())),
        };
        lock(&self.link).reduce(&staging, Reduction::Scatter(plan.scale))?;
        let shard = bucket.shard.end - bucket.shard.start;
        tch::no_grad(|| {
            let _ = grads
                .narrow(0, bucket.compact_at, shard)
                .g_add_(&staging.narrow(0, bucket.shard.start - bucket.range.start, shard));
        });
        Ok(())
    }

    /// Starts every reduction the step still owes.
    fn start_owed(&mut self) -> Result<()> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        if self.step.is_none() {
            return Err(TrainError::Collective(
                "a step with gradient hooks ended without DataParallel::begin_step".into(),
            ));
        }
        self.start_due(true)
    }

    /// After every reduction of the step: refuses gradients that came too
    /// late, learns the order after the first step; the global samples.
    fn close_step(&mut self) -> Result<usize> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        let plan = self.step.expect("closing a step in progress");
        if !self.learnt {
            self.learn_order()?;
        }
        // A gradient that came after its bucket's last reduction of the
        // step (a parameter whose gradient backward accumulates more than
        // once per pass) would be lost: refuse it.
        if let Some(bucket) = self
            .buckets
            .iter()
            .find(|b| b.arrived.iter().any(|&a| a > 0))
        {
            let late: Vec<&str> = bucket
                .members
                .iter()
                .zip(&bucket.arrived)
                .filter(|(_, a)| **a > 0)
                .map(|(&m, _)| self.members[m].name.as_str())
                .collect();
            return Err(TrainError::Collective(format!(
                "{} got gradients after their bucket's last reduction of the step (more \
                 accumulations than backward passes); train with run.sharding = \"optimizer\" \
                 and run.overlap_reduction = false",
                late.join(", ")
            )));
        }
        Ok(plan.samples)
    }

    /// After the first step: checks that every rank reduced its buckets
    /// in rank 0's order (one broadcast and one sum, once per run), and
    /// keeps that order.
    fn learn_order(&mut self) -> Result<()> {
        let mine = self.order.clone();
        let mut bytes: Vec<u8> = mine
            .iter()
            .flat_map(|&b| (b as u32).to_le_bytes())
            .collect();
        let mut link = lock(&self.link);
        link.broadcast(&mut bytes, 0, "agreeing on the gradient buckets' order")?;
        let leader: Vec<usize> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .collect();
        let mut differ = [f32::from(u8::from(leader != mine))];
        link.sum(&mut differ, "agreeing on the gradient buckets' order")?;
        if differ[0] > 0.0 {
            return Err(TrainError::Collective(format!(
                "{} rank(s) completed gradient buckets in another order than rank 0 in the \
                 first step, so its reductions may have paired different buckets; the step \
                 is refused before the optimizer runs. Do the ranks train the same model? \
                 run.overlap_reduction = false (with run.sharding other than \"gradients\") \
                 reduces after backward instead",
                differ[0]
            )));
        }
        self.learnt = true;
        Ok(())
    }

    /// Ready for the next step, whatever this one's outcome.
    fn reset(&mut self) {
        self.step = None;
        self.done = 0;
        if !self.learnt {
            self.order.clear();
        }
        self.last_staged_peak = std::mem::take(&mut self.staged_peak);
        self.last_arrivals_after_start = std::mem::take(&mut self.arrivals_after_start);
        self.staged = 0;
        for bucket in &mut self.buckets {
            bucket.staging = None;
            bucket.arrived.iter_mut().for_each(|a| *a = 0);
        }
    }
}

impl Bucket {
    /// Whether every member arrived `needed` times since the last
    /// reduction.
    fn complete(&self, needed: usize) -> bool {
        self.arrived.iter().all(|&a| a >= needed)
    }
}
