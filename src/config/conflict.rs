//! Two config entries of one source that configure the same request differently.
//!
//! Owns the rule, shared by the plugin (`resolve`, at prepare) and the admission webhook
//! (per object): two of our driver's entries conflict when they come from the same source
//! (one claim, or one DeviceClass), apply to a request at the same precedence level
//! (both to every request, or both naming it), carry the same kind and decode to
//! different configs. The upstream precedence (KEP-4381 as NVIDIA's driver applies it:
//! class, then claim, later wins) gives such a pair a defined winner, but the earlier
//! entry then never takes effect anywhere: nothing can depend on it, and its author
//! almost certainly meant one of the two. Layering keeps its meaning and is not a
//! conflict: a claim entry over a class entry, a request-specific entry over a general
//! one, configs of different kinds (a `GpuConfig` and a `MigDeviceConfig` for a request
//! that may get either device), and identical copies. Pure.

use super::api::Config;

/// One of our driver's validated entries as a candidate for some request.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a, L> {
    /// Index of the entry in its config list.
    pub index: usize,
    /// Its precedence level for the request (e.g. source and specificity); entries only
    /// conflict within one level.
    pub level: L,
    /// The decoded config.
    pub config: &'a Config,
}

/// A pair of conflicting entries: indices into the config list, `earlier < later`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// The entry the precedence rule would silently drop.
    pub earlier: usize,
    /// The entry that would win.
    pub later: usize,
}

/// Every conflicting pair among `candidates` (any order), sorted; an entry that several
/// later ones conflict with is reported once, against the last of them.
pub fn conflicts<L: PartialEq>(candidates: &[Candidate<'_, L>]) -> Vec<Conflict> {
    let mut out: Vec<Conflict> = Vec::new();
    for a in candidates {
        let last = candidates
            .iter()
            .filter(|b| {
                b.index > a.index
                    && b.level == a.level
                    && b.config.kind() == a.config.kind()
                    && b.config != a.config
            })
            .map(|b| b.index)
            .max();
        if let Some(later) = last {
            out.push(Conflict {
                earlier: a.index,
                later,
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate_opaque;
    use serde_json::json;

    fn config(kind: &str, interval: &str) -> Config {
        let sharing =
            json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}});
        let sharing = if kind == "MigDeviceConfig" {
            json!({"strategy": "MPS"})
        } else {
            sharing
        };
        validate_opaque(
            &json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": kind,
            "sharing": sharing}),
        )
        .expect("valid")
    }

    #[test]
    fn same_level_same_kind_different_configs_conflict_once_against_the_last() {
        let (short, long, medium) = (
            config("GpuConfig", "Short"),
            config("GpuConfig", "Long"),
            config("GpuConfig", "Medium"),
        );
        let c = |index, level, config| Candidate {
            index,
            level,
            config,
        };
        let found = conflicts(&[
            c(0, 1, &short),
            c(2, 1, &long),
            c(3, 2, &medium),
            c(5, 1, &medium),
        ]);
        assert_eq!(
            found,
            [
                Conflict {
                    earlier: 0,
                    later: 5
                },
                Conflict {
                    earlier: 2,
                    later: 5
                }
            ]
        );
    }

    #[test]
    fn other_levels_kinds_and_identical_copies_do_not_conflict() {
        let (gpu, same, mig) = (
            config("GpuConfig", "Long"),
            config("GpuConfig", "Long"),
            config("MigDeviceConfig", ""),
        );
        let c = |index, level, config| Candidate {
            index,
            level,
            config,
        };
        assert_eq!(
            conflicts(&[c(0, 1, &gpu), c(1, 1, &same), c(2, 1, &mig)]),
            []
        );
        assert_eq!(
            conflicts(&[c(0, 1, &gpu), c(1, 2, &config("GpuConfig", "Short"))]),
            []
        );
        assert_eq!(conflicts::<u8>(&[]), []);
    }
}
