//! Checkpoints this process is reading or holds: retention leaves them alone.
//!
//! Process-wide, keyed by the step directory's URL (with `file://` dropped
//! so a path and its URL are the same key), so a load through any
//! `Checkpointer` or `Location` protects the directory from every other
//! one's retention. Other processes are not seen: they are protected by
//! `keep_last` (a reader takes the newest ones).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn pins() -> &'static Mutex<HashMap<String, usize>> {
    static PINS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    PINS.get_or_init(Default::default)
}

fn key(url: &str) -> String {
    url.strip_prefix("file://").unwrap_or(url).to_string()
}

/// Held while a step directory is pinned.
#[derive(Debug)]
pub struct Pin(String);

impl Pin {
    pub fn new(url: &str) -> Self {
        let key = key(url);
        *pins()
            .lock()
            .expect("checkpoint pins lock")
            .entry(key.clone())
            .or_default() += 1;
        Self(key)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = pins().lock().expect("checkpoint pins lock");
        if let Some(count) = pins.get_mut(&self.0) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.0);
            }
        }
    }
}

pub fn is_pinned(url: &str) -> bool {
    pins()
        .lock()
        .expect("checkpoint pins lock")
        .contains_key(&key(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_count_and_a_path_is_its_file_url() {
        let a = Pin::new("/tmp/pins-test/run/gpt/step-0000000001");
        let b = Pin::new("file:///tmp/pins-test/run/gpt/step-0000000001");
        drop(a);
        assert!(is_pinned("/tmp/pins-test/run/gpt/step-0000000001"));
        drop(b);
        assert!(!is_pinned("file:///tmp/pins-test/run/gpt/step-0000000001"));
    }
}
