//! Our dVAE weights load, strictly, into OpenAI's own released dVAE code and
//! give the same tokens and pixels as our binary (scripts/check_openai_compat.py
//! trains a small model with `dalle dvae train`, then compares).

use std::path::Path;
use std::process::Command;

#[test]
fn weights_load_in_openais_code_and_agree() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = repo.join(".torch-venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
    let out = Command::new(python)
        .arg(repo.join("scripts/check_openai_compat.py"))
        .args(["--dalle", env!("CARGO_BIN_EXE_dalle")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("openai-compat: OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
