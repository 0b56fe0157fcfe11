//! Character device nodes a container needs for a GPU or a MIG device.
//!
//! Owns the mapping from NVML facts (minor numbers, GPU / compute instance ids) to device
//! node paths and numbers, read from the host's `/proc` (a root passed in, so tests use a
//! temp dir). It must not write anything. Facts followed:
//! - `/dev/nvidia<minor>` and `/dev/nvidiactl` (minor 255) belong to the NVIDIA frontend
//!   driver, major 195, as the NVIDIA kernel module registers them;
//! - `/dev/nvidia-uvm` (minor 0) and `/dev/nvidia-uvm-tools` (minor 1) use the dynamic
//!   major listed as `nvidia-uvm` in `/proc/devices`;
//! - a MIG device needs `/dev/nvidia-caps/nvidia-cap<N>` for its GPU instance and its
//!   compute instance, with `N` read from `DeviceFileMinor:` in
//!   `/proc/driver/nvidia/capabilities/gpu<minor>/mig/gi<G>/access` and
//!   `.../gi<G>/ci<C>/access`, under the dynamic major `nvidia-caps`.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Major number of the NVIDIA frontend character devices (`/dev/nvidia*`, `/dev/nvidiactl`).
pub const NVIDIA_FRONTEND_MAJOR: u32 = 195;
/// Minor number of `/dev/nvidiactl`.
pub const NVIDIACTL_MINOR: u32 = 255;

/// One character device node, as a container runtime creates it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceNode {
    /// Path inside the container, equal to the host path (e.g. `/dev/nvidia0`).
    pub path: String,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// Failures reading device facts from the host's `/proc`.
#[derive(Debug, Error)]
pub enum DevNodeError {
    /// A `/proc` file could not be read (NVIDIA kernel module not loaded, wrong `--proc-root`).
    #[error("cannot read {path}: is the NVIDIA kernel module loaded and --proc-root right?")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/devices` lists no character device of this name.
    #[error("{path} lists no character device named {name}")]
    MissingMajor {
        /// The `/proc/devices` file read.
        path: PathBuf,
        /// The device name looked for (`nvidia-uvm`, `nvidia-caps`).
        name: String,
    },
    /// A capability `access` file has no `DeviceFileMinor:` line.
    #[error("{path} has no DeviceFileMinor line")]
    MissingMinor {
        /// The access file read.
        path: PathBuf,
    },
}

/// Reads device numbers from a host `/proc` tree.
#[derive(Debug, Clone)]
pub struct ProcDevices {
    proc_root: PathBuf,
}

impl ProcDevices {
    /// Reads below `proc_root` (normally `/proc`).
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }

    /// `/dev/nvidia<minor>` of a full GPU (NVML `nvmlDeviceGetMinorNumber`).
    pub fn gpu_node(minor: u32) -> DeviceNode {
        DeviceNode {
            path: format!("/dev/nvidia{minor}"),
            major: NVIDIA_FRONTEND_MAJOR,
            minor,
        }
    }

    /// The control nodes every GPU container needs: `/dev/nvidiactl`, `/dev/nvidia-uvm`,
    /// `/dev/nvidia-uvm-tools`.
    ///
    /// Errors when `/proc/devices` cannot be read or lists no `nvidia-uvm` major.
    pub fn control_nodes(&self) -> Result<Vec<DeviceNode>, DevNodeError> {
        let uvm = self.char_major("nvidia-uvm")?;
        Ok(vec![
            DeviceNode {
                path: "/dev/nvidiactl".into(),
                major: NVIDIA_FRONTEND_MAJOR,
                minor: NVIDIACTL_MINOR,
            },
            DeviceNode {
                path: "/dev/nvidia-uvm".into(),
                major: uvm,
                minor: 0,
            },
            DeviceNode {
                path: "/dev/nvidia-uvm-tools".into(),
                major: uvm,
                minor: 1,
            },
        ])
    }

    /// The two capability nodes of a MIG device: its GPU instance `gi` and compute
    /// instance `ci` on the GPU with minor number `parent_minor`.
    ///
    /// Errors when the capability files or the `nvidia-caps` major are missing.
    pub fn mig_nodes(
        &self,
        parent_minor: u32,
        gi: u32,
        ci: u32,
    ) -> Result<Vec<DeviceNode>, DevNodeError> {
        let major = self.char_major("nvidia-caps")?;
        let gi_dir = self
            .proc_root
            .join("driver/nvidia/capabilities")
            .join(format!("gpu{parent_minor}"))
            .join("mig")
            .join(format!("gi{gi}"));
        let ci_dir = gi_dir.join(format!("ci{ci}"));
        [gi_dir.join("access"), ci_dir.join("access")]
            .iter()
            .map(|path| {
                let minor = read_cap_minor(path)?;
                Ok(DeviceNode {
                    path: format!("/dev/nvidia-caps/nvidia-cap{minor}"),
                    major,
                    minor,
                })
            })
            .collect()
    }

    fn char_major(&self, name: &str) -> Result<u32, DevNodeError> {
        let path = self.proc_root.join("devices");
        let text = read(&path)?;
        parse_char_major(&text, name).ok_or_else(|| DevNodeError::MissingMajor {
            path,
            name: name.to_owned(),
        })
    }
}

