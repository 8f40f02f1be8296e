//! The coordinator's job state, kept where the job's run lives so that a
//! coordinator started again (its process or node died) resumes the job:
//! completed stages are not redone, the generation, the restart budget and
//! the job's epoch go on, and new worker ids do not collide with those of
//! workers still running from before.
//!
//! The state is small and changes rarely (a join, a formation, a stage's
//! end), so it is written whole at every change, by one thread of its own,
//! latest state last: the gRPC handlers never wait for the store.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Where the job state is kept (a file, an object in the run's bucket).
/// Called from plain threads, never from async code.
pub trait JobStateStore: Send + Sync + 'static {
    /// The state saved last, if any.
    fn load(&self) -> Result<Option<Vec<u8>>, String>;
    /// Replaces the saved state.
    fn save(&self, state: &[u8]) -> Result<(), String>;
    /// Where it is, for logs.
    fn describe(&self) -> String;
}

/// A [`JobStateStore`] in a [`super::CoordinatorConfig`].
#[derive(Clone)]
pub struct StateStore(pub Arc<dyn JobStateStore>);

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateStore({})", self.0.describe())
    }
}

const FORMAT: &str = "dalle-coordinator-state";
const VERSION: u32 = 1;

/// What a coordinator needs to take over a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct JobState {
    pub format: String,
    pub version: u32,
    /// A digest of the job's config: another job on the same run starts
    /// afresh.
    pub job: u64,
    /// When the job's first coordinator started (ms since the Unix epoch).
    pub epoch: u64,
    /// The last generation formed.
    pub generation: u64,
    pub restarts: u32,
    /// Worker ids issued so far (`w1`..`wN`).
    pub workers_issued: u64,
    /// Stages of the plan complete.
    pub completed: usize,
    /// Stages some member trained in (their resume policy was applied).
    pub stepped: Vec<bool>,
    /// Set once the job ended: "finished …" or the failure. A job that
    /// ended is not taken over; the next coordinator starts a new one.
    pub ended: Option<String>,
}

impl JobState {
    pub fn new(job_toml: &str) -> Self {
        JobState {
            format: FORMAT.into(),
            version: VERSION,
            job: digest(job_toml),
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            generation: 0,
            restarts: 0,
            workers_issued: 0,
            completed: 0,
            stepped: Vec::new(),
            ended: None,
        }
    }

    /// The saved state of `store`, if it is a job this coordinator should
    /// take over: the same job, not ended. Unreadable state is an error
    /// (silently starting over would redo finished stages).
    pub fn take_over(store: &dyn JobStateStore, job_toml: &str) -> Result<Option<Self>, String> {
        let Some(bytes) = store.load()? else {
            return Ok(None);
        };
        let state: JobState = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: unreadable coordinator state: {e}", store.describe()))?;
        if state.format != FORMAT || state.version != VERSION {
            return Err(format!(
                "{}: coordinator state of format {} version {}, this coordinator reads {FORMAT} \
                 version {VERSION}",
                store.describe(),
                state.format,
                state.version
            ));
        }
        if state.job != digest(job_toml) {
            tracing::info!(
                "{}: the saved state is of another job config: starting a new job",
                store.describe()
            );
            return Ok(None);
        }
        if let Some(ended) = &state.ended {
            tracing::info!(
                "{}: the job saved there has ended ({ended}): starting a new one",
                store.describe()
            );
            return Ok(None);
        }
        Ok(Some(state))
    }
}

/// A stable digest of the job config (the same text, the same digest, in
/// every build).
fn digest(text: &str) -> u64 {
    // FNV-1a: stable across Rust releases, unlike the std hasher.
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The thread that writes the state, latest last.
pub(super) struct Saver {
    tx: Option<mpsc::Sender<JobState>>,
    thread: Option<JoinHandle<()>>,
    last: Option<JobState>,
}

impl Saver {
    pub fn start(store: StateStore) -> Self {
        let (tx, rx) = mpsc::channel::<JobState>();
        let thread = std::thread::Builder::new()
            .name("dalle-coordinator-state".into())
            .spawn(move || {
                while let Ok(mut state) = rx.recv() {
                    // Only the newest of a burst matters.
                    while let Ok(newer) = rx.try_recv() {
                        state = newer;
                    }
                    let json = serde_json::to_vec_pretty(&state).expect("the state serialises");
                    if let Err(e) = store.0.save(&json) {
                        tracing::error!(
                            "cannot save the coordinator state to {}: {e} (a coordinator started \
                             again would not know the newest progress)",
                            store.0.describe()
                        );
                    }
                }
            })
            .expect("cannot start the coordinator's state thread");
        Saver {
            tx: Some(tx),
            thread: Some(thread),
            last: None,
        }
    }

    /// Queues `state` if it changed since the last call.
    pub fn offer(&mut self, state: JobState) {
        if self.last.as_ref() == Some(&state) {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(state.clone());
        }
        self.last = Some(state);
    }

    /// Writes what is queued and stops.
    pub fn flush(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Memory(Mutex<Option<Vec<u8>>>);

    impl JobStateStore for Memory {
        fn load(&self) -> Result<Option<Vec<u8>>, String> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn save(&self, state: &[u8]) -> Result<(), String> {
            *self.0.lock().unwrap() = Some(state.to_vec());
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[test]
    fn a_running_job_of_the_same_config_is_taken_over_and_no_other() {
        let store = Arc::new(Memory::default());
        let mut saver = Saver::start(StateStore(store.clone()));
        let mut state = JobState::new("[run]\nseed = 1\n");
        state.generation = 3;
        state.completed = 2;
        saver.offer(state.clone());
        saver.flush();
        let taken = JobState::take_over(store.as_ref(), "[run]\nseed = 1\n").unwrap();
        assert_eq!(taken, Some(state.clone()));
        // Another config: a new job.
        assert_eq!(
            JobState::take_over(store.as_ref(), "[run]\nseed = 2\n").unwrap(),
            None
        );
        // An ended job: a new one.
        state.ended = Some("finished".into());
        store.save(&serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(
            JobState::take_over(store.as_ref(), "[run]\nseed = 1\n").unwrap(),
            None
        );
        // Damaged state is an error, not a silent fresh start.
        store.save(b"{not json").unwrap();
        let err = JobState::take_over(store.as_ref(), "[run]\nseed = 1\n").unwrap_err();
        assert!(err.contains("memory: unreadable"), "{err}");
    }
}
