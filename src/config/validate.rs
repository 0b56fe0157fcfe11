//! Validation of opaque config: the one function the plugin and the admission webhook share.
//!
//! Owns every rule that rejects a config, and the wording of those rejections (a field
//! path plus what is allowed). Two levels: [`validate_opaque`] needs only the parameters
//! (used at admission, where no device is known), [`validate_for_device`] adds the facts of
//! the allocated device (used at prepare). It must not touch hardware or pick between
//! several configs (`resolve` does).
//!
//! Rules beyond NVIDIA's reference driver, documented as deliberate: `Exclusive` exists only
//! in `gpu.gpu-dra.dev/v1alpha1`; `TimeSlicing` and `Exclusive` are rejected in a
//! `MigDeviceConfig` (both act on the whole parent GPU, NVIDIA silently ignores them);
//! a sub-config for another strategy (`mpsConfig` with `TimeSlicing`) is an error.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::api::{
    ApiVersion, Config, GpuConfig, GpuConfigWire, Kind, MigDeviceConfig, MigDeviceConfigWire,
    MpsConfig, MpsConfigWire, QuantityWire, Sharing, StrategyWire, TimeSlicingConfigWire,
};
use super::quantity::parse_quantity;

/// One rejected field: `path` is the JSON path inside `parameters` (dotted, e.g.
/// `sharing.mpsConfig.defaultActiveThreadPercentage`; empty for the whole object) and
/// `message` says what is wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted JSON path of the offending field inside the parameters.
    pub path: String,
    /// What is wrong, naming the allowed values.
    pub message: String,
}

impl FieldError {
    /// A field error at `path` (dotted, relative to the parameters) with `message`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Joins field errors into one line (`a: x; b: y`) for claim errors and admission replies.
pub fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The facts of an allocated device that config validity depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFacts<'a> {
    /// The device is a MIG device (`type: mig`), not a full GPU.
    pub is_mig: bool,
    /// The device's memory in bytes (its `memory` capacity).
    pub memory_bytes: u64,
    /// GPU or MIG UUID, when known (matched against `defaultPerDevicePinnedMemoryLimit` keys).
    pub uuid: Option<&'a str>,
    /// Index of the device within the claim's allocation (the other key form).
    pub index_in_claim: Option<usize>,
}

/// Reads the type field `name` (`apiVersion` or `kind`) with `parse`; a missing, non-string
/// or unknown value adds an error naming the `allowed` values.
fn type_field<T>(
    obj: &serde_json::Map<String, Value>,
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
    allowed: &str,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    let message = match obj.get(name) {
        Some(Value::String(s)) => match parse(s) {
            Some(value) => return Some(value),
            None => format!("unsupported value {s:?}; allowed: {allowed}"),
        },
        Some(_) => "must be a string".to_owned(),
        None => format!("required; allowed: {allowed}"),
    };
    errors.push(FieldError::new(name, message));
    None
}

