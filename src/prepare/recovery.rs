//! Start-up recovery of the prepare state machine from the checkpoint.
//!
//! Rebuilds the sharing ledger from completed claims, rolls back prepares that stopped
//! half-way (`PrepareStarted`), re-adopts or restarts MPS control daemons, and removes
//! CDI specs no completed claim owns (left by a crash between spec and checkpoint).

use std::collections::BTreeSet;

use tracing::{info, warn};

use super::{Preparer, error_chain, record_policy};
use crate::cdi;
use crate::checkpoint::ClaimState;
use crate::claims::ClaimLookup;
use crate::sharing::MpsRecovery;

/// What [`Preparer::recover`] did.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Completed claims kept.
    pub kept: Vec<String>,
    /// Claims whose half-done prepare was rolled back.
    pub rolled_back: Vec<String>,
    /// Claims whose roll-back failed (uid, error); retried at their next call.
    pub failed: Vec<(String, String)>,
    /// Orphaned CDI spec files removed.
    pub orphan_specs_removed: Vec<String>,
    /// MPS daemons adopted, restarted or stopped.
    pub mps: MpsRecovery,
}

impl<L: ClaimLookup> Preparer<L> {
    /// Recovers from the checkpoint; call once at start before serving the kubelet.
    /// Never fails as a whole: each problem is logged and listed in the report.
    pub async fn recover(&self) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let snapshot = self.checkpoint.snapshot();
        self.sharing
            .restore(snapshot.claims.iter().flat_map(|(uid, entry)| {
                entry
                    .devices
                    .iter()
                    .filter(|d| d.mig_uuid.is_none() || d.sharing.is_some())
                    .map(move |d| (d.gpu_uuid.clone(), uid.clone(), record_policy(d)))
            }));
        for (uid, entry) in &snapshot.claims {
            if entry.state == ClaimState::PrepareCompleted {
                report.kept.push(uid.clone());
                continue;
            }
            match self.release(uid).await {
                Ok(()) => report.rolled_back.push(uid.clone()),
                Err(err) => {
                    warn!(claim.uid = %uid, error = %error_chain(&err), "rolling back an incomplete prepare failed");
                    report.failed.push((uid.clone(), error_chain(&err)));
                }
            }
        }
        report.mps = self.sharing.recover_mps().await;

        let completed: BTreeSet<&String> = report.kept.iter().collect();
        match cdi::list_specs(&self.config.cdi_root) {
            Ok((specs, temp_files)) => {
                for spec in specs.iter().filter(|s| !completed.contains(&s.claim_uid)) {
                    match cdi::remove_spec(&self.config.cdi_root, &spec.claim_uid) {
                        Ok(_) => report.orphan_specs_removed.push(spec.claim_uid.clone()),
                        Err(err) => {
                            warn!(path = %spec.path.display(), error = %err, "removing an orphaned CDI spec failed")
                        }
                    }
                }
                for temp in temp_files {
                    if let Err(err) = std::fs::remove_file(&temp) {
                        warn!(path = %temp.display(), error = %err, "removing a leftover temporary CDI file failed");
                    }
                }
            }
            Err(err) => warn!(error = %err, "listing CDI specs for orphan cleanup failed"),
        }
        info!(
            kept = report.kept.len(),
            rolled_back = report.rolled_back.len(),
            orphan_specs = report.orphan_specs_removed.len(),
            "recovered prepared claims from the checkpoint"
        );
        report
    }
}
