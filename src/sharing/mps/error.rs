//! Errors of the MPS supervisor: each names the claim, what failed and what to do.

use std::path::PathBuf;
use std::time::Duration;

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
    /// The daemon accepted a limit and kept another value.
    #[error(
        "claim {claim_uid}: the MPS control daemon for GPU {gpus} holds {setting} {read:?} after its set_default_ command succeeded (wanted {wanted}); see the daemon's log (<plugin-dir>/mps/{claim_uid}/log), check that the driver's MPS supports the limit; the kubelet retries the prepare"
    )]
    LimitNotApplied {
        /// The claim UID.
        claim_uid: String,
        /// The GPU UUID the limit is for (comma-separated GPUs for a daemon-wide limit).
        gpus: String,
        /// The setting, e.g. `default active thread percentage`.
        setting: &'static str,
        /// The wanted value (`40`, `4096M`).
        wanted: String,
        /// What the `get_default_*` query answered.
        read: String,
    },
    /// A `get_default_*` query answered something that is not a value.
    #[error(
        "claim {claim_uid}: the MPS control daemon answered `{command}` with {output:?}, not a value; the limit cannot be verified, check the driver's MPS version"
    )]
    UnparsableAnswer {
        /// The claim UID.
        claim_uid: String,
        /// The query.
        command: String,
        /// Its stdout, trimmed.
        output: String,
    },
    /// A daemon that ignored `quit` could not be signalled.
    #[error(
        "claim {claim_uid}: sending {signal} to MPS process {pid}: the plugin needs the host PID namespace and root"
    )]
    Signal {
        /// The claim UID.
        claim_uid: String,
        /// The process id.
        pid: u32,
        /// The signal.
        signal: String,
        /// The error of kill(2).
        #[source]
        source: std::io::Error,
    },
    /// MPS processes of the claim still run after `quit`, SIGTERM and SIGKILL.
    #[error(
        "claim {claim_uid}: MPS processes {pids:?} (pipe directory {pipe_dir}) still run after quit, SIGTERM and SIGKILL ({waited:?} each); check them with `ps -o pid,stat,cmd -p <pid>` (a process in D state waits on the driver)"
    )]
    StillRunning {
        /// The claim UID.
        claim_uid: String,
        /// The process ids.
        pids: Vec<u32>,
        /// Their `CUDA_MPS_PIPE_DIRECTORY`.
        pipe_dir: PathBuf,
        /// How long each step waited.
        waited: Duration,
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

impl MpsError {
    /// The same error naming `label` (e.g. `<claim> (MPS daemon of GPU <uuid>)`) where it
    /// named the daemon's key, for daemons that serve several claims.
    #[must_use]
    pub fn for_claim(mut self, label: String) -> Self {
        match &mut self {
            Self::InvalidClaimUid { claim_uid }
            | Self::UnknownDevice { claim_uid, .. }
            | Self::InvalidLimit { claim_uid, .. }
            | Self::Io { claim_uid, .. }
            | Self::Spawn { claim_uid, .. }
            | Self::CommandFailed { claim_uid, .. }
            | Self::LimitNotApplied { claim_uid, .. }
            | Self::UnparsableAnswer { claim_uid, .. }
            | Self::Signal { claim_uid, .. }
            | Self::StillRunning { claim_uid, .. }
            | Self::NotReady { claim_uid, .. } => *claim_uid = label,
        }
        self
    }
}
