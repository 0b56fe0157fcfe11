use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{Device, ResourceSlice};

use super::*;
use crate::inventory::fixtures::{dgx_a100, dgx_h100, h100};
use crate::inventory::{DynamicMig, ForeignInstance, MigState};
use crate::slices::desired::{SliceFeatures, desired_slices, validate_slice};

const DRIVER: &str = "gpu.gpu-dra.dev";

fn dynamic(mut gpu: Gpu) -> Gpu {
    gpu.mig = MigState {
        capable: true,
        enabled: true,
        pending: true,
    };
    gpu.mig_devices.clear();
    gpu.dynamic_mig = Some(DynamicMig::default());
    gpu
}

fn all_dynamic(mut inv: Inventory) -> Inventory {
    inv.gpus = inv.gpus.into_iter().map(dynamic).collect();
    inv
}

fn slices(inv: &Inventory) -> Vec<ResourceSlice> {
    desired_slices(inv, DRIVER, "node-a", "uid-1", 1, &SliceFeatures::default())
}

fn devices(slices: &[ResourceSlice]) -> Vec<Device> {
    slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten().cloned())
        .collect()
}

use crate::slices::golden;

fn assert_valid(slices: &[ResourceSlice]) {
    for s in slices {
        assert_eq!(
            validate_slice(s),
            Vec::<String>::new(),
            "{:?}",
            s.metadata.name
        );
        assert_eq!(s.spec.pool.resource_slice_count, slices.len() as i64);
    }
    assert_eq!(validate_counters(slices), Vec::<String>::new());
}

/// Whether `chosen` fit in their counter sets together, as the scheduler accounts them.
fn fits(slices: &[ResourceSlice], chosen: &[&Device]) -> bool {
    let mut left: BTreeMap<(String, String), i128> = BTreeMap::new();
    for s in slices {
        for set in s.spec.shared_counters.iter().flatten() {
            for (name, c) in &set.counters {
                left.insert((set.name.clone(), name.clone()), c.value.0.parse().unwrap());
            }
        }
    }
    for d in chosen {
        for c in d.consumes_counters.iter().flatten() {
            for (name, v) in &c.counters {
                let key = (c.counter_set.clone(), name.clone());
                let n: i128 = v.value.0.parse().unwrap();
                *left.get_mut(&key).expect("counter exists") -= n;
            }
        }
    }
    left.values().all(|v| *v >= 0)
}

fn device<'a>(all: &'a [Device], name: &str) -> &'a Device {
    all.iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name}"))
}

fn memory_slices(d: &Device) -> Vec<String> {
    d.consumes_counters
        .iter()
        .flatten()
        .flat_map(|c| c.counters.keys())
        .filter(|k| k.starts_with("memory-slice-"))
        .cloned()
        .collect()
}

#[test]
fn dgx_h100_all_dynamic_golden() {
    let s = slices(&all_dynamic(dgx_h100()));
    assert_valid(&s);
    // The golden file holds GPU 0's devices and counter set (the other seven differ only
    // in minor, UUID and bus id); the whole node's shape is checked below.
    let mut one = all_dynamic(dgx_h100());
    one.gpus.truncate(1);
    let yaml = crate::inventory::render_slices(&slices(&one)).expect("render");
    golden("dgx-h100-dynamic-slices.yaml", &yaml);
}

#[test]
fn dgx_h100_all_dynamic_shape() {
    let s = slices(&all_dynamic(dgx_h100()));
    // 8 GPUs x (full GPU + 25 placements) = 208 devices: 4 slices of <= 64, then one slice
    // with the 8 counter sets.
    assert_eq!(s.len(), 5);
    assert!(s[..4].iter().all(|x| x.spec.shared_counters.is_none()));
    let sets = s[4].spec.shared_counters.as_ref().expect("counter sets");
    assert!(s[4].spec.devices.is_none());
    assert_eq!(sets.len(), 8);
    let set0 = &sets[0];
    assert_eq!(set0.name, "gpu-0-counter-set");
    let figures: BTreeMap<&str, &str> = set0
        .counters
        .iter()
        .map(|(k, v)| (k.as_str(), v.value.0.as_str()))
        .collect();
    assert_eq!(figures["multiprocessors"], "132");
    assert_eq!(figures["copy-engines"], "8");
    assert_eq!(figures["ofa-engines"], "1");
    assert_eq!(figures["memory"], (81152u64 << 20).to_string());
    assert_eq!(figures["memory-slice-7"], "1");
    assert_eq!(set0.counters.len(), 15);
    let all = devices(&s);
    assert_eq!(all.len(), 208);
    let full = device(&all, "gpu-0");
    let consumed = &full.consumes_counters.as_ref().expect("consumes")[0];
    assert_eq!(consumed.counter_set, "gpu-0-counter-set");
    assert_eq!(
        consumed.counters, set0.counters,
        "the full GPU consumes everything"
    );
    let attrs = full.attributes.as_ref().expect("attributes");
    assert_eq!(attrs["type"].string.as_deref(), Some("gpu"));
    assert_eq!(attrs["uuid"].string.as_deref(), Some(h100(0).uuid.as_str()));
    assert_eq!(memory_slices(device(&all, "gpu-0-mig-7g80gb-0-0")).len(), 8);
    let mig = device(&all, "gpu-0-mig-3g40gb-9-4");
    assert_eq!(
        memory_slices(mig),
        [
            "memory-slice-4",
            "memory-slice-5",
            "memory-slice-6",
            "memory-slice-7"
        ]
    );
    let attrs = mig.attributes.as_ref().expect("attributes");
    assert!(
        !attrs.contains_key("uuid"),
        "no uuid before the instance exists"
    );
    assert_eq!(attrs["profile"].string.as_deref(), Some("3g.40gb"));
    assert_eq!(attrs["type"].string.as_deref(), Some("mig"));
}

