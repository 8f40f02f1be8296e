fn main() {
    dalle_build_support::link_libtorch();
}
