//! The opaque configuration API: typed `GpuConfig` / `MigDeviceConfig` and their wire shape.
//!
//! Owns the versioned types users put in `DeviceClass.spec.config[].opaque.parameters` and
//! `ResourceClaim.spec.devices.config[].opaque.parameters`. It must not validate semantics
//! (ranges, device facts: see `validate`) nor pick between configs (see `resolve`).
//!
//! Wire shape (COMPAT.md, the same as NVIDIA's `resource.nvidia.com/v1beta1`):
//!
//! ```yaml
//! apiVersion: gpu.gpu-dra.dev/v1alpha1   # or resource.nvidia.com/v1beta1
//! kind: GpuConfig                        # or MigDeviceConfig
//! sharing:                               # optional
//!   strategy: TimeSlicing                # TimeSlicing | MPS | Exclusive (Exclusive: ours only)
//!   timeSlicingConfig: {interval: Long}  # Default | Short | Medium | Long; GpuConfig only
//!   mpsConfig:                           # only with strategy MPS
//!     defaultActiveThreadPercentage: 50  # 0..=100
//!     defaultPinnedDeviceMemoryLimit: 10Gi
//!     defaultPerDevicePinnedMemoryLimit: {GPU-…: 8Gi, "0": 4Gi}
//! ```
//!
//! Defaults: no `sharing` means "no policy change" — unlike NVIDIA's driver we do not
//! inject a TimeSlicing default (it fails on GPUs without time-slice support).
//! `strategy: TimeSlicing` without `timeSlicingConfig` means interval `Default`. MPS fields
//! left out leave the control daemon's own defaults in place.
//!
//! The wire structs (`*Wire`) use `deny_unknown_fields` and plain (untagged) layouts so
//! that `serde_path_to_error` can name the full path of an unknown field; the typed
//! `Sharing` enum is built from them by `validate`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Our own API group/version for opaque config.
pub const API_VERSION_V1ALPHA1: &str = "gpu.gpu-dra.dev/v1alpha1";
/// NVIDIA's API group/version, accepted so existing claims keep working (COMPAT.md).
pub const API_VERSION_NVIDIA_V1BETA1: &str = "resource.nvidia.com/v1beta1";
/// Kind of a full-GPU config.
pub const KIND_GPU_CONFIG: &str = "GpuConfig";
/// Kind of a MIG device config.
pub const KIND_MIG_DEVICE_CONFIG: &str = "MigDeviceConfig";

/// The API versions we decode, in the order error messages list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiVersion {
    /// `gpu.gpu-dra.dev/v1alpha1`: ours, a superset (adds strategy `Exclusive`).
    GpuDraV1Alpha1,
    /// `resource.nvidia.com/v1beta1`: NVIDIA's reference driver's API.
    NvidiaV1Beta1,
}

impl ApiVersion {
    /// All accepted versions.
    pub const ALL: [ApiVersion; 2] = [ApiVersion::GpuDraV1Alpha1, ApiVersion::NvidiaV1Beta1];

    /// The `apiVersion` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::GpuDraV1Alpha1 => API_VERSION_V1ALPHA1,
            ApiVersion::NvidiaV1Beta1 => API_VERSION_NVIDIA_V1BETA1,
        }
    }

    /// Parses an `apiVersion` string; `None` when it is not one of [`ApiVersion::ALL`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the `Exclusive` strategy exists in this version (ours only).
    pub fn allows_exclusive(self) -> bool {
        self == ApiVersion::GpuDraV1Alpha1
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The config kinds, which also say which device type a config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `GpuConfig`: applies to full GPUs (device type `gpu`).
    GpuConfig,
    /// `MigDeviceConfig`: applies to MIG devices (device type `mig`).
    MigDeviceConfig,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 2] = [Kind::GpuConfig, Kind::MigDeviceConfig];

    /// The `kind` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::GpuConfig => KIND_GPU_CONFIG,
            Kind::MigDeviceConfig => KIND_MIG_DEVICE_CONFIG,
        }
    }

    /// Parses a `kind` string; `None` when unknown.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded, validated opaque config for one device type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Config {
    /// From a `GpuConfig`.
    Gpu(GpuConfig),
    /// From a `MigDeviceConfig`.
    Mig(MigDeviceConfig),
}

