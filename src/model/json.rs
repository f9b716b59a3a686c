//! JSON written by hand, for the one document orderly writes per event: the
//! change record.
//!
//! `serde_json` escapes a string one byte at a time, and the change record
//! is mostly strings (ids, types, the payload's text), so its escaping was
//! about half of the record's cost (callgrind, BENCHMARKS.md). These
//! functions check eight bytes at a time for the bytes JSON must escape and
//! copy clean runs whole. Their output is byte for byte what `serde_json`
//! writes for the same value: a property test in `change.rs` holds them to
//! it.

use crate::model::value::{Json, Value};

/// `0x01` in every byte of a word.
const ONES: u64 = 0x0101_0101_0101_0101;
/// `0x80` in every byte of a word.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any byte of `word` is a quote, a backslash or a control
/// character (below 0x20): the bytes JSON escapes. It may say yes for a
/// word that holds none of them, never no for one that does.
fn may_need_escape(word: u64) -> bool {
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    (quote | backslash | control) != 0
}

/// Appends what `serde_json` writes for `byte` inside a string, if it
/// escapes it.
fn escape(byte: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short: &[u8] = match byte {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        0x08 => b"\\b",
        0x0c => b"\\f",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0..=0x1f => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
            return;
        }
        _ => return,
    };
    out.extend_from_slice(short);
}

/// Appends `s` as a JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // `copied`: where the run not yet copied starts.
    let mut copied = 0;
    let mut words = bytes.chunks_exact(8);
    for (n, word) in (&mut words).enumerate() {
        if may_need_escape(u64::from_le_bytes(word.try_into().expect("eight bytes"))) {
            escape_in(out, bytes, n * 8..n * 8 + 8, &mut copied);
        }
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        // Padded with spaces, which need no escape.
        let mut word = [b' '; 8];
        word[..rest.len()].copy_from_slice(rest);
        if may_need_escape(u64::from_le_bytes(word)) {
            escape_in(
                out,
                bytes,
                bytes.len() - rest.len()..bytes.len(),
                &mut copied,
            );
        }
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// Escapes the bytes of `bytes[range]` that need it, copying the clean run
/// before each from `copied` on.
fn escape_in(out: &mut Vec<u8>, bytes: &[u8], range: std::ops::Range<usize>, copied: &mut usize) {
    for i in range {
        let byte = bytes[i];
        if byte < 0x20 || byte == b'"' || byte == b'\\' {
            out.extend_from_slice(&bytes[*copied..i]);
            escape(byte, out);
            *copied = i + 1;
        }
    }
}

/// Appends an integer.
pub fn write_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `value` as JSON, as [`Json`] serialises it.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(i) => write_int(out, *i),
        // Floats are rare in payloads: `serde_json` formats them (and
        // writes `null` for NaN and the infinities, as `Json` asks).
        Value::Float(_) => {
            serde_json::to_writer(&mut *out, &Json(value)).expect("writing to a Vec cannot fail")
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(fields) => {
            out.push(b'{');
            for (i, (name, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, name);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// Writes one JSON object, member by member, in the order called (serde's
/// derive writes a struct's fields in their declared order).
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    /// Opens an object in `out`.
    pub fn begin(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// A member whose value `write` appends. `name` needs no escaping.
    pub fn with(&mut self, name: &str, write: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        write(self.out);
        self
    }

    /// A string member.
    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        self.with(name, |o| write_str(o, value))
    }

    /// An integer member.
    pub fn int(&mut self, name: &str, value: impl itoa::Integer) -> &mut Self {
        self.with(name, |o| write_int(o, value))
    }

    /// Closes the object.
    pub fn end(&mut self) {
        self.out.push(b'}');
    }
}

/// Appends `value` as JSON, or `null` for `None`.
pub fn write_nullable<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        Some(v) => write(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// About how many bytes `value` takes as JSON (exact for strings without
/// escapes), to size the buffer once.
pub fn size_hint(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Int(_) | Value::Float(_) => 20,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|v| size_hint(v) + 1).sum::<usize>(),
        Value::Object(fields) => {
            2 + fields
                .iter()
                .map(|(k, v)| k.len() + 4 + size_hint(v))
                .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_str(s: &str) -> Vec<u8> {
        serde_json::to_vec(s).expect("a string serialises")
    }

    #[test]
    fn every_byte_that_json_escapes_is_escaped_as_serde_json_does() {
        for byte in 0u8..0x80 {
            // The byte alone, and at every place of a word and past it.
            for at in 0..12 {
                let mut s = "abcdefghijkl".to_owned();
                s.insert(at, char::from(byte));
                let mut ours = Vec::new();
                write_str(&mut ours, &s);
                assert_eq!(ours, serde_str(&s), "byte {byte:#04x} at {at}");
            }
        }
    }

    proptest! {
        #[test]
        fn strings_are_written_as_serde_json_writes_them(s in any::<String>()) {
            let mut ours = Vec::new();
            write_str(&mut ours, &s);
            prop_assert_eq!(ours, serde_str(&s));
        }

        #[test]
        fn escapes_among_clean_runs_are_written_as_serde_json_writes_them(
            s in proptest::string::string_regex("[a-z\"\\\\\\x00-\\x1f\u{7f}é€😀]{0,40}").expect("a regex"),
        ) {
            let mut ours = Vec::new();
            write_str(&mut ours, &s);
            prop_assert_eq!(ours, serde_str(&s));
        }
    }
}
