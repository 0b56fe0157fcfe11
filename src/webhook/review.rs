//! The admission decision: a pure function from an `AdmissionRequest` to an
//! `AdmissionResponse`.
//!
//! Owns which objects are judged (ResourceClaim, ResourceClaimTemplate and DeviceClass of
//! `resource.k8s.io`, any served version), where their opaque config lives, which entries
//! are ours (`opaque.driver` equal to the driver name), and the wording of the denial
//! (every field error, each prefixed with the object path of its config entry). It must
//! not do I/O or decide validity itself: every entry goes through
//! [`crate::config::validate_opaque`], the function the plugin uses at prepare time.
//!
//! Follows the admission webhook contract (`admission.k8s.io/v1` AdmissionReview: the
//! response copies the request UID; a denial carries a `Status` with code 422, reason
//! `Invalid` and one cause per field, like the API server's own validation errors) and
//! KEP-4381 for the places opaque config is written (claim `spec.devices.config[]`,
//! template `spec.spec.devices.config[]`, class `spec.config[]`; identical in
//! `v1beta1`, `v1beta2` and `v1`, so the object is read as generic JSON).
//!
//! Updates whose config entries are unchanged are allowed even if those entries are
//! invalid (with a warning): a claim created before the webhook existed must still accept
//! metadata updates such as finalizer removal, or it could never be deleted.

use kube::core::DynamicObject;
use kube::core::Status;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::response::{StatusCause, StatusDetails};
use serde_json::Value;

use crate::config::{FieldError, join_errors, validate_opaque};

/// API group of the objects this webhook judges.
pub const RESOURCE_GROUP: &str = "resource.k8s.io";

/// HTTP code the API server reports for a denial (422, as for its own validation errors).
const INVALID_CODE: u16 = 422;

/// The object kinds that carry opaque device config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewedKind {
    /// `ResourceClaim`: config at `spec.devices.config[]`.
    ResourceClaim,
    /// `ResourceClaimTemplate`: config at `spec.spec.devices.config[]`.
    ResourceClaimTemplate,
    /// `DeviceClass` (cluster-scoped): config at `spec.config[]`.
    DeviceClass,
}

impl ReviewedKind {
    /// The kind for a `resource.k8s.io` kind name, `None` for kinds without opaque config.
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "ResourceClaim" => Some(Self::ResourceClaim),
            "ResourceClaimTemplate" => Some(Self::ResourceClaimTemplate),
            "DeviceClass" => Some(Self::DeviceClass),
            _ => None,
        }
    }

    /// JSON keys from the object root to the config list.
    fn config_keys(self) -> &'static [&'static str] {
        match self {
            Self::ResourceClaim => &["spec", "devices", "config"],
            Self::ResourceClaimTemplate => &["spec", "spec", "devices", "config"],
            Self::DeviceClass => &["spec", "config"],
        }
    }

    /// Kind name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResourceClaim => "ResourceClaim",
            Self::ResourceClaimTemplate => "ResourceClaimTemplate",
            Self::DeviceClass => "DeviceClass",
        }
    }
}

/// The config list of `object` (JSON of the whole object), `None` when it has none.
fn config_entries(kind: ReviewedKind, object: &Value) -> Option<&Vec<Value>> {
    kind.config_keys()
        .iter()
        .try_fold(object, |v, key| v.get(key))?
        .as_array()
}

/// Every field error in the opaque config entries of `object` that name `driver`, with
/// paths from the object root (e.g. `spec.devices.config[0].opaque.parameters.kind`).
/// Entries of other drivers and entries without `opaque` are skipped.
pub fn config_errors(kind: ReviewedKind, object: &Value, driver: &str) -> Vec<FieldError> {
    let Some(entries) = config_entries(kind, object) else {
        return Vec::new();
    };
    let list_path = kind.config_keys().join(".");
    let mut errors = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let Some(opaque) = entry.get("opaque") else {
            continue;
        };
        if opaque.get("driver").and_then(Value::as_str) != Some(driver) {
            continue;
        }
        let base = format!("{list_path}[{index}].opaque.parameters");
        let Some(params) = opaque.get("parameters") else {
            errors.push(FieldError::new(
                base,
                format!("required: an opaque config for driver {driver} needs parameters"),
            ));
            continue;
        };
        if let Err(found) = validate_opaque(params) {
            errors.extend(found.into_iter().map(|e| {
                let path = if e.path.is_empty() {
                    base.clone()
                } else {
                    format!("{base}.{}", e.path)
                };
                FieldError::new(path, e.message)
            }));
        }
    }
    errors
}