#[test]
fn dgx_a100_announces_mig_devices_only() {
    let s = slices(&all_dynamic(dgx_a100()));
    assert_valid(&s);
    let mut one = all_dynamic(dgx_a100());
    one.gpus.truncate(1);
    let yaml = crate::inventory::render_slices(&slices(&one)).expect("render");
    golden("dgx-a100-dynamic-slices.yaml", &yaml);
    let all = devices(&s);
    assert!(
        all.iter().all(|d| d.name.contains("-mig-")),
        "MIG devices only"
    );
    assert_eq!(all.len(), 8 * 25);
    assert!(all.iter().any(|d| d.name == "gpu-3-mig-3g20gb-9-4"));
}

#[test]
fn overlapping_placements_never_fit_together() {
    let s = slices(&all_dynamic(dgx_h100()));
    let all = devices(&s);
    let gpu0: Vec<&Device> = all
        .iter()
        .filter(|d| d.name.starts_with("gpu-0-"))
        .collect();
    assert_eq!(gpu0.len(), 25);
    let full = device(&all, "gpu-0");
    assert!(fits(&s, &[full]));
    for p in &gpu0 {
        assert!(!fits(&s, &[full, p]), "the full GPU fits beside {}", p.name);
    }
    for a in &gpu0 {
        for b in &gpu0 {
            if a.name == b.name {
                continue;
            }
            let sa = memory_slices(a);
            let overlap = memory_slices(b).iter().any(|m| sa.contains(m));
            if overlap {
                assert!(
                    !fits(&s, &[a, b]),
                    "{} and {} overlap but fit",
                    a.name,
                    b.name
                );
            }
        }
    }
}

#[test]
fn valid_layouts_fit() {
    let s = slices(&all_dynamic(dgx_h100()));
    let all = devices(&s);
    let d = |n: &str| device(&all, n);
    assert!(fits(
        &s,
        &[d("gpu-0-mig-3g40gb-9-0"), d("gpu-0-mig-3g40gb-9-4")]
    ));
    assert!(fits(
        &s,
        &[d("gpu-0-mig-4g40gb-5-0"), d("gpu-0-mig-3g40gb-9-4")]
    ));
    let ones: Vec<&Device> = (0..7)
        .map(|i| d(&format!("gpu-0-mig-1g10gb-19-{i}")))
        .collect();
    assert!(fits(&s, &ones));
    // A third 3g.40gb has no room; nor does the full-size profile beside any partition.
    assert!(!fits(
        &s,
        &[
            d("gpu-0-mig-3g40gb-9-0"),
            d("gpu-0-mig-3g40gb-9-4"),
            d("gpu-0-mig-1g10gb-19-6")
        ]
    ));
    assert!(!fits(
        &s,
        &[d("gpu-0-mig-7g80gb-0-0"), d("gpu-0-mig-1g10gb-19-6")]
    ));
    // Only one +me instance (the GPU has one OFA).
    assert!(!fits(
        &s,
        &[d("gpu-0-mig-1g10gb-me-20-0"), d("gpu-0-mig-1g10gb-me-20-1")]
    ));
    // Different GPUs never compete.
    assert!(fits(
        &s,
        &[d("gpu-0-mig-7g80gb-0-0"), d("gpu-1-mig-7g80gb-0-0")]
    ));
}

#[test]
fn foreign_instance_blocks_its_placements() {
    let mut inv = all_dynamic(dgx_h100());
    inv.gpus[0].dynamic_mig = Some(DynamicMig {
        foreign: vec![ForeignInstance {
            gi_id: 7,
            gi_profile_id: 14,
            placement: Placement { start: 2, size: 2 },
        }],
    });
    let s = slices(&inv);
    assert_valid(&s);
    let names: Vec<String> = devices(&s)
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n == "gpu-0" || n.starts_with("gpu-0-"))
        .collect();
    assert!(!names.contains(&"gpu-0-mig-7g80gb-0-0".to_string()));
    assert!(
        !names.contains(&"gpu-0".to_string()),
        "no full GPU beside it"
    );
    assert!(devices(&s).iter().any(|d| d.name == "gpu-1"));
    assert!(
        !names
            .iter()
            .any(|n| n == "gpu-0-mig-3g40gb-9-0" || n == "gpu-0-mig-1g10gb-19-2")
    );
    assert!(names.contains(&"gpu-0-mig-3g40gb-9-4".to_string()));
    assert!(names.contains(&"gpu-0-mig-1g10gb-19-1".to_string()));
    assert!(resolve(&inv, "gpu-0-mig-2g20gb-14-2").is_none());
    assert!(resolve(&inv, "gpu-0-mig-2g20gb-14-4").is_some());
}

