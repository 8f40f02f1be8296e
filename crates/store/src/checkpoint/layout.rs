//! Where a checkpoint's parts live, what its manifest says, and what a stage
//! directory holds:
//!
//! ```text
//! RUN/STAGE/step-0000000042/<object names>   the parts, written first
//! RUN/STAGE/step-0000000042/manifest.json    written last: the commit
//! RUN/STAGE/latest                           "step-0000000042\n", a hint
//! ```

use super::CheckpointError;
use crate::Location;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MANIFEST: &str = "manifest.json";
pub const LATEST: &str = "latest";
pub const FORMAT: &str = "dalle-checkpoint";
pub const VERSION: u32 = 1;

/// `step-0000000042`: zero-padded so that listings sort by step.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// The step of a `step-N` directory name (any number of digits).
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The manifest: the list of every object with its size and checksum, and
/// the caller's run metadata. Its existence is what makes a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub stage: String,
    pub step: u64,
    /// Milliseconds since the Unix epoch, when the manifest was written.
    pub created_unix_ms: u64,
    pub objects: Vec<ObjectEntry>,
    pub metadata: serde_json::Value,
    /// The group that wrote it, when the writer had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<super::Fence>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// Relative to the step directory.
    pub name: String,
    pub size: u64,
    /// CRC-32C (Castagnoli) of the whole object, as 8 hex digits.
    #[serde(with = "hex32")]
    pub crc32c: u32,
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:08x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let s = String::deserialize(d)?;
        u32::from_str_radix(&s, 16).map_err(|e| D::Error::custom(format!("crc32c `{s}`: {e}")))
    }
}

