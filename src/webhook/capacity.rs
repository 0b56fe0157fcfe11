//! Share amounts in claim requests that no GPU of this driver can ever satisfy: a
//! `compute` capacity request above 100 (percent of one GPU's SMs, the maximum of every
//! share's `validRange`, [`crate::slices::shares`]).
//!
//! Owns finding the requests of a ResourceClaim or ResourceClaimTemplate that ask this
//! driver's DeviceClasses (named `<anything>.<domain>` for driver `<first label>.<domain>`,
//! as the chart names them) for consumable capacity (KEP-5075 `capacity.requests`, in
//! `exactly` and in `firstAvailable[]` subrequests), and naming the field. Without this the
//! API server accepts the claim (it validates request policies on ResourceSlices only) and
//! the scheduler leaves the pod Pending with "cannot allocate all claims", which names
//! neither the capacity nor the amount. Must not judge amounts that depend on the node
//! (memory above a GPU's, more than is left): the scheduler's answer is the right one there.

use serde_json::Value;

use crate::config::FieldError;
use crate::config::quantity::parse_quantity;

/// Name of the share capacity holding a percentage of the GPU's SMs.
const COMPUTE: &str = "compute";

/// Largest `compute` a share can take: the whole GPU.
const MAX_COMPUTE: i64 = 100;

/// True when DeviceClass `class` is one of `driver`'s (`gpu.gpu-dra.dev`,
/// `gpu-shared.gpu-dra.dev` for driver `gpu.gpu-dra.dev`).
fn ours(class: &str, driver: &str) -> bool {
    let domain = driver.split_once('.').map_or(driver, |(_, d)| d);
    class == driver || class.ends_with(&format!(".{domain}"))
}

/// Errors for the `capacity.requests` of one request body (`exactly` or a subrequest) at
/// `path`.
fn request_errors(request: &Value, path: &str, driver: &str, errors: &mut Vec<FieldError>) {
    let class = request
        .get("deviceClassName")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(requests) = request
        .get("capacity")
        .and_then(|c| c.get("requests"))
        .and_then(Value::as_object)
    else {
        return;
    };
    for (name, amount) in requests {
        let qualified = format!("{driver}/{COMPUTE}");
        let is_compute = name == &qualified || (name == COMPUTE && ours(class, driver));
        let Some(text) = amount.as_str().filter(|_| is_compute) else {
            continue;
        };
        if parse_quantity(text).is_ok_and(|v| v > MAX_COMPUTE) {
            errors.push(FieldError::new(
                format!("{path}.capacity.requests.{name}"),
                format!(
                    "{text} is above {MAX_COMPUTE}: compute is a percentage of one GPU's SMs (1-{MAX_COMPUTE}); no GPU of {driver} can be allocated for it"
                ),
            ));
        }
    }
}

/// Every impossible share amount in the device requests of `devices` (a claim's
/// `spec.devices`), with paths below `devices_path` (`spec.devices`).
pub fn capacity_errors(devices: &Value, devices_path: &str, driver: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let requests = devices.get("requests").and_then(Value::as_array);
    for (i, request) in requests.into_iter().flatten().enumerate() {
        let path = format!("{devices_path}.requests[{i}]");
        if let Some(exactly) = request.get("exactly") {
            request_errors(exactly, &format!("{path}.exactly"), driver, &mut errors);
        }
        let subs = request.get("firstAvailable").and_then(Value::as_array);
        for (j, sub) in subs.into_iter().flatten().enumerate() {
            request_errors(
                sub,
                &format!("{path}.firstAvailable[{j}]"),
                driver,
                &mut errors,
            );
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    fn exactly(class: &str, requests: Value) -> Value {
        json!({"name": "gpu", "exactly": {"deviceClassName": class,
            "capacity": {"requests": requests}}})
    }

    fn paths(devices: Value) -> Vec<String> {
        capacity_errors(&devices, "spec.devices", DRIVER)
            .into_iter()
            .map(|e| e.path)
            .collect()
    }

    #[test]
    fn compute_above_100_is_named_with_its_path() {
        let errors = capacity_errors(
            &json!({"requests": [exactly("gpu.gpu-dra.dev", json!({"memory": "1Gi", "compute": "150"}))]}),
            "spec.devices",
            DRIVER,
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].path,
            "spec.devices.requests[0].exactly.capacity.requests.compute"
        );
        assert!(
            errors[0].message.starts_with("150 is above 100"),
            "{}",
            errors[0].message
        );
        // Fractions round up, as the scheduler compares them: 100.5 passes 100.
        assert_eq!(
            paths(json!({"requests": [exactly("gpu-shared.gpu-dra.dev", json!({"compute": "100.5"}))]})).len(),
            1
        );
    }

    #[test]
    fn subrequests_and_qualified_names_are_checked() {
        let devices = json!({"requests": [{"name": "gpu", "firstAvailable": [
            {"name": "small", "deviceClassName": "gpu.gpu-dra.dev",
             "capacity": {"requests": {"compute": "20"}}},
            {"name": "big", "deviceClassName": "other.example.com",
             "capacity": {"requests": {"gpu.gpu-dra.dev/compute": "200"}}},
        ]}]});
        assert_eq!(
            paths(devices),
            [
                "spec.devices.requests[0].firstAvailable[1].capacity.requests.gpu.gpu-dra.dev/compute"
            ]
        );
    }

    #[test]
    fn other_drivers_and_possible_amounts_pass() {
        let devices = json!({"requests": [
            exactly("nic.example.com", json!({"compute": "500"})),
            exactly("gpu.gpu-dra.dev", json!({"compute": "100", "memory": "500Gi"})),
            {"name": "plain", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}},
        ]});
        assert!(paths(devices).is_empty());
    }
}
