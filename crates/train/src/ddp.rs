//! Data parallelism with DDP semantics: every rank computes gradients on
//! its slice of the global batch, then gradients are summed across ranks in
//! flat buckets (about 25 MB each) and scaled so every rank holds the
//! gradient of the global batch's mean loss. Every rank then clips the same
//! global norm and takes the same optimizer step, so parameters stay
//! bitwise identical.
//!
//! The training loops see only this type; which collective carries the
//! bytes (TCP ring on CPU, NCCL on GPU, nothing for one process) is decided
//! when it is built.

use crate::bucket_hooks::{BucketHooks, Mode, Progress};
use crate::config::StateSharding;
use crate::optim::{AdamW, AdamWConfig};
use crate::{Result, TrainError};
use dalle_collective::{Collective, NcclCollective, SHARD_ALIGN, shard_range};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// One process, no peers: every collective is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> dalle_collective::Result<()> {
        Ok(())
    }
    /// One shard, the whole buffer, already summed.
    fn reduce_scatter_sum(&mut self, _: &mut [f32]) -> dalle_collective::Result<()> {
        Ok(())
    }
    /// One shard, the whole buffer, already in place.
    fn all_gather(&mut self, _: &mut [f32]) -> dalle_collective::Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [u8], _: usize) -> dalle_collective::Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> dalle_collective::Result<()> {
        Ok(())
    }
}

/// Default gradient bucket: 25 MB of f32.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// What a rank reports when a step ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepEnd {
    /// Steps finished (global, the same on every rank).
    pub step: u64,
    /// The loss (mean over every rank's samples) of the latest step whose
    /// losses were read off the device: they are read at log and
    /// checkpoint steps (`crate::deferred`), so this trails by up to a log
    /// window; NaN before the first read.
    pub loss: f64,
    /// Samples per second this rank trained on (a coordinator sums them).
    pub samples_per_second: f64,
    /// Share of this rank's step time spent waiting on data (0..1).
    pub data_wait: f64,
}

/// Called when every step ends: reports progress (to a coordinator) and may
/// stop training at this step boundary by returning an error.
pub type StepHook = Box<dyn FnMut(&StepEnd) -> Result<()> + Send>;

/// What carries the bytes between ranks.
enum Carrier {
    /// Any collective on host memory (the TCP ring, one process alone).
    Host(Box<dyn Collective>),
    /// NCCL: gradient buckets stay on the GPU.
    Nccl(Box<NcclCollective>),
}

/// The group's connection: what carries the bytes, the host staging of
/// one bucket, and the time spent in collectives. Shared (behind a mutex)
/// between the training thread, the gradient hooks of sharded gradients,
/// which reduce buckets from inside backward, and the communication thread
/// of overlapped reduction; the training thread's own collectives wait
/// until that thread is idle (`DataParallel::link`), so collectives never
/// interleave.
pub(crate) struct Link {
    carrier: Carrier,
    /// Host staging for one bucket, kept between steps.
    host: Vec<f32>,
    /// Time spent in collectives since [`DataParallel::take_comm_time`].
    comm_time: Duration,
}

/// A [`Link`] shared with gradient hooks.
pub(crate) type SharedLink = Arc<Mutex<Link>>;

