//! NodePrepareResources / NodeUnprepareResources latency of a warm plugin, plus the
//! costs around it (building blocks, plugin RSS, slice computation for large nodes).
//!
//! What runs is the product, wired as `run::kubelet_plugin` wires it, with only the
//! Kubernetes side replaced: a real [`PluginServer`] on Unix sockets in a temp dir serving
//! a real [`Preparer`] over [`FixedClaims`] (generated allocated ResourceClaims for a
//! dgx-h100 node), real NVML discovery and [`NvmlComputeControl`] through the fake
//! `libnvidia_ml.so`, real [`NvidiaSmiTimeSlice`] running the fake `nvidia-smi`, the real
//! checkpoint writer and CDI writer. The client is a tonic gRPC client over the Unix
//! socket, on its own runtime (the kubelet is another process).
//!
//! Why a re-exec: the fake NVML reads `FAKE_NVML_TOPOLOGY` in `nvmlInit`, and the fake
//! `nvidia-smi` children inherit it, so it must be in this process's environment before
//! NVML is initialised. Rather than mutating the environment of a running process
//! (`std::env::set_var`, unsafe in edition 2024), `main` prepares a scratch topology and
//! runs itself again with the variables set.
//!
//! Run: `make bench` (builds the fake NVML, then `cargo bench --bench prepare`).
//! Knobs (environment): `BENCH_ITERATIONS` (scenario a, default 500), `BENCH_ROUNDS`
//! (scenario b, default 10 batches of 64), `BENCH_TS_ITERATIONS` (scenario c, default 50),
//! `BENCH_DISK_DIR` (where the "disk" variant puts its state, default the system temp
//! dir), `BENCH_FAKE_NVML_DIR` (directory of `libnvidia_ml.so` and the fake tools,
//! default `target/debug`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use gpu_dra::cdi::writer::write_atomic;
use gpu_dra::checkpoint::{CheckpointStore, CheckpointWriter, DEFAULT_BOOT_ID_PATH};
use gpu_dra::claims::FixedClaims;
use gpu_dra::inventory::fixtures::{h100, with_mig};
use gpu_dra::inventory::{Discover, Inventory, NvmlDiscovery};
use gpu_dra::plugin::{PluginServer, PluginServerConfig};
use gpu_dra::prepare::{Preparer, PreparerConfig};
use gpu_dra::proto::dra_v1 as v1;
use gpu_dra::proto::pluginregistration as reg;
use gpu_dra::sharing::{
    MpsSettings, MpsSupervisor, NvidiaSmiTimeSlice, NvmlComputeControl, SharingManager,
};
use gpu_dra::slices::desired::{SliceFeatures, desired_slices};

const DRIVER: &str = "gpu.gpu-dra.dev";
const NODE: &str = "bench-node";
const NAMESPACE: &str = "bench";
/// Set (to the scratch dir) in the re-executed child.
const CHILD_MARK: &str = "GPU_DRA_BENCH_SCRATCH";
/// Same limit as the product's nvidia-smi / MPS tool timeout.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent RPCs in scenario b.
const CONCURRENT: usize = 64;
/// GPUs of the dgx-h100 topology.
const GPUS: usize = 8;

