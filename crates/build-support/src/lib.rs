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

/// Compiles `source` (a C++ shim over libtorch, relative to the package)
/// into the static library `name`, against the headers of the libtorch
/// torch-sys links and with the flags torch-sys compiles its own C++ with
/// (C++17, the same `_GLIBCXX_USE_CXX11_ABI`), so both sides agree on every
/// type's layout and every symbol's mangled name. Also links libtorch as
/// [`link_libtorch`] does.
pub fn compile_libtorch_shim(source: &str, name: &str) {
    println!("cargo:rerun-if-changed={source}");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/include/dalle_shim.h")
    );
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    link_libtorch();
    let lib_dir = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .expect("DEP_TCH_LIBTORCH_LIB: torch-sys must be a direct dependency");
    // The wheel (and the libtorch archive) keep the headers beside `lib`.
    let root = lib_dir
        .parent()
        .expect("libtorch's lib directory has a parent")
        .to_path_buf();
    let include = root.join("include");
    assert!(
        include.join("ATen/Tensor.h").is_file(),
        "no libtorch headers at {}",
        include.display()
    );
    // torch-sys's default when it is not asked python: libtorch ≥ 2.x
    // wheels are built with the C++11 ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // dalle_shim.h: what every shim shares.
        .include(concat!(env!("CARGO_MANIFEST_DIR"), "/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(source)
        .compile(name);
}