#[test]
fn static_and_dynamic_gpus_on_one_node() {
    let mut inv = dgx_h100();
    inv.gpus[0] = dynamic(h100(0));
    let s = slices(&inv);
    assert_valid(&s);
    let names: Vec<String> = devices(&s).into_iter().map(|d| d.name).collect();
    // Static GPU 1 keeps its existing MIG devices (with UUIDs), GPU 3 stays a full GPU.
    assert!(names.contains(&"gpu-1-mig-3g40gb-9-0".to_string()));
    assert!(!names.contains(&"gpu-1-mig-3g40gb-9-4".to_string()));
    assert!(names.contains(&"gpu-3".to_string()));
    assert!(names.contains(&"gpu-0-mig-7g80gb-0-0".to_string()));
    let sets: Vec<String> = s
        .iter()
        .flat_map(|x| {
            x.spec
                .shared_counters
                .iter()
                .flatten()
                .map(|c| c.name.clone())
        })
        .collect();
    assert_eq!(sets, ["gpu-0-counter-set"]);
    let static_dev = device(&devices(&s), "gpu-3").clone();
    assert!(static_dev.consumes_counters.is_none());
}

#[test]
fn without_partitionable_devices_dynamic_gpus_are_withheld() {
    let mut inv = dgx_h100();
    inv.gpus[0] = dynamic(h100(0));
    let features =
        SliceFeatures::default().without_dropped(&["spec.devices[*].consumesCounters".to_string()]);
    assert!(!features.partitionable_devices);
    let s = desired_slices(&inv, DRIVER, "node-a", "uid-1", 1, &features);
    assert!(s.iter().all(|x| x.spec.shared_counters.is_none()));
    let names: Vec<String> = devices(&s).into_iter().map(|d| d.name).collect();
    assert!(
        !names
            .iter()
            .any(|n| n == "gpu-0" || n.starts_with("gpu-0-"))
    );
    assert!(names.contains(&"gpu-3".to_string()));
}

#[test]
fn resolve_finds_offered_placements_only() {
    let inv = all_dynamic(dgx_h100());
    let t = resolve(&inv, "gpu-5-mig-3g40gb-9-4").expect("resolves");
    assert_eq!((t.gpu.minor, t.profile.gi_profile_id), (5, 9));
    assert_eq!(t.placement, Placement { start: 4, size: 4 });
    assert_eq!(t.device_name(), "gpu-5-mig-3g40gb-9-4");
    assert!(
        resolve(&inv, "gpu-5-mig-3g40gb-9-2").is_none(),
        "not a placement"
    );
    assert!(
        resolve(&dgx_h100(), "gpu-1-mig-3g40gb-9-0").is_none(),
        "static GPU"
    );
}

#[test]
fn full_gpu_in_use_keeps_the_published_devices() {
    // The driver switched MIG mode off for a claim on the full GPU and the GPU stays
    // marked dynamic: same devices, same sets.
    let before = slices(&all_dynamic(dgx_h100()));
    let mut inv = all_dynamic(dgx_h100());
    inv.gpus[2].mig.enabled = false;
    inv.gpus[2].mig.pending = false;
    assert_eq!(slices(&inv), before);
    // MIG off for any other reason: the annotation drops the mark, a plain full GPU.
    inv.gpus[2].dynamic_mig = None;
    let all = devices(&slices(&inv));
    assert!(!all.iter().any(|d| d.name.starts_with("gpu-2-mig-")));
    assert!(device(&all, "gpu-2").consumes_counters.is_none());
}

#[test]
fn pending_mig_mode_change_taints_every_device_of_a_dynamic_gpu() {
    let mut inv = all_dynamic(dgx_h100());
    inv.gpus[1].mig.pending = false; // MIG mode off waits for a GPU reset
    let s = slices(&inv);
    assert_valid(&s);
    let all = devices(&s);
    let of = |minor: u32| {
        all.iter()
            .filter(move |d| {
                d.name == format!("gpu-{minor}") || d.name.starts_with(&format!("gpu-{minor}-"))
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(of(1).len(), 26);
    for d in of(1) {
        let keys: Vec<&str> = d.taints.iter().flatten().map(|t| t.key.as_str()).collect();
        assert_eq!(
            keys,
            [crate::slices::desired::MIG_MODE_PENDING_TAINT],
            "{}",
            d.name
        );
    }
    assert!(of(0).iter().all(|d| d.taints.is_none()));
}