fn main() -> ExitCode {
    let result = if std::env::var_os(CHILD_MARK).is_some() {
        run_bench()
    } else {
        reexec_with_fake_nvml()
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("bench prepare: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Directory holding the fake `libnvidia_ml.so`, `nvidia-smi`, `nvidia-cuda-mps-control`.
fn fake_nvml_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BENCH_FAKE_NVML_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // <target>/<profile>/deps/prepare-<hash>: the fake is built by `cargo build -p fake-nvml`.
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("bench binary is not under <target>/<profile>/deps")?;
    Ok(target.join("debug"))
}

/// Prepares a scratch fake machine (topology copy, state file, /proc tree) on tmpfs when
/// there is one, then runs this binary again with the fake NVML's variables set.
fn reexec_with_fake_nvml() -> anyhow::Result<ExitCode> {
    let fake = fake_nvml_dir()?;
    for tool in ["libnvidia_ml.so", "nvidia-smi", "nvidia-cuda-mps-control"] {
        if !fake.join(tool).exists() {
            bail!(
                "{} missing: run `cargo build -p fake-nvml` first (or `make bench`)",
                fake.join(tool).display()
            );
        }
    }
    let scratch = scratch_dir("gpu-dra-bench-nvml")?;
    let topology = scratch.path().join("dgx-h100.yaml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-nvml/topologies/dgx-h100.yaml"),
        &topology,
    )
    .context("copying the dgx-h100 topology")?;
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_MARK, scratch.path())
        .env("FAKE_NVML_TOPOLOGY", &topology)
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

/// A temp dir on /dev/shm when it exists (kept off the disk), else in the temp dir.
fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix(prefix).clone();
    if shm.is_dir() {
        return builder.tempdir_in(shm).context("temp dir on /dev/shm");
    }
    builder.tempdir().context("temp dir")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the plugin's state lives in one variant: the plugin dir (checkpoint) and the
/// CDI root (specs).
#[derive(Clone)]
struct Storage {
    label: &'static str,
    plugin_parent: PathBuf,
    cdi_parent: PathBuf,
}

/// All on tmpfs, all on disk, and the layout of a real node: CDI specs in /var/run/cdi
/// (tmpfs), the checkpoint in /var/lib/kubelet/plugins/<driver> (disk).
fn storages() -> Vec<Storage> {
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

fn run_bench() -> anyhow::Result<ExitCode> {
    let rss_at_start = proc_status_kib(&["VmRSS"]);
    let fake = fake_nvml_dir()?;
    let lib = fake.join("libnvidia_ml.so");
    let smi = fake.join("nvidia-smi");
    let mps = fake.join("nvidia-cuda-mps-control");
    let iterations = env_usize("BENCH_ITERATIONS", 500);
    let rounds = env_usize("BENCH_ROUNDS", 10);
    let ts_iterations = env_usize("BENCH_TS_ITERATIONS", 50);

    // The plugin's runtime is the product's (#[tokio::main]: multi-thread, one worker per
    // core); the client (the kubelet's side) gets its own.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("plugin runtime")?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("client runtime")?;

    let claims = Claims::generate(iterations.max(1), ts_iterations.max(1));
    let mut report = Report::default();
    let mut rss_after_runs = None;
    let mut spawn_measured = false;

    for storage in storages() {
        eprintln!(
            "== {}: plugin dir in {}, CDI root in {}",
            storage.label,
            storage.plugin_parent.display(),
            storage.cdi_parent.display()
        );
        let start = Instant::now();
        let plugin = Plugin::start(&server_rt, &storage, &lib, &smi, &mps, &claims)?;
        let started = start.elapsed();
        let served = client_rt.block_on(first_get_info(&plugin.registration_socket))?;
        report
            .startup
            .push((storage.label, started, started + served));
        let mut client = client_rt
            .block_on(channel(&plugin.dra_socket))
            .map(v1::dra_plugin_client::DraPluginClient::new)?;

        // Floor: an empty request (gRPC over the Unix socket and the dispatch, no claim).
        let floor = client_rt.block_on(empty_rpcs(&mut client, 200))?;
        report.rows.push(Row::latency(
            storage.label,
            "empty NodePrepareResources (gRPC floor)",
            &floor,
        ));

        // (a) one claim per call, no sharing config; warm-up first.
        eprintln!("   (a) {iterations} x prepare+unprepare of one claim");
        client_rt.block_on(one_claim_loop(
            &mut client,
            &claims.plain[..20.min(iterations)],
        ))?;
        let (prep, unprep) = client_rt.block_on(one_claim_loop(&mut client, &claims.plain))?;
        report
            .rows
            .push(Row::latency(storage.label, "(a) prepare, 1 claim", &prep));
        report.rows.push(Row::latency(
            storage.label,
            "(a) unprepare, 1 claim",
            &unprep,
        ));

        // (b) 64 concurrent RPCs of one claim each, `rounds` times.
        eprintln!("   (b) {rounds} x {CONCURRENT} concurrent RPCs");
        let writes_before = plugin.preparer.checkpoint().writes();
        let b = client_rt.block_on(concurrent_rounds(&client, &claims.concurrent, rounds))?;
        let b_writes = plugin.preparer.checkpoint().writes() - writes_before;
        report.rows.push(Row::latency(
            storage.label,
            "(b) prepare, 64 concurrent RPCs (per RPC)",
            &b.prepare,
        ));
        report.rows.push(Row::latency(
            storage.label,
            "(b) prepare, 64 concurrent: batch wall",
            &b.prepare_wall,
        ));
        report.rows.push(Row::latency(
            storage.label,
            "(b) unprepare, 64 concurrent RPCs (per RPC)",
            &b.unprepare,
        ));
        report.rows.push(Row::latency(
            storage.label,
            "(b) unprepare, 64 concurrent: batch wall",
            &b.unprepare_wall,
        ));
        report
            .batched_writes
            .push((storage.label, b_writes, rounds * CONCURRENT * 2));

        // (c) a time-sliced claim: nvidia-smi compute-policy -l, --set-timeslice 3, and on
        // unprepare --set-timeslice 0.
        eprintln!("   (c) {ts_iterations} x time-sliced claim");
        let (ts_prep, ts_unprep) =
            client_rt.block_on(one_claim_loop(&mut client, &claims.time_sliced))?;
        report.rows.push(Row::latency(
            storage.label,
            "(c) prepare, 1 time-sliced claim (nvidia-smi x2)",
            &ts_prep,
        ));
        report.rows.push(Row::latency(
            storage.label,
            "(c) unprepare, 1 time-sliced claim (nvidia-smi x1)",
            &ts_unprep,
        ));

        // Building blocks measured on the same directory.
        if storage.plugin_parent == storage.cdi_parent {
            report
                .blocks
                .extend(file_blocks(storage.label, &plugin.state_dir)?);
        }
        if !spawn_measured {
            report.blocks.extend(spawn_blocks(&smi)?);
            spawn_measured = true;
        }

        // Taken while the last plugin is still up, after all its runs.
        rss_after_runs = Some(proc_status_kib(&["VmRSS", "VmHWM", "Threads"]));
        drop(client);
        plugin.stop(&server_rt)?;
    }
    report.rss = rss_after_runs.unwrap_or_default();
    report.rss_at_start = rss_at_start;
    report.slices = slice_timings();

    let text = report.render(iterations, rounds, ts_iterations);
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// The generated claims: ResourceClaims for [`FixedClaims`] and their references.
struct Claims {
    objects: Vec<ResourceClaim>,
    plain: Vec<v1::Claim>,
    concurrent: Vec<v1::Claim>,
    time_sliced: Vec<v1::Claim>,
}

impl Claims {
    fn generate(plain: usize, time_sliced: usize) -> Self {
        let mut objects = Vec::new();
        let mut make = |prefix: &str, i: usize, config: Value| {
            let name = format!("{prefix}-{i}");
            // Full GPUs round robin: every claim of a kind spreads over the 8 GPUs.
            let device = format!("gpu-{}", i % GPUS);
            objects.push(resource_claim(&name, &device, config));
            v1::Claim {
                namespace: NAMESPACE.into(),
                uid: uid_of(&name),
                name,
            }
        };
        let plain: Vec<_> = (0..plain).map(|i| make("plain", i, json!([]))).collect();
        let concurrent: Vec<_> = (0..CONCURRENT)
            .map(|i| make("conc", i, json!([])))
            .collect();
        let ts_config = json!([{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}}}]);
        // All on gpu-0 (i * 8 % 8): each prepare really changes the setting and each
        // unprepare restores it, the worst case.
        let time_sliced: Vec<_> = (0..time_sliced)
            .map(|i| make("ts", i * GPUS, ts_config.clone()))
            .collect();
        Self {
            objects,
            plain,
            concurrent,
            time_sliced,
        }
    }

    fn fixed(&self) -> FixedClaims {
        let mut fixed = FixedClaims::new();
        for c in &self.objects {
            fixed.insert(c.clone());
        }
        fixed
    }
}

/// A UUID-shaped, deterministic UID (the length of a real one matters for file names):
/// FNV-1a of the name in the last 48 bits.
fn uid_of(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("b3e1c0de-0000-4000-8000-{:012x}", hash & 0xffff_ffff_ffff)
}

/// An allocated claim for one full GPU of this node, as the scheduler writes it.
fn resource_claim(name: &str, device: &str, config: Value) -> ResourceClaim {
    serde_json::from_value(json!({
        "metadata": {"namespace": NAMESPACE, "name": name, "uid": uid_of(name)},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}]}},
        "status": {"allocation": {
            "devices": {"results": [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}],
                        "config": config},
            "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}
        }},
    }))
    .expect("generated claim is a valid ResourceClaim")
}

