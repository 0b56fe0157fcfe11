//! The MIG part of one GPU's discovery: MIG mode, GPU instance profiles with their
//! placements, and the MIG devices that exist (static MIG).
//!
//! Owns telling a GPU without MIG from a MIG query that failed: `nvmlDeviceGetMigMode`
//! answers NOT_SUPPORTED on GPUs without MIG (NVML API reference, "Multi Instance GPU
//! Management"), but a transient NOT_SUPPORTED must not turn a MIG GPU into a full one, so
//! that answer is believed only when no GPU instance profile answers either
//! (`nvmlDeviceGetGpuInstanceProfileInfo` lists profiles on every MIG-capable GPU, MIG mode
//! on or off). Any failure here leaves the GPU's MIG shape unknown: the caller withholds
//! the GPU instead of publishing a guess. Read-only; it must not change GPU state.

use nvml_wrapper::Device;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProfileInfo;

use super::model::{
    Gpu, MigDevice, MigProfile, MigState, PROFILE_INDEX_COUNT, Placement, mig_profile_name,
};
use super::nvml::{DiscoverError, gpu_err};
use crate::nvml_raw;

/// Reads the MIG mode, profiles and MIG devices of `gpu` (identity already read) into it.
///
/// Errors: the first failing NVML call, named with the GPU's UUID;
/// [`DiscoverError::MigModeContradicted`] when `nvmlDeviceGetMigMode` answers NOT_SUPPORTED
/// on a GPU that lists GPU instance profiles. `gpu` is left without MIG data on error.
pub(super) fn read_mig(dev: &Device<'_>, gpu: &mut Gpu) -> Result<(), DiscoverError> {
    gpu.mig = match dev.mig_mode() {
        Ok(mode) => MigState {
            capable: true,
            enabled: mode.current == 1,
            pending: mode.pending == 1,
        },
        Err(NvmlError::NotSupported) => {
            if let Some(profile_index) = first_profile_answering(dev) {
                return Err(DiscoverError::MigModeContradicted {
                    gpu: gpu.uuid.clone(),
                    profile_index,
                });
            }
            return Ok(());
        }
        Err(e) => return Err(gpu_err("nvmlDeviceGetMigMode", &gpu.uuid)(e)),
    };
    let profiles = read_profiles(dev, gpu)?;
    gpu.mig_profiles = profiles;
    if gpu.mig.enabled {
        let devices = read_mig_devices(dev, gpu)?;
        gpu.mig_devices = devices;
    }
    Ok(())
}

/// The first GPU instance profile index the GPU answers for; `None` when none does (the
/// GPU has no MIG). A failure other than "not this profile" counts as an answer: the GPU
/// is then not known to lack MIG.
fn first_profile_answering(dev: &Device<'_>) -> Option<u32> {
    (0..PROFILE_INDEX_COUNT).find(|&index| {
        !matches!(
            dev.profile_info(index),
            Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::NotFound)
        )
    })
}

/// Every GPU instance profile the GPU answers for, with its possible placements.
pub(super) fn read_profiles(dev: &Device<'_>, gpu: &Gpu) -> Result<Vec<MigProfile>, DiscoverError> {
    let mut profiles = Vec::new();
    for index in 0..PROFILE_INDEX_COUNT {
        let info = match dev.profile_info(index) {
            Ok(info) => info,
            // Profiles a GPU does not have answer NotSupported (or InvalidArg on older drivers).
            Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::NotFound) => continue,
            Err(e) => return Err(gpu_err("nvmlDeviceGetGpuInstanceProfileInfo", &gpu.uuid)(e)),
        };
        // Placements take the profile id (`info.id`, e.g. 19), not the index.
        let placements = match nvml_raw::gpu_instance_possible_placements(dev, info.id) {
            Ok(p) => p
                .into_iter()
                .map(|p| Placement {
                    start: p.start,
                    size: p.size,
                })
                .collect(),
            Err(NvmlError::NotSupported) => Vec::new(),
            Err(e) => {
                return Err(gpu_err(
                    "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
                    &gpu.uuid,
                )(e));
            }
        };
        profiles.push(profile_from_info(
            index,
            &info,
            placements,
            gpu.memory_bytes,
        ));
    }
    Ok(profiles)
}

