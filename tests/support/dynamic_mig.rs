//! The dynamic MIG example (examples/mig-dynamic.yaml) on a box node whose plugin manages
//! MIG partitions at prepare (`--dynamic-mig`, default `auto`), and the report of what
//! each of its pods got: the MIG UUID from the container's environment (the CDI spec's
//! `NVIDIA_VISIBLE_DEVICES`) and the GPU instance the fake GPU holds behind it.
//!
//! Owns: the dynamic node (`node-d`, a dgx-h100 whose GPU 0 is in MIG mode without
//! instances, topology `dgx-h100-dynamic-mig`), applying the example there and waiting
//! for its pods, and the report. Used by the examples end-to-end test and by `make demo`.
//! The example is kept out of [`super::examples::run_examples`] (static nodes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cluster::TestBox;
use super::driver::{FakeGpus, Plugin};
use super::examples::{PodReport, apply_file, render, wait_all_running};

/// The dynamic MIG node of the box.
pub const NODE: &str = "node-d";
/// Fake topology of the node.
pub const TOPOLOGY: &str = "dgx-h100-dynamic-mig";
/// Namespace of the example.
pub const NAMESPACE: &str = "mig-dynamic";
/// Pods of the example (a 1g.10gb and a 3g.40gb claim).
pub const PODS: usize = 2;

/// The example file.
pub fn example_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mig-dynamic.yaml")
}

/// Whether `file` is a dynamic MIG example (applied on the dynamic node only).
pub fn is_dynamic_mig_example(file: &Path) -> bool {
    file.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("mig-dynamic"))
}

/// The dynamic MIG node: its fake GPUs and its plugin.
pub struct DynamicMigNode {
    /// The fake GPUs (state read back for the report).
    pub gpus: FakeGpus,
    /// The plugin process (stops when dropped).
    pub plugin: Plugin,
}

impl DynamicMigNode {
    /// Starts the plugin of [`NODE`] (which `b` must have) on a fresh [`TOPOLOGY`].
    pub fn start(b: &TestBox) -> anyhow::Result<Self> {
        let gpus = FakeGpus::new(TOPOLOGY)?;
        let plugin = Plugin::start(b, NODE, &gpus)?;
        Ok(Self { gpus, plugin })
    }
}

/// A GPU instance of the fake GPUs: `(GPU UUID, GI id, GI profile id, placement start,
/// size, MIG UUIDs of its compute instances)`.
pub type Instance = (String, u32, u32, u32, u32, Vec<String>);

/// Every GPU instance the fake GPUs hold, by GPU UUID and GI id.
pub fn instances(gpus: &FakeGpus) -> Vec<Instance> {
    let state = gpus.state();
    let mut out = Vec::new();
    for (uuid, gpu) in &state.gpus {
        for gi in gpu.gpu_instances.values() {
            out.push((
                uuid.clone(),
                gi.id,
                gi.profile_id,
                gi.placement_start,
                gi.placement_size,
                gi.compute_instances
                    .values()
                    .map(|ci| ci.uuid.clone())
                    .collect(),
            ));
        }
    }
    out.sort();
    out
}

/// Applies deploy/deviceclasses.yaml and the example, and waits until its pods run with
/// container results.
pub async fn run_dynamic_mig_example(
    b: &TestBox,
    deadline: Duration,
) -> anyhow::Result<Vec<PodReport>> {
    let client = b.client().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    apply_file(&client, &root.join("deploy/deviceclasses.yaml")).await?;
    apply_file(&client, &example_file()).await?;
    wait_all_running(b, &[NAMESPACE.to_string()], PODS, deadline).await
}

/// The examples report of `reports` plus, per pod, the GPU instance behind each MIG UUID
/// it sees (profile id, memory slices) as the fake GPU recorded it.
pub fn render_dynamic_mig(reports: &[PodReport], node: &DynamicMigNode) -> String {
    let gpus = BTreeMap::from([(NODE.to_string(), &node.gpus)]);
    let mut out = render(reports, &gpus);
    let held = instances(&node.gpus);
    let _ = writeln!(out, "dynamic MIG instances created for the pods on {NODE}:");
    for r in reports {
        let visible = r.env("NVIDIA_VISIBLE_DEVICES").unwrap_or_default();
        for mig in visible.split(',').filter(|u| u.starts_with("MIG-")) {
            match held.iter().find(|i| i.5.iter().any(|u| u == mig)) {
                Some((gpu, gi, profile, start, size, _)) => {
                    let _ = writeln!(
                        out,
                        "    {}: {mig} = GPU {gpu} instance {gi} (profile id {profile}, memory slices {start}..{})",
                        r.pod,
                        start + size
                    );
                }
                None => {
                    let _ = writeln!(out, "    {}: {mig} has no GPU instance", r.pod);
                }
            }
        }
    }
    out
}
