//! What preparing one claim means on this node (pure): which physical GPU and MIG device
//! each allocated device is, and which sharing policy applies to it.
//!
//! Inputs are the claim object, the node's [`Inventory`] and the driver and pool names;
//! nothing here touches hardware or files. Config resolution follows the precedence of
//! [`crate::config::resolve`] (class configs, then claim configs; request-specific
//! beats general), and every resolved config is checked against its device
//! ([`validate_for_device`]).

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::ResourceClaim;
use thiserror::Error;

use super::allocation::{AllocatedDevice, AllocationError, allocated_devices};
use crate::config::{
    self, Config, DeviceFacts, EntryError, Sharing, TimeSliceInterval, join_errors,
    validate_for_device,
};
use crate::inventory::{DeviceRef, Inventory, Placement};
use crate::sharing::{MpsLimits, Policy, TimeSlice};
use crate::slices::partitionable;

/// The MIG part of a planned device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigTarget {
    /// MIG device UUID (`MIG-...`).
    pub uuid: String,
    /// GPU instance id (NVML `nvmlDeviceGetGpuInstanceId`).
    pub gi_id: u32,
    /// Compute instance id (NVML `nvmlDeviceGetComputeInstanceId`).
    pub ci_id: u32,
}

/// One allocated device, resolved against the node's inventory and configs.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    /// The allocation result entry.
    pub allocated: AllocatedDevice,
    /// UUID of the physical GPU the device lives on.
    pub gpu_uuid: String,
    /// NVML minor number of that GPU (`/dev/nvidia<minor>`).
    pub gpu_minor: u32,
    /// Set for MIG devices.
    pub mig: Option<MigTarget>,
    /// Sharing policy for the physical GPU; `None` leaves the GPU's policy as it is.
    pub policy: Option<Policy>,
    /// Set for a dynamic MIG placement: the instance to create (then `mig` is filled).
    pub dynamic: Option<DynamicPlan>,
    /// Set for the full GPU of a dynamic MIG GPU (Hopper+): MIG mode is switched off for
    /// the claim. The GPU's GPU instance profile ids, to check that no instance is left.
    pub full_of_dynamic: Option<Vec<u32>>,
}

/// A dynamic MIG placement to create at prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicPlan {
    /// GPU instance profile id.
    pub gi_profile_id: u32,
    /// Placement in memory slices.
    pub placement: Placement,
    /// Every GPU instance profile id of the GPU (to look for overlapping instances).
    pub gpu_profile_ids: Vec<u32>,
}

impl DevicePlan {
    /// UUID a container sees: the MIG UUID for MIG devices, else the GPU UUID.
    pub fn visible_uuid(&self) -> &str {
        self.mig.as_ref().map_or(&self.gpu_uuid, |m| &m.uuid)
    }
}

/// Devices of one claim that share one policy, applied together.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyGroup {
    /// Physical GPU UUIDs, sorted, without duplicates.
    pub gpu_uuids: Vec<String>,
    /// The policy (`None`: record the claim on the GPUs, change nothing).
    pub policy: Option<Policy>,
}

