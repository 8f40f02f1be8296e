//! `dalle plan`: what one rank needs in memory to train each stage of the
//! job at its world size and micro-batch, whether that fits the device,
//! and what sharding, activation checkpointing or a smaller micro-batch
//! would change. `dalle launch` runs the same check before it starts
//! workers.
//!
//! Per rank, for P parameters over a group of W ranks:
//! - parameters: 4 B × P (fp32);
//! - gradients: 4 B × P, or with ZeRO-2's `run.sharding = "gradients"`
//!   4 B × P ÷ W plus two gradient buckets in flight;
//! - AdamW moments: 8 B × P, ÷ W when `run.sharding` shards the optimizer;
//! - activations at the micro-batch ([`memory`] counts them);
//! - the optimizer step's working set on CUDA, 8 B per element this rank
//!   updates; it comes after backward has freed the activations, so the
//!   larger of the two counts;
//! - a runtime allowance: on CUDA 1 GiB (context, kernels, cuBLAS and NCCL
//!   buffers) plus 5 % of the tensors for the caching allocator's rounding;
//!   on CPU 0.5 GiB, the data loader's read-ahead and prefetched batches,
//!   and half the activations again: glibc's allocator and oneDNN's
//!   buffers hold more than the tensors (`dalle bench` on CPU peaked at
//!   1.2× the counted activations per sample for the transformer, 1.6× for
//!   the dVAE).

pub mod capacity;
pub mod memory;

use anyhow::Result;
use capacity::{Capacity, GIB};
use dalle_model::gpt::GptConfig;
use dalle_model::rerank::RerankConfig;
use dalle_train::config::{JobConfig, JobStage, StateSharding};
use memory::Target;
use std::fmt::Write;

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Worker processes on this machine (on CPU they share its memory).
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    /// Ranks in the whole group, on every machine (default: --nproc): what
    /// the global batch is split over and sharding divides by.
    #[arg(long)]
    pub world: Option<u32>,
    /// One rank's memory in GiB (a GPU's, or a CPU rank's share), instead
    /// of asking this machine: to plan for a cluster from elsewhere (with
    /// `run.device = "cuda"`).
    #[arg(long, value_name = "GIB")]
    pub device_memory_gib: Option<f64>,
}

pub fn run(args: PlanArgs, job: &JobConfig) -> Result<()> {
    let local = args.nproc.max(1) as usize;
    let world = args.world.map_or(local, |w| w.max(1) as usize);
    let (target, capacity) = capacity::capacity(&job.run.device, local, args.device_memory_gib);
    let plan = Plan::new(job, world, local, target);
    match capacity {
        Ok(capacity) => {
            print!("{}", plan.render(Some(&capacity)));
            match plan.refusal(&capacity) {
                Some(refusal) => Err(anyhow::anyhow!(refusal)),
                None => {
                    println!("every stage fits");
                    Ok(())
                }
            }
        }
        Err(e) => {
            print!("{}", plan.render(None));
            Err(e.context("cannot say whether the job fits"))
        }
    }
}

/// The check `dalle launch` runs before starting workers: every training
/// stage must fit one rank of a group of `world`, `local_ranks` of them
/// on this machine.
pub fn check_launch(job: &JobConfig, world: usize, local_ranks: usize) -> Result<()> {
    let (target, capacity) = capacity::capacity(&job.run.device, local_ranks, None);
    let capacity = capacity?;
    let plan = Plan::new(job, world, local_ranks, target);
    if let Some(refusal) = plan.refusal(&capacity) {
        anyhow::bail!(
            "{refusal} (`dalle plan` shows the figures; --no-plan-check skips this check)"
        );
    }
    for need in &plan.needs {
        tracing::info!(
            stage = need.stage.name(),
            need_gib = format!("{:.2}", gib(need.total())),
            capacity_gib = format!("{:.2}", gib(capacity.bytes)),
            device = %capacity.source,
            "memory plan: fits"
        );
    }
    Ok(())
}

/// What one can turn to change a stage's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    pub sharding: StateSharding,
    pub checkpointing: bool,
    /// Samples per forward/backward pass as configured (0: the batch).
    pub micro_batch: usize,
}

