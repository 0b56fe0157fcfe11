//! Kubernetes Events (`events.k8s.io/v1`) posted by the node plugin, on its Node and, where
//! a claim is involved, on the ResourceClaim.
//!
//! Owns every Event the plugin emits: the reasons, types, actions and notes, which objects
//! they regard, and their aggregation. Hooks elsewhere ([`notify`] and the helpers below)
//! only describe what happened ([`Notice`]); they never block, never fail and make no API
//! call. One task ([`run`]) turns notices into Events ([`postings`], pure) and alone talks
//! to the API server, through kube-runtime's [`Recorder`]: a repeat of the same reason on
//! the same object (within its cache time, 6 minutes) patches the first Event's
//! `series.count` and `series.lastObservedTime` instead of creating another object, as
//! client-go's event recorder does for `events.k8s.io/v1`.
//!
//! Must not: change plugin state, or make a hook wait on the API server (an unreachable
//! API server drops Events once the bounded queue is full; they are logged).
//!
//! | reason | type | regarding | when |
//! |---|---|---|---|
//! | `DeviceUnhealthy` | Warning | Node; each ResourceClaim prepared on the GPU | a critical XID made a GPU unhealthy |
//! | `PolicyConflict` | Warning | ResourceClaim and Node | prepare refused: the GPU is held under another sharing policy |
//! | `MPSDaemonFailed` | Warning | ResourceClaim and Node | the claim's MPS control daemon could not be started, configured or stopped (prepare, unprepare), or not recovered at start-up |
//! | `MPSDaemonRestarted` | Warning | ResourceClaim and Node | after a plugin restart the claim's daemon no longer answered and was started afresh (its clients lost their MPS server) |
//! | `ResourceSlicePublishFailing` | Warning | Node | ResourceSlice publishing has failed for longer than the threshold (one Event per outage) |
//! | `ResourceSlicePublishRecovered` | Normal | Node | publishing succeeded again after such an outage |
//! | `CheckpointQuarantined`, `CheckpointFromPreviousBoot`, `CheckpointRebuilt`, `CheckpointRebuildDeferred` | see `run` | Node | checkpoint load and recovery |

pub mod publish;

use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{mpsc, watch};

use crate::checkpoint::Checkpoint;
use crate::plugin::ClaimRef;
use crate::prepare::PrepareError;
use crate::sharing::{MpsRecovery, SharingError};

/// Notices waiting for the poster; beyond this a notice is dropped (and logged).
pub const QUEUE: usize = 256;
/// Longest note the API server accepts (`events.k8s.io/v1` validation), in bytes.
pub const MAX_NOTE: usize = 1024;

/// Something Event-worthy that happened, as the hook saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A critical XID made the GPU unhealthy (with all its devices).
    DeviceUnhealthy {
        /// Physical GPU UUID.
        gpu_uuid: String,
        /// The XID code.
        xid: u64,
        /// The health module's message (what it means, what to do).
        message: String,
    },
    /// Prepare of `claim` was refused: its GPU is held under another policy.
    PolicyConflict {
        /// The refused claim.
        claim: ClaimRef,
        /// The conflict, naming the holder.
        message: String,
    },
    /// The MPS control daemon of `claim` could not be started, configured, stopped or
    /// recovered.
    MpsDaemonFailed {
        /// The claim.
        claim: ClaimRef,
        /// What the plugin was doing: `PrepareClaim`, `UnprepareClaim` or `RecoverClaims`.
        action: &'static str,
        /// What failed.
        message: String,
    },
    /// The MPS control daemon of the claim with this UID was started afresh at start-up.
    MpsDaemonRestarted {
        /// Claim UID (namespace and name come from the checkpoint).
        claim_uid: String,
    },
    /// ResourceSlice publishing has failed for `failing_for`.
    SlicePublishFailing {
        /// How long it has failed, in whole seconds.
        failing_for_secs: u64,
        /// The last error.
        error: String,
    },
    /// Publishing works again after an outage of `failed_for_secs`.
    SlicePublishRecovered {
        /// How long it failed, in whole seconds.
        failed_for_secs: u64,
    },
    /// Any other Event on the Node (checkpoint load and recovery).
    Node {
        /// Normal or Warning.
        warning: bool,
        /// CamelCase reason.
        reason: String,
        /// CamelCase action.
        action: String,
        /// Human-readable note.
        note: String,
    },
}

static SINK: Mutex<Option<mpsc::Sender<Notice>>> = Mutex::new(None);

/// Opens the process's notice queue and returns its receiving end (for [`run`]); a later
/// call replaces the queue. Until then notices are dropped.
pub fn install() -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(QUEUE);
    *SINK.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    rx
}

