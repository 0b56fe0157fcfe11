//! Which GPU memory limits a claim needs, on which pod, and whether this node can enforce
//! them: pure functions over the claim object, the inventory and the node's support.
//!
//! The amount is the allocation result's `consumedCapacity["memory"]` (bytes; KEP-5075
//! consumable capacity: the scheduler writes it for devices published with
//! `allowMultipleAllocations`, rounded up to the capacity's request policy). A result
//! consuming the whole GPU (the default consumption of a claim that asks for no amount)
//! needs no limit: that claim has the GPU to itself.
//!
//! The pod is the claim's only `status.reservedFor` pod (the kubelet's prepare request
//! names claims, not pods). A claim reserved for several pods gets no per-pod limit: the
//! kubelet prepares a shared claim once, for whichever pod comes first, so later pods'
//! cgroups are never seen here, and splitting one claim's amount between pods that share
//! its memory has no right answer. Such a claim is treated as not enforceable (see
//! [`decide`]); one claim per pod (a ResourceClaimTemplate) is the enforced form.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::resource::v1::ResourceClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use super::memory_limit::MemoryLimitError;
use super::memory_limit_cgroup::{CgroupFacts, dmem_region};
use crate::claims::PodRef;
use crate::inventory::Inventory;

/// The consumable capacity holding a share's device memory, in bytes.
pub const MEMORY_CAPACITY: &str = "memory";

/// One allocated device of the claim, as the prepare plan knows it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInput<'a> {
    /// Request name as the allocation result has it (`req` or `req/sub`).
    pub request: &'a str,
    /// Device name in the pool (`gpu-0`).
    pub device: &'a str,
    /// UUID of the physical GPU.
    pub gpu_uuid: &'a str,
    /// The device is a MIG device.
    pub mig: bool,
}

/// A device memory amount to enforce on one physical GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryShare {
    /// Device name in the pool.
    pub device: String,
    /// UUID of the physical GPU.
    pub gpu_uuid: String,
    /// NVML PCI bus id of the GPU (`00000000:1B:00.0`).
    pub pci_bus_id: String,
    /// Consumed memory, bytes.
    pub bytes: u64,
    /// Why this GPU cannot take a limit (MIG device or MIG mode), if it cannot.
    pub unsupported: Option<String>,
}

/// Which of NVIDIA's two memory-partitioning backends serves a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Kernel dmem controller (hierarchical: the pod cgroup's limit bounds its containers).
    Dmem,
    /// Driver-internal flat accounting (a limited child cgroup would escape the parent's).
    Misc,
}

impl Backend {
    /// The backend of the GPU with bus id `pci_bus_id`: dmem when the kernel lists its
    /// region in `dmem.capacity`, else misc.
    pub fn of(facts: &CgroupFacts, pci_bus_id: &str) -> Self {
        if facts.dmem_regions.contains(&dmem_region(pci_bus_id)) {
            Backend::Dmem
        } else {
            Backend::Misc
        }
    }
}

/// What the node supports, decided once at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSupport {
    /// Why no limit can be set on this node (old driver, cgroup v1, ...); `None`: supported.
    pub problem: Option<String>,
    /// The cgroup root's facts (dmem regions pick the backend).
    pub facts: CgroupFacts,
}

/// First NVIDIA driver branch with per-cgroup memory limits (r615, CUDA 13.4).
pub const FIRST_DRIVER_MAJOR: u32 = 615;

impl NodeSupport {
    /// Support from the driver version (`615.71.09`), whether the NVML library has the
    /// memory-limit symbols, and the cgroup root's facts.
    pub fn detect(driver_version: &str, symbols: bool, facts: CgroupFacts) -> Self {
        let major = driver_version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok());
        let problem = if major.is_none_or(|m| m < FIRST_DRIVER_MAJOR) {
            Some(format!(
                "NVIDIA driver {driver_version} has no per-cgroup GPU memory limits: upgrade the driver to r{FIRST_DRIVER_MAJOR} or newer (CUDA 13.4)"
            ))
        } else if !symbols {
            Some(format!(
                "the NVML library lacks nvmlDeviceSetMemoryLimits_v1 although the driver reports {driver_version}: install the NVML library of the same r{FIRST_DRIVER_MAJOR}+ driver"
            ))
        } else if !facts.v2 {
            Some(
                "the cgroup root is not a cgroup v2 hierarchy (no cgroup.controllers): boot the node with cgroup v2 and give the plugin the host's /sys/fs/cgroup (--cgroup-root)"
                    .to_owned(),
            )
        } else {
            None
        };
        Self { problem, facts }
    }
}

/// What prepare does about a claim's memory shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No share needs a limit.
    Nothing,
    /// Limit each share on the pod's cgroup.
    Enforce {
        /// The pod the claim is reserved for.
        pod: PodRef,
        /// Shares with the backend that serves each GPU.
        shares: Vec<(MemoryShare, Backend)>,
    },
    /// The admin allows scheduling-only shares and this claim's cannot be enforced.
    SchedulingOnly {
        /// Why not, and what would make it enforced.
        reason: String,
    },
}

