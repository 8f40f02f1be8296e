//! `dalle status URL`: where a running job stands, from its coordinator's
//! status page (`dalle launch --status ADDR`): the stages with their state
//! and time, the workers with their step, throughput, data wait, memory
//! and last heartbeat, the latest re-formations. `--json` prints the
//! page's `/status.json` as is, for scripts.
//!
//! A GET over a plain TCP stream is all it takes (the status page speaks
//! HTTP/1.1 without TLS), with `Authorization: Bearer <status token>` when
//! one is given.

use anyhow::{Context, Result, anyhow, bail};
use dalle_runtime::coordinator::json;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The coordinator's status address, e.g. `http://10.0.0.1:7001` (what
    /// `dalle launch --status` serves).
    pub url: String,
    /// The status token (`dalle launch --status-token-file`). Prefer the
    /// environment or --token-file: a command line shows in `ps`.
    #[arg(long, env = "DALLE_STATUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the status token from this file (its first line); it wins over
    /// --token and DALLE_STATUS_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the coordinator's JSON (`/status.json`) instead of the view.
    #[arg(long)]
    pub json: bool,
    /// Give up on a coordinator that does not answer within this.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let token = dalle_runtime::Token::given(args.token_file.as_deref(), args.token.as_deref())?;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let body = fetch(&args.url, token.as_ref(), timeout)?;
    let status: json::Status = serde_json::from_str(&body).with_context(|| {
        format!(
            "{} answered /status.json with something that is not a dalle job status",
            args.url
        )
    })?;
    if args.json {
        print!("{body}");
        if !body.ends_with('\n') {
            println!();
        }
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Where to connect and what to ask for.
#[derive(Debug, PartialEq)]
struct Target {
    /// host:port, as the Host header gives it.
    authority: String,
    /// The path of the JSON status.
    path: String,
}

/// `http://HOST:PORT[/prefix]` (or just `HOST:PORT`) to its JSON route.
fn target(url: &str) -> Result<Target> {
    if url.starts_with("https://") {
        bail!(
            "{url}: the status page speaks plain HTTP (no TLS); give http://HOST:PORT, or reach it \
             through a proxy that does"
        );
    }
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        bail!("{url}: give the status address as http://HOST:PORT");
    }
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    if authority.is_empty() || !authority.contains(':') {
        bail!("{url}: give the status address as http://HOST:PORT (the port is needed)");
    }
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let path = if path.ends_with("/status.json") {
        path.to_string()
    } else {
        format!("{}/status.json", path.trim_end_matches('/'))
    };
    Ok(Target {
        authority: authority.to_string(),
        path,
    })
}

/// The body of `GET /status.json`, or an error saying what went wrong.
fn fetch(url: &str, token: Option<&dalle_runtime::Token>, timeout: Duration) -> Result<String> {
    let target = target(url)?;
    let addrs: Vec<_> = target
        .authority
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {}", target.authority))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        anyhow!(
            "cannot reach the status page at {url} ({}); is the job running with --status?",
            last.unwrap_or_else(|| "no address".into())
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: dalle/{}\r\n\
         Connection: close\r\n",
        target.path,
        target.authority,
        env!("CARGO_PKG_VERSION")
    );
    if let Some(token) = token {
        let _ = write!(request, "Authorization: Bearer {}\r\n", token.expose());
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending the request to {url}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {url}"))?;
    let (code, body) = parse_response(&response).with_context(|| format!("the answer of {url}"))?;
    match code {
        200 => Ok(body),
        401 if token.is_some() => bail!(
            "the status page at {url} refused the status token (401 Unauthorized): give the token \
             of the coordinator's --status-token-file with --token-file or DALLE_STATUS_TOKEN"
        ),
        401 => bail!(
            "the status page at {url} needs a status token (401 Unauthorized): give it with \
             --token-file or DALLE_STATUS_TOKEN"
        ),
        404 => bail!(
            "{url} has no {}: is it a dalle coordinator's status address (`dalle launch --status`) \
             of a release with `dalle status`?",
            target.path
        ),
        _ => bail!(
            "the status page at {url} answered {code}: {}",
            body.lines().next().unwrap_or_default()
        ),
    }
}

