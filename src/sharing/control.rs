//! Hardware seams for the compute policy of a physical GPU: compute mode and time slice.
//!
//! Owns: the two small traits the sharing manager is given at construction
//! ([`ComputeControl`], [`TimeSliceControl`]) and their production implementations,
//! [`NvmlComputeControl`] (NVML `nvmlDeviceSetComputeMode` / `nvmlDeviceGetComputeMode`
//! through nvml-wrapper) and [`NvidiaSmiTimeSlice`] (`nvidia-smi compute-policy`, because
//! NVML has no public call for the time slice).
//!
//! Must not: decide policy (that is `policy`), keep state, or pick a test double itself.
//!
//! Time-slice support is probed at run time, not guessed from the architecture: NVIDIA
//! documents no architecture threshold for `--set-timeslice` (the knob is tied to compute
//! preemption, which not every Pascal part has; see kubernetes-sigs/dra-driver-nvidia-gpu
//! issue 41 and PR 1183), so [`TimeSliceControl::time_slice`] lists the GPU's compute
//! policies (`nvidia-smi compute-policy -i <uuid> -l`) and a GPU whose listing has no
//! time-slice value, or for which the tool answers "Not Supported", is unsupported.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::ComputeMode as NvmlComputeMode;
use serde::{Deserialize, Serialize};

/// The compute mode of a GPU, as NVML reports it (`nvmlComputeMode_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ComputeMode {
    /// Several processes may hold a context on the GPU (the driver default).
    Default,
    /// Removed by NVIDIA; only ever read back, never set by us.
    ExclusiveThread,
    /// No process may create a context.
    Prohibited,
    /// One process may hold a context (the MPS server, or one exclusive workload).
    ExclusiveProcess,
}

/// The time-slice interval of `nvidia-smi compute-policy --set-timeslice` (values 0..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TimeSlice {
    /// The driver's default interval (`0`).
    Default,
    /// Short interval (`1`).
    Short,
    /// Medium interval (`2`).
    Medium,
    /// Long interval (`3`).
    Long,
}

impl TimeSlice {
    /// The numeric argument `nvidia-smi compute-policy --set-timeslice` takes (0..=3).
    pub fn as_arg(self) -> u8 {
        match self {
            TimeSlice::Default => 0,
            TimeSlice::Short => 1,
            TimeSlice::Medium => 2,
            TimeSlice::Long => 3,
        }
    }

    /// Parses one token of a compute-policy listing: a name (any case) or 0..=3.
    pub fn from_token(token: &str) -> Option<TimeSlice> {
        match token.to_ascii_lowercase().as_str() {
            "default" | "0" => Some(TimeSlice::Default),
            "short" | "1" => Some(TimeSlice::Short),
            "medium" | "2" => Some(TimeSlice::Medium),
            "long" | "3" => Some(TimeSlice::Long),
            _ => None,
        }
    }
}

/// What a GPU answers about its time slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeSliceState {
    /// The GPU supports the setting and currently has this interval.
    Supported(TimeSlice),
    /// The GPU does not support the setting; `detail` is what the tool said.
    Unsupported {
        /// The tool's words (or a summary), shown to the user in the claim error.
        detail: String,
    },
}

/// Errors of the hardware seams. Each names the NVML function or command and the GPU UUID.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The NVML library could not be loaded or initialised.
    #[error(
        "loading NVML from {lib}: check the NVIDIA driver is installed and the library path is right"
    )]
    NvmlInit {
        /// The library path tried (`libnvidia-ml.so.1` when not configured).
        lib: String,
        /// The NVML error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// An NVML call failed for one GPU.
    #[error("NVML {function} failed for GPU {gpu_uuid}: {hint}")]
    Nvml {
        /// The NVML C function, e.g. `nvmlDeviceSetComputeMode`.
        function: &'static str,
        /// The GPU UUID.
        gpu_uuid: String,
        /// What to do about it.
        hint: &'static str,
        /// The NVML error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// NVML reported a compute mode we do not know.
    #[error("NVML nvmlDeviceGetComputeMode returned an unknown compute mode for GPU {gpu_uuid}")]
    UnknownComputeMode {
        /// The GPU UUID.
        gpu_uuid: String,
    },
    /// A helper command could not be started or did not finish in time.
    #[error(
        "running `{command}` for GPU {gpu_uuid}: check the path (flag) and that the tool is installed"
    )]
    Spawn {
        /// The command line.
        command: String,
        /// The GPU UUID.
        gpu_uuid: String,
        /// The I/O error (not found, permission denied, timed out).
        #[source]
        source: std::io::Error,
    },
    /// A helper command exited non-zero.
    #[error("`{command}` failed for GPU {gpu_uuid} ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// The GPU UUID.
        gpu_uuid: String,
        /// The exit status as text.
        status: String,
        /// Captured stderr (or stdout when stderr was empty), trimmed.
        stderr: String,
    },
    /// A helper command's output could not be understood.
    #[error("`{command}` for GPU {gpu_uuid} printed no time-slice value we understand: {output:?}")]
    UnparsableOutput {
        /// The command line.
        command: String,
        /// The GPU UUID.
        gpu_uuid: String,
        /// The output, trimmed.
        output: String,
    },
}

