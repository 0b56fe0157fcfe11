//! The MIG placements of a dynamic MIG GPU and what holds each: the view `gpu-dra
//! inventory` prints for GPUs under `--dynamic-mig`.
//!
//! Owns the classification of every (GPU instance profile, placement) of a GPU whose
//! inventory carries [`crate::inventory::DynamicMig`]: free, held by an existing GPU
//! instance the driver created (its checkpoint records it) or by one it did not
//! (foreign), or overlapping such an instance. Placements overlapping a foreign instance
//! are the ones the plugin does not publish (see `slices::partitionable`); those
//! overlapping the driver's own instances are published, and the scheduler's counters
//! keep them from being allocated while the instance exists. Pure; it must not read NVML
//! or the checkpoint (the caller passes what the checkpoint says in [`KnownInstance`]).
//! Placements are in memory slices, as NVML's `nvmlGpuInstancePlacement_t` gives them.

use serde::Serialize;

use super::model::{Gpu, Placement, mig_device_name};

/// A GPU instance the plugin's checkpoint records as created by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownInstance {
    /// Physical GPU UUID.
    pub gpu_uuid: String,
    /// GPU instance profile id.
    pub gi_profile_id: u32,
    /// Placement start, in memory slices.
    pub start: u32,
    /// The claim holding it (`namespace/name`).
    pub claim: String,
}

/// Who created an existing GPU instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "creator")]
pub enum Creator {
    /// This driver, for the claim `claim` (`namespace/name`; empty when the checkpoint
    /// names none).
    Driver {
        /// The claim holding it.
        claim: String,
    },
    /// Not this driver (made by hand or by another tool): kept, never destroyed.
    Foreign,
}

/// What a placement's memory slices hold now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum PlacementUse {
    /// No GPU instance overlaps it: the plugin offers it and may create it.
    Free,
    /// A GPU instance of this profile sits exactly here.
    InUse {
        /// GPU instance id.
        gi_id: u32,
        /// Who made it.
        #[serde(flatten)]
        creator: Creator,
    },
    /// Another GPU instance covers some of its memory slices.
    Overlaps {
        /// GPU instance id of the overlapping instance.
        gi_id: u32,
        /// Who made that one (foreign: the placement is not published).
        #[serde(flatten)]
        creator: Creator,
    },
}

/// One (profile, placement) of a dynamic MIG GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementRow {
    /// The device name the plugin publishes for it (`gpu-<minor>-mig-<profile>-<id>-<start>`).
    pub device: String,
    /// MIG profile name (`3g.40gb`).
    pub profile: String,
    /// GPU instance profile id.
    pub gi_profile_id: u32,
    /// Memory slices `[start, start + size)`.
    pub placement: Placement,
    /// Memory of the profile, bytes.
    pub memory_bytes: u64,
    /// What holds it.
    #[serde(flatten)]
    pub usage: PlacementUse,
}

/// An existing GPU instance of the GPU, as the inventory's MIG devices show it.
struct Existing {
    gi_id: u32,
    gi_profile_id: u32,
    placement: Placement,
    creator: Creator,
}

