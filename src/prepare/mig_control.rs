//! The NVML edge of dynamic MIG: list, create and destroy GPU instances and their compute
//! instances, and read a MIG device's UUID.
//!
//! [`MigControl`] is the seam the prepare state machine calls (blocking calls: run them on
//! the blocking pool); [`NvmlMigControl`] implements it over nvml-wrapper plus the raw
//! symbols of [`crate::nvml_raw`] (`nvmlDeviceCreateGpuInstanceWithPlacement`,
//! `nvmlGpuInstanceCreateComputeInstance`, `nvmlComputeInstanceDestroy`,
//! `nvmlGpuInstanceDestroy`, ...) and nvml-wrapper's `nvmlDeviceGetMigMode` /
//! `nvmlDeviceSetMigMode` for the full GPU of a dynamic GPU. It decides nothing: which instance to create or destroy
//! is the caller's, and every error names the NVML function and the GPU.

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use thiserror::Error;

use crate::inventory::Placement;
use crate::nvml_raw::{self, RawPlacement};

/// An existing GPU instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuInstance {
    /// GPU instance id.
    pub gi_id: u32,
    /// GPU instance profile id.
    pub gi_profile_id: u32,
    /// Memory slices it occupies.
    pub placement: Placement,
}

/// Why an NVML MIG call failed.
#[derive(Debug, Error)]
pub enum MigControlError {
    /// NVML could not be loaded or initialised.
    #[error("initialising NVML from {lib} for MIG instance management")]
    NvmlInit {
        /// Library path tried.
        lib: String,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// An NVML call failed.
    #[error("NVML {function} on GPU {gpu_uuid}: {source}")]
    Nvml {
        /// The NVML C function.
        function: &'static str,
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// No MIG device handle has the GPU and compute instance ids.
    #[error(
        "no MIG device of GPU {gpu_uuid} has GPU instance {gi_id} and compute instance {ci_id}"
    )]
    NoMigDevice {
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// GPU instance id.
        gi_id: u32,
        /// Compute instance id.
        ci_id: u32,
    },
}

impl MigControlError {
    /// True when NVML said the instance does not exist (already destroyed).
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            MigControlError::Nvml {
                source: NvmlError::NotFound | NvmlError::InvalidArg,
                ..
            }
        )
    }
}

/// MIG instance operations on physical GPUs, by GPU UUID. Blocking.
pub trait MigControl: Send + Sync {
    /// Every GPU instance of the profiles `gi_profile_ids` on the GPU.
    fn gpu_instances(
        &self,
        gpu_uuid: &str,
        gi_profile_ids: &[u32],
    ) -> Result<Vec<GpuInstance>, MigControlError>;
    /// Creates a GPU instance of `gi_profile_id` at `placement`; returns its id.
    fn create_gpu_instance(
        &self,
        gpu_uuid: &str,
        gi_profile_id: u32,
        placement: Placement,
    ) -> Result<u32, MigControlError>;
    /// Creates the full-size compute instance in GPU instance `gi_id`; returns its id.
    fn create_compute_instance(&self, gpu_uuid: &str, gi_id: u32) -> Result<u32, MigControlError>;
    /// UUID (`MIG-...`) of the MIG device of GPU instance `gi_id`, compute instance `ci_id`.
    fn mig_uuid(&self, gpu_uuid: &str, gi_id: u32, ci_id: u32) -> Result<String, MigControlError>;
    /// The GPU instance `gi_id`, `None` when it does not exist.
    fn gpu_instance(
        &self,
        gpu_uuid: &str,
        gi_id: u32,
    ) -> Result<Option<GpuInstance>, MigControlError>;
    /// Ids of the compute instances of GPU instance `gi_id`.
    fn compute_instances(&self, gpu_uuid: &str, gi_id: u32) -> Result<Vec<u32>, MigControlError>;
    /// Destroys compute instance `ci_id` of GPU instance `gi_id`.
    fn destroy_compute_instance(
        &self,
        gpu_uuid: &str,
        gi_id: u32,
        ci_id: u32,
    ) -> Result<(), MigControlError>;
    /// Destroys GPU instance `gi_id` (it must have no compute instance left).
    fn destroy_gpu_instance(&self, gpu_uuid: &str, gi_id: u32) -> Result<(), MigControlError>;
    /// The current and pending MIG mode (`nvmlDeviceGetMigMode`), true = enabled.
    fn mig_mode(&self, gpu_uuid: &str) -> Result<MigMode, MigControlError>;
    /// Asks for MIG mode on (`true`) or off (`nvmlDeviceSetMigMode`); returns its activation
    /// status: `Ok(())` when the mode is in effect, else NVML's reason (`ResetRequired`:
    /// the change waits for a GPU reset; `InUse`: the GPU is not idle).
    fn set_mig_mode(
        &self,
        gpu_uuid: &str,
        enabled: bool,
    ) -> Result<Result<(), NvmlError>, MigControlError>;
}

