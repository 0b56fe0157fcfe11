//! Compute policy of physical GPUs: time-slicing, MPS, exclusive use — the hardware-facing
//! side of sharing.
//!
//! Owns: [`SharingManager`], which turns "claim X uses GPUs G with policy P" into hardware
//! actions and container edits, orders operations per GPU (an async mutex per GPU UUID;
//! no node-wide lock: different GPUs proceed in parallel), and rolls back a claim's partial
//! changes when one GPU fails. Submodules: [`control`] (NVML compute mode and
//! `nvidia-smi compute-policy` seams), `gpu_settings` (each setting set, read back, and
//! stale ones reset), [`policy`] (the pure conflict ledger), [`mps`] (MPS control daemon
//! supervisor), [`share_daemon`] with [`compute_share_plan`] (the compute of GPU shares:
//! one MPS v3 daemon per shared GPU, a namespace per share claim).
//!
//! Must not: write the checkpoint or CDI files (the prepare state machine does; it gets
//! [`ClaimEdits`] as data and rebuilds this module's state with [`SharingManager::restore`]),
//! decode opaque configs (the config module maps them to [`Policy`]), or inject a policy
//! a claim did not ask for (issue 5: `None` leaves the GPU as it is).
//!
//! Follows NVIDIA's reference DRA driver for what each strategy does to the GPU (compute
//! mode through NVML, time slice through `nvidia-smi compute-policy`, MPS daemon per
//! claim with `CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps` in the containers), and departs
//! from it where COMPAT.md says it hurts: no default time slice injected, support probed
//! before setting, daemons supervised by the plugin, per-GPU rather than node-wide locking.

pub mod compute_share_plan;
pub mod compute_share_status;
pub mod control;
mod gpu_settings;
pub mod launcher;
pub mod memory_limit;
pub mod memory_limit_cgroup;
pub mod memory_limit_plan;
pub mod memory_limit_status;
#[cfg(test)]
pub(crate) mod memory_limit_tests;
pub mod mps;
pub mod policy;
pub mod share_daemon;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::join_all;

pub use control::{
    ComputeControl, ComputeMode, ControlError, NvidiaSmiTimeSlice, NvmlComputeControl, TimeSlice,
    TimeSliceControl, TimeSliceState,
};
pub use mps::{
    AdoptOutcome, ClaimEdits, MountSpec, MpsError, MpsLauncher, MpsSettings, MpsSupervisor,
    PrivateShm,
};
pub use policy::{Action, Conflict, Ledger, MpsLimits, Policy};

