//! The instance lock: an exclusive `flock(2)` on `<plugin dir>/instance.lock`, held for
//! the life of the process, and the holder record written into the locked file.
//!
//! Owns opening the lock file (mode 0600, never through a symlink, close-on-exec so MPS
//! daemons and tools started by the plugin do not inherit the lock), taking the lock
//! without waiting or waiting for it on a dedicated thread, and reading and writing the
//! [`Holder`] record (pid, start time, pod UID, socket paths) that names the holder to a
//! second instance. It must not decide what a second instance does: that is
//! [`super::admit`].
//!
//! The kernel releases the lock when the holder's last descriptor closes, which is at
//! process exit at the latest, so a SIGKILLed or crashed holder never leaves it behind.
//! The file is never deleted: removing a lock file while another process waits on the
//! old inode would let two processes "hold" it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

/// File name of the lock inside the plugin data directory.
pub const LOCK_FILE: &str = "instance.lock";

/// Why the instance lock could not be opened, taken or recorded.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened or created (a symlink at the path lands here).
    #[error("cannot open the instance lock {path}")]
    Open {
        /// Lock file path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// `flock(2)` failed for another reason than the lock being held.
    #[error("cannot lock {path}")]
    Lock {
        /// Lock file path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The holder record could not be written into the locked file.
    #[error("cannot write the holder record into {path}")]
    Record {
        /// Lock file path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The thread waiting for the lock went away without an answer.
    #[error("the wait for {path} was interrupted")]
    WaitInterrupted {
        /// Lock file path.
        path: PathBuf,
    },
}

/// Who holds (or last held) the instance lock; JSON in the lock file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// Process id (in the holder's PID namespace; the host's when `hostPID` is set).
    pub pid: u32,
    /// When the holder took the lock, RFC 3339 UTC, e.g. `2026-12-01T21:40:00Z`.
    pub started_at: String,
    /// The holder's pod UID (`--pod-uid`); `None` for an instance with fixed socket names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The holder's DRA service socket (absolute); a successor forwards calls to it.
    pub dra_socket: PathBuf,
    /// The holder's registration socket (absolute).
    pub registration_socket: PathBuf,
}

impl Holder {
    /// The record for this process, started now.
    pub fn this_process(
        pod_uid: Option<String>,
        dra_socket: PathBuf,
        registration_socket: PathBuf,
    ) -> Self {
        Holder {
            pid: std::process::id(),
            started_at: k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .map_or_else(|_| String::new(), |t| t.to_string()),
            pod_uid,
            dra_socket,
            registration_socket,
        }
    }
}

impl std::fmt::Display for Holder {
    /// `pid 42 started 2026-12-01T21:40:00Z, pod UID 1f0c…` (or `no pod UID`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} started {}, ", self.pid, self.started_at)?;
        match &self.pod_uid {
            Some(uid) => write!(f, "pod UID {uid}"),
            None => write!(f, "no pod UID (fixed socket names)"),
        }
    }
}

/// The held instance lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct InstanceLock {
    // Kept open: the lock lives as long as this descriptor.
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file opened while another process holds the lock.
#[derive(Debug)]
pub struct Busy {
    file: File,
    path: PathBuf,
}

/// Result of [`try_acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// This process holds the lock now; `previous` is the last holder's record (a process
    /// that has exited), if one was left.
    Held {
        /// The lock.
        lock: InstanceLock,
        /// The previous holder's record.
        previous: Option<Holder>,
    },
    /// Another process holds the lock.
    Busy(Busy),
}

fn open(dir: &Path) -> Result<(File, PathBuf), LockError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| LockError::Open {
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

/// Reads the holder record at `path`; `None` when missing, empty or being rewritten.
pub fn read_holder(path: &Path) -> Option<Holder> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Takes the lock on `<dir>/instance.lock` without waiting and, if taken, records `me`.
///
/// Errors: [`LockError`] when the file cannot be opened, locked for another reason than
/// being held, or written.
pub fn try_acquire(dir: &Path, me: &Holder) -> Result<Acquired, LockError> {
    let (file, path) = open(dir)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            let previous = read_holder(&path);
            record(&file, &path, me)?;
            Ok(Acquired::Held {
                lock: InstanceLock { _file: file, path },
                previous,
            })
        }
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(Acquired::Busy(Busy { file, path })),
        Err(e) => Err(LockError::Lock {
            path,
            source: e.into(),
        }),
    }
}