/// MIG mode of a GPU as NVML reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigMode {
    /// In effect now.
    pub current: bool,
    /// In effect after the next activation (a GPU reset where one is needed).
    pub pending: bool,
}

/// [`MigControl`] over NVML.
pub struct NvmlMigControl {
    nvml: Nvml,
}

impl NvmlMigControl {
    /// Loads NVML from `lib` (default `libnvidia-ml.so.1`) and initialises it.
    ///
    /// Errors: [`MigControlError::NvmlInit`].
    pub fn new(lib: Option<&std::path::Path>) -> Result<Self, MigControlError> {
        let mut builder = Nvml::builder();
        if let Some(lib) = lib {
            builder.lib_path(lib.as_os_str());
        }
        let nvml = builder.init().map_err(|source| MigControlError::NvmlInit {
            lib: lib.map_or_else(
                || "libnvidia-ml.so.1".to_owned(),
                |l| l.display().to_string(),
            ),
            source,
        })?;
        Ok(Self { nvml })
    }

    fn device(&self, gpu_uuid: &str) -> Result<nvml_wrapper::Device<'_>, MigControlError> {
        self.nvml
            .device_by_uuid(gpu_uuid)
            .map_err(|source| nvml("nvmlDeviceGetHandleByUUID", gpu_uuid, source))
    }
}

fn nvml(function: &'static str, gpu_uuid: &str, source: NvmlError) -> MigControlError {
    MigControlError::Nvml {
        function,
        gpu_uuid: gpu_uuid.to_owned(),
        source,
    }
}

fn placement(p: RawPlacement) -> Placement {
    Placement {
        start: p.start,
        size: p.size,
    }
}

