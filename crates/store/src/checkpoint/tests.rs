//! Checkpoints on `file://` and `memory://`, with a store wrapper that can
//! hold puts at a gate, fail them, or ignore create-only puts (as Garage does).

use super::*;
use crate::{Location, StoreConfig};
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

// ---------------------------------------------------------------- helpers

const MIB: usize = 1 << 20;

fn config() -> CheckpointConfig {
    CheckpointConfig {
        keep_last: 3,
        keep_every: None,
        part_bytes: 5 * MIB,
        concurrency: 4,
        fence: None,
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn snapshot(stage: &str, step: u64) -> Snapshot {
    Snapshot {
        stage: stage.into(),
        step,
        objects: vec![
            ("model.safetensors".into(), bytes(1000 + step as usize, 1)),
            ("optimizer.bin".into(), bytes(2000, step as u8)),
            ("rng/rank-00000.bin".into(), bytes(16, 3)),
        ],
        external: Vec::new(),
        metadata: serde_json::json!({"stage": stage, "step": step, "world_size": 2}),
    }
}

fn memory(name: &str) -> Location {
    Location::parse(&format!("memory://{name}/runs/a"), &StoreConfig::default()).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn put(loc: &Location, name: &str, data: Vec<u8>) {
    rt().block_on(loc.store.put(&loc.child(name), data.into()))
        .unwrap();
}

fn get(loc: &Location, name: &str) -> Vec<u8> {
    rt().block_on(async { loc.store.get(&loc.child(name)).await?.bytes().await })
        .unwrap()
        .to_vec()
}

fn delete(loc: &Location, name: &str) {
    rt().block_on(loc.store.delete(&loc.child(name))).unwrap();
}

/// Every key under the location, relative to it, sorted.
fn keys(loc: &Location) -> Vec<String> {
    use futures::TryStreamExt;
    let prefix = format!("{}/", loc.prefix);
    let mut keys: Vec<String> = rt()
        .block_on(loc.store.list(Some(&loc.prefix)).try_collect::<Vec<_>>())
        .unwrap()
        .into_iter()
        .map(|o| o.location.as_ref().trim_start_matches(&prefix).to_string())
        .collect();
    keys.sort();
    keys
}

/// Everything logged (warn and up) by any test so far, for checking that a
/// message names what it should. Call it once before what should log.
fn logs() -> String {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buffer = BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        #[derive(Clone)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || capture.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buffer
    });
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}

fn assert_same(loaded: &Loaded, snapshot: &Snapshot) {
    assert_eq!(loaded.stage, snapshot.stage);
    assert_eq!(loaded.step, snapshot.step);
    assert_eq!(loaded.metadata, snapshot.metadata);
    let expected: BTreeMap<String, Vec<u8>> = snapshot.objects.iter().cloned().collect();
    assert!(
        loaded.objects == expected,
        "objects differ at step {}",
        loaded.step
    );
}

// ------------------------------------------------------------ test store

#[derive(Clone, Copy, Debug, PartialEq)]
enum CreateMode {
    Honour,
    /// Treat create-only as overwrite (Garage ignores `If-None-Match`).
    Ignore,
    /// Answer NotImplemented (S3 with conditional puts disabled).
    Refuse,
}

/// Wraps a store: records every put, can hold puts until a gate opens,
/// fail puts whose key contains a string, and change create-only puts.
#[derive(Debug)]
struct TestStore {
    inner: Arc<dyn ObjectStore>,
    puts: Mutex<Vec<String>>,
    attempted: Mutex<Option<mpsc::Sender<String>>>,
    gate: tokio::sync::watch::Receiver<bool>,
    fail_if: Mutex<Option<String>>,
    create: CreateMode,
}

impl std::fmt::Display for TestStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestStore({})", self.inner)
    }
}

