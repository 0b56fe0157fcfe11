//! Dynamic MIG in the prepare state machine: the GPU and compute instance of each
//! allocated placement, created at prepare and destroyed at unprepare or rollback.
//!
//! Owns the checkpoint record of each instance (`extra.dynamicMig` of a claim entry, see
//! [`InstanceRecord`]), the order of NVML steps and their undo: create the GPU instance at
//! the allocated placement (`nvmlDeviceCreateGpuInstanceWithPlacement`), its full-size
//! compute instance, read the MIG device UUID; undo destroys the compute instances, then
//! the GPU instance, in reverse order of creation. The record (GPU, profile, placement) is
//! made durable as `PrepareStarted` before anything is created; GPU / compute instance
//! ids, which NVML only returns on creation, are recorded at `PrepareCompleted`, or, when a
//! rollback could not destroy an instance, in the `PrepareStarted` entry kept for the retry.
//!
//! It never destroys what it cannot tie to a record of its own: a GPU instance is destroyed
//! only when its id, profile and placement all match the record (ids are reused by NVML).
//! A placement taken behind the driver's back fails the claim naming that instance. It
//! must not touch GPUs the inventory does not mark dynamic.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use super::mig_control::{GpuInstance, MigControl, MigControlError};
use crate::checkpoint::ClaimEntry;
use crate::inventory::Placement;

/// Called with the GPU UUID and the GPU instance when a prepare finds a placement taken by
/// an instance the driver did not create, so the published slices stop offering the
/// placements it overlaps before the next inventory refresh.
pub type ForeignReport =
    std::sync::Arc<dyn Fn(&str, crate::inventory::ForeignInstance) + Send + Sync>;

/// Key of the instance records in [`ClaimEntry::extra`].
pub const EXTRA_KEY: &str = "dynamicMig";

/// One dynamic MIG instance of a claim, as the checkpoint keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRecord {
    /// DRA device name (`gpu-0-mig-3g40gb-9-4`).
    pub device: String,
    /// Physical GPU UUID.
    pub gpu_uuid: String,
    /// Physical GPU minor.
    pub gpu_minor: u32,
    /// GPU instance profile id.
    pub gi_profile_id: u32,
    /// Placement in memory slices.
    pub placement: Placement,
    /// GPU instance id, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gi_id: Option<u32>,
    /// Compute instance id, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_id: Option<u32>,
    /// MIG device UUID, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_uuid: Option<String>,
}

/// The instance records of a claim entry (none when absent or unreadable).
pub fn records_of(entry: &ClaimEntry) -> Vec<InstanceRecord> {
    extra_records(entry, EXTRA_KEY)
}

/// Stores `records` in `entry` (removes the key when empty).
pub fn set_records(entry: &mut ClaimEntry, records: &[InstanceRecord]) {
    set_extra_records(entry, EXTRA_KEY, records);
}

