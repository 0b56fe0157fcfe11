//! Pure decisions of the slice reconciler: what to apply and delete, and whether what the
//! API server stored is what we sent.
//!
//! [`plan`] (desired + existing + what we last published -> generation, applies,
//! deletes), [`contains`] (does the stored object hold what we want, ignoring server
//! defaults and quantity spellings) and [`dropped_fields`] (which fields the API server
//! silently dropped, e.g. behind a disabled feature gate). No I/O.
//!
//! Pool generation rule (KEP-4381): bumped when the pool content changes (or when we
//! cannot prove the stored pool is what we want at start); a slice that is merely missing
//! or edited is re-applied at the current generation.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::resource::v1::ResourceSlice;
use serde_json::Value;

use crate::config::quantity::parse_quantity;

/// What we last decided to publish: the generation and the slices (generation zeroed).
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Pool generation the slices were written with.
    pub generation: i64,
    /// Desired slices with `spec.pool.generation` set to 0, for content comparison.
    pub content: Vec<ResourceSlice>,
}

/// A stale slice to delete, with its UID as a delete precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// Slice name.
    pub name: String,
    /// Slice UID (precondition, so a re-created object with the same name survives).
    pub uid: Option<String>,
}

/// The actions that bring the API server to the desired state.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Pool generation all desired slices carry.
    pub generation: i64,
    /// Slices to server-side apply (missing or different), generation set.
    pub apply: Vec<ResourceSlice>,
    /// Slices of this driver and node that are not desired.
    pub delete: Vec<Stale>,
}

impl Plan {
    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.delete.is_empty()
    }
}

/// Computes the plan (pure).
///
/// * `desired`: output of `desired_slices` (its generation is ignored).
/// * `existing`: this driver's slices for this node as the API server has them.
/// * `last`: what this process last published, `None` after a start.
/// * `ignored`: normalised field paths the API server drops (see [`dropped_fields`]).
///
/// Generation: unchanged content keeps `last.generation`; changed content takes
/// `max(last, existing) + 1`; after a start, an existing pool that already matches is
/// adopted at its generation, anything else is re-published at `max(existing) + 1`.
pub fn plan(
    desired: &[ResourceSlice],
    existing: &[ResourceSlice],
    last: Option<&Published>,
    ignored: &BTreeSet<String>,
) -> Plan {
    let content: Vec<ResourceSlice> = desired.iter().map(|s| with_generation(s, 0)).collect();
    let max_existing = existing
        .iter()
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);
    let by_name: BTreeMap<&str, &ResourceSlice> = existing
        .iter()
        .filter_map(|s| s.metadata.name.as_deref().map(|n| (n, s)))
        .collect();
    let desired_names: BTreeSet<&str> = desired
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    let delete: Vec<Stale> = existing
        .iter()
        .filter(|s| {
            s.metadata
                .name
                .as_deref()
                .is_none_or(|n| !desired_names.contains(n))
        })
        .map(|s| Stale {
            name: s.metadata.name.clone().unwrap_or_default(),
            uid: s.metadata.uid.clone(),
        })
        .collect();
    let all_match_at = |generation: i64| {
        delete.is_empty()
            && desired.iter().all(|d| {
                let want = with_generation(d, generation);
                lookup(&by_name, d).is_some_and(|have| slice_matches(&want, have, ignored))
            })
    };
    let generation = match last {
        Some(p) if p.content == content => p.generation,
        Some(p) => p.generation.max(max_existing) + 1,
        None if max_existing > 0 && all_match_at(max_existing) => max_existing,
        None => max_existing + 1,
    };
    let apply = desired
        .iter()
        .map(|d| with_generation(d, generation))
        .filter(|want| {
            lookup(&by_name, want).is_none_or(|have| !slice_matches(want, have, ignored))
        })
        .collect();
    Plan {
        generation,
        apply,
        delete,
    }
}

fn lookup<'a>(
    by_name: &BTreeMap<&str, &'a ResourceSlice>,
    s: &ResourceSlice,
) -> Option<&'a ResourceSlice> {
    s.metadata
        .name
        .as_deref()
        .and_then(|n| by_name.get(n).copied())
}

/// `s` with its pool generation set to `generation` (content comparisons use 0).
pub fn with_generation(s: &ResourceSlice, generation: i64) -> ResourceSlice {
    let mut s = s.clone();
    s.spec.pool.generation = generation;
    s
}

/// True when `have` (stored) holds everything `want` sets in spec and owner references.
pub fn slice_matches(
    want: &ResourceSlice,
    have: &ResourceSlice,
    ignored: &BTreeSet<String>,
) -> bool {
    let (Ok(w_spec), Ok(h_spec)) = (
        serde_json::to_value(&want.spec),
        serde_json::to_value(&have.spec),
    ) else {
        return false;
    };
    let (Ok(w_owners), Ok(h_owners)) = (
        serde_json::to_value(&want.metadata.owner_references),
        serde_json::to_value(&have.metadata.owner_references),
    ) else {
        return false;
    };
    contains(&w_spec, &h_spec, "spec", ignored)
        && contains(&w_owners, &h_owners, "metadata.ownerReferences", ignored)
}

