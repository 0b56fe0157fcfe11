//! The shared MPS control daemon of a GPU whose shares are enforced: one daemon per GPU,
//! one MPS v3 namespace per share claim, started with the first share claim and stopped
//! after the last one goes.
//!
//! Owns `<plugin-dir>/mps-shares/<GPU UUID>/{pipe,log,shm}` (a root apart from the
//! per-claim daemons' `mps/`, so neither recovery takes the other's daemons for orphans),
//! the GPU's EXCLUSIVE_PROCESS compute mode while its daemon runs, the server `shares`
//! (`allowed_devices` = the GPU) and the namespaces, each named after its claim UID with
//! the claim's active thread percentage and pinned memory limit, read back after every
//! set. Which claims a daemon serves is read from what is true: the namespace sockets the
//! daemon keeps under its pipe directory (`<pipe>/shares/<claim UID>/control`, "MPS v3
//! Namespaces"), so a lost checkpoint, a plugin restart or a crash leaves the daemon and
//! every namespace of a live claim as they are; start-up recovery
//! ([`SharingManager::recover_compute_shares`]) compares them with the checkpoint's records.
//!
//! Must not: decide what a claim gets (`compute_share_plan`), write the checkpoint or CDI
//! files, or touch per-claim MPS daemons. Commands are those of [`super::mps::v3`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::compute_share_plan::{ComputeShareRecord, ComputeSupport};
use super::control::ComputeMode;
use super::mps::v3::{self, NamespaceLimit, SERVER};
use super::mps::{CONTAINER_PIPE_DIR, ClaimEdits, MountSpec, MpsError, MpsSupervisor};
use super::policy::{Conflict, MpsLimits, Policy};
use super::{SharingError, SharingManager, lock};

/// Settings of compute shares (from flags and the driver found at start).
#[derive(Debug, Clone)]
pub struct ComputeShareSettings {
    /// `<plugin-dir>/mps-shares`: parent of the per-GPU daemon directories.
    pub root_dir: PathBuf,
    /// NVIDIA driver version (`615.71.09`): MPS v3 or not.
    pub driver_version: String,
    /// Prepare shares whose compute limit cannot be enforced (`--allow-scheduling-only-shares`).
    pub allow_scheduling_only: bool,
}

/// The per-GPU share daemons of a node.
#[derive(Debug, Clone)]
pub struct ComputeShares {
    mps: MpsSupervisor,
    support: ComputeSupport,
    allow_scheduling_only: bool,
}

/// What [`SharingManager::recover_compute_shares`] did, per GPU UUID.
#[derive(Debug, Default)]
pub struct ComputeShareRecovery {
    /// GPUs whose daemon still answered and keeps its namespaces.
    pub adopted: Vec<String>,
    /// GPUs whose daemon was gone and was started afresh for live claims (their MPS
    /// clients lost their server).
    pub restarted: Vec<String>,
    /// GPUs whose daemon served no live claim and was stopped.
    pub stopped: Vec<String>,
    /// Namespaces of claims no longer prepared, deleted (`GPU/claim`).
    pub orphan_namespaces: Vec<String>,
    /// GPUs that could not be recovered, with the error.
    pub failed: Vec<(String, SharingError)>,
}

impl ComputeShares {
    /// Whether this node has MPS v3 (why not, if not).
    pub fn support(&self) -> &ComputeSupport {
        &self.support
    }

    /// Whether shares that cannot be enforced prepare anyway.
    pub fn allows_scheduling_only(&self) -> bool {
        self.allow_scheduling_only
    }

    /// Namespaces of the GPU's daemon found on disk (sockets under `<pipe>/shares/`).
    pub fn namespaces_on_disk(&self, gpu: &str) -> Vec<String> {
        let Ok(dirs) = self.mps.dirs(gpu) else {
            return Vec::new();
        };
        let mut out: Vec<String> = std::fs::read_dir(dirs.pipe.join(SERVER))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n != "default")
            .collect();
        out.sort();
        out
    }

    /// GPUs with a share daemon directory.
    pub fn gpus_on_disk(&self) -> Vec<String> {
        self.mps.claim_dirs().unwrap_or_default()
    }

    /// The container edits of claim namespace `namespace` on `gpu`'s daemon: its socket
    /// directory as `CUDA_MPS_PIPE_DIRECTORY`, so the client reaches only its namespace (and
    /// neither the daemon's control pipe nor another claim's namespace), and the daemon's
    /// `/dev/shm` with a private shm.
    pub fn edits(&self, gpu: &str, namespace: &str) -> Result<ClaimEdits, MpsError> {
        let dirs = self.mps.dirs(gpu)?;
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut mounts = vec![MountSpec {
            host_path: dirs.pipe.join(SERVER).join(namespace),
            container_path: CONTAINER_PIPE_DIR.to_owned(),
            options: opts(&["rw", "nosuid", "nodev", "bind"]),
        }];
        if self.mps.private_shm() {
            mounts.push(MountSpec {
                host_path: dirs.shm,
                container_path: "/dev/shm".to_owned(),
                options: opts(&["rw", "nosuid", "nodev", "bind"]),
            });
        }
        Ok(ClaimEdits {
            env: vec![(
                "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
                CONTAINER_PIPE_DIR.to_owned(),
            )],
            mounts,
        })
    }
}