/// The existing MIG devices of a GPU in MIG mode.
pub(super) fn read_mig_devices(
    dev: &Device<'_>,
    gpu: &Gpu,
) -> Result<Vec<MigDevice>, DiscoverError> {
    let max = dev
        .mig_device_count()
        .map_err(gpu_err("nvmlDeviceGetMaxMigDeviceCount", &gpu.uuid))?;
    let mut devices = Vec::new();
    for index in 0..max {
        let mig = match dev.mig_device_by_index(index) {
            Ok(m) => m,
            // Unused slots answer NotFound.
            Err(NvmlError::NotFound) => continue,
            Err(e) => return Err(gpu_err("nvmlDeviceGetMigDeviceHandleByIndex", &gpu.uuid)(e)),
        };
        let uuid = mig
            .uuid()
            .map_err(gpu_err("nvmlDeviceGetUUID", &gpu.uuid))?;
        let gi_id = nvml_raw::mig_gpu_instance_id(&mig)
            .map_err(gpu_err("nvmlDeviceGetGpuInstanceId", &uuid))?;
        let ci_id = nvml_raw::mig_compute_instance_id(&mig)
            .map_err(gpu_err("nvmlDeviceGetComputeInstanceId", &uuid))?;
        let gi = nvml_raw::gpu_instance_info(dev, gi_id)
            .map_err(gpu_err("nvmlGpuInstanceGetInfo", &gpu.uuid))?;
        let profile =
            gpu.profile_by_id(gi.profile_id)
                .ok_or_else(|| DiscoverError::UnknownProfile {
                    gpu: gpu.uuid.clone(),
                    index,
                    profile_id: gi.profile_id,
                })?;
        let ci = nvml_raw::compute_instance_info(dev, gi_id, ci_id)
            .map_err(gpu_err("nvmlComputeInstanceGetInfo_v2", &gpu.uuid))?;
        let placement = Placement {
            start: gi.placement.start,
            size: gi.placement.size,
        };
        let ci_placement = Placement {
            start: ci.placement.start,
            size: ci.placement.size,
        };
        devices.push(
            MigDevice::from_profile(gpu, profile, index, uuid, gi_id, ci_id, placement)
                .with_compute_instance(ci.slice_count, ci_placement, ci.multiprocessors),
        );
    }
    devices.sort_by_key(|d| (d.placement.start, d.gi_profile_id, d.ci_placement.start));
    Ok(devices)
}

/// Converts NVML's profile info into the model, naming the profile.
fn profile_from_info(
    index: u32,
    info: &ProfileInfo,
    mut placements: Vec<Placement>,
    device_memory: u64,
) -> MigProfile {
    placements.sort();
    MigProfile {
        name: mig_profile_name(info.slice_count, info.memory_size_mb, device_memory, index),
        profile_index: index,
        gi_profile_id: info.id,
        slice_count: info.slice_count,
        instance_count: info.instance_count,
        memory_bytes: info.memory_size_mb.saturating_mul(1 << 20),
        multiprocessors: info.multiprocessor_count,
        copy_engines: info.copy_engine_count,
        decoders: info.decoder_count,
        encoders: info.encoder_count,
        jpeg_engines: info.jpeg_count,
        ofa_engines: info.ofa_count,
        placements,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_info_becomes_named_profile() {
        let info = ProfileInfo {
            copy_engine_count: 1,
            decoder_count: 1,
            encoder_count: 0,
            id: 20,
            instance_count: 1,
            is_p2p_supported: false,
            jpeg_count: 1,
            memory_size_mb: 9984,
            multiprocessor_count: 16,
            ofa_count: 1,
            slice_count: 1,
        };
        let placements = vec![
            Placement { start: 6, size: 1 },
            Placement { start: 0, size: 1 },
        ];
        let p = profile_from_info(7, &info, placements, 85_520_809_984);
        assert_eq!(p.name, "1g.10gb+me");
        assert_eq!(p.gi_profile_id, 20);
        assert_eq!(p.profile_index, 7);
        assert_eq!(p.memory_bytes, 9984 << 20);
        assert_eq!(p.placements[0].start, 0);
        assert_eq!(p.ofa_engines, 1);
    }
}
