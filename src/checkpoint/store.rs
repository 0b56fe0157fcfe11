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
//! A file that cannot be decoded but was last written before this boot began (`btime` in
//! `/proc/stat`) is a write torn by the crash that ended that boot, not corruption: it is
//! removed and reported as [`LoadOutcome::TornFromPreviousBoot`]. A symbolic link in place
//! of the file is never followed: it is quarantined like a corrupt file. Temp files left by
//! a process killed mid-write are removed at load.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::model::{CHECKPOINT_FILE_NAME, Checkpoint, ClaimEntry, decode, encode};
use crate::state_files::{StateDir, is_symlink_error};

/// The kernel's boot id file.
pub const DEFAULT_BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// The kernel's statistics file, whose `btime` line is the boot time (Unix seconds).
pub const DEFAULT_PROC_STAT_PATH: &str = "/proc/stat";

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
    /// The file could not be decoded and was last written before this boot began: a write
    /// torn by the OS crash that ended the previous boot. Removed; an empty checkpoint is used.
    TornFromPreviousBoot {
        /// Why it could not be decoded.
        reason: String,
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
    /// Leftover temp files of the checkpoint removed (from a process killed mid-write).
    pub temp_files_removed: usize,
}

/// The checkpoint file and the boot id source.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
    dir: StateDir,
    boot_id_path: PathBuf,
    proc_stat_path: PathBuf,
}

impl CheckpointStore {
    /// A store for `<plugin_dir>/checkpoint.json`, comparing against the boot id read
    /// from `boot_id_path` (normally [`DEFAULT_BOOT_ID_PATH`]).
    pub fn new(plugin_dir: &Path, boot_id_path: &Path) -> Self {
        Self {
            path: plugin_dir.join(CHECKPOINT_FILE_NAME),
            dir: StateDir::at(plugin_dir),
            boot_id_path: boot_id_path.to_path_buf(),
            proc_stat_path: PathBuf::from(DEFAULT_PROC_STAT_PATH),
        }
    }

    /// The same store reading the boot time from `proc_stat` instead of `/proc/stat`.
    pub fn with_proc_stat(mut self, proc_stat: &Path) -> Self {
        self.proc_stat_path = proc_stat.to_path_buf();
        self
    }

