//! Loads and saves the checkpoint file, quarantining files it cannot use.
//!
//! Owns `<plugin-dir>/checkpoint.json` and its `checkpoint.json.corrupt-<UTC time>`
//! siblings. Must not decide what to do with the claims it returns (the prepare module
//! rolls back `PrepareStarted` entries and handles stale ones). Unlike NVIDIA's driver,
//! a corrupt or unknown-version file never crash-loops the plugin: it is moved aside,
//! reported through [`LoadOutcome::Quarantined`], and an empty checkpoint is used.
//! A checkpoint recorded under another boot id describes state the reboot wiped (CDI
//! specs on tmpfs, compute policies, MPS daemons): it is reported as
//! [`LoadOutcome::PreviousBoot`] with its claims, and the returned checkpoint is empty.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::model::{CHECKPOINT_FILE_NAME, Checkpoint, ClaimEntry, decode, encode};
use crate::cdi::writer::{sync_dir, write_atomic};

/// The kernel's boot id file.
pub const DEFAULT_BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Errors of checkpoint file operations (cheap to clone: one write error is shared by
/// every caller of a batched write).
#[derive(Debug, Clone, Error)]
pub enum CheckpointError {
    /// The boot id file could not be read.
    #[error("cannot read node boot id from {path}")]
    BootId {
        /// Boot id path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// The checkpoint exists but could not be read (permissions, I/O): not quarantined,
    /// since the content may be fine.
    #[error("cannot read checkpoint {path}")]
    Read {
        /// Checkpoint path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// Moving an unusable checkpoint aside failed.
    #[error("cannot move unusable checkpoint {path} aside to {to}")]
    Quarantine {
        /// Checkpoint path.
        path: PathBuf,
        /// Intended new name.
        to: PathBuf,
        /// Cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// Serialising failed (a bug: the model holds only JSON-safe data).
    #[error("cannot serialise checkpoint {path}")]
    Encode {
        /// Checkpoint path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// Writing, syncing or renaming the checkpoint failed; the previous file is intact.
    #[error("cannot write checkpoint {path}")]
    Write {
        /// Checkpoint path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// The checkpoint writer task has stopped.
    #[error("checkpoint writer has stopped")]
    WriterStopped,
}

/// What `load` found.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome {
    /// No checkpoint file: first start on this node (or after a wipe).
    Fresh,
    /// The file was read and belongs to this boot.
    Loaded,
    /// The file was recorded under another boot; its claims are returned here and were
    /// dropped from the returned checkpoint.
    PreviousBoot {
        /// Boot id stored in the file.
        previous_boot_id: String,
        /// The claims it held (state the reboot wiped).
        stale_claims: BTreeMap<String, ClaimEntry>,
    },
    /// The file was unusable and has been moved to `path`; an empty checkpoint is used.
    Quarantined {
        /// Where the unusable file now is.
        path: PathBuf,
        /// Why it was unusable (parse error, unknown version, checksum mismatch).
        reason: String,
    },
}

/// The result of `load`: the checkpoint to run with and how it was obtained.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Checkpoint for the current boot.
    pub checkpoint: Checkpoint,
    /// What happened; anything but `Fresh`/`Loaded` deserves a log line and a Node Event.
    pub outcome: LoadOutcome,
}

/// The checkpoint file and the boot id source.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
    boot_id_path: PathBuf,
}

impl CheckpointStore {
    /// A store for `<plugin_dir>/checkpoint.json`, comparing against the boot id read
    /// from `boot_id_path` (normally [`DEFAULT_BOOT_ID_PATH`]).
    pub fn new(plugin_dir: &Path, boot_id_path: &Path) -> Self {
        Self {
            path: plugin_dir.join(CHECKPOINT_FILE_NAME),
            boot_id_path: boot_id_path.to_path_buf(),
        }
    }

    /// The checkpoint file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the current boot id (trimmed).
    pub fn current_boot_id(&self) -> Result<String, CheckpointError> {
        fs::read_to_string(&self.boot_id_path)
            .map(|s| s.trim().to_string())
            .map_err(|e| CheckpointError::BootId {
                path: self.boot_id_path.clone(),
                source: Arc::new(e),
            })
    }

    /// Loads the checkpoint: missing -> empty ([`LoadOutcome::Fresh`]); unusable -> moved
    /// aside ([`LoadOutcome::Quarantined`]); other boot -> emptied
    /// ([`LoadOutcome::PreviousBoot`]). Only I/O failures are errors.
    pub fn load(&self) -> Result<Loaded, CheckpointError> {
        let boot_id = self.current_boot_id()?;
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Loaded {
                    checkpoint: Checkpoint::new(boot_id),
                    outcome: LoadOutcome::Fresh,
                });
            }
            Err(e) => {
                return Err(CheckpointError::Read {
                    path: self.path.clone(),
                    source: Arc::new(e),
                });
            }
        };
        match decode(&bytes) {
            Err(reason) => {
                let path = self.quarantine()?;
                Ok(Loaded {
                    checkpoint: Checkpoint::new(boot_id),
                    outcome: LoadOutcome::Quarantined { path, reason },
                })
            }
            Ok(cp) if cp.boot_id != boot_id => Ok(Loaded {
                checkpoint: Checkpoint::new(boot_id),
                outcome: LoadOutcome::PreviousBoot {
                    previous_boot_id: cp.boot_id,
                    stale_claims: cp.claims,
                },
            }),
            Ok(cp) => Ok(Loaded {
                checkpoint: cp,
                outcome: LoadOutcome::Loaded,
            }),
        }
    }

    /// Writes `checkpoint` atomically (temp file, fsync, rename, directory fsync),
    /// creating the plugin dir when missing.
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let bytes = encode(checkpoint).map_err(|e| CheckpointError::Encode {
            path: self.path.clone(),
            source: Arc::new(e),
        })?;
        write_atomic(&self.path, &bytes).map_err(|e| CheckpointError::Write {
            path: self.path.clone(),
            source: Arc::new(e),
        })
    }

    /// Renames the checkpoint to `checkpoint.json.corrupt-<UTC time>` (with `.N` added if
    /// taken) and fsyncs the directory.
    fn quarantine(&self) -> Result<PathBuf, CheckpointError> {
        let stamp = utc_stamp(SystemTime::now());
        let base = format!("{}.corrupt-{stamp}", self.path.display());
        let mut to = PathBuf::from(&base);
        let mut n = 1;
        while to.exists() {
            to = PathBuf::from(format!("{base}.{n}"));
            n += 1;
        }
        let err = |to: &PathBuf, e| CheckpointError::Quarantine {
            path: self.path.clone(),
            to: to.clone(),
            source: Arc::new(e),
        };
        fs::rename(&self.path, &to).map_err(|e| err(&to, e))?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir).map_err(|e| err(&to, e))?;
        }
        Ok(to)
    }
}

