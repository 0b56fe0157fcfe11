//! The optional fake `/proc` tree the driver reads to build MIG capability device nodes
//! (enabled by `FAKE_NVML_PROC_ROOT`).
//!
//! Owns rendering (pure, [`render`]) and writing ([`sync`]) of:
//! - `<root>/devices`: character majors `195 nvidia-frontend`, `nvidia-caps`, `nvidia-uvm`;
//! - `<root>/driver/nvidia-caps/mig-minors`: the driver's fixed minor table;
//! - `<root>/driver/nvidia/capabilities/mig/{config,monitor}` and
//!   `<root>/driver/nvidia/capabilities/gpu<minor>/mig/gi<G>/access` and
//!   `.../gi<G>/ci<C>/access` for every existing instance, in the driver's format
//!   (`DeviceFileMinor: N`, `DeviceFileMode: 292`, `DeviceFileModify: 1`).
//!
//! Minor numbers follow the driver's table (MIG user guide, "Device Nodes and
//! Capabilities"): `config` 1, `monitor` 2, then per GPU 135 minors from 3 +
//! 135 x gpu-minor: `gi<G>/access` at +9G, `gi<G>/ci<C>/access` at +9G+1+C.
//! Stale `gi*` directories are removed; it never touches anything else under the root.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::state::State;

/// Character major of `nvidia-caps` in the fake tree.
pub const NVIDIA_CAPS_MAJOR: u32 = 235;
/// Character major of `nvidia-uvm` in the fake tree.
pub const NVIDIA_UVM_MAJOR: u32 = 510;

/// Minor of `/dev/nvidia-caps/nvidia-cap<N>` for GI `gi` of GPU `gpu_minor`.
pub fn gi_cap_minor(gpu_minor: u32, gi: u32) -> u32 {
    3 + gpu_minor * 135 + gi * 9
}

/// Minor of `/dev/nvidia-caps/nvidia-cap<N>` for CI `ci` of GI `gi` of GPU `gpu_minor`.
pub fn ci_cap_minor(gpu_minor: u32, gi: u32, ci: u32) -> u32 {
    gi_cap_minor(gpu_minor, gi) + 1 + ci
}

fn access(minor: u32) -> String {
    format!("DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
}

/// Every file of the tree for `state`, by path relative to the proc root.
pub fn render(state: &State) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    files.insert(
        PathBuf::from("devices"),
        format!(
            "Character devices:\n  1 mem\n  4 /dev/vc/0\n  5 /dev/tty\n195 nvidia-frontend\n{NVIDIA_CAPS_MAJOR} nvidia-caps\n{NVIDIA_UVM_MAJOR} nvidia-uvm\n\nBlock devices:\n  7 loop\n  8 sd\n"
        ),
    );
    let caps = PathBuf::from("driver/nvidia/capabilities");
    files.insert(caps.join("mig/config"), access(1));
    files.insert(caps.join("mig/monitor"), access(2));
    let mut minors = String::from("config 1\nmonitor 2\n");
    let mut gpu_minors: Vec<u32> = state.gpus.values().map(|g| g.minor).collect();
    gpu_minors.sort_unstable();
    for m in gpu_minors {
        for gi in 0..15 {
            minors.push_str(&format!("gpu{m}/gi{gi}/access {}\n", gi_cap_minor(m, gi)));
            for ci in 0..8 {
                minors.push_str(&format!(
                    "gpu{m}/gi{gi}/ci{ci}/access {}\n",
                    ci_cap_minor(m, gi, ci)
                ));
            }
        }
    }
    files.insert(PathBuf::from("driver/nvidia-caps/mig-minors"), minors);
    for g in state.gpus.values().filter(|g| g.mig_current) {
        for gi in g.gpu_instances.values() {
            let gi_dir = caps.join(format!("gpu{}/mig/gi{}", g.minor, gi.id));
            files.insert(gi_dir.join("access"), access(gi_cap_minor(g.minor, gi.id)));
            for ci in gi.compute_instances.values() {
                files.insert(
                    gi_dir.join(format!("ci{}/access", ci.id)),
                    access(ci_cap_minor(g.minor, gi.id, ci.id)),
                );
            }
        }
    }
    files
}

/// Write the tree for `state` under `root`, removing instance directories that no longer exist.
pub fn sync(root: &Path, state: &State) -> std::io::Result<()> {
    let files = render(state);
    let caps = root.join("driver/nvidia/capabilities");
    if let Ok(entries) = fs::read_dir(&caps) {
        for gpu_dir in entries.flatten() {
            let mig = gpu_dir.path().join("mig");
            let Ok(gis) = fs::read_dir(&mig) else {
                continue;
            };
            for gi in gis.flatten() {
                let name = gi.file_name().to_string_lossy().to_string();
                if !name.starts_with("gi") {
                    continue;
                }
                let rel = gi
                    .path()
                    .strip_prefix(root)
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                if files.keys().any(|k| k.starts_with(&rel)) {
                    // Remove stale CI dirs inside a surviving GI.
                    for ci in fs::read_dir(gi.path())?.flatten() {
                        let crel = rel.join(ci.file_name());
                        if ci.file_name().to_string_lossy().starts_with("ci")
                            && !files.keys().any(|k| k.starts_with(&crel))
                        {
                            fs::remove_dir_all(ci.path())?;
                        }
                    }
                } else {
                    fs::remove_dir_all(gi.path())?;
                }
            }
        }
    }
    for (rel, content) in files {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        if fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
            fs::write(&path, content)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, initial_state};
    use crate::topology::Topology;

    #[test]
    fn minors_match_the_driver_table() {
        assert_eq!(gi_cap_minor(0, 1), 12);
        assert_eq!(ci_cap_minor(0, 1, 0), 13);
        assert_eq!(gi_cap_minor(1, 0), 138);
    }

    #[test]
    fn tree_follows_instances() {
        let t = Topology::parse(
            "gpus:\n  - {model: A100-SXM4-40GB, migMode: true, minor: 2, gpuInstances: [{profile: 3g.20gb}]}\n",
            Path::new("t"),
        )
        .unwrap();
        let mut s = initial_state(&t).unwrap();
        let root = tempfile::tempdir().unwrap();
        sync(root.path(), &s).unwrap();
        let access = root
            .path()
            .join("driver/nvidia/capabilities/gpu2/mig/gi1/access");
        assert_eq!(
            fs::read_to_string(&access).unwrap(),
            format!(
                "DeviceFileMinor: {}\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
                3 + 270 + 9
            )
        );
        assert!(
            root.path()
                .join("driver/nvidia/capabilities/gpu2/mig/gi1/ci0/access")
                .exists()
        );
        let devices = fs::read_to_string(root.path().join("devices")).unwrap();
        assert!(devices.contains("195 nvidia-frontend\n") && devices.contains(" nvidia-caps\n"));
        let mut e = Engine {
            topo: &t,
            state: &mut s,
        };
        e.destroy_compute_instance(0, 1, 0).unwrap();
        e.destroy_gpu_instance(0, 1).unwrap();
        sync(root.path(), &s).unwrap();
        assert!(!access.exists());
    }
}
