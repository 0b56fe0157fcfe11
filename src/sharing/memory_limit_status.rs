//! Tells the claim's owner whether its GPU memory share is enforced: a condition per
//! allocated device in the claim's `status.devices` (KEP-4817 "DRA: Resource Claim Status
//! with possible standardized network interface data", GA in 1.37).
//!
//! Owns the condition (type [`CONDITION_TYPE`]; `True` / reason `HardLimitSet` with the
//! limit and cgroup, or `False` / reason `SchedulingOnly` with why) computed from a
//! checkpoint entry, and one task that follows the checkpoint and server-side applies it
//! (field manager = the driver name, so other drivers' entries are untouched). Runs off the
//! prepare path: prepare never waits on the API server for it; a failed write is retried at
//! the next checkpoint change and after a restart (applying is idempotent).
//!
//! API access: `resourceclaims/status` patch and, with the
//! `DRAResourceClaimGranularStatusAuthorization` gate (beta, on in 1.37), verb
//! `associated-node:patch` on `resourceclaims/driver` named after the driver (upstream
//! `pkg/registry/resource/utils.go`, `AuthorizedForDeviceStatus`).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::warn;

use super::memory_limit::MemoryLimitRecord;
use crate::checkpoint::{Checkpoint, ClaimEntry, ClaimState};

/// Condition type of a device's memory-limit enforcement.
pub const CONDITION_TYPE: &str = "GPUMemoryLimitEnforced";

/// The server-side apply body of `entry`'s device status (memory and compute share
/// conditions), `None` when the claim has neither share record. `now`: RFC 3339 time for `lastTransitionTime`.
pub fn device_status_apply(driver: &str, entry: &ClaimEntry, now: &str) -> Option<Value> {
    let record = MemoryLimitRecord::from_extra(&entry.extra);
    let devices: Vec<Value> = entry
        .devices
        .iter()
        .filter_map(|d| {
            let mut conditions: Vec<Value> = record
                .as_ref()
                .and_then(|r| memory_condition(r, &d.device, now))
                .into_iter()
                .collect();
            // The compute share's condition goes in the same apply (one field manager).
            conditions.extend(super::compute_share_status::condition(
                entry, &d.device, now,
            ));
            if conditions.is_empty() {
                return None;
            }
            let mut device = json!({
                "driver": driver,
                "pool": d.pool,
                "device": d.device,
                "conditions": conditions,
            });
            if let Some(share) = &d.share_id {
                device["shareID"] = json!(share);
            }
            Some(device)
        })
        .collect();
    (!devices.is_empty()).then(|| {
        json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": entry.name, "namespace": entry.namespace},
            "status": {"devices": devices},
        })
    })
}

fn memory_condition(record: &MemoryLimitRecord, device: &str, now: &str) -> Option<Value> {
    let fields = match &record.scheduling_only {
        Some(why) => (
            "False",
            "SchedulingOnly",
            format!("the memory share is not enforced on this node: {why}"),
        ),
        None => {
            let limit = record.applied.iter().find(|a| a.device == device)?;
            (
                "True",
                "HardLimitSet",
                format!(
                    "hard limit {} bytes on GPU {} for pod {} (cgroup {})",
                    limit.hard_bytes,
                    limit.gpu_uuid,
                    limit.pod,
                    limit.cgroup.display()
                ),
            )
        }
    };
    Some(device_condition(CONDITION_TYPE, fields, now))
}

/// A KEP-4817 device condition (`metav1.Condition` shape) of type `kind` with `status`
/// (`True` / `False`), `reason`, `message` and `lastTransitionTime` `now` (RFC 3339).
pub(super) fn device_condition(
    kind: &str,
    (status, reason, message): (&str, &str, String),
    now: &str,
) -> Value {
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    })
}

