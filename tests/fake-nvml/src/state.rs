//! The persisted state shared by every process using the fake: what a real GPU would
//! remember (compute mode, time slice, MIG mode, GPU and compute instances) plus test
//! controls (injected faults, XID events) and MPS control daemon records.
//!
//! Owns the serialisable shape only; rules live in `engine`, file handling in `store`.
//! Sorted maps everywhere so the JSON file is deterministic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Compute mode of a GPU (`nvmlComputeMode_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ComputeMode {
    /// `NVML_COMPUTEMODE_DEFAULT` (0): many contexts per device.
    #[default]
    Default,
    /// `NVML_COMPUTEMODE_PROHIBITED` (2): no contexts.
    Prohibited,
    /// `NVML_COMPUTEMODE_EXCLUSIVE_PROCESS` (3): one process (or one MPS server).
    ExclusiveProcess,
}

impl ComputeMode {
    /// The `nvmlComputeMode_t` value.
    pub fn nvml(self) -> u32 {
        match self {
            ComputeMode::Default => 0,
            ComputeMode::Prohibited => 2,
            ComputeMode::ExclusiveProcess => 3,
        }
    }

    /// From an `nvmlComputeMode_t` value; `None` for 1 (EXCLUSIVE_THREAD, removed) and others.
    pub fn from_nvml(v: u32) -> Option<Self> {
        match v {
            0 => Some(ComputeMode::Default),
            2 => Some(ComputeMode::Prohibited),
            3 => Some(ComputeMode::ExclusiveProcess),
            _ => None,
        }
    }

    /// The name `nvidia-smi -q` prints (`Default`, `Prohibited`, `Exclusive_Process`).
    pub fn smi_name(self) -> &'static str {
        match self {
            ComputeMode::Default => "Default",
            ComputeMode::Prohibited => "Prohibited",
            ComputeMode::ExclusiveProcess => "Exclusive_Process",
        }
    }
}

/// One compute instance (and so one MIG device) inside a GPU instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeInstanceState {
    /// Compute instance id within its GPU instance.
    pub id: u32,
    /// NVML compute instance profile id (`NVML_COMPUTE_INSTANCE_PROFILE_*`).
    pub profile_id: u32,
    /// Placement start, in compute slices of the GPU instance.
    pub placement_start: u32,
    /// Placement size, in compute slices.
    pub placement_size: u32,
    /// MIG device UUID (`MIG-...`).
    pub uuid: String,
}

/// One GPU instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInstanceState {
    /// GPU instance id.
    pub id: u32,
    /// Driver GPU instance profile id (19, 15, 14, 9, 5, 0 ...).
    pub profile_id: u32,
    /// Placement start, in memory slices.
    pub placement_start: u32,
    /// Placement size, in memory slices.
    pub placement_size: u32,
    /// Compute instances by id.
    pub compute_instances: BTreeMap<u32, ComputeInstanceState>,
}

/// What one GPU remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuState {
    /// NVML index (copied from the topology).
    pub index: u32,
    /// Device minor number, `/dev/nvidia<minor>` (copied from the topology).
    pub minor: u32,
    /// Compute mode.
    pub compute_mode: ComputeMode,
    /// Time-slice setting of `nvidia-smi compute-policy --set-timeslice` (0 default,
    /// 1 short, 2 medium, 3 long).
    pub timeslice: u32,
    /// Current MIG mode.
    pub mig_current: bool,
    /// Pending MIG mode.
    pub mig_pending: bool,
    /// GPU instances by id.
    pub gpu_instances: BTreeMap<u32, GpuInstanceState>,
}

/// How many times an injected fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Times {
    /// The next matching call only.
    Once,
    /// The next N matching calls.
    N(u32),
    /// Every matching call until cleared.
    Always,
}

/// [`Fault::error`] value for "reports success and changes nothing": `NVML_SUCCESS` (0).
/// A setter (`nvmlDeviceSetComputeMode`, `nvidia-smi -c`, `nvidia-smi compute-policy
/// --set-timeslice`, an `nvidia-cuda-mps-control` command) then returns success, exit 0
/// and its usual output, while the GPU or daemon keeps its old value: a setting that does
/// not take, which only a read-back detects. Meant for setters; a getter given it returns
/// success without filling its outputs.
pub const NO_EFFECT: u32 = 0;

