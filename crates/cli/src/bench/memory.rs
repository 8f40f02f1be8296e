//! `dalle bench memory`: peak memory per rank of transformer training with
//! each `run.sharding`, for groups of several ranks: real processes (this
//! binary, one per rank) joined by a TCP ring on loopback, so each rank's
//! peak resident set is its own. Prints one JSON line per (world size,
//! sharding) and the ratio to unsharded training in the same run.

use super::{GptShape, peak_rss_mib};
use anyhow::{Context, Result, bail, ensure};
use dalle_collective::{RingConfig, RingSecret, TcpRing};
use dalle_model::gpt::Gpt;
use dalle_train::config::{JobConfig, StateSharding};
use dalle_train::ddp::DataParallel;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// What one rank measured.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RankReport {
    pub rank: usize,
    pub parameters: i64,
    /// Elements of each Adam moment this rank keeps.
    pub moment_elements: i64,
    pub peak_rss_mib: f64,
    pub seconds_per_step: f64,
    /// Of which waiting on collectives (with `run.overlap_reduction`, only
    /// what is left once backward ends).
    pub comm_seconds_per_step: f64,
}

/// Runs every configuration of `worlds` × (none, optimizer, gradients) and prints
/// each one's figures, then a summary with the ratios.
pub fn bench_memory(job: &JobConfig, worlds: &[usize], steps: u64, batch: i64) -> Result<()> {
    ensure!(steps > 0, "--steps must be positive");
    // The ranks read the job as this process resolved it (every --set).
    let config =
        std::env::temp_dir().join(format!("dalle-bench-memory-{}.toml", std::process::id()));
    std::fs::write(&config, job.to_toml())?;
    let result = run_all(&config, worlds, steps, batch);
    let _ = std::fs::remove_file(&config);
    result
}

fn run_all(config: &std::path::Path, worlds: &[usize], steps: u64, batch: i64) -> Result<()> {
    for &world in worlds {
        ensure!(
            world >= 2,
            "--worlds: a group has at least 2 ranks, not {world}"
        );
        let mut baseline = None;
        for sharding in StateSharding::ALL {
            let reports = run_group(config, world, sharding, steps, batch)?;
            let peak = reports.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max);
            let moments = reports.iter().map(|r| r.moment_elements).max().unwrap_or(0);
            let base = *baseline.get_or_insert(peak);
            let line = serde_json::json!({
                "bench": "memory",
                "world": world,
                "sharding": sharding,
                "parameters": reports[0].parameters,
                "moment_elements_per_rank": moments,
                "peak_rss_mib_per_rank": peak,
                "peak_ratio_to_none": peak / base,
                "seconds_per_step": reports.iter().map(|r| r.seconds_per_step).fold(0.0, f64::max),
                "comm_seconds_per_step": reports.iter().map(|r| r.comm_seconds_per_step).fold(0.0, f64::max),
                "ranks": reports,
            });
            println!("{line}");
        }
    }
    Ok(())
}

/// Starts `world` rank processes, hands them each other's addresses and
/// the ring's secret, and collects their reports.
fn run_group(
    config: &std::path::Path,
    world: usize,
    sharding: StateSharding,
    steps: u64,
    batch: i64,
) -> Result<Vec<RankReport>> {
    let exe = std::env::current_exe()?;
    let sharding_name = serde_json::to_value(sharding)?
        .as_str()
        .unwrap_or("none")
        .to_string();
    let mut children = Vec::new();
    for rank in 0..world {
        let child = Command::new(&exe)
            .arg("--config")
            .arg(config)
            // One libtorch thread each: the ranks share the machine.
            .args(["--set", "run.threads=1", "bench", "memory-rank"])
            .args(["--rank", &rank.to_string(), "--world", &world.to_string()])
            .args(["--sharding", &sharding_name, "--steps", &steps.to_string()])
            .args(["--batch", &batch.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a rank")?;
        children.push(child);
    }
    // Each rank says where it listens; then all learn every address.
    let mut outputs = Vec::new();
    let mut peers = Vec::new();
    for child in &mut children {
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("a rank's first line was {line:?}"))?;
        peers.push(addr.to_string());
        outputs.push(out);
    }
    let secret = RingSecret::random();
    let hex: String = secret
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for child in &mut children {
        let mut stdin = child.stdin.take().expect("piped");
        writeln!(stdin, "{} {hex}", peers.join(","))?;
    }
    let mut reports = Vec::new();
    for (mut child, mut out) in children.into_iter().zip(outputs) {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let status = child.wait()?;
        if !status.success() {
            bail!("a rank of {world} with sharding {sharding_name} failed: {status}");
        }
        reports.push(serde_json::from_str(line.trim()).context("a rank's report")?);
    }
    Ok(reports)
}

/// `none` or `optimizer`, as `run.sharding` is written.
pub fn parse_sharding(name: &str) -> Result<StateSharding, String> {
    serde_json::from_value(serde_json::Value::String(name.into()))
        .map_err(|_| format!("`{name}` is neither none nor optimizer"))
}

/// One rank of [`bench_memory`]: trains `steps` steps of the job's
/// transformer on random tokens and prints its [`RankReport`].
pub fn memory_rank(
    job: &JobConfig,
    rank: usize,
    world: usize,
    sharding: StateSharding,
    steps: u64,
    batch: i64,
) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let (peers, hex) = line
        .trim()
        .split_once(' ')
        .context("expected `PEERS SECRET` on stdin")?;
    let peers: Vec<SocketAddr> = peers.split(',').map(str::parse).collect::<Result<_, _>>()?;
    ensure!(
        peers.len() == world,
        "{} peers for a world of {world}",
        peers.len()
    );
    let secret: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    let ring = TcpRing::connect(
        rank,
        peers,
        listener,
        RingConfig {
            session: 1,
            secret: RingSecret::new(secret),
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(600),
            ..RingConfig::default()
        },
    )?;
    let mut ddp = DataParallel::new(Box::new(ring), dalle_train::ddp::DEFAULT_BUCKET_BYTES)
        .with_overlap(job.run.overlap_reduction);

    let device = dalle_train::feed::runtime_device(job)?;
    let config = GptShape::default().config(job)?;
    tch::manual_seed(job.run.seed as i64);
    let model = Gpt::new(config.clone(), device)?;
    let train = &job.gpt.train;
    let mut optimizer = ddp.optimizer(model.named_parameters(), train.adamw, sharding)?;
    let text = Tensor::randint(
        config.text_targets(),
        [batch, config.text_len],
        (Kind::Int64, device),
    );
    let image = Tensor::randint(
        config.image_vocab,
        [batch, config.image_len()],
        (Kind::Int64, device),
    );
    let started = Instant::now();
    ddp.take_comm_time();
    for _ in 0..steps {
        optimizer.zero_grad();
        ddp.begin_step(&mut optimizer, batch as usize, 1)?;
        let loss = model.loss(&text, &image, train.text_loss_weight, true)?;
        loss.loss.backward();
        ddp.update(&mut optimizer, batch as usize, 1e-4, train.grad_clip)?;
    }
    let report = RankReport {
        rank,
        parameters: model
            .named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum(),
        moment_elements: optimizer.moment_elements(),
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
        seconds_per_step: started.elapsed().as_secs_f64() / steps as f64,
        comm_seconds_per_step: ddp.take_comm_time().as_secs_f64() / steps as f64,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
