//! Which compute limit a claim's GPU share needs, and whether this node can enforce it:
//! pure functions over the claim object, the inventory and the node's MPS support.
//!
//! A share is an allocation result with `consumedCapacity` (KEP-5075) that does not take
//! the whole GPU: `compute` below 100 or `memory` below the GPU's. `compute` is the MPS
//! active-thread percentage of the claim's namespace; `memory` its pinned device memory
//! limit (a second line behind the cgroup memory limit). An amount the result leaves out
//! is the whole GPU (100 percent, all memory).
//!
//! Rules, and why:
//! - MPS v3 (driver r615+, "MPS v3 Namespaces") gives every share claim its own namespace
//!   on one control daemon per GPU: the namespace's limits are the daemon's, a client
//!   cannot raise them. Every share of such a GPU joins its daemon, a share with compute
//!   100 too (its namespace has 100 percent): the daemon needs EXCLUSIVE_PROCESS, so a
//!   CUDA process outside MPS could not create a context next to it, and a GPU cannot
//!   switch to MPS later under running non-MPS clients.
//! - Legacy MPS v2 (older drivers) has one limit per server and server per UID, and a
//!   client's `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` can only lower it ("Legacy MPS v2
//!   Interface"): pods of different claims running as the same UID would share one server
//!   and its one limit, so per-claim compute is no boundary there. A share with compute
//!   below 100 is not enforceable on v2; one with compute 100 needs nothing (no daemon,
//!   the GPU stays as it is).
//! - A claim with shares of several GPUs cannot be one client of one per-GPU daemon per GPU
//!   through one `CUDA_MPS_PIPE_DIRECTORY`: not enforceable (one claim per GPU is).
//! - A share claim whose opaque GpuConfig sets a sharing strategy on an MPS v3 node is an
//!   error: the GPU's policy is the shared daemon, decided by the node, not the claim.
//!
//! Not enforceable + `--allow-scheduling-only-shares`: [`ComputeDecision::SchedulingOnly`]
//! (said in the claim's device status); otherwise [`ComputeShareError::Unenforceable`].

use k8s_openapi::api::resource::v1::ResourceClaim;
use serde::{Deserialize, Serialize};

use super::memory_limit_plan::{DeviceInput, MEMORY_CAPACITY, consumed_capacity, whole};
use super::policy::Policy;
use crate::inventory::Inventory;

/// The consumable capacity holding a share's percent of the GPU's SMs.
pub const COMPUTE_CAPACITY: &str = "compute";
/// Key of the [`ComputeShareRecord`] in a checkpoint entry's `extra` map.
pub const CHECKPOINT_KEY: &str = "computeShares";
/// First NVIDIA driver branch with MPS v3 (namespaces): the MPS documentation of release
/// 615 introduces it; the r575 edition has none.
pub const FIRST_V3_DRIVER_MAJOR: u32 = 615;

/// Why a share's compute limit cannot be planned or enforced.
#[derive(Debug, thiserror::Error)]
pub enum ComputeShareError {
    /// `consumedCapacity.compute` (or `memory`) is not a whole quantity, or compute > 100.
    #[error(
        "claim {claim_uid}: consumedCapacity.{name} {value:?} of device {device} is not a valid amount (compute: 0..100 percent; memory: bytes)"
    )]
    Quantity {
        /// Claim UID.
        claim_uid: String,
        /// Device name.
        device: String,
        /// `compute` or `memory`.
        name: &'static str,
        /// The value found.
        value: String,
    },
    /// The share cannot be enforced here and scheduling-only shares are not allowed.
    #[error(
        "claim {claim_uid}: the GPU compute share of {gpus} cannot be enforced on this node: {reason}; or let the plugin prepare shares without a limit (--allow-scheduling-only-shares)"
    )]
    Unenforceable {
        /// Claim UID.
        claim_uid: String,
        /// The shares (`device (N% on GPU)`).
        gpus: String,
        /// Why, and what to upgrade.
        reason: String,
    },
    /// The share claim also asks for a sharing strategy in its opaque GpuConfig.
    #[error(
        "claim {claim_uid}: device {device} on GPU {gpu_uuid} is a GPU share (consumedCapacity), and GpuConfig sharing.strategy asks for {strategy}; shares of a GPU run under the GPU's MPS daemon with the limits of their consumed capacity: remove `sharing` from the claim's (or its DeviceClass's) GpuConfig, or ask for the whole GPU"
    )]
    ConflictingConfig {
        /// Claim UID.
        claim_uid: String,
        /// Device name.
        device: String,
        /// GPU UUID.
        gpu_uuid: String,
        /// The strategy asked for.
        strategy: String,
    },
}

