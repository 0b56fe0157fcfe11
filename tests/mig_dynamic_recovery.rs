//! Dynamic MIG after a lost checkpoint, through the real NVML code path: instances of
//! claims still allocated here are re-adopted in use (ids, MIG UUID and CDI spec
//! unchanged), an instance of a prepare cut before its spec is destroyed so the retry
//! prepares afresh, and an instance of no claim stays foreign and kept.
//!
//! The rig (fake machine, preparer) is `tests/mig_dynamic/mod.rs`.
#![allow(unsafe_code)]

#[path = "mig_dynamic/mod.rs"]
mod rig;

use gpu_dra::checkpoint::ClaimState;
use gpu_dra::inventory::Placement;
use gpu_dra::prepare::mig_dynamic;
use gpu_dra::slices::desired::{SliceFeatures, desired_devices};
use rig::*;

/// 1g.10gb at memory slice 4 and 6.
const C: &str = "gpu-0-mig-1g10gb-19-4";
const HAND: &str = "gpu-0-mig-1g10gb-19-6";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_checkpoint_live_claims_keep_their_instances_and_foreign_ones_stay() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    let live = [claim("a", A), claim("c", C)];
    let first = make_rig(m, &live, None, None);
    let a = first.prepare("a", "prepare a").await;
    let spec_path = gpu_dra::cdi::spec_path(&first.cdi_root(), "uid-a");
    let spec_before = std::fs::read(&spec_path).expect("spec a");
    let before = mig_dynamic::records_of(&first.checkpoint().claims["uid-a"])[0].clone();
    // Claim c's prepare was cut after its instance, before its spec; one more instance was
    // made by hand.
    first.make_instance(&uuid, 19, Placement { start: 4, size: 1 }, true);
    let by_hand = first.make_instance(&uuid, 19, Placement { start: 6, size: 1 }, true);

    // The checkpoint is lost; the API server still has a and c allocated here.
    let rig = restart_after_loss(m, first, &live);
    let report = rig.preparer.recover_after_loss(Some(&live)).await;
    assert_eq!(report.rebuilt, ["uid-a", "uid-c"], "{report:?}");
    assert_eq!(report.rolled_back, ["uid-c"], "{report:?}");
    assert!(!report.deferred);

    // a: same instance, same spec byte for byte, recorded in use with its ids.
    assert_eq!(std::fs::read(&spec_path).expect("spec a"), spec_before);
    let cp = rig.checkpoint();
    let entry = &cp.claims["uid-a"];
    assert_eq!(entry.state, ClaimState::PrepareCompleted);
    assert_eq!(
        mig_dynamic::records_of(entry),
        std::slice::from_ref(&before)
    );
    assert_eq!(entry.devices[0].mig_uuid, before.mig_uuid);
    // c: its half-made instance destroyed, nothing recorded; the hand-made one kept.
    assert!(!cp.claims.contains_key("uid-c"));
    let mut left: Vec<(u32, u32)> = instances(m).iter().map(|g| (g.0, g.2)).collect();
    left.sort();
    let mut want = vec![(before.gi_id.expect("gi"), 0), (by_hand, 6)];
    want.sort();
    assert_eq!(left, want);

    // Only the hand-made instance is foreign; a's device stays published (its allocation
    // holds the placement), the hand-made one's placements are not offered.
    let inv = rig._inventory.borrow().clone();
    let foreign: Vec<u32> = inv.gpus[0]
        .dynamic_mig
        .as_ref()
        .expect("dynamic")
        .foreign
        .iter()
        .map(|f| f.gi_id)
        .collect();
    assert_eq!(foreign, [by_hand]);
    let names: Vec<String> = desired_devices(&inv, &SliceFeatures::default())
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert!(names.contains(&A.to_string()) && names.contains(&C.to_string()));
    assert!(!names.contains(&HAND.to_string()));
    assert!(
        !names.contains(&"gpu-0".to_string()),
        "no full GPU beside a foreign instance"
    );

    // a is answered from the rebuilt entry; unprepare still destroys its instance.
    let again = rig.prepare("a", "again").await;
    assert_eq!(again, a);
    assert_eq!(instances(m).len(), 2);
    rig.unprepare("a", "unprepare a").await;
    assert_eq!(instance_ids(m), [by_hand]);
    // The kubelet's retry of c prepares it afresh.
    rig.prepare("c", "prepare c").await;
    assert!(instances(m).iter().any(|g| (g.1, g.2) == (19, 4)));
    rig.unprepare("c", "unprepare c").await;
    assert_eq!(instance_ids(m), [by_hand]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_checkpoint_a_full_gpu_claim_keeps_mig_mode_off_until_unprepare() {
    let (_serial, m) = serial_fresh().await;
    let live = [claim("full", "gpu-0")];
    let first = make_rig(m, &live, None, None);
    first.prepare("full", "prepare the full GPU").await;
    assert_eq!(mig_mode(m, 0), (false, false));
    let spec_path = gpu_dra::cdi::spec_path(&first.cdi_root(), "uid-full");
    let spec_before = std::fs::read(&spec_path).expect("spec");

    // The checkpoint is lost; the published slices show gpu-0 as a dynamic full GPU.
    let rig = restart_after_loss(m, first, &live);
    let report = rig.preparer.recover_after_loss(Some(&live)).await;
    assert_eq!(report.rebuilt, ["uid-full"], "{report:?}");
    assert_eq!(
        mig_mode(m, 0),
        (false, false),
        "MIG mode left off under the pod"
    );
    assert_eq!(std::fs::read(&spec_path).expect("spec"), spec_before);
    let cp = rig.checkpoint();
    assert_eq!(
        gpu_dra::prepare::mig_full::records_of(&cp.claims["uid-full"])[0].gpu_uuid,
        gpu0_uuid(m)
    );
    let inv = rig._inventory.borrow().clone();
    assert!(
        inv.gpus[0].dynamic_mig.is_some() && !inv.gpus[0].mig.enabled,
        "still dynamic with MIG mode off"
    );
    rig.unprepare("full", "unprepare").await;
    assert_eq!(mig_mode(m, 0), (true, true), "MIG mode back on");
}
