//! The dynamic MIG steps of [`Preparer`]: placement check, instance creation (pointing each
//! plan at its new MIG device) and destruction, run on the blocking pool, and the naming
//! of a failure after creation by its step and GPU. The order of the steps and the
//! rollback are [`Preparer::prepare_claim`]'s; the NVML work is [`super::mig_dynamic`]'s.

use std::sync::Arc;

use super::mig_control::MigControl;
use super::mig_dynamic::{self, InstanceRecord};
use super::mig_full::{self, FullGpuRecord};
use super::plan::{self, DevicePlan};
use super::{PrepareError, Preparer};
use crate::claims::ClaimLookup;

impl<L: ClaimLookup> Preparer<L> {
    pub(super) fn mig_control(&self, device: &str) -> Result<Arc<dyn MigControl>, PrepareError> {
        self.mig.clone().ok_or_else(|| {
            mig_dynamic::DynamicMigError::NoControl {
                device: device.to_owned(),
            }
            .into()
        })
    }

    /// Fails naming the instance when an allocated placement is taken on the GPU.
    pub(super) async fn check_placements_free(
        &self,
        plans: &[DevicePlan],
        instances: &[InstanceRecord],
    ) -> Result<(), PrepareError> {
        for (plan, rec) in plans.iter().filter(|p| p.dynamic.is_some()).zip(instances) {
            let control = self.mig_control(&rec.device)?;
            let (rec, ids) = (
                rec.clone(),
                plan.dynamic
                    .as_ref()
                    .map(|d| d.gpu_profile_ids.clone())
                    .unwrap_or_default(),
            );
            let checked =
                mig_blocking(move || mig_dynamic::check_free(control.as_ref(), &rec, &ids)).await;
            if let Err(mig_dynamic::DynamicMigError::PlacementTaken {
                gpu_uuid,
                gi_id,
                gi_profile_id,
                other,
                ..
            }) = &checked
                && let Some(report) = &self.foreign_report
            {
                report(
                    gpu_uuid,
                    crate::inventory::ForeignInstance {
                        gi_id: *gi_id,
                        gi_profile_id: *gi_profile_id,
                        placement: *other,
                    },
                );
            }
            checked?;
        }
        Ok(())
    }

    /// Creates the instance of every dynamic plan, in order, and points the plan at it.
    pub(super) async fn create_instances(
        &self,
        plans: &mut [DevicePlan],
        instances: &mut [InstanceRecord],
        created: &mut Vec<mig_dynamic::Created>,
    ) -> Result<(), PrepareError> {
        for (plan, rec) in plans
            .iter_mut()
            .filter(|p| p.dynamic.is_some())
            .zip(instances.iter_mut())
        {
            let control = self.mig_control(&rec.device)?;
            let mut owned = rec.clone();
            let (owned, mine, result) = match tokio::task::spawn_blocking(move || {
                let mut mine = Vec::new();
                let result = mig_dynamic::create(control.as_ref(), &mut owned, &mut mine);
                (owned, mine, result)
            })
            .await
            {
                Ok(out) => out,
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            };
            created.extend(mine);
            result?;
            *rec = owned;
            if let (Some(uuid), Some(gi_id), Some(ci_id)) = (&rec.mig_uuid, rec.gi_id, rec.ci_id) {
                plan.mig = Some(plan::MigTarget {
                    uuid: uuid.clone(),
                    gi_id,
                    ci_id,
                });
            }
        }
        Ok(())
    }

    /// Switches MIG mode off on the GPU of every full dynamic GPU in `plans` (`full` in
    /// plan order, from [`full_records`]).
    pub(super) async fn leave_mig_modes(
        &self,
        plans: &[DevicePlan],
        full: &[FullGpuRecord],
    ) -> Result<(), PrepareError> {
        let ids = plans.iter().filter_map(|p| p.full_of_dynamic.clone());
        for (rec, ids) in full.iter().zip(ids) {
            let control = self.mig_control(&rec.device)?;
            let rec = rec.clone();
            mig_blocking(move || mig_full::leave_mig(control.as_ref(), &rec, &ids)).await?;
        }
        Ok(())
    }

    /// Switches MIG mode back on for the full-GPU records of a checkpoint entry.
    pub(super) async fn return_to_mig_modes(
        &self,
        records: Vec<FullGpuRecord>,
    ) -> Result<(), PrepareError> {
        for rec in records {
            let control = self.mig_control(&rec.device)?;
            mig_blocking(move || mig_full::return_to_mig(control.as_ref(), &rec)).await?;
        }
        Ok(())
    }

    /// Destroys the dynamic MIG instances of a checkpoint entry, newest first.
    pub(super) async fn destroy_instances(
        &self,
        records: Vec<InstanceRecord>,
        by_placement: bool,
    ) -> Result<(), PrepareError> {
        for rec in records.into_iter().rev() {
            let control = self.mig_control(&rec.device)?;
            mig_blocking(move || mig_dynamic::destroy(control.as_ref(), &rec, by_placement))
                .await?;
        }
        Ok(())
    }
}

/// Runs blocking NVML MIG work on the blocking pool.
async fn mig_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, mig_dynamic::DynamicMigError> + Send + 'static,
) -> Result<T, mig_dynamic::DynamicMigError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// The instance records (not yet created) of a claim's dynamic MIG plans, in plan order.
pub(super) fn instance_records(plans: &[DevicePlan]) -> Vec<InstanceRecord> {
    plans
        .iter()
        .filter_map(|p| {
            p.dynamic.as_ref().map(|d| InstanceRecord {
                device: p.allocated.device.clone(),
                gpu_uuid: p.gpu_uuid.clone(),
                gpu_minor: p.gpu_minor,
                gi_profile_id: d.gi_profile_id,
                placement: d.placement,
                gi_id: None,
                ci_id: None,
                mig_uuid: None,
            })
        })
        .collect()
}

/// The full-GPU records of a claim's full dynamic GPUs, in plan order.
pub(super) fn full_records(plans: &[DevicePlan]) -> Vec<FullGpuRecord> {
    plans
        .iter()
        .filter(|p| p.full_of_dynamic.is_some())
        .map(|p| FullGpuRecord {
            device: p.allocated.device.clone(),
            gpu_uuid: p.gpu_uuid.clone(),
            gpu_minor: p.gpu_minor,
        })
        .collect()
}

/// A failure after MIG instances were created, named by its step and the first instance's
/// device and GPU; other errors pass through.
pub(super) fn name_step(err: PrepareError, instances: &[InstanceRecord]) -> PrepareError {
    let Some(first) = instances.first() else {
        return err;
    };
    let step = match &err {
        PrepareError::DeviceNodes(_) => "reading the MIG capability device nodes",
        PrepareError::Cdi(_) => "writing the CDI spec",
        PrepareError::Checkpoint(_) => "writing the checkpoint",
        PrepareError::Sharing(_) => "applying the sharing policy",
        _ => return err,
    };
    mig_dynamic::DynamicMigError::Step {
        step,
        device: first.device.clone(),
        gpu_uuid: first.gpu_uuid.clone(),
        source: Box::new(err),
    }
    .into()
}
