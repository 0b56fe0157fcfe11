//! Duplicate object keys in raw JSON, which serde_json (and Go's encoding/json) decode by
//! silently keeping the last value.
//!
//! Owns finding every repeated key of every object in one JSON document, with the path of
//! the object it repeats in, while the document is still bytes: once decoded into a
//! `serde_json::Value` the earlier value is gone. RFC 8259 section 4 leaves the meaning
//! of repeated names to the implementation, so an opaque config with one is ambiguous:
//! the plugin (at claim decode) and the admission webhook (on the review body) refuse it
//! naming the key. The API server stores opaque parameters (a `RawExtension`) verbatim and
//! re-encodes every typed field, so in practice a repeat can only be inside opaque
//! parameters. Pure; must not judge configs (`validate` does).

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A key that appears more than once in one JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Path of the object holding it from the document root, keys joined by `.` and
    /// array positions as `[i]` (`spec.devices.config[0].opaque.parameters.sharing`);
    /// empty for the root object.
    pub path: String,
    /// The repeated key.
    pub key: String,
}

impl DuplicateKey {
    /// Path of the repeated key itself (`<path>.<key>`, or `<key>` at the root).
    pub fn key_path(&self) -> String {
        join(&self.path, &self.key)
    }
}

impl fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: duplicate key {:?}; JSON decoders keep only one of the values: remove the other",
            self.key_path(),
            self.key
        )
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Every duplicate key in the JSON document `json`, in document order.
///
/// Errors: `json` is not JSON (or nests deeper than serde_json's recursion limit of 128).
pub fn find_duplicate_keys(json: &[u8]) -> Result<Vec<DuplicateKey>, serde_json::Error> {
    let mut found = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(json);
    Walk {
        path: String::new(),
        found: &mut found,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// Visits one JSON value at `path`, recording repeated keys of the objects in it.
struct Walk<'a> {
    path: String,
    found: &'a mut Vec<DuplicateKey>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let path = format!("{}[{index}]", self.path);
            let seed = Walk {
                path,
                found: &mut *self.found,
            };
            if seq.next_element_seed(seed)?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = join(&self.path, &key);
            if !seen.insert(key.clone()) {
                self.found.push(DuplicateKey {
                    path: self.path.clone(),
                    key,
                });
            }
            map.next_value_seed(Walk {
                path,
                found: &mut *self.found,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dups(json: &str) -> Vec<(String, String)> {
        find_duplicate_keys(json.as_bytes())
            .expect("json")
            .into_iter()
            .map(|d| (d.path, d.key))
            .collect()
    }

    #[test]
    fn repeated_keys_are_found_with_their_object_path() {
        let json = r#"{"spec": {"devices": {"config": [
            {"opaque": {"driver": "d", "parameters": {"kind": "GpuConfig",
                "sharing": {"strategy": "MPS", "strategy": "TimeSlicing"}}}},
            {"opaque": {"driver": "d", "driver": "e"}}]}}, "a": 1, "a": 2}"#;
        assert_eq!(
            dups(json),
            [
                (
                    "spec.devices.config[0].opaque.parameters.sharing".to_owned(),
                    "strategy".to_owned()
                ),
                (
                    "spec.devices.config[1].opaque".to_owned(),
                    "driver".to_owned()
                ),
                (String::new(), "a".to_owned()),
            ]
        );
        let d = &find_duplicate_keys(json.as_bytes()).expect("json")[0];
        assert_eq!(
            d.to_string(),
            "spec.devices.config[0].opaque.parameters.sharing.strategy: duplicate key \"strategy\"; JSON decoders keep only one of the values: remove the other"
        );
    }

    #[test]
    fn same_key_in_different_objects_and_escaped_keys() {
        assert_eq!(
            dups(r#"{"a": {"x": 1}, "b": {"x": 1}, "c": [{"x": 1}, {"x": 2}]}"#),
            []
        );
        // The same name written with an escape is the same key.
        assert_eq!(
            dups(r#"{"kind": 1, "k\u0069nd": 2}"#),
            [(String::new(), "kind".to_owned())]
        );
        // Three times: reported twice.
        assert_eq!(dups(r#"{"a": 1, "a": 2, "a": 3}"#).len(), 2);
        assert_eq!(dups("[1, \"x\", null, true, 2.5]"), []);
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(find_duplicate_keys(b"{\"a\": ").is_err());
        assert!(find_duplicate_keys(b"{} {}").is_err());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(find_duplicate_keys(deep.as_bytes()).is_err());
    }
}
