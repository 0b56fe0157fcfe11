//! Applies the manifests in deploy/ and examples/ to a box and reports what each pod got.
//!
//! Owns: generic server-side apply of multi-document YAML (kinds resolved through API
//! discovery, as `kubectl apply --server-side` does) and the per-pod report (devices from
//! the node agent's container results, compute policy from the fake GPUs' state). Used by
//! the examples end-to-end test and by `make demo`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};
use serde_json::Value;

use super::cluster::TestBox;
use super::driver::FakeGpus;

/// Field manager of everything applied here.
const MANAGER: &str = "gpu-dra-examples";

/// Server-side applies every document of `file`; returns `(kind, namespace/name)` of each.
pub async fn apply_file(
    client: &kube::Client,
    file: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value.clone())?;
        let types = obj
            .types
            .clone()
            .context("object without apiVersion/kind")?;
        let gvk = kube::api::GroupVersionKind::try_from(&types)?;
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .with_context(|| format!("the API server does not serve {gvk:?}"))?;
        let name = obj.metadata.name.clone().context("object without a name")?;
        let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
        .with_context(|| format!("applying {} {name} from {}", types.kind, file.display()))?;
        let ns = obj.metadata.namespace.unwrap_or_default();
        applied.push((types.kind, format!("{ns}/{name}")));
    }
    Ok(applied)
}

/// The example files, sorted, from `examples/`, without the dynamic MIG ones (their
/// claims need a dynamic MIG node: `super::dynamic_mig` applies them).
pub fn example_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/ readable")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !super::dynamic_mig::is_dynamic_mig_example(p))
        .collect();
    files.sort();
    files
}

/// Namespaces of the examples in examples/.
pub const NAMESPACES: [&str; 5] = ["gpu-single", "mig-demo", "ollama", "profiles", "tgi"];
/// Pods the examples create: gpu-single 1, mig-demo 1, ollama 3, profiles 2, tgi 2.
pub const PODS: usize = 9;

/// Waits until `want` pods in `namespaces` run and have container results.
pub async fn wait_all_running(
    b: &TestBox,
    namespaces: &[String],
    want: usize,
    deadline: std::time::Duration,
) -> anyhow::Result<Vec<PodReport>> {
    b.wait(
        deadline,
        &format!("{want} example pods Running with results"),
        || async {
            let reports = pod_reports(b, namespaces).await?;
            let ready = reports
                .iter()
                .filter(|r| r.phase == "Running" && r.result.is_some())
                .count();
            Ok((reports.len() == want && ready == want).then_some(reports))
        },
    )
    .await
}

/// Applies deploy/deviceclasses.yaml and every example, the TGI scenario first (it wants
/// the L40S node's only GPU, which any other full-GPU claim could otherwise take), and
/// waits for all example pods. Needs nodes `node-a` (dgx-h100) and `node-b` (L40S).
pub async fn run_examples(
    b: &TestBox,
    deadline: std::time::Duration,
) -> anyhow::Result<Vec<PodReport>> {
    let client = b.client().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    apply_file(&client, &root.join("deploy/deviceclasses.yaml")).await?;
    let files = example_files();
    let (tgi, rest): (Vec<_>, Vec<_>) = files.iter().partition(|f| f.ends_with("tgi-mps.yaml"));
    for file in tgi {
        apply_file(&client, file).await?;
    }
    wait_all_running(b, &["tgi".to_string()], 2, deadline).await?;
    for file in rest {
        apply_file(&client, file).await?;
    }
    let namespaces: Vec<String> = NAMESPACES.iter().map(ToString::to_string).collect();
    wait_all_running(b, &namespaces, PODS, deadline).await
}

/// What one running container got.
#[derive(Debug, Clone)]
pub struct PodReport {
    /// `namespace/pod`.
    pub pod: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod phase.
    pub phase: String,
    /// The container result the node agent wrote (CDI ids, env, device nodes, mounts).
    pub result: Option<Value>,
}

impl PodReport {
    /// The value of `key` in the container's environment.
    pub fn env(&self, key: &str) -> Option<String> {
        self.result.as_ref()?["env"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
    }
}

/// Reports of every pod in `namespaces` (first container).
pub async fn pod_reports(b: &TestBox, namespaces: &[String]) -> anyhow::Result<Vec<PodReport>> {
    let client = b.client().await;
    let mut reports = Vec::new();
    for ns in namespaces {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        for pod in pods.list(&ListParams::default()).await?.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let container = pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
                .unwrap_or_default();
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            let result = (!node.is_empty())
                .then(|| b.container_result(&node, ns, &name, &container))
                .flatten();
            reports.push(PodReport {
                pod: format!("{ns}/{name}"),
                node,
                phase,
                result,
            });
        }
    }
    reports.sort_by(|a, b| a.pod.cmp(&b.pod));
    Ok(reports)
}

/// A human-readable table of what each pod got and the policy its GPUs run with.
pub fn render(reports: &[PodReport], gpus: &BTreeMap<String, &FakeGpus>) -> String {
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(out, "pod {} on {} ({})", r.pod, r.node, r.phase);
        let Some(result) = &r.result else {
            let _ = writeln!(out, "    not prepared yet");
            continue;
        };
        let ids: Vec<&str> = result["cdiDevices"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let _ = writeln!(out, "    CDI devices : {}", ids.join(", "));
        let nodes: Vec<&str> = result["deviceNodes"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d["path"].as_str()).collect())
            .unwrap_or_default();
        let _ = writeln!(out, "    device nodes: {}", nodes.join(" "));
        for (k, v) in result["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|kv| kv.split_once('='))
        {
            if k.starts_with("NVIDIA_") || k.starts_with("CUDA_") {
                let _ = writeln!(out, "    env         : {k}={v}");
            }
        }
        for m in result["mounts"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "    mount       : {} -> {}",
                m["source"].as_str().unwrap_or(""),
                m["destination"].as_str().unwrap_or("")
            );
        }
        let Some(fake) = gpus.get(&r.node) else {
            continue;
        };
        let state = fake.state();
        let visible = r.env("NVIDIA_VISIBLE_DEVICES").unwrap_or_default();
        for uuid in visible.split(',').filter(|u| !u.is_empty()) {
            if let Some(gpu) = state.gpus.get(uuid) {
                let _ = writeln!(
                    out,
                    "    GPU {uuid}: compute mode {:?}, time slice {}",
                    gpu.compute_mode,
                    ["Default", "Short", "Medium", "Long"]
                        .get(gpu.timeslice as usize)
                        .copied()
                        .unwrap_or("?")
                );
            }
        }
        if let Some(pipe) = r.env("CUDA_MPS_PIPE_DIRECTORY") {
            let host_pipe = result["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["destination"] == pipe.as_str())
                .and_then(|m| m["source"].as_str())
                .unwrap_or_default()
                .to_owned();
            if let Some(d) = state.mps_daemons.get(&host_pipe) {
                let _ = writeln!(
                    out,
                    "    MPS daemon  : running {}, active thread % {:?}, pinned memory limits {:?}",
                    d.running,
                    d.default_active_thread_percentage,
                    d.default_device_pinned_mem_limits
                );
            }
        }
    }
    out
}
