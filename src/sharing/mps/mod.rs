//! MPS control daemons, one per claim, started and supervised by the plugin itself,
//! detached from the plugin's process group, session or cgroup by a [`MpsLauncher`] so
//! that a plugin restart or upgrade leaves them and their clients running.
//!
//! Owns: the per-claim directories `<plugin-dir>/mps/<claimUID>/{pipe,log,shm}`, starting
//! `nvidia-cuda-mps-control -d` for a claim's GPU set, waiting for its control pipe,
//! applying the claim's limits through the control daemon's command interface and reading
//! them back ([`limits`], [`client`]), stopping it with `quit` and, when it ignores `quit`,
//! by signal after a bound ([`processes`]), re-adopting it after a plugin restart, and the
//! container edits (env and mounts, as plain data) a claim's containers need to reach it.
//!
//! Must not: change compute modes (the manager does that through `ComputeControl` before
//! [`MpsSupervisor::start`]), decide whether MPS is allowed (`policy`), or write CDI files.
//!
//! Follows NVIDIA's MPS documentation: the daemon is configured by the environment
//! (`CUDA_VISIBLE_DEVICES`, `CUDA_MPS_PIPE_DIRECTORY`, `CUDA_MPS_LOG_DIRECTORY`), creates
//! `<pipe dir>/control` when it accepts commands, and the same binary run without `-d`
//! reads commands on stdin (`set_default_active_thread_percentage <pct>`,
//! `set_default_device_pinned_mem_limit <dev> <n>M`, `get_default_active_thread_percentage`,
//! `quit`). Unlike NVIDIA's Go driver there is no Kubernetes Deployment per claim and no
//! 10 s readiness poll: readiness is the control pipe appearing, checked with a short
//! back-off under a deadline.
//!
//! Shared memory: MPS clients and the server exchange data through `/dev/shm`, so both
//! must see the same directory. With [`PrivateShm`] set, the daemon starts in its own mount
//! namespace (`unshare --mount`) with the claim's `shm` dir bound over `/dev/shm`, and the
//! claim's containers get the same dir mounted at `/dev/shm`. Without it (tests, or a
//! plugin sharing the host IPC namespace) no shm mount is emitted.

mod client;
mod edits;
mod error;
pub mod limits;
pub mod processes;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
pub mod v3;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

pub use super::launcher::MpsLauncher;
use super::policy::MpsLimits;
pub use edits::{CONTAINER_LOG_DIR, CONTAINER_PIPE_DIR, CONTROL_PIPE, ClaimEdits, MountSpec};
pub use error::MpsError;
pub use limits::{LimitSetting, limit_commands, limit_settings};
use processes::{ProcScanner, Signal};

/// How to give the daemon the claim's `shm` dir as `/dev/shm` (needs CAP_SYS_ADMIN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateShm {
    /// The `unshare` binary (util-linux).
    pub unshare_path: PathBuf,
    /// A POSIX shell, e.g. `/bin/sh`.
    pub shell_path: PathBuf,
}

/// Settings of the MPS supervisor (from flags).
#[derive(Debug, Clone)]
pub struct MpsSettings {
    /// The `nvidia-cuda-mps-control` binary.
    pub control_path: PathBuf,
    /// `<plugin-dir>/mps`: parent of the per-claim directories.
    pub root_dir: PathBuf,
    /// How long to wait for the control pipe after starting a daemon.
    pub ready_timeout: Duration,
    /// How long one control command (or the `-d` launcher) may take; also how long a
    /// daemon gets to exit after `quit`, and after SIGTERM, before the next step.
    pub command_timeout: Duration,
    /// Bind the claim's shm dir over the daemon's `/dev/shm` (see module docs).
    pub private_shm: Option<PrivateShm>,
}

/// What [`MpsSupervisor::adopt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptOutcome {
    /// The daemon still answered; limits were re-applied.
    Adopted,
    /// No live daemon; leftovers were removed and a fresh one started.
    Restarted,
}

