//! The legacy NVIDIA device plugin's config file (`version: v1`) and the ConfigMap that
//! holds its named configs.
//!
//! Owns decoding only: the wire structs mirror the device plugin's `api/config/v1`
//! (`version`, `flags`, `resources`, `sharing.timeSlicing` / `sharing.mps` with
//! `renameByDefault`, `failRequestsGreaterThanOne` and `resources[{name, rename,
//! devices, replicas}]`). Unknown fields are errors naming their path. It must not map
//! anything to DRA (see `map`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// Label on a Node naming the config (ConfigMap key) the device plugin uses there.
pub const NODE_CONFIG_LABEL: &str = "nvidia.com/device-plugin.config";

/// The only config version the device plugin knows.
pub const VERSION_V1: &str = "v1";

/// One named device-plugin config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LegacyConfig {
    /// `version`; must be `v1` (empty means `v1`, as in the device plugin).
    #[serde(default)]
    pub version: String,
    /// `flags`: node daemon settings; none of them has a DRA class equivalent.
    #[serde(default)]
    pub flags: Option<Flags>,
    /// `resources`: custom resource names for GPU / MIG devices.
    #[serde(default)]
    pub resources: Option<serde_yaml::Value>,
    /// `sharing`.
    #[serde(default)]
    pub sharing: Option<Sharing>,
    /// `imex`: IMEX channel settings.
    #[serde(default)]
    pub imex: Option<serde_yaml::Value>,
}

/// `flags` of the device plugin (api/config/v1/flags.go).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Flags {
    /// `migStrategy`: none | single | mixed.
    pub mig_strategy: Option<String>,
    /// `failOnInitError`.
    pub fail_on_init_error: Option<bool>,
    /// `mpsRoot`.
    pub mps_root: Option<String>,
    /// `nvidiaDriverRoot`.
    pub nvidia_driver_root: Option<String>,
    /// `nvidiaDevRoot`.
    pub nvidia_dev_root: Option<String>,
    /// `gdrcopyEnabled`.
    #[serde(rename = "gdrcopyEnabled")]
    pub gdrcopy_enabled: Option<bool>,
    /// `gdsEnabled`.
    #[serde(rename = "gdsEnabled")]
    pub gds_enabled: Option<bool>,
    /// `mofedEnabled`.
    #[serde(rename = "mofedEnabled")]
    pub mofed_enabled: Option<bool>,
    /// `useNodeFeatureAPI`.
    #[serde(rename = "useNodeFeatureAPI")]
    pub use_node_feature_api: Option<bool>,
    /// `deviceDiscoveryStrategy`.
    pub device_discovery_strategy: Option<String>,
    /// `plugin`: device plugin command line flags.
    pub plugin: Option<serde_yaml::Value>,
    /// `gfd`: GPU feature discovery flags.
    pub gfd: Option<serde_yaml::Value>,
}

/// `sharing`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sharing {
    /// `sharing.timeSlicing`.
    #[serde(default)]
    pub time_slicing: Option<ReplicatedResources>,
    /// `sharing.mps`.
    #[serde(default)]
    pub mps: Option<ReplicatedResources>,
}

/// `sharing.timeSlicing` / `sharing.mps`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReplicatedResources {
    /// `renameByDefault`: advertise `<name>.shared` instead of `<name>`.
    #[serde(default)]
    pub rename_by_default: bool,
    /// `failRequestsGreaterThanOne`: refuse a container asking more than one replica.
    #[serde(default)]
    pub fail_requests_greater_than_one: Option<bool>,
    /// `resources`.
    #[serde(default)]
    pub resources: Vec<ReplicatedResource>,
}

/// One entry of `resources`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicatedResource {
    /// `name`: the resource replicated, e.g. `nvidia.com/gpu`.
    pub name: String,
    /// `rename`: the name advertised instead.
    #[serde(default)]
    pub rename: Option<String>,
    /// `devices`: `all`, a count, or a list of indices / UUIDs; absent means all.
    #[serde(default)]
    pub devices: Option<serde_yaml::Value>,
    /// `replicas`: advertised resources per device.
    pub replicas: i64,
}

/// A decoding error: the field path (`<config>.sharing.timeSlicing.foo`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Dotted path of the offending field, starting with the config name.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Decodes one named config (`name` is its ConfigMap key), checking `version`.
///
/// Errors: YAML syntax, unknown fields (path named), a version other than `v1`.
pub fn parse_config(name: &str, text: &str) -> Result<LegacyConfig, DecodeError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let config: LegacyConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." || path.is_empty() {
            name.to_string()
        } else {
            format!("{name}.{path}")
        };
        DecodeError {
            path,
            message: e.into_inner().to_string(),
        }
    })?;
    if !config.version.is_empty() && config.version != VERSION_V1 {
        return Err(DecodeError {
            path: format!("{name}.version"),
            message: format!(
                "unknown version {:?}; the device plugin config has only {VERSION_V1:?}",
                config.version
            ),
        });
    }
    Ok(config)
}

/// The named configs of a file: a ConfigMap (`kind: ConfigMap`, every `data` key is a
/// config) or one bare config file, which gets the name `default_name`.
///
/// Errors: YAML syntax, a ConfigMap without `data`.
pub fn named_configs(
    text: &str,
    default_name: &str,
) -> Result<BTreeMap<String, String>, DecodeError> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| DecodeError {
        path: "<input>".into(),
        message: e.to_string(),
    })?;
    if value.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
        let data = value
            .get("data")
            .and_then(|d| d.as_mapping())
            .ok_or_else(|| DecodeError {
                path: "data".into(),
                message: "the ConfigMap has no data: no device plugin config in it".into(),
            })?;
        let mut out = BTreeMap::new();
        for (k, v) in data {
            let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                return Err(DecodeError {
                    path: "data".into(),
                    message: "every data entry must be a string key with a string value".into(),
                });
            };
            out.insert(k.to_string(), v.to_string());
        }
        Ok(out)
    } else {
        Ok(BTreeMap::from([(
            default_name.to_string(),
            text.to_string(),
        )]))
    }
}
