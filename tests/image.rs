//! The container image (cluster/image): `build-root.sh` assembles its root
//! filesystem from this build's `dalle` and `dalle-sample`, and the binaries
//! run in it under `chroot`, in mount and PID namespaces of their own with
//! /proc, /sys and a minimal /dev mounted the way a container runtime mounts
//! them, and an empty environment but for the Dockerfile's ENV lines: no
//! library, file or variable of the host is within reach, so what works
//! here works in `FROM scratch`.
//!
//! Needs root (chroot, namespaces, mounts), `unshare` and `ldd`; elsewhere
//! the test says why and skips, and with `DALLE_REQUIRE_NETNS=1` (CI) it
//! fails instead, like the namespace tests of support/hosts.rs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster/image")
}

/// A program on the host's PATH (or in the sbin directories, which a root
/// shell has but a test harness may not).
fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Why this machine cannot run the test, if it cannot.
fn unavailable() -> Option<String> {
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if euid != Some(0) {
        return Some(format!("not root (uid {euid:?})"));
    }
    for tool in [
        "chroot", "unshare", "mount", "mknod", "ldd", "ldconfig", "readelf",
    ] {
        if program(tool).is_none() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    match Command::new(program("unshare").unwrap())
        .args(["--mount", "--pid", "--fork", "true"])
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "cannot make mount and PID namespaces: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// The `ENV KEY=VALUE` lines of the Dockerfile, in order.
fn dockerfile_env() -> Vec<(String, String)> {
    let dockerfile = std::fs::read_to_string(image_dir().join("Dockerfile")).unwrap();
    let env: Vec<(String, String)> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .map(|kv| {
            // Docker would also take `ENV K V`, quotes and $-expansion: this
            // Dockerfile keeps to one plain pair a line, which this reads.
            let (k, v) = kv
                .trim()
                .split_once('=')
                .unwrap_or_else(|| panic!("Dockerfile: `ENV {kv}` is not one KEY=VALUE"));
            assert!(
                !v.contains(['$', '"', '\'', ' ']),
                "Dockerfile: keep `ENV {kv}` one plain KEY=VALUE"
            );
            (k.to_string(), v.to_string())
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "LD_LIBRARY_PATH"),
        "the Dockerfile sets no LD_LIBRARY_PATH"
    );
    env
}

/// Runs `args` (the first an absolute path in the root) chrooted into
/// `root`, with exactly the environment `env`. The mounts are made in a
/// private mount namespace and vanish with it.
fn in_root(root: &Path, env: &[(String, String)], args: &[&str]) -> Output {
    const SETUP: &str = r#"
set -e
r=$1; shift
mount -t proc proc "$r/proc"
mount -t sysfs -o ro sysfs "$r/sys"
mount -t tmpfs -o mode=755,size=1m dev "$r/dev"
mknod -m 666 "$r/dev/null" c 1 3
mknod -m 666 "$r/dev/zero" c 1 5
mknod -m 666 "$r/dev/full" c 1 7
mknod -m 666 "$r/dev/random" c 1 8
mknod -m 666 "$r/dev/urandom" c 1 9
mkdir "$r/dev/shm"
mount -t tmpfs -o mode=1777,size=64m shm "$r/dev/shm"
exec env -i "$@"
"#;
    let mut command = Command::new(program("unshare").unwrap());
    command
        .args(["--mount", "--propagation", "private", "--pid", "--fork"])
        .args(["sh", "-c", SETUP, "sh"])
        .arg(root)
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .arg(program("chroot").unwrap())
        .arg(root)
        .args(args);
    let out = command.output().unwrap();
    for mount_point in ["proc", "sys", "dev"] {
        let entries = std::fs::read_dir(root.join(mount_point)).unwrap().count();
        assert_eq!(entries, 0, "{mount_point} of the root is still mounted");
    }
    out
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every symlink of the root resolves inside it.
fn check_symlinks(root: &Path, dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            assert!(
                target.is_relative(),
                "{} -> {}: absolute links resolve on the host from outside the image",
                path.display(),
                target.display()
            );
            // Relative links resolve inside the root from here, too (none
            // climbs above it: the canonical path must stay under it).
            let resolved = path.canonicalize().unwrap_or_else(|e| {
                panic!("{} -> {} dangles: {e}", path.display(), target.display())
            });
            assert!(
                resolved.starts_with(root),
                "{} -> {} leaves the root",
                path.display(),
                target.display()
            );
        } else if meta.is_dir() {
            check_symlinks(root, &path);
        }
    }
}

#[test]
fn binaries_run_in_the_image_root_alone() {
    if let Some(why) = unavailable() {
        if std::env::var_os("DALLE_REQUIRE_NETNS").is_some() {
            panic!("the image test is required (DALLE_REQUIRE_NETNS) but: {why}");
        }
        eprintln!("SKIPPED: this test needs root, chroot and namespaces: {why}");
        return;
    }
    let bin_dir = Path::new(DALLE).parent().unwrap();
    assert!(
        bin_dir.join("dalle-sample").is_file(),
        "no dalle-sample next to {DALLE}: `cargo build -p dalle-sample` \
         (`cargo test --workspace` builds it)"
    );

    // The build's target directory: the same file system as the binaries,
    // so the root is hard links, not 3 GB of copies.
    let dir = tempfile::Builder::new()
        .prefix("image-root")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let root = dir.path().join("root");
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(image_dir().join("build-root.sh"))
        .arg(&root)
        .arg("--binaries")
        .arg(bin_dir)
        .output()
        .unwrap();
    ok(&out, "build-root.sh");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("root built in {:.1} s", started.elapsed().as_secs_f64());
    let root = root.canonicalize().unwrap();

    for file in [
        "usr/local/bin/dalle",
        "usr/local/bin/dalle-sample",
        "etc/ld.so.cache",
        "etc/passwd",
        "opt/dalle/torch/lib/libtorch_cpu.so",
    ] {
        assert!(root.join(file).exists(), "the root has no /{file}");
    }
    check_symlinks(&root, &root);
    // The driver comes from the host at run time, never from the image.
    let out = Command::new("find")
        .arg(&root)
        .args(["-name", "libcuda.so*", "-o", "-name", "libnvidia-ml.so*"])
        .output()
        .unwrap();
    assert_eq!(ok(&out, "find"), "", "the root ships the CUDA driver");
    // NCCL as cudarc opens it: libnccl.so, on the loader path.
    let nccl = root.join("opt/dalle/nvidia/nccl/lib/libnccl.so");
    if root.join("opt/dalle/nvidia/nccl/lib/libnccl.so.2").exists() {
        assert!(nccl.exists(), "no libnccl.so link next to libnccl.so.2");
        let cache = Command::new("ldconfig")
            .arg("-C")
            .arg(root.join("etc/ld.so.cache"))
            .arg("-p")
            .output()
            .unwrap();
        assert!(
            ok(&cache, "ldconfig -p").contains("libnccl.so (libc6,x86-64) => /opt/dalle/"),
            "the root's ld.so.cache has no libnccl.so"
        );
    }

    let started = std::time::Instant::now();
    // Nothing but PATH and HOME: the libraries are found through the
    // root's own /etc/ld.so.cache.
    let bare = [
        ("PATH".to_string(), "/usr/local/bin".to_string()),
        ("HOME".to_string(), "/tmp".to_string()),
    ];
    let out = in_root(&root, &bare, &["/usr/local/bin/dalle", "--version"]);
    assert_eq!(ok(&out, "dalle --version"), format!("dalle {VERSION}\n"));
    let out = in_root(&root, &bare, &["/usr/local/bin/dalle-sample", "--version"]);
    assert_eq!(
        ok(&out, "dalle-sample --version"),
        format!("dalle-sample {VERSION}\n")
    );

    // A tiny dVAE run as `docker run` would start it: the Dockerfile's
    // environment, the job and its run directory inside the image.
    let env = dockerfile_env();
    std::fs::create_dir_all(root.join("work")).unwrap();
    std::fs::write(
        root.join("work/job.toml"),
        r#"
[run]
dir = "/work/run"
device = "cpu"
threads = 1

[synth]
count = 32
image_size = 16
rows_per_file = 16
rows_per_group = 8

[data]
decode_threads = 1

[dvae.model]
image_size = 16
n_hid = 8
n_blk_per_group = 1
vocab_size = 16
n_init = 8

[dvae.train]
steps = 4
batch_size = 4
log_every = 2
"#,
    )
    .unwrap();
    let dalle = |args: &[&str]| {
        let mut all = vec!["/usr/local/bin/dalle", "--config", "/work/job.toml"];
        all.extend(args);
        in_root(&root, &env, &all)
    };
    let out = ok(&dalle(&["data", "synth"]), "dalle data synth");
    assert!(out.contains("32 samples"), "{out}");
    let out = ok(&dalle(&["dvae", "train"]), "dalle dvae train");
    assert!(out.contains("trained 4 steps"), "{out}");
    let weights = root.join("work/run/dvae.safetensors");
    assert!(
        std::fs::metadata(&weights)
            .map(|m| m.len() > 0)
            .unwrap_or(false),
        "no weights at {}",
        weights.display()
    );
    eprintln!(
        "ran in the root in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
