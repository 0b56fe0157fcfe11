//! `nvmlDeviceSetMemoryLimits_v1` / `nvmlDeviceGetMemoryLimits_v1` (NVML r615+), with the
//! struct layouts of the CUDA 13.4 `nvml.h`: no version field; `nameSpace` pointer, then
//! `unsigned long long` soft and hard limits (and `currentUsed` for the getter). Rules in
//! [`crate::memory_limits`].

use std::path::Path;

use super::*;
use crate::memory_limits::{self as rules, CgroupView};
use crate::state::MemoryLimit;
use crate::topology::MemoryLimitBackend;

/// `nvmlSetMemoryLimits_v1_t`.
#[repr(C)]
pub struct SetMemoryLimits {
    /// Full path of the cgroup directory.
    pub name_space: *const c_char,
    /// Soft limit, bytes.
    pub soft_limit: c_ulonglong,
    /// Hard limit, bytes.
    pub hard_limit: c_ulonglong,
}

/// `nvmlGetMemoryLimits_v1_t`.
#[repr(C)]
pub struct GetMemoryLimits {
    /// Full path of the cgroup directory (in).
    pub name_space: *const c_char,
    /// Soft limit, bytes (out).
    pub soft_limit: c_ulonglong,
    /// Hard limit, bytes (out).
    pub hard_limit: c_ulonglong,
    /// Bytes in use (out; always 0 here).
    pub current_used: c_ulonglong,
}

/// `nvmlDeviceSetMemoryLimits_v1`: records the limits of `limits->nameSpace` on the GPU
/// and, on the dmem backend, writes the region's `dmem.max` / `dmem.min` lines there.
///
/// # Safety
/// `limits` is null or points to a valid `nvmlSetMemoryLimits_v1_t` whose `nameSpace` is
/// a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetMemoryLimits_v1(
    device: nvmlDevice_t,
    limits: *mut SetMemoryLimits,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let l = out(limits)?;
        let ns = c_str(l.name_space)?.to_owned();
        let (soft, hard) = (l.soft_limit, l.hard_limit);
        let view = CgroupView::of(Path::new(&ns));
        let (backend, region) = run("nvmlDeviceSetMemoryLimits_v1", Some(g), |e| {
            e.set_memory_limits(g, &ns, view, soft, hard)?;
            Ok((
                e.topo.memory_limit_backend,
                rules::dmem_region(&e.spec(g)?.pci_bus_id),
            ))
        })?;
        if backend == MemoryLimitBackend::Dmem {
            let limit = MemoryLimit {
                soft_limit: soft,
                hard_limit: hard,
            };
            rules::write_dmem_files(Path::new(&ns), &region, limit).map_err(|err| {
                eprintln!(
                    "fake-nvml: nvmlDeviceSetMemoryLimits_v1: writing dmem files in {ns}: {err}"
                );
                engine::UNKNOWN
            })?;
        }
        Ok(())
    })
}

/// `nvmlDeviceGetMemoryLimits_v1`: the limits of `limits->nameSpace` on the GPU.
///
/// # Safety
/// `limits` is null or points to a valid `nvmlGetMemoryLimits_v1_t` whose `nameSpace` is
/// a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryLimits_v1(
    device: nvmlDevice_t,
    limits: *mut GetMemoryLimits,
) -> nvmlReturn_t {
    guard(|| {
        let g = full(device)?;
        let l = out(limits)?;
        let ns = c_str(l.name_space)?.to_owned();
        let view = CgroupView::of(Path::new(&ns));
        let got = run("nvmlDeviceGetMemoryLimits_v1", Some(g), |e| {
            e.memory_limits(g, &ns, view)
        })?;
        l.soft_limit = got.soft_limit;
        l.hard_limit = got.hard_limit;
        l.current_used = 0;
        Ok(())
    })
}
