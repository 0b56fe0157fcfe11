//! The host's cgroup tree as per-pod GPU memory limits need it: is it cgroup v2, which
//! GPUs the kernel's dmem controller knows, and where a pod's cgroup directory is.
//!
//! Owns reading files under the cgroup root (the host's `/sys/fs/cgroup`, mapped into
//! the plugin container; `--cgroup-root`). Must not write anything there: limits are set
//! through NVML only (NVIDIA, "MPS v3 Memory Partitioning", Setting Limits: writing
//! `dmem.*` files directly bypasses the driver's ancestor propagation).
//!
//! Facts:
//! - cgroup v2: the unified hierarchy's root has `cgroup.controllers` (kernel
//!   Documentation/admin-guide/cgroup-v2.rst); v1 mounts have no such file.
//! - dmem (kernel 6.14+): `<root>/dmem.capacity` lists one `<region> <bytes>` line per
//!   registered device region; NVIDIA GPUs appear as `nvidia/<pci>/vidmem` (NVIDIA,
//!   "Per-GPU Compute and Memory Limits with MPS", Requirements). Without such a line for
//!   a GPU the driver uses its `misc` fallback.
//! - Pod cgroups (kubelet pod container manager, `GetPodContainerName`): the QoS class
//!   picks the parent (`kubepods`, `kubepods/burstable`, `kubepods/besteffort`) and the
//!   pod's directory is `pod<uid>` with the cgroupfs driver, or
//!   `kubepods[-<qos>]-pod<uid with - as _>.slice` under `kubepods.slice` (and
//!   `kubepods-<qos>.slice`) with the systemd driver. The kubelet creates it
//!   (`pcm.EnsureExists`) before it asks the DRA manager to prepare the pod's claims.
//!   Rather than ask the API server for the pod's QoS class, every QoS parent of both
//!   drivers is tried with the pod's UID: exactly one exists on a node.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The dmem region name of a GPU: `nvidia/<pci>/vidmem`, the bus id in the kernel's
/// lower-case sysfs form (`0000:1b:00.0`) from NVML's `00000000:1B:00.0`.
pub fn dmem_region(pci_bus_id: &str) -> String {
    let lower = pci_bus_id.to_ascii_lowercase();
    let sysfs = match lower.split_once(':') {
        Some((domain, rest)) if domain.len() == 8 => format!("{}:{rest}", &domain[4..]),
        _ => lower,
    };
    format!("nvidia/{sysfs}/vidmem")
}

/// What the cgroup root says about memory-limit support.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupFacts {
    /// The root is a cgroup v2 hierarchy (`cgroup.controllers` exists).
    pub v2: bool,
    /// Regions listed in `dmem.capacity` (empty without the dmem controller).
    pub dmem_regions: BTreeSet<String>,
}

impl CgroupFacts {
    /// Reads `root/cgroup.controllers` and `root/dmem.capacity` (missing files: not v2 /
    /// no dmem regions).
    pub fn read(root: &Path) -> Self {
        let dmem_regions = std::fs::read_to_string(root.join("dmem.capacity"))
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            v2: root.join("cgroup.controllers").is_file(),
            dmem_regions,
        }
    }
}

/// Candidate directories of the pod with UID `uid`, relative to the cgroup root, in the
/// order tried: cgroupfs Guaranteed, Burstable, BestEffort, then the same for systemd.
pub fn pod_cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let escaped = uid.replace('-', "_");
    vec![
        PathBuf::from(format!("kubepods/pod{uid}")),
        PathBuf::from(format!("kubepods/burstable/pod{uid}")),
        PathBuf::from(format!("kubepods/besteffort/pod{uid}")),
        PathBuf::from(format!("kubepods.slice/kubepods-pod{escaped}.slice")),
        PathBuf::from(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"
        )),
        PathBuf::from(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"
        )),
    ]
}

/// The pod's cgroup directory under `root` (absolute when `root` is), or `None` when no
/// candidate exists (the kubelet has not created it, or `root` is not the host's tree).
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    pod_cgroup_candidates(uid)
        .into_iter()
        .map(|rel| root.join(rel))
        .find(|dir| dir.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pod_directory_of_either_driver_and_any_qos() {
        let root = tempfile::tempdir().unwrap();
        let uid = "0b6e-11";
        assert_eq!(find_pod_cgroup(root.path(), uid), None);
        let systemd = root
            .path()
            .join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6e_11.slice");
        std::fs::create_dir_all(&systemd).unwrap();
        assert_eq!(find_pod_cgroup(root.path(), uid), Some(systemd));
        let cgroupfs = root.path().join("kubepods/burstable/pod0b6e-11");
        std::fs::create_dir_all(&cgroupfs).unwrap();
        assert_eq!(find_pod_cgroup(root.path(), uid), Some(cgroupfs));
    }

    #[test]
    fn reads_v2_and_dmem_regions() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(CgroupFacts::read(root.path()), CgroupFacts::default());
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory dmem\n").unwrap();
        std::fs::write(
            root.path().join("dmem.capacity"),
            "nvidia/0000:1b:00.0/vidmem 85520809984\ndrm/0000:03:00.0/vram0 12550144\n",
        )
        .unwrap();
        let facts = CgroupFacts::read(root.path());
        assert!(facts.v2);
        assert!(
            facts
                .dmem_regions
                .contains(&dmem_region("00000000:1B:00.0"))
        );
        assert_eq!(facts.dmem_regions.len(), 2);
    }
}