/// Follows `checkpoint` and applies the device status of every completed claim with a
/// memory share once (again after each restart). Returns when the checkpoint writer stops.
pub async fn report_device_status(
    client: kube::Client,
    driver: String,
    mut checkpoint: watch::Receiver<Arc<Checkpoint>>,
) {
    let mut reported: BTreeMap<String, Value> = BTreeMap::new();
    loop {
        let pending: Vec<(String, ClaimEntry)> = checkpoint
            .borrow_and_update()
            .claims
            .iter()
            .filter(|(_, e)| e.state == ClaimState::PrepareCompleted)
            .map(|(uid, e)| (uid.clone(), e.clone()))
            .collect();
        reported.retain(|uid, _| pending.iter().any(|(u, _)| u == uid));
        for (uid, entry) in pending {
            let now = k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let Some(body) = device_status_apply(&driver, &entry, &now) else {
                continue;
            };
            let key = body["status"]["devices"].clone();
            let mut without_time = key.clone();
            strip_times(&mut without_time);
            if reported.get(&uid) == Some(&without_time) {
                continue;
            }
            let api: Api<ResourceClaim> = Api::namespaced(client.clone(), &entry.namespace);
            let params = PatchParams::apply(&driver).force();
            match api
                .patch_status(&entry.name, &params, &Patch::Apply(&body))
                .await
            {
                Ok(_) => {
                    reported.insert(uid, without_time);
                }
                Err(err) => {
                    warn!(claim.uid = %uid, error = %err, "writing the claim's device status (GPU memory limit) failed; retried at the next change");
                }
            }
        }
        if checkpoint.changed().await.is_err() {
            return;
        }
    }
}

fn strip_times(devices: &mut Value) {
    for d in devices.as_array_mut().into_iter().flatten() {
        for c in d["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::PreparedDeviceRecord;
    use crate::sharing::memory_limit::{AppliedLimit, CHECKPOINT_KEY};
    use crate::sharing::memory_limit_plan::Backend;

    fn entry(record: &MemoryLimitRecord) -> ClaimEntry {
        ClaimEntry {
            state: ClaimState::PrepareCompleted,
            namespace: "ns".into(),
            name: "tgi-a".into(),
            devices: vec![PreparedDeviceRecord {
                pool: "node-a".into(),
                device: "gpu-0".into(),
                request_names: vec!["gpu".into()],
                gpu_uuid: "GPU-1".into(),
                mig_uuid: None,
                cdi_device_ids: vec![],
                sharing: None,
                share_id: Some("6f1d".into()),
            }],
            extra: [(CHECKPOINT_KEY.to_owned(), record.to_value())].into(),
        }
    }

    #[test]
    fn enforced_and_scheduling_only_shares_get_their_condition() {
        let enforced = MemoryLimitRecord {
            applied: vec![AppliedLimit {
                device: "gpu-0".into(),
                gpu_uuid: "GPU-1".into(),
                pod: "ns/tgi-a".into(),
                pod_uid: "p1".into(),
                cgroup: "/sys/fs/cgroup/kubepods/podp1".into(),
                backend: Backend::Dmem,
                soft_bytes: 5,
                hard_bytes: 5,
            }],
            scheduling_only: None,
        };
        let body = device_status_apply("gpu.gpu-dra.dev", &entry(&enforced), "t").unwrap();
        let d = &body["status"]["devices"][0];
        assert_eq!(d["shareID"], "6f1d");
        assert_eq!(d["conditions"][0]["status"], "True");
        assert!(
            d["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .contains("kubepods/podp1")
        );

        let lenient = MemoryLimitRecord {
            applied: vec![],
            scheduling_only: Some("NVIDIA driver 570 ...: upgrade".into()),
        };
        let body = device_status_apply("gpu.gpu-dra.dev", &entry(&lenient), "t").unwrap();
        let c = &body["status"]["devices"][0]["conditions"][0];
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("SchedulingOnly"))
        );

        let mut plain = entry(&lenient);
        plain.extra.clear();
        assert!(device_status_apply("gpu.gpu-dra.dev", &plain, "t").is_none());
    }
}
