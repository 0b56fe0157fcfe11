//! Per-cgroup device-memory limits as NVML r615+ sets them (`nvmlDeviceSetMemoryLimits_v1`,
//! `nvmlDeviceGetMemoryLimits_v1`): the rules, and the `dmem.*` files a dmem-backed
//! driver leaves in the cgroup directory.
//!
//! Facts modelled (NVIDIA NVML API reference, `nvmlSetMemoryLimits_v1_t` /
//! `nvmlGetMemoryLimits_v1_t`; NVIDIA MPS documentation, "MPS v3 Memory Partitioning"):
//! - `nameSpace` is the full path of the cgroup directory; limits are bytes; soft 0 and
//!   hard `NVML_DEVICE_MEMORY_LIMIT_MAX` (all ones, `u64::MAX`) clear; removing the cgroup
//!   also clears its limits; a read of a cgroup without limits answers soft 0 / hard max.
//! - Needs a driver of the r615 branch or newer (CUDA 13.4): an older driver answers
//!   `NOT_SUPPORTED` here (a real older library does not export the symbols at all, which
//!   a test models by loading a library without them). MIG handles, and GPUs in MIG mode,
//!   are refused with `NOT_SUPPORTED`.
//! - dmem backend: a cgroup without `dmem.*` files (its parent did not enable `+dmem`)
//!   answers "not found"; the hard limit is the region's line in `dmem.max`, the soft one
//!   its line in `dmem.min`. misc backend: limits live in the driver only (no files).
//!
//! Not modelled: the dmem backend's propagation of soft limits into ancestors' `dmem.min`,
//! current usage (`currentUsed` is always 0), privilege checks.

use std::path::Path;

use crate::engine::{Code, Engine, INVALID_ARGUMENT, NOT_FOUND, NOT_SUPPORTED};
use crate::state::MemoryLimit;
use crate::topology::MemoryLimitBackend;

/// `NVML_DEVICE_MEMORY_LIMIT_MAX`: "no hard limit" (the C header's all-ones 64-bit value).
pub const LIMIT_MAX: u64 = u64::MAX;

/// First driver branch with per-cgroup memory limits (r615, CUDA 13.4).
pub const FIRST_DRIVER_MAJOR: u32 = 615;

/// What the fake sees of a cgroup directory before a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupView {
    /// The directory exists.
    pub exists: bool,
    /// It has the dmem controller's files (`dmem.max`).
    pub has_dmem: bool,
}

impl CgroupView {
    /// Looks at `dir` on disk.
    pub fn of(dir: &Path) -> Self {
        Self {
            exists: dir.is_absolute() && dir.is_dir(),
            has_dmem: dir.join("dmem.max").is_file(),
        }
    }
}

/// True when a driver of version `driver_version` (`615.71.09`) has the calls.
pub fn supported(driver_version: &str) -> bool {
    driver_version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|major| major >= FIRST_DRIVER_MAJOR)
}

/// The dmem region of a GPU: `nvidia/<domain:bus:device.function>/vidmem`, the bus id in
/// the kernel's lower-case sysfs form (`0000:1b:00.0`) from NVML's `00000000:1B:00.0`.
pub fn dmem_region(pci_bus_id: &str) -> String {
    let lower = pci_bus_id.to_ascii_lowercase();
    let sysfs = match lower.split_once(':') {
        Some((domain, rest)) if domain.len() == 8 => format!("{}:{rest}", &domain[4..]),
        _ => lower,
    };
    format!("nvidia/{sysfs}/vidmem")
}

