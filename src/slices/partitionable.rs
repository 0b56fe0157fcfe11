//! Dynamic MIG as partitionable devices (KEP-4815): the counter set of a GPU and one
//! device per (MIG profile, placement) consuming from it (pure).
//!
//! Owns the names and counters NVIDIA's reference driver publishes (design/COMPAT.md):
//! counter set `gpu-<minor>-counter-set` with `multiprocessors`, `copy-engines`,
//! `decoders`, `encoders`, `jpeg-engines`, `ofa-engines`, `memory` (each the largest value
//! of any profile of the GPU, i.e. the full-size profile's) and `memory-slice-<i>` = 1 per
//! memory slice. A MIG device consumes its profile's figures plus the memory slices
//! `[start, start+size)`, so two allocations can never overlap in memory slices and the
//! scheduler cannot oversubscribe engines. On GPUs that leave MIG mode without a reset
//! (Hopper and newer, compute capability 9.0+; NVIDIA's driver decides the same way) the
//! full GPU `gpu-<minor>` is published too, consuming every counter of the set, so it never
//! fits together with any placement; preparing it switches MIG mode off
//! ([`crate::prepare::mig_full`]). Ampere needs a reset to leave MIG mode: MIG devices only.
//! Placements overlapping a GPU instance the driver does not own
//! ([`crate::inventory::DynamicMig::foreign`]) are not published, and neither is the full
//! GPU then.
//!
//! API limits (k8s.io/api v0.37 `resource/v1`, same in 1.36): <= 64 devices per slice when
//! any consumes counters, <= 8 counter sets per slice, <= 32 counters per set and per
//! consumption, <= 2 consumptions per device, and a slice carries either devices or
//! `sharedCounters`. An H100 needs 15 counters (the full GPU consumes all 15) and has 25
//! placements plus the full GPU: 26 devices, 208 for a DGX H100 (4 device slices).
//! It must not do I/O and does not decide which GPUs are dynamic (the inventory says).

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    Counter, CounterSet, Device, DeviceCapacity, DeviceCounterConsumption, DeviceTaint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::inventory::model::mig_device_name;
use crate::inventory::{Gpu, Inventory, MigProfile, Placement};

/// Most counter sets one slice may carry (`ResourceSliceMaxCounterSets`).
pub const MAX_COUNTER_SETS_PER_SLICE: usize = 8;
/// Most counters in one set or one consumption (`ResourceSliceMaxCountersPerCounterSet`).
pub const MAX_COUNTERS_PER_SET: usize = 32;

/// A MIG placement of a dynamic GPU, resolved from a published device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicTarget<'a> {
    /// The physical GPU.
    pub gpu: &'a Gpu,
    /// The GPU instance profile.
    pub profile: &'a MigProfile,
    /// Where the GPU instance goes, in memory slices.
    pub placement: Placement,
}

impl DynamicTarget<'_> {
    /// The published device name (`gpu-<minor>-mig-<profile>-<id>-<start>`).
    pub fn device_name(&self) -> String {
        mig_device_name(
            self.gpu.minor,
            &self.profile.name,
            self.profile.gi_profile_id,
            self.placement.start,
        )
    }
}

/// Name of the counter set of GPU `minor`: `gpu-<minor>-counter-set`.
pub fn counter_set_name(minor: u32) -> String {
    format!("gpu-{minor}-counter-set")
}

/// Name of the counter of memory slice `index`: `memory-slice-<index>`.
pub fn memory_slice_counter(index: u32) -> String {
    format!("memory-slice-{index}")
}

/// Number of memory slices of `gpu`: the end of its furthest placement (8 on A100/H100).
pub fn memory_slice_count(gpu: &Gpu) -> u32 {
    gpu.mig_profiles
        .iter()
        .flat_map(|p| &p.placements)
        .map(|p| p.start + p.size)
        .max()
        .unwrap_or(0)
}

/// True when the inventory marks `gpu` as dynamically managed and it has MIG profiles.
/// The mark stays while MIG mode is off because the driver prepared the full GPU for a
/// claim ([`crate::prepare::mig_select::annotate_with`] drops it for a GPU out of MIG mode
/// for any other reason).
pub fn is_dynamic(gpu: &Gpu) -> bool {
    gpu.dynamic_mig.is_some() && gpu.mig.capable && !gpu.mig_profiles.is_empty()
}

/// True when `gpu` leaves MIG mode without a GPU reset: Hopper and newer (compute
/// capability 9.0+). MIG user guide: on A100/A30 a MIG mode change needs a GPU reset.
pub fn toggles_mig_without_reset(gpu: &Gpu) -> bool {
    gpu.cuda_compute_capability.major >= 9
}

