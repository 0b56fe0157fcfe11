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

mod compute_instance;
mod device;
mod events;
mod gpu_instance;
mod memory_limits;
mod system;
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
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| engine::INVALID_ARGUMENT)
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
