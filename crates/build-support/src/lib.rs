//! Build-script helper shared by every crate whose binaries or tests link
//! libtorch.
//!
//! Two things go wrong by default when linking libtorch from a Python wheel:
//! the binary gets no rpath (so it only runs with `LD_LIBRARY_PATH`), and the
//! linker's `--as-needed` drops `libtorch_cuda.so` because no symbol of it is
//! referenced directly, which silently turns a GPU build into a CPU-only one.
//! [`link_libtorch`] fixes both for the calling package's binaries, tests,
//! examples and benches.

use std::path::PathBuf;

/// Emits the link arguments for the calling package. The package must list
/// `torch-sys` as a direct dependency: its `links = "tch"` key is what hands
/// us `DEP_TCH_LIBTORCH_LIB`, the directory torch-sys linked against.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: add torch-sys as a direct dependency"
        );
        return;
    };
    // Resolve the checkout's `.libtorch` link so the rpath names the shared
    // cache itself and binaries keep working from anywhere.
    let lib_dir = std::fs::canonicalize(&lib_dir).unwrap_or(lib_dir);
    let dir = lib_dir.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    // Lets the package's tests check what the binaries were linked against.
    println!("cargo:rustc-env=DALLE_LIBTORCH_LIB={dir}");
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=libtorch_cuda_linked");
    }
    println!("cargo:rustc-check-cfg=cfg(libtorch_cuda_linked)");
}