impl Manifest {
    /// Parses and checks a manifest read from `url`.
    pub fn parse(bytes: &[u8], url: &str) -> Result<Self, CheckpointError> {
        let bad = |reason: String| CheckpointError::BadManifest {
            url: url.to_string(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format is `{}`, expected `{FORMAT}`",
                manifest.format
            )));
        }
        if manifest.version > VERSION {
            return Err(bad(format!(
                "version {} is newer than this program reads ({VERSION})",
                manifest.version
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in &manifest.objects {
            validate_object_name(&entry.name).map_err(bad)?;
            if !seen.insert(&entry.name) {
                return Err(bad(format!("object `{}` is listed twice", entry.name)));
            }
        }
        Ok(manifest)
    }
}

fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Stage names are one path segment of `[A-Za-z0-9._-]`.
pub fn validate_stage(stage: &str) -> Result<(), String> {
    if valid_segment(stage) {
        Ok(())
    } else {
        Err(format!(
            "stage `{stage}` must be one non-empty name of letters, digits, `.`, `_` or `-`"
        ))
    }
}

/// Object names are `/`-separated segments of `[A-Za-z0-9._-]` (the same
/// on every store, local file systems included), and not the manifest's.
pub fn validate_object_name(name: &str) -> Result<(), String> {
    if name == MANIFEST {
        return Err(format!("object name `{name}` is reserved for the manifest"));
    }
    if name.len() > 512 || !name.split('/').all(valid_segment) {
        return Err(format!(
            "object name `{name}` must be `/`-separated names of letters, digits, `.`, `_` or `-`"
        ));
    }
    Ok(())
}

/// What one `step-N` directory of a stage holds.
#[derive(Debug, Default)]
pub struct StepDir {
    /// Its manifest exists.
    pub committed: bool,
    /// Every object in it, the manifest included.
    pub objects: Vec<ObjectPath>,
}

/// `RUN/STAGE`.
pub fn stage_path(run: &Location, stage: &str) -> ObjectPath {
    run.child(stage)
}

/// `RUN/STAGE/step-N`.
pub fn step_path(run: &Location, stage: &str, step: u64) -> ObjectPath {
    run.child(&format!("{stage}/{}", step_dir_name(step)))
}

pub fn child(dir: &ObjectPath, name: &str) -> ObjectPath {
    dir.parts().chain(ObjectPath::from(name).parts()).collect()
}

/// Every step directory of `RUN/STAGE`, from one recursive listing.
pub async fn scan(run: &Location, stage: &str) -> Result<BTreeMap<u64, StepDir>, CheckpointError> {
    let prefix = stage_path(run, stage);
    let objects: Vec<_> = run
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| CheckpointError::Store {
            url: run.describe(&prefix),
            source,
        })?;
    let depth = prefix.parts().count();
    let mut steps: BTreeMap<u64, StepDir> = BTreeMap::new();
    for object in objects {
        let parts: Vec<_> = object.location.parts().skip(depth).collect();
        let Some(step) = parts.first().and_then(|p| parse_step_dir(p.as_ref())) else {
            continue;
        };
        let dir = steps.entry(step).or_default();
        if parts.len() == 2 && parts[1].as_ref() == MANIFEST {
            dir.committed = true;
        }
        dir.objects.push(object.location);
    }
    Ok(steps)
}

/// The step the `latest` pointer of a stage names, if it exists and reads.
pub async fn read_latest(run: &Location, stage: &str) -> Result<Option<u64>, CheckpointError> {
    let path = run.child(&format!("{stage}/{LATEST}"));
    let url = run.describe(&path);
    let bytes = match run.store.get(&path).await {
        Ok(result) => result.bytes().await,
        Err(e) => Err(e),
    };
    match bytes {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            match parse_step_dir(text.trim()) {
                Some(step) => Ok(Some(step)),
                None => {
                    tracing::warn!(
                        "{url}: not a checkpoint pointer (`{}`); ignoring it",
                        text.trim()
                    );
                    Ok(None)
                }
            }
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(CheckpointError::Store { url, source }),
    }
}

/// The local directory behind a `file://` or plain-path location, so empty
/// directories can be removed after deleting a checkpoint (object stores
/// have no directories; local file systems keep them).
pub fn local_dir(run: &Location, path: &ObjectPath) -> Option<std::path::PathBuf> {
    let url = run.url.as_str();
    let remote = url.contains("://") && !url.starts_with("file://");
    (!remote).then(|| std::path::PathBuf::from(format!("/{path}")))
}

/// Removes `dir` and the directories below it that are empty, deepest first.
pub fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    // Fails (and is meant to) when something is still there.
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dirs_sort_by_step_and_parse_back() {
        assert_eq!(step_dir_name(42), "step-0000000042");
        assert!(step_dir_name(9) < step_dir_name(10));
        assert_eq!(parse_step_dir("step-0000000042"), Some(42));
        assert_eq!(parse_step_dir("step-123456789012"), Some(123456789012));
        for bad in [
            "step-",
            "step-+5",
            "step-4x",
            "latest",
            "step-0000000042.tmp",
        ] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_object_name("model.safetensors").is_ok());
        assert!(validate_object_name("rng/rank-00003.bin").is_ok());
        for bad in [
            "",
            "manifest.json",
            "/abs",
            "a//b",
            "../up",
            "a/./b",
            "sp ace",
            "tail/",
        ] {
            assert!(validate_object_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_stage("gpt").is_ok());
        assert!(validate_stage("a/b").is_err());
    }

    #[test]
    fn manifests_round_trip_and_refuse_other_formats() {
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            stage: "dvae".into(),
            step: 7,
            created_unix_ms: 1,
            objects: vec![ObjectEntry {
                name: "model.safetensors".into(),
                size: 3,
                crc32c: 0x0a1b_2c3d,
            }],
            metadata: serde_json::json!({"world_size": 4}),
            fence: None,
        };
        let json = serde_json::to_vec(&manifest).unwrap();
        assert!(String::from_utf8_lossy(&json).contains("\"0a1b2c3d\""));
        assert_eq!(Manifest::parse(&json, "u").unwrap(), manifest);
        let other = String::from_utf8_lossy(&json).replace(FORMAT, "something-else");
        let err = Manifest::parse(other.as_bytes(), "s3://b/x/manifest.json").unwrap_err();
        assert!(err.to_string().contains("s3://b/x/manifest.json"), "{err}");
    }
}