/// Queues `notice` for the poster. Never blocks and never fails: without a poster, or
/// with a full queue, the notice is dropped and logged.
pub fn notify(notice: Notice) {
    let sink = SINK.lock().unwrap_or_else(PoisonError::into_inner).clone();
    match sink {
        Some(tx) => {
            if let Err(err) = tx.try_send(notice) {
                tracing::warn!(error = %err, "Event queue full or closed; Event dropped");
            }
        }
        None => tracing::debug!(?notice, "no Event poster; Event dropped"),
    }
}

/// Hook of the prepare loop: a refused claim gets an Event when it is a policy conflict
/// or an MPS daemon failure (other errors are answered to the kubelet, which posts its own
/// `FailedPrepareDynamicResources` on the pod).
pub fn claim_failed(operation: &str, claim: &ClaimRef, err: &PrepareError) {
    if let Some(notice) = claim_notice(operation, claim, err) {
        notify(notice);
    }
}

/// The notice for a claim whose `operation` (`prepare` or `unprepare`) failed, if its
/// error is Event-worthy (see [`claim_failed`]).
pub fn claim_notice(operation: &str, claim: &ClaimRef, err: &PrepareError) -> Option<Notice> {
    let PrepareError::Sharing(sharing) = err else {
        return None;
    };
    let message = crate::prepare::error_chain(err);
    match **sharing {
        SharingError::Conflict(_) => Some(Notice::PolicyConflict {
            claim: claim.clone(),
            message,
        }),
        SharingError::Mps(_) => Some(Notice::MpsDaemonFailed {
            claim: claim.clone(),
            action: if operation == "unprepare" {
                "UnprepareClaim"
            } else {
                "PrepareClaim"
            },
            message,
        }),
        _ => None,
    }
}

/// Hook of the XID watch: `gpu_uuid` just became unhealthy.
pub fn device_unhealthy(gpu_uuid: &str, xid: u64, message: &str) {
    notify(Notice::DeviceUnhealthy {
        gpu_uuid: gpu_uuid.to_owned(),
        xid,
        message: message.to_owned(),
    });
}

/// Start-up recovery: an Event per MPS daemon restarted or not recoverable.
pub fn mps_recovered(mps: &MpsRecovery, checkpoint: &Checkpoint) {
    for uid in &mps.restarted {
        notify(Notice::MpsDaemonRestarted {
            claim_uid: uid.clone(),
        });
    }
    for (uid, err) in &mps.failed {
        if let Some(claim) = claim_ref(checkpoint, uid) {
            notify(Notice::MpsDaemonFailed {
                claim,
                action: "RecoverClaims",
                message: crate::prepare::error_chain(err),
            });
        }
    }
}

fn claim_ref(checkpoint: &Checkpoint, uid: &str) -> Option<ClaimRef> {
    checkpoint.claims.get(uid).map(|entry| ClaimRef {
        namespace: entry.namespace.clone(),
        name: entry.name.clone(),
        uid: uid.to_owned(),
    })
}

/// The reference of a Node (cluster-scoped; its Events live in `default`). Its `uid` is
/// the node name, the kubelet's convention for node Events, which `kubectl describe node`
/// searches for (it looks up the node's UID and its name as UID).
pub fn node_reference(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_owned()),
        uid: Some(node.to_owned()),
        ..ObjectReference::default()
    }
}

/// The reference of a ResourceClaim (`resource.k8s.io/v1`); its Events live in its namespace.
pub fn claim_reference(claim: &ClaimRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("resource.k8s.io/v1".into()),
        kind: Some("ResourceClaim".into()),
        namespace: Some(claim.namespace.clone()),
        name: Some(claim.name.clone()),
        uid: Some(claim.uid.clone()),
        ..ObjectReference::default()
    }
}

/// One Event to post.
#[derive(Debug, Clone, PartialEq)]
pub struct Posting {
    /// The object the Event is about (`regarding`).
    pub regarding: ObjectReference,
    /// A second object involved (`related`).
    pub related: Option<ObjectReference>,
    /// `Warning` when true, else `Normal`.
    pub warning: bool,
    /// CamelCase reason (what happened).
    pub reason: String,
    /// CamelCase action (what the plugin was doing).
    pub action: String,
    /// Human-readable note, at most [`MAX_NOTE`] bytes.
    pub note: String,
}

impl Posting {
    /// The kube-runtime Event to publish about [`Self::regarding`].
    pub fn to_event(&self) -> Event {
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.clone(),
            note: Some(self.note.clone()),
            action: self.action.clone(),
            secondary: self.related.clone(),
        }
    }
}

fn truncate(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
}

fn posting(
    regarding: &ObjectReference,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
    related: Option<ObjectReference>,
) -> Posting {
    Posting {
        regarding: regarding.clone(),
        related,
        warning,
        reason: reason.into(),
        action: action.into(),
        note: truncate(note),
    }
}

