//! The inventory model: GPUs, MIG profiles, placements and existing MIG devices.
//!
//! Plain owned data with no NVML types, so it can be built by hand in tests, compared,
//! serialised for the `inventory` printout and sent across tasks. It owns the device
//! naming rules of NVIDIA's reference DRA driver (design/COMPAT.md): full GPU
//! `gpu-<minor>`, MIG device `gpu-<parentMinor>-mig-<profile without dots>-<GI profile
//! id>-<placement start>`, and the MIG profile naming of NVIDIA's go-nvlib
//! (`<slices>g.<GB>gb[+me]`). It must not talk to NVML or the API server.

use serde::{Deserialize, Serialize};

/// NVML's `NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1` profile index (the `+me` variant).
pub const PROFILE_INDEX_1_SLICE_REV1: u32 = 7;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX` profile index.
pub const PROFILE_INDEX_1_SLICE_GFX: u32 = 10;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX` profile index.
pub const PROFILE_INDEX_2_SLICE_GFX: u32 = 11;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX` profile index.
pub const PROFILE_INDEX_4_SLICE_GFX: u32 = 12;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME` profile index.
pub const PROFILE_INDEX_1_SLICE_NO_ME: u32 = 13;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME` profile index.
pub const PROFILE_INDEX_2_SLICE_NO_ME: u32 = 14;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME` profile index.
pub const PROFILE_INDEX_1_SLICE_ALL_ME: u32 = 15;
/// NVML's `NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME` profile index.
pub const PROFILE_INDEX_2_SLICE_ALL_ME: u32 = 16;
/// Number of GPU instance profile indexes NVML defines (`NVML_GPU_INSTANCE_PROFILE_COUNT`).
pub const PROFILE_INDEX_COUNT: u32 = 17;

/// Everything discovered on one node: driver versions and the GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Inventory {
    /// Kernel driver version as NVML reports it (`nvmlSystemGetDriverVersion`), e.g. `550.54.15`.
    pub driver_version: String,
    /// CUDA driver API version as `<major>.<minor>` (from `nvmlSystemGetCudaDriverVersion`), e.g. `12.8`.
    pub cuda_driver_version: String,
    /// GPUs sorted by NVML index.
    pub gpus: Vec<Gpu>,
}

/// CUDA compute capability of a GPU (e.g. 9.0 for Hopper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ComputeCapability {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl std::fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// MIG mode of a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigState {
    /// The GPU supports MIG (NVML answered `nvmlDeviceGetMigMode` instead of NotSupported).
    pub capable: bool,
    /// MIG mode currently in effect.
    pub enabled: bool,
    /// MIG mode that takes effect after the next GPU reset (equals `enabled` when nothing is pending).
    pub pending: bool,
}

/// A start/size pair in units of GPU memory slices (NVML `nvmlGpuInstancePlacement_t`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Placement {
    /// First memory slice occupied (inclusive).
    pub start: u32,
    /// Number of memory slices occupied.
    pub size: u32,
}

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Gpu {
    /// NVML enumeration index (not stable across reboots; use `minor` or `uuid` for identity).
    pub index: u32,
    /// Device minor number: `/dev/nvidia<minor>`, and the number in the device name.
    pub minor: u32,
    /// GPU UUID, e.g. `GPU-...`.
    pub uuid: String,
    /// Product name as NVML reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Brand (`Nvidia`, `Tesla`, `NvidiaRTX`, ...), spelled as NVIDIA's driver publishes it.
    pub brand: String,
    /// Architecture family (`Ampere`, `Hopper`, `Blackwell`, ...).
    pub architecture: String,
    /// CUDA compute capability.
    pub cuda_compute_capability: ComputeCapability,
    /// PCI bus id in NVML's form (`00000000:1B:00.0`).
    pub pci_bus_id: String,
    /// PCIe root complex (`pci0000:00`) when resolvable from sysfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_root: Option<String>,
    /// Total framebuffer memory in bytes (`nvmlDeviceGetMemoryInfo` total).
    pub memory_bytes: u64,
    /// MIG mode.
    pub mig: MigState,
    /// GPU instance profiles this GPU supports (empty unless MIG-capable), in NVML profile index order.
    #[serde(default)]
    pub mig_profiles: Vec<MigProfile>,
    /// MIG devices that exist now (static MIG), sorted by placement start.
    #[serde(default)]
    pub mig_devices: Vec<MigDevice>,
    /// Set when the driver manages this GPU's MIG instances itself (dynamic MIG,
    /// partitionable devices): every placement is published and instances are created at
    /// prepare. `None` for static MIG and non-MIG GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_mig: Option<DynamicMig>,
}