/// Locks `link`; a panic elsewhere while holding it leaves it usable (the
/// collective itself reports a broken group).
pub(crate) fn lock(link: &SharedLink) -> MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Link {
    /// The collective as seen by host-memory calls.
    fn collective(&mut self) -> &mut dyn Collective {
        match &mut self.carrier {
            Carrier::Host(c) => c.as_mut(),
            Carrier::Nccl(c) => c.as_mut(),
        }
    }

    /// Gives every rank rank `root`'s `bytes`.
    pub(crate) fn broadcast(&mut self, bytes: &mut [u8], root: usize, what: &str) -> Result<()> {
        self.collective()
            .broadcast(bytes, root)
            .map_err(collective_error(what))
    }

    /// Sums `values` over ranks.
    pub(crate) fn sum(&mut self, values: &mut [f32], what: &str) -> Result<()> {
        self.timed(|c| c.all_reduce_sum(values))
            .map_err(collective_error(what))
    }

    /// Runs `call` on the collective, its time counted as communication.
    fn timed<T>(&mut self, call: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let started = Instant::now();
        let result = call(self.collective());
        self.comm_time += started.elapsed();
        result
    }

    /// Runs `reduction` on `bucket` (a contiguous slice of a flat buffer),
    /// in place.
    pub(crate) fn reduce(&mut self, bucket: &Tensor, reduction: Reduction) -> Result<()> {
        let started = Instant::now();
        let result = self.reduce_untimed(bucket, reduction, Completion::Wait);
        self.comm_time += started.elapsed();
        result
    }

    /// [`Link::reduce`] off the training thread, while backward runs: its
    /// time is not the step's (what the step waits for is counted where it
    /// waits). On NCCL it returns once the reduction is queued on NCCL's
    /// stream, so the next bucket follows with no host wait in between;
    /// [`Link::wait_queued`] waits for them all.
    pub(crate) fn reduce_overlapped(
        &mut self,
        bucket: &Tensor,
        reduction: Reduction,
    ) -> Result<()> {
        self.reduce_untimed(bucket, reduction, Completion::Queue)
    }

    /// Waits for the reductions [`Link::reduce_overlapped`] left queued on
    /// NCCL's stream (nothing on the host carrier, whose reductions are done
    /// when they return). Returns how long it waited for communication
    /// alone: first it waits, uncounted, for the compute queued before
    /// (what is left of backward), so compute still in flight is not
    /// reported as communication.
    pub(crate) fn wait_queued(&mut self) -> Result<Option<Duration>> {
        let Carrier::Nccl(nccl) = &mut self.carrier else {
            return Ok(None);
        };
        nccl.wait_for_compute()
            .map_err(collective_error("waiting for backward"))?;
        let started = Instant::now();
        nccl.wait_queued()
            .map_err(collective_error("gradient reduction"))?;
        Ok(Some(started.elapsed()))
    }

    fn reduce_untimed(
        &mut self,
        bucket: &Tensor,
        reduction: Reduction,
        completion: Completion,
    ) -> Result<()> {
        let elems = bucket.numel();
        let mut bucket = bucket.shallow_clone();
        if let Reduction::Sum(scale) | Reduction::Scatter(scale) = reduction {
            tch::no_grad(|| {
                let _ = bucket.g_mul_scalar_(scale);
            });
        }
        let what = reduction.describe();
        match &mut self.carrier {
            Carrier::Nccl(nccl) if bucket.device().is_cuda() && bucket.kind() == Kind::Float => {
                let ptr = bucket.data_ptr() as u64;
                // SAFETY: `bucket` is a contiguous f32 CUDA slice of `elems`
                // values, a view of a flat buffer that outlives the step.
                // Waited for, NCCL is done with it when this returns; queued,
                // nothing reads or writes the bucket until the step's
                // `wait_queued` (backward is done with it, and a late
                // gradient fails the step).
                unsafe {
                    match (reduction, completion) {
                        (Reduction::Sum(_), Completion::Wait) => {
                            nccl.all_reduce_sum_raw(ptr, elems)
                        }
                        (Reduction::Sum(_), Completion::Queue) => {
                            nccl.enqueue_all_reduce_sum_raw(ptr, elems)
                        }
                        (Reduction::Scatter(_), Completion::Wait) => {
                            nccl.reduce_scatter_sum_raw(ptr, elems)
                        }
                        (Reduction::Scatter(_), Completion::Queue) => {
                            nccl.enqueue_reduce_scatter_sum_raw(ptr, elems)
                        }
                        (Reduction::Gather, _) => nccl.all_gather_raw(ptr, elems),
                    }
                }
                .map_err(collective_error(what))?;
            }
            _ if bucket.device() == Device::Cpu
                && bucket.kind() == Kind::Float
                && bucket.is_contiguous() =>
            {
                // The ring reduces the gradients where they lie: no copy
                // to staging and back, no allocation per bucket.
                // SAFETY: `bucket` is a contiguous f32 CPU slice of `elems`
                // values that outlives the call; nothing else writes it
                // meanwhile (backward is done with a bucket before it is
                // reduced, and a late gradient fails the step).
                let values =
                    unsafe { std::slice::from_raw_parts_mut(bucket.data_ptr() as *mut f32, elems) };
                reduction
                    .on_host(self.collective(), values)
                    .map_err(collective_error(what))?;
            }
            _ => {
                let host = bucket.to_device(Device::Cpu).to_kind(Kind::Float);
                self.host.resize(elems, 0.0);
                host.copy_data(&mut self.host, elems);
                let mut values = std::mem::take(&mut self.host);
                let reduced = reduction
                    .on_host(self.collective(), &mut values)
                    .map_err(collective_error(what));
                self.host = values;
                reduced?;
                let summed = Tensor::from_slice(&self.host)
                    .to_device(bucket.device())
                    .to_kind(bucket.kind());
                tch::no_grad(|| bucket.copy_(&summed));
            }
        }
        Ok(())
    }
}

