//! NodePrepareResources / NodeUnprepareResources of GPU share claims (consumable
//! capacity: an allocation with `consumedCapacity` memory and compute and a `shareID`) on
//! the shareable L40S of an r615 driver (fake topology `l40s-r615`, dmem backend), with
//! per-pod memory limits enforced.
//!
//! Each round prepares a first share on the GPU (no other share holds it), then a second
//! one joining it, then unprepares the joining one and the first. What a prepare does for
//! a share is whatever the product's preparer does for consumed capacity: the pod
//! cgroup's GPU memory limit set through NVML and read back, and the claim's MPS v3
//! namespace (consumed compute and memory) on the GPU's one share daemon, plus checkpoint
//! and CDI spec: "first on a GPU" includes starting that daemon, "joining" uses the
//! running one, and the GPU's last unprepare stops it.
//!
//! The pods' cgroups live in a scratch cgroup v2 tree (`--cgroup-root`): the root lists
//! the dmem controller and the GPU's dmem region, and each pod directory
//! (`kubepods/besteffort/pod<uid>`, created before the prepare as the kubelet does) has
//! the `dmem.max` / `dmem.min` files the kernel would show.
//!
//! Run: `make bench` or `cargo bench --bench shares`. Knobs (environment):
//! `BENCH_SHARE_ITERATIONS` (rounds, default 100), and the harness's.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;

use gpu_dra::claims::FixedClaims;
use gpu_dra::proto::dra_v1 as v1;
use gpu_dra::sharing::memory_limit_cgroup::dmem_region;

#[allow(dead_code)]
#[path = "harness/mod.rs"]
mod harness;

use harness::client;
use harness::report::{Row, latency_table};
use harness::{FakeTools, Plugin, PluginOptions};

/// Consumed amounts of every share: 8 GiB of the 48 GB and a quarter of the SMs.
const MEMORY: &str = "8Gi";
const COMPUTE: &str = "25";

fn main() -> ExitCode {
    harness::main("shares", harness::Topology::Preset("l40s-r615"), run)
}

/// A cgroup v2 root with the dmem controller and the region of the GPU at `pci_bus_id`.
fn cgroup_root(dir: &Path, pci_bus_id: &str, memory_bytes: u64) -> anyhow::Result<PathBuf> {
    let root = dir.join("cgroup");
    std::fs::create_dir_all(&root)?;
    let controllers = "cpuset cpu io memory hugetlb pids rdma misc dmem\n";
    std::fs::write(root.join("cgroup.controllers"), controllers)?;
    std::fs::write(root.join("cgroup.subtree_control"), controllers)?;
    std::fs::write(
        root.join("dmem.capacity"),
        format!("{} {memory_bytes}\n", dmem_region(pci_bus_id)),
    )?;
    Ok(root)
}

