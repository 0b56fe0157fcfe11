//! Inventory -> the ResourceSlices this node should publish (pure).
//!
//! Owns the device list, attributes and capacities we announce, and the split of the
//! pool into slices. Follows resource.k8s.io/v1 (design/API-FACTS.md: <= 128 devices per
//! slice, <= 64 with taints, <= 32 attributes + capacities per device, string attributes
//! <= 64 characters, device names DNS labels) and NVIDIA's reference driver for names and
//! attributes (design/COMPAT.md). A GPU in static MIG mode is announced as its existing
//! MIG devices, not as a full GPU; a dynamic MIG GPU as partitionable devices
//! ([`super::partitionable`]), its counter set in a slice of its own. It must not do I/O; the reconciler applies
//! the result. The pool generation passed in is written as is (the reconciler decides it).
//!
//! Health comes in as [`HealthTaints`]: the devices of an unhealthy GPU carry its taint.
//! When device taints cannot be published (the API server drops the field), those
//! devices are withheld instead: an unhealthy GPU is never offered untainted.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    CounterSet, Device, DeviceAttribute, DeviceCapacity, DeviceTaint, ResourcePool, ResourceSlice,
    ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::partitionable;
use super::shares::{ConsumableShares, make_shareable};
use super::taints::HealthTaints;
use crate::inventory::{Gpu, Inventory, MigDevice, MigProfile};

/// Most devices a slice may hold.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// Most devices a slice may hold when any of them has taints or consumes counters.
pub const MAX_DEVICES_PER_SLICE_WITH_TAINTS: usize = 64;
/// Most attributes plus capacities per device.
pub const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
/// Longest string attribute value.
pub const MAX_STRING_ATTRIBUTE_LEN: usize = 64;

/// Taint key put on a GPU whose MIG mode change waits for a GPU reset.
pub const MIG_MODE_PENDING_TAINT: &str = "gpu-dra.dev/mig-mode-change-pending";

/// Which optional (newer or gated) API fields to emit. Plain data passed in, so the
/// reconciler can turn a field off when the API server drops it (feature gate off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFeatures {
    /// Emit device taints (DRADeviceTaints). Used to keep new claims off a GPU whose MIG
    /// mode change is pending a reset.
    pub device_taints: bool,
    /// Publish full GPUs as consumable shares (DRAConsumableCapacity), see
    /// [`super::shares`]; turned off when the API server drops `allowMultipleAllocations`
    /// or a `requestPolicy`.
    pub consumable_shares: ConsumableShares,
    /// Emit partitionable devices (DRAPartitionableDevices: `sharedCounters`,
    /// `consumesCounters`). Off: dynamic MIG GPUs are withheld, since without counters the
    /// scheduler could hand out overlapping placements.
    pub partitionable_devices: bool,
}

impl Default for SliceFeatures {
    fn default() -> Self {
        SliceFeatures {
            device_taints: true,
            consumable_shares: ConsumableShares::Disabled,
            partitionable_devices: true,
        }
    }
}

impl SliceFeatures {
    /// These features minus the ones whose fields the API server dropped.
    ///
    /// `dropped` holds normalised field paths (see `slices::reconcile::dropped_fields`),
    /// e.g. `spec.devices[*].taints`.
    pub fn without_dropped<'a>(
        &self,
        dropped: impl IntoIterator<Item = &'a String>,
    ) -> SliceFeatures {
        let mut out = self.clone();
        for path in dropped {
            if path.starts_with("spec.devices[*].taints") {
                out.device_taints = false;
            }
            if path.starts_with("spec.devices[*].allowMultipleAllocations")
                || path.ends_with(".requestPolicy")
            {
                out.consumable_shares = ConsumableShares::Disabled;
            }
            if path.starts_with("spec.sharedCounters")
                || path.starts_with("spec.devices[*].consumesCounters")
            {
                out.partitionable_devices = false;
            }
        }
        out
    }
}

/// What one slice carries: devices, or counter sets (never both).
type SliceBody = (Option<Vec<Device>>, Option<Vec<CounterSet>>);

