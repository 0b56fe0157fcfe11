//! Discovery of the inventory through NVML (nvml-wrapper over libnvidia-ml.so.1).
//!
//! Owns the read-only NVML queries that build an [`Inventory`]: enumeration, identity and
//! memory here, the MIG part in [`super::nvml_mig`]. A GPU whose MIG part fails is set
//! apart in the [`Survey`] rather than failing the pass. Reading is kept mechanical; naming and derived values come from
//! pure functions in [`super::model`] and here (tested without NVML). Calls nvml-wrapper
//! does not expose safely go through [`crate::nvml_raw`]. It must not change GPU state.
//! Every error names the NVML function and the GPU (UUID, or index before the UUID is known).

use std::path::{Path, PathBuf};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use super::model::{ComputeCapability, Gpu, Inventory, MigState};
use super::nvml_mig::read_mig;
use super::survey::{Survey, Unresolved};

/// Source of the node's inventory; NVML in production, a fixed value in tests.
pub trait Discover: Send + Sync {
    /// Reads the current inventory. Errors name the failing NVML function and GPU.
    fn discover(&self) -> Result<Inventory, DiscoverError>;

    /// Reads the current inventory, setting apart the GPUs whose MIG shape could not be
    /// read ([`Survey::unresolved`]) instead of failing. Errors: a system-wide query, or a
    /// GPU that cannot even be named. Default: [`Discover::discover`], every GPU resolved.
    fn survey(&self) -> Result<Survey, DiscoverError> {
        Ok(Survey {
            inventory: self.discover()?,
            unresolved: Vec::new(),
        })
    }
}

/// Errors of inventory discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// libnvidia-ml could not be loaded or `nvmlInit_v2` failed.
    #[error("initialising NVML from {lib}")]
    Init {
        /// Library path tried (`libnvidia-ml.so.1` when none was given).
        lib: String,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// A system-wide NVML query failed.
    #[error("NVML {function} failed")]
    System {
        /// NVML function name.
        function: &'static str,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// A per-GPU NVML query failed.
    #[error("NVML {function} failed for GPU {gpu}")]
    Gpu {
        /// NVML function name.
        function: &'static str,
        /// GPU UUID, or `index <n>` before the UUID is known.
        gpu: String,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// `nvmlDeviceGetMigMode` answered NOT_SUPPORTED, yet the GPU lists a GPU instance
    /// profile: the answer is taken for a failed query, the GPU's MIG mode is unknown.
    #[error(
        "NVML nvmlDeviceGetMigMode answered NOT_SUPPORTED for GPU {gpu}, which lists GPU instance profile index {profile_index}: MIG mode unknown"
    )]
    MigModeContradicted {
        /// GPU UUID.
        gpu: String,
        /// A profile index `nvmlDeviceGetGpuInstanceProfileInfo` answered for.
        profile_index: u32,
    },
    /// A MIG device refers to a GPU instance profile the GPU did not list.
    #[error(
        "MIG device {index} on GPU {gpu} has GPU instance profile id {profile_id}, which the GPU does not list"
    )]
    UnknownProfile {
        /// Parent GPU UUID.
        gpu: String,
        /// MIG device handle index.
        index: u32,
        /// Profile id from `nvmlGpuInstanceGetInfo`.
        profile_id: u32,
    },
}

/// A fixed inventory (tests, `--inventory-file` style setups).
#[derive(Debug, Clone, Default)]
pub struct FixedInventory(pub Inventory);

impl Discover for FixedInventory {
    fn discover(&self) -> Result<Inventory, DiscoverError> {
        Ok(self.0.clone())
    }
}

/// Discovery through NVML. Holds the initialised library; dropping it calls `nvmlShutdown`.
pub struct NvmlDiscovery {
    nvml: Nvml,
    sysfs_root: PathBuf,
}

impl std::fmt::Debug for NvmlDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlDiscovery")
            .field("sysfs_root", &self.sysfs_root)
            .finish()
    }
}

