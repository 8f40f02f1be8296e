//! Reading a checkpoint back: the manifest, then every object, verified
//! against its size and CRC-32C; and finding the newest one that verifies.

use super::checkpointer::Shared;
use super::layout::{self, MANIFEST, Manifest, ObjectEntry};
use super::pins::Pin;
use super::{CheckpointError, Loaded, Result, Skipped};
use crate::Location;
use futures::{StreamExt, TryStreamExt, stream};
use object_store::path::Path as ObjectPath;
use object_store::{GetResultPayload, ObjectStoreExt};
use std::collections::BTreeMap;
use std::io::Read;

fn store_error(url: String) -> impl FnOnce(object_store::Error) -> CheckpointError {
    move |source| CheckpointError::Store { url, source }
}

fn corrupt(url: &str, reason: String) -> CheckpointError {
    CheckpointError::Corrupt {
        url: url.to_string(),
        reason,
    }
}

fn check_size(found: usize, size: usize, url: &str) -> Result<()> {
    match found.cmp(&size) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(corrupt(
            url,
            format!("size is {found} bytes, the manifest says {size} (truncated)"),
        )),
        std::cmp::Ordering::Greater => Err(corrupt(
            url,
            format!("larger than the {size} bytes the manifest says (overwritten)"),
        )),
    }
}

/// Reads one object into a buffer of exactly its manifest size, checking
/// size and checksum on the way. Local files are read straight into it;
/// large remote objects by concurrent range requests, assembled in order in
/// that one buffer (no second copy).
pub async fn read_object(
    loc: &Location,
    path: &ObjectPath,
    entry: &ObjectEntry,
    part_bytes: usize,
    concurrency: usize,
) -> Result<Vec<u8>> {
    let url = loc.describe(path);
    let missing = |e: object_store::Error| match e {
        object_store::Error::NotFound { .. } => corrupt(
            &url,
            "missing: listed in the manifest but not in the store".into(),
        ),
        source => CheckpointError::Store {
            url: url.clone(),
            source,
        },
    };
    let size = entry.size as usize;
    let local = layout::local_dir(loc, path).is_some();
    let (data, crc) = if local || size <= part_bytes {
        let result = loc.store.get(path).await.map_err(missing)?;
        // The manifest's size is only a claim: a damaged one (say 2^40)
        // must not size the buffers below, or the process aborts instead
        // of falling back. The store's own size for the object bounds them.
        check_size(result.meta.size as usize, size, &url)?;
        match result.payload {
            // A local file is read straight into the buffer, on the
            // blocking pool; at most one byte more, to notice a longer file.
            GetResultPayload::File(file, _) => {
                let read = tokio::task::spawn_blocking(move || {
                    let mut data = Vec::with_capacity(size + 1);
                    file.take(size as u64 + 1).read_to_end(&mut data)?;
                    let crc = crc32c::crc32c(&data);
                    Ok::<_, std::io::Error>((data, crc))
                });
                let (data, crc) = read
                    .await
                    .map_err(|e| CheckpointError::Task(format!("reading {url}: {e}")))?
                    .map_err(|e| corrupt(&url, format!("unreadable: {e}")))?;
                check_size(data.len(), size, &url)?;
                (data, crc)
            }
            GetResultPayload::Stream(mut chunks) => {
                let mut data = Vec::with_capacity(size);
                let mut crc = 0u32;
                while let Some(chunk) = chunks.try_next().await.map_err(missing)? {
                    if data.len() + chunk.len() > size {
                        check_size(data.len() + chunk.len(), size, &url)?;
                    }
                    crc = crc32c::crc32c_append(crc, &chunk);
                    data.extend_from_slice(&chunk);
                }
                check_size(data.len(), size, &url)?;
                (data, crc)
            }
        }
    } else {
        let meta = loc.store.head(path).await.map_err(missing)?;
        check_size(meta.size as usize, size, &url)?;
        let mut data = Vec::with_capacity(size);
        let mut crc = 0u32;
        let ranges = (0..entry.size).step_by(part_bytes).map(|start| {
            let end = (start + part_bytes as u64).min(entry.size);
            loc.store.get_range(path, start..end)
        });
        let mut parts = stream::iter(ranges).buffered(concurrency.max(1));
        while let Some(part) = parts.next().await {
            let part = part.map_err(missing)?;
            let expected = (size - data.len()).min(part_bytes);
            if part.len() != expected {
                return Err(corrupt(
                    &url,
                    format!(
                        "changed while being read: a range of {expected} bytes at {} came back with {}",
                        data.len(),
                        part.len()
                    ),
                ));
            }
            crc = crc32c::crc32c_append(crc, &part);
            data.extend_from_slice(&part);
        }
        (data, crc)
    };
    if crc != entry.crc32c {
        return Err(corrupt(
            &url,
            format!(
                "checksum mismatch: crc32c {crc:08x}, the manifest says {:08x} (corrupted)",
                entry.crc32c
            ),
        ));
    }
    Ok(data)
}

