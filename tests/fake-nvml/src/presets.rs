//! Model and node presets: the fixed hardware facts of each GPU model the fake can play.
//!
//! Owns the per-model figures (NVML product name, memory, architecture, CUDA compute
//! capability, brand, PCI device id) and the MIG GPU instance profile tables. It holds no
//! state and does no I/O.
//!
//! Sources (facts only): NVIDIA's MIG user guide ("Supported MIG Profiles" and the
//! `nvidia-smi mig -lgip` / `-lgipp` listings it shows), `nvidia-smi` output of the real
//! boards, and the numbers in NVIDIA's go-nvml mock packages. Profile ids are the driver's
//! ids (as `nvidia-smi mig -lgip` prints them and as NVML returns in
//! `nvmlGpuInstanceProfileInfo_t.id`), the profile *index* is the `NVML_GPU_INSTANCE_PROFILE_*`
//! constant a caller passes to `nvmlDeviceGetGpuInstanceProfileInfo`. Placements are in
//! memory-slice units (8 slices per GPU), as `nvidia-smi mig -lgipp` prints them.

use nvml_wrapper_sys::bindings as sys;

/// One MIG GPU instance profile of a model (one row of `nvidia-smi mig -lgip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiProfile {
    /// Driver profile id (19 for `1g.*`, 0 for `7g.*` ...), `nvmlGpuInstanceProfileInfo_t.id`.
    pub id: u32,
    /// NVML profile index (`NVML_GPU_INSTANCE_PROFILE_1_SLICE` ...).
    pub index: u32,
    /// Profile name without the `MIG ` prefix, e.g. `3g.40gb` or `1g.10gb+me`.
    pub name: &'static str,
    /// Compute slices (the `Ng` of the name).
    pub slices: u32,
    /// Maximum number of instances of this profile on an empty GPU.
    pub instance_count: u32,
    /// Streaming multiprocessors.
    pub sm: u32,
    /// Copy engines.
    pub ce: u32,
    /// NVDEC units.
    pub dec: u32,
    /// NVENC units.
    pub enc: u32,
    /// NVJPG units.
    pub jpeg: u32,
    /// Optical flow accelerators.
    pub ofa: u32,
    /// Memory in MiB (`memorySizeMB`).
    pub memory_mib: u64,
    /// Possible placement starts, in memory slices.
    pub placement_starts: &'static [u32],
    /// Placement size, in memory slices.
    pub placement_size: u32,
}

/// Hardware facts of one GPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Preset key used in topology files, e.g. `H100-SXM5-80GB`.
    pub key: &'static str,
    /// NVML product name (`nvmlDeviceGetName`).
    pub name: &'static str,
    /// Framebuffer size in MiB as NVML reports `total`.
    pub memory_mib: u64,
    /// `NVML_DEVICE_ARCH_*` value.
    pub architecture: u32,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// `nvmlBrandType_t` value.
    pub brand: u32,
    /// PCI device id as NVML packs it (device << 16 | vendor 0x10de).
    pub pci_device_id: u32,
    /// PCI subsystem id.
    pub pci_subsystem_id: u32,
    /// Whether `nvidia-smi compute-policy --set-timeslice` works on this model.
    pub timeslice_supported: bool,
    /// MIG GPU instance profiles, empty when the model has no MIG.
    pub mig_profiles: &'static [GiProfile],
}

impl ModelSpec {
    /// Whether the model supports MIG at all.
    pub fn mig_capable(&self) -> bool {
        !self.mig_profiles.is_empty()
    }

    /// The GPU instance profile with driver id `id`.
    pub fn gi_profile_by_id(&self, id: u32) -> Option<&'static GiProfile> {
        self.mig_profiles.iter().find(|p| p.id == id)
    }

    /// The GPU instance profile with NVML index `index` (`NVML_GPU_INSTANCE_PROFILE_*`).
    pub fn gi_profile_by_index(&self, index: u32) -> Option<&'static GiProfile> {
        self.mig_profiles.iter().find(|p| p.index == index)
    }

    /// The GPU instance profile named `name` (`3g.40gb`, with or without a `MIG ` prefix).
    pub fn gi_profile_by_name(&self, name: &str) -> Option<&'static GiProfile> {
        let name = name.strip_prefix("MIG ").unwrap_or(name);
        self.mig_profiles.iter().find(|p| p.name == name)
    }
}