impl Config {
    /// The kind this config was decoded from.
    pub fn kind(&self) -> Kind {
        match self {
            Config::Gpu(_) => Kind::GpuConfig,
            Config::Mig(_) => Kind::MigDeviceConfig,
        }
    }

    /// The sharing policy asked for; `None` = leave the device's policy unchanged.
    pub fn sharing(&self) -> Option<&Sharing> {
        match self {
            Config::Gpu(c) => c.sharing.as_ref(),
            Config::Mig(c) => c.sharing.as_ref(),
        }
    }

    /// The opaque `parameters` object for this config under `api_version` (wire shape;
    /// memory limits written as byte counts).
    pub fn to_parameters(&self, api_version: ApiVersion) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        obj.insert("apiVersion".into(), api_version.as_str().into());
        obj.insert("kind".into(), self.kind().as_str().into());
        if let Some(sharing) = self.sharing() {
            obj.insert("sharing".into(), sharing.to_wire_json());
        }
        serde_json::Value::Object(obj)
    }
}

/// Configuration of a full GPU (`kind: GpuConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuConfig {
    /// How the GPU is shared; `None` = no change to its compute policy.
    pub sharing: Option<Sharing>,
}

/// Configuration of a MIG device (`kind: MigDeviceConfig`).
///
/// `Sharing::TimeSlicing` and `Sharing::Exclusive` never appear here after validation:
/// both act on the whole parent GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigDeviceConfig {
    /// How the MIG device is shared; `None` = no change.
    pub sharing: Option<Sharing>,
}

/// A sharing strategy with its settings (wire field `sharing.strategy` picks the variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharing {
    /// `strategy: TimeSlicing`: processes share the GPU by time slices of `interval`.
    TimeSlicing {
        /// The compute-policy time slice (`timeSlicingConfig.interval`).
        interval: TimeSliceInterval,
    },
    /// `strategy: MPS`: an MPS control daemon per claim, with optional limits.
    Mps(MpsConfig),
    /// `strategy: Exclusive` (ours only): compute mode EXCLUSIVE_PROCESS without MPS, so
    /// one process at a time may hold a context on the GPU.
    Exclusive,
}

impl Sharing {
    /// The `strategy` string on the wire.
    pub fn strategy_name(&self) -> &'static str {
        match self {
            Sharing::TimeSlicing { .. } => "TimeSlicing",
            Sharing::Mps(_) => "MPS",
            Sharing::Exclusive => "Exclusive",
        }
    }

    /// The wire shape (`{strategy, timeSlicingConfig | mpsConfig}`) as JSON; memory limits
    /// are written as byte counts. Used for checkpoints, logs and `Config::to_parameters`.
    pub fn to_wire_json(&self) -> serde_json::Value {
        let wire = match self {
            Sharing::TimeSlicing { interval } => SharingWire {
                strategy: StrategyWire::TimeSlicing,
                time_slicing_config: Some(TimeSlicingConfigWire {
                    interval: Some(*interval),
                }),
                mps_config: None,
            },
            Sharing::Mps(mps) => SharingWire {
                strategy: StrategyWire::Mps,
                time_slicing_config: None,
                mps_config: Some(MpsConfigWire {
                    default_active_thread_percentage: mps
                        .default_active_thread_percentage
                        .map(i64::from),
                    default_pinned_device_memory_limit: mps
                        .default_pinned_device_memory_limit
                        .map(|b| QuantityWire(b.to_string())),
                    default_per_device_pinned_memory_limit: mps
                        .default_per_device_pinned_memory_limit
                        .iter()
                        .map(|(k, v)| (k.clone(), QuantityWire(v.to_string())))
                        .collect(),
                }),
            },
            Sharing::Exclusive => SharingWire {
                strategy: StrategyWire::Exclusive,
                time_slicing_config: None,
                mps_config: None,
            },
        };
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_value(wire).unwrap_or(serde_json::Value::Null)
    }
}

