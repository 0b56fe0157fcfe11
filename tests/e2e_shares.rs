//! Consumable GPU shares end to end on the box (KEP-5075 consumable capacity): plugins
//! publish shareable GPUs of fake r615 drivers, the real scheduler packs claims by
//! `memory` and `compute`, the allocations (`consumedCapacity`, same device) are read
//! back, and so is the hard memory limit each pod's cgroup got, as the fake GPU recorded
//! it. The seed scenarios of examples/shares/ first (`make demo` runs the same), then bad
//! input: amounts above the GPU, off the step, compute above 100, a share carrying a sharing
//! strategy (refused: shares run under the GPU's MPS daemon), and a share on a node whose driver cannot limit
//! memory. Last, every pod goes and every limit must go with it.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

use support::TestBox;
use support::examples::apply_file;
use support::share_limits::limit_count;
use support::shares::{
    SHARE_NAMESPACES, ShareAllocation, ShareNodes, render_shares, run_share_scenarios,
    share_allocations, wait_running, wait_unschedulable,
};

const STEP: Duration = Duration::from_secs(120);
const GI: u64 = 1 << 30;
const MI: u64 = 1 << 20;
/// The fake L40S's memory (tests/fake-nvml presets) and the H100's.
const L40S_MIB: u64 = 46_068;
const H100_MIB: u64 = 81_559;

fn bytes(a: &ShareAllocation, name: &str) -> u64 {
    let q = a
        .consumed
        .get(name)
        .unwrap_or_else(|| panic!("{}: no consumed {name}: {a:?}", a.pod));
    gpu_dra::config::quantity::parse_quantity(q)
        .unwrap_or_else(|e| panic!("{}: {name} = {q}: {e}", a.pod)) as u64
}

fn pods<'a>(all: &'a [ShareAllocation], prefix: &str) -> Vec<&'a ShareAllocation> {
    all.iter().filter(|a| a.pod.starts_with(prefix)).collect()
}

/// The one hard limit the pod's cgroup holds, asserted equal to its soft limit (the
/// plugin sets both to the share) and on the GPU the container sees.
fn hard_limit(a: &ShareAllocation) -> u64 {
    let [limit] = a.limits.as_slice() else {
        panic!("{}: one limit on its pod cgroup: {a:#?}", a.pod);
    };
    assert_eq!(limit.soft, limit.hard, "{a:?}");
    assert_eq!(Some(&limit.gpu_uuid), a.visible.as_ref(), "{a:?}");
    let condition = a
        .memory_condition
        .as_ref()
        .expect("device condition written");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "HardLimitSet"),
        "{a:?}"
    );
    limit.hard
}

/// The `dmem.max` file of the cgroup the pod's limit is on.
fn dmem_max(a: &ShareAllocation) -> String {
    std::fs::read_to_string(std::path::Path::new(&a.limits[0].cgroup).join("dmem.max"))
        .unwrap_or_else(|e| panic!("{}: dmem.max: {e}", a.pod))
}

/// The claims of the pods in `ns` whose names start with `prefix`.
async fn claims_of_pods(b: &TestBox, ns: &str, prefix: &str) -> Vec<ResourceClaim> {
    let client = b.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let claims: Api<ResourceClaim> = Api::namespaced(client, ns);
    let mut out = Vec::new();
    for pod in pods.list(&ListParams::default()).await.unwrap().items {
        if !pod
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .starts_with(prefix)
        {
            continue;
        }
        // A claim named in the pod spec, or one generated from a template.
        let named = pod
            .spec
            .and_then(|s| s.resource_claims)
            .into_iter()
            .flatten()
            .filter_map(|c| c.resource_claim_name);
        let generated = pod
            .status
            .and_then(|s| s.resource_claim_statuses)
            .into_iter()
            .flatten()
            .filter_map(|s| s.resource_claim_name);
        for name in named.chain(generated) {
            out.push(claims.get(&name).await.unwrap());
        }
    }
    out
}

/// Asserts the claims of `prefix` pods in `ns` exist and are not allocated.
async fn assert_unallocated(b: &TestBox, ns: &str, prefix: &str) {
    let claims = claims_of_pods(b, ns, prefix).await;
    assert!(!claims.is_empty(), "{ns}/{prefix}: a claim exists");
    for c in claims {
        let allocation = c.status.and_then(|s| s.allocation);
        assert!(
            allocation.is_none(),
            "{ns}/{prefix}: unallocated: {allocation:?}"
        );
    }
}

