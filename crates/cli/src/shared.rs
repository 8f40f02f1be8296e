//! Stage outputs that ranks on different machines need from each other,
//! exchanged through `run.shared_url`: rank 0 publishes the dVAE weights and
//! the caption tokenizer it trained, and every other rank fetches them into
//! its own run directory before a stage that reads them. (The pre-tokenized
//! data is written under the shared URL directly.) Without `shared_url` the
//! run directory is shared and nothing moves.

use anyhow::{Context, Result, bail};
use dalle_store::Location;
use dalle_store::object_store::{ObjectStoreExt, PutPayload};
use dalle_train::config::JobConfig;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct SharedOutputs {
    location: Location,
    runtime: tokio::runtime::Runtime,
}

impl SharedOutputs {
    /// The job's shared location, if it has one.
    pub fn of(job: &JobConfig) -> Result<Option<Self>> {
        let Some(url) = &job.run.shared_url else {
            return Ok(None);
        };
        let location = Location::parse(url, &job.store).context("run.shared_url")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Some(Self { location, runtime }))
    }

    /// Uploads `local` under its file name.
    pub fn publish(&self, local: &Path) -> Result<()> {
        let name = file_name(local)?;
        let bytes = std::fs::read(local)
            .with_context(|| format!("reading {} to share it", local.display()))?;
        let path = self.location.child(name);
        let url = self.location.describe(&path);
        let size = bytes.len();
        self.runtime
            .block_on(self.location.store.put(&path, PutPayload::from(bytes)))
            .with_context(|| format!("sharing {} as {url}", local.display()))?;
        tracing::info!(%url, bytes = size, "shared a stage output");
        Ok(())
    }

    /// Downloads the object named like `local` to `local` (through a
    /// temporary file, so a half-written copy is never read).
    pub fn fetch(&self, local: &Path) -> Result<()> {
        let name = file_name(local)?;
        let path = self.location.child(name);
        let url = self.location.describe(&path);
        let bytes = self
            .runtime
            .block_on(async { self.location.store.get(&path).await?.bytes().await })
            .with_context(|| {
                format!("fetching {url} (rank 0 shares it when the stage that makes it ends)")
            })?;
        if let Some(dir) = local.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_through_partial(local, &bytes)
            .with_context(|| format!("writing {} from {url}", local.display()))?;
        tracing::info!(%url, to = %local.display(), bytes = bytes.len(), "fetched a stage output");
        Ok(())
    }
}

/// Writes `bytes` to a temporary file of its own beside `local`, then
/// renames it over `local`. Workers on one node that share a run directory
/// fetch the same outputs at the same time: with one fixed temporary name,
/// one would truncate or rename away the file another is writing. Each
/// call gets a new name (pid and a counter), created exclusively, so not
/// even a leftover of a dead process with the same pid is written into.
/// The renames all put complete copies in place, the last one winning.
fn write_through_partial(local: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
    let name = local.file_name().unwrap_or_default().to_string_lossy();
    let (partial, mut file) = loop {
        let attempt = ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        let partial =
            local.with_file_name(format!("{name}.{}-{attempt}.partial", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
        {
            Ok(file) => break (partial, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| std::fs::rename(&partial, local));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

fn file_name(path: &Path) -> Result<&str> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(name) => Ok(name),
        None => bail!("{} has no file name to share it under", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dalle_store::StoreConfig;
    use std::sync::{Arc, Barrier};

    fn shared(url: &str) -> SharedOutputs {
        SharedOutputs {
            location: Location::parse(url, &StoreConfig::default()).unwrap(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    #[test]
    fn concurrent_fetches_of_one_output_end_with_a_whole_copy_and_no_temporary_files() {
        let url = "memory://shared-concurrent-fetch/run";
        let contents: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let source = shared(url);
        let object = source.location.child("dvae.safetensors");
        source
            .runtime
            .block_on(source.location.store.put(&object, contents.clone().into()))
            .unwrap();

        // Workers sharing a run directory fetch the same file at once, over
        // and over, each through its own `SharedOutputs` (as processes do).
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("dvae.safetensors");
        let (workers, rounds) = (4, 8);
        let start = Arc::new(Barrier::new(workers));
        let threads: Vec<_> = (0..workers)
            .map(|_| {
                let (local, start) = (local.clone(), start.clone());
                std::thread::spawn(move || {
                    let outputs = shared(url);
                    start.wait();
                    (0..rounds)
                        .try_for_each(|_| outputs.fetch(&local).map_err(|e| format!("{e:#}")))
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
        assert!(
            std::fs::read(&local).unwrap() == contents,
            "the copy differs"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["dvae.safetensors"], "temporary files left behind");
    }
}
