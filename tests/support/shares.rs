//! The consumable-share scenarios of examples/shares/ on a box: three GPU nodes whose
//! plugins publish shares, the manifests applied in order, and what each pod's claim was
//! allocated (device, `consumedCapacity`, share id) read back from the API server.
//!
//! Nodes, all on fake r615 drivers that limit GPU memory per pod cgroup, so every share
//! is enforced (no `--allow-scheduling-only-shares`): `node-s` one L40S
//! (`--consumable-shares=memory`, dmem backend; the TGI servers), `node-h` a dgx-h100
//! without MIG (`memory`, dmem; Ollama and the profiles), `node-g` one L40S with a share
//! count of 4 (misc backend; `nvidia.com/gpu.shared` pods). Each pod's limits as the fake
//! GPU recorded them come from [`super::share_limits`]. Used by tests/e2e_shares.rs and
//! `make demo`.

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
use super::share_limits::{
    MemoryCondition, RecordedLimit, binary_bytes, compute_limit, recorded_limits,
    register_dmem_regions,
};

/// `(node, topology, --consumable-shares, dmem regions registered)` of the share nodes.
pub const SHARE_NODES: [(&str, &str, &str, bool); 3] = [
    ("node-s", "l40s-r615", "memory", true),
    ("node-h", "dgx-h100-r615", "memory", true),
    ("node-g", "l40s-r615-misc", "4", false),
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
    /// One plugin per node, in [`SHARE_NODES`] order, then nodes added later.
    pub plugins: Vec<Plugin>,
    /// Node names in `plugins` order.
    names: Vec<String>,
}

impl ShareNodes {
    /// Starts a plugin with its `--consumable-shares` mode on every share node of `b`,
    /// after registering the GPUs of dmem nodes with the fake kernel.
    pub fn start(b: &TestBox) -> anyhow::Result<Self> {
        let mut nodes = Self {
            gpus: BTreeMap::new(),
            plugins: Vec::new(),
            names: Vec::new(),
        };
        for (node, topology, mode, dmem) in SHARE_NODES {
            nodes.add(b, node, topology, mode, dmem)?;
        }
        Ok(nodes)
    }

    /// Starts the plugin of one more share node: fake GPUs of `topology`, flag
    /// `--consumable-shares=<mode>`, the GPUs registered with dmem when `dmem`. Limits are
    /// required (no `--allow-scheduling-only-shares`): a share the node cannot enforce
    /// fails at prepare.
    pub fn add(
        &mut self,
        b: &TestBox,
        node: &str,
        topology: &str,
        mode: &str,
        dmem: bool,
    ) -> anyhow::Result<()> {
        let fake = FakeGpus::new(topology)?;
        if dmem {
            register_dmem_regions(b, node, &fake)?;
        }
        self.plugins.push(Plugin::start_with(
            b,
            node,
            &fake,
            "",
            &[format!("--consumable-shares={mode}")],
        )?);
        self.gpus.insert(node.to_owned(), fake);
        self.names.push(node.to_owned());
        Ok(())
    }

