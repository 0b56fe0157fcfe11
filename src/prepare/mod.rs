//! The Prepare/Unprepare state machine: claim -> devices + config -> sharing actions ->
//! CDI spec -> checkpoint. The only writer of CDI spec files and the checkpoint.
//!
//! Per claim: `PrepareStarted` is made durable before any action on a GPU (compute
//! policy, MPS daemon), then the CDI spec is written, then `PrepareCompleted`. A claim
//! without a sharing policy has no GPU side effect, so it skips `PrepareStarted`: a crash
//! leaves at most an orphaned CDI spec, which [`Preparer::recover`] removes. Calls for one
//! claim are serialised; different claims run in parallel (GPU-level ordering is the
//! sharing manager's), and concurrent checkpoint updates share one fsync
//! ([`CheckpointWriter`]). Follows the kubelet's contract (KUBELET-PROTOCOL.md): both
//! calls are idempotent, every claim gets its own answer, an unknown claim unprepares
//! successfully.

pub mod allocation;
mod compute_share_steps;
#[cfg(test)]
mod limits_tests;
mod memory_limit_steps;
pub mod mig_control;
pub mod mig_dynamic;
pub mod mig_full;
pub mod mig_select;
mod mig_steps;
mod node_driver;
pub mod plan;
pub mod rebuild;
mod recovery;
pub use node_driver::MAX_CLAIMS_IN_FLIGHT;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use tokio::sync::watch;
use tracing::warn;

pub use recovery::RecoveryReport;

use crate::cdi::{self, CdiDeviceInput, ContainerEdits, DeviceNode, Mount};
use crate::checkpoint::{
    CheckpointError, CheckpointWriter, ClaimEntry, ClaimState, PreparedDeviceRecord,
};
use crate::claims::{ClaimError, ClaimLookup};
use crate::devnodes::{self, DevNodeError, ProcDevices};
use crate::inventory::Inventory;
use crate::plugin::{ClaimRef, PreparedDevice};
use crate::sharing::compute_share_plan::ComputeDecision;
use crate::sharing::memory_limit::{AppliedLimit, MemoryLimitRecord, MemoryLimiter};
use crate::sharing::memory_limit_plan::{Decision, DeviceInput};
use crate::sharing::{ClaimEdits, Policy, SharingError, SharingManager};
use mig_control::MigControl;
use mig_steps::{full_records, instance_records, name_step};
use plan::{DevicePlan, PlanError, plan_claim, policy_groups};

