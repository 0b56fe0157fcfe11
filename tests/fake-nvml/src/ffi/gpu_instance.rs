//! GPU instance profiles, placements and the GPU instance lifecycle.

use super::*;

fn gi_profile(
    function: &str,
    device: nvmlDevice_t,
    index: c_uint,
) -> Result<&'static crate::presets::GiProfile, Code> {
    let g = full(device)?;
    run(function, Some(g), |e| e.gpu_instance_profile(g, index))
}

/// `nvmlDeviceGetGpuInstanceProfileInfo`: by NVML profile index (`NVML_GPU_INSTANCE_PROFILE_*`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceProfileInfo(
    device: nvmlDevice_t,
    profile: c_uint,
    info: *mut nvmlGpuInstanceProfileInfo_t,
) -> nvmlReturn_t {
    guard(|| {
        let o = out(info)?;
        let p = gi_profile("nvmlDeviceGetGpuInstanceProfileInfo", device, profile)?;
        *o = nvmlGpuInstanceProfileInfo_t {
            id: p.id,
            isP2pSupported: 0,
            sliceCount: p.slices,
            instanceCount: p.instance_count,
            multiprocessorCount: p.sm,
            copyEngineCount: p.ce,
            decoderCount: p.dec,
            encoderCount: p.enc,
            jpegCount: p.jpeg,
            ofaCount: p.ofa,
            memorySizeMB: p.memory_mib,
        };
        Ok(())
    })
}

/// `nvmlDeviceGetGpuInstanceProfileInfoV`: `info->version` must be
/// `nvmlGpuInstanceProfileInfo_v2` or `_v3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceProfileInfoV(
    device: nvmlDevice_t,
    profile: c_uint,
    info: *mut nvmlGpuInstanceProfileInfo_v2_t,
) -> nvmlReturn_t {
    guard(|| {
        let v2 = out(info)?;
        let version = v2.version;
        let is_v3 = version == struct_version::<nvmlGpuInstanceProfileInfo_v3_t>(3);
        if !is_v3 && version != struct_version::<nvmlGpuInstanceProfileInfo_v2_t>(2) {
            return Err(engine::ARGUMENT_VERSION_MISMATCH);
        }
        let p = gi_profile("nvmlDeviceGetGpuInstanceProfileInfoV", device, profile)?;
        let name = format!("MIG {}", p.name);
        if is_v3 {
            // SAFETY: the caller declared (by version) a v3 struct behind the pointer.
            let v3 = unsafe { &mut *info.cast::<nvmlGpuInstanceProfileInfo_v3_t>() };
            v3.id = p.id;
            v3.sliceCount = p.slices;
            v3.instanceCount = p.instance_count;
            v3.multiprocessorCount = p.sm;
            v3.copyEngineCount = p.ce;
            v3.decoderCount = p.dec;
            v3.encoderCount = p.enc;
            v3.jpegCount = p.jpeg;
            v3.ofaCount = p.ofa;
            v3.memorySizeMB = p.memory_mib;
            fill_name(&mut v3.name, &name);
            v3.capabilities = 0;
        } else {
            v2.id = p.id;
            v2.isP2pSupported = 0;
            v2.sliceCount = p.slices;
            v2.instanceCount = p.instance_count;
            v2.multiprocessorCount = p.sm;
            v2.copyEngineCount = p.ce;
            v2.decoderCount = p.dec;
            v2.encoderCount = p.enc;
            v2.jpegCount = p.jpeg;
            v2.ofaCount = p.ofa;
            v2.memorySizeMB = p.memory_mib;
            fill_name(&mut v2.name, &name);
        }
        Ok(())
    })
}

/// `nvmlDeviceGetGpuInstancePossiblePlacements_v2` (by driver profile id; placements in
/// memory slices). nvml-wrapper 0.13's `possible_placements()` does not return these, so
/// callers use this symbol directly.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstancePossiblePlacements_v2(
    device: nvmlDevice_t,
    profile_id: c_uint,
    placements: *mut nvmlGpuInstancePlacement_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let list = run(
            "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
            Some(g),
            |e| e.possible_placements(g, profile_id),
        )?;
        let items: Vec<nvmlGpuInstancePlacement_t> = list
            .into_iter()
            .map(|(start, size)| nvmlGpuInstancePlacement_t { start, size })
            .collect();
        write_array(placements, count, &items)
    })
}

