//! Compiles the autocast shim (`src/shim.cpp`) against the libtorch that
//! torch-sys links (see `dalle_build_support::compile_libtorch_shim`).

fn main() {
    dalle_build_support::compile_libtorch_shim("src/shim.cpp", "dalle_precision_shim");
}