/// Why a claim cannot be prepared on this node.
#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    /// The allocation has nothing for this driver and node.
    #[error(transparent)]
    Allocation(#[from] AllocationError),
    /// The allocation names a device this node does not have.
    #[error(
        "device {device} (request {request}) is not on this node's pool {pool}: the ResourceSlices the scheduler used are stale; delete the pod so the claim is allocated again"
    )]
    UnknownDevice {
        /// Device name from the allocation result.
        device: String,
        /// Request name.
        request: String,
        /// This node's pool.
        pool: String,
    },
    /// An opaque config entry of this driver is invalid.
    #[error(
        "invalid opaque config for request {request}: {details}; fix the ResourceClaim or DeviceClass config"
    )]
    Config {
        /// Request name.
        request: String,
        /// Each bad entry with its field errors.
        details: String,
    },
    /// The resolved config does not fit the allocated device.
    #[error("config does not fit device {device} (request {request}): {details}")]
    DeviceConfig {
        /// Device name.
        device: String,
        /// Request name.
        request: String,
        /// Field errors.
        details: String,
    },
    /// Two devices of the claim on one physical GPU ask for different policies.
    #[error(
        "devices of this claim on GPU {gpu_uuid} ask for different sharing policies ({first} and {second}); one physical GPU has one policy: give those requests the same config"
    )]
    MixedPolicies {
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// One policy.
        first: String,
        /// The other.
        second: String,
    },
    /// MPS was asked for a MIG device.
    #[error(
        "MigDeviceConfig sharing.strategy MPS is refused on MIG device {device}: this driver runs no MPS control daemon on a MIG device (static or dynamic); a MIG device is isolated from the others already, so leave out `sharing`, or ask for a full GPU with a GpuConfig for MPS"
    )]
    MpsOnMig {
        /// Device name.
        device: String,
    },
    /// An MPS per-device limit names no device of the claim.
    #[error(
        "mpsConfig.defaultPerDevicePinnedMemoryLimit key {key:?} names no device of this claim: use a device UUID or the device's index in the claim (0, 1, ...)"
    )]
    UnknownMpsDevice {
        /// The key as written.
        key: String,
    },
    /// A sharing config names a device allocated with admin access.
    #[error(
        "device {device} (request {request}) is allocated with adminAccess, which never changes the GPU's sharing policy (KEP-5018); remove the sharing config for this request or drop adminAccess"
    )]
    AdminAccessPolicy {
        /// Device name.
        device: String,
        /// Request name.
        request: String,
    },
    /// The full GPU of a dynamic MIG GPU that does not offer it was allocated (stale slices).
    #[error(
        "device {device} is the full GPU of a dynamic MIG GPU that is not offered (Ampere needs a GPU reset to leave MIG mode, or the GPU holds instances this driver did not create): the ResourceSlices the scheduler used are stale; ask for a MIG profile (device class mig.*, e.g. 7g.80gb for all of it) or run the GPU without dynamic MIG (--dynamic-mig)"
    )]
    DynamicFullGpu {
        /// Device name.
        device: String,
    },
    /// More than one MPS policy in one claim.
    #[error(
        "a claim can run one MPS control daemon; requests of this claim ask for different MPS settings: give them one config"
    )]
    SeveralMps,
}

/// Plans `claim` for `driver` on pool `pool` with the node's `inventory`.
///
/// Errors: see [`PlanError`]; the first failing device decides.
pub fn plan_claim(
    claim: &ResourceClaim,
    inventory: &Inventory,
    driver: &str,
    pool: &str,
) -> Result<Vec<DevicePlan>, PlanError> {
    let allocated = allocated_devices(claim, driver, pool)?;
    let configs = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.config.as_deref())
        .unwrap_or_default();
    let mut plans = Vec::with_capacity(allocated.len());
    for (index, device) in allocated.iter().enumerate() {
        if let Some(target) = partitionable::resolve(inventory, &device.device) {
            plans.push(plan_dynamic(
                device, index, target, configs, driver, &allocated, inventory,
            )?);
            continue;
        }
        let Some(found) = inventory.find_device(&device.device) else {
            return Err(PlanError::UnknownDevice {
                device: device.device.clone(),
                request: device.request.clone(),
                pool: pool.to_owned(),
            });
        };
        let resolved = config::resolve(configs, driver, &device.request).map_err(|errors| {
            PlanError::Config {
                request: device.request.clone(),
                details: entry_errors(&errors),
            }
        })?;
        let config = resolved.map(|r| r.config);
        let (gpu, mig, memory_bytes) = match found {
            DeviceRef::Gpu(gpu) => (gpu, None, gpu.memory_bytes),
            DeviceRef::Mig { parent, mig } => (
                parent,
                Some(MigTarget {
                    uuid: mig.uuid.clone(),
                    gi_id: mig.gi_id,
                    ci_id: mig.ci_id,
                }),
                mig.memory_bytes,
            ),
        };
        let policy = match &config {
            None => None,
            Some(config) => {
                let facts = DeviceFacts {
                    is_mig: mig.is_some(),
                    memory_bytes,
                    uuid: Some(found.uuid()),
                    index_in_claim: Some(index),
                };
                validate_for_device(config, &facts).map_err(|errors| PlanError::DeviceConfig {
                    device: device.device.clone(),
                    request: device.request.clone(),
                    details: join_errors(&errors),
                })?;
                policy_of(config, &allocated, inventory)?
            }
        };
        if device.admin_access && policy.is_some() {
            return Err(PlanError::AdminAccessPolicy {
                device: device.device.clone(),
                request: device.request.clone(),
            });
        }
        if mig.is_some() && matches!(policy, Some(Policy::Mps(_))) {
            return Err(PlanError::MpsOnMig {
                device: device.device.clone(),
            });
        }
        let full_of_dynamic = (mig.is_none() && partitionable::is_dynamic(gpu))
            .then(|| gpu.mig_profiles.iter().map(|p| p.gi_profile_id).collect());
        if full_of_dynamic.is_some() && !partitionable::offers_full_gpu(gpu) {
            return Err(PlanError::DynamicFullGpu {
                device: device.device.clone(),
            });
        }
        plans.push(DevicePlan {
            allocated: device.clone(),
            gpu_uuid: gpu.uuid.clone(),
            gpu_minor: gpu.minor,
            mig,
            policy,
            dynamic: None,
            full_of_dynamic,
        });
    }
    Ok(plans)
}

