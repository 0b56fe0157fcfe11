//! Component tests of the prepare state machine: fixed claims, the dgx-h100 fixture
//! inventory, recording hardware doubles, a temp dir for CDI specs, checkpoint and /proc.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::node_driver::each_claim;
use super::*;
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::claims::FixedClaims;
use crate::inventory::fixtures::dgx_h100;
use crate::plugin::NodeDriver;
use crate::sharing::{
    ComputeControl, ComputeMode, ControlError, MpsSettings, MpsSupervisor, TimeSlice,
    TimeSliceControl, TimeSliceState,
};

const DRIVER: &str = "gpu.gpu-dra.dev";
const NODE: &str = "node-a";

/// Records every hardware call and holds what was set (read back by the manager);
/// `fail_compute` makes compute-mode writes fail.
#[derive(Default)]
struct Hardware {
    calls: Mutex<Vec<String>>,
    fail_compute: bool,
    modes: Mutex<std::collections::BTreeMap<String, ComputeMode>>,
    slices: Mutex<std::collections::BTreeMap<String, TimeSlice>>,
}

impl Hardware {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    /// GPUs come back from a reboot with the default settings.
    fn reboot(&self) {
        self.modes.lock().unwrap().clear();
        self.slices.lock().unwrap().clear();
    }
}

impl ComputeControl for Hardware {
    fn set_compute_mode(&self, gpu_uuid: &str, mode: ComputeMode) -> Result<(), ControlError> {
        if self.fail_compute {
            return Err(ControlError::CommandFailed {
                command: "nvmlDeviceSetComputeMode".into(),
                gpu_uuid: gpu_uuid.into(),
                status: "NVML_ERROR_NO_PERMISSION".into(),
                stderr: String::new(),
            });
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("compute {gpu_uuid} {mode:?}"));
        self.modes.lock().unwrap().insert(gpu_uuid.to_owned(), mode);
        Ok(())
    }
    fn compute_mode(&self, gpu_uuid: &str) -> Result<ComputeMode, ControlError> {
        Ok(self
            .modes
            .lock()
            .unwrap()
            .get(gpu_uuid)
            .copied()
            .unwrap_or(ComputeMode::Default))
    }
}

impl TimeSliceControl for Hardware {
    fn set_time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
        interval: TimeSlice,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("timeslice {gpu_uuid} {interval:?}"));
        self.slices
            .lock()
            .unwrap()
            .insert(gpu_uuid.to_owned(), interval);
        async { Ok(()) }.boxed()
    }
    fn time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
    ) -> BoxFuture<'a, Result<TimeSliceState, ControlError>> {
        let current = self
            .slices
            .lock()
            .unwrap()
            .get(gpu_uuid)
            .copied()
            .unwrap_or(TimeSlice::Default);
        async move { Ok(TimeSliceState::Supported(current)) }.boxed()
    }
}

struct Rig {
    dir: tempfile::TempDir,
    hw: Arc<Hardware>,
    preparer: Preparer<FixedClaims>,
}

fn write_proc(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(
        root.join("devices"),
        "Character devices:\n195 nvidia-frontend\n236 nvidia-caps\n237 nvidia-uvm\n",
    )
    .unwrap();
}

fn rig_with(claims: Vec<ResourceClaim>, hw: Hardware, initial: Option<Checkpoint>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path().join("proc");
    write_proc(&proc_root);
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").unwrap();
    let plugin_dir = dir.path().join("plugin");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let store = CheckpointStore::new(&plugin_dir, &dir.path().join("boot_id"));
    let initial = initial.unwrap_or_else(|| store.load().unwrap().checkpoint);
    let (checkpoint, _task) = CheckpointWriter::spawn(store, initial);
    let hw = Arc::new(hw);
    let mps = MpsSupervisor::new(MpsSettings {
        control_path: dir.path().join("no-mps-control"),
        root_dir: plugin_dir.join("mps"),
        ready_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        private_shm: None,
    });
    let sharing = SharingManager::new(hw.clone(), hw.clone(), mps);
    let mut fixed = FixedClaims::new();
    for c in claims {
        fixed.insert(c);
    }
    let (_tx, inventory) = watch::channel(dgx_h100());
    let config = PreparerConfig {
        driver_name: DRIVER.into(),
        node_name: NODE.into(),
        cdi_root: dir.path().join("cdi"),
        proc_root,
    };
    let preparer = Preparer::new(config, fixed, inventory, sharing, checkpoint);
    Rig { dir, hw, preparer }
}

