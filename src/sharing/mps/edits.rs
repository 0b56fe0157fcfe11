//! The container edits (environment and bind mounts, as plain data for the CDI module) a
//! claim's containers need to reach its MPS control daemon: the pipe directory read-write,
//! the log directory read-only, and the daemon's `shm` dir as `/dev/shm` with
//! [`super::PrivateShm`]. Pure: no I/O; must not start daemons or write CDI files.

use std::path::PathBuf;

use super::{ClaimDirs, MpsSupervisor};

/// Where the claim's containers find the control pipe (`CUDA_MPS_PIPE_DIRECTORY`).
pub const CONTAINER_PIPE_DIR: &str = "/tmp/nvidia-mps";
/// Where the claim's containers see the daemon's logs (`CUDA_MPS_LOG_DIRECTORY`, read-only).
pub const CONTAINER_LOG_DIR: &str = "/var/log/nvidia-mps";
/// The file the control daemon creates in its pipe directory when it accepts commands.
pub const CONTROL_PIPE: &str = "control";

/// One bind mount for a claim's containers, as plain data for the CDI module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Path on the node.
    pub host_path: PathBuf,
    /// Path in the container.
    pub container_path: String,
    /// OCI mount options, e.g. `["rw", "nosuid", "nodev", "bind"]`.
    pub options: Vec<String>,
}

/// Container edits a claim needs for its sharing policy (empty for time-slicing/exclusive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimEdits {
    /// Environment variables (name, value), in a stable order.
    pub env: Vec<(String, String)>,
    /// Bind mounts, in a stable order.
    pub mounts: Vec<MountSpec>,
}

impl MpsSupervisor {
    /// The container edits for a claim served by a daemon (pure).
    pub fn edits(&self, dirs: &ClaimDirs) -> ClaimEdits {
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut mounts = vec![
            MountSpec {
                host_path: dirs.pipe.clone(),
                container_path: CONTAINER_PIPE_DIR.to_owned(),
                options: opts(&["rw", "nosuid", "nodev", "bind"]),
            },
            MountSpec {
                host_path: dirs.log.clone(),
                container_path: CONTAINER_LOG_DIR.to_owned(),
                options: opts(&["ro", "nosuid", "nodev", "bind"]),
            },
        ];
        if self.settings.private_shm.is_some() {
            mounts.push(MountSpec {
                host_path: dirs.shm.clone(),
                container_path: "/dev/shm".to_owned(),
                options: opts(&["rw", "nosuid", "nodev", "bind"]),
            });
        }
        ClaimEdits {
            env: vec![
                (
                    "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
                    CONTAINER_PIPE_DIR.to_owned(),
                ),
                (
                    "CUDA_MPS_LOG_DIRECTORY".to_owned(),
                    CONTAINER_LOG_DIR.to_owned(),
                ),
            ],
            mounts,
        }
    }
}
