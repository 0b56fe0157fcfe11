//! Dynamic MIG prepare / unprepare / rollback / recovery through the real NVML code path:
//! the preparer drives the fake `libnvidia-ml.so` (tests/fake-nvml) with nvml-wrapper,
//! faults are injected into the fake's NVML calls, and the GPU's instances are read back
//! from the fake's state file.
//!
//! The rig (fake machine, preparer) is `tests/mig_dynamic/mod.rs`.
#![allow(unsafe_code)]

#[path = "mig_dynamic/mod.rs"]
mod rig;

use gpu_dra::checkpoint::ClaimState;
use gpu_dra::inventory::Placement;
use gpu_dra::prepare::error_chain;
use gpu_dra::prepare::mig_dynamic::{self, InstanceRecord};
use gpu_dra::slices::desired::{SliceFeatures, desired_devices};
use nvidia_ml::control;
use rig::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_pack_one_gpu_and_unprepare_empties_it() {
    let (_serial, m) = serial_fresh().await;
    let rig = make_rig(m, &[claim("a", A), claim("b", B)], None, None);
    let a = rig.prepare("a", "prepare a").await;
    let b = rig.prepare("b", "prepare b").await;
    assert_eq!(a[0].device_name, A);
    assert_eq!(
        b[0].cdi_device_ids,
        [format!("gpu-dra.dev/claim=uid-b-{B}")]
    );
    let gis = instances(m);
    assert_eq!(gis.len(), 2, "{gis:?}");
    assert!(gis.iter().any(|g| (g.1, g.2, g.3) == (9, 0, 1)));
    assert!(gis.iter().any(|g| (g.1, g.2, g.3) == (9, 4, 1)));

    // The CDI spec carries the MIG UUID and the capability nodes of the new instance.
    let cp = rig.checkpoint();
    let entry = &cp.claims["uid-a"];
    assert_eq!(entry.state, ClaimState::PrepareCompleted);
    let recs = mig_dynamic::records_of(entry);
    let rec = &recs[0];
    let mig_uuid = rec.mig_uuid.clone().expect("mig uuid recorded");
    assert!(mig_uuid.starts_with("MIG-"));
    assert_eq!(
        entry.devices[0].mig_uuid.as_deref(),
        Some(mig_uuid.as_str())
    );
    let spec = rig.spec("uid-a").expect("spec a").to_string();
    assert!(spec.contains(&mig_uuid), "{spec}");
    let gi = rec.gi_id.expect("gi id");
    let gi_minor = std::fs::read_to_string(
        m.proc_root
            .join(format!("driver/nvidia/capabilities/gpu0/mig/gi{gi}/access")),
    )
    .expect("gi access");
    let minor = gi_minor
        .lines()
        .find_map(|l| l.strip_prefix("DeviceFileMinor: "))
        .expect("minor");
    assert!(
        spec.contains(&format!("/dev/nvidia-caps/nvidia-cap{minor}")),
        "{spec}"
    );

    // Prepare is idempotent: same answer, no new instance.
    let again = rig.prepare("a", "again").await;
    assert_eq!(again, a);
    assert_eq!(instances(m).len(), 2);

    rig.unprepare("a", "unprepare a").await;
    assert_eq!(instances(m).len(), 1);
    rig.unprepare("b", "unprepare b").await;
    assert!(instances(m).is_empty(), "GPU back to empty");
    assert!(rig.spec("uid-a").is_none() && rig.spec("uid-b").is_none());
    assert!(rig.checkpoint().claims.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_taken_by_hand_fails_the_claim_and_keeps_the_instance() {
    let (_serial, m) = serial_fresh().await;
    let rig = make_rig(m, &[claim("b", B)], None, None);
    // Made behind the driver's back (as `nvidia-smi mig -cgi 2g.20gb` would).
    let uuid = gpu0_uuid(m);
    let foreign = rig.make_instance(&uuid, 14, Placement { start: 4, size: 2 }, false);
    let text = rig.prepare_err("b", "taken").await;
    assert!(
        text.contains(&uuid) && text.contains(&format!("GPU instance {foreign}")),
        "{text}"
    );
    assert!(
        text.contains("profile id 14") && text.contains("slices 4..6"),
        "{text}"
    );
    assert_eq!(instance_ids(m), [foreign]);
    assert!(rig.checkpoint().claims.is_empty());
    assert!(rig.spec("uid-b").is_none());
    // The published devices stop offering what overlaps it (and the full GPU); the rest
    // stays.
    let names: Vec<String> = desired_devices(&rig._inventory.borrow(), &SliceFeatures::default())
        .into_iter()
        .map(|d| d.name)
        .collect();
    for gone in [
        B,
        "gpu-0",
        "gpu-0-mig-2g20gb-14-4",
        "gpu-0-mig-1g10gb-19-5",
        "gpu-0-mig-7g80gb-0-0",
    ] {
        assert!(!names.contains(&gone.to_string()), "{gone} still offered");
    }
    for kept in [A, "gpu-0-mig-1g10gb-19-6", "gpu-1"] {
        assert!(
            names.contains(&kept.to_string()),
            "{kept} no longer offered"
        );
    }
}

/// Every NVML call on the prepare path of a dynamic MIG device, failing once.
const PATH_CALLS: &[&str] = &[
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetGpuInstances",
    "nvmlGpuInstanceGetInfo",
    "nvmlDeviceCreateGpuInstanceWithPlacement",
    "nvmlDeviceGetGpuInstanceById",
    "nvmlGpuInstanceGetComputeInstanceProfileInfo",
    "nvmlGpuInstanceCreateComputeInstance",
    "nvmlComputeInstanceGetInfo_v2",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetUUID",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_on_any_nvml_call_of_prepare_leaves_nothing_behind() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    for function in PATH_CALLS {
        let rig = make_rig(m, &[claim("b", B)], None, None);
        // The handle lookup runs before NVML knows the GPU: match any GPU.
        fail_once(
            m,
            function,
            (*function != "nvmlDeviceGetHandleByUUID").then(|| uuid.clone()),
        );
        let err = rig.preparer.prepare_claim(&cref("b")).await;
        let state = control::read_state(&m.state).expect("state");
        assert!(state.faults.is_empty(), "{function}: the fault fired");
        let text = error_chain(&err.expect_err(function));
        assert!(
            text.contains(&uuid),
            "{function}: error names the GPU: {text}"
        );
        assert!(
            text.contains("NVML ") && text.contains(" failed"),
            "{function}: error names the step and the NVML call: {text}"
        );
        assert!(
            instances(m).is_empty(),
            "{function}: left {:?}",
            instances(m)
        );
        assert!(
            rig.checkpoint().claims.is_empty(),
            "{function}: checkpoint entry left"
        );
        assert!(rig.spec("uid-b").is_none(), "{function}: spec left");
        // The kubelet's retry succeeds.
        rig.prepare("b", "retry").await;
        rig.unprepare("b", "unprepare").await;
        assert!(instances(m).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdi_or_capability_failure_after_create_destroys_the_instance() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    // CDI write: the CDI root is a regular file.
    let rig = make_rig(m, &[claim("b", B)], None, None);
    std::fs::write(rig.cdi_root(), "not a directory").expect("block cdi root");
    let text = rig.prepare_err("b", "cdi").await;
    assert!(
        text.contains("writing the CDI spec") && text.contains(&uuid),
        "{text}"
    );
    assert!(instances(m).is_empty(), "{:?}", instances(m));
    // The spec cannot be removed either, so the entry stays for the retry, as started.
    let cp = rig.checkpoint();
    assert!(
        cp.claims
            .values()
            .all(|e| e.state == ClaimState::PrepareStarted)
    );
    std::fs::remove_file(rig.cdi_root()).expect("unblock");
    rig.prepare("b", "retry").await;
    assert_eq!(instances(m).len(), 1);
    rig.unprepare("b", "unprepare").await;
    assert!(instances(m).is_empty());

    // Capability lookup: a /proc without the MIG capability files.
    let bare = tempfile::tempdir().expect("bare proc");
    std::fs::copy(m.proc_root.join("devices"), bare.path().join("devices")).expect("devices");
    let rig = make_rig(m, &[claim("b", B)], None, Some(bare.path()));
    let text = rig.prepare_err("b", "caps").await;
    assert!(
        text.contains("MIG capability") && text.contains(&uuid),
        "{text}"
    );
    assert!(instances(m).is_empty(), "{:?}", instances(m));
    assert!(rig.checkpoint().claims.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_destroys_half_done_instances_adopts_completed_and_keeps_unknown() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    // A completed claim on 3g@0, prepared normally.
    let first = make_rig(m, &[claim("a", A)], None, None);
    first.prepare("a", "prepare a").await;
    let completed = first.checkpoint().as_ref().clone();
    // A prepare cut short by a crash: 1g@4 recorded PrepareStarted, instance created, ids
    // never recorded.
    first.make_instance(&uuid, 19, Placement { start: 4, size: 1 }, true);
    // And one made by hand on 1g@6.
    let by_hand = first.make_instance(&uuid, 19, Placement { start: 6, size: 1 }, false);
    let mut cp = completed;
    let mut started = cp.claims["uid-a"].clone();
    started.state = ClaimState::PrepareStarted;
    started.name = "c".into();
    mig_dynamic::set_records(
        &mut started,
        &[InstanceRecord {
            device: "gpu-0-mig-1g10gb-19-4".into(),
            gpu_uuid: uuid.clone(),
            gpu_minor: 0,
            gi_profile_id: 19,
            placement: Placement { start: 4, size: 1 },
            gi_id: None,
            ci_id: None,
            mig_uuid: None,
        }],
    );
    started.devices.clear();
    cp.claims.insert("uid-c".into(), started);
    drop(first);

    let restarted = make_rig(m, &[claim("a", A)], Some(cp), None);
    let report = restarted.preparer.recover().await;
    assert_eq!(report.rolled_back, ["uid-c"]);
    assert_eq!(report.kept, ["uid-a"]);
    let left: Vec<(u32, u32)> = instances(m).iter().map(|g| (g.1, g.2)).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&(9, 0)), "completed claim's instance adopted");
    assert!(left.contains(&(19, 6)), "unknown instance kept");
    assert!(instances(m).iter().any(|g| g.0 == by_hand));
    // The adopted claim unprepares normally; the unknown instance stays.
    restarted.unprepare("a", "unprepare a").await;
    assert_eq!(instance_ids(m), [by_hand]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_the_rollback_cannot_destroy_is_kept_on_record_and_destroyed_on_retry() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    let rig = make_rig(m, &[claim("b", B)], None, None);
    for function in [
        "nvmlGpuInstanceCreateComputeInstance",
        "nvmlGpuInstanceDestroy",
    ] {
        fail_once(m, function, Some(uuid.clone()));
    }
    let text = rig.prepare_err("b", "ci").await;
    assert!(text.contains("creating the compute instance"), "{text}");
    let left = instances(m);
    assert_eq!(
        left.len(),
        1,
        "the GPU instance survived its rollback: {left:?}"
    );
    let cp = rig.checkpoint();
    let entry = &cp.claims["uid-b"];
    assert_eq!(entry.state, ClaimState::PrepareStarted);
    assert_eq!(mig_dynamic::records_of(entry)[0].gi_id, Some(left[0].0));
    // The kubelet's retry destroys it first, then prepares normally.
    rig.prepare("b", "retry").await;
    let now = instances(m);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].3, 1, "with its compute instance");
    rig.unprepare("b", "unprepare").await;
    assert!(instances(m).is_empty());
}
