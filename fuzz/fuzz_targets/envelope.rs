//! Fuzz target: see `orderly::tools::fuzzing::envelope`.
#![no_main]

#[path = "alloc_cap.rs"]
mod alloc_cap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| orderly::tools::fuzzing::envelope(data));