fn one_device(allocs: &[&ShareAllocation]) -> String {
    let devices: BTreeSet<&str> = allocs.iter().map(|a| a.device.as_str()).collect();
    assert_eq!(devices.len(), 1, "one GPU for all: {allocs:#?}");
    devices.first().map(ToString::to_string).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_scenarios_and_bad_input() {
    // node-o's plugin starts later (bad input): an old driver, limits required.
    let b = TestBox::start(&["node-s", "node-h", "node-g", "node-o"]).unwrap();
    let mut nodes = ShareNodes::start(&b).unwrap();
    let s = run_share_scenarios(&b, &nodes, STEP)
        .await
        .unwrap_or_else(|err| panic!("{err:#}\n{}", nodes.log_tail(30)));
    eprintln!("{}", render_shares(&s));
    let all = &s.allocations;

    // TGI: two Deployments, two claims of 18Gi / 40% on the same L40S, distinct shares.
    let tgi: Vec<_> = pods(all, "tgi-shares/tgi-")
        .into_iter()
        .filter(|a| a.phase == "Running")
        .collect();
    assert_eq!(tgi.len(), 2, "{all:#?}");
    assert_eq!(one_device(&tgi), "node-s/gpu-0");
    for a in &tgi {
        assert_eq!(bytes(a, "memory"), 18 * GI, "{a:?}");
        assert_eq!(bytes(a, "compute"), 40, "{a:?}");
        assert!(a.share_id.is_some(), "{a:?}");
        assert!(a.visible.as_deref().is_some_and(|v| v.starts_with("GPU-")));
        // Enforced: the GPU holds 18Gi for the pod's cgroup, and (dmem backend) the
        // kernel's dmem.max line of the GPU's region says so.
        assert_eq!(hard_limit(a), 18 * GI, "{a:?}");
        assert!(dmem_max(a).contains(&format!(" {}", 18 * GI)), "{a:?}");
        // Compute: the claim's MPS v3 namespace on the GPU's share daemon holds 40%.
        assert_eq!(a.compute_limit, Some(40.0), "{a:?}");
    }
    assert_ne!(tgi[0].share_id, tgi[1].share_id);
    assert_ne!(tgi[0].claim, tgi[1].claim);
    assert_eq!(tgi[0].visible, tgi[1].visible, "same physical GPU");
    // The third does not fit (120% compute): the scheduler says so and leaves it Pending.
    let (reason, message) = &s.third_tgi;
    assert_eq!(reason, "Unschedulable", "{message}");
    assert!(message.contains("claim"), "{message}");
    let third = pods(all, "tgi-shares/tgi-qwen");
    assert_eq!(third.len(), 1);
    assert_eq!(
        (third[0].phase.as_str(), third[0].node.as_str()),
        ("Pending", "")
    );
    assert!(third[0].limits.is_empty());
    assert_unallocated(&b, "tgi-shares", "tgi-qwen").await;

    // Ollama: three replicas, each its own claim with a 20Gi budget, packed on one H100.
    let ollama = pods(all, "ollama-shares/ollama");
    assert_eq!(ollama.len(), 3);
    assert!(one_device(&ollama).starts_with("node-h/gpu-"));
    for a in &ollama {
        assert_eq!((bytes(a, "memory"), bytes(a, "compute")), (20 * GI, 30));
        assert_eq!(hard_limit(a), 20 * GI, "{a:?}");
        assert_eq!(a.compute_limit, Some(30.0), "{a:?}");
    }

    // Profiles as share sizes: dev 1/8, prod 1/4, training the whole GPU (no amounts).
    let profile = |p: &str| pods(all, &format!("profile-shares/{p}"))[0];
    let (dev, prod, trainer) = (profile("notebook"), profile("api"), profile("trainer"));
    assert_eq!((bytes(dev, "memory"), bytes(dev, "compute")), (10 * GI, 12));
    assert_eq!(
        (bytes(prod, "memory"), bytes(prod, "compute")),
        (20 * GI, 25)
    );
    assert_eq!(
        (bytes(trainer, "memory"), bytes(trainer, "compute")),
        (H100_MIB * MI, 100),
        "a claim without amounts keeps the whole GPU"
    );
    assert_eq!(hard_limit(dev), 10 * GI);
    assert_eq!(hard_limit(prod), 20 * GI);
    assert_eq!(
        (dev.compute_limit, prod.compute_limit),
        (Some(12.0), Some(25.0))
    );
    assert!(
        trainer.limits.is_empty() && trainer.compute_limit.is_none(),
        "no limit on a whole GPU: {trainer:?}"
    );
    let others = all
        .iter()
        .filter(|a| a.pod != trainer.pod && a.device == trainer.device)
        .count();
    assert_eq!(others, 0, "nothing shares the training GPU");

    // nvidia.com/gpu.shared: 1 pods, unchanged, each get one of the node's 4 shares.
    let shared = pods(all, "gpu-shared/legacy-shared");
    assert_eq!(shared.len(), 4);
    assert_eq!(one_device(&shared), "node-g/gpu-0");
    for a in &shared {
        assert_eq!(
            (bytes(a, "memory"), bytes(a, "compute"), bytes(a, "shares")),
            (L40S_MIB / 4 * MI, 25, 1),
            "{a:?}"
        );
        // misc backend: the driver holds the limit; the kernel's dmem files stay empty.
        assert_eq!(hard_limit(a), L40S_MIB / 4 * MI, "{a:?}");
        assert_eq!(dmem_max(a), "", "{a:?}");
        assert_eq!(a.compute_limit, Some(25.0), "{a:?}");
    }

    bad_input(&b, &mut nodes).await;
    limits_go_with_the_pods(&b, &nodes).await;
}

/// Every namespace goes: each pod's limit is cleared at unprepare and its cgroup removed;
/// no GPU of any node holds a limit afterwards.
async fn limits_go_with_the_pods(b: &TestBox, nodes: &ShareNodes) {
    let client = b.client().await;
    let mut namespaces: Vec<String> = SHARE_NAMESPACES.iter().map(ToString::to_string).collect();
    let all: Api<Namespace> = Api::all(client.clone());
    for ns in all.list(&ListParams::default()).await.unwrap().items {
        let name = ns.metadata.name.unwrap_or_default();
        if name.starts_with("shares-bad") {
            namespaces.push(name);
        }
    }
    let names: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    let mut before = share_allocations(b, &names).await.unwrap();
    nodes.attach_limits(&mut before);
    let cgroups: Vec<String> = before
        .iter()
        .flat_map(|a| a.limits.iter().map(|l| l.cgroup.clone()))
        .collect();
    let held: usize = nodes.gpus.values().map(|g| limit_count(&g.state())).sum();
    assert_eq!(held, cgroups.len(), "every limit belongs to a running pod");
    assert!(held >= 11, "{held} limits before the pods go");
    for ns in &namespaces {
        all.delete(ns, &DeleteParams::default()).await.unwrap();
    }
    b.wait(
        STEP * 2,
        "every limit cleared and every pod cgroup gone",
        || async {
            let held: usize = nodes.gpus.values().map(|g| limit_count(&g.state())).sum();
            let left = cgroups
                .iter()
                .filter(|c| std::path::Path::new(c).exists())
                .count();
            Ok((held == 0 && left == 0).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));
}

/// A pod using a claim of its own with `capacity` requests (and optional `config`).
fn claim_and_pod(
    ns: &str,
    name: &str,
    requests: serde_json::Value,
    extra: serde_json::Value,
) -> String {
    let mut exactly = json!({
        "deviceClassName": "gpu.gpu-dra.dev",
        "selectors": [{"cel": {"expression": "device.allowMultipleAllocations"}}],
    });
    if requests.as_object().is_some_and(|r| !r.is_empty()) {
        exactly["capacity"] = json!({"requests": requests});
    }
    if let Some(sel) = extra.get("selector") {
        exactly["selectors"]
            .as_array_mut()
            .expect("array")
            .push(json!({"cel": {"expression": sel}}));
    }
    let mut claim = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}},
    });
    if let Some(sharing) = extra.get("sharing") {
        claim["spec"]["devices"]["config"] = json!([{
            "requests": ["gpu"],
            "opaque": {"driver": "gpu.gpu-dra.dev", "parameters": {
                "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                "sharing": sharing}},
        }]);
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "containers": [{"name": "c", "image": "busybox",
                "resources": {"claims": [{"name": "gpu"}]}}],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
        },
    });
    let docs = [claim, pod]
        .iter()
        .map(|d| serde_yaml::to_string(d).expect("yaml"))
        .collect::<Vec<_>>();
    docs.join("---\n")
}

