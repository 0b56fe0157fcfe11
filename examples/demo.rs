//! `make demo`: a real Kubernetes control plane on loopback with two simulated GPU nodes
//! (node-a: dgx-h100 with two GPUs in MIG mode holding static instances; node-b: one
//! L40S), the gpu-dra plugin on each, every example of examples/ applied, and a report of
//! what each pod got (devices, CDI ids, environment, compute policy, MPS limits). Then
//! the consumable-share scenarios of examples/shares/ on three more nodes whose plugins
//! publish shares (node-s and node-g: one L40S each, node-h: 8 x H100), with each pod's
//! share as the scheduler allocated it and the memory limit its GPU holds for the pod.
//! Then examples/mig-dynamic.yaml on node-d (dgx-h100, GPU 0 under dynamic MIG), each pod
//! with the MIG UUID it got and the GPU instance created for it. Keeps running until
//! Ctrl-C so `kubectl` can look around.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::TestBox;
use support::driver::{FakeGpus, Plugin};
use support::examples::{render, run_examples};
use support::shares::{ShareNodes, render_shares, run_share_scenarios};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!(
        "gpu-dra demo: starting the box (etcd, kube-apiserver, controller-manager, scheduler, node agent)..."
    );
    let b = TestBox::start(&["node-a", "node-b", "node-s", "node-h", "node-g", "node-d"])?;
    let dgx = FakeGpus::new("dgx-h100-static-mig")?;
    let l40s = FakeGpus::new("l40s-single")?;
    let _plugin_a = Plugin::start(&b, "node-a", &dgx)?;
    let _plugin_b = Plugin::start(&b, "node-b", &l40s)?;
    println!(
        "plugins started on node-a (8 x H100, 2 in MIG mode) and node-b (1 x L40S); applying examples/ ..."
    );
    // Shares first: the whole-GPU examples would otherwise take the share nodes' GPUs.
    let share_nodes = ShareNodes::start(&b)?;
    println!(
        "share plugins started on node-s (L40S, --consumable-shares=memory), node-h (8 x H100, memory), node-g (L40S, 4 shares), all on r615 drivers that limit memory per pod; applying examples/shares/ ..."
    );
    let shares = run_share_scenarios(&b, &share_nodes, Duration::from_secs(180)).await?;
    println!("\n{}", render_shares(&shares));
    let reports = run_examples(&b, Duration::from_secs(180)).await?;
    let gpus = BTreeMap::from([("node-a".to_string(), &dgx), ("node-b".to_string(), &l40s)]);
    println!("\n{}", render(&reports, &gpus));
    // After the static examples, so their whole-GPU claims stay on node-a and node-b.
    let dynamic = support::dynamic_mig::DynamicMigNode::start(&b)?;
    println!(
        "plugin started on node-d (8 x H100, GPU 0 under dynamic MIG); applying examples/mig-dynamic.yaml ..."
    );
    let mig = support::dynamic_mig::run_dynamic_mig_example(&b, Duration::from_secs(180)).await?;
    println!(
        "\n{}",
        support::dynamic_mig::render_dynamic_mig(&mig, &dynamic)
    );
    println!("plugin logs: {}/plugin-<node>.log", b.state_dir().display());
    println!("\nexport KUBECONFIG={}", b.kubeconfig().display());
    println!("kubectl get resourceslices,resourceclaims -A; kubectl get pods -A -o wide");
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    println!("stopping...");
    Ok(())
}
