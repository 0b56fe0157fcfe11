//! Library lifetime (`nvmlInit*`, `nvmlShutdown`), error strings, system queries and device enumeration.

use super::*;

fn init() -> nvmlReturn_t {
    init_with(Machine::from_env)
}

/// `nvmlInit_v2`: load the topology named by `FAKE_NVML_TOPOLOGY` (reference counted).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

/// `nvmlInit` (v1 alias).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> nvmlReturn_t {
    init()
}

/// `nvmlInitWithFlags`: flags are accepted and ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

/// `nvmlShutdown`: drop one init reference.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    guard(|| {
        let mut g = ctx();
        let c = g.as_mut().ok_or(engine::UNINITIALIZED)?;
        c.refcount -= 1;
        if c.refcount == 0 {
            *g = None;
        }
        Ok(())
    })
}

/// `nvmlErrorString`: static text for a return code (works without init).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    engine::error_string(result).as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let v = run("nvmlSystemGetDriverVersion", None, |e| {
            Ok(e.topo.driver_version.clone())
        })?;
        write_str(version, length, &v)
    })
}

/// `nvmlSystemGetNVMLVersion`: `12.<driver version>`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let v = run("nvmlSystemGetNVMLVersion", None, |e| {
            Ok(format!(
                "{}.{}",
                e.topo.cuda_driver_version / 1000,
                e.topo.driver_version
            ))
        })?;
        write_str(version, length, &v)
    })
}

fn cuda_version(function: &str, v: *mut c_int) -> nvmlReturn_t {
    guard(|| {
        let o = out(v)?;
        *o = run(function, None, |e| Ok(e.topo.cuda_driver_version))?;
        Ok(())
    })
}

/// `nvmlSystemGetCudaDriverVersion`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(v: *mut c_int) -> nvmlReturn_t {
    cuda_version("nvmlSystemGetCudaDriverVersion", v)
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> nvmlReturn_t {
    cuda_version("nvmlSystemGetCudaDriverVersion_v2", v)
}

// Device enumeration.

fn count(function: &str, c: *mut c_uint) -> nvmlReturn_t {
    guard(|| {
        let o = out(c)?;
        *o = run(function, None, |e| Ok(e.topo.gpus.len() as u32))?;
        Ok(())
    })
}

/// `nvmlDeviceGetCount_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(c: *mut c_uint) -> nvmlReturn_t {
    count("nvmlDeviceGetCount_v2", c)
}

/// `nvmlDeviceGetCount` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(c: *mut c_uint) -> nvmlReturn_t {
    count("nvmlDeviceGetCount", c)
}

fn by_index(function: &str, index: c_uint, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    guard(|| {
        let o = out(device)?;
        run(function, Some(index), |e| e.spec(index).map(|_| ()))?;
        *o = to_ptr(Handle::Device { gpu: index });
        Ok(())
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    by_index("nvmlDeviceGetHandleByIndex_v2", index, device)
}

/// `nvmlDeviceGetHandleByIndex` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    by_index("nvmlDeviceGetHandleByIndex", index, device)
}

/// `nvmlDeviceGetHandleByUUID`: GPU UUIDs give full handles, MIG UUIDs MIG handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| {
        let want = c_str(uuid)?.to_string();
        let o = out(device)?;
        let h = run("nvmlDeviceGetHandleByUUID", None, |e| {
            if let Some(g) = e.topo.gpu_by_uuid(&want) {
                return Ok(Handle::Device { gpu: g.index });
            }
            for g in &e.topo.gpus {
                for (gi, ci) in e.mig_devices(g.index)? {
                    if e.compute_instance(g.index, gi, ci)?.uuid == want {
                        return Ok(Handle::MigDevice {
                            gpu: g.index,
                            gi,
                            ci,
                        });
                    }
                }
            }
            Err(engine::NOT_FOUND)
        })?;
        *o = to_ptr(h);
        Ok(())
    })
}

fn by_bus_id(function: &str, bus: *const c_char, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    guard(|| {
        let want = normalize_bus_id(c_str(bus)?).ok_or(engine::INVALID_ARGUMENT)?;
        let o = out(device)?;
        let gpu = run(function, None, |e| {
            e.topo
                .gpus
                .iter()
                .find(|g| g.pci_bus_id == want)
                .map(|g| g.index)
                .ok_or(engine::NOT_FOUND)
        })?;
        *o = to_ptr(Handle::Device { gpu });
        Ok(())
    })
}

/// `nvmlDeviceGetHandleByPciBusId_v2` (`DDDDDDDD:BB:DD.F` or `DDDD:BB:DD.F`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    by_bus_id("nvmlDeviceGetHandleByPciBusId_v2", bus, device)
}

/// `nvmlDeviceGetHandleByPciBusId` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId(
    bus: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    by_bus_id("nvmlDeviceGetHandleByPciBusId", bus, device)
}
