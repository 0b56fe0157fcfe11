//! Dynamic MIG prepare / unprepare / rollback / recovery through the real NVML code path:
//! the preparer drives the fake `libnvidia-ml.so` (tests/fake-nvml) with nvml-wrapper,
//! faults are injected into the fake's NVML calls, and the GPU's instances are read back
//! from the fake's state file.
//!
//! The fake library reads its topology from the environment at `nvmlInit`, so this binary
//! sets it once for the whole process and runs its tests one at a time, each on a
//! freshly power-cycled GPU (state file deleted). Setting the environment is the one
//! `unsafe` call here.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gpu_dra::checkpoint::{Checkpoint, CheckpointStore, CheckpointWriter, ClaimState};
use gpu_dra::claims::FixedClaims;
use gpu_dra::inventory::{Discover, Inventory, NvmlDiscovery, Placement};
use gpu_dra::plugin::ClaimRef;
use gpu_dra::prepare::mig_control::{MigControl, NvmlMigControl};
use gpu_dra::prepare::mig_dynamic::{self, InstanceRecord};
use gpu_dra::prepare::mig_select;
use gpu_dra::prepare::{Preparer, PreparerConfig, error_chain};
use gpu_dra::sharing::{
    MpsSettings, MpsSupervisor, NvidiaSmiTimeSlice, NvmlComputeControl, SharingManager,
};
use k8s_openapi::api::resource::v1::ResourceClaim;
use nvidia_ml::control::{self, Fault, Times};
use serde_json::{Value, json};
use tokio::sync::watch;

const DRIVER: &str = "gpu.gpu-dra.dev";
const NODE: &str = "node-a";

struct Machine {
    _dir: tempfile::TempDir,
    topology: PathBuf,
    state: PathBuf,
    proc_root: PathBuf,
    lib: PathBuf,
}

/// The fake machine of this process: a DGX H100 with GPU 0 in MIG mode, no instances.
fn machine() -> &'static Machine {
    static MACHINE: OnceLock<Machine> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = dir.path().join("topology.yaml");
        std::fs::write(
            &topology,
            "seed: dynamic-mig\nnode: dgx-h100\ngpus:\n  - migMode: true\n",
        )
        .expect("topology");
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(&proc_root).expect("proc");
        // SAFETY: set once, under `serial()`, before any NVML user in this process starts;
        // nothing else here reads the environment concurrently (the runtimes' workers
        // are idle while a test sets up).
        unsafe {
            std::env::set_var("FAKE_NVML_TOPOLOGY", &topology);
            std::env::set_var("FAKE_NVML_PROC_ROOT", &proc_root);
        }
        let lib = control::find_cdylib().expect("fake libnvidia-ml.so built");
        // One NVML handle kept for the life of the process, so the library stays loaded
        // while runtime threads that called into it exit (their thread-local destructors
        // live in the library).
        std::mem::forget(NvmlMigControl::new(Some(&lib)).expect("nvml"));
        Machine {
            state: control::state_path(&topology),
            lib,
            topology,
            proc_root,
            _dir: dir,
        }
    })
}

/// One test at a time (they share the fake machine); async so the guard may be held
/// across awaits.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn gpu0_uuid(m: &Machine) -> String {
    control::load_topology(&m.topology).expect("topology").gpus[0]
        .uuid
        .clone()
}

/// `(gi id, profile id, placement start, compute instance count)` on GPU 0.
fn instances(m: &Machine) -> Vec<(u32, u32, u32, usize)> {
    let state = control::read_state(&m.state).expect("state");
    state
        .gpus
        .get(&gpu0_uuid(m))
        .map(|g| {
            g.gpu_instances
                .values()
                .map(|gi| {
                    (
                        gi.id,
                        gi.profile_id,
                        gi.placement_start,
                        gi.compute_instances.len(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn claim(name: &str, device: &str) -> ResourceClaim {
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "uid": format!("uid-{name}")},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "mig", "driver": DRIVER, "pool": NODE, "device": device}
        ]}}},
    }))
    .expect("claim")
}