fn label(claim_uid: &str, gpu: &str) -> String {
    format!("{claim_uid} (MPS daemon of GPU {gpu})")
}

impl SharingManager {
    /// Enforces the compute of GPU shares through one MPS daemon per GPU (see module docs).
    #[must_use]
    pub fn with_compute_shares(mut self, settings: ComputeShareSettings) -> Self {
        let args = v3::DAEMON_ARGS.iter().map(|s| (*s).to_owned()).collect();
        self.compute_shares = Some(ComputeShares {
            mps: self.mps.with_root(settings.root_dir, args),
            support: ComputeSupport::detect(&settings.driver_version),
            allow_scheduling_only: settings.allow_scheduling_only,
        });
        self
    }

    /// The share daemons, when compute shares are enforced.
    pub fn compute_shares(&self) -> Option<&ComputeShares> {
        self.compute_shares.as_ref()
    }

    /// Whether a share daemon serves namespaces on `gpu` (the GPU is not free).
    pub(super) fn share_daemon_holds(&self, gpu: &str) -> bool {
        self.compute_shares
            .as_ref()
            .is_some_and(|s| !s.namespaces_on_disk(gpu).is_empty())
    }

    /// A claim asking for a sharing policy on a GPU whose shares run under its share
    /// daemon is refused, naming a share claim there.
    pub(super) fn share_conflict(
        &self,
        gpus: &[String],
        claim_uid: &str,
        policy: Option<&Policy>,
    ) -> Result<(), Box<Conflict>> {
        let (Some(shares), Some(policy)) = (&self.compute_shares, policy) else {
            return Ok(());
        };
        for gpu in gpus {
            if let Some(holder) = shares
                .namespaces_on_disk(gpu)
                .into_iter()
                .find(|c| c != claim_uid)
            {
                return Err(Box::new(Conflict {
                    gpu_uuid: gpu.clone(),
                    claim_uid: claim_uid.to_owned(),
                    requested: policy.to_string(),
                    holder_claim: holder,
                    holder_policy: "GPU shares under the GPU's MPS daemon".to_owned(),
                    rule: "a GPU whose shares run under its MPS daemon takes no other sharing policy until its last share goes",
                }));
            }
        }
        Ok(())
    }

    /// Gives `claim_uid` its namespace on its GPU's share daemon (starting the daemon, in
    /// EXCLUSIVE_PROCESS, for the first share) with the record's limits, read back; returns
    /// the container edits. Idempotent. On a failure nothing of this call stays (a daemon
    /// it started is stopped and the compute mode restored).
    ///
    /// Errors: [`SharingError::Conflict`] (another claim holds the GPU with a sharing
    /// policy), [`SharingError::Mps`] (daemon, namespace or limit; names the claim and
    /// GPU), [`SharingError::Control`] / [`SharingError::NotApplied`] (compute mode).
    pub async fn apply_compute_share(
        &self,
        claim_uid: &str,
        record: &ComputeShareRecord,
    ) -> Result<ClaimEdits, SharingError> {
        let Some(shares) = &self.compute_shares else {
            return Ok(ClaimEdits::default());
        };
        let gpu = record.gpu_uuid.clone();
        let _guard = self.lock_gpus(std::slice::from_ref(&gpu)).await;
        let holder = lock(&self.ledger)
            .entries()
            .into_iter()
            .find(|(g, c, p)| *g == gpu && c != claim_uid && p.is_some());
        if let Some((_, holder, policy)) = holder {
            return Err(SharingError::Conflict(Box::new(Conflict {
                gpu_uuid: gpu,
                claim_uid: claim_uid.to_owned(),
                requested: format!("a GPU share ({}% compute)", record.active_thread_percentage),
                holder_claim: holder,
                holder_policy: policy.map(|p| p.to_string()).unwrap_or_default(),
                rule: "GPU shares run under the GPU's MPS daemon, which needs the GPU to itself",
            })));
        }
        let wrap = |e: MpsError| SharingError::Mps(e.for_claim(label(claim_uid, &gpu)));
        let fresh = !shares.mps.answers(&gpu, v3::PROBE).await;
        if fresh {
            self.start_share_daemon(claim_uid, &gpu).await?;
        }
        let joined = self
            .join(shares, claim_uid, record, true)
            .await
            .map_err(wrap);
        match joined {
            Ok(()) => shares.edits(&gpu, &record.namespace).map_err(wrap),
            Err(err) => {
                if let Err(undo) = shares
                    .mps
                    .command(&gpu, &v3::namespace_delete(&record.namespace))
                    .await
                {
                    tracing::debug!(error = %undo, "deleting the namespace of a failed share");
                }
                if fresh || shares.namespaces_on_disk(&gpu).is_empty() {
                    self.stop_share_daemon(claim_uid, &gpu).await;
                }
                Err(err)
            }
        }
    }