/// Errors of [`SharingManager`]; each says which claim, which GPU and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    /// The GPU is used by another claim under an incompatible policy.
    #[error(transparent)]
    Conflict(#[from] Box<Conflict>),
    /// The claim asks for a time slice on a GPU that cannot set one.
    #[error(
        "claim {claim_uid}: GPU {gpu_uuid} does not support setting the time slice ({detail}); remove the TimeSlicing sharing config from the claim (or its DeviceClass) or select another GPU model"
    )]
    TimeSliceUnsupported {
        /// The claim UID.
        claim_uid: String,
        /// The GPU UUID.
        gpu_uuid: String,
        /// What the GPU/tool said.
        detail: String,
    },
    /// A hardware call failed.
    #[error("claim {claim_uid}: {action} on GPU {gpu_uuid}")]
    Control {
        /// The claim UID.
        claim_uid: String,
        /// The GPU UUID.
        gpu_uuid: String,
        /// What was being done, e.g. `setting compute mode ExclusiveProcess`.
        action: String,
        /// The seam's error (names the NVML function or command).
        #[source]
        source: ControlError,
    },
    /// The GPU reports success for a setting it does not hold when read back.
    #[error(
        "claim {claim_uid}: GPU {gpu_uuid} does not hold {setting} {wanted} after {call} reported success: it reads back {read}; {hint}"
    )]
    NotApplied {
        /// The claim UID.
        claim_uid: String,
        /// The GPU UUID.
        gpu_uuid: String,
        /// `compute mode` or `time slice`.
        setting: &'static str,
        /// The call that reported success (NVML function or command).
        call: &'static str,
        /// The value set.
        wanted: String,
        /// The value read back.
        read: String,
        /// What to do.
        hint: &'static str,
    },
    /// The MPS control daemon could not be started, configured or stopped.
    #[error(transparent)]
    Mps(#[from] MpsError),
    /// A share's GPU memory limit could not be planned, set or cleared.
    #[error(transparent)]
    MemoryLimit(#[from] memory_limit::MemoryLimitError),
    /// A share's compute limit could not be planned or is not enforceable here.
    #[error(transparent)]
    ComputeShare(#[from] compute_share_plan::ComputeShareError),
    /// A policy was given for a claim without GPUs.
    #[error("claim {claim_uid} asks for {policy} but lists no physical GPU")]
    NoGpus {
        /// The claim UID.
        claim_uid: String,
        /// The policy asked for.
        policy: String,
    },
}

/// What [`SharingManager::recover_mps`] did after a plugin restart.
#[derive(Debug, Default)]
pub struct MpsRecovery {
    /// Claims whose daemon still answered.
    pub adopted: Vec<String>,
    /// Claims whose daemon was started afresh.
    pub restarted: Vec<String>,
    /// Claims the ledger does not know with a daemon directory or a running daemon
    /// (found in `/proc`), stopped and removed.
    pub stopped_orphans: Vec<String>,
    /// Claims whose daemon could not be recovered.
    pub failed: Vec<(String, SharingError)>,
}

/// Builds [`SharingError::Control`] for `claim_uid` on `gpu` from an action and its error.
fn control_error<'a>(
    claim_uid: &'a str,
    gpu: &'a str,
) -> impl Fn(&str, ControlError) -> SharingError + 'a {
    move |action, source| SharingError::Control {
        claim_uid: claim_uid.to_owned(),
        gpu_uuid: gpu.to_owned(),
        action: action.to_owned(),
        source,
    }
}

/// Applies and releases claims' compute policies on physical GPUs.
pub struct SharingManager {
    compute: Arc<dyn ComputeControl>,
    time_slice: Arc<dyn TimeSliceControl>,
    mps: MpsSupervisor,
    ledger: Mutex<Ledger>,
    gpu_locks: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    compute_shares: Option<share_daemon::ComputeShares>,
}