impl TestStore {
    /// Wraps `loc`'s store; the gate starts open.
    fn wrap(
        loc: &mut Location,
        create: CreateMode,
    ) -> (Arc<TestStore>, tokio::sync::watch::Sender<bool>) {
        let (open, gate) = tokio::sync::watch::channel(true);
        let store = Arc::new(TestStore {
            inner: loc.store.clone(),
            puts: Mutex::default(),
            attempted: Mutex::default(),
            gate,
            fail_if: Mutex::default(),
            create,
        });
        loc.store = store.clone();
        (store, open)
    }

    async fn before_put(&self, location: &ObjectPath) -> object_store::Result<()> {
        let key = location.to_string();
        if let Some(tx) = self.attempted.lock().unwrap().as_ref() {
            let _ = tx.send(key.clone());
        }
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open).await.unwrap();
        self.puts.lock().unwrap().push(key.clone());
        match self.fail_if.lock().unwrap().as_deref() {
            Some(s) if key.contains(s) => Err(object_store::Error::Generic {
                store: "TestStore",
                source: format!("injected failure for {key}").into(),
            }),
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for TestStore {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.before_put(location).await?;
        if opts.mode == PutMode::Create {
            match self.create {
                CreateMode::Honour => {}
                CreateMode::Ignore => opts.mode = PutMode::Overwrite,
                CreateMode::Refuse => {
                    return Err(object_store::Error::NotImplemented {
                        operation: "put_opts with PutMode::Create".into(),
                        implementer: "TestStore".into(),
                    });
                }
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.before_put(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

// ------------------------------------------------------------------ tests

fn round_trip(run: Location) {
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    assert!(!checkpointer.exists().unwrap());
    assert!(checkpointer.load_latest("dvae").unwrap().is_none());

    let first = snapshot("dvae", 1);
    // Larger than a part: a multipart upload, read back by ranges.
    let mut second = snapshot("dvae", 20);
    second
        .objects
        .push(("big/weights.bin".into(), bytes(11 * MIB + 3, 9)));
    second.objects.push(("empty.bin".into(), Vec::new()));
    checkpointer.save_async(first.clone()).unwrap();
    let info = checkpointer.save_blocking(second.clone()).unwrap();
    assert_eq!(
        (info.step, info.bytes),
        (20, 11 * MIB as u64 + 3 + 1020 + 2016)
    );
    assert_eq!(info.url, format!("{}/dvae/step-0000000020", run.url));
    assert!(checkpointer.wait().unwrap().is_none());

    assert_eq!(
        keys(&run),
        [
            "dvae/latest",
            "dvae/step-0000000001/manifest.json",
            "dvae/step-0000000001/model.safetensors",
            "dvae/step-0000000001/optimizer.bin",
            "dvae/step-0000000001/rng/rank-00000.bin",
            "dvae/step-0000000020/big/weights.bin",
            "dvae/step-0000000020/empty.bin",
            "dvae/step-0000000020/manifest.json",
            "dvae/step-0000000020/model.safetensors",
            "dvae/step-0000000020/optimizer.bin",
            "dvae/step-0000000020/rng/rank-00000.bin",
        ]
    );
    assert_eq!(get(&run, "dvae/latest"), b"step-0000000020\n");
    let manifest: Manifest =
        serde_json::from_slice(&get(&run, "dvae/step-0000000020/manifest.json")).unwrap();
    let big = manifest
        .objects
        .iter()
        .find(|o| o.name == "big/weights.bin")
        .unwrap();
    assert_eq!(big.size, 11 * MIB as u64 + 3);
    assert_eq!(big.crc32c, crc32c::crc32c(&second.objects[3].1));
    assert_eq!(manifest.metadata, second.metadata);

    let loaded = checkpointer.load_latest("dvae").unwrap().unwrap();
    assert_same(&loaded, &second);
    assert!(loaded.skipped.is_empty());
    assert!(loaded.url.ends_with("dvae/step-0000000020"));
    let mut older = run.clone();
    older.prefix = run.child("dvae/step-0000000001");
    assert_same(&checkpointer.load(&older).unwrap(), &first);
    older.prefix = run.child("dvae/step-0000000001/manifest.json");
    assert_same(&checkpointer.load(&older).unwrap(), &first);
    assert!(checkpointer.exists().unwrap());
    assert!(checkpointer.load_latest("gpt").unwrap().is_none());
}

#[test]
fn round_trip_on_memory() {
    round_trip(memory("ckpt-round-trip"));
}

#[test]
fn round_trip_on_local_disk_by_path_and_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("by-path");
    round_trip(Location::parse(path.to_str().unwrap(), &StoreConfig::default()).unwrap());
    let url = format!("file://{}/by-url", dir.path().display());
    round_trip(Location::parse(&url, &StoreConfig::default()).unwrap());
}

#[test]
fn a_save_that_stopped_before_its_manifest_is_ignored_then_cleaned_up() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let local = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    for run in [memory("ckpt-killed"), local] {
        let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
        let committed = snapshot("gpt", 10);
        checkpointer.save_blocking(committed.clone()).unwrap();
        // The writer died after uploading the objects of step 20: no manifest.
        for (name, data) in snapshot("gpt", 20).objects {
            put(&run, &format!("gpt/step-0000000020/{name}"), data);
        }
        let loaded = checkpointer.load_latest("gpt").unwrap().unwrap();
        assert_same(&loaded, &committed);
        assert!(
            logs().contains(&format!("{}/gpt/step-0000000020: incomplete", run.url)),
            "{}",
            logs()
        );
        drop(loaded);
        // The restarted run redoes step 20 (stale objects of the first try
        // not in the new snapshot go), then crashes while saving 30; the
        // commit of 40 removes 30's leftovers.
        put(&run, "gpt/step-0000000020/stale.bin", vec![1, 2, 3]);
        checkpointer.save_blocking(snapshot("gpt", 20)).unwrap();
        assert!(!keys(&run).iter().any(|k| k.contains("stale.bin")));
        put(&run, "gpt/step-0000000030/model.safetensors", vec![7; 10]);
        let info = checkpointer.save_blocking(snapshot("gpt", 40)).unwrap();
        assert_eq!(info.removed_incomplete, [30]);
        assert!(!keys(&run).iter().any(|k| k.contains("step-0000000030")));
        if let Some(dir) = layout::local_dir(&run, &run.child("gpt/step-0000000030")) {
            assert!(
                !dir.exists(),
                "empty directory {} left behind",
                dir.display()
            );
        }
        assert_eq!(checkpointer.committed_steps("gpt").unwrap(), [10, 20, 40]);
    }
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_loudly_and_is_replaced_by_the_next_save() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let run = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    let mut big = snapshot("dvae", 2);
    big.objects.push(("big.bin".into(), bytes(6 * MIB, 5)));
    checkpointer.save_blocking(snapshot("dvae", 1)).unwrap();
    checkpointer.save_blocking(big.clone()).unwrap();

    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, &str, Damage); 4] = [
        ("optimizer.bin", "checksum mismatch", |d| d[1234] ^= 0x10),
        ("optimizer.bin", "larger than the 2000 bytes", |d| d.push(0)),
        ("model.safetensors", "size is 1001 bytes", |d| {
            d.pop();
        }),
        ("big.bin", "checksum mismatch", |d| d[5 * MIB + 7] ^= 1),
    ];
    for (object, what, damage) in cases {
        let name = format!("dvae/step-0000000002/{object}");
        let good = get(&run, &name);
        let mut bad = good.clone();
        damage(&mut bad);
        put(&run, &name, bad);
        let loaded = checkpointer.load_latest("dvae").unwrap().unwrap();
        assert_same(&loaded, &snapshot("dvae", 1));
        let object_url = format!("{}/{name}", dir.path().display());
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].step, 2);
        let reason = &loaded.skipped[0].reason;
        assert!(
            reason.contains(&object_url) && reason.contains(what),
            "{reason}"
        );
        let log = logs();
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains(&object_url) && l.contains(what)),
            "no error line naming {object_url}: {log}"
        );
        put(&run, &name, good);
    }
    // A missing object is reported the same way.
    let name = "dvae/step-0000000002/rng/rank-00000.bin";
    delete(&run, name);
    let loaded = checkpointer.load_latest("dvae").unwrap().unwrap();
    assert_eq!(loaded.step, 1);
    assert!(loaded.skipped[0].reason.contains("missing"));
    drop(loaded);

    // Training resumed from step 1 reaches step 2 again: the checkpoint
    // that failed verification is replaced, not an error.
    checkpointer.save_blocking(big.clone()).unwrap();
    assert_same(&checkpointer.load_latest("dvae").unwrap().unwrap(), &big);

    // A manifest that does not parse is passed over too; if nothing
    // verifies, loading refuses rather than starting over.
    put(
        &run,
        "dvae/step-0000000002/manifest.json",
        b"{not json".to_vec(),
    );
    assert_eq!(checkpointer.load_latest("dvae").unwrap().unwrap().step, 1);
    put(&run, "dvae/step-0000000001/optimizer.bin", vec![0; 2000]);
    let err = checkpointer.load_latest("dvae").unwrap_err().to_string();
    assert!(
        err.contains("none verifies") && err.contains("step 1:"),
        "{err}"
    );
}