/// Whether a reduction on the GPU returns when it is done or when it is
/// queued (see [`Link::reduce_overlapped`]); host reductions are always done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Completion {
    Wait,
    Queue,
}

/// How flat buffers split into buckets (the unit of reduction) and each
/// bucket into the ranks' shards, for one rank of a group.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buckets {
    elems: usize,
    rank: usize,
    world: usize,
}

impl Buckets {
    /// The buckets of a flat buffer of `elements`.
    pub(crate) fn of(&self, elements: i64) -> impl Iterator<Item = Range<i64>> + use<> {
        let bucket = self.elems as i64;
        (0..elements)
            .step_by(bucket.max(1) as usize)
            .map(move |start| start..(start + bucket).min(elements))
    }

    /// This rank's shard of `bucket`.
    pub(crate) fn shard_of(&self, bucket: &Range<i64>, rank: usize) -> Range<i64> {
        let shard = shard_range((bucket.end - bucket.start) as usize, self.world, rank);
        bucket.start + shard.start as i64..bucket.start + shard.end as i64
    }

    /// Every rank's shard of every bucket, bucket by bucket, rank by rank:
    /// where a reduction leaves each rank's share, and the pieces a
    /// global gradient norm is summed from (in this order, whatever the
    /// sharding, so sharded and unsharded training agree bitwise).
    pub(crate) fn shards(&self, elements: i64) -> Vec<Range<i64>> {
        let this = *self;
        self.of(elements)
            .flat_map(|bucket| (0..this.world).map(move |rank| this.shard_of(&bucket, rank)))
            .collect()
    }

    /// This rank's shards of a flat buffer of `elements`.
    pub(crate) fn owned(&self, elements: i64) -> Vec<Range<i64>> {
        self.of(elements)
            .map(|bucket| self.shard_of(&bucket, self.rank))
            .collect()
    }
}

pub struct DataParallel {
    link: SharedLink,
    rank: usize,
    world: usize,
    bucket_elems: usize,
    /// Whether optimizers reduce gradient buckets during backward
    /// (`run.overlap_reduction`).
    overlap: bool,
    /// The latest optimizer's communication thread, which collectives of
    /// this thread must not interleave with.
    in_flight: Option<Arc<Progress>>,
    hook: Option<StepHook>,
    /// Which group of which job this is, for fencing its checkpoints.
    group: Option<Fence>,
}

use dalle_store::checkpoint::Fence;

fn collective_error(what: &str) -> impl FnOnce(dalle_collective::Error) -> TrainError + '_ {
    move |e| TrainError::Collective(format!("{what}: {e}"))
}

impl DataParallel {
    pub fn new(comm: Box<dyn Collective>, bucket_bytes: usize) -> Self {
        Self::with_carrier(Carrier::Host(comm), bucket_bytes)
    }

    /// Data parallelism over NCCL: CUDA gradients are reduced in place on
    /// the device.
    pub fn nccl(comm: NcclCollective, bucket_bytes: usize) -> Self {
        Self::with_carrier(Carrier::Nccl(Box::new(comm)), bucket_bytes)
    }

