//! The Kubernetes manifests (cluster/k8s): every overlay renders
//! (cluster/k8s/render.py, the subset of Kustomize they use) and validates
//! strictly against the Kubernetes schemas, offline (kubernetes-validate,
//! installed by scripts/setup.sh); and the rendered objects say what the
//! README promises: the size of each overlay, GPUs per pod, secrets as
//! files or environment references and never as arguments.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

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
