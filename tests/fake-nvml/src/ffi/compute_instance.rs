//! Compute instance profiles and lifecycle, and MIG device handles.

use super::*;

fn ci_profile(
    function: &str,
    gpu_instance: nvmlGpuInstance_t,
    profile: c_uint,
    eng_profile: c_uint,
) -> Result<(crate::presets::CiProfile, crate::presets::GiProfile), Code> {
    let (g, gi) = gi_handle(gpu_instance)?;
    if eng_profile != NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED {
        return Err(engine::INVALID_ARGUMENT);
    }
    run(function, Some(g), |e| {
        let c = e.compute_instance_profile(g, gi, profile)?;
        let pid = e.gpu_instance(g, gi)?.profile_id;
        let p = *e
            .spec(g)?
            .model
            .gi_profile_by_id(pid)
            .ok_or(engine::UNKNOWN)?;
        Ok((c, p))
    })
}

/// `nvmlGpuInstanceGetComputeInstanceProfileInfo` (engine profile must be SHARED).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstanceProfileInfo(
    gpu_instance: nvmlGpuInstance_t,
    profile: c_uint,
    eng_profile: c_uint,
    info: *mut nvmlComputeInstanceProfileInfo_t,
) -> nvmlReturn_t {
    guard(|| {
        let o = out(info)?;
        let (c, p) = ci_profile(
            "nvmlGpuInstanceGetComputeInstanceProfileInfo",
            gpu_instance,
            profile,
            eng_profile,
        )?;
        *o = nvmlComputeInstanceProfileInfo_t {
            id: c.id,
            sliceCount: c.slices,
            instanceCount: c.instance_count(),
            multiprocessorCount: c.sm,
            sharedCopyEngineCount: p.ce,
            sharedDecoderCount: p.dec,
            sharedEncoderCount: p.enc,
            sharedJpegCount: p.jpeg,
            sharedOfaCount: p.ofa,
        };
        Ok(())
    })
}

/// `nvmlGpuInstanceGetComputeInstanceProfileInfoV` (`_v2` or `_v3` by `info->version`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstanceProfileInfoV(
    gpu_instance: nvmlGpuInstance_t,
    profile: c_uint,
    eng_profile: c_uint,
    info: *mut nvmlComputeInstanceProfileInfo_v2_t,
) -> nvmlReturn_t {
    guard(|| {
        let v2 = out(info)?;
        let version = v2.version;
        let is_v3 = version == struct_version::<nvmlComputeInstanceProfileInfo_v3_t>(3);
        if !is_v3 && version != struct_version::<nvmlComputeInstanceProfileInfo_v2_t>(2) {
            return Err(engine::ARGUMENT_VERSION_MISMATCH);
        }
        let (c, p) = ci_profile(
            "nvmlGpuInstanceGetComputeInstanceProfileInfoV",
            gpu_instance,
            profile,
            eng_profile,
        )?;
        let name = format!("MIG {}", c.name(&p));
        v2.id = c.id;
        v2.sliceCount = c.slices;
        v2.instanceCount = c.instance_count();
        v2.multiprocessorCount = c.sm;
        v2.sharedCopyEngineCount = p.ce;
        v2.sharedDecoderCount = p.dec;
        v2.sharedEncoderCount = p.enc;
        v2.sharedJpegCount = p.jpeg;
        v2.sharedOfaCount = p.ofa;
        fill_name(&mut v2.name, &name);
        if is_v3 {
            // SAFETY: the caller declared (by version) a v3 struct, whose prefix is v2's.
            unsafe { (*info.cast::<nvmlComputeInstanceProfileInfo_v3_t>()).capabilities = 0 };
        }
        Ok(())
    })
}

/// `nvmlGpuInstanceGetComputeInstanceRemainingCapacity`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstanceRemainingCapacity(
    gpu_instance: nvmlGpuInstance_t,
    profile_id: c_uint,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        let c = out(count)?;
        *c = run(
            "nvmlGpuInstanceGetComputeInstanceRemainingCapacity",
            Some(g),
            |e| e.compute_instance_remaining_capacity(g, gi, profile_id),
        )?;
        Ok(())
    })
}