/// Name of slice `index` of a node's pool: `<node>-<driver with dots as dashes>-<NN>`.
///
/// Stable names (instead of `generateName`) make server-side apply idempotent; the
/// zero-padded index keeps name order equal to slice order.
pub fn slice_name(node: &str, driver: &str, index: usize, count: usize) -> String {
    let width = count.saturating_sub(1).to_string().len().max(2);
    format!("{node}-{}-{index:0width$}", driver.replace('.', "-"))
}

/// Version attribute value normalised to semver `MAJOR.MINOR.PATCH`: missing parts become
/// 0, leading zeros go (`9.0` -> `9.0.0`, `535.104.05` -> `535.104.5`), extra parts are
/// dropped. `None` when a part is not a number.
pub fn semver_normalise(v: &str) -> Option<String> {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next().flatten()?;
    let minor = match parts.next() {
        Some(p) => p?,
        None => 0,
    };
    let patch = match parts.next() {
        Some(p) => p?,
        None => 0,
    };
    Some(format!("{major}.{minor}.{patch}"))
}

/// The ResourceSlices that describe `inv` for `driver` on node `node` (uid `node_uid`),
/// all carrying pool `generation`.
///
/// Pool name = node name; each slice has `nodeName`, an owner reference to the Node (so
/// node deletion collects it), and `resourceSliceCount` = the number of slices. Devices are
/// ordered by GPU minor (a GPU's MIG devices by placement start) and split at the per-slice
/// limit. A node without devices still gets one empty slice, so the pool exists.
pub fn desired_slices(
    inv: &Inventory,
    driver: &str,
    node: &str,
    node_uid: &str,
    generation: i64,
    features: &SliceFeatures,
) -> Vec<ResourceSlice> {
    desired_slices_with(
        inv,
        &HealthTaints::default(),
        driver,
        node,
        node_uid,
        generation,
        features,
    )
}

/// [`desired_slices`] with the unhealthy GPUs of `health` tainted (or withheld when
/// `features.device_taints` is off).
pub fn desired_slices_with(
    inv: &Inventory,
    health: &HealthTaints,
    driver: &str,
    node: &str,
    node_uid: &str,
    generation: i64,
    features: &SliceFeatures,
) -> Vec<ResourceSlice> {
    let devices = desired_devices_with(inv, health, features);
    let per_slice = if devices
        .iter()
        .any(|d| d.taints.as_ref().is_some_and(|t| !t.is_empty()) || d.consumes_counters.is_some())
    {
        MAX_DEVICES_PER_SLICE_WITH_TAINTS
    } else {
        MAX_DEVICES_PER_SLICE
    };
    let chunks: Vec<Vec<Device>> = if devices.is_empty() {
        vec![Vec::new()]
    } else {
        devices.chunks(per_slice).map(<[Device]>::to_vec).collect()
    };
    // Counter sets go in slices of their own (a slice holds devices or sharedCounters).
    let counter_sets = if features.partitionable_devices {
        partitionable::counter_sets(inv)
    } else {
        Vec::new()
    };
    let mut bodies: Vec<SliceBody> = chunks.into_iter().map(|d| (Some(d), None)).collect();
    bodies.extend(
        counter_sets
            .chunks(partitionable::MAX_COUNTER_SETS_PER_SLICE)
            .map(|sets| (None, Some(sets.to_vec()))),
    );
    let count = bodies.len();
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, (devices, shared_counters))| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(node, driver, i, count)),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".to_string(),
                    kind: "Node".to_string(),
                    name: node.to_string(),
                    uid: node_uid.to_string(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..Default::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_string(),
                node_name: Some(node.to_string()),
                pool: ResourcePool {
                    name: node.to_string(),
                    generation,
                    resource_slice_count: count as i64,
                },
                devices,
                shared_counters,
                ..Default::default()
            },
        })
        .collect()
}

/// All devices of the pool in publication order (every GPU healthy).
pub fn desired_devices(inv: &Inventory, features: &SliceFeatures) -> Vec<Device> {
    desired_devices_with(inv, &HealthTaints::default(), features)
}

