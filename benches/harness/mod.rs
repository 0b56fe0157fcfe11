//! What every bench target shares: the fake NVML machine the bench re-executes itself
//! into, the state directories a variant runs on, a warm plugin wired as
//! `run::kubelet_plugin` wires it (minus the API server), the kubelet-side gRPC client
//! ([`client`]) and the percentile report ([`report`]).
//!
//! Why a re-exec: the fake NVML reads `FAKE_NVML_TOPOLOGY` in `nvmlInit`, and the fake
//! `nvidia-smi` / `nvidia-cuda-mps-control` children inherit it, so it must be in the
//! process's environment before NVML is initialised. Rather than mutating the environment
//! of a running process (`std::env::set_var`, unsafe in edition 2024), [`main`] writes a
//! scratch topology and runs the binary again with the variables set.
//!
//! Knobs common to all targets: `BENCH_DISK_DIR` (where the "disk" variant puts its
//! state, default the system temp dir), `BENCH_FAKE_NVML_DIR` (directory of
//! `libnvidia_ml.so` and the fake tools, default `target/debug`).

pub mod client;
pub mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use gpu_dra::checkpoint::{CheckpointStore, CheckpointWriter, DEFAULT_BOOT_ID_PATH};
use gpu_dra::claims::FixedClaims;
use gpu_dra::inventory::{Discover, Inventory, NvmlDiscovery};
use gpu_dra::plugin::{PluginServer, PluginServerConfig};
use gpu_dra::prepare::{Preparer, PreparerConfig};
use gpu_dra::sharing::share_daemon::ComputeShareSettings;
use gpu_dra::sharing::{
    MpsLauncher, MpsSettings, MpsSupervisor, NvidiaSmiTimeSlice, NvmlComputeControl, SharingManager,
};

