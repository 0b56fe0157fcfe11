//! Event series: counted where the event happens, by one-line hooks, into one
//! process-wide registry.
//!
//! Owns `gpu_dra_node_prepare_resources_duration_seconds`,
//! `gpu_dra_node_unprepare_resources_duration_seconds`, `gpu_dra_claim_errors_total`,
//! `gpu_dra_xid_events_total`, `gpu_dra_slice_publish_duration_seconds`,
//! `gpu_dra_slice_publish_failures_total`, and, for the info series, the containers of
//! this node's pods per claim (fed by the pod watch, [`super::pods`]) with the pods the
//! prepare path saw in each claim's `status.reservedFor` as a fallback. Hooks never block
//! and never fail.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceClaim;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use super::pods::PodIndex;
use crate::checkpoint::Checkpoint;
use crate::prepare::PrepareError;
use crate::sharing::SharingError;
use crate::slices::reconcile::PublishStatus;

/// Labels of the RPC latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `success` when every claim of the call succeeded, else `error`.
    pub result: &'static str,
}

/// Labels of `gpu_dra_claim_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `prepare` or `unprepare`.
    pub operation: &'static str,
    /// See [`reason`].
    pub reason: &'static str,
}

/// Labels of `gpu_dra_xid_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabels {
    /// The XID code.
    pub xid: u64,
}

fn rpc_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

struct Events {
    registry: Registry,
    prepare: Family<RpcLabels, Histogram, fn() -> Histogram>,
    unprepare: Family<RpcLabels, Histogram, fn() -> Histogram>,
    claim_errors: Family<ErrorLabels, Counter>,
    xid: Family<XidLabels, Counter>,
    publish: Histogram,
    publish_failures: Counter,
    pods: Mutex<BTreeMap<String, Vec<String>>>,
    pod_index: Mutex<PodIndex>,
}

static EVENTS: LazyLock<Events> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let prepare = Family::new_with_constructor(rpc_histogram as fn() -> Histogram);
    let unprepare = Family::new_with_constructor(rpc_histogram as fn() -> Histogram);
    let claim_errors = Family::default();
    let xid = Family::default();
    let publish = Histogram::new(exponential_buckets(0.005, 2.0, 12));
    let publish_failures = Counter::default();
    registry.register(
        "gpu_dra_node_prepare_resources_duration_seconds",
        "NodePrepareResources calls from the kubelet, seconds, by result",
        prepare.clone(),
    );
    registry.register(
        "gpu_dra_node_unprepare_resources_duration_seconds",
        "NodeUnprepareResources calls from the kubelet, seconds, by result",
        unprepare.clone(),
    );
    registry.register(
        "gpu_dra_claim_errors",
        "Claims answered with an error, by operation and reason",
        claim_errors.clone(),
    );
    registry.register(
        "gpu_dra_xid_events",
        "NVML XID events seen on this node's GPUs, by XID code",
        xid.clone(),
    );
    registry.register(
        "gpu_dra_slice_publish_duration_seconds",
        "ResourceSlice reconcile passes, seconds",
        publish.clone(),
    );
    registry.register(
        "gpu_dra_slice_publish_failures",
        "ResourceSlice reconcile passes that failed",
        publish_failures.clone(),
    );
    Events {
        registry,
        prepare,
        unprepare,
        claim_errors,
        xid,
        publish,
        publish_failures,
        pods: Mutex::new(BTreeMap::new()),
        pod_index: Mutex::new(PodIndex::default()),
    }
});

/// Which kubelet RPC a latency belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// NodePrepareResources.
    Prepare,
    /// NodeUnprepareResources.
    Unprepare,
}

/// Records one RPC of `elapsed`; `ok` when no claim of the call failed.
pub fn observe_rpc(rpc: Rpc, ok: bool, elapsed: Duration) {
    let labels = RpcLabels {
        result: if ok { "success" } else { "error" },
    };
    let family = match rpc {
        Rpc::Prepare => &EVENTS.prepare,
        Rpc::Unprepare => &EVENTS.unprepare,
    };
    family.get_or_create(&labels).observe(elapsed.as_secs_f64());
}

/// The `reason` label of a claim error: `claim` (ResourceClaim not readable or not
/// usable), `plan` (devices or configs do not fit this node), `policy_conflict` (another
/// claim holds the GPU under another policy), `sharing` (NVML, nvidia-smi or MPS failed),
/// `device_nodes`, `cdi`, `checkpoint`, `dynamic_mig` (creating or destroying a MIG instance).
pub fn reason(err: &PrepareError) -> &'static str {
    match err {
        PrepareError::Claim(_) => "claim",
        PrepareError::Plan(_) => "plan",
        PrepareError::Sharing(e) if matches!(**e, SharingError::Conflict(_)) => "policy_conflict",
        PrepareError::Sharing(_) => "sharing",
        PrepareError::DeviceNodes(_) => "device_nodes",
        PrepareError::Cdi(_) => "cdi",
        PrepareError::Checkpoint(_) => "checkpoint",
        PrepareError::DynamicMig(_) => "dynamic_mig",
    }
}