#[test]
fn a_missing_or_stale_latest_pointer_falls_back_to_listing() {
    logs();
    let run = memory("ckpt-latest");
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    for step in [1, 2] {
        checkpointer.save_blocking(snapshot("gpt", step)).unwrap();
    }
    delete(&run, "gpt/latest");
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 2);
    assert!(logs().contains(&format!("{}/gpt/latest is missing", run.url)));

    // Pointing at a deleted step.
    put(&run, "gpt/latest", b"step-0000000002\n".to_vec());
    for key in keys(&run) {
        if key.starts_with("gpt/step-0000000002/") {
            delete(&run, &key);
        }
    }
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 1);
    assert!(logs().contains("names step 2, which is not committed"));

    // Behind (the writer died between the manifest and the pointer): the
    // committed step wins.
    checkpointer.save_blocking(snapshot("gpt", 3)).unwrap();
    put(&run, "gpt/latest", b"step-0000000001\n".to_vec());
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 3);

    // Garbage in the pointer is ignored.
    put(&run, "gpt/latest", b"hello".to_vec());
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 3);
}

#[test]
fn retention_keeps_the_last_two_and_every_fifth_and_spares_pinned_ones() {
    let run = memory("ckpt-retention");
    let config = CheckpointConfig {
        keep_last: 2,
        keep_every: Some(5),
        ..config()
    };
    let mut checkpointer = Checkpointer::new(run.clone(), config).unwrap();
    for step in 1..=12 {
        checkpointer.save_async(snapshot("dvae", step)).unwrap();
    }
    checkpointer.wait().unwrap();
    assert_eq!(
        checkpointer.committed_steps("dvae").unwrap(),
        [5, 10, 11, 12]
    );
    // Nothing but those four directories and the pointer.
    let dirs: std::collections::BTreeSet<String> = keys(&run)
        .into_iter()
        .map(|k| k.split('/').take(2).collect::<Vec<_>>().join("/"))
        .collect();
    assert_eq!(
        dirs.into_iter().collect::<Vec<_>>(),
        [
            "dvae/latest",
            "dvae/step-0000000005",
            "dvae/step-0000000010",
            "dvae/step-0000000011",
            "dvae/step-0000000012"
        ]
    );

    // A checkpoint this process holds is not deleted while held.
    let mut held = run.clone();
    held.prefix = run.child("dvae/step-0000000011");
    let loaded = checkpointer.load(&held).unwrap();
    checkpointer.save_blocking(snapshot("dvae", 13)).unwrap();
    let info = checkpointer.save_blocking(snapshot("dvae", 14)).unwrap();
    assert_eq!(info.deleted, [12]);
    assert_eq!(
        checkpointer.committed_steps("dvae").unwrap(),
        [5, 10, 11, 13, 14]
    );
    drop(loaded);
    let info = checkpointer.save_blocking(snapshot("dvae", 16)).unwrap();
    assert_eq!(info.deleted, [11, 13]);
    assert_eq!(
        checkpointer.committed_steps("dvae").unwrap(),
        [5, 10, 14, 16]
    );
}

