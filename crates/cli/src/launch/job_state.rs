//! Where `dalle launch` keeps the coordinator's job state: next to the run
//! (`<run.shared_url or run.dir>/coordinator-state.json`), so that a
//! coordinator started again on the same run takes the job over.

use dalle_runtime::JobStateStore;
use dalle_store::Location;
use dalle_store::object_store::path::Path as ObjectPath;
use dalle_store::object_store::{ObjectStoreExt, PutPayload};
use dalle_train::config::JobConfig;

/// The state file's name under the run.
pub const NAME: &str = "coordinator-state.json";

pub struct RunJobState {
    location: Location,
    path: ObjectPath,
}

impl RunJobState {
    pub fn of(job: &JobConfig) -> anyhow::Result<Self> {
        let run = job
            .run
            .shared_url
            .clone()
            .unwrap_or_else(|| job.run.dir.display().to_string());
        std::fs::create_dir_all(&job.run.dir).ok();
        let location = dalle_store::Location::parse(&run, &job.store)
            .map_err(|e| anyhow::anyhow!("the run's location {run}: {e}"))?;
        let path = location.child(NAME);
        Ok(Self { location, path })
    }

    /// Runs `io` on a runtime of its own, on a thread of its own: callers
    /// may be inside another runtime.
    fn block<T: Send>(
        &self,
        io: impl AsyncFnOnce(&Location, &ObjectPath) -> Result<T, String> + Send,
    ) -> Result<T, String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(io(&self.location, &self.path))
            })
            .join()
            .unwrap_or_else(|_| Err("the state I/O thread panicked".into()))
        })
    }
}

impl JobStateStore for RunJobState {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        self.block(
            async |location, path| match location.store.get(path).await {
                Ok(got) => got
                    .bytes()
                    .await
                    .map(|b| Some(b.to_vec()))
                    .map_err(|e| e.to_string()),
                Err(dalle_store::object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    fn save(&self, state: &[u8]) -> Result<(), String> {
        let payload = PutPayload::from(state.to_vec());
        self.block(async |location, path| {
            location
                .store
                .put(path, payload)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn describe(&self) -> String {
        self.location.describe(&self.path)
    }
}