const ONE_SLICE: &[u32] = &[0, 1, 2, 3, 4, 5, 6];
const TWO_SLICE: &[u32] = &[0, 2, 4, 6];
const TWO_G: &[u32] = &[0, 2, 4];
const THREE_G: &[u32] = &[0, 4];
const AT_ZERO: &[u32] = &[0];

#[allow(clippy::too_many_arguments)]
const fn gi(
    id: u32,
    index: u32,
    name: &'static str,
    slices: u32,
    instance_count: u32,
    sm: u32,
    engines: [u32; 5],
    memory_mib: u64,
    placement_starts: &'static [u32],
    placement_size: u32,
) -> GiProfile {
    GiProfile {
        id,
        index,
        name,
        slices,
        instance_count,
        sm,
        ce: engines[0],
        dec: engines[1],
        enc: engines[2],
        jpeg: engines[3],
        ofa: engines[4],
        memory_mib,
        placement_starts,
        placement_size,
    }
}

const P1: u32 = sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE;
const P1_ME: u32 = sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1;
const P1_2X: u32 = sys::NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2;
const P2: u32 = sys::NVML_GPU_INSTANCE_PROFILE_2_SLICE;
const P3: u32 = sys::NVML_GPU_INSTANCE_PROFILE_3_SLICE;
const P4: u32 = sys::NVML_GPU_INSTANCE_PROFILE_4_SLICE;
const P7: u32 = sys::NVML_GPU_INSTANCE_PROFILE_7_SLICE;

// Engine columns: [copy engines, NVDEC, NVENC, JPEG, OFA].
static A100_40GB_MIG: [GiProfile; 7] = [
    gi(
        19,
        P1,
        "1g.5gb",
        1,
        7,
        14,
        [1, 0, 0, 0, 0],
        4864,
        ONE_SLICE,
        1,
    ),
    gi(
        20,
        P1_ME,
        "1g.5gb+me",
        1,
        1,
        14,
        [1, 1, 0, 1, 1],
        4864,
        ONE_SLICE,
        1,
    ),
    gi(
        15,
        P1_2X,
        "1g.10gb",
        1,
        4,
        14,
        [1, 1, 0, 0, 0],
        9856,
        TWO_SLICE,
        2,
    ),
    gi(14, P2, "2g.10gb", 2, 3, 28, [2, 1, 0, 0, 0], 9856, TWO_G, 2),
    gi(
        9,
        P3,
        "3g.20gb",
        3,
        2,
        42,
        [3, 2, 0, 0, 0],
        19968,
        THREE_G,
        4,
    ),
    gi(
        5,
        P4,
        "4g.20gb",
        4,
        1,
        56,
        [4, 2, 0, 0, 0],
        19968,
        AT_ZERO,
        4,
    ),
    gi(
        0,
        P7,
        "7g.40gb",
        7,
        1,
        98,
        [7, 5, 0, 1, 1],
        40192,
        AT_ZERO,
        8,
    ),
];

static A100_80GB_MIG: [GiProfile; 7] = [
    gi(
        19,
        P1,
        "1g.10gb",
        1,
        7,
        14,
        [1, 0, 0, 0, 0],
        9856,
        ONE_SLICE,
        1,
    ),
    gi(
        20,
        P1_ME,
        "1g.10gb+me",
        1,
        1,
        14,
        [1, 1, 0, 1, 1],
        9856,
        ONE_SLICE,
        1,
    ),
    gi(
        15,
        P1_2X,
        "1g.20gb",
        1,
        4,
        14,
        [1, 1, 0, 0, 0],
        19968,
        TWO_SLICE,
        2,
    ),
    gi(
        14,
        P2,
        "2g.20gb",
        2,
        3,
        28,
        [2, 1, 0, 0, 0],
        19968,
        TWO_G,
        2,
    ),
    gi(
        9,
        P3,
        "3g.40gb",
        3,
        2,
        42,
        [3, 2, 0, 0, 0],
        40192,
        THREE_G,
        4,
    ),
    gi(
        5,
        P4,
        "4g.40gb",
        4,
        1,
        56,
        [4, 2, 0, 0, 0],
        40192,
        AT_ZERO,
        4,
    ),
    gi(
        0,
        P7,
        "7g.80gb",
        7,
        1,
        98,
        [7, 5, 0, 1, 1],
        80384,
        AT_ZERO,
        8,
    ),
];

