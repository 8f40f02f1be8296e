//! Writing a checkpoint: objects first (multipart when large), the manifest
//! last and create-only where the store honours it, then the `latest`
//! pointer.

use super::checkpointer::Shared;
use super::layout::{self, FORMAT, MANIFEST, Manifest, ObjectEntry, VERSION};
use super::reader::read_object;
use super::{CheckpointError, CommitInfo, Result, Snapshot};
use crate::Location;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::collections::BTreeSet;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn store_error(url: String) -> impl FnOnce(object_store::Error) -> CheckpointError {
    move |source| CheckpointError::Store { url, source }
}

/// Checks what can be checked before anything is queued.
pub fn validate(snapshot: &Snapshot) -> Result<()> {
    layout::validate_stage(&snapshot.stage).map_err(CheckpointError::Invalid)?;
    let mut seen = BTreeSet::new();
    let names = snapshot
        .objects
        .iter()
        .map(|(name, _)| name)
        .chain(snapshot.external.iter().map(|e| &e.name));
    for name in names {
        layout::validate_object_name(name).map_err(CheckpointError::Invalid)?;
        if !seen.insert(name.as_str()) {
            return Err(CheckpointError::Invalid(format!(
                "object `{name}` appears twice in the snapshot of step {}",
                snapshot.step
            )));
        }
    }
    Ok(())
}

/// Whole multipart uploads tried per object. object_store retries each
/// request; this covers a protocol that broke halfway: Garage, after a part
/// request timed out and was retried, can refuse the completion with
/// `InvalidPart` (seen with the server paused mid-upload). A fresh upload
/// then succeeds.
const MULTIPART_ATTEMPTS: usize = 3;

/// Uploads one object and returns its CRC-32C. Objects larger than a part
/// go as multipart uploads whose parts are slices of `data` (no copies).
async fn upload_object(
    loc: &Location,
    path: &ObjectPath,
    data: Bytes,
    part_bytes: usize,
    concurrency: usize,
) -> Result<u32> {
    let url = loc.describe(path);
    // Checksummed on the blocking pool while the upload runs.
    let checksum = {
        let data = data.clone();
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || crc32c::crc32c(&data))
                .await
                .map_err(|e| CheckpointError::Task(format!("checksum of {url}: {e}")))
        }
    };
    if data.len() <= part_bytes {
        let (put, crc) = tokio::join!(loc.store.put(path, PutPayload::from(data)), checksum);
        put.map_err(store_error(url))?;
        return crc;
    }
    let (sent, crc) = tokio::join!(
        multipart(loc, path, &data, part_bytes, concurrency),
        checksum
    );
    let crc = crc?;
    let mut error = match sent {
        Ok(()) => return Ok(crc),
        Err(e) => e,
    };
    for attempt in 1..=MULTIPART_ATTEMPTS {
        // A completion whose response was lost, retried, finds no upload
        // left although the object was assembled: accept the object if it
        // is there and verifies.
        let entry = ObjectEntry {
            name: String::new(),
            size: data.len() as u64,
            crc32c: crc,
        };
        if loc
            .store
            .head(path)
            .await
            .is_ok_and(|m| m.size == entry.size)
            && read_object(loc, path, &entry, part_bytes, concurrency)
                .await
                .is_ok()
        {
            tracing::warn!(
                "{url}: the multipart upload reported `{error}`, but the object is complete and verifies"
            );
            return Ok(crc);
        }
        if attempt == MULTIPART_ATTEMPTS {
            break;
        }
        tracing::warn!(
            "{url}: multipart upload failed ({error}); starting it over ({}/{MULTIPART_ATTEMPTS})",
            attempt + 1
        );
        match multipart(loc, path, &data, part_bytes, concurrency).await {
            Ok(()) => return Ok(crc),
            Err(e) => error = e,
        }
    }
    Err(store_error(url)(error))
}