impl NvmlDiscovery {
    /// Loads NVML from `lib_path` (default: `libnvidia-ml.so.1` from the loader path) and
    /// initialises it. `sysfs_root` (normally `/sys`) is used to resolve PCIe roots.
    pub fn new(
        lib_path: Option<&Path>,
        sysfs_root: impl Into<PathBuf>,
    ) -> Result<Self, DiscoverError> {
        let nvml = match lib_path {
            Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
            None => Nvml::init(),
        }
        .map_err(|source| DiscoverError::Init {
            lib: lib_path.map_or_else(
                || "libnvidia-ml.so.1".to_string(),
                |p| p.display().to_string(),
            ),
            source,
        })?;
        Ok(NvmlDiscovery {
            nvml,
            sysfs_root: sysfs_root.into(),
        })
    }

    /// The initialised NVML handle, for modules that need other (control) calls.
    pub fn nvml(&self) -> &Nvml {
        &self.nvml
    }

    /// Reads GPU `index`: its identity (errors fail the whole discovery: the GPU cannot
    /// even be named), then its MIG shape, whose failure makes the GPU unresolved.
    fn read_gpu(&self, index: u32) -> Result<Reading, DiscoverError> {
        let at_index = format!("index {index}");
        let dev = self
            .nvml
            .device_by_index(index)
            .map_err(gpu_err("nvmlDeviceGetHandleByIndex_v2", &at_index))?;
        let uuid = dev
            .uuid()
            .map_err(gpu_err("nvmlDeviceGetUUID", &at_index))?;
        let minor = dev
            .minor_number()
            .map_err(gpu_err("nvmlDeviceGetMinorNumber", &uuid))?;
        let name = dev.name().map_err(gpu_err("nvmlDeviceGetName", &uuid))?;
        let brand = dev.brand().map_err(gpu_err("nvmlDeviceGetBrand", &uuid))?;
        let cc = dev
            .cuda_compute_capability()
            .map_err(gpu_err("nvmlDeviceGetCudaComputeCapability", &uuid))?;
        let pci = dev
            .pci_info()
            .map_err(gpu_err("nvmlDeviceGetPciInfo_v3", &uuid))?;
        let memory = dev
            .memory_info()
            .map_err(gpu_err("nvmlDeviceGetMemoryInfo_v2", &uuid))?;
        let compute_capability = ComputeCapability {
            major: u32::try_from(cc.major).unwrap_or(0),
            minor: u32::try_from(cc.minor).unwrap_or(0),
        };
        let mut gpu = Gpu {
            index,
            minor,
            uuid,
            name,
            brand: format!("{brand:?}"),
            architecture: architecture_family(compute_capability).to_string(),
            cuda_compute_capability: compute_capability,
            pcie_root: pcie_root(&self.sysfs_root, &pci.bus_id),
            pci_bus_id: pci.bus_id,
            memory_bytes: memory.total,
            mig: MigState::default(),
            mig_profiles: Vec::new(),
            mig_devices: Vec::new(),
            dynamic_mig: None,
        };
        Ok(match read_mig(&dev, &mut gpu) {
            Ok(()) => Reading::Complete(gpu),
            Err(error) => Reading::Unresolved(Unresolved {
                index,
                minor,
                uuid: gpu.uuid,
                error,
            }),
        })
    }
}

/// One GPU as read.
enum Reading {
    Complete(Gpu),
    Unresolved(Unresolved),
}

impl Discover for NvmlDiscovery {
    /// Errors also when a GPU's MIG shape could not be read (its error is returned).
    fn discover(&self) -> Result<Inventory, DiscoverError> {
        let survey = self.survey()?;
        match survey.unresolved.into_iter().next() {
            Some(unresolved) => Err(unresolved.error),
            None => Ok(survey.inventory),
        }
    }

    fn survey(&self) -> Result<Survey, DiscoverError> {
        let driver_version =
            self.nvml
                .sys_driver_version()
                .map_err(|source| DiscoverError::System {
                    function: "nvmlSystemGetDriverVersion",
                    source,
                })?;
        let cuda = self
            .nvml
            .sys_cuda_driver_version()
            .map_err(|source| DiscoverError::System {
                function: "nvmlSystemGetCudaDriverVersion_v2",
                source,
            })?;
        let count = self
            .nvml
            .device_count()
            .map_err(|source| DiscoverError::System {
                function: "nvmlDeviceGetCount_v2",
                source,
            })?;
        let mut gpus = Vec::new();
        let mut unresolved = Vec::new();
        for index in 0..count {
            match self.read_gpu(index)? {
                Reading::Complete(gpu) => gpus.push(gpu),
                Reading::Unresolved(u) => unresolved.push(u),
            }
        }
        gpus.sort_by_key(|g| g.index);
        Ok(Survey {
            inventory: Inventory {
                driver_version,
                cuda_driver_version: cuda_version_string(cuda),
                gpus,
            },
            unresolved,
        })
    }
}

