//! The DRA objects written for mapped profiles: DeviceClasses (one per extended resource
//! name, with `extendedResourceName`, KEP-5004; one per profile with its sharing config)
//! and a ResourceClaimTemplate per profile for new workloads.
//!
//! Owns object names and shapes (`resource.k8s.io/v1`). It must not decide policies
//! (see `profile`).

use serde_json::{Value, json};

use super::profile::{Policy, Profile};
use crate::config::api::{API_VERSION_V1ALPHA1, KIND_GPU_CONFIG};

/// Prefix of every object name written by `migrate`.
pub const NAME_PREFIX: &str = "legacy-";

/// DeviceClass / template name for a profile or resource name: `legacy-<name>` with `/`
/// and `_` replaced by `-`, lower-cased (a DNS subdomain).
pub fn object_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| match c {
            '/' | '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    format!("{NAME_PREFIX}{clean}")
}

/// The GpuConfig opaque parameters for a policy; `None` for [`Policy::None`].
pub fn gpu_config(policy: &Policy) -> Option<Value> {
    let sharing = match policy {
        Policy::None => return None,
        Policy::TimeSlicing => {
            json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}})
        }
        Policy::Mps {
            active_thread_percentage,
        } => {
            json!({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": active_thread_percentage}})
        }
    };
    Some(json!({"apiVersion": API_VERSION_V1ALPHA1, "kind": KIND_GPU_CONFIG, "sharing": sharing}))
}

/// A DeviceClass selecting the driver's full GPUs, with the policy as class config and,
/// when given, `extendedResourceName`.
pub fn device_class(
    name: &str,
    driver: &str,
    policy: &Policy,
    extended_resource_name: Option<&str>,
) -> Value {
    let mut spec = json!({
        "selectors": [{"cel": {"expression": format!(
            "device.driver == '{driver}' && device.attributes['{driver}'].type == 'gpu'"
        )}}],
    });
    if let Some(params) = gpu_config(policy) {
        spec["config"] = json!([{"opaque": {"driver": driver, "parameters": params}}]);
    }
    if let Some(ext) = extended_resource_name {
        spec["extendedResourceName"] = json!(ext);
    }
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "gpu-dra-migrate"}},
        "spec": spec,
    })
}

/// A ResourceClaimTemplate in `namespace` asking one device of the profile's class.
pub fn claim_template(profile: &Profile, namespace: &str) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {
            "name": object_name(&profile.name),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "gpu-dra-migrate"},
        },
        "spec": {"spec": {"devices": {"requests": [{
            "name": "gpu",
            "exactly": {"deviceClassName": object_name(&profile.name), "count": 1},
        }]}}},
    })
}

/// Renders objects as one multi-document YAML stream (`---` between documents).
///
/// Errors: serialisation (not expected for JSON values).
pub fn render(objects: &[Value]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(out)
}