/// Compute mode of a physical GPU, addressed by UUID (`GPU-...`). Synchronous: NVML calls
/// take microseconds.
pub trait ComputeControl: Send + Sync {
    /// Sets the compute mode (`nvmlDeviceSetComputeMode`); needs root.
    fn set_compute_mode(&self, gpu_uuid: &str, mode: ComputeMode) -> Result<(), ControlError>;
    /// Reads the compute mode back (`nvmlDeviceGetComputeMode`).
    fn compute_mode(&self, gpu_uuid: &str) -> Result<ComputeMode, ControlError>;
}

/// Time-slice setting of a physical GPU, addressed by UUID.
pub trait TimeSliceControl: Send + Sync {
    /// Sets the interval (`nvidia-smi compute-policy -i <uuid> --set-timeslice <0..3>`).
    fn set_time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
        interval: TimeSlice,
    ) -> BoxFuture<'a, Result<(), ControlError>>;
    /// Reads the interval back, or says the GPU does not support the setting.
    fn time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
    ) -> BoxFuture<'a, Result<TimeSliceState, ControlError>>;
}

/// [`ComputeControl`] over nvml-wrapper 0.13.
pub struct NvmlComputeControl {
    nvml: Nvml,
}

impl NvmlComputeControl {
    /// Loads NVML from `lib_path` (default `libnvidia-ml.so.1` through the loader).
    ///
    /// Errors: [`ControlError::NvmlInit`] when the library is missing or `nvmlInit_v2` fails.
    pub fn new(lib_path: Option<&Path>) -> Result<Self, ControlError> {
        let mut builder = Nvml::builder();
        let lib: OsString;
        if let Some(path) = lib_path {
            lib = path.as_os_str().to_owned();
            builder.lib_path(&lib);
        }
        let nvml = builder.init().map_err(|source| ControlError::NvmlInit {
            lib: lib_path.map_or_else(
                || "libnvidia-ml.so.1".to_owned(),
                |p| p.display().to_string(),
            ),
            source,
        })?;
        Ok(Self { nvml })
    }

    /// Wraps an already initialised NVML handle (shared with discovery).
    pub fn from_nvml(nvml: Nvml) -> Self {
        Self { nvml }
    }
}

impl ComputeControl for NvmlComputeControl {
    fn set_compute_mode(&self, gpu_uuid: &str, mode: ComputeMode) -> Result<(), ControlError> {
        let mut device =
            self.nvml
                .device_by_uuid(gpu_uuid)
                .map_err(|source| ControlError::Nvml {
                    function: "nvmlDeviceGetHandleByUUID",
                    gpu_uuid: gpu_uuid.to_owned(),
                    hint: "check the GPU is still present on this node (nvidia-smi -L)",
                    source,
                })?;
        let nvml_mode = match mode {
            ComputeMode::Default => NvmlComputeMode::Default,
            ComputeMode::ExclusiveThread => NvmlComputeMode::ExclusiveThread,
            ComputeMode::Prohibited => NvmlComputeMode::Prohibited,
            ComputeMode::ExclusiveProcess => NvmlComputeMode::ExclusiveProcess,
        };
        device.set_compute_mode(nvml_mode).map_err(|source| ControlError::Nvml {
            function: "nvmlDeviceSetComputeMode",
            gpu_uuid: gpu_uuid.to_owned(),
            hint: "the plugin needs root on the node; a GPU in MIG mode or a vGPU may refuse compute modes",
            source,
        })
    }

    fn compute_mode(&self, gpu_uuid: &str) -> Result<ComputeMode, ControlError> {
        let device = self
            .nvml
            .device_by_uuid(gpu_uuid)
            .map_err(|source| ControlError::Nvml {
                function: "nvmlDeviceGetHandleByUUID",
                gpu_uuid: gpu_uuid.to_owned(),
                hint: "check the GPU is still present on this node (nvidia-smi -L)",
                source,
            })?;
        let mode = device.compute_mode().map_err(|source| match source {
            nvml_wrapper::error::NvmlError::UnexpectedVariant(_) => {
                ControlError::UnknownComputeMode {
                    gpu_uuid: gpu_uuid.to_owned(),
                }
            }
            source => ControlError::Nvml {
                function: "nvmlDeviceGetComputeMode",
                gpu_uuid: gpu_uuid.to_owned(),
                hint: "check the driver is healthy (nvidia-smi -q)",
                source,
            },
        })?;
        Ok(match mode {
            NvmlComputeMode::Default => ComputeMode::Default,
            NvmlComputeMode::ExclusiveThread => ComputeMode::ExclusiveThread,
            NvmlComputeMode::Prohibited => ComputeMode::Prohibited,
            NvmlComputeMode::ExclusiveProcess => ComputeMode::ExclusiveProcess,
        })
    }
}