/// A running plugin: server task, its sockets and state directory.
struct Plugin {
    _dir: tempfile::TempDir,
    _cdi_dir: tempfile::TempDir,
    state_dir: PathBuf,
    dra_socket: PathBuf,
    registration_socket: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    preparer: Arc<Preparer<FixedClaims>>,
}

impl Plugin {
    /// Wires the plugin as `run::kubelet_plugin` does, with the state under `storage`.
    fn start(
        rt: &Runtime,
        storage: &Storage,
        lib: &Path,
        smi: &Path,
        mps: &Path,
        claims: &Claims,
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

        let _enter = rt.enter();
        let discovery = NvmlDiscovery::new(Some(lib), dir.path().join("no-sysfs"))
            .context("NVML discovery through the fake library")?;
        let inventory = discovery.discover().context("discovering the fake GPUs")?;
        if inventory.gpus.len() != GPUS {
            bail!(
                "fake topology has {} GPUs, expected {GPUS}",
                inventory.gpus.len()
            );
        }
        let (_inventory_tx, inventory_rx) = watch::channel(inventory);

        let store = CheckpointStore::new(&plugin_dir, Path::new(DEFAULT_BOOT_ID_PATH));
        let loaded = store.load().context("loading the checkpoint")?;
        let (checkpoint, _writer) = CheckpointWriter::spawn(store, loaded.checkpoint);
        let sharing = SharingManager::new(
            Arc::new(NvmlComputeControl::new(Some(lib)).context("NVML compute control")?),
            Arc::new(NvidiaSmiTimeSlice::new(smi, TOOL_TIMEOUT)),
            MpsSupervisor::new(MpsSettings {
                control_path: mps.to_owned(),
                root_dir: plugin_dir.join("mps"),
                ready_timeout: TOOL_TIMEOUT,
                command_timeout: TOOL_TIMEOUT,
                private_shm: None,
            }),
        );
        let preparer = Arc::new(Preparer::new(
            PreparerConfig {
                driver_name: DRIVER.into(),
                node_name: NODE.into(),
                cdi_root,
                proc_root,
            },
            claims.fixed(),
            inventory_rx,
            sharing,
            checkpoint,
        ));
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
        })
    }

    fn stop(self, rt: &Runtime) -> anyhow::Result<()> {
        self.shutdown.cancel();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .context("plugin server did not stop")?
                .context("plugin server task")?
        })
    }
}

