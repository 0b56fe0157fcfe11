//! Tests of per-pod memory limits: planning from claim objects, the decision, and the
//! limiter over a recording fake of the NVML seam in a temp cgroup tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::resource::v1::ResourceClaim;
use nvml_wrapper::error::NvmlError;
use serde_json::json;

use super::memory_limit::{
    CLEARED, Limits, MemoryLimitControl, MemoryLimitError, MemoryLimitSettings, MemoryLimiter,
    NvmlCallError,
};
use super::memory_limit_plan::{
    Backend, Decision, DeviceInput, NodeSupport, decide, memory_shares, reserved_pods,
};
use crate::inventory::fixtures;

const GIB: u64 = 1 << 30;

/// Records limits per (GPU, cgroup); `fail_set` makes every set fail with that error,
/// `lie` makes reads return half the hard limit.
#[derive(Default)]
pub(crate) struct FakeLimits {
    pub limits: Mutex<BTreeMap<(String, PathBuf), Limits>>,
    pub fail_set: Mutex<Option<NvmlError>>,
    pub lie: bool,
}

impl MemoryLimitControl for FakeLimits {
    fn set(&self, gpu_uuid: &str, cgroup: &Path, limits: Limits) -> Result<(), NvmlCallError> {
        if let Some(err) = self.fail_set.lock().unwrap().take() {
            return Err(NvmlCallError {
                function: "nvmlDeviceSetMemoryLimits_v1",
                source: err,
            });
        }
        let key = (gpu_uuid.to_owned(), cgroup.to_owned());
        let mut map = self.limits.lock().unwrap();
        if limits == CLEARED {
            map.remove(&key);
        } else {
            map.insert(key, limits);
        }
        Ok(())
    }

    fn get(&self, gpu_uuid: &str, cgroup: &Path) -> Result<Limits, NvmlCallError> {
        let key = (gpu_uuid.to_owned(), cgroup.to_owned());
        let got = self
            .limits
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(CLEARED);
        Ok(if self.lie {
            Limits {
                soft: got.soft,
                hard: got.hard / 2,
            }
        } else {
            got
        })
    }
}

fn claim(consumed: Option<&str>, pods: &[(&str, &str)]) -> ResourceClaim {
    let mut result = json!({"request": "gpu", "driver": "gpu.gpu-dra.dev", "pool": "node-a", "device": "gpu-0", "shareID": "s1"});
    if let Some(c) = consumed {
        result["consumedCapacity"] = json!({"memory": c, "compute": "40"});
    }
    let reserved: Vec<_> = pods
        .iter()
        .map(|(name, uid)| json!({"resource": "pods", "name": name, "uid": uid}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": "c", "uid": "claim-1"},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [result]}}, "reservedFor": reserved},
    }))
    .unwrap()
}

fn input(gpu_uuid: &str) -> DeviceInput<'_> {
    DeviceInput {
        request: "gpu",
        device: "gpu-0",
        gpu_uuid,
        mig: false,
    }
}

fn supported(root: &Path) -> NodeSupport {
    NodeSupport::detect(
        "615.71.09",
        true,
        super::memory_limit_cgroup::CgroupFacts::read(root),
    )
}

#[test]
fn shares_come_from_consumed_capacity_and_skip_whole_gpus() {
    let inv = fixtures::dgx_h100();
    let gpu = inv.gpus[0].uuid.clone();
    let c = claim(Some("18Gi"), &[("tgi-0", "pod-1")]);
    let shares = memory_shares(&c, "gpu.gpu-dra.dev", "node-a", &[input(&gpu)], &inv).unwrap();
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].bytes, 18 * GIB);
    assert_eq!(shares[0].unsupported, None);
    // The default consumption (the whole GPU) and no consumption need no limit.
    let whole = format!("{}", inv.gpus[0].memory_bytes);
    let c = claim(Some(&whole), &[("tgi-0", "pod-1")]);
    assert!(
        memory_shares(&c, "gpu.gpu-dra.dev", "node-a", &[input(&gpu)], &inv)
            .unwrap()
            .is_empty()
    );
    let c = claim(None, &[("tgi-0", "pod-1")]);
    assert!(
        memory_shares(&c, "gpu.gpu-dra.dev", "node-a", &[input(&gpu)], &inv)
            .unwrap()
            .is_empty()
    );
    let c = claim(Some("lots"), &[("tgi-0", "pod-1")]);
    let err = memory_shares(&c, "gpu.gpu-dra.dev", "node-a", &[input(&gpu)], &inv).unwrap_err();
    assert!(matches!(err, MemoryLimitError::Quantity { .. }), "{err}");
}

#[test]
fn decision_needs_support_and_one_pod() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "memory dmem\n").unwrap();
    let inv = fixtures::dgx_h100();
    let gpu = inv.gpus[0].uuid.clone();
    let one = claim(Some("18Gi"), &[("tgi-0", "pod-1")]);
    let shares = || memory_shares(&one, "gpu.gpu-dra.dev", "node-a", &[input(&gpu)], &inv).unwrap();
    let pods = reserved_pods(&one);

    let d = decide("claim-1", shares(), &pods, &supported(root.path()), false).unwrap();
    assert!(
        matches!(&d, Decision::Enforce { pod, shares } if pod.uid == "pod-1" && shares[0].1 == Backend::Misc)
    );

    // Old driver: refused unless scheduling-only shares are allowed; the reason names the upgrade.
    let old = NodeSupport::detect("570.124.06", true, Default::default());
    let err = decide("claim-1", shares(), &pods, &old, false).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("r615")
            && text.contains(&gpu)
            && text.contains("--allow-scheduling-only-shares"),
        "{text}"
    );
    let d = decide("claim-1", shares(), &pods, &old, true).unwrap();
    assert!(
        matches!(d, Decision::SchedulingOnly { reason } if reason.contains("upgrade the driver"))
    );

    // cgroup v1 and a library without the symbols.
    let v1 = NodeSupport::detect("615.71.09", true, Default::default());
    assert!(v1.problem.unwrap().contains("cgroup v2"));
    let no_symbols = NodeSupport::detect("615.71.09", false, Default::default());
    assert!(
        no_symbols
            .problem
            .unwrap()
            .contains("nvmlDeviceSetMemoryLimits_v1")
    );

    // A claim shared by two pods gets no per-pod limit.
    let two = claim(Some("18Gi"), &[("a", "pod-1"), ("b", "pod-2")]);
    let err = decide(
        "claim-1",
        shares(),
        &reserved_pods(&two),
        &supported(root.path()),
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("shared by 2 pods"), "{err}");
}