/// Does `have` contain `want`? Objects: every key of `want` must be in `have` with a
/// contained value (extra keys in `have` are server defaults and ignored); a key missing
/// from `have` is fine when its `want` value is empty (`[]`, `{}`, null: the server omits
/// those) or its path is in `ignored`. Arrays: same length, element-wise. Strings that are
/// both Kubernetes quantities compare by value (`1Ki` == `1024`). Paths are normalised:
/// `spec.devices[*].taints`.
pub fn contains(want: &Value, have: &Value, path: &str, ignored: &BTreeSet<String>) -> bool {
    if ignored.contains(path) {
        return true;
    }
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, wv)| {
            let p = format!("{path}.{k}");
            match h.get(k) {
                Some(hv) => contains(wv, hv, &p, ignored),
                None => is_empty(wv) || ignored.contains(&p),
            }
        }),
        (Value::Array(w), Value::Array(h)) => {
            let p = format!("{path}[*]");
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| contains(a, b, &p, ignored))
        }
        (Value::String(a), Value::String(b)) => a == b || quantities_equal(a, b),
        (w, Value::Null) => is_empty(w),
        (a, b) => a == b,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Field paths present in `sent` but absent from `stored` (normalised, e.g.
/// `spec.devices[*].taints`): what the API server dropped.
pub fn dropped_fields(sent: &Value, stored: &Value, path: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    collect_dropped(sent, stored, path, &mut out);
    out
}

fn collect_dropped(sent: &Value, stored: &Value, path: &str, out: &mut BTreeSet<String>) {
    match (sent, stored) {
        (Value::Object(s), Value::Object(h)) => {
            for (k, sv) in s {
                let p = format!("{path}.{k}");
                match h.get(k) {
                    Some(hv) => collect_dropped(sv, hv, &p, out),
                    None if !is_empty(sv) => {
                        out.insert(p);
                    }
                    None => {}
                }
            }
        }
        (Value::Array(s), Value::Array(h)) => {
            let p = format!("{path}[*]");
            for (a, b) in s.iter().zip(h) {
                collect_dropped(a, b, &p, out);
            }
        }
        (s, Value::Null) if !is_empty(s) => {
            out.insert(path.to_string());
        }
        _ => {}
    }
}

/// Parses a Kubernetes quantity without a fraction (`1024`, `10Gi`, `5k`) to its value.
fn quantities_equal(a: &str, b: &str) -> bool {
    matches!((parse_quantity(a), parse_quantity(b)), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;
    use crate::inventory::fixtures::dgx_h100;
    use crate::slices::desired::{SliceFeatures, desired_slices};
    use serde_json::json;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    fn desired(inv: &Inventory) -> Vec<ResourceSlice> {
        desired_slices(inv, DRIVER, "node-a", "uid-1", 0, &SliceFeatures::default())
    }

    /// What the API server would store after applying `s`: uid, resourceVersion, and an
    /// empty device list omitted.
    fn stored(s: &ResourceSlice) -> ResourceSlice {
        let mut s = s.clone();
        s.metadata.uid = Some(format!(
            "uid-{}",
            s.metadata.name.clone().unwrap_or_default()
        ));
        s.metadata.resource_version = Some("1".into());
        s
    }

    fn apply_all(plan: &Plan, existing: &mut Vec<ResourceSlice>) {
        for a in &plan.apply {
            existing.retain(|e| e.metadata.name != a.metadata.name);
            existing.push(stored(a));
        }
        existing.retain(|e| {
            !plan
                .delete
                .iter()
                .any(|d| Some(&d.name) == e.metadata.name.as_ref())
        });
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn fresh_node_publishes_generation_one() {
        let d = desired(&dgx_h100());
        let p = plan(&d, &[], None, &none());
        assert_eq!(p.generation, 1);
        assert_eq!(p.apply.len(), 1);
        assert_eq!(p.apply[0].spec.pool.generation, 1);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn converged_state_is_a_no_op() {
        let d = desired(&dgx_h100());
        let p1 = plan(&d, &[], None, &none());
        let mut existing = Vec::new();
        apply_all(&p1, &mut existing);
        let last = Published {
            generation: p1.generation,
            content: d.clone(),
        };
        let p2 = plan(&d, &existing, Some(&last), &none());
        assert!(p2.is_empty(), "{p2:?}");
        assert_eq!(p2.generation, 1);
    }

    #[test]
    fn restart_adopts_matching_pool_without_bump() {
        let d = desired(&dgx_h100());
        let mut existing = Vec::new();
        apply_all(&plan(&d, &[], None, &none()), &mut existing);
        existing[0].spec.pool.generation = 5;
        let p = plan(&d, &existing, None, &none());
        assert_eq!(p.generation, 5);
        assert!(p.is_empty());
    }

    #[test]
    fn restart_with_different_pool_bumps() {
        let mut inv = dgx_h100();
        let mut existing = Vec::new();
        apply_all(&plan(&desired(&inv), &[], None, &none()), &mut existing);
        existing[0].spec.pool.generation = 5;
        inv.gpus.pop();
        let p = plan(&desired(&inv), &existing, None, &none());
        assert_eq!(p.generation, 6);
        assert_eq!(p.apply.len(), 1);
    }

    #[test]
    fn deleted_slice_is_reapplied_at_same_generation() {
        let d = desired(&dgx_h100());
        let p1 = plan(&d, &[], None, &none());
        let last = Published {
            generation: p1.generation,
            content: d.clone(),
        };
        // The kubelet deleted everything.
        let p2 = plan(&d, &[], Some(&last), &none());
        assert_eq!(p2.generation, 1);
        assert_eq!(p2.apply.len(), 1);
    }

    #[test]
    fn edited_slice_is_repaired_at_same_generation() {
        let d = desired(&dgx_h100());
        let p1 = plan(&d, &[], None, &none());
        let mut existing = Vec::new();
        apply_all(&p1, &mut existing);
        existing[0].spec.devices.as_mut().expect("devices").pop();
        let last = Published {
            generation: 1,
            content: d.clone(),
        };
        let p2 = plan(&d, &existing, Some(&last), &none());
        assert_eq!(p2.generation, 1);
        assert_eq!(p2.apply.len(), 1);
    }

    #[test]
    fn inventory_change_bumps_and_deletes_extra_slices() {
        let big = Inventory {
            driver_version: "550.54.15".into(),
            cuda_driver_version: "12.4".into(),
            gpus: (0..200).map(crate::inventory::fixtures::h100).collect(),
        };
        let d_big = desired(&big);
        assert_eq!(d_big.len(), 2);
        let p1 = plan(&d_big, &[], None, &none());
        let mut existing = Vec::new();
        apply_all(&p1, &mut existing);
        let last = Published {
            generation: p1.generation,
            content: d_big.clone(),
        };
        let d_small = desired(&dgx_h100());
        let p2 = plan(&d_small, &existing, Some(&last), &none());
        assert_eq!(p2.generation, 2);
        assert_eq!(p2.apply.len(), 1);
        assert_eq!(p2.apply[0].spec.pool.resource_slice_count, 1);
        assert_eq!(
            p2.delete,
            [Stale {
                name: "node-a-gpu-gpu-dra-dev-01".into(),
                uid: Some("uid-node-a-gpu-gpu-dra-dev-01".into())
            }]
        );
    }

    #[test]
    fn foreign_named_slice_of_ours_is_deleted() {
        let d = desired(&dgx_h100());
        let mut existing = Vec::new();
        let p1 = plan(&d, &[], None, &none());
        apply_all(&p1, &mut existing);
        let mut old = existing[0].clone();
        old.metadata.name = Some("node-a-gpu.gpu-dra.dev-x7k2p".into());
        existing.push(old);
        let last = Published {
            generation: 1,
            content: d.clone(),
        };
        let p = plan(&d, &existing, Some(&last), &none());
        assert_eq!(p.delete.len(), 1);
        assert_eq!(p.delete[0].name, "node-a-gpu.gpu-dra.dev-x7k2p");
    }

    #[test]
    fn dropped_field_is_detected_and_then_ignored() {
        let mut inv = dgx_h100();
        inv.gpus[0].mig.pending = true; // taints gpu-0
        let d = desired(&inv);
        let p1 = plan(&d, &[], None, &none());
        // The API server (gate off) stores it without taints.
        let mut got = stored(&p1.apply[0]);
        for dev in got.spec.devices.iter_mut().flatten() {
            dev.taints = None;
        }
        let sent = serde_json::to_value(&p1.apply[0].spec).expect("json");
        let have = serde_json::to_value(&got.spec).expect("json");
        let dropped = dropped_fields(&sent, &have, "spec");
        assert_eq!(
            dropped,
            BTreeSet::from(["spec.devices[*].taints".to_string()])
        );
        // Without the ignore set this would be re-applied forever...
        let last = Published {
            generation: 1,
            content: d.clone(),
        };
        assert!(!plan(&d, std::slice::from_ref(&got), Some(&last), &none()).is_empty());
        // ...with it, nothing to do.
        assert!(plan(&d, std::slice::from_ref(&got), Some(&last), &dropped).is_empty());
    }

    #[test]
    fn contains_tolerates_server_defaults_and_quantity_forms() {
        let want = json!({"a": {"value": "1024", "list": []}, "b": [1, 2]});
        let have = json!({"a": {"value": "1Ki", "extra": true}, "b": [1, 2], "c": 3});
        assert!(contains(&want, &have, "x", &none()));
        let have_short = json!({"a": {"value": "1024"}, "b": [1]});
        assert!(!contains(&want, &have_short, "x", &none()));
        let have_other = json!({"a": {"value": "1000"}, "b": [1, 2]});
        assert!(!contains(&want, &have_other, "x", &none()));
    }

    #[test]
    fn quantities() {
        assert!(quantities_equal("10Gi", "10737418240"));
        assert!(quantities_equal("5k", "5000"));
        assert!(!quantities_equal("1Gi", "1G"));
        assert!(quantities_equal("85520809984", "85520809984"));
        assert!(!quantities_equal("gpu", "gpu"));
    }
}
