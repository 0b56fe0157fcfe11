//! The per-cgroup GPU memory limits of NVIDIA driver r615+ (NVIDIA NVML API reference,
//! `nvmlDeviceSetMemoryLimits_v1` / `nvmlDeviceGetMemoryLimits_v1`,
//! `nvmlSetMemoryLimits_v1_t`), which nvml-wrapper-sys 0.10 has no binding for: they are
//! resolved by name, and an absent symbol means "not supported by this driver".
#![allow(unsafe_code)]

use nvml_wrapper::Device;
use nvml_wrapper::error::{NvmlError, nvml_try};

/// `NVML_DEVICE_MEMORY_LIMIT_MAX`: the hard limit meaning "none" (all ones in 64 bits, per
/// the CUDA 13.4 `nvml.h`); soft 0 with this hard limit clears a cgroup's limits.
pub const MEMORY_LIMIT_MAX: u64 = u64::MAX;

/// `nvmlSetMemoryLimits_v1_t` of the CUDA 13.4 `nvml.h` (no version field): the cgroup
/// directory, then the soft and hard limits in bytes.
#[repr(C)]
struct SetMemoryLimitsV1 {
    name_space: *const std::ffi::c_char,
    soft_limit: u64,
    hard_limit: u64,
}

/// `nvmlGetMemoryLimits_v1_t`: as the setter's struct plus `currentUsed` (bytes).
#[repr(C)]
struct GetMemoryLimitsV1 {
    name_space: *const std::ffi::c_char,
    soft_limit: u64,
    hard_limit: u64,
    current_used: u64,
}

type SetMemoryLimitsFn =
    unsafe extern "C" fn(nvml_wrapper_sys::bindings::nvmlDevice_t, *mut SetMemoryLimitsV1) -> u32;
type GetMemoryLimitsFn =
    unsafe extern "C" fn(nvml_wrapper_sys::bindings::nvmlDevice_t, *mut GetMemoryLimitsV1) -> u32;

/// Limits of one cgroup on one GPU as NVML reports them (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMemoryLimits {
    /// Soft limit (0 = none).
    pub soft: u64,
    /// Hard limit ([`MEMORY_LIMIT_MAX`] = none).
    pub hard: u64,
    /// Bytes the cgroup uses now.
    pub current_used: u64,
}

/// The per-cgroup memory-limit calls of an NVML library (`nvmlDeviceSetMemoryLimits_v1`,
/// `nvmlDeviceGetMemoryLimits_v1`, driver r615+), which nvml-wrapper 0.13 does not know.
///
/// Resolved by name from the same library file nvml-wrapper loaded (`dlopen` hands back
/// the already loaded library, so device handles from the wrapper are valid here). Keeps
/// the library loaded while it lives.
pub struct MemoryLimitSymbols {
    set: SetMemoryLimitsFn,
    get: GetMemoryLimitsFn,
    _library: libloading::Library,
}

impl MemoryLimitSymbols {
    /// Resolves the two symbols in `library` (default `libnvidia-ml.so.1`).
    ///
    /// Returns `Ok(None)` when the library lacks either symbol (a driver before r615:
    /// unsupported, not an error). Errors: the library cannot be loaded.
    pub fn load(library: Option<&std::path::Path>) -> Result<Option<Self>, libloading::Error> {
        let path = library.map_or_else(
            || std::ffi::OsString::from("libnvidia-ml.so.1"),
            |p| p.as_os_str().to_owned(),
        );
        // SAFETY: loading an NVML library runs its initialisers only, the same library
        // nvml-wrapper already loads in this process.
        let lib = unsafe { libloading::Library::new(&path) }?;
        // SAFETY: the symbol types are those of the CUDA 13.4 `nvml.h` prototypes
        // (`nvmlReturn_t f(nvmlDevice_t, nvml{Set,Get}MemoryLimits_v1_t *)`); the
        // pointers are copied out and stay valid while `_library` keeps it loaded.
        let symbols = unsafe {
            (
                lib.get::<SetMemoryLimitsFn>(b"nvmlDeviceSetMemoryLimits_v1\0")
                    .map(|s| *s),
                lib.get::<GetMemoryLimitsFn>(b"nvmlDeviceGetMemoryLimits_v1\0")
                    .map(|s| *s),
            )
        };
        Ok(match symbols {
            (Ok(set), Ok(get)) => Some(Self {
                set,
                get,
                _library: lib,
            }),
            _ => None,
        })
    }

    /// `nvmlDeviceSetMemoryLimits_v1` on `device` for the cgroup directory `cgroup`.
    ///
    /// Errors: NVML's (`NotSupported`: driver/GPU without the feature or a MIG handle;
    /// `NotFound`: no such cgroup, or no dmem files on it with the dmem backend;
    /// `NoPermission`: not root); `InvalidArg` for a path with a NUL byte.
    pub fn set(
        &self,
        device: &Device<'_>,
        cgroup: &std::path::Path,
        soft: u64,
        hard: u64,
    ) -> Result<(), NvmlError> {
        let name = cgroup_c_string(cgroup)?;
        let mut limits = SetMemoryLimitsV1 {
            name_space: name.as_ptr(),
            soft_limit: soft,
            hard_limit: hard,
        };
        // SAFETY: live handle from a borrowed `Device` (library initialised); `limits` is
        // a valid local whose `name_space` points into `name`, alive for the call.
        nvml_try(unsafe { (self.set)(device.handle(), &mut limits) })
    }

    /// `nvmlDeviceGetMemoryLimits_v1`: the limits of `cgroup` on `device`.
    ///
    /// Errors: as [`MemoryLimitSymbols::set`].
    pub fn get(
        &self,
        device: &Device<'_>,
        cgroup: &std::path::Path,
    ) -> Result<RawMemoryLimits, NvmlError> {
        let name = cgroup_c_string(cgroup)?;
        let mut limits = GetMemoryLimitsV1 {
            name_space: name.as_ptr(),
            soft_limit: 0,
            hard_limit: 0,
            current_used: 0,
        };
        // SAFETY: as in `set`; NVML writes the three output fields of the local.
        nvml_try(unsafe { (self.get)(device.handle(), &mut limits) })?;
        Ok(RawMemoryLimits {
            soft: limits.soft_limit,
            hard: limits.hard_limit,
            current_used: limits.current_used,
        })
    }
}

fn cgroup_c_string(cgroup: &std::path::Path) -> Result<std::ffi::CString, NvmlError> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(cgroup.as_os_str().as_bytes()).map_err(|_| NvmlError::InvalidArg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_without_the_memory_limit_symbols_means_unsupported() {
        // The C library loads but has no NVML symbols: a driver before r615 looks the same.
        let got = MemoryLimitSymbols::load(Some(std::path::Path::new("libc.so.6"))).unwrap();
        assert!(got.is_none());
        // A library that cannot be loaded at all is an error, not "unsupported".
        assert!(
            MemoryLimitSymbols::load(Some(std::path::Path::new("/nonexistent/libnvidia-ml.so.1")))
                .is_err()
        );
    }

    #[test]
    fn the_fake_library_has_them() {
        let lib = nvidia_ml::control::find_cdylib().expect("fake libnvidia_ml.so built for tests");
        assert!(MemoryLimitSymbols::load(Some(&lib)).unwrap().is_some());
    }
}