    async fn start_share_daemon(&self, claim_uid: &str, gpu: &str) -> Result<(), SharingError> {
        let Some(shares) = &self.compute_shares else {
            return Ok(());
        };
        self.set_compute_mode_checked(claim_uid, gpu, ComputeMode::ExclusiveProcess)
            .await?;
        let started = async {
            shares
                .mps
                .start(gpu, &[gpu.to_owned()], &MpsLimits::default())
                .await?;
            shares.mps.command(gpu, &v3::server_create(gpu)).await
        }
        .await;
        if let Err(err) = started {
            self.stop_share_daemon(claim_uid, gpu).await;
            return Err(SharingError::Mps(err.for_claim(label(claim_uid, gpu))));
        }
        tracing::info!(
            claim.uid = claim_uid,
            gpu.uuid = gpu,
            "started the GPU's MPS v3 share daemon"
        );
        Ok(())
    }

    /// Stops the GPU's share daemon and restores the default compute mode (best effort:
    /// failures are logged, the next release or start-up recovery retries).
    async fn stop_share_daemon(&self, claim_uid: &str, gpu: &str) {
        let Some(shares) = &self.compute_shares else {
            return;
        };
        if let Err(err) = shares.mps.stop(gpu).await {
            tracing::error!(gpu.uuid = gpu, error = %err, "stopping the GPU's MPS share daemon failed");
            return;
        }
        if let Err(err) = self.restore_gpu(claim_uid, gpu, &Policy::Exclusive).await {
            tracing::error!(gpu.uuid = gpu, error = %err, "restoring the default compute mode after the share daemon failed");
        }
    }

    /// Creates the claim's namespace if missing and brings its limits to the record's,
    /// reading each back (`set_always`: set even when it reads right).
    async fn join(
        &self,
        shares: &ComputeShares,
        claim_uid: &str,
        record: &ComputeShareRecord,
        set_always: bool,
    ) -> Result<(), MpsError> {
        let gpu = &record.gpu_uuid;
        let servers = shares.mps.command(gpu, "server list").await?;
        if !servers.lines().any(|l| l.trim() == SERVER) {
            shares.mps.command(gpu, &v3::server_create(gpu)).await?;
        }
        let existing =
            v3::parse_namespace_list(&shares.mps.command(gpu, &v3::namespace_list()).await?);
        if !existing.contains(&record.namespace) {
            shares
                .mps
                .command(gpu, &v3::namespace_create(&record.namespace))
                .await?;
        }
        let limits = v3::namespace_limits(
            &record.namespace,
            record.active_thread_percentage,
            record.pinned_memory_mib,
        );
        for limit in &limits {
            if !set_always && self.reads(shares, gpu, limit).await? == Some(true) {
                continue;
            }
            shares.mps.command(gpu, &limit.set).await?;
            let answer = shares.mps.command(gpu, &limit.query).await?;
            match limit.holds(&answer) {
                Some(true) => {}
                Some(false) => {
                    return Err(MpsError::LimitNotApplied {
                        claim_uid: claim_uid.to_owned(),
                        gpus: gpu.clone(),
                        setting: limit.key,
                        wanted: limit.value.clone(),
                        read: answer,
                    });
                }
                None => {
                    return Err(MpsError::UnparsableAnswer {
                        claim_uid: claim_uid.to_owned(),
                        command: limit.query.clone(),
                        output: answer,
                    });
                }
            }
        }
        Ok(())
    }

    async fn reads(
        &self,
        shares: &ComputeShares,
        gpu: &str,
        limit: &NamespaceLimit,
    ) -> Result<Option<bool>, MpsError> {
        Ok(limit.holds(&shares.mps.command(gpu, &limit.query).await?))
    }