/// All devices of the pool in publication order; the devices of a GPU unhealthy in
/// `health` carry its taint, or are left out when `features.device_taints` is off.
pub fn desired_devices_with(
    inv: &Inventory,
    health: &HealthTaints,
    features: &SliceFeatures,
) -> Vec<Device> {
    let mut gpus: Vec<&Gpu> = inv.gpus.iter().collect();
    gpus.sort_by_key(|g| g.minor);
    let mut out = Vec::new();
    for gpu in gpus {
        if !features.device_taints && health.is_unhealthy(&gpu.uuid) {
            continue;
        }
        let taints = taints(gpu, health, features);
        if partitionable::is_dynamic(gpu) {
            if features.partitionable_devices {
                out.extend(partitionable::devices(
                    gpu,
                    taints,
                    |g| gpu_device(inv, g, None),
                    |g, profile| dynamic_mig_device(inv, g, profile),
                ));
            }
        } else if gpu.mig.enabled {
            let mut migs: Vec<&MigDevice> = gpu.mig_devices.iter().collect();
            migs.sort_by_key(|m| (m.placement.start, m.gi_profile_id, m.ci_placement.start));
            out.extend(
                migs.into_iter()
                    .map(|m| mig_device(inv, gpu, m, taints.clone())),
            );
        } else {
            let mut device = gpu_device(inv, gpu, taints);
            make_shareable(&mut device, gpu.memory_bytes, features.consumable_shares);
            out.push(device);
        }
    }
    out
}

fn gpu_device(inv: &Inventory, gpu: &Gpu, taints: Option<Vec<DeviceTaint>>) -> Device {
    let mut attrs = common_attributes(inv, gpu);
    attrs.insert("type".into(), string_attr("gpu"));
    attrs.insert("uuid".into(), string_attr(&gpu.uuid));
    let capacity = BTreeMap::from([("memory".to_string(), capacity(gpu.memory_bytes))]);
    Device {
        name: gpu.device_name(),
        attributes: Some(attrs),
        capacity: Some(capacity),
        taints,
        ..Default::default()
    }
}

fn mig_device(
    inv: &Inventory,
    gpu: &Gpu,
    mig: &MigDevice,
    taints: Option<Vec<DeviceTaint>>,
) -> Device {
    let mut attrs = common_attributes(inv, gpu);
    attrs.insert("type".into(), string_attr("mig"));
    attrs.insert("uuid".into(), string_attr(&mig.uuid));
    attrs.insert("parentUUID".into(), string_attr(&gpu.uuid));
    attrs.insert("profile".into(), string_attr(&mig.profile));
    let capacity = BTreeMap::from([
        (
            "multiprocessors".to_string(),
            capacity(mig.multiprocessors.into()),
        ),
        ("copyEngines".to_string(), capacity(mig.copy_engines.into())),
        ("decoders".to_string(), capacity(mig.decoders.into())),
        ("encoders".to_string(), capacity(mig.encoders.into())),
        ("jpegEngines".to_string(), capacity(mig.jpeg_engines.into())),
        ("ofaEngines".to_string(), capacity(mig.ofa_engines.into())),
        ("memory".to_string(), capacity(mig.memory_bytes)),
    ]);
    Device {
        name: mig.device_name(),
        attributes: Some(attrs),
        capacity: Some(capacity),
        taints,
        ..Default::default()
    }
}

/// A MIG device of a dynamic GPU before its instance exists: no `uuid` (COMPAT.md), the
/// profile's capacities. Name and counters are set by [`partitionable::devices`].
fn dynamic_mig_device(inv: &Inventory, gpu: &Gpu, profile: &MigProfile) -> Device {
    let mut attrs = common_attributes(inv, gpu);
    attrs.insert("type".into(), string_attr("mig"));
    attrs.insert("parentUUID".into(), string_attr(&gpu.uuid));
    attrs.insert("profile".into(), string_attr(&profile.name));
    Device {
        name: String::new(),
        attributes: Some(attrs),
        capacity: Some(partitionable::profile_capacity(profile)),
        ..Default::default()
    }
}

