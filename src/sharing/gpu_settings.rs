//! A physical GPU's compute mode and time slice: set, read back, and reset when stale.
//!
//! Owns: executing one ledger [`Action`] on one GPU through the [`ComputeControl`] and
//! [`TimeSliceControl`] seams. Every value set is read back (`nvmlDeviceGetComputeMode`,
//! `nvidia-smi compute-policy -l`) and a GPU that does not hold it fails the claim with
//! [`SharingError::NotApplied`]: NVML and nvidia-smi can report success for a setting that
//! did not take (a second tool racing us, a vGPU or MIG configuration, a driver that takes
//! `--set-timeslice` without effect). On a GPU no other claim holds, a compute mode or time
//! slice the claim's policy does not want is stale (left by a crash, a lost checkpoint or a
//! manual change) and is reset to what the policy wants, the default otherwise.
//!
//! Must not: decide admission (the ledger does), touch a GPU another claim holds beyond
//! what the ledger's action says, or start MPS daemons.

use super::control::{ComputeMode, TimeSlice, TimeSliceState};
use super::policy::{Action, Policy};
use super::{SharingError, SharingManager, control_error};

/// What `policy` wants the GPU to hold: (compute mode, time slice).
fn wanted(policy: Option<&Policy>) -> (ComputeMode, TimeSlice) {
    match policy {
        None => (ComputeMode::Default, TimeSlice::Default),
        Some(Policy::TimeSlicing { interval }) => (ComputeMode::Default, *interval),
        Some(Policy::Mps(_) | Policy::Exclusive) => {
            (ComputeMode::ExclusiveProcess, TimeSlice::Default)
        }
    }
}

/// A failed step, and whether the GPU may have changed before it failed (then the
/// policy is undone).
struct Failed {
    err: SharingError,
    maybe_changed: bool,
}

impl Failed {
    fn before(err: SharingError) -> Self {
        Self {
            err,
            maybe_changed: false,
        }
    }
    fn after(err: SharingError) -> Self {
        Self {
            err,
            maybe_changed: true,
        }
    }
}

const COMPUTE_MODE_HINT: &str = "another tool may be changing it, or the GPU refuses the mode (vGPU, MIG mode); check `nvidia-smi -q -d COMPUTE -i <GPU>`; the kubelet retries the prepare";
const TIME_SLICE_HINT: &str = "the driver took the command without effect; check `nvidia-smi compute-policy -i <GPU> -l` and the driver version (or remove the TimeSlicing config); the kubelet retries the prepare";

impl SharingManager {
    /// Executes `action` for `claim_uid` on `gpu`; `free`: no other claim holds the GPU,
    /// so stale settings are reset to what the claim's `policy` wants. On an error after a
    /// change, the change is undone (best effort) before returning.
    pub(super) async fn execute(
        &self,
        claim_uid: &str,
        gpu: &str,
        action: &Action,
        policy: Option<&Policy>,
        free: bool,
    ) -> Result<(), SharingError> {
        match action {
            Action::Nothing if free => self
                .reset_stale(claim_uid, gpu, policy)
                .await
                .map_err(|f| f.err),
            Action::Nothing => Ok(()),
            Action::Restore(p) => self.restore_gpu(claim_uid, gpu, p).await,
            Action::Apply(p) => {
                let result = match self.apply_policy(claim_uid, gpu, p).await {
                    Ok(()) if free => self
                        .reset_stale(claim_uid, gpu, Some(p))
                        .await
                        .map_err(|f| Failed::after(f.err)),
                    other => other,
                };
                match result {
                    Ok(()) => Ok(()),
                    Err(failed) => {
                        if failed.maybe_changed {
                            self.undo(claim_uid, gpu, p).await;
                        }
                        Err(failed.err)
                    }
                }
            }
        }
    }

    /// Sets what `policy` changes on the GPU and reads it back.
    async fn apply_policy(
        &self,
        claim_uid: &str,
        gpu: &str,
        policy: &Policy,
    ) -> Result<(), Failed> {
        let control_error = control_error(claim_uid, gpu);
        match policy {
            Policy::TimeSlicing { interval } => {
                match self
                    .time_slice
                    .time_slice(gpu)
                    .await
                    .map_err(|e| Failed::before(control_error("reading the time slice", e)))?
                {
                    TimeSliceState::Unsupported { detail } => {
                        Err(Failed::before(SharingError::TimeSliceUnsupported {
                            claim_uid: claim_uid.to_owned(),
                            gpu_uuid: gpu.to_owned(),
                            detail,
                        }))
                    }
                    TimeSliceState::Supported(current) if current == *interval => Ok(()),
                    TimeSliceState::Supported(_) => {
                        self.set_time_slice_verified(claim_uid, gpu, *interval)
                            .await
                    }
                }
            }
            Policy::Mps(_) | Policy::Exclusive => {
                self.set_compute_mode_verified(claim_uid, gpu, ComputeMode::ExclusiveProcess)
                    .await
            }
        }
    }