/// The fake NVML's /proc tree (`FAKE_NVML_PROC_ROOT`); `devices` written when the fake
/// has not written it yet (it does on the first state change).
fn proc_root() -> anyhow::Result<PathBuf> {
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

/// Dials a Unix socket with tonic (the URI is required by the API but unused).
async fn channel(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .context("connecting to the plugin socket")
}

/// Time from "sockets bound" until the registration service answers GetInfo.
async fn first_get_info(socket: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut client = reg::registration_client::RegistrationClient::new(channel(socket).await?);
    let info = client.get_info(reg::InfoRequest {}).await?.into_inner();
    if info.name != DRIVER {
        bail!("GetInfo answered driver {:?}", info.name);
    }
    Ok(start.elapsed())
}

type Client = v1::dra_plugin_client::DraPluginClient<Channel>;

async fn empty_rpcs(client: &mut Client, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .node_prepare_resources(v1::NodePrepareResourcesRequest { claims: vec![] })
            .await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

async fn prepare_one(client: &mut Client, claim: &v1::Claim) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let response = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await?
        .into_inner();
    let took = t.elapsed();
    let answer = response
        .claims
        .get(&claim.uid)
        .with_context(|| format!("no answer for claim {}", claim.name))?;
    if !answer.error.is_empty() || answer.devices.len() != 1 {
        bail!("prepare of {} failed: {:?}", claim.name, answer);
    }
    Ok(took)
}

async fn unprepare_one(client: &mut Client, claim: &v1::Claim) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let response = client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await?
        .into_inner();
    let took = t.elapsed();
    match response.claims.get(&claim.uid) {
        Some(answer) if answer.error.is_empty() => Ok(took),
        other => bail!("unprepare of {} failed: {:?}", claim.name, other),
    }
}

/// Prepare then unprepare each claim in turn; (prepare latencies, unprepare latencies).
async fn one_claim_loop(
    client: &mut Client,
    claims: &[v1::Claim],
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut prepare = Vec::with_capacity(claims.len());
    let mut unprepare = Vec::with_capacity(claims.len());
    for claim in claims {
        prepare.push(prepare_one(client, claim).await?);
        unprepare.push(unprepare_one(client, claim).await?);
    }
    Ok((prepare, unprepare))
}

struct Concurrent {
    prepare: Vec<Duration>,
    prepare_wall: Vec<Duration>,
    unprepare: Vec<Duration>,
    unprepare_wall: Vec<Duration>,
}

