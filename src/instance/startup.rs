//! Where a starting instance stands: owner of the node, successor of a running instance
//! (rolling update), or refused; and the wait until it may take over.
//!
//! Owns the start-up order of [`super`]'s hand-over: take the lock or read its holder,
//! [`super::admit`], wait for the predecessor, and remove the sockets an exited
//! predecessor left. It also covers a predecessor that takes no lock (a gpu-dra release
//! from before the instance lock, fixed socket names): with `--pod-uid`, a connectable
//! fixed `dra.sock` means such an instance still serves, so this one forwards to it and
//! takes over only once it is gone, holding the lock meanwhile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::lock::{self, Acquired, Busy, Holder, InstanceLock, LockError};
use super::{AdmitError, admit};

/// How long a second instance waits for the holder's record to become readable.
const HOLDER_RECORD_WAIT: Duration = Duration::from_secs(2);
/// How often a successor of a lock-less instance checks that its registration is gone.
const LOCKLESS_POLL: Duration = Duration::from_millis(200);
/// How often it dials the predecessor's DRA socket (a dead one leaves the file behind).
const LOCKLESS_DIAL_EVERY: u32 = 10;

/// Why an instance cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The lock file could not be used.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Another instance serves the node and this one may not run next to it.
    #[error(transparent)]
    Refused(#[from] AdmitError),
}

/// Where this process stands on the node.
#[derive(Debug)]
pub enum Standing {
    /// Holds the lock; `previous` is the record the last holder (exited) left.
    Owner {
        /// Held for the life of the process.
        lock: InstanceLock,
        /// The previous holder's record.
        previous: Option<Holder>,
    },
    /// Rolling update: `holder` serves the node; the lock comes once it exits.
    Successor {
        /// The lock file, to wait on.
        busy: Busy,
        /// Who holds the lock now.
        holder: Holder,
    },
    /// Holds the lock, but an instance that takes no lock still serves on the fixed
    /// sockets (rolling update from a release before the instance lock).
    AfterLockless {
        /// Held for the life of the process.
        lock: InstanceLock,
        /// The previous holder's record.
        previous: Option<Holder>,
        /// The predecessor's registration socket (fixed name).
        registration_socket: PathBuf,
        /// The predecessor's DRA socket (fixed name).
        dra_socket: PathBuf,
    },
}

impl Standing {
    /// The DRA socket of the instance still serving the node, to forward to.
    pub fn predecessor_dra_socket(&self) -> Option<&Path> {
        match self {
            Standing::Owner { .. } => None,
            Standing::Successor { holder, .. } => Some(&holder.dra_socket),
            Standing::AfterLockless { dra_socket, .. } => Some(dra_socket),
        }
    }

    /// Waits until no other instance serves the node; returns the lock and the previous
    /// holder's record. Immediate for [`Standing::Owner`].
    ///
    /// Errors: [`StartupError::Lock`] when waiting on the lock fails.
    pub async fn take_over(
        self,
        me: &Holder,
    ) -> Result<(InstanceLock, Option<Holder>), StartupError> {
        match self {
            Standing::Owner { lock, previous } => Ok((lock, previous)),
            Standing::Successor { busy, .. } => Ok(busy.wait(me).await?),
            Standing::AfterLockless {
                lock,
                previous,
                registration_socket,
                dra_socket,
            } => {
                wait_lockless_gone(&registration_socket, &dra_socket).await;
                Ok((lock, previous))
            }
        }
    }
}

/// Takes the instance lock in `plugin_dir`, or decides (from `me.pod_uid`) whether this
/// instance may run next to the holder. `fixed_sockets` (registration, DRA) are the fixed
/// names a lock-less predecessor would serve on.
///
/// Errors: [`StartupError::Refused`] naming the holder; [`StartupError::Lock`].
pub async fn claim(
    plugin_dir: &Path,
    me: &Holder,
    fixed_sockets: (PathBuf, PathBuf),
) -> Result<Standing, StartupError> {
    match lock::try_acquire(plugin_dir, me)? {
        Acquired::Held { lock, previous } => {
            info!(lock = %lock.path().display(), "holding the instance lock for this node");
            let (registration_socket, dra_socket) = fixed_sockets;
            if me.pod_uid.is_some() && dra_socket != me.dra_socket && dials(&dra_socket).await {
                info!(dra_socket = %dra_socket.display(), "an instance without the instance lock serves this node");
                return Ok(Standing::AfterLockless {
                    lock,
                    previous,
                    registration_socket,
                    dra_socket,
                });
            }
            Ok(Standing::Owner { lock, previous })
        }
        Acquired::Busy(busy) => {
            // A holder writes its record right after locking: give it a moment.
            let mut holder = busy.holder();
            let deadline = tokio::time::Instant::now() + HOLDER_RECORD_WAIT;
            while holder.is_none() && tokio::time::Instant::now() < deadline {
                // The record is a plain file with no change notification: poll it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                holder = busy.holder();
            }
            let holder = admit(busy.path().to_owned(), me.pod_uid.as_deref(), holder)?;
            Ok(Standing::Successor { busy, holder })
        }
    }
}