/// [`TimeSliceControl`] that runs `nvidia-smi compute-policy`.
#[derive(Debug, Clone)]
pub struct NvidiaSmiTimeSlice {
    nvidia_smi: PathBuf,
    timeout: Duration,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

impl NvidiaSmiTimeSlice {
    /// Uses the `nvidia-smi` at `nvidia_smi` and gives each run at most `timeout`.
    pub fn new(nvidia_smi: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            nvidia_smi: nvidia_smi.into(),
            timeout,
            env: Vec::new(),
        }
    }

    /// Runs nvidia-smi with these environment variables added (the driver library path,
    /// [`crate::tool_env`]); the plugin's own environment is not changed.
    #[must_use]
    pub fn with_env(mut self, env: Vec<(std::ffi::OsString, std::ffi::OsString)>) -> Self {
        self.env = env;
        self
    }

    fn command_line(&self, args: &[&str]) -> String {
        let mut line = self.nvidia_smi.display().to_string();
        for arg in args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }

    /// Runs nvidia-smi and returns (success, stdout, stderr).
    async fn run(
        &self,
        gpu_uuid: &str,
        args: &[&str],
    ) -> Result<(std::process::ExitStatus, String, String), ControlError> {
        let spawn_error = |source| ControlError::Spawn {
            command: self.command_line(args),
            gpu_uuid: gpu_uuid.to_owned(),
            source,
        };
        let child = tokio::process::Command::new(&self.nvidia_smi)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                spawn_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.timeout),
                ))
            })?
            .map_err(spawn_error)?;
        Ok((
            output.status,
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

impl TimeSliceControl for NvidiaSmiTimeSlice {
    fn set_time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
        interval: TimeSlice,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let value = interval.as_arg().to_string();
            let args = [
                "compute-policy",
                "-i",
                gpu_uuid,
                "--set-timeslice",
                value.as_str(),
            ];
            let (status, stdout, stderr) = self.run(gpu_uuid, &args).await?;
            if status.success() {
                return Ok(());
            }
            Err(ControlError::CommandFailed {
                command: self.command_line(&args),
                gpu_uuid: gpu_uuid.to_owned(),
                status: status.to_string(),
                stderr: if stderr.is_empty() { stdout } else { stderr },
            })
        })
    }

    fn time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
    ) -> BoxFuture<'a, Result<TimeSliceState, ControlError>> {
        Box::pin(async move {
            let args = ["compute-policy", "-i", gpu_uuid, "-l"];
            let (status, stdout, stderr) = self.run(gpu_uuid, &args).await?;
            let said = if stderr.is_empty() {
                stdout.clone()
            } else {
                format!("{stderr}\n{stdout}")
            };
            if !status.success() {
                if mentions_not_supported(&said) {
                    return Ok(TimeSliceState::Unsupported {
                        detail: said.trim().to_owned(),
                    });
                }
                return Err(ControlError::CommandFailed {
                    command: self.command_line(&args),
                    gpu_uuid: gpu_uuid.to_owned(),
                    status: status.to_string(),
                    stderr: said.trim().to_owned(),
                });
            }
            parse_time_slice_listing(&stdout).ok_or_else(|| ControlError::UnparsableOutput {
                command: self.command_line(&args),
                gpu_uuid: gpu_uuid.to_owned(),
                output: stdout,
            })
        })
    }
}

fn mentions_not_supported(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("not supported") || lower.contains("not_supported")
}

