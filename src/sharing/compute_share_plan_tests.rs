//! Tests of compute-share planning: consumed capacity to namespace limits, and the decision
//! per node (MPS v3, legacy v2) and claim (several GPUs, a conflicting sharing config).

use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::json;

use super::*;
use crate::inventory::fixtures;
use crate::sharing::control::TimeSlice;

const GIB: u64 = 1 << 30;
const V3: &str = "615.71.09";

fn claim(results: serde_json::Value) -> ResourceClaim {
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": "tgi", "uid": "uid-1"},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": results}}},
    }))
    .unwrap()
}

fn result(device: &str, consumed: serde_json::Value) -> serde_json::Value {
    json!({"request": "gpu", "driver": "gpu.gpu-dra.dev", "pool": "node-a",
           "device": device, "consumedCapacity": consumed})
}

fn shares_of(
    c: &ResourceClaim,
    gpus: &[(&str, &str)],
    policy: Option<&Policy>,
) -> Vec<ComputeShare> {
    let inputs: Vec<(DeviceInput<'_>, Option<&Policy>)> = gpus
        .iter()
        .map(|(device, uuid)| {
            (
                DeviceInput {
                    request: "gpu",
                    device,
                    gpu_uuid: uuid,
                    mig: false,
                },
                policy,
            )
        })
        .collect();
    compute_shares(
        c,
        "gpu.gpu-dra.dev",
        "node-a",
        &inputs,
        &fixtures::dgx_h100(),
    )
    .unwrap()
}

#[test]
fn consumed_compute_and_memory_become_namespace_limits() {
    let inv = fixtures::dgx_h100();
    let gpu = inv.gpus[0].uuid.clone();
    let c = claim(json!([result(
        "gpu-0",
        json!({"memory": "18Gi", "compute": "40"})
    )]));
    let shares = shares_of(&c, &[("gpu-0", &gpu)], None);
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].compute_percent, 40);
    assert_eq!(shares[0].pinned_memory_mib, Some(18 * 1024));
    let ComputeDecision::Enforce(rec) =
        decide("uid-1", shares, &ComputeSupport::detect(V3), false).unwrap()
    else {
        panic!("an MPS v3 node enforces the share");
    };
    assert_eq!(
        (
            rec.namespace.as_str(),
            rec.active_thread_percentage,
            rec.gpu_uuid.as_str()
        ),
        ("uid-1", 40, gpu.as_str())
    );

    // Memory only (compute left out: 100 percent) is still a share and joins the daemon.
    let c = claim(json!([result("gpu-0", json!({"memory": "18Gi"}))]));
    let shares = shares_of(&c, &[("gpu-0", &gpu)], None);
    assert_eq!(shares[0].compute_percent, 100);
    assert!(matches!(
        decide("uid-1", shares, &ComputeSupport::detect(V3), false),
        Ok(ComputeDecision::Enforce(_))
    ));

    // The whole GPU, or no consumed capacity, is not a share.
    let whole = inv.gpus[0].memory_bytes.to_string();
    for consumed in [json!({"memory": whole, "compute": "100"}), json!({})] {
        let c = claim(json!([result("gpu-0", consumed)]));
        assert!(shares_of(&c, &[("gpu-0", &gpu)], None).is_empty());
    }
    assert_eq!(
        decide("uid-1", vec![], &ComputeSupport::detect(V3), false).unwrap(),
        ComputeDecision::Nothing
    );
}