fn read(path: &Path) -> Result<String, DevNodeError> {
    std::fs::read_to_string(path).map_err(|source| DevNodeError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_cap_minor(path: &Path) -> Result<u32, DevNodeError> {
    parse_cap_minor(&read(path)?).ok_or_else(|| DevNodeError::MissingMinor {
        path: path.to_owned(),
    })
}

/// Finds the major number of character device `name` in the text of `/proc/devices`.
///
/// Only the `Character devices:` section counts; block devices of the same name are ignored.
pub fn parse_char_major(proc_devices: &str, name: &str) -> Option<u32> {
    let mut in_char = false;
    for line in proc_devices.lines() {
        let line = line.trim();
        match line {
            "Character devices:" => in_char = true,
            "Block devices:" => in_char = false,
            _ if in_char => {
                let mut parts = line.split_whitespace();
                if let (Some(num), Some(dev)) = (parts.next(), parts.next())
                    && dev == name
                {
                    return num.parse().ok();
                }
            }
            _ => {}
        }
    }
    None
}

/// Reads `DeviceFileMinor: N` from a capability `access` file.
pub fn parse_cap_minor(access: &str) -> Option<u32> {
    access.lines().find_map(|line| {
        line.strip_prefix("DeviceFileMinor:")
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_DEVICES: &str = "Character devices:\n  1 mem\n195 nvidia-frontend\n236 nvidia-caps\n237 nvidia-uvm\n\nBlock devices:\n  8 sd\n240 nvidia-uvm\n";

    #[test]
    fn majors_come_from_the_character_section() {
        assert_eq!(parse_char_major(PROC_DEVICES, "nvidia-uvm"), Some(237));
        assert_eq!(parse_char_major(PROC_DEVICES, "nvidia-caps"), Some(236));
        assert_eq!(parse_char_major(PROC_DEVICES, "sd"), None);
    }

    #[test]
    fn cap_minor_is_read_from_access_file() {
        let text = "DeviceFileMinor: 21\nDeviceFileMode: 292\nDeviceFileModify: 1\n";
        assert_eq!(parse_cap_minor(text), Some(21));
        assert_eq!(parse_cap_minor("DeviceFileMode: 292\n"), None);
    }

    #[test]
    fn mig_and_control_nodes_from_a_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("devices"), PROC_DEVICES).unwrap();
        let gi = dir.path().join("driver/nvidia/capabilities/gpu3/mig/gi2");
        std::fs::create_dir_all(gi.join("ci0")).unwrap();
        std::fs::write(gi.join("access"), "DeviceFileMinor: 30\n").unwrap();
        std::fs::write(gi.join("ci0/access"), "DeviceFileMinor: 31\n").unwrap();
        let proc = ProcDevices::new(dir.path());
        let nodes = proc.mig_nodes(3, 2, 0).unwrap();
        assert_eq!(
            nodes,
            vec![
                DeviceNode {
                    path: "/dev/nvidia-caps/nvidia-cap30".into(),
                    major: 236,
                    minor: 30
                },
                DeviceNode {
                    path: "/dev/nvidia-caps/nvidia-cap31".into(),
                    major: 236,
                    minor: 31
                },
            ]
        );
        let control = proc.control_nodes().unwrap();
        assert_eq!(control[1].major, 237);
        assert!(matches!(
            proc.mig_nodes(3, 5, 0),
            Err(DevNodeError::Read { .. })
        ));
    }

    #[test]
    fn missing_uvm_major_is_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("devices"),
            "Character devices:\n195 nvidia\n",
        )
        .unwrap();
        let err = ProcDevices::new(dir.path()).control_nodes().unwrap_err();
        assert!(err.to_string().contains("nvidia-uvm"), "{err}");
    }
}