    fn with_carrier(carrier: Carrier, bucket_bytes: usize) -> Self {
        let (rank, world) = match &carrier {
            Carrier::Host(c) => (c.rank(), c.world_size()),
            Carrier::Nccl(c) => (c.rank(), c.world_size()),
        };
        Self {
            link: Arc::new(Mutex::new(Link {
                carrier,
                host: Vec::new(),
                comm_time: Duration::ZERO,
            })),
            rank,
            world,
            // Whole shard units, so that every bucket and every shard of
            // one starts aligned (see `dalle_collective::SHARD_ALIGN`).
            bucket_elems: (bucket_bytes / 4).max(1).next_multiple_of(SHARD_ALIGN),
            overlap: true,
            in_flight: None,
            hook: None,
            group: None,
        }
    }

    /// Whether optimizers built from now on reduce gradient buckets while
    /// backward runs (the default; `run.overlap_reduction`), on the host
    /// carrier, or after backward.
    pub fn with_overlap(mut self, overlap: bool) -> Self {
        self.overlap = overlap;
        self
    }

    /// The link for a collective of this thread, once the communication
    /// thread has finished what it was given (its failure is this
    /// collective's).
    fn link(&self) -> Result<MutexGuard<'_, Link>> {
        if let Some(progress) = &self.in_flight {
            progress.wait_idle()?;
        }
        Ok(lock(&self.link))
    }

    /// Names this group (the job's epoch and the generation): its writer
    /// claims the run's checkpoints, and a writer of an older group can no
    /// longer commit or delete them.
    pub fn with_group(mut self, group: Fence) -> Self {
        self.group = Some(group);
        self
    }

    /// The group, if named.
    pub fn group(&self) -> Option<Fence> {
        self.group
    }

    /// Gives every rank rank 0's `bytes`.
    pub fn broadcast_from_leader(&mut self, bytes: &mut [u8], what: &str) -> Result<()> {
        self.broadcast_from(0, bytes, what)
    }

    /// Gives every rank rank `root`'s `bytes`.
    pub fn broadcast_from(&mut self, root: usize, bytes: &mut [u8], what: &str) -> Result<()> {
        self.link()?.broadcast(bytes, root, what)
    }

    /// Calls `hook` at the end of every step (see [`StepHook`]).
    pub fn with_step_hook(mut self, hook: StepHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The end of a step: hands it to the hook, whose error stops training.
    pub fn end_step(&mut self, end: &StepEnd) -> Result<()> {
        match &mut self.hook {
            Some(hook) => hook(end),
            None => Ok(()),
        }
    }

    /// One process training alone.
    pub fn solo() -> Self {
        Self::new(Box::new(Solo), DEFAULT_BUCKET_BYTES)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// How this rank's flat buffers split into buckets and shards.
    pub(crate) fn bucket_layout(&self) -> Buckets {
        Buckets {
            elems: self.bucket_elems,
            rank: self.rank,
            world: self.world,
        }
    }

    /// Whether this rank writes the job's files (weights, metrics).
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// Makes every rank start from rank 0's parameters (built from the
    /// run's seed everywhere, but one build of libtorch may initialise
    /// differently from another), then checks that they agree.
    pub fn share_initial_parameters(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        for (_, p) in params {
            let values = p
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1);
            let mut bytes: Vec<u8> = Vec::<f32>::try_from(values)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            self.broadcast_from_leader(&mut bytes, "sharing initial weights")?;
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let mut p = p.shallow_clone();
            let source = Tensor::from_slice(&values)
                .view(p.size().as_slice())
                .to_kind(p.kind())
                .to_device(p.device());
            tch::no_grad(|| p.copy_(&source));
        }
        self.verify_identical(params)
    }

    /// Checks that every rank holds the same parameters (at the start: all
    /// built from the run's seed): rank 0's digest is broadcast and compared.
    pub fn verify_identical(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        let mine = digest(params)?;
        let mut theirs = mine.to_le_bytes();
        self.broadcast_from_leader(&mut theirs, "verifying initial weights")?;
        let leader = u64::from_le_bytes(theirs);
        if leader != mine {
            return Err(TrainError::Collective(format!(
                "rank {} holds different parameters than rank 0 (digest {mine:016x} vs \
                 {leader:016x}): different libtorch builds or devices across workers?",
                self.rank()
            )));
        }
        Ok(())
    }

    /// [`Self::verify_identical`] after every `every`-th step (0: never), to
    /// catch ranks drifting apart (a non-deterministic kernel, a bug).
    pub fn verify_every(
        &mut self,
        step: u64,
        every: u64,
        params: &[(String, Tensor)],
    ) -> Result<()> {
        if self.world_size() > 1 && every > 0 && step.is_multiple_of(every) {
            self.verify_identical(params)
                .map_err(|e| TrainError::Collective(format!("after step {step}: {e}")))?;
        }
        Ok(())
    }

    /// Returns once every rank has called it (between stages that one rank
    /// prepares for all).
    pub fn barrier(&mut self) -> Result<()> {
        self.link()?
            .collective()
            .barrier()
            .map_err(collective_error("waiting for every rank"))
    }

    /// Sums `values` over ranks.
    pub fn sum(&mut self, values: &mut [f32]) -> Result<()> {
        self.link()?.sum(values, "summing metrics")
    }

    /// Time spent in collectives since the last call.
    pub fn take_comm_time(&mut self) -> Duration {
        std::mem::take(&mut lock(&self.link).comm_time)
    }

    /// Means over every rank's samples of per-rank means `values` over
    /// `samples` samples each, and the global sample count (for log lines;
    /// one process keeps its f64 values untouched).
    pub fn global_means(&mut self, values: &[f64], samples: usize) -> Result<(Vec<f64>, usize)> {
        let mut steps = self.global_means_of_steps(&[values.to_vec()], &[samples])?;
        Ok(steps.pop().expect("one step in, one out"))
    }

    /// [`DataParallel::global_means`] of several steps at once, in one
    /// collective: `values[i]` are this rank's means at step i over
    /// `samples[i]` samples. Each step's figures are those its own
    /// `global_means` would give.
    pub fn global_means_of_steps(
        &mut self,
        values: &[Vec<f64>],
        samples: &[usize],
    ) -> Result<Vec<(Vec<f64>, usize)>> {
        if self.world_size() == 1 {
            return Ok(values
                .iter()
                .cloned()
                .zip(samples.iter().copied())
                .collect());
        }
        let mut sums: Vec<f32> = values
            .iter()
            .zip(samples)
            .flat_map(|(v, &n)| v.iter().map(move |x| (x * n as f64) as f32))
            .collect();
        sums.extend(samples.iter().map(|&n| n as f32));
        self.sum(&mut sums)?;
        let (sums, totals) = sums.split_at(sums.len() - samples.len());
        let width = sums.len() / samples.len().max(1);
        let mut rows = sums.chunks(width.max(1));
        Ok(totals
            .iter()
            .map(|&total| {
                let total = f64::from(total);
                let row = rows.next().unwrap_or_default();
                let means = row.iter().map(|s| f64::from(*s) / total.max(1.0)).collect();
                (means, total as usize)
            })
            .collect())
    }

    /// The mean over every rank's samples of a per-rank mean `local`
    /// (any shape, over `samples` samples), detached, on `local`'s device.
    /// One process returns it as it is.
    pub fn global_mean_tensor(&mut self, local: &Tensor, samples: usize) -> Result<Tensor> {
        let local = local.detach();
        if self.world_size() == 1 {
            return Ok(local);
        }
        let host = (&local * samples as f64)
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .flatten(0, -1);
        let mut sums = Vec::<f32>::try_from(&host)?;
        sums.push(samples as f32);
        self.sum(&mut sums)?;
        let total = f64::from(sums.pop().expect("count pushed")).max(1.0);
        Ok((Tensor::from_slice(&sums) / total)
            .view(local.size().as_slice())
            .to_device(local.device()))
    }

    /// Every rank's rows of `local` `(n_r, E)`, stacked in rank order:
    /// `(Σ n_r, E)`, detached, on `local`'s device, and where this rank's
    /// rows start. Ranks may hold different row counts (bad samples
    /// skipped). For losses that compare each sample with every other of
    /// the global batch (the reranker's contrastive loss).
    pub fn gather_rows(&mut self, local: &Tensor) -> Result<(Tensor, usize)> {
        let local = local.detach();
        if self.world_size() == 1 {
            return Ok((local, 0));
        }
        let (rows, width) = local
            .size2()
            .map_err(|e| TrainError::Collective(format!("gathering rows of a non-matrix: {e}")))?;
        let (rank, world) = (self.rank(), self.world_size());
        let mut counts = vec![0f32; world];
        counts[rank] = rows as f32;
        self.sum(&mut counts)?;
        let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
        let offset: usize = counts[..rank].iter().sum();
        let total: usize = counts.iter().sum();
        let width = width as usize;
        let mut all = vec![0f32; total * width];
        let mine = Vec::<f32>::try_from(
            local
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .flatten(0, -1),
        )?;
        all[offset * width..(offset + rows as usize) * width].copy_from_slice(&mine);
        self.sum(&mut all)?;
        let gathered = Tensor::from_slice(&all)
            .view([total as i64, width as i64])
            .to_kind(local.kind())
            .to_device(local.device());
        Ok((gathered, offset))
    }

    /// An AdamW over `named` for this group: with `sharding` on, this rank
    /// keeps moments for and updates only its share of every gradient
    /// bucket ([`DataParallel::update`] gathers the rest); with
    /// `"gradients"` it also keeps only that share of the gradients, which
    /// hooks on the parameters reduce into it during backward. Otherwise,
    /// with overlap on, hooks hand each bucket to a communication thread as
    /// soon as backward has written it ([`crate::bucket_hooks`]): the ring
    /// reduces it there, NCCL queues it on its own stream.
    pub fn optimizer(
        &mut self,
        named: Vec<(String, Tensor)>,
        config: AdamWConfig,
        sharding: StateSharding,
    ) -> Result<AdamW> {
        let layout = self.bucket_layout();
        let owned = |elements| layout.owned(elements);
        let grouped = self.world_size() > 1;
        let (mut optimizer, mode) = if grouped && sharding.shards_gradients() {
            let optimizer = AdamW::sharded_gradients(named, config, &owned);
            (optimizer, Some(Mode::ShardGradients))
        } else {
            let scatter = grouped && sharding.shards_optimizer();
            let optimizer = if scatter {
                AdamW::sharded(named, config, &owned)
            } else {
                AdamW::new(named, config)
            };
            let overlap = grouped && self.overlap;
            (optimizer, overlap.then_some(Mode::Overlap { scatter }))
        };
        if let Some(mode) = mode {
            let hooks = BucketHooks::install(&optimizer, layout, self.link.clone(), mode)?;
            self.in_flight = hooks.progress();
            optimizer.attach_bucket_hooks(hooks);
        }
        Ok(optimizer)
    }

    /// Before the first backward of a step in which this rank trains on
    /// `local_samples` in `passes` backward passes (micro-batches): the
    /// hooks reduce buckets as backward writes them, scaled by this rank's
    /// share of the global batch, so the global sample count is summed
    /// here, and so is the largest number of passes: with sharded
    /// gradients a rank with fewer (bad samples skipped) reduces zeros for
    /// the rest, since every rank must run the same collectives. Without
    /// hooks there is nothing to do ([`DataParallel::update`] sums the
    /// count); a step that skips this is reduced after backward (or fails,
    /// with sharded gradients).
    pub fn begin_step(
        &mut self,
        optimizer: &mut AdamW,
        local_samples: usize,
        passes: usize,
    ) -> Result<()> {
        let Some(hooks) = optimizer.bucket_hooks() else {
            return Ok(());
        };
        // The count, then each rank's passes at its own place.
        let mut counts = vec![0f32; 1 + self.world];
        counts[0] = local_samples as f32;
        counts[1 + self.rank] = passes as f32;
        self.sum(&mut counts)?;
        let total = global_samples(counts[0])?;
        let most_passes = counts[1..].iter().fold(0f32, |a, &b| a.max(b)) as usize;
        hooks.begin(
            local_samples as f64 / total as f64,
            total,
            passes,
            most_passes,
        );
        Ok(())
    }

    /// One optimizer step of the group: the gradients (each rank's the mean
    /// over its `local_samples`) become those of the mean over every
    /// rank's samples, so ranks with fewer samples (bad samples skipped)
    /// weigh less; they are clipped to the global norm `max_norm` if set,
    /// and `optimizer` steps at `lr`. The gradients are the optimizer's
    /// flat buffers, reduced in place a bucket (a slice of one) at a time,
    /// with nothing gathered or copied back parameter by parameter.
    ///
    /// A sharded optimizer has each bucket reduce-scattered instead of
    /// all-reduced, updates its share, and the parameters are all-gathered:
    /// after this, gradients outside the rank's share are meaningless.
    /// Sharded gradients were reduced during backward (after
    /// [`DataParallel::begin_step`]); what backward left is reduced here.
    pub fn update(
        &mut self,
        optimizer: &mut AdamW,
        local_samples: usize,
        lr: f64,
        max_norm: Option<f64>,
    ) -> Result<Update> {
        let samples = match optimizer.bucket_hooks() {
            Some(hooks) if hooks.in_step() || hooks.shards_gradients() => {
                let (samples, waited) = hooks.finish()?;
                // What the step waited for after backward: the exposed
                // communication.
                lock(&self.link).comm_time += waited;
                samples
            }
            _ => self.average_gradients(optimizer, local_samples)?,
        };
        let norm = self.grad_norm(optimizer)?;
        if let Some(max_norm) = max_norm {
            optimizer.clip_to(&norm, max_norm);
        }
        optimizer.step(lr);
        if optimizer.is_sharded() {
            for flat in optimizer.flat_params() {
                self.reduce_flat(&flat, Reduction::Gather)?;
            }
        }
        Ok(Update {
            samples,
            grad_norm: norm.detach(),
        })
    }

    /// Averages the flat gradients over ranks (see [`DataParallel::update`]);
    /// returns the global sample count.
    fn average_gradients(&mut self, optimizer: &AdamW, local_samples: usize) -> Result<usize> {
        if self.world_size() == 1 {
            return Ok(local_samples);
        }
        let mut count = [local_samples as f32];
        self.sum(&mut count)?;
        let total = global_samples(count[0])?;
        let scale = local_samples as f64 / total as f64;
        let reduction = if optimizer.is_sharded() {
            Reduction::Scatter(scale)
        } else {
            Reduction::Sum(scale)
        };
        for flat in optimizer.flat_grads() {
            self.reduce_flat(&flat, reduction)?;
        }
        Ok(total)
    }

    /// The global L2 norm of the reduced gradients, on the device: summed
    /// from every shard's sum of squares in one fixed order; with a
    /// sharded optimizer each rank sums its own shards and the rest come
    /// from the others.
    fn grad_norm(&mut self, optimizer: &AdamW) -> Result<Tensor> {
        let layout = self.bucket_layout();
        let lengths = optimizer.flat_lengths();
        let shards: Vec<Vec<Range<i64>>> = lengths.iter().map(|&n| layout.shards(n)).collect();
        let squares = if optimizer.is_sharded() {
            let owned: Vec<Vec<Range<i64>>> = lengths.iter().map(|&n| layout.owned(n)).collect();
            let mine = Vec::<f32>::try_from(optimizer.square_sums(&owned).to_device(Device::Cpu))?;
            // Each rank's sums at their places in the fixed order, zeros
            // elsewhere: the sum over ranks is exact.
            let (rank, world) = (self.rank(), self.world_size());
            let mut all = vec![0f32; shards.iter().map(Vec::len).sum()];
            for (at, value) in (rank..all.len()).step_by(world).zip(mine) {
                all[at] = value;
            }
            self.sum(&mut all)?;
            let device = optimizer
                .flat_params()
                .first()
                .map_or(Device::Cpu, Tensor::device);
            Tensor::from_slice(&all).to_device(device)
        } else {
            optimizer.square_sums(&shards)
        };
        Ok(squares.sum(Kind::Float).sqrt())
    }

    /// Runs `reduction` on a flat buffer, one bucket (a slice of it) at a
    /// time, in place.
    fn reduce_flat(&mut self, flat: &Tensor, reduction: Reduction) -> Result<()> {
        let mut link = self.link()?;
        for bucket in self.bucket_layout().of(flat.numel() as i64) {
            let len = bucket.end - bucket.start;
            link.reduce(&flat.narrow(0, bucket.start, len), reduction)?;
        }
        Ok(())
    }
}