#[test]
fn bad_compute_amounts_name_the_field() {
    let gpu = fixtures::dgx_h100().gpus[0].uuid.clone();
    for bad in ["140", "lots", "-3"] {
        let c = claim(json!([result(
            "gpu-0",
            json!({"memory": "1Gi", "compute": bad})
        )]));
        let inputs = [(
            DeviceInput {
                request: "gpu",
                device: "gpu-0",
                gpu_uuid: &gpu,
                mig: false,
            },
            None,
        )];
        let err = compute_shares(
            &c,
            "gpu.gpu-dra.dev",
            "node-a",
            &inputs,
            &fixtures::dgx_h100(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("consumedCapacity.compute"),
            "{err}"
        );
    }
}

#[test]
fn legacy_mps_v2_nodes_enforce_no_compute_share() {
    let gpu = fixtures::dgx_h100().gpus[0].uuid.clone();
    let v2 = ComputeSupport::detect("570.124.06");
    assert!(v2.problem.as_ref().unwrap().contains("r615"));
    let c = claim(json!([result(
        "gpu-0",
        json!({"memory": "18Gi", "compute": "40"})
    )]));
    let err = decide("uid-1", shares_of(&c, &[("gpu-0", &gpu)], None), &v2, false).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("gpu-0 (40% on GPU-") && text.contains("upgrade the driver to r615"),
        "{text}"
    );
    assert!(text.contains("--allow-scheduling-only-shares"), "{text}");
    let ComputeDecision::SchedulingOnly(rec) =
        decide("uid-1", shares_of(&c, &[("gpu-0", &gpu)], None), &v2, true).unwrap()
    else {
        panic!("scheduling-only when allowed");
    };
    assert!(rec.scheduling_only.unwrap().contains("MPS v2"));
    // Compute 100 asks for no limit: nothing to enforce, no daemon on v2.
    let c = claim(json!([result("gpu-0", json!({"memory": "18Gi"}))]));
    assert_eq!(
        decide("uid-1", shares_of(&c, &[("gpu-0", &gpu)], None), &v2, false).unwrap(),
        ComputeDecision::Nothing
    );
    // A sharing config on a v2 node keeps today's meaning (the ledger judges it).
    let ts = Policy::TimeSlicing {
        interval: TimeSlice::Long,
    };
    let c = claim(json!([result("gpu-0", json!({"memory": "18Gi"}))]));
    assert_eq!(
        decide(
            "uid-1",
            shares_of(&c, &[("gpu-0", &gpu)], Some(&ts)),
            &v2,
            false
        )
        .unwrap(),
        ComputeDecision::Nothing
    );
}

#[test]
fn conflicting_configs_and_multi_gpu_shares_are_refused_on_v3() {
    let inv = fixtures::dgx_h100();
    let (g0, g1) = (inv.gpus[0].uuid.clone(), inv.gpus[1].uuid.clone());
    let v3 = ComputeSupport::detect(V3);
    let ts = Policy::TimeSlicing {
        interval: TimeSlice::Long,
    };
    let c = claim(json!([result(
        "gpu-0",
        json!({"memory": "18Gi", "compute": "40"})
    )]));
    let err = decide(
        "uid-1",
        shares_of(&c, &[("gpu-0", &g0)], Some(&ts)),
        &v3,
        true,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&g0)
            && text.contains("sharing.strategy asks for TimeSlicing")
            && text.contains("remove `sharing`"),
        "{text}"
    );
    let c = claim(json!([
        result("gpu-0", json!({"memory": "18Gi", "compute": "40"})),
        result("gpu-1", json!({"memory": "18Gi", "compute": "40"})),
    ]));
    let shares = shares_of(&c, &[("gpu-0", &g0), ("gpu-1", &g1)], None);
    let err = decide("uid-1", shares.clone(), &v3, false).unwrap_err();
    assert!(err.to_string().contains("shares of 2 GPUs"), "{err}");
    assert!(matches!(
        decide("uid-1", shares, &v3, true),
        Ok(ComputeDecision::SchedulingOnly(_))
    ));
    let _ = GIB;
}

#[test]
fn records_round_trip_through_the_checkpoint() {
    let rec = ComputeShareRecord {
        device: "gpu-0".into(),
        gpu_uuid: "GPU-1".into(),
        namespace: "uid-1".into(),
        active_thread_percentage: 30,
        pinned_memory_mib: Some(12 * 1024),
        scheduling_only: None,
    };
    let extra = [(CHECKPOINT_KEY.to_owned(), rec.to_value())].into();
    assert_eq!(ComputeShareRecord::from_extra(&extra), Some(rec));
}