    /// The boot time (`btime` of `/proc/stat`); `None` when unreadable.
    fn boot_time(&self) -> Option<SystemTime> {
        let stat = fs::read_to_string(&self.proc_stat_path).ok()?;
        let secs = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(UNIX_EPOCH + Duration::from_secs(secs))
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
        let temp_files_removed = self
            .dir
            .remove_temp_files(CHECKPOINT_FILE_NAME)
            .unwrap_or_else(|e| {
                tracing::warn!(dir = %self.dir.path().display(), error = %e, "removing leftover checkpoint temp files failed");
                0
            });
        let loaded = |checkpoint, outcome| Loaded {
            checkpoint,
            outcome,
            temp_files_removed,
        };
        let read_err = |e| CheckpointError::Read {
            path: self.path.clone(),
            source: Arc::new(e),
        };
        let bytes = match self.dir.read(CHECKPOINT_FILE_NAME) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(loaded(Checkpoint::new(boot_id), LoadOutcome::Fresh)),
            Err(e) if is_symlink_error(&e) || self.dir.is_symlink(CHECKPOINT_FILE_NAME) => {
                let path = self.quarantine()?;
                let reason =
                    "it is a symbolic link; the plugin never follows links in its directory"
                        .to_string();
                return Ok(loaded(
                    Checkpoint::new(boot_id),
                    LoadOutcome::Quarantined { path, reason },
                ));
            }
            Err(e) => return Err(read_err(e)),
        };
        match decode(&bytes) {
            Err(reason) if self.written_before_boot() => {
                self.dir.remove(CHECKPOINT_FILE_NAME).map_err(read_err)?;
                Ok(loaded(
                    Checkpoint::new(boot_id),
                    LoadOutcome::TornFromPreviousBoot { reason },
                ))
            }
            Err(reason) => {
                let path = self.quarantine()?;
                Ok(loaded(
                    Checkpoint::new(boot_id),
                    LoadOutcome::Quarantined { path, reason },
                ))
            }
            Ok(cp) if cp.boot_id != boot_id => Ok(loaded(
                Checkpoint::new(boot_id),
                LoadOutcome::PreviousBoot {
                    previous_boot_id: cp.boot_id,
                    stale_claims: cp.claims,
                },
            )),
            Ok(cp) => Ok(loaded(cp, LoadOutcome::Loaded)),
        }
    }

    /// Whether the checkpoint file was last modified before this boot began.
    fn written_before_boot(&self) -> bool {
        match (self.dir.modified(CHECKPOINT_FILE_NAME), self.boot_time()) {
            (Ok(Some(modified)), Some(boot)) => modified < boot,
            _ => false,
        }
    }

    /// Writes `checkpoint` atomically (temp file, rename; no fsync: boot-scoped, see the
    /// module docs of [`crate::checkpoint`]), creating the plugin dir (0700) when missing.
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let bytes = encode(checkpoint).map_err(|e| CheckpointError::Encode {
            path: self.path.clone(),
            source: Arc::new(e),
        })?;
        let write_err = |e| CheckpointError::Write {
            path: self.path.clone(),
            source: Arc::new(e),
        };
        StateDir::create(self.dir.path(), true)
            .map_err(write_err)?
            .replace(CHECKPOINT_FILE_NAME, &bytes)
            .map_err(write_err)
    }

    /// Renames the checkpoint to `checkpoint.json.corrupt-<UTC time>` (with `.N` added if
    /// taken); a symbolic link is moved, not followed.
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
        let to_name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.dir
            .rename(CHECKPOINT_FILE_NAME, &to_name)
            .map_err(|e| err(&to, e))?;
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
                outcome: LoadOutcome::Loaded,
                temp_files_removed: 0,
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
    fn torn_file_written_before_this_boot_is_previous_boot_not_corruption() {
        let f = fixture("boot-b");
        let dir = f.store.path().parent().expect("dir").to_path_buf();
        fs::create_dir_all(&dir).expect("dir");
        fs::write(f.store.path(), b"{\"version\": 1, \"bo").expect("torn");
        // The boot began after the file was written (an hour from now).
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("now")
            .as_secs()
            + 3600;
        let stat = f.dir.path().join("stat");
        fs::write(&stat, format!("cpu  1 2 3\nbtime {boot}\nprocesses 9\n")).expect("stat");
        let store = f.store.clone().with_proc_stat(&stat);
        let loaded = store.load().expect("load");
        assert!(
            matches!(&loaded.outcome, LoadOutcome::TornFromPreviousBoot { reason } if reason.starts_with("not valid JSON")),
            "{:?}",
            loaded.outcome
        );
        assert_eq!(loaded.checkpoint, Checkpoint::new("boot-b"));
        assert!(files(&dir).is_empty(), "removed, not quarantined");
        // The same bytes written during this boot are corruption.
        fs::write(f.store.path(), b"{\"version\": 1, \"bo").expect("torn");
        let stat_past = f.dir.path().join("stat-past");
        fs::write(&stat_past, "btime 1000\n").expect("stat");
        let loaded = f
            .store
            .clone()
            .with_proc_stat(&stat_past)
            .load()
            .expect("load");
        assert!(matches!(loaded.outcome, LoadOutcome::Quarantined { .. }));
    }

    #[test]
    fn symlinked_checkpoint_is_quarantined_without_being_followed() {
        let f = fixture("boot-a");
        let dir = f.store.path().parent().expect("dir").to_path_buf();
        fs::create_dir_all(&dir).expect("dir");
        let target = f.dir.path().join("elsewhere.json");
        let mut cp = Checkpoint::new("boot-a");
        cp.claims.insert("u".into(), entry());
        fs::write(&target, encode(&cp).expect("encode")).expect("target");
        std::os::unix::fs::symlink(&target, f.store.path()).expect("link");
        let loaded = f.store.load().expect("load");
        let LoadOutcome::Quarantined { path, reason } = &loaded.outcome else {
            panic!("expected quarantine, got {:?}", loaded.outcome);
        };
        assert!(reason.contains("symbolic link"), "{reason}");
        assert!(
            fs::symlink_metadata(path)
                .expect("moved")
                .file_type()
                .is_symlink()
        );
        assert!(
            loaded.checkpoint.claims.is_empty(),
            "the link's target is not read"
        );
        f.store.save(&cp).expect("save");
        assert!(
            !fs::symlink_metadata(f.store.path())
                .expect("file")
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read(&target).expect("target"),
            encode(&cp).expect("encode")
        );
    }

    #[test]
    fn leftover_temp_files_are_removed_at_load_and_modes_are_exact() {
        use std::os::unix::fs::PermissionsExt;
        let f = fixture("boot-a");
        f.store.save(&Checkpoint::new("boot-a")).expect("save");
        let dir = f.store.path().parent().expect("dir").to_path_buf();
        fs::write(dir.join(".checkpoint.json.0123abcd.tmp"), b"{").expect("temp");
        fs::write(dir.join(".checkpoint.json.4567.tmp"), b"").expect("temp");
        let loaded = f.store.load().expect("load");
        assert_eq!(loaded.temp_files_removed, 2);
        assert_eq!(files(&dir), ["checkpoint.json"]);
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(f.store.path()), 0o600);
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
