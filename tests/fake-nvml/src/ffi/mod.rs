//! The NVML C ABI: `#[no_mangle] extern "C"` functions with the exact symbol names and
//! struct layouts nvml-wrapper 0.13 / nvml-wrapper-sys 0.10 resolve (`nvmlInit_v2`,
//! `nvmlDeviceGetCount_v2`, `nvmlDeviceGetHandleByIndex_v2`, `nvmlDeviceGetPciInfo_v3`,
//! `nvmlDeviceGetMemoryInfo_v2`, `nvmlEventSetWait_v2`, `nvmlComputeInstanceGetInfo_v2`,
//! `nvmlDeviceGetGpuInstancePossiblePlacements_v2` ...).
//!
//! The only module allowed to use `unsafe`: it checks pointers (null -> `INVALID_ARGUMENT`),
//! decodes handles, calls the pure [`crate::engine`] through [`crate::machine::Machine`] and
//! writes results back. It must hold no rules of its own. Panics never cross the ABI
//! (caught -> `NVML_ERROR_UNKNOWN`). Every other NVML symbol is exported from
//! [`unsupported`] and answers `NVML_ERROR_NOT_SUPPORTED`.
//!
//! Process-local state: the loaded [`Machine`] (from `FAKE_NVML_TOPOLOGY`, set at
//! `nvmlInit`), the init reference count and event sets (their registrations and XID
//! cursor), as in the real library.
#![allow(unsafe_code)]
#![allow(non_snake_case)]

#[cfg(test)]
mod tests;
mod unsupported;

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nvml_wrapper_sys::bindings::*;

use crate::engine::{self, Code, Engine};
use crate::ids::Handle;
use crate::machine::Machine;
use crate::topology::normalize_bus_id;

struct EventSet {
    regs: BTreeMap<u32, u64>,
    cursor: u64,
}

struct Context {
    machine: Machine,
    refcount: u32,
    event_sets: BTreeMap<u32, EventSet>,
    next_set: u32,
}

static CTX: Mutex<Option<Context>> = Mutex::new(None);

fn ctx() -> MutexGuard<'static, Option<Context>> {
    CTX.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run `f`, mapping panics to `NVML_ERROR_UNKNOWN` and `Ok` to `NVML_SUCCESS`.
fn guard(f: impl FnOnce() -> Result<(), Code>) -> nvmlReturn_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => engine::SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => engine::UNKNOWN,
    }
}

/// Run rule `f` for NVML function `function` on `gpu` (fault injection applies).
fn run<R>(
    function: &str,
    gpu: Option<u32>,
    f: impl FnOnce(&mut Engine<'_>) -> Result<R, Code>,
) -> Result<R, Code> {
    let guard = ctx();
    let c = guard.as_ref().ok_or(engine::UNINITIALIZED)?;
    match c.machine.with(|e| {
        e.fault(function, gpu)?;
        f(e)
    }) {
        Ok(r) => r,
        Err(err) => {
            eprintln!("fake-nvml: {function}: {err}");
            Err(engine::UNKNOWN)
        }
    }
}

fn out<'a, T>(p: *mut T) -> Result<&'a mut T, Code> {
    // SAFETY: the caller passes a valid pointer or null, as the NVML contract requires.
    unsafe { p.as_mut() }.ok_or(engine::INVALID_ARGUMENT)
}

fn handle<T>(p: *mut T) -> Result<Handle, Code> {
    Handle::decode(p.addr() as u64).ok_or(engine::INVALID_ARGUMENT)
}

fn to_ptr<T>(h: Handle) -> *mut T {
    std::ptr::without_provenance_mut(h.encode() as usize)
}

fn c_str<'a>(p: *const c_char) -> Result<&'a str, Code> {
    if p.is_null() {
        return Err(engine::INVALID_ARGUMENT);
    }
    // SAFETY: non-null, NUL-terminated by the NVML contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| engine::INVALID_ARGUMENT)
}

fn write_str(buf: *mut c_char, len: c_uint, s: &str) -> Result<(), Code> {
    if buf.is_null() {
        return Err(engine::INVALID_ARGUMENT);
    }
    if (len as usize) < s.len() + 1 {
        return Err(engine::INSUFFICIENT_SIZE);
    }
    // SAFETY: buf holds at least len >= s.len() + 1 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        *buf.add(s.len()) = 0;
    }
    Ok(())
}

