//! A throwaway Garage (S3-compatible server) on loopback for tests: its own
//! config and data in a temporary directory, a one-node layout, one bucket
//! and one key. Dropping it stops the server.
//!
//! Garage needs its ports in its config file, so free ports are found by
//! binding port 0 and releasing it; readiness is awaited by polling the
//! server's own status command, not by sleeping.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Garage {
    _dir: tempfile::TempDir,
    config: PathBuf,
    server: Child,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// The garage binary: `$GARAGE_BIN`, else `garage` on PATH, else cargo's bin dir.
fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("GARAGE_BIN") {
        return bin.into();
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin/garage"));
    match cargo_bin {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("garage"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Garage {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                meta = dir.path().join("meta").display(),
                data = dir.path().join("data").display(),
            ),
        )
        .unwrap();
        let server = Command::new(binary())
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start garage ({}): {e}. S3 tests need it: `cargo install garage --locked` \
                     (scripts/test.sh does this)",
                    binary().display()
                )
            });
        let mut garage = Self {
            _dir: dir,
            config,
            server,
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: "garage".into(),
            bucket: "dalle-test".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        garage.set_up();
        garage
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn set_up(&mut self) {
        // Wait for the node to answer, then read its id from `node id`.
        let deadline = Instant::now() + Duration::from_secs(60);
        let node = loop {
            let out = self.cli(&["node", "id", "-q"]);
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!("garage server exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "garage did not become ready in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // `node id` reads the node's key from disk and can answer before the
        // server listens; `status` asks the server over RPC.
        while !self.cli(&["status"]).status.success() {
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!("garage server exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "garage did not answer `status` in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let node_id = node.split('@').next().unwrap().to_string();
        self.ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id]);
        self.ok(&["layout", "apply", "--version", "1"]);
        self.ok(&["bucket", "create", &self.bucket.clone()]);
        let key = self.ok(&["key", "create", "dalle-test-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                })
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| panic!("no `{name}` in garage key output:\n{key}"))
        };
        self.key_id = field("Key ID");
        self.secret = field("Secret key");
        self.ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &self.bucket.clone(),
            "--key",
            "dalle-test-key",
        ]);
    }

    /// A client of the test bucket, for a test to put or list objects.
    #[allow(dead_code)] // not every test binary lists or uploads
    pub fn store(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region(&self.region)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()
            .unwrap()
    }

    /// Environment for a process that talks to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", self.region.clone()),
            ("DALLE_STORE__ENDPOINT", self.endpoint.clone()),
            // Garage 2.5 can stop answering under concurrent range reads
            // over kept-alive connections (headers sent, body never).
            ("DALLE_STORE__REUSE_CONNECTIONS", "false".into()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
