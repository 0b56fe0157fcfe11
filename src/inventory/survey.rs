//! What may be published from one discovery pass: never more than is known to be true.
//!
//! Owns the rule that discovery never widens what is published on a transient error. A
//! GPU whose MIG shape could not be read ([`Unresolved`]), or whose reading contradicts
//! what is known (a MIG device in use per the checkpoint is missing, or a GPU that was
//! MIG-capable reads as not), keeps its last known shape; without one (at start) it is
//! withheld: not published, not preparable, absent from the health list, until a later
//! pass reads it cleanly. A MIG GPU is so never published as a full GPU while its MIG
//! devices are in use, and an in-use MIG device is never silently dropped. Pure: the
//! NVML reading comes in as a [`Survey`], the checkpoint's facts as [`InUse`]; it must
//! not call NVML, read files or log.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{Gpu, Inventory};
use super::nvml::DiscoverError;

/// One discovery pass: the GPUs read completely, and those whose MIG shape is unknown.
#[derive(Debug)]
pub struct Survey {
    /// Every GPU read completely (the driver versions are always set).
    pub inventory: Inventory,
    /// GPUs whose MIG queries failed, in NVML index order.
    pub unresolved: Vec<Unresolved>,
}

/// A GPU whose MIG shape could not be read.
#[derive(Debug)]
pub struct Unresolved {
    /// NVML index.
    pub index: u32,
    /// Device minor number (`gpu-<minor>`).
    pub minor: u32,
    /// GPU UUID.
    pub uuid: String,
    /// The failed query.
    pub error: DiscoverError,
}

/// What the checkpoint says is in use: MIG device UUIDs by parent GPU UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InUse {
    mig: BTreeMap<String, BTreeSet<String>>,
}

impl InUse {
    /// From `(gpu_uuid, mig_uuid)` pairs of prepared devices (`mig_uuid` `None` for a full
    /// GPU, which says nothing about MIG and is skipped).
    pub fn from_devices<'a>(devices: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let mut mig: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (gpu, mig_uuid) in devices {
            if let Some(m) = mig_uuid {
                mig.entry(gpu.to_owned()).or_default().insert(m.to_owned());
            }
        }
        InUse { mig }
    }

    /// MIG device UUIDs in use on GPU `gpu_uuid`.
    pub fn mig_devices(&self, gpu_uuid: &str) -> impl Iterator<Item = &str> {
        self.mig
            .get(gpu_uuid)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }
}

/// A GPU not read as it is, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    /// GPU UUID.
    pub uuid: String,
    /// Device minor number (`gpu-<minor>`).
    pub minor: u32,
    /// The failed query or the contradiction, as one line.
    pub reason: String,
}

/// The GPUs a pass could not publish as read, sorted by minor number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holdback {
    /// GPUs left out of the inventory (nothing known about their shape).
    pub withheld: Vec<Unsettled>,
    /// GPUs published in their last known shape instead of the reading.
    pub kept: Vec<Unsettled>,
}

impl Holdback {
    /// True when every GPU was read as it is (nothing to retry).
    pub fn is_empty(&self) -> bool {
        self.withheld.is_empty() && self.kept.is_empty()
    }
}

/// What [`resolve`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    /// The inventory to publish.
    pub inventory: Inventory,
    /// The GPUs not published as read.
    pub holdback: Holdback,
}

impl Resolved {
    /// True when every GPU was read as it is (nothing to retry).
    pub fn is_settled(&self) -> bool {
        self.holdback.is_empty()
    }
}