impl Engine<'_> {
    fn memory_limit_checks(
        &mut self,
        gpu: u32,
        namespace: &str,
        view: CgroupView,
    ) -> Result<String, Code> {
        if !supported(&self.topo.driver_version) || self.gpu(gpu)?.mig_current {
            return Err(NOT_SUPPORTED);
        }
        let uuid = self.spec(gpu)?.uuid.clone();
        if !view.exists {
            // A removed cgroup takes its limits with it.
            if let Some(map) = self.state.memory_limits.get_mut(&uuid) {
                map.remove(namespace);
                if map.is_empty() {
                    self.state.memory_limits.remove(&uuid);
                }
            }
            return Err(NOT_FOUND);
        }
        if self.topo.memory_limit_backend == MemoryLimitBackend::Dmem && !view.has_dmem {
            return Err(NOT_FOUND);
        }
        Ok(uuid)
    }

    /// `nvmlDeviceSetMemoryLimits_v1` on full GPU `gpu` for cgroup `namespace`.
    ///
    /// Errors: `NOT_SUPPORTED` (driver before r615, MIG), `NOT_FOUND` (no such cgroup, or
    /// no dmem files on the dmem backend), `INVALID_ARGUMENT` (soft above hard, or a limit
    /// above the GPU's memory other than the max sentinel).
    pub fn set_memory_limits(
        &mut self,
        gpu: u32,
        namespace: &str,
        view: CgroupView,
        soft: u64,
        hard: u64,
    ) -> Result<(), Code> {
        let uuid = self.memory_limit_checks(gpu, namespace, view)?;
        let total = self.spec(gpu)?.model.memory_mib * 1024 * 1024;
        if (hard != LIMIT_MAX && (soft > hard || hard > total)) || soft > total {
            return Err(INVALID_ARGUMENT);
        }
        let map = self.state.memory_limits.entry(uuid.clone()).or_default();
        if soft == 0 && hard == LIMIT_MAX {
            map.remove(namespace);
        } else {
            map.insert(
                namespace.to_owned(),
                MemoryLimit {
                    soft_limit: soft,
                    hard_limit: hard,
                },
            );
        }
        if map.is_empty() {
            self.state.memory_limits.remove(&uuid);
        }
        Ok(())
    }

    /// `nvmlDeviceGetMemoryLimits_v1`: the limits of `namespace` (soft 0 / hard max when none).
    ///
    /// Errors: as [`Engine::set_memory_limits`], minus the value checks.
    pub fn memory_limits(
        &mut self,
        gpu: u32,
        namespace: &str,
        view: CgroupView,
    ) -> Result<MemoryLimit, Code> {
        let uuid = self.memory_limit_checks(gpu, namespace, view)?;
        Ok(self
            .state
            .memory_limits
            .get(&uuid)
            .and_then(|m| m.get(namespace))
            .copied()
            .unwrap_or(MemoryLimit {
                soft_limit: 0,
                hard_limit: LIMIT_MAX,
            }))
    }
}