#[test]
fn at_most_one_save_is_in_flight() {
    let mut run = memory("ckpt-in-flight");
    let (store, gate) = TestStore::wrap(&mut run, CreateMode::Honour);
    let (attempts_tx, attempts) = mpsc::channel();
    *store.attempted.lock().unwrap() = Some(attempts_tx);
    gate.send(false).unwrap();

    let (tx, rx) = mpsc::channel();
    let worker = {
        let run = run.clone();
        std::thread::spawn(move || {
            let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
            // Returns although the store holds every put.
            checkpointer.save_async(snapshot("gpt", 1)).unwrap();
            tx.send("first queued").unwrap();
            // Blocks until step 1 is committed.
            checkpointer.save_async(snapshot("gpt", 2)).unwrap();
            let manifest = run.child("gpt/step-0000000001/manifest.json");
            let committed = rt().block_on(run.store.head(&manifest)).is_ok();
            tx.send(if committed {
                "second queued after commit"
            } else {
                "second queued early"
            })
            .unwrap();
            checkpointer.wait().unwrap().unwrap()
        })
    };
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok("first queued"));
    // The uploader is at the gate with step 1's first object.
    let first = attempts.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.contains("step-0000000001"), "{first}");
    assert!(rx.try_recv().is_err(), "the second save did not wait");
    gate.send(true).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)),
        Ok("second queued after commit")
    );
    assert_eq!(worker.join().unwrap().step, 2);
    // Every put of step 1, pointer included, came before any of step 2.
    let puts = store.puts.lock().unwrap().clone();
    let second = puts
        .iter()
        .position(|k| k.contains("step-0000000002"))
        .unwrap();
    assert!(
        !puts[second..].iter().any(|k| k.contains("step-0000000001")),
        "{puts:#?}"
    );
    assert!(puts[..second].contains(&"runs/a/gpt/latest".to_string()));
}