fn rig(claims: Vec<ResourceClaim>) -> Rig {
    rig_with(claims, Hardware::default(), None)
}

fn claim(name: &str, devices: &[(&str, &str)], config: Value) -> ResourceClaim {
    let results: Vec<Value> = devices
        .iter()
        .map(|(req, dev)| json!({"request": req, "driver": DRIVER, "pool": NODE, "device": dev}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "uid": format!("uid-{name}")},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": results, "config": config}}},
    }))
    .unwrap()
}

fn gpu_config(sharing: Value) -> Value {
    json!([{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharing": sharing}}}])
}

fn cref(name: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

fn spec_json(rig: &Rig, uid: &str) -> Option<Value> {
    let path = cdi::spec_path(&rig.dir.path().join("cdi"), uid);
    std::fs::read(path)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

#[tokio::test]
async fn full_gpu_claim_gets_spec_ids_and_checkpoint() {
    let r = rig(vec![claim("a", &[("gpu", "gpu-3")], json!([]))]);
    let out = r.preparer.prepare(vec![cref("a")]).await;
    let devices = out["uid-a"].as_ref().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_name, "gpu-3");
    assert_eq!(devices[0].pool_name, NODE);
    assert_eq!(devices[0].request_names, vec!["gpu"]);
    assert_eq!(
        devices[0].cdi_device_ids,
        vec!["gpu-dra.dev/claim=uid-a-gpu-3"]
    );

    let spec = spec_json(&r, "uid-a").expect("spec written");
    assert_eq!(spec["kind"], "gpu-dra.dev/claim");
    let dev = &spec["devices"][0];
    assert_eq!(dev["name"], "uid-a-gpu-3");
    assert_eq!(
        dev["containerEdits"]["deviceNodes"][0],
        json!({"path": "/dev/nvidia3", "type": "c", "major": 195, "minor": 3})
    );
    let common = &spec["containerEdits"];
    let gpu3 = dgx_h100().gpus[3].uuid.clone();
    assert_eq!(common["env"][0], format!("NVIDIA_VISIBLE_DEVICES={gpu3}"));
    let uvm = common["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["path"] == "/dev/nvidia-uvm")
        .unwrap();
    assert_eq!(uvm["major"], 237);

    let snap = r.preparer.checkpoint().snapshot();
    assert_eq!(snap.claims["uid-a"].state, ClaimState::PrepareCompleted);
    // No policy asked: no hardware call, and only one checkpoint write.
    assert!(r.hw.calls().is_empty());
    assert_eq!(r.preparer.checkpoint().writes(), 1);

    // Idempotent: the same answer, no new write.
    let again = r.preparer.prepare(vec![cref("a")]).await;
    assert_eq!(again["uid-a"].as_ref().unwrap(), devices);
    assert_eq!(r.preparer.checkpoint().writes(), 1);
}

#[tokio::test]
async fn time_slicing_is_applied_and_restored_by_the_last_unprepare() {
    let cfg =
        gpu_config(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}));
    let r = rig(vec![
        claim("a", &[("gpu", "gpu-0")], cfg.clone()),
        claim("b", &[("gpu", "gpu-0")], cfg),
    ]);
    let gpu0 = dgx_h100().gpus[0].uuid.clone();
    let out = r.preparer.prepare(vec![cref("a"), cref("b")]).await;
    assert!(out.values().all(Result::is_ok), "{out:?}");
    assert_eq!(r.hw.calls(), vec![format!("timeslice {gpu0} Long")]);

    let done = r.preparer.unprepare(vec![cref("a")]).await;
    assert!(done["uid-a"].is_ok());
    assert_eq!(r.hw.calls().len(), 1, "b still holds the policy");
    assert!(spec_json(&r, "uid-a").is_none());

    let done = r.preparer.unprepare(vec![cref("b")]).await;
    assert!(done["uid-b"].is_ok());
    assert_eq!(
        r.hw.calls().last().unwrap(),
        &format!("timeslice {gpu0} Default")
    );
    assert!(r.preparer.checkpoint().snapshot().claims.is_empty());

    // Unprepare of an unknown claim succeeds.
    let done = r.preparer.unprepare(vec![cref("never")]).await;
    assert!(done["uid-never"].is_ok());
}

#[tokio::test]
async fn one_bad_claim_does_not_fail_the_others() {
    let bad =
        gpu_config(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"intervall": "Long"}}));
    let r = rig(vec![
        claim("bad", &[("gpu", "gpu-0")], bad),
        claim("good", &[("gpu", "gpu-4")], json!([])),
        claim("ghost", &[("gpu", "gpu-99")], json!([])),
    ]);
    let out = r
        .preparer
        .prepare(vec![
            cref("bad"),
            cref("good"),
            cref("ghost"),
            cref("missing"),
        ])
        .await;
    assert_eq!(out.len(), 4);
    let bad = out["uid-bad"].as_ref().unwrap_err();
    assert!(bad.contains("sharing.timeSlicingConfig.intervall"), "{bad}");
    assert!(out["uid-good"].is_ok());
    let ghost = out["uid-ghost"].as_ref().unwrap_err();
    assert!(
        ghost.contains("gpu-99") && ghost.contains("not on this node"),
        "{ghost}"
    );
    let missing = out["uid-missing"].as_ref().unwrap_err();
    assert!(missing.contains("not found"), "{missing}");
    let snap = r.preparer.checkpoint().snapshot();
    assert_eq!(snap.claims.keys().collect::<Vec<_>>(), vec!["uid-good"]);
}