/// Impossible share amounts ([`super::capacity`]) in the device requests of a claim or
/// template; none for a DeviceClass.
fn share_amount_errors(kind: ReviewedKind, object: &Value, driver: &str) -> Vec<FieldError> {
    let keys: &[&str] = match kind {
        ReviewedKind::ResourceClaim => &["spec", "devices"],
        ReviewedKind::ResourceClaimTemplate => &["spec", "spec", "devices"],
        ReviewedKind::DeviceClass => return Vec::new(),
    };
    keys.iter()
        .try_fold(object, |v, key| v.get(key))
        .map(|devices| super::capacity::capacity_errors(devices, &keys.join("."), driver))
        .unwrap_or_default()
}

/// Judges one admission request for `driver`: allows everything that is not a
/// claim, template or class of `resource.k8s.io`, DELETEs and subresource writes; denies
/// objects with invalid opaque config for `driver`, naming every field error, new claims
/// and templates asking `driver`'s classes for `compute` above 100, and objects
/// where two of `driver`'s entries configure one request differently
/// ([`super::conflicts`]).
pub fn review(req: &AdmissionRequest<DynamicObject>, driver: &str) -> AdmissionResponse {
    review_with_duplicates(req, driver, &[])
}

/// [`review`], also denying the repeated JSON keys `duplicates` (found in the raw request
/// body, paths from the object root) that lie in `driver`'s entries.
pub fn review_with_duplicates(
    req: &AdmissionRequest<DynamicObject>,
    driver: &str,
    duplicates: &[crate::config::DuplicateKey],
) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    if req.kind.group != RESOURCE_GROUP || req.sub_resource.is_some() {
        return response;
    }
    let Some(kind) = ReviewedKind::from_kind(&req.kind.kind) else {
        return response;
    };
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let Some(object) = &req.object else {
        return response;
    };
    let mut errors = config_errors(kind, &object.data, driver);
    // Claim and template specs are immutable: amounts are judged when they are created, so
    // an update of an object admitted before this check is never refused for them.
    if req.operation == Operation::Create {
        errors.extend(share_amount_errors(kind, &object.data, driver));
    }
    if let Some(entries) = config_entries(kind, &object.data) {
        let list_path = kind.config_keys().join(".");
        errors.extend(super::conflicts::duplicate_errors(
            &list_path, entries, driver, duplicates,
        ));
        errors.extend(super::conflicts::conflict_errors(
            &list_path, entries, driver,
        ));
    }
    if errors.is_empty() {
        return response;
    }
    let unchanged = req.operation == Operation::Update
        && req.old_object.as_ref().is_some_and(|old| {
            config_entries(kind, &old.data) == config_entries(kind, &object.data)
        });
    if unchanged {
        let mut response = response;
        response.warnings = Some(vec![format!(
            "opaque config for {driver} is invalid (left unchanged by this update): {}",
            join_errors(&errors)
        )]);
        return response;
    }
    deny(response, kind, &req.name, &errors)
}

