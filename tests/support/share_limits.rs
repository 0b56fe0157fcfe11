//! What the node enforced for each share, as the fake GPU recorded it: the hard and soft
//! device-memory limit NVML holds for the pod's cgroup (`nvmlDeviceSetMemoryLimits_v1`,
//! the fake's `memoryLimits` state: GPU UUID -> cgroup directory -> limits), the claim's
//! `GPUMemoryLimitEnforced` device condition, and the compute column.
//!
//! Owns: finding a pod's cgroup among the recorded limits (by the kubelet's pod cgroup
//! names, `pod<uid>` for cgroupfs, `...-pod<uid with _>.slice` for systemd), the fake
//! kernel's `dmem.capacity` of a share node, and the limit columns of the share report.
//! Must not: hold product logic.
//!
//! Compute: the scheduler's `consumedCapacity.compute` is shown as allocated; what the GPU
//! enforces for it would be the claim's MPS limit as the fake's MPS control daemon
//! recorded it. No such per-claim record exists yet, so the column says the share's
//! compute is not enforced on this node. A recorded compute limit plugs in at
//! [`compute_limit`].

use std::fmt::Write as _;
use std::path::PathBuf;

use nvidia_ml::control::State;

use super::cluster::TestBox;
use super::driver::FakeGpus;

/// The device-memory limits one pod cgroup holds on one GPU, as the fake GPU recorded them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedLimit {
    /// The GPU holding the limit.
    pub gpu_uuid: String,
    /// The cgroup directory (NVML `nameSpace`).
    pub cgroup: String,
    /// Soft limit, bytes (`dmem.min` on the dmem backend).
    pub soft: u64,
    /// Hard limit, bytes (`dmem.max`).
    pub hard: u64,
}

/// True when `cgroup` is the pod cgroup of pod `uid` (cgroupfs or systemd naming).
pub fn is_pod_cgroup(cgroup: &str, uid: &str) -> bool {
    let leaf = cgroup.rsplit('/').next().unwrap_or_default();
    leaf == format!("pod{uid}") || leaf.ends_with(&format!("-pod{}.slice", uid.replace('-', "_")))
}

/// Every limit the fake GPUs of `state` hold for pod `uid`'s cgroup.
pub fn recorded_limits(state: &State, uid: &str) -> Vec<RecordedLimit> {
    let mut out = Vec::new();
    for (gpu, by_cgroup) in &state.memory_limits {
        for (cgroup, limit) in by_cgroup {
            if !uid.is_empty() && is_pod_cgroup(cgroup, uid) {
                out.push(RecordedLimit {
                    gpu_uuid: gpu.clone(),
                    cgroup: cgroup.clone(),
                    soft: limit.soft_limit,
                    hard: limit.hard_limit,
                });
            }
        }
    }
    out
}

/// Number of cgroups holding a limit on any GPU of `state`.
pub fn limit_count(state: &State) -> usize {
    state.memory_limits.values().map(|m| m.len()).sum()
}

/// The node's fake cgroup root (the box's `/sys/fs/cgroup` of `node`).
pub fn cgroup_root(b: &TestBox, node: &str) -> PathBuf {
    b.kubelet_root(node)
        .parent()
        .map(|p| p.join("cgroup"))
        .unwrap_or_default()
}

/// Registers every GPU of `gpus` with the fake kernel's dmem controller of `node`
/// (`<cgroup root>/dmem.capacity`: `nvidia/<pci>/vidmem <bytes>` per GPU), as a 6.14+
/// kernel does for a dmem-backed driver. Needed before the plugin starts (it picks the
/// backend per GPU from this file) and before the pods (the node agent gives each pod
/// cgroup the `dmem.*` lines of these regions).
pub fn register_dmem_regions(b: &TestBox, node: &str, gpus: &FakeGpus) -> anyhow::Result<()> {
    let topo = nvidia_ml::control::load_topology(&gpus.topology())?;
    let mut capacity = String::new();
    for gpu in &topo.gpus {
        let _ = writeln!(
            capacity,
            "{} {}",
            nvidia_ml::memory_limits::dmem_region(&gpu.pci_bus_id),
            gpu.model.memory_mib * 1024 * 1024
        );
    }
    let root = cgroup_root(b, node);
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("dmem.capacity"), capacity)?;
    Ok(())
}

/// Type of the device condition saying whether a share's memory limit is set.
pub const MEMORY_CONDITION: &str = gpu_dra::sharing::memory_limit_status::CONDITION_TYPE;

/// The claim's `GPUMemoryLimitEnforced` device condition, as the plugin wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryCondition {
    /// `True` or `False`.
    pub status: String,
    /// `HardLimitSet` or `SchedulingOnly`.
    pub reason: String,
    /// The limit and cgroup, or why there is none.
    pub message: String,
}

/// The compute column of a share: the enforced compute limit as the fake GPU recorded it,
/// or why there is none. Today no per-claim compute limit is recorded (MPS per-claim
/// limits are not applied to shares), so a share of the SMs is not enforced on this node;
/// a claim consuming 100% has the SMs to itself and needs no limit.
pub fn compute_limit(consumed_compute: Option<&str>) -> String {
    match consumed_compute {
        None => "-".to_owned(),
        Some("100") => "whole GPU".to_owned(),
        Some(_) => "not enforced on this node".to_owned(),
    }
}

/// `18Gi` for 19327352832: the largest binary unit dividing `bytes`, else bytes.
pub fn binary_bytes(bytes: u64) -> String {
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}
