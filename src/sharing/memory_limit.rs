//! Per-pod GPU memory limits for shares of a GPU: the hard (and soft) device-memory limit
//! of the pod cgroup a share's claim is reserved for, set through NVML at prepare, read
//! back, and cleared at unprepare.
//!
//! Owns [`MemoryLimiter`] (support detected at start, apply / clear), the NVML seam
//! [`MemoryLimitControl`] with its real implementation [`NvmlMemoryLimits`], and the
//! record kept in the claim's checkpoint entry ([`MemoryLimitRecord`]). Planning is pure
//! ([`super::memory_limit_plan`]), cgroup facts are read in
//! [`super::memory_limit_cgroup`]. Must not write the checkpoint (prepare does), write
//! `dmem.*` files itself, or touch cgroups of pods it was not asked about.
//!
//! Facts (NVIDIA NVML API reference, `nvmlSetMemoryLimits_v1_t`,
//! `nvmlDeviceSetMemoryLimits_v1`; NVIDIA MPS documentation, "MPS v3 Memory
//! Partitioning"): `nameSpace` is the full path of the cgroup directory, limits are bytes,
//! soft 0 with hard `NVML_DEVICE_MEMORY_LIMIT_MAX` clears, removing the cgroup clears too;
//! driver r615+ (CUDA 13.4), cgroup v2, root, non-MIG. The limit charges every process of
//! the cgroup, MPS or not. Hard = `dmem.max` on the dmem backend (allocations beyond it
//! fail), soft = `dmem.min` (guaranteed; above it a client may be evicted under
//! pressure). Both are set to the share's amount on both backends: the scheduler never
//! hands out more than the GPU has, so every share can be guaranteed, and a client that
//! cannot exceed its soft limit without hitting its hard one is never an eviction
//! candidate. On dmem the soft limit is propagated into ancestors' `dmem.min` by the
//! driver and only taken back by a set to 0: unprepare (which the kubelet runs before it
//! removes the pod cgroup) clears it. A cgroup already gone counts as cleared.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::memory_limit_cgroup::{CgroupFacts, find_pod_cgroup};
use super::memory_limit_plan::{Backend, Decision, MemoryShare, NodeSupport};
use crate::claims::PodRef;
use crate::nvml_raw::{MEMORY_LIMIT_MAX, MemoryLimitSymbols};

/// Key of the [`MemoryLimitRecord`] in a checkpoint entry's `extra` map.
pub const CHECKPOINT_KEY: &str = "memoryLimits";

/// Why a share's memory limit could not be planned, set or cleared.
#[derive(Debug, Error)]
pub enum MemoryLimitError {
    /// The allocation's consumed memory is not a non-negative quantity.
    #[error(
        "claim {claim_uid}: consumedCapacity.memory {value:?} of device {device} is not a byte quantity"
    )]
    Quantity {
        /// Claim UID.
        claim_uid: String,
        /// Device name.
        device: String,
        /// The value found.
        value: String,
    },
    /// The node cannot enforce the share and scheduling-only shares are not allowed.
    #[error(
        "claim {claim_uid}: the GPU memory share of {gpus} cannot be enforced on this node: {reason}; or let the plugin prepare shares without a limit (--allow-scheduling-only-shares)"
    )]
    Unenforceable {
        /// Claim UID.
        claim_uid: String,
        /// The shares (`device (bytes on GPU)`).
        gpus: String,
        /// Why, and what to upgrade.
        reason: String,
    },
    /// The pod's cgroup directory does not exist under the cgroup root.
    #[error(
        "claim {claim_uid}: no cgroup of pod {pod} under {root}: the kubelet creates it before preparing (retried); if this persists, --cgroup-root is not the host's /sys/fs/cgroup"
    )]
    PodCgroupMissing {
        /// Claim UID.
        claim_uid: String,
        /// The pod (boxed: the variant is rare).
        pod: Box<PodRef>,
        /// The cgroup root searched.
        root: PathBuf,
    },
    /// NVML refused the limit.
    #[error(
        "claim {claim_uid}: setting a {bytes}-byte memory limit on GPU {gpu_uuid} for pod {pod} (cgroup {cgroup}); the plugin needs root, an r615+ driver and a non-MIG GPU"
    )]
    Set {
        /// Claim UID.
        claim_uid: String,
        /// GPU UUID.
        gpu_uuid: String,
        /// The pod (boxed: the variant is rare).
        pod: Box<PodRef>,
        /// Cgroup directory.
        cgroup: PathBuf,
        /// Hard limit asked for.
        bytes: u64,
        /// NVML's error.
        #[source]
        source: Box<NvmlCallError>,
    },
    /// NVML accepted the limit but reads back something else.
    #[error(
        "claim {claim_uid}: GPU {gpu_uuid} reads back soft {soft} / hard {hard} bytes for cgroup {cgroup} after setting {bytes}: the driver did not keep the limit"
    )]
    ReadBack {
        /// Claim UID.
        claim_uid: String,
        /// GPU UUID.
        gpu_uuid: String,
        /// Cgroup directory.
        cgroup: PathBuf,
        /// What was set.
        bytes: u64,
        /// Soft limit read back.
        soft: u64,
        /// Hard limit read back.
        hard: u64,
    },
    /// A recorded limit could not be cleared (kept in the checkpoint for a retry).
    #[error("claim {claim_uid}: clearing the memory limit of cgroup {cgroup} on GPU {gpu_uuid}")]
    Clear {
        /// Claim UID.
        claim_uid: String,
        /// GPU UUID.
        gpu_uuid: String,
        /// Cgroup directory.
        cgroup: PathBuf,
        /// NVML's error.
        #[source]
        source: Box<NvmlCallError>,
    },
}