/// Backward passes over `samples` in micro-batches of `micro` (0 or more
/// than `samples`: one pass), as the training loops slice a batch.
pub fn backward_passes(samples: usize, micro: usize) -> usize {
    match (samples, micro) {
        (0, _) => 0,
        (_, 0) => 1,
        _ => samples.div_ceil(micro.min(samples)),
    }
}

/// The global batch's sample count, summed over ranks as an f32; a step in
/// which no rank had a sample cannot be averaged.
fn global_samples(summed: f32) -> Result<usize> {
    if summed <= 0.0 {
        return Err(TrainError::Collective(
            "no rank had a sample this step".into(),
        ));
    }
    Ok(summed as usize)
}

/// What one optimizer step of the group gave.
#[derive(Debug)]
pub struct Update {
    /// Samples over every rank this step.
    pub samples: usize,
    /// The global gradient norm before clipping: a scalar on the device,
    /// read when a log line needs it (reading it here would wait for the
    /// step's kernels).
    pub grad_norm: Tensor,
}

/// What happens to one bucket of a flat buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reduction {
    /// Scaled, then summed over ranks on every rank.
    Sum(f64),
    /// Scaled, then summed over ranks into each rank's shard.
    Scatter(f64),
    /// Every rank's shard copied to every rank.
    Gather,
}

