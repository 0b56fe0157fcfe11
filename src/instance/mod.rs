//! One plugin instance per node, and the hand-over from one instance to the next during
//! a rolling update.
//!
//! Owns the instance lock ([`lock`]), the decision whether a second instance may start
//! ([`admit`]), the start-up order ([`startup`]) and the driver that serves the kubelet while an instance waits for its
//! turn ([`handover`]). It must not prepare anything itself.
//!
//! # Facts this follows
//!
//! * Kubelet 1.33+ (`pkg/kubelet/cm/dra/plugin`, DRAPluginManager) keeps every
//!   registration of one driver in the order they were added, refuses a second
//!   registration of an endpoint already registered, and sends each call to the most
//!   recently added plugin whose gRPC connection is up (else the most recent one).
//!   Removing a registration socket deregisters that endpoint only; the driver's
//!   ResourceSlices are wiped 30 s after the *last* registration is gone.
//! * The upstream Go helper (`k8s.io/dynamic-resource-allocation/kubeletplugin`,
//!   `RollingUpdate(podUID)`) names the sockets per pod (`<driver>-<pod UID>-reg.sock`,
//!   `dra-<pod UID>.sock`), warns that "there is no guarantee which of the two
//!   instances are used by kubelet" (prepare on one, unprepare on the other), and
//!   serialises calls across instances with a file lock. See
//!   [`crate::plugin::registration_socket_path`] for the names we use.
//!
//! # The hand-over argument
//!
//! Everything a prepare or unprepare changes (checkpoint, CDI specs, compute mode, time
//! slice, MPS daemons) is changed by exactly one process per node: the holder of the
//! instance lock (`<plugin dir>/instance.lock`, `flock(2)`, held from before the
//! checkpoint is read until the process exits).
//!
//! 1. Without `--pod-uid` an instance uses the fixed socket names and refuses to start
//!    while the lock is held, naming the holder (pid, start time, pod UID): two such
//!    instances would overwrite each other's sockets and state.
//! 2. With `--pod-uid` (rolling update) an instance that finds the lock held binds its
//!    own sockets and registers at once, so the kubelet switches to it while the old
//!    instance still runs. Until it holds the lock it reads no state and writes
//!    nothing: it forwards every NodePrepareResources / NodeUnprepareResources call to
//!    the holder's DRA socket (named in the lock file) and returns the holder's answer.
//!    Prepare on the new instance and unprepare on the old one (or the reverse) thus
//!    both land in the holder's single in-memory ledger and checkpoint.
//! 3. The old instance stops on SIGTERM: its registration socket goes first (the
//!    kubelet deregisters it; the new registration keeps the driver usable, so no
//!    slice wipe), in-flight calls finish, the checkpoint writer drains (a write queued
//!    by a call the kubelet gave up on still lands), and only then is the lock released
//!    (at the latest by the kernel at exit). Every answer was sent after its checkpoint
//!    write completed, so the file on disk holds every change it acknowledged.
//! 4. The new instance gets the lock, and only then loads the checkpoint, runs the
//!    start-up recovery (as after a restart: half-done prepares are rolled back, MPS
//!    daemons re-adopted) and starts publishing ResourceSlices. Calls that arrive in
//!    between (the old socket is gone, the lock not yet ours) wait for the take-over,
//!    bounded by [`handover::TAKE_OVER_TIMEOUT`], below the kubelet's 45 s call timeout.
//!    A forwarded call that failed in transport is retried locally; prepare and
//!    unprepare are idempotent, so a call the old instance completed but could not
//!    answer is answered again from the checkpoint, never prepared twice.
//! 5. ResourceSlices: both instances apply the same desired slices with server-side
//!    apply under the same field manager (the driver name), and a reconciler adopts
//!    slices whose content matches at their generation. Only the lock holder runs the
//!    reconciler, so two versions with different slice content never alternate, and
//!    no instance deletes its slices on exit.
//!
//! A predecessor from a release without the instance lock (fixed socket names) is
//! recognised by its fixed DRA socket answering: the new instance takes the lock, but
//! forwards to that socket and takes over only once it stops answering ([`startup`]).
//!
//! The alternative, both instances mutating under a per-call lock and re-reading the
//! checkpoint before each change, would also need the in-memory sharing ledger and MPS
//! supervisor to be rebuilt per call; forwarding keeps a single writer instead.

pub mod handover;
pub mod lock;
pub mod startup;

