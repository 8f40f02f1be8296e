//! The `dalle` binary must run without LD_LIBRARY_PATH (rpath to libtorch)
//! and, when libtorch has CUDA, must link libtorch_cuda.so even though no
//! symbol of it is referenced — otherwise the same build silently runs on
//! the CPU of a GPU machine.

use std::path::Path;
use std::process::Command;

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");
const LIBTORCH_LIB: &str = env!("DALLE_LIBTORCH_LIB");

fn dynamic_section() -> String {
    let out = Command::new("readelf")
        .args(["-d", DALLE])
        .output()
        .expect("readelf (binutils) must be installed to check the link");
    assert!(out.status.success(), "readelf failed on {DALLE}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn binary_links_libtorch_cuda_when_libtorch_has_it() {
    let dynamic = dynamic_section();
    assert!(dynamic.contains("libtorch_cpu.so"), "{dynamic}");
    if Path::new(LIBTORCH_LIB).join("libtorch_cuda.so").exists() {
        assert!(
            dynamic.contains("[libtorch_cuda.so]"),
            "libtorch has CUDA but {DALLE} does not NEED libtorch_cuda.so:\n{dynamic}"
        );
    }
}

#[test]
fn binary_runs_without_library_path() {
    assert!(
        dynamic_section().contains(LIBTORCH_LIB),
        "RUNPATH must name {LIBTORCH_LIB}"
    );
    let out = Command::new(DALLE)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("dalle "));
}
