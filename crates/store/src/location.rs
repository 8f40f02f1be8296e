//! URL → object store + prefix, and listing Parquet files under it.

use crate::glob;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("`{url}` is not a usable storage URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("no {what} found at {url}")]
    NothingFound { url: String, what: &'static str },
}

/// How to reach S3-compatible storage. Credentials are not here: they come
/// from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and the other
/// standard variables) so they never end up in configs or logs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// e.g. `http://127.0.0.1:3900`; unset means AWS (or `AWS_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Unset means `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// `bucket` in the path rather than the host name (most self-hosted
    /// S3-compatible servers want this).
    pub path_style: bool,
    /// Give up on a request after retrying for this long.
    pub retry_timeout_secs: u64,
    pub max_retries: usize,
    /// Per-request timeout.
    pub request_timeout_secs: u64,
    /// Keep idle connections open for the next request (HTTP keep-alive).
    /// Turn off for Garage 2.5: under concurrent range reads over reused
    /// connections it can stop answering altogether, sending a response's
    /// headers but never its body (README, "Data").
    pub reuse_connections: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            path_style: true,
            retry_timeout_secs: 60,
            max_retries: 10,
            request_timeout_secs: 30,
            reuse_connections: true,
        }
    }
}

/// A store and a prefix inside it.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: ObjectPath,
    /// The URL as given, for messages.
    pub url: String,
    /// A wildcard pattern under `prefix` to filter listings by, if the URL
    /// had one.
    pattern: Option<String>,
}

/// In-memory stores by name, shared within the process.
fn memory_store(name: &str) -> Arc<InMemory> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    stores
        .lock()
        .expect("memory stores lock")
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

impl Location {
    /// Parses `url` and builds its store.
    pub fn parse(url: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let (pattern_base, pattern) = match url.find(['*', '?']) {
            Some(_) => {
                let (scheme_and_host, path) = split_path(url);
                let literal = glob::literal_prefix(path);
                (
                    format!("{scheme_and_host}{literal}"),
                    Some(path.to_string()),
                )
            }
            None => (url.to_string(), None),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) =
            if let Some(rest) = pattern_base.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket name".into()));
                }
                (
                    Arc::new(s3_store(bucket, config).map_err(|e| bad(e.to_string()))?),
                    prefix.to_string(),
                )
            } else if let Some(rest) = pattern_base.strip_prefix("memory://") {
                let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                (memory_store(name), prefix.to_string())
            } else if pattern_base.contains("://") && !pattern_base.starts_with("file://") {
                return Err(bad(
                    "supported schemes are file://, s3:// and memory://".into()
                ));
            } else {
                let path = match pattern_base.strip_prefix("file://") {
                    Some(p) => std::path::PathBuf::from(p),
                    None => std::path::absolute(&pattern_base).map_err(|e| bad(e.to_string()))?,
                };
                // Not canonicalised: a place that does not exist yet is a
                // valid location (to write to, or to report as empty).
                (
                    Arc::new(LocalFileSystem::new()),
                    path.to_string_lossy().into_owned(),
                )
            };
        // A glob keeps matching against the full key below the bucket.
        let pattern = pattern.map(|p| match url.strip_prefix("file://") {
            Some(_) => p.trim_start_matches('/').to_string(),
            None => p,
        });
        Ok(Self {
            store,
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            url: url.to_string(),
            pattern,
        })
    }

    /// The object `name` under this location's prefix.
    pub fn child(&self, name: &str) -> ObjectPath {
        self.prefix
            .parts()
            .chain(ObjectPath::from(name).parts())
            .collect()
    }

    /// URL of an object of this store, for messages.
    pub fn describe(&self, path: &ObjectPath) -> String {
        let base = split_path(&self.url).0;
        match base {
            "" => format!("/{path}"),
            b => format!("{b}{path}"),
        }
    }

    fn store_error(&self, source: object_store::Error) -> StoreError {
        StoreError::Store {
            url: self.url.clone(),
            source,
        }
    }

    /// Objects under the prefix (matching the URL's wildcard pattern, if
    /// any) whose names end with `suffix`, sorted by key so every process
    /// sees the same order. A single object URL lists itself.
    pub async fn list(&self, suffix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        if self.pattern.is_none()
            && self.prefix.as_ref().ends_with(suffix)
            && let Ok(meta) = self.store.head(&self.prefix).await
        {
            return Ok(vec![meta]);
        }
        let mut objects: Vec<ObjectMeta> = self
            .store
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| self.store_error(e))?;
        objects.retain(|o| o.location.as_ref().ends_with(suffix));
        if let Some(pattern) = &self.pattern {
            objects.retain(|o| glob::matches(pattern, o.location.as_ref()));
        }
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }
}

