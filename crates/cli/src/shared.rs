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
use std::path::Path;

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
        let partial = local.with_extension("partial");
        std::fs::write(&partial, &bytes)
            .and_then(|()| std::fs::rename(&partial, local))
            .with_context(|| format!("writing {} from {url}", local.display()))?;
        tracing::info!(%url, to = %local.display(), bytes = bytes.len(), "fetched a stage output");
        Ok(())
    }
}

fn file_name(path: &Path) -> Result<&str> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(name) => Ok(name),
        None => bail!("{} has no file name to share it under", path.display()),
    }
}