/// The memory shares of `devices` in `claim`'s allocation (results of `driver` in `pool`).
///
/// Errors: [`MemoryLimitError::Quantity`] for a consumed amount that is not a
/// non-negative quantity.
pub fn memory_shares(
    claim: &ResourceClaim,
    driver: &str,
    pool: &str,
    devices: &[DeviceInput<'_>],
    inventory: &Inventory,
) -> Result<Vec<MemoryShare>, MemoryLimitError> {
    let claim_uid = claim.metadata.uid.clone().unwrap_or_default();
    let mut shares = Vec::new();
    for input in devices {
        let Some(quantity) =
            consumed_capacity(claim, driver, pool, input).and_then(|c| c.get(MEMORY_CAPACITY))
        else {
            continue;
        };
        let bytes = whole(&quantity.0).ok_or_else(|| MemoryLimitError::Quantity {
            claim_uid: claim_uid.clone(),
            device: input.device.to_owned(),
            value: quantity.0.clone(),
        })?;
        let gpu = inventory.gpus.iter().find(|g| g.uuid == input.gpu_uuid);
        let total = gpu.map_or(u64::MAX, |g| g.memory_bytes);
        if bytes >= total {
            continue;
        }
        let unsupported = if input.mig || gpu.is_some_and(|g| g.mig.enabled) {
            Some(format!(
                "GPU {} is in MIG mode and NVML memory limits do not support MIG: publish shares of GPUs with MIG disabled",
                input.gpu_uuid
            ))
        } else {
            None
        };
        shares.push(MemoryShare {
            device: input.device.to_owned(),
            gpu_uuid: input.gpu_uuid.to_owned(),
            pci_bus_id: gpu.map(|g| g.pci_bus_id.clone()).unwrap_or_default(),
            bytes,
            unsupported,
        });
    }
    Ok(shares)
}

/// `q` as a whole non-negative number (a Kubernetes quantity: `4Gi` is 4294967296);
/// `None` when it is not a quantity or is negative or above `u64`.
pub(super) fn whole(q: &str) -> Option<u64> {
    crate::config::quantity::parse_quantity(q)
        .ok()
        .and_then(|b| u64::try_from(b).ok())
}

/// The `consumedCapacity` of `input`'s allocation result in `claim` (result of `driver`
/// in `pool` for that device and request); `None` when the claim has no such result or
/// the result consumes nothing recorded.
pub(crate) fn consumed_capacity<'c>(
    claim: &'c ResourceClaim,
    driver: &str,
    pool: &str,
    input: &DeviceInput<'_>,
) -> Option<&'c BTreeMap<String, Quantity>> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|r| {
            r.driver == driver
                && r.pool == pool
                && r.device == input.device
                && r.request == input.request
        })
        .and_then(|r| r.consumed_capacity.as_ref())
}

/// The pods of `claim`'s `status.reservedFor` (core `pods` entries only), sorted.
pub fn reserved_pods(claim: &ResourceClaim) -> Vec<PodRef> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let pods: BTreeSet<PodRef> = claim
        .status
        .as_ref()
        .and_then(|s| s.reserved_for.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or("").is_empty())
        .map(|r| PodRef {
            namespace: namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        })
        .collect();
    pods.into_iter().collect()
}

/// Decides what to do with `shares` of claim `claim_uid` reserved for `pods`.
///
/// Errors: [`MemoryLimitError::Unenforceable`] when a share cannot be enforced here and
/// scheduling-only shares are not allowed; the message says why and what to change.
pub fn decide(
    claim_uid: &str,
    shares: Vec<MemoryShare>,
    pods: &[PodRef],
    support: &NodeSupport,
    allow_scheduling_only: bool,
) -> Result<Decision, MemoryLimitError> {
    if shares.is_empty() {
        return Ok(Decision::Nothing);
    }
    let reason = support
        .problem
        .clone()
        .or_else(|| shares.iter().find_map(|s| s.unsupported.clone()))
        .or_else(|| match pods {
            [_] => None,
            [] => Some("the claim is reserved for no pod".to_owned()),
            many => Some(format!(
                "the claim is shared by {} pods and a per-pod memory limit needs one claim per pod: give each pod its own claim (a ResourceClaimTemplate)",
                many.len()
            )),
        });
    match (reason, pods) {
        (None, [pod]) => Ok(Decision::Enforce {
            pod: pod.clone(),
            shares: shares
                .into_iter()
                .map(|s| {
                    let backend = Backend::of(&support.facts, &s.pci_bus_id);
                    (s, backend)
                })
                .collect(),
        }),
        (Some(reason), _) if allow_scheduling_only => Ok(Decision::SchedulingOnly { reason }),
        (reason, _) => Err(MemoryLimitError::Unenforceable {
            claim_uid: claim_uid.to_owned(),
            gpus: shares
                .iter()
                .map(|s| format!("{} ({} bytes on {})", s.device, s.bytes, s.gpu_uuid))
                .collect::<Vec<_>>()
                .join(", "),
            reason: reason.unwrap_or_default(),
        }),
    }
}