/// `s3://bucket/a/b` → (`s3://bucket/`, `a/b`); `/x/y` → (``, `x/y`).
fn split_path(url: &str) -> (&str, &str) {
    match url.find("://") {
        Some(i) => {
            let after = i + 3;
            let slash = url[after..].find('/').map_or(url.len(), |j| after + j + 1);
            (&url[..slash.min(url.len())], &url[slash.min(url.len())..])
        }
        None => ("", url.trim_start_matches('/')),
    }
}

fn client_options(config: &StoreConfig) -> ClientOptions {
    let options =
        ClientOptions::new().with_timeout(Duration::from_secs(config.request_timeout_secs));
    if config.reuse_connections {
        options
    } else {
        options.with_pool_max_idle_per_host(0)
    }
}

fn s3_store(
    bucket: &str,
    config: &StoreConfig,
) -> object_store::Result<object_store::aws::AmazonS3> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(!config.path_style)
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: config.max_retries,
            retry_timeout: Duration::from_secs(config.retry_timeout_secs),
        })
        .with_client_options(client_options(config));
    if let Some(endpoint) = &config.endpoint {
        builder = builder
            .with_allow_http(endpoint.starts_with("http://"))
            .with_endpoint(endpoint);
    }
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn memory_locations_share_a_named_store_and_list_sorted() {
        rt().block_on(async {
            let a = Location::parse("memory://t1/data", &StoreConfig::default()).unwrap();
            for name in ["b.parquet", "a.parquet", "notes.txt", "sub/c.parquet"] {
                a.store
                    .put(&a.child(name), PutPayload::from_static(b"x"))
                    .await
                    .unwrap();
            }
            let b = Location::parse("memory://t1/data/", &StoreConfig::default()).unwrap();
            let keys: Vec<String> = b
                .list(".parquet")
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.location.to_string())
                .collect();
            assert_eq!(
                keys,
                ["data/a.parquet", "data/b.parquet", "data/sub/c.parquet"]
            );
            let glob =
                Location::parse("memory://t1/data/*.parquet", &StoreConfig::default()).unwrap();
            assert_eq!(glob.list(".parquet").await.unwrap().len(), 2);
            let one =
                Location::parse("memory://t1/data/b.parquet", &StoreConfig::default()).unwrap();
            assert_eq!(one.list(".parquet").await.unwrap().len(), 1);
        });
    }

    #[test]
    fn local_paths_and_file_urls_are_the_same_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.parquet"), b"1").unwrap();
        rt().block_on(async {
            let url = format!("file://{}", dir.path().display());
            let by_url = Location::parse(&url, &StoreConfig::default()).unwrap();
            let by_path =
                Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
            let a = by_url.list(".parquet").await.unwrap();
            assert_eq!(a.len(), 1);
            assert_eq!(
                a[0].location,
                by_path.list(".parquet").await.unwrap()[0].location
            );
            assert!(by_url.describe(&a[0].location).ends_with("/x.parquet"));
        });
    }

    #[test]
    fn bad_urls_are_named() {
        let err = Location::parse("ftp://host/x", &StoreConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ftp://host/x") && err.contains("s3://"),
            "{err}"
        );
        let err = Location::parse("s3:///x", &StoreConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no bucket"), "{err}");
    }
}