async fn apply_docs(b: &TestBox, yaml: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), yaml).expect("write manifest");
    apply_file(&b.client().await, file.path())
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{yaml}"));
}

async fn bad_input(b: &TestBox, nodes: &mut ShareNodes) {
    let ns = b.create_namespace("shares-bad").await;

    // Above every GPU's memory, and compute above 100: the API server accepts the claims
    // (it does not know the devices); the scheduler finds no device and says so.
    for (name, requests) in [
        (
            "too-much-memory",
            json!({"memory": "100Gi", "compute": "10"}),
        ),
        ("compute-150", json!({"memory": "1Gi", "compute": "150"})),
    ] {
        apply_docs(b, &claim_and_pod(&ns, name, requests, json!({}))).await;
        let (reason, message) = wait_unschedulable(b, &ns, name, STEP).await.unwrap();
        eprintln!("{name}: {reason}: {message}");
        assert_eq!(reason, "Unschedulable", "{name}: {message}");
        assert!(message.contains("claim"), "{name}: {message}");
        assert_unallocated(b, &ns, name).await;
    }

    // Off the 1Mi step: the scheduler rounds the amount up to the next step.
    apply_docs(
        b,
        &claim_and_pod(
            &ns,
            "off-step",
            json!({"memory": (10 * GI + 1).to_string(), "compute": "5"}),
            json!({}),
        ),
    )
    .await;
    wait_running(b, &ns, "off-step", 1, STEP)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));
    let mut allocs = share_allocations(b, &[ns.as_str()]).await.unwrap();
    nodes.attach_limits(&mut allocs);
    let off = pods(&allocs, &format!("{ns}/off-step"))[0];
    assert_eq!(bytes(off, "memory"), 10 * GI + MI, "{off:?}");
    assert_eq!(
        hard_limit(off),
        10 * GI + MI,
        "the limit is the rounded amount"
    );

    // A share carrying a sharing strategy (a time slice): on an MPS v3 node every share of
    // a GPU runs under the GPU's MPS daemon, so the plugin refuses it at prepare naming the
    // GPU and the field; the GPU's other shares keep running and its time slice is kept.
    let h = nodes.gpus["node-h"].state();
    let mut free: Vec<&String> = h.gpus.keys().collect();
    free.sort();
    let used: BTreeSet<String> = share_allocations(b, &["ollama-shares", "profile-shares"])
        .await
        .unwrap()
        .into_iter()
        .filter_map(|a| a.visible)
        .collect();
    let target = free
        .into_iter()
        .rev()
        .find(|u| !used.contains(*u))
        .expect("a free H100")
        .clone();
    let on_target = format!("device.attributes['gpu.gpu-dra.dev'].uuid == '{target}'");
    apply_docs(
        b,
        &claim_and_pod(
            &ns,
            "plain-share",
            json!({"memory": "4Gi", "compute": "10"}),
            json!({"selector": on_target}),
        ),
    )
    .await;
    wait_running(b, &ns, "plain-share", 1, STEP)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));
    let extra = json!({
        "selector": on_target,
        "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
    });
    apply_docs(
        b,
        &claim_and_pod(
            &ns,
            "slice-long",
            json!({"memory": "4Gi", "compute": "10"}),
            extra,
        ),
    )
    .await;
    let message = failed_prepare(b, nodes, &ns, "slice-long").await;
    eprintln!("slice-long: {message}");
    assert!(message.contains(&target), "names the GPU: {message}");
    assert!(message.contains("sharing"), "names the field: {message}");
    let mut allocs = share_allocations(b, &[ns.as_str()]).await.unwrap();
    nodes.attach_limits(&mut allocs);
    let refused = pods(&allocs, &format!("{ns}/slice-long"))[0];
    let neighbour = pods(&allocs, &format!("{ns}/plain-share"))[0];
    assert_eq!(
        refused.device, neighbour.device,
        "scheduled onto the same GPU"
    );
    assert_ne!(refused.phase, "Running");
    assert!(
        refused.limits.is_empty() && refused.compute_limit.is_none(),
        "{refused:?}"
    );
    assert_eq!(neighbour.phase, "Running", "the neighbour is unaffected");
    assert_eq!(neighbour.compute_limit, Some(10.0), "{neighbour:?}");
    assert_eq!(
        nodes.gpus["node-h"].state().gpus[&target].timeslice,
        h.gpus[&target].timeslice,
        "the refused share changed no time slice"
    );

    old_driver(b, nodes, &ns).await;
}