/// One multipart upload of `data` in parts of `part_bytes`, at most
/// `concurrency` in flight; aborted if it fails.
async fn multipart(
    loc: &Location,
    path: &ObjectPath,
    data: &Bytes,
    part_bytes: usize,
    concurrency: usize,
) -> object_store::Result<()> {
    let mut upload = loc.store.put_multipart(path).await?;
    let parts = (0..data.len())
        .step_by(part_bytes)
        .map(|start| data.slice(start..(start + part_bytes).min(data.len())));
    // `put_part` numbers parts in call order; the stream calls it lazily,
    // so at most `concurrency` parts are in flight.
    let sent: object_store::Result<Vec<()>> = stream::iter(parts)
        .map(|part| upload.put_part(PutPayload::from(part)))
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await;
    let completed = match sent {
        Ok(_) => upload.complete().await.map(|_| ()),
        Err(e) => Err(e),
    };
    if completed.is_err()
        && let Err(abort) = upload.abort().await
    {
        tracing::debug!(
            "{}: aborting a multipart upload: {abort}",
            loc.describe(path)
        );
    }
    completed
}

/// Uploads one object of the (not yet committed) checkpoint of `stage` at
/// `step`, for the writer to list in its manifest: a rank's share of a
/// checkpoint, written in parallel with the others'. Fenced like a commit.
pub async fn put_object(
    shared: &Shared,
    stage: &str,
    step: u64,
    name: String,
    data: Vec<u8>,
) -> Result<ObjectEntry> {
    layout::validate_stage(stage).map_err(CheckpointError::Invalid)?;
    layout::validate_object_name(&name).map_err(CheckpointError::Invalid)?;
    let run = &shared.run;
    if let Some(mine) = shared.config.fence {
        super::fence::check(run, mine).await?;
    }
    let path = layout::child(&layout::step_path(run, stage, step), &name);
    let size = data.len() as u64;
    let (part_bytes, concurrency) = (shared.config.part_bytes, shared.config.concurrency);
    let crc32c = upload_object(run, &path, Bytes::from(data), part_bytes, concurrency).await?;
    Ok(ObjectEntry { name, size, crc32c })
}

