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
//! The fake machine, the plugin wiring, the client and the report are the shared
//! `harness` module's (benches/harness).
//!
//! Run: `make bench` (builds the fake NVML, then `cargo bench --bench prepare`).
//! Knobs (environment): `BENCH_ITERATIONS` (scenario a, default 500), `BENCH_ROUNDS`
//! (scenario b, default 10 batches of 64), `BENCH_TS_ITERATIONS` (scenario c, default 50),
//! and the harness's `BENCH_DISK_DIR`, `BENCH_FAKE_NVML_DIR`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::{Value, json};

use gpu_dra::cdi::writer::write_atomic;
use gpu_dra::claims::FixedClaims;
use gpu_dra::inventory::Inventory;
use gpu_dra::inventory::fixtures::{h100, with_mig};
use gpu_dra::proto::dra_v1 as v1;
use gpu_dra::slices::desired::{SliceFeatures, desired_slices};

#[allow(dead_code)]
#[path = "harness/mod.rs"]
mod harness;

use harness::client::{self, Client};
use harness::report::{Row, latency_table, ms};
use harness::{DRIVER, FakeTools, NODE, Plugin, PluginOptions};

/// Concurrent RPCs in scenario b.
const CONCURRENT: usize = 64;
/// GPUs of the dgx-h100 topology.
const GPUS: usize = 8;

fn main() -> ExitCode {
    harness::main("prepare", harness::Topology::Preset("dgx-h100"), run_bench)
}

fn run_bench() -> anyhow::Result<()> {
    let rss_at_start = harness::proc_status_kib(&["VmRSS"]);
    let tools = FakeTools::find()?;
    let iterations = harness::env_usize("BENCH_ITERATIONS", 500);
    let rounds = harness::env_usize("BENCH_ROUNDS", 10);
    let ts_iterations = harness::env_usize("BENCH_TS_ITERATIONS", 50);
    let (server_rt, client_rt) = harness::runtimes()?;
    let options = PluginOptions {
        gpus: GPUS,
        dynamic_mig: false,
        cgroup_root: None,
    };

    let claims = Claims::generate(iterations.max(1), ts_iterations.max(1));
    let mut report = Report::default();
    let mut rss_after_runs = None;
    let mut spawn_measured = false;

    for storage in harness::storages() {
        eprintln!(
            "== {}: plugin dir in {}, CDI root in {}",
            storage.label,
            storage.plugin_parent.display(),
            storage.cdi_parent.display()
        );
        let start = Instant::now();
        let plugin = Plugin::start(&server_rt, &storage, &tools, claims.fixed(), &options)?;
        let started = start.elapsed();
        let served = client_rt.block_on(client::first_get_info(&plugin.registration_socket))?;
        report
            .startup
            .push((storage.label, started, started + served));
        let mut client = client_rt.block_on(client::connect(&plugin.dra_socket))?;

        // Floor: an empty request (gRPC over the Unix socket and the dispatch, no claim).
        let floor = client_rt.block_on(client::empty_rpcs(&mut client, 200))?;
        report.rows.push(Row::latency(
            storage.label,
            "empty NodePrepareResources (gRPC floor)",
            &floor,
        ));

        // (a) one claim per call, no sharing config; warm-up first.
        eprintln!("   (a) {iterations} x prepare+unprepare of one claim");
        client_rt.block_on(client::one_claim_loop(
            &mut client,
            &claims.plain[..20.min(iterations)],
        ))?;
        let (prep, unprep) =
            client_rt.block_on(client::one_claim_loop(&mut client, &claims.plain))?;
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
            client_rt.block_on(client::one_claim_loop(&mut client, &claims.time_sliced))?;
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
            report.blocks.extend(spawn_blocks(&tools.smi)?);
            spawn_measured = true;
        }

        // Taken while the last plugin is still up, after all its runs.
        rss_after_runs = Some(harness::proc_status_kib(&["VmRSS", "VmHWM", "Threads"]));
        drop(client);
        plugin.stop(&server_rt)?;
    }
    report.rss = rss_after_runs.unwrap_or_default();
    report.rss_at_start = rss_at_start;
    report.slices = slice_timings();

    let text = report.render(iterations, rounds, ts_iterations);
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
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
            objects.push(harness::allocated_claim(
                &name,
                "gpu.gpu-dra.dev",
                &device,
                config,
                json!({}),
                json!({}),
            ));
            harness::claim_ref(&name)
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
            async move { client::prepare_one(&mut client, c).await }
        });
        for r in futures::future::join_all(calls).await {
            out.prepare.push(r?);
        }
        out.prepare_wall.push(t.elapsed());
        let t = Instant::now();
        let calls = claims.iter().map(|c| {
            let mut client = client.clone();
            async move { client::unprepare_one(&mut client, c).await }
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
        o.push_str(&latency_table("state dir", &self.rows));
        let _ = writeln!(o, "\n### Building blocks (ms)\n");
        let blocks: Vec<Row> = self
            .blocks
            .iter()
            .map(|(what, samples)| Row::latency("", what, samples))
            .collect();
        o.push_str(&latency_table("", &blocks));
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