/// The message of the first FailedPrepareDynamicResources event of pod `name` in `ns`,
/// waited for up to [`STEP`]; panics with the plugins' log tail when none comes.
async fn failed_prepare(b: &TestBox, nodes: &ShareNodes, ns: &str, name: &str) -> String {
    let events: Api<Event> = Api::namespaced(b.client().await, ns);
    let event = b
        .wait(
            STEP,
            &format!("FailedPrepareDynamicResources on {name}"),
            || async {
                let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
                Ok(events
                    .list(&lp)
                    .await?
                    .items
                    .into_iter()
                    .find(|e| e.reason.as_deref() == Some("FailedPrepareDynamicResources")))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));
    event.message.unwrap_or_default()
}

/// A node whose driver (570) cannot limit memory per cgroup, with limits required: a share
/// claim fails at prepare with an error naming the GPU and the driver to upgrade to; a
/// whole-GPU claim on the same node prepared before and one prepared after run.
async fn old_driver(b: &TestBox, nodes: &mut ShareNodes, ns: &str) {
    nodes.add(b, "node-o", "dgx-h100", "memory", false).unwrap();
    // The state file appears with the plugin's first NVML call; the topology is there now.
    let topology = nvidia_ml::control::load_topology(&nodes.gpus["node-o"].topology()).unwrap();
    let gpus: Vec<String> = topology.gpus.into_iter().map(|g| g.uuid).collect();
    let on = |uuid: &str| {
        let selector = format!("device.attributes['gpu.gpu-dra.dev'].uuid == '{uuid}'");
        json!({ "selector": selector })
    };
    let (whole_before, share, whole_after) = (&gpus[0], &gpus[1], &gpus[2]);
    apply_docs(
        b,
        &claim_and_pod(ns, "old-whole", json!({}), on(whole_before)),
    )
    .await;
    wait_running(b, ns, "old-whole", 1, STEP)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));
    apply_docs(
        b,
        &claim_and_pod(
            ns,
            "old-share",
            json!({"memory": "8Gi", "compute": "20"}),
            on(share),
        ),
    )
    .await;
    let message = failed_prepare(b, nodes, ns, "old-share").await;
    eprintln!("old-share: {message}");
    assert!(message.contains(share.as_str()), "names the GPU: {message}");
    assert!(message.contains("r615"), "says what to upgrade: {message}");
    apply_docs(
        b,
        &claim_and_pod(ns, "old-whole-2", json!({}), on(whole_after)),
    )
    .await;
    wait_running(b, ns, "old-whole-2", 1, STEP)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));

    // The share's claim stays allocated and reserved for its pod, which does not start;
    // the node holds no limit and no prepared state for it; the whole GPUs run.
    let allocs = share_allocations(b, &[ns]).await.unwrap();
    let failed = pods(&allocs, &format!("{ns}/old-share"))[0];
    assert_eq!(failed.node, "node-o", "{failed:?}");
    assert_eq!(bytes(failed, "memory"), 8 * GI, "allocated: {failed:?}");
    assert_eq!(failed.phase, "Pending", "{failed:?}");
    assert!(failed.visible.is_none(), "not prepared: {failed:?}");
    assert!(failed.memory_condition.is_none(), "{failed:?}");
    assert_eq!(limit_count(&nodes.gpus["node-o"].state()), 0);
    for (pod, gpu) in [("old-whole", whole_before), ("old-whole-2", whole_after)] {
        let a = pods(&allocs, &format!("{ns}/{pod}"))[0];
        assert_eq!(
            (a.phase.as_str(), a.visible.as_deref()),
            ("Running", Some(gpu.as_str())),
            "{a:?}"
        );
    }
}

