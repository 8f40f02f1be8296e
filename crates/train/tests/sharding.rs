//! A sharded optimizer (ZeRO-1) trains exactly as the unsharded one: the
//! update is elementwise, every element is reduced in the same order, and
//! the global gradient norm is summed from the same pieces in the same
//! order, so after every step every rank holds bitwise the parameters of
//! unsharded data parallelism. Ranks are threads joined by a TCP ring on
//! loopback, with small gradient buckets so a step takes several, each cut
//! into uneven shards for W = 3.

mod common;

use common::{on_ranks, prepare, stage2_job};
use dalle_train::config::{JobConfig, StateSharding};
use dalle_train::ddp::DataParallel;
use dalle_train::optim::AdamWConfig;
use tch::{Device, Kind, Tensor};

/// Parameters of a small model, the same on every rank and in every run
/// (no random draws: other tests in this binary share the generator).
/// Sizes are odd, and one spans several buckets.
fn parameters() -> Vec<(String, Tensor)> {
    let shapes: [(&str, &[i64]); 5] = [
        ("a.weight", &[37, 11]),
        ("a.bias", &[11]),
        ("b.weight", &[3, 5, 7]),
        ("b.gain", &[1]),
        ("c.weight", &[9001]),
    ];
    shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: i64 = shape.iter().product();
            let values = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.173 + i as f64).sin();
            (
                name.to_string(),
                values.view(*shape).set_requires_grad(true),
            )
        })
        .collect()
}

/// Every rank's parameters after each of `steps` steps: rank `r`'s loss
/// differs from the others' (so gradients must be reduced), and each step
/// clips to a norm the gradients exceed (so the global norm matters) on
/// some steps and not others.
fn train(ddp: &mut DataParallel, sharding: StateSharding, steps: u64) -> Vec<Vec<Tensor>> {
    let named = parameters();
    let config = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let shared = named
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .collect();
    let mut optimizer = ddp.optimizer(shared, config, sharding);
    assert_eq!(
        optimizer.is_sharded(),
        sharding.shards_optimizer(),
        "a group of {} ranks",
        ddp.world_size()
    );
    let rank = ddp.rank() as f64;
    let mut after = Vec::new();
    for step in 0..steps {
        optimizer.zero_grad();
        let loss: Tensor = named
            .iter()
            .map(|(_, p)| {
                (p.pow_tensor_scalar(3) * (rank + 1.0) + p * (step as f64 - rank)).sum(Kind::Float)
            })
            .sum();
        loss.backward();
        let max_norm = if step % 2 == 0 { 1.0 } else { 1e6 };
        // Ranks with different sample counts weigh differently.
        let samples = 3 + ddp.rank();
        let update = ddp
            .update(&mut optimizer, samples, 0.01, Some(max_norm))
            .unwrap();
        let norm = update.grad_norm.double_value(&[]);
        assert!(norm.is_finite() && norm > 0.0);
        after.push(named.iter().map(|(_, p)| p.detach().copy()).collect());
    }
    after
}

#[test]
fn sharded_adamw_gives_bitwise_the_parameters_of_unsharded_data_parallelism() {
    for world in [2, 3, 4] {
        let run = |sharding| on_ranks(world, move |ddp| train(ddp, sharding, 6));
        let plain = run(StateSharding::None);
        let sharded = run(StateSharding::Optimizer);
        for (rank, (a, b)) in plain.iter().zip(&sharded).enumerate() {
            for (step, (a, b)) in a.iter().zip(b).enumerate() {
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!(
                        a.equal(b),
                        "W={world} rank {rank} step {step}: parameter {i} differs by {}",
                        (a - b).abs().max().double_value(&[])
                    );
                }
            }
        }
        // And every rank holds the same parameters.
        for other in &sharded[1..] {
            for (a, b) in sharded[0].last().unwrap().iter().zip(other.last().unwrap()) {
                assert!(a.equal(b), "W={world}: ranks disagree");
            }
        }
        // The steps did something.
        let first = &plain[0][0][4];
        let last = &plain[0].last().unwrap()[4];
        assert!(!first.equal(last));
    }
}

