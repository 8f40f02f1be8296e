//! How many CPU threads a worker takes: its share of the machine's cores,
//! split among the workers `dalle launch` or `dalle node` started on the
//! same machine (they say how many in [`LOCAL_WORKERS_ENV`], as torchrun's
//! `LOCAL_WORLD_SIZE`). Resolved by each worker on its own machine: the
//! job config travels to workers on machines with other core counts.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::fmt;

/// Set by `dalle launch` and `dalle node` on every worker they start: how
/// many workers share this machine.
pub const LOCAL_WORKERS_ENV: &str = "DALLE_LOCAL_WORKERS";

/// How many workers share this machine (1 when no agent said).
pub fn local_workers() -> usize {
    std::env::var(LOCAL_WORKERS_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// This worker's share of the machine's cores, at least 1.
pub fn share_of_cores() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    split(cores, local_workers())
}

fn split(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(1)
}

/// A thread count in a config: a number, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadCount {
    Auto,
    Fixed(usize),
}

impl ThreadCount {
    /// The count, `auto` being the worker's share of its machine's cores.
    /// For image decoding that is the whole share even beside libtorch's
    /// CPU threads: decoders sleep once the prefetch queue is full, and a
    /// starved loader costs more than a briefly oversubscribed core.
    pub fn resolve(self) -> usize {
        match self {
            ThreadCount::Fixed(n) => n.max(1),
            ThreadCount::Auto => share_of_cores(),
        }
    }
}

impl fmt::Display for ThreadCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadCount::Auto => f.write_str("auto"),
            ThreadCount::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for ThreadCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ThreadCount::Auto => s.serialize_str("auto"),
            ThreadCount::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

/// Accepts `auto`, a number, or a number as text (what `--set` and
/// environment variables give).
impl<'de> Deserialize<'de> for ThreadCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ThreadCount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a number of threads")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ThreadCount, E> {
                Ok(ThreadCount::Fixed(n as usize))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ThreadCount, E> {
                usize::try_from(n)
                    .map(ThreadCount::Fixed)
                    .map_err(|_| E::custom(format!("{n} is not a number of threads")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ThreadCount, E> {
                match v.trim() {
                    "auto" => Ok(ThreadCount::Auto),
                    n => n.parse().map(ThreadCount::Fixed).map_err(|_| {
                        E::custom(format!(
                            "{v:?} is not a number of threads; say a number or \"auto\""
                        ))
                    }),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_splits_the_cores_among_the_local_workers() {
        assert_eq!(split(16, 3), 5);
        assert_eq!(split(16, 1), 16);
        assert_eq!(split(2, 4), 1, "never zero threads");
        assert_eq!(ThreadCount::Auto.resolve(), share_of_cores());
        assert_eq!(ThreadCount::Fixed(3).resolve(), 3);
        assert_eq!(ThreadCount::Fixed(0).resolve(), 1);
    }

    #[test]
    fn reads_auto_numbers_and_numbers_as_text_and_names_a_bad_one() {
        #[derive(Deserialize, Serialize)]
        struct Holder {
            n: ThreadCount,
        }
        let read = |t: &str| toml::from_str::<Holder>(t).map(|h| h.n);
        assert_eq!(read("n = \"auto\"").unwrap(), ThreadCount::Auto);
        assert_eq!(read("n = 4").unwrap(), ThreadCount::Fixed(4));
        assert_eq!(read("n = \"6\"").unwrap(), ThreadCount::Fixed(6));
        let err = read("n = \"many\"").unwrap_err().to_string();
        assert!(err.contains("many") && err.contains("auto"), "{err}");
        assert!(read("n = -1").is_err());
        let back = toml::to_string(&Holder {
            n: ThreadCount::Auto,
        })
        .unwrap();
        assert_eq!(read(&back).unwrap(), ThreadCount::Auto);
    }
}