/// Dynamic MIG facts of one GPU that the driver adds to the discovered inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DynamicMig {
    /// GPU instances that exist but that this driver did not create (made by hand with
    /// `nvidia-smi mig -cgi`, or by another tool): never destroyed, and no placement
    /// overlapping them is published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<ForeignInstance>,
}

/// A GPU instance on a dynamic MIG GPU that the driver does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ForeignInstance {
    /// GPU instance id.
    pub gi_id: u32,
    /// GPU instance profile id (`info.id`).
    pub gi_profile_id: u32,
    /// Memory slices it occupies.
    pub placement: Placement,
}

impl Placement {
    /// True when the two memory-slice ranges share a slice.
    pub fn overlaps(&self, other: &Placement) -> bool {
        self.start < other.start + other.size && other.start < self.start + self.size
    }
}

/// A GPU instance profile (NVML `nvmlGpuInstanceProfileInfo_t`) and its possible placements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigProfile {
    /// Canonical name, e.g. `1g.10gb` or `1g.10gb+me` (see [`mig_profile_name`]).
    pub name: String,
    /// NVML profile index (`NVML_GPU_INSTANCE_PROFILE_*` constant) passed to
    /// `nvmlDeviceGetGpuInstanceProfileInfo`.
    pub profile_index: u32,
    /// Profile id NVML returns in `info.id` (e.g. 19 for H100 `1g.10gb`); this is the
    /// number in MIG device names and what `nvidia-smi mig -lgip` shows.
    pub gi_profile_id: u32,
    /// Compute slices (the `Ng` in the name).
    pub slice_count: u32,
    /// How many instances of this profile fit on an empty GPU.
    pub instance_count: u32,
    /// Memory of an instance in bytes (`memorySizeMB` * 2^20).
    pub memory_bytes: u64,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Copy engines.
    pub copy_engines: u32,
    /// Video decoders.
    pub decoders: u32,
    /// Video encoders.
    pub encoders: u32,
    /// JPEG engines.
    pub jpeg_engines: u32,
    /// Optical flow accelerators.
    pub ofa_engines: u32,
    /// Possible placements (memory slice ranges), sorted by start.
    pub placements: Vec<Placement>,
}

/// A MIG device that exists now: one GPU instance with its (full-size) compute instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MigDevice {
    /// Index of the MIG device handle on its parent (`nvmlDeviceGetMigDeviceHandleByIndex`).
    pub index: u32,
    /// MIG device UUID (`MIG-...`).
    pub uuid: String,
    /// Parent GPU UUID.
    pub parent_uuid: String,
    /// Parent GPU minor number.
    pub parent_minor: u32,
    /// Profile name, e.g. `3g.40gb`.
    pub profile: String,
    /// GPU instance profile id (`info.id`, e.g. 9 for `3g.40gb` on H100).
    pub gi_profile_id: u32,
    /// GPU instance id.
    pub gi_id: u32,
    /// Compute instance id.
    pub ci_id: u32,
    /// Placement of the GPU instance.
    pub placement: Placement,
    /// Compute slices of the GPU instance (the `Ng` of its profile).
    #[serde(default)]
    pub gi_slice_count: u32,
    /// Compute slices of the compute instance; smaller than `gi_slice_count` only when the
    /// GPU instance is split into several compute instances.
    #[serde(default)]
    pub ci_slice_count: u32,
    /// Placement of the compute instance inside its GPU instance, in compute slices.
    #[serde(default)]
    pub ci_placement: Placement,
    /// Memory in bytes (from the profile).
    pub memory_bytes: u64,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Copy engines.
    pub copy_engines: u32,
    /// Video decoders.
    pub decoders: u32,
    /// Video encoders.
    pub encoders: u32,
    /// JPEG engines.
    pub jpeg_engines: u32,
    /// Optical flow accelerators.
    pub ofa_engines: u32,
}

