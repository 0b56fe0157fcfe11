//! Dynamic MIG on a DGX H100 with all 8 GPUs in MIG mode and no instance: the
//! ResourceSlices the plugin publishes (partitionable devices: counter sets and one device
//! per profile x placement) computed and serialised, and NodePrepareResources /
//! NodeUnprepareResources of a dynamic MIG device, which create and destroy the GPU
//! instance and its compute instance through the fake NVML.
//!
//! The plugin is `harness::Plugin` with dynamic MIG set up as `--dynamic-mig auto` sets it
//! up (all 8 GPUs chosen, NVML MIG control in the preparer), its state in a real node's
//! layout (CDI specs on tmpfs, checkpoint on disk).
//!
//! Run: `make bench` or `cargo bench --bench dynamic_mig`. Knobs (environment):
//! `BENCH_MIG_ITERATIONS` (prepare + unprepare pairs per profile, default 200),
//! `BENCH_SLICE_ITERATIONS` (desired_slices calls, default 200), and the harness's.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use gpu_dra::claims::FixedClaims;
use gpu_dra::inventory::Inventory;
use gpu_dra::proto::dra_v1 as v1;
use gpu_dra::slices::desired::{SliceFeatures, desired_slices};

#[allow(dead_code)]
#[path = "harness/mod.rs"]
mod harness;

use harness::client;
use harness::report::{Row, latency_table, ms};
use harness::{DRIVER, FakeTools, NODE, Plugin, PluginOptions};

/// GPUs of the DGX H100.
const GPUS: u32 = 8;

/// The preset with every GPU in MIG mode and no instance: all dynamic under `auto`.
fn topology() -> String {
    let mut t = String::from("seed: bench-dynamic-mig\nnode: dgx-h100\ngpus:\n");
    for _ in 0..GPUS {
        t.push_str("  - migMode: true\n");
    }
    t
}

fn main() -> ExitCode {
    harness::main("dynamic_mig", harness::Topology::Inline(topology()), run)
}

/// A profile measured: MIG profile name, its GPU instance profile id and its placements'
/// starts (H100: NVIDIA MIG user guide).
struct Profile {
    name: &'static str,
    device_part: &'static str,
    gi_profile_id: u32,
    starts: &'static [u32],
}

const PROFILES: [Profile; 2] = [
    Profile {
        name: "1g.10gb",
        device_part: "1g10gb",
        gi_profile_id: 19,
        starts: &[0, 1, 2, 3, 4, 5, 6],
    },
    Profile {
        name: "3g.40gb",
        device_part: "3g40gb",
        gi_profile_id: 9,
        starts: &[0, 4],
    },
];

/// `n` claims of `profile`, round robin over the GPUs and then the placements, so
/// consecutive claims land on different GPUs.
fn claims_of(profile: &Profile, n: usize, fixed: &mut FixedClaims) -> Vec<v1::Claim> {
    (0..n)
        .map(|i| {
            let gpu = i as u32 % GPUS;
            let start = profile.starts[(i / GPUS as usize) % profile.starts.len()];
            let device = format!(
                "gpu-{gpu}-mig-{}-{}-{start}",
                profile.device_part, profile.gi_profile_id
            );
            let name = format!("mig-{}-{i}", profile.device_part);
            fixed.insert(harness::allocated_claim(
                &name,
                "mig.gpu-dra.dev",
                &device,
                json!([]),
                json!({}),
                json!({}),
            ));
            harness::claim_ref(&name)
        })
        .collect()
}