/// `nvmlGpuInstanceGetComputeInstancePossiblePlacements` (compute slices).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstancePossiblePlacements(
    gpu_instance: nvmlGpuInstance_t,
    profile_id: c_uint,
    placements: *mut nvmlComputeInstancePlacement_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        let c = run(
            "nvmlGpuInstanceGetComputeInstancePossiblePlacements",
            Some(g),
            |e| e.compute_instance_profile(g, gi, profile_id),
        )?;
        let items: Vec<nvmlComputeInstancePlacement_t> = c
            .placement_starts
            .iter()
            .map(|s| nvmlComputeInstancePlacement_t {
                start: *s,
                size: c.slices,
            })
            .collect();
        write_array(placements, count, &items)
    })
}

fn create_ci(
    function: &str,
    gpu_instance: nvmlGpuInstance_t,
    profile_id: c_uint,
    placement: Option<nvmlComputeInstancePlacement_t>,
    compute_instance: *mut nvmlComputeInstance_t,
) -> Result<(), Code> {
    let (g, gi) = gi_handle(gpu_instance)?;
    let o = out(compute_instance)?;
    let ci = run(function, Some(g), |e| {
        if let Some(p) = placement
            && p.size != e.compute_instance_profile(g, gi, profile_id)?.slices
        {
            return Err(engine::INVALID_ARGUMENT);
        }
        e.create_compute_instance(g, gi, profile_id, placement.map(|p| p.start))
    })?;
    *o = to_ptr(Handle::ComputeInstance { gpu: g, gi, ci });
    Ok(())
}

/// `nvmlGpuInstanceCreateComputeInstance`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceCreateComputeInstance(
    gpu_instance: nvmlGpuInstance_t,
    profile_id: c_uint,
    compute_instance: *mut nvmlComputeInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        create_ci(
            "nvmlGpuInstanceCreateComputeInstance",
            gpu_instance,
            profile_id,
            None,
            compute_instance,
        )
    })
}

/// `nvmlGpuInstanceCreateComputeInstanceWithPlacement`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceCreateComputeInstanceWithPlacement(
    gpu_instance: nvmlGpuInstance_t,
    profile_id: c_uint,
    placement: *const nvmlComputeInstancePlacement_t,
    compute_instance: *mut nvmlComputeInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: valid or null per the NVML contract.
        let p = *unsafe { placement.as_ref() }.ok_or(engine::INVALID_ARGUMENT)?;
        create_ci(
            "nvmlGpuInstanceCreateComputeInstanceWithPlacement",
            gpu_instance,
            profile_id,
            Some(p),
            compute_instance,
        )
    })
}

/// `nvmlComputeInstanceDestroy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlComputeInstanceDestroy(
    compute_instance: nvmlComputeInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi, ci) = ci_handle(compute_instance)?;
        run("nvmlComputeInstanceDestroy", Some(g), |e| {
            e.destroy_compute_instance(g, gi, ci)
        })
    })
}

/// `nvmlGpuInstanceGetComputeInstances`: instances of one CI profile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstances(
    gpu_instance: nvmlGpuInstance_t,
    profile_id: c_uint,
    compute_instances: *mut nvmlComputeInstance_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        let ids = run("nvmlGpuInstanceGetComputeInstances", Some(g), |e| {
            e.compute_instance_profile(g, gi, profile_id)?;
            Ok(e.gpu_instance(g, gi)?
                .compute_instances
                .values()
                .filter(|c| c.profile_id == profile_id)
                .map(|c| c.id)
                .collect::<Vec<_>>())
        })?;
        let items: Vec<nvmlComputeInstance_t> = ids
            .into_iter()
            .map(|ci| to_ptr(Handle::ComputeInstance { gpu: g, gi, ci }))
            .collect();
        write_list(compute_instances, count, &items)
    })
}

