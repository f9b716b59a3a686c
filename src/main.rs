//! The `orderly` command line; see `orderly --help` and the README.

// The hot path allocates and frees entity records, events and write intents
// across threads; glibc malloc spent a third of the CPU there (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    orderly::cli::main()
}