#[test]
fn a_second_manifest_for_a_step_is_refused_whatever_the_store_does_with_create() {
    for (i, mode) in [CreateMode::Honour, CreateMode::Ignore, CreateMode::Refuse]
        .into_iter()
        .enumerate()
    {
        let mut run = memory(&format!("ckpt-create-{i}"));
        let (store, _gate) = TestStore::wrap(&mut run, mode);
        let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
        let original = snapshot("gpt", 5);
        checkpointer.save_blocking(original.clone()).unwrap();
        let puts_before = store.puts.lock().unwrap().len();
        let mut other = snapshot("gpt", 5);
        other.objects[0].1 = vec![0; 10];
        let err = checkpointer.save_blocking(other).unwrap_err();
        let manifest_url = format!("{}/gpt/step-0000000005/manifest.json", run.url);
        assert!(
            matches!(&err, CheckpointError::SaveFailed { source, .. }
                if matches!(**source, CheckpointError::AlreadyCommitted { .. })),
            "{mode:?}: {err}"
        );
        assert!(err.to_string().contains(&manifest_url), "{err}");
        // Nothing was written over the committed checkpoint.
        assert_eq!(store.puts.lock().unwrap().len(), puts_before, "{mode:?}");
        assert_same(
            &checkpointer.load_latest("gpt").unwrap().unwrap(),
            &original,
        );
    }
    // The manifest put itself is create-only where the store honours it.
    let run = memory("ckpt-create-direct");
    rt().block_on(async {
        let path = run.child("gpt/step-0000000001/manifest.json");
        writer::write_manifest(&run, &path, "a".into())
            .await
            .unwrap();
        // The same bytes again: a retried put whose response was lost.
        writer::write_manifest(&run, &path, "a".into())
            .await
            .unwrap();
        let err = writer::write_manifest(&run, &path, "b".into())
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::AlreadyCommitted { .. }),
            "{err}"
        );
    });
}

