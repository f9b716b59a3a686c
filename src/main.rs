//! The `orderly` command line; see `orderly --help` and the README.

// The hot path allocates and frees entity records, events and write intents
// across threads; glibc malloc spent a third of the CPU there (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Transparent huge pages made one engine run in three spend seconds in
    // the kernel zeroing 2 MiB pages (`clear_page_erms` under
    // `mi_page_free_list_extend`, perf), at about 20k events/s against
    // 35k-41k without them (BENCHMARKS.md, "The allocator"). The process
    // opts out, as mimalloc's own `MIMALLOC_ALLOW_THP=0` does: the kernel
    // then gives it no huge pages, also where mimalloc asked for them
    // before `main`. With that variable set, mimalloc's and the system's
    // settings stand.
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    orderly::cli::main()
}