impl MigControl for NvmlMigControl {
    fn gpu_instances(
        &self,
        gpu_uuid: &str,
        gi_profile_ids: &[u32],
    ) -> Result<Vec<GpuInstance>, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        let mut out = Vec::new();
        for &id in gi_profile_ids {
            let list = nvml_raw::gpu_instances(&dev, id)
                .map_err(|e| nvml("nvmlDeviceGetGpuInstances", gpu_uuid, e))?;
            out.extend(list.into_iter().map(|gi| GpuInstance {
                gi_id: gi.id,
                gi_profile_id: gi.profile_id,
                placement: placement(gi.placement),
            }));
        }
        out.sort_by_key(|g| g.gi_id);
        out.dedup();
        Ok(out)
    }

    fn create_gpu_instance(
        &self,
        gpu_uuid: &str,
        gi_profile_id: u32,
        at: Placement,
    ) -> Result<u32, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        let raw = RawPlacement {
            start: at.start,
            size: at.size,
        };
        nvml_raw::create_gpu_instance_with_placement(&dev, gi_profile_id, raw)
            .map(|gi| gi.id)
            .map_err(|e| nvml("nvmlDeviceCreateGpuInstanceWithPlacement", gpu_uuid, e))
    }

    fn create_compute_instance(&self, gpu_uuid: &str, gi_id: u32) -> Result<u32, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        let profile = nvml_raw::full_compute_instance_profile(&dev, gi_id)
            .map_err(|e| nvml("nvmlGpuInstanceGetComputeInstanceProfileInfo", gpu_uuid, e))?;
        nvml_raw::create_compute_instance(&dev, gi_id, profile)
            .map_err(|e| nvml("nvmlGpuInstanceCreateComputeInstance", gpu_uuid, e))
    }

    fn mig_uuid(&self, gpu_uuid: &str, gi_id: u32, ci_id: u32) -> Result<String, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        let max = dev
            .mig_device_count()
            .map_err(|e| nvml("nvmlDeviceGetMaxMigDeviceCount", gpu_uuid, e))?;
        for index in 0..max {
            let mig = match dev.mig_device_by_index(index) {
                Ok(m) => m,
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(e) => return Err(nvml("nvmlDeviceGetMigDeviceHandleByIndex", gpu_uuid, e)),
            };
            let gi = nvml_raw::mig_gpu_instance_id(&mig)
                .map_err(|e| nvml("nvmlDeviceGetGpuInstanceId", gpu_uuid, e))?;
            let ci = nvml_raw::mig_compute_instance_id(&mig)
                .map_err(|e| nvml("nvmlDeviceGetComputeInstanceId", gpu_uuid, e))?;
            if (gi, ci) == (gi_id, ci_id) {
                return mig
                    .uuid()
                    .map_err(|e| nvml("nvmlDeviceGetUUID", gpu_uuid, e));
            }
        }
        Err(MigControlError::NoMigDevice {
            gpu_uuid: gpu_uuid.to_owned(),
            gi_id,
            ci_id,
        })
    }

    fn gpu_instance(
        &self,
        gpu_uuid: &str,
        gi_id: u32,
    ) -> Result<Option<GpuInstance>, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        match nvml_raw::gpu_instance_info(&dev, gi_id) {
            Ok(gi) => Ok(Some(GpuInstance {
                gi_id: gi.id,
                gi_profile_id: gi.profile_id,
                placement: placement(gi.placement),
            })),
            Err(NvmlError::NotFound | NvmlError::InvalidArg) => Ok(None),
            Err(e) => Err(nvml("nvmlDeviceGetGpuInstanceById", gpu_uuid, e)),
        }
    }

    fn compute_instances(&self, gpu_uuid: &str, gi_id: u32) -> Result<Vec<u32>, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        nvml_raw::compute_instance_ids(&dev, gi_id)
            .map_err(|e| nvml("nvmlGpuInstanceGetComputeInstances", gpu_uuid, e))
    }

    fn destroy_compute_instance(
        &self,
        gpu_uuid: &str,
        gi_id: u32,
        ci_id: u32,
    ) -> Result<(), MigControlError> {
        let dev = self.device(gpu_uuid)?;
        nvml_raw::destroy_compute_instance(&dev, gi_id, ci_id)
            .map_err(|e| nvml("nvmlComputeInstanceDestroy", gpu_uuid, e))
    }

    fn destroy_gpu_instance(&self, gpu_uuid: &str, gi_id: u32) -> Result<(), MigControlError> {
        let dev = self.device(gpu_uuid)?;
        nvml_raw::destroy_gpu_instance(&dev, gi_id)
            .map_err(|e| nvml("nvmlGpuInstanceDestroy", gpu_uuid, e))
    }

    fn mig_mode(&self, gpu_uuid: &str) -> Result<MigMode, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        let mode = dev
            .mig_mode()
            .map_err(|e| nvml("nvmlDeviceGetMigMode", gpu_uuid, e))?;
        Ok(MigMode {
            current: mode.current == 1,
            pending: mode.pending == 1,
        })
    }

    fn set_mig_mode(
        &self,
        gpu_uuid: &str,
        enabled: bool,
    ) -> Result<Result<(), NvmlError>, MigControlError> {
        let dev = self.device(gpu_uuid)?;
        let status = dev
            .set_mig_mode(enabled)
            .map_err(|e| nvml("nvmlDeviceSetMigMode", gpu_uuid, e))?;
        Ok(nvml_wrapper::error::nvml_try(status))
    }
}
