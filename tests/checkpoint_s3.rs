//! Checkpoints on a real S3-compatible server (Garage on loopback): round
//! trip with a multipart object, fallback past a corrupt object, and a
//! server that stops answering in the middle of a save.

mod support;

use dalle_store::checkpoint::{CheckpointConfig, Checkpointer, Fence, Loaded, Snapshot};
use dalle_store::object_store::aws::AmazonS3Builder;
use dalle_store::object_store::{
    BackoffConfig, ClientOptions, ObjectStoreExt, PutPayload, RetryConfig,
};
use dalle_store::{Location, StoreConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::garage::Garage;

const MB: usize = 1_000_000;

/// `s3://BUCKET/prefix` on `garage`. The store carries this server's key
/// explicitly rather than through `AWS_*` variables: the tests run in
/// parallel, each with its own server and key.
fn location(garage: &Garage, prefix: &str, request_timeout_secs: u64) -> Location {
    let config = StoreConfig {
        endpoint: Some(garage.endpoint.clone()),
        region: Some(garage.region.clone()),
        request_timeout_secs,
        ..StoreConfig::default()
    };
    let mut run = Location::parse(&format!("s3://{}/{prefix}", garage.bucket), &config).unwrap();
    let env: BTreeMap<&str, String> = garage.env().into_iter().collect();
    // Client options first: they would reset `allow_http`.
    let store = AmazonS3Builder::new()
        .with_client_options(
            ClientOptions::new().with_timeout(Duration::from_secs(request_timeout_secs)),
        )
        .with_bucket_name(&garage.bucket)
        .with_endpoint(&env["DALLE_STORE__ENDPOINT"])
        .with_allow_http(true)
        .with_region(&env["AWS_REGION"])
        .with_access_key_id(&env["AWS_ACCESS_KEY_ID"])
        .with_secret_access_key(&env["AWS_SECRET_ACCESS_KEY"])
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: config.max_retries,
            retry_timeout: Duration::from_secs(config.retry_timeout_secs),
        })
        .build()
        .unwrap();
    run.store = Arc::new(store);
    run
}

fn config() -> CheckpointConfig {
    CheckpointConfig {
        keep_last: 3,
        keep_every: None,
        part_bytes: 8 << 20,
        concurrency: 4,
        fence: None,
    }
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn snapshot(step: u64, big: usize) -> Snapshot {
    let mut objects = vec![
        ("model.safetensors".to_string(), noise(3000, step)),
        ("optimizer.bin".to_string(), noise(6000, step + 100)),
        (
            "cursor.json".to_string(),
            format!("{{\"offset\":{step}}}").into_bytes(),
        ),
    ];
    if big > 0 {
        objects.push(("weights/big.bin".to_string(), noise(big, step + 200)));
    }
    Snapshot {
        stage: "gpt".into(),
        step,
        objects,
        external: Vec::new(),
        metadata: serde_json::json!({"step": step, "world_size": 1, "version": "test"}),
    }
}

fn assert_same(loaded: &Loaded, snapshot: &Snapshot) {
    assert_eq!(
        (loaded.stage.as_str(), loaded.step),
        (snapshot.stage.as_str(), snapshot.step)
    );
    assert_eq!(loaded.metadata, snapshot.metadata);
    let expected: BTreeMap<String, Vec<u8>> = snapshot.objects.iter().cloned().collect();
    assert!(
        loaded.objects == expected,
        "objects of step {} differ",
        loaded.step
    );
}

/// Checkpoint warnings and object_store's retries, in the test's output.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,object_store=info,dalle_store=info")
        .with_test_writer()
        .try_init();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn checkpoints_round_trip_on_garage_with_multipart_objects() {
    logs();
    let garage = Garage::start();
    let run = location(&garage, "runs/round-trip", 30);
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    assert!(!checkpointer.exists().unwrap());
    let first = snapshot(1, 0);
    let second = snapshot(2, 24 * MB);
    checkpointer.save_async(first.clone()).unwrap();
    let info = checkpointer.save_blocking(second.clone()).unwrap();
    assert_eq!(
        info.url,
        format!("s3://{}/runs/round-trip/gpt/step-0000000002", garage.bucket)
    );

    // The 24 MB object went up in 8 MiB parts: S3 marks a multipart
    // object's ETag with its part count.
    let big = run.child("gpt/step-0000000002/weights/big.bin");
    let meta = rt().block_on(run.store.head(&big)).unwrap();
    assert_eq!(meta.size, 24 * MB as u64);
    let etag = meta.e_tag.unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");

    let loaded = checkpointer.load_latest("gpt").unwrap().unwrap();
    assert_same(&loaded, &second);
    let mut older = run.clone();
    older.prefix = run.child("gpt/step-0000000001");
    assert_same(&checkpointer.load(&older).unwrap(), &first);
    assert!(checkpointer.exists().unwrap());
    let latest = rt()
        .block_on(async { run.store.get(&run.child("gpt/latest")).await?.bytes().await })
        .unwrap();
    assert_eq!(&latest[..], b"step-0000000002\n");
}

#[test]
fn a_corrupt_object_on_garage_falls_back_to_the_previous_checkpoint() {
    logs();
    let garage = Garage::start();
    let run = location(&garage, "runs/corrupt", 30);
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    checkpointer.save_blocking(snapshot(1, 0)).unwrap();
    checkpointer.save_blocking(snapshot(2, 10 * MB)).unwrap();
    for object in ["optimizer.bin", "weights/big.bin"] {
        let path = run.child(&format!("gpt/step-0000000002/{object}"));
        let good = rt()
            .block_on(async { run.store.get(&path).await?.bytes().await })
            .unwrap();
        let mut bad = good.to_vec();
        let middle = bad.len() / 2;
        bad[middle] ^= 0x01;
        rt().block_on(run.store.put(&path, PutPayload::from(bad)))
            .unwrap();

        let loaded = checkpointer.load_latest("gpt").unwrap().unwrap();
        assert_same(&loaded, &snapshot(1, 0));
        let url = format!(
            "s3://{}/runs/corrupt/gpt/step-0000000002/{object}",
            garage.bucket
        );
        let reason = &loaded.skipped[0].reason;
        assert!(
            reason.contains(&url) && reason.contains("checksum mismatch"),
            "{reason}"
        );
        drop(loaded);
        rt().block_on(run.store.put(&path, PutPayload::from(good)))
            .unwrap();
    }
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 2);
}