fn fill_name<const N: usize>(dst: &mut [c_char; N], s: &str) {
    dst.fill(0);
    for (d, b) in dst.iter_mut().zip(s.bytes().take(N - 1)) {
        *d = b as c_char;
    }
}

/// A device handle: the full GPU index and, for MIG handles, (gi, ci).
#[derive(Clone, Copy)]
enum Dev {
    Full(u32),
    Mig(u32, u32, u32),
}

impl Dev {
    fn gpu(self) -> u32 {
        match self {
            Dev::Full(g) | Dev::Mig(g, _, _) => g,
        }
    }
}

fn dev(d: nvmlDevice_t) -> Result<Dev, Code> {
    match handle(d)? {
        Handle::Device { gpu } => Ok(Dev::Full(gpu)),
        Handle::MigDevice { gpu, gi, ci } => Ok(Dev::Mig(gpu, gi, ci)),
        _ => Err(engine::INVALID_ARGUMENT),
    }
}

fn full(d: nvmlDevice_t) -> Result<u32, Code> {
    match dev(d)? {
        Dev::Full(g) => Ok(g),
        Dev::Mig(..) => Err(engine::NOT_SUPPORTED),
    }
}

fn gi_handle(h: nvmlGpuInstance_t) -> Result<(u32, u32), Code> {
    match handle(h)? {
        Handle::GpuInstance { gpu, gi } => Ok((gpu, gi)),
        _ => Err(engine::INVALID_ARGUMENT),
    }
}

fn ci_handle(h: nvmlComputeInstance_t) -> Result<(u32, u32, u32), Code> {
    match handle(h)? {
        Handle::ComputeInstance { gpu, gi, ci } => Ok((gpu, gi, ci)),
        _ => Err(engine::INVALID_ARGUMENT),
    }
}

/// Validate a device handle against the state (stale MIG handles are `INVALID_ARGUMENT`).
fn check(e: &Engine<'_>, d: Dev) -> Result<(), Code> {
    match d {
        Dev::Full(g) => e.spec(g).map(|_| ()),
        Dev::Mig(g, gi, ci) => e.mig_device(g, gi, ci).map(|_| ()),
    }
}

fn struct_version<T>(v: u32) -> u32 {
    (std::mem::size_of::<T>() as u32) | (v << 24)
}

// ---------------------------------------------------------------------------------------
// Library lifetime and system queries.

fn init() -> nvmlReturn_t {
    init_with(Machine::from_env)
}

/// Initialise with the machine `load` returns (the environment in production, explicit
/// paths in this module's tests); reference counted like the real library.
fn init_with(load: impl FnOnce() -> Result<Machine, crate::machine::MachineError>) -> nvmlReturn_t {
    guard(|| {
        let mut g = ctx();
        if let Some(c) = g.as_mut() {
            c.refcount += 1;
            return Ok(());
        }
        let machine = load().map_err(|e| {
            eprintln!("fake-nvml: nvmlInit: {e}");
            engine::DRIVER_NOT_LOADED
        })?;
        machine
            .with(|e| e.fault("nvmlInit_v2", None))
            .map_err(|_| engine::UNKNOWN)??;
        *g = Some(Context {
            machine,
            refcount: 1,
            event_sets: BTreeMap::new(),
            next_set: 1,
        });
        Ok(())
    })
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
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    guard(|| {
        let v = run("nvmlSystemGetDriverVersion", None, |e| Ok(e.topo.driver_version.clone()))?;
        write_str(version, length, &v)
    })
}

