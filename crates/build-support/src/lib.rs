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
    shim_build(source).compile(name);
}

/// [`compile_libtorch_shim`] for a shim with a CUDA part (libtorch's CUDA
/// classes: streams, graphs). When the libtorch linked has CUDA
/// (`libtorch_cuda.so`) and the CUDA runtime's headers are found, the shim
/// is compiled with `DALLE_WITH_CUDA` defined and linked against
/// `libtorch_cuda` and `libc10_cuda`; otherwise without, and its CUDA entry
/// points must report that they are unavailable. Returns whether CUDA is in.
///
/// The headers: the CUDA build of the torch wheel ships none of its own,
/// but its dependencies do. Triton's NVIDIA backend carries the runtime's
/// (`cuda_runtime_api.h` and its `crt/` part), the CUDA runtime wheel most
/// of them (not `crt/`); a CUDA toolkit (`CUDA_HOME`, `/usr/local/cuda`)
/// is used when present.
pub fn compile_libtorch_cuda_shim(source: &str, name: &str) -> bool {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let mut build = shim_build(source);
    let lib_dir = libtorch_lib_dir();
    let cuda_headers = cuda_include_dirs(&lib_dir);
    let with_cuda = lib_dir.join("libtorch_cuda.so").exists() && !cuda_headers.is_empty();
    if with_cuda {
        build
            .includes(&cuda_headers)
            .define("DALLE_WITH_CUDA", None);
    }
    build.compile(name);
    if with_cuda {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    with_cuda
}

/// Where the CUDA runtime's headers are, beside the libtorch at `lib_dir`
/// (see [`compile_libtorch_cuda_shim`]): every directory needed, or none.
fn cuda_include_dirs(lib_dir: &std::path::Path) -> Vec<PathBuf> {
    let complete = |dir: &std::path::Path| {
        dir.join("cuda_runtime_api.h").is_file() && dir.join("crt/host_config.h").is_file()
    };
    let mut toolkits: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("include"))
        .into_iter()
        .collect();
    toolkits.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(toolkit) = toolkits.into_iter().find(|d| complete(d)) {
        return vec![toolkit];
    }
    // torch/lib → site-packages.
    let Some(site) = lib_dir.parent().and_then(|torch| torch.parent()) else {
        return Vec::new();
    };
    let triton = site.join("triton/backends/nvidia/include");
    if !complete(&triton) {
        return Vec::new();
    }
    // The runtime wheel's copy matches libtorch's CUDA; triton's fills in
    // what it lacks.
    let runtime = site.join("nvidia/cu13/include");
    [runtime, triton]
        .into_iter()
        .filter(|d| d.join("cuda_runtime_api.h").is_file())
        .collect()
}

/// libtorch's lib directory, through the checkout's `.libtorch` link (the
/// wheel's neighbours in site-packages are found from the real path).
fn libtorch_lib_dir() -> PathBuf {
    let dir = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .expect("DEP_TCH_LIBTORCH_LIB: torch-sys must be a direct dependency");
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// The `cc` build of one shim, libtorch linked (see [`compile_libtorch_shim`]).
fn shim_build(source: &str) -> cc::Build {
    println!("cargo:rerun-if-changed={source}");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/include/dalle_shim.h")
    );
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    link_libtorch();
    let lib_dir = libtorch_lib_dir();
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
    let mut build = cc::Build::new();
    build
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
        .file(source);
    build
}