/// The records a claim entry keeps under its extra field `key` (none when absent or
/// unreadable).
pub(super) fn extra_records<T: DeserializeOwned>(entry: &ClaimEntry, key: &str) -> Vec<T> {
    entry
        .extra
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// Stores `records` under the extra field `key` of `entry` (removes the key when empty).
pub(super) fn set_extra_records<T: Serialize>(entry: &mut ClaimEntry, key: &str, records: &[T]) {
    if records.is_empty() {
        entry.extra.remove(key);
    } else if let Ok(v) = serde_json::to_value(records) {
        entry.extra.insert(key.to_owned(), v);
    }
}

/// Points every dynamic plan of `plans` at the instance that exists at its placement in
/// `inventory` (a MIG device of the recorded profile there) and returns the instance
/// records, ids included when found, in plan order. Used when the checkpoint was lost: the
/// instances of claims the API server still has allocated here are the driver's own.
pub fn adopt_existing(
    plans: &mut [super::plan::DevicePlan],
    inventory: &crate::inventory::Inventory,
) -> Vec<InstanceRecord> {
    plans
        .iter_mut()
        .filter_map(|p| {
            let d = p.dynamic.as_ref()?;
            let found = inventory
                .gpus
                .iter()
                .filter(|g| g.uuid == p.gpu_uuid)
                .flat_map(|g| &g.mig_devices)
                .find(|m| {
                    m.gi_profile_id == d.gi_profile_id
                        && m.placement == d.placement
                        && !m.is_partial_compute_instance()
                });
            if let Some(m) = found {
                p.mig = Some(super::plan::MigTarget {
                    uuid: m.uuid.clone(),
                    gi_id: m.gi_id,
                    ci_id: m.ci_id,
                });
            }
            Some(InstanceRecord {
                device: p.allocated.device.clone(),
                gpu_uuid: p.gpu_uuid.clone(),
                gpu_minor: p.gpu_minor,
                gi_profile_id: d.gi_profile_id,
                placement: d.placement,
                gi_id: found.map(|m| m.gi_id),
                ci_id: found.map(|m| m.ci_id),
                mig_uuid: found.map(|m| m.uuid.clone()),
            })
        })
        .collect()
}

/// Why a dynamic MIG device could not be prepared or released. Each names the step, the
/// device and the GPU.
#[derive(Debug, Error)]
pub enum DynamicMigError {
    /// The allocated placement overlaps a GPU instance the driver did not create.
    #[error(
        "MIG device {device} on GPU {gpu_uuid}: its memory slices {start}..{end} are taken by GPU instance {gi_id} (profile id {gi_profile_id}, slices {other_start}..{other_end}) that this driver did not create; it is left as it is and no longer offered. Delete it (`nvidia-smi mig -i <gpu> -dci -gi {gi_id}` then `-dgi -gi {gi_id}`) or delete the pod so the claim is allocated elsewhere",
        start = placement.start, end = placement.start + placement.size,
        other_start = other.start, other_end = other.start + other.size
    )]
    PlacementTaken {
        /// DRA device name.
        device: String,
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// The allocated placement.
        placement: Placement,
        /// The conflicting GPU instance id.
        gi_id: u32,
        /// Its profile id.
        gi_profile_id: u32,
        /// Its placement.
        other: Placement,
    },
    /// A step failed (the prepare then destroys what it created).
    #[error("{step} for MIG device {device} on GPU {gpu_uuid} failed: {source}")]
    Step {
        /// What was being done (`creating the GPU instance`, `writing the CDI spec`, ...).
        step: &'static str,
        /// DRA device name.
        device: String,
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The full GPU of a dynamic GPU was allocated while GPU instances exist on it.
    #[error(
        "device {device} is the full GPU {gpu_uuid}, which needs MIG mode off, but the GPU still holds GPU instances {instances}; MIG mode is left on. Instances made by hand must be deleted (nvidia-smi mig -dci / -dgi), or delete the pod so the claim is allocated elsewhere"
    )]
    FullGpuHasInstances {
        /// DRA device name.
        device: String,
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// The GPU instances found (id, profile id, memory slices).
        instances: String,
    },
    /// `nvmlDeviceSetMigMode` answered, but the change did not take effect.
    #[error(
        "switching MIG mode {mode} on GPU {gpu_uuid} for device {device} did not take effect (activation status: {status}): {advice}"
    )]
    MigModeNotChanged {
        /// DRA device name.
        device: String,
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// `on` or `off`.
        mode: &'static str,
        /// NVML's activation status.
        status: String,
        /// What it means and what to do.
        advice: &'static str,
    },
    /// The node has dynamic MIG devices in its slices but no NVML MIG control.
    #[error(
        "MIG device {device} is a dynamic MIG placement but this plugin has no NVML MIG control; restart the plugin"
    )]
    NoControl {
        /// DRA device name.
        device: String,
    },
}

/// An instance this prepare created: its record with the ids known so far (`gi_id` set;
/// `ci_id` once the compute instance exists).
pub type Created = InstanceRecord;