/// `nvmlSystemGetNVMLVersion`: `12.<driver version>`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    guard(|| {
        let v = run("nvmlSystemGetNVMLVersion", None, |e| {
            Ok(format!("{}.{}", e.topo.cuda_driver_version / 1000, e.topo.driver_version))
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

// ---------------------------------------------------------------------------------------
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
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    by_index("nvmlDeviceGetHandleByIndex_v2", index, device)
}

/// `nvmlDeviceGetHandleByIndex` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    by_index("nvmlDeviceGetHandleByIndex", index, device)
}

/// `nvmlDeviceGetHandleByUUID`: GPU UUIDs give full handles, MIG UUIDs MIG handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(uuid: *const c_char, device: *mut nvmlDevice_t) -> nvmlReturn_t {
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
                        return Ok(Handle::MigDevice { gpu: g.index, gi, ci });
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
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(bus: *const c_char, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    by_bus_id("nvmlDeviceGetHandleByPciBusId_v2", bus, device)
}

/// `nvmlDeviceGetHandleByPciBusId` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId(bus: *const c_char, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    by_bus_id("nvmlDeviceGetHandleByPciBusId", bus, device)
}

// ---------------------------------------------------------------------------------------
// Device attributes.

/// `nvmlDeviceGetName`: product name, or `<product> MIG <profile>` for MIG handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(device: nvmlDevice_t, name: *mut c_char, length: c_uint) -> nvmlReturn_t {
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
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: nvmlDevice_t, uuid: *mut c_char, length: c_uint) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let u = run("nvmlDeviceGetUUID", Some(d.gpu()), |e| match d {
            Dev::Full(g) => Ok(e.spec(g)?.uuid.clone()),
            Dev::Mig(g, gi, ci) => Ok(e.mig_device(g, gi, ci)?.1.uuid.clone()),
        })?;
        write_str(uuid, length, &u)
    })
}

fn device_u32(
    function: &str,
    device: nvmlDevice_t,
    o: *mut c_uint,
    f: impl FnOnce(&Engine<'_>, Dev) -> Result<u32, Code>,
) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(o)?;
        *o = run(function, Some(d.gpu()), |e| {
            check(e, d)?;
            f(e, d)
        })?;
        Ok(())
    })
}

/// `nvmlDeviceGetBrand`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetBrand(device: nvmlDevice_t, brand: *mut nvmlBrandType_t) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetBrand", device, brand, |e, d| Ok(e.spec(d.gpu())?.model.brand))
}

/// `nvmlDeviceGetIndex` (MIG handles answer their parent's index).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetIndex", device, index, |_, d| Ok(d.gpu()))
}

/// `nvmlDeviceGetMinorNumber` (full GPUs only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(device: nvmlDevice_t, minor: *mut c_uint) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetMinorNumber", device, minor, |e, d| match d {
        Dev::Full(g) => Ok(e.spec(g)?.minor),
        Dev::Mig(..) => Err(engine::NOT_SUPPORTED),
    })
}

