//! `Value`: orderly's own JSON value type.
//!
//! bincode cannot encode `serde_json::Value` (it needs `deserialize_any`), so
//! payloads and entity fields are stored as this enum. It converts to and from
//! `serde_json::Value` losslessly for everything JSON can express.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A JSON object: field name to value, ordered so encodings are deterministic.
pub type Fields = BTreeMap<String, Value>;

/// A JSON value that bincode can store.
///
/// Decoding refuses values nested deeper than [`MAX_DEPTH`], so a corrupt
/// or hostile stored record cannot overflow the stack.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Value {
    /// JSON `null`.
    Null,
    /// JSON `true` or `false`.
    Bool(bool),
    /// A JSON number without a fraction that fits in an `i64`.
    Int(i64),
    /// Any other JSON number.
    Float(f64),
    /// A JSON string.
    String(String),
    /// A JSON array.
    Array(Vec<Value>),
    /// A JSON object.
    Object(Fields),
}

/// How deep values may nest when decoded: as deep as serde_json parses
/// JSON by default, so every payload that arrived as JSON decodes again.
pub const MAX_DEPTH: usize = 128;

std::thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The derived decoding of [`Value`], whose arrays and objects decode their
/// elements through `Value`'s own `Deserialize`, so each level is counted.
#[derive(Deserialize)]
#[serde(remote = "Value")]
enum ValueDef {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Array(Vec<Value>),
    Object(Fields),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let depth = DEPTH.with(|c| c.get());
        if depth >= MAX_DEPTH {
            return Err(serde::de::Error::custom(format!(
                "a value is nested deeper than {MAX_DEPTH} levels"
            )));
        }
        DEPTH.with(|c| c.set(depth + 1));
        let value = ValueDef::deserialize(d);
        DEPTH.with(|c| c.set(depth));
        value
    }
}

impl Value {
    /// The same value, as a field's change sees it: `==`, except that a NaN
    /// is the same as a NaN (so a field holding one is not changed by an
    /// event that does not write it). -0.0 and 0.0 are the same, as for `==`.
    pub fn same(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Float(a), Value::Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            (Value::Array(a), Value::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same(y))
            }
            (Value::Object(a), Value::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((ka, va), (kb, vb))| ka == kb && va.same(vb))
            }
            _ => self == other,
        }
    }

    /// The value as a number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// Converts into `serde_json::Value`, for display and JSON output.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Value::Object(o) => fields_to_json(o),
        }
    }
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(a) => Value::Array(a.into_iter().map(Value::from).collect()),
            serde_json::Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
            }
        }
    }
}

/// A [`Value`] serialised as plain JSON (what [`Value::to_json`] gives),
/// without building a `serde_json::Value` first.
#[derive(Clone, Copy, Debug)]
pub struct Json<'a>(pub &'a Value);

impl serde::Serialize for Json<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            // As `to_json`: JSON has no NaN or infinity.
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(_) => s.serialize_unit(),
            Value::String(v) => s.serialize_str(v),
            Value::Array(a) => s.collect_seq(a.iter().map(Json)),
            Value::Object(o) => s.collect_map(o.iter().map(|(k, v)| (k, Json(v)))),
        }
    }
}

/// Converts a field map into a JSON object.
pub fn fields_to_json(fields: &Fields) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {

    /// A stored value nested far deeper than any JSON orderly accepts is
    /// refused with an error, not a stack overflow; one at the limit reads.
    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // bincode: variant 5 is `Array`, then the length 1, level after level.
        let nested = |levels: usize| {
            let mut bytes = [5u8, 1].repeat(levels);
            bytes.push(0); // the innermost value: `Null`
            bytes
        };
        let cfg = bincode::config::standard();
        let err =
            bincode::serde::decode_from_slice::<Value, _>(&nested(1_000_000), cfg).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
        let (ok, _) =
            bincode::serde::decode_from_slice::<Value, _>(&nested(MAX_DEPTH - 1), cfg).unwrap();
        assert!(matches!(ok, Value::Array(_)));
        // The counter is back at zero after an error: a flat value reads.
        let (flat, _) = bincode::serde::decode_from_slice::<Value, _>(&[2, 4], cfg).unwrap();
        assert_eq!(flat, Value::Int(2));
    }

    /// `Json` writes exactly what `to_json` gives, for every kind of value.
    #[test]
    fn json_view_matches_to_json() {
        let v = Value::Object(
            [
                (
                    "a".to_owned(),
                    Value::Array(vec![Value::Int(-3), Value::Bool(true), Value::Null]),
                ),
                ("f".to_owned(), Value::Float(1.5)),
                ("nan".to_owned(), Value::Float(f64::NAN)),
                ("s".to_owned(), Value::String("q\"\n\u{1}é".into())),
                (
                    "o".to_owned(),
                    Value::Object([("z".to_owned(), Value::Int(1))].into()),
                ),
            ]
            .into(),
        );
        assert_eq!(
            serde_json::to_string(&Json(&v)).unwrap(),
            serde_json::to_string(&v.to_json()).unwrap()
        );
    }
    use super::*;

    #[test]
    fn json_round_trip_keeps_ints_and_floats_apart() {
        let json = serde_json::json!({"a": 1, "b": 1.5, "c": [true, null, "x"], "d": {"e": -3}});
        let v = Value::from(json.clone());
        assert_eq!(v.to_json(), json);
        let Value::Object(o) = v else {
            panic!("object expected")
        };
        assert_eq!(o["a"], Value::Int(1));
        assert_eq!(o["b"], Value::Float(1.5));
    }

    #[test]
    fn bincode_round_trip() {
        let v = Value::from(serde_json::json!({"x": [1, 2.5, "s", {"y": false}]}));
        let bytes = bincode::serde::encode_to_vec(&v, bincode::config::standard()).unwrap();
        let (back, _): (Value, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, v);
    }
}