static H100_80GB_MIG: [GiProfile; 7] = [
    gi(
        19,
        P1,
        "1g.10gb",
        1,
        7,
        16,
        [1, 1, 0, 1, 0],
        9984,
        ONE_SLICE,
        1,
    ),
    gi(
        20,
        P1_ME,
        "1g.10gb+me",
        1,
        1,
        16,
        [1, 1, 0, 1, 1],
        9984,
        ONE_SLICE,
        1,
    ),
    gi(
        15,
        P1_2X,
        "1g.20gb",
        1,
        4,
        26,
        [1, 1, 0, 1, 0],
        20096,
        TWO_SLICE,
        2,
    ),
    gi(
        14,
        P2,
        "2g.20gb",
        2,
        3,
        32,
        [2, 2, 0, 2, 0],
        20096,
        TWO_G,
        2,
    ),
    gi(
        9,
        P3,
        "3g.40gb",
        3,
        2,
        60,
        [3, 3, 0, 3, 0],
        40448,
        THREE_G,
        4,
    ),
    gi(
        5,
        P4,
        "4g.40gb",
        4,
        1,
        64,
        [4, 4, 0, 4, 0],
        40448,
        AT_ZERO,
        4,
    ),
    gi(
        0,
        P7,
        "7g.80gb",
        7,
        1,
        132,
        [8, 7, 0, 7, 1],
        81152,
        AT_ZERO,
        8,
    ),
];

static H200_141GB_MIG: [GiProfile; 7] = [
    gi(
        19,
        P1,
        "1g.18gb",
        1,
        7,
        16,
        [1, 1, 0, 1, 0],
        18432,
        ONE_SLICE,
        1,
    ),
    gi(
        20,
        P1_ME,
        "1g.18gb+me",
        1,
        1,
        16,
        [1, 1, 0, 1, 1],
        18432,
        ONE_SLICE,
        1,
    ),
    gi(
        15,
        P1_2X,
        "1g.35gb",
        1,
        4,
        26,
        [1, 1, 0, 1, 0],
        35840,
        TWO_SLICE,
        2,
    ),
    gi(
        14,
        P2,
        "2g.35gb",
        2,
        3,
        32,
        [2, 2, 0, 2, 0],
        35840,
        TWO_G,
        2,
    ),
    gi(
        9,
        P3,
        "3g.71gb",
        3,
        2,
        60,
        [3, 3, 0, 3, 0],
        72704,
        THREE_G,
        4,
    ),
    gi(
        5,
        P4,
        "4g.71gb",
        4,
        1,
        64,
        [4, 4, 0, 4, 0],
        72704,
        AT_ZERO,
        4,
    ),
    gi(
        0,
        P7,
        "7g.141gb",
        7,
        1,
        132,
        [8, 7, 0, 7, 1],
        144384,
        AT_ZERO,
        8,
    ),
];

const BRAND_NVIDIA: u32 = sys::nvmlBrandType_enum_NVML_BRAND_NVIDIA;
const BRAND_TESLA: u32 = sys::nvmlBrandType_enum_NVML_BRAND_TESLA;

