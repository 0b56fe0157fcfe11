//! Talking to a claim's MPS control daemon: one command per client run, and the limits
//! applied and read back.
//!
//! Owns: running `nvidia-cuda-mps-control` as a client (the command on stdin, the answer on
//! stdout, a bound on each run) and [`MpsSupervisor::apply_limits`]. Must not start or
//! stop daemons (the supervisor's lifecycle does).
//!
//! Follows NVIDIA's MPS documentation: the control binary run without options reads
//! commands on stdin from the daemon of its `CUDA_MPS_PIPE_DIRECTORY`.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::limits::LimitSetting;
use super::{ClaimDirs, MpsError, MpsSupervisor, timed_out};

impl MpsSupervisor {
    /// Sends one command to the claim's daemon; returns what it printed.
    pub(super) async fn send(
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

    /// Sends each `set_default_*` command of `settings` and reads it back with its
    /// `get_default_*` query.
    ///
    /// Errors: [`MpsError::CommandFailed`] / [`MpsError::Spawn`] from a command,
    /// [`MpsError::UnparsableAnswer`] when a query's answer is not a value,
    /// [`MpsError::LimitNotApplied`] when the daemon accepted the command and kept another
    /// value.
    pub(super) async fn apply_limits(
        &self,
        claim_uid: &str,
        gpu_uuids: &[String],
        dirs: &ClaimDirs,
        settings: &[LimitSetting],
    ) -> Result<(), MpsError> {
        for setting in settings {
            self.send(claim_uid, dirs, &setting.set).await?;
            let answer = self.send(claim_uid, dirs, &setting.query).await?;
            match setting.holds(&answer) {
                Some(true) => {}
                Some(false) => {
                    return Err(MpsError::LimitNotApplied {
                        claim_uid: claim_uid.to_owned(),
                        gpus: setting
                            .gpu_uuid
                            .clone()
                            .unwrap_or_else(|| gpu_uuids.join(",")),
                        setting: setting.name(),
                        wanted: setting.wanted_text(),
                        read: answer,
                    });
                }
                None => {
                    return Err(MpsError::UnparsableAnswer {
                        claim_uid: claim_uid.to_owned(),
                        command: setting.query.clone(),
                        output: answer,
                    });
                }
            }
        }
        Ok(())
    }
}