#[test]
fn a_failed_save_is_reported_on_the_next_call_and_training_goes_on() {
    let mut run = memory("ckpt-failing");
    let (store, _gate) = TestStore::wrap(&mut run, CreateMode::Honour);
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    checkpointer.save_blocking(snapshot("gpt", 1)).unwrap();
    *store.fail_if.lock().unwrap() = Some("step-0000000002/optimizer".into());
    checkpointer.save_async(snapshot("gpt", 2)).unwrap();
    let err = checkpointer.save_async(snapshot("gpt", 3)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{}/gpt/step-0000000002", run.url)) && text.contains("injected"),
        "{text}"
    );
    // Step 3 was queued all the same and commits.
    assert_eq!(checkpointer.wait().unwrap().unwrap().step, 3);
    assert_eq!(checkpointer.committed_steps("gpt").unwrap(), [1, 3]);
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 3);
    // The objects step 2 did write are gone after step 3's commit.
    assert!(!keys(&run).iter().any(|k| k.contains("step-0000000002")));

    // Through `wait` too, and step 1 stays loadable.
    *store.fail_if.lock().unwrap() = Some("manifest.json".into());
    checkpointer.save_async(snapshot("gpt", 4)).unwrap();
    assert!(
        checkpointer
            .wait()
            .unwrap_err()
            .to_string()
            .contains("step-0000000004")
    );
    assert_eq!(checkpointer.load_latest("gpt").unwrap().unwrap().step, 3);
}

#[test]
fn bad_names_are_refused_before_anything_is_queued() {
    let mut checkpointer = Checkpointer::new(memory("ckpt-names"), config()).unwrap();
    let mut bad = snapshot("gpt", 1);
    bad.objects.push(("../escape".into(), vec![1]));
    assert!(matches!(
        checkpointer.save_async(bad),
        Err(CheckpointError::Invalid(_))
    ));
    let mut twice = snapshot("gpt", 1);
    twice.objects.push(("optimizer.bin".into(), vec![1]));
    assert!(checkpointer.save_blocking(twice).is_err());
    assert!(checkpointer.save_async(snapshot("a/b", 1)).is_err());
    assert!(!checkpointer.saving());
    assert!(
        Checkpointer::new(
            memory("ckpt-names"),
            CheckpointConfig {
                part_bytes: MIB,
                ..config()
            }
        )
        .is_err()
    );
}

#[test]
fn discard_after_lets_an_older_resume_save_again() {
    let run = memory("ckpt-discard");
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    for step in [10, 20, 30] {
        checkpointer.save_blocking(snapshot("gpt", step)).unwrap();
    }
    assert_eq!(checkpointer.discard_after("gpt", 10).unwrap(), [20, 30]);
    assert_eq!(get(&run, "gpt/latest"), b"step-0000000010\n");
    checkpointer.save_blocking(snapshot("gpt", 20)).unwrap();
    assert_eq!(checkpointer.committed_steps("gpt").unwrap(), [10, 20]);
}

#[test]
fn dropping_the_checkpointer_finishes_the_save_in_flight() {
    let run = memory("ckpt-drop");
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    checkpointer.save_async(snapshot("gpt", 7)).unwrap();
    drop(checkpointer);
    assert!(keys(&run).contains(&"gpt/step-0000000007/manifest.json".to_string()));
}

#[test]
fn bench_reports_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let run = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    let report = bench(run.clone(), 12 * MIB, config()).unwrap();
    assert_eq!(report.objects, 4);
    assert!(report.bytes >= 12 * MIB as u64);
    assert!(report.save_mb_s > 0.0 && report.load_mb_s > 0.0);
    // Cleaned up, and runnable twice in the same place.
    bench(run, 6 * MIB, config()).unwrap();
}