impl Knobs {
    /// The job's settings for `stage`.
    pub fn of(job: &JobConfig, stage: JobStage) -> Knobs {
        let (checkpointing, micro_batch) = match stage {
            JobStage::Dvae => (
                job.dvae.train.activation_checkpointing,
                job.dvae.train.micro_batch(),
            ),
            JobStage::Gpt => (
                job.gpt.train.activation_checkpointing,
                job.gpt.train.micro_batch(),
            ),
            _ => (false, 0),
        };
        Knobs {
            sharding: job.run.sharding,
            checkpointing,
            micro_batch,
        }
    }
}

/// One rank's memory for one stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageNeed {
    pub stage: JobStage,
    pub knobs: Knobs,
    pub parameters: u64,
    pub world: usize,
    pub global_batch: usize,
    /// Samples this rank takes per step.
    pub local_batch: usize,
    /// Samples per forward/backward pass on this rank.
    pub micro_batch: usize,
    pub parameter_bytes: u64,
    pub gradient_bytes: u64,
    pub moment_bytes: u64,
    pub activation_bytes: u64,
    /// The optimizer step's temporaries.
    pub step_bytes: u64,
    pub runtime_bytes: u64,
}

impl StageNeed {
    /// The peak: the training state, then the larger of backward's
    /// activations and the optimizer step's working set, and the runtime.
    pub fn total(&self) -> u64 {
        self.parameter_bytes
            + self.gradient_bytes
            + self.moment_bytes
            + self.activation_bytes.max(self.step_bytes)
            + self.runtime_bytes
    }
}

/// The transformer's full config as the job will build it (the tokenizer's
/// vocabulary taken at its configured size, which it does not exceed).
pub fn job_gpt_config(job: &JobConfig) -> GptConfig {
    GptConfig {
        arch: job.gpt.model.clone(),
        text_vocab: job.text.vocab_size as i64,
        text_len: job.text.text_len as i64,
        image_vocab: job.dvae.model.vocab_size,
        image_grid: job.dvae.model.grid_size(),
    }
}

fn job_rerank_config(job: &JobConfig) -> RerankConfig {
    dalle_train::rerank::rerank_config(job, job.text.vocab_size)
}

/// What one rank of `world` needs to train `stage` of `job` on `target`
/// with `knobs`; `None` for a stage that does not train.
pub fn stage_need(
    job: &JobConfig,
    stage: JobStage,
    world: usize,
    target: Target,
    knobs: Knobs,
) -> Option<StageNeed> {
    let world = world.max(1);
    let global_batch = match stage {
        JobStage::Dvae => job.dvae.train.batch_size,
        JobStage::Gpt => job.gpt.train.batch_size,
        JobStage::Rerank => job.rerank.train.batch_size,
        _ => return None,
    };
    let local_batch = global_batch.div_ceil(world);
    let micro_batch = match knobs.micro_batch {
        0 => local_batch,
        m => m.min(local_batch),
    };
    let micro = micro_batch as u64;
    let (parameters, activation_bytes, sample_bytes) = match stage {
        JobStage::Dvae => {
            let c = &job.dvae.model;
            let a = memory::dvae_activations(c, job.dvae.train.relaxation, micro);
            let pixels = (c.channels * c.image_size * c.image_size) as u64;
            (
                memory::dvae_parameters(c),
                a.total(knobs.checkpointing),
                pixels * 4,
            )
        }
        JobStage::Gpt => {
            let c = job_gpt_config(job);
            let a = memory::gpt_activations(&c, micro, target);
            (
                memory::gpt_parameters(&c),
                a.total(knobs.checkpointing),
                c.seq_len() as u64 * 8,
            )
        }
        _ => {
            let c = job_rerank_config(job);
            let pixels = (3 * c.image_size * c.image_size) as u64;
            (
                memory::rerank_parameters(&c),
                memory::rerank_activations(&c, micro, global_batch as u64, target),
                pixels * 4,
            )
        }
    };
    let w = world as u64;
    let sharded = |bytes: u64, on: bool| if on { bytes.div_ceil(w) } else { bytes };
    let parameter_bytes = 4 * parameters;
    let gradient_bytes = if shards_gradients(knobs.sharding) {
        (4 * parameters).div_ceil(w) + zero2_staging_bytes(parameters)
    } else {
        4 * parameters
    };
    let moment_bytes = sharded(8 * parameters, knobs.sharding.shards_optimizer());
    let updated = sharded(parameters, knobs.sharding.shards_optimizer());
    let step_bytes = match target {
        // One piece: a scaled gradient and the denominator, per element.
        Target::Cuda => 8 * updated,
        // Cache-sized pieces.
        Target::Cpu => 0,
    };
    let tensors =
        parameter_bytes + gradient_bytes + moment_bytes + activation_bytes.max(step_bytes);
    let runtime_bytes = match target {
        Target::Cuda => (GIB as u64) + tensors / 20,
        Target::Cpu => {
            let prefetch = (job.data.prefetch_batches * local_batch) as u64 * sample_bytes;
            (GIB as u64) / 2 + job.data.read_ahead_bytes + prefetch + activation_bytes / 2
        }
    };
    Some(StageNeed {
        stage,
        knobs,
        parameters,
        world,
        global_batch,
        local_batch,
        micro_batch,
        parameter_bytes,
        gradient_bytes,
        moment_bytes,
        activation_bytes,
        step_bytes,
        runtime_bytes,
    })
}