/// The status code and body of an HTTP/1.1 response read to its end.
fn parse_response(response: &[u8]) -> Result<(u16, String)> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no complete HTTP response (the connection closed early)")?;
    let head = std::str::from_utf8(&response[..split]).context("an HTTP head that is not text")?;
    let mut body = &response[split + 4..];
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| status.starts_with("HTTP/"))
        .with_context(|| format!("not an HTTP response: {status:?}"))?;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length")
            && let Ok(length) = value.parse::<usize>()
        {
            body = &body[..length.min(body.len())];
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// A chunked body, joined (as a proxy in front of the page may send it).
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk without its size line")?;
        let size = std::str::from_utf8(&body[..end])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)
            .context("a chunk size that is not hexadecimal")?;
        body = &body[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).context("a chunk cut short")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

/// The terminal view of a job's status.
pub fn render(status: &json::Status) -> String {
    let mut out = String::new();
    let dash = || "-".to_string();
    let _ = writeln!(
        out,
        "job {} | generation {} | {} worker(s) (min {}, max {}) | restarts {}/{}",
        status.phase,
        status.generation,
        status.world_size,
        status.min_workers,
        status.max_workers,
        status.restarts,
        status.max_restarts
    );
    let _ = writeln!(
        out,
        "step {} | loss {} | {:.1} samples/s",
        status.step.map_or_else(dash, |s| s.to_string()),
        status.loss.map_or_else(dash, |l| format!("{l:.4}")),
        status.samples_per_second
    );
    if let Some(reason) = &status.reason {
        let _ = writeln!(out, "reason: {reason}");
    }
    if !status.stages.is_empty() {
        let _ = writeln!(out, "\nstages");
        let _ = writeln!(
            out,
            "  {:<3} {:<14} {:<10} {:>10}",
            "#", "stage", "state", "time"
        );
        for (i, stage) in status.stages.iter().enumerate() {
            let current = status.current_stage.as_deref() == Some(stage.name.as_str());
            let _ = writeln!(
                out,
                "  {:<3} {:<14} {:<10} {:>10}{}",
                i + 1,
                stage.name,
                stage.state,
                stage.seconds.map_or_else(dash, duration),
                if current && stage.state != "pending" {
                    "  <- now"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(out, "\nworkers");
    if status.workers.is_empty() {
        let _ = writeln!(out, "  none yet");
    } else {
        let _ = writeln!(
            out,
            "  {:<5} {:<7} {:<18} {:<8} {:<9} {:<12} {:>8} {:>10} {:>9} {:>10} {:>18} {:>8} {:>6}",
            "rank",
            "worker",
            "host",
            "slot",
            "state",
            "stage",
            "step",
            "samples/s",
            "data wait",
            "heartbeat",
            "memory (peak)",
            "TFLOP/s",
            "MFU"
        );
        for w in &status.workers {
            let memory = match (w.memory_bytes, w.memory_peak_bytes) {
                (Some(now), Some(peak)) => format!(
                    "{} ({}){}",
                    gib(now),
                    gib(peak),
                    if w.memory_kind.as_deref() == Some("process_rss") {
                        " rss"
                    } else {
                        ""
                    }
                ),
                (Some(now), None) => gib(now),
                _ => dash(),
            };
            let _ = writeln!(
                out,
                "  {:<5} {:<7} {:<18} {:<8} {:<9} {:<12} {:>8} {:>10} {:>9} {:>10} {:>18} {:>8} {:>6}",
                w.rank,
                w.worker_id,
                w.host,
                w.slot,
                w.state,
                w.stage.clone().unwrap_or_else(dash),
                w.step.map_or_else(dash, |s| s.to_string()),
                w.samples_per_second
                    .map_or_else(dash, |s| format!("{s:.1}")),
                w.data_wait_share
                    .map_or_else(dash, |s| format!("{:.0}%", 100.0 * s)),
                format!("{} ago", duration(w.heartbeat_age_seconds)),
                memory,
                w.model_tflops.map_or_else(dash, |t| format!("{t:.3}")),
                w.mfu.map_or_else(dash, |m| format!("{:.1}%", 100.0 * m)),
            );
        }
        let saves: Vec<String> = status
            .workers
            .iter()
            .filter_map(|w| {
                let seconds = w.checkpoint_seconds?;
                Some(format!(
                    "rank {} {}{}",
                    w.rank,
                    duration(seconds),
                    w.checkpoint_bytes
                        .map(|b| format!(" ({})", gib(b)))
                        .unwrap_or_default()
                ))
            })
            .collect();
        if !saves.is_empty() {
            let _ = writeln!(out, "  last checkpoint save: {}", saves.join(", "));
        }
    }
    if !status.waiting.is_empty() {
        let _ = writeln!(out, "\nwaiting to join ({})", status.waiting.len());
        for w in &status.waiting {
            let _ = writeln!(
                out,
                "  {} {} {} for {}",
                w.worker_id,
                w.host,
                w.slot,
                duration(w.waiting_seconds)
            );
        }
    }
    if !status.reformations.is_empty() {
        let _ = writeln!(
            out,
            "\nre-formations (latest {})",
            status.reformations.len()
        );
        for r in &status.reformations {
            let what = match r.restart {
                Some(n) => format!("restart {n}"),
                None => "take-over".into(),
            };
            let formed = match (r.formed_generation, r.formed_world_size) {
                (Some(g), Some(n)) => format!(
                    "generation {g} with {n} worker(s){}",
                    r.rendezvous_seconds
                        .map(|t| format!(" after {}", duration(t)))
                        .unwrap_or_default()
                ),
                _ => "re-forming".into(),
            };
            let _ = writeln!(
                out,
                "  {} UTC ({} ago) generation {} {what}: {} -> {formed}",
                time_of_day(r.at_unix_ms),
                duration(r.seconds_ago),
                r.from_generation,
                r.reason
            );
        }
    }
    out
}

/// Seconds for people: 0.3s, 42.0s, 3m05s, 2h01m.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2}GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// HH:MM:SS of a Unix time in milliseconds, UTC.
fn time_of_day(unix_ms: u64) -> String {
    let s = (unix_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_addresses_become_their_json_route() {
        let t = target("http://127.0.0.1:7001").unwrap();
        assert_eq!(
            t,
            Target {
                authority: "127.0.0.1:7001".into(),
                path: "/status.json".into()
            }
        );
        assert_eq!(target("10.0.0.1:80/").unwrap().path, "/status.json");
        assert_eq!(
            target("http://proxy:80/dalle/job-1/").unwrap().path,
            "/dalle/job-1/status.json"
        );
        assert_eq!(
            target("http://h:1/status.json").unwrap().path,
            "/status.json"
        );
        let https = target("https://h:1").unwrap_err().to_string();
        assert!(https.contains("plain HTTP"), "{https}");
        assert!(
            target("http://h/")
                .unwrap_err()
                .to_string()
                .contains("port")
        );
    }

    #[test]
    fn responses_are_read_with_their_length_or_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "{\"a\":1}".into()));
        let refused = b"HTTP/1.1 401 Unauthorized\r\n\r\nno";
        assert_eq!(parse_response(refused).unwrap().0, 401);
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn durations_and_times_read_well() {
        assert_eq!(duration(0.31), "0.3s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(7260.0), "2h01m");
        assert_eq!(time_of_day(1_700_000_000_000), "22:13:20");
    }
}