/// Counts one failed claim of `operation` (`prepare` or `unprepare`).
pub fn claim_error(operation: &'static str, err: &PrepareError) {
    EVENTS
        .claim_errors
        .get_or_create(&ErrorLabels {
            operation,
            reason: reason(err),
        })
        .inc();
}

/// Counts one XID event.
pub fn xid_event(xid: u64) {
    EVENTS.xid.get_or_create(&XidLabels { xid }).inc();
}

/// Remembers the pods in the claim's `status.reservedFor` (the pods the kubelet prepares
/// it for), by claim UID; read by the info series.
pub fn record_claim_pods(claim_uid: &str, claim: &ResourceClaim) {
    let pods: Vec<String> = claim
        .status
        .as_ref()
        .and_then(|s| s.reserved_for.as_ref())
        .into_iter()
        .flatten()
        .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or("").is_empty())
        .map(|r| r.name.clone())
        .collect();
    let mut map = EVENTS.pods.lock().unwrap_or_else(PoisonError::into_inner);
    map.insert(claim_uid.to_owned(), pods);
}

/// Forgets the pods of a claim that was unprepared (or failed to prepare).
pub fn forget_claim(claim_uid: &str) {
    let mut map = EVENTS.pods.lock().unwrap_or_else(PoisonError::into_inner);
    map.remove(claim_uid);
}

/// Hook of the node-scoped pod watch: keeps the containers of this node's pods per claim.
pub fn pod_event(event: &watcher::Event<Pod>) {
    EVENTS
        .pod_index
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .apply(event);
}

/// Pods using one claim, each with the containers that use it (empty: none named).
pub type ClaimUsers = Vec<(String, Vec<String>)>;

/// The pods and containers using each claim of `checkpoint`, by claim UID: this node's
/// pods that reference the claim (from the pod watch); where the watch knows none, the
/// pods of the claim's `status.reservedFor` as prepare saw it, without containers.
/// (Entries are removed by [`forget_claim`], not here: a claim being prepared is
/// recorded before it reaches the checkpoint.)
pub fn claim_pods(checkpoint: &Checkpoint) -> BTreeMap<String, ClaimUsers> {
    let reserved = EVENTS.pods.lock().unwrap_or_else(PoisonError::into_inner);
    let index = EVENTS
        .pod_index
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    checkpoint
        .claims
        .iter()
        .filter_map(|(uid, entry)| {
            let mut users = index.users(&entry.namespace, &entry.name);
            if users.is_empty() {
                users = reserved
                    .get(uid)?
                    .iter()
                    .map(|pod| (pod.clone(), Vec::new()))
                    .collect();
            }
            Some((uid.clone(), users))
        })
        .collect()
}

/// Follows the reconciler's status channel until it closes: every pass it reports is one
/// observation of its duration, and a failed one is counted. A receiver only sees the
/// latest value, so passes closer together than a scheduling delay may be counted once.
pub async fn follow_publish(mut status: watch::Receiver<PublishStatus>) {
    while status.changed().await.is_ok() {
        let current = status.borrow_and_update().clone();
        EVENTS.publish.observe(current.last_pass.as_secs_f64());
        if current.last_error.is_some() {
            EVENTS.publish_failures.inc();
        }
    }
}

/// Appends the event series (no `# EOF`).
pub fn encode(out: &mut String) -> Result<(), std::fmt::Error> {
    prometheus_client::encoding::text::encode_registry(out, &EVENTS.registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_and_xid_counts_appear_in_the_exposition() {
        observe_rpc(Rpc::Prepare, true, Duration::from_millis(3));
        observe_rpc(Rpc::Unprepare, false, Duration::from_millis(1));
        xid_event(79);
        claim_error(
            "prepare",
            &PrepareError::Checkpoint(crate::checkpoint::CheckpointError::WriterStopped),
        );
        let mut out = String::new();
        encode(&mut out).expect("encode");
        assert!(
            out.contains("gpu_dra_node_prepare_resources_duration_seconds_bucket{le=\"0.004\",result=\"success\"}")
                || out.contains("gpu_dra_node_prepare_resources_duration_seconds_bucket{result=\"success\",le=\"0.004\"}"),
            "{out}"
        );
        assert!(
            out.contains(
                "gpu_dra_node_unprepare_resources_duration_seconds_count{result=\"error\"}"
            ),
            "{out}"
        );
        assert!(
            out.contains("gpu_dra_xid_events_total{xid=\"79\"}"),
            "{out}"
        );
        assert!(
            out.contains(
                "gpu_dra_claim_errors_total{operation=\"prepare\",reason=\"checkpoint\"} 1"
            ),
            "{out}"
        );
    }
}