/// True when the full GPU of dynamic `gpu` is published: it toggles MIG mode without a
/// reset and holds no GPU instance the driver does not own.
pub fn offers_full_gpu(gpu: &Gpu) -> bool {
    is_dynamic(gpu)
        && toggles_mig_without_reset(gpu)
        && gpu
            .dynamic_mig
            .as_ref()
            .is_some_and(|d| d.foreign.is_empty())
}

/// The (profile, placement) pairs of `gpu` that may be published: every placement of every
/// profile except those overlapping a foreign GPU instance. Profile order, then start.
pub fn offered_placements(gpu: &Gpu) -> Vec<(&MigProfile, Placement)> {
    let foreign: Vec<Placement> = gpu
        .dynamic_mig
        .iter()
        .flat_map(|d| d.foreign.iter().map(|f| f.placement))
        .collect();
    gpu.mig_profiles
        .iter()
        .flat_map(|profile| profile.placements.iter().map(move |p| (profile, *p)))
        .filter(|(_, p)| !foreign.iter().any(|f| f.overlaps(p)))
        .collect()
}

/// Resolves a published dynamic MIG device name on a dynamic GPU of `inv`; `None` when
/// `name` is no offered placement of a dynamic GPU.
pub fn resolve<'a>(inv: &'a Inventory, name: &str) -> Option<DynamicTarget<'a>> {
    inv.gpus.iter().filter(|g| is_dynamic(g)).find_map(|gpu| {
        offered_placements(gpu)
            .into_iter()
            .map(|(profile, placement)| DynamicTarget {
                gpu,
                profile,
                placement,
            })
            .find(|t| t.device_name() == name)
    })
}

/// The capacities of a profile as counters (counter names are DNS labels).
fn profile_counters(profile: &MigProfile) -> BTreeMap<String, Counter> {
    [
        ("multiprocessors", u64::from(profile.multiprocessors)),
        ("copy-engines", u64::from(profile.copy_engines)),
        ("decoders", u64::from(profile.decoders)),
        ("encoders", u64::from(profile.encoders)),
        ("jpeg-engines", u64::from(profile.jpeg_engines)),
        ("ofa-engines", u64::from(profile.ofa_engines)),
        ("memory", profile.memory_bytes),
    ]
    .into_iter()
    .map(|(name, v)| (name.to_string(), counter(v)))
    .collect()
}

fn counter(v: u64) -> Counter {
    Counter {
        value: Quantity(v.to_string()),
    }
}

fn quantity_value(q: &Quantity) -> u64 {
    q.0.parse().unwrap_or(0)
}

/// Everything a GPU offers: per engine counter the largest figure of any profile, plus one
/// counter per memory slice.
fn full_counters(gpu: &Gpu) -> BTreeMap<String, Counter> {
    let mut out: BTreeMap<String, Counter> = BTreeMap::new();
    for profile in &gpu.mig_profiles {
        for (name, c) in profile_counters(profile) {
            let bigger = out
                .get(&name)
                .is_none_or(|old| quantity_value(&c.value) > quantity_value(&old.value));
            if bigger {
                out.insert(name, c);
            }
        }
    }
    for i in 0..memory_slice_count(gpu) {
        out.insert(memory_slice_counter(i), counter(1));
    }
    out
}

/// The counter set of a dynamic GPU.
pub fn counter_set(gpu: &Gpu) -> CounterSet {
    CounterSet {
        name: counter_set_name(gpu.minor),
        counters: full_counters(gpu),
    }
}

/// The counter sets of every dynamic GPU of `inv`, by GPU minor.
pub fn counter_sets(inv: &Inventory) -> Vec<CounterSet> {
    let mut gpus: Vec<&Gpu> = inv.gpus.iter().filter(|g| is_dynamic(g)).collect();
    gpus.sort_by_key(|g| g.minor);
    gpus.into_iter().map(counter_set).collect()
}

/// What one placement consumes: its profile's counters and its memory slices.
pub fn placement_consumption(
    gpu: &Gpu,
    profile: &MigProfile,
    at: Placement,
) -> DeviceCounterConsumption {
    let mut counters = profile_counters(profile);
    for i in at.start..at.start + at.size {
        counters.insert(memory_slice_counter(i), counter(1));
    }
    DeviceCounterConsumption {
        counter_set: counter_set_name(gpu.minor),
        counters,
        ..Default::default()
    }
}