/// `rounds` times: all claims prepared by concurrent RPCs (one claim each, one HTTP/2
/// connection as the kubelet uses), then all unprepared the same way.
async fn concurrent_rounds(
    client: &Client,
    claims: &[v1::Claim],
    rounds: usize,
) -> anyhow::Result<Concurrent> {
    let mut out = Concurrent {
        prepare: Vec::new(),
        prepare_wall: Vec::new(),
        unprepare: Vec::new(),
        unprepare_wall: Vec::new(),
    };
    for _ in 0..rounds {
        let t = Instant::now();
        let calls = claims.iter().map(|c| {
            let mut client = client.clone();
            async move { prepare_one(&mut client, c).await }
        });
        for r in futures::future::join_all(calls).await {
            out.prepare.push(r?);
        }
        out.prepare_wall.push(t.elapsed());
        let t = Instant::now();
        let calls = claims.iter().map(|c| {
            let mut client = client.clone();
            async move { unprepare_one(&mut client, c).await }
        });
        for r in futures::future::join_all(calls).await {
            out.unprepare.push(r?);
        }
        out.unprepare_wall.push(t.elapsed());
    }
    Ok(out)
}

/// Costs of the file operations a prepare is made of, in the plugin's state directory.
fn file_blocks(label: &str, dir: &Path) -> anyhow::Result<Vec<(String, Vec<Duration>)>> {
    let n = 50;
    let scratch = dir.join("blocks");
    std::fs::create_dir_all(&scratch)?;
    let spec_like = vec![b'x'; 1500];
    let mut fsync_file = Vec::new();
    let mut fsync_dir = Vec::new();
    let mut atomic = Vec::new();
    let mut unlink_dirsync = Vec::new();
    for i in 0..n {
        let path = scratch.join(format!("f{i}.json"));
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&spec_like)?;
        let t = Instant::now();
        f.sync_all()?;
        fsync_file.push(t.elapsed());
        let t = Instant::now();
        std::fs::File::open(&scratch)?.sync_all()?;
        fsync_dir.push(t.elapsed());
        let t = Instant::now();
        write_atomic(&scratch.join(format!("a{i}.json")), &spec_like)?;
        atomic.push(t.elapsed());
        let t = Instant::now();
        std::fs::remove_file(scratch.join(format!("a{i}.json")))?;
        std::fs::File::open(&scratch)?.sync_all()?;
        unlink_dirsync.push(t.elapsed());
    }
    let l = label;
    Ok(vec![
        (format!("{l}: fsync of a 1.5 KB file"), fsync_file),
        (format!("{l}: fsync of the directory"), fsync_dir),
        (
            format!("{l}: write_atomic 1.5 KB (temp+rename, no fsync)"),
            atomic,
        ),
        (
            format!("{l}: unlink + dir fsync (spec removal)"),
            unlink_dirsync,
        ),
    ])
}

/// Cost of running the fake nvidia-smi, against the floor of any process spawn.
fn spawn_blocks(smi: &Path) -> anyhow::Result<Vec<(String, Vec<Duration>)>> {
    let mut spawn = Vec::new();
    let gpu0 = "0";
    for _ in 0..20 {
        let t = Instant::now();
        let out = std::process::Command::new(smi)
            .args(["compute-policy", "-i", gpu0, "-l"])
            .output()?;
        spawn.push(t.elapsed());
        if !out.status.success() {
            bail!(
                "nvidia-smi compute-policy -l failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let mut true_spawn = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        std::process::Command::new("/bin/true").status()?;
        true_spawn.push(t.elapsed());
    }
    Ok(vec![
        (
            "fake `nvidia-smi compute-policy -i 0 -l` (spawn + run)".into(),
            spawn,
        ),
        ("spawn + wait `/bin/true`".into(), true_spawn),
    ])
}

/// `desired_slices` timings: (case, devices, slices, JSON bytes, per-call durations).
fn slice_timings() -> Vec<(String, usize, usize, usize, Vec<Duration>)> {
    // 8 H100s in MIG mode, each with the most instances it holds (7 x 1g.10gb).
    let all_mig = |count: u32| -> Vec<_> {
        (0..count)
            .map(|i| with_mig(h100(i), &(0..7).map(|s| (19, s, 7 + s)).collect::<Vec<_>>()))
            .collect()
    };
    let dgx_all_mig = Inventory {
        driver_version: "550.54.15".into(),
        cuda_driver_version: "12.4".into(),
        gpus: all_mig(8),
    };
    // Synthetic 256 devices: 32 GPUs x 7 MIG devices + 32 full GPUs -> split in slices.
    let mut gpus = all_mig(32);
    gpus.extend((32..64).map(h100));
    let synthetic = Inventory {
        driver_version: "550.54.15".into(),
        cuda_driver_version: "12.4".into(),
        gpus,
    };
    let features = SliceFeatures::default();
    let mut out = Vec::new();
    for (label, inv) in [
        ("dgx-h100, 8 GPUs x 7 MIG 1g.10gb", &dgx_all_mig),
        ("synthetic 256 devices (32x7 MIG + 32 GPUs)", &synthetic),
    ] {
        let slices = desired_slices(inv, DRIVER, NODE, "node-uid", 1, &features);
        let devices: usize = slices
            .iter()
            .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
            .sum();
        let bytes: usize = slices
            .iter()
            .map(|s| serde_json::to_vec(s).map_or(0, |v| v.len()))
            .sum();
        let mut times = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let s = desired_slices(inv, DRIVER, NODE, "node-uid", 1, &features);
            times.push(t.elapsed());
            std::hint::black_box(s);
        }
        out.push((label.to_owned(), devices, slices.len(), bytes, times));
    }
    out
}

/// Values (kB) of `/proc/self/status` fields.
fn proc_status_kib(fields: &[&str]) -> BTreeMap<String, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| fields.contains(k))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