#[test]
fn a_manifest_claiming_a_huge_size_falls_back_instead_of_allocating_it() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let local = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    for run in [local, memory("ckpt-huge-size")] {
        let checkpointer = {
            let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
            checkpointer.save_blocking(snapshot("gpt", 1)).unwrap();
            checkpointer.save_blocking(snapshot("gpt", 2)).unwrap();
            checkpointer
        };
        // Step 2's manifest says one object holds 2^40 bytes (1 TiB): a
        // reader that sized its buffer by that claim would abort the process.
        let manifest_name = "gpt/step-0000000002/manifest.json";
        let mut manifest: Manifest = serde_json::from_slice(&get(&run, manifest_name)).unwrap();
        let entry = manifest
            .objects
            .iter_mut()
            .find(|o| o.name == "optimizer.bin")
            .unwrap();
        let real = entry.size;
        entry.size = 1 << 40;
        put(&run, manifest_name, serde_json::to_vec(&manifest).unwrap());

        let loaded = checkpointer.load_latest("gpt").unwrap().unwrap();
        assert_same(&loaded, &snapshot("gpt", 1));
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].step, 2);
        let object_url = run.describe(&run.child("gpt/step-0000000002/optimizer.bin"));
        let reason = &loaded.skipped[0].reason;
        for part in [object_url.as_str(), &real.to_string(), "1099511627776"] {
            assert!(reason.contains(part), "{part:?} not in {reason}");
        }
        let log = logs();
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains(&object_url)
                && l.contains("1099511627776")),
            "no error line naming {object_url}: {log}"
        );
    }
}

#[test]
fn retention_removes_staging_files_of_killed_writes_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let run = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    let mut checkpointer = Checkpointer::new(run.clone(), config()).unwrap();
    checkpointer.save_blocking(snapshot("gpt", 1)).unwrap();
    // What object_store's LocalFileSystem leaves when the process dies
    // mid-put: `<name>#<N>` files, hidden from listings. Step 2 is a save
    // killed during its first put (nothing else in its directory); step 9
    // is newer than the next commit, so not retention's to judge.
    let stage = dir.path().join("gpt");
    let staging = [
        "step-0000000001/x#3",
        "step-0000000001/rng/rank-00000.bin#12",
        "step-0000000001/manifest.json#1",
        "step-0000000002/model.safetensors#1",
        "latest#2",
    ];
    let newer = "step-0000000009/model.safetensors#1";
    for name in staging.iter().chain([&newer]) {
        let path = stage.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"partial").unwrap();
    }
    let committed_before = keys(&run);

    checkpointer.save_blocking(snapshot("gpt", 3)).unwrap();
    for name in staging {
        assert!(!stage.join(name).exists(), "{name} left behind");
    }
    assert!(
        !stage.join("step-0000000002").exists(),
        "empty step-2 dir left"
    );
    assert!(
        stage.join(newer).exists(),
        "a newer step's file was removed"
    );
    // Every object committed before is still there and step 1 still loads.
    let after = keys(&run);
    for key in &committed_before {
        assert!(after.contains(key), "{key} removed");
    }
    let mut step1 = run.clone();
    step1.prefix = run.child("gpt/step-0000000001");
    assert_same(&checkpointer.load(&step1).unwrap(), &snapshot("gpt", 1));
}