fn step(
    step: &'static str,
    rec: &InstanceRecord,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DynamicMigError {
    step_error(step, &rec.device, &rec.gpu_uuid, source)
}

/// [`DynamicMigError::Step`]: `step` on `device` (GPU `gpu_uuid`) failed with `source`.
pub(super) fn step_error(
    step: &'static str,
    device: &str,
    gpu_uuid: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DynamicMigError {
    DynamicMigError::Step {
        step,
        device: device.to_owned(),
        gpu_uuid: gpu_uuid.to_owned(),
        source: Box::new(source),
    }
}

/// Fails with [`DynamicMigError::PlacementTaken`] when a GPU instance of any of
/// `gi_profile_ids` overlaps `rec.placement`.
pub fn check_free(
    control: &dyn MigControl,
    rec: &InstanceRecord,
    gi_profile_ids: &[u32],
) -> Result<(), DynamicMigError> {
    let existing = control
        .gpu_instances(&rec.gpu_uuid, gi_profile_ids)
        .map_err(|e| step("listing the GPU instances", rec, e))?;
    match existing
        .iter()
        .find(|gi| gi.placement.overlaps(&rec.placement))
    {
        Some(gi) => Err(DynamicMigError::PlacementTaken {
            device: rec.device.clone(),
            gpu_uuid: rec.gpu_uuid.clone(),
            placement: rec.placement,
            gi_id: gi.gi_id,
            gi_profile_id: gi.gi_profile_id,
            other: gi.placement,
        }),
        None => Ok(()),
    }
}

/// Creates the GPU instance and its full-size compute instance of `rec`, reads the MIG
/// UUID and fills `rec`'s ids. What got created is pushed to (and updated in) `created` as
/// it happens, so the caller can [`rollback`] it after any later failure.
///
/// Errors: [`DynamicMigError::Step`] naming the NVML step; what was created before it stays
/// in `created` for the caller's rollback.
pub fn create(
    control: &dyn MigControl,
    rec: &mut InstanceRecord,
    created: &mut Vec<Created>,
) -> Result<(), DynamicMigError> {
    let gi_id = control
        .create_gpu_instance(&rec.gpu_uuid, rec.gi_profile_id, rec.placement)
        .map_err(|e| step("creating the GPU instance", rec, e))?;
    rec.gi_id = Some(gi_id);
    created.push(rec.clone());
    let ci_id = control
        .create_compute_instance(&rec.gpu_uuid, gi_id)
        .map_err(|e| step("creating the compute instance", rec, e))?;
    rec.ci_id = Some(ci_id);
    if let Some(last) = created.last_mut() {
        last.ci_id = Some(ci_id);
    }
    let uuid = control
        .mig_uuid(&rec.gpu_uuid, gi_id, ci_id)
        .map_err(|e| step("reading the MIG device UUID", rec, e))?;
    info!(device = %rec.device, gpu = %rec.gpu_uuid, gi_id, ci_id, mig_uuid = %uuid, "created MIG device");
    rec.mig_uuid = Some(uuid);
    Ok(())
}

/// Destroys `created` in reverse order (compute instance, then GPU instance) and empties
/// it; a failure is logged and the rest still tried. Returns the records it could not
/// destroy (with their ids, for a later retry).
pub fn rollback(control: &dyn MigControl, created: &mut Vec<Created>) -> Vec<Created> {
    let mut left = Vec::new();
    while let Some(c) = created.pop() {
        let Some(gi_id) = c.gi_id else { continue };
        if let Some(ci) = c.ci_id
            && let Err(e) = control.destroy_compute_instance(&c.gpu_uuid, gi_id, ci)
            && !e.is_gone()
        {
            warn!(gpu = %c.gpu_uuid, gi_id, ci_id = ci, error = %e, "destroying a compute instance in rollback failed");
            left.push(c);
            continue;
        }
        if let Err(e) = control.destroy_gpu_instance(&c.gpu_uuid, gi_id)
            && !e.is_gone()
        {
            warn!(gpu = %c.gpu_uuid, gi_id, error = %e, "destroying a GPU instance in rollback failed");
            left.push(c);
        }
    }
    left.reverse();
    left
}

/// The GPU instance `rec` stands for, if it exists: by id when recorded (and then only if
/// profile and placement still match), else — a prepare cut short by a crash — the
/// instance of the recorded profile at exactly the recorded placement.
pub fn find_instance(
    control: &dyn MigControl,
    rec: &InstanceRecord,
) -> Result<Option<GpuInstance>, MigControlError> {
    let matches =
        |gi: &GpuInstance| gi.gi_profile_id == rec.gi_profile_id && gi.placement == rec.placement;
    match rec.gi_id {
        Some(id) => Ok(control.gpu_instance(&rec.gpu_uuid, id)?.filter(matches)),
        None => Ok(control
            .gpu_instances(&rec.gpu_uuid, &[rec.gi_profile_id])?
            .into_iter()
            .find(matches)),
    }
}

/// Destroys the instance of `rec` (every compute instance in it, then the GPU instance).
/// Nothing to do when it is gone. `by_placement`: also accept an id-less record (crash
/// recovery); otherwise an id-less record (never created by this process) is skipped.
pub fn destroy(
    control: &dyn MigControl,
    rec: &InstanceRecord,
    by_placement: bool,
) -> Result<(), DynamicMigError> {
    if rec.gi_id.is_none() && !by_placement {
        return Ok(());
    }
    let Some(gi) =
        find_instance(control, rec).map_err(|e| step("finding the GPU instance", rec, e))?
    else {
        return Ok(());
    };
    let cis = control
        .compute_instances(&rec.gpu_uuid, gi.gi_id)
        .map_err(|e| step("listing the compute instances", rec, e))?;
    for ci in cis {
        match control.destroy_compute_instance(&rec.gpu_uuid, gi.gi_id, ci) {
            Err(e) if !e.is_gone() => {
                return Err(step("destroying the compute instance", rec, e));
            }
            _ => {}
        }
    }
    match control.destroy_gpu_instance(&rec.gpu_uuid, gi.gi_id) {
        Err(e) if !e.is_gone() => Err(step("destroying the GPU instance", rec, e)),
        _ => {
            info!(device = %rec.device, gpu = %rec.gpu_uuid, gi_id = gi.gi_id, "destroyed MIG device");
            Ok(())
        }
    }
}

#[cfg(test)]
#[path = "mig_sharing_tests.rs"]
mod sharing_tests;
