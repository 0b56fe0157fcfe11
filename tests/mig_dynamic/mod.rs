//! The fake machine and preparer rig shared by the dynamic MIG test binaries: a DGX H100
//! on the fake `libnvidia-ml.so` (tests/fake-nvml) with GPU 0 in MIG mode and no
//! instances, a preparer over it, and readers of the fake's state.
//!
//! The fake library reads its topology from the environment at `nvmlInit`, so each binary
//! sets it once for the whole process and runs its tests one at a time ([`serial`]), each
//! on a freshly power-cycled GPU ([`fresh`]: state file deleted). Setting the environment
//! is the one `unsafe` call here.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gpu_dra::checkpoint::{Checkpoint, CheckpointStore, CheckpointWriter};
use gpu_dra::claims::FixedClaims;
use gpu_dra::inventory::{Discover, Inventory, NvmlDiscovery, Placement};
use gpu_dra::plugin::{ClaimRef, PreparedDevice};
use gpu_dra::prepare::error_chain;
use gpu_dra::prepare::mig_control::{MigControl, NvmlMigControl};
use gpu_dra::prepare::mig_select;
use gpu_dra::prepare::{Preparer, PreparerConfig};
use gpu_dra::sharing::{
    MpsSettings, MpsSupervisor, NvidiaSmiTimeSlice, NvmlComputeControl, SharingManager,
};
use k8s_openapi::api::resource::v1::ResourceClaim;
use nvidia_ml::control;
use serde_json::{Value, json};
use tokio::sync::watch;

pub const DRIVER: &str = "gpu.gpu-dra.dev";
pub const NODE: &str = "node-a";

pub struct Machine {
    _dir: tempfile::TempDir,
    /// Topology file.
    pub topology: PathBuf,
    /// The fake's state file.
    pub state: PathBuf,
    /// The fake /proc root.
    pub proc_root: PathBuf,
    /// The fake libnvidia-ml.so.
    pub lib: PathBuf,
}

/// The fake machine of this process: a DGX H100 with GPUs 0 and 1 in MIG mode, no
/// instances; GPU 1's MIG mode changes wait for a GPU reset (as in a pass-through VM).
pub fn machine() -> &'static Machine {
    static MACHINE: OnceLock<Machine> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = dir.path().join("topology.yaml");
        std::fs::write(
            &topology,
            "seed: dynamic-mig\nnode: dgx-h100\ngpus:\n  - migMode: true\n  - migMode: true\n    migModeRequiresReset: true\n",
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
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// [`serial`] on a [`fresh`] machine: the guard to hold for the test, and the machine.
pub async fn serial_fresh() -> (tokio::sync::MutexGuard<'static, ()>, &'static Machine) {
    let guard = serial().await;
    (guard, fresh())
}

pub fn gpu0_uuid(m: &Machine) -> String {
    gpu_uuid(m, 0)
}

/// UUID of GPU `index`.
pub fn gpu_uuid(m: &Machine, index: usize) -> String {
    control::load_topology(&m.topology).expect("topology").gpus[index]
        .uuid
        .clone()
}

/// `(current, pending)` MIG mode of GPU `index` in the fake's state.
pub fn mig_mode(m: &Machine, index: usize) -> (bool, bool) {
    let state = control::read_state(&m.state).expect("state");
    let g = &state.gpus[&gpu_uuid(m, index)];
    (g.mig_current, g.mig_pending)
}

/// `(gi id, profile id, placement start, compute instance count)` on GPU 0.
pub fn instances(m: &Machine) -> Vec<(u32, u32, u32, usize)> {
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

pub fn claim(name: &str, device: &str) -> ResourceClaim {
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "uid": format!("uid-{name}")},
        "spec": {"devices": {"requests": []}},
        "status": {"allocation": {"devices": {"results": [
            {"request": "mig", "driver": DRIVER, "pool": NODE, "device": device}
        ]}}},
    }))
    .expect("claim")
}

pub fn cref(name: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub preparer: Preparer<FixedClaims>,
    pub control: Arc<NvmlMigControl>,
    pub _inventory: watch::Sender<Inventory>,
}