/// `nvmlDeviceGetArchitecture`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetArchitecture(device: nvmlDevice_t, arch: *mut nvmlDeviceArchitecture_t) -> nvmlReturn_t {
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
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: nvmlDevice_t, pci: *mut nvmlPciInfo_t) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(pci)?;
        let (bus_id, dev_id, sub_id) = run("nvmlDeviceGetPciInfo_v3", Some(d.gpu()), |e| {
            check(e, d)?;
            let s = e.spec(d.gpu())?;
            Ok((s.pci_bus_id.clone(), s.model.pci_device_id, s.model.pci_subsystem_id))
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
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: nvmlDevice_t, memory: *mut nvmlMemory_t) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(memory)?;
        let total = run("nvmlDeviceGetMemoryInfo", Some(d.gpu()), |e| memory_of(e, d))?;
        *o = nvmlMemory_t { total, free: total, used: 0 };
        Ok(())
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`: requires `version == nvmlMemory_v2`
/// (`sizeof | 2 << 24`), else `ARGUMENT_VERSION_MISMATCH`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: nvmlDevice_t, memory: *mut nvmlMemory_v2_t) -> nvmlReturn_t {
    guard(|| {
        let d = dev(device)?;
        let o = out(memory)?;
        if o.version != struct_version::<nvmlMemory_v2_t>(2) {
            return Err(engine::ARGUMENT_VERSION_MISMATCH);
        }
        let total = run("nvmlDeviceGetMemoryInfo_v2", Some(d.gpu()), |e| memory_of(e, d))?;
        o.total = total;
        o.reserved = 0;
        o.free = total;
        o.used = 0;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Compute mode and MIG mode.

/// `nvmlDeviceGetComputeMode` (MIG handles answer their parent's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeMode(device: nvmlDevice_t, mode: *mut nvmlComputeMode_t) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetComputeMode", device, mode, |e, d| {
        Ok(e.gpu(d.gpu())?.compute_mode.nvml())
    })
}

/// `nvmlDeviceSetComputeMode`: 0 DEFAULT, 2 PROHIBITED, 3 EXCLUSIVE_PROCESS.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetComputeMode(device: nvmlDevice_t, mode: nvmlComputeMode_t) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        run("nvmlDeviceSetComputeMode", Some(g), |e| e.set_compute_mode(g, mode))
    })
}

/// `nvmlDeviceGetMigMode`: current and pending.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(device: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) -> nvmlReturn_t {
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

/// `nvmlDeviceSetMigMode`: applies at once; activation status `SUCCESS`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetMigMode(device: nvmlDevice_t, mode: c_uint, status: *mut nvmlReturn_t) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let s = out(status)?;
        *s = run("nvmlDeviceSetMigMode", Some(g), |e| e.set_mig_mode(g, mode))?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// GPU instances.

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

/// Write `items` into a caller array of `*count` capacity (query size when the array is null).
fn write_array<T: Copy>(arr: *mut T, count: *mut c_uint, items: &[T]) -> Result<(), Code> {
    let c = out(count)?;
    if arr.is_null() {
        *c = items.len() as c_uint;
        return Ok(());
    }
    if (*c as usize) < items.len() {
        *c = items.len() as c_uint;
        return Err(engine::INSUFFICIENT_SIZE);
    }
    // SAFETY: the caller declared room for *c >= items.len() elements.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), arr, items.len()) };
    *c = items.len() as c_uint;
    Ok(())
}

/// Write `items` into a caller array sized by the profile's instance count (NVML's contract
/// for the instance listing calls, which do not read `*count`).
fn write_list<T: Copy>(arr: *mut T, count: *mut c_uint, items: &[T]) -> Result<(), Code> {
    let c = out(count)?;
    if arr.is_null() {
        return Err(engine::INVALID_ARGUMENT);
    }
    // SAFETY: the caller provides room for the profile's instanceCount >= items.len().
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), arr, items.len()) };
    *c = items.len() as c_uint;
    Ok(())
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
        let list = run("nvmlDeviceGetGpuInstancePossiblePlacements_v2", Some(g), |e| {
            e.possible_placements(g, profile_id)
        })?;
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
            let size = e.possible_placements(g, profile_id)?.first().map_or(0, |x| x.1);
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
    guard(|| create_gi("nvmlDeviceCreateGpuInstance", device, profile_id, None, gpu_instance))
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
        create_gi("nvmlDeviceCreateGpuInstanceWithPlacement", device, profile_id, Some(p), gpu_instance)
    })
}

/// `nvmlGpuInstanceDestroy`: `IN_USE` while compute instances exist.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceDestroy(gpu_instance: nvmlGpuInstance_t) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        run("nvmlGpuInstanceDestroy", Some(g), |e| e.destroy_gpu_instance(g, gi))
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
        let ids = run("nvmlDeviceGetGpuInstances", Some(g), |e| e.gpu_instances(g, profile_id))?;
        let items: Vec<nvmlGpuInstance_t> =
            ids.into_iter().map(|gi| to_ptr(Handle::GpuInstance { gpu: g, gi })).collect();
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
        run("nvmlDeviceGetGpuInstanceById", Some(g), |e| e.gpu_instance(g, id).map(|_| ()))?;
        *o = to_ptr(Handle::GpuInstance { gpu: g, gi: id });
        Ok(())
    })
}

/// `nvmlGpuInstanceGetInfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetInfo(gpu_instance: nvmlGpuInstance_t, info: *mut nvmlGpuInstanceInfo_t) -> nvmlReturn_t {
    guard(|| {
        let (g, gi) = gi_handle(gpu_instance)?;
        let o = out(info)?;
        let s = run("nvmlGpuInstanceGetInfo", Some(g), |e| {
            e.gpu_instance(g, gi).cloned().map_err(|_| engine::INVALID_ARGUMENT)
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

// ---------------------------------------------------------------------------------------
// Compute instances.

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
        let p = *e.spec(g)?.model.gi_profile_by_id(pid).ok_or(engine::UNKNOWN)?;
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
        let (c, p) = ci_profile("nvmlGpuInstanceGetComputeInstanceProfileInfo", gpu_instance, profile, eng_profile)?;
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
        let (c, p) = ci_profile("nvmlGpuInstanceGetComputeInstanceProfileInfoV", gpu_instance, profile, eng_profile)?;
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
        *c = run("nvmlGpuInstanceGetComputeInstanceRemainingCapacity", Some(g), |e| {
            e.compute_instance_remaining_capacity(g, gi, profile_id)
        })?;
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
        let c = run("nvmlGpuInstanceGetComputeInstancePossiblePlacements", Some(g), |e| {
            e.compute_instance_profile(g, gi, profile_id)
        })?;
        let items: Vec<nvmlComputeInstancePlacement_t> = c
            .placement_starts
            .iter()
            .map(|s| nvmlComputeInstancePlacement_t { start: *s, size: c.slices })
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
    guard(|| create_ci("nvmlGpuInstanceCreateComputeInstance", gpu_instance, profile_id, None, compute_instance))
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
pub unsafe extern "C" fn nvmlComputeInstanceDestroy(compute_instance: nvmlComputeInstance_t) -> nvmlReturn_t {
    guard(|| {
        let (g, gi, ci) = ci_handle(compute_instance)?;
        run("nvmlComputeInstanceDestroy", Some(g), |e| e.destroy_compute_instance(g, gi, ci))
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
            e.compute_instance(g, gi, ci).cloned().map_err(|_| engine::INVALID_ARGUMENT)
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

// ---------------------------------------------------------------------------------------
// MIG device handles.

/// `nvmlDeviceIsMigDeviceHandle`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: nvmlDevice_t, is_mig: *mut c_uint) -> nvmlReturn_t {
    device_u32("nvmlDeviceIsMigDeviceHandle", device, is_mig, |_, d| {
        Ok(u32::from(matches!(d, Dev::Mig(..))))
    })
}

/// `nvmlDeviceGetGpuInstanceId` (MIG handles only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(device: nvmlDevice_t, id: *mut c_uint) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetGpuInstanceId", device, id, |_, d| match d {
        Dev::Mig(_, gi, _) => Ok(gi),
        Dev::Full(_) => Err(engine::NOT_SUPPORTED),
    })
}

/// `nvmlDeviceGetComputeInstanceId` (MIG handles only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(device: nvmlDevice_t, id: *mut c_uint) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetComputeInstanceId", device, id, |_, d| match d {
        Dev::Mig(_, _, ci) => Ok(ci),
        Dev::Full(_) => Err(engine::NOT_SUPPORTED),
    })
}

/// `nvmlDeviceGetMaxMigDeviceCount`: 7 on MIG-capable GPUs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: nvmlDevice_t, count: *mut c_uint) -> nvmlReturn_t {
    device_u32("nvmlDeviceGetMaxMigDeviceCount", device, count, |e, d| match d {
        Dev::Full(g) if e.spec(g)?.model.mig_capable() => Ok(7),
        _ => Err(engine::NOT_SUPPORTED),
    })
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
            e.mig_devices(g)?.get(index as usize).copied().ok_or(engine::NOT_FOUND)
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
        run("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", Some(g), |e| check(e, d))?;
        *o = to_ptr(Handle::Device { gpu: g });
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Events.

/// `nvmlDeviceGetSupportedEventTypes`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(device: nvmlDevice_t, types: *mut c_ulonglong) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let o = out(types)?;
        *o = run("nvmlDeviceGetSupportedEventTypes", Some(g), |e| {
            e.spec(g)?;
            Ok(engine::SUPPORTED_EVENTS)
        })?;
        Ok(())
    })
}