#[test]
fn each_rank_keeps_only_its_share_of_the_moments_and_the_shares_load_at_any_world_size() {
    let shares = on_ranks(3, |ddp| {
        let mut optimizer = ddp.optimizer(
            parameters(),
            AdamWConfig::default(),
            StateSharding::Optimizer,
        );
        optimizer.zero_grad();
        let grads = optimizer.flat_grads();
        tch::no_grad(|| {
            let _ = grads[0].shallow_clone().fill_(0.5);
        });
        ddp.update(&mut optimizer, 4, 0.01, None).unwrap();
        let share: Vec<(String, Tensor)> = optimizer
            .shard_state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        (optimizer.moment_elements(), share)
    });
    let total: i64 = parameters().iter().map(|(_, p)| p.numel() as i64).sum();
    let held: Vec<i64> = shares.iter().map(|s| s.0).collect();
    assert_eq!(
        held.iter().sum::<i64>(),
        total,
        "the shares cover the model once"
    );
    assert!(
        held.iter().all(|&h| h < total / 2),
        "each rank holds about a third: {held:?} of {total}"
    );
    let pieces: Vec<(String, Tensor)> = shares
        .iter()
        .flat_map(|(_, share)| share.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
        .collect();
    // One process, unsharded, takes the whole state from the three shares:
    // gradient 0.5 everywhere gives m = 0.1 · 0.5 after one step.
    let mut whole = DataParallel::solo().optimizer(
        parameters(),
        AdamWConfig::default(),
        StateSharding::Optimizer,
    );
    whole.load_shards(1, &pieces).unwrap();
    assert!(!whole.is_sharded());
    let (step, state) = whole.state();
    assert_eq!((step, state.len()), (1, 2 * parameters().len()));
    for (name, moment) in &state {
        if name.ends_with(".exp_avg") {
            let want = moment.ones_like() * 0.05;
            assert!(moment.allclose(&want, 1e-6, 1e-7, false), "{name}");
        }
    }
    // A share missing is refused, naming what is not covered.
    let err = whole.load_shards(1, &pieces[2..]).unwrap_err();
    assert!(err.contains("covers"), "{err}");
}

/// The stage-2 job of the data-parallel tests, trained on the fly.
fn gpt_job(dir: &std::path::Path) -> JobConfig {
    let mut job = stage2_job(dir);
    prepare(&job);
    job.gpt.train.data_url = Some(job.data_url());
    job.gpt.train.batch_size = 12;
    job.gpt.train.micro_batch = 0;
    job.gpt.train.steps = 12;
    job.gpt.train.log_every = 4;
    job.checkpoint.every = 6;
    job.run.verify_every = 1;
    job.run.ledger = true;
    job
}

fn copy_inputs(from: &std::path::Path, job: &JobConfig) {
    std::fs::create_dir_all(&job.run.dir).unwrap();
    for file in ["dvae.safetensors", "tokenizer.json"] {
        std::fs::copy(from.join(file), job.run.dir.join(file)).unwrap();
    }
}

fn final_parameters(job: &JobConfig, world: usize) -> Vec<(String, Tensor)> {
    let job = job.clone();
    let weights = on_ranks(world, move |ddp| {
        dalle_train::gpt::train(&job, ddp, |_| {}).map(|r| r.weights)
    });
    let weights = weights.into_iter().next().unwrap().unwrap();
    dalle_model::gpt::Gpt::load(&weights, Device::Cpu)
        .unwrap()
        .named_parameters()
}

#[test]
fn transformer_training_with_a_sharded_optimizer_checkpoints_and_resumes_as_unsharded() {
    let dir = tempfile::tempdir().unwrap();
    let base = gpt_job(dir.path());
    let inputs = base.run.dir.clone();
    let job_for = |name: &str, sharding: StateSharding| {
        let mut job = base.clone();
        job.run.dir = dir.path().join(name);
        job.run.sharding = sharding;
        copy_inputs(&inputs, &job);
        job
    };
    // Uninterrupted, without and with sharding.
    let plain = final_parameters(&job_for("plain", StateSharding::None), 2);
    let sharded_job = job_for("sharded", StateSharding::Optimizer);
    let sharded = final_parameters(&sharded_job, 2);
    for ((name, a), (_, b)) in plain.iter().zip(&sharded) {
        assert!(a.equal(b), "{name}: sharded training differs");
    }
    // Stopped at step 6 with sharding, resumed without it (and the other
    // way round): the gathered checkpoint holds the whole state.
    for (first, then) in [
        (StateSharding::Optimizer, StateSharding::None),
        (StateSharding::None, StateSharding::Optimizer),
    ] {
        let mut job = job_for(&format!("resume-{first:?}-{then:?}"), first);
        job.gpt.train.steps = 6;
        final_parameters(&job, 2);
        job.gpt.train.steps = 12;
        job.run.sharding = then;
        let resumed = final_parameters(&job, 2);
        for ((name, a), (_, b)) in plain.iter().zip(&resumed) {
            assert!(a.equal(b), "{name}: {first:?} then {then:?} differs");
        }
    }
}

/// The keys each step trained on, over every rank (the in-process ranks
/// have no generation: each step is trained once here).
fn ledger(run: &std::path::Path) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut steps: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for entry in std::fs::read_dir(run.join("ledger")).unwrap().flatten() {
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let keys = v["keys"].as_array().unwrap().iter();
            steps
                .entry(v["step"].as_u64().unwrap())
                .or_default()
                .extend(keys.map(|k| k.as_str().unwrap().to_string()));
        }
    }
    for keys in steps.values_mut() {
        keys.sort();
    }
    steps
}

#[test]
fn a_sharded_checkpoint_resumes_on_4_then_3_then_2_then_4_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = gpt_job(dir.path());
    let inputs = base.run.dir.clone();
    base.checkpoint.every = 3;
    let mut plain = base.clone();
    plain.run.dir = dir.path().join("plain");
    copy_inputs(&inputs, &plain);
    let uninterrupted = final_parameters(&plain, 2);

    let mut job = base.clone();
    job.run.dir = dir.path().join("elastic");
    job.run.sharding = StateSharding::Optimizer;
    copy_inputs(&inputs, &job);
    for (world, steps) in [(4, 3), (3, 6), (2, 9), (4, 12)] {
        job.gpt.train.steps = steps;
        let parameters = final_parameters(&job, world);
        let step_dir = job
            .run
            .dir
            .join(format!("checkpoints/gpt/step-{steps:010}"));
        let mut names: Vec<String> = std::fs::read_dir(&step_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("optimizer"))
            .collect();
        names.sort();
        let want: Vec<String> = (0..world)
            .map(|r| format!("optimizer-shard-{r:05}-of-{world:05}.safetensors"))
            .collect();
        assert_eq!(names, want, "step {steps}: one share per rank");
        if steps == 12 {
            for ((name, a), (_, b)) in parameters.iter().zip(&uninterrupted) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-4,
                    "{name} differs from the uninterrupted run by {diff}"
                );
            }
        }
    }
    // Every step trained once, on the samples of the uninterrupted run.
    assert_eq!(ledger(&job.run.dir), ledger(&plain.run.dir));
    assert_eq!(ledger(&job.run.dir).len(), 12);
}
