//! The compute-share steps of [`Preparer`]: what a claim's GPU share needs (the decision
//! from its allocation), joining and leaving the GPU's share daemon, recording it in the
//! checkpoint entry, and recording it again after a lost checkpoint. The order of the steps
//! is [`Preparer::prepare_claim`]'s; the daemon work is
//! [`crate::sharing::share_daemon`]'s, the rules [`crate::sharing::compute_share_plan`]'s.

use super::*;
use crate::checkpoint::ClaimState;
use crate::sharing::compute_share_plan::{
    CHECKPOINT_KEY, ComputeDecision, ComputeShareRecord, compute_shares, decide,
};
use crate::sharing::memory_limit_plan::DeviceInput;

impl<L: ClaimLookup> Preparer<L> {
    /// What to do about the claim's compute shares (`Nothing` without share daemons).
    pub(super) fn compute_decision(
        &self,
        object: &k8s_openapi::api::resource::v1::ResourceClaim,
        plans: &[DevicePlan],
    ) -> Result<ComputeDecision, PrepareError> {
        let Some(shares) = self.sharing.compute_shares() else {
            return Ok(ComputeDecision::Nothing);
        };
        let uid = object.metadata.uid.clone().unwrap_or_default();
        let devices: Vec<(DeviceInput<'_>, Option<&Policy>)> = plans
            .iter()
            .filter(|p| p.mig.is_none() && !p.allocated.admin_access)
            .map(|p| {
                (
                    DeviceInput {
                        request: &p.allocated.request,
                        device: &p.allocated.device,
                        gpu_uuid: &p.gpu_uuid,
                        mig: false,
                    },
                    p.policy.as_ref(),
                )
            })
            .collect();
        compute_shares(
            object,
            &self.config.driver_name,
            &self.config.node_name,
            &devices,
            &self.inventory.borrow(),
        )
        .and_then(|found| {
            decide(
                &uid,
                found,
                shares.support(),
                shares.allows_scheduling_only(),
            )
        })
        .map_err(|e| PrepareError::Sharing(Box::new(SharingError::ComputeShare(e))))
    }

    /// Joins the GPU's share daemon; returns the container edits (none when not enforced).
    pub(super) async fn apply_compute_share(
        &self,
        claim: &ClaimRef,
        decision: &ComputeDecision,
    ) -> Result<ClaimEdits, PrepareError> {
        match decision {
            ComputeDecision::Nothing => Ok(ClaimEdits::default()),
            ComputeDecision::SchedulingOnly(record) => {
                let why = record.scheduling_only.clone().unwrap_or_default();
                warn!(claim.uid = %claim.uid, reason = %why, "GPU compute share prepared without a limit (scheduling-only shares allowed)");
                crate::events::notify(crate::events::Notice::Node {
                    warning: true,
                    reason: "ComputeShareNotEnforced".into(),
                    action: "PrepareClaim".into(),
                    note: format!(
                        "ResourceClaim {}/{}: the compute share of {} on GPU {} is not enforced: {why}",
                        claim.namespace, claim.name, record.device, record.gpu_uuid
                    ),
                });
                Ok(ClaimEdits::default())
            }
            ComputeDecision::Enforce(record) => self
                .sharing
                .apply_compute_share(&claim.uid, record)
                .await
                .map_err(|e| PrepareError::Sharing(Box::new(e))),
        }
    }

    /// Leaves the share daemons the claim's namespaces are on (found on disk).
    pub(super) async fn release_compute_share(&self, claim_uid: &str) -> Result<(), PrepareError> {
        self.sharing
            .release_compute_share(claim_uid)
            .await
            .map_err(|e| PrepareError::Sharing(Box::new(e)))
    }

    /// Start-up: brings the share daemons in line with the completed claims' records.
    pub(super) async fn recover_compute_shares(&self) {
        let snapshot = self.checkpoint.snapshot();
        let records: Vec<(String, ComputeShareRecord)> = snapshot
            .claims
            .iter()
            .filter(|(_, e)| e.state == ClaimState::PrepareCompleted)
            .filter_map(|(uid, e)| Some((uid.clone(), ComputeShareRecord::from_extra(&e.extra)?)))
            .collect();
        let report = self.sharing.recover_compute_shares(&records).await;
        for (gpu, err) in &report.failed {
            warn!(gpu.uuid = %gpu, error = %error_chain(err), "the GPU's MPS share daemon could not be recovered; its share claims fail until it is");
        }
        for gpu in &report.restarted {
            crate::events::notify(crate::events::Notice::Node {
                warning: true,
                reason: "MPSDaemonRestarted".into(),
                action: "RecoverClaims".into(),
                note: format!(
                    "the MPS share daemon of GPU {gpu} no longer answered and was started afresh with its claims' namespaces: their CUDA clients must be restarted"
                ),
            });
        }
        if !report.adopted.is_empty() || !report.stopped.is_empty() {
            tracing::info!(adopted = ?report.adopted, stopped = ?report.stopped, orphan_namespaces = ?report.orphan_namespaces, "recovered the GPUs' MPS share daemons");
        }
    }

    /// After a lost checkpoint: records again the compute shares of rebuilt claims (from
    /// their allocations), so recovery keeps their namespaces and unprepare removes them.
    pub(super) fn rebuild_compute_records(
        &self,
        live: &[k8s_openapi::api::resource::v1::ResourceClaim],
        entries: &mut BTreeMap<String, ClaimEntry>,
    ) {
        self.for_each_rebuilt(live, entries, |claim, entry, plans| {
            match plans.and_then(|plans| self.compute_decision(claim, &plans)) {
                Ok(d) => record_into(&d, entry),
                Err(err) => {
                    warn!(claim.uid = ?claim.metadata.uid, error = %err, "compute share of a rebuilt claim not recorded");
                }
            }
        });
    }
}

/// Puts the decision's record into a checkpoint entry (nothing for `Nothing`).
pub(super) fn record_into(decision: &ComputeDecision, entry: &mut ClaimEntry) {
    if let ComputeDecision::Enforce(r) | ComputeDecision::SchedulingOnly(r) = decision {
        entry.extra.insert(CHECKPOINT_KEY.to_owned(), r.to_value());
    }
}