/// The driver name the benches run under.
pub const DRIVER: &str = "gpu.gpu-dra.dev";
/// Node (and pool) name of the generated allocations.
pub const NODE: &str = "bench-node";
/// Namespace of the generated claims.
pub const NAMESPACE: &str = "bench";
/// Set (to the scratch dir) in the re-executed child.
const CHILD_MARK: &str = "GPU_DRA_BENCH_SCRATCH";
/// Same limit as the product's nvidia-smi / MPS tool timeout.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// The fake machine a bench target runs on.
pub enum Topology {
    /// `tests/fake-nvml/topologies/<name>.yaml`.
    Preset(&'static str),
    /// A topology document written as is (`node:` preset plus overrides).
    Inline(String),
}

/// Entry point of a bench target: in the parent, prepares the fake machine and re-runs
/// the binary; in the child, calls `run`, whose report goes to stdout.
pub fn main(name: &str, topology: Topology, run: fn() -> anyhow::Result<()>) -> ExitCode {
    let result = if std::env::var_os(CHILD_MARK).is_some() {
        run().map(|()| ExitCode::SUCCESS)
    } else {
        reexec_with_fake_nvml(&topology)
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("bench {name}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Directory holding the fake `libnvidia_ml.so`, `nvidia-smi`, `nvidia-cuda-mps-control`.
pub fn fake_nvml_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BENCH_FAKE_NVML_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // <target>/<profile>/deps/<bench>-<hash>: the fake is built by `cargo build -p fake-nvml`.
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("bench binary is not under <target>/<profile>/deps")?;
    Ok(target.join("debug"))
}

/// The fake NVML artefacts.
#[derive(Clone)]
pub struct FakeTools {
    /// `libnvidia_ml.so`.
    pub lib: PathBuf,
    /// `nvidia-smi`.
    pub smi: PathBuf,
    /// `nvidia-cuda-mps-control`.
    pub mps: PathBuf,
}

impl FakeTools {
    /// The artefacts in [`fake_nvml_dir`]; an error names the first one missing.
    pub fn find() -> anyhow::Result<Self> {
        let dir = fake_nvml_dir()?;
        let tools = Self {
            lib: dir.join("libnvidia_ml.so"),
            smi: dir.join("nvidia-smi"),
            mps: dir.join("nvidia-cuda-mps-control"),
        };
        for tool in [&tools.lib, &tools.smi, &tools.mps] {
            if !tool.exists() {
                bail!(
                    "{} missing: run `cargo build -p fake-nvml` first (or `make bench`)",
                    tool.display()
                );
            }
        }
        Ok(tools)
    }
}

/// Prepares a scratch fake machine (topology copy, state file, /proc tree) on tmpfs when
/// there is one, then runs this binary again with the fake NVML's variables set.
fn reexec_with_fake_nvml(topology: &Topology) -> anyhow::Result<ExitCode> {
    let tools = FakeTools::find()?;
    let scratch = scratch_dir("gpu-dra-bench-nvml")?;
    let path = scratch.path().join("topology.yaml");
    match topology {
        Topology::Preset(name) => {
            let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fake-nvml/topologies")
                .join(format!("{name}.yaml"));
            std::fs::copy(&src, &path).with_context(|| format!("copying {}", src.display()))?;
        }
        Topology::Inline(text) => std::fs::write(&path, text).context("writing the topology")?,
    }
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let fake = tools.lib.parent().map(Path::to_owned).unwrap_or_default();
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_MARK, scratch.path())
        .env("FAKE_NVML_TOPOLOGY", &path)
        .env("FAKE_NVML_STATE", scratch.path().join("state.json"))
        .env("FAKE_NVML_PROC_ROOT", scratch.path().join("proc"))
        .env("BENCH_FAKE_NVML_DIR", &fake)
        .status()
        .context("running the bench with the fake NVML environment")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The scratch dir of the re-executed child (fake machine, room for a cgroup tree).
pub fn child_scratch() -> anyhow::Result<PathBuf> {
    std::env::var_os(CHILD_MARK)
        .map(PathBuf::from)
        .context("not running under the bench's fake NVML environment")
}

/// The fake machine's topology file (`FAKE_NVML_TOPOLOGY`) in the child.
pub fn topology_path() -> anyhow::Result<PathBuf> {
    std::env::var_os("FAKE_NVML_TOPOLOGY")
        .map(PathBuf::from)
        .context("FAKE_NVML_TOPOLOGY not set")
}

/// The fake GPUs' state now (instances, memory limits, MPS daemons) in the child.
pub fn fake_state() -> anyhow::Result<nvidia_ml::control::State> {
    let path = std::env::var_os("FAKE_NVML_STATE").context("FAKE_NVML_STATE not set")?;
    nvidia_ml::control::read_state(Path::new(&path)).context("reading the fake GPUs' state")
}

/// A temp dir on /dev/shm when it exists (kept off the disk), else in the temp dir.
pub fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix(prefix).clone();
    if shm.is_dir() {
        return builder.tempdir_in(shm).context("temp dir on /dev/shm");
    }
    builder.tempdir().context("temp dir")
}

/// A knob: the variable's value as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The plugin's runtime (the product's `#[tokio::main]`: multi-thread, one worker per
/// core) and the client's (the kubelet's side, another process in reality).
pub fn runtimes() -> anyhow::Result<(Runtime, Runtime)> {
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("plugin runtime")?;
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("client runtime")?;
    Ok((server, client))
}

/// Where the plugin's state lives in one variant: the plugin dir (checkpoint) and the
/// CDI root (specs).
#[derive(Clone)]
pub struct Storage {
    /// Column label in the report.
    pub label: &'static str,
    /// Parent of the kubelet root (checkpoint).
    pub plugin_parent: PathBuf,
    /// Parent of the CDI root (specs).
    pub cdi_parent: PathBuf,
}

/// All on tmpfs, all on disk, and the layout of a real node: CDI specs in /var/run/cdi
/// (tmpfs), the checkpoint in /var/lib/kubelet/plugins/<driver> (disk); the node layout
/// last.
pub fn storages() -> Vec<Storage> {
    let disk = std::env::var_os("BENCH_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let shm = PathBuf::from("/dev/shm");
    if !shm.is_dir() {
        return vec![Storage {
            label: "disk",
            plugin_parent: disk.clone(),
            cdi_parent: disk,
        }];
    }
    vec![
        Storage {
            label: "tmpfs",
            plugin_parent: shm.clone(),
            cdi_parent: shm.clone(),
        },
        Storage {
            label: "disk",
            plugin_parent: disk.clone(),
            cdi_parent: disk.clone(),
        },
        Storage {
            label: "node (CDI tmpfs, ckpt disk)",
            plugin_parent: disk,
            cdi_parent: shm,
        },
    ]
}

/// The layout of a real node (see [`storages`]).
pub fn node_storage() -> Storage {
    storages()
        .pop()
        .expect("storages() returns at least one variant")
}

/// A UUID-shaped, deterministic UID (the length of a real one matters for file names):
/// FNV-1a of the name in the last 48 bits.
pub fn uid_of(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("b3e1c0de-0000-4000-8000-{:012x}", hash & 0xffff_ffff_ffff)
}

/// An allocated claim for one device of this node, as the scheduler writes it: request
/// `gpu` of `class`, the result merged with `result_extra` (e.g. `consumedCapacity`,
/// `shareID`), the allocation's `config`, and `status_extra` merged into the status
/// (e.g. `reservedFor`).
pub fn allocated_claim(
    name: &str,
    class: &str,
    device: &str,
    config: Value,
    result_extra: Value,
    status_extra: Value,
) -> ResourceClaim {
    let mut result = json!({"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device});
    merge(&mut result, result_extra);
    let mut status = json!({"allocation": {
        "devices": {"results": [result], "config": config},
        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}
    }});
    merge(&mut status, status_extra);
    serde_json::from_value(json!({
        "metadata": {"namespace": NAMESPACE, "name": name, "uid": uid_of(name)},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": class}}]}},
        "status": status,
    }))
    .expect("generated claim is a valid ResourceClaim")
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// The kubelet's reference to a generated claim.
pub fn claim_ref(name: &str) -> gpu_dra::proto::dra_v1::Claim {
    gpu_dra::proto::dra_v1::Claim {
        namespace: NAMESPACE.into(),
        uid: uid_of(name),
        name: name.into(),
    }
}

/// What the plugin is wired with beyond the defaults.
pub struct PluginOptions {
    /// GPUs the fake topology must have.
    pub gpus: usize,
    /// Dynamic MIG as `--dynamic-mig auto` sets it up: GPUs in MIG mode without foreign
    /// instances annotated dynamic, NVML MIG control given to the preparer.
    pub dynamic_mig: bool,
    /// Per-pod GPU memory limits as `--cgroup-root <dir>` sets them up (the dir must have
    /// its `cgroup.controllers` and `dmem.capacity` already).
    pub cgroup_root: Option<PathBuf>,
}

/// A running plugin: server task, its sockets and state directory.
pub struct Plugin {
    _dir: tempfile::TempDir,
    _cdi_dir: tempfile::TempDir,
    /// Temp dir holding the kubelet root.
    pub state_dir: PathBuf,
    /// The DRA service socket.
    pub dra_socket: PathBuf,
    /// The registration socket.
    pub registration_socket: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The preparer behind the socket.
    pub preparer: Arc<Preparer<FixedClaims>>,
    /// The inventory the preparer reads.
    pub inventory: Inventory,
}

impl Plugin {
    /// [`Plugin::start`] on the [`node_storage`] variant; returns that storage too (its
    /// label names the variant in the report rows).
    pub fn start_on_node(
        rt: &Runtime,
        tools: &FakeTools,
        claims: FixedClaims,
        options: &PluginOptions,
    ) -> anyhow::Result<(Storage, Self)> {
        let storage = node_storage();
        let plugin = Self::start(rt, &storage, tools, claims, options)?;
        Ok((storage, plugin))
    }

    /// Wires the plugin as `run::kubelet_plugin` does, with the state under `storage`.
    pub fn start(
        rt: &Runtime,
        storage: &Storage,
        tools: &FakeTools,
        claims: FixedClaims,
        options: &PluginOptions,
    ) -> anyhow::Result<Self> {
        let temp_in = |parent: &Path| {
            tempfile::Builder::new()
                .prefix("gpu-dra-bench-")
                .tempdir_in(parent)
                .with_context(|| format!("temp dir in {}", parent.display()))
        };
        let dir = temp_in(&storage.plugin_parent)?;
        let cdi_dir = temp_in(&storage.cdi_parent)?;
        let kubelet = dir.path().join("kubelet");
        let plugin_dir = kubelet.join("plugins").join(DRIVER);
        let cdi_root = cdi_dir.path().join("cdi");
        std::fs::create_dir_all(&plugin_dir)?;
        std::fs::create_dir_all(&cdi_root)?;
        let proc_root = proc_root()?;

        keep_nvml_loaded(&tools.lib)?;
        let _enter = rt.enter();
        let discovery = NvmlDiscovery::new(Some(&tools.lib), dir.path().join("no-sysfs"))
            .context("NVML discovery through the fake library")?;
        let mut inventory = discovery.discover().context("discovering the fake GPUs")?;
        if inventory.gpus.len() != options.gpus {
            bail!(
                "fake topology has {} GPUs, expected {}",
                inventory.gpus.len(),
                options.gpus
            );
        }
        let store = CheckpointStore::new(&plugin_dir, Path::new(DEFAULT_BOOT_ID_PATH));
        let loaded = store.load().context("loading the checkpoint")?;
        let (checkpoint, _writer) = CheckpointWriter::spawn(store, loaded.checkpoint);
        let mig_control = if options.dynamic_mig {
            use gpu_dra::prepare::{mig_control::NvmlMigControl, mig_select};
            let owned = mig_select::owned_records(&checkpoint.snapshot());
            let chosen = mig_select::choose(&inventory, &mig_select::DynamicMigMode::Auto, &owned);
            mig_select::annotate(&mut inventory, &chosen, &owned);
            Some(Arc::new(
                NvmlMigControl::new(Some(&tools.lib)).context("NVML MIG control")?,
            ))
        } else {
            None
        };
        let (_inventory_tx, inventory_rx) = watch::channel(inventory.clone());
        // As `kubelet-plugin` with its flag defaults: MPS daemons under `setsid`
        // (`--mps-launcher session`), compute of GPU shares through one MPS daemon per GPU.
        let sharing = SharingManager::new(
            Arc::new(NvmlComputeControl::new(Some(&tools.lib)).context("NVML compute control")?),
            Arc::new(NvidiaSmiTimeSlice::new(&tools.smi, TOOL_TIMEOUT)),
            MpsSupervisor::new(MpsSettings {
                control_path: tools.mps.clone(),
                root_dir: plugin_dir.join("mps"),
                ready_timeout: TOOL_TIMEOUT,
                command_timeout: TOOL_TIMEOUT,
                private_shm: None,
            })
            .with_launcher(MpsLauncher::Session {
                setsid_path: "setsid".into(),
            }),
        )
        .with_compute_shares(ComputeShareSettings {
            root_dir: plugin_dir.join("mps-shares"),
            driver_version: inventory.driver_version.clone(),
            allow_scheduling_only: false,
        });
        let mut preparer = Preparer::new(
            PreparerConfig {
                driver_name: DRIVER.into(),
                node_name: NODE.into(),
                cdi_root,
                proc_root,
            },
            claims,
            inventory_rx,
            sharing,
            checkpoint,
        );
        if let Some(control) = mig_control {
            preparer = preparer.with_mig_control(control);
        }
        if let Some(root) = &options.cgroup_root {
            preparer = preparer.with_memory_limits(Arc::new(memory_limiter(
                &tools.lib,
                root,
                &inventory.driver_version,
            )?));
        }
        let preparer = Arc::new(preparer);
        rt.block_on(preparer.recover());

        let config = PluginServerConfig {
            driver_name: DRIVER.into(),
            registration_socket: kubelet
                .join("plugins_registry")
                .join(format!("{DRIVER}-reg.sock")),
            dra_socket: plugin_dir.join("dra.sock"),
            shutdown_grace: Duration::from_secs(5),
        };
        let server = PluginServer::bind(config.clone(), Arc::clone(&preparer))
            .context("binding the plugin sockets")?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        // Discovery's NVML handle lives as long as the server, as in the product.
        let task = rt.spawn(async move {
            let _discovery = discovery;
            server.serve(stop).await.context("plugin server")
        });
        Ok(Self {
            state_dir: dir.path().to_owned(),
            _dir: dir,
            _cdi_dir: cdi_dir,
            dra_socket: config.dra_socket,
            registration_socket: config.registration_socket,
            shutdown,
            task,
            preparer,
            inventory,
        })
    }

    /// Stops the server (in-flight calls get their grace) and waits for it.
    pub fn stop(self, rt: &Runtime) -> anyhow::Result<()> {
        self.shutdown.cancel();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .context("plugin server did not stop")?
                .context("plugin server task")?
        })
    }
}

/// Keeps the fake NVML mapped for the life of the process: runtime threads that called
/// into it run its thread-local destructors when they exit, which may be after the
/// plugin's own handles have unloaded the library (a crash at exit otherwise).
fn keep_nvml_loaded(lib: &Path) -> anyhow::Result<()> {
    static PINNED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if PINNED.get().is_none() {
        std::mem::forget(NvmlComputeControl::new(Some(lib)).context("loading NVML")?);
        let _ = PINNED.set(());
    }
    Ok(())
}

/// The memory limiter of `--cgroup-root root`, over the fake's NVML memory-limit calls;
/// an error when the node would not enforce (the bench measures enforced shares).
fn memory_limiter(
    lib: &Path,
    root: &Path,
    driver_version: &str,
) -> anyhow::Result<gpu_dra::sharing::memory_limit::MemoryLimiter> {
    use gpu_dra::sharing::memory_limit::{MemoryLimitSettings, MemoryLimiter, NvmlMemoryLimits};
    let control = NvmlMemoryLimits::load(Some(lib))
        .context("loading NVML for GPU memory limits")?
        .map(|c| Arc::new(c) as Arc<_>);
    let limiter = MemoryLimiter::new(
        control,
        driver_version,
        MemoryLimitSettings {
            cgroup_root: root.to_owned(),
            allow_scheduling_only: false,
        },
    );
    if let Some(problem) = &limiter.support().problem {
        bail!("GPU memory limits not enforceable on the fake node: {problem}");
    }
    Ok(limiter)
}

/// The fake NVML's /proc tree (`FAKE_NVML_PROC_ROOT`); `devices` written when the fake
/// has not written it yet (it does on the first state change).
pub fn proc_root() -> anyhow::Result<PathBuf> {
    let root = std::env::var_os("FAKE_NVML_PROC_ROOT")
        .map(PathBuf::from)
        .context("FAKE_NVML_PROC_ROOT not set")?;
    let devices = root.join("devices");
    if !devices.exists() {
        std::fs::create_dir_all(&root)?;
        std::fs::write(
            &devices,
            "Character devices:\n195 nvidia-frontend\n235 nvidia-caps\n510 nvidia-uvm\n",
        )?;
    }
    Ok(root)
}

/// Values (kB) of `/proc/self/status` fields.
pub fn proc_status_kib(fields: &[&str]) -> std::collections::BTreeMap<String, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| fields.contains(k))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}