/// `nvmlDeviceGetGpuInstanceRemainingCapacity`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceRemainingCapacity(
    device: nvmlDevice_t,
    profile_id: c_uint,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let c = out(count)?;
        *c = run("nvmlDeviceGetGpuInstanceRemainingCapacity", Some(g), |e| {
            e.gpu_instance_remaining_capacity(g, profile_id)
        })?;
        Ok(())
    })
}

fn create_gi(
    function: &str,
    device: nvmlDevice_t,
    profile_id: c_uint,
    placement: Option<nvmlGpuInstancePlacement_t>,
    gpu_instance: *mut nvmlGpuInstance_t,
) -> Result<(), Code> {
    let g = full(device)?;
    let o = out(gpu_instance)?;
    let gi = run(function, Some(g), |e| {
        if let Some(p) = placement {
            let size = e
                .possible_placements(g, profile_id)?
                .first()
                .map_or(0, |x| x.1);
            if p.size != size {
                return Err(engine::INVALID_ARGUMENT);
            }
        }
        e.create_gpu_instance(g, profile_id, placement.map(|p| p.start))
    })?;
    *o = to_ptr(Handle::GpuInstance { gpu: g, gi });
    Ok(())
}

/// `nvmlDeviceCreateGpuInstance`: lowest free documented placement.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceCreateGpuInstance(
    device: nvmlDevice_t,
    profile_id: c_uint,
    gpu_instance: *mut nvmlGpuInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        create_gi(
            "nvmlDeviceCreateGpuInstance",
            device,
            profile_id,
            None,
            gpu_instance,
        )
    })
}

/// `nvmlDeviceCreateGpuInstanceWithPlacement`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceCreateGpuInstanceWithPlacement(
    device: nvmlDevice_t,
    profile_id: c_uint,
    placement: *const nvmlGpuInstancePlacement_t,
    gpu_instance: *mut nvmlGpuInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: valid or null per the NVML contract.
        let p = *unsafe { placement.as_ref() }.ok_or(engine::INVALID_ARGUMENT)?;
        create_gi(
            "nvmlDeviceCreateGpuInstanceWithPlacement",
            device,
            profile_id,
            Some(p),
            gpu_instance,
        )
    })
}

/// `nvmlGpuInstanceDestroy`: `IN_USE` while compute instances exist.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceDestroy(gpu_instance: nvmlGpuInstance_t) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        run("nvmlGpuInstanceDestroy", Some(g), |e| {
            e.destroy_gpu_instance(g, gi)
        })
    })
}

/// `nvmlDeviceGetGpuInstances`: instances of one profile (array sized by its instance count).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstances(
    device: nvmlDevice_t,
    profile_id: c_uint,
    gpu_instances: *mut nvmlGpuInstance_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let ids = run("nvmlDeviceGetGpuInstances", Some(g), |e| {
            e.gpu_instances(g, profile_id)
        })?;
        let items: Vec<nvmlGpuInstance_t> = ids
            .into_iter()
            .map(|gi| to_ptr(Handle::GpuInstance { gpu: g, gi }))
            .collect();
        write_list(gpu_instances, count, &items)
    })
}

/// `nvmlDeviceGetGpuInstanceById`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceById(
    device: nvmlDevice_t,
    id: c_uint,
    gpu_instance: *mut nvmlGpuInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let o = out(gpu_instance)?;
        run("nvmlDeviceGetGpuInstanceById", Some(g), |e| {
            e.gpu_instance(g, id).map(|_| ())
        })?;
        *o = to_ptr(Handle::GpuInstance { gpu: g, gi: id });
        Ok(())
    })
}

/// `nvmlGpuInstanceGetInfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetInfo(
    gpu_instance: nvmlGpuInstance_t,
    info: *mut nvmlGpuInstanceInfo_t,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        let o = out(info)?;
        let s = run("nvmlGpuInstanceGetInfo", Some(g), |e| {
            e.gpu_instance(g, gi)
                .cloned()
                .map_err(|_| engine::INVALID_ARGUMENT)
        })?;
        *o = nvmlGpuInstanceInfo_t {
            device: to_ptr(Handle::Device { gpu: g }),
            id: s.id,
            profileId: s.profile_id,
            placement: nvmlGpuInstancePlacement_t {
                start: s.placement_start,
                size: s.placement_size,
            },
        };
        Ok(())
    })
}
