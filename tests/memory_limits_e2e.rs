//! End to end: per-pod GPU memory limits of shares on the tests/cluster box — the real
//! API server and the kubelet's DRA manager (the node agent creates each pod's cgroup
//! before PrepareResources and removes it after the pod goes), our plugin as a child
//! process with `--cgroup-root` mapped to the node's fake cgroup tree, and the fake NVML
//! of an L40S on an r615 driver with the dmem backend.
//!
//! The claims are allocated by the test, not the scheduler: their status is written as
//! the scheduler writes it for a GPU published with `allowMultipleAllocations`
//! (`consumedCapacity`, `shareID`, `reservedFor`), so this test does not depend on which
//! slices are published. The pods name the node directly.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DeleteParams};
use serde_json::json;

use support::driver::{FakeGpus, Plugin};
use support::share_claims::{ShareAllocation, allocated_share, pod_running};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);
const GIB: u64 = 1 << 30;

fn region(pci_bus_id: &str) -> String {
    // nvidia/<domain:bus:dev.fn>/vidmem, the bus id in sysfs form.
    let lower = pci_bus_id.to_ascii_lowercase();
    let (domain, rest) = lower.split_once(':').unwrap();
    format!("nvidia/{}:{rest}/vidmem", &domain[domain.len() - 4..])
}

async fn share(
    client: &kube::Client,
    ns: &str,
    name: &str,
    memory: &str,
) -> anyhow::Result<(Pod, ResourceClaim)> {
    let allocation = ShareAllocation {
        capacity: Some(json!({ "memory": memory })),
        consumed: Some(json!({ "memory": memory })),
        config: None,
    };
    allocated_share(client, (ns, NODE), name, allocation).await
}

fn pod_cgroup(root: &Path, pod: &Pod) -> PathBuf {
    // No resource requests: BestEffort, cgroupfs naming.
    root.join(format!(
        "kubepods/besteffort/pod{}",
        pod.metadata.uid.as_deref().unwrap_or_default()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_share_is_limited_on_its_pod_cgroup_until_the_pod_goes() -> anyhow::Result<()> {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("l40s-r615")?;
    let topo = nvidia_ml::control::load_topology(&gpus.topology())?;
    let gpu = topo.gpus[0].clone();
    let cgroup_root = b.kubelet_root(NODE).parent().unwrap().join("cgroup");
    // The kernel registered the GPU's region with the dmem controller.
    std::fs::write(
        cgroup_root.join("dmem.capacity"),
        format!(
            "{} {}\n",
            region(&gpu.pci_bus_id),
            gpu.model.memory_mib * 1024 * 1024
        ),
    )?;
    let plugin = Plugin::start(b, NODE, &gpus)?;
    let ns = b.create_namespace("limits").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let (a, _) = share(&client, &ns, "tgi-a", "18Gi").await?;
    let (c, _) = share(&client, &ns, "tgi-b", "12Gi").await?;
    let (cg_a, cg_b) = (pod_cgroup(&cgroup_root, &a), pod_cgroup(&cgroup_root, &c));
    for name in ["tgi-a", "tgi-b"] {
        pod_running(b, (&plugin, 40), &pods, name, STEP).await?;
    }

    // What the fake GPU recorded, per pod cgroup, and the dmem files it left there.
    let limits = gpus
        .state()
        .memory_limits
        .get(&gpu.uuid)
        .cloned()
        .unwrap_or_default();
    let key = |p: &Path| p.display().to_string();
    assert_eq!(limits[&key(&cg_a)].hard_limit, 18 * GIB, "{limits:?}");
    assert_eq!(limits[&key(&cg_a)].soft_limit, 18 * GIB);
    assert_eq!(limits[&key(&cg_b)].hard_limit, 12 * GIB);
    let dmem_max = std::fs::read_to_string(cg_a.join("dmem.max"))?;
    assert!(
        dmem_max.contains(&format!("{} {}", region(&gpu.pci_bus_id), 18 * GIB)),
        "{dmem_max}"
    );

    // The claim says so in its device status (KEP-4817), written by the plugin.
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let message = b
        .wait(STEP, "tgi-a's device status condition", || async {
            let c = claims.get("tgi-a").await?;
            let cond = c
                .status
                .and_then(|s| s.devices)
                .and_then(|d| d.into_iter().find(|d| d.device == "gpu-0"))
                .and_then(|d| d.conditions)
                .and_then(|cs| cs.into_iter().find(|c| c.type_ == "GPUMemoryLimitEnforced"));
            Ok(cond.filter(|c| c.status == "True").map(|c| c.message))
        })
        .await
        .map_err(|e| e.context(plugin.log_tail(40)))?;
    assert!(
        message.contains(&format!("hard limit {}", 18 * GIB)),
        "{message}"
    );

    // The first pod goes: its limit is cleared (unprepare) and its cgroup removed; the
    // other pod keeps its limit.
    pods.delete("tgi-a", &DeleteParams::default()).await?;
    b.wait(
        STEP,
        "tgi-a's limit cleared and its cgroup gone",
        || async {
            let limits = gpus
                .state()
                .memory_limits
                .get(&gpu.uuid)
                .cloned()
                .unwrap_or_default();
            Ok((!limits.contains_key(&key(&cg_a)) && !cg_a.exists()).then_some(()))
        },
    )
    .await?;
    let limits = gpus
        .state()
        .memory_limits
        .get(&gpu.uuid)
        .cloned()
        .unwrap_or_default();
    assert_eq!(limits[&key(&cg_b)].hard_limit, 12 * GIB);
    pods.delete("tgi-b", &DeleteParams::default()).await?;
    b.wait(STEP, "every limit cleared", || async {
        Ok(gpus.state().memory_limits.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
