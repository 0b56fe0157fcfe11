//! `make demo`: a real Kubernetes control plane on loopback with two simulated GPU nodes
//! (node-a: dgx-h100 with two GPUs in MIG mode holding static instances; node-b: one
//! L40S), the gpu-dra plugin on each, every example of examples/ applied, and a report of
//! what each pod got (devices, CDI ids, environment, compute policy, MPS limits). Keeps
//! running until Ctrl-C so `kubectl` can look around.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::TestBox;
use support::driver::{FakeGpus, Plugin};
use support::examples::{render, run_examples};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("gpu-dra demo: starting the box (etcd, kube-apiserver, controller-manager, scheduler, node agent)...");
    let b = TestBox::start(&["node-a", "node-b"])?;
    let dgx = FakeGpus::new("dgx-h100-static-mig")?;
    let l40s = FakeGpus::new("l40s-single")?;
    let _plugin_a = Plugin::start(&b, "node-a", &dgx)?;
    let _plugin_b = Plugin::start(&b, "node-b", &l40s)?;
    println!("plugins started on node-a (8 x H100, 2 in MIG mode) and node-b (1 x L40S); applying examples/ ...");
    let reports = run_examples(&b, Duration::from_secs(180)).await?;
    let gpus = BTreeMap::from([("node-a".to_string(), &dgx), ("node-b".to_string(), &l40s)]);
    println!("\n{}", render(&reports, &gpus));
    println!("plugin logs: {}/plugin-node-a.log, {}/plugin-node-b.log", b.state_dir().display(), b.state_dir().display());
    println!("\nexport KUBECONFIG={}", b.kubeconfig().display());
    println!("kubectl get resourceslices,resourceclaims -A; kubectl get pods -A -o wide");
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    println!("stopping...");
    Ok(())
}