/// `gpu-dra inventory --slices --consumable-shares` prints the shareable slices an admin
/// would get; an unusable mode is refused with what to use instead.
#[test]
fn inventory_shows_share_slices_and_refuses_unlimited() {
    use support::driver::{FakeGpus, target_dir};
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let run = |mode: &str| {
        let mut cmd = std::process::Command::new(target_dir().join("gpu-dra"));
        cmd.args(["inventory", "--slices", "--node-name=n"])
            .arg(format!(
                "--nvml-lib-path={}",
                target_dir().join("libnvidia_ml.so").display()
            ))
            .arg(format!("--consumable-shares={mode}"));
        gpus.apply_env(&mut cmd);
        cmd.output().expect("gpu-dra runs")
    };
    let out = run("4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slice: k8s_openapi::api::resource::v1::ResourceSlice =
        serde_yaml::from_slice(&out.stdout).expect("one slice");
    let gpu = &slice.spec.devices.as_ref().expect("devices")[0];
    assert_eq!(gpu.allow_multiple_allocations, Some(true));
    let caps = gpu.capacity.as_ref().expect("capacity");
    let default = |name: &str| {
        caps[name]
            .request_policy
            .as_ref()
            .and_then(|p| p.default.as_ref())
            .map(|q| q.0.clone())
    };
    assert_eq!(default("memory"), Some((L40S_MIB / 4 * MI).to_string()));
    assert_eq!(default("compute").as_deref(), Some("25"));
    assert_eq!(caps["shares"].value.0, "4");

    let out = run("unlimited");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use `memory`"), "{stderr}");
}
