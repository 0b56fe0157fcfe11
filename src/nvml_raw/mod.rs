//! Safe wrappers over the few NVML calls nvml-wrapper 0.13 does not expose safely.
//!
//! Owns every `unsafe` block of the gpu-dra crate: the raw symbols are reached through
//! `Nvml::lib()` (resolved by nvml-wrapper at init) and called with nvml-wrapper-sys
//! types. Each block states why it is sound. Queries:
//! possible GPU instance placements (the wrapper's `possible_placements()` returns an
//! empty list), the GPU / compute instance ids of a MIG device handle, and the info
//! (profile id, placement) of a GPU instance and of a compute instance (slices, SMs,
//! placement). Dynamic MIG: list, create (at a placement) and destroy GPU instances, and
//! create, list and destroy their compute instances. Callers get owned data and
//! `NvmlError`s; nothing here keeps NVML handles beyond one call.
//!
//! One write path lives in the submodule `memory_limits`: the per-cgroup memory limits of
//! driver r615+ ([`MemoryLimitSymbols`]).
#![allow(unsafe_code)]

mod memory_limits;
pub use memory_limits::{MEMORY_LIMIT_MAX, MemoryLimitSymbols, RawMemoryLimits};

use nvml_wrapper::Device;
use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try, nvml_try_count};
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, NVML_COMPUTE_INSTANCE_PROFILE_COUNT,
    nvmlComputeInstance_t, nvmlComputeInstanceInfo_t, nvmlComputeInstanceProfileInfo_t,
    nvmlGpuInstance_t, nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t,
};

/// Placement of a GPU instance in memory slices, as NVML returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPlacement {
    /// First memory slice (inclusive).
    pub start: u32,
    /// Number of memory slices.
    pub size: u32,
}

/// Identity and placement of an existing GPU instance (`nvmlGpuInstanceInfo_t` minus handles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuInstanceInfo {
    /// GPU instance id.
    pub id: u32,
    /// GPU instance profile id (`nvmlGpuInstanceProfileInfo_t.id`).
    pub profile_id: u32,
    /// Placement in memory slices.
    pub placement: RawPlacement,
}

/// Possible placements of the GPU instance profile with id `profile_id` (the `id` that
/// `nvmlDeviceGetGpuInstanceProfileInfo` returns, e.g. 19 for H100 `1g.10gb`; not the
/// `NVML_GPU_INSTANCE_PROFILE_*` index) on `device`, through
/// `nvmlDeviceGetGpuInstancePossiblePlacements_v2`.
///
/// Errors: `NotSupported` when MIG is off or the profile does not exist on this GPU.
pub fn gpu_instance_possible_placements(
    device: &Device<'_>,
    profile_id: u32,
) -> Result<Vec<RawPlacement>, NvmlError> {
    let sym = nvml_sym(
        device
            .nvml()
            .lib()
            .nvmlDeviceGetGpuInstancePossiblePlacements_v2
            .as_ref(),
    )?;
    let mut count: u32 = 0;
    // SAFETY: the handle comes from a live `Device` borrowed from an initialised `Nvml`
    // (its lifetime keeps the library loaded and initialised). A null placements pointer
    // asks NVML only for the count, written to `count`, a valid local.
    nvml_try_count(unsafe {
        sym(
            device.handle(),
            profile_id,
            std::ptr::null_mut(),
            &mut count,
        )
    })?;
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
    // SAFETY: as above for the handle; `buf` holds exactly `count` initialised
    // elements and NVML writes at most `count` of them, then updates `count` to the
    // number written.
    nvml_try(unsafe { sym(device.handle(), profile_id, buf.as_mut_ptr(), &mut count) })?;
    buf.truncate(count as usize);
    Ok(buf
        .into_iter()
        .map(|p| RawPlacement {
            start: p.start,
            size: p.size,
        })
        .collect())
}

