//! One named device-plugin config reduced to what DRA can express: the extended resource
//! name pods ask for and the sharing policy of the GPUs behind it.
//!
//! Owns the per-config mapping rules and the reasons a config cannot be mapped. It must
//! not build Kubernetes objects (see `objects`) nor read anything.

use super::legacy::{LegacyConfig, ReplicatedResources};

/// The GPU resource the device plugin advertises and DRA serves through a DeviceClass.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Sharing policy a profile puts on its GPUs (our GpuConfig `sharing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// No sharing: no opaque config, the GPU keeps its settings.
    None,
    /// `strategy: TimeSlicing`, interval `Default` (the device plugin sets no interval).
    TimeSlicing,
    /// `strategy: MPS` with `defaultActiveThreadPercentage` = 100 / replicas.
    Mps {
        /// Active thread percentage per client, 1..=100.
        active_thread_percentage: i64,
    },
}

/// A mapped named config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The config's name (ConfigMap key, the node label value).
    pub name: String,
    /// Extended resource name pods ask for (`nvidia.com/gpu`, `nvidia.com/gpu.shared`, a rename).
    pub extended_resource_name: String,
    /// Sharing policy.
    pub policy: Policy,
    /// `replicas` (1 without sharing).
    pub replicas: i64,
    /// `failRequestsGreaterThanOne` as the device plugin applies it.
    pub fail_requests_greater_than_one: bool,
    /// Settings that have no DRA equivalent, as `field: value` (reported, not carried).
    pub dropped: Vec<String>,
}

/// Why a config cannot be mapped: the field path and the reason, one per field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct MapError {
    /// Dotted path, starting with the config name.
    pub path: String,
    /// What cannot be mapped and what to do.
    pub message: String,
}

fn err(path: String, message: impl Into<String>) -> MapError {
    MapError {
        path,
        message: message.into(),
    }
}

/// Maps one decoded config. Errors: every field that cannot be expressed in DRA.
pub fn map_profile(name: &str, config: &LegacyConfig) -> Result<Profile, Vec<MapError>> {
    let mut errors = Vec::new();
    let mut dropped = Vec::new();
    if let Some(flags) = &config.flags {
        match flags.mig_strategy.as_deref() {
            None | Some("none") => {}
            Some(other) => dropped.push(format!(
                "flags.migStrategy: {other} (MIG devices are published as devices of the MIG DeviceClass, not as extended resources)"
            )),
        }
        let set: [(&str, bool); 11] = [
            ("failOnInitError", flags.fail_on_init_error.is_some()),
            ("mpsRoot", flags.mps_root.is_some()),
            ("nvidiaDriverRoot", flags.nvidia_driver_root.is_some()),
            ("nvidiaDevRoot", flags.nvidia_dev_root.is_some()),
            ("gdrcopyEnabled", flags.gdrcopy_enabled.is_some()),
            ("gdsEnabled", flags.gds_enabled.is_some()),
            ("mofedEnabled", flags.mofed_enabled.is_some()),
            ("useNodeFeatureAPI", flags.use_node_feature_api.is_some()),
            (
                "deviceDiscoveryStrategy",
                flags.device_discovery_strategy.is_some(),
            ),
            ("plugin", flags.plugin.is_some()),
            ("gfd", flags.gfd.is_some()),
        ];
        for (field, present) in set {
            if present {
                dropped.push(format!(
                    "flags.{field} (a node daemon setting; see `gpu-dra kubelet-plugin --help`)"
                ));
            }
        }
    }
    if config.resources.is_some() {
        errors.push(err(
            format!("{name}.resources"),
            "cannot map custom GPU/MIG resource patterns; remove them and select devices with a DeviceClass CEL selector",
        ));
    }
    if config.imex.is_some() {
        errors.push(err(
            format!("{name}.imex"),
            "cannot map IMEX channels; gpu-dra does not manage IMEX channels",
        ));
    }
    let sharing = config.sharing.clone().unwrap_or_default();
    let has = |r: &Option<ReplicatedResources>| r.as_ref().is_some_and(|r| !r.resources.is_empty());
    let (field, replicated) = match (has(&sharing.time_slicing), has(&sharing.mps)) {
        (true, true) => {
            errors.push(err(
                format!("{name}.sharing"),
                "both timeSlicing and mps list resources; one GPU has one policy, keep one of them",
            ));
            return Err(errors);
        }
        (_, true) => ("mps", sharing.mps),
        (true, false) => ("timeSlicing", sharing.time_slicing),
        (false, false) => ("timeSlicing", None),
    };
    let mut profile = Profile {
        name: name.to_string(),
        extended_resource_name: GPU_RESOURCE.to_string(),
        policy: Policy::None,
        replicas: 1,
        fail_requests_greater_than_one: false,
        dropped,
    };
    if let Some(rr) = replicated {
        profile.fail_requests_greater_than_one = rr.fail_requests_greater_than_one.unwrap_or(false);
        for (i, r) in rr.resources.iter().enumerate() {
            let path = format!("{name}.sharing.{field}.resources[{i}]");
            if r.name != GPU_RESOURCE {
                errors.push(err(
                    format!("{path}.name"),
                    format!(
                        "cannot map resource {:?}: only {GPU_RESOURCE} is served as an extended resource; MIG devices are claimed through the MIG DeviceClass",
                        r.name
                    ),
                ));
                continue;
            }
            if r.devices
                .as_ref()
                .is_some_and(|d| d.as_str() != Some("all"))
            {
                errors.push(err(
                    format!("{path}.devices"),
                    "cannot map a subset of devices: a DeviceClass applies to every GPU; drop `devices` or split the GPUs onto nodes with their own config",
                ));
            }
            if r.replicas < 1 {
                errors.push(err(
                    format!("{path}.replicas"),
                    format!("replicas must be at least 1, got {}", r.replicas),
                ));
                continue;
            }
            profile.extended_resource_name = match (&r.rename, rr.rename_by_default) {
                (Some(rename), _) => rename.clone(),
                (None, true) => format!("{GPU_RESOURCE}.shared"),
                (None, false) => GPU_RESOURCE.to_string(),
            };
            profile.replicas = r.replicas;
            profile.policy = match (field, r.replicas) {
                ("mps", n) => Policy::Mps {
                    active_thread_percentage: (100 / n).max(1),
                },
                (_, 1) => Policy::None,
                _ => Policy::TimeSlicing,
            };
        }
    }
    if errors.is_empty() {
        Ok(profile)
    } else {
        Err(errors)
    }
}