    /// Deletes `claim_uid`'s namespaces (found on disk, whatever the checkpoint says) and
    /// stops each GPU's share daemon once its last namespace is gone, restoring the default
    /// compute mode. Idempotent; a claim without a namespace is a no-op.
    ///
    /// Errors: [`SharingError::Mps`] when a live daemon refuses the delete (kept for a retry).
    pub async fn release_compute_share(&self, claim_uid: &str) -> Result<(), SharingError> {
        let Some(shares) = &self.compute_shares else {
            return Ok(());
        };
        for gpu in shares.gpus_on_disk() {
            if !shares
                .namespaces_on_disk(&gpu)
                .iter()
                .any(|n| n == claim_uid)
            {
                continue;
            }
            let _guard = self.lock_gpus(std::slice::from_ref(&gpu)).await;
            if shares.mps.answers(&gpu, v3::PROBE).await {
                match shares
                    .mps
                    .command(&gpu, &v3::namespace_delete(claim_uid))
                    .await
                {
                    Ok(_) => {}
                    Err(MpsError::CommandFailed { output, .. }) if v3::says_missing(&output) => {}
                    Err(err) => {
                        return Err(SharingError::Mps(err.for_claim(label(claim_uid, &gpu))));
                    }
                }
            }
            if let Ok(dirs) = shares.mps.dirs(&gpu) {
                // A daemon that died left the socket directory; nothing serves it.
                let _ = std::fs::remove_dir_all(dirs.pipe.join(SERVER).join(claim_uid));
            }
            if shares.namespaces_on_disk(&gpu).is_empty() {
                self.stop_share_daemon(claim_uid, &gpu).await;
                tracing::info!(claim.uid = claim_uid, gpu.uuid = %gpu, "the GPU's last share went; its MPS daemon stopped");
            }
        }
        Ok(())
    }

    /// At start, after the ledger is restored: compares each GPU's share daemon with the
    /// checkpoint's enforced records (`claim UID`, record). A daemon that answers keeps
    /// running; namespaces of live claims are only read (a limit that reads wrong is set
    /// again), those of claims no longer prepared deleted; a daemon serving no live claim
    /// is stopped; a gone daemon of live claims is started afresh with their namespaces.
    pub async fn recover_compute_shares(
        &self,
        records: &[(String, ComputeShareRecord)],
    ) -> ComputeShareRecovery {
        let mut report = ComputeShareRecovery::default();
        let Some(shares) = &self.compute_shares else {
            return report;
        };
        let mut by_gpu: BTreeMap<String, Vec<&(String, ComputeShareRecord)>> = BTreeMap::new();
        for r in records.iter().filter(|(_, r)| r.scheduling_only.is_none()) {
            by_gpu.entry(r.1.gpu_uuid.clone()).or_default().push(r);
        }
        let gpus: BTreeSet<String> = by_gpu
            .keys()
            .cloned()
            .chain(shares.gpus_on_disk())
            .collect();
        for gpu in gpus {
            let live = by_gpu.remove(&gpu).unwrap_or_default();
            let first = live.first().map_or("", |(c, _)| c.as_str()).to_owned();
            let _guard = self.lock_gpus(std::slice::from_ref(&gpu)).await;
            let alive = shares.mps.answers(&gpu, v3::PROBE).await;
            if live.is_empty() {
                self.stop_share_daemon("", &gpu).await;
                report.stopped.push(gpu);
                continue;
            }
            if !alive && let Err(err) = self.start_share_daemon(&first, &gpu).await {
                report.failed.push((gpu, err));
                continue;
            }
            let known: BTreeSet<&str> = live.iter().map(|(_, r)| r.namespace.as_str()).collect();
            let mut failed = None;
            for (claim, record) in &live {
                if let Err(err) = self.join(shares, claim, record, !alive).await {
                    failed = Some(SharingError::Mps(err.for_claim(label(claim, &gpu))));
                }
            }
            for orphan in shares
                .namespaces_on_disk(&gpu)
                .into_iter()
                .filter(|n| !known.contains(n.as_str()))
            {
                match shares
                    .mps
                    .command(&gpu, &v3::namespace_delete(&orphan))
                    .await
                {
                    Ok(_) => report.orphan_namespaces.push(format!("{gpu}/{orphan}")),
                    Err(err) => {
                        tracing::warn!(gpu.uuid = %gpu, namespace = %orphan, error = %err, "deleting the namespace of a claim no longer prepared failed")
                    }
                }
            }
            match (failed, alive) {
                (Some(err), _) => report.failed.push((gpu, err)),
                (None, true) => report.adopted.push(gpu),
                (None, false) => report.restarted.push(gpu),
            }
        }
        report
    }
}

#[cfg(test)]
#[path = "share_daemon_tests.rs"]
mod tests;