type GpuGuards = Vec<tokio::sync::OwnedMutexGuard<()>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent across a panic (each update is one call).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SharingManager {
    /// A manager over these seams with an empty ledger.
    pub fn new(
        compute: Arc<dyn ComputeControl>,
        time_slice: Arc<dyn TimeSliceControl>,
        mps: MpsSupervisor,
    ) -> Self {
        Self {
            compute,
            time_slice,
            mps,
            ledger: Mutex::new(Ledger::new()),
            gpu_locks: Mutex::new(BTreeMap::new()),
            compute_shares: None,
        }
    }

    /// Locks the given GPUs in sorted order (so two multi-GPU claims cannot deadlock).
    async fn lock_gpus(&self, sorted_gpus: &[String]) -> GpuGuards {
        let mutexes: Vec<_> = {
            let mut map = lock(&self.gpu_locks);
            sorted_gpus
                .iter()
                .map(|g| Arc::clone(map.entry(g.clone()).or_default()))
                .collect()
        };
        let mut guards = Vec::with_capacity(mutexes.len());
        for mutex in mutexes {
            guards.push(mutex.lock_owned().await);
        }
        guards
    }

    /// Applies `policy` for `claim_uid` on its physical GPUs and returns the container edits.
    ///
    /// `gpu_uuids`: the physical GPUs (`GPU-...`) the claim's devices live on, any order.
    /// `None` applies nothing but records the claim (so a later MPS/Exclusive claim on the
    /// same GPU is refused). Every setting made is read back; on a GPU no other claim
    /// holds, a stale compute mode or time slice (one the policy does not want, the default
    /// for `None`) is reset first. Idempotent: a claim prepared again gets the same edits
    /// (an MPS daemon that died is restarted). On a failure nothing of this call's policy
    /// stays applied (a stale setting reset to the default stays reset).
    ///
    /// Errors: [`SharingError::Conflict`] (rules in [`policy`]),
    /// [`SharingError::TimeSliceUnsupported`], [`SharingError::Control`] (NVML /
    /// nvidia-smi), [`SharingError::NotApplied`] (the GPU does not hold a value it took),
    /// [`SharingError::Mps`], [`SharingError::NoGpus`].
    pub async fn apply(
        &self,
        gpu_uuids: &[String],
        claim_uid: &str,
        policy: Option<Policy>,
    ) -> Result<ClaimEdits, SharingError> {
        let mut gpus = gpu_uuids.to_vec();
        gpus.sort();
        gpus.dedup();
        if gpus.is_empty() {
            return match policy {
                None => Ok(ClaimEdits::default()),
                Some(p) => Err(SharingError::NoGpus {
                    claim_uid: claim_uid.to_owned(),
                    policy: p.to_string(),
                }),
            };
        }
        if let Some(Policy::Mps(limits)) = &policy {
            // Validate before touching anything.
            mps::limit_commands(claim_uid, &gpus, limits)?;
            self.mps.dirs(claim_uid)?;
        }
        let _guards = self.lock_gpus(&gpus).await;
        self.share_conflict(&gpus, claim_uid, policy.as_ref())?;
        let actions = {
            let ledger = lock(&self.ledger);
            gpus.iter()
                .map(|gpu| {
                    ledger.check(gpu, claim_uid, policy.as_ref()).map(|a| {
                        let free =
                            !ledger.held_by_others(gpu, claim_uid) && !self.share_daemon_holds(gpu);
                        (gpu.clone(), a, free)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };

        let results = join_all(actions.iter().map(|(gpu, action, free)| {
            self.execute(claim_uid, gpu, action, policy.as_ref(), *free)
        }))
        .await;
        let mut first_error = None;
        let mut applied = Vec::new();
        for ((gpu, action, _), result) in actions.iter().zip(results) {
            match result {
                Ok(()) => {
                    if let Action::Apply(p) = action {
                        applied.push((gpu.clone(), p.clone()));
                    }
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            self.roll_back(claim_uid, &applied).await;
            return Err(err);
        }

        let edits = match &policy {
            Some(Policy::Mps(limits)) => {
                let fresh = !applied.is_empty();
                let started = if fresh {
                    self.mps.start(claim_uid, &gpus, limits).await
                } else {
                    self.mps
                        .adopt(claim_uid, &gpus, limits)
                        .await
                        .map(|(_, edits)| edits)
                };
                match started {
                    Ok(edits) => edits,
                    Err(err) => {
                        if fresh {
                            self.roll_back(claim_uid, &applied).await;
                        }
                        return Err(err.into());
                    }
                }
            }
            _ => ClaimEdits::default(),
        };

        let mut ledger = lock(&self.ledger);
        for gpu in &gpus {
            ledger.record(gpu, claim_uid, policy.clone());
        }
        Ok(edits)
    }

    /// Undoes policies this call applied; failures are logged (the original error wins).
    async fn roll_back(&self, claim_uid: &str, applied: &[(String, Policy)]) {
        let undo = applied
            .iter()
            .map(|(gpu, p)| async move { (gpu, self.restore_gpu(claim_uid, gpu, p).await) });
        for (gpu, result) in join_all(undo).await {
            if let Err(err) = result {
                tracing::error!(claim.uid = claim_uid, gpu.uuid = %gpu, error = %err, "rolling back a partial apply failed; the GPU keeps the policy until the claim is released");
            }
        }
    }

    /// Releases everything `claim_uid` holds: stops its MPS daemon and restores each GPU
    /// whose last policy holder it was. Idempotent; an unknown claim is a no-op (its MPS
    /// directories, if any, are still removed).
    ///
    /// On a failure the claim stays recorded on the GPUs that could not be restored, so a
    /// retry finishes the job. Errors: [`SharingError::Mps`], [`SharingError::Control`].
    pub async fn release(&self, claim_uid: &str) -> Result<(), SharingError> {
        let gpus: Vec<String> = lock(&self.ledger)
            .claim_gpus(claim_uid)
            .into_iter()
            .map(|(g, _)| g)
            .collect();
        let _guards = self.lock_gpus(&gpus).await;
        let held = lock(&self.ledger).claim_gpus(claim_uid);
        if held.iter().any(|(_, p)| matches!(p, Some(Policy::Mps(_)))) || held.is_empty() {
            self.mps.stop(claim_uid).await?;
        }
        let plan: Vec<(String, Action)> = {
            let ledger = lock(&self.ledger);
            held.iter()
                .map(|(gpu, _)| (gpu.clone(), ledger.plan_release(gpu, claim_uid)))
                .collect()
        };
        let results = join_all(
            plan.iter()
                .map(|(gpu, action)| self.execute(claim_uid, gpu, action, None, false)),
        )
        .await;
        let mut first_error = None;
        let mut ledger = lock(&self.ledger);
        for ((gpu, _), result) in plan.iter().zip(results) {
            match result {
                Ok(()) => {
                    ledger.release(gpu, claim_uid);
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Rebuilds the ledger from the checkpoint's (GPU UUID, claim UID, policy) entries,
    /// replacing what it held. Touches no hardware; call [`SharingManager::recover_mps`]
    /// next to bring MPS daemons back.
    pub fn restore(&self, entries: impl IntoIterator<Item = (String, String, Option<Policy>)>) {
        let mut ledger = Ledger::new();
        for (gpu, claim, policy) in entries {
            if let Err(conflict) = ledger.check(&gpu, &claim, policy.as_ref()) {
                // The hardware reflects what was applied; keep the record and report it.
                tracing::warn!(error = %conflict, "checkpoint holds conflicting sharing entries");
            }
            ledger.record(&gpu, &claim, policy);
        }
        *lock(&self.ledger) = ledger;
    }

    /// Every (GPU UUID, claim UID, policy) the ledger holds, sorted.
    pub fn entries(&self) -> Vec<(String, String, Option<Policy>)> {
        lock(&self.ledger).entries()
    }

    /// After [`SharingManager::restore`]: re-adopts (or restarts) the MPS daemon of every
    /// MPS claim in the ledger and stops daemons of claims the ledger does not know.
    pub async fn recover_mps(&self) -> MpsRecovery {
        let mut claims: BTreeMap<String, (Vec<String>, MpsLimits)> = BTreeMap::new();
        for (gpu, claim, policy) in self.entries() {
            if let Some(Policy::Mps(limits)) = policy {
                claims
                    .entry(claim)
                    .or_insert_with(|| (Vec::new(), limits))
                    .0
                    .push(gpu);
            }
        }
        let mut report = MpsRecovery::default();
        for (claim, (gpus, limits)) in &claims {
            let _guards = self.lock_gpus(gpus).await;
            match self.mps.adopt(claim, gpus, limits).await {
                Ok((AdoptOutcome::Adopted, _)) => report.adopted.push(claim.clone()),
                Ok((AdoptOutcome::Restarted, _)) => report.restarted.push(claim.clone()),
                Err(err) => report.failed.push((claim.clone(), err.into())),
            }
        }
        match self.mps.claim_dirs() {
            Ok(mut dirs) => {
                // Daemons are found by process too: one whose directories are gone still
                // runs and holds its GPUs.
                dirs.extend(self.mps.daemon_claims());
                dirs.sort();
                dirs.dedup();
                for claim in dirs.into_iter().filter(|c| !claims.contains_key(c)) {
                    match self.mps.stop(&claim).await {
                        Ok(()) => report.stopped_orphans.push(claim),
                        Err(err) => report.failed.push((claim, err.into())),
                    }
                }
            }
            Err(err) => report.failed.push((String::new(), err.into())),
        }
        report
    }
}

#[cfg(test)]
mod tests;