#[tokio::test]
async fn conflicting_interval_on_a_shared_gpu_is_refused() {
    let long =
        gpu_config(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}));
    let short =
        gpu_config(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short"}}));
    let r = rig(vec![
        claim("a", &[("gpu", "gpu-0")], long),
        claim("b", &[("gpu", "gpu-0")], short),
    ]);
    assert!(r.preparer.prepare(vec![cref("a")]).await["uid-a"].is_ok());
    let out = r.preparer.prepare(vec![cref("b")]).await;
    let err = out["uid-b"].as_ref().unwrap_err();
    assert!(err.contains("uid-a"), "names the holder: {err}");
    assert_eq!(r.hw.calls().len(), 1, "the first claim's GPU is untouched");
    assert!(spec_json(&r, "uid-b").is_none());
}

#[tokio::test]
async fn nvml_failure_mid_prepare_leaves_nothing_behind() {
    let exclusive = gpu_config(json!({"strategy": "Exclusive"}));
    let hw = Hardware {
        fail_compute: true,
        ..Hardware::default()
    };
    let r = rig_with(vec![claim("x", &[("gpu", "gpu-2")], exclusive)], hw, None);
    let out = r.preparer.prepare(vec![cref("x")]).await;
    let err = out["uid-x"].as_ref().unwrap_err();
    let gpu2 = dgx_h100().gpus[2].uuid.clone();
    assert!(
        err.contains("nvmlDeviceSetComputeMode") && err.contains(&gpu2),
        "{err}"
    );
    assert!(spec_json(&r, "uid-x").is_none());
    assert!(r.preparer.checkpoint().snapshot().claims.is_empty());
}

#[tokio::test]
async fn mig_device_gets_its_capability_nodes() {
    let inv = dgx_h100();
    let mig = inv
        .gpus
        .iter()
        .flat_map(|g| &g.mig_devices)
        .next()
        .unwrap()
        .clone();
    let name = mig.device_name();
    let r = rig(vec![claim("m", &[("mig", &name)], json!([]))]);
    let gi = r.dir.path().join(format!(
        "proc/driver/nvidia/capabilities/gpu{}/mig/gi{}",
        mig.parent_minor, mig.gi_id
    ));
    std::fs::create_dir_all(gi.join(format!("ci{}", mig.ci_id))).unwrap();
    std::fs::write(gi.join("access"), "DeviceFileMinor: 40\n").unwrap();
    std::fs::write(
        gi.join(format!("ci{}/access", mig.ci_id)),
        "DeviceFileMinor: 41\n",
    )
    .unwrap();

    let out = r.preparer.prepare(vec![cref("m")]).await;
    assert!(out["uid-m"].is_ok(), "{out:?}");
    let spec = spec_json(&r, "uid-m").unwrap();
    let nodes: Vec<&str> = spec["devices"][0]["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        vec![
            format!("/dev/nvidia{}", mig.parent_minor).as_str(),
            "/dev/nvidia-caps/nvidia-cap40",
            "/dev/nvidia-caps/nvidia-cap41"
        ]
    );
    assert_eq!(
        spec["containerEdits"]["env"][0],
        format!("NVIDIA_VISIBLE_DEVICES={}", mig.uuid)
    );
}

