//! Hand-built inventories with real GPU figures, for tests across modules.
//!
//! Owns the `dgx_h100` inventory the golden files and other modules' tests use: eight
//! H100 80GB HBM3 (figures as `nvidia-smi mig -lgip` / `-lgipp` report them on driver
//! 550), GPUs 1 and 2 in MIG mode with static instances, and `dgx_a100` (eight A100-SXM4-40GB
//! in MIG mode without instances). Plain data; never used as a
//! stand-in for NVML in product code (pass [`super::FixedInventory`] explicitly instead).

use super::model::{ComputeCapability, Gpu, Inventory, MigDevice, MigProfile, MigState, Placement};

/// Total memory NVML reports for an H100 80GB HBM3 (81559 MiB).
pub const H100_MEMORY_BYTES: u64 = 81_559 << 20;

/// PCI bus ids of the eight GPUs of a DGX H100, in NVML index order.
const DGX_H100_BUS_IDS: [&str; 8] = [
    "00000000:1B:00.0",
    "00000000:43:00.0",
    "00000000:52:00.0",
    "00000000:61:00.0",
    "00000000:9D:00.0",
    "00000000:C3:00.0",
    "00000000:D1:00.0",
    "00000000:DF:00.0",
];

/// One H100 GPU instance profile row: (profile index, id, slices, instances, MiB, SMs,
/// copy engines, decoders, encoders, jpeg, ofa, placement starts, placement size).
#[rustfmt::skip]
type ProfileRow = (u32, u32, u32, u32, u64, u32, u32, u32, u32, u32, u32, &'static [u32], u32);

#[rustfmt::skip]
const H100_PROFILES: [ProfileRow; 7] = [
    // idx id sl inst  MiB    SM  CE DEC ENC JPG OFA starts                  size
    (0, 19, 1, 7, 9984,  16,  1, 1, 0, 1, 0, &[0, 1, 2, 3, 4, 5, 6], 1),
    (1, 14, 2, 3, 20096, 32,  2, 2, 0, 2, 0, &[0, 2, 4],             2),
    (2, 9,  3, 2, 40448, 60,  3, 3, 0, 3, 0, &[0, 4],                4),
    (3, 5,  4, 1, 40448, 64,  4, 4, 0, 4, 0, &[0],                   4),
    (4, 0,  7, 1, 81152, 132, 8, 7, 0, 7, 1, &[0],                   8),
    (7, 20, 1, 1, 9984,  16,  1, 1, 0, 1, 1, &[0, 1, 2, 3, 4, 5, 6], 1),
    (9, 15, 1, 4, 20096, 26,  1, 1, 0, 1, 0, &[0, 2, 4, 6],          2),
];

/// The GPU instance profiles of an H100 80GB HBM3, in NVML profile index order.
pub fn h100_profiles() -> Vec<MigProfile> {
    profiles(&H100_PROFILES, H100_MEMORY_BYTES)
}

/// An H100 80GB HBM3 at NVML index `index` (minor = index), MIG mode off.
pub fn h100(index: u32) -> Gpu {
    Gpu {
        index,
        minor: index,
        uuid: format!("GPU-4e1c8a3b-7d2f-4c51-9a60-b3f0d2e8c7{index:02}"),
        name: "NVIDIA H100 80GB HBM3".to_string(),
        brand: "Nvidia".to_string(),
        architecture: "Hopper".to_string(),
        cuda_compute_capability: ComputeCapability { major: 9, minor: 0 },
        pci_bus_id: DGX_H100_BUS_IDS[index as usize % 8].to_string(),
        pcie_root: None,
        memory_bytes: H100_MEMORY_BYTES,
        mig: MigState {
            capable: true,
            enabled: false,
            pending: false,
        },
        mig_profiles: h100_profiles(),
        mig_devices: Vec::new(),
        dynamic_mig: None,
    }
}

/// Puts `gpu` in MIG mode with static instances `(gi_profile_id, placement start, gi id)`.
pub fn with_mig(mut gpu: Gpu, instances: &[(u32, u32, u32)]) -> Gpu {
    gpu.mig = MigState {
        capable: true,
        enabled: true,
        pending: true,
    };
    let mut devices = Vec::new();
    for (i, &(profile_id, start, gi_id)) in instances.iter().enumerate() {
        let profile = gpu
            .profile_by_id(profile_id)
            .expect("fixture profile id exists")
            .clone();
        let size = profile.placements.first().map_or(1, |p| p.size);
        let uuid = format!(
            "MIG-9b2d6f10-3c4e-5a7b-8d9e-{:02}{:02}{:08}",
            gpu.minor, gi_id, i
        );
        devices.push(MigDevice::from_profile(
            &gpu,
            &profile,
            i as u32,
            uuid,
            gi_id,
            0,
            Placement { start, size },
        ));
    }
    devices.sort_by_key(|d| (d.placement.start, d.gi_profile_id));
    gpu.mig_devices = devices;
    gpu
}

/// Total memory NVML reports for an A100-SXM4-40GB (40960 MiB).
pub const A100_40GB_MEMORY_BYTES: u64 = 40_960 << 20;

/// PCI bus ids of the eight GPUs of a DGX A100, in NVML index order.
const DGX_A100_BUS_IDS: [&str; 8] = [
    "00000000:07:00.0",
    "00000000:0F:00.0",
    "00000000:47:00.0",
    "00000000:4E:00.0",
    "00000000:87:00.0",
    "00000000:90:00.0",
    "00000000:B7:00.0",
    "00000000:BD:00.0",
];

#[rustfmt::skip]
const A100_40GB_PROFILES: [ProfileRow; 7] = [
    // idx id sl inst  MiB    SM  CE DEC ENC JPG OFA starts                  size
    (0, 19, 1, 7, 4864,  14,  1, 0, 0, 0, 0, &[0, 1, 2, 3, 4, 5, 6], 1),
    (1, 14, 2, 3, 9856,  28,  2, 1, 0, 0, 0, &[0, 2, 4],             2),
    (2, 9,  3, 2, 19968, 42,  3, 2, 0, 0, 0, &[0, 4],                4),
    (3, 5,  4, 1, 19968, 56,  4, 2, 0, 0, 0, &[0],                   4),
    (4, 0,  7, 1, 40192, 98,  7, 5, 0, 1, 1, &[0],                   8),
    (7, 20, 1, 1, 4864,  14,  1, 1, 0, 1, 1, &[0, 1, 2, 3, 4, 5, 6], 1),
    (9, 15, 1, 4, 9856,  14,  1, 1, 0, 0, 0, &[0, 2, 4, 6],          2),
];

fn profiles(rows: &[ProfileRow], device_memory: u64) -> Vec<MigProfile> {
    rows.iter()
        .map(
            |&(index, id, slices, instances, mib, sms, ce, dec, enc, jpeg, ofa, starts, size)| {
                MigProfile {
                    name: super::model::mig_profile_name(slices, mib, device_memory, index),
                    profile_index: index,
                    gi_profile_id: id,
                    slice_count: slices,
                    instance_count: instances,
                    memory_bytes: mib << 20,
                    multiprocessors: sms,
                    copy_engines: ce,
                    decoders: dec,
                    encoders: enc,
                    jpeg_engines: jpeg,
                    ofa_engines: ofa,
                    placements: starts
                        .iter()
                        .map(|&start| Placement { start, size })
                        .collect(),
                }
            },
        )
        .collect()
}

/// An A100-SXM4-40GB at NVML index `index` (minor = index), MIG mode on, no instances
/// (figures as the fake NVML's preset and NVIDIA's MIG user guide).
pub fn a100_40gb(index: u32) -> Gpu {
    Gpu {
        index,
        minor: index,
        uuid: format!("GPU-1a2b3c4d-5e6f-4a70-8b91-a100c0ffee{index:02}"),
        name: "NVIDIA A100-SXM4-40GB".to_string(),
        brand: "Nvidia".to_string(),
        architecture: "Ampere".to_string(),
        cuda_compute_capability: ComputeCapability { major: 8, minor: 0 },
        pci_bus_id: DGX_A100_BUS_IDS[index as usize % 8].to_string(),
        pcie_root: None,
        memory_bytes: A100_40GB_MEMORY_BYTES,
        mig: MigState {
            capable: true,
            enabled: true,
            pending: true,
        },
        mig_profiles: profiles(&A100_40GB_PROFILES, A100_40GB_MEMORY_BYTES),
        mig_devices: Vec::new(),
        dynamic_mig: None,
    }
}

/// A DGX A100: eight A100-SXM4-40GB, all in MIG mode without instances.
pub fn dgx_a100() -> Inventory {
    Inventory {
        driver_version: "550.54.15".to_string(),
        cuda_driver_version: "12.4".to_string(),
        gpus: (0..8).map(a100_40gb).collect(),
    }
}

/// A DGX H100: eight H100 80GB; GPU 1 in MIG mode with 3g.40gb@0, 2g.20gb@4, 1g.10gb@6;
/// GPU 2 in MIG mode with 4g.40gb@0 and 3g.40gb@4. Driver 550.54.15, CUDA 12.4.
pub fn dgx_h100() -> Inventory {
    let gpus = (0..8)
        .map(|i| match i {
            1 => with_mig(h100(1), &[(9, 0, 2), (14, 4, 5), (19, 6, 13)]),
            2 => with_mig(h100(2), &[(5, 0, 1), (9, 4, 2)]),
            _ => h100(i),
        })
        .collect();
    Inventory {
        driver_version: "550.54.15".to_string(),
        cuda_driver_version: "12.4".to_string(),
        gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_profile_names() {
        let names: Vec<String> = h100_profiles().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "1g.10gb",
                "2g.20gb",
                "3g.40gb",
                "4g.40gb",
                "7g.80gb",
                "1g.10gb+me",
                "1g.20gb"
            ]
        );
    }

    #[test]
    fn dgx_h100_shape() {
        let inv = dgx_h100();
        assert_eq!(inv.gpus.len(), 8);
        assert_eq!(inv.gpus[1].mig_devices.len(), 3);
        assert_eq!(inv.gpus[2].mig_devices.len(), 2);
        assert_eq!(
            inv.gpus[1].mig_devices[0].device_name(),
            "gpu-1-mig-3g40gb-9-0"
        );
        assert_eq!(inv.gpus[2].mig_devices[1].memory_bytes, 40448 << 20);
    }

    #[test]
    fn a100_profile_names() {
        let names: Vec<String> = a100_40gb(0)
            .mig_profiles
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "1g.5gb",
                "2g.10gb",
                "3g.20gb",
                "4g.20gb",
                "7g.40gb",
                "1g.5gb+me",
                "1g.10gb"
            ]
        );
    }
}