/// `nvmlEventSetCreate`: only XIDs injected after creation are delivered.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        let o = out(set)?;
        let cursor = run("nvmlEventSetCreate", None, |e| {
            Ok(e.state.xid_events.last().map_or(0, |x| x.seq))
        })?;
        let mut g = ctx();
        let c = g.as_mut().ok_or(engine::UNINITIALIZED)?;
        let id = c.next_set;
        c.next_set += 1;
        c.event_sets.insert(id, EventSet { regs: BTreeMap::new(), cursor });
        *o = to_ptr(Handle::EventSet { id });
        Ok(())
    })
}

fn set_id(set: nvmlEventSet_t) -> Result<u32, Code> {
    match handle(set)? {
        Handle::EventSet { id } => Ok(id),
        _ => Err(engine::INVALID_ARGUMENT),
    }
}

/// `nvmlDeviceRegisterEvents`: types must be a subset of the supported ones.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(device: nvmlDevice_t, types: c_ulonglong, set: nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let id = set_id(set)?;
        run("nvmlDeviceRegisterEvents", Some(g), |e| {
            e.spec(g)?;
            if types & !engine::SUPPORTED_EVENTS != 0 {
                return Err(engine::NOT_SUPPORTED);
            }
            Ok(())
        })?;
        let mut guard = ctx();
        let c = guard.as_mut().ok_or(engine::UNINITIALIZED)?;
        let s = c.event_sets.get_mut(&id).ok_or(engine::INVALID_ARGUMENT)?;
        *s.regs.entry(g).or_insert(0) |= types;
        Ok(())
    })
}