/// Reads the time slice out of a `nvidia-smi compute-policy -l` listing for one GPU.
///
/// The listing's layout is not a stable interface, so this looks for the first line that
/// names the time slice (`timeslice`, any case) and takes, after that word, the first token
/// that is an interval name or 0..=3; "Not Supported" or "N/A" on that line means the GPU
/// does not support the setting. `None` when no line names the time slice.
pub fn parse_time_slice_listing(listing: &str) -> Option<TimeSliceState> {
    for line in listing.lines() {
        let lower = line.to_ascii_lowercase();
        let Some(at) = lower.find("timeslice").or_else(|| lower.find("time slice")) else {
            continue;
        };
        let rest = &line[at..];
        if mentions_not_supported(rest) || rest.to_ascii_lowercase().contains("n/a") {
            return Some(TimeSliceState::Unsupported {
                detail: line.trim().to_owned(),
            });
        }
        let value = rest
            .split(|c: char| c.is_whitespace() || matches!(c, ':' | '|' | '=' | ',' | '(' | ')'))
            .skip(1)
            .find_map(TimeSlice::from_token);
        if let Some(value) = value {
            return Some(TimeSliceState::Supported(value));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_slice_args_match_nvidia_smi_values() {
        let all = [
            TimeSlice::Default,
            TimeSlice::Short,
            TimeSlice::Medium,
            TimeSlice::Long,
        ];
        for (i, ts) in all.into_iter().enumerate() {
            assert_eq!(usize::from(ts.as_arg()), i);
            assert_eq!(TimeSlice::from_token(&i.to_string()), Some(ts));
        }
        assert_eq!(TimeSlice::from_token("LONG"), Some(TimeSlice::Long));
        assert_eq!(TimeSlice::from_token("4"), None);
    }

    #[test]
    fn listing_parser_reads_value_and_unsupported() {
        let table = "+------------------+\n| GPU  Policy     Value |\n|   0  Timeslice  Long  |\n";
        assert_eq!(
            parse_time_slice_listing(table),
            Some(TimeSliceState::Supported(TimeSlice::Long))
        );
        assert_eq!(
            parse_time_slice_listing("GPU 00000000:3B:00.0\n    Timeslice : Medium\n"),
            Some(TimeSliceState::Supported(TimeSlice::Medium))
        );
        assert_eq!(
            parse_time_slice_listing("Timeslice: 2"),
            Some(TimeSliceState::Supported(TimeSlice::Medium))
        );
        assert!(matches!(
            parse_time_slice_listing("    Timeslice : Not Supported"),
            Some(TimeSliceState::Unsupported { .. })
        ));
        assert_eq!(parse_time_slice_listing("nothing here"), None);
    }

    #[test]
    fn missing_nvml_library_is_a_clear_init_error() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        let Err(err) = NvmlComputeControl::new(Some(&lib)) else {
            panic!("a missing library must not load");
        };
        assert!(matches!(err, ControlError::NvmlInit { .. }));
        assert!(
            err.to_string().contains(&lib.display().to_string()),
            "{err}"
        );
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("nvidia-smi");
        crate::sharing::mps::test_support::write_script(&path, &format!("#!/bin/sh\n{body}\n"));
        path
    }

    #[tokio::test]
    async fn nvidia_smi_set_passes_uuid_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("argv");
        let smi = script(dir.path(), &format!("echo \"$@\" > {}", record.display()));
        let control = NvidiaSmiTimeSlice::new(smi, Duration::from_secs(10));
        control
            .set_time_slice("GPU-1", TimeSlice::Long)
            .await
            .unwrap();
        let argv = std::fs::read_to_string(record).unwrap();
        assert_eq!(argv.trim(), "compute-policy -i GPU-1 --set-timeslice 3");
    }

    #[tokio::test]
    async fn nvidia_smi_failure_carries_stderr_and_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let smi = script(dir.path(), "echo 'Insufficient Permissions' >&2; exit 4");
        let control = NvidiaSmiTimeSlice::new(smi, Duration::from_secs(10));
        let err = control
            .set_time_slice("GPU-9", TimeSlice::Short)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("GPU-9") && text.contains("Insufficient Permissions"),
            "{text}"
        );
        assert!(text.contains("--set-timeslice 1"), "{text}");
    }

    #[tokio::test]
    async fn nvidia_smi_read_back_and_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let smi = script(dir.path(), "echo '    Timeslice : Short'");
        let control = NvidiaSmiTimeSlice::new(smi, Duration::from_secs(10));
        assert_eq!(
            control.time_slice("GPU-1").await.unwrap(),
            TimeSliceState::Supported(TimeSlice::Short)
        );

        let smi = script(
            dir.path(),
            "echo 'Setting timeslice is Not Supported for GPU' >&2; exit 3",
        );
        let control = NvidiaSmiTimeSlice::new(smi, Duration::from_secs(10));
        assert!(matches!(
            control.time_slice("GPU-1").await.unwrap(),
            TimeSliceState::Unsupported { .. }
        ));

        let missing = NvidiaSmiTimeSlice::new(dir.path().join("absent"), Duration::from_secs(10));
        let err = missing.time_slice("GPU-1").await.unwrap_err();
        assert!(matches!(err, ControlError::Spawn { .. }), "{err}");
    }
}