/// The compute-policy time slice, as `nvidia-smi compute-policy --set-timeslice` takes it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum TimeSliceInterval {
    /// Driver default (0).
    #[default]
    Default,
    /// Short (1).
    Short,
    /// Medium (2).
    Medium,
    /// Long (3).
    Long,
}

impl TimeSliceInterval {
    /// The numeric value for `nvidia-smi compute-policy --set-timeslice` (0..=3).
    pub fn as_index(self) -> u8 {
        match self {
            TimeSliceInterval::Default => 0,
            TimeSliceInterval::Short => 1,
            TimeSliceInterval::Medium => 2,
            TimeSliceInterval::Long => 3,
        }
    }

    /// The wire name (`Default`, `Short`, `Medium`, `Long`).
    pub fn as_str(self) -> &'static str {
        match self {
            TimeSliceInterval::Default => "Default",
            TimeSliceInterval::Short => "Short",
            TimeSliceInterval::Medium => "Medium",
            TimeSliceInterval::Long => "Long",
        }
    }
}

/// MPS settings (`sharing.mpsConfig`), validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MpsConfig {
    /// `defaultActiveThreadPercentage`: share of SMs a client may use, 0..=100.
    pub default_active_thread_percentage: Option<u8>,
    /// `defaultPinnedDeviceMemoryLimit` in bytes (> 0), applied to every device of the claim.
    pub default_pinned_device_memory_limit: Option<u64>,
    /// `defaultPerDevicePinnedMemoryLimit`: key = GPU/MIG UUID or index of the device
    /// within the claim, value = bytes (> 0). Overrides the default for that device.
    pub default_per_device_pinned_memory_limit: BTreeMap<String, u64>,
}

// ---------------------------------------------------------------------------------------
// Wire structs: exactly what users write. Strict (unknown fields rejected) and flat so that
// decode errors carry full JSON paths.

/// Body of a `GpuConfig` (everything except `apiVersion` and `kind`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuConfigWire {
    /// `sharing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<SharingWire>,
}

/// Body of a `MigDeviceConfig`; its sharing has no `timeSlicingConfig` field (as NVIDIA's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigDeviceConfigWire {
    /// `sharing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<MigSharingWire>,
}

/// `sharing` of a `GpuConfig` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharingWire {
    /// `strategy`.
    pub strategy: StrategyWire,
    /// `timeSlicingConfig` (strategy TimeSlicing only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_slicing_config: Option<TimeSlicingConfigWire>,
    /// `mpsConfig` (strategy MPS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mps_config: Option<MpsConfigWire>,
}

/// `sharing` of a `MigDeviceConfig` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigSharingWire {
    /// `strategy`.
    pub strategy: StrategyWire,
    /// `mpsConfig` (strategy MPS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mps_config: Option<MpsConfigWire>,
}

/// `sharing.strategy` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrategyWire {
    /// `TimeSlicing`.
    TimeSlicing,
    /// `MPS`.
    #[serde(rename = "MPS")]
    Mps,
    /// `Exclusive` (gpu.gpu-dra.dev only).
    Exclusive,
}

/// `sharing.timeSlicingConfig` on the wire.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeSlicingConfigWire {
    /// `interval`; absent = `Default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<TimeSliceInterval>,
}

/// `sharing.mpsConfig` on the wire (numbers unchecked, quantities unparsed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MpsConfigWire {
    /// `defaultActiveThreadPercentage`, any integer (range checked by `validate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_active_thread_percentage: Option<i64>,
    /// `defaultPinnedDeviceMemoryLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_pinned_device_memory_limit: Option<QuantityWire>,
    /// `defaultPerDevicePinnedMemoryLimit`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub default_per_device_pinned_memory_limit: BTreeMap<String, QuantityWire>,
}

/// A Kubernetes quantity as written: a string (`"10Gi"`) or a bare integer (`1024`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct QuantityWire(pub String);

impl<'de> Deserialize<'de> for QuantityWire {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = QuantityWire;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity such as \"8Gi\", \"500M\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(QuantityWire(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(QuantityWire(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(QuantityWire(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