/// The compute share of one allocated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeShare {
    /// Device name in the pool.
    pub device: String,
    /// UUID of the physical GPU.
    pub gpu_uuid: String,
    /// Consumed compute, percent of the GPU's SMs (0..=100).
    pub compute_percent: u8,
    /// Consumed memory in whole MiB when below the GPU's (the pinned memory limit).
    pub pinned_memory_mib: Option<u64>,
    /// The claim's sharing policy for the device (opaque config), if any.
    pub policy: Option<Policy>,
}

/// Whether this node's control daemon has MPS v3, decided once at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ComputeSupport {
    /// Why per-claim compute limits cannot be set here; `None`: MPS v3 available.
    pub problem: Option<String>,
}

impl ComputeSupport {
    /// Support from the NVIDIA driver version (`615.71.09`).
    pub fn detect(driver_version: &str) -> Self {
        let major = driver_version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok());
        let problem = major.is_none_or(|m| m < FIRST_V3_DRIVER_MAJOR).then(|| {
            format!(
                "NVIDIA driver {driver_version} has only legacy MPS v2, whose per-server limit a claim's clients share with every client of the same user and whose client setting can only lower it: upgrade the driver to r{FIRST_V3_DRIVER_MAJOR} or newer for MPS v3 namespaces"
            )
        });
        Self { problem }
    }
}

/// What prepare does about a claim's compute shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComputeDecision {
    /// No share, or nothing to enforce.
    Nothing,
    /// Give the claim a namespace on its GPU's daemon with these limits.
    Enforce(ComputeShareRecord),
    /// Prepared without a compute limit (allowed by the admin).
    SchedulingOnly(ComputeShareRecord),
}

/// A claim's compute share as recorded in its checkpoint entry: what was asked and what
/// was set, or why nothing was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeShareRecord {
    /// Device name in the pool.
    pub device: String,
    /// UUID of the physical GPU (the key of its daemon).
    pub gpu_uuid: String,
    /// The claim's MPS v3 namespace on the GPU's server (the claim UID).
    pub namespace: String,
    /// Active thread percentage of the namespace.
    pub active_thread_percentage: u8,
    /// Pinned device memory limit of the namespace, MiB.
    pub pinned_memory_mib: Option<u64>,
    /// Why no limit was set (scheduling-only shares), if so.
    pub scheduling_only: Option<String>,
}