/// Why one claim could not be prepared or unprepared. The message says what to do.
#[derive(Debug, Error)]
pub enum PrepareError {
    /// The ResourceClaim could not be read or is not usable (replaced, not allocated).
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The claim does not fit this node (devices, configs).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Applying or releasing the sharing policy failed (NVML, nvidia-smi, MPS). Boxed:
    /// the variant is large and rare.
    #[error(transparent)]
    Sharing(#[from] Box<SharingError>),
    /// Device node facts could not be read from the host.
    #[error(transparent)]
    DeviceNodes(#[from] DevNodeError),
    /// The CDI spec could not be written or removed.
    #[error("CDI spec of the claim: {0}; check free space and permissions of the CDI directory")]
    Cdi(#[from] cdi::CdiWriteError),
    /// The checkpoint could not be written.
    #[error("checkpoint: {0}; check free space and permissions of the plugin directory")]
    Checkpoint(#[from] CheckpointError),
    /// A dynamic MIG instance could not be created or destroyed (names step and GPU).
    #[error(transparent)]
    DynamicMig(#[from] mig_dynamic::DynamicMigError),
}

/// Settings of a [`Preparer`].
#[derive(Debug, Clone)]
pub struct PreparerConfig {
    /// This plugin's driver name.
    pub driver_name: String,
    /// This node's name (= pool name).
    pub node_name: String,
    /// Directory of CDI specs (`/var/run/cdi`).
    pub cdi_root: PathBuf,
    /// Root of the host's `/proc` (device numbers, MIG capabilities).
    pub proc_root: PathBuf,
}

/// Prepares and unprepares claims; implements [`NodeDriver`] for the gRPC edge.
pub struct Preparer<L> {
    config: PreparerConfig,
    claims: L,
    inventory: watch::Receiver<Inventory>,
    proc: ProcDevices,
    sharing: SharingManager,
    checkpoint: CheckpointWriter,
    claim_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    memory_limits: Option<Arc<MemoryLimiter>>,
    mig: Option<Arc<dyn MigControl>>,
    foreign_report: Option<mig_dynamic::ForeignReport>,
}

impl<L: ClaimLookup> Preparer<L> {
    /// A preparer over these parts. Call [`Preparer::recover`] once before serving.
    pub fn new(
        config: PreparerConfig,
        claims: L,
        inventory: watch::Receiver<Inventory>,
        sharing: SharingManager,
        checkpoint: CheckpointWriter,
    ) -> Self {
        Self {
            proc: ProcDevices::new(&config.proc_root),
            config,
            claims,
            inventory,
            sharing,
            checkpoint,
            claim_locks: Mutex::new(HashMap::new()),
            memory_limits: None,
            mig: None,
            foreign_report: None,
        }
    }

    /// Lets this preparer create and destroy dynamic MIG instances through `control`.
    pub fn with_mig_control(mut self, control: Arc<dyn MigControl>) -> Self {
        self.mig = Some(control);
        self
    }

    /// Reports GPU instances the driver did not create found at an allocated placement to
    /// `report` (the plugin marks them in the published inventory).
    pub fn with_foreign_report(mut self, report: mig_dynamic::ForeignReport) -> Self {
        self.foreign_report = Some(report);
        self
    }

    /// Enforces the memory of GPU shares per pod with `limiter` (without one, shares
    /// prepare with no limit).
    pub fn with_memory_limits(mut self, limiter: Arc<MemoryLimiter>) -> Self {
        self.memory_limits = Some(limiter);
        self
    }

    /// The checkpoint writer (read snapshots for status and tests).
    pub fn checkpoint(&self) -> &CheckpointWriter {
        &self.checkpoint
    }

    /// Runs `f` with the claim's lock held, so calls for one claim never overlap.
    async fn with_claim_lock<T>(&self, uid: &str, f: impl Future<Output = T>) -> T {
        let mutex = {
            let mut locks = self
                .claim_locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(uid.to_owned()).or_default())
        };
        let result = {
            let _guard = mutex.lock().await;
            f.await
        };
        let mut locks = self
            .claim_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Two references left (the map's and ours): nobody else waits, drop the entry.
        if Arc::strong_count(&mutex) == 2 {
            locks.remove(uid);
        }
        result
    }

    /// Prepares one claim; idempotent (a completed claim is answered from the checkpoint).
    pub async fn prepare_claim(
        &self,
        claim: &ClaimRef,
    ) -> Result<Vec<PreparedDevice>, PrepareError> {
        self.with_claim_lock(&claim.uid, async {
            if let Some(entry) = self.checkpoint.snapshot().claims.get(&claim.uid) {
                if entry.state == ClaimState::PrepareCompleted {
                    return Ok(answer(entry));
                }
                // A prepare that stopped half-way (error not rolled back, or a crash):
                // undo it and start over.
                self.release(&claim.uid).await?;
            }
            let object = self.claims.get(claim).await?;
            crate::metrics::events::record_claim_pods(&claim.uid, &object);
            // Planning is synchronous: the borrow of the inventory ends before any await.
            let mut plans = plan_claim(
                &object,
                &self.inventory.borrow(),
                &self.config.driver_name,
                &self.config.node_name,
            )?;
            let decision = self.memory_decision(&object, &plans)?;
            let compute = self.compute_decision(&object, &plans)?;
            let groups = policy_groups(&plans)?;
            let limits = self.locate_limits(&claim.uid, &decision)?;
            let limit_record = MemoryLimitRecord::for_decision(&decision, limits.clone());
            if let Some(reason) = limit_record.as_ref().and_then(|r| r.scheduling_only.as_ref()) {
                warn!(claim.uid = %claim.uid, reason = %reason, "GPU memory share prepared without a limit (scheduling-only shares allowed)");
            }
            let with_limits = |(uid, mut entry): (String, ClaimEntry)| {
                if let Some(record) = &limit_record {
                    entry.extra.insert(
                        crate::sharing::memory_limit::CHECKPOINT_KEY.to_owned(),
                        record.to_value(),
                    );
                }
                compute_share_steps::record_into(&compute, &mut entry);
                (uid, entry)
            };
            let mut instances = instance_records(&plans);
            if !instances.is_empty() {
                self.check_placements_free(&plans, &instances).await?;
            }
            let full = full_records(&plans);
            let has_side_effects = groups.iter().any(|g| g.policy.is_some())
                || !limits.is_empty()
                || !instances.is_empty()
                || matches!(compute, ComputeDecision::Enforce(_))
                || !full.is_empty();
            if has_side_effects {
                let mut started =
                    with_limits(entry(claim, ClaimState::PrepareStarted, records(claim, &plans)));
                mig_dynamic::set_records(&mut started.1, &instances);
                mig_full::set_records(&mut started.1, &full);
                self.checkpoint
                    .update(move |cp| {
                        cp.claims.insert(started.0, started.1);
                    })
                    .await?;
            }
            let mut created = Vec::new();
            let done = async {
                self.create_instances(&mut plans, &mut instances, &mut created)
                    .await?;
                self.leave_mig_modes(&plans, &full).await?;
                let after_create = |err: PrepareError| name_step(err, &instances);
                self.apply_limits(&claim.uid, limits)
                    .await
                    .map_err(after_create)?;
                self.apply(claim, &plans, groups, &compute)
                    .await
                    .map_err(after_create)?;
                let (uid, mut completed) = with_limits(entry(
                    claim,
                    ClaimState::PrepareCompleted,
                    records(claim, &plans),
                ));
                mig_dynamic::set_records(&mut completed, &instances);
                mig_full::set_records(&mut completed, &full);
                let answer = answer(&completed);
                self.checkpoint
                    .update(move |cp| {
                        cp.claims.insert(uid, completed);
                    })
                    .await
                    .map_err(|e| after_create(e.into()))?;
                Ok::<_, PrepareError>(answer)
            };
            match done.await {
                Ok(answer) => Ok(answer),
                Err(err) => {
                    // Nothing of a failed prepare stays: MIG mode of a full dynamic GPU,
                    // MIG instances it created (newest first), policy, MPS daemon, spec,
                    // entry.
                    if !full.is_empty()
                        && let Err(undo) = self.return_to_mig_modes(full.clone()).await
                    {
                        warn!(claim.uid = %claim.uid, error = %error_chain(&undo), "switching MIG mode back on after a failed prepare failed; retried at the next prepare or unprepare");
                    }
                    let mut left = Vec::new();
                    if !created.is_empty()
                        && let Some(control) = self.mig.clone()
                    {
                        let undo = tokio::task::spawn_blocking(move || {
                            mig_dynamic::rollback(control.as_ref(), &mut created)
                        })
                        .await;
                        left = undo.unwrap_or_default();
                    }
                    if !left.is_empty() {
                        // Keep the entry, naming what is left with its ids, so the next
                        // prepare or unprepare of this claim destroys it.
                        warn!(claim.uid = %claim.uid, left = left.len(), "MIG instances of a failed prepare could not be destroyed; retried at the next prepare or unprepare");
                        let uid = claim.uid.clone();
                        let kept = self
                            .checkpoint
                            .update(move |cp| {
                                if let Some(e) = cp.claims.get_mut(&uid) {
                                    mig_dynamic::set_records(e, &left);
                                }
                            })
                            .await;
                        if let Err(e) = kept {
                            warn!(claim.uid = %claim.uid, error = %e, "recording MIG instances left by a failed prepare failed");
                        }
                        return Err(err);
                    }
                    if let Err(undo) = self.release(&claim.uid).await {
                        warn!(claim.uid = %claim.uid, error = %undo, "rolling back a failed prepare failed; retried at the next prepare or unprepare");
                    }
                    Err(err)
                }
            }
        })
        .await
    }

    /// Sharing actions, then the CDI spec.
    async fn apply(
        &self,
        claim: &ClaimRef,
        plans: &[DevicePlan],
        groups: Vec<plan::PolicyGroup>,
        compute: &ComputeDecision,
    ) -> Result<(), PrepareError> {
        let mut edits = ClaimEdits::default();
        for group in groups {
            let more = self
                .sharing
                .apply(&group.gpu_uuids, &claim.uid, group.policy)
                .await
                .map_err(Box::new)?;
            edits.env.extend(more.env);
            edits.mounts.extend(more.mounts);
        }
        let more = self.apply_compute_share(claim, compute).await?;
        edits.env.extend(more.env);
        edits.mounts.extend(more.mounts);
        let spec = self.cdi_spec(&claim.uid, plans, edits)?;
        let (root, uid) = (self.config.cdi_root.clone(), claim.uid.clone());
        blocking(move || cdi::write_spec(&root, &uid, &spec)).await?;
        Ok(())
    }

    fn cdi_spec(
        &self,
        claim_uid: &str,
        plans: &[DevicePlan],
        edits: ClaimEdits,
    ) -> Result<cdi::Spec, PrepareError> {
        let devices = plans
            .iter()
            .map(|p| {
                let mut nodes = vec![ProcDevices::gpu_node(p.gpu_minor)];
                if let Some(mig) = &p.mig {
                    nodes.extend(self.proc.mig_nodes(p.gpu_minor, mig.gi_id, mig.ci_id)?);
                }
                Ok(CdiDeviceInput {
                    device_name: p.allocated.device.clone(),
                    uuid: p.visible_uuid().to_owned(),
                    device_nodes: nodes.into_iter().map(cdi_node).collect(),
                    ..CdiDeviceInput::default()
                })
            })
            .collect::<Result<Vec<_>, DevNodeError>>()?;
        let common = ContainerEdits {
            env: edits.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            device_nodes: self
                .proc
                .control_nodes()?
                .into_iter()
                .map(cdi_node)
                .collect(),
            mounts: edits
                .mounts
                .into_iter()
                .map(|m| Mount {
                    host_path: m.host_path.display().to_string(),
                    container_path: m.container_path,
                    mount_type: Some("bind".into()),
                    options: m.options,
                })
                .collect(),
            ..ContainerEdits::default()
        };
        Ok(cdi::claim_spec_with_common(claim_uid, &devices, common))
    }

    /// Unprepares one claim; idempotent (an unknown claim succeeds). A prepared claim
    /// still reserved for a live pod on this node is refused and kept as it is
    /// ([`ClaimError::InUse`]): a kubelet bug must not pull devices from under a pod.
    pub async fn unprepare_claim(&self, claim: &ClaimRef) -> Result<(), PrepareError> {
        self.with_claim_lock(&claim.uid, async {
            if self.checkpoint.snapshot().claims.contains_key(&claim.uid)
                && let Some(pod) = self.claims.in_use_by(claim).await
            {
                return Err(ClaimError::in_use(claim, pod).into());
            }
            self.release(&claim.uid).await
        })
        .await
    }

    /// Undoes everything of a claim: sharing policy and MPS daemon, CDI spec, checkpoint
    /// entry — in that order, so a failure leaves the entry for a retry.
    async fn release(&self, uid: &str) -> Result<(), PrepareError> {
        self.release_with(uid, false).await
    }

    /// [`Preparer::release`]; `by_placement` also destroys dynamic MIG instances recorded
    /// without ids (a prepare cut short by a crash: start-up recovery only).
    async fn release_with(&self, uid: &str, by_placement: bool) -> Result<(), PrepareError> {
        self.clear_limits(uid).await?;
        self.release_compute_share(uid).await?;
        self.sharing.release(uid).await.map_err(Box::new)?;
        let (root, owned_uid) = (self.config.cdi_root.clone(), uid.to_owned());
        blocking(move || cdi::remove_spec(&root, &owned_uid)).await?;
        let instances = self
            .checkpoint
            .snapshot()
            .claims
            .get(uid)
            .map(mig_dynamic::records_of)
            .unwrap_or_default();
        if !instances.is_empty() {
            self.destroy_instances(instances, by_placement).await?;
        }
        let full = self
            .checkpoint
            .snapshot()
            .claims
            .get(uid)
            .map(mig_full::records_of)
            .unwrap_or_default();
        if !full.is_empty() {
            self.return_to_mig_modes(full).await?;
        }
        if self.checkpoint.snapshot().claims.contains_key(uid) {
            let uid = uid.to_owned();
            self.checkpoint
                .update(move |cp| {
                    cp.claims.remove(&uid);
                })
                .await?;
        }
        Ok(())
    }
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// Runs file I/O that fsyncs on the blocking pool, so concurrent claims do not queue
/// behind one another's fsync on the runtime's few worker threads.
async fn blocking<T: Send + 'static>(
    io: impl FnOnce() -> Result<T, cdi::CdiWriteError> + Send + 'static,
) -> Result<T, cdi::CdiWriteError> {
    match tokio::task::spawn_blocking(io).await {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

fn cdi_node(node: devnodes::DeviceNode) -> DeviceNode {
    DeviceNode::char(node.path, node.major, node.minor)
}

fn records(claim: &ClaimRef, plans: &[DevicePlan]) -> Vec<PreparedDeviceRecord> {
    plans
        .iter()
        .map(|p| PreparedDeviceRecord {
            pool: p.allocated.pool.clone(),
            device: p.allocated.device.clone(),
            request_names: vec![p.allocated.base_request().to_owned()],
            gpu_uuid: p.gpu_uuid.clone(),
            mig_uuid: p.mig.as_ref().map(|m| m.uuid.clone()),
            cdi_device_ids: vec![cdi::cdi_device_id(&claim.uid, &p.allocated.device)],
            sharing: p.policy.as_ref().and_then(|p| serde_json::to_value(p).ok()),
            share_id: p.allocated.share_id.clone(),
        })
        .collect()
}

fn entry(
    claim: &ClaimRef,
    state: ClaimState,
    devices: Vec<PreparedDeviceRecord>,
) -> (String, ClaimEntry) {
    (
        claim.uid.clone(),
        ClaimEntry {
            state,
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices,
            extra: BTreeMap::new(),
        },
    )
}

fn answer(entry: &ClaimEntry) -> Vec<PreparedDevice> {
    entry
        .devices
        .iter()
        .map(|d| PreparedDevice {
            request_names: d.request_names.clone(),
            pool_name: d.pool.clone(),
            device_name: d.device.clone(),
            cdi_device_ids: d.cdi_device_ids.clone(),
            share_id: d.share_id.clone(),
        })
        .collect()
}

/// The policy a checkpoint record holds (`None` when absent or unreadable).
fn record_policy(record: &PreparedDeviceRecord) -> Option<Policy> {
    record
        .sharing
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The error chain of `err` as one line (`outer: cause: root cause`), for the kubelet.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
