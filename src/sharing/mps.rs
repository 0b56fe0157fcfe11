//! MPS control daemons, one per claim, started and supervised by the plugin itself,
//! detached from the plugin's process group, session or cgroup by a [`MpsLauncher`] so
//! that a plugin restart or upgrade leaves them and their clients running.
//!
//! Owns: the per-claim directories `<plugin-dir>/mps/<claimUID>/{pipe,log,shm}`, starting
//! `nvidia-cuda-mps-control -d` for a claim's GPU set, waiting for its control pipe,
//! applying the claim's limits through the control daemon's command interface, stopping it
//! with `quit`, re-adopting it after a plugin restart, and the container edits (env and
//! mounts, as plain data) a claim's containers need to reach it.
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

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

pub use super::launcher::MpsLauncher;
use super::policy::MpsLimits;

/// Where the claim's containers find the control pipe (`CUDA_MPS_PIPE_DIRECTORY`).
pub const CONTAINER_PIPE_DIR: &str = "/tmp/nvidia-mps";
/// Where the claim's containers see the daemon's logs (`CUDA_MPS_LOG_DIRECTORY`, read-only).
pub const CONTAINER_LOG_DIR: &str = "/var/log/nvidia-mps";
/// The file the control daemon creates in its pipe directory when it accepts commands.
pub const CONTROL_PIPE: &str = "control";

/// One bind mount for a claim's containers, as plain data for the CDI module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Path on the node.
    pub host_path: PathBuf,
    /// Path in the container.
    pub container_path: String,
    /// OCI mount options, e.g. `["rw", "nosuid", "nodev", "bind"]`.
    pub options: Vec<String>,
}

/// Container edits a claim needs for its sharing policy (empty for time-slicing/exclusive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimEdits {
    /// Environment variables (name, value), in a stable order.
    pub env: Vec<(String, String)>,
    /// Bind mounts, in a stable order.
    pub mounts: Vec<MountSpec>,
}

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
    /// How long one control command (or the `-d` launcher) may take.
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

/// Errors of the MPS supervisor; each names the claim and what to do.
#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    /// The claim UID cannot be used as a directory name.
    #[error("claim UID {claim_uid:?} is not a valid directory name")]
    InvalidClaimUid {
        /// The claim UID.
        claim_uid: String,
    },
    /// A limit names a GPU that is not in the claim.
    #[error(
        "claim {claim_uid}: MPS pinned memory limit for {device}, which is not one of the claim's GPUs {gpus:?}"
    )]
    UnknownDevice {
        /// The claim UID.
        claim_uid: String,
        /// The key of the per-device limit.
        device: String,
        /// The claim's GPU UUIDs.
        gpus: Vec<String>,
    },
    /// A limit is outside what the control daemon accepts.
    #[error("claim {claim_uid}: {what}")]
    InvalidLimit {
        /// The claim UID.
        claim_uid: String,
        /// What is wrong, with the allowed values.
        what: String,
    },
    /// A directory or file of the claim could not be created, read or removed.
    #[error("claim {claim_uid}: {action} {path}")]
    Io {
        /// The claim UID.
        claim_uid: String,
        /// What was being done (`creating`, `removing`...).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The control binary could not be run or did not finish in time.
    #[error(
        "claim {claim_uid}: running `{command}`: check the configured nvidia-cuda-mps-control path and that the NVIDIA driver utilities are installed"
    )]
    Spawn {
        /// The claim UID.
        claim_uid: String,
        /// The command line (or control command).
        command: String,
        /// The I/O error (not found, timed out).
        #[source]
        source: std::io::Error,
    },
    /// The daemon launcher or a control command exited non-zero.
    #[error("claim {claim_uid}: `{command}` failed ({status}): {output}")]
    CommandFailed {
        /// The claim UID.
        claim_uid: String,
        /// The command line (or control command).
        command: String,
        /// The exit status.
        status: String,
        /// Captured stderr/stdout, trimmed.
        output: String,
    },
    /// The control pipe did not appear in time.
    #[error(
        "claim {claim_uid}: MPS control daemon did not create {path} within {waited:?}; see its logs in {log_dir}"
    )]
    NotReady {
        /// The claim UID.
        claim_uid: String,
        /// The control pipe path waited for.
        path: PathBuf,
        /// The deadline.
        waited: Duration,
        /// The daemon's log directory.
        log_dir: PathBuf,
    },
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