/// The inventory to publish from `survey`, given the `last` inventory published (`None` at
/// start) and what is `in_use`. See the module docs for the rule.
pub fn resolve(last: Option<&Inventory>, survey: Survey, in_use: &InUse) -> Resolved {
    let mut out = Resolved {
        inventory: Inventory {
            gpus: Vec::new(),
            ..survey.inventory.clone()
        },
        ..Resolved::default()
    };
    let previous = |uuid: &str| last.and_then(|l| l.gpu_by_uuid(uuid));
    let mut unsettled: Vec<Unsettled> = survey
        .unresolved
        .into_iter()
        .map(|u| Unsettled {
            uuid: u.uuid,
            minor: u.minor,
            reason: crate::prepare::error_chain(&u.error),
        })
        .collect();
    for gpu in survey.inventory.gpus {
        match contradiction(&gpu, previous(&gpu.uuid), in_use) {
            Some(reason) => unsettled.push(Unsettled {
                uuid: gpu.uuid,
                minor: gpu.minor,
                reason,
            }),
            None => out.inventory.gpus.push(gpu),
        }
    }
    for u in unsettled {
        match previous(&u.uuid) {
            Some(prev) => {
                out.inventory.gpus.push(prev.clone());
                out.holdback.kept.push(u);
            }
            None => out.holdback.withheld.push(u),
        }
    }
    out.inventory.gpus.sort_by_key(|g| g.index);
    out.holdback.withheld.sort_by_key(|u| u.minor);
    out.holdback.kept.sort_by_key(|u| u.minor);
    out
}