#[test]
fn dmem_regions_pick_the_backend() {
    let root = tempfile::tempdir().unwrap();
    let inv = fixtures::dgx_h100();
    let gpu = &inv.gpus[0];
    std::fs::write(root.path().join("cgroup.controllers"), "memory dmem\n").unwrap();
    std::fs::write(
        root.path().join("dmem.capacity"),
        format!(
            "{} {}\n",
            super::memory_limit_cgroup::dmem_region(&gpu.pci_bus_id),
            gpu.memory_bytes
        ),
    )
    .unwrap();
    let one = claim(Some("18Gi"), &[("tgi-0", "pod-1")]);
    let shares =
        memory_shares(&one, "gpu.gpu-dra.dev", "node-a", &[input(&gpu.uuid)], &inv).unwrap();
    let d = decide(
        "claim-1",
        shares,
        &reserved_pods(&one),
        &supported(root.path()),
        false,
    )
    .unwrap();
    assert!(matches!(&d, Decision::Enforce { shares, .. } if shares[0].1 == Backend::Dmem));
}

fn limiter(root: &Path, control: Arc<FakeLimits>) -> MemoryLimiter {
    std::fs::write(root.join("cgroup.controllers"), "memory dmem\n").unwrap();
    MemoryLimiter::new(
        Some(control),
        "615.71.09",
        MemoryLimitSettings {
            cgroup_root: root.to_owned(),
            allow_scheduling_only: false,
        },
    )
}

fn enforce(gpu: &str) -> Decision {
    let inv = fixtures::dgx_h100();
    let one = claim(Some("18Gi"), &[("tgi-0", "pod-1")]);
    let shares = memory_shares(&one, "gpu.gpu-dra.dev", "node-a", &[input(gpu)], &inv).unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "x\n").unwrap();
    decide(
        "claim-1",
        shares,
        &reserved_pods(&one),
        &supported(root.path()),
        false,
    )
    .unwrap()
}

#[test]
fn limiter_sets_reads_back_and_clears_the_pod_cgroup() {
    let root = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeLimits::default());
    let l = limiter(root.path(), Arc::clone(&fake));
    let gpu = fixtures::dgx_h100().gpus[0].uuid.clone();
    let decision = enforce(&gpu);

    // The kubelet has not created the pod cgroup yet: a retryable error naming the pod.
    let err = l.locate("claim-1", &decision).unwrap_err();
    assert!(
        matches!(&err, MemoryLimitError::PodCgroupMissing { pod, .. } if pod.uid == "pod-1"),
        "{err}"
    );

    let cgroup = root.path().join("kubepods/burstable/podpod-1");
    std::fs::create_dir_all(&cgroup).unwrap();
    let limits = l.locate("claim-1", &decision).unwrap();
    assert_eq!(limits[0].cgroup, cgroup);
    l.apply("claim-1", &limits).unwrap();
    let key = (gpu.clone(), cgroup.clone());
    assert_eq!(
        fake.limits.lock().unwrap()[&key],
        Limits {
            soft: 18 * GIB,
            hard: 18 * GIB
        }
    );

    l.clear("claim-1", &limits).unwrap();
    assert!(fake.limits.lock().unwrap().is_empty());

    // A cgroup already removed counts as cleared, without an NVML call.
    l.apply("claim-1", &limits).unwrap();
    std::fs::remove_dir(&cgroup).unwrap();
    *fake.fail_set.lock().unwrap() = Some(NvmlError::Unknown);
    l.clear("claim-1", &limits).unwrap();
}

#[test]
fn limiter_fails_the_claim_when_nvml_refuses_or_does_not_keep_the_limit() {
    let root = tempfile::tempdir().unwrap();
    let gpu = fixtures::dgx_h100().gpus[0].uuid.clone();
    std::fs::create_dir_all(root.path().join("kubepods/podpod-1")).unwrap();
    let fake = Arc::new(FakeLimits::default());
    *fake.fail_set.lock().unwrap() = Some(NvmlError::NoPermission);
    let l = limiter(root.path(), Arc::clone(&fake));
    let limits = l.locate("claim-1", &enforce(&gpu)).unwrap();
    let err = l.apply("claim-1", &limits).unwrap_err();
    let text = crate::prepare::error_chain(&err);
    assert!(
        text.contains(&gpu)
            && text.contains("tgi-0")
            && text.contains("kubepods/podpod-1")
            && text.contains("r615"),
        "{text}"
    );

    let liar = Arc::new(FakeLimits {
        lie: true,
        ..FakeLimits::default()
    });
    let l = limiter(root.path(), Arc::clone(&liar));
    let err = l.apply("claim-1", &limits).unwrap_err();
    assert!(matches!(err, MemoryLimitError::ReadBack { .. }), "{err}");
    // Nothing of the failed apply stays set.
    assert!(liar.limits.lock().unwrap().is_empty());
}
