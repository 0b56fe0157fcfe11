//! What the webhook refuses in one object beyond invalid entries: two of our driver's
//! entries that configure one request differently, and repeated JSON keys in our
//! entries.
//!
//! Owns grouping one object's config entries (one object is one source: a claim, a
//! template's claim, or a DeviceClass) by the requests they apply to (each named request,
//! and "every request" for entries without `requests`, which is all of a DeviceClass's)
//! and turning [`crate::config::conflicts`], the rule the plugin applies at prepare, into
//! field errors naming both entries; and picking, from the repeated keys of the review
//! body ([`crate::config::find_duplicate_keys`]), those inside our entries. Pure; validity
//! of one entry is `config::validate_opaque`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::config::{Candidate, Config, DuplicateKey, FieldError, conflicts, validate_opaque};

/// Our driver's valid entries of `entries`: index, the requests named (empty = every
/// request) and the decoded config.
fn ours<'a>(entries: &'a [Value], driver: &str) -> Vec<(usize, BTreeSet<&'a str>, Config)> {
    entries
        .iter()
        .enumerate()
        .filter_map(|(index, entry)| {
            let opaque = entry.get("opaque")?;
            if opaque.get("driver").and_then(Value::as_str) != Some(driver) {
                return None;
            }
            let config = validate_opaque(opaque.get("parameters")?).ok()?;
            let requests = entry
                .get("requests")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            Some((index, requests, config))
        })
        .collect()
}

/// One error per pair of `driver`'s entries in `entries` (the list at `list_path`, e.g.
/// `spec.devices.config`) that conflict for some request, on the later entry and naming
/// the earlier; each pair once (for the first request, in name order, where they meet).
pub fn conflict_errors(list_path: &str, entries: &[Value], driver: &str) -> Vec<FieldError> {
    let valid = ours(entries, driver);
    let named: BTreeSet<&str> = valid
        .iter()
        .flat_map(|(_, r, _)| r.iter().copied())
        .collect();
    // `None`: entries for every request; `Some(name)`: entries naming it.
    let buckets = std::iter::once(None).chain(named.into_iter().map(Some));
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for bucket in buckets {
        let candidates: Vec<Candidate<'_, ()>> = valid
            .iter()
            .filter(|(_, requests, _)| match bucket {
                None => requests.is_empty(),
                Some(name) => requests.contains(name),
            })
            .map(|(index, _, config)| Candidate {
                index: *index,
                level: (),
                config,
            })
            .collect();
        for c in conflicts(&candidates) {
            if !seen.insert(c) {
                continue;
            }
            let what =
                bucket.map_or_else(|| "every request".to_owned(), |n| format!("request {n:?}"));
            let kind = valid
                .iter()
                .find(|v| v.0 == c.later)
                .map_or("config", |v| v.2.kind().as_str());
            errors.push(FieldError::new(
                format!("{list_path}[{}]", c.later),
                format!(
                    "conflicts with {list_path}[{earlier}]: both configure {what} with a \
                     different {kind}; the precedence rule would silently apply \
                     {list_path}[{later}] only: remove one entry or merge them",
                    earlier = c.earlier,
                    later = c.later,
                ),
            ));
        }
    }
    errors.sort_by(|a, b| a.path.cmp(&b.path));
    errors
}

/// The repeated keys of `duplicates` (paths from the object root) that lie in one of
/// `driver`'s entries of `entries` (the list at `list_path`), plus a repeated `driver`
/// key in any entry's `opaque` (which driver it names is ambiguous), as field errors.
pub fn duplicate_errors(
    list_path: &str,
    entries: &[Value],
    driver: &str,
    duplicates: &[DuplicateKey],
) -> Vec<FieldError> {
    duplicates
        .iter()
        .filter(|d| {
            entries.iter().enumerate().any(|(index, entry)| {
                let opaque = format!("{list_path}[{index}].opaque");
                let inside = d.path == opaque || d.path.starts_with(&format!("{opaque}."));
                let is_ours = entry
                    .get("opaque")
                    .and_then(|o| o.get("driver"))
                    .and_then(Value::as_str)
                    == Some(driver);
                inside && (is_ours || (d.path == opaque && d.key == "driver"))
            })
        })
        .map(|d| {
            FieldError::new(
                d.key_path(),
                format!(
                    "duplicate key {:?}; JSON decoders keep only one of the values (the \
                     plugin would not know which you meant): remove the other",
                    d.key
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DRIVER: &str = "gpu.gpu-dra.dev";
    const LIST: &str = "spec.devices.config";

    fn entry(requests: Option<&[&str]>, interval: &str) -> Value {
        let mut e = json!({"opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}}}}});
        if let Some(r) = requests {
            e["requests"] = json!(r);
        }
        e
    }

    fn paths(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn entries_for_one_request_at_one_level_conflict_naming_both() {
        let entries = [
            entry(None, "Short"),
            entry(Some(&["a"]), "Long"),
            entry(None, "Medium"),
            entry(Some(&["b", "a"]), "Short"),
            entry(None, "Long"),
        ];
        let errors = conflict_errors(LIST, &entries, DRIVER);
        assert_eq!(
            paths(&errors),
            [
                "spec.devices.config[3]",
                "spec.devices.config[4]",
                "spec.devices.config[4]"
            ]
        );
        assert_eq!(
            errors[0].to_string(),
            "spec.devices.config[3]: conflicts with spec.devices.config[1]: both configure request \"a\" with a different GpuConfig; the precedence rule would silently apply spec.devices.config[3] only: remove one entry or merge them"
        );
        assert!(
            errors[1]
                .message
                .contains("[0]: both configure every request")
        );
        assert!(
            errors[2]
                .message
                .contains("[2]: both configure every request")
        );
    }

    #[test]
    fn layering_other_kinds_drivers_copies_and_invalid_entries_are_not_conflicts() {
        let mut mig = entry(None, "Long");
        mig["opaque"]["parameters"] = json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1",
            "kind": "MigDeviceConfig", "sharing": {"strategy": "MPS"}});
        let mut other = entry(None, "Short");
        other["opaque"]["driver"] = json!("gpu.nvidia.com");
        let entries = [
            entry(Some(&["a"]), "Long"),
            entry(Some(&["b"]), "Short"),
            entry(Some(&["a/sub"]), "Medium"),
            entry(None, "Long"),
            mig,
            other,
            entry(None, "Long"),
            entry(None, "Forever"),
            json!({"requests": ["a"]}),
        ];
        assert_eq!(conflict_errors(LIST, &entries, DRIVER), []);
    }

    #[test]
    fn duplicates_in_our_entries_only() {
        let entries = [entry(None, "Long"), {
            let mut e = entry(None, "Long");
            e["opaque"]["driver"] = json!("gpu.nvidia.com");
            e
        }];
        let dup = |path: &str, key: &str| DuplicateKey {
            path: path.into(),
            key: key.into(),
        };
        let found = [
            dup(
                "spec.devices.config[0].opaque.parameters.sharing",
                "strategy",
            ),
            dup("spec.devices.config[1].opaque.parameters", "kind"),
            dup("spec.devices.config[1].opaque", "driver"),
            dup("metadata.labels", "a"),
        ];
        let errors = duplicate_errors(LIST, &entries, DRIVER, &found);
        assert_eq!(
            paths(&errors),
            [
                "spec.devices.config[0].opaque.parameters.sharing.strategy",
                "spec.devices.config[1].opaque.driver"
            ]
        );
        assert!(errors[0].message.starts_with("duplicate key \"strategy\""));
    }
}