/// The pod's cgroup as the kubelet creates it (BestEffort, cgroupfs driver), with the
/// dmem files of `region`.
fn pod_cgroup(root: &Path, pod_uid: &str, region: &str) -> anyhow::Result<()> {
    let dir = root.join(format!("kubepods/besteffort/pod{pod_uid}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("dmem.max"), format!("{region} max\n"))?;
    std::fs::write(dir.join("dmem.min"), format!("{region} 0\n"))?;
    Ok(())
}

/// A share claim of `gpu-0` reserved for its own pod, whose cgroup is created.
fn share_claim(
    name: &str,
    fixed: &mut FixedClaims,
    root: &Path,
    region: &str,
) -> anyhow::Result<v1::Claim> {
    let pod_uid = harness::uid_of(&format!("pod-{name}"));
    pod_cgroup(root, &pod_uid, region)?;
    fixed.insert(harness::allocated_claim(
        name,
        "gpu.gpu-dra.dev",
        "gpu-0",
        json!([]),
        json!({
            "shareID": harness::uid_of(&format!("share-{name}")),
            "consumedCapacity": {"memory": MEMORY, "compute": COMPUTE},
        }),
        json!({"reservedFor": [{"resource": "pods", "name": format!("pod-{name}"), "uid": pod_uid}]}),
    ));
    Ok(harness::claim_ref(name))
}

fn run() -> anyhow::Result<()> {
    let tools = FakeTools::find()?;
    let rounds = harness::env_usize("BENCH_SHARE_ITERATIONS", 100).max(1);
    let (server_rt, client_rt) = harness::runtimes()?;
    let topo = nvidia_ml::control::load_topology(&harness::topology_path()?)
        .context("reading the fake topology")?;
    let gpu = topo.gpus.first().context("the topology has no GPU")?;
    let root = cgroup_root(
        &harness::child_scratch()?,
        &gpu.pci_bus_id,
        gpu.model.memory_mib << 20,
    )?;
    let region = dmem_region(&gpu.pci_bus_id);
    let mut fixed = FixedClaims::new();
    let warmup = 5.min(rounds);
    let mut pairs = Vec::with_capacity(rounds + warmup);
    for i in 0..rounds + warmup {
        pairs.push((
            share_claim(&format!("first-{i}"), &mut fixed, &root, &region)?,
            share_claim(&format!("join-{i}"), &mut fixed, &root, &region)?,
        ));
    }
    let (storage, plugin) = Plugin::start_on_node(
        &server_rt,
        &tools,
        fixed,
        &PluginOptions {
            gpus: 1,
            dynamic_mig: false,
            cgroup_root: Some(root.clone()),
        },
    )?;
    let mut client = client_rt.block_on(client::connect(&plugin.dra_socket))?;
    eprintln!("== shares: {rounds} rounds of first + joining share on one GPU");
    let mut first = Vec::with_capacity(rounds);
    let mut join = Vec::with_capacity(rounds);
    let mut unprep_join = Vec::with_capacity(rounds);
    let mut unprep_last = Vec::with_capacity(rounds);
    for (i, (a, b)) in pairs.iter().enumerate() {
        let pa = client_rt.block_on(client::prepare_one(&mut client, a))?;
        let pb = client_rt.block_on(client::prepare_one(&mut client, b))?;
        if i == warmup {
            check_limits(&topo.gpus[0].uuid, &root, &[a, b])?;
        }
        let ub = client_rt.block_on(client::unprepare_one(&mut client, b))?;
        let ua = client_rt.block_on(client::unprepare_one(&mut client, a))?;
        if i >= warmup {
            first.push(pa);
            join.push(pb);
            unprep_join.push(ub);
            unprep_last.push(ua);
        }
    }
    let rows = vec![
        Row::latency(storage.label, "prepare, first share on the GPU", &first),
        Row::latency(
            storage.label,
            "prepare, share joining a GPU with a share",
            &join,
        ),
        Row::latency(storage.label, "unprepare, a share of two", &unprep_join),
        Row::latency(
            storage.label,
            "unprepare, the GPU's last share",
            &unprep_last,
        ),
    ];
    drop(client);
    plugin.stop(&server_rt)?;
    let mut out = format!(
        "\n## GPU shares (fake NVML, l40s-r615, dmem memory limits per pod cgroup)\n\n\
         {rounds} rounds; each share consumes memory {MEMORY} and compute {COMPUTE}. Latency at the gRPC client, in ms.\n\n"
    );
    out.push_str(&latency_table("state dir", &rows));
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Fails unless the fake GPU holds the 8 GiB hard limit of each claim's pod cgroup: the
/// figures are of enforced shares, not of a path that skipped the limit.
fn check_limits(gpu_uuid: &str, root: &Path, claims: &[&v1::Claim]) -> anyhow::Result<()> {
    let state = harness::fake_state()?;
    let daemons = state.mps_daemons.values().filter(|d| d.running).count();
    let limits = state
        .memory_limits
        .get(gpu_uuid)
        .cloned()
        .unwrap_or_default();
    for claim in claims {
        let pod = harness::uid_of(&format!("pod-{}", claim.name));
        let cgroup = root.join(format!("kubepods/besteffort/pod{pod}"));
        let hard = limits
            .get(&cgroup.display().to_string())
            .map(|l| l.hard_limit);
        if hard != Some(8 << 30) {
            anyhow::bail!(
                "share {} prepared without its memory limit on {} (fake GPU holds {hard:?})",
                claim.name,
                cgroup.display()
            );
        }
    }
    // One MPS control daemon for the GPU's shares, when the preparer enforces compute.
    if daemons > 1 {
        anyhow::bail!("{daemons} MPS control daemons run for two shares of one GPU");
    }
    eprintln!("   MPS control daemons running for the two shares: {daemons}");
    Ok(())
}