/// `nvmlGpuInstanceGetComputeInstanceById`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstanceById(
    gpu_instance: nvmlGpuInstance_t,
    id: c_uint,
    compute_instance: *mut nvmlComputeInstance_t,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        let o = out(compute_instance)?;
        run("nvmlGpuInstanceGetComputeInstanceById", Some(g), |e| {
            e.compute_instance(g, gi, id).map(|_| ())
        })?;
        *o = to_ptr(Handle::ComputeInstance { gpu: g, gi, ci: id });
        Ok(())
    })
}

/// `nvmlComputeInstanceGetInfo_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlComputeInstanceGetInfo_v2(
    compute_instance: nvmlComputeInstance_t,
    info: *mut nvmlComputeInstanceInfo_t,
) -> nvmlReturn_t {
    guard(|| {
        let (g, gi, ci) = ci_handle(compute_instance)?;
        let o = out(info)?;
        let s = run("nvmlComputeInstanceGetInfo_v2", Some(g), |e| {
            e.compute_instance(g, gi, ci)
                .cloned()
                .map_err(|_| engine::INVALID_ARGUMENT)
        })?;
        *o = nvmlComputeInstanceInfo_t {
            device: to_ptr(Handle::Device { gpu: g }),
            gpuInstance: to_ptr(Handle::GpuInstance { gpu: g, gi }),
            id: s.id,
            profileId: s.profile_id,
            placement: nvmlComputeInstancePlacement_t {
                start: s.placement_start,
                size: s.placement_size,
            },
        };
        Ok(())
    })
}

// MIG device handles.

/// `nvmlDeviceIsMigDeviceHandle`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig: *mut c_uint,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceIsMigDeviceHandle", device, is_mig, |_, d| {
        Ok(u32::from(matches!(d, Dev::Mig(..))))
    })
}

/// `nvmlDeviceGetGpuInstanceId` (MIG handles only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetGpuInstanceId", device, id, |_, d| match d {
        Dev::Mig(_, gi, _) => Ok(gi),
        Dev::Full(_) => Err(engine::NOT_SUPPORTED),
    })
}

/// `nvmlDeviceGetComputeInstanceId` (MIG handles only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    device_u32(
        "nvmlDeviceGetComputeInstanceId",
        device,
        id,
        |_, d| match d {
            Dev::Mig(_, _, ci) => Ok(ci),
            Dev::Full(_) => Err(engine::NOT_SUPPORTED),
        },
    )
}

/// `nvmlDeviceGetMaxMigDeviceCount`: 7 on MIG-capable GPUs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    device_u32(
        "nvmlDeviceGetMaxMigDeviceCount",
        device,
        count,
        |e, d| match d {
            Dev::Full(g) if e.spec(g)?.model.mig_capable() => Ok(7),
            _ => Err(engine::NOT_SUPPORTED),
        },
    )
}

/// `nvmlDeviceGetMigDeviceHandleByIndex`: MIG devices ordered by (GI id, CI id).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let o = out(mig)?;
        let (gi, ci) = run("nvmlDeviceGetMigDeviceHandleByIndex", Some(g), |e| {
            if !e.spec(g)?.model.mig_capable() {
                return Err(engine::NOT_SUPPORTED);
            }
            if index >= 7 {
                return Err(engine::INVALID_ARGUMENT);
            }
            e.mig_devices(g)?
                .get(index as usize)
                .copied()
                .ok_or(engine::NOT_FOUND)
        })?;
        *o = to_ptr(Handle::MigDevice { gpu: g, gi, ci });
        Ok(())
    })
}

/// `nvmlDeviceGetDeviceHandleFromMigDeviceHandle`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(mig)?;
        let o = out(device)?;
        let Dev::Mig(g, ..) = d else {
            return Err(engine::INVALID_ARGUMENT);
        };
        run(
            "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
            Some(g),
            |e| check(e, d),
        )?;
        *o = to_ptr(Handle::Device { gpu: g });
        Ok(())
    })
}
