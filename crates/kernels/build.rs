//! Compiles the kernels shim (`src/shim.cpp`) and the CUDA graph shim
//! (`src/cuda_graph.cpp`, with its CUDA part where libtorch has CUDA)
//! against the libtorch that torch-sys links (see `dalle_build_support`).

fn main() {
    dalle_build_support::compile_libtorch_shim("src/shim.cpp", "dalle_kernels_shim");
    let with_cuda =
        dalle_build_support::compile_libtorch_cuda_shim("src/cuda_graph.cpp", "dalle_graph_shim");
    println!("cargo:rustc-check-cfg=cfg(cuda_graphs)");
    if with_cuda {
        println!("cargo:rustc-cfg=cuda_graphs");
    }
}