fn run() -> anyhow::Result<()> {
    let tools = FakeTools::find()?;
    let iterations = harness::env_usize("BENCH_MIG_ITERATIONS", 200).max(1);
    let slice_iterations = harness::env_usize("BENCH_SLICE_ITERATIONS", 200).max(1);
    let (server_rt, client_rt) = harness::runtimes()?;
    let mut fixed = FixedClaims::new();
    let per_profile: Vec<(&Profile, Vec<v1::Claim>)> = PROFILES
        .iter()
        .map(|p| (p, claims_of(p, iterations, &mut fixed)))
        .collect();
    let (storage, plugin) = Plugin::start_on_node(
        &server_rt,
        &tools,
        fixed,
        &PluginOptions {
            gpus: GPUS as usize,
            dynamic_mig: true,
            cgroup_root: None,
        },
    )?;
    let dynamic = plugin
        .inventory
        .gpus
        .iter()
        .filter(|g| g.dynamic_mig.is_some())
        .count();
    if dynamic != GPUS as usize {
        bail!("{dynamic} of {GPUS} GPUs are dynamic MIG; expected all");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Dynamic MIG (fake NVML, dgx-h100, 8 GPUs in MIG mode, all dynamic)\n"
    );
    eprintln!("== dynamic MIG: desired_slices x {slice_iterations}");
    out.push_str(&slice_figures(&plugin.inventory, slice_iterations)?);

    let mut client = client_rt.block_on(client::connect(&plugin.dra_socket))?;
    // Warm-up: the first claims of the first profile, once over every GPU.
    client_rt.block_on(client::one_claim_loop(
        &mut client,
        &per_profile[0].1[..16.min(iterations)],
    ))?;
    check_instances(&client_rt, &mut client, &per_profile[1].1[0])?;
    let mut rows = Vec::new();
    for (profile, claims) in &per_profile {
        eprintln!(
            "== dynamic MIG: {} x prepare+unprepare of {}",
            claims.len(),
            profile.name
        );
        let (prepare, unprepare) =
            client_rt.block_on(client::one_claim_loop(&mut client, claims))?;
        rows.push(Row::latency(
            storage.label,
            &format!(
                "prepare, 1 claim of a {} device (GPU + compute instance created)",
                profile.name
            ),
            &prepare,
        ));
        rows.push(Row::latency(
            storage.label,
            &format!(
                "unprepare, 1 claim of a {} device (compute + GPU instance destroyed)",
                profile.name
            ),
            &unprepare,
        ));
    }
    let _ = writeln!(
        out,
        "\n### NodePrepareResources of a dynamic MIG device (ms, at the gRPC client)\n"
    );
    out.push_str(&latency_table("state dir", &rows));
    drop(client);
    plugin.stop(&server_rt)?;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Fails unless preparing `claim` (on GPU 0) leaves exactly one GPU instance with one
/// compute instance there and unpreparing it none: the figures are of instances really
/// created and destroyed.
fn check_instances(
    rt: &tokio::runtime::Runtime,
    client: &mut client::Client,
    claim: &v1::Claim,
) -> anyhow::Result<()> {
    let topo = nvidia_ml::control::load_topology(&harness::topology_path()?)?;
    let instances = || -> anyhow::Result<Vec<usize>> {
        let state = harness::fake_state()?;
        Ok(state
            .gpus
            .get(&topo.gpus[0].uuid)
            .map(|g| {
                g.gpu_instances
                    .values()
                    .map(|gi| gi.compute_instances.len())
                    .collect()
            })
            .unwrap_or_default())
    };
    rt.block_on(client::prepare_one(client, claim))?;
    let prepared = instances()?;
    rt.block_on(client::unprepare_one(client, claim))?;
    let unprepared = instances()?;
    if prepared != [1] || !unprepared.is_empty() {
        bail!(
            "GPU 0's instances: {prepared:?} compute instances per GPU instance after prepare, {unprepared:?} after unprepare; expected [1] and []"
        );
    }
    Ok(())
}

/// Objects, devices and counters of the node's slices, and the time to compute them and to
/// serialise them as the API objects (JSON).
fn slice_figures(inv: &Inventory, n: usize) -> anyhow::Result<String> {
    let features = SliceFeatures::default();
    let slices = desired_slices(inv, DRIVER, NODE, "node-uid", 1, &features);
    let devices: usize = slices
        .iter()
        .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
        .sum();
    let consuming: usize = slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .filter(|d| d.consumes_counters.is_some())
        .count();
    let sets: Vec<_> = slices
        .iter()
        .flat_map(|s| s.spec.shared_counters.iter().flatten())
        .collect();
    let counters: usize = sets.iter().map(|c| c.counters.len()).sum();
    let counter_slices = slices
        .iter()
        .filter(|s| s.spec.shared_counters.is_some())
        .count();
    let mut bytes = 0;
    for s in &slices {
        bytes += serde_json::to_vec(s)?.len();
    }
    let mut compute = Vec::with_capacity(n);
    let mut serialise = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = desired_slices(inv, DRIVER, NODE, "node-uid", 1, &features);
        compute.push(t.elapsed());
        let t = Instant::now();
        let mut total = 0;
        for slice in &s {
            total += serde_json::to_vec(slice)?.len();
        }
        serialise.push(t.elapsed());
        std::hint::black_box(total);
    }
    let rows = vec![
        Row::latency("", "desired_slices (pure)", &compute),
        Row::latency(
            "",
            "serialise the slices to JSON (the API objects)",
            &serialise,
        ),
    ];
    let both: Vec<Duration> = compute
        .iter()
        .zip(&serialise)
        .map(|(a, b)| *a + *b)
        .collect();
    let both = Row::latency("", "", &both);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ResourceSlices: {} objects ({} with counter sets), {devices} devices ({consuming} consuming counters), {} counter sets with {counters} counters in all, {bytes} bytes of JSON.\n",
        slices.len(),
        counter_slices,
        sets.len(),
    );
    o.push_str(&latency_table("", &rows));
    let _ = writeln!(
        o,
        "\nComputed and serialised together: p50 {} ms, p99 {} ms.",
        ms(both.p50),
        ms(both.p99)
    );
    Ok(o)
}
