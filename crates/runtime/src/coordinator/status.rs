//! The coordinator's HTTP status page: `GET /` for people, `GET /metrics`
//! in Prometheus' text format, `GET /status.json` for scripts and `dalle
//! status` (see [`super::json`]). A tiny HTTP/1.1 responder (one request
//! per connection) is all this needs; every page renders a [`JobStatus`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{JobPhase, JobStatus, Shared, StageState};
use crate::Token;
use crate::ValidationReport;
use crate::worker::UsageReport;

/// Largest request head read; a status page needs no more.
const MAX_HEAD: usize = 8 * 1024;

/// Connections served at once; more are closed at once, so that nobody can
/// tie up the coordinator's runtime by opening many (each one is also cut
/// off after a few seconds without a whole request).
const MAX_CONNECTIONS: usize = 32;

pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Option<Token>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!(%from, "status page busy ({MAX_CONNECTIONS} connections): closed");
                        continue;
                    };
                    let (shared, token) = (shared.clone(), token.clone());
                    tokio::spawn(async move {
                        respond(stream, shared, token.as_ref()).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("the status page cannot accept a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = super::stopped(&mut stop) => break,
        }
    }
}

/// The credentials of an `Authorization: Bearer …` header in `head`.
fn bearer(head: &str) -> Option<&[u8]> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        let (scheme, credentials) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| credentials.trim().as_bytes())
    })
}