/// What the full GPU consumes: every counter of its set.
pub fn full_gpu_consumption(gpu: &Gpu) -> DeviceCounterConsumption {
    DeviceCounterConsumption {
        counter_set: counter_set_name(gpu.minor),
        counters: full_counters(gpu),
        ..Default::default()
    }
}

/// The devices of a dynamic GPU: the full GPU when offered ([`offers_full_gpu`]), then
/// every offered placement, in profile order.
///
/// `full` and `mig` build the device bodies (attributes, capacities) as the static path
/// does; this sets the MIG names, `consumesCounters` and `taints`.
pub fn devices(
    gpu: &Gpu,
    taints: Option<Vec<DeviceTaint>>,
    full: impl Fn(&Gpu) -> Device,
    mig: impl Fn(&Gpu, &MigProfile) -> Device,
) -> Vec<Device> {
    let whole = offers_full_gpu(gpu).then(|| {
        let mut d = full(gpu);
        d.consumes_counters = Some(vec![full_gpu_consumption(gpu)]);
        d.taints = taints.clone();
        d
    });
    whole
        .into_iter()
        .chain(offered_placements(gpu).into_iter().map(|(profile, at)| {
            let mut d = mig(gpu, profile);
            d.name = mig_device_name(gpu.minor, &profile.name, profile.gi_profile_id, at.start);
            d.consumes_counters = Some(vec![placement_consumption(gpu, profile, at)]);
            d.taints = taints.clone();
            d
        }))
        .collect()
}

/// Capacities of a MIG profile as the static path publishes them for a MIG device.
pub fn profile_capacity(profile: &MigProfile) -> BTreeMap<String, DeviceCapacity> {
    [
        ("multiprocessors", u64::from(profile.multiprocessors)),
        ("copyEngines", u64::from(profile.copy_engines)),
        ("decoders", u64::from(profile.decoders)),
        ("encoders", u64::from(profile.encoders)),
        ("jpegEngines", u64::from(profile.jpeg_engines)),
        ("ofaEngines", u64::from(profile.ofa_engines)),
        ("memory", profile.memory_bytes),
    ]
    .into_iter()
    .map(|(name, v)| {
        (
            name.to_string(),
            DeviceCapacity {
                value: Quantity(v.to_string()),
                request_policy: None,
            },
        )
    })
    .collect()
}

/// Checks the counter parts of slices against the API's limits; one line per violation.
///
/// Covers: devices and counter sets never in one slice, <= 8 sets per slice, <= 32 counters
/// per set and per consumption, <= 2 consumptions per device, every consumption names a
/// set of the pool and only its counters, counter names DNS labels.
pub fn validate_counters(slices: &[k8s_openapi::api::resource::v1::ResourceSlice]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut sets: BTreeMap<&str, &CounterSet> = BTreeMap::new();
    for s in slices {
        let shared = s.spec.shared_counters.as_deref().unwrap_or_default();
        let has_devices = s.spec.devices.as_ref().is_some_and(|d| !d.is_empty());
        if has_devices && !shared.is_empty() {
            problems.push("a slice carries both devices and sharedCounters".to_string());
        }
        if shared.len() > MAX_COUNTER_SETS_PER_SLICE {
            problems.push(format!("{} counter sets in one slice", shared.len()));
        }
        for set in shared {
            if set.counters.len() > MAX_COUNTERS_PER_SET {
                problems.push(format!("set {}: {} counters", set.name, set.counters.len()));
            }
            if sets.insert(&set.name, set).is_some() {
                problems.push(format!("set {} repeated", set.name));
            }
            for name in set.counters.keys() {
                if !super::desired::is_dns_label(name) {
                    problems.push(format!(
                        "set {}: counter {name:?} is not a DNS label",
                        set.name
                    ));
                }
            }
        }
    }
    for s in slices {
        for d in s.spec.devices.iter().flatten() {
            let consumptions = d.consumes_counters.as_deref().unwrap_or_default();
            if consumptions.len() > 2 {
                problems.push(format!(
                    "device {}: {} consumptions",
                    d.name,
                    consumptions.len()
                ));
            }
            for c in consumptions {
                let Some(set) = sets.get(c.counter_set.as_str()) else {
                    problems.push(format!("device {}: unknown set {}", d.name, c.counter_set));
                    continue;
                };
                if c.counters.len() > MAX_COUNTERS_PER_SET {
                    problems.push(format!("device {}: {} counters", d.name, c.counters.len()));
                }
                for name in c.counters.keys() {
                    if !set.counters.contains_key(name) {
                        problems.push(format!("device {}: counter {name} not in its set", d.name));
                    }
                }
            }
        }
    }
    problems
}

#[cfg(test)]
#[path = "partitionable_tests.rs"]
mod tests;
