//! The Kubernetes manifests (cluster/k8s): every overlay renders
//! (cluster/k8s/render.py, the subset of Kustomize they use) and validates
//! strictly against the Kubernetes schemas, offline (kubernetes-validate,
//! installed by scripts/setup.sh); and the rendered objects say what the
//! README promises: the size of each overlay, GPUs per pod, secrets as
//! files or environment references and never as arguments; and the pods'
//! commands, run as processes with the environment Kubernetes would give
//! them, train a job: a coordinator and two worker "nodes" on this machine.

#[path = "support/launch.rs"]
mod launch_support;

use launch_support::{DALLE, Running, tiny_job};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv_bin(name: &str) -> PathBuf {
    let bin = repo().join(".torch-venv/bin").join(name);
    assert!(
        bin.exists(),
        "{} missing: run scripts/setup.sh",
        bin.display()
    );
    bin
}

/// The objects an overlay renders to.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo().join("cluster/k8s").join(overlay);
    let out = Command::new(venv_bin("python"))
        .arg(repo().join("cluster/k8s/render.py"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rendering {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Strict schema validation of every object, each written as its own file.
fn validate(overlay: &str, objects: &[Value]) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = objects
        .iter()
        .enumerate()
        .map(|(i, object)| {
            // JSON is YAML.
            let path = dir.path().join(format!("{i}.yaml"));
            std::fs::write(&path, serde_json::to_vec_pretty(object).unwrap()).unwrap();
            path
        })
        .collect();
    let out = Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{overlay}: {said}");
    assert_eq!(
        said.matches("passed for resource").count(),
        objects.len(),
        "{overlay}: {said}"
    );
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container(job: &Value) -> &Value {
    &job["spec"]["template"]["spec"]["containers"][0]
}

/// The value of environment variable `name` of a container, if literal.
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

#[test]
fn every_overlay_validates_and_sizes_the_job_as_it_says() {
    for (overlay, nodes, gpus) in [("overlays/1x8", 1, 8), ("overlays/4x8", 4, 8)] {
        let objects = render(overlay);
        validate(overlay, &objects);

        let workers = find(&objects, "Job", "dalle-workers");
        assert_eq!(workers["spec"]["completionMode"], "Indexed");
        assert_eq!(workers["spec"]["completions"], nodes, "{overlay}");
        assert_eq!(workers["spec"]["parallelism"], nodes, "{overlay}");
        let node = container(workers);
        assert_eq!(
            node["resources"]["limits"]["nvidia.com/gpu"], gpus,
            "{overlay}"
        );
        assert_eq!(env(node, "DALLE_GPUS_PER_NODE")["value"], gpus.to_string());
        assert_eq!(
            env(node, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
            "status.podIP"
        );
        let coordinator = container(find(&objects, "Job", "dalle-coordinator"));
        assert_eq!(
            env(coordinator, "DALLE_MIN_WORKERS")["value"],
            (nodes * gpus).to_string(),
            "{overlay}: the coordinator waits for every GPU"
        );
        // The headless Service the pods' subdomain names.
        let headless = find(&objects, "Service", "dalle-workers");
        assert_eq!(headless["spec"]["clusterIP"], "None");
        assert_eq!(
            workers["spec"]["template"]["spec"]["subdomain"],
            "dalle-workers"
        );

        for c in [node, coordinator] {
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            // Secrets come as mounted files, never as values on the
            // command line (where `ps` and the pod spec would show them).
            assert!(
                args.iter()
                    .any(|a| a.starts_with("--token-file=/var/run/dalle/"))
            );
            assert!(!args.iter().any(|a| a.starts_with("--token=")), "{args:?}");
            for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                assert_eq!(
                    env(c, key)["valueFrom"]["secretKeyRef"]["name"],
                    "dalle-s3",
                    "{key}"
                );
            }
            // Every `$(VAR)` in the arguments is defined in the container's
            // environment (Kubernetes leaves undefined ones as they are).
            for arg in &args {
                for var in arg.split("$(").skip(1) {
                    let var = var.split(')').next().unwrap();
                    env(c, var);
                }
            }
        }
    }
}

#[test]
fn the_job_config_every_pod_mounts_is_a_valid_job() {
    let objects = render("base");
    let config = find(&objects, "ConfigMap", "dalle-job");
    let toml = config["data"]["job.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, toml).unwrap();
    // `dalle config` parses and validates it as every rank would.
    let out = Command::new(env!("CARGO_BIN_EXE_dalle"))
        .arg("--config")
        .arg(&path)
        .arg("config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("s3://dalle-runs/job-1"), "{shown}");
}

/// What Kubernetes would give one container, on this machine: its volumes
/// as directories under `root` (secrets as files), its environment with
/// `$(VAR)` references expanded, the Services' names resolved to loopback.
struct Pod {
    args: Vec<String>,
    env: HashMap<String, String>,
}

impl Pod {
    /// `container` of `spec`, with each mount at `root/<mount path>`,
    /// `pod_ip` for the downward API, `index` as JOB_COMPLETION_INDEX, the
    /// literal values of `sized` replaced (as an overlay does) and
    /// `rewrite` applied to every argument (Service names, ports).
    fn of(
        spec: &Value,
        root: &Path,
        pod_ip: &str,
        index: Option<usize>,
        sized: &[(&str, &str)],
        rewrite: &dyn Fn(String) -> String,
    ) -> Pod {
        let container = &spec["containers"][0];
        let mut env = HashMap::new();
        for e in container["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
                pod_ip.to_string()
            } else if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                format!("test-{key}")
            } else {
                panic!("no test value for env {name}")
            };
            env.insert(name, value);
        }
        for (name, value) in sized {
            assert!(env.contains_key(*name), "no env {name} to size");
            env.insert(name.to_string(), value.to_string());
        }
        if let Some(i) = index {
            env.insert("JOB_COMPLETION_INDEX".into(), i.to_string());
        }
        let mounts: Vec<String> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap().to_string())
            .collect();
        for mount in &mounts {
            std::fs::create_dir_all(root.join(mount.trim_start_matches('/'))).unwrap();
        }
        let args = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let mut arg = a.as_str().unwrap().to_string();
                for (name, value) in &env {
                    arg = arg.replace(&format!("$({name})"), value);
                }
                for mount in &mounts {
                    let local = root.join(mount.trim_start_matches('/'));
                    arg = arg.replace(mount.as_str(), local.to_str().unwrap());
                }
                rewrite(arg)
            })
            .collect();
        Pod { args, env }
    }

    fn spawn(&self) -> Running {
        Running::spawn(
            Command::new(DALLE)
                .args(&self.args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(&self.env)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
        )
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_pods_commands_run_a_job_as_processes_with_what_kubernetes_gives_them() {
    let dir = tempfile::tempdir().unwrap();
    let objects = render("base");
    let spec = |name: &str| find(&objects, "Job", name)["spec"]["template"]["spec"].clone();
    let (coordinator_spec, worker_spec) = (spec("dalle-coordinator"), spec("dalle-workers"));
    // This machine has no GPU and no S3: the job is the tiny CPU one, two
    // "nodes" of one CPU worker each (the overlays' sizes, scaled down).
    let job = tiny_job(dir.path(), "threads = 1", "");
    let (port, status_port) = (free_port(), free_port());
    let rewrite = move |arg: String| {
        arg.replace("0.0.0.0:29500", &format!("127.0.0.1:{port}"))
            .replace("0.0.0.0:29501", &format!("127.0.0.1:{status_port}"))
            .replace("dalle-coordinator:29500", &format!("127.0.0.1:{port}"))
            .replace("--gpus=", "--nproc=")
    };
    // The Secrets, as the pods mount them.
    let certified = rcgen::generate_simple_self_signed(vec!["dalle-coordinator".into()]).unwrap();
    let write = |root: &Path, path: &str, data: &str| {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    };
    let pod_root = |name: &str| {
        let root = dir.path().join(name);
        write(&root, "var/run/dalle/token/token", "k8s-test-job-token\n");
        write(
            &root,
            "var/run/dalle/status-token/token",
            "k8s-test-status-token\n",
        );
        write(&root, "var/run/dalle/tls/tls.crt", &certified.cert.pem());
        write(
            &root,
            "var/run/dalle/tls/tls.key",
            &certified.signing_key.serialize_pem(),
        );
        write(&root, "var/run/dalle/tls/ca.crt", &certified.cert.pem());
        write(
            &root,
            "etc/dalle/job.toml",
            &std::fs::read_to_string(&job).unwrap(),
        );
        root
    };
    let coordinator = Pod::of(
        &coordinator_spec,
        &pod_root("coordinator"),
        "127.0.0.1",
        None,
        &[("DALLE_MIN_WORKERS", "2")],
        &rewrite,
    );
    let head = coordinator.spawn();
    head.stderr.wait_for("job started", Duration::from_secs(60));
    let workers: Vec<Running> = (0..2)
        .map(|i| {
            let pod = Pod::of(
                &worker_spec,
                &pod_root(&format!("worker-{i}")),
                "127.0.0.1",
                Some(i),
                &[("DALLE_GPUS_PER_NODE", "1")],
                &rewrite,
            );
            assert!(
                pod.args.contains(&"--nproc=1".to_string()),
                "{:?}",
                pod.args
            );
            // Nothing secret on the command line.
            assert!(!pod.args.iter().any(|a| a.contains("k8s-test-job-token")));
            pod.spawn()
        })
        .collect();
    let logs: Vec<_> = workers.iter().map(|w| w.stderr.clone()).collect();
    for (i, worker) in workers.into_iter().enumerate() {
        assert!(
            worker.wait().success(),
            "worker pod {i}:\n{}",
            logs[i].text()
        );
    }
    let (head_log, said) = (head.stderr.clone(), head.stdout.clone());
    assert!(head.wait().success(), "{}", head_log.text());
    assert!(
        said.text().contains("job finished") && said.text().contains("with 2 workers"),
        "{}\n{}",
        said.text(),
        head_log.text()
    );
}
