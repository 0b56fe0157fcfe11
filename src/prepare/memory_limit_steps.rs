//! The GPU memory-limit steps of [`Preparer`]: what a claim's shares need (the decision
//! from its allocation and pods), locating the pod cgroups, setting and clearing the limits
//! on the blocking pool, and recording them again after a lost checkpoint. The order of the
//! steps is [`Preparer::prepare_claim`]'s; the NVML and cgroup work is
//! [`crate::sharing::memory_limit`]'s.

use super::*;

impl<L: ClaimLookup> Preparer<L> {
    /// What to do about the claim's GPU memory shares (`Nothing` without a limiter).
    pub(super) fn memory_decision(
        &self,
        object: &k8s_openapi::api::resource::v1::ResourceClaim,
        plans: &[DevicePlan],
    ) -> Result<Decision, PrepareError> {
        let Some(limiter) = &self.memory_limits else {
            return Ok(Decision::Nothing);
        };
        let devices: Vec<DeviceInput<'_>> = plans
            .iter()
            .map(|p| DeviceInput {
                request: &p.allocated.request,
                device: &p.allocated.device,
                gpu_uuid: &p.gpu_uuid,
                mig: p.mig.is_some(),
            })
            .collect();
        limiter
            .decide(
                object,
                &self.config.driver_name,
                &self.config.node_name,
                &devices,
                &self.inventory.borrow(),
            )
            .map_err(limit_error)
    }

    pub(super) fn locate_limits(
        &self,
        claim_uid: &str,
        decision: &Decision,
    ) -> Result<Vec<AppliedLimit>, PrepareError> {
        match &self.memory_limits {
            Some(limiter) => limiter.locate(claim_uid, decision).map_err(limit_error),
            None => Ok(Vec::new()),
        }
    }

    /// Sets the claim's memory limits (NVML, on the blocking pool).
    pub(super) async fn apply_limits(
        &self,
        claim_uid: &str,
        limits: Vec<AppliedLimit>,
    ) -> Result<(), PrepareError> {
        let Some(limiter) = self.memory_limits.clone() else {
            return Ok(());
        };
        if limits.is_empty() {
            return Ok(());
        }
        let uid = claim_uid.to_owned();
        run_blocking(move || limiter.apply(&uid, &limits))
            .await
            .map_err(limit_error)
    }

    /// Clears the memory limits the claim's checkpoint entry records.
    pub(super) async fn clear_limits(&self, claim_uid: &str) -> Result<(), PrepareError> {
        let Some(limiter) = self.memory_limits.clone() else {
            return Ok(());
        };
        let Some(record) = self
            .checkpoint
            .snapshot()
            .claims
            .get(claim_uid)
            .and_then(|e| MemoryLimitRecord::from_extra(&e.extra))
        else {
            return Ok(());
        };
        if record.applied.is_empty() {
            return Ok(());
        }
        let uid = claim_uid.to_owned();
        run_blocking(move || limiter.clear(&uid, &record.applied))
            .await
            .map_err(limit_error)
    }
}

impl<L: ClaimLookup> Preparer<L> {
    /// After a lost checkpoint: records again the memory limits rebuilt claims hold (the
    /// pod cgroups named by their `reservedFor`), so unprepare clears them. A claim whose
    /// limits cannot be worked out is left without a record (its limit goes with its cgroup).
    pub(super) fn rebuild_limit_records(
        &self,
        live: &[k8s_openapi::api::resource::v1::ResourceClaim],
        entries: &mut BTreeMap<String, ClaimEntry>,
    ) {
        if self.memory_limits.is_none() {
            return;
        }
        self.for_each_rebuilt(live, entries, |claim, entry, plans| {
            let record = plans
            .and_then(|plans| self.memory_decision(claim, &plans))
            .and_then(|decision| {
                let uid = claim.metadata.uid.clone().unwrap_or_default();
                let limits = self.locate_limits(&uid, &decision)?;
                Ok(MemoryLimitRecord::for_decision(&decision, limits))
            });
            match record {
                Ok(Some(record)) => {
                    entry.extra.insert(
                        crate::sharing::memory_limit::CHECKPOINT_KEY.to_owned(),
                        record.to_value(),
                    );
                }
                Ok(None) => {}
                Err(err) => {
                    warn!(claim.uid = ?claim.metadata.uid, error = %err, "memory limits of a rebuilt claim not recorded; they are cleared when its pod cgroup goes");
                }
            }
        });
    }

    /// Calls `each` with every claim of `live` that has an entry in `entries` (rebuilt
    /// after a lost checkpoint), that entry, and the claim's device plans on this node.
    pub(super) fn for_each_rebuilt(
        &self,
        live: &[k8s_openapi::api::resource::v1::ResourceClaim],
        entries: &mut BTreeMap<String, ClaimEntry>,
        mut each: impl FnMut(
            &k8s_openapi::api::resource::v1::ResourceClaim,
            &mut ClaimEntry,
            Result<Vec<DevicePlan>, PrepareError>,
        ),
    ) {
        for claim in live {
            let Some(entry) = claim.metadata.uid.as_ref().and_then(|u| entries.get_mut(u)) else {
                continue;
            };
            let plans = plan_claim(
                claim,
                &self.inventory.borrow(),
                &self.config.driver_name,
                &self.config.node_name,
            )
            .map_err(PrepareError::from);
            each(claim, entry, plans);
        }
    }
}

pub(super) fn limit_error(err: crate::sharing::memory_limit::MemoryLimitError) -> PrepareError {
    PrepareError::Sharing(Box::new(SharingError::MemoryLimit(err)))
}
