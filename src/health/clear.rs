//! Admin requests to clear an unhealthy verdict (`gpu-dra clear-unhealthy`).
//!
//! Owns the request directory `<plugin-dir>/health-clear/`: the command drops one small
//! file per request there (atomically: the file holds the GPU, a UUID or `gpu-<minor>`,
//! or `all`), the running plugin picks requests up every [`CLEAR_POLL`], clears the
//! verdicts in [`HealthState`] (the taints go with the next slice publication, the
//! verdict file with the next write) and deletes the file, which is how the command
//! learns it was done. Plain files keep this usable through `kubectl exec` with no API
//! permission. It must not decide health.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::state::HealthState;
use crate::cdi::writer::write_atomic;

/// Directory of pending clear requests under the plugin directory.
pub const CLEAR_DIR_NAME: &str = "health-clear";
/// How often the plugin looks for clear requests.
pub const CLEAR_POLL: Duration = Duration::from_secs(2);
/// Suffix of a complete request file (temp files never end with it).
const REQUEST_SUFFIX: &str = ".request";
/// Request content meaning every GPU.
pub const ALL_GPUS: &str = "all";

/// Errors of clear requests.
#[derive(Debug, thiserror::Error)]
pub enum ClearError {
    /// The GPU argument is not a GPU UUID, `gpu-<minor>` or `all`.
    #[error("{gpu:?} names no GPU: give a GPU UUID (GPU-...), a device name gpu-<minor>, or all")]
    BadGpu {
        /// The argument.
        gpu: String,
    },
    /// Writing, listing or removing a request failed.
    #[error("clear request {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// `<plugin_dir>/health-clear`.
pub fn clear_dir(plugin_dir: &Path) -> PathBuf {
    plugin_dir.join(CLEAR_DIR_NAME)
}

/// Checks a GPU argument: `GPU-<uuid>`, `gpu-<minor>` or `all`.
pub fn parse_gpu(gpu: &str) -> Result<String, ClearError> {
    let ok = gpu == ALL_GPUS
        || (gpu.starts_with("GPU-")
            && gpu.len() <= 64
            && gpu[4..].bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        || gpu
            .strip_prefix("gpu-")
            .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(gpu.to_string())
    } else {
        Err(ClearError::BadGpu {
            gpu: gpu.to_string(),
        })
    }
}

/// Writes a request to clear `gpu` (checked with [`parse_gpu`]) and returns its path; the
/// plugin deletes the file once it acted on it.
pub fn request_clear(plugin_dir: &Path, gpu: &str) -> Result<PathBuf, ClearError> {
    let gpu = parse_gpu(gpu)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path =
        clear_dir(plugin_dir).join(format!("{nanos}-{}{REQUEST_SUFFIX}", std::process::id()));
    write_atomic(&path, gpu.as_bytes()).map_err(|source| ClearError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Applies and removes every pending request in `plugin_dir`; returns the GPU UUIDs
/// cleared. A request naming nothing valid is removed and logged.
pub fn apply_requests(plugin_dir: &Path, state: &HealthState) -> Result<Vec<String>, ClearError> {
    let dir = clear_dir(plugin_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ClearError::Io { path: dir, source }),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(REQUEST_SUFFIX))
        .collect();
    paths.sort();
    let mut cleared = Vec::new();
    for path in paths {
        let content = std::fs::read_to_string(&path).map_err(|source| ClearError::Io {
            path: path.clone(),
            source,
        })?;
        match parse_gpu(content.trim()) {
            Ok(gpu) => {
                let target = (gpu != ALL_GPUS).then_some(gpu.as_str());
                let done = state.clear(target);
                tracing::warn!(request = %gpu, cleared = ?done, "unhealthy verdict cleared by an admin request");
                cleared.extend(done);
            }
            Err(e) => tracing::warn!(error = %e, path = %path.display(), "ignoring clear request"),
        }
        std::fs::remove_file(&path).map_err(|source| ClearError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(cleared)
}

/// Applies clear requests every [`CLEAR_POLL`] until `stop`.
pub async fn serve_clear_requests(
    plugin_dir: PathBuf,
    state: std::sync::Arc<HealthState>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(CLEAR_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = apply_requests(&plugin_dir, &state) {
            tracing::warn!(error = %e, "reading clear requests");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::state::Health;
    use crate::inventory::fixtures;

    #[test]
    fn gpu_arguments() {
        for ok in [
            "all",
            "gpu-0",
            "gpu-17",
            "GPU-1b2c3d4e-0000-1111-2222-333344445555",
        ] {
            assert_eq!(parse_gpu(ok).unwrap(), ok);
        }
        for bad in ["", "gpu-", "gpu-x", "../x", "GPU-zz", "MIG-abc", "ALL"] {
            assert!(parse_gpu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_clear_by_name_or_all_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = fixtures::dgx_h100();
        let (a, b) = (inventory.gpus[0].clone(), inventory.gpus[3].clone());
        let state = HealthState::new("node-1", inventory, 100);
        state.record_xid(&a.uuid, 79, 200).unwrap();
        state.record_xid(&b.uuid, 48, 200).unwrap();

        let path = request_clear(dir.path(), &a.device_name()).unwrap();
        assert!(path.exists());
        assert_eq!(
            apply_requests(dir.path(), &state).unwrap(),
            vec![a.uuid.clone()]
        );
        assert!(!path.exists(), "the request is consumed");
        assert_eq!(state.unhealthy().keys().collect::<Vec<_>>(), vec![&b.uuid]);

        request_clear(dir.path(), "all").unwrap();
        assert_eq!(apply_requests(dir.path(), &state).unwrap(), vec![b.uuid]);
        assert!(
            state
                .snapshot()
                .devices
                .iter()
                .all(|d| d.health == Health::Healthy)
        );
        assert!(apply_requests(dir.path(), &state).unwrap().is_empty());
        assert!(request_clear(dir.path(), "nonsense").is_err());
    }
}
