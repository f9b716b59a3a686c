//! The `orderly` command line; see `orderly --help` and the README.

// The hot path allocates and frees entity records, events and write intents
// across threads; glibc malloc spent a third of the CPU there (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's `mi_option_purge_delay` (`mi_option_e` in mimalloc.h).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// How long freed memory stays with the process before mimalloc gives it
/// back to the OS, ms. mimalloc's default (10 ms) gave back and refaulted
/// memory so often under the engine's churn of records and intents that the
/// kernel zeroing the refaulted pages took 30% of the CPU and most of the
/// system time (perf, `clear_page_erms` under `mi_page_free_list_extend`).
/// Held for a second, the memory is reused instead; the peak RSS is the same.
const PURGE_DELAY_MS: std::ffi::c_long = 1_000;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

fn main() {
    // `MIMALLOC_PURGE_DELAY` in the environment wins, as mimalloc documents.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called once, before any other thread exists.
        unsafe {
            mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
            debug_assert_eq!(mi_option_get(MI_OPTION_PURGE_DELAY), PURGE_DELAY_MS);
        }
    }
    // Transparent huge pages made one run in three spend seconds in the
    // kernel zeroing 2 MiB pages that mimalloc had given back in part (the
    // engine ceiling was 20k events/s in those runs against 45k without).
    // mimalloc is built with `no_thp`, so it no longer asks for them; where
    // the system gives them unasked (`enabled = always`), the process opts
    // out, as mimalloc's own `MIMALLOC_ALLOW_THP=0` does.
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    orderly::cli::main()
}