/// A failed NVML memory-limit call.
#[derive(Debug, Error)]
#[error("{function}: {source}")]
pub struct NvmlCallError {
    /// The NVML function (`nvmlDeviceSetMemoryLimits_v1`, `nvmlDeviceGetHandleByUUID`).
    pub function: &'static str,
    /// NVML's error.
    #[source]
    pub source: NvmlError,
}

/// Soft and hard device-memory limits of one cgroup on one GPU, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Soft limit (0 = none).
    pub soft: u64,
    /// Hard limit ([`MEMORY_LIMIT_MAX`] = none).
    pub hard: u64,
}

/// The cleared state: soft 0, hard `NVML_DEVICE_MEMORY_LIMIT_MAX`.
pub const CLEARED: Limits = Limits {
    soft: 0,
    hard: MEMORY_LIMIT_MAX,
};

/// The NVML seam: set and read a cgroup's limits on a GPU (by UUID).
pub trait MemoryLimitControl: Send + Sync {
    /// Sets `limits` for `cgroup` on GPU `gpu_uuid`.
    fn set(&self, gpu_uuid: &str, cgroup: &Path, limits: Limits) -> Result<(), NvmlCallError>;
    /// The limits of `cgroup` on GPU `gpu_uuid`.
    fn get(&self, gpu_uuid: &str, cgroup: &Path) -> Result<Limits, NvmlCallError>;
}

/// [`MemoryLimitControl`] through the NVML library (raw symbols, [`crate::nvml_raw`]).
pub struct NvmlMemoryLimits {
    nvml: Nvml,
    symbols: MemoryLimitSymbols,
}

impl NvmlMemoryLimits {
    /// Loads NVML from `lib_path` (default `libnvidia-ml.so.1`); `Ok(None)` when the
    /// library has no memory-limit symbols (driver before r615).
    ///
    /// Errors: the library cannot be loaded or initialised.
    pub fn load(lib_path: Option<&Path>) -> Result<Option<Self>, NvmlError> {
        let Some(symbols) =
            MemoryLimitSymbols::load(lib_path).map_err(NvmlError::LibloadingError)?
        else {
            return Ok(None);
        };
        let mut builder = Nvml::builder();
        let lib = lib_path.map(|p| p.as_os_str().to_owned());
        if let Some(lib) = &lib {
            builder.lib_path(lib);
        }
        Ok(Some(Self {
            nvml: builder.init()?,
            symbols,
        }))
    }
}

fn call<T>(function: &'static str, r: Result<T, NvmlError>) -> Result<T, NvmlCallError> {
    r.map_err(|source| NvmlCallError { function, source })
}

impl MemoryLimitControl for NvmlMemoryLimits {
    fn set(&self, gpu_uuid: &str, cgroup: &Path, limits: Limits) -> Result<(), NvmlCallError> {
        let device = call(
            "nvmlDeviceGetHandleByUUID",
            self.nvml.device_by_uuid(gpu_uuid),
        )?;
        call(
            "nvmlDeviceSetMemoryLimits_v1",
            self.symbols.set(&device, cgroup, limits.soft, limits.hard),
        )
    }