/// Writes `region`'s lines of `dir/dmem.max` (hard, `max` for none) and `dir/dmem.min`
/// (soft), keeping other regions' lines, as the kernel shows them after a dmem-backed set.
pub fn write_dmem_files(dir: &Path, region: &str, limit: MemoryLimit) -> std::io::Result<()> {
    let hard = if limit.hard_limit == LIMIT_MAX {
        "max".to_owned()
    } else {
        limit.hard_limit.to_string()
    };
    for (file, value) in [
        ("dmem.max", hard),
        ("dmem.min", limit.soft_limit.to_string()),
    ] {
        let path = dir.join(file);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines: Vec<String> = old
            .lines()
            .filter(|l| l.split_whitespace().next() != Some(region))
            .map(str::to_owned)
            .collect();
        lines.push(format!("{region} {value}"));
        lines.sort();
        std::fs::write(&path, lines.join("\n") + "\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use crate::topology::Topology;

    fn topo(driver: &str, backend: &str) -> Topology {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(
            &path,
            format!("driverVersion: {driver}\nmemoryLimitBackend: {backend}\nnode: l40s-single\n"),
        )
        .unwrap();
        Topology::load(&path).unwrap()
    }

    const DMEM: CgroupView = CgroupView {
        exists: true,
        has_dmem: true,
    };

    #[test]
    fn sets_reads_and_clears_per_cgroup() {
        let t = topo("615.71.09", "dmem");
        let mut state = crate::engine::initial_state(&t).unwrap();
        let mut e = Engine {
            topo: &t,
            state: &mut state,
        };
        let gib = 1 << 30;
        e.set_memory_limits(0, "/cg/a", DMEM, gib, 2 * gib).unwrap();
        e.set_memory_limits(0, "/cg/b", DMEM, 0, 3 * gib).unwrap();
        assert_eq!(
            e.memory_limits(0, "/cg/a", DMEM).unwrap().hard_limit,
            2 * gib
        );
        e.set_memory_limits(0, "/cg/a", DMEM, 0, LIMIT_MAX).unwrap();
        let cleared = e.memory_limits(0, "/cg/a", DMEM).unwrap();
        assert_eq!((cleared.soft_limit, cleared.hard_limit), (0, LIMIT_MAX));
        let uuid = t.gpus[0].uuid.clone();
        assert_eq!(
            state.memory_limits[&uuid].keys().collect::<Vec<_>>(),
            ["/cg/b"]
        );
    }

    #[test]
    fn refuses_what_the_driver_refuses() {
        let old = topo("570.124.06", "dmem");
        let mut state: State = crate::engine::initial_state(&old).unwrap();
        let mut e = Engine {
            topo: &old,
            state: &mut state,
        };
        assert_eq!(
            e.set_memory_limits(0, "/cg/a", DMEM, 0, 1),
            Err(NOT_SUPPORTED)
        );

        let t = topo("615.71.09", "dmem");
        let mut state = crate::engine::initial_state(&t).unwrap();
        let mut e = Engine {
            topo: &t,
            state: &mut state,
        };
        let no_dmem = CgroupView {
            exists: true,
            has_dmem: false,
        };
        assert_eq!(
            e.set_memory_limits(0, "/cg/a", no_dmem, 0, 1),
            Err(NOT_FOUND)
        );
        let gone = CgroupView {
            exists: false,
            has_dmem: false,
        };
        assert_eq!(e.memory_limits(0, "/cg/a", gone), Err(NOT_FOUND));
        assert_eq!(
            e.set_memory_limits(0, "/cg/a", DMEM, 2, 1),
            Err(INVALID_ARGUMENT)
        );
        assert_eq!(
            e.set_memory_limits(0, "/cg/a", DMEM, 0, u64::MAX - 1),
            Err(INVALID_ARGUMENT)
        );

        let misc = topo("615.71.09", "misc");
        let mut state = crate::engine::initial_state(&misc).unwrap();
        let mut e = Engine {
            topo: &misc,
            state: &mut state,
        };
        e.set_memory_limits(0, "/cg/a", no_dmem, 0, 1 << 30)
            .unwrap();
        // The cgroup went away: its limit goes with it.
        assert_eq!(e.memory_limits(0, "/cg/a", gone), Err(NOT_FOUND));
        assert!(state.memory_limits.is_empty());
    }

    #[test]
    fn region_names_use_the_sysfs_bus_id() {
        assert_eq!(
            dmem_region("00000000:1B:00.0"),
            "nvidia/0000:1b:00.0/vidmem"
        );
    }

    #[test]
    fn dmem_files_keep_other_regions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dmem.max"),
            "nvidia/0000:1b:00.0/vidmem max\nnvidia/0000:2b:00.0/vidmem max\n",
        )
        .unwrap();
        let limit = MemoryLimit {
            soft_limit: 5,
            hard_limit: 7,
        };
        write_dmem_files(dir.path(), "nvidia/0000:1b:00.0/vidmem", limit).unwrap();
        let max = std::fs::read_to_string(dir.path().join("dmem.max")).unwrap();
        assert_eq!(
            max,
            "nvidia/0000:1b:00.0/vidmem 7\nnvidia/0000:2b:00.0/vidmem max\n"
        );
        let min = std::fs::read_to_string(dir.path().join("dmem.min")).unwrap();
        assert_eq!(min, "nvidia/0000:1b:00.0/vidmem 5\n");
    }
}