/// The pid of `garage`'s server: the child of this process whose config
/// names this server's S3 port.
fn server_pid(garage: &Garage) -> u32 {
    let port = garage.endpoint.rsplit(':').next().unwrap();
    let bind = format!("api_bind_addr = \"127.0.0.1:{port}\"");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(std::process::id()) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let config = args
            .iter()
            .position(|a| a == "-c")
            .and_then(|i| args.get(i + 1));
        if args.iter().any(|a| a == "server")
            && config
                .is_some_and(|c| std::fs::read_to_string(c).is_ok_and(|text| text.contains(&bind)))
        {
            return pid;
        }
    }
    panic!(
        "no garage server child of this process serves {}",
        garage.endpoint
    );
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn a_store_unreachable_for_seconds_mid_save_is_retried_and_nothing_is_lost() {
    logs();
    let garage = Garage::start();
    let pid = server_pid(&garage);
    // Requests time out after 2 s and are retried with backoff for up to
    // 60 s (object_store's retry, configured by StoreConfig).
    let run = location(&garage, "runs/unreachable", 2);
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    let first = snapshot(1, 0);
    checkpointer.save_blocking(first.clone()).unwrap();

    let second = snapshot(2, 40 * MB);
    let started = Instant::now();
    checkpointer.save_async(second.clone()).unwrap();
    // Small objects go first, then the large one in parts: once the small
    // ones are there, the multipart upload is starting. Freeze the server
    // in the middle of it.
    let small = run.child("gpt/step-0000000002/cursor.json");
    let runtime = rt();
    while runtime.block_on(run.store.head(&small)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the save never began"
        );
    }
    signal(pid, "-STOP");
    std::thread::sleep(Duration::from_secs(3));
    signal(pid, "-CONT");
    let info = checkpointer.wait().unwrap().unwrap();
    assert_eq!(info.step, 2);
    assert!(started.elapsed() >= Duration::from_secs(3));

    assert_same(&checkpointer.load_latest("gpt").unwrap().unwrap(), &second);
    let mut older = run.clone();
    older.prefix = run.child("gpt/step-0000000001");
    assert_same(&checkpointer.load(&older).unwrap(), &first);
}

#[test]
fn on_garage_which_ignores_conditional_puts_an_older_group_is_fenced_out() {
    logs();
    let garage = Garage::start();
    let run = location(&garage, "runs/fenced", 30);
    let group = |generation| CheckpointConfig {
        fence: Some(Fence {
            epoch: 1,
            generation,
        }),
        ..config()
    };
    let mut old = Checkpointer::new(run.clone(), group(1)).unwrap();
    old.claim().unwrap();
    old.save_blocking(snapshot(1, 0)).unwrap();
    // A newer group takes over while the old writer sleeps.
    let mut new = Checkpointer::new(run.clone(), group(2)).unwrap();
    new.claim().unwrap();
    new.save_blocking(snapshot(2, 0)).unwrap();
    // Woken up, the old writer can neither commit nor prune.
    let err = old.save_blocking(snapshot(3, 0)).unwrap_err();
    assert!(err.to_string().contains("has claimed the run"), "{err}");
    assert!(old.discard_after("gpt", 1).is_err());
    assert_eq!(new.committed_steps("gpt").unwrap(), [1, 2]);
    let step_3 = run.child("gpt/step-0000000003/manifest.json");
    assert!(rt().block_on(run.store.head(&step_3)).is_err());
}