/// A device of the inventory found by its published name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRef<'a> {
    /// A full GPU.
    Gpu(&'a Gpu),
    /// A MIG device and its parent GPU.
    Mig {
        /// The parent GPU.
        parent: &'a Gpu,
        /// The MIG device.
        mig: &'a MigDevice,
    },
}

impl DeviceRef<'_> {
    /// UUID of the device (GPU or MIG UUID), as used in `NVIDIA_VISIBLE_DEVICES`.
    pub fn uuid(&self) -> &str {
        match self {
            DeviceRef::Gpu(g) => &g.uuid,
            DeviceRef::Mig { mig, .. } => &mig.uuid,
        }
    }

    /// The physical GPU this device lives on.
    pub fn gpu(&self) -> &Gpu {
        match self {
            DeviceRef::Gpu(g) => g,
            DeviceRef::Mig { parent, .. } => parent,
        }
    }
}

impl Inventory {
    /// Finds a device by its published name (`gpu-<minor>` or a MIG device name).
    pub fn find_device(&self, name: &str) -> Option<DeviceRef<'_>> {
        for gpu in &self.gpus {
            if gpu.device_name() == name {
                return Some(DeviceRef::Gpu(gpu));
            }
            if let Some(mig) = gpu.mig_devices.iter().find(|m| m.device_name() == name) {
                return Some(DeviceRef::Mig { parent: gpu, mig });
            }
        }
        None
    }

    /// Finds a GPU by UUID.
    pub fn gpu_by_uuid(&self, uuid: &str) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.uuid == uuid)
    }
}

impl Gpu {
    /// Published device name of the full GPU: `gpu-<minor>`.
    pub fn device_name(&self) -> String {
        gpu_device_name(self.minor)
    }

    /// The GPU instance profile with NVML profile id `gi_profile_id` (`info.id`).
    pub fn profile_by_id(&self, gi_profile_id: u32) -> Option<&MigProfile> {
        self.mig_profiles
            .iter()
            .find(|p| p.gi_profile_id == gi_profile_id)
    }
}

impl MigDevice {
    /// Published device name: `gpu-<parentMinor>-mig-<profile>-<GI profile id>-<start>`.
    ///
    /// A compute instance smaller than its GPU instance (not covered by NVIDIA's naming)
    /// gets its profile as `<c>c.<profile>` and its compute slice start appended:
    /// `gpu-1-mig-1c3g40gb-9-4-2`.
    pub fn device_name(&self) -> String {
        let base = mig_device_name(
            self.parent_minor,
            &self.profile,
            self.gi_profile_id,
            self.placement.start,
        );
        if self.is_partial_compute_instance() {
            format!("{base}-{}", self.ci_placement.start)
        } else {
            base
        }
    }

    /// True when the compute instance covers only part of its GPU instance.
    pub fn is_partial_compute_instance(&self) -> bool {
        self.ci_slice_count != 0 && self.ci_slice_count < self.gi_slice_count
    }

    /// Narrows a device built by [`MigDevice::from_profile`] to a compute instance of
    /// `ci_slices` compute slices at `ci_placement` with `multiprocessors` SMs. When that is
    /// smaller than the GPU instance, the profile becomes `<c>c.<profile>` (go-nvlib's
    /// notation, e.g. `1c.3g.40gb`); engines and memory stay the GPU instance's (shared by
    /// its compute instances). A full-size (or unknown, 0) compute instance changes nothing.
    pub fn with_compute_instance(
        mut self,
        ci_slices: u32,
        ci_placement: Placement,
        multiprocessors: u32,
    ) -> MigDevice {
        if ci_slices == 0 || ci_slices >= self.gi_slice_count {
            return self;
        }
        self.profile = format!("{ci_slices}c.{}", self.profile);
        self.ci_slice_count = ci_slices;
        self.ci_placement = ci_placement;
        self.multiprocessors = multiprocessors;
        self
    }