pub(super) fn gpu_err(
    function: &'static str,
    gpu: &str,
) -> impl FnOnce(NvmlError) -> DiscoverError {
    let gpu = gpu.to_string();
    move |source| DiscoverError::Gpu {
        function,
        gpu,
        source,
    }
}

/// `12080` (NVML's CUDA driver version) -> `12.8`.
pub fn cuda_version_string(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// Architecture family from the CUDA compute capability, spelled as NVIDIA's driver does.
pub fn architecture_family(cc: ComputeCapability) -> &'static str {
    match (cc.major, cc.minor) {
        (3, _) => "Kepler",
        (5, _) => "Maxwell",
        (6, _) => "Pascal",
        (7, 5) => "Turing",
        (7, _) => "Volta",
        (8, 9) => "Ada Lovelace",
        (8, _) => "Ampere",
        (9, _) => "Hopper",
        (10, _) | (12, _) => "Blackwell",
        _ => "Unknown",
    }
}

/// PCIe root complex of a PCI device (`pci0000:00`), from the sysfs device link
/// `<sysfs>/bus/pci/devices/<domain:bus:dev.fn>` -> `.../devices/pci0000:00/...`.
///
/// NVML's bus id has an 8-digit domain (`00000000:1B:00.0`); sysfs uses 4 digits in lower
/// case. Returns `None` when the link does not resolve (the attribute is then omitted).
pub fn pcie_root(sysfs_root: &Path, nvml_bus_id: &str) -> Option<String> {
    let addr = sysfs_pci_address(nvml_bus_id)?;
    let resolved = std::fs::canonicalize(sysfs_root.join("bus/pci/devices").join(addr)).ok()?;
    resolved
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| c.starts_with("pci") && c.contains(':'))
        .map(str::to_string)
}

/// `00000000:1B:00.0` -> `0000:1b:00.0`.
fn sysfs_pci_address(nvml_bus_id: &str) -> Option<String> {
    let (domain, rest) = nvml_bus_id.split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    Some(format!("{domain:04x}:{}", rest.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_version_is_major_minor() {
        assert_eq!(cuda_version_string(12080), "12.8");
        assert_eq!(cuda_version_string(12040), "12.4");
        assert_eq!(cuda_version_string(11020), "11.2");
    }

    #[test]
    fn architecture_from_compute_capability() {
        assert_eq!(
            architecture_family(ComputeCapability { major: 9, minor: 0 }),
            "Hopper"
        );
        assert_eq!(
            architecture_family(ComputeCapability { major: 8, minor: 0 }),
            "Ampere"
        );
        assert_eq!(
            architecture_family(ComputeCapability { major: 8, minor: 9 }),
            "Ada Lovelace"
        );
        assert_eq!(
            architecture_family(ComputeCapability { major: 7, minor: 5 }),
            "Turing"
        );
        assert_eq!(
            architecture_family(ComputeCapability {
                major: 10,
                minor: 0
            }),
            "Blackwell"
        );
    }

    #[test]
    fn pcie_root_from_sysfs_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir
            .path()
            .join("devices/pci0000:17/0000:17:01.0/0000:1b:00.0");
        std::fs::create_dir_all(&dev).expect("mkdir");
        let links = dir.path().join("bus/pci/devices");
        std::fs::create_dir_all(&links).expect("mkdir");
        std::os::unix::fs::symlink(&dev, links.join("0000:1b:00.0")).expect("symlink");
        assert_eq!(
            pcie_root(dir.path(), "00000000:1B:00.0").as_deref(),
            Some("pci0000:17")
        );
        assert_eq!(pcie_root(dir.path(), "00000000:2C:00.0"), None);
    }

    #[test]
    fn fixed_inventory_returns_its_value() {
        let inv = Inventory {
            driver_version: "550.54.15".into(),
            ..Default::default()
        };
        assert_eq!(
            FixedInventory(inv.clone()).discover().expect("discover"),
            inv
        );
    }
}