/// Every model preset, by key.
pub static MODELS: [ModelSpec; 6] = [
    ModelSpec {
        key: "A100-SXM4-40GB",
        name: "NVIDIA A100-SXM4-40GB",
        memory_mib: 40960,
        architecture: sys::NVML_DEVICE_ARCH_AMPERE,
        compute_capability: (8, 0),
        brand: BRAND_NVIDIA,
        pci_device_id: 0x20B0_10DE,
        pci_subsystem_id: 0x134F_10DE,
        timeslice_supported: true,
        mig_profiles: &A100_40GB_MIG,
    },
    ModelSpec {
        key: "A100-SXM4-80GB",
        name: "NVIDIA A100-SXM4-80GB",
        memory_mib: 81920,
        architecture: sys::NVML_DEVICE_ARCH_AMPERE,
        compute_capability: (8, 0),
        brand: BRAND_NVIDIA,
        pci_device_id: 0x20B2_10DE,
        pci_subsystem_id: 0x1463_10DE,
        timeslice_supported: true,
        mig_profiles: &A100_80GB_MIG,
    },
    ModelSpec {
        key: "H100-SXM5-80GB",
        name: "NVIDIA H100 80GB HBM3",
        memory_mib: 81559,
        architecture: sys::NVML_DEVICE_ARCH_HOPPER,
        compute_capability: (9, 0),
        brand: BRAND_NVIDIA,
        pci_device_id: 0x2330_10DE,
        pci_subsystem_id: 0x16C1_10DE,
        timeslice_supported: true,
        mig_profiles: &H100_80GB_MIG,
    },
    ModelSpec {
        key: "H200",
        name: "NVIDIA H200",
        memory_mib: 143771,
        architecture: sys::NVML_DEVICE_ARCH_HOPPER,
        compute_capability: (9, 0),
        brand: BRAND_NVIDIA,
        pci_device_id: 0x2335_10DE,
        pci_subsystem_id: 0x18BE_10DE,
        timeslice_supported: true,
        mig_profiles: &H200_141GB_MIG,
    },
    ModelSpec {
        key: "L40S",
        name: "NVIDIA L40S",
        memory_mib: 46068,
        architecture: sys::NVML_DEVICE_ARCH_ADA,
        compute_capability: (8, 9),
        brand: BRAND_NVIDIA,
        pci_device_id: 0x26B9_10DE,
        pci_subsystem_id: 0x1851_10DE,
        timeslice_supported: true,
        mig_profiles: &[],
    },
    ModelSpec {
        key: "T4",
        name: "Tesla T4",
        memory_mib: 15360,
        architecture: sys::NVML_DEVICE_ARCH_TURING,
        compute_capability: (7, 5),
        brand: BRAND_TESLA,
        pci_device_id: 0x1EB8_10DE,
        pci_subsystem_id: 0x12A2_10DE,
        timeslice_supported: false,
        mig_profiles: &[],
    },
];

/// The model preset named `key` (case-insensitive).
pub fn model(key: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.key.eq_ignore_ascii_case(key))
}

/// A node preset: a fixed list of (model key, PCI bus id) in NVML index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePreset {
    /// Preset key used in topology files (`dgx-h100`).
    pub key: &'static str,
    /// GPUs as (model key, PCI bus id `DDDDDDDD:BB:DD.F`), in NVML index order.
    pub gpus: &'static [(&'static str, &'static str)],
}

/// Every node preset.
pub static NODES: [NodePreset; 3] = [
    NodePreset {
        key: "dgx-h100",
        gpus: &[
            ("H100-SXM5-80GB", "00000000:18:00.0"),
            ("H100-SXM5-80GB", "00000000:2A:00.0"),
            ("H100-SXM5-80GB", "00000000:3A:00.0"),
            ("H100-SXM5-80GB", "00000000:5D:00.0"),
            ("H100-SXM5-80GB", "00000000:9A:00.0"),
            ("H100-SXM5-80GB", "00000000:AB:00.0"),
            ("H100-SXM5-80GB", "00000000:BA:00.0"),
            ("H100-SXM5-80GB", "00000000:DB:00.0"),
        ],
    },
    NodePreset {
        key: "dgx-a100",
        gpus: &[
            ("A100-SXM4-40GB", "00000000:07:00.0"),
            ("A100-SXM4-40GB", "00000000:0F:00.0"),
            ("A100-SXM4-40GB", "00000000:47:00.0"),
            ("A100-SXM4-40GB", "00000000:4E:00.0"),
            ("A100-SXM4-40GB", "00000000:87:00.0"),
            ("A100-SXM4-40GB", "00000000:90:00.0"),
            ("A100-SXM4-40GB", "00000000:B7:00.0"),
            ("A100-SXM4-40GB", "00000000:BD:00.0"),
        ],
    },
    NodePreset {
        key: "l40s-single",
        gpus: &[("L40S", "00000000:30:00.0")],
    },
];

/// The node preset named `key` (case-insensitive).
pub fn node(key: &str) -> Option<&'static NodePreset> {
    NODES.iter().find(|n| n.key.eq_ignore_ascii_case(key))
}

/// One MIG compute instance profile inside a GPU instance profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiProfile {
    /// NVML compute instance profile id (`NVML_COMPUTE_INSTANCE_PROFILE_*`), which is also
    /// what `nvmlComputeInstanceProfileInfo_t.id` carries.
    pub id: u32,
    /// Compute slices.
    pub slices: u32,
    /// Streaming multiprocessors.
    pub sm: u32,
    /// Possible placement starts, in compute slices of the GPU instance.
    pub placement_starts: Vec<u32>,
}

