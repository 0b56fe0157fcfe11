//! The full GPU of a dynamic MIG GPU (Hopper and newer): MIG mode switched off when a
//! claim gets the whole GPU, and back on when it is released.
//!
//! Owns the checkpoint record of such a claim (`extra.dynamicMigFullGpu`, see
//! [`FullGpuRecord`], made durable as `PrepareStarted` before MIG mode is touched) and the
//! two NVML steps. Facts it follows: `nvmlDeviceSetMigMode` returns an activation status
//! besides its result; `NVML_ERROR_RESET_REQUIRED` when the change waits for a GPU reset
//! (A100/A30 always, and platforms such as pass-through VMs without a reset), and
//! `NVML_ERROR_IN_USE` when the GPU is not idle, "the caller is expected to idle the device
//! and retry" (NVML API reference). Hopper+ toggles MIG mode without a reset (MIG user
//! guide), which is why only those GPUs offer the full device (NVIDIA's DRA driver decides
//! the same way). It must never reset a GPU, and never leave MIG mode while any GPU
//! instance exists: the scheduler's counters keep placements off an allocated full GPU,
//! and the check here catches instances made by hand. A change that does not take effect
//! is asked back (pending = current), so no pending change is left; if that fails too the
//! GPU shows a pending MIG mode change and is tainted like any other.

use std::collections::BTreeSet;

use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::mig_control::MigControl;
use super::mig_dynamic::{DynamicMigError, extra_records, set_extra_records, step_error};
use crate::checkpoint::{Checkpoint, ClaimEntry};

/// Key of the full-GPU records in [`ClaimEntry::extra`].
pub const EXTRA_KEY: &str = "dynamicMigFullGpu";

/// The full GPU of a dynamic MIG GPU held by a claim, as the checkpoint keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FullGpuRecord {
    /// DRA device name (`gpu-<minor>`).
    pub device: String,
    /// Physical GPU UUID.
    pub gpu_uuid: String,
    /// Physical GPU minor.
    pub gpu_minor: u32,
}

/// The full-GPU records of a claim entry (none when absent or unreadable).
pub fn records_of(entry: &ClaimEntry) -> Vec<FullGpuRecord> {
    extra_records(entry, EXTRA_KEY)
}

/// Stores `records` in `entry` (removes the key when empty).
pub fn set_records(entry: &mut ClaimEntry, records: &[FullGpuRecord]) {
    set_extra_records(entry, EXTRA_KEY, records);
}

/// UUIDs of the GPUs whose full GPU a claim of `cp` holds (any claim state): their MIG
/// mode may be off because of the driver, and they stay dynamic.
pub fn full_gpu_uuids(cp: &Checkpoint) -> BTreeSet<String> {
    cp.claims
        .values()
        .flat_map(records_of)
        .map(|r| r.gpu_uuid)
        .collect()
}

/// Switches MIG mode off for `rec`'s claim. Nothing to do when it is off already (a retry).
///
/// Errors: [`DynamicMigError::FullGpuHasInstances`] when any GPU instance of
/// `gi_profile_ids` exists; [`DynamicMigError::MigModeNotChanged`] when the change does not
/// take effect (asked back first); [`DynamicMigError::Step`] for a failing NVML call.
pub fn leave_mig(
    control: &dyn MigControl,
    rec: &FullGpuRecord,
    gi_profile_ids: &[u32],
) -> Result<(), DynamicMigError> {
    let mode = control
        .mig_mode(&rec.gpu_uuid)
        .map_err(|e| step("reading the MIG mode", rec, e))?;
    if !mode.current && !mode.pending {
        return Ok(());
    }
    let left = control
        .gpu_instances(&rec.gpu_uuid, gi_profile_ids)
        .map_err(|e| step("listing the GPU instances", rec, e))?;
    if !left.is_empty() {
        let instances = left
            .iter()
            .map(|gi| {
                format!(
                    "{} (profile id {}, slices {}..{})",
                    gi.gi_id,
                    gi.gi_profile_id,
                    gi.placement.start,
                    gi.placement.start + gi.placement.size
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DynamicMigError::FullGpuHasInstances {
            device: rec.device.clone(),
            gpu_uuid: rec.gpu_uuid.clone(),
            instances,
        });
    }
    let status = control
        .set_mig_mode(&rec.gpu_uuid, false)
        .map_err(|e| step("switching MIG mode off", rec, e))?;
    match status {
        Ok(()) => {
            info!(device = %rec.device, gpu = %rec.gpu_uuid, "MIG mode off for a claim on the full GPU");
            Ok(())
        }
        Err(status) => {
            // Ask for the mode in effect again, so no change stays pending.
            match control.set_mig_mode(&rec.gpu_uuid, true) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(gpu = %rec.gpu_uuid, status = %e, "asking MIG mode back on did not take effect; the GPU shows a pending MIG mode change")
                }
                Err(e) => {
                    warn!(gpu = %rec.gpu_uuid, error = %e, "asking MIG mode back on failed; the GPU shows a pending MIG mode change")
                }
            }
            Err(not_changed(rec, "off", &status))
        }
    }
}

/// Switches MIG mode back on after `rec`'s claim. Nothing to do when it is on (and nothing
/// pending).
///
/// Errors: [`DynamicMigError::MigModeNotChanged`] when the change does not take effect (for
/// example processes still hold the GPU: retried at the next unprepare);
/// [`DynamicMigError::Step`] for a failing NVML call.
pub fn return_to_mig(control: &dyn MigControl, rec: &FullGpuRecord) -> Result<(), DynamicMigError> {
    let mode = control
        .mig_mode(&rec.gpu_uuid)
        .map_err(|e| step("reading the MIG mode", rec, e))?;
    if mode.current && mode.pending {
        return Ok(());
    }
    match control
        .set_mig_mode(&rec.gpu_uuid, true)
        .map_err(|e| step("switching MIG mode on", rec, e))?
    {
        Ok(()) => {
            info!(device = %rec.device, gpu = %rec.gpu_uuid, "MIG mode back on after the full GPU's claim");
            Ok(())
        }
        Err(status) => Err(not_changed(rec, "on", &status)),
    }
}

fn not_changed(rec: &FullGpuRecord, mode: &'static str, status: &NvmlError) -> DynamicMigError {
    let advice = match status {
        NvmlError::ResetRequired => {
            "this GPU needs a reset to change MIG mode (A100/A30, or a platform without GPU reset such as a pass-through VM) and the driver never resets a GPU; ask for a MIG profile instead (the 7g profile is all of it)"
        }
        NvmlError::InUse => {
            "processes hold the GPU (nvidia-smi lists them); the change is retried when the claim is prepared or released again"
        }
        _ => "the MIG mode stays as it was; see the NVML status",
    };
    DynamicMigError::MigModeNotChanged {
        device: rec.device.clone(),
        gpu_uuid: rec.gpu_uuid.clone(),
        mode,
        status: status.to_string(),
        advice,
    }
}

fn step(
    step: &'static str,
    rec: &FullGpuRecord,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DynamicMigError {
    step_error(step, &rec.device, &rec.gpu_uuid, source)
}
