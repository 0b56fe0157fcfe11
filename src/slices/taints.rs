//! Unhealthy GPUs -> device taints (pure).
//!
//! Owns the taint this driver puts on the devices of a GPU made unhealthy by a critical
//! XID (KEP-5055 device taints, `resource.k8s.io/v1` `Device.taints`, GA in 1.37): key
//! `<driver name>/xid` (the key NVIDIA's reference driver uses, so tolerations written
//! for it keep working under `--driver-name gpu.nvidia.com`), value the XID, effect
//! NoSchedule (the scheduler allocates no new claim from the device) or NoExecute (the
//! controller-manager also evicts the pods using it), `timeAdded` the verdict's time. A
//! full GPU and every MIG device on it get the same taint. It must not do I/O nor decide
//! health (that is `health`).

use k8s_openapi::api::resource::v1::DeviceTaint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::health::UnhealthyGpus;

/// What a device taint does to claims and pods (KEP-5055 effects this driver uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TaintEffect {
    /// No new allocation of the device; running pods stay.
    #[default]
    #[value(name = "NoSchedule")]
    NoSchedule,
    /// No new allocation, and pods using the device are evicted.
    #[value(name = "NoExecute")]
    NoExecute,
}

impl TaintEffect {
    /// The API spelling (`NoSchedule`, `NoExecute`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// Key of the unhealthy taint for driver `driver`: `<driver>/xid`.
pub fn unhealthy_taint_key(driver: &str) -> String {
    format!("{driver}/xid")
}

/// The unhealthy GPUs and how to taint their devices: input of
/// `desired::desired_slices_with`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthTaints {
    /// Taint key, see [`unhealthy_taint_key`].
    pub key: String,
    /// Effect of the taint.
    pub effect: TaintEffect,
    /// Unhealthy GPUs by GPU UUID.
    pub gpus: UnhealthyGpus,
}

impl HealthTaints {
    /// The taints of driver `driver` with `effect` for `gpus`.
    pub fn new(driver: &str, effect: TaintEffect, gpus: UnhealthyGpus) -> Self {
        Self {
            key: unhealthy_taint_key(driver),
            effect,
            gpus,
        }
    }

    /// True when GPU `uuid` is unhealthy.
    pub fn is_unhealthy(&self, uuid: &str) -> bool {
        self.gpus.contains_key(uuid)
    }

    /// The taint for the devices of GPU `uuid`, `None` while it is healthy.
    pub fn taint_for(&self, uuid: &str) -> Option<DeviceTaint> {
        let gpu = self.gpus.get(uuid)?;
        Some(DeviceTaint {
            key: self.key.clone(),
            value: Some(gpu.xid.to_string()),
            effect: self.effect.as_str().to_string(),
            time_added: k8s_openapi::jiff::Timestamp::from_second(gpu.since)
                .ok()
                .map(Time),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::UnhealthyGpu;

    #[test]
    fn taint_names_the_xid_and_its_time() {
        let gpus = UnhealthyGpus::from([(
            "GPU-a".to_string(),
            UnhealthyGpu {
                xid: 79,
                since: 1_764_625_000,
                message: "XID 79".into(),
                gone: false,
            },
        )]);
        let taints = HealthTaints::new("gpu.nvidia.com", TaintEffect::NoExecute, gpus);
        let t = taints.taint_for("GPU-a").unwrap();
        assert_eq!(t.key, "gpu.nvidia.com/xid");
        assert_eq!(t.value.as_deref(), Some("79"));
        assert_eq!(t.effect, "NoExecute");
        assert_eq!(
            serde_json::to_value(&t.time_added).unwrap(),
            serde_json::json!("2025-12-01T21:36:40Z")
        );
        assert!(taints.taint_for("GPU-b").is_none());
        assert_eq!(TaintEffect::default().as_str(), "NoSchedule");
    }
}