impl Reduction {
    /// Runs the collective on host values, in place (the scale is applied
    /// before).
    fn on_host(
        self,
        comm: &mut dyn Collective,
        values: &mut [f32],
    ) -> dalle_collective::Result<()> {
        match self {
            Reduction::Sum(_) => comm.all_reduce_sum(values),
            Reduction::Scatter(_) => comm.reduce_scatter_sum(values),
            Reduction::Gather => comm.all_gather(values),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Reduction::Sum(_) | Reduction::Scatter(_) => "averaging gradients",
            Reduction::Gather => "gathering the sharded optimizer's parameters",
        }
    }
}

/// Runs `init` right after seeding libtorch's generator with `seed`, with
/// no other seeded initialisation of this process in between: the
/// generator is process-wide, and two trainers in one process (ranks as
/// threads in tests, an application embedding us) would otherwise draw
/// from each other's streams and build different weights.
pub fn seeded<T>(seed: u64, init: impl FnOnce() -> T) -> T {
    exclusive(|| {
        tch::manual_seed(seed as i64);
        init()
    })
}

/// Runs `build` with no seeded initialisation of this process running
/// meanwhile: for building a model whose random initial values are
/// overwritten (loading weights), which still draws from the generator.
pub fn exclusive<T>(build: impl FnOnce() -> T) -> T {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    build()
}

/// The seed of libtorch's generator for one step of one rank. Reseeding
/// every step makes the step's random draws (Gumbel noise, dropout) a pure
/// function of (run seed, rank, step): a resumed run draws exactly what an
/// uninterrupted one would, with no generator state to checkpoint, and
/// ranks draw distinct noise for their distinct samples.
pub fn step_seed(run_seed: u64, rank: usize, step: u64) -> i64 {
    let mix = |h: u64, v: u64| (h ^ v).wrapping_mul(0x0100_0000_01B3).rotate_left(31);
    let h = [rank as u64, step]
        .into_iter()
        .fold(run_seed ^ 0x9E37_79B9_7F4A_7C15, mix);
    (h >> 1) as i64
}

/// A digest of parameter values (names and bytes), equal on two ranks
/// exactly when their parameters are bitwise equal (up to hash collisions).
pub fn digest(params: &[(String, Tensor)]) -> Result<u64> {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (name, p) in params {
        hasher.write(name.as_bytes());
        let values = p
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1);
        let values = Vec::<f32>::try_from(values)?;
        for v in values {
            hasher.write_u32(v.to_bits());
        }
    }
    Ok(hasher.finish())
}
