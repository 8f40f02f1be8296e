//! The configs under `configs/` say what they claim: `paper.toml` holds
//! every key with the defaults (the paper's values), nothing left implicit,
//! and the other configs parse.

use dalle_train::config::JobConfig;
use std::path::{Path, PathBuf};

fn config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name)
}

fn load(name: &str) -> JobConfig {
    JobConfig::load_with_env(Some(&config(name)), &[], std::iter::empty())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every leaf key of a TOML value as `dotted.path = value` (an empty table
/// is a leaf of its own, so that it must be shown too).
fn leaves(value: &toml::Value, path: &str, out: &mut Vec<(String, toml::Value)>) {
    match value {
        toml::Value::Table(table) if !table.is_empty() => {
            for (key, v) in table {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                leaves(v, &path, out);
            }
        }
        other => out.push((path.to_string(), other.clone())),
    }
}

fn lookup<'a>(value: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

/// Keys whose value in paper.toml is not the default, with why.
const NOT_DEFAULTS: [&str; 1] = [
    // Where that job writes; the default is a generic directory.
    "run.dir",
];

#[test]
fn paper_toml_holds_every_key_with_the_papers_values() {
    let path = config("paper.toml");
    let file: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let parsed = toml::Value::try_from(load("paper.toml")).unwrap();
    let defaults = toml::Value::try_from(JobConfig::default()).unwrap();
    let mut keys = Vec::new();
    leaves(&defaults, "", &mut keys);
    assert!(keys.len() > 100, "only {} keys", keys.len());
    let mut differ = Vec::new();
    let mut missing = Vec::new();
    for (key, default) in &keys {
        if lookup(&file, key).is_none() {
            missing.push(key.clone());
        }
        let value = lookup(&parsed, key);
        if value != Some(default) && !NOT_DEFAULTS.contains(&key.as_str()) {
            differ.push(format!("{key}: file {value:?}, default {default}"));
        }
    }
    assert!(
        differ.is_empty(),
        "configs/paper.toml differs from JobConfig::default():\n{}",
        differ.join("\n")
    );
    assert!(
        missing.is_empty(),
        "configs/paper.toml leaves these keys implicit:\n{}",
        missing.join("\n")
    );
    // And the other way round: nothing set that the defaults leave unset
    // (None, which serialises to nothing).
    let mut extra = Vec::new();
    leaves(&parsed, "", &mut extra);
    let unknown: Vec<_> = extra
        .iter()
        .filter(|(k, _)| lookup(&defaults, k).is_none())
        .map(|(k, _)| k.clone())
        .collect();
    assert!(unknown.is_empty(), "set but unset by default: {unknown:?}");
    // The run directory is the only deliberate difference.
    let mut expected = JobConfig::default();
    expected.run.dir = "runs/paper".into();
    assert_eq!(load("paper.toml"), expected);
}

#[test]
fn the_h200_config_is_a_one_billion_parameter_transformer_that_parses() {
    let job = load("h200x8-1b.toml");
    let m = &job.gpt.model;
    assert_eq!((m.dim, m.heads), (2048, 16));
    assert_eq!((job.text.text_len, job.dvae.model.grid_size()), (256, 32));
    // The paper-width dVAE.
    assert_eq!(
        job.dvae.model,
        dalle_model::dvae::DvaeConfig::default(),
        "the dVAE is the paper's"
    );
    // Per block 4d² + 2·d·4d (+ biases and norms), and the embeddings and
    // heads of 16384 + 256 text and 8192 image tokens.
    let d = m.dim as f64;
    let blocks = m.depth as f64 * 12.0 * d * d;
    let tables = 2.0 * d * (16384.0 + 256.0 + 8192.0);
    let billions = (blocks + tables) / 1e9;
    assert!((0.9..1.2).contains(&billions), "{billions} B parameters");
}

#[test]
fn the_demo_config_parses() {
    load("demo.toml");
}
