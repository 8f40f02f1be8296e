//! A switch another thread flips to end a rank's collectives now, for when
//! the coordinator has already decided the group is over (a peer hung and
//! was dropped): a call blocked on that peer returns
//! [`Error::Interrupted`](crate::Error::Interrupted) at once instead of
//! waiting out its `io_timeout` or `op_timeout`.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

type Hook = Box<dyn FnOnce() + Send>;

/// Cheap to clone; every clone flips the same switch.
#[derive(Clone, Default)]
pub struct Interrupt {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    reason: Option<String>,
    hooks: Vec<Hook>,
}

impl Interrupt {
    /// A switch not flipped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Flips the switch (the first reason stays) and unblocks every
    /// collective watching it.
    pub fn trigger(&self, reason: impl Into<String>) {
        let hooks = {
            let mut inner = self.lock();
            inner.reason.get_or_insert_with(|| reason.into());
            std::mem::take(&mut inner.hooks)
        };
        for hook in hooks {
            hook();
        }
    }

    /// Why it was flipped, once it was.
    pub fn reason(&self) -> Option<String> {
        self.lock().reason.clone()
    }

    /// Runs `hook` when the switch flips (at once if it has).
    pub(crate) fn on_trigger(&self, hook: impl FnOnce() + Send + 'static) {
        let mut inner = self.lock();
        if inner.reason.is_some() {
            drop(inner);
            hook();
        } else {
            inner.hooks.push(Box::new(hook));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("reason", &self.lock().reason)
            .finish()
    }
}