    /// Builds a MIG device from its profile and NVML ids; capacities come from the profile.
    pub fn from_profile(
        parent: &Gpu,
        profile: &MigProfile,
        index: u32,
        uuid: String,
        gi_id: u32,
        ci_id: u32,
        placement: Placement,
    ) -> MigDevice {
        MigDevice {
            index,
            uuid,
            parent_uuid: parent.uuid.clone(),
            parent_minor: parent.minor,
            profile: profile.name.clone(),
            gi_profile_id: profile.gi_profile_id,
            gi_id,
            ci_id,
            placement,
            gi_slice_count: profile.slice_count,
            ci_slice_count: profile.slice_count,
            ci_placement: Placement {
                start: 0,
                size: profile.slice_count,
            },
            memory_bytes: profile.memory_bytes,
            multiprocessors: profile.multiprocessors,
            copy_engines: profile.copy_engines,
            decoders: profile.decoders,
            encoders: profile.encoders,
            jpeg_engines: profile.jpeg_engines,
            ofa_engines: profile.ofa_engines,
        }
    }
}

/// Device name of a full GPU: `gpu-<minor>`.
pub fn gpu_device_name(minor: u32) -> String {
    format!("gpu-{minor}")
}

/// Device name of a MIG device (COMPAT.md): `gpu-<parentMinor>-mig-<profile>-<id>-<start>`.
///
/// The profile loses its dots and anything that is not `[a-z0-9-]` becomes `-`
/// (`1g.10gb+me` -> `1g10gb-me`), so the result is a DNS label.
pub fn mig_device_name(parent_minor: u32, profile: &str, gi_profile_id: u32, start: u32) -> String {
    format!(
        "gpu-{parent_minor}-mig-{}-{gi_profile_id}-{start}",
        profile_name_for_device(profile)
    )
}

/// The profile part of a MIG device name: dots removed, lower case, other characters
/// outside `[a-z0-9-]` replaced by `-`, leading/trailing `-` trimmed.
pub fn profile_name_for_device(profile: &str) -> String {
    let mapped: String = profile
        .chars()
        .filter(|c| *c != '.')
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    mapped.trim_matches('-').to_string()
}

/// Canonical MIG profile name as NVIDIA's tools print it: `<slices>g.<GB>gb` plus a suffix
/// for profile variants (`+me` for media extensions, `+gfx`, `-me`, `+me.all`).
///
/// `memory_mb` is the profile's `memorySizeMB`; `device_memory_bytes` the GPU's total memory.
/// GB is the profile's share of the GPU rounded up to eighths, times the GPU's memory in
/// whole GiB (rounded up), rounded to the nearest integer: H100 80GB 9984 MiB -> `10gb`.
pub fn mig_profile_name(
    slice_count: u32,
    memory_mb: u64,
    device_memory_bytes: u64,
    profile_index: u32,
) -> String {
    let gb = mig_memory_gb(memory_mb, device_memory_bytes);
    let suffix = match profile_index {
        PROFILE_INDEX_1_SLICE_REV1 => "+me",
        PROFILE_INDEX_1_SLICE_GFX | PROFILE_INDEX_2_SLICE_GFX | PROFILE_INDEX_4_SLICE_GFX => "+gfx",
        PROFILE_INDEX_1_SLICE_NO_ME | PROFILE_INDEX_2_SLICE_NO_ME => "-me",
        PROFILE_INDEX_1_SLICE_ALL_ME | PROFILE_INDEX_2_SLICE_ALL_ME => "+me.all",
        _ => "",
    };
    format!("{slice_count}g.{gb}gb{suffix}")
}