/// An injected failure: `function` (an NVML symbol name such as `nvmlDeviceSetComputeMode`,
/// or an `nvidia-smi` operation such as `nvidia-smi compute-policy`) returns `error`
/// ([`NO_EFFECT`]: succeeds without effect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Exact symbol name, e.g. `nvmlDeviceCreateGpuInstanceWithPlacement`.
    pub function: String,
    /// Only calls on this GPU (full-GPU UUID; MIG handles count as their parent); `None` = any.
    pub gpu_uuid: Option<String>,
    /// The `nvmlReturn_t` to return, e.g. 999 (`NVML_ERROR_UNKNOWN`).
    pub error: u32,
    /// How many times it fires.
    pub times: Times,
}

/// An injected XID critical error, delivered through NVML event sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct XidEvent {
    /// Monotonic sequence number (starts at 1).
    pub seq: u64,
    /// Full-GPU UUID.
    pub gpu_uuid: String,
    /// XID number (`eventData`), e.g. 79 (fallen off the bus) or 48 (DBE).
    pub xid: u64,
}

/// One MPS control daemon started with `nvidia-cuda-mps-control -d`, and what clients told it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MpsDaemon {
    /// `CUDA_MPS_PIPE_DIRECTORY` (the key).
    pub pipe_dir: String,
    /// `CUDA_MPS_LOG_DIRECTORY`.
    pub log_dir: String,
    /// `CUDA_VISIBLE_DEVICES` at start, if set.
    pub visible_devices: Option<String>,
    /// Process id of the background daemon process.
    pub pid: u32,
    /// False once `quit` was received (the record is kept for inspection).
    pub running: bool,
    /// Last `set_default_active_thread_percentage` value.
    pub default_active_thread_percentage: Option<f64>,
    /// `set_default_device_pinned_mem_limit <dev> <limit>` values by device.
    pub default_device_pinned_mem_limits: BTreeMap<String, String>,
    /// Every command line received, in order.
    pub commands: Vec<String>,
    /// Control protocol of the daemon: 2 (legacy, the default) or 3 (`-p 3`, MPS v3).
    #[serde(default = "protocol_two")]
    pub protocol: u8,
    /// Started with `-m` (multi-user mode).
    #[serde(default)]
    pub multiuser: bool,
    /// MPS v3 named servers (`server create`), by name, with their namespaces.
    #[serde(default)]
    pub servers: BTreeMap<String, MpsServer>,
}

fn protocol_two() -> u8 {
    2
}

/// One MPS v3 named server of a control daemon, and its namespaces.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MpsServer {
    /// `allowed_devices` given at `server create` (GPU UUIDs, comma-separated).
    pub allowed_devices: Option<String>,
    /// Namespaces by name (`namespace create`); the implicit `default` one is not listed.
    pub namespaces: BTreeMap<String, MpsNamespace>,
}

/// The limits of one MPS v3 namespace, as `namespace set` left them ("what the GPU
/// recorded" for a claim).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MpsNamespace {
    /// `active_thread_percentage` (percent of the SMs a client of the namespace may use).
    pub active_thread_percentage: Option<f64>,
    /// `pinned_memory_limit` as given (`18432M`).
    pub pinned_memory_limit: Option<String>,
}

/// The whole persisted state (`<topology>.state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Per GPU, by full-GPU UUID. Filled from the topology on first use.
    pub gpus: BTreeMap<String, GpuState>,
    /// Counter making re-created MIG devices get fresh UUIDs.
    pub mig_generation: u64,
    /// Pending injected faults, matched in order.
    pub faults: Vec<Fault>,
    /// Injected XID events (never removed; event sets keep their own cursor).
    pub xid_events: Vec<XidEvent>,
    /// MPS control daemons by pipe directory.
    pub mps_daemons: BTreeMap<String, MpsDaemon>,
    /// Per-cgroup memory limits (`nvmlDeviceSetMemoryLimits_v1`): full-GPU UUID ->
    /// cgroup directory (the `nameSpace` as given) -> limits. Cleared limits (soft 0, hard
    /// `NVML_DEVICE_MEMORY_LIMIT_MAX`) and limits of removed cgroups are absent.
    #[serde(default)]
    pub memory_limits: BTreeMap<String, BTreeMap<String, MemoryLimit>>,
}