impl Rig {
    pub fn cdi_root(&self) -> PathBuf {
        self.dir.path().join("cdi")
    }
    pub fn spec(&self, uid: &str) -> Option<Value> {
        std::fs::read(gpu_dra::cdi::spec_path(&self.cdi_root(), uid))
            .ok()
            .map(|b| serde_json::from_slice(&b).expect("spec json"))
    }
    pub fn checkpoint(&self) -> Arc<Checkpoint> {
        self.preparer.checkpoint().snapshot()
    }
    /// Creates, outside the preparer (as `nvidia-smi mig -cgi` would), a GPU instance of GI
    /// profile `profile_id` at `placement` (memory slices) of GPU `gpu_uuid`, with its
    /// full-size compute instance when `with_ci`; returns the GPU instance id.
    pub fn make_instance(
        &self,
        gpu_uuid: &str,
        profile_id: u32,
        placement: Placement,
        with_ci: bool,
    ) -> u32 {
        let gi = self
            .control
            .create_gpu_instance(gpu_uuid, profile_id, placement)
            .expect("GPU instance made outside the preparer");
        if with_ci {
            self.control
                .create_compute_instance(gpu_uuid, gi)
                .expect("compute instance made outside the preparer");
        }
        gi
    }
    /// Prepares claim `name` (made by [`claim`]); panics with `what` when it fails.
    pub async fn prepare(&self, name: &str, what: &str) -> Vec<PreparedDevice> {
        self.preparer.prepare_claim(&cref(name)).await.expect(what)
    }
    /// Unprepares claim `name`; panics with `what` when it fails.
    pub async fn unprepare(&self, name: &str, what: &str) {
        self.preparer
            .unprepare_claim(&cref(name))
            .await
            .expect(what)
    }
    /// The error chain of a prepare of claim `name` that must fail; panics with `what` when
    /// it succeeds.
    pub async fn prepare_err(&self, name: &str, what: &str) -> String {
        error_chain(
            &self
                .preparer
                .prepare_claim(&cref(name))
                .await
                .expect_err(what),
        )
    }
    /// The error chain of an unprepare of claim `name` that must fail.
    pub async fn unprepare_err(&self, name: &str, what: &str) -> String {
        error_chain(
            &self
                .preparer
                .unprepare_claim(&cref(name))
                .await
                .expect_err(what),
        )
    }
}

/// Arms a fault in the fake: the next call of NVML `function` on GPU `gpu_uuid` (any GPU
/// when `None`) fails once with status 999 (unknown error).
pub fn fail_once(m: &Machine, function: &str, gpu_uuid: Option<String>) {
    control::inject_fault(
        &m.state,
        control::Fault {
            function: function.into(),
            gpu_uuid,
            error: 999,
            times: control::Times::Once,
        },
    )
    .expect("inject");
}

/// The ids of the GPU instances on GPU 0.
pub fn instance_ids(m: &Machine) -> Vec<u32> {
    instances(m).iter().map(|g| g.0).collect()
}

/// `first`'s restart in its directory after its checkpoint was lost, with `live` the
/// claims the API server still has allocated here (see [`make_rig_in`]).
pub fn restart_after_loss(m: &Machine, first: Rig, live: &[ResourceClaim]) -> Rig {
    let Rig { dir, preparer, .. } = first;
    drop(preparer);
    make_rig_in(
        m,
        dir,
        live,
        Some(Checkpoint::new("boot-1")),
        None,
        Some(live),
    )
}

/// A preparer over the fake machine (GPUs 0 and 1 dynamic). `proc_root` defaults to the
/// fake's.
pub fn make_rig(
    m: &Machine,
    claims: &[ResourceClaim],
    initial: Option<Checkpoint>,
    proc_root: Option<&Path>,
) -> Rig {
    make_rig_in(
        m,
        tempfile::tempdir().expect("tempdir"),
        claims,
        initial,
        proc_root,
        None,
    )
}