fn wait(function: &str, set: nvmlEventSet_t, data: *mut nvmlEventData_t, timeout_ms: c_uint) -> nvmlReturn_t {
    guard(|| {
        let id = set_id(set)?;
        let o = out(data)?;
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        loop {
            let (regs, cursor) = {
                let g = ctx();
                let c = g.as_ref().ok_or(engine::UNINITIALIZED)?;
                let s = c.event_sets.get(&id).ok_or(engine::INVALID_ARGUMENT)?;
                (s.regs.clone(), s.cursor)
            };
            let found = run(function, None, |e| Ok(e.next_xid(cursor, &regs)))?;
            if let Some((gpu, ev)) = found {
                let mut g = ctx();
                if let Some(s) = g.as_mut().and_then(|c| c.event_sets.get_mut(&id)) {
                    s.cursor = ev.seq;
                }
                *o = nvmlEventData_t {
                    device: to_ptr(Handle::Device { gpu }),
                    eventType: c_ulonglong::from(nvmlEventTypeXidCriticalError),
                    eventData: ev.xid,
                    gpuInstanceId: u32::MAX,
                    computeInstanceId: u32::MAX,
                };
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(engine::TIMEOUT);
            }
            // Polling the shared state file is how other processes' injections arrive.
            std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
        }
    })
}

/// `nvmlEventSetWait_v2`: next XID on a registered GPU, or `TIMEOUT`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(set: nvmlEventSet_t, data: *mut nvmlEventData_t, timeout_ms: c_uint) -> nvmlReturn_t {
    wait("nvmlEventSetWait_v2", set, data, timeout_ms)
}

/// `nvmlEventSetWait` (v1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait(set: nvmlEventSet_t, data: *mut nvmlEventData_t, timeout_ms: c_uint) -> nvmlReturn_t {
    wait("nvmlEventSetWait", set, data, timeout_ms)
}

/// `nvmlEventSetFree`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    guard(|| {
        let id = set_id(set)?;
        let mut g = ctx();
        let c = g.as_mut().ok_or(engine::UNINITIALIZED)?;
        c.event_sets.remove(&id).map(|_| ()).ok_or(engine::INVALID_ARGUMENT)
    })
}