/// Attributes a full GPU and its MIG devices share (the parent's identity and versions).
fn common_attributes(inv: &Inventory, gpu: &Gpu) -> BTreeMap<String, DeviceAttribute> {
    let mut attrs = BTreeMap::new();
    attrs.insert("productName".into(), string_attr(&gpu.name));
    attrs.insert("brand".into(), string_attr(&gpu.brand));
    attrs.insert("architecture".into(), string_attr(&gpu.architecture));
    let versions = [
        (
            "cudaComputeCapability",
            gpu.cuda_compute_capability.to_string(),
        ),
        ("driverVersion", inv.driver_version.clone()),
        ("cudaDriverVersion", inv.cuda_driver_version.clone()),
    ];
    for (name, raw) in versions {
        // An unparsable version is left out rather than published wrong.
        if let Some(v) = semver_normalise(&raw) {
            attrs.insert(
                name.into(),
                DeviceAttribute {
                    version: Some(v),
                    ..Default::default()
                },
            );
        }
    }
    attrs.insert(
        "resource.kubernetes.io/pciBusID".into(),
        string_attr(&pci_bus_id_for_attribute(&gpu.pci_bus_id)),
    );
    if let Some(root) = &gpu.pcie_root {
        attrs.insert("resource.kubernetes.io/pcieRoot".into(), string_attr(root));
    }
    attrs
}

/// The standard `pciBusID` attribute uses the sysfs form `0000:1b:00.0`; NVML reports
/// `00000000:1B:00.0`. Unrecognised forms pass through unchanged.
fn pci_bus_id_for_attribute(nvml_bus_id: &str) -> String {
    match nvml_bus_id.split_once(':') {
        Some((domain, rest)) => match u32::from_str_radix(domain, 16) {
            Ok(d) => format!("{d:04x}:{}", rest.to_ascii_lowercase()),
            Err(_) => nvml_bus_id.to_string(),
        },
        None => nvml_bus_id.to_string(),
    }
}

/// The taints of `gpu`'s devices, sorted by key; `None` when there are none.
fn taints(gpu: &Gpu, health: &HealthTaints, features: &SliceFeatures) -> Option<Vec<DeviceTaint>> {
    if !features.device_taints {
        return None;
    }
    let mut out = Vec::new();
    if gpu.mig.capable && gpu.mig.pending != gpu.mig.enabled {
        out.push(DeviceTaint {
            key: MIG_MODE_PENDING_TAINT.to_string(),
            value: None,
            effect: "NoSchedule".to_string(),
            time_added: None,
        });
    }
    out.extend(health.taint_for(&gpu.uuid));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    (!out.is_empty()).then_some(out)
}

fn string_attr(v: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(v.to_string()),
        ..Default::default()
    }
}

fn capacity(v: u64) -> DeviceCapacity {
    DeviceCapacity {
        value: Quantity(v.to_string()),
        request_policy: None,
    }
}

/// Checks a slice against the API's limits; returns one line per violation (empty = valid).
///
/// Covers: device count, attribute + capacity count, string attribute length, device names
/// (DNS labels, unique), attribute / capacity names (C identifier <= 32, optionally
/// prefixed by a DNS subdomain and `/`), exactly one value per attribute, semver versions.
pub fn validate_slice(slice: &ResourceSlice) -> Vec<String> {
    let mut problems = Vec::new();
    let devices = slice.spec.devices.as_deref().unwrap_or_default();
    let tainted = devices
        .iter()
        .any(|d| d.taints.as_ref().is_some_and(|t| !t.is_empty()) || d.consumes_counters.is_some());
    let limit = if tainted {
        MAX_DEVICES_PER_SLICE_WITH_TAINTS
    } else {
        MAX_DEVICES_PER_SLICE
    };
    if devices.len() > limit {
        problems.push(format!("{} devices, limit {limit}", devices.len()));
    }
    let mut names = std::collections::BTreeSet::new();
    for d in devices {
        if !is_dns_label(&d.name) {
            problems.push(format!("device name {:?} is not a DNS label", d.name));
        }
        if !names.insert(d.name.as_str()) {
            problems.push(format!("device name {:?} repeated", d.name));
        }
        let attrs = d.attributes.as_ref().map_or(0, BTreeMap::len);
        let caps = d.capacity.as_ref().map_or(0, BTreeMap::len);
        if attrs + caps > MAX_ATTRIBUTES_AND_CAPACITIES {
            problems.push(format!(
                "device {}: {} attributes + capacities",
                d.name,
                attrs + caps
            ));
        }
        for (name, a) in d.attributes.iter().flatten() {
            if !is_qualified_name(name) {
                problems.push(format!(
                    "device {}: attribute name {name:?} invalid",
                    d.name
                ));
            }
            let set = [
                a.bool.is_some(),
                a.int.is_some(),
                a.string.is_some(),
                a.version.is_some(),
            ]
            .into_iter()
            .filter(|x| *x)
            .count();
            if set != 1 {
                problems.push(format!(
                    "device {}: attribute {name} has {set} values",
                    d.name
                ));
            }
            if let Some(s) = &a.string
                && s.chars().count() > MAX_STRING_ATTRIBUTE_LEN
            {
                problems.push(format!(
                    "device {}: attribute {name} longer than 64",
                    d.name
                ));
            }
            if let Some(v) = &a.version
                && semver::Version::parse(v).is_err()
            {
                problems.push(format!(
                    "device {}: attribute {name} = {v:?} is not semver",
                    d.name
                ));
            }
        }
        for name in d.capacity.iter().flatten().map(|(k, _)| k) {
            if !is_qualified_name(name) {
                problems.push(format!("device {}: capacity name {name:?} invalid", d.name));
            }
        }
    }
    problems
}