/// Plans a dynamic MIG placement: like a static MIG device, the instance comes later.
fn plan_dynamic(
    device: &AllocatedDevice,
    index: usize,
    target: partitionable::DynamicTarget<'_>,
    configs: &[k8s_openapi::api::resource::v1::DeviceAllocationConfiguration],
    driver: &str,
    allocated: &[AllocatedDevice],
    inventory: &Inventory,
) -> Result<DevicePlan, PlanError> {
    let resolved =
        config::resolve(configs, driver, &device.request).map_err(|errors| PlanError::Config {
            request: device.request.clone(),
            details: entry_errors(&errors),
        })?;
    let policy = match resolved.map(|r| r.config) {
        None => None,
        Some(config) => {
            let facts = DeviceFacts {
                is_mig: true,
                memory_bytes: target.profile.memory_bytes,
                uuid: None,
                index_in_claim: Some(index),
            };
            validate_for_device(&config, &facts).map_err(|errors| PlanError::DeviceConfig {
                device: device.device.clone(),
                request: device.request.clone(),
                details: join_errors(&errors),
            })?;
            policy_of(&config, allocated, inventory)?
        }
    };
    if device.admin_access && policy.is_some() {
        return Err(PlanError::AdminAccessPolicy {
            device: device.device.clone(),
            request: device.request.clone(),
        });
    }
    if matches!(policy, Some(Policy::Mps(_))) {
        return Err(PlanError::MpsOnMig {
            device: device.device.clone(),
        });
    }
    Ok(DevicePlan {
        allocated: device.clone(),
        gpu_uuid: target.gpu.uuid.clone(),
        gpu_minor: target.gpu.minor,
        mig: None,
        policy,
        dynamic: Some(DynamicPlan {
            gi_profile_id: target.profile.gi_profile_id,
            placement: target.placement,
            gpu_profile_ids: target
                .gpu
                .mig_profiles
                .iter()
                .map(|p| p.gi_profile_id)
                .collect(),
        }),
        full_of_dynamic: None,
    })
}

