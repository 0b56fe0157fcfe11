//! Config entries that another entry of the same object silently overrides.
//!
//! Owns finding pairs of opaque config entries for our driver that apply to the same
//! requests with the same kind and say different things: under the precedence rule
//! (`config::resolve`: later wins within one source and specificity, as KEP-4381 and
//! NVIDIA's driver apply it) the earlier one can never take effect. That is legal, so the
//! webhook does not deny it, but an author who wrote two configs for one request almost
//! certainly meant one of them: each such pair becomes an admission warning that `kubectl`
//! prints. Pure; it must not judge validity (`validate` does).

use std::collections::BTreeSet;

use serde_json::Value;

/// One entry that a later one overrides: indices into the object's config list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadowed {
    /// Index of the entry that never applies.
    pub earlier: usize,
    /// Index of the entry that wins over it.
    pub later: usize,
}

/// The requests an entry names (empty set = every request) and its parameters' `kind`,
/// for entries whose `opaque.driver` is `driver`; `None` for other entries.
fn scope<'a>(entry: &'a Value, driver: &str) -> Option<(BTreeSet<&'a str>, &'a str, &'a Value)> {
    let opaque = entry.get("opaque")?;
    if opaque.get("driver").and_then(Value::as_str) != Some(driver) {
        return None;
    }
    let params = opaque.get("parameters")?;
    let kind = params.get("kind").and_then(Value::as_str)?;
    let requests = entry
        .get("requests")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Some((requests, kind, params))
}

/// Every pair of `driver`'s entries in `entries` (one object's config list, so one
/// source) with the same requests and kind but different parameters, earlier first.
/// An entry overridden by several later ones is reported once, against the last.
pub fn shadowed(entries: &[Value], driver: &str) -> Vec<Shadowed> {
    let scoped: Vec<_> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| scope(e, driver).map(|s| (i, s)))
        .collect();
    scoped
        .iter()
        .enumerate()
        .filter_map(|(pos, (earlier, (requests, kind, params)))| {
            scoped[pos + 1..]
                .iter()
                .rev()
                .find(|(_, (r, k, p))| r == requests && k == kind && p != params)
                .map(|(later, _)| Shadowed {
                    earlier: *earlier,
                    later: *later,
                })
        })
        .collect()
}

/// The admission warning for `s` in the list at `list_path` (e.g. `spec.devices.config`).
pub fn warning(list_path: &str, s: &Shadowed) -> String {
    format!(
        "{list_path}[{}] never applies: {list_path}[{}] configures the same requests with the same kind and wins (later wins); remove one of them",
        s.earlier, s.later
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    fn entry(requests: Option<&[&str]>, interval: &str) -> Value {
        let mut e = json!({"opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}}}}});
        if let Some(r) = requests {
            e["requests"] = json!(r);
        }
        e
    }

    #[test]
    fn same_requests_different_settings_is_reported_against_the_winner() {
        let entries = [
            entry(None, "Short"),
            entry(Some(&["a"]), "Long"),
            entry(None, "Medium"),
            entry(None, "Long"),
        ];
        assert_eq!(
            shadowed(&entries, DRIVER),
            [
                Shadowed {
                    earlier: 0,
                    later: 3
                },
                Shadowed {
                    earlier: 2,
                    later: 3
                }
            ]
        );
        assert_eq!(
            warning("spec.devices.config", &shadowed(&entries, DRIVER)[0]),
            "spec.devices.config[0] never applies: spec.devices.config[3] configures the same requests with the same kind and wins (later wins); remove one of them"
        );
    }

    #[test]
    fn distinct_requests_kinds_drivers_and_identical_copies_are_fine() {
        let mut mig = entry(None, "Long");
        mig["opaque"]["parameters"]["kind"] = json!("MigDeviceConfig");
        let mut other = entry(None, "Short");
        other["opaque"]["driver"] = json!("gpu.nvidia.com");
        let entries = [
            entry(Some(&["a"]), "Long"),
            entry(Some(&["b"]), "Short"),
            entry(Some(&["a", "b"]), "Medium"),
            entry(None, "Long"),
            mig,
            other,
            entry(None, "Long"),
            json!({"requests": ["a"]}),
        ];
        assert_eq!(shadowed(&entries, DRIVER), []);
        // Order of names within `requests` does not matter.
        let entries = [
            entry(Some(&["a", "b"]), "Long"),
            entry(Some(&["b", "a"]), "Short"),
        ];
        assert_eq!(
            shadowed(&entries, DRIVER),
            [Shadowed {
                earlier: 0,
                later: 1
            }]
        );
    }
}