pub use handover::{HandOverDriver, TAKE_OVER_TIMEOUT, TakeOver};
pub use lock::{Acquired, Busy, Holder, InstanceLock, LOCK_FILE, LockError};

use std::path::PathBuf;

/// Why this instance may not start next to the one that holds the lock.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// This instance has no pod UID: it is not part of a rolling update.
    #[error(
        "another gpu-dra kubelet-plugin already serves this node ({holder}; lock {path}); \
         a second instance for a node may only run as a rolling update: stop the other \
         instance, or give both their pod UID (--pod-uid, GPU_DRA_POD_UID from the \
         downward API fieldRef metadata.uid) and use a DaemonSet updateStrategy \
         RollingUpdate with maxSurge 1 and maxUnavailable 0"
    )]
    NotRollingUpdate {
        /// Lock file path.
        path: PathBuf,
        /// The holder, or "an unknown process".
        holder: String,
    },
    /// The holder runs with the same pod UID, so the socket names would collide.
    #[error(
        "another gpu-dra kubelet-plugin with the same pod UID already serves this node \
         ({holder}; lock {path}); each instance of a rolling update needs its own pod UID: \
         set GPU_DRA_POD_UID from the downward API (fieldRef metadata.uid), not a fixed value"
    )]
    SamePodUid {
        /// Lock file path.
        path: PathBuf,
        /// The holder.
        holder: String,
    },
    /// The lock is held by a process that left no record to forward to.
    #[error(
        "{path} is locked by a process that did not record itself (pid, start time, pod \
         UID, sockets); it is not a gpu-dra instance this one can take over from: find it \
         with `fuser {path}` and stop it"
    )]
    UnknownHolder {
        /// Lock file path.
        path: PathBuf,
    },
}

/// Decides whether an instance with `my_pod_uid` may run next to the lock's `holder`
/// (`None`: no readable record). `Ok` is the holder to hand over from.
///
/// Errors: [`AdmitError`] naming the holder and what to change.
pub fn admit(
    path: PathBuf,
    my_pod_uid: Option<&str>,
    holder: Option<Holder>,
) -> Result<Holder, AdmitError> {
    let describe = |h: &Option<Holder>| {
        h.as_ref()
            .map_or_else(|| "an unknown process".to_owned(), Holder::to_string)
    };
    let Some(mine) = my_pod_uid else {
        return Err(AdmitError::NotRollingUpdate {
            path,
            holder: describe(&holder),
        });
    };
    let Some(holder) = holder else {
        return Err(AdmitError::UnknownHolder { path });
    };
    if holder.pod_uid.as_deref() == Some(mine) {
        return Err(AdmitError::SamePodUid {
            path,
            holder: holder.to_string(),
        });
    }
    Ok(holder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(uid: Option<&str>) -> Holder {
        Holder {
            pid: 9,
            started_at: "2026-12-01T21:40:00Z".into(),
            pod_uid: uid.map(str::to_owned),
            dra_socket: "/k/plugins/d/dra.sock".into(),
            registration_socket: "/k/plugins_registry/d-reg.sock".into(),
        }
    }

    #[test]
    fn without_pod_uid_a_second_instance_is_refused_naming_the_holder() {
        let err = admit("/p/instance.lock".into(), None, Some(holder(Some("old")))).unwrap_err();
        assert!(matches!(&err, AdmitError::NotRollingUpdate { holder, .. }
            if holder == "pid 9 started 2026-12-01T21:40:00Z, pod UID old"));
        let err = admit("/p/instance.lock".into(), None, None).unwrap_err();
        assert!(
            matches!(&err, AdmitError::NotRollingUpdate { holder, .. } if holder == "an unknown process")
        );
    }

    #[test]
    fn rolling_update_hands_over_from_any_recorded_holder() {
        for h in [holder(Some("old")), holder(None)] {
            assert_eq!(
                admit("/p/l".into(), Some("new"), Some(h.clone())).unwrap(),
                h
            );
        }
    }

    #[test]
    fn same_pod_uid_or_unknown_holder_is_refused() {
        assert!(matches!(
            admit("/p/l".into(), Some("x"), Some(holder(Some("x")))),
            Err(AdmitError::SamePodUid { .. })
        ));
        assert!(matches!(
            admit("/p/l".into(), Some("x"), None),
            Err(AdmitError::UnknownHolder { .. })
        ));
    }
}