#[tokio::test]
async fn recovery_rolls_back_started_claims_and_removes_orphan_specs() {
    let gpu0 = dgx_h100().gpus[0].uuid.clone();
    let mut cp = Checkpoint::new("boot-1");
    let policy = serde_json::to_value(Policy::TimeSlicing {
        interval: TimeSlice::Long,
    })
    .unwrap();
    for (uid, state) in [
        ("uid-half", ClaimState::PrepareStarted),
        ("uid-done", ClaimState::PrepareCompleted),
    ] {
        cp.claims.insert(
            uid.into(),
            ClaimEntry {
                state,
                namespace: "ns".into(),
                name: uid.into(),
                devices: vec![PreparedDeviceRecord {
                    pool: NODE.into(),
                    device: "gpu-0".into(),
                    request_names: vec!["gpu".into()],
                    gpu_uuid: gpu0.clone(),
                    mig_uuid: None,
                    cdi_device_ids: vec![cdi::cdi_device_id(uid, "gpu-0")],
                    sharing: Some(policy.clone()),
                    share_id: None,
                }],
                extra: BTreeMap::new(),
            },
        );
    }
    let r = rig_with(vec![], Hardware::default(), Some(cp));
    let cdi_root = r.dir.path().join("cdi");
    let spec = cdi::claim_spec("uid-done", &[CdiDeviceInput::gpu("gpu-0", gpu0.clone(), 0)]);
    cdi::write_spec(&cdi_root, "uid-done", &spec).unwrap();
    cdi::write_spec(&cdi_root, "uid-orphan", &spec).unwrap();
    cdi::write_spec(&cdi_root, "uid-half", &spec).unwrap();

    let report = r.preparer.recover().await;
    assert_eq!(report.kept, vec!["uid-done"]);
    assert_eq!(report.rolled_back, vec!["uid-half"]);
    assert_eq!(report.orphan_specs_removed, vec!["uid-orphan"]);
    assert!(spec_json(&r, "uid-done").is_some());
    assert!(spec_json(&r, "uid-half").is_none());
    // uid-done still holds Long on gpu-0, so rolling back uid-half restores nothing.
    assert!(r.hw.calls().is_empty(), "{:?}", r.hw.calls());
    let snap = r.preparer.checkpoint().snapshot();
    assert_eq!(snap.claims.keys().collect::<Vec<_>>(), vec!["uid-done"]);
}

#[tokio::test]
async fn many_concurrent_claims_share_checkpoint_writes() {
    let claims: Vec<ResourceClaim> = (0..32)
        .map(|i| {
            claim(
                &format!("c{i}"),
                &[("gpu", &format!("gpu-{}", [0, 3, 4, 5][i % 4]))],
                json!([]),
            )
        })
        .collect();
    let refs: Vec<ClaimRef> = (0..32).map(|i| cref(&format!("c{i}"))).collect();
    let r = rig(claims);
    let out = r.preparer.prepare(refs).await;
    assert!(out.values().all(Result::is_ok), "{out:?}");
    assert_eq!(r.preparer.checkpoint().snapshot().claims.len(), 32);
    assert!(
        r.preparer.checkpoint().writes() < 32,
        "writes: {}",
        r.preparer.checkpoint().writes()
    );
}

#[tokio::test]
async fn failed_checkpoint_write_rolls_the_claim_back() {
    let r = rig(vec![claim("a", &[("gpu", "gpu-3")], json!([]))]);
    // A directory where the checkpoint file goes: every checkpoint write fails.
    let blocker = r.dir.path().join("plugin/checkpoint.json");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let out = r.preparer.prepare(vec![cref("a")]).await;
    let err = out["uid-a"].as_ref().unwrap_err();
    assert!(err.contains("checkpoint"), "{err}");
    assert!(
        spec_json(&r, "uid-a").is_none(),
        "the CDI spec is rolled back"
    );

    // Once the disk is usable again the kubelet's retry succeeds.
    std::fs::remove_dir_all(&blocker).unwrap();
    let out = r.preparer.prepare(vec![cref("a")]).await;
    assert!(out["uid-a"].is_ok(), "{out:?}");
    assert!(spec_json(&r, "uid-a").is_some());
}