impl ComputeShareRecord {
    /// The record in a checkpoint entry's `extra` map, if any (unreadable: `None`).
    pub fn from_extra(
        extra: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Option<Self> {
        serde_json::from_value(extra.get(CHECKPOINT_KEY)?.clone()).ok()
    }

    /// The record as a checkpoint value.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// The compute shares of `devices` in `claim`'s allocation (results of `driver` in
/// `pool`), with each device's policy from `policies` (same order as `devices`).
///
/// Errors: [`ComputeShareError::Quantity`].
pub fn compute_shares(
    claim: &ResourceClaim,
    driver: &str,
    pool: &str,
    devices: &[(DeviceInput<'_>, Option<&Policy>)],
    inventory: &Inventory,
) -> Result<Vec<ComputeShare>, ComputeShareError> {
    let claim_uid = claim.metadata.uid.clone().unwrap_or_default();
    let mut shares = Vec::new();
    for (input, policy) in devices {
        let Some(consumed) =
            consumed_capacity(claim, driver, pool, input).filter(|c| !c.is_empty())
        else {
            continue;
        };
        let bad = |name, value: &str| ComputeShareError::Quantity {
            claim_uid: claim_uid.clone(),
            device: input.device.to_owned(),
            name,
            value: value.to_owned(),
        };
        let compute = match consumed.get(COMPUTE_CAPACITY) {
            None => 100,
            Some(q) => whole(&q.0)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c <= 100)
                .ok_or_else(|| bad(COMPUTE_CAPACITY, &q.0))?,
        };
        let total = inventory
            .gpus
            .iter()
            .find(|g| g.uuid == input.gpu_uuid)
            .map_or(u64::MAX, |g| g.memory_bytes);
        let memory = match consumed.get(MEMORY_CAPACITY) {
            None => total,
            Some(q) => whole(&q.0).ok_or_else(|| bad(MEMORY_CAPACITY, &q.0))?,
        };
        if compute == 100 && memory >= total {
            continue;
        }
        shares.push(ComputeShare {
            device: input.device.to_owned(),
            gpu_uuid: input.gpu_uuid.to_owned(),
            compute_percent: compute,
            pinned_memory_mib: (memory < total).then_some((memory >> 20).max(1)),
            policy: policy.cloned(),
        });
    }
    Ok(shares)
}

/// Decides what to do with the compute `shares` of claim `claim_uid` on this node.
///
/// Errors: [`ComputeShareError::ConflictingConfig`] (a sharing strategy on a share, MPS v3
/// node), [`ComputeShareError::Unenforceable`] (not enforceable and scheduling-only shares
/// not allowed).
pub fn decide(
    claim_uid: &str,
    shares: Vec<ComputeShare>,
    support: &ComputeSupport,
    allow_scheduling_only: bool,
) -> Result<ComputeDecision, ComputeShareError> {
    let Some(first) = shares.first().cloned() else {
        return Ok(ComputeDecision::Nothing);
    };
    let limited = shares.iter().any(|s| s.compute_percent < 100);
    let reason = match (&support.problem, shares.len()) {
        (Some(_), _) if !limited => return Ok(ComputeDecision::Nothing),
        (Some(problem), _) => Some(problem.clone()),
        (None, 1) => None,
        (None, n) => Some(format!(
            "the claim holds shares of {n} GPUs and a client joins one GPU's MPS daemon: give each GPU share its own claim"
        )),
    };
    if support.problem.is_none()
        && let Some(s) = shares.iter().find(|s| s.policy.is_some())
    {
        return Err(ComputeShareError::ConflictingConfig {
            claim_uid: claim_uid.to_owned(),
            device: s.device.clone(),
            gpu_uuid: s.gpu_uuid.clone(),
            strategy: s.policy.as_ref().map(Policy::to_string).unwrap_or_default(),
        });
    }
    let record = |scheduling_only| ComputeShareRecord {
        device: first.device.clone(),
        gpu_uuid: first.gpu_uuid.clone(),
        namespace: claim_uid.to_owned(),
        active_thread_percentage: first.compute_percent,
        pinned_memory_mib: first.pinned_memory_mib,
        scheduling_only,
    };
    match reason {
        None => Ok(ComputeDecision::Enforce(record(None))),
        Some(reason) if allow_scheduling_only => {
            Ok(ComputeDecision::SchedulingOnly(record(Some(reason))))
        }
        Some(reason) => Err(ComputeShareError::Unenforceable {
            claim_uid: claim_uid.to_owned(),
            gpus: shares
                .iter()
                .map(|s| format!("{} ({}% on {})", s.device, s.compute_percent, s.gpu_uuid))
                .collect::<Vec<_>>()
                .join(", "),
            reason,
        }),
    }
}

#[cfg(test)]
#[path = "compute_share_plan_tests.rs"]
mod tests;