/// Turns `response` into a denial with an `Invalid` status carrying one cause per error.
fn deny(
    mut response: AdmissionResponse,
    kind: ReviewedKind,
    name: &str,
    errors: &[FieldError],
) -> AdmissionResponse {
    let causes = errors
        .iter()
        .map(|e| StatusCause {
            reason: "FieldValueInvalid".to_owned(),
            message: e.message.clone(),
            field: e.path.clone(),
        })
        .collect();
    response.allowed = false;
    response.result = Status::failure(&join_errors(errors), "Invalid")
        .with_code(INVALID_CODE)
        .with_details(StatusDetails {
            name: name.to_owned(),
            group: RESOURCE_GROUP.to_owned(),
            kind: kind.as_str().to_owned(),
            uid: String::new(),
            causes,
            retry_after_seconds: 0,
        });
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::admission::AdmissionReview;
    use pretty_assertions::assert_eq;
    use serde_json::json;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    fn request(
        version: &str,
        kind: &str,
        operation: &str,
        object: Option<Value>,
        old: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        let resource = format!("{}s", kind.to_ascii_lowercase());
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": RESOURCE_GROUP, "version": version, "kind": kind},
                "resource": {"group": RESOURCE_GROUP, "version": version, "resource": resource},
                "name": "c",
                "namespace": "ns",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "oldObject": old,
                "dryRun": false
            }
        }))
        .expect("review");
        review.try_into().expect("request")
    }

    fn ours(params: Value) -> Value {
        json!({"opaque": {"driver": DRIVER, "parameters": params}})
    }

    fn claim(version: &str, config: Vec<Value>) -> Value {
        json!({
            "apiVersion": format!("resource.k8s.io/{version}"),
            "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
                "config": config
            }}
        })
    }

    fn mps(percentage: i64) -> Value {
        json!({
            "apiVersion": "gpu.gpu-dra.dev/v1alpha1",
            "kind": "GpuConfig",
            "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": percentage}}
        })
    }

    fn create(kind: &str, object: Value) -> AdmissionResponse {
        review(&request("v1", kind, "CREATE", Some(object), None), DRIVER)
    }

    fn denial(resp: &AdmissionResponse) -> &str {
        assert!(!resp.allowed, "expected a denial: {resp:?}");
        assert_eq!(resp.result.code, 422);
        assert_eq!(resp.result.reason, "Invalid");
        &resp.result.message
    }

    #[test]
    fn bad_claim_is_denied_with_the_full_field_path() {
        let resp = create("ResourceClaim", claim("v1", vec![ours(mps(150))]));
        assert_eq!(resp.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        let message = denial(&resp);
        assert!(
            message.starts_with(
                "spec.devices.config[0].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage: "
            ),
            "{message}"
        );
        assert!(message.contains("150"), "{message}");
        let details = resp.result.details.as_ref().expect("details");
        assert_eq!(details.kind, "ResourceClaim");
        assert_eq!(details.name, "c");
        assert_eq!(details.causes.len(), 1);
        assert_eq!(
            details.causes[0].field,
            "spec.devices.config[0].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage"
        );
    }

    #[test]
    fn a_share_above_the_whole_gpu_is_denied_at_create_only() {
        let mut object = claim("v1", vec![]);
        object["spec"]["devices"]["requests"][0]["exactly"]["capacity"] =
            json!({"requests": {"memory": "4Gi", "compute": "150"}});
        let resp = create("ResourceClaim", object.clone());
        let message = denial(&resp);
        assert!(
            message.starts_with(
                "spec.devices.requests[0].exactly.capacity.requests.compute: 150 is above 100"
            ),
            "{message}"
        );
        // An object admitted before (specs are immutable): metadata updates still pass.
        let update = review(
            &request(
                "v1",
                "ResourceClaim",
                "UPDATE",
                Some(object.clone()),
                Some(object),
            ),
            DRIVER,
        );
        assert!(update.allowed, "{update:?}");
    }

    #[test]
    fn good_claim_is_allowed_and_two_configs_for_every_request_are_not() {
        let time_sliced = json!({
            "apiVersion": "resource.nvidia.com/v1beta1",
            "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}
        });
        let resp = create(
            "ResourceClaim",
            claim("v1", vec![ours(mps(40)), ours(time_sliced)]),
        );
        // Both apply to every request with the same kind: the MPS entry would never apply.
        let message = denial(&resp);
        assert!(
            message.contains("spec.devices.config[1]: conflicts with spec.devices.config[0]: both configure every request with a different GpuConfig"),
            "{message}"
        );
        let split = create(
            "ResourceClaim",
            claim(
                "v1",
                vec![ours(mps(40)), {
                    let mut e = ours(json!({"apiVersion": "resource.nvidia.com/v1beta1",
                    "kind": "GpuConfig", "sharing": {"strategy": "TimeSlicing"}}));
                    e["requests"] = json!(["other"]);
                    e
                }],
            ),
        );
        assert!(split.allowed, "{split:?}");
        let one = create("ResourceClaim", claim("v1", vec![ours(mps(40))]));
        assert!(one.allowed, "{one:?}");
        assert!(one.warnings.is_none());
        let no_config = create("ResourceClaim", claim("v1", vec![]));
        assert!(no_config.allowed);
    }

    #[test]
    fn every_error_of_every_entry_is_reported() {
        let other_mistakes = json!({"apiVersion": "gpu.gpu-dra.dev/v9", "kind": "Gpu"});
        let resp = create(
            "ResourceClaim",
            claim(
                "v1",
                vec![ours(mps(40)), ours(mps(-1)), ours(other_mistakes)],
            ),
        );
        let message = denial(&resp);
        let causes = &resp.result.details.as_ref().expect("details").causes;
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.devices.config[1].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage",
                "spec.devices.config[2].opaque.parameters.apiVersion",
                "spec.devices.config[2].opaque.parameters.kind",
            ]
        );
        for field in fields {
            assert!(
                message.contains(&format!("{field}: ")),
                "{field} in {message}"
            );
        }
    }

    #[test]
    fn wrong_api_version_and_kind_name_the_allowed_values() {
        let resp = create(
            "ResourceClaim",
            claim(
                "v1",
                vec![ours(
                    json!({"apiVersion": "gpu.gpu-dra.dev/v2", "kind": "TpuConfig"}),
                )],
            ),
        );
        let message = denial(&resp);
        assert!(
            message.contains("spec.devices.config[0].opaque.parameters.apiVersion: "),
            "{message}"
        );
        assert!(message.contains("gpu.gpu-dra.dev/v1alpha1"), "{message}");
        assert!(message.contains("resource.nvidia.com/v1beta1"), "{message}");
        assert!(
            message.contains("spec.devices.config[0].opaque.parameters.kind: "),
            "{message}"
        );
        assert!(message.contains("GpuConfig, MigDeviceConfig"), "{message}");
    }

    #[test]
    fn time_slicing_in_a_mig_device_config_is_denied() {
        let params = json!({
            "apiVersion": "gpu.gpu-dra.dev/v1alpha1",
            "kind": "MigDeviceConfig",
            "sharing": {"strategy": "TimeSlicing"}
        });
        let message = denial(&create("ResourceClaim", claim("v1", vec![ours(params)]))).to_owned();
        assert!(
            message.starts_with("spec.devices.config[0].opaque.parameters.sharing"),
            "{message}"
        );
        assert!(message.contains("allowed: MPS"), "{message}");
    }

    #[test]
    fn malformed_parameters_are_denied() {
        // Not an object at all (RawExtension carrying a JSON string).
        let message = denial(&create(
            "ResourceClaim",
            claim("v1", vec![ours(json!("{not json"))]),
        ))
        .to_owned();
        assert_eq!(
            message,
            "spec.devices.config[0].opaque.parameters: parameters must be a JSON object"
        );
        // An unknown field, and a field of the wrong type.
        let unknown =
            json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharng": {}});
        let message = denial(&create("ResourceClaim", claim("v1", vec![ours(unknown)]))).to_owned();
        assert!(
            message.starts_with("spec.devices.config[0].opaque.parameters.sharng: unknown field"),
            "{message}"
        );
        let wrong_type = json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharing": "MPS"});
        let message = denial(&create(
            "ResourceClaim",
            claim("v1", vec![ours(wrong_type)]),
        ))
        .to_owned();
        assert!(
            message.starts_with("spec.devices.config[0].opaque.parameters.sharing: "),
            "{message}"
        );
        // Parameters missing altogether.
        let entry = json!({"opaque": {"driver": DRIVER}});
        let message = denial(&create("ResourceClaim", claim("v1", vec![entry]))).to_owned();
        assert!(
            message.starts_with("spec.devices.config[0].opaque.parameters: required"),
            "{message}"
        );
    }

    #[test]
    fn other_drivers_and_non_opaque_entries_are_ignored() {
        let foreign = json!({"opaque": {"driver": "gpu.nvidia.com", "parameters": mps(150)}});
        let no_opaque = json!({"requests": ["gpu"]});
        let resp = create(
            "ResourceClaim",
            claim("v1", vec![foreign.clone(), no_opaque]),
        );
        assert!(resp.allowed, "{resp:?}");
        // The same entry is ours when the webhook runs with NVIDIA's driver name.
        let req = request(
            "v1",
            "ResourceClaim",
            "CREATE",
            Some(claim("v1", vec![foreign])),
            None,
        );
        assert!(!review(&req, "gpu.nvidia.com").allowed);
    }

    #[test]
    fn template_is_judged_at_its_nested_spec() {
        let template = json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": "t", "namespace": "ns"},
            "spec": {"spec": {"devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
                "config": [ours(mps(101))]
            }}}
        });
        let message = denial(&create("ResourceClaimTemplate", template)).to_owned();
        assert!(
            message.starts_with(
                "spec.spec.devices.config[0].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage: "
            ),
            "{message}"
        );
    }

    #[test]
    fn device_class_is_judged_at_spec_config() {
        let class = |params: Value| {
            json!({
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": "gpu.gpu-dra.dev"},
                "spec": {
                    "selectors": [{"cel": {"expression": "device.driver == 'gpu.gpu-dra.dev'"}}],
                    "config": [ours(params)]
                }
            })
        };
        let message = denial(&create("DeviceClass", class(mps(150)))).to_owned();
        assert!(
            message.starts_with("spec.config[0].opaque.parameters.sharing.mpsConfig."),
            "{message}"
        );
        assert!(create("DeviceClass", class(mps(50))).allowed);
    }

    #[test]
    fn beta_versions_are_read_the_same_way() {
        for version in ["v1beta1", "v1beta2"] {
            let req = request(
                version,
                "ResourceClaim",
                "CREATE",
                Some(claim(version, vec![ours(mps(150))])),
                None,
            );
            let resp = review(&req, DRIVER);
            assert!(
                denial(&resp).starts_with("spec.devices.config[0].opaque.parameters.sharing."),
                "{version}"
            );
        }
    }

    #[test]
    fn updates_are_judged_but_unchanged_invalid_config_is_let_through() {
        let bad = claim("v1", vec![ours(mps(150))]);
        let good = claim("v1", vec![ours(mps(10))]);
        let introduce = request(
            "v1",
            "ResourceClaim",
            "UPDATE",
            Some(bad.clone()),
            Some(good),
        );
        assert!(!review(&introduce, DRIVER).allowed);
        let mut relabelled = bad.clone();
        relabelled["metadata"]["labels"] = json!({"x": "y"});
        let keep = request("v1", "ResourceClaim", "UPDATE", Some(relabelled), Some(bad));
        let resp = review(&keep, DRIVER);
        assert!(resp.allowed, "{resp:?}");
        let warnings = resp.warnings.expect("warning");
        assert!(
            warnings[0].contains("defaultActiveThreadPercentage"),
            "{warnings:?}"
        );
    }

    #[test]
    fn deletes_subresources_and_other_kinds_are_allowed() {
        let bad = claim("v1", vec![ours(mps(150))]);
        let delete = request("v1", "ResourceClaim", "DELETE", None, Some(bad.clone()));
        assert!(review(&delete, DRIVER).allowed);
        let mut status = request("v1", "ResourceClaim", "UPDATE", Some(bad.clone()), None);
        status.sub_resource = Some("status".into());
        assert!(review(&status, DRIVER).allowed);
        let slice = request("v1", "ResourceSlice", "CREATE", Some(bad.clone()), None);
        assert!(review(&slice, DRIVER).allowed);
        let mut other_group = request("v1", "ResourceClaim", "CREATE", Some(bad), None);
        other_group.kind.group = "example.com".into();
        assert!(review(&other_group, DRIVER).allowed);
    }

    #[test]
    fn response_review_round_trips_as_admission_v1() {
        let resp = create("ResourceClaim", claim("v1", vec![ours(mps(150))]));
        let wire = serde_json::to_value(resp.into_review()).expect("json");
        assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(wire["kind"], "AdmissionReview");
        assert_eq!(wire["response"]["allowed"], false);
        assert_eq!(
            wire["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(wire["response"]["status"]["code"], 422);
    }
}