#[tokio::test]
async fn share_id_of_the_allocation_is_answered_back() {
    let mut c = claim("s", &[("gpu", "gpu-5")], json!([]));
    let results = c
        .status
        .as_mut()
        .and_then(|s| s.allocation.as_mut())
        .and_then(|a| a.devices.as_mut())
        .and_then(|d| d.results.as_mut())
        .unwrap();
    results[0].share_id = Some("7f3c2a10-0000-4000-8000-000000000001".into());
    let r = rig(vec![c]);
    let out = r.preparer.prepare(vec![cref("s")]).await;
    let devices = out["uid-s"].as_ref().unwrap();
    assert_eq!(
        devices[0].share_id.as_deref(),
        Some("7f3c2a10-0000-4000-8000-000000000001")
    );
    // Answered from the checkpoint the second time, still with the share id.
    let again = r.preparer.prepare(vec![cref("s")]).await;
    assert_eq!(again["uid-s"].as_ref().unwrap(), devices);
}

fn admin_claim(name: &str, device: &str, config: Value) -> ResourceClaim {
    let mut c = claim(name, &[("monitor", device)], config);
    let results = &mut c
        .status
        .as_mut()
        .unwrap()
        .allocation
        .as_mut()
        .unwrap()
        .devices
        .as_mut()
        .unwrap()
        .results;
    results.as_mut().unwrap()[0].admin_access = Some(true);
    c
}

#[tokio::test]
async fn admin_access_gets_the_device_without_touching_or_conflicting_with_the_holder() {
    let exclusive = gpu_config(json!({"strategy": "Exclusive"}));
    let r = rig(vec![
        claim("holder", &[("gpu", "gpu-0")], exclusive.clone()),
        admin_claim("monitor", "gpu-0", json!([])),
        admin_claim("bad-monitor", "gpu-0", exclusive),
    ]);
    assert!(r.preparer.prepare(vec![cref("holder")]).await["uid-holder"].is_ok());
    let held = r.hw.calls();

    let out = r.preparer.prepare(vec![cref("monitor")]).await;
    let devices = out["uid-monitor"]
        .as_ref()
        .expect("admin access is not refused");
    assert_eq!(devices.len(), 1);
    assert_eq!(
        r.hw.calls(),
        held,
        "no GPU setting is changed for admin access"
    );
    let spec = spec_json(&r, "uid-monitor").expect("the monitoring claim has its CDI spec");
    assert!(
        spec.to_string().contains("/dev/nvidia0"),
        "the device node is in the spec: {spec}"
    );

    // Releasing the monitoring claim leaves the holder's policy in place...
    assert!(r.preparer.unprepare(vec![cref("monitor")]).await["uid-monitor"].is_ok());
    assert_eq!(r.hw.calls(), held);
    // ...and a sharing config on an admin-access device is refused with the reason.
    let out = r.preparer.prepare(vec![cref("bad-monitor")]).await;
    let err = out["uid-bad-monitor"].as_ref().unwrap_err();
    assert!(err.contains("adminAccess"), "{err}");
    assert_eq!(r.hw.calls(), held);
}

#[tokio::test]
async fn unprepare_of_a_claim_in_use_by_a_live_pod_is_refused_and_keeps_everything() {
    let r = rig(vec![claim(
        "a",
        &[("gpu", "gpu-2")],
        gpu_config(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})),
    )]);
    assert!(r.preparer.prepare(vec![cref("a")]).await["uid-a"].is_ok());
    let pod = crate::claims::PodRef {
        namespace: "ns".into(),
        name: "runner".into(),
        uid: "pod-1".into(),
    };
    r.preparer.claims.set_in_use("uid-a", Some(pod));
    let calls_before = r.hw.calls();

    let out = r.preparer.unprepare(vec![cref("a")]).await;
    let err = out["uid-a"].as_ref().unwrap_err();
    assert!(err.contains("ns/runner (pod-1)"), "{err}");
    // Nothing released: checkpoint entry, CDI spec, time slice.
    assert_eq!(
        r.preparer.checkpoint().snapshot().claims["uid-a"].state,
        ClaimState::PrepareCompleted
    );
    assert!(spec_json(&r, "uid-a").is_some());
    assert_eq!(r.hw.calls(), calls_before);

    // Once the pod has stopped, the kubelet's retry succeeds.
    r.preparer.claims.set_in_use("uid-a", None);
    assert!(r.preparer.unprepare(vec![cref("a")]).await["uid-a"].is_ok());
    assert!(spec_json(&r, "uid-a").is_none());
    assert!(
        !r.preparer
            .checkpoint()
            .snapshot()
            .claims
            .contains_key("uid-a")
    );
}