    /// The last log lines of every plugin, each under a header.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for (node, p) in self.names.iter().zip(&self.plugins) {
            let _ = writeln!(out, "--- plugin {node} ---\n{}", p.log_tail(lines));
        }
        out
    }

    /// Fills each allocation's [`ShareAllocation::limits`] from its node's fake GPUs.
    pub fn attach_limits(&self, allocations: &mut [ShareAllocation]) {
        for a in allocations {
            if let Some(gpus) = self.gpus.get(&a.node) {
                a.limits = recorded_limits(&gpus.state(), &a.pod_uid);
            }
        }
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
    /// UID of the pod (from the claim's `reservedFor`; empty while unreserved).
    pub pod_uid: String,
    /// `pool/device` of the allocation result.
    pub device: String,
    /// `consumedCapacity` as the claim status has it (name -> quantity string).
    pub consumed: BTreeMap<String, String>,
    /// The scheduler's share id of the allocation.
    pub share_id: Option<String>,
    /// GPUs the container sees (`NVIDIA_VISIBLE_DEVICES`), once prepared.
    pub visible: Option<String>,
    /// The claim's `GPUMemoryLimitEnforced` condition of the device, once written.
    pub memory_condition: Option<MemoryCondition>,
    /// The limits the node's fake GPUs hold for the pod's cgroup
    /// ([`ShareNodes::attach_limits`]; empty for a whole GPU, an unprepared or a
    /// scheduling-only share).
    pub limits: Vec<RecordedLimit>,
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
            let condition = status
                .devices
                .iter()
                .flatten()
                .flat_map(|d| d.conditions.iter().flatten())
                .find(|c| c.type_ == super::share_limits::MEMORY_CONDITION)
                .map(|c| MemoryCondition {
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                });
            for holder in status.reserved_for.unwrap_or_default() {
                let Some(a) = out.get_mut(&format!("{ns}/{}", holder.name)) else {
                    continue;
                };
                a.claim = claim.metadata.name.clone().unwrap_or_default();
                a.claim_uid = claim.metadata.uid.clone().unwrap_or_default();
                a.pod_uid = holder.uid.clone();
                a.memory_condition = condition.clone();
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
/// Needs the nodes of [`ShareNodes`]; each pod's limits are read from them.
pub async fn run_share_scenarios(
    b: &TestBox,
    nodes: &ShareNodes,
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
    let mut allocations = share_allocations(b, &SHARE_NAMESPACES).await?;
    nodes.attach_limits(&mut allocations);
    Ok(ShareScenarios {
        allocations,
        third_tgi,
    })
}

/// A byte quantity in the largest binary unit that divides it (`19327352832` -> `18Gi`).
fn binary(q: &str) -> String {
    q.parse::<u64>().map_or_else(|_| q.to_owned(), binary_bytes)
}

/// A table of each pod's share: node, device, consumed memory, compute and shares as the
/// scheduler allocated them, then what the node enforces: the hard / soft memory limit
/// the fake GPU recorded for the pod's cgroup (`-` for none: a whole GPU) and the compute
/// column ([`compute_limit`]).
pub fn render_shares(s: &ShareScenarios) -> String {
    let mut out = String::new();
    let line = |out: &mut String, cols: [&str; 10]| {
        let _ = writeln!(
            out,
            "{:<42} {:<8} {:<7} {:<13} {:>9} {:>7} {:>6} {:>9} {:>9}  {}",
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            cols[5],
            cols[6],
            cols[7],
            cols[8],
            cols[9]
        );
    };
    line(
        &mut out,
        [
            "pod",
            "phase",
            "node",
            "device",
            "memory",
            "compute",
            "shares",
            "hard",
            "soft",
            "compute limit",
        ],
    );
    for a in &s.allocations {
        let get = |k: &str| a.consumed.get(k).map_or_else(|| "-".into(), |q| binary(q));
        let (hard, soft) = match a.limits.as_slice() {
            [] => ("-".to_owned(), "-".to_owned()),
            limits => (
                limits
                    .iter()
                    .map(|l| binary_bytes(l.hard))
                    .collect::<Vec<_>>()
                    .join(","),
                limits
                    .iter()
                    .map(|l| binary_bytes(l.soft))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        };
        let compute = compute_limit(a.consumed.get("compute").map(String::as_str));
        line(
            &mut out,
            [
                &a.pod,
                &a.phase,
                &a.node,
                &a.device,
                &get("memory"),
                &get("compute"),
                &get("shares"),
                &hard,
                &soft,
                &compute,
            ],
        );
    }
    let _ = writeln!(
        out,
        "tgi-shares/tgi-qwen stays Pending: {}: {}",
        s.third_tgi.0, s.third_tgi.1
    );
    out
}
