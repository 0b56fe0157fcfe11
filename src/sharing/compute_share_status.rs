//! The device-status condition telling a claim's owner whether its GPU compute share is
//! enforced (KEP-4817 `status.devices[].conditions`, GA in 1.37), computed from the claim's
//! checkpoint record (pure).
//!
//! Owns the condition type [`CONDITION_TYPE`]: `True` / reason `NamespaceLimitsSet` with
//! the namespace, percentage and pinned memory limit the daemon read back, or `False` /
//! reason `SchedulingOnly` with why. Written by the memory-limit status task together with
//! its own condition (one server-side apply per claim, one field manager), so neither
//! removes the other's. Must not talk to the API server itself.

use serde_json::Value;

use super::compute_share_plan::ComputeShareRecord;
use super::memory_limit_status::device_condition;
use crate::checkpoint::ClaimEntry;

/// Condition type of a device's compute-limit enforcement.
pub const CONDITION_TYPE: &str = "GPUComputeLimitEnforced";

/// The compute condition of `device` in `entry`, if the claim has a compute share record
/// for it. `now`: RFC 3339 time for `lastTransitionTime`.
pub fn condition(entry: &ClaimEntry, device: &str, now: &str) -> Option<Value> {
    let record = ComputeShareRecord::from_extra(&entry.extra)?;
    if record.device != device {
        return None;
    }
    let fields = match &record.scheduling_only {
        Some(why) => (
            "False",
            "SchedulingOnly",
            format!("the compute share is not enforced on this node: {why}"),
        ),
        None => (
            "True",
            "NamespaceLimitsSet",
            format!(
                "MPS v3 namespace {} on GPU {}: active thread percentage {}{}",
                record.namespace,
                record.gpu_uuid,
                record.active_thread_percentage,
                record
                    .pinned_memory_mib
                    .map(|m| format!(", pinned device memory limit {m}M"))
                    .unwrap_or_default()
            ),
        ),
    };
    Some(device_condition(CONDITION_TYPE, fields, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ClaimState;
    use crate::sharing::compute_share_plan::CHECKPOINT_KEY;

    #[test]
    fn enforced_and_scheduling_only_shares_get_their_condition() {
        let mut record = ComputeShareRecord {
            device: "gpu-0".into(),
            gpu_uuid: "GPU-1".into(),
            namespace: "uid-1".into(),
            active_thread_percentage: 40,
            pinned_memory_mib: Some(18432),
            scheduling_only: None,
        };
        let entry = |r: &ComputeShareRecord| ClaimEntry {
            state: ClaimState::PrepareCompleted,
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![],
            extra: [(CHECKPOINT_KEY.to_owned(), r.to_value())].into(),
        };
        let c = condition(&entry(&record), "gpu-0", "t").unwrap();
        assert_eq!(c["status"], "True");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("percentage 40, pinned device memory limit 18432M")
        );
        assert!(condition(&entry(&record), "gpu-1", "t").is_none());
        record.scheduling_only = Some("driver 570 has only MPS v2".into());
        let c = condition(&entry(&record), "gpu-0", "t").unwrap();
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("SchedulingOnly"))
        );
    }
}