/// [`make_rig`] in `dir` (a previous rig's: same CDI root and checkpoint file); `live`:
/// the claims the API server has allocated here after a checkpoint loss, whose MIG
/// instances count as the driver's own (as the plugin's start-up does). With `live`, the
/// GPUs are chosen as `--dynamic-mig=0,1` does (a GPU with an instance of no claim would
/// stay static under `auto`).
pub fn make_rig_in(
    m: &Machine,
    dir: tempfile::TempDir,
    claims: &[ResourceClaim],
    initial: Option<Checkpoint>,
    proc_root: Option<&Path>,
    live: Option<&[ResourceClaim]>,
) -> Rig {
    std::fs::write(dir.path().join("boot_id"), "boot-1\n").expect("boot id");
    let plugin_dir = dir.path().join("plugin");
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    let store = CheckpointStore::new(&plugin_dir, &dir.path().join("boot_id"));
    let initial = initial.unwrap_or_else(|| store.load().expect("load").checkpoint);
    let (checkpoint, _task) = CheckpointWriter::spawn(store, initial);
    let discovery = NvmlDiscovery::new(Some(&m.lib), dir.path().join("sys")).expect("nvml");
    let mut inv = discovery.discover().expect("discover");
    let snapshot = checkpoint.snapshot();
    let mut owned = mig_select::owned_records(&snapshot);
    let mut full = gpu_dra::prepare::mig_full::full_gpu_uuids(&snapshot);
    if let Some(live) = live {
        // What the node published before: every placement and full GPU of GPUs 0 and 1.
        use gpu_dra::prepare::rebuild::{adoptable_full_gpus, adoptable_instances};
        let partitionable = published_partitionable(&inv);
        owned.extend(adoptable_instances(
            live,
            &inv,
            DRIVER,
            NODE,
            &partitionable,
        ));
        full.extend(adoptable_full_gpus(
            live,
            &inv,
            DRIVER,
            NODE,
            &partitionable,
        ));
    }
    let mode = match live {
        Some(_) => mig_select::DynamicMigMode::Gpus(vec!["0".into(), "1".into()]),
        None => mig_select::DynamicMigMode::Auto,
    };
    let chosen = mig_select::choose_with(&inv, &mode, &owned, &full);
    assert_eq!(
        chosen,
        BTreeSet::from([gpu0_uuid(m), gpu_uuid(m, 1)]),
        "GPUs 0 and 1 are dynamic"
    );
    mig_select::annotate_with(&mut inv, &chosen, &owned, &full);
    let (tx, rx) = watch::channel(inv);
    let sharing = SharingManager::new(
        Arc::new(NvmlComputeControl::new(Some(&m.lib)).expect("compute control")),
        // The fake nvidia-smi (built beside the fake library by `cargo build --workspace`).
        Arc::new(NvidiaSmiTimeSlice::new(
            fake_nvidia_smi(m),
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
    .with_mig_control(control.clone())
    .with_foreign_report({
        // As the plugin wires it: the instance is marked foreign in the inventory.
        let tx = tx.clone();
        Arc::new(move |gpu: &str, f| {
            tx.send_if_modified(|inv| mig_select::add_foreign(inv, gpu, f));
        })
    });
    Rig {
        dir,
        preparer,
        control,
        _inventory: tx,
    }
}

/// The device names a node with GPUs 0 and 1 dynamic publishes with `consumesCounters`
/// (each placement and full GPU of an H100), as its ResourceSlices in the API server show.
pub fn published_partitionable(inv: &Inventory) -> BTreeSet<String> {
    let mut dynamic = inv.clone();
    for gpu in dynamic.gpus.iter_mut().take(2) {
        gpu.mig.enabled = true;
        gpu.mig.pending = true;
        gpu.mig_devices.clear();
        gpu.dynamic_mig = Some(gpu_dra::inventory::DynamicMig::default());
    }
    gpu_dra::slices::desired::desired_devices(
        &dynamic,
        &gpu_dra::slices::desired::SliceFeatures::default(),
    )
    .into_iter()
    .filter(|d| d.consumes_counters.is_some())
    .map(|d| d.name)
    .collect()
}

/// The fake `nvidia-smi` of the target directory holding the fake library.
pub fn fake_nvidia_smi(m: &Machine) -> PathBuf {
    m.lib
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("nvidia-smi"))
        .find(|p| p.exists())
        .unwrap_or_else(|| m.lib.with_file_name("nvidia-smi"))
}

/// Power-cycles the fake machine and returns it.
pub fn fresh() -> &'static Machine {
    let m = machine();
    let _ = std::fs::remove_file(&m.state);
    m
}

pub const A: &str = "gpu-0-mig-3g40gb-9-0";
pub const B: &str = "gpu-0-mig-3g40gb-9-4";