/// Deletes objects, ignoring those already gone.
pub async fn delete_all(loc: &Location, paths: Vec<ObjectPath>) -> Result<()> {
    let first = paths.first().map(|p| loc.describe(p)).unwrap_or_default();
    let stream = stream::iter(paths.into_iter().map(Ok)).boxed();
    let results: Vec<_> = loc.store.delete_stream(stream).collect().await;
    for result in results {
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(CheckpointError::Store {
                    url: first.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Writes `snapshot` as a committed checkpoint (retention not included).
pub async fn commit(shared: &Shared, snapshot: Snapshot) -> Result<CommitInfo> {
    validate(&snapshot)?;
    let started = Instant::now();
    let run = &shared.run;
    let Snapshot {
        stage,
        step,
        objects,
        external,
        metadata,
    } = snapshot;
    let dir = layout::step_path(run, &stage, step);
    let dir_url = run.describe(&dir);
    let manifest_path = layout::child(&dir, MANIFEST);
    let manifest_url = run.describe(&manifest_path);
    let fence = shared.config.fence;
    // Before this save deletes or writes anything, and again before the
    // commit: a newer group may have claimed the run meanwhile.
    if let Some(mine) = fence {
        super::fence::check(run, mine).await?;
    }

    // Never write objects over a committed checkpoint: check its manifest
    // first (the create-only manifest put alone would notice too late, and
    // some stores ignore it).
    match run.store.head(&manifest_path).await {
        Ok(_) if shared.is_bad(&stage, step) => {
            tracing::warn!(
                "{dir_url}: replacing a committed checkpoint that failed verification when loaded"
            );
            // Other ranks' objects of this save are new: keep them.
            let theirs: BTreeSet<ObjectPath> = external
                .iter()
                .map(|e| layout::child(&dir, &e.name))
                .collect();
            let leftovers: Vec<ObjectPath> = layout::scan(run, &stage)
                .await?
                .remove(&step)
                .map(|d| d.objects)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| !theirs.contains(p))
                .collect();
            // Manifest first: from then on the directory is merely incomplete.
            delete_all(run, vec![manifest_path.clone()]).await?;
            delete_all(run, leftovers).await?;
        }
        Ok(_) => return Err(CheckpointError::AlreadyCommitted { url: manifest_url }),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(source) => return Err(store_error(manifest_url)(source)),
    }
    // Objects left by an earlier, crashed save of this same step that this
    // one will not overwrite.
    let names: BTreeSet<ObjectPath> = objects
        .iter()
        .map(|(name, _)| name)
        .chain(external.iter().map(|e| &e.name))
        .map(|name| layout::child(&dir, name))
        .collect();
    let stale: Vec<ObjectPath> = layout::scan(run, &stage)
        .await?
        .remove(&step)
        .map(|d| d.objects)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !names.contains(p))
        .collect();
    if !stale.is_empty() {
        tracing::info!(
            "{dir_url}: removing {} object(s) of an earlier save of this step that never committed",
            stale.len()
        );
        delete_all(run, stale).await?;
    }

    let (part_bytes, concurrency) = (shared.config.part_bytes, shared.config.concurrency);
    let bytes: u64 = objects.iter().map(|(_, d)| d.len() as u64).sum();
    let (large, small): (Vec<_>, Vec<_>) = objects
        .into_iter()
        .map(|(name, data)| (name, Bytes::from(data)))
        .partition(|(_, data)| data.len() > part_bytes);
    let upload = |(name, data): (String, Bytes)| {
        let path = layout::child(&dir, &name);
        async move {
            let size = data.len() as u64;
            let crc32c = upload_object(run, &path, data, part_bytes, concurrency).await?;
            Ok::<_, CheckpointError>(ObjectEntry { name, size, crc32c })
        }
    };
    // Small objects concurrently; large ones one at a time with concurrent
    // parts, so at most `concurrency` requests are in flight.
    let mut entries: Vec<ObjectEntry> = stream::iter(small.into_iter().map(upload))
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    for object in large {
        entries.push(upload(object).await?);
    }
    // The other ranks' objects must be there, whole, before the manifest
    // names them (their checksums are verified when the checkpoint loads).
    for entry in &external {
        let path = layout::child(&dir, &entry.name);
        let url = run.describe(&path);
        let meta = run
            .store
            .head(&path)
            .await
            .map_err(store_error(url.clone()))?;
        if meta.size != entry.size {
            return Err(CheckpointError::Invalid(format!(
                "{url}: another rank's object has {} bytes, not the {} it reported",
                meta.size, entry.size
            )));
        }
    }
    let bytes = bytes + external.iter().map(|e| e.size).sum::<u64>();
    entries.extend(external);
    entries.sort_by(|a, b| a.name.cmp(&b.name));

    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        stage: stage.clone(),
        step,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        objects: entries,
        metadata,
        fence,
    };
    let json = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("a manifest serialises"));
    if let Some(mine) = fence {
        super::fence::check(run, mine).await?;
    }
    write_manifest(run, &manifest_path, json).await?;
    let seconds = started.elapsed().as_secs_f64();

    // The pointer is a hint: the checkpoint is committed already, and
    // loading lists the stage, so a failure here loses nothing.
    let latest = run.child(&format!("{stage}/{}", layout::LATEST));
    let pointer = PutPayload::from(format!("{}\n", layout::step_dir_name(step)));
    if let Err(e) = run.store.put(&latest, pointer).await {
        tracing::warn!(
            "{}: could not update the pointer to step {step} (the checkpoint is committed): {e}",
            run.describe(&latest)
        );
    }
    Ok(CommitInfo {
        stage,
        step,
        url: dir_url,
        bytes,
        seconds,
        deleted: Vec::new(),
        removed_incomplete: Vec::new(),
    })
}

/// The commit point. Create-only where the store supports it; where it
/// refuses the mode, a plain put (we already checked the manifest was
/// absent, and there is one writer per run). A put whose response was lost
/// and that was retried finds its own manifest there: that is success.
pub async fn write_manifest(run: &Location, path: &ObjectPath, json: Bytes) -> Result<()> {
    let url = run.describe(path);
    let create = PutOptions::from(PutMode::Create);
    match run
        .store
        .put_opts(path, PutPayload::from(json.clone()), create)
        .await
    {
        Ok(_) => Ok(()),
        Err(
            object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. },
        ) => {
            tracing::debug!("{url}: the store has no create-only put; writing plainly");
            run.store
                .put(path, PutPayload::from(json))
                .await
                .map(|_| ())
                .map_err(store_error(url))
        }
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => {
            let existing = match run.store.get(path).await {
                Ok(result) => result.bytes().await.ok(),
                Err(_) => None,
            };
            if existing.as_deref() == Some(&json[..]) {
                Ok(())
            } else {
                Err(CheckpointError::AlreadyCommitted { url })
            }
        }
        Err(source) => Err(store_error(url)(source)),
    }
}