struct Row {
    storage: &'static str,
    what: String,
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Row {
    fn latency(storage: &'static str, what: &str, samples: &[Duration]) -> Self {
        let mut s = samples.to_vec();
        s.sort();
        Self {
            storage,
            what: what.to_owned(),
            n: s.len(),
            p50: percentile(&s, 50.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or_default(),
        }
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    startup: Vec<(&'static str, Duration, Duration)>,
    batched_writes: Vec<(&'static str, u64, usize)>,
    blocks: Vec<(String, Vec<Duration>)>,
    rss: BTreeMap<String, String>,
    rss_at_start: BTreeMap<String, String>,
    slices: Vec<(String, usize, usize, usize, Vec<Duration>)>,
}

impl Report {
    fn render(&self, iterations: usize, rounds: usize, ts: usize) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\n## NodePrepareResources on a warm plugin (fake NVML, dgx-h100)\n"
        );
        let _ = writeln!(
            o,
            "(a) {iterations} sequential calls of one claim; (b) {rounds} batches of {CONCURRENT} concurrent RPCs, one claim each; (c) {ts} time-sliced claims. Latency measured at the gRPC client, in ms.\n"
        );
        let _ = writeln!(o, "| state dir | scenario | n | p50 | p99 | max |");
        let _ = writeln!(o, "|---|---|---:|---:|---:|---:|");
        for r in &self.rows {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                r.storage,
                r.what,
                r.n,
                ms(r.p50),
                ms(r.p99),
                ms(r.max)
            );
        }
        let _ = writeln!(o, "\n### Building blocks (ms)\n");
        let _ = writeln!(o, "| block | n | p50 | p99 | max |");
        let _ = writeln!(o, "|---|---:|---:|---:|---:|");
        for (what, samples) in &self.blocks {
            let r = Row::latency("", what, samples);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                r.what,
                r.n,
                ms(r.p50),
                ms(r.p99),
                ms(r.max)
            );
        }
        let _ = writeln!(o, "\n### Other figures\n");
        for (label, writes, updates) in &self.batched_writes {
            let _ = writeln!(
                o,
                "- {label}: scenario (b) checkpoint file writes: {writes} for {updates} claim updates"
            );
        }
        for (label, built, served) in &self.startup {
            let _ = writeln!(
                o,
                "- {label}: start (NVML init + discovery + checkpoint load + recover + bind): {} ms; first GetInfo answered at {} ms",
                ms(*built),
                ms(*served)
            );
        }
        let rss: Vec<String> = self.rss.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "- RSS of the bench process after the runs, plugin still up (plugin + in-process client + fake NVML): {}; at process start VmRSS {}",
            rss.join(", "),
            self.rss_at_start.get("VmRSS").map_or("?", String::as_str)
        );
        let _ = writeln!(o, "\n### desired_slices (pure, per call; ms)\n");
        let _ = writeln!(
            o,
            "| inventory | devices | slices | JSON bytes | p50 | p99 |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
        for (label, devices, slices, bytes, times) in &self.slices {
            let r = Row::latency("", label, times);
            let _ = writeln!(
                o,
                "| {label} | {devices} | {slices} | {bytes} | {} | {} |",
                ms(r.p50),
                ms(r.p99)
            );
        }
        o
    }
}