/// Every training stage of the job at its configured settings.
pub struct Plan<'a> {
    job: &'a JobConfig,
    pub world: usize,
    pub local_ranks: usize,
    pub target: Target,
    pub needs: Vec<StageNeed>,
}

/// The settings of `run.sharding`, weakest first.
fn shardings() -> Vec<StateSharding> {
    StateSharding::ALL.to_vec()
}

/// The name of a sharding in configs.
fn sharding_name(s: StateSharding) -> &'static str {
    s.name()
}

/// What sharded gradients hold beyond this rank's shard: the buckets
/// between backward writing them and their reduce-scatter, two at a time
/// once the order backward completes them in is learnt (the first step
/// may hold more, but it holds no gradient in its forward pass, where the
/// activations peak), and never more than the whole gradient.
fn zero2_staging_bytes(parameters: u64) -> u64 {
    (2 * dalle_train::ddp::DEFAULT_BUCKET_BYTES as u64).min(4 * parameters)
}

/// Whether `s` splits the reduced gradients too (ZeRO-2).
fn shards_gradients(s: StateSharding) -> bool {
    s.shards_gradients()
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Bytes in binary units: "1.25 GiB", "12.3 MiB".
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// The config keys of a stage's checkpointing and micro-batch, if it has them.
fn stage_keys(stage: JobStage) -> Option<(&'static str, &'static str)> {
    match stage {
        JobStage::Dvae => Some((
            "dvae.train.activation_checkpointing",
            "dvae.train.micro_batch",
        )),
        JobStage::Gpt => Some((
            "gpt.train.activation_checkpointing",
            "gpt.train.micro_batch",
        )),
        _ => None,
    }
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl<'a> Plan<'a> {
    pub fn new(job: &'a JobConfig, world: usize, local_ranks: usize, target: Target) -> Self {
        let needs = job
            .run
            .stages
            .iter()
            .filter_map(|&s| stage_need(job, s, world, target, Knobs::of(job, s)))
            .collect();
        Plan {
            job,
            world,
            local_ranks,
            target,
            needs,
        }
    }

    fn with(&self, need: &StageNeed, knobs: Knobs) -> StageNeed {
        stage_need(self.job, need.stage, self.world, self.target, knobs).expect("a training stage")
    }

    /// The figures, stage by stage.
    pub fn render(&self, capacity: Option<&Capacity>) -> String {
        let mut out = String::new();
        let device = match self.target {
            Target::Cuda => "cuda",
            Target::Cpu => "cpu",
        };
        let _ = write!(
            out,
            "memory plan: {} rank{} ({} on this machine) on {device}",
            self.world,
            if self.world == 1 { "" } else { "s" },
            self.local_ranks
        );
        let _ = match capacity {
            Some(c) => writeln!(out, "; each has {} ({})", size(c.bytes), c.source),
            None => writeln!(out, "; the device's memory is unknown"),
        };
        if self.needs.is_empty() {
            let _ = writeln!(out, "no stage of run.stages trains");
        }
        for need in &self.needs {
            out.push('\n');
            self.render_stage(&mut out, need, capacity);
        }
        // No trailing blanks (the table's marks), so the text pastes cleanly.
        out.lines().map(|l| format!("{}\n", l.trim_end())).collect()
    }

    fn render_stage(&self, out: &mut String, need: &StageNeed, capacity: Option<&Capacity>) {
        let w = need.world;
        let what = match need.stage {
            JobStage::Dvae => {
                let c = &self.job.dvae.model;
                format!(
                    "{}×{} images, n_hid {}, n_blk_per_group {}, {} codes",
                    c.image_size, c.image_size, c.n_hid, c.n_blk_per_group, c.vocab_size
                )
            }
            JobStage::Gpt => {
                let c = job_gpt_config(self.job);
                format!(
                    "sequence {} ({} text + {} image), width {}, depth {}, {} heads",
                    c.seq_len(),
                    c.text_len,
                    c.image_len(),
                    c.arch.dim,
                    c.arch.depth,
                    c.arch.heads
                )
            }
            _ => "image net and caption encoder".into(),
        };
        let _ = writeln!(
            out,
            "stage {}: {} parameters; {what}",
            need.stage.name(),
            count(need.parameters)
        );
        let _ = write!(
            out,
            "  {} samples per rank a step (batch {} over {w} rank{}), in passes of {}",
            need.local_batch,
            need.global_batch,
            if w == 1 { "" } else { "s" },
            need.micro_batch
        );
        if !need.global_batch.is_multiple_of(w) {
            let _ = write!(
                out,
                " (the batch does not split evenly: training refuses it)"
            );
        }
        out.push('\n');
        let keys = stage_keys(need.stage);
        let k = need.knobs;
        let on = |b: bool| if b { "on" } else { "off" };
        let activations_note = match keys {
            Some((ckpt, micro)) => format!("{ckpt} ({}); a smaller {micro}", on(k.checkpointing)),
            None => "a smaller rerank.train.batch_size or more ranks".into(),
        };
        let activations_label = format!("activations ({} per pass)", need.micro_batch);
        let all = shardings();
        let has_zero2 = all.iter().any(|s| shards_gradients(*s));
        let optimizer_shardings = all
            .iter()
            .filter(|s| s.shards_optimizer())
            .map(|s| format!("\"{}\"", sharding_name(*s)))
            .collect::<Vec<_>>()
            .join(" or ");
        let rows = [
            ("parameters (4 B each)", need.parameter_bytes, String::new()),
            (
                "gradients (4 B each)",
                need.gradient_bytes,
                if has_zero2 {
                    format!(
                        "÷{w} with run.sharding = \"gradients\" ({})",
                        on(shards_gradients(k.sharding))
                    )
                } else {
                    "every rank reduces them all".into()
                },
            ),
            (
                "AdamW moments (8 B each)",
                need.moment_bytes,
                format!(
                    "÷{w} with run.sharding = {} ({})",
                    optimizer_shardings,
                    on(k.sharding.shards_optimizer())
                ),
            ),
            (
                activations_label.as_str(),
                need.activation_bytes,
                activations_note,
            ),
            (
                "optimizer step working set",
                need.step_bytes,
                "after backward: the larger of it and the activations counts".into(),
            ),
            (
                "runtime allowance",
                need.runtime_bytes,
                match self.target {
                    Target::Cuda => "1 GiB (CUDA context, kernels, cuBLAS, NCCL) + 5 % of the \
                                     tensors (allocator)"
                        .into(),
                    Target::Cpu => {
                        "0.5 GiB (libtorch) + the data loader's read-ahead and prefetch + 50 % \
                         of the activations (allocator)"
                            .into()
                    }
                },
            ),
        ];
        for (label, bytes, note) in rows {
            let _ = writeln!(out, "  {label:<28}{:>11}   {note}", size(bytes));
        }
        let total = need.total();
        let verdict = match capacity {
            Some(c) if total <= c.bytes => format!(
                "of {}: fits ({:.0} %)",
                size(c.bytes),
                100.0 * total as f64 / c.bytes as f64
            ),
            Some(c) => format!("of {}: does NOT fit", size(c.bytes)),
            None => String::new(),
        };
        let _ = writeln!(out, "  {:<28}{:>11}   {verdict}", "total", size(total));
        // Every sharding × checkpointing, at this micro-batch.
        let columns: &[bool] = if keys.is_some() {
            &[false, true]
        } else {
            &[false]
        };
        let _ = write!(out, "  total by setting    ");
        for &c in columns {
            let _ = write!(out, "  {:>16}", format!("checkpointing {}", on(c)));
        }
        out.push('\n');
        for sharding in all {
            let _ = write!(out, "    sharding {:<11}", sharding_name(sharding));
            for &checkpointing in columns {
                let knobs = Knobs {
                    sharding,
                    checkpointing,
                    ..k
                };
                let t = self.with(need, knobs).total();
                let mark = if knobs == k { "*" } else { " " };
                let over = match capacity {
                    Some(c) if t > c.bytes => "!",
                    _ => " ",
                };
                let _ = write!(out, "  {:>15}{mark}{over}", size(t));
            }
            out.push('\n');
        }
        let _ = writeln!(out, "    (* configured, ! does not fit)");
    }

    /// Why the job cannot run, if a stage does not fit `capacity`: the
    /// stage, its need and the capacity, and what would make it fit.
    pub fn refusal(&self, capacity: &Capacity) -> Option<String> {
        let need = self.needs.iter().find(|n| n.total() > capacity.bytes)?;
        let k = need.knobs;
        let fits = |n: &StageNeed| n.total() <= capacity.bytes;
        let mut fixes = Vec::new();
        let all = shardings();
        for sharding in all.iter().copied().skip_while(|s| *s != k.sharding).skip(1) {
            let n = self.with(need, Knobs { sharding, ..k });
            if fits(&n) {
                fixes.push(format!(
                    "run.sharding = \"{}\" ({})",
                    sharding_name(sharding),
                    size(n.total())
                ));
                break;
            }
        }
        let keys = stage_keys(need.stage);
        if let Some((ckpt, micro_key)) = keys {
            if !k.checkpointing {
                let n = self.with(
                    need,
                    Knobs {
                        checkpointing: true,
                        ..k
                    },
                );
                if fits(&n) {
                    fixes.push(format!("{ckpt} = true ({})", size(n.total())));
                }
            }
            if let Some((m, n)) = self.largest_micro_batch(need, k, &fits) {
                fixes.push(format!("{micro_key} = {m} ({})", size(n.total())));
            }
            if fixes.is_empty() {
                let strongest = *all.last().expect("some sharding");
                let everything = Knobs {
                    sharding: strongest,
                    checkpointing: true,
                    ..k
                };
                if let Some((m, n)) = self.largest_micro_batch(need, everything, &fits) {
                    fixes.push(format!(
                        "all of run.sharding = \"{}\", {ckpt} = true and {micro_key} = {m} \
                         ({})",
                        sharding_name(strongest),
                        size(n.total())
                    ));
                }
            }
        }
        let what = if fixes.is_empty() {
            "neither sharding, checkpointing nor a smaller micro-batch makes it fit: a smaller \
             model, more ranks (sharding divides by them) or more memory"
                .to_string()
        } else {
            format!("it would fit with {}", fixes.join("; or "))
        };
        Some(format!(
            "stage {} does not fit: one rank needs {} (parameters {}, gradients {}, AdamW \
             moments {}, activations {} at {} per pass, runtime {}) but has {} ({}); {what}",
            need.stage.name(),
            size(need.total()),
            size(need.parameter_bytes),
            size(need.gradient_bytes),
            size(need.moment_bytes),
            size(need.activation_bytes.max(need.step_bytes)),
            need.micro_batch,
            size(need.runtime_bytes),
            size(capacity.bytes),
            capacity.source
        ))
    }

    /// The largest micro-batch below the current one that divides the
    /// batch (as training requires) and fits, with `knobs` otherwise.
    fn largest_micro_batch(
        &self,
        need: &StageNeed,
        knobs: Knobs,
        fits: &dyn Fn(&StageNeed) -> bool,
    ) -> Option<(usize, StageNeed)> {
        (1..need.micro_batch)
            .rev()
            .filter(|m| need.global_batch.is_multiple_of(*m))
            .map(|m| {
                let n = self.with(
                    need,
                    Knobs {
                        micro_batch: m,
                        ..knobs
                    },
                );
                (m, n)
            })
            .find(|(_, n)| fits(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobConfig {
        let mut job = JobConfig::default();
        job.run.stages = vec![JobStage::Dvae, JobStage::Gpt, JobStage::Rerank];
        job
    }

    fn gpu(gib: f64) -> Capacity {
        Capacity {
            bytes: (gib * GIB) as u64,
            source: format!("{gib} GiB"),
        }
    }

    #[test]
    fn sharding_divides_the_optimizer_state_and_then_the_gradients_by_the_world() {
        let job = job();
        let knobs = |sharding| Knobs {
            sharding,
            ..Knobs::of(&job, JobStage::Gpt)
        };
        let need = |s| stage_need(&job, JobStage::Gpt, 8, Target::Cuda, knobs(s)).unwrap();
        let (none, opt) = (need(StateSharding::None), need(StateSharding::Optimizer));
        assert_eq!(none.moment_bytes, 8 * none.parameters);
        assert_eq!(none.gradient_bytes, 4 * none.parameters);
        assert_eq!(opt.moment_bytes, none.moment_bytes.div_ceil(8));
        assert_eq!(opt.gradient_bytes, none.gradient_bytes);
        assert_eq!(opt.parameter_bytes, none.parameter_bytes);
        assert_eq!(opt.activation_bytes, none.activation_bytes);
        assert!(opt.total() < none.total());
        assert_eq!(sharding_name(StateSharding::Optimizer), "optimizer");
        let all = shardings();
        assert_eq!(all[..2], [StateSharding::None, StateSharding::Optimizer]);
        let grads = need(StateSharding::Gradients);
        assert_eq!(
            grads.gradient_bytes,
            none.gradient_bytes.div_ceil(8) + zero2_staging_bytes(none.parameters)
        );
        assert_eq!(grads.moment_bytes, opt.moment_bytes);
        assert!(grads.total() < opt.total());
    }

    #[test]
    fn the_micro_batch_is_this_ranks_share_at_most() {
        let mut job = job();
        job.gpt.train.batch_size = 64;
        job.gpt.train.micro_batch = 16;
        let need = |w| {
            let knobs = Knobs::of(&job, JobStage::Gpt);
            stage_need(&job, JobStage::Gpt, w, Target::Cuda, knobs).unwrap()
        };
        assert_eq!((need(2).local_batch, need(2).micro_batch), (32, 16));
        assert_eq!((need(8).local_batch, need(8).micro_batch), (8, 8));
        assert!(need(8).activation_bytes < need(2).activation_bytes);
        assert!(
            stage_need(
                &job,
                JobStage::Export,
                1,
                Target::Cpu,
                Knobs::of(&job, JobStage::Export)
            )
            .is_none()
        );
    }

    #[test]
    fn a_refusal_names_the_stage_the_need_the_capacity_and_the_fix() {
        let mut job = job();
        job.run.stages = vec![JobStage::Gpt];
        // A 0.2 B transformer whose activations dominate.
        (job.gpt.model.dim, job.gpt.model.depth, job.gpt.model.heads) = (1024, 12, 16);
        job.gpt.train.micro_batch = 64;
        let plan = Plan::new(&job, 8, 8, Target::Cuda);
        let need = &plan.needs[0];
        let with = |knobs| plan.with(need, knobs).total();
        let k = need.knobs;
        let checkpointed = with(Knobs {
            checkpointing: true,
            ..k
        });
        let sharded = with(Knobs {
            sharding: StateSharding::Optimizer,
            ..k
        });
        let halved = with(Knobs {
            micro_batch: 32,
            ..k
        });
        assert!(sharded < need.total() && halved < sharded && checkpointed < halved);
        assert!(plan.refusal(&gpu(gib(need.total()) + 0.01)).is_none());
        // Room for the sharded state or half the micro-batch, not both.
        let room = gpu(gib((sharded + need.total()) / 2));
        let refusal = plan.refusal(&room).unwrap();
        assert!(refusal.starts_with("stage gpt does not fit"), "{refusal}");
        assert!(refusal.contains(&size(need.total())), "{refusal}");
        assert!(
            refusal.contains(&format!("but has {}", size(room.bytes))),
            "{refusal}"
        );
        for fix in [
            format!("run.sharding = \"optimizer\" ({})", size(sharded)),
            format!(
                "gpt.train.activation_checkpointing = true ({})",
                size(checkpointed)
            ),
            format!("gpt.train.micro_batch = 32 ({})", size(halved)),
        ] {
            assert!(refusal.contains(&fix), "{fix} missing from {refusal}");
        }
        // Less room: sharding no longer suffices.
        let refusal = plan.refusal(&gpu(gib(halved) + 0.01)).unwrap();
        assert!(!refusal.contains("run.sharding"), "{refusal}");
        assert!(refusal.contains("gpt.train.micro_batch = 32"), "{refusal}");
        let hopeless = plan.refusal(&gpu(1.0)).unwrap();
        assert!(hopeless.contains("a smaller model"), "{hopeless}");
    }

    #[test]
    fn the_figures_show_every_setting() {
        let job = job();
        let plan = Plan::new(&job, 8, 8, Target::Cuda);
        assert_eq!(plan.needs.len(), 3);
        let text = plan.render(Some(&gpu(141.0)));
        for part in [
            "stage dvae",
            "stage gpt",
            "stage rerank",
            "AdamW moments",
            "activations",
            "checkpointing on",
            "*",
        ] {
            assert!(text.contains(part), "{part} missing from\n{text}");
        }
    }
}