async fn dials(socket: &Path) -> bool {
    tokio::net::UnixStream::connect(socket).await.is_ok()
}

/// Returns once the lock-less predecessor removed its registration socket (clean stop)
/// and its DRA socket no longer answers, or its DRA socket stopped answering (killed).
async fn wait_lockless_gone(registration_socket: &Path, dra_socket: &Path) {
    let mut polls = 0u32;
    loop {
        if !registration_socket.exists() && !dials(dra_socket).await {
            return;
        }
        polls += 1;
        if polls.is_multiple_of(LOCKLESS_DIAL_EVERY) && !dials(dra_socket).await {
            return;
        }
        // A release without the lock gives no signal when it exits: poll for it.
        tokio::time::sleep(LOCKLESS_POLL).await;
    }
}

/// Removes the sockets an exited previous holder left (SIGKILL, crash), except paths this
/// instance uses itself; the kubelet would otherwise keep a dead registration.
pub fn remove_sockets_left_by(previous: &Holder, me: &Holder) {
    for path in [&previous.registration_socket, &previous.dra_socket] {
        if *path == me.registration_socket || *path == me.dra_socket {
            continue;
        }
        if let Err(err) = crate::plugin::remove_left_behind(path) {
            warn!(error = %err, "removing a socket the previous instance left");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::UnixSocket;

    fn me(dir: &Path, uid: Option<&str>) -> Holder {
        Holder::this_process(
            uid.map(str::to_owned),
            dir.join(format!("dra-{}.sock", uid.unwrap_or("fixed"))),
            dir.join(format!("reg-{}.sock", uid.unwrap_or("fixed"))),
        )
    }

    fn fixed(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("d-reg.sock"), dir.join("dra.sock"))
    }

    #[tokio::test]
    async fn a_serving_lockless_instance_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, dra) = fixed(dir.path());
        let old_reg = UnixSocket::bind(&reg).unwrap();
        let old_dra = UnixSocket::bind(&dra).unwrap();
        let standing = claim(dir.path(), &me(dir.path(), Some("new")), fixed(dir.path()))
            .await
            .unwrap();
        assert_eq!(standing.predecessor_dra_socket(), Some(dra.as_path()));
        let me = me(dir.path(), Some("new"));
        let waiting = tokio::spawn(async move { standing.take_over(&me).await });
        old_reg.remove().unwrap();
        drop(old_dra); // the listener closes: the old instance has exited
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn stale_fixed_sockets_or_no_pod_uid_make_an_owner() {
        let dir = tempfile::tempdir().unwrap();
        let (_, dra) = fixed(dir.path());
        drop(std::os::unix::net::UnixListener::bind(&dra).unwrap()); // left by a crash
        let standing = claim(dir.path(), &me(dir.path(), Some("new")), fixed(dir.path()))
            .await
            .unwrap();
        assert!(matches!(standing, Standing::Owner { .. }), "{standing:?}");
    }

    #[tokio::test]
    async fn second_instance_without_pod_uid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = claim(dir.path(), &me(dir.path(), Some("a")), fixed(dir.path()))
            .await
            .unwrap();
        let err = claim(dir.path(), &me(dir.path(), None), fixed(dir.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StartupError::Refused(AdmitError::NotRollingUpdate { .. })
            ),
            "{err}"
        );
        let second = claim(dir.path(), &me(dir.path(), Some("b")), fixed(dir.path()))
            .await
            .unwrap();
        assert!(matches!(second, Standing::Successor { .. }));
    }

    #[test]
    fn left_behind_sockets_of_the_previous_holder_go_but_ours_stay() {
        let dir = tempfile::tempdir().unwrap();
        let previous = me(dir.path(), Some("old"));
        let mine = me(dir.path(), Some("new"));
        for path in [
            &previous.registration_socket,
            &previous.dra_socket,
            &mine.dra_socket,
        ] {
            drop(std::os::unix::net::UnixListener::bind(path).unwrap());
        }
        remove_sockets_left_by(&previous, &mine);
        assert!(!previous.registration_socket.exists() && !previous.dra_socket.exists());
        assert!(mine.dra_socket.exists());
    }
}