impl CiProfile {
    /// Maximum instances of this profile in an empty GPU instance.
    pub fn instance_count(&self) -> u32 {
        self.placement_starts.len() as u32
    }

    /// Name as `nvidia-smi` prints it inside `gi` (`1c.3g.40gb`, or the GI name when full).
    pub fn name(&self, gi: &GiProfile) -> String {
        if self.slices == gi.slices {
            gi.name.to_string()
        } else {
            format!("{}c.{}", self.slices, gi.name)
        }
    }
}

/// NVML compute instance profile id for a compute slice count.
pub fn ci_profile_id_for_slices(slices: u32) -> Option<u32> {
    match slices {
        1 => Some(sys::NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE),
        2 => Some(sys::NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE),
        3 => Some(sys::NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE),
        4 => Some(sys::NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE),
        7 => Some(sys::NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE),
        _ => None,
    }
}

/// Compute instance profiles a GPU instance of profile `gi` offers on `model`
/// (what `nvidia-smi mig -lcip` lists): 1c/2c/3c/4c sub-slices plus the full GI.
pub fn ci_profiles(model: &ModelSpec, gi: &GiProfile) -> Vec<CiProfile> {
    let mut out = Vec::new();
    for slices in [1u32, 2, 3, 4, 7] {
        if slices > gi.slices || (slices == 3 && gi.slices == 4) {
            continue;
        }
        let Some(id) = ci_profile_id_for_slices(slices) else {
            continue;
        };
        let sm = if slices == gi.slices {
            gi.sm
        } else {
            model
                .mig_profiles
                .iter()
                .find(|p| p.slices == slices && p.index != P1_ME && p.index != P1_2X)
                .map_or(0, |p| p.sm)
        };
        let placement_starts = match slices {
            s if s == gi.slices => vec![0],
            1 => (0..gi.slices).collect(),
            2 => (0..gi.slices)
                .step_by(2)
                .filter(|s| s + 2 <= gi.slices)
                .collect(),
            3 => vec![0, 4]
                .into_iter()
                .filter(|s| s + 3 <= gi.slices)
                .collect(),
            _ => vec![0],
        };
        out.push(CiProfile {
            id,
            slices,
            sm,
            placement_starts,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mig_model_has_the_seven_documented_profiles() {
        for m in MODELS.iter().filter(|m| m.mig_capable()) {
            let ids: Vec<u32> = m.mig_profiles.iter().map(|p| p.id).collect();
            assert_eq!(ids, vec![19, 20, 15, 14, 9, 5, 0], "{}", m.key);
            for p in m.mig_profiles {
                // Every profile can place as many instances as it allows; the +me profile
                // may sit on any 1g slot but only once.
                let expected = if p.index == P1_ME {
                    7
                } else {
                    p.instance_count
                };
                assert_eq!(
                    p.placement_starts.len() as u32,
                    expected,
                    "{} {}",
                    m.key,
                    p.name
                );
                assert!(p.placement_starts.iter().all(|s| s + p.placement_size <= 8));
            }
        }
    }

    #[test]
    fn h100_names_and_memory() {
        let h = model("h100-sxm5-80gb").unwrap();
        assert_eq!(h.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(h.gi_profile_by_name("MIG 3g.40gb").unwrap().id, 9);
        assert_eq!(h.gi_profile_by_index(P7).unwrap().sm, 132);
        assert!(!model("T4").unwrap().mig_capable());
    }

    #[test]
    fn compute_instance_profiles_follow_the_gi_size() {
        let a = model("A100-SXM4-40GB").unwrap();
        let full = a.gi_profile_by_id(0).unwrap();
        let cis = ci_profiles(a, full);
        let slices: Vec<u32> = cis.iter().map(|c| c.slices).collect();
        assert_eq!(slices, vec![1, 2, 3, 4, 7]);
        assert_eq!(cis[0].instance_count(), 7);
        assert_eq!(cis[1].placement_starts, vec![0, 2, 4]);
        assert_eq!(cis[2].placement_starts, vec![0, 4]);
        assert_eq!(cis[4].sm, 98);
        let four = a.gi_profile_by_id(5).unwrap();
        let s: Vec<u32> = ci_profiles(a, four).iter().map(|c| c.slices).collect();
        assert_eq!(s, vec![1, 2, 4]);
        assert_eq!(ci_profiles(a, full)[0].name(full), "1c.7g.40gb");
    }
}
