//! Start-up recovery of the prepare state machine from the checkpoint.
//!
//! Rebuilds the sharing ledger from completed claims, rolls back prepares that stopped
//! half-way (`PrepareStarted`, dynamic MIG instances included), re-adopts or restarts MPS control daemons, and removes
//! CDI specs no completed claim owns (left by a crash between spec and checkpoint).
//! When the checkpoint was lost, unusable or from another boot,
//! [`Preparer::recover_after_loss`] first re-records the live claims found by
//! [`super::rebuild`] so none of them is taken for an orphan; without an answer from the
//! API server it removes nothing (specs, daemons and GPU policies stay; unprepare still
//! works from the spec and daemon on disk).

use std::collections::BTreeSet;

use tracing::{info, warn};

use k8s_openapi::api::resource::v1::ResourceClaim;

use super::rebuild::rebuild_entries;
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
    /// Claims re-recorded from the API server and their CDI specs after a checkpoint loss.
    pub rebuilt: Vec<String>,
    /// Live claims with a spec that could not be planned again (uid, error); spec kept.
    pub unplanned: Vec<(String, String)>,
    /// Live claims allocated here with a pod in `reservedFor`, as the API server said.
    pub in_use: usize,
    /// The API server could not be asked: nothing was removed or stopped, cleanup waits
    /// for the next start.
    pub deferred: bool,
}

impl<L: ClaimLookup> Preparer<L> {
    /// Recovers from the checkpoint; call once at start before serving the kubelet.
    /// Never fails as a whole: each problem is logged and listed in the report.
    pub async fn recover(&self) -> RecoveryReport {
        self.recover_keeping(&BTreeSet::new()).await
    }

    /// Recovery after the checkpoint was lost, unusable or from another boot. `live`: the
    /// claims the API server has allocated to this node for this driver
    /// ([`super::rebuild::list_node_claims`]), or `None` when it could not be asked. With
    /// them, every live claim with a CDI spec is recorded again as completed (spec, MPS
    /// daemon and GPU policy kept) before the normal recovery; without them nothing is
    /// removed or stopped.
    pub async fn recover_after_loss(&self, live: Option<&[ResourceClaim]>) -> RecoveryReport {
        let spec_uids: BTreeSet<String> = match cdi::list_specs(&self.config.cdi_root) {
            // A spec written before this boot began describes a void preparation (the
            // reboot reset the GPU policy): not rebuilt, so it is removed as an orphan and
            // the kubelet prepares the claim again.
            Ok((specs, _)) => {
                let boot = boot_time(&self.config.proc_root);
                specs
                    .into_iter()
                    .filter(|s| match (boot, std::fs::symlink_metadata(&s.path)) {
                        (Some(boot), Ok(meta)) => meta.modified().is_ok_and(|m| m >= boot),
                        _ => true,
                    })
                    .map(|s| s.claim_uid)
                    .collect()
            }
            Err(err) => {
                warn!(error = %err, "listing CDI specs for recovery failed; nothing is removed");
                return RecoveryReport {
                    deferred: true,
                    ..RecoveryReport::default()
                };
            }
        };
        let Some(live) = live else {
            warn!(
                specs = spec_uids.len(),
                "API server unreachable: prepared claims cannot be rebuilt; no CDI spec, MPS daemon or GPU policy is removed until the next start"
            );
            return RecoveryReport {
                deferred: true,
                ..RecoveryReport::default()
            };
        };
        let rebuilt = rebuild_entries(
            live,
            &spec_uids,
            &self.inventory.borrow(),
            &self.config.driver_name,
            &self.config.node_name,
        );
        let uids: Vec<String> = rebuilt.entries.keys().cloned().collect();
        let mut rebuilt = rebuilt;
        self.rebuild_limit_records(live, &mut rebuilt.entries);
        self.rebuild_compute_records(live, &mut rebuilt.entries);
        if !rebuilt.entries.is_empty() {
            let entries = rebuilt.entries;
            let recorded = self
                .checkpoint
                .update(move |cp| {
                    for (uid, entry) in entries {
                        cp.claims.entry(uid).or_insert(entry);
                    }
                })
                .await;
            if let Err(err) = recorded {
                warn!(error = %err, "recording rebuilt claims failed; nothing is removed");
                return RecoveryReport {
                    deferred: true,
                    ..RecoveryReport::default()
                };
            }
        }
        let keep: BTreeSet<String> = rebuilt.unplanned.iter().map(|(u, _)| u.clone()).collect();
        let mut report = self.recover_keeping(&keep).await;
        report.rebuilt = uids;
        report.unplanned = rebuilt.unplanned;
        report.in_use = rebuilt.in_use;
        info!(
            rebuilt = report.rebuilt.len(),
            unplanned = report.unplanned.len(),
            in_use = report.in_use,
            orphan_specs = report.orphan_specs_removed.len(),
            "rebuilt prepared claims from the API server and the CDI specs on disk"
        );
        report
    }

    /// [`Preparer::recover`], never removing the specs of the claims in `keep`.
    async fn recover_keeping(&self, keep: &BTreeSet<String>) -> RecoveryReport {
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
            // By placement: a crash may have cut the prepare between creating a MIG
            // instance and recording its id.
            match self.release_with(uid, true).await {
                Ok(()) => report.rolled_back.push(uid.clone()),
                Err(err) => {
                    warn!(claim.uid = %uid, error = %error_chain(&err), "rolling back an incomplete prepare failed");
                    report.failed.push((uid.clone(), error_chain(&err)));
                }
            }
        }
        report.mps = self.sharing.recover_mps().await;
        self.recover_compute_shares().await;

        let completed: BTreeSet<&String> = report.kept.iter().chain(keep).collect();
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

/// Boot time from `<proc_root>/stat` (`btime`, Unix seconds); `None` when unreadable.
fn boot_time(proc_root: &std::path::Path) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string(proc_root.join("stat")).ok()?;
    let secs = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}