/// The per-claim directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimDirs {
    /// `<root>/<claimUID>`.
    pub root: PathBuf,
    /// `CUDA_MPS_PIPE_DIRECTORY` of the daemon.
    pub pipe: PathBuf,
    /// `CUDA_MPS_LOG_DIRECTORY` of the daemon.
    pub log: PathBuf,
    /// The daemon's `/dev/shm` with [`PrivateShm`].
    pub shm: PathBuf,
}

/// Starts, adopts and stops MPS control daemons, one per claim.
#[derive(Debug, Clone)]
pub struct MpsSupervisor {
    settings: MpsSettings,
    launcher: MpsLauncher,
    tool_env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    procs: ProcScanner,
    daemon_args: Vec<String>,
}

fn valid_claim_uid(claim_uid: &str) -> bool {
    !claim_uid.is_empty()
        && claim_uid != "."
        && claim_uid != ".."
        && claim_uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl MpsSupervisor {
    /// A supervisor with these settings; nothing is started yet.
    pub fn new(settings: MpsSettings) -> Self {
        Self {
            procs: ProcScanner::new(&settings.control_path),
            settings,
            launcher: MpsLauncher::Direct,
            tool_env: Vec::new(),
            daemon_args: Vec::new(),
        }
    }

    /// The same supervisor (binary, launcher, timeouts, shm, tool environment) over another
    /// root directory, starting its daemons with `-d` followed by `daemon_args` (e.g.
    /// `-p 3 -m`). Keys of the new supervisor name its daemons' directories under `root_dir`.
    pub fn with_root(&self, root_dir: PathBuf, daemon_args: Vec<String>) -> Self {
        let mut settings = self.settings.clone();
        settings.root_dir = root_dir;
        Self {
            procs: ProcScanner::new(&settings.control_path),
            settings,
            launcher: self.launcher.clone(),
            tool_env: self.tool_env.clone(),
            daemon_args,
        }
    }

    /// The root directory of this supervisor's daemons.
    pub fn root_dir(&self) -> &std::path::Path {
        &self.settings.root_dir
    }

    /// Whether a private `/dev/shm` is given to daemons and their clients.
    pub fn private_shm(&self) -> bool {
        self.settings.private_shm.is_some()
    }

    /// Sends one control command to the daemon of `key`; returns what it printed.
    ///
    /// Errors: [`MpsError::InvalidClaimUid`], [`MpsError::Spawn`],
    /// [`MpsError::CommandFailed`] (the daemon refused, or none answers).
    pub async fn command(&self, key: &str, command: &str) -> Result<String, MpsError> {
        let dirs = self.dirs(key)?;
        self.send(key, &dirs, command).await
    }

    /// Whether the daemon of `key` has its control pipe and answers `probe`.
    pub async fn answers(&self, key: &str, probe: &str) -> bool {
        let Ok(dirs) = self.dirs(key) else {
            return false;
        };
        tokio::fs::try_exists(dirs.pipe.join(CONTROL_PIPE))
            .await
            .unwrap_or(false)
            && self.send(key, &dirs, probe).await.is_ok()
    }

    /// Runs the control binary (daemon launch and commands) with these environment
    /// variables added (the driver library path, [`crate::tool_env`]).
    #[must_use]
    pub fn with_tool_env(mut self, env: Vec<(std::ffi::OsString, std::ffi::OsString)>) -> Self {
        self.tool_env = env;
        self
    }

    /// Starts daemons through `launcher` (see [`MpsLauncher`]); the default is
    /// [`MpsLauncher::Direct`].
    #[must_use]
    pub fn with_launcher(mut self, launcher: MpsLauncher) -> Self {
        self.launcher = launcher;
        self
    }

    /// The directories of `claim_uid`. Errors: [`MpsError::InvalidClaimUid`].
    pub fn dirs(&self, claim_uid: &str) -> Result<ClaimDirs, MpsError> {
        if !valid_claim_uid(claim_uid) {
            return Err(MpsError::InvalidClaimUid {
                claim_uid: claim_uid.to_owned(),
            });
        }
        let root = self.settings.root_dir.join(claim_uid);
        Ok(ClaimDirs {
            pipe: root.join("pipe"),
            log: root.join("log"),
            shm: root.join("shm"),
            root,
        })
    }

    /// The program and arguments that launch the daemon, wrapped by the launcher (pure).
    pub fn launch_command(&self, dirs: &ClaimDirs) -> (PathBuf, Vec<String>) {
        let (program, args) = self.unwrapped_launch_command(dirs);
        let claim_uid = dirs.root.file_name().unwrap_or_default().to_string_lossy();
        self.launcher.wrap(&claim_uid, program, args)
    }

    fn unwrapped_launch_command(&self, dirs: &ClaimDirs) -> (PathBuf, Vec<String>) {
        let control = self.settings.control_path.display().to_string();
        match &self.settings.private_shm {
            None => {
                let mut args = vec!["-d".to_owned()];
                args.extend(self.daemon_args.iter().cloned());
                (self.settings.control_path.clone(), args)
            }
            Some(shm) if !self.daemon_args.is_empty() => {
                let mut args: Vec<String> = [
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    &shm.shell_path.display().to_string(),
                    "-c",
                    r#"mount --bind "$1" /dev/shm && c="$2" && shift 2 && exec "$c" -d "$@""#,
                    "mps-launch",
                    &dirs.shm.display().to_string(),
                    &control,
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
                args.extend(self.daemon_args.iter().cloned());
                (shm.unshare_path.clone(), args)
            }
            Some(shm) => (
                shm.unshare_path.clone(),
                vec![
                    "--mount".to_owned(),
                    "--propagation".to_owned(),
                    "private".to_owned(),
                    "--".to_owned(),
                    shm.shell_path.display().to_string(),
                    "-c".to_owned(),
                    r#"mount --bind "$1" /dev/shm && exec "$2" -d"#.to_owned(),
                    "mps-launch".to_owned(),
                    dirs.shm.display().to_string(),
                    control,
                ],
            ),
        }
    }

    /// Starts a daemon for `claim_uid` over `gpu_uuids` and applies `limits`.
    ///
    /// Leftovers of an earlier daemon of the same claim are stopped and removed first. On
    /// any failure the daemon is stopped and the directories removed. The GPUs must already
    /// be in EXCLUSIVE_PROCESS mode. Returns the claim's container edits.
    pub async fn start(
        &self,
        claim_uid: &str,
        gpu_uuids: &[String],
        limits: &MpsLimits,
    ) -> Result<ClaimEdits, MpsError> {
        let settings = limit_settings(claim_uid, gpu_uuids, limits)?;
        let dirs = self.dirs(claim_uid)?;
        if tokio::fs::try_exists(&dirs.root).await.unwrap_or(true)
            || !self.procs.of_pipe(&dirs.pipe).is_empty()
        {
            self.stop(claim_uid).await?;
        }
        match self.start_in(claim_uid, gpu_uuids, &dirs, &settings).await {
            Ok(()) => Ok(self.edits(&dirs)),
            Err(err) => {
                if let Err(cleanup) = self.stop(claim_uid).await {
                    tracing::warn!(claim.uid = claim_uid, error = %cleanup, "cleaning up after a failed MPS start");
                }
                Err(err)
            }
        }
    }

    async fn start_in(
        &self,
        claim_uid: &str,
        gpu_uuids: &[String],
        dirs: &ClaimDirs,
        settings: &[LimitSetting],
    ) -> Result<(), MpsError> {
        for dir in [&dirs.pipe, &dirs.log, &dirs.shm] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| MpsError::Io {
                    claim_uid: claim_uid.to_owned(),
                    action: "creating",
                    path: dir.clone(),
                    source,
                })?;
        }
        self.launch(claim_uid, gpu_uuids, dirs).await?;
        self.wait_ready(claim_uid, dirs).await?;
        self.apply_limits(claim_uid, gpu_uuids, dirs, settings)
            .await
    }

    async fn launch(
        &self,
        claim_uid: &str,
        gpu_uuids: &[String],
        dirs: &ClaimDirs,
    ) -> Result<(), MpsError> {
        let (program, args) = self.launch_command(dirs);
        let command_line = format!("{} {}", program.display(), args.join(" "));
        let spawn_error = |source| MpsError::Spawn {
            claim_uid: claim_uid.to_owned(),
            command: command_line.clone(),
            source,
        };
        // stderr goes to a file, not a pipe: the daemonised child inherits it and would
        // keep a pipe open for its whole life.
        let stderr_path = dirs.root.join("launch.stderr");
        let stderr_file = std::fs::File::create(&stderr_path).map_err(|source| MpsError::Io {
            claim_uid: claim_uid.to_owned(),
            action: "creating",
            path: stderr_path.clone(),
            source,
        })?;
        let mut child = tokio::process::Command::new(&program)
            .args(&args)
            .envs(self.tool_env.iter().map(|(k, v)| (k, v)))
            .env("CUDA_VISIBLE_DEVICES", gpu_uuids.join(","))
            .env("CUDA_MPS_PIPE_DIRECTORY", &dirs.pipe)
            .env("CUDA_MPS_LOG_DIRECTORY", &dirs.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .map_err(spawn_error)?;
        let status = tokio::time::timeout(self.settings.command_timeout, child.wait())
            .await
            .map_err(|_| spawn_error(timed_out(self.settings.command_timeout)))?
            .map_err(spawn_error)?;
        if status.success() {
            return Ok(());
        }
        let output = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        Err(MpsError::CommandFailed {
            claim_uid: claim_uid.to_owned(),
            command: command_line,
            status: status.to_string(),
            output: output.trim().to_owned(),
        })
    }

    async fn wait_ready(&self, claim_uid: &str, dirs: &ClaimDirs) -> Result<(), MpsError> {
        let control = dirs.pipe.join(CONTROL_PIPE);
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        let mut delay = Duration::from_millis(1);
        loop {
            if tokio::fs::try_exists(&control).await.unwrap_or(false) {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(MpsError::NotReady {
                    claim_uid: claim_uid.to_owned(),
                    path: control,
                    waited: self.settings.ready_timeout,
                    log_dir: dirs.log.clone(),
                });
            }
            // The daemon signals readiness only by creating its control pipe; no event
            // API exists for it, so poll with a short, growing delay under the deadline.
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// Stops the claim's daemon and removes its directories. Idempotent.
    ///
    /// `quit` first (when the control pipe exists); MPS processes of the claim's pipe
    /// directory (found in `/proc`) that are still alive `command_timeout` after it, or at
    /// once when `quit` was refused, get SIGTERM, and SIGKILL `command_timeout` later; each
    /// pid is re-verified before each signal. A daemon that no longer answers is not an
    /// error. Errors: [`MpsError::Signal`], [`MpsError::StillRunning`] (the directories are
    /// kept, so a retry finds the daemon again), [`MpsError::Io`] removing the directories.
    pub async fn stop(&self, claim_uid: &str) -> Result<(), MpsError> {
        let dirs = self.dirs(claim_uid)?;
        let quit = if tokio::fs::try_exists(dirs.pipe.join(CONTROL_PIPE))
            .await
            .unwrap_or(false)
        {
            match self.send(claim_uid, &dirs, "quit").await {
                Ok(_) => true,
                Err(err) => {
                    tracing::warn!(claim.uid = claim_uid, error = %err, "MPS control daemon did not take quit; stopping it by signal");
                    false
                }
            }
        } else {
            false
        };
        self.end_processes(claim_uid, &dirs, quit).await?;
        match tokio::fs::remove_dir_all(&dirs.root).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(MpsError::Io {
                claim_uid: claim_uid.to_owned(),
                action: "removing",
                path: dirs.root,
                source,
            }),
        }
    }

    /// Waits for the claim's MPS processes to exit (after a `quit` that was taken), then
    /// SIGTERM, then SIGKILL, each step bounded by `command_timeout`.
    async fn end_processes(
        &self,
        claim_uid: &str,
        dirs: &ClaimDirs,
        quit: bool,
    ) -> Result<(), MpsError> {
        let bound = self.settings.command_timeout;
        let mut left = self.procs.of_pipe(&dirs.pipe);
        if left.is_empty() {
            return Ok(());
        }
        if quit {
            left = self.still_alive(left, bound).await;
        }
        for signal in [Signal::Term, Signal::Kill] {
            if left.is_empty() {
                return Ok(());
            }
            for process in &left {
                tracing::warn!(claim.uid = claim_uid, pid = process.pid, %signal, "MPS process still runs after quit; signalling it");
                self.procs
                    .signal(process, signal)
                    .map_err(|source| MpsError::Signal {
                        claim_uid: claim_uid.to_owned(),
                        pid: process.pid,
                        signal: signal.to_string(),
                        source,
                    })?;
            }
            left = self.still_alive(left, bound).await;
        }
        if left.is_empty() {
            return Ok(());
        }
        Err(MpsError::StillRunning {
            claim_uid: claim_uid.to_owned(),
            pids: left.iter().map(|p| p.pid).collect(),
            pipe_dir: dirs.pipe.clone(),
            waited: bound,
        })
    }

    async fn still_alive(
        &self,
        processes: Vec<processes::MpsProcess>,
        bound: Duration,
    ) -> Vec<processes::MpsProcess> {
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        let left = self.procs.wait_gone(&pids, bound).await;
        processes
            .into_iter()
            .filter(|p| left.contains(&p.pid))
            .collect()
    }

    /// After a plugin restart: keeps the claim's daemon if it still answers (limits are
    /// re-applied, which only affects servers started later), else starts it afresh.
    pub async fn adopt(
        &self,
        claim_uid: &str,
        gpu_uuids: &[String],
        limits: &MpsLimits,
    ) -> Result<(AdoptOutcome, ClaimEdits), MpsError> {
        let settings = limit_settings(claim_uid, gpu_uuids, limits)?;
        let dirs = self.dirs(claim_uid)?;
        let alive = tokio::fs::try_exists(dirs.pipe.join(CONTROL_PIPE))
            .await
            .unwrap_or(false)
            && self
                .send(claim_uid, &dirs, "get_default_active_thread_percentage")
                .await
                .is_ok();
        if alive {
            self.apply_limits(claim_uid, gpu_uuids, &dirs, &settings)
                .await?;
            return Ok((AdoptOutcome::Adopted, self.edits(&dirs)));
        }
        let edits = self.start(claim_uid, gpu_uuids, limits).await?;
        Ok((AdoptOutcome::Restarted, edits))
    }

    /// Claim UIDs whose MPS control daemon or server runs with a pipe directory
    /// `<root>/<claimUID>/pipe` under the MPS root, found by process in `/proc` (a daemon
    /// whose directories were removed is still found). Sorted, without duplicates.
    pub fn daemon_claims(&self) -> Vec<String> {
        let root = &self.settings.root_dir;
        let mut claims: Vec<String> = self
            .procs
            .scan(|pipe| pipe.starts_with(root))
            .into_iter()
            .filter_map(|p| {
                let rel = p.pipe_dir.strip_prefix(root).ok()?;
                let mut parts = rel.components();
                let uid = parts.next()?.as_os_str().to_str()?.to_owned();
                let is_pipe = parts.next()?.as_os_str() == "pipe" && parts.next().is_none();
                (is_pipe && valid_claim_uid(&uid)).then_some(uid)
            })
            .collect();
        claims.sort();
        claims.dedup();
        claims
    }

    /// Claim UIDs that have a directory under the MPS root (to find orphans at start).
    pub fn claim_dirs(&self) -> Result<Vec<String>, MpsError> {
        let root = &self.settings.root_dir;
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(MpsError::Io {
                    claim_uid: String::new(),
                    action: "listing",
                    path: root.clone(),
                    source,
                });
            }
        };
        let mut claims: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| valid_claim_uid(name))
            .collect();
        claims.sort();
        Ok(claims)
    }
}

fn timed_out(limit: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {limit:?}"),
    )
}
