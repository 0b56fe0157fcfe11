//! Per-device attributes, compute mode and MIG mode.

use super::*;

/// `nvmlDeviceGetName`: product name, or `<product> MIG <profile>` for MIG handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let n = run("nvmlDeviceGetName", Some(d.gpu()), |e| match d {
            Dev::Full(g) => Ok(e.spec(g)?.model.name.to_string()),
            Dev::Mig(g, gi, ci) => e.mig_device_name(g, gi, ci),
        })?;
        write_str(name, length, &n)
    })
}

/// `nvmlDeviceGetUUID`: `GPU-...` or `MIG-...`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let u = run("nvmlDeviceGetUUID", Some(d.gpu()), |e| match d {
            Dev::Full(g) => Ok(e.spec(g)?.uuid.clone()),
            Dev::Mig(g, gi, ci) => Ok(e.mig_device(g, gi, ci)?.1.uuid.clone()),
        })?;
        write_str(uuid, length, &u)
    })
}

/// `nvmlDeviceGetBrand`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetBrand(
    device: nvmlDevice_t,
    brand: *mut nvmlBrandType_t,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetBrand", device, brand, |e, d| {
        Ok(e.spec(d.gpu())?.model.brand)
    })
}

/// `nvmlDeviceGetIndex` (MIG handles answer their parent's index).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetIndex", device, index, |_, d| Ok(d.gpu()))
}

/// `nvmlDeviceGetMinorNumber` (full GPUs only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor: *mut c_uint,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetMinorNumber", device, minor, |e, d| match d {
        Dev::Full(g) => Ok(e.spec(g)?.minor),
        Dev::Mig(..) => Err(engine::NOT_SUPPORTED),
    })
}

/// `nvmlDeviceGetArchitecture`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetArchitecture(
    device: nvmlDevice_t,
    arch: *mut nvmlDeviceArchitecture_t,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetArchitecture", device, arch, |e, d| {
        Ok(e.spec(d.gpu())?.model.architecture)
    })
}

/// `nvmlDeviceGetCudaComputeCapability`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let (ma, mi) = (out(major)?, out(minor)?);
        let (a, b) = run("nvmlDeviceGetCudaComputeCapability", Some(d.gpu()), |e| {
            check(e, d)?;
            Ok(e.spec(d.gpu())?.model.compute_capability)
        })?;
        *ma = a;
        *mi = b;
        Ok(())
    })
}

/// `nvmlDeviceGetPciInfo_v3` (MIG handles answer their parent's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(pci)?;
        let (bus_id, dev_id, sub_id) = run("nvmlDeviceGetPciInfo_v3", Some(d.gpu()), |e| {
            check(e, d)?;
            let s = e.spec(d.gpu())?;
            Ok((
                s.pci_bus_id.clone(),
                s.model.pci_device_id,
                s.model.pci_subsystem_id,
            ))
        })?;
        let parse = |r: std::ops::Range<usize>| u32::from_str_radix(&bus_id[r], 16).unwrap_or(0);
        o.domain = parse(0..8);
        o.bus = parse(9..11);
        o.device = parse(12..14);
        o.pciDeviceId = dev_id;
        o.pciSubSystemId = sub_id;
        fill_name(&mut o.busId, &bus_id);
        fill_name(&mut o.busIdLegacy, &bus_id[4..]);
        Ok(())
    })
}

fn memory_of(e: &Engine<'_>, d: Dev) -> Result<u64, Code> {
    check(e, d)?;
    Ok(match d {
        Dev::Full(g) => e.spec(g)?.model.memory_mib,
        Dev::Mig(g, gi, ci) => e.mig_device(g, gi, ci)?.0.memory_mib,
    } * 1024
        * 1024)
}

/// `nvmlDeviceGetMemoryInfo` (v1): total, all free.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(memory)?;
        let total = run("nvmlDeviceGetMemoryInfo", Some(d.gpu()), |e| {
            memory_of(e, d)
        })?;
        *o = nvmlMemory_t {
            total,
            free: total,
            used: 0,
        };
        Ok(())
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`: requires `version == nvmlMemory_v2`
/// (`sizeof | 2 << 24`), else `ARGUMENT_VERSION_MISMATCH`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(memory)?;
        if o.version != struct_version::<nvmlMemory_v2_t>(2) {
            return Err(engine::ARGUMENT_VERSION_MISMATCH);
        }
        let total = run("nvmlDeviceGetMemoryInfo_v2", Some(d.gpu()), |e| {
            memory_of(e, d)
        })?;
        o.total = total;
        o.reserved = 0;
        o.free = total;
        o.used = 0;
        Ok(())
    })
}

// Compute mode and MIG mode.

/// `nvmlDeviceGetComputeMode` (MIG handles answer their parent's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeMode(
    device: nvmlDevice_t,
    mode: *mut nvmlComputeMode_t,
) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetComputeMode", device, mode, |e, d| {
        Ok(e.gpu(d.gpu())?.compute_mode.nvml())
    })
}

/// `nvmlDeviceSetComputeMode`: 0 DEFAULT, 2 PROHIBITED, 3 EXCLUSIVE_PROCESS.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetComputeMode(
    device: nvmlDevice_t,
    mode: nvmlComputeMode_t,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        run("nvmlDeviceSetComputeMode", Some(g), |e| {
            e.set_compute_mode(g, mode)
        })
    })
}

/// `nvmlDeviceGetMigMode`: current and pending.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let (c, p) = (out(current)?, out(pending)?);
        let (a, b) = run("nvmlDeviceGetMigMode", Some(g), |e| {
            if !e.spec(g)?.model.mig_capable() {
                return Err(engine::NOT_SUPPORTED);
            }
            let s = e.gpu(g)?;
            Ok((u32::from(s.mig_current), u32::from(s.mig_pending)))
        })?;
        *c = a;
        *p = b;
        Ok(())
    })
}

/// `nvmlDeviceSetMigMode`: applies at once (activation status `SUCCESS`), unless processes
/// hold the GPU (`IN_USE`) or the topology says the change waits for a reset
/// (`RESET_REQUIRED`); see [`engine::Engine::set_mig_mode`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetMigMode(
    device: nvmlDevice_t,
    mode: c_uint,
    status: *mut nvmlReturn_t,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let s = out(status)?;
        *s = run("nvmlDeviceSetMigMode", Some(g), |e| e.set_mig_mode(g, mode))?;
        Ok(())
    })
}
