//! The unhealthy verdicts on disk, so a restarted plugin keeps an unhealthy GPU tainted.
//!
//! Owns `<plugin-dir>/health.json` (versioned JSON: the node's boot id and the unhealthy
//! GPUs) and the task that rewrites it whenever the set changes. Verdicts are
//! boot-scoped, like the checkpoint: a reboot resets every GPU, so a file from another
//! boot is ignored (and replaced on the next change). A file that cannot be decoded is
//! moved aside (`health.json.corrupt`) and reported; the plugin then starts with every
//! GPU healthy. Writes are atomic (temp + fsync + rename + directory fsync); losing the
//! last write to an OS crash is harmless because the boot id changes with it. It must not
//! decide health (that is `state`).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::state::UnhealthyGpus;
use crate::cdi::writer::write_atomic;

/// File name of the verdict file in the plugin directory.
pub const VERDICTS_FILE_NAME: &str = "health.json";
/// Version written in the verdict file.
pub const VERDICTS_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VerdictFile {
    version: u32,
    boot_id: String,
    gpus: UnhealthyGpus,
}

/// Errors reading or writing the verdict file.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// The file exists but could not be read, or could not be moved aside.
    #[error("cannot read GPU health verdicts {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file could not be written.
    #[error("cannot write GPU health verdicts {path}")]
    Write {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// How the verdict file was found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerdictsLoaded {
    /// No file: every GPU starts healthy.
    Fresh,
    /// Verdicts of this boot, restored.
    Restored(UnhealthyGpus),
    /// Verdicts of boot `boot_id`: the reboot reset the GPUs; dropped.
    PreviousBoot {
        /// The file's boot id.
        boot_id: String,
        /// How many GPUs it listed.
        gpus: usize,
    },
    /// Undecodable; moved to `moved_to`.
    Corrupt {
        /// Where the file went.
        moved_to: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

impl VerdictsLoaded {
    /// The verdicts to start with.
    pub fn into_gpus(self) -> UnhealthyGpus {
        match self {
            VerdictsLoaded::Restored(gpus) => gpus,
            _ => UnhealthyGpus::new(),
        }
    }
}

/// The verdict file of one plugin directory for the current boot.
#[derive(Debug, Clone)]
pub struct VerdictStore {
    path: PathBuf,
    boot_id: String,
}

impl VerdictStore {
    /// The store `<plugin_dir>/health.json` for boot `boot_id`.
    pub fn new(plugin_dir: &Path, boot_id: impl Into<String>) -> Self {
        Self {
            path: plugin_dir.join(VERDICTS_FILE_NAME),
            boot_id: boot_id.into(),
        }
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the verdicts; only I/O failures are errors.
    pub fn load(&self) -> Result<VerdictsLoaded, VerdictError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VerdictsLoaded::Fresh),
            Err(source) => {
                return Err(VerdictError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let reason = match serde_json::from_slice::<VerdictFile>(&bytes) {
            Ok(f) if f.version != VERDICTS_VERSION => {
                format!(
                    "version {} (this plugin writes {VERDICTS_VERSION})",
                    f.version
                )
            }
            Ok(f) if f.boot_id != self.boot_id => {
                return Ok(VerdictsLoaded::PreviousBoot {
                    boot_id: f.boot_id,
                    gpus: f.gpus.len(),
                });
            }
            Ok(f) => return Ok(VerdictsLoaded::Restored(f.gpus)),
            Err(e) => e.to_string(),
        };
        let moved_to = self.path.with_extension("json.corrupt");
        std::fs::rename(&self.path, &moved_to).map_err(|source| VerdictError::Read {
            path: self.path.clone(),
            source,
        })?;
        Ok(VerdictsLoaded::Corrupt { moved_to, reason })
    }

    /// Writes `gpus` for the current boot atomically.
    pub fn save(&self, gpus: &UnhealthyGpus) -> Result<(), VerdictError> {
        let file = VerdictFile {
            version: VERDICTS_VERSION,
            boot_id: self.boot_id.clone(),
            gpus: gpus.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| VerdictError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(|source| VerdictError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes the verdicts on every change of `unhealthy` until `stop` (the first value too,
/// so a file of a previous boot is replaced). A failed write is logged and retried on
/// the next change.
pub async fn persist_verdicts(
    store: VerdictStore,
    mut unhealthy: watch::Receiver<UnhealthyGpus>,
    stop: CancellationToken,
) {
    loop {
        let gpus = unhealthy.borrow_and_update().clone();
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.save(&gpus)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "persisting GPU health verdicts"),
            Err(e) => tracing::warn!(error = %e, "GPU health verdict writer failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = unhealthy.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::state::UnhealthyGpu;

    fn gpus() -> UnhealthyGpus {
        UnhealthyGpus::from([(
            "GPU-a".to_string(),
            UnhealthyGpu {
                xid: 79,
                since: 1_700_000_000,
                message: "XID 79".into(),
                gone: false,
            },
        )])
    }

    #[test]
    fn round_trip_within_a_boot_and_dropped_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let store = VerdictStore::new(dir.path(), "boot-1");
        assert_eq!(store.load().unwrap(), VerdictsLoaded::Fresh);
        store.save(&gpus()).unwrap();
        assert_eq!(store.load().unwrap(), VerdictsLoaded::Restored(gpus()));
        let rebooted = VerdictStore::new(dir.path(), "boot-2");
        assert_eq!(
            rebooted.load().unwrap(),
            VerdictsLoaded::PreviousBoot {
                boot_id: "boot-1".into(),
                gpus: 1
            }
        );
        assert!(rebooted.load().unwrap().into_gpus().is_empty());
    }

    #[test]
    fn undecodable_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = VerdictStore::new(dir.path(), "boot-1");
        std::fs::write(store.path(), b"{\"version\": 1, \"bootId\": ").unwrap();
        let VerdictsLoaded::Corrupt { moved_to, .. } = store.load().unwrap() else {
            panic!("corrupt file accepted");
        };
        assert!(moved_to.exists());
        assert!(!store.path().exists());
        std::fs::write(
            store.path(),
            br#"{"version": 9, "bootId": "boot-1", "gpus": {}}"#,
        )
        .unwrap();
        assert!(matches!(
            store.load().unwrap(),
            VerdictsLoaded::Corrupt { reason, .. } if reason.contains("version 9")
        ));
    }

    #[tokio::test]
    async fn every_change_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = VerdictStore::new(dir.path(), "boot-1");
        let (tx, rx) = watch::channel(UnhealthyGpus::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(persist_verdicts(store.clone(), rx, stop.clone()));
        tx.send_replace(gpus());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if store.load().unwrap() == VerdictsLoaded::Restored(gpus()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not written in time"
            );
            tokio::task::yield_now().await;
        }
        stop.cancel();
        task.await.unwrap();
    }
}
