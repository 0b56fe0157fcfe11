//! The consumable-share scenarios of examples/shares/ on a box: three GPU nodes whose
//! plugins publish shares, the manifests applied in order, and what each pod's claim was
//! allocated (device, `consumedCapacity`, share id) read back from the API server.
//!
//! Nodes: `node-s` one L40S (`--consumable-shares=memory`, the TGI servers), `node-h` a
//! dgx-h100 without MIG (`memory`; Ollama and the profiles), `node-g` one L40S with a share
//! count of 4 (`nvidia.com/gpu.shared` pods). Used by tests/e2e_shares.rs and `make demo`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, ListParams};

use super::cluster::TestBox;
use super::driver::{FakeGpus, Plugin};
use super::examples::{PodReport, apply_file, pod_reports};

/// `(node, topology, --consumable-shares)` of the share nodes.
pub const SHARE_NODES: [(&str, &str, &str); 3] = [
    ("node-s", "l40s-single", "memory"),
    ("node-h", "dgx-h100", "memory"),
    ("node-g", "l40s-single", "4"),
];

/// Namespaces of examples/shares/.
pub const SHARE_NAMESPACES: [&str; 4] = [
    "tgi-shares",
    "ollama-shares",
    "profile-shares",
    "gpu-shared",
];

/// The fake GPUs and plugins of the share nodes.
pub struct ShareNodes {
    /// Node name -> its fake GPUs.
    pub gpus: BTreeMap<String, FakeGpus>,
    /// One plugin per node, in [`SHARE_NODES`] order.
    pub plugins: Vec<Plugin>,
}

impl ShareNodes {
    /// Starts a plugin with its `--consumable-shares` mode on every share node of `b`.
    pub fn start(b: &TestBox) -> anyhow::Result<Self> {
        let mut gpus = BTreeMap::new();
        let mut plugins = Vec::new();
        for (node, topology, mode) in SHARE_NODES {
            let fake = FakeGpus::new(topology)?;
            plugins.push(Plugin::start_with(
                b,
                node,
                &fake,
                "",
                // The fake drivers of these topologies (570) have no per-cgroup memory
                // limits, so the shares run scheduling-only here; enforcement on an r615
                // driver is tests/memory_limits_e2e.rs.
                &[
                    format!("--consumable-shares={mode}"),
                    "--allow-scheduling-only-shares".to_owned(),
                ],
            )?);
            gpus.insert(node.to_owned(), fake);
        }
        Ok(Self { gpus, plugins })
    }

    /// The last log lines of every plugin, each under a header.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for ((node, ..), p) in SHARE_NODES.iter().zip(&self.plugins) {
            let _ = writeln!(out, "--- plugin {node} ---\n{}", p.log_tail(lines));
        }
        out
    }
}

/// What one pod's claim was allocated.
#[derive(Debug, Clone, Default)]
pub struct ShareAllocation {
    /// `namespace/pod`.
    pub pod: String,
    /// Node the pod runs on (empty while unscheduled).
    pub node: String,
    /// Pod phase.
    pub phase: String,
    /// The claim reserved for the pod.
    pub claim: String,
    /// UID of that claim.
    pub claim_uid: String,
    /// `pool/device` of the allocation result.
    pub device: String,
    /// `consumedCapacity` as the claim status has it (name -> quantity string).
    pub consumed: BTreeMap<String, String>,
    /// The scheduler's share id of the allocation.
    pub share_id: Option<String>,
    /// GPUs the container sees (`NVIDIA_VISIBLE_DEVICES`), once prepared.
    pub visible: Option<String>,
}

/// Allocations of every pod in `namespaces`, by `namespace/pod`, sorted.
pub async fn share_allocations(
    b: &TestBox,
    namespaces: &[&str],
) -> anyhow::Result<Vec<ShareAllocation>> {
    let client = b.client().await;
    let names: Vec<String> = namespaces.iter().map(ToString::to_string).collect();
    let reports: BTreeMap<String, PodReport> = pod_reports(b, &names)
        .await?
        .into_iter()
        .map(|r| (r.pod.clone(), r))
        .collect();
    let mut out: BTreeMap<String, ShareAllocation> = reports
        .values()
        .map(|r| {
            (
                r.pod.clone(),
                ShareAllocation {
                    pod: r.pod.clone(),
                    node: r.node.clone(),
                    phase: r.phase.clone(),
                    visible: r.env("NVIDIA_VISIBLE_DEVICES"),
                    ..Default::default()
                },
            )
        })
        .collect();
    for ns in namespaces {
        let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), ns);
        for claim in claims.list(&ListParams::default()).await?.items {
            let status = claim.status.clone().unwrap_or_default();
            let result = status
                .allocation
                .and_then(|a| a.devices)
                .and_then(|d| d.results)
                .and_then(|r| r.into_iter().next());
            for holder in status.reserved_for.unwrap_or_default() {
                let Some(a) = out.get_mut(&format!("{ns}/{}", holder.name)) else {
                    continue;
                };
                a.claim = claim.metadata.name.clone().unwrap_or_default();
                a.claim_uid = claim.metadata.uid.clone().unwrap_or_default();
                if let Some(r) = &result {
                    a.device = format!("{}/{}", r.pool, r.device);
                    a.share_id = r.share_id.clone();
                    a.consumed = r
                        .consumed_capacity
                        .iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.0.clone()))
                        .collect();
                }
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Waits until `want` pods in `ns` whose names start with `prefix` run with container
/// results.
pub async fn wait_running(
    b: &TestBox,
    ns: &str,
    prefix: &str,
    want: usize,
    deadline: Duration,
) -> anyhow::Result<()> {
    b.wait(
        deadline,
        &format!("{want} pods {ns}/{prefix}* Running with results"),
        || async {
            let reports = pod_reports(b, &[ns.to_owned()]).await?;
            let ready = reports
                .iter()
                .filter(|r| r.pod.starts_with(&format!("{ns}/{prefix}")))
                .filter(|r| r.phase == "Running" && r.result.is_some())
                .count();
            Ok((ready == want).then_some(()))
        },
    )
    .await
}

