//! Share claims allocated by the test as the scheduler allocates a share of a GPU
//! published with `allowMultipleAllocations` (KEP-5075): the claim, its pod bound to the
//! node, and the claim's status with the allocation result (`consumedCapacity`,
//! `shareID`), any opaque GpuConfig the allocation carries, and `reservedFor` the pod.
//!
//! Owns: creating those objects, and waiting for such a pod to run while its plugin lives.
//! Must not: hold product logic.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use std::time::Duration;

use super::cluster::TestBox;
use super::driver::{DRIVER, Plugin};

/// What the allocation of one share claim holds.
#[derive(Debug, Clone, Default)]
pub struct ShareAllocation {
    /// The request's `capacity.requests` (`{"memory": "4Gi"}`), none without.
    pub capacity: Option<Value>,
    /// The result's `consumedCapacity`; with it the result gets a fresh `shareID`.
    pub consumed: Option<Value>,
    /// Opaque GpuConfig parameters of the allocation (as the scheduler copies claim configs).
    pub config: Option<Value>,
}

/// Creates claim `name` (one request `gpu` of the GPU device class) and pod `name` on
/// `node` using it, and writes the claim's status: allocated gpu-0 of pool `node` as
/// `allocation` says, reserved for the pod. Returns the pod and the patched claim.
pub async fn allocated_share(
    client: &kube::Client,
    (ns, node): (&str, &str),
    name: &str,
    allocation: ShareAllocation,
) -> anyhow::Result<(Pod, ResourceClaim)> {
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut request = json!({
        "deviceClassName": "gpu.gpu-dra.dev", "allocationMode": "ExactCount", "count": 1});
    if let Some(capacity) = allocation.capacity {
        request["capacity"] = json!({ "requests": capacity });
    }
    let claim: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": request}]}},
    }))?;
    claims.create(&PostParams::default(), &claim).await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            "containers": [{"name": "ctr", "image": "registry.example/tgi:none",
                            "resources": {"claims": [{"name": "gpu"}]}}],
        },
    }))?;
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let mut result = json!({"request": "gpu", "driver": DRIVER, "pool": node, "device": "gpu-0"});
    if let Some(consumed) = allocation.consumed {
        result["shareID"] = json!(uuid::Uuid::new_v4().to_string());
        result["consumedCapacity"] = consumed;
    }
    let mut devices = json!({"results": [result]});
    if let Some(parameters) = allocation.config {
        devices["config"] = json!([{"source": "FromClaim", "requests": ["gpu"],
            "opaque": {"driver": DRIVER, "parameters": parameters}}]);
    }
    let status = json!({"status": {
        "allocation": {
            "devices": devices,
            "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [node]}]}]},
        },
        "reservedFor": [{"resource": "pods", "name": name, "uid": pod.metadata.uid}],
    }});
    let claim = claims
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok((pod, claim))
}

/// Waits up to `step` for pod `name` of `pods` to be Running, failing as soon as `plugin`
/// exits; an error carries the last `log_lines` lines of the plugin's log.
pub async fn pod_running(
    b: &TestBox,
    (plugin, log_lines): (&Plugin, usize),
    pods: &Api<Pod>,
    name: &str,
    step: Duration,
) -> anyhow::Result<()> {
    b.wait(step, &format!("pod {name} Running"), || async {
        plugin.check_alive()?;
        let p = pods.get(name).await?;
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        Ok((phase == "Running").then_some(()))
    })
    .await
    .map_err(|e| e.context(plugin.log_tail(log_lines)))
}
