//! The seam between the gRPC edge and whatever prepares claims.
//!
//! Owns the plain data the kubelet names (claim references) and answers (prepared
//! devices), free of generated proto types, so the prepare state machine can be
//! tested without gRPC.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

/// One claim named in a kubelet request (`Claim` message: namespace, uid, name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimRef {
    /// Namespace of the ResourceClaim.
    pub namespace: String,
    /// Name of the ResourceClaim.
    pub name: String,
    /// UID of the ResourceClaim the kubelet saw; the key of every answer.
    pub uid: String,
}

impl fmt::Display for ClaimRef {
    /// Formats as `namespace/name (uid)`, the form used in logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// One prepared device as answered to the kubelet (`Device` message).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreparedDevice {
    /// Base request names (no `/sub-request` suffix) this device satisfies; empty means
    /// every container referencing the claim gets it.
    pub request_names: Vec<String>,
    /// Pool the device was allocated from (our pools are named after the node).
    pub pool_name: String,
    /// Device name within the pool, e.g. `gpu-0`.
    pub device_name: String,
    /// Fully qualified CDI device ids, e.g. `gpu-dra.dev/claim=<uid>-gpu-0`.
    pub cdi_device_ids: Vec<String>,
    /// Share id of a shareable allocation (consumable capacity); sent on DRA v1 only.
    pub share_id: Option<String>,
}

/// Prepares and unprepares claims for the kubelet; implemented by the prepare module.
///
/// Both calls must be idempotent (the kubelet repeats them after restarts and
/// timeouts) and answer per claim: the returned map is keyed by claim UID, and one bad
/// claim must not fail the others. A claim missing from the answer is reported to the
/// kubelet as failed ([`crate::plugin::MISSING_ANSWER`]) and retried by it. Error
/// strings go verbatim to the kubelet and the pod's events: say what is wrong and what
/// to do.
pub trait NodeDriver: Send + Sync + 'static {
    /// Prepares every claim; key: claim UID, value: its devices or an error message.
    fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> impl Future<Output = BTreeMap<String, Result<Vec<PreparedDevice>, String>>> + Send;

    /// Unprepares every claim (success for claims never prepared); key: claim UID.
    fn unprepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> impl Future<Output = BTreeMap<String, Result<(), String>>> + Send;
}
