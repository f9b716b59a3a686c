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
    let groups = group(map.iter().map(|(field, p)| (field.as_str(), &**p)));
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
    Ok(shared(groups))
}

/// Each field's provenance, shared: the fields one event wrote hold one
/// copy (formats before 5 stored one per field).
pub fn share(map: &BTreeMap<String, Provenance>) -> BTreeMap<String, Arc<Provenance>> {
    let groups = group(map.iter().map(|(field, p)| (field.as_str(), p)));
    shared(
        groups
            .into_iter()
            .map(|(p, fields)| (p.clone(), fields.into_iter().map(str::to_owned).collect())),
    )
}

/// The distinct provenances of `fields`, each with the fields it wrote.
/// Few distinct writers per record: a linear scan groups them. The fields
/// one event wrote usually share one copy, so the pointer answers before
/// the values are compared.
fn group<'a>(
    fields: impl Iterator<Item = (&'a str, &'a Provenance)>,
) -> Vec<(&'a Provenance, Vec<&'a str>)> {
    let mut groups: Vec<(&Provenance, Vec<&str>)> = Vec::new();
    for (field, p) in fields {
        match groups
            .iter_mut()
            .find(|(q, _)| std::ptr::eq(*q, p) || *q == p)
        {
            Some((_, fields)) => fields.push(field),
            None => groups.push((p, vec![field])),
        }
    }
    groups
}

/// The map of `groups`: one copy per writing event, shared by the fields
/// it wrote.
fn shared(
    groups: impl IntoIterator<Item = (Provenance, Vec<String>)>,
) -> BTreeMap<String, Arc<Provenance>> {
    let mut map = BTreeMap::new();
    for (p, fields) in groups {
        let p = Arc::new(p);
        for field in fields {
            map.insert(field, Arc::clone(&p));
        }
    }
    map
}