/// `YYYYMMDDTHHMMSSZ` for `t` (UTC), for quarantine file names.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian, era-based arithmetic).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::model::{ClaimState, PreparedDeviceRecord};
    use std::time::Duration;

    struct Fixture {
        dir: tempfile::TempDir,
        store: CheckpointStore,
    }

    fn fixture(boot_id: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = dir.path().join("boot_id");
        fs::write(&boot, format!("{boot_id}\n")).expect("boot id");
        // The plugin dir does not exist yet: save must create it and fsync it.
        let store = CheckpointStore::new(&dir.path().join("plugins/gpu.gpu-dra.dev"), &boot);
        Fixture { dir, store }
    }

    fn entry() -> ClaimEntry {
        ClaimEntry {
            state: ClaimState::PrepareStarted,
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![PreparedDeviceRecord {
                pool: "node".into(),
                device: "gpu-1-mig-1g10gb-19-0".into(),
                request_names: vec!["mig/small".into()],
                gpu_uuid: "GPU-p".into(),
                mig_uuid: Some("MIG-m".into()),
                cdi_device_ids: vec!["gpu-dra.dev/claim=u-gpu-1-mig-1g10gb-19-0".into()],
                sharing: None,
                share_id: None,
            }],
            extra: [("mps".to_string(), serde_json::json!({"pid": 42}))].into(),
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn missing_file_is_fresh_and_round_trip_works() {
        let f = fixture("boot-a");
        let loaded = f.store.load().expect("load");
        assert_eq!(loaded.outcome, LoadOutcome::Fresh);
        assert_eq!(loaded.checkpoint, Checkpoint::new("boot-a"));
        let mut cp = loaded.checkpoint;
        cp.claims.insert("u".into(), entry());
        f.store.save(&cp).expect("save");
        let again = f.store.load().expect("load");
        assert_eq!(
            again,
            Loaded {
                checkpoint: cp,
                outcome: LoadOutcome::Loaded
            }
        );
        assert_eq!(
            files(f.store.path().parent().expect("dir")),
            ["checkpoint.json"]
        );
    }

    #[test]
    fn corrupt_file_is_quarantined_and_a_fresh_one_works() {
        let f = fixture("boot-a");
        let dir = f.store.path().parent().expect("dir").to_path_buf();
        fs::create_dir_all(&dir).expect("dir");
        fs::write(f.store.path(), b"{\"version\": 1, \"claims\": {").expect("corrupt");
        let loaded = f.store.load().expect("load never fails on content");
        let LoadOutcome::Quarantined { path, reason } = &loaded.outcome else {
            panic!("expected quarantine, got {:?}", loaded.outcome);
        };
        assert!(reason.starts_with("not valid JSON"), "{reason}");
        assert_eq!(
            fs::read(path).expect("moved"),
            b"{\"version\": 1, \"claims\": {"
        );
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with("checkpoint.json.corrupt-") && name.ends_with('Z'),
            "{name}"
        );
        assert_eq!(loaded.checkpoint, Checkpoint::new("boot-a"));
        // Running on: the fresh checkpoint saves and loads.
        let mut cp = loaded.checkpoint;
        cp.claims.insert("u".into(), entry());
        f.store.save(&cp).expect("save");
        assert_eq!(f.store.load().expect("load").outcome, LoadOutcome::Loaded);
        // A second corrupt file in the same second gets its own name.
        fs::write(f.store.path(), b"garbage").expect("corrupt");
        fs::write(f.store.path(), b"garbage").expect("corrupt");
        let LoadOutcome::Quarantined { path: second, .. } = f.store.load().expect("load").outcome
        else {
            panic!("expected quarantine");
        };
        assert_ne!(&second, path);
        assert_eq!(files(&dir).len(), 2);
    }

    #[test]
    fn unknown_version_is_quarantined() {
        let f = fixture("boot-a");
        fs::create_dir_all(f.store.path().parent().expect("dir")).expect("dir");
        fs::write(
            f.store.path(),
            br#"{"version": 7, "bootId": "boot-a", "claims": {}}"#,
        )
        .expect("write");
        let loaded = f.store.load().expect("load");
        match loaded.outcome {
            LoadOutcome::Quarantined { reason, .. } => {
                assert_eq!(reason, "unknown version 7; this plugin reads version 1");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!f.store.path().exists());
    }

    #[test]
    fn boot_id_change_reports_stale_claims() {
        let f = fixture("boot-a");
        let mut cp = Checkpoint::new("boot-a");
        cp.claims.insert("u".into(), entry());
        f.store.save(&cp).expect("save");
        fs::write(f.dir.path().join("boot_id"), "boot-b\n").expect("reboot");
        let loaded = f.store.load().expect("load");
        assert_eq!(loaded.checkpoint, Checkpoint::new("boot-b"));
        assert_eq!(
            loaded.outcome,
            LoadOutcome::PreviousBoot {
                previous_boot_id: "boot-a".into(),
                stale_claims: cp.claims
            }
        );
    }

    #[test]
    fn io_errors_are_errors_not_quarantine() {
        let f = fixture("boot-a");
        let missing_boot = CheckpointStore::new(f.dir.path(), &f.dir.path().join("nope"));
        assert!(matches!(
            missing_boot.load(),
            Err(CheckpointError::BootId { .. })
        ));
        // The checkpoint path is a directory: reading fails, nothing is moved.
        fs::create_dir_all(f.store.path()).expect("dir in the way");
        assert!(matches!(f.store.load(), Err(CheckpointError::Read { .. })));
        assert!(f.store.path().is_dir());
        let err = f
            .store
            .save(&Checkpoint::new("boot-a"))
            .expect_err("cannot replace a dir");
        assert!(err.to_string().contains("checkpoint.json"), "{err}");
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "20261118T110640Z"
        );
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "20000229T000000Z"
        );
    }
}
