//! Says whether this process can use NCCL, which library it loaded, or why
//! not: `cargo run -p dalle-collective --example nccl_probe`.

fn main() {
    match dalle_collective::nccl_version() {
        Ok(version) => {
            println!("NCCL {version} available");
            // Which file the dynamic loader picked (Linux).
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let mut libs: Vec<&str> = maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .filter(|p| p.contains("libnccl") || p.contains("libcuda.so"))
                .collect();
            libs.dedup();
            for lib in libs {
                println!("  loaded {lib}");
            }
        }
        Err(e) => println!("{e}"),
    }
}