/// Decodes and validates opaque `parameters` (strict: unknown fields are errors).
///
/// Accepts `apiVersion` [`ApiVersion::ALL`] and `kind` `GpuConfig` / `MigDeviceConfig`.
/// Returns the typed config, or every error found with its field path; a structural
/// decode error stops at the first one (the rest of the object cannot be trusted).
pub fn validate_opaque(params: &Value) -> Result<Config, Vec<FieldError>> {
    let Some(obj) = params.as_object() else {
        return Err(vec![FieldError::new(
            "",
            "parameters must be a JSON object",
        )]);
    };
    let mut errors = Vec::new();
    let api_version = type_field(
        obj,
        "apiVersion",
        ApiVersion::parse,
        &allowed_api_versions(),
        &mut errors,
    );
    let allowed_kinds = format!("{}, {}", Kind::GpuConfig, Kind::MigDeviceConfig);
    let kind = type_field(obj, "kind", Kind::parse, &allowed_kinds, &mut errors);
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        return Err(errors);
    };

    let mut body = obj.clone();
    body.remove("apiVersion");
    body.remove("kind");
    let body = Value::Object(body);
    let ctx = Ctx { api_version, kind };
    let config = match kind {
        Kind::GpuConfig => {
            let wire: GpuConfigWire = decode_strict(&body).map_err(|e| vec![e])?;
            let sharing = wire.sharing.and_then(|s| {
                ctx.sharing(
                    s.strategy,
                    s.time_slicing_config.as_ref(),
                    s.mps_config.as_ref(),
                    &mut errors,
                )
            });
            Config::Gpu(GpuConfig { sharing })
        }
        Kind::MigDeviceConfig => {
            let wire: MigDeviceConfigWire = decode_strict(&body).map_err(|e| vec![e])?;
            let sharing = wire
                .sharing
                .and_then(|s| ctx.sharing(s.strategy, None, s.mps_config.as_ref(), &mut errors));
            Config::Mig(MigDeviceConfig { sharing })
        }
    };
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// Decodes a `sharing` object as written by [`Sharing::to_wire_json`] (e.g. read back from
/// a checkpoint), with the same rules as a `GpuConfig` (`MigDeviceConfig` when `kind` says).
pub fn sharing_from_wire_json(value: &Value, kind: Kind) -> Result<Sharing, Vec<FieldError>> {
    let mut params = serde_json::Map::new();
    params.insert(
        "apiVersion".into(),
        ApiVersion::GpuDraV1Alpha1.as_str().into(),
    );
    params.insert("kind".into(), kind.as_str().into());
    params.insert("sharing".into(), value.clone());
    let config = validate_opaque(&Value::Object(params))?;
    config
        .sharing()
        .cloned()
        .ok_or_else(|| vec![FieldError::new("sharing", "missing")])
}