async fn respond(mut stream: TcpStream, shared: Arc<Shared>, token: Option<&Token>) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        request_line.next().unwrap_or_default(),
        request_line.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let authorized = token.is_none_or(|token| bearer(&head).is_some_and(|b| token.matches(b)));
    let (code, content_type, body) = match (method, path) {
        _ if !authorized => (
            "401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"dalle\"",
            "text/plain; charset=utf-8",
            "this status page needs `Authorization: Bearer <status token>`\n".to_string(),
        ),
        ("GET" | "HEAD", "/") => {
            let status = shared.lock().status(Instant::now());
            ("200 OK", "text/plain; charset=utf-8", render_page(&status))
        }
        ("GET" | "HEAD", "/metrics") => {
            let status = shared.lock().status(Instant::now());
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render_metrics(&status),
            )
        }
        ("GET" | "HEAD", "/status.json") => {
            let status = shared.lock().status(Instant::now());
            ("200 OK", "application/json", super::json::render(&status))
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            format!("no page {path:?}: try /, /metrics or /status.json\n"),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The page for people.
pub(super) fn render_page(status: &JobStatus) -> String {
    let mut page = String::new();
    let optional = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    let _ = writeln!(page, "dalle coordinator");
    let _ = writeln!(page, "phase:       {}", status.phase.as_str());
    let _ = writeln!(page, "generation:  {}", status.generation);
    let _ = writeln!(
        page,
        "world size:  {} (min_workers {}, max_workers {})",
        status.world_size, status.min_workers, status.max_workers
    );
    let _ = writeln!(
        page,
        "restarts:    {} of {}",
        status.restarts, status.max_restarts
    );
    let _ = writeln!(
        page,
        "step:        {}",
        optional(status.step.map(|s| s.to_string()))
    );
    let _ = writeln!(
        page,
        "loss:        {}",
        optional(status.loss.map(|l| format!("{l:.4}")))
    );
    let _ = writeln!(page, "samples/s:   {:.1}", status.samples_per_second);
    if let Some(reason) = &status.reason {
        let _ = writeln!(page, "reason:      {reason}");
    }
    if !status.stages.is_empty() {
        let _ = writeln!(page);
        let _ = writeln!(
            page,
            "{:<3} {:<14} {:<10} {:>10}  ranks",
            "#", "stage", "state", "time"
        );
        for (i, stage) in status.stages.iter().enumerate() {
            let _ = writeln!(
                page,
                "{:<3} {:<14} {:<10} {:>10}  {}",
                i + 1,
                stage.name,
                stage.state.as_str(),
                optional(stage.elapsed.map(|t| format!("{:.1}s", t.as_secs_f64()))),
                if stage.leader_only { "rank 0" } else { "all" }
            );
        }
        for stage in &status.stages {
            if let Some(v) = &stage.validation {
                let _ = writeln!(
                    page,
                    "validation {}: {}",
                    stage.name,
                    describe_validation(v)
                );
            }
        }
    }
    let _ = writeln!(page);
    let _ = writeln!(
        page,
        "{:<5} {:<8} {:<20} {:<8} {:<9} {:<12} {:>8} {:>14} {:>10} {:>10} {:>6}  data address",
        "rank",
        "worker",
        "host",
        "slot",
        "state",
        "stage",
        "step",
        "heartbeat age",
        "loss",
        "samples/s",
        "wait"
    );
    for w in &status.workers {
        let _ = writeln!(
            page,
            "{:<5} {:<8} {:<20} {:<8} {:<9} {:<12} {:>8} {:>13.3}s {:>10} {:>10} {:>6}  {}",
            w.rank,
            w.worker_id,
            w.host,
            w.slot,
            w.state,
            status.stages.get(w.stage).map_or("-", |s| s.name.as_str()),
            optional(w.step.map(|s| s.to_string())),
            w.heartbeat_age.as_secs_f64(),
            optional(w.loss.map(|l| format!("{l:.4}"))),
            optional(w.samples_per_second.map(|s| format!("{s:.1}"))),
            optional(w.data_wait_share.map(|s| format!("{:.0}%", s * 100.0))),
            w.data_addr
        );
    }
    if status.workers.iter().any(|w| w.usage.is_some()) {
        let _ = writeln!(page);
        let _ = writeln!(
            page,
            "{:<5} {:>10} {:>10} {:<12} {:>10} {:>6} {:>12}",
            "rank", "memory", "peak", "kind", "TFLOP/s", "MFU", "checkpoint"
        );
        for w in &status.workers {
            let Some(u) = w.usage else { continue };
            let _ = writeln!(
                page,
                "{:<5} {:>10} {:>10} {:<12} {:>10} {:>6} {:>12}",
                w.rank,
                optional(u.memory_bytes.map(gib)),
                optional(u.memory_peak_bytes.map(gib)),
                u.memory_kind.as_str(),
                optional(u.model_tflops.map(|t| format!("{t:.3}"))),
                optional(u.mfu.map(|m| format!("{:.1}%", 100.0 * m))),
                optional(u.checkpoint_seconds.map(|t| format!("{t:.2}s")).map(|t| {
                    match u.checkpoint_bytes {
                        Some(b) => format!("{} {t}", gib(b)),
                        None => t,
                    }
                })),
            );
        }
    }
    if !status.reformations.is_empty() {
        let _ = writeln!(page);
        let _ = writeln!(
            page,
            "re-formations (latest {}):",
            status.reformations.len()
        );
        for r in &status.reformations {
            let _ = writeln!(page, "  {}", describe_reformation(r));
        }
    }
    if !status.waiting.is_empty() {
        let _ = writeln!(page);
        let _ = writeln!(page, "waiting to join ({}):", status.waiting.len());
        for w in &status.waiting {
            let _ = writeln!(
                page,
                "  {} {} {} (for {:.1}s)",
                w.worker_id,
                w.host,
                w.slot,
                w.waiting.as_secs_f64()
            );
        }
    }
    page
}

/// Bytes in GiB, for the page.
fn gib(bytes: u64) -> String {
    format!("{:.2}GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A re-formation in one line, for the page.
fn describe_reformation(r: &super::Reformation) -> String {
    let what = match r.restart {
        Some(n) => format!("restart {n}"),
        None => "take-over".into(),
    };
    let formed = match r.formed {
        Some((generation, world, took)) => format!(
            "generation {generation} formed with {world} worker(s) after {:.1}s",
            took.as_secs_f64()
        ),
        None => "re-forming".into(),
    };
    format!(
        "{:.0}s ago, generation {} ({what}): {}; {formed}",
        r.ago.as_secs_f64(),
        r.from_generation,
        r.reason
    )
}

/// A stage's held-out figures in a few words, for the page.
fn describe_validation(v: &ValidationReport) -> String {
    let mut parts = vec![format!("step {}", v.step)];
    let mut figure = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            parts.push(format!("{name} {value}"));
        }
    };
    figure("recon", v.recon.map(|x| format!("{x:.4}")));
    figure("psnr", v.psnr_db.map(|x| format!("{x:.2} dB")));
    figure("codes", v.codes_used.map(|x| x.to_string()));
    figure("ppl", v.code_perplexity.map(|x| format!("{x:.1}")));
    figure("text", v.text_loss.map(|x| format!("{x:.4} nats")));
    figure("image", v.image_loss.map(|x| format!("{x:.4} nats")));
    figure("contrastive", v.rerank_loss.map(|x| format!("{x:.4} nats")));
    figure("top-1", v.rerank_top1.map(|x| format!("{:.1}%", 100.0 * x)));
    parts.push(format!("{} samples", v.samples));
    parts.join(", ")
}

/// Prometheus' text exposition format.
pub(super) fn render_metrics(status: &JobStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let job = |value: f64| vec![(String::new(), value)];
    metric(
        "dalle_world_size",
        "gauge",
        "Workers in the running group (0 while none runs).",
        &job(status.world_size.into()),
    );
    metric(
        "dalle_generation",
        "gauge",
        "Generation of the group running or last run (+1 per re-formation).",
        &job(status.generation as f64),
    );
    metric(
        "dalle_restarts_total",
        "counter",
        "Re-formations of the group after failures.",
        &job(status.restarts.into()),
    );
    metric(
        "dalle_workers_waiting",
        "gauge",
        "Workers waiting in Join for the next group.",
        &job(status.waiting.len() as f64),
    );
    let phases = [
        JobPhase::Rendezvous,
        JobPhase::Running,
        JobPhase::Finished,
        JobPhase::Failed,
    ];
    metric(
        "dalle_job_phase",
        "gauge",
        "1 for the phase the job is in.",
        &phases.map(|p| {
            (
                format!("{{phase=\"{}\"}}", p.as_str()),
                f64::from(u8::from(p == status.phase)),
            )
        }),
    );
    if !status.stages.is_empty() {
        metric(
            "dalle_stages_total",
            "gauge",
            "Stages in the job's plan.",
            &job(status.stages.len() as f64),
        );
        let complete = status
            .stages
            .iter()
            .filter(|s| s.state == StageState::Complete)
            .count();
        metric(
            "dalle_stages_complete",
            "gauge",
            "Stages of the plan every member finished.",
            &job(complete as f64),
        );
        let seconds: Vec<(String, f64)> = status
            .stages
            .iter()
            .filter_map(|s| {
                let labels = format!("{{stage=\"{}\"}}", escape(&s.name));
                s.elapsed.map(|t| (labels, t.as_secs_f64()))
            })
            .collect();
        metric(
            "dalle_stage_seconds",
            "gauge",
            "Time spent in each stage started so far (to completion, or until now).",
            &seconds,
        );
        // One series per (stage, state), 1 for the state the stage is in:
        // a label whose value changed would start a new series.
        let states = [
            StageState::Pending,
            StageState::Running,
            StageState::Complete,
        ];
        let state_samples: Vec<(String, f64)> = status
            .stages
            .iter()
            .flat_map(|s| {
                states.map(|state| {
                    let labels = format!(
                        "{{stage=\"{}\",state=\"{}\"}}",
                        escape(&s.name),
                        state.as_str()
                    );
                    (labels, f64::from(u8::from(s.state == state)))
                })
            })
            .collect();
        metric(
            "dalle_stage_state",
            "gauge",
            "1 for the state each stage of the plan is in.",
            &state_samples,
        );
    }
    if let Some(step) = status.step {
        metric(
            "dalle_step",
            "gauge",
            "Last step finished by every active worker.",
            &job(step as f64),
        );
    }
    if let Some(loss) = status.loss {
        metric(
            "dalle_loss",
            "gauge",
            "Mean of the active workers' last losses.",
            &job(loss),
        );
    }
    metric(
        "dalle_samples_per_second",
        "gauge",
        "Samples per second, summed over the active workers.",
        &job(status.samples_per_second),
    );
    let held_out: Vec<(&str, &ValidationReport)> = status
        .stages
        .iter()
        .filter_map(|s| s.validation.as_ref().map(|v| (s.name.as_str(), v)))
        .collect();
    if !held_out.is_empty() {
        let by_stage = |value: &dyn Fn(&ValidationReport) -> Option<f64>| -> Vec<(String, f64)> {
            held_out
                .iter()
                .filter_map(|(stage, v)| {
                    value(v).map(|x| (format!("{{stage=\"{}\"}}", escape(stage)), x))
                })
                .collect()
        };
        let losses: Vec<(String, f64)> = held_out
            .iter()
            .flat_map(|(stage, v)| {
                [
                    ("recon", v.recon),
                    ("text", v.text_loss),
                    ("image", v.image_loss),
                    ("contrastive", v.rerank_loss),
                ]
                .into_iter()
                .filter_map(move |(part, x)| {
                    let labels = format!("{{stage=\"{}\",part=\"{part}\"}}", escape(stage));
                    x.map(|x| (labels, x))
                })
            })
            .collect();
        metric(
            "dalle_validation_loss",
            "gauge",
            "Latest held-out loss of each stage by part: the dVAE's reconstruction per image \
             dimension (recon), the transformer's nats per caption (text) and image (image) token, the \
             reranker's contrastive loss (contrastive).",
            &losses,
        );
        metric(
            "dalle_validation_psnr_db",
            "gauge",
            "Latest held-out PSNR (dB) of the dVAE's images decoded from argmax tokens.",
            &by_stage(&|v| v.psnr_db),
        );
        metric(
            "dalle_validation_codes_used",
            "gauge",
            "Distinct dVAE codes over the validation set at the latest evaluation.",
            &by_stage(&|v| v.codes_used.map(f64::from)),
        );
        metric(
            "dalle_validation_code_perplexity",
            "gauge",
            "Perplexity of the dVAE's code histogram over the validation set.",
            &by_stage(&|v| v.code_perplexity),
        );
        metric(
            "dalle_validation_rerank_top1",
            "gauge",
            "Share of held-out images whose own caption the reranker scores highest.",
            &by_stage(&|v| v.rerank_top1),
        );
        metric(
            "dalle_validation_step",
            "gauge",
            "Step of each stage's latest held-out evaluation.",
            &by_stage(&|v| Some(v.step as f64)),
        );
        metric(
            "dalle_validation_samples",
            "gauge",
            "Held-out samples in each stage's latest evaluation.",
            &by_stage(&|v| Some(v.samples as f64)),
        );
    }
    let labelled = |value: &dyn Fn(&super::WorkerStatus) -> Option<f64>| -> Vec<(String, f64)> {
        status
            .workers
            .iter()
            .filter_map(|w| {
                let labels = format!(
                    "{{worker=\"{}\",rank=\"{}\",host=\"{}\",slot=\"{}\",state=\"{}\"}}",
                    escape(&w.worker_id),
                    w.rank,
                    escape(&w.host),
                    escape(&w.slot),
                    w.state
                );
                value(w).map(|v| (labels, v))
            })
            .collect()
    };
    metric(
        "dalle_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since each worker's last heartbeat.",
        &labelled(&|w| Some(w.heartbeat_age.as_secs_f64())),
    );
    metric(
        "dalle_worker_step",
        "gauge",
        "Each worker's last finished step.",
        &labelled(&|w| w.step.map(|s| s as f64)),
    );
    metric(
        "dalle_worker_loss",
        "gauge",
        "Each worker's last loss.",
        &labelled(&|w| w.loss),
    );
    metric(
        "dalle_worker_samples_per_second",
        "gauge",
        "Each worker's samples per second.",
        &labelled(&|w| w.samples_per_second),
    );
    metric(
        "dalle_worker_data_wait_ratio",
        "gauge",
        "Share of each worker's step time spent waiting on data (0..1).",
        &labelled(&|w| w.data_wait_share),
    );
    // Memory carries what it counts as a label of its own: GPU memory in
    // use on the device (cuda_device) or the process's resident set
    // (process_rss) for workers on the CPU.
    let memory = |value: &dyn Fn(&UsageReport) -> Option<u64>| -> Vec<(String, f64)> {
        status
            .workers
            .iter()
            .filter_map(|w| {
                let usage = w.usage?;
                let bytes = value(&usage)?;
                let labels = format!(
                    "{{worker=\"{}\",rank=\"{}\",host=\"{}\",slot=\"{}\",kind=\"{}\"}}",
                    escape(&w.worker_id),
                    w.rank,
                    escape(&w.host),
                    escape(&w.slot),
                    usage.memory_kind.as_str()
                );
                Some((labels, bytes as f64))
            })
            .collect()
    };
    metric(
        "dalle_worker_memory_bytes",
        "gauge",
        "Memory each worker uses at its last step, by kind: cuda_device (GPU memory in use on its \
         device, as the driver reports it) or process_rss (its resident set, CPU workers).",
        &memory(&|u| u.memory_bytes),
    );
    metric(
        "dalle_worker_memory_peak_bytes",
        "gauge",
        "The most memory each worker used so far, by kind (see dalle_worker_memory_bytes).",
        &memory(&|u| u.memory_peak_bytes),
    );
    let usage = |value: &dyn Fn(&UsageReport) -> Option<f64>| {
        labelled(&|w| w.usage.and_then(|u| value(&u)))
    };
    metric(
        "dalle_worker_model_tflops",
        "gauge",
        "Model TFLOP/s of each worker's device over its last log window.",
        &usage(&|u| u.model_tflops),
    );
    metric(
        "dalle_worker_mfu_ratio",
        "gauge",
        "Model FLOPs utilisation of each worker's device (0..1), where its peak is known.",
        &usage(&|u| u.mfu),
    );
    metric(
        "dalle_worker_checkpoint_seconds",
        "gauge",
        "Seconds each worker's last committed checkpoint save took.",
        &usage(&|u| u.checkpoint_seconds),
    );
    metric(
        "dalle_worker_checkpoint_bytes",
        "gauge",
        "Bytes each worker wrote in its last committed checkpoint save.",
        &usage(&|u| u.checkpoint_bytes.map(|b| b as f64)),
    );
    if let Some(last) = status.reformations.last() {
        metric(
            "dalle_last_reformation_timestamp_seconds",
            "gauge",
            "When the latest re-formation of the group (or take-over) began, Unix time.",
            &job(last
                .at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |t| t.as_secs_f64())),
        );
    }
    out
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{StageStatus, WorkerStatus};

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("two\nlines"), "two\\nlines");
    }

    #[test]
    fn metrics_name_every_worker() {
        let status = JobStatus {
            phase: JobPhase::Running,
            generation: 2,
            world_size: 1,
            min_workers: 1,
            max_workers: 2,
            restarts: 1,
            max_restarts: 3,
            step: Some(7),
            loss: Some(1.5),
            samples_per_second: 10.0,
            reason: None,
            workers: vec![WorkerStatus {
                worker_id: "w3".into(),
                rank: 0,
                host: "node\"1".into(),
                slot: "cpu:0".into(),
                data_addr: "node1:5000".into(),
                pid: 42,
                state: "active",
                step: Some(7),
                heartbeat_age: Duration::from_millis(250),
                loss: Some(1.5),
                samples_per_second: Some(10.0),
                data_wait_share: Some(0.1),
                stage: 1,
                usage: Some(UsageReport {
                    memory_bytes: Some(3 << 30),
                    memory_peak_bytes: Some(4 << 30),
                    memory_kind: crate::worker::MemoryKind::CudaDevice,
                    model_tflops: Some(12.5),
                    mfu: Some(0.25),
                    checkpoint_seconds: Some(1.5),
                    checkpoint_bytes: Some(1000),
                }),
            }],
            reformations: vec![super::super::Reformation {
                from_generation: 1,
                restart: Some(1),
                reason: "worker w2 (rank 1) missed its heartbeats".into(),
                at: std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                ago: Duration::from_secs(30),
                formed: Some((2, 1, Duration::from_millis(1500))),
            }],
            waiting: Vec::new(),
            stages: vec![
                StageStatus {
                    name: "dvae".into(),
                    leader_only: false,
                    state: StageState::Complete,
                    elapsed: Some(Duration::from_secs(90)),
                    validation: Some(ValidationReport {
                        step: 40,
                        samples: 64,
                        recon: Some(0.25),
                        psnr_db: Some(21.5),
                        codes_used: Some(37),
                        code_perplexity: Some(20.5),
                        ..ValidationReport::default()
                    }),
                },
                StageStatus {
                    name: "tokenizer".into(),
                    leader_only: true,
                    state: StageState::Running,
                    elapsed: Some(Duration::from_secs(2)),
                    validation: None,
                },
                StageStatus {
                    name: "gpt".into(),
                    leader_only: false,
                    state: StageState::Pending,
                    elapsed: None,
                    validation: None,
                },
            ],
        };
        let text = render_metrics(&status);
        for line in [
            "dalle_world_size 1",
            "dalle_generation 2",
            "dalle_restarts_total 1",
            "dalle_step 7",
            "dalle_loss 1.5",
            "dalle_samples_per_second 10",
            "dalle_job_phase{phase=\"running\"} 1",
            "dalle_stages_total 3",
            "dalle_stages_complete 1",
            "dalle_stage_seconds{stage=\"dvae\"} 90",
            "dalle_stage_state{stage=\"dvae\",state=\"complete\"} 1",
            "dalle_stage_state{stage=\"tokenizer\",state=\"complete\"} 0",
            "dalle_stage_state{stage=\"tokenizer\",state=\"running\"} 1",
            "dalle_worker_heartbeat_age_seconds{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",state=\"active\"} 0.25",
            "dalle_validation_loss{stage=\"dvae\",part=\"recon\"} 0.25",
            "dalle_validation_psnr_db{stage=\"dvae\"} 21.5",
            "dalle_validation_codes_used{stage=\"dvae\"} 37",
            "dalle_validation_code_perplexity{stage=\"dvae\"} 20.5",
            "dalle_validation_step{stage=\"dvae\"} 40",
            "dalle_worker_memory_bytes{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",kind=\"cuda_device\"} 3221225472",
            "dalle_worker_memory_peak_bytes{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",kind=\"cuda_device\"} 4294967296",
            "dalle_worker_model_tflops{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",state=\"active\"} 12.5",
            "dalle_worker_mfu_ratio{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",state=\"active\"} 0.25",
            "dalle_worker_data_wait_ratio{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",state=\"active\"} 0.1",
            "dalle_worker_checkpoint_seconds{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",state=\"active\"} 1.5",
            "dalle_worker_checkpoint_bytes{worker=\"w3\",rank=\"0\",host=\"node\\\"1\",slot=\"cpu:0\",state=\"active\"} 1000",
            "dalle_last_reformation_timestamp_seconds 1700000000",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        let page = render_page(&status);
        assert!(page.contains("generation:  2"), "{page}");
        assert!(page.contains("node1:5000"), "{page}");
        assert!(page.contains("tokenizer      running"), "{page}");
        assert!(
            page.contains("validation dvae: step 40, recon 0.2500, psnr 21.50 dB, codes 37"),
            "{page}"
        );
        assert!(
            !text.contains("part=\"text\""),
            "no transformer figures before it was evaluated:\n{text}"
        );
        assert!(
            page.lines()
                .any(|l| l.starts_with("0 ") && l.contains("tokenizer")),
            "worker w3 is in stage tokenizer:\n{page}"
        );
        assert_eq!(
            status.current_stage().map(|s| s.name.as_str()),
            Some("tokenizer")
        );
        assert!(page.contains("3.00GiB"), "{page}");
        assert!(
            page.contains("generation 1 (restart 1): worker w2 (rank 1) missed its heartbeats; generation 2 formed with 1 worker(s) after 1.5s"),
            "{page}"
        );

        let json: serde_json::Value =
            serde_json::from_str(&super::super::json::render(&status)).unwrap();
        assert_eq!(json["format"], 1);
        assert_eq!(json["current_stage"], "tokenizer");
        assert_eq!(json["stages"][0]["validation"]["codes_used"], 37);
        assert_eq!(json["workers"][0]["stage"], "tokenizer");
        assert_eq!(json["workers"][0]["memory_kind"], "cuda_device");
        assert_eq!(json["workers"][0]["memory_peak_bytes"], 4u64 << 30);
        assert_eq!(json["workers"][0]["heartbeat_age_seconds"], 0.25);
        assert_eq!(json["reformations"][0]["at_unix_ms"], 1_700_000_000_000u64);
        assert_eq!(json["reformations"][0]["formed_generation"], 2);
        assert!(json["workers"][0].get("nothing").is_none());
        let back: super::super::json::Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, super::super::json::Status::from(&status));
    }
}