/// Memory of a MIG profile in the GB of its name (see [`mig_profile_name`]).
fn mig_memory_gb(memory_mb: u64, device_memory_bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if device_memory_bytes == 0 {
        return memory_mb.div_ceil(1024);
    }
    let profile_bytes = memory_mb.saturating_mul(MIB) as u128;
    let device = device_memory_bytes as u128;
    // eighths = ceil(8 * profile / device), in integers to stay exact.
    let eighths = (8 * profile_bytes).div_ceil(device);
    let device_gb = device_memory_bytes.div_ceil(GIB) as u128;
    // round(eighths * device_gb / 8), half away from zero.
    ((eighths * device_gb * 2 + 8) / 16) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100_BYTES: u64 = 85_520_809_984; // 81559 MiB, what NVML reports for H100 80GB HBM3

    #[test]
    fn h100_profile_names_match_nvidia_smi() {
        assert_eq!(mig_profile_name(1, 9984, H100_BYTES, 0), "1g.10gb");
        assert_eq!(
            mig_profile_name(1, 9984, H100_BYTES, PROFILE_INDEX_1_SLICE_REV1),
            "1g.10gb+me"
        );
        assert_eq!(mig_profile_name(1, 20096, H100_BYTES, 9), "1g.20gb");
        assert_eq!(mig_profile_name(2, 20096, H100_BYTES, 1), "2g.20gb");
        assert_eq!(mig_profile_name(3, 40448, H100_BYTES, 2), "3g.40gb");
        assert_eq!(mig_profile_name(4, 40448, H100_BYTES, 3), "4g.40gb");
        assert_eq!(mig_profile_name(7, 81152, H100_BYTES, 4), "7g.80gb");
    }

    #[test]
    fn a100_40gb_profile_names() {
        let a100 = 42_505_273_344; // 40536 MiB
        assert_eq!(mig_profile_name(1, 4864, a100, 0), "1g.5gb");
        assert_eq!(mig_profile_name(2, 9856, a100, 1), "2g.10gb");
        assert_eq!(mig_profile_name(3, 19968, a100, 2), "3g.20gb");
        assert_eq!(mig_profile_name(7, 40192, a100, 4), "7g.40gb");
    }

    #[test]
    fn device_names_follow_compat() {
        assert_eq!(gpu_device_name(3), "gpu-3");
        assert_eq!(
            mig_device_name(1, "2g.47gb", 14, 0),
            "gpu-1-mig-2g47gb-14-0"
        );
        assert_eq!(
            mig_device_name(0, "1g.10gb+me", 20, 6),
            "gpu-0-mig-1g10gb-me-20-6"
        );
        assert_eq!(
            mig_device_name(0, "1g.10gb-me", 20, 6),
            "gpu-0-mig-1g10gb-me-20-6"
        );
    }

    #[test]
    fn find_device_by_name() {
        let mut gpu = Gpu {
            minor: 4,
            uuid: "GPU-a".into(),
            ..Default::default()
        };
        gpu.mig_devices.push(MigDevice {
            uuid: "MIG-b".into(),
            parent_minor: 4,
            profile: "3g.40gb".into(),
            gi_profile_id: 9,
            placement: Placement { start: 4, size: 4 },
            ..Default::default()
        });
        let inv = Inventory {
            gpus: vec![gpu],
            ..Default::default()
        };
        assert_eq!(
            inv.find_device("gpu-4").map(|d| d.uuid().to_string()),
            Some("GPU-a".into())
        );
        let mig = inv.find_device("gpu-4-mig-3g40gb-9-4").expect("mig device");
        assert_eq!(mig.uuid(), "MIG-b");
        assert_eq!(mig.gpu().uuid, "GPU-a");
        assert!(inv.find_device("gpu-5").is_none());
    }

    #[test]
    fn split_gpu_instance_names_each_compute_instance() {
        let gpu = Gpu {
            minor: 1,
            uuid: "GPU-a".into(),
            ..Default::default()
        };
        let profile = MigProfile {
            name: "3g.40gb".into(),
            gi_profile_id: 9,
            slice_count: 3,
            multiprocessors: 60,
            ..Default::default()
        };
        let at = Placement { start: 4, size: 4 };
        let full = MigDevice::from_profile(&gpu, &profile, 0, "MIG-f".into(), 2, 0, at);
        assert_eq!(
            full.clone()
                .with_compute_instance(3, Placement { start: 0, size: 3 }, 60),
            full
        );
        assert_eq!(full.device_name(), "gpu-1-mig-3g40gb-9-4");
        let two = full
            .clone()
            .with_compute_instance(2, Placement { start: 0, size: 2 }, 32);
        let one = full.with_compute_instance(1, Placement { start: 2, size: 1 }, 16);
        assert_eq!(
            (two.profile.as_str(), two.multiprocessors),
            ("2c.3g.40gb", 32)
        );
        assert_eq!(two.device_name(), "gpu-1-mig-2c3g40gb-9-4-0");
        assert_eq!(one.device_name(), "gpu-1-mig-1c3g40gb-9-4-2");
    }
}
