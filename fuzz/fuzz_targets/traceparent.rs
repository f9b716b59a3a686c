//! Fuzz target: see `orderly::tools::fuzzing::traceparent`.
#![no_main]

#[path = "alloc_cap.rs"]
mod alloc_cap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| orderly::tools::fuzzing::traceparent(data));