/// GPU instance id of a MIG device handle (`nvmlDeviceGetGpuInstanceId`).
pub fn mig_gpu_instance_id(mig: &Device<'_>) -> Result<u32, NvmlError> {
    let sym = nvml_sym(mig.nvml().lib().nvmlDeviceGetGpuInstanceId.as_ref())?;
    let mut id: u32 = 0;
    // SAFETY: live handle from a borrowed `Device` (library initialised); `id` is a valid
    // local NVML writes one unsigned int to.
    nvml_try(unsafe { sym(mig.handle(), &mut id) })?;
    Ok(id)
}

/// Compute instance id of a MIG device handle (`nvmlDeviceGetComputeInstanceId`).
pub fn mig_compute_instance_id(mig: &Device<'_>) -> Result<u32, NvmlError> {
    let sym = nvml_sym(mig.nvml().lib().nvmlDeviceGetComputeInstanceId.as_ref())?;
    let mut id: u32 = 0;
    // SAFETY: live handle from a borrowed `Device`; `id` is a valid local.
    nvml_try(unsafe { sym(mig.handle(), &mut id) })?;
    Ok(id)
}

/// Opaque handle of GPU instance `gi_id` on `parent` (`nvmlDeviceGetGpuInstanceById`).
/// Valid while the instance exists.
fn gpu_instance_handle(parent: &Device<'_>, gi_id: u32) -> Result<nvmlGpuInstance_t, NvmlError> {
    let by_id = nvml_sym(parent.nvml().lib().nvmlDeviceGetGpuInstanceById.as_ref())?;
    let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: live parent handle from a borrowed `Device` (library initialised); `gi` is a
    // valid local that NVML fills with an opaque handle owned by the driver.
    nvml_try(unsafe { by_id(parent.handle(), gi_id, &mut gi) })?;
    Ok(gi)
}

/// Info of GPU instance `gi_id` on the physical GPU `parent`
/// (`nvmlDeviceGetGpuInstanceById` then `nvmlGpuInstanceGetInfo`).
pub fn gpu_instance_info(parent: &Device<'_>, gi_id: u32) -> Result<GpuInstanceInfo, NvmlError> {
    let get_info = nvml_sym(parent.nvml().lib().nvmlGpuInstanceGetInfo.as_ref())?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    // SAFETY: an all-zero `nvmlGpuInstanceInfo_t` is valid (plain integers and raw
    // pointers); NVML only writes to it.
    let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `gi` was just returned by NVML for this device and is not destroyed in
    // between (this call holds no other handle); `info` is a valid local.
    nvml_try(unsafe { get_info(gi, &mut info) })?;
    Ok(GpuInstanceInfo {
        id: info.id,
        profile_id: info.profileId,
        placement: RawPlacement {
            start: info.placement.start,
            size: info.placement.size,
        },
    })
}

/// An existing compute instance: its placement inside the GPU instance and its profile's
/// size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeInstanceInfo {
    /// Compute instance id.
    pub id: u32,
    /// Compute instance profile id (`nvmlComputeInstanceProfileInfo_t.id`).
    pub profile_id: u32,
    /// Placement in compute slices of the GPU instance.
    pub placement: RawPlacement,
    /// Compute slices of the profile (0 when no profile of the GI has `profile_id`).
    pub slice_count: u32,
    /// Streaming multiprocessors of the profile (0 when unknown, as above).
    pub multiprocessors: u32,
}