    /// On a GPU no other claim holds: brings the compute mode and the time slice to what
    /// `policy` wants (the default for what it does not set). A GPU that cannot set a time
    /// slice has none to reset.
    async fn reset_stale(
        &self,
        claim_uid: &str,
        gpu: &str,
        policy: Option<&Policy>,
    ) -> Result<(), Failed> {
        let control_error = control_error(claim_uid, gpu);
        let (mode, slice) = wanted(policy);
        let current = self
            .compute
            .compute_mode(gpu)
            .map_err(|e| Failed::before(control_error("reading the compute mode", e)))?;
        if current != mode {
            tracing::info!(claim.uid = claim_uid, gpu.uuid = gpu, stale = ?current, wanted = ?mode, "resetting a stale compute mode no claim holds");
            self.set_compute_mode_verified(claim_uid, gpu, mode).await?;
        }
        if !matches!(policy, Some(Policy::TimeSlicing { .. })) {
            let state = self
                .time_slice
                .time_slice(gpu)
                .await
                .map_err(|e| Failed::before(control_error("reading the time slice", e)))?;
            if let TimeSliceState::Supported(current) = state
                && current != slice
            {
                tracing::info!(claim.uid = claim_uid, gpu.uuid = gpu, stale = ?current, wanted = ?slice, "resetting a stale time slice no claim holds");
                self.set_time_slice_verified(claim_uid, gpu, slice).await?;
            }
        }
        Ok(())
    }

    /// Puts one GPU back to the default for `policy` and reads it back (the MPS daemon is
    /// stopped by the caller).
    pub(super) async fn restore_gpu(
        &self,
        claim_uid: &str,
        gpu: &str,
        policy: &Policy,
    ) -> Result<(), SharingError> {
        match policy {
            Policy::TimeSlicing { .. } => {
                self.set_time_slice_verified(claim_uid, gpu, TimeSlice::Default)
                    .await
            }
            Policy::Mps(_) | Policy::Exclusive => {
                self.set_compute_mode_verified(claim_uid, gpu, ComputeMode::Default)
                    .await
            }
        }
        .map_err(|f| f.err)
    }

    /// Best-effort [`SharingManager::restore_gpu`] after a failed apply; the original
    /// error wins, this one is logged.
    async fn undo(&self, claim_uid: &str, gpu: &str, policy: &Policy) {
        if let Err(err) = self.restore_gpu(claim_uid, gpu, policy).await {
            tracing::error!(claim.uid = claim_uid, gpu.uuid = gpu, error = %err, "undoing a failed apply failed; the GPU keeps the setting until the claim is released");
        }
    }

    /// Sets `mode` on `gpu` and reads it back (the shared share daemon's EXCLUSIVE_PROCESS).
    pub(super) async fn set_compute_mode_checked(
        &self,
        claim_uid: &str,
        gpu: &str,
        mode: ComputeMode,
    ) -> Result<(), SharingError> {
        self.set_compute_mode_verified(claim_uid, gpu, mode)
            .await
            .map_err(|f| f.err)
    }

    async fn set_compute_mode_verified(
        &self,
        claim_uid: &str,
        gpu: &str,
        mode: ComputeMode,
    ) -> Result<(), Failed> {
        let control_error = control_error(claim_uid, gpu);
        self.compute.set_compute_mode(gpu, mode).map_err(|e| {
            Failed::before(control_error(&format!("setting compute mode {mode:?}"), e))
        })?;
        let read = self
            .compute
            .compute_mode(gpu)
            .map_err(|e| Failed::after(control_error("reading the compute mode back", e)))?;
        if read == mode {
            return Ok(());
        }
        Err(Failed::after(SharingError::NotApplied {
            claim_uid: claim_uid.to_owned(),
            gpu_uuid: gpu.to_owned(),
            setting: "compute mode",
            call: "nvmlDeviceSetComputeMode",
            wanted: format!("{mode:?}"),
            read: format!("{read:?}"),
            hint: COMPUTE_MODE_HINT,
        }))
    }

    async fn set_time_slice_verified(
        &self,
        claim_uid: &str,
        gpu: &str,
        interval: TimeSlice,
    ) -> Result<(), Failed> {
        let control_error = control_error(claim_uid, gpu);
        self.time_slice
            .set_time_slice(gpu, interval)
            .await
            .map_err(|e| {
                Failed::before(control_error(
                    &format!("setting time slice {interval:?}"),
                    e,
                ))
            })?;
        let read = match self
            .time_slice
            .time_slice(gpu)
            .await
            .map_err(|e| Failed::after(control_error("reading the time slice back", e)))?
        {
            TimeSliceState::Supported(read) if read == interval => return Ok(()),
            TimeSliceState::Supported(read) => format!("{read:?}"),
            TimeSliceState::Unsupported { detail } => format!("not supported ({detail})"),
        };
        Err(Failed::after(SharingError::NotApplied {
            claim_uid: claim_uid.to_owned(),
            gpu_uuid: gpu.to_owned(),
            setting: "time slice",
            call: "nvidia-smi compute-policy --set-timeslice",
            wanted: format!("{interval:?}"),
            read,
            hint: TIME_SLICE_HINT,
        }))
    }
}