#[tokio::test]
async fn one_call_works_on_a_bounded_number_of_claims_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let claims: Vec<ClaimRef> = (0..1_000).map(|i| cref(&format!("c{i}"))).collect();
    let answers = each_claim("prepare", claims, |claim| {
        let (now, most) = (Arc::clone(&now), Arc::clone(&most));
        async move {
            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(running, Ordering::SeqCst);
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            (claim, Ok::<(), PrepareError>(()))
        }
    })
    .await;
    assert_eq!(answers.len(), 1_000, "every claim is answered");
    let most = most.load(Ordering::SeqCst);
    assert!(most <= MAX_CLAIMS_IN_FLIGHT, "{most} claims in flight");
    assert!(most > 1, "claims still run concurrently");
}

#[tokio::test]
async fn prepare_then_unprepare_leaves_no_trace() {
    let exclusive = gpu_config(json!({"strategy": "Exclusive"}));
    let r = rig(vec![
        claim("plain", &[("gpu", "gpu-3")], json!([])),
        claim("excl", &[("gpu", "gpu-2")], exclusive),
    ]);
    for name in ["plain", "excl"] {
        let out = r.preparer.prepare(vec![cref(name)]).await;
        assert!(out[&format!("uid-{name}")].is_ok(), "{out:?}");
        let done = r.preparer.unprepare(vec![cref(name)]).await;
        assert!(done[&format!("uid-{name}")].is_ok(), "{done:?}");
    }
    let gpu2 = dgx_h100().gpus[2].uuid.clone();
    assert_eq!(
        r.hw.calls(),
        vec![
            format!("compute {gpu2} ExclusiveProcess"),
            format!("compute {gpu2} Default")
        ]
    );
    assert!(r.preparer.checkpoint().snapshot().claims.is_empty());
    let cdi_left: Vec<_> = std::fs::read_dir(r.dir.path().join("cdi"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(cdi_left.is_empty(), "{cdi_left:?}");
}

/// A fresh plugin process over `r`'s directories and hardware, starting from an empty
/// checkpoint (as after a quarantine), with `claims` in the API server.
fn restarted_without_checkpoint(r: &Rig, claims: Vec<ResourceClaim>) -> Preparer<FixedClaims> {
    let plugin_dir = r.dir.path().join("plugin");
    let store = CheckpointStore::new(&plugin_dir, &r.dir.path().join("boot_id"));
    let (checkpoint, _task) = CheckpointWriter::spawn(store, Checkpoint::new("boot-1"));
    let mps = MpsSupervisor::new(MpsSettings {
        control_path: r.dir.path().join("no-mps-control"),
        root_dir: plugin_dir.join("mps"),
        ready_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        private_shm: None,
    });
    let sharing = SharingManager::new(r.hw.clone(), r.hw.clone(), mps);
    let mut fixed = FixedClaims::new();
    for c in claims {
        fixed.insert(c);
    }
    let (_tx, inventory) = watch::channel(dgx_h100());
    let config = PreparerConfig {
        driver_name: DRIVER.into(),
        node_name: NODE.into(),
        cdi_root: r.dir.path().join("cdi"),
        proc_root: r.dir.path().join("proc"),
    };
    Preparer::new(config, fixed, inventory, sharing, checkpoint)
}

fn live_claims() -> Vec<ResourceClaim> {
    let long =
        gpu_config(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}));
    let mut in_use = claim("plain", &[("gpu", "gpu-3")], json!([]));
    in_use.status.as_mut().unwrap().reserved_for = Some(vec![
        serde_json::from_value(json!({"resource": "pods", "name": "p", "uid": "pod-1"})).unwrap(),
    ]);
    vec![
        in_use,
        claim("ts", &[("gpu", "gpu-0")], long),
        claim(
            "excl",
            &[("gpu", "gpu-2")],
            gpu_config(json!({"strategy": "Exclusive"})),
        ),
    ]
}