/// Groups planned devices by policy, one group per distinct policy, for the sharing
/// manager. MIG devices without a policy need no GPU-level action and are left out, and
/// so are devices allocated with admin access: like the kubelet's monitoring access
/// (KEP-5018) they get the device nodes but are never recorded as a holder of the GPU's
/// policy, so they neither conflict with an MPS or Exclusive holder nor keep it alive.
///
/// Errors: [`PlanError::MixedPolicies`] when one GPU would get two policies,
/// [`PlanError::SeveralMps`] for two different MPS settings.
pub fn policy_groups(plans: &[DevicePlan]) -> Result<Vec<PolicyGroup>, PlanError> {
    let mut per_gpu: BTreeMap<&str, &Option<Policy>> = BTreeMap::new();
    for plan in plans.iter().filter(|p| {
        !p.allocated.admin_access
            && ((p.mig.is_none() && p.dynamic.is_none()) || p.policy.is_some())
    }) {
        if let Some(existing) = per_gpu.insert(&plan.gpu_uuid, &plan.policy)
            && existing != &plan.policy
        {
            return Err(PlanError::MixedPolicies {
                gpu_uuid: plan.gpu_uuid.clone(),
                first: describe(existing),
                second: describe(&plan.policy),
            });
        }
    }
    let mut groups: Vec<PolicyGroup> = Vec::new();
    for (gpu, policy) in per_gpu {
        match groups.iter_mut().find(|g| &g.policy == policy) {
            Some(group) => group.gpu_uuids.push(gpu.to_owned()),
            None => groups.push(PolicyGroup {
                gpu_uuids: vec![gpu.to_owned()],
                policy: policy.clone(),
            }),
        }
    }
    if groups
        .iter()
        .filter(|g| matches!(g.policy, Some(Policy::Mps(_))))
        .count()
        > 1
    {
        return Err(PlanError::SeveralMps);
    }
    Ok(groups)
}

fn describe(policy: &Option<Policy>) -> String {
    policy
        .as_ref()
        .map_or_else(|| "no policy".to_owned(), ToString::to_string)
}

fn entry_errors(errors: &[EntryError]) -> String {
    errors
        .iter()
        .map(|e| {
            format!(
                "config entry {} ({}): {}",
                e.index,
                e.source,
                join_errors(&e.errors)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The hardware policy of a validated config. MPS per-device limit keys name a device of
/// the claim by UUID or by its index in the allocation; they become physical GPU UUIDs.
fn policy_of(
    config: &Config,
    allocated: &[AllocatedDevice],
    inventory: &Inventory,
) -> Result<Option<Policy>, PlanError> {
    let Some(sharing) = config.sharing() else {
        return Ok(None);
    };
    Ok(Some(match sharing {
        Sharing::TimeSlicing { interval } => Policy::TimeSlicing {
            interval: time_slice(*interval),
        },
        Sharing::Exclusive => Policy::Exclusive,
        Sharing::Mps(mps) => {
            let gpu_of_key = |key: &str| -> Option<String> {
                let device = match key.parse::<usize>() {
                    Ok(i) => inventory.find_device(&allocated.get(i)?.device)?,
                    Err(_) => allocated
                        .iter()
                        .filter_map(|a| inventory.find_device(&a.device))
                        .find(|d| d.uuid() == key)?,
                };
                Some(device.gpu().uuid.clone())
            };
            Policy::Mps(MpsLimits {
                active_thread_percentage: mps.default_active_thread_percentage,
                pinned_memory_limit_bytes: mps.default_pinned_device_memory_limit,
                per_device_pinned_memory_limit_bytes: mps
                    .default_per_device_pinned_memory_limit
                    .iter()
                    .map(|(key, bytes)| {
                        gpu_of_key(key)
                            .map(|gpu| (gpu, *bytes))
                            .ok_or_else(|| PlanError::UnknownMpsDevice { key: key.clone() })
                    })
                    .collect::<Result<_, _>>()?,
            })
        }
    }))
}

fn time_slice(interval: TimeSliceInterval) -> TimeSlice {
    match interval {
        TimeSliceInterval::Default => TimeSlice::Default,
        TimeSliceInterval::Short => TimeSlice::Short,
        TimeSliceInterval::Medium => TimeSlice::Medium,
        TimeSliceInterval::Long => TimeSlice::Long,
    }
}
