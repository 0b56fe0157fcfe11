//! The topology file: which GPUs the fake machine has, named by `FAKE_NVML_TOPOLOGY`.
//!
//! Owns decoding (YAML or JSON, unknown fields rejected) and resolution of presets and
//! overrides into a [`Topology`]. It does no NVML rule checking itself: static instances
//! are validated by building the initial state through `engine` (see
//! [`Topology::initial_state`]).
//!
//! ```yaml
//! seed: lab-1               # optional, feeds the deterministic UUIDs
//! node: dgx-h100            # optional node preset; `gpus` entries then override by position
//! gpus:
//!   - migMode: true
//!     gpuInstances:
//!       - profile: 3g.40gb  # name, or driver profile id (9)
//!         placement: 4      # optional start (memory slices)
//!         computeInstances: [2c, 1c]   # optional; default one CI spanning the GI
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids;
use crate::presets::{self, ModelSpec};
use crate::state::ComputeMode;

/// Errors loading a topology file.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("reading topology {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON of the documented shape.
    #[error("decoding topology {path}")]
    Decode {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// The content names something that does not exist or is inconsistent.
    #[error("invalid topology {path}: {reason}")]
    Invalid {
        /// File path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A reference to a GPU instance profile: its name (`3g.40gb`) or driver id (`9`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ProfileRef {
    /// Driver profile id.
    Id(u32),
    /// Profile name.
    Name(String),
}

/// A statically created GPU instance, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticGpuInstance {
    /// GPU instance profile.
    pub profile: ProfileRef,
    /// Placement start in memory slices; first free placement when absent.
    #[serde(default)]
    pub placement: Option<u32>,
    /// Compute instances as `<N>c`; one CI spanning the GI when absent.
    #[serde(default)]
    pub compute_instances: Option<Vec<String>>,
}

/// One GPU entry of the file: a model preset plus overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GpuEntry {
    model: Option<String>,
    uuid: Option<String>,
    minor: Option<u32>,
    pci_bus_id: Option<String>,
    mig_mode: Option<bool>,
    mig_mode_requires_reset: Option<bool>,
    compute_mode: Option<ComputeMode>,
    #[serde(default)]
    gpu_instances: Vec<StaticGpuInstance>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TopologyFile {
    seed: Option<String>,
    node: Option<String>,
    driver_version: Option<String>,
    cuda_driver_version: Option<i32>,
    memory_limit_backend: Option<MemoryLimitBackend>,
    #[serde(default)]
    gpus: Vec<GpuEntry>,
}

/// One resolved GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSpec {
    /// NVML index (position in the list).
    pub index: u32,
    /// Model facts.
    pub model: &'static ModelSpec,
    /// Full-GPU UUID.
    pub uuid: String,
    /// Device minor number.
    pub minor: u32,
    /// PCI bus id, `DDDDDDDD:BB:DD.F` upper-case hex, as NVML's `busId`.
    pub pci_bus_id: String,
    /// MIG mode at power-on.
    pub mig_mode: bool,
    /// MIG mode changes stay pending until a GPU reset (`nvidia-smi -r`), as on a GPU the
    /// driver cannot reset on its own; by default they apply at once.
    pub mig_mode_requires_reset: bool,
    /// Compute mode at power-on.
    pub compute_mode: ComputeMode,
    /// Instances that exist at power-on (static MIG).
    pub gpu_instances: Vec<StaticGpuInstance>,
}

/// The resolved machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Seed of the deterministic UUIDs.
    pub seed: String,
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: String,
    /// `nvmlSystemGetCudaDriverVersion_v2` (e.g. 12080 for 12.8).
    pub cuda_driver_version: i32,
    /// GPUs in NVML index order.
    pub gpus: Vec<GpuSpec>,
    /// Backend of per-cgroup memory limits the driver chose at load (used when the driver
    /// version has them, see [`crate::memory_limits`]).
    pub memory_limit_backend: MemoryLimitBackend,
}

/// Which backend the driver's cgroup memory partitioning uses (NVIDIA "MPS v3 Memory
/// Partitioning", Backends): the kernel `dmem` controller (kernel 6.14+) or the driver's
/// own flat `misc` accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryLimitBackend {
    /// Kernel dmem controller: the cgroup needs `dmem.*` files; hard = `dmem.max`,
    /// soft = `dmem.min`.
    #[default]
    Dmem,
    /// Driver-internal map, no hierarchy, no files.
    Misc,
}

