//! Compiles the autocast shim (`src/shim.cpp`) against the headers of the
//! libtorch that torch-sys links, with the flags torch-sys compiles its own
//! C++ with (C++17, the same `_GLIBCXX_USE_CXX11_ABI`), so both sides agree
//! on every type's layout and every symbol's mangled name.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    dalle_build_support::link_libtorch();
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
        include.join("ATen/autocast_mode.h").is_file(),
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
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/shim.cpp")
        .compile("dalle_precision_shim");
}
