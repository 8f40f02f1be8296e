//! Compiles the kernels shim (`src/shim.cpp`) against the libtorch that
//! torch-sys links (see `dalle_build_support::compile_libtorch_shim`).

fn main() {
    dalle_build_support::compile_libtorch_shim("src/shim.cpp", "dalle_kernels_shim");
}