    fn get(&self, gpu_uuid: &str, cgroup: &Path) -> Result<Limits, NvmlCallError> {
        let device = call(
            "nvmlDeviceGetHandleByUUID",
            self.nvml.device_by_uuid(gpu_uuid),
        )?;
        let raw = call(
            "nvmlDeviceGetMemoryLimits_v1",
            self.symbols.get(&device, cgroup),
        )?;
        Ok(Limits {
            soft: raw.soft,
            hard: raw.hard,
        })
    }
}

/// One limit set for a claim (kept in the checkpoint so a restart can clear it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedLimit {
    /// Device name in the pool.
    pub device: String,
    /// Physical GPU UUID.
    pub gpu_uuid: String,
    /// Pod namespace/name.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// The pod's cgroup directory (as given to NVML).
    pub cgroup: PathBuf,
    /// Backend that serves the GPU.
    pub backend: Backend,
    /// Soft limit, bytes.
    pub soft_bytes: u64,
    /// Hard limit, bytes.
    pub hard_bytes: u64,
}

/// What a claim's checkpoint entry says about its memory limits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryLimitRecord {
    /// Limits set (or being set, while the claim is `PrepareStarted`).
    #[serde(default)]
    pub applied: Vec<AppliedLimit>,
    /// Set when the claim was prepared without a limit: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_only: Option<String>,
}

/// Settings of a [`MemoryLimiter`].
#[derive(Debug, Clone)]
pub struct MemoryLimitSettings {
    /// The host's cgroup v2 root as the plugin sees it (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// Prepare shares this node cannot enforce, without a limit, instead of failing them.
    pub allow_scheduling_only: bool,
}

/// Sets, reads back and clears per-pod GPU memory limits.
pub struct MemoryLimiter {
    control: Option<Arc<dyn MemoryLimitControl>>,
    settings: MemoryLimitSettings,
    support: NodeSupport,
}

impl MemoryLimiter {
    /// A limiter over `control` (`None`: the NVML library lacks the symbols), detecting
    /// support from `driver_version` and the cgroup root now.
    pub fn new(
        control: Option<Arc<dyn MemoryLimitControl>>,
        driver_version: &str,
        settings: MemoryLimitSettings,
    ) -> Self {
        let facts = CgroupFacts::read(&settings.cgroup_root);
        let support = NodeSupport::detect(driver_version, control.is_some(), facts);
        Self {
            control,
            settings,
            support,
        }
    }

    /// What was detected at start (`problem: None` = limits can be set).
    pub fn support(&self) -> &NodeSupport {
        &self.support
    }

    /// Whether shares this node cannot enforce are prepared anyway.
    pub fn allows_scheduling_only(&self) -> bool {
        self.settings.allow_scheduling_only
    }

    /// The limits `decision` will set, with the pod's cgroup found on disk (recorded
    /// before anything is set, so a crash half-way is rolled back).
    ///
    /// Errors: [`MemoryLimitError::PodCgroupMissing`].
    pub fn locate(
        &self,
        claim_uid: &str,
        decision: &Decision,
    ) -> Result<Vec<AppliedLimit>, MemoryLimitError> {
        let Decision::Enforce { pod, shares } = decision else {
            return Ok(Vec::new());
        };
        let cgroup = find_pod_cgroup(&self.settings.cgroup_root, &pod.uid).ok_or_else(|| {
            MemoryLimitError::PodCgroupMissing {
                claim_uid: claim_uid.to_owned(),
                pod: Box::new(pod.clone()),
                root: self.settings.cgroup_root.clone(),
            }
        })?;
        Ok(shares
            .iter()
            .map(|(share, backend): &(MemoryShare, Backend)| AppliedLimit {
                device: share.device.clone(),
                gpu_uuid: share.gpu_uuid.clone(),
                pod: format!("{}/{}", pod.namespace, pod.name),
                pod_uid: pod.uid.clone(),
                cgroup: cgroup.clone(),
                backend: *backend,
                soft_bytes: share.bytes,
                hard_bytes: share.bytes,
            })
            .collect())
    }