fn record(file: &File, path: &Path, me: &Holder) -> Result<(), LockError> {
    let err = |source| LockError::Record {
        path: path.to_owned(),
        source,
    };
    let mut json = serde_json::to_vec(me).map_err(|e| err(e.into()))?;
    json.push(b'\n');
    // Boot-scoped and advisory: a torn record only makes a reader retry, so no fsync.
    file.set_len(0).map_err(err)?;
    file.write_all_at(&json, 0).map_err(err)?;
    let mut f = file;
    f.flush().map_err(err)
}

impl Busy {
    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current holder's record, if it is readable.
    pub fn holder(&self) -> Option<Holder> {
        read_holder(&self.path)
    }

    /// Waits until the holder releases the lock, then records `me`; returns the lock and
    /// the previous holder's record. The wait runs on its own thread (not the runtime's
    /// blocking pool), so an instance stopped while waiting exits at once.
    ///
    /// Errors: [`LockError`] when `flock(2)` or the record write fails.
    pub async fn wait(self, me: &Holder) -> Result<(InstanceLock, Option<Holder>), LockError> {
        let Busy { file, path } = self;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("instance-lock".into())
            .spawn(move || {
                let result = flock(&file, FlockOperation::LockExclusive).map(|()| file);
                let _ = tx.send(result);
            })
            .map_err(|source| LockError::Lock {
                path: path.clone(),
                source,
            })?;
        let file = rx
            .await
            .map_err(|_| LockError::WaitInterrupted { path: path.clone() })?
            .map_err(|e| LockError::Lock {
                path: path.clone(),
                source: e.into(),
            })?;
        let previous = read_holder(&path);
        record(&file, &path, me)?;
        Ok((InstanceLock { _file: file, path }, previous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn holder(pid: u32, uid: Option<&str>) -> Holder {
        Holder {
            pid,
            started_at: "2026-12-01T21:40:00Z".into(),
            pod_uid: uid.map(str::to_owned),
            dra_socket: "/k/plugins/d/dra.sock".into(),
            registration_socket: "/k/plugins_registry/d-reg.sock".into(),
        }
    }

    #[test]
    fn first_takes_second_sees_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = holder(1, Some("uid-a"));
        let Acquired::Held { lock, previous } = try_acquire(dir.path(), &a).unwrap() else {
            panic!("first instance must get the lock")
        };
        assert_eq!(previous, None);
        let mode = std::fs::metadata(lock.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let Acquired::Busy(busy) = try_acquire(dir.path(), &holder(2, None)).unwrap() else {
            panic!("second instance must not get the lock")
        };
        assert_eq!(busy.holder(), Some(a.clone()));
        drop(lock);
        // Released: the next one takes it and learns who was there before.
        let Acquired::Held { previous, .. } = try_acquire(dir.path(), &holder(3, None)).unwrap()
        else {
            panic!("lock must be free after the holder is gone")
        };
        assert_eq!(previous, Some(a));
    }

    #[tokio::test]
    async fn waiter_gets_the_lock_when_the_holder_goes() {
        let dir = tempfile::tempdir().unwrap();
        let a = holder(1, Some("uid-a"));
        let b = holder(2, Some("uid-b"));
        let Acquired::Held { lock, .. } = try_acquire(dir.path(), &a).unwrap() else {
            panic!("first instance must get the lock")
        };
        let Acquired::Busy(busy) = try_acquire(dir.path(), &b).unwrap() else {
            panic!("lock is held")
        };
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { busy.wait(&b).await }
        });
        assert!(!waiting.is_finished());
        drop(lock);
        let (_lock, previous) = waiting.await.unwrap().unwrap();
        assert_eq!(previous, Some(a));
        assert_eq!(read_holder(&dir.path().join(LOCK_FILE)), Some(b));
    }

    #[test]
    fn lock_file_is_not_followed_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(LOCK_FILE)).unwrap();
        let err = try_acquire(dir.path(), &holder(1, None)).unwrap_err();
        assert!(matches!(err, LockError::Open { .. }), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn holder_names_pid_start_and_pod() {
        assert_eq!(
            holder(7, Some("u-1")).to_string(),
            "pid 7 started 2026-12-01T21:40:00Z, pod UID u-1"
        );
        assert!(
            holder(7, None)
                .to_string()
                .ends_with("no pod UID (fixed socket names)")
        );
    }
}