fn cref(name: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

struct Rig {
    dir: tempfile::TempDir,
    preparer: Preparer<FixedClaims>,
    control: Arc<NvmlMigControl>,
    _inventory: watch::Sender<Inventory>,
}

impl Rig {
    fn cdi_root(&self) -> PathBuf {
        self.dir.path().join("cdi")
    }
    fn spec(&self, uid: &str) -> Option<Value> {
        std::fs::read(gpu_dra::cdi::spec_path(&self.cdi_root(), uid))
            .ok()
            .map(|b| serde_json::from_slice(&b).expect("spec json"))
    }
    fn checkpoint(&self) -> Arc<Checkpoint> {
        self.preparer.checkpoint().snapshot()
    }
}

/// A preparer over the fake machine (GPU 0 dynamic). `proc_root` defaults to the fake's.
fn make_rig(
    m: &Machine,
    claims: &[ResourceClaim],
    initial: Option<Checkpoint>,
    proc_root: Option<&Path>,
) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").expect("boot id");
    let plugin_dir = dir.path().join("plugin");
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    let store = CheckpointStore::new(&plugin_dir, &dir.path().join("boot_id"));
    let initial = initial.unwrap_or_else(|| store.load().expect("load").checkpoint);
    let (checkpoint, _task) = CheckpointWriter::spawn(store, initial);
    let discovery = NvmlDiscovery::new(Some(&m.lib), dir.path().join("sys")).expect("nvml");
    let mut inv = discovery.discover().expect("discover");
    let owned = mig_select::owned_records(&checkpoint.snapshot());
    let chosen = mig_select::choose(&inv, &mig_select::DynamicMigMode::Auto, &owned);
    assert_eq!(chosen, BTreeSet::from([gpu0_uuid(m)]), "GPU 0 is dynamic");
    mig_select::annotate(&mut inv, &chosen, &owned);
    let (tx, rx) = watch::channel(inv);
    let sharing = SharingManager::new(
        Arc::new(NvmlComputeControl::new(Some(&m.lib)).expect("compute control")),
        Arc::new(NvidiaSmiTimeSlice::new(
            dir.path().join("no-nvidia-smi"),
            Duration::from_secs(5),
        )),
        MpsSupervisor::new(MpsSettings {
            control_path: dir.path().join("no-mps-control"),
            root_dir: plugin_dir.join("mps"),
            ready_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            private_shm: None,
        }),
    );
    let mut fixed = FixedClaims::new();
    for c in claims {
        fixed.insert(c.clone());
    }
    let control = Arc::new(NvmlMigControl::new(Some(&m.lib)).expect("mig control"));
    let preparer = Preparer::new(
        PreparerConfig {
            driver_name: DRIVER.into(),
            node_name: NODE.into(),
            cdi_root: dir.path().join("cdi"),
            proc_root: proc_root.unwrap_or(&m.proc_root).to_path_buf(),
        },
        fixed,
        rx,
        sharing,
        checkpoint,
    )
    .with_mig_control(control.clone());
    Rig {
        dir,
        preparer,
        control,
        _inventory: tx,
    }
}

/// Power-cycles the fake machine and returns it.
fn fresh() -> &'static Machine {
    let m = machine();
    let _ = std::fs::remove_file(&m.state);
    m
}