/// Every placement of every MIG profile of `gpu` with what holds it, profiles in
/// inventory order and placements by start; `None` when the GPU is not under dynamic MIG.
/// An instance counts as the driver's when `known` records it for this GPU and the
/// inventory does not list it as foreign.
pub fn placement_rows(gpu: &Gpu, known: &[KnownInstance]) -> Option<Vec<PlacementRow>> {
    let dynamic = gpu.dynamic_mig.as_ref()?;
    let mut existing: Vec<Existing> = Vec::new();
    for m in &gpu.mig_devices {
        if existing.iter().any(|e| e.gi_id == m.gi_id) {
            continue; // one GPU instance, several compute instances
        }
        let foreign = dynamic.foreign.iter().any(|f| f.gi_id == m.gi_id);
        let claim = known.iter().find(|k| {
            k.gpu_uuid == gpu.uuid
                && k.gi_profile_id == m.gi_profile_id
                && k.start == m.placement.start
        });
        let creator = match (foreign, claim) {
            (false, Some(k)) => Creator::Driver {
                claim: k.claim.clone(),
            },
            (false, None) => Creator::Driver {
                claim: String::new(),
            },
            (true, _) => Creator::Foreign,
        };
        existing.push(Existing {
            gi_id: m.gi_id,
            gi_profile_id: m.gi_profile_id,
            placement: m.placement,
            creator,
        });
    }
    let mut rows = Vec::new();
    for profile in &gpu.mig_profiles {
        let mut placements = profile.placements.clone();
        placements.sort_by_key(|p| p.start);
        for placement in placements {
            let exact = existing
                .iter()
                .find(|e| e.gi_profile_id == profile.gi_profile_id && e.placement == placement);
            let overlapping = existing.iter().find(|e| e.placement.overlaps(&placement));
            let usage = match (exact, overlapping) {
                (Some(e), _) => PlacementUse::InUse {
                    gi_id: e.gi_id,
                    creator: e.creator.clone(),
                },
                (None, Some(e)) => PlacementUse::Overlaps {
                    gi_id: e.gi_id,
                    creator: e.creator.clone(),
                },
                (None, None) => PlacementUse::Free,
            };
            rows.push(PlacementRow {
                device: mig_device_name(
                    gpu.minor,
                    &profile.name,
                    profile.gi_profile_id,
                    placement.start,
                ),
                profile: profile.name.clone(),
                gi_profile_id: profile.gi_profile_id,
                placement,
                memory_bytes: profile.memory_bytes,
                usage,
            });
        }
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::fixtures::{h100, with_mig};
    use crate::inventory::{DynamicMig, ForeignInstance};

    fn dynamic(mut gpu: Gpu, foreign_starts: &[u32]) -> Gpu {
        let foreign = gpu
            .mig_devices
            .iter()
            .filter(|m| foreign_starts.contains(&m.placement.start))
            .map(|m| ForeignInstance {
                gi_id: m.gi_id,
                gi_profile_id: m.gi_profile_id,
                placement: m.placement,
            })
            .collect();
        gpu.dynamic_mig = Some(DynamicMig { foreign });
        gpu
    }

    fn state_of<'a>(rows: &'a [PlacementRow], device: &str) -> &'a PlacementUse {
        &rows
            .iter()
            .find(|r| r.device == device)
            .unwrap_or_else(|| panic!("{device} missing from {rows:?}"))
            .usage
    }

    #[test]
    fn a_static_gpu_has_no_placement_view() {
        assert_eq!(placement_rows(&h100(0), &[]), None);
        assert_eq!(placement_rows(&with_mig(h100(0), &[(9, 0, 2)]), &[]), None);
    }

    #[test]
    fn an_empty_dynamic_gpu_offers_every_placement() {
        let gpu = dynamic(with_mig(h100(0), &[]), &[]);
        let rows = placement_rows(&gpu, &[]).expect("dynamic");
        let placements: usize = gpu.mig_profiles.iter().map(|p| p.placements.len()).sum();
        assert_eq!(rows.len(), placements);
        assert!(
            rows.iter().all(|r| r.usage == PlacementUse::Free),
            "{rows:?}"
        );
        assert!(rows.iter().any(|r| r.device == "gpu-0-mig-3g40gb-9-4"));
    }

    #[test]
    fn instances_are_the_driver_s_or_foreign_and_block_what_they_cover() {
        // 3g.40gb at 0 (the driver's, for claim ns/a), 1g.10gb at 6 (made by hand).
        let gpu = dynamic(with_mig(h100(1), &[(9, 0, 2), (19, 6, 3)]), &[6]);
        let known = vec![KnownInstance {
            gpu_uuid: gpu.uuid.clone(),
            gi_profile_id: 9,
            start: 0,
            claim: "ns/a".into(),
        }];
        let rows = placement_rows(&gpu, &known).expect("dynamic");
        let driver = Creator::Driver {
            claim: "ns/a".into(),
        };
        assert_eq!(
            state_of(&rows, "gpu-1-mig-3g40gb-9-0"),
            &PlacementUse::InUse {
                gi_id: 2,
                creator: driver.clone()
            }
        );
        assert_eq!(
            state_of(&rows, "gpu-1-mig-1g10gb-19-6"),
            &PlacementUse::InUse {
                gi_id: 3,
                creator: Creator::Foreign
            }
        );
        assert_eq!(
            state_of(&rows, "gpu-1-mig-1g10gb-19-1"),
            &PlacementUse::Overlaps {
                gi_id: 2,
                creator: driver
            }
        );
        assert_eq!(
            state_of(&rows, "gpu-1-mig-3g40gb-9-4"),
            &PlacementUse::Overlaps {
                gi_id: 3,
                creator: Creator::Foreign
            }
        );
        assert_eq!(
            state_of(&rows, "gpu-1-mig-1g10gb-19-5"),
            &PlacementUse::Free
        );
    }
}
