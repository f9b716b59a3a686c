//! Fuzz target: see `orderly::tools::fuzzing::settings_document`.
#![no_main]

#[path = "alloc_cap.rs"]
mod alloc_cap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| orderly::tools::fuzzing::settings_document(data));
