//! The full GPU of a dynamic MIG GPU through the real NVML code path: MIG mode off at
//! prepare, back on at unprepare, refusals when instances exist, the GPU is busy or the
//! change needs a reset, rollback and recovery; the preparer drives the fake
//! `libnvidia-ml.so` and the GPU's MIG mode is read back from the fake's state file.
//!
//! The rig (fake machine, preparer) is `tests/mig_dynamic/mod.rs`: GPU 0 toggles MIG mode
//! at once (H100), GPU 1 only after a reset (as in a pass-through VM).
#![allow(unsafe_code)]

#[path = "mig_dynamic/mod.rs"]
mod rig;

use gpu_dra::checkpoint::ClaimState;
use gpu_dra::inventory::{Discover, NvmlDiscovery, Placement};
use gpu_dra::prepare::{mig_full, mig_select};
use gpu_dra::slices::desired::{SliceFeatures, desired_devices};
use nvidia_ml::control;
use rig::*;

const FULL: &str = "gpu-0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_gpu_leaves_mig_mode_for_its_claim_and_returns_to_it() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    let rig = make_rig(m, &[claim("full", FULL), claim("b", B)], None, None);
    let before = desired_devices(&rig._inventory.borrow(), &SliceFeatures::default());
    let answer = rig.prepare("full", "prepare the full GPU").await;
    assert_eq!(answer[0].device_name, FULL);
    assert_eq!(
        mig_mode(m, 0),
        (false, false),
        "MIG mode off, nothing pending"
    );
    let spec = rig.spec("uid-full").expect("spec").to_string();
    assert!(
        spec.contains(&uuid) && spec.contains("/dev/nvidia0"),
        "{spec}"
    );
    assert!(!spec.contains("MIG-"), "{spec}");
    let cp = rig.checkpoint();
    let entry = &cp.claims["uid-full"];
    assert_eq!(entry.state, ClaimState::PrepareCompleted);
    assert_eq!(mig_full::records_of(entry)[0].gpu_uuid, uuid);

    // Re-discovered with MIG off, the GPU stays dynamic and publishes the same devices.
    let discovery = NvmlDiscovery::new(Some(&m.lib), rig.dir.path().join("sys")).expect("nvml");
    let mut inv = discovery.discover().expect("discover");
    let owned = mig_select::owned_records(&cp);
    let full = mig_full::full_gpu_uuids(&cp);
    let chosen = mig_select::choose_with(&inv, &mig_select::DynamicMigMode::Auto, &owned, &full);
    assert!(chosen.contains(&uuid), "still dynamic after a restart");
    mig_select::annotate_with(&mut inv, &chosen, &owned, &full);
    assert_eq!(desired_devices(&inv, &SliceFeatures::default()), before);

    // Idempotent, and unprepare puts MIG mode back.
    let again = rig.prepare("full", "again").await;
    assert_eq!(again, answer);
    rig.unprepare("full", "unprepare").await;
    assert_eq!(mig_mode(m, 0), (true, true), "MIG mode back on");
    assert!(rig.checkpoint().claims.is_empty());
    assert!(rig.spec("uid-full").is_none());
    // Placements work again.
    rig.prepare("b", "MIG device after").await;
    rig.unprepare("b", "unprepare b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_gpu_is_refused_while_an_instance_exists() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    let rig = make_rig(m, &[claim("full", FULL)], None, None);
    // Made by hand after the slices were published.
    let by_hand = rig.make_instance(&uuid, 19, Placement { start: 6, size: 1 }, false);
    let text = rig.prepare_err("full", "instances exist").await;
    assert!(
        text.contains(&uuid) && text.contains(&format!("{by_hand} (profile id 19, slices 6..7)")),
        "{text}"
    );
    assert_eq!(mig_mode(m, 0), (true, true), "MIG mode untouched");
    assert_eq!(instance_ids(m), [by_hand]);
    assert!(rig.checkpoint().claims.is_empty());
    assert!(rig.spec("uid-full").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_gpu_keeps_mig_mode_and_the_claim_fails_or_waits() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    let rig = make_rig(m, &[claim("full", FULL)], None, None);
    assert!(control::set_gpu_clients(&m.state, &uuid, 1).expect("busy"));
    let text = rig.prepare_err("full", "busy").await;
    assert!(
        text.contains(&uuid) && text.contains("processes hold the GPU"),
        "{text}"
    );
    assert_eq!(mig_mode(m, 0), (true, true), "no change pending");
    assert!(rig.checkpoint().claims.is_empty());

    // Idle: prepared. Busy again at unprepare: refused and kept for the retry.
    control::set_gpu_clients(&m.state, &uuid, 0).expect("idle");
    rig.prepare("full", "prepare").await;
    control::set_gpu_clients(&m.state, &uuid, 1).expect("busy");
    let text = rig.unprepare_err("full", "busy at unprepare").await;
    assert!(text.contains("switching MIG mode on"), "{text}");
    assert_eq!(mig_mode(m, 0), (false, false));
    assert!(rig.checkpoint().claims.contains_key("uid-full"));
    control::set_gpu_clients(&m.state, &uuid, 0).expect("idle");
    rig.unprepare("full", "retry").await;
    assert_eq!(mig_mode(m, 0), (true, true));
    assert!(rig.checkpoint().claims.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_needing_a_reset_keeps_mig_mode_without_a_pending_change() {
    let (_serial, m) = serial_fresh().await;
    let uuid1 = gpu_uuid(m, 1);
    let rig = make_rig(m, &[claim("full1", "gpu-1")], None, None);
    let text = rig.prepare_err("full1", "reset required").await;
    assert!(
        text.contains(&uuid1) && text.contains("needs a reset") && text.contains("7g"),
        "{text}"
    );
    // Asked back: current and pending agree, so no pending-change taint appears.
    assert_eq!(mig_mode(m, 1), (true, true));
    assert!(rig.checkpoint().claims.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_in_the_mig_mode_calls_or_after_leaves_mig_mode_on() {
    let (_serial, m) = serial_fresh().await;
    let uuid = gpu0_uuid(m);
    for function in ["nvmlDeviceGetMigMode", "nvmlDeviceSetMigMode"] {
        let rig = make_rig(m, &[claim("full", FULL)], None, None);
        fail_once(m, function, Some(uuid.clone()));
        let text = rig.prepare_err("full", function).await;
        assert!(text.contains(function) && text.contains(&uuid), "{text}");
        assert_eq!(mig_mode(m, 0), (true, true), "{function}");
        assert!(rig.checkpoint().claims.is_empty(), "{function}");
        rig.prepare("full", "retry").await;
        rig.unprepare("full", "unprepare").await;
    }
    // A CDI write failure after MIG mode went off puts it back on.
    let rig = make_rig(m, &[claim("full", FULL)], None, None);
    std::fs::write(rig.cdi_root(), "not a directory").expect("block cdi root");
    let text = rig.prepare_err("full", "cdi").await;
    assert!(text.contains("CDI"), "{text}");
    assert_eq!(mig_mode(m, 0), (true, true), "rolled back");
    std::fs::remove_file(rig.cdi_root()).expect("unblock");
    rig.prepare("full", "retry").await;
    rig.unprepare("full", "unprepare").await;
    assert_eq!(mig_mode(m, 0), (true, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_turns_mig_back_on_for_a_cut_prepare_and_keeps_a_completed_one() {
    let (_serial, m) = serial_fresh().await;
    let first = make_rig(m, &[claim("full", FULL)], None, None);
    first.prepare("full", "prepare").await;
    let completed = first.checkpoint().as_ref().clone();
    drop(first);
    // A restart with the claim completed: MIG mode stays off, the claim is kept.
    let kept = make_rig(m, &[claim("full", FULL)], Some(completed.clone()), None);
    let report = kept.preparer.recover().await;
    assert_eq!(report.kept, ["uid-full"]);
    assert_eq!(mig_mode(m, 0), (false, false));
    drop(kept);
    // A crash right after MIG mode went off: the entry is still PrepareStarted.
    let mut cut = completed;
    if let Some(e) = cut.claims.get_mut("uid-full") {
        e.state = ClaimState::PrepareStarted;
    }
    let restarted = make_rig(m, &[claim("full", FULL)], Some(cut), None);
    let report = restarted.preparer.recover().await;
    assert_eq!(report.rolled_back, ["uid-full"]);
    assert_eq!(mig_mode(m, 0), (true, true), "MIG mode back on");
    assert!(restarted.checkpoint().claims.is_empty());
}