    /// Sets each limit and reads it back. Blocking (NVML): run off the async workers. On
    /// an error the limits this call set are cleared again (best effort; the caller's
    /// rollback clears the recorded ones too).
    ///
    /// Errors: [`MemoryLimitError::Set`], [`MemoryLimitError::ReadBack`].
    pub fn apply(&self, claim_uid: &str, limits: &[AppliedLimit]) -> Result<(), MemoryLimitError> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        for (done, limit) in limits.iter().enumerate() {
            let want = Limits {
                soft: limit.soft_bytes,
                hard: limit.hard_bytes,
            };
            let result = control
                .set(&limit.gpu_uuid, &limit.cgroup, want)
                .and_then(|()| control.get(&limit.gpu_uuid, &limit.cgroup))
                .map_err(|source| MemoryLimitError::Set {
                    claim_uid: claim_uid.to_owned(),
                    gpu_uuid: limit.gpu_uuid.clone(),
                    pod: Box::new(PodRef {
                        namespace: limit.pod.split('/').next().unwrap_or_default().to_owned(),
                        name: limit.pod.split('/').nth(1).unwrap_or_default().to_owned(),
                        uid: limit.pod_uid.clone(),
                    }),
                    cgroup: limit.cgroup.clone(),
                    bytes: limit.hard_bytes,
                    source: Box::new(source),
                })
                .and_then(|got| {
                    if got == want {
                        Ok(())
                    } else {
                        Err(MemoryLimitError::ReadBack {
                            claim_uid: claim_uid.to_owned(),
                            gpu_uuid: limit.gpu_uuid.clone(),
                            cgroup: limit.cgroup.clone(),
                            bytes: limit.hard_bytes,
                            soft: got.soft,
                            hard: got.hard,
                        })
                    }
                });
            if let Err(err) = result {
                let _ = self.clear(claim_uid, &limits[..=done]);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Clears each recorded limit (soft first to 0 with hard at max, in one call). A
    /// cgroup that no longer exists counts as cleared (its removal cleared the limit).
    /// Blocking (NVML).
    ///
    /// Errors: [`MemoryLimitError::Clear`] for the first limit NVML would not clear
    /// (the others are still tried).
    pub fn clear(&self, claim_uid: &str, limits: &[AppliedLimit]) -> Result<(), MemoryLimitError> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        let mut first = None;
        for limit in limits {
            if !limit.cgroup.is_dir() {
                continue;
            }
            match control.set(&limit.gpu_uuid, &limit.cgroup, CLEARED) {
                Ok(()) => {}
                Err(err) if matches!(err.source, NvmlError::NotFound) => {}
                Err(source) => {
                    first.get_or_insert(MemoryLimitError::Clear {
                        claim_uid: claim_uid.to_owned(),
                        gpu_uuid: limit.gpu_uuid.clone(),
                        cgroup: limit.cgroup.clone(),
                        source: Box::new(source),
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl MemoryLimiter {
    /// The decision for `claim`'s devices (allocation results of `driver` in `pool`):
    /// its memory shares ([`super::memory_limit_plan::memory_shares`]), its pods
    /// (`status.reservedFor`) and this node's support. Pure but for what was read at start.
    ///
    /// Errors: [`MemoryLimitError::Quantity`], [`MemoryLimitError::Unenforceable`].
    pub fn decide(
        &self,
        claim: &k8s_openapi::api::resource::v1::ResourceClaim,
        driver: &str,
        pool: &str,
        devices: &[super::memory_limit_plan::DeviceInput<'_>],
        inventory: &crate::inventory::Inventory,
    ) -> Result<Decision, MemoryLimitError> {
        let shares =
            super::memory_limit_plan::memory_shares(claim, driver, pool, devices, inventory)?;
        let pods = super::memory_limit_plan::reserved_pods(claim);
        let uid = claim.metadata.uid.as_deref().unwrap_or_default();
        super::memory_limit_plan::decide(
            uid,
            shares,
            &pods,
            &self.support,
            self.settings.allow_scheduling_only,
        )
    }
}

impl MemoryLimitRecord {
    /// The record for `decision` with the `applied` limits it located; `None` when the
    /// claim has no memory share to speak of.
    pub fn for_decision(decision: &Decision, applied: Vec<AppliedLimit>) -> Option<Self> {
        match decision {
            Decision::Nothing => None,
            Decision::Enforce { .. } => Some(Self {
                applied,
                scheduling_only: None,
            }),
            Decision::SchedulingOnly { reason } => Some(Self {
                applied: Vec::new(),
                scheduling_only: Some(reason.clone()),
            }),
        }
    }

    /// The record in a checkpoint entry's `extra` map, if any (an unreadable one counts
    /// as none: nothing of it could be cleared anyway).
    pub fn from_extra(
        extra: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Option<Self> {
        extra
            .get(CHECKPOINT_KEY)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// The record as a checkpoint `extra` value.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