/// Default driver version reported when the file does not set one.
pub const DEFAULT_DRIVER_VERSION: &str = "570.124.06";
/// Default CUDA driver version (12.8).
pub const DEFAULT_CUDA_DRIVER_VERSION: i32 = 12080;

/// Normalise a PCI bus id to NVML's `DDDDDDDD:BB:DD.F` upper-case form; `None` if malformed.
pub fn normalize_bus_id(s: &str) -> Option<String> {
    let s = s.trim();
    let (rest, func) = s.rsplit_once('.')?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (domain, bus, dev) = match parts.as_slice() {
        [d, b, v] => (u32::from_str_radix(d, 16).ok()?, *b, *v),
        [b, v] => (0, *b, *v),
        _ => return None,
    };
    let bus = u32::from_str_radix(bus, 16).ok()?;
    let dev = u32::from_str_radix(dev, 16).ok()?;
    let func = u32::from_str_radix(func, 16).ok()?;
    if bus > 0xFF || dev > 0x1F || func > 7 {
        return None;
    }
    Some(format!("{domain:08X}:{bus:02X}:{dev:02X}.{func:X}"))
}

impl Topology {
    /// Load and resolve the file at `path`.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Topology::parse(&text, path)
    }

    /// Resolve topology text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Topology, TopologyError> {
        let file: TopologyFile =
            serde_yaml::from_str(text).map_err(|source| TopologyError::Decode {
                path: path.to_path_buf(),
                source,
            })?;
        let invalid = |reason: String| TopologyError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let seed = file.seed.clone().unwrap_or_else(|| "fake-nvml".to_string());
        let base: Vec<(&str, &str)> = match &file.node {
            Some(key) => presets::node(key)
                .ok_or_else(|| {
                    invalid(format!(
                        "unknown node preset {key:?} (known: {})",
                        presets::NODES
                            .iter()
                            .map(|n| n.key)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
                .gpus
                .to_vec(),
            None => Vec::new(),
        };
        if file.node.is_some() && file.gpus.len() > base.len() {
            return Err(invalid(format!(
                "{} gpu entries override a node preset of {} GPUs",
                file.gpus.len(),
                base.len()
            )));
        }
        let count = base.len().max(file.gpus.len());
        let mut gpus = Vec::with_capacity(count);
        for i in 0..count {
            let entry = file.gpus.get(i).cloned().unwrap_or_default();
            let index = i as u32;
            let model_key = match (&entry.model, base.get(i)) {
                (Some(m), _) => m.as_str(),
                (None, Some((m, _))) => m,
                (None, None) => return Err(invalid(format!("gpus[{i}]: model is required"))),
            };
            let model = presets::model(model_key).ok_or_else(|| {
                invalid(format!(
                    "gpus[{i}]: unknown model {model_key:?} (known: {})",
                    presets::MODELS
                        .iter()
                        .map(|m| m.key)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let bus = match (&entry.pci_bus_id, base.get(i)) {
                (Some(b), _) => b.clone(),
                (None, Some((_, b))) => (*b).to_string(),
                (None, None) => format!("00000000:{:02X}:00.0", 0x10 + i),
            };
            let pci_bus_id = normalize_bus_id(&bus)
                .ok_or_else(|| invalid(format!("gpus[{i}]: malformed pciBusId {bus:?}")))?;
            let mig_mode = entry.mig_mode.unwrap_or(false);
            if mig_mode && !model.mig_capable() {
                return Err(invalid(format!("gpus[{i}]: {} has no MIG", model.key)));
            }
            if !entry.gpu_instances.is_empty() && !mig_mode {
                return Err(invalid(format!(
                    "gpus[{i}]: gpuInstances need migMode: true"
                )));
            }
            gpus.push(GpuSpec {
                index,
                model,
                uuid: entry
                    .uuid
                    .clone()
                    .unwrap_or_else(|| ids::gpu_uuid(&seed, index)),
                minor: entry.minor.unwrap_or(index),
                pci_bus_id,
                mig_mode,
                mig_mode_requires_reset: entry.mig_mode_requires_reset.unwrap_or(false),
                compute_mode: entry.compute_mode.unwrap_or_default(),
                gpu_instances: entry.gpu_instances.clone(),
            });
        }
        for (i, a) in gpus.iter().enumerate() {
            for b in &gpus[i + 1..] {
                if a.uuid == b.uuid || a.minor == b.minor || a.pci_bus_id == b.pci_bus_id {
                    return Err(invalid(format!(
                        "gpus {} and {} share a uuid, minor or pciBusId",
                        a.index, b.index
                    )));
                }
            }
        }
        let topo = Topology {
            seed,
            driver_version: file
                .driver_version
                .unwrap_or_else(|| DEFAULT_DRIVER_VERSION.to_string()),
            cuda_driver_version: file
                .cuda_driver_version
                .unwrap_or(DEFAULT_CUDA_DRIVER_VERSION),
            gpus,
            memory_limit_backend: file.memory_limit_backend.unwrap_or_default(),
        };
        // Static instances must obey the same rules as runtime creation.
        crate::engine::initial_state(&topo).map_err(invalid)?;
        Ok(topo)
    }

    /// The GPU with NVML index `index`.
    pub fn gpu(&self, index: u32) -> Option<&GpuSpec> {
        self.gpus.get(index as usize)
    }

    /// The GPU with full-GPU UUID `uuid`.
    pub fn gpu_by_uuid(&self, uuid: &str) -> Option<&GpuSpec> {
        self.gpus.iter().find(|g| g.uuid == uuid)
    }
}

/// Where the state file of topology `topology` lives unless `FAKE_NVML_STATE` says otherwise.
pub fn default_state_path(topology: &Path) -> PathBuf {
    let mut s = topology.as_os_str().to_owned();
    s.push(".state.json");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Topology, TopologyError> {
        Topology::parse(text, Path::new("t.yaml"))
    }

    #[test]
    fn node_preset_with_overrides() {
        let t = parse(
            "node: dgx-h100\ngpus:\n  - migMode: true\n    gpuInstances:\n      - profile: 3g.40gb\n      - profile: 9\n        computeInstances: [2c, 1c]\n  - uuid: GPU-fixed\n",
        )
        .unwrap();
        assert_eq!(t.gpus.len(), 8);
        assert_eq!(t.gpus[0].model.key, "H100-SXM5-80GB");
        assert!(t.gpus[0].mig_mode);
        assert_eq!(t.gpus[1].uuid, "GPU-fixed");
        assert_eq!(t.gpus[7].pci_bus_id, "00000000:DB:00.0");
        assert_eq!(t.gpus[3].minor, 3);
    }

    #[test]
    fn json_works_too_and_bad_input_is_named() {
        let t = parse(r#"{"gpus":[{"model":"T4"},{"model":"L40S","pciBusId":"0000:3b:00.0"}]}"#)
            .unwrap();
        assert_eq!(t.gpus[1].pci_bus_id, "00000000:3B:00.0");
        let e = parse("gpus: [{model: V100}]").unwrap_err().to_string();
        assert!(e.contains("unknown model \"V100\""), "{e}");
        assert!(parse("gpus: [{model: T4, migMode: true}]").is_err());
        assert!(parse("gpus: [{model: T4, colour: red}]").is_err());
        let overlap = "gpus:\n  - model: A100-SXM4-40GB\n    migMode: true\n    gpuInstances: [{profile: 4g.20gb}, {profile: 3g.20gb, placement: 0}]\n";
        let e = parse(overlap).unwrap_err().to_string();
        assert!(e.contains("gpus[0]"), "{e}");
    }

    #[test]
    fn shipped_sample_topologies_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let t = Topology::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!t.gpus.is_empty());
            n += 1;
        }
        assert!(n >= 4);
    }

    #[test]
    fn bus_ids_normalise() {
        assert_eq!(
            normalize_bus_id("0000:18:00.0").unwrap(),
            "00000000:18:00.0"
        );
        assert_eq!(
            normalize_bus_id("00000000:ab:00.0").unwrap(),
            "00000000:AB:00.0"
        );
        assert_eq!(normalize_bus_id("18:00.0").unwrap(), "00000000:18:00.0");
        assert!(normalize_bus_id("zz").is_none());
    }
}