/// Reads and verifies the checkpoint in `dir` of `loc`.
pub async fn load_dir(
    loc: &Location,
    dir: &ObjectPath,
    part_bytes: usize,
    concurrency: usize,
) -> Result<Loaded> {
    let dir_url = loc.describe(dir);
    // Pinned before the manifest is read, so retention cannot start
    // deleting objects this load is about to read.
    let pin = Pin::new(&dir_url);
    let manifest_path = layout::child(dir, MANIFEST);
    let manifest_url = loc.describe(&manifest_path);
    let bytes = match loc.store.get(&manifest_path).await {
        Ok(result) => result.bytes().await,
        Err(e) => Err(e),
    };
    let bytes = match bytes {
        Ok(bytes) => bytes,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(CheckpointError::NotCommitted { url: dir_url });
        }
        Err(source) => return Err(store_error(manifest_url)(source)),
    };
    let manifest = Manifest::parse(&bytes, &manifest_url)?;
    if let Some(step) = dir
        .filename()
        .and_then(layout::parse_step_dir)
        .filter(|&s| s != manifest.step)
    {
        return Err(CheckpointError::BadManifest {
            url: manifest_url,
            reason: format!(
                "it says step {}, but lies in the directory of step {step}",
                manifest.step
            ),
        });
    }
    // Small objects concurrently; large ones one at a time, each read by
    // concurrent ranges, so at most `concurrency` requests are in flight.
    let (large, small): (Vec<_>, Vec<_>) = manifest
        .objects
        .iter()
        .partition(|e| e.size as usize > part_bytes);
    let read = |entry: &ObjectEntry| {
        let path = layout::child(dir, &entry.name);
        let entry = entry.clone();
        async move {
            let data = read_object(loc, &path, &entry, part_bytes, concurrency).await?;
            Ok::<_, CheckpointError>((entry.name, data))
        }
    };
    let mut objects: BTreeMap<String, Vec<u8>> = stream::iter(small.into_iter().map(read))
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    for entry in large {
        let (name, data) = read(entry).await?;
        objects.insert(name, data);
    }
    Ok(Loaded {
        stage: manifest.stage,
        step: manifest.step,
        url: dir_url,
        metadata: manifest.metadata,
        objects,
        skipped: Vec::new(),
        _pin: pin,
    })
}

/// The newest committed checkpoint of `stage` that verifies. Steps come
/// from listing the stage (so neither a missing nor a stale `latest`
/// matters); bad ones are logged, remembered as known-bad (a new save of
/// that step may replace them) and passed over.
pub async fn load_latest(shared: &Shared, stage: &str) -> Result<Option<Loaded>> {
    let run = &shared.run;
    layout::validate_stage(stage).map_err(CheckpointError::Invalid)?;
    let stage_url = run.describe(&layout::stage_path(run, stage));
    let latest = layout::read_latest(run, stage).await?;
    let steps = layout::scan(run, stage).await?;
    let committed: Vec<u64> = steps
        .iter()
        .rev()
        .filter(|(_, d)| d.committed)
        .map(|(&s, _)| s)
        .collect();
    let newest = committed.first().copied();
    for (&step, dir) in steps.iter().rev() {
        if newest.is_some_and(|n| step < n) {
            break;
        }
        if !dir.committed {
            tracing::warn!(
                "{}: incomplete checkpoint (objects but no manifest: a save that did not finish); ignored",
                run.describe(&layout::step_path(run, stage, step))
            );
        }
    }
    let latest_url = format!("{stage_url}/{}", layout::LATEST);
    match (latest, newest) {
        (None, Some(n)) => {
            tracing::warn!("{latest_url} is missing; found step {n} by listing the stage")
        }
        (Some(l), _) if !committed.contains(&l) => tracing::warn!(
            "{latest_url} names step {l}, which is not committed (deleted, or never finished); \
             using the committed checkpoints found by listing the stage"
        ),
        (Some(l), Some(n)) if n > l => tracing::warn!(
            "{latest_url} names step {l} but step {n} is committed (the pointer was not updated); \
             using step {n}"
        ),
        _ => {}
    }
    let mut skipped = Vec::new();
    for step in committed {
        let dir = layout::step_path(run, stage, step);
        let loaded = load_dir(
            run,
            &dir,
            shared.config.part_bytes,
            shared.config.concurrency,
        )
        .await
        .and_then(|loaded| match loaded.stage == stage {
            true => Ok(loaded),
            false => Err(CheckpointError::BadManifest {
                url: format!("{}/{MANIFEST}", loaded.url),
                reason: format!("it says stage `{}`, but lies under `{stage}`", loaded.stage),
            }),
        });
        match loaded {
            Ok(mut loaded) => {
                if !skipped.is_empty() {
                    tracing::warn!(
                        "resuming from {} (step {step}), not from the newer checkpoint(s) above",
                        loaded.url
                    );
                }
                loaded.skipped = skipped;
                return Ok(Some(loaded));
            }
            Err(e) if e.is_bad_checkpoint() => {
                tracing::error!(
                    "checkpoint of stage `{stage}` step {step} is unusable, trying the previous one: {e}"
                );
                shared.mark_bad(stage, step);
                skipped.push(Skipped {
                    step,
                    url: run.describe(&dir),
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(CheckpointError::NoneValid {
            url: stage_url,
            skipped,
        })
    }
}