/// The commands that apply `limits` to a daemon serving `gpu_uuids` (pure).
///
/// One `set_default_active_thread_percentage` when set, then one
/// `set_default_device_pinned_mem_limit <uuid> <MiB>M` per GPU that has a limit (the
/// per-device value wins over the global one). Bytes are rounded down to whole MiB, the
/// finest unit the daemon accepts. Errors: percentage over 100, a limit under 1 MiB, a
/// per-device key that is not one of `gpu_uuids`.
pub fn limit_commands(
    claim_uid: &str,
    gpu_uuids: &[String],
    limits: &MpsLimits,
) -> Result<Vec<String>, MpsError> {
    let invalid = |what: String| MpsError::InvalidLimit {
        claim_uid: claim_uid.to_owned(),
        what,
    };
    let mut commands = Vec::new();
    if let Some(pct) = limits.active_thread_percentage {
        if pct > 100 {
            return Err(invalid(format!(
                "active thread percentage {pct} is outside 0..100"
            )));
        }
        commands.push(format!("set_default_active_thread_percentage {pct}"));
    }
    if let Some(device) = limits
        .per_device_pinned_memory_limit_bytes
        .keys()
        .find(|k| !gpu_uuids.contains(k))
    {
        return Err(MpsError::UnknownDevice {
            claim_uid: claim_uid.to_owned(),
            device: device.clone(),
            gpus: gpu_uuids.to_vec(),
        });
    }
    for uuid in gpu_uuids {
        let limit = limits
            .per_device_pinned_memory_limit_bytes
            .get(uuid)
            .copied()
            .or(limits.pinned_memory_limit_bytes);
        if let Some(bytes) = limit {
            let mib = bytes / (1024 * 1024);
            if mib == 0 {
                return Err(invalid(format!(
                    "pinned memory limit of {bytes} bytes for GPU {uuid} is below the 1 MiB the MPS daemon accepts"
                )));
            }
            commands.push(format!("set_default_device_pinned_mem_limit {uuid} {mib}M"));
        }
    }
    Ok(commands)
}