/// Why a complete reading of `gpu` cannot be true, if it cannot.
fn contradiction(gpu: &Gpu, previous: Option<&Gpu>, in_use: &InUse) -> Option<String> {
    if previous.is_some_and(|p| p.mig.capable) && !gpu.mig.capable {
        // MIG capability is a property of the GPU model; it does not go away.
        return Some(
            "the MIG-capable GPU reads as without MIG (nvmlDeviceGetMigMode NOT_SUPPORTED)".into(),
        );
    }
    let missing: Vec<&str> = in_use
        .mig_devices(&gpu.uuid)
        .filter(|m| !gpu.mig_devices.iter().any(|d| d.uuid == *m))
        .collect();
    if missing.is_empty() {
        None
    } else if !gpu.mig.enabled {
        Some(format!(
            "MIG device(s) {} in use by prepared claims, but the GPU reads as not in MIG mode (nvmlDeviceGetMigMode)",
            missing.join(", ")
        ))
    } else {
        Some(format!(
            "MIG device(s) {} in use by prepared claims are missing from the reading (nvmlDeviceGetMigDeviceHandleByIndex)",
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::MigState;
    use crate::inventory::fixtures::dgx_h100;
    use nvml_wrapper::error::NvmlError;

    fn survey(inventory: Inventory) -> Survey {
        Survey {
            inventory,
            unresolved: Vec::new(),
        }
    }

    /// The dgx_h100 fixture with its first MIG GPU as a failed MIG query leaves it.
    fn mig_gpu_read_whole(inv: &Inventory) -> (Inventory, Gpu) {
        let mut next = inv.clone();
        let gpu = next
            .gpus
            .iter_mut()
            .find(|g| g.mig.enabled)
            .expect("a MIG GPU");
        let original = gpu.clone();
        gpu.mig = MigState::default();
        gpu.mig_profiles.clear();
        gpu.mig_devices.clear();
        (next, original)
    }

    fn in_use_of(gpu: &Gpu) -> InUse {
        InUse::from_devices([(gpu.uuid.as_str(), Some(gpu.mig_devices[0].uuid.as_str()))])
    }

    #[test]
    fn a_mig_gpu_in_use_read_whole_at_start_is_withheld() {
        let inv = dgx_h100();
        let (next, mig) = mig_gpu_read_whole(&inv);
        let r = resolve(None, survey(next), &in_use_of(&mig));
        assert!(
            r.inventory.gpu_by_uuid(&mig.uuid).is_none(),
            "not published"
        );
        assert_eq!(r.holdback.withheld.len(), 1);
        assert_eq!(r.holdback.withheld[0].uuid, mig.uuid);
        assert!(
            r.holdback.withheld[0].reason.contains("not in MIG mode"),
            "{:?}",
            r.holdback.withheld
        );
        assert_eq!(
            r.inventory.gpus.len(),
            inv.gpus.len() - 1,
            "others published"
        );
        assert!(r.holdback.kept.is_empty());
    }

    #[test]
    fn a_missing_mig_device_in_use_withholds_its_gpu_at_start() {
        let inv = dgx_h100();
        let mut next = inv.clone();
        let gpu = next
            .gpus
            .iter_mut()
            .find(|g| g.mig.enabled)
            .expect("MIG GPU");
        let in_use = in_use_of(gpu);
        let uuid = gpu.uuid.clone();
        gpu.mig_devices.remove(0);
        let r = resolve(None, survey(next), &in_use);
        assert!(r.inventory.gpu_by_uuid(&uuid).is_none());
        assert!(
            r.holdback.withheld[0]
                .reason
                .contains("nvmlDeviceGetMigDeviceHandleByIndex"),
            "{:?}",
            r.holdback.withheld
        );
    }

    #[test]
    fn an_idle_mig_device_may_go_away() {
        let inv = dgx_h100();
        let mut next = inv.clone();
        let gpu = next
            .gpus
            .iter_mut()
            .find(|g| g.mig.enabled)
            .expect("MIG GPU");
        gpu.mig_devices.remove(0);
        let r = resolve(Some(&inv), survey(next.clone()), &InUse::default());
        assert!(r.is_settled());
        assert_eq!(r.inventory, next);
    }

    #[test]
    fn at_refresh_an_unsettled_gpu_keeps_its_last_shape() {
        let last = dgx_h100();
        let (next, mig) = mig_gpu_read_whole(&last);
        let r = resolve(Some(&last), survey(next), &InUse::default());
        assert_eq!(r.inventory, last, "never republished whole");
        assert_eq!(r.holdback.kept.len(), 1);
        assert_eq!(r.holdback.kept[0].uuid, mig.uuid);
        assert!(r.holdback.withheld.is_empty());
    }

    #[test]
    fn a_failed_query_withholds_at_start_and_keeps_the_shape_later() {
        let last = dgx_h100();
        let mut next = last.clone();
        let gpu = next.gpus.remove(1);
        let unresolved = || Unresolved {
            index: gpu.index,
            minor: gpu.minor,
            uuid: gpu.uuid.clone(),
            error: DiscoverError::Gpu {
                function: "nvmlDeviceGetMigMode",
                gpu: gpu.uuid.clone(),
                source: NvmlError::Unknown,
            },
        };
        let start = resolve(
            None,
            Survey {
                inventory: next.clone(),
                unresolved: vec![unresolved()],
            },
            &InUse::default(),
        );
        assert_eq!(start.inventory, next);
        assert_eq!(start.holdback.withheld[0].minor, gpu.minor);
        assert!(
            start.holdback.withheld[0]
                .reason
                .contains("nvmlDeviceGetMigMode"),
            "{}",
            start.holdback.withheld[0].reason
        );
        let later = resolve(
            Some(&last),
            Survey {
                inventory: next,
                unresolved: vec![unresolved()],
            },
            &InUse::default(),
        );
        assert_eq!(later.inventory, last, "last shape, in index order");
        assert_eq!(later.holdback.kept.len(), 1);
    }

    #[test]
    fn a_clean_reading_is_published_as_read() {
        let inv = dgx_h100();
        let mig = inv.gpus.iter().find(|g| g.mig.enabled).expect("MIG GPU");
        let r = resolve(None, survey(inv.clone()), &in_use_of(mig));
        assert!(r.is_settled());
        assert_eq!(r.inventory, inv);
    }

    #[test]
    fn a_full_gpu_claim_says_nothing_about_mig() {
        let inv = dgx_h100();
        let whole = inv.gpus.iter().find(|g| !g.mig.enabled).expect("full GPU");
        let in_use = InUse::from_devices([(whole.uuid.as_str(), None)]);
        assert_eq!(in_use, InUse::default());
        assert!(resolve(None, survey(inv.clone()), &in_use).is_settled());
    }
}