#[tokio::test]
async fn lost_checkpoint_keeps_live_claims_and_rebuilds_them() {
    let mut claims = live_claims();
    claims.push(claim("gone", &[("gpu", "gpu-4")], json!([])));
    let r = rig(claims);
    let out = r
        .preparer
        .prepare(vec![cref("plain"), cref("ts"), cref("excl"), cref("gone")])
        .await;
    assert!(out.values().all(Result::is_ok), "{out:?}");
    let applied = r.hw.calls();
    assert_eq!(applied.len(), 2, "{applied:?}");

    // The checkpoint is lost; "gone" was deleted from the API server meanwhile.
    let live = live_claims();
    let p = restarted_without_checkpoint(&r, live.clone());
    let report = p.recover_after_loss(Some(&live)).await;
    assert_eq!(report.rebuilt, vec!["uid-excl", "uid-plain", "uid-ts"]);
    assert_eq!(report.in_use, 1);
    assert_eq!(report.orphan_specs_removed, vec!["uid-gone"]);
    assert!(!report.deferred);
    for uid in ["uid-plain", "uid-ts", "uid-excl"] {
        assert!(spec_json(&r, uid).is_some(), "spec of live {uid} kept");
    }
    assert!(spec_json(&r, "uid-gone").is_none());
    assert_eq!(
        r.hw.calls(),
        applied,
        "no GPU setting of a live claim touched"
    );
    let snap = p.checkpoint().snapshot();
    assert!(
        snap.claims
            .values()
            .all(|e| e.state == ClaimState::PrepareCompleted)
    );
    // Answers come from the rebuilt entries, and the ledger owns the policies again:
    // a conflicting claim is refused, the last unprepare restores the default.
    let again = p.prepare(vec![cref("ts")]).await;
    assert_eq!(
        again["uid-ts"].as_ref().unwrap(),
        out["uid-ts"].as_ref().unwrap()
    );
    let done = p.unprepare(vec![cref("excl")]).await;
    assert!(done["uid-excl"].is_ok());
    let gpu2 = dgx_h100().gpus[2].uuid.clone();
    assert_eq!(
        r.hw.calls().last().unwrap(),
        &format!("compute {gpu2} Default")
    );
}

#[tokio::test]
async fn unreachable_api_server_removes_nothing_and_unprepare_still_works() {
    let r = rig(live_claims());
    let out = r
        .preparer
        .prepare(vec![cref("plain"), cref("ts"), cref("excl")])
        .await;
    assert!(out.values().all(Result::is_ok), "{out:?}");
    let applied = r.hw.calls();
    let p = restarted_without_checkpoint(&r, vec![]);
    let report = p.recover_after_loss(None).await;
    assert!(report.deferred);
    assert!(report.orphan_specs_removed.is_empty());
    for uid in ["uid-plain", "uid-ts", "uid-excl"] {
        assert!(spec_json(&r, uid).is_some(), "spec of {uid} kept");
    }
    assert_eq!(r.hw.calls(), applied);
    // The kubelet's unprepare is served from the files on disk.
    let done = p.unprepare(vec![cref("plain")]).await;
    assert!(done["uid-plain"].is_ok());
    assert!(spec_json(&r, "uid-plain").is_none());
}

#[tokio::test]
async fn specs_from_before_the_boot_are_not_rebuilt() {
    let r = rig(live_claims());
    let out = r.preparer.prepare(vec![cref("plain"), cref("ts")]).await;
    assert!(out.values().all(Result::is_ok), "{out:?}");
    // The node rebooted after the specs were written (CDI dir on disk, not tmpfs).
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    std::fs::write(r.dir.path().join("proc/stat"), format!("btime {boot}\n")).unwrap();
    r.hw.reboot();
    let live = live_claims();
    let p = restarted_without_checkpoint(&r, live.clone());
    let report = p.recover_after_loss(Some(&live)).await;
    assert!(report.rebuilt.is_empty(), "{:?}", report.rebuilt);
    assert_eq!(report.orphan_specs_removed, vec!["uid-plain", "uid-ts"]);
    // The kubelet prepares again and the policy is applied afresh.
    let again = p.prepare(vec![cref("ts")]).await;
    assert!(again["uid-ts"].is_ok(), "{again:?}");
    assert_eq!(r.hw.calls().len(), 2, "{:?}", r.hw.calls());
}