/// Info of compute instance `ci_id` in GPU instance `gi_id` of `parent`
/// (`nvmlGpuInstanceGetComputeInstanceById`, `nvmlComputeInstanceGetInfo_v2`, then
/// `nvmlGpuInstanceGetComputeInstanceProfileInfo` over the profile indexes to size it).
pub fn compute_instance_info(
    parent: &Device<'_>,
    gi_id: u32,
    ci_id: u32,
) -> Result<ComputeInstanceInfo, NvmlError> {
    let lib = parent.nvml().lib();
    let ci_by_id = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceById.as_ref())?;
    let ci_get_info = nvml_sym(lib.nvmlComputeInstanceGetInfo_v2.as_ref())?;
    let ci_profile_info = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref())?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: `gi` is a live GPU instance handle just returned by NVML; `ci` is a valid
    // local NVML fills with an opaque handle.
    nvml_try(unsafe { ci_by_id(gi, ci_id, &mut ci) })?;
    // SAFETY: all-zero is a valid `nvmlComputeInstanceInfo_t` (integers, raw pointers).
    let mut info: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `ci` was just returned by NVML and is not destroyed in between; `info` is a
    // valid local.
    nvml_try(unsafe { ci_get_info(ci, &mut info) })?;
    let mut out = ComputeInstanceInfo {
        id: info.id,
        profile_id: info.profileId,
        placement: RawPlacement {
            start: info.placement.start,
            size: info.placement.size,
        },
        slice_count: 0,
        multiprocessors: 0,
    };
    for index in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        // SAFETY: all-zero is a valid `nvmlComputeInstanceProfileInfo_t` (integers only).
        let mut p: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: live `gi` handle as above; `p` is a valid local NVML writes to.
        let rc = unsafe {
            ci_profile_info(
                gi,
                index,
                NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                &mut p,
            )
        };
        match nvml_try(rc) {
            Ok(()) if p.id == info.profileId => {
                out.slice_count = p.sliceCount;
                out.multiprocessors = p.multiprocessorCount;
                break;
            }
            Ok(()) | Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::NotFound) => {
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

// --- Dynamic MIG: GPU / compute instance lifecycle -------------------------------------
//
// `nvmlDeviceGetGpuInstances` and `nvmlGpuInstanceGetComputeInstances` write up to the
// profile's instance count and do not read `*count` (NVML API reference); the buffers
// below are larger than any GPU's instance count (7 GPU instances, 8 compute instances).

/// Room for instance handles in one listing call (more than any GPU has).
const INSTANCE_BUFFER: usize = 32;

/// The GPU instances of GPU instance profile `profile_id` on `parent`
/// (`nvmlDeviceGetGpuInstances`, then `nvmlGpuInstanceGetInfo` for each).
///
/// Errors: `NotSupported` when MIG is off; `InvalidArg` for an unknown profile id.
pub fn gpu_instances(
    parent: &Device<'_>,
    profile_id: u32,
) -> Result<Vec<GpuInstanceInfo>, NvmlError> {
    let lib = parent.nvml().lib();
    let list = nvml_sym(lib.nvmlDeviceGetGpuInstances.as_ref())?;
    let get_info = nvml_sym(lib.nvmlGpuInstanceGetInfo.as_ref())?;
    let mut handles: Vec<nvmlGpuInstance_t> = vec![std::ptr::null_mut(); INSTANCE_BUFFER];
    let mut count: u32 = INSTANCE_BUFFER as u32;
    // SAFETY: live parent handle (library initialised); `handles` has INSTANCE_BUFFER
    // slots, more than NVML writes (the profile's instance count); `count` is a valid local.
    nvml_try(unsafe {
        list(
            parent.handle(),
            profile_id,
            handles.as_mut_ptr(),
            &mut count,
        )
    })?;
    handles.truncate((count as usize).min(INSTANCE_BUFFER));
    let mut out = Vec::with_capacity(handles.len());
    for gi in handles {
        // SAFETY: all-zero is a valid `nvmlGpuInstanceInfo_t` (integers and raw pointers).
        let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `gi` was just returned by NVML for this device; `info` is a valid local.
        nvml_try(unsafe { get_info(gi, &mut info) })?;
        out.push(GpuInstanceInfo {
            id: info.id,
            profile_id: info.profileId,
            placement: RawPlacement {
                start: info.placement.start,
                size: info.placement.size,
            },
        });
    }
    Ok(out)
}

/// Creates a GPU instance of profile `profile_id` at `placement` on `parent`
/// (`nvmlDeviceCreateGpuInstanceWithPlacement`); returns its info. When its info cannot be
/// read, the new instance is destroyed again before the error returns.
///
/// Errors: `InsufficientResources` when the placement overlaps an instance,
/// `InvalidArg` for a placement the profile does not have, `NotSupported` without MIG.
pub fn create_gpu_instance_with_placement(
    parent: &Device<'_>,
    profile_id: u32,
    placement: RawPlacement,
) -> Result<GpuInstanceInfo, NvmlError> {
    let lib = parent.nvml().lib();
    let create = nvml_sym(lib.nvmlDeviceCreateGpuInstanceWithPlacement.as_ref())?;
    let get_info = nvml_sym(lib.nvmlGpuInstanceGetInfo.as_ref())?;
    let destroy = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref())?;
    let wanted = nvmlGpuInstancePlacement_t {
        start: placement.start,
        size: placement.size,
    };
    let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: live parent handle; `wanted` and `gi` are valid locals (NVML reads the
    // placement and writes one opaque handle).
    nvml_try(unsafe { create(parent.handle(), profile_id, &wanted, &mut gi) })?;
    // SAFETY: all-zero is a valid `nvmlGpuInstanceInfo_t`.
    let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `gi` was just created by NVML and is not destroyed in between.
    if let Err(e) = nvml_try(unsafe { get_info(gi, &mut info) }) {
        // Unusable without its id: undo the creation so nothing is left behind.
        // SAFETY: `gi` is the live handle just created; not used after this call.
        let _ = nvml_try(unsafe { destroy(gi) });
        return Err(e);
    }
    Ok(GpuInstanceInfo {
        id: info.id,
        profile_id: info.profileId,
        placement: RawPlacement {
            start: info.placement.start,
            size: info.placement.size,
        },
    })
}

/// Destroys GPU instance `gi_id` of `parent` (`nvmlDeviceGetGpuInstanceById`,
/// `nvmlGpuInstanceDestroy`).
///
/// Errors: `InUse` while it has compute instances; `NotFound`/`InvalidArg` when it is gone.
pub fn destroy_gpu_instance(parent: &Device<'_>, gi_id: u32) -> Result<(), NvmlError> {
    let destroy = nvml_sym(parent.nvml().lib().nvmlGpuInstanceDestroy.as_ref())?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    // SAFETY: `gi` was just returned by NVML for this device; after this call it is not
    // used again.
    nvml_try(unsafe { destroy(gi) })
}

/// The compute instance profile id spanning all of GPU instance `gi_id` (the profile with
/// the most compute slices, `nvmlGpuInstanceGetComputeInstanceProfileInfo` over the
/// profile indexes, shared engines).
///
/// Errors: `NotFound` when the GPU instance has no compute instance profile.
pub fn full_compute_instance_profile(parent: &Device<'_>, gi_id: u32) -> Result<u32, NvmlError> {
    let info = nvml_sym(
        parent
            .nvml()
            .lib()
            .nvmlGpuInstanceGetComputeInstanceProfileInfo
            .as_ref(),
    )?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    let mut best: Option<(u32, u32)> = None;
    for index in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        // SAFETY: all-zero is a valid `nvmlComputeInstanceProfileInfo_t` (integers only).
        let mut p: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: live `gi` handle just returned by NVML; `p` is a valid local.
        let rc = unsafe {
            info(
                gi,
                index,
                NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                &mut p,
            )
        };
        match nvml_try(rc) {
            Ok(()) => {
                if best.is_none_or(|(slices, _)| p.sliceCount > slices) {
                    best = Some((p.sliceCount, p.id));
                }
            }
            Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    best.map(|(_, id)| id).ok_or(NvmlError::NotFound)
}

/// Creates a compute instance of profile `ci_profile_id` in GPU instance `gi_id`
/// (`nvmlGpuInstanceCreateComputeInstance`, then `nvmlComputeInstanceGetInfo_v2`);
/// returns its id (destroyed again when its info cannot be read).
///
/// Errors: `InsufficientResources` when the GPU instance has no room left.
pub fn create_compute_instance(
    parent: &Device<'_>,
    gi_id: u32,
    ci_profile_id: u32,
) -> Result<u32, NvmlError> {
    let lib = parent.nvml().lib();
    let create = nvml_sym(lib.nvmlGpuInstanceCreateComputeInstance.as_ref())?;
    let get_info = nvml_sym(lib.nvmlComputeInstanceGetInfo_v2.as_ref())?;
    let destroy = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref())?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: live `gi` handle just returned by NVML; `ci` is a valid local.
    nvml_try(unsafe { create(gi, ci_profile_id, &mut ci) })?;
    // SAFETY: all-zero is a valid `nvmlComputeInstanceInfo_t`.
    let mut info: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `ci` was just created by NVML and is not destroyed in between.
    if let Err(e) = nvml_try(unsafe { get_info(ci, &mut info) }) {
        // Unusable without its id: undo the creation so nothing is left behind.
        // SAFETY: `ci` is the live handle just created; not used after this call.
        let _ = nvml_try(unsafe { destroy(ci) });
        return Err(e);
    }
    Ok(info.id)
}

/// Ids of every compute instance of GPU instance `gi_id` (`nvmlGpuInstanceGetComputeInstances`
/// for each compute instance profile id of the GPU instance, then
/// `nvmlComputeInstanceGetInfo_v2`).
pub fn compute_instance_ids(parent: &Device<'_>, gi_id: u32) -> Result<Vec<u32>, NvmlError> {
    let lib = parent.nvml().lib();
    let profile_info = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref())?;
    let list = nvml_sym(lib.nvmlGpuInstanceGetComputeInstances.as_ref())?;
    let get_info = nvml_sym(lib.nvmlComputeInstanceGetInfo_v2.as_ref())?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    let mut ids = Vec::new();
    for index in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        // SAFETY: all-zero is a valid `nvmlComputeInstanceProfileInfo_t`.
        let mut p: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: live `gi` handle; `p` is a valid local.
        let rc = unsafe {
            profile_info(
                gi,
                index,
                NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                &mut p,
            )
        };
        match nvml_try(rc) {
            Ok(()) => {}
            Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::NotFound) => continue,
            Err(e) => return Err(e),
        }
        let mut handles: Vec<nvmlComputeInstance_t> = vec![std::ptr::null_mut(); INSTANCE_BUFFER];
        let mut count: u32 = INSTANCE_BUFFER as u32;
        // SAFETY: live `gi` handle; `handles` has more slots than NVML writes.
        nvml_try(unsafe { list(gi, p.id, handles.as_mut_ptr(), &mut count) })?;
        handles.truncate((count as usize).min(INSTANCE_BUFFER));
        for ci in handles {
            // SAFETY: all-zero is a valid `nvmlComputeInstanceInfo_t`.
            let mut info: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `ci` was just returned by NVML; `info` is a valid local.
            nvml_try(unsafe { get_info(ci, &mut info) })?;
            ids.push(info.id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Destroys compute instance `ci_id` of GPU instance `gi_id`
/// (`nvmlGpuInstanceGetComputeInstanceById`, `nvmlComputeInstanceDestroy`).
///
/// Errors: `InUse` while processes run on it; `NotFound`/`InvalidArg` when it is gone.
pub fn destroy_compute_instance(
    parent: &Device<'_>,
    gi_id: u32,
    ci_id: u32,
) -> Result<(), NvmlError> {
    let lib = parent.nvml().lib();
    let by_id = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceById.as_ref())?;
    let destroy = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref())?;
    let gi = gpu_instance_handle(parent, gi_id)?;
    let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
    // SAFETY: live `gi` handle; `ci` is a valid local NVML fills with an opaque handle.
    nvml_try(unsafe { by_id(gi, ci_id, &mut ci) })?;
    // SAFETY: `ci` was just returned by NVML; not used after this call.
    nvml_try(unsafe { destroy(ci) })
}