/// Starts, adopts and stops MPS control daemons, one per claim.
#[derive(Debug, Clone)]
pub struct MpsSupervisor {
    settings: MpsSettings,
    launcher: MpsLauncher,
    tool_env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
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
            settings,
            launcher: MpsLauncher::Direct,
            tool_env: Vec::new(),
        }
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

    /// The container edits for a claim served by a daemon (pure).
    pub fn edits(&self, dirs: &ClaimDirs) -> ClaimEdits {
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut mounts = vec![
            MountSpec {
                host_path: dirs.pipe.clone(),
                container_path: CONTAINER_PIPE_DIR.to_owned(),
                options: opts(&["rw", "nosuid", "nodev", "bind"]),
            },
            MountSpec {
                host_path: dirs.log.clone(),
                container_path: CONTAINER_LOG_DIR.to_owned(),
                options: opts(&["ro", "nosuid", "nodev", "bind"]),
            },
        ];
        if self.settings.private_shm.is_some() {
            mounts.push(MountSpec {
                host_path: dirs.shm.clone(),
                container_path: "/dev/shm".to_owned(),
                options: opts(&["rw", "nosuid", "nodev", "bind"]),
            });
        }
        ClaimEdits {
            env: vec![
                (
                    "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
                    CONTAINER_PIPE_DIR.to_owned(),
                ),
                (
                    "CUDA_MPS_LOG_DIRECTORY".to_owned(),
                    CONTAINER_LOG_DIR.to_owned(),
                ),
            ],
            mounts,
        }
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
            None => (self.settings.control_path.clone(), vec!["-d".to_owned()]),
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
        let commands = limit_commands(claim_uid, gpu_uuids, limits)?;
        let dirs = self.dirs(claim_uid)?;
        if tokio::fs::try_exists(&dirs.root).await.unwrap_or(true) {
            self.stop(claim_uid).await?;
        }
        match self.start_in(claim_uid, gpu_uuids, &dirs, &commands).await {
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
        commands: &[String],
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
        for command in commands {
            self.send(claim_uid, dirs, command).await?;
        }
        Ok(())
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

    /// Sends one command to the claim's daemon; returns what it printed.
    async fn send(
        &self,
        claim_uid: &str,
        dirs: &ClaimDirs,
        command: &str,
    ) -> Result<String, MpsError> {
        let spawn_error = |source| MpsError::Spawn {
            claim_uid: claim_uid.to_owned(),
            command: format!("echo {command} | {}", self.settings.control_path.display()),
            source,
        };
        let mut child = tokio::process::Command::new(&self.settings.control_path)
            .envs(self.tool_env.iter().map(|(k, v)| (k, v)))
            .env("CUDA_MPS_PIPE_DIRECTORY", &dirs.pipe)
            .env("CUDA_MPS_LOG_DIRECTORY", &dirs.log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(spawn_error)?;
            // Dropping stdin closes it: the control client ends at end of input.
        }
        let output = tokio::time::timeout(self.settings.command_timeout, child.wait_with_output())
            .await
            .map_err(|_| spawn_error(timed_out(self.settings.command_timeout)))?
            .map_err(spawn_error)?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        Err(MpsError::CommandFailed {
            claim_uid: claim_uid.to_owned(),
            command: command.to_owned(),
            status: output.status.to_string(),
            output: if stderr.is_empty() { stdout } else { stderr },
        })
    }

    /// Stops the claim's daemon (`quit`) and removes its directories. Idempotent.
    ///
    /// A daemon that no longer answers is not an error (its directories are removed);
    /// failing to remove the directories is.
    pub async fn stop(&self, claim_uid: &str) -> Result<(), MpsError> {
        let dirs = self.dirs(claim_uid)?;
        if tokio::fs::try_exists(dirs.pipe.join(CONTROL_PIPE))
            .await
            .unwrap_or(false)
            && let Err(err) = self.send(claim_uid, &dirs, "quit").await
        {
            tracing::warn!(claim.uid = claim_uid, error = %err, "MPS control daemon did not take quit; removing its directories");
        }
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

    /// After a plugin restart: keeps the claim's daemon if it still answers (limits are
    /// re-applied, which only affects servers started later), else starts it afresh.
    pub async fn adopt(
        &self,
        claim_uid: &str,
        gpu_uuids: &[String],
        limits: &MpsLimits,
    ) -> Result<(AdoptOutcome, ClaimEdits), MpsError> {
        let commands = limit_commands(claim_uid, gpu_uuids, limits)?;
        let dirs = self.dirs(claim_uid)?;
        let alive = tokio::fs::try_exists(dirs.pipe.join(CONTROL_PIPE))
            .await
            .unwrap_or(false)
            && self
                .send(claim_uid, &dirs, "get_default_active_thread_percentage")
                .await
                .is_ok();
        if alive {
            for command in &commands {
                self.send(claim_uid, &dirs, command).await?;
            }
            return Ok((AdoptOutcome::Adopted, self.edits(&dirs)));
        }
        let edits = self.start(claim_uid, gpu_uuids, limits).await?;
        Ok((AdoptOutcome::Restarted, edits))
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

#[cfg(test)]
pub(crate) mod test_support {
    //! A shell-script stand-in for `nvidia-cuda-mps-control`, with the real tool's protocol.
    use std::path::{Path, PathBuf};

    /// Writes the stand-in into `dir`; it appends what it was told to `<dir>/record`.
    /// `ready_after`: a shell snippet run (in the background) before creating the pipe.
    pub fn fake_mps_control(dir: &Path, ready_after: Option<&str>) -> PathBuf {
        let record = dir.join("record");
        let make_pipe = match ready_after {
            None => r#": > "$CUDA_MPS_PIPE_DIRECTORY/control""#.to_owned(),
            Some(wait) => format!(r#"( {wait}; : > "$CUDA_MPS_PIPE_DIRECTORY/control" ) &"#),
        };
        let script = format!(
            r#"#!/bin/sh
rec='{record}'
if [ "$1" = "-d" ]; then
  echo "start args=$* visible=$CUDA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$rec"
  {make_pipe}
  exit 0
fi
if [ ! -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; then
  echo "Cannot find MPS control daemon process" >&2
  exit 1
fi
while read -r line; do
  echo "cmd $line" >> "$rec"
  case "$line" in
    quit) rm -f "$CUDA_MPS_PIPE_DIRECTORY/control" ;;
    get_default_active_thread_percentage) echo 100.0 ;;
    *GPU-unknown*) echo "Invalid device" >&2; exit 2 ;;
  esac
done
"#,
            record = record.display()
        );
        let path = dir.join("nvidia-cuda-mps-control");
        write_script(&path, &script);
        path
    }

    /// Writes an executable script without ever holding a writable fd to it in this
    /// process: a test thread forking at that moment would make exec fail with ETXTBSY.
    pub fn write_script(path: &Path, body: &str) {
        let source = path.with_extension("src");
        std::fs::write(&source, body).unwrap();
        let status = std::process::Command::new("install")
            .arg("-m")
            .arg("755")
            .arg(&source)
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "install {}", path.display());
    }

    /// The recorded lines.
    pub fn recorded(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("record"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{fake_mps_control, recorded};
    use super::*;
    use std::path::Path;

    fn settings(dir: &Path, control: PathBuf) -> MpsSettings {
        MpsSettings {
            control_path: control,
            root_dir: dir.join("plugin/mps"),
            ready_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(10),
            private_shm: None,
        }
    }

    fn gpus(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn limit_commands_follow_the_control_daemon_syntax() {
        let limits = MpsLimits {
            active_thread_percentage: Some(40),
            pinned_memory_limit_bytes: Some(18 * 1024 * 1024 * 1024 + 512),
            per_device_pinned_memory_limit_bytes: [("GPU-b".to_owned(), 2048 * 1024 * 1024)].into(),
        };
        assert_eq!(
            limit_commands("c", &gpus(&["GPU-a", "GPU-b"]), &limits).unwrap(),
            [
                "set_default_active_thread_percentage 40",
                "set_default_device_pinned_mem_limit GPU-a 18432M",
                "set_default_device_pinned_mem_limit GPU-b 2048M",
            ]
        );
        assert!(
            limit_commands("c", &gpus(&["GPU-a"]), &MpsLimits::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn limit_commands_reject_bad_values() {
        let pct = MpsLimits {
            active_thread_percentage: Some(101),
            ..MpsLimits::default()
        };
        assert!(
            limit_commands("c", &gpus(&["G"]), &pct)
                .unwrap_err()
                .to_string()
                .contains("0..100")
        );
        let tiny = MpsLimits {
            pinned_memory_limit_bytes: Some(1000),
            ..MpsLimits::default()
        };
        assert!(matches!(
            limit_commands("c", &gpus(&["G"]), &tiny),
            Err(MpsError::InvalidLimit { .. })
        ));
        let stranger = MpsLimits {
            per_device_pinned_memory_limit_bytes: [("GPU-x".to_owned(), 1 << 30)].into(),
            ..MpsLimits::default()
        };
        let err = limit_commands("c", &gpus(&["G"]), &stranger).unwrap_err();
        assert!(err.to_string().contains("GPU-x"), "{err}");
    }

    #[test]
    fn claim_uid_must_be_a_plain_name() {
        let sup = MpsSupervisor::new(settings(Path::new("/x"), PathBuf::from("/bin/false")));
        for bad in ["", "..", "a/b", "../x"] {
            assert!(
                matches!(sup.dirs(bad), Err(MpsError::InvalidClaimUid { .. })),
                "{bad:?}"
            );
        }
        let dirs = sup.dirs("0b7c-uid").unwrap();
        assert_eq!(dirs.pipe, Path::new("/x/plugin/mps/0b7c-uid/pipe"));
    }

    #[test]
    fn private_shm_wraps_launch_in_unshare_and_mounts_shm() {
        let mut s = settings(
            Path::new("/x"),
            PathBuf::from("/usr/bin/nvidia-cuda-mps-control"),
        );
        let plain = MpsSupervisor::new(s.clone());
        let dirs = plain.dirs("u").unwrap();
        assert_eq!(
            plain.launch_command(&dirs),
            (s.control_path.clone(), vec!["-d".to_owned()])
        );
        assert!(
            plain
                .edits(&dirs)
                .mounts
                .iter()
                .all(|m| m.container_path != "/dev/shm")
        );

        s.private_shm = Some(PrivateShm {
            unshare_path: "/usr/bin/unshare".into(),
            shell_path: "/bin/sh".into(),
        });
        let private = MpsSupervisor::new(s);
        let (program, args) = private.launch_command(&dirs);
        assert_eq!(program, Path::new("/usr/bin/unshare"));
        assert_eq!(args[..4], ["--mount", "--propagation", "private", "--"]);
        assert_eq!(
            args[args.len() - 2..],
            ["/x/plugin/mps/u/shm", "/usr/bin/nvidia-cuda-mps-control"]
        );
        let shm = private
            .edits(&dirs)
            .mounts
            .into_iter()
            .find(|m| m.container_path == "/dev/shm")
            .unwrap();
        assert_eq!(shm.host_path, dirs.shm);
    }

    #[tokio::test]
    async fn start_applies_limits_and_stop_quits_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let control = fake_mps_control(tmp.path(), None);
        let sup = MpsSupervisor::new(settings(tmp.path(), control));
        let limits = MpsLimits {
            active_thread_percentage: Some(50),
            pinned_memory_limit_bytes: Some(4 << 30),
            ..MpsLimits::default()
        };
        let edits = sup
            .start("claim-1", &gpus(&["GPU-a", "GPU-b"]), &limits)
            .await
            .unwrap();
        let dirs = sup.dirs("claim-1").unwrap();
        assert_eq!(
            edits.env,
            [
                (
                    "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
                    "/tmp/nvidia-mps".to_owned()
                ),
                (
                    "CUDA_MPS_LOG_DIRECTORY".to_owned(),
                    "/var/log/nvidia-mps".to_owned()
                ),
            ]
        );
        assert_eq!(edits.mounts[0].host_path, dirs.pipe);
        assert_eq!(edits.mounts[0].container_path, "/tmp/nvidia-mps");
        assert_eq!(
            recorded(tmp.path()),
            [
                format!(
                    "start args=-d visible=GPU-a,GPU-b pipe={} log={}",
                    dirs.pipe.display(),
                    dirs.log.display()
                ),
                "cmd set_default_active_thread_percentage 50".to_owned(),
                "cmd set_default_device_pinned_mem_limit GPU-a 4096M".to_owned(),
                "cmd set_default_device_pinned_mem_limit GPU-b 4096M".to_owned(),
            ]
        );
        assert!(dirs.log.is_dir() && dirs.shm.is_dir());

        sup.stop("claim-1").await.unwrap();
        assert_eq!(recorded(tmp.path()).last().unwrap(), "cmd quit");
        assert!(!dirs.root.exists());
        sup.stop("claim-1").await.unwrap();
        assert_eq!(recorded(tmp.path()).len(), 5, "a second stop sends nothing");
    }

    #[tokio::test]
    async fn readiness_waits_for_the_control_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let control = fake_mps_control(tmp.path(), Some("sleep 0.3"));
        let sup = MpsSupervisor::new(settings(tmp.path(), control));
        let limits = MpsLimits {
            active_thread_percentage: Some(10),
            ..MpsLimits::default()
        };
        sup.start("slow", &gpus(&["GPU-a"]), &limits).await.unwrap();
        // The limit command only succeeds once the pipe exists, so reaching it proves the wait.
        assert_eq!(
            recorded(tmp.path()).last().unwrap(),
            "cmd set_default_active_thread_percentage 10"
        );
    }

    #[tokio::test]
    async fn daemon_that_never_gets_ready_fails_with_deadline_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let control = fake_mps_control(tmp.path(), Some("exit 0"));
        let mut s = settings(tmp.path(), control);
        s.ready_timeout = Duration::from_millis(200);
        let sup = MpsSupervisor::new(s);
        let err = sup
            .start("never", &gpus(&["GPU-a"]), &MpsLimits::default())
            .await
            .unwrap_err();
        assert!(matches!(err, MpsError::NotReady { .. }), "{err}");
        assert!(!sup.dirs("never").unwrap().root.exists());
    }

    #[tokio::test]
    async fn failing_limit_command_stops_daemon_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let control = fake_mps_control(tmp.path(), None);
        let sup = MpsSupervisor::new(settings(tmp.path(), control));
        let limits = MpsLimits {
            pinned_memory_limit_bytes: Some(1 << 30),
            ..MpsLimits::default()
        };
        let err = sup
            .start("c", &gpus(&["GPU-unknown"]), &limits)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, MpsError::CommandFailed { .. }) && text.contains("Invalid device"),
            "{text}"
        );
        assert_eq!(recorded(tmp.path()).last().unwrap(), "cmd quit");
        assert!(!sup.dirs("c").unwrap().root.exists());
    }

    #[tokio::test]
    async fn missing_binary_and_stale_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = MpsSupervisor::new(settings(tmp.path(), tmp.path().join("absent")));
        let err = missing
            .start("c", &gpus(&["GPU-a"]), &MpsLimits::default())
            .await
            .unwrap_err();
        assert!(matches!(err, MpsError::Spawn { .. }), "{err}");
        assert!(!missing.dirs("c").unwrap().root.exists());
        // A stale control pipe whose daemon is gone: quit fails, stop still cleans up.
        let dirs = missing.dirs("stale").unwrap();
        std::fs::create_dir_all(&dirs.pipe).unwrap();
        std::fs::write(dirs.pipe.join("control"), "").unwrap();
        missing.stop("stale").await.unwrap();
        assert!(!dirs.root.exists());
    }

    #[tokio::test]
    async fn adopt_keeps_a_live_daemon_and_restarts_a_dead_one() {
        let tmp = tempfile::tempdir().unwrap();
        let control = fake_mps_control(tmp.path(), None);
        let sup = MpsSupervisor::new(settings(tmp.path(), control));
        let limits = MpsLimits {
            active_thread_percentage: Some(30),
            ..MpsLimits::default()
        };
        sup.start("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
        let (outcome, _) = sup.adopt("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
        assert_eq!(outcome, AdoptOutcome::Adopted);
        let starts = |lines: &[String]| lines.iter().filter(|l| l.starts_with("start")).count();
        assert_eq!(starts(&recorded(tmp.path())), 1);

        // The daemon died with the node's processes: pipe gone, directories left behind.
        std::fs::remove_file(sup.dirs("c").unwrap().pipe.join("control")).unwrap();
        let (outcome, edits) = sup.adopt("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
        assert_eq!(outcome, AdoptOutcome::Restarted);
        assert_eq!(starts(&recorded(tmp.path())), 2);
        assert!(!edits.env.is_empty());
        assert_eq!(sup.claim_dirs().unwrap(), ["c"]);
    }
}