/// Checks a valid config against the device it is applied to: config kind vs device type,
/// strategies the device type cannot take, memory limits larger than the device's memory.
/// Paths are relative to the config's `parameters` as in [`validate_opaque`].
pub fn validate_for_device(
    config: &Config,
    device: &DeviceFacts<'_>,
) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    match (config, device.is_mig) {
        (Config::Gpu(_), true) => errors.push(FieldError::new(
            "kind",
            "GpuConfig applies to full GPUs but this device is a MIG device; allowed kind for it: MigDeviceConfig",
        )),
        (Config::Mig(_), false) => errors.push(FieldError::new(
            "kind",
            "MigDeviceConfig applies to MIG devices but this device is a full GPU; allowed kind for it: GpuConfig",
        )),
        _ => {}
    }
    if device.is_mig
        && let Some(s @ (Sharing::TimeSlicing { .. } | Sharing::Exclusive)) = config.sharing()
    {
        errors.push(FieldError::new(
            "sharing.strategy",
            format!(
                "{} acts on a whole GPU and is not supported on a MIG device; allowed: MPS",
                s.strategy_name()
            ),
        ));
    }
    if let Some(Sharing::Mps(mps)) = config.sharing() {
        let limit_err = |path: String, bytes: u64| {
            FieldError::new(
                path,
                format!(
                    "{bytes} bytes exceeds the device's memory of {} bytes; allowed: 1..={}",
                    device.memory_bytes, device.memory_bytes
                ),
            )
        };
        if let Some(bytes) = mps.default_pinned_device_memory_limit
            && bytes > device.memory_bytes
        {
            errors.push(limit_err(
                format!("{MPS_PATH}.defaultPinnedDeviceMemoryLimit"),
                bytes,
            ));
        }
        let index = device.index_in_claim.map(|i| i.to_string());
        for (key, &bytes) in &mps.default_per_device_pinned_memory_limit {
            let names_device = Some(key.as_str()) == device.uuid || Some(key) == index.as_ref();
            if names_device && bytes > device.memory_bytes {
                errors.push(limit_err(
                    format!("{MPS_PATH}.defaultPerDevicePinnedMemoryLimit.{key}"),
                    bytes,
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

const MPS_PATH: &str = "sharing.mpsConfig";

fn allowed_api_versions() -> String {
    ApiVersion::ALL.map(ApiVersion::as_str).join(", ")
}

/// The allowed names from serde's "expected one of `a`, `b` or `c`" tail, as `a, b, c`.
fn allowed_from_serde(expected: &str) -> String {
    expected
        .trim_start_matches(", ")
        .trim_start_matches("expected one of ")
        .trim_start_matches("expected ")
        .replace('`', "")
        .replace(" or ", ", ")
}

/// Decodes with `deny_unknown_fields` wire types, turning serde's first error into a
/// [`FieldError`] whose path includes the offending field.
fn decode_strict<T: DeserializeOwned>(body: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(body).map_err(|err| {
        let parent = err.path().to_string();
        let parent = if parent == "." { String::new() } else { parent };
        let message = err.inner().to_string();
        describe_serde_error(&parent, &message)
    })
}

/// Rewrites serde's messages into `path: what; allowed: …` form. Unknown fields are
/// already carry their key as the last path segment; missing fields are reported at the
/// parent's path, so the field name is appended.
fn describe_serde_error(parent: &str, message: &str) -> FieldError {
    let join = |child: &str| {
        if parent.is_empty() {
            child.to_string()
        } else {
            format!("{parent}.{child}")
        }
    };
    let message = message.split(" at line ").next().unwrap_or(message);
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let allowed = allowed_from_serde(expected);
        let allowed = if allowed == "there are no fields" {
            "none".to_string()
        } else {
            allowed
        };
        // serde_path_to_error already records the unknown key as the last path segment.
        let path = if parent == field || parent.ends_with(&format!(".{field}")) {
            parent.to_string()
        } else {
            join(field)
        };
        return FieldError::new(path, format!("unknown field, expected one of {allowed}"));
    }
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        return FieldError::new(join(field), "required field is missing");
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((value, expected)) = rest.split_once('`')
    {
        let allowed = allowed_from_serde(expected);
        return FieldError::new(
            parent,
            format!("unsupported value {value:?}; allowed: {allowed}"),
        );
    }
    FieldError::new(parent, message)
}

/// Decoding context: which API version and kind the sharing block belongs to.
struct Ctx {
    api_version: ApiVersion,
    kind: Kind,
}

impl Ctx {
    /// Builds the typed `Sharing` from its wire parts, pushing every violation.
    fn sharing(
        &self,
        strategy: StrategyWire,
        time_slicing: Option<&TimeSlicingConfigWire>,
        mps: Option<&MpsConfigWire>,
        errors: &mut Vec<FieldError>,
    ) -> Option<Sharing> {
        let before = errors.len();
        let allowed = self.allowed_strategies();
        let name = strategy_name(strategy);
        if !allowed.contains(&strategy) {
            let why = match (strategy, self.kind) {
                (StrategyWire::Exclusive, _) if !self.api_version.allows_exclusive() => format!(
                    "Exclusive is an extension of {}, not part of {}",
                    ApiVersion::GpuDraV1Alpha1,
                    self.api_version
                ),
                _ => {
                    format!("{name} acts on a whole GPU and is not supported in a MigDeviceConfig")
                }
            };
            let allowed_names: Vec<_> = allowed.iter().map(|s| strategy_name(*s)).collect();
            errors.push(FieldError::new(
                "sharing.strategy",
                format!("{why}; allowed: {}", allowed_names.join(", ")),
            ));
        }
        if time_slicing.is_some() && strategy != StrategyWire::TimeSlicing {
            errors.push(FieldError::new(
                "sharing.timeSlicingConfig",
                format!("only allowed with strategy TimeSlicing (strategy is {name})"),
            ));
        }
        if mps.is_some() && strategy != StrategyWire::Mps {
            errors.push(FieldError::new(
                "sharing.mpsConfig",
                format!("only allowed with strategy MPS (strategy is {name})"),
            ));
        }
        let sharing = match strategy {
            StrategyWire::TimeSlicing => Sharing::TimeSlicing {
                interval: time_slicing.and_then(|t| t.interval).unwrap_or_default(),
            },
            StrategyWire::Exclusive => Sharing::Exclusive,
            StrategyWire::Mps => {
                Sharing::Mps(mps.map(|m| mps_config(m, errors)).unwrap_or_default())
            }
        };
        (errors.len() == before).then_some(sharing)
    }

    fn allowed_strategies(&self) -> Vec<StrategyWire> {
        match (self.kind, self.api_version.allows_exclusive()) {
            (Kind::MigDeviceConfig, _) => vec![StrategyWire::Mps],
            (Kind::GpuConfig, true) => {
                vec![
                    StrategyWire::TimeSlicing,
                    StrategyWire::Mps,
                    StrategyWire::Exclusive,
                ]
            }
            (Kind::GpuConfig, false) => vec![StrategyWire::TimeSlicing, StrategyWire::Mps],
        }
    }
}

fn strategy_name(s: StrategyWire) -> &'static str {
    match s {
        StrategyWire::TimeSlicing => "TimeSlicing",
        StrategyWire::Mps => "MPS",
        StrategyWire::Exclusive => "Exclusive",
    }
}

fn mps_config(wire: &MpsConfigWire, errors: &mut Vec<FieldError>) -> MpsConfig {
    let default_active_thread_percentage = wire.default_active_thread_percentage.and_then(|p| {
        let ok = u8::try_from(p).ok().filter(|p| *p <= 100);
        if ok.is_none() {
            errors.push(FieldError::new(
                format!("{MPS_PATH}.defaultActiveThreadPercentage"),
                format!("{p} is out of range; allowed: 0..=100"),
            ));
        }
        ok
    });
    let default_pinned_device_memory_limit = wire
        .default_pinned_device_memory_limit
        .as_ref()
        .and_then(|q| {
            positive_bytes(
                q,
                format!("{MPS_PATH}.defaultPinnedDeviceMemoryLimit"),
                errors,
            )
        });
    let mut per_device = BTreeMap::new();
    for (key, q) in &wire.default_per_device_pinned_memory_limit {
        let path = format!("{MPS_PATH}.defaultPerDevicePinnedMemoryLimit.{key}");
        if key.trim().is_empty() {
            errors.push(FieldError::new(
                path,
                "empty device key; allowed: a GPU or MIG UUID, or the device's index within the claim",
            ));
            continue;
        }
        if let Some(bytes) = positive_bytes(q, path, errors) {
            per_device.insert(key.clone(), bytes);
        }
    }
    MpsConfig {
        default_active_thread_percentage,
        default_pinned_device_memory_limit,
        default_per_device_pinned_memory_limit: per_device,
    }
}

fn positive_bytes(q: &QuantityWire, path: String, errors: &mut Vec<FieldError>) -> Option<u64> {
    match parse_quantity(&q.0) {
        Ok(v) if v > 0 => u64::try_from(v).ok(),
        Ok(_) => {
            errors.push(FieldError::new(
                path,
                format!(
                    "{:?} is not positive; allowed: a quantity greater than 0 such as 8Gi",
                    q.0
                ),
            ));
            None
        }
        Err(e) => {
            errors.push(FieldError::new(path, e.to_string()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::api::{MpsConfig, TimeSliceInterval};
    use serde_json::json;

    fn ours(kind: &str, sharing: Value) -> Value {
        json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": kind, "sharing": sharing})
    }

    fn nvidia(kind: &str, sharing: Value) -> Value {
        json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": kind, "sharing": sharing})
    }

    fn one_error(params: Value) -> FieldError {
        let errs = validate_opaque(&params).expect_err("must be rejected");
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().expect("one")
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn accepts_time_slicing_with_and_without_interval() {
        let c = validate_opaque(&ours(
            "GpuConfig",
            json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}),
        ))
        .expect("valid");
        assert_eq!(
            c,
            Config::Gpu(GpuConfig {
                sharing: Some(Sharing::TimeSlicing {
                    interval: TimeSliceInterval::Long
                })
            })
        );
        let c = validate_opaque(&nvidia("GpuConfig", json!({"strategy": "TimeSlicing"})))
            .expect("valid");
        assert_eq!(
            c.sharing(),
            Some(&Sharing::TimeSlicing {
                interval: TimeSliceInterval::Default
            })
        );
    }

    #[test]
    fn no_sharing_means_no_policy() {
        let c = validate_opaque(
            &json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig"}),
        )
        .expect("valid");
        assert_eq!(c, Config::Gpu(GpuConfig { sharing: None }));
        let c = validate_opaque(
            &json!({"apiVersion": "resource.nvidia.com/v1beta1", "kind": "MigDeviceConfig"}),
        )
        .expect("valid");
        assert_eq!(c, Config::Mig(MigDeviceConfig { sharing: None }));
    }

    #[test]
    fn accepts_mps_with_limits() {
        let c = validate_opaque(&nvidia(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {
                "defaultActiveThreadPercentage": 40,
                "defaultPinnedDeviceMemoryLimit": "10Gi",
                "defaultPerDevicePinnedMemoryLimit": {"GPU-abc": "4G", "1": 1048576}
            }}),
        ))
        .expect("valid");
        let expected = MpsConfig {
            default_active_thread_percentage: Some(40),
            default_pinned_device_memory_limit: Some(10 * GIB),
            default_per_device_pinned_memory_limit: [
                ("1".to_string(), 1 << 20),
                ("GPU-abc".to_string(), 4_000_000_000),
            ]
            .into(),
        };
        assert_eq!(c.sharing(), Some(&Sharing::Mps(expected)));
        let mig =
            validate_opaque(&ours("MigDeviceConfig", json!({"strategy": "MPS"}))).expect("valid");
        assert_eq!(mig.sharing(), Some(&Sharing::Mps(MpsConfig::default())));
    }

    #[test]
    fn exclusive_only_in_our_api_version() {
        let c =
            validate_opaque(&ours("GpuConfig", json!({"strategy": "Exclusive"}))).expect("valid");
        assert_eq!(c.sharing(), Some(&Sharing::Exclusive));
        let e = one_error(nvidia("GpuConfig", json!({"strategy": "Exclusive"})));
        assert_eq!(e.path, "sharing.strategy");
        assert!(e.message.contains("allowed: TimeSlicing, MPS"), "{e}");
    }

    #[test]
    fn unknown_field_named_with_path_and_allowed_fields() {
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"intervall": "Long"}}),
        ));
        assert_eq!(
            e.to_string(),
            "sharing.timeSlicingConfig.intervall: unknown field, expected one of interval"
        );
        let e = one_error(
            json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharin": {}}),
        );
        assert_eq!(e.path, "sharin");
        assert_eq!(e.message, "unknown field, expected one of sharing");
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {"threads": 1}}),
        ));
        assert_eq!(e.path, "sharing.mpsConfig.threads");
        assert!(e.message.contains("defaultActiveThreadPercentage, defaultPinnedDeviceMemoryLimit, defaultPerDevicePinnedMemoryLimit"), "{e}");
    }

    #[test]
    fn time_slicing_config_is_unknown_in_mig_device_config() {
        let e = one_error(ours(
            "MigDeviceConfig",
            json!({"strategy": "MPS", "timeSlicingConfig": {}}),
        ));
        assert_eq!(e.path, "sharing.timeSlicingConfig");
        assert_eq!(
            e.message,
            "unknown field, expected one of strategy, mpsConfig"
        );
    }

    #[test]
    fn bad_enum_values_name_allowed_values() {
        let e = one_error(ours("GpuConfig", json!({"strategy": "Timeslice"})));
        assert_eq!(e.path, "sharing.strategy");
        assert_eq!(
            e.message,
            "unsupported value \"Timeslice\"; allowed: TimeSlicing, MPS, Exclusive"
        );
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "VeryLong"}}),
        ));
        assert_eq!(e.path, "sharing.timeSlicingConfig.interval");
        assert_eq!(
            e.message,
            "unsupported value \"VeryLong\"; allowed: Default, Short, Medium, Long"
        );
    }

    #[test]
    fn missing_strategy_is_reported() {
        let e = one_error(ours(
            "GpuConfig",
            json!({"timeSlicingConfig": {"interval": "Long"}}),
        ));
        assert_eq!(e.to_string(), "sharing.strategy: required field is missing");
    }

    #[test]
    fn wrong_types_are_reported_with_path() {
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": "50"}}),
        ));
        assert_eq!(e.path, "sharing.mpsConfig.defaultActiveThreadPercentage");
        assert!(e.message.contains("invalid type"), "{e}");
        let e = one_error(json!("GpuConfig"));
        assert_eq!(e.message, "parameters must be a JSON object");
    }

    #[test]
    fn api_version_and_kind_name_allowed_values() {
        let errs =
            validate_opaque(&json!({"apiVersion": "gpu.nvidia.com/v1", "kind": "GPUConfig"}))
                .expect_err("rejected");
        assert_eq!(
            errs,
            vec![
                FieldError::new(
                    "apiVersion",
                    "unsupported value \"gpu.nvidia.com/v1\"; allowed: gpu.gpu-dra.dev/v1alpha1, resource.nvidia.com/v1beta1"
                ),
                FieldError::new(
                    "kind",
                    "unsupported value \"GPUConfig\"; allowed: GpuConfig, MigDeviceConfig"
                ),
            ]
        );
        let errs = validate_opaque(&json!({})).expect_err("rejected");
        assert_eq!(errs.len(), 2);
        assert!(
            errs[0]
                .message
                .starts_with("required; allowed: gpu.gpu-dra.dev/v1alpha1")
        );
        assert_eq!(
            errs[1].message,
            "required; allowed: GpuConfig, MigDeviceConfig"
        );
        let e = one_error(json!({"apiVersion": 1, "kind": "GpuConfig"}));
        assert_eq!(e.to_string(), "apiVersion: must be a string");
    }

    #[test]
    fn thread_percentage_out_of_range() {
        for bad in [101, -1, 1000] {
            let e = one_error(ours(
                "GpuConfig",
                json!({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": bad}}),
            ));
            assert_eq!(e.path, "sharing.mpsConfig.defaultActiveThreadPercentage");
            assert_eq!(
                e.message,
                format!("{bad} is out of range; allowed: 0..=100")
            );
        }
        for good in [0, 100] {
            validate_opaque(&ours(
                "GpuConfig",
                json!({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": good}}),
            ))
            .expect("valid");
        }
    }

    #[test]
    fn memory_limits_must_be_positive_quantities() {
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "0"}}),
        ));
        assert_eq!(e.path, "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit");
        assert!(e.message.contains("not positive"), "{e}");
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {"defaultPerDevicePinnedMemoryLimit": {"GPU-1": "-4Gi"}}}),
        ));
        assert_eq!(
            e.path,
            "sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.GPU-1"
        );
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "8GB"}}),
        ));
        assert!(e.message.contains("unknown suffix \"GB\""), "{e}");
        assert!(e.message.contains("Gi"), "{e}");
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {"defaultPerDevicePinnedMemoryLimit": {" ": "1Gi"}}}),
        ));
        assert!(e.message.starts_with("empty device key"), "{e}");
    }

    #[test]
    fn several_errors_are_all_reported() {
        let errs = validate_opaque(&ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {
                "defaultActiveThreadPercentage": 150,
                "defaultPinnedDeviceMemoryLimit": "-1"
            }}),
        ))
        .expect_err("rejected");
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sharing.mpsConfig.defaultActiveThreadPercentage",
                "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit"
            ]
        );
        assert_eq!(
            join_errors(&errs[..1]),
            "sharing.mpsConfig.defaultActiveThreadPercentage: 150 is out of range; allowed: 0..=100"
        );
    }

    #[test]
    fn sub_config_of_another_strategy_is_rejected() {
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "TimeSlicing", "mpsConfig": {"defaultActiveThreadPercentage": 10}}),
        ));
        assert_eq!(
            e.to_string(),
            "sharing.mpsConfig: only allowed with strategy MPS (strategy is TimeSlicing)"
        );
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "MPS", "timeSlicingConfig": {"interval": "Long"}}),
        ));
        assert_eq!(e.path, "sharing.timeSlicingConfig");
        let e = one_error(ours(
            "GpuConfig",
            json!({"strategy": "Exclusive", "timeSlicingConfig": {}}),
        ));
        assert_eq!(e.path, "sharing.timeSlicingConfig");
    }

    #[test]
    fn time_slicing_and_exclusive_rejected_in_mig_device_config() {
        for strategy in ["TimeSlicing", "Exclusive"] {
            let e = one_error(ours("MigDeviceConfig", json!({"strategy": strategy})));
            assert_eq!(e.path, "sharing.strategy");
            assert!(
                e.message
                    .contains("not supported in a MigDeviceConfig; allowed: MPS"),
                "{e}"
            );
        }
        let e = one_error(nvidia(
            "MigDeviceConfig",
            json!({"strategy": "TimeSlicing"}),
        ));
        assert!(e.message.ends_with("allowed: MPS"), "{e}");
    }

    fn gpu_facts(memory_bytes: u64) -> DeviceFacts<'static> {
        DeviceFacts {
            is_mig: false,
            memory_bytes,
            uuid: Some("GPU-aaa"),
            index_in_claim: Some(0),
        }
    }

    #[test]
    fn wrong_device_type_is_rejected() {
        let gpu = Config::Gpu(GpuConfig::default());
        let mig = Config::Mig(MigDeviceConfig::default());
        let mig_facts = DeviceFacts {
            is_mig: true,
            ..gpu_facts(10 * GIB)
        };
        let errs = validate_for_device(&gpu, &mig_facts).expect_err("rejected");
        assert_eq!(errs[0].path, "kind");
        assert!(
            errs[0]
                .message
                .contains("allowed kind for it: MigDeviceConfig")
        );
        let errs = validate_for_device(&mig, &gpu_facts(10 * GIB)).expect_err("rejected");
        assert!(errs[0].message.contains("allowed kind for it: GpuConfig"));
        validate_for_device(&gpu, &gpu_facts(GIB)).expect("matching type");
        validate_for_device(&mig, &mig_facts).expect("matching type");
    }

    #[test]
    fn time_slicing_on_a_mig_device_is_rejected() {
        // Constructed directly: validate_opaque never produces it, prepare must still refuse.
        let c = Config::Mig(MigDeviceConfig {
            sharing: Some(Sharing::TimeSlicing {
                interval: TimeSliceInterval::Long,
            }),
        });
        let errs = validate_for_device(
            &c,
            &DeviceFacts {
                is_mig: true,
                ..gpu_facts(GIB)
            },
        )
        .expect_err("rejected");
        assert_eq!(errs[0].path, "sharing.strategy");
        assert!(errs[0].message.ends_with("allowed: MPS"));
    }

    #[test]
    fn memory_limit_larger_than_device_is_rejected() {
        let c = validate_opaque(&ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {
                "defaultPinnedDeviceMemoryLimit": "80Gi",
                "defaultPerDevicePinnedMemoryLimit": {"GPU-aaa": "90Gi", "GPU-other": "200Gi", "0": "100Gi"}
            }}),
        ))
        .expect("valid config");
        let errs = validate_for_device(&c, &gpu_facts(40 * GIB)).expect_err("too large");
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit",
                "sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.0",
                "sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.GPU-aaa",
            ]
        );
        assert!(errs[0].message.contains(&format!(
            "exceeds the device's memory of {} bytes",
            40 * GIB
        )));
        validate_for_device(&c, &gpu_facts(100 * GIB)).expect("fits");
    }

    #[test]
    fn wire_json_round_trips() {
        let params = ours(
            "GpuConfig",
            json!({"strategy": "MPS", "mpsConfig": {
                "defaultActiveThreadPercentage": 25,
                "defaultPinnedDeviceMemoryLimit": "1Gi",
                "defaultPerDevicePinnedMemoryLimit": {"GPU-x": "2Gi"}
            }}),
        );
        let c = validate_opaque(&params).expect("valid");
        let again = validate_opaque(&c.to_parameters(ApiVersion::GpuDraV1Alpha1)).expect("valid");
        assert_eq!(c, again);
        let sharing = c.sharing().expect("sharing");
        assert_eq!(
            sharing.to_wire_json(),
            json!({"strategy": "MPS", "mpsConfig": {
                "defaultActiveThreadPercentage": 25,
                "defaultPinnedDeviceMemoryLimit": "1073741824",
                "defaultPerDevicePinnedMemoryLimit": {"GPU-x": "2147483648"}
            }})
        );
        assert_eq!(
            sharing_from_wire_json(&sharing.to_wire_json(), Kind::GpuConfig).as_ref(),
            Ok(sharing)
        );
        let ts = Sharing::TimeSlicing {
            interval: TimeSliceInterval::Medium,
        };
        assert_eq!(
            sharing_from_wire_json(&ts.to_wire_json(), Kind::GpuConfig),
            Ok(ts)
        );
        assert_eq!(
            sharing_from_wire_json(&Sharing::Exclusive.to_wire_json(), Kind::GpuConfig),
            Ok(Sharing::Exclusive)
        );
    }

    #[test]
    fn interval_indexes() {
        let all = [
            TimeSliceInterval::Default,
            TimeSliceInterval::Short,
            TimeSliceInterval::Medium,
            TimeSliceInterval::Long,
        ];
        assert_eq!(all.map(TimeSliceInterval::as_index), [0, 1, 2, 3]);
        assert_eq!(
            all.map(TimeSliceInterval::as_str),
            ["Default", "Short", "Medium", "Long"]
        );
    }
}