/// Soft and hard device-memory limit of one cgroup on one GPU, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryLimit {
    /// Guaranteed bytes (dmem: `dmem.min`); 0 = none.
    pub soft_limit: u64,
    /// Most bytes the cgroup may allocate (dmem: `dmem.max`); `u64::MAX` = none.
    pub hard_limit: u64,
}

impl State {
    /// The GPU with NVML index `index`.
    pub fn gpu_by_index(&self, index: u32) -> Option<(&String, &GpuState)> {
        self.gpus.iter().find(|(_, g)| g.index == index)
    }

    /// Consume the first fault matching `function` on any GPU of `visible` (a
    /// `CUDA_VISIBLE_DEVICES` list of GPU/MIG UUIDs; a MIG UUID counts as its parent GPU),
    /// or a GPU-less fault when `visible` names none. Used by the tools, which see UUIDs
    /// rather than NVML handles.
    pub fn take_fault_visible(&mut self, function: &str, visible: Option<&str>) -> Option<u32> {
        let gpus: Vec<String> = visible
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| self.parent_uuid(u).unwrap_or_else(|| u.to_string()))
            .collect();
        if gpus.is_empty() {
            return self.take_fault(function, None);
        }
        gpus.iter().find_map(|g| self.take_fault(function, Some(g)))
    }

    fn parent_uuid(&self, uuid: &str) -> Option<String> {
        self.gpus.iter().find_map(|(gpu, g)| {
            g.gpu_instances
                .values()
                .flat_map(|gi| gi.compute_instances.values())
                .any(|ci| ci.uuid == uuid)
                .then(|| gpu.clone())
        })
    }

    /// Consume the first fault matching `function` on `gpu_uuid`; its error if one fired.
    pub fn take_fault(&mut self, function: &str, gpu_uuid: Option<&str>) -> Option<u32> {
        let pos = self.faults.iter().position(|f| {
            f.function == function
                && match (&f.gpu_uuid, gpu_uuid) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want == got,
                    (Some(_), None) => false,
                }
        })?;
        let error = self.faults[pos].error;
        match self.faults[pos].times {
            Times::Always => {}
            Times::Once | Times::N(0) | Times::N(1) => {
                self.faults.remove(pos);
            }
            Times::N(n) => self.faults[pos].times = Times::N(n - 1),
        }
        Some(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(gpu: Option<&str>, times: Times) -> Fault {
        Fault {
            function: "nvmlDeviceSetComputeMode".into(),
            gpu_uuid: gpu.map(str::to_string),
            error: 999,
            times,
        }
    }

    #[test]
    fn faults_fire_the_requested_number_of_times() {
        let mut s = State::default();
        s.faults.push(fault(Some("GPU-a"), Times::N(2)));
        assert_eq!(
            s.take_fault("nvmlDeviceSetComputeMode", Some("GPU-b")),
            None
        );
        assert_eq!(
            s.take_fault("nvmlDeviceGetComputeMode", Some("GPU-a")),
            None
        );
        assert_eq!(
            s.take_fault("nvmlDeviceSetComputeMode", Some("GPU-a")),
            Some(999)
        );
        assert_eq!(
            s.take_fault("nvmlDeviceSetComputeMode", Some("GPU-a")),
            Some(999)
        );
        assert_eq!(
            s.take_fault("nvmlDeviceSetComputeMode", Some("GPU-a")),
            None
        );
        s.faults.push(fault(None, Times::Always));
        for _ in 0..3 {
            assert_eq!(s.take_fault("nvmlDeviceSetComputeMode", None), Some(999));
        }
        s.faults.clear();
        s.faults.push(fault(None, Times::Once));
        assert_eq!(
            s.take_fault("nvmlDeviceSetComputeMode", Some("GPU-x")),
            Some(999)
        );
        assert!(s.faults.is_empty());
    }

    #[test]
    fn compute_mode_values_match_nvml() {
        for m in [
            ComputeMode::Default,
            ComputeMode::Prohibited,
            ComputeMode::ExclusiveProcess,
        ] {
            assert_eq!(ComputeMode::from_nvml(m.nvml()), Some(m));
        }
        assert_eq!(ComputeMode::from_nvml(1), None);
    }
}