/// RFC 1123 label: <= 63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Attribute / capacity name: C identifier (<= 32), optionally `<DNS subdomain>/` before it.
fn is_qualified_name(s: &str) -> bool {
    let (domain, id) = match s.rsplit_once('/') {
        Some((d, id)) => (Some(d), id),
        None => (None, s),
    };
    let id_ok = !id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !id.as_bytes()[0].is_ascii_digit();
    let domain_ok = domain.is_none_or(|d| d.len() <= 63 && d.split('.').all(is_dns_label));
    id_ok && domain_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::fixtures::{dgx_h100, h100};

    const DRIVER: &str = "gpu.gpu-dra.dev";

    use crate::slices::golden;

    fn names(slice: &ResourceSlice) -> Vec<String> {
        slice
            .spec
            .devices
            .iter()
            .flatten()
            .map(|d| d.name.clone())
            .collect()
    }

    #[test]
    fn dgx_h100_golden() {
        let slices = desired_slices(
            &dgx_h100(),
            DRIVER,
            "node-a",
            "uid-1",
            1,
            &SliceFeatures::default(),
        );
        let yaml = crate::inventory::render_slices(&slices).expect("render");
        golden("dgx-h100-slices.yaml", &yaml);
    }

    #[test]
    fn dgx_h100_devices_follow_compat_and_static_mig() {
        let slices = desired_slices(
            &dgx_h100(),
            DRIVER,
            "node-a",
            "uid-1",
            3,
            &SliceFeatures::default(),
        );
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert_eq!(
            s.metadata.name.as_deref(),
            Some("node-a-gpu-gpu-dra-dev-00")
        );
        assert_eq!(s.spec.pool.name, "node-a");
        assert_eq!(s.spec.pool.generation, 3);
        assert_eq!(s.spec.pool.resource_slice_count, 1);
        assert_eq!(s.spec.node_name.as_deref(), Some("node-a"));
        let owner = &s.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Node", "node-a", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            names(s),
            [
                "gpu-0",
                "gpu-1-mig-3g40gb-9-0",
                "gpu-1-mig-2g20gb-14-4",
                "gpu-1-mig-1g10gb-19-6",
                "gpu-2-mig-4g40gb-5-0",
                "gpu-2-mig-3g40gb-9-4",
                "gpu-3",
                "gpu-4",
                "gpu-5",
                "gpu-6",
                "gpu-7",
            ]
        );
        let gpu0 = &s.spec.devices.as_ref().expect("devices")[0];
        let attrs = gpu0.attributes.as_ref().expect("attrs");
        assert_eq!(attrs["type"].string.as_deref(), Some("gpu"));
        assert_eq!(
            attrs["cudaComputeCapability"].version.as_deref(),
            Some("9.0.0")
        );
        assert_eq!(
            attrs["cudaDriverVersion"].version.as_deref(),
            Some("12.4.0")
        );
        assert_eq!(attrs["driverVersion"].version.as_deref(), Some("550.54.15"));
        assert_eq!(
            attrs["resource.kubernetes.io/pciBusID"].string.as_deref(),
            Some("0000:1b:00.0")
        );
        assert_eq!(
            gpu0.capacity.as_ref().expect("cap")["memory"].value.0,
            (81_559u64 << 20).to_string()
        );
        let mig = &s.spec.devices.as_ref().expect("devices")[1];
        let attrs = mig.attributes.as_ref().expect("attrs");
        assert_eq!(attrs["type"].string.as_deref(), Some("mig"));
        assert_eq!(attrs["profile"].string.as_deref(), Some("3g.40gb"));
        assert_eq!(
            attrs["parentUUID"].string,
            dgx_h100().gpus[1].uuid.clone().into()
        );
        assert_eq!(
            mig.capacity.as_ref().expect("cap")["multiprocessors"]
                .value
                .0,
            "60"
        );
    }

    #[test]
    fn slices_respect_api_limits() {
        let slices = desired_slices(
            &dgx_h100(),
            DRIVER,
            "node-a",
            "uid-1",
            1,
            &SliceFeatures::default(),
        );
        for s in &slices {
            assert_eq!(validate_slice(s), Vec::<String>::new());
        }
    }

    #[test]
    fn validator_catches_violations() {
        let mut slices =
            desired_slices(&dgx_h100(), DRIVER, "n", "u", 1, &SliceFeatures::default());
        let dev = &mut slices[0].spec.devices.as_mut().expect("devices")[0];
        dev.name = "GPU_0".into();
        let attrs = dev.attributes.as_mut().expect("attrs");
        attrs.insert("productName".into(), string_attr(&"x".repeat(65)));
        for i in 0..30 {
            attrs.insert(format!("extra{i}"), string_attr("v"));
        }
        attrs.insert(
            "driverVersion".into(),
            DeviceAttribute {
                version: Some("550.54".into()),
                ..Default::default()
            },
        );
        let problems = validate_slice(&slices[0]);
        assert!(
            problems.iter().any(|p| p.contains("not a DNS label")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("longer than 64")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("attributes + capacities")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("not semver")),
            "{problems:?}"
        );
    }

    #[test]
    fn splits_at_128_devices_with_stable_names() {
        let inv = Inventory {
            driver_version: "550.54.15".into(),
            cuda_driver_version: "12.4".into(),
            gpus: (0..300).map(h100).collect(),
        };
        let slices = desired_slices(&inv, DRIVER, "big", "u", 7, &SliceFeatures::default());
        let sizes: Vec<usize> = slices.iter().map(|s| names(s).len()).collect();
        assert_eq!(sizes, [128, 128, 44]);
        for (i, s) in slices.iter().enumerate() {
            assert_eq!(
                s.metadata.name.as_deref(),
                Some(format!("big-gpu-gpu-dra-dev-{i:02}").as_str())
            );
            assert_eq!(s.spec.pool.resource_slice_count, 3);
            assert!(validate_slice(s).is_empty());
        }
        assert_eq!(names(&slices[2])[0], "gpu-256");
    }

    #[test]
    fn pending_mig_change_taints_and_halves_the_limit() {
        let mut inv = Inventory {
            driver_version: "550.54.15".into(),
            cuda_driver_version: "12.4".into(),
            gpus: (0..100).map(h100).collect(),
        };
        inv.gpus[0].mig.pending = true;
        let slices = desired_slices(&inv, DRIVER, "n", "u", 1, &SliceFeatures::default());
        assert_eq!(
            slices.iter().map(|s| names(s).len()).collect::<Vec<_>>(),
            [64, 36]
        );
        let taint = &slices[0].spec.devices.as_ref().expect("devices")[0]
            .taints
            .as_ref()
            .expect("taints")[0];
        assert_eq!(taint.key, MIG_MODE_PENDING_TAINT);
        // Fallback when the API server drops taints.
        let features =
            SliceFeatures::default().without_dropped(&["spec.devices[*].taints".to_string()]);
        let slices = desired_slices(&inv, DRIVER, "n", "u", 1, &features);
        assert_eq!(slices.len(), 1);
        assert!(
            slices[0]
                .spec
                .devices
                .iter()
                .flatten()
                .all(|d| d.taints.is_none())
        );
    }

    fn unhealthy_gpu1() -> (Inventory, HealthTaints) {
        let inv = dgx_h100();
        let gpu1 = inv
            .gpus
            .iter()
            .find(|g| g.minor == 1)
            .expect("gpu-1")
            .uuid
            .clone();
        let gpus = crate::health::UnhealthyGpus::from([(
            gpu1,
            crate::health::UnhealthyGpu {
                xid: 79,
                since: 1_764_625_000,
                message: "XID 79".into(),
                gone: false,
            },
        )]);
        let health = HealthTaints::new(DRIVER, super::super::taints::TaintEffect::NoSchedule, gpus);
        (inv, health)
    }

    #[test]
    fn dgx_h100_unhealthy_mig_gpu_golden() {
        let (inv, health) = unhealthy_gpu1();
        let slices = desired_slices_with(
            &inv,
            &health,
            DRIVER,
            "node-a",
            "uid-1",
            1,
            &SliceFeatures::default(),
        );
        let yaml = crate::inventory::render_slices(&slices).expect("render");
        golden("dgx-h100-slices-unhealthy-gpu-1.yaml", &yaml);
    }

    #[test]
    fn unhealthy_gpu_taints_its_mig_devices_or_is_withheld() {
        let (inv, health) = unhealthy_gpu1();
        let devices = desired_devices_with(&inv, &health, &SliceFeatures::default());
        let mut tainted = 0;
        for d in &devices {
            let on_gpu1 = d.name.starts_with("gpu-1-mig-");
            match &d.taints {
                Some(t) => {
                    assert!(on_gpu1, "{}", d.name);
                    assert_eq!(t.len(), 1);
                    assert_eq!(t[0].key, "gpu.gpu-dra.dev/xid");
                    assert_eq!(t[0].value.as_deref(), Some("79"));
                    assert_eq!(t[0].effect, "NoSchedule");
                    assert!(t[0].time_added.is_some());
                    tainted += 1;
                }
                None => assert!(!on_gpu1, "{} untainted", d.name),
            }
        }
        assert_eq!(tainted, 3);
        let slices = desired_slices_with(
            &inv,
            &health,
            DRIVER,
            "n",
            "u",
            1,
            &SliceFeatures::default(),
        );
        assert!(validate_slice(&slices[0]).is_empty());

        // The API server drops taints: the unhealthy GPU is not offered at all.
        let features =
            SliceFeatures::default().without_dropped(&["spec.devices[*].taints".to_string()]);
        let names: Vec<String> = desired_devices_with(&inv, &health, &features)
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names.len(), devices.len() - 3);
        assert!(names.iter().all(|n| !n.starts_with("gpu-1-")), "{names:?}");
    }

    #[test]
    fn empty_node_publishes_one_empty_slice() {
        let slices = desired_slices(
            &Inventory::default(),
            DRIVER,
            "n",
            "u",
            1,
            &SliceFeatures::default(),
        );
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].spec.devices.as_deref(), Some(&[][..]));
    }

    #[test]
    fn versions_are_normalised() {
        assert_eq!(semver_normalise("9.0").as_deref(), Some("9.0.0"));
        assert_eq!(semver_normalise("535.104.05").as_deref(), Some("535.104.5"));
        assert_eq!(semver_normalise("12").as_deref(), Some("12.0.0"));
        assert_eq!(semver_normalise("12.x"), None);
        assert_eq!(semver_normalise(""), None);
    }

    #[test]
    fn slice_names_widen_past_99() {
        assert_eq!(
            slice_name("n", "gpu.nvidia.com", 3, 10),
            "n-gpu-nvidia-com-03"
        );
        assert_eq!(
            slice_name("n", "gpu.nvidia.com", 3, 150),
            "n-gpu-nvidia-com-003"
        );
    }

    #[test]
    fn deterministic_output() {
        let mut inv = dgx_h100();
        let a = desired_slices(&inv, DRIVER, "n", "u", 1, &SliceFeatures::default());
        inv.gpus.reverse();
        inv.gpus[6].mig_devices.reverse();
        let b = desired_slices(&inv, DRIVER, "n", "u", 1, &SliceFeatures::default());
        assert_eq!(a, b);
    }
}
