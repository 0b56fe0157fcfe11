//! MigDeviceConfig on dynamic and static MIG devices: the same rules at planning (pure,
//! over the fixture inventory). No sharing config plans as is; time-slicing (and
//! Exclusive) act on a whole GPU and are refused naming `sharing.strategy`; MPS on a MIG
//! device is refused naming the field and the device; a GpuConfig on a MIG device is
//! refused naming `kind`.

use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::{Value, json};

use crate::inventory::fixtures::{dgx_h100, h100, with_mig};
use crate::inventory::{DynamicMig, Inventory};
use crate::prepare::plan::{PlanError, plan_claim};

const DRIVER: &str = "gpu.gpu-dra.dev";
const NODE: &str = "node-a";
/// A placement of dynamic GPU 0.
const DYNAMIC: &str = "gpu-0-mig-3g40gb-9-4";
/// An existing MIG device of static GPU 1.
const STATIC: &str = "gpu-1-mig-3g40gb-9-0";

fn inventory() -> Inventory {
    let mut inv = dgx_h100();
    inv.gpus[0] = with_mig(h100(0), &[]);
    inv.gpus[0].dynamic_mig = Some(DynamicMig::default());
    inv
}

fn claim(device: &str, kind: &str, sharing: Option<Value>) -> ResourceClaim {
    let mut parameters = json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": kind});
    if let Some(s) = sharing {
        parameters["sharing"] = s;
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": "c", "uid": "uid-c"},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {
            "results": [{"request": "mig", "driver": DRIVER, "pool": NODE, "device": device}],
            "config": [{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": parameters}}]
        }}},
    }))
    .expect("claim")
}

fn plan(
    device: &str,
    kind: &str,
    sharing: Option<Value>,
) -> Result<Vec<crate::prepare::plan::DevicePlan>, PlanError> {
    plan_claim(&claim(device, kind, sharing), &inventory(), DRIVER, NODE)
}

#[test]
fn a_mig_device_config_without_sharing_plans_on_both() {
    for device in [DYNAMIC, STATIC] {
        let plans = plan(device, "MigDeviceConfig", None).expect(device);
        assert_eq!(plans.len(), 1);
        assert!(plans[0].policy.is_none(), "{device}");
        assert_eq!(plans[0].dynamic.is_some(), device == DYNAMIC);
    }
}

#[test]
fn time_slicing_on_a_mig_device_is_refused_naming_the_field() {
    for device in [DYNAMIC, STATIC] {
        for sharing in [
            json!({"strategy": "TimeSlicing"}),
            json!({"strategy": "Exclusive"}),
        ] {
            let err = plan(device, "MigDeviceConfig", Some(sharing.clone()))
                .expect_err(device)
                .to_string();
            assert!(
                err.contains("sharing.strategy")
                    && err.contains(sharing["strategy"].as_str().unwrap_or_default())
                    && err.contains("MigDeviceConfig"),
                "{device} {sharing}: {err}"
            );
        }
    }
}

#[test]
fn mps_on_a_mig_device_is_refused_naming_the_field_and_the_device() {
    for device in [DYNAMIC, STATIC] {
        let err =
            plan(device, "MigDeviceConfig", Some(json!({"strategy": "MPS"}))).expect_err(device);
        assert!(
            matches!(err, PlanError::MpsOnMig { .. }),
            "{device}: {err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("sharing.strategy") && text.contains(device),
            "{device}: {text}"
        );
    }
}

#[test]
fn a_gpu_config_on_a_mig_device_is_refused_naming_kind() {
    for device in [DYNAMIC, STATIC] {
        let err = plan(device, "GpuConfig", None)
            .expect_err(device)
            .to_string();
        assert!(
            err.contains("kind") && err.contains("MigDeviceConfig"),
            "{device}: {err}"
        );
    }
}

#[test]
fn the_full_gpu_of_a_dynamic_gpu_takes_a_gpu_config() {
    let sharing = json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}});
    let plans = plan("gpu-0", "GpuConfig", Some(sharing)).expect("full GPU");
    assert!(plans[0].full_of_dynamic.is_some());
    assert!(plans[0].policy.is_some());
    let err = plan("gpu-0", "MigDeviceConfig", None)
        .expect_err("mig config")
        .to_string();
    assert!(err.contains("kind"), "{err}");
}
