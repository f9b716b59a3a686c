//! The allocation cap of every fuzz target: one allocation over
//! [`CAP`] aborts the run as a finding. (libFuzzer's own
//! `-malloc_limit_mb` needs a sanitizer's malloc hooks, and the targets
//! build without one: AddressSanitizer's flags break librdkafka's
//! configure.)

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a decoder may make on fuzz input.
pub const CAP: usize = 256 * 1024 * 1024;

pub struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            eprintln!(
                "allocation of {} bytes is over the cap of {CAP}",
                layout.size()
            );
            std::process::abort();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            eprintln!("reallocation to {new_size} bytes is over the cap of {CAP}");
            std::process::abort();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;