/// The scheduler's verdict on a pod it cannot place: the `PodScheduled=False` condition's
/// `(reason, message)`, waited for.
pub async fn wait_unschedulable(
    b: &TestBox,
    ns: &str,
    prefix: &str,
    deadline: Duration,
) -> anyhow::Result<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(b.client().await, ns);
    b.wait(
        deadline,
        &format!("{ns}/{prefix}* unschedulable"),
        || async {
            for pod in pods.list(&ListParams::default()).await?.items {
                if !pod
                    .metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(prefix))
                {
                    continue;
                }
                let conditions = pod.status.and_then(|s| s.conditions).unwrap_or_default();
                if let Some(c) = conditions
                    .into_iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                {
                    return Ok(Some((
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default(),
                    )));
                }
            }
            Ok(None)
        },
    )
    .await
}

/// Outcome of [`run_share_scenarios`].
pub struct ShareScenarios {
    /// Every pod of examples/shares/ with its allocation.
    pub allocations: Vec<ShareAllocation>,
    /// The third TGI server's `PodScheduled=False` `(reason, message)`.
    pub third_tgi: (String, String),
}

/// Applies deploy/deviceclasses.yaml and examples/shares/ in order, each step waiting for
/// its pods (so that first-fit packing is deterministic): the two TGI servers, the third
/// (left Pending), the Ollama replicas, the profiles, the `nvidia.com/gpu.shared` pods.
/// Needs the nodes of [`ShareNodes`].
pub async fn run_share_scenarios(
    b: &TestBox,
    deadline: Duration,
) -> anyhow::Result<ShareScenarios> {
    let client = b.client().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("examples/shares");
    apply_file(&client, &root.join("deploy/deviceclasses.yaml")).await?;
    let step = |file: &str| dir.join(file);
    apply_file(&client, &step("tgi-shares.yaml")).await?;
    wait_running(b, "tgi-shares", "tgi-", 2, deadline)
        .await
        .context("the two TGI servers")?;
    apply_file(&client, &step("tgi-shares-third.yaml")).await?;
    let third_tgi = wait_unschedulable(b, "tgi-shares", "tgi-qwen", deadline).await?;
    apply_file(&client, &step("ollama-shares.yaml")).await?;
    wait_running(b, "ollama-shares", "ollama", 3, deadline)
        .await
        .context("the Ollama replicas")?;
    apply_file(&client, &step("profile-shares.yaml")).await?;
    wait_running(b, "profile-shares", "", 3, deadline)
        .await
        .context("the profile pods")?;
    apply_file(&client, &step("gpu-shared.yaml")).await?;
    wait_running(b, "gpu-shared", "legacy-shared", 4, deadline)
        .await
        .context("the nvidia.com/gpu.shared pods")?;
    let allocations = share_allocations(b, &SHARE_NAMESPACES).await?;
    Ok(ShareScenarios {
        allocations,
        third_tgi,
    })
}

/// A byte quantity in the largest binary unit that divides it (`19327352832` -> `18Gi`).
fn binary(q: &str) -> String {
    let Ok(v) = q.parse::<u64>() else {
        return q.to_owned();
    };
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20)] {
        if v >= size && v % size == 0 {
            return format!("{}{unit}", v / size);
        }
    }
    q.to_owned()
}

/// A table of each pod's share: node, device, consumed memory and compute, share id.
pub fn render_shares(s: &ShareScenarios) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<42} {:<8} {:<8} {:<16} {:>12} {:>8} {:>7}",
        "pod", "phase", "node", "device", "memory", "compute", "shares"
    );
    for a in &s.allocations {
        let get = |k: &str| a.consumed.get(k).map_or_else(|| "-".into(), |q| binary(q));
        let _ = writeln!(
            out,
            "{:<42} {:<8} {:<8} {:<16} {:>12} {:>8} {:>7}",
            a.pod,
            a.phase,
            a.node,
            a.device,
            get("memory"),
            get("compute"),
            get("shares")
        );
    }
    let _ = writeln!(
        out,
        "tgi-shares/tgi-qwen stays Pending: {}: {}",
        s.third_tgi.0, s.third_tgi.1
    );
    out
}