/// The Event pair of a claim: one on the claim (related: the Node), one on the Node
/// (related: the claim).
fn on_claim_and_node(
    node: &ObjectReference,
    claim: &ClaimRef,
    reason: &str,
    action: &str,
    note: String,
) -> Vec<Posting> {
    let claim_ref = claim_reference(claim);
    vec![
        posting(
            &claim_ref,
            true,
            reason,
            action,
            note.clone(),
            Some(node.clone()),
        ),
        posting(
            node,
            true,
            reason,
            action,
            format!("ResourceClaim {}/{}: {note}", claim.namespace, claim.name),
            Some(claim_ref),
        ),
    ]
}

/// The Events for `notice` on `node`; claims on an unhealthy GPU and the names of
/// restarted daemons' claims are read from `checkpoint`. Pure.
pub fn postings(notice: &Notice, node: &ObjectReference, checkpoint: &Checkpoint) -> Vec<Posting> {
    match notice {
        Notice::DeviceUnhealthy {
            gpu_uuid,
            xid,
            message,
        } => {
            let mut out = vec![posting(node,
                    true,
                    "DeviceUnhealthy",
                    "WatchDeviceHealth",
                    format!("GPU {gpu_uuid}: XID {xid}: {message}"),
                    None,
                )];
            for (uid, entry) in &checkpoint.claims {
                let devices: Vec<&str> = entry
                    .devices
                    .iter()
                    .filter(|d| &d.gpu_uuid == gpu_uuid)
                    .map(|d| d.device.as_str())
                    .collect();
                if devices.is_empty() {
                    continue;
                }
                let claim = ClaimRef {
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                    uid: uid.clone(),
                };
                out.push(posting(&claim_reference(&claim),
                        true,
                        "DeviceUnhealthy",
                        "WatchDeviceHealth",
                        format!(
                            "device {} of this claim is on GPU {gpu_uuid}, unhealthy after XID {xid}: {message}",
                            devices.join(", ")
                        ),
                        Some(node.clone()),
                    ));
            }
            out
        }
        Notice::PolicyConflict { claim, message } => on_claim_and_node(
            node,
            claim,
            "PolicyConflict",
            "PrepareClaim",
            format!("prepare refused: {message}"),
        ),
        Notice::MpsDaemonFailed {
            claim,
            action,
            message,
        } => on_claim_and_node(
            node,
            claim,
            "MPSDaemonFailed",
            action,
            format!("MPS control daemon failed: {message}"),
        ),
        Notice::MpsDaemonRestarted { claim_uid } => match claim_ref(checkpoint, claim_uid) {
            Some(claim) => on_claim_and_node(
                node,
                &claim,
                "MPSDaemonRestarted",
                "RecoverClaims",
                "the claim's MPS control daemon did not answer after a plugin restart and was started afresh with the claim's limits; CUDA processes connected to the old daemon must be restarted".into(),
            ),
            None => vec![posting(node,
                    true,
                    "MPSDaemonRestarted",
                    "RecoverClaims",
                    format!("MPS control daemon of claim {claim_uid} restarted after a plugin restart"),
                    None,
                )],
        },
        Notice::SlicePublishFailing {
            failing_for_secs,
            error,
        } => vec![posting(node,
                true,
                "ResourceSlicePublishFailing",
                "PublishResourceSlices",
                format!(
                    "publishing this node's ResourceSlices has failed for {failing_for_secs}s (retrying with backoff); the scheduler works from the last published devices; last error: {error}"
                ),
                None,
            )],
        Notice::SlicePublishRecovered { failed_for_secs } => vec![posting(node,
                false,
                "ResourceSlicePublishRecovered",
                "PublishResourceSlices",
                format!("ResourceSlices published again after failing for {failed_for_secs}s"),
                None,
            )],
        Notice::Node {
            warning,
            reason,
            action,
            note,
        } => vec![posting(node, *warning, reason, action, note.clone(), None)],
    }
}

/// Posts the Events of every notice from `notices` until the queue closes or `stop`
/// fires. `reporter` is the driver name, `node` this node (also the reporting instance).
pub async fn run(
    client: kube::Client,
    reporter: String,
    node: String,
    checkpoint: watch::Receiver<std::sync::Arc<Checkpoint>>,
    mut notices: mpsc::Receiver<Notice>,
    stop: tokio_util::sync::CancellationToken,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: reporter,
            instance: Some(node.clone()),
        },
    );
    let node_ref = node_reference(&node);
    loop {
        let notice = tokio::select! {
            () = stop.cancelled() => return,
            next = notices.recv() => match next {
                Some(n) => n,
                None => return,
            },
        };
        let snapshot = std::sync::Arc::clone(&checkpoint.borrow());
        for posting in postings(&notice, &node_ref, &snapshot) {
            tracing::info!(
                reason = %posting.reason,
                regarding.kind = posting.regarding.kind.as_deref().unwrap_or_default(),
                regarding.name = posting.regarding.name.as_deref().unwrap_or_default(),
                "posting Event"
            );
            if let Err(err) = recorder
                .publish(&posting.to_event(), &posting.regarding)
                .await
            {
                tracing::warn!(reason = %posting.reason, error = %err, "posting an Event failed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