const A: &str = "gpu-0-mig-3g40gb-9-0";
const B: &str = "gpu-0-mig-3g40gb-9-4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_pack_one_gpu_and_unprepare_empties_it() {
    let _serial = serial().await;
    let m = fresh();
    let rig = make_rig(m, &[claim("a", A), claim("b", B)], None, None);
    let a = rig
        .preparer
        .prepare_claim(&cref("a"))
        .await
        .expect("prepare a");
    let b = rig
        .preparer
        .prepare_claim(&cref("b"))
        .await
        .expect("prepare b");
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
    let again = rig.preparer.prepare_claim(&cref("a")).await.expect("again");
    assert_eq!(again, a);
    assert_eq!(instances(m).len(), 2);

    rig.preparer
        .unprepare_claim(&cref("a"))
        .await
        .expect("unprepare a");
    assert_eq!(instances(m).len(), 1);
    rig.preparer
        .unprepare_claim(&cref("b"))
        .await
        .expect("unprepare b");
    assert!(instances(m).is_empty(), "GPU back to empty");
    assert!(rig.spec("uid-a").is_none() && rig.spec("uid-b").is_none());
    assert!(rig.checkpoint().claims.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_taken_by_hand_fails_the_claim_and_keeps_the_instance() {
    let _serial = serial().await;
    let m = fresh();
    let rig = make_rig(m, &[claim("b", B)], None, None);
    // Made behind the driver's back (as `nvidia-smi mig -cgi 2g.20gb` would).
    let uuid = gpu0_uuid(m);
    let foreign = rig
        .control
        .create_gpu_instance(&uuid, 14, Placement { start: 4, size: 2 })
        .expect("hand-made instance");
    let err = rig
        .preparer
        .prepare_claim(&cref("b"))
        .await
        .expect_err("taken");
    let text = error_chain(&err);
    assert!(
        text.contains(&uuid) && text.contains(&format!("GPU instance {foreign}")),
        "{text}"
    );
    assert_eq!(
        instances(m).iter().map(|g| g.0).collect::<Vec<_>>(),
        [foreign]
    );
    assert!(rig.checkpoint().claims.is_empty());
    assert!(rig.spec("uid-b").is_none());
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
    let _serial = serial().await;
    let m = fresh();
    let uuid = gpu0_uuid(m);
    for function in PATH_CALLS {
        let rig = make_rig(m, &[claim("b", B)], None, None);
        control::inject_fault(
            &m.state,
            Fault {
                function: (*function).into(),
                // The handle lookup runs before NVML knows the GPU: match any GPU.
                gpu_uuid: (*function != "nvmlDeviceGetHandleByUUID").then(|| uuid.clone()),
                error: 999,
                times: Times::Once,
            },
        )
        .expect("inject");
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
        rig.preparer.prepare_claim(&cref("b")).await.expect("retry");
        rig.preparer
            .unprepare_claim(&cref("b"))
            .await
            .expect("unprepare");
        assert!(instances(m).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdi_or_capability_failure_after_create_destroys_the_instance() {
    let _serial = serial().await;
    let m = fresh();
    let uuid = gpu0_uuid(m);
    // CDI write: the CDI root is a regular file.
    let rig = make_rig(m, &[claim("b", B)], None, None);
    std::fs::write(rig.cdi_root(), "not a directory").expect("block cdi root");
    let text = error_chain(
        &rig.preparer
            .prepare_claim(&cref("b"))
            .await
            .expect_err("cdi"),
    );
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
    rig.preparer.prepare_claim(&cref("b")).await.expect("retry");
    assert_eq!(instances(m).len(), 1);
    rig.preparer
        .unprepare_claim(&cref("b"))
        .await
        .expect("unprepare");
    assert!(instances(m).is_empty());

    // Capability lookup: a /proc without the MIG capability files.
    let bare = tempfile::tempdir().expect("bare proc");
    std::fs::copy(m.proc_root.join("devices"), bare.path().join("devices")).expect("devices");
    let rig = make_rig(m, &[claim("b", B)], None, Some(bare.path()));
    let text = error_chain(
        &rig.preparer
            .prepare_claim(&cref("b"))
            .await
            .expect_err("caps"),
    );
    assert!(
        text.contains("MIG capability") && text.contains(&uuid),
        "{text}"
    );
    assert!(instances(m).is_empty(), "{:?}", instances(m));
    assert!(rig.checkpoint().claims.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_destroys_half_done_instances_adopts_completed_and_keeps_unknown() {
    let _serial = serial().await;
    let m = fresh();
    let uuid = gpu0_uuid(m);
    // A completed claim on 3g@0, prepared normally.
    let first = make_rig(m, &[claim("a", A)], None, None);
    first
        .preparer
        .prepare_claim(&cref("a"))
        .await
        .expect("prepare a");
    let completed = first.checkpoint().as_ref().clone();
    // A prepare cut short by a crash: 1g@4 recorded PrepareStarted, instance created, ids
    // never recorded.
    let control = first.control.clone();
    let half = control
        .create_gpu_instance(&uuid, 19, Placement { start: 4, size: 1 })
        .expect("half-done gi");
    control
        .create_compute_instance(&uuid, half)
        .expect("half-done ci");
    // And one made by hand on 1g@6.
    let by_hand = control
        .create_gpu_instance(&uuid, 19, Placement { start: 6, size: 1 })
        .expect("hand-made gi");
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
    restarted
        .preparer
        .unprepare_claim(&cref("a"))
        .await
        .expect("unprepare a");
    assert_eq!(
        instances(m).iter().map(|g| g.0).collect::<Vec<_>>(),
        [by_hand]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_gpu_of_a_dynamic_gpu_is_refused_without_touching_it() {
    let _serial = serial().await;
    let m = fresh();
    let rig = make_rig(m, &[claim("full", "gpu-0")], None, None);
    let text = error_chain(
        &rig.preparer
            .prepare_claim(&cref("full"))
            .await
            .expect_err("full GPU"),
    );
    assert!(text.contains("full GPU of a dynamic MIG GPU"), "{text}");
    assert!(instances(m).is_empty());
    let state = control::read_state(&m.state).expect("state");
    assert!(state.gpus[&gpu0_uuid(m)].mig_current, "MIG mode unchanged");
    assert!(rig.checkpoint().claims.is_empty());
}
