//! The decoders that read outside input never panic: the envelope (JSON and
//! protobuf), stored and changelog values, tenant settings documents and
//! `traceparent`. Proptests drive the fuzz targets' harnesses
//! (`orderly::tools::fuzzing`) with arbitrary bytes and with valid inputs
//! that have bytes flipped, cut or spliced; the checked-in fuzz corpus
//! (`fuzz/corpus/<target>/`) is replayed too. The long runs are cargo-fuzz's
//! (README, "Fuzzing").

mod common;

use orderly::tools::fuzzing;
use orderly::tools::workload::{self, Format};
use proptest::prelude::*;

/// Valid inputs for each target, in the harness's framing (a mode byte,
/// and so on), to mutate.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let event = common::event(
        "lead-1",
        "e-1",
        "lead.updated",
        1_000,
        serde_json::json!({"stage": "won", "amount": 12.5, "tags": ["a", {"b": null}]}),
    );
    match target {
        "envelope" => [Format::Json, Format::Proto]
            .into_iter()
            .map(|f| {
                let value = workload::message_of(&event, f).value;
                // Key present, header from config (auto), key length 6.
                let mut data = vec![1, 6];
                data.extend_from_slice(b"lead-1");
                data.extend_from_slice(&value);
                data
            })
            .collect(),
        "stored_record" => {
            let mut r = orderly::model::fold::EntityRecord::new("lead-1", "tenant-0");
            r.state.fields.insert(
                "notes".into(),
                orderly::model::value::Value::String("x".repeat(300)),
            );
            let mut data = vec![0];
            data.extend_from_slice(&orderly::store::encode(&r));
            vec![data]
        }
        "settings_document" => {
            let doc = serde_json::json!({
                "tenant_id": "tenant-0", "version": 3,
                "field_mappings": {"Stage": "stage"}, "drop_unmapped": false,
                "enabled_types": ["lead.updated"], "late_policy": {"lead.updated": "drop"},
                "too_late_policy": {}, "integration_flags": {"crm": true}
            });
            let mut data = vec![1];
            data.extend_from_slice(doc.to_string().as_bytes());
            vec![data]
        }
        _ => {
            let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let mut data = parent.to_vec();
            data.extend_from_slice(b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7xx");
            data.truncate(parent.len() * 2);
            vec![data]
        }
    }
}

/// `seed` with `edits` applied: each flips a byte, cuts the input, or
/// copies a run of it elsewhere.
fn mutate(mut seed: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(op, at, byte) in edits {
        if seed.is_empty() {
            break;
        }
        let at = at % seed.len();
        match op % 3 {
            0 => seed[at] ^= byte | 1,
            1 => seed.truncate(at.max(1)),
            _ => {
                let run: Vec<u8> = seed[at..].iter().take(byte as usize).copied().collect();
                let to = (at * 7 + byte as usize) % seed.len();
                seed.splice(to..to, run);
            }
        }
    }
    seed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        for (_, harness) in fuzzing::TARGETS {
            harness(&data);
        }
    }

    #[test]
    fn damaged_valid_inputs_never_panic_a_decoder(
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        for (name, harness) in fuzzing::TARGETS {
            for seed in seeds(name) {
                harness(&mutate(seed, &edits));
            }
        }
    }
}

/// The seeds themselves are accepted, so the mutations start from inputs
/// that reach deep into each decoder.
#[test]
fn the_seeds_are_valid_inputs() {
    let event = &seeds("envelope")[0];
    let decoded = orderly::model::envelope::decode(
        Some(b"lead-1"),
        Some(&event[8..]),
        None,
        orderly::model::envelope::ContentType::Auto,
    );
    assert!(decoded.is_ok(), "{decoded:?}");
    let record = &seeds("stored_record")[0];
    let r = orderly::store::decode::<orderly::model::fold::EntityRecord>(b"e", &record[1..]);
    assert!(r.is_ok(), "{r:?}");
    let doc = &seeds("settings_document")[0];
    let d = orderly::model::tenant::SettingsDocument::decode(&doc[1..], Some(b"application/json"));
    assert!(d.is_ok(), "{d:?}");
}

/// Every input of the checked-in fuzz corpus goes through its harness.
#[test]
fn the_fuzz_corpus_replays_without_a_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut replayed = 0;
    for (name, harness) in fuzzing::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        for entry in dir.flatten() {
            // A running fuzzer may remove an input while this reads them.
            let Ok(data) = std::fs::read(entry.path()) else {
                continue;
            };
            harness(&data);
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} corpus inputs");
    if root.exists() {
        assert!(replayed > 0, "the corpus in {} is empty", root.display());
    }
}

/// Writes the seeds into `fuzz/corpus/<target>/seed-<n>`, where cargo-fuzz
/// starts from them: `cargo test --test decoders -- --ignored`.
#[test]
#[ignore = "writes the fuzz corpus's seeds; run by hand"]
fn write_the_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, _) in fuzzing::TARGETS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (n, seed) in seeds(name).into_iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{n}")), seed).unwrap();
        }
    }
}
