//! How a record's provenance map is stored: one entry per distinct writing
//! event, each with the fields it wrote, instead of one full copy of the
//! event's provenance per field. An event usually writes several fields, so
//! this stores each event id, type and topic once (format 5).

use super::Provenance;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serializer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Writes `map` as a sequence of (provenance, fields it wrote).
pub fn serialize<S: Serializer>(
    map: &BTreeMap<String, Arc<Provenance>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    // Few distinct writers per record: a linear scan groups them. The
    // fields one event wrote share one copy, so the pointer usually
    // answers before the values are compared.
    let mut groups: Vec<(&Provenance, Vec<&str>)> = Vec::new();
    for (field, p) in map {
        match groups
            .iter_mut()
            .find(|(q, _)| std::ptr::eq(*q, &**p) || *q == &**p)
        {
            Some((_, fields)) => fields.push(field),
            None => groups.push((&**p, vec![field])),
        }
    }
    let mut seq = s.serialize_seq(Some(groups.len()))?;
    for g in &groups {
        seq.serialize_element(g)?;
    }
    seq.end()
}

/// Reads what [`serialize`] wrote.
pub fn deserialize<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Arc<Provenance>>, D::Error> {
    let groups = Vec::<(Provenance, Vec<String>)>::deserialize(d)?;
    let mut map = BTreeMap::new();
    for (p, fields) in groups {
        // One copy per writing event, shared by the fields it wrote.
        let p = Arc::new(p);
        for field in fields {
            map.insert(field, Arc::clone(&p));
        }
    }
    Ok(map)
}