/// A writer of an older group, woken up after a newer group claimed the
/// run, commits nothing and deletes nothing: not the newer group's
/// checkpoints, not its upload in progress.
fn fencing(run: Location) {
    let group = |epoch, generation| CheckpointConfig {
        fence: Some(Fence { epoch, generation }),
        ..config()
    };
    let mut old = Checkpointer::new(run.clone(), group(5, 1)).unwrap();
    old.claim().unwrap();
    old.save_blocking(snapshot("dvae", 10)).unwrap();
    let mut new = Checkpointer::new(run.clone(), group(5, 2)).unwrap();
    new.claim().unwrap();
    new.save_blocking(snapshot("dvae", 20)).unwrap();
    // The newer group's next save, under way: objects, no manifest yet.
    put(&run, "dvae/step-0000000030/model.safetensors", bytes(10, 1));

    let err = old.save_blocking(snapshot("dvae", 40)).unwrap_err();
    let fenced = |e: &CheckpointError| match e {
        CheckpointError::Fenced { newer, .. } => newer.generation == 2,
        CheckpointError::SaveFailed { source, .. } => {
            matches!(**source, CheckpointError::Fenced { newer, .. } if newer.generation == 2)
        }
        _ => false,
    };
    assert!(fenced(&err), "{err}");
    assert!(
        err.to_string().contains("generation 2 of job epoch 5"),
        "{err}"
    );
    assert!(fenced(&old.discard_after("dvae", 0).unwrap_err()));
    assert!(fenced(&old.claim().unwrap_err()));
    // Nothing of the old writer's landed, nothing of the new one's went.
    let all = keys(&run);
    assert!(
        !all.iter().any(|k| k.contains("step-0000000040")),
        "{all:?}"
    );
    assert!(all.contains(&"dvae/step-0000000030/model.safetensors".to_string()));
    assert_eq!(new.committed_steps("dvae").unwrap(), [10, 20]);
    // Each checkpoint names the group that wrote it.
    let manifest: Manifest =
        serde_json::from_slice(&get(&run, "dvae/step-0000000020/manifest.json")).unwrap();
    assert_eq!(
        manifest.fence,
        Some(Fence {
            epoch: 5,
            generation: 2
        })
    );
    // A later job comes after every group of an earlier one.
    let later = Checkpointer::new(run.clone(), group(6, 1)).unwrap();
    later.claim().unwrap();
    let err = new.claim().unwrap_err();
    assert!(
        matches!(err, CheckpointError::Fenced { newer, .. } if newer == Fence { epoch: 6, generation: 1 }),
        "{err}"
    );
}

#[test]
fn a_writer_of_an_older_group_commits_and_deletes_nothing_on_memory() {
    fencing(memory("ckpt-fencing"));
}

#[test]
fn a_writer_of_an_older_group_commits_and_deletes_nothing_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let run = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    fencing(run);
}

#[test]
fn objects_other_ranks_upload_commit_with_the_writers_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let run = Location::parse(&url, &StoreConfig::default()).unwrap();
    let mut writer = Checkpointer::new(run.clone(), config()).unwrap();
    let other = Checkpointer::new(run.clone(), config()).unwrap();
    let shard = bytes(3000, 5);
    let entry = other
        .put_object(
            "gpt",
            4,
            "optimizer-shard-00001-of-00002.safetensors",
            shard.clone(),
        )
        .unwrap();
    assert_eq!(entry.size, 3000);
    let mut first = snapshot("gpt", 4);
    first.external.push(entry.clone());
    writer.save_blocking(first.clone()).unwrap();
    let loaded = writer.load_latest("gpt").unwrap().unwrap();
    assert_eq!(loaded.objects[&entry.name], shard, "listed and verified");
    for (name, data) in &first.objects {
        assert_eq!(&loaded.objects[name], data);
    }

    // An object another rank reported but that is not there (or not whole)
    // fails the commit, naming it; nothing is committed.
    let mut missing = snapshot("gpt", 8);
    missing.external.push(ObjectEntry {
        name: "optimizer-shard-00001-of-00002.safetensors".into(),
        ..entry.clone()
    });
    let err = writer.save_blocking(missing).unwrap_err().to_string();
    assert!(err.contains("optimizer-shard-00001-of-00002"), "{err}");
    assert_eq!(writer.load_latest("gpt").unwrap().unwrap().step, 4);

    let truncated = other
        .put_object(
            "gpt",
            12,
            "optimizer-shard-00001-of-00002.safetensors",
            bytes(10, 1),
        )
        .unwrap();
    let mut short = snapshot("gpt", 12);
    short.external.push(ObjectEntry {
        size: 11,
        ..truncated
    });
    let err = writer.save_blocking(short).unwrap_err().to_string();
    assert!(err.contains("not the 11 it reported"), "{err}");
}
