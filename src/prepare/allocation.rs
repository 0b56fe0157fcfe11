//! The part of a ResourceClaim's allocation result this plugin must prepare.
//!
//! Pure: takes a claim object (already checked for UID and allocation by
//! [`crate::claims`]), returns the device results for one driver and pool (the node).

use k8s_openapi::api::resource::v1::ResourceClaim;
use thiserror::Error;

/// One allocated device of a claim, for this driver on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedDevice {
    /// The request as the allocation names it: `req` or, for a prioritized-list
    /// sub-request, `req/sub`.
    pub request: String,
    /// Pool name (the node name for this driver).
    pub pool: String,
    /// Device name in the pool (`gpu-0`, `gpu-1-mig-1g10gb-19-0`).
    pub device: String,
    /// Share id set by the scheduler for devices allocated more than once (consumable
    /// capacity), passed back to the kubelet unchanged.
    pub share_id: Option<String>,
    /// Whether the device was allocated with admin access (monitoring: no policy applied).
    pub admin_access: bool,
}

impl AllocatedDevice {
    /// The request name the kubelet matches against containers: the part before `/`.
    pub fn base_request(&self) -> &str {
        base_request(&self.request)
    }
}

/// Why a claim cannot be prepared from its allocation result.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllocationError {
    /// The allocation holds no device of this driver on this node.
    #[error(
        "claim {namespace}/{name} has no device allocated by driver {driver} in pool {pool}: the kubelet called the wrong plugin, or the allocation is for another node"
    )]
    NoDevices {
        /// Claim namespace.
        namespace: String,
        /// Claim name.
        name: String,
        /// This plugin's driver name.
        driver: String,
        /// This plugin's pool (node) name.
        pool: String,
    },
}

/// The base request name of an allocation result's request (`req/sub` -> `req`).
pub fn base_request(request: &str) -> &str {
    request.split_once('/').map_or(request, |(base, _)| base)
}

/// Returns the devices of `claim` allocated by `driver` in `pool`, in allocation order.
///
/// Errors: [`AllocationError::NoDevices`] when no result is for this driver and pool (an
/// unallocated claim has none).
pub fn allocated_devices(
    claim: &ResourceClaim,
    driver: &str,
    pool: &str,
) -> Result<Vec<AllocatedDevice>, AllocationError> {
    let allocation = claim.status.as_ref().and_then(|s| s.allocation.as_ref());
    let results = allocation
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_deref())
        .unwrap_or_default();
    let ours: Vec<AllocatedDevice> = results
        .iter()
        .filter(|r| r.driver == driver && r.pool == pool)
        .map(|r| AllocatedDevice {
            request: r.request.clone(),
            pool: r.pool.clone(),
            device: r.device.clone(),
            share_id: r.share_id.clone(),
            admin_access: r.admin_access.unwrap_or(false),
        })
        .collect();
    if ours.is_empty() {
        return Err(AllocationError::NoDevices {
            namespace: claim.metadata.namespace.clone().unwrap_or_default(),
            name: claim.metadata.name.clone().unwrap_or_default(),
            driver: driver.to_owned(),
            pool: pool.to_owned(),
        });
    }
    Ok(ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(status: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "c", "uid": "uid-1"},
            "spec": {"devices": {"requests": []}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn picks_results_of_this_driver_and_pool() {
        let c = claim(json!({"allocation": {"devices": {"results": [
            {"request": "gpus/h100", "driver": "gpu.gpu-dra.dev", "pool": "node-a", "device": "gpu-0"},
            {"request": "nic", "driver": "net.example.com", "pool": "node-a", "device": "eth0"},
            {"request": "gpus", "driver": "gpu.gpu-dra.dev", "pool": "node-b", "device": "gpu-1"},
        ]}}}));
        let got = allocated_devices(&c, "gpu.gpu-dra.dev", "node-a").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].device, "gpu-0");
        assert_eq!(got[0].base_request(), "gpus");
    }

    #[test]
    fn unallocated_and_foreign_claims_have_no_devices() {
        let c = claim(json!({}));
        assert!(matches!(
            allocated_devices(&c, "d", "p"),
            Err(AllocationError::NoDevices { .. })
        ));
        let c = claim(json!({"allocation": {"devices": {"results": [
            {"request": "r", "driver": "other", "pool": "p", "device": "x"}]}}}));
        let err = allocated_devices(&c, "d", "p").unwrap_err();
        assert!(
            err.to_string().contains("no device allocated by driver d"),
            "{err}"
        );
    }
}
