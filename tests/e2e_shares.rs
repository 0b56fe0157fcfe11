//! Consumable GPU shares end to end on the box (KEP-5075 consumable capacity): plugins
//! publish shareable GPUs, the real scheduler packs claims by `memory` and `compute`, and
//! the allocations (`consumedCapacity`, same device) are read back. The seed scenarios of
//! examples/shares/ first (`make demo` runs the same), then bad input: amounts above the
//! GPU, off the step, compute above 100, and two shares of one GPU with different sharing
//! strategies.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;

use support::TestBox;
use support::examples::apply_file;
use support::shares::{
    ShareAllocation, ShareNodes, render_shares, run_share_scenarios, share_allocations,
    wait_running, wait_unschedulable,
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

fn one_device(allocs: &[&ShareAllocation]) -> String {
    let devices: BTreeSet<&str> = allocs.iter().map(|a| a.device.as_str()).collect();
    assert_eq!(devices.len(), 1, "one GPU for all: {allocs:#?}");
    devices.first().map(ToString::to_string).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_scenarios_and_bad_input() {
    let b = TestBox::start(&["node-s", "node-h", "node-g"]).unwrap();
    let nodes = ShareNodes::start(&b).unwrap();
    let s = run_share_scenarios(&b, STEP)
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

    // Ollama: three replicas, each its own claim with a 20Gi budget, packed on one H100.
    let ollama = pods(all, "ollama-shares/ollama");
    assert_eq!(ollama.len(), 3);
    assert!(one_device(&ollama).starts_with("node-h/gpu-"));
    for a in &ollama {
        assert_eq!((bytes(a, "memory"), bytes(a, "compute")), (20 * GI, 30));
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
    }

    bad_input(&b, &nodes).await;
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
        "capacity": {"requests": requests},
    });
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

async fn bad_input(b: &TestBox, nodes: &ShareNodes) {
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
    let allocs = share_allocations(b, &[ns.as_str()]).await.unwrap();
    let off = pods(&allocs, &format!("{ns}/off-step"))[0];
    assert_eq!(bytes(off, "memory"), 10 * GI + MI, "{off:?}");

    // Two shares of one GPU with different time slices: the scheduler allows both (it
    // accounts amounts, not strategies); the plugin refuses the second at prepare with an
    // error naming the GPU and the claim that holds it, and the first keeps running.
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
    for (name, interval) in [("slice-short", "Short"), ("slice-long", "Long")] {
        let extra = json!({
            "selector": on_target,
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}},
        });
        apply_docs(
            b,
            &claim_and_pod(&ns, name, json!({"memory": "4Gi", "compute": "10"}), extra),
        )
        .await;
        if name == "slice-short" {
            wait_running(b, &ns, name, 1, STEP)
                .await
                .unwrap_or_else(|e| panic!("{e:#}\n{}", nodes.log_tail(30)));
        }
    }
    let allocs = share_allocations(b, &[ns.as_str()]).await.unwrap();
    let holder = pods(&allocs, &format!("{ns}/slice-short"))[0].clone();
    let events: Api<Event> = Api::namespaced(b.client().await, &ns);
    let event = b
        .wait(
            STEP,
            "FailedPrepareDynamicResources on slice-long",
            || async {
                let lp = ListParams::default().fields("involvedObject.name=slice-long");
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
    let message = event.message.unwrap_or_default();
    eprintln!("slice-long: {message}");
    assert!(message.contains(&target), "names the GPU: {message}");
    assert!(
        message.contains(&holder.claim_uid),
        "names the holder: {message}"
    );
    let allocs = share_allocations(b, &[ns.as_str()]).await.unwrap();
    let refused = pods(&allocs, &format!("{ns}/slice-long"))[0];
    assert_eq!(refused.device, holder.device, "scheduled onto the same GPU");
    assert_ne!(refused.phase, "Running");
    let holder_now = pods(&allocs, &format!("{ns}/slice-short"))[0];
    assert_eq!(holder_now.phase, "Running", "the holder is unaffected");
    assert_eq!(
        nodes.gpus["node-h"].state().gpus[&target].timeslice,
        1,
        "the GPU keeps the holder's time slice Short"
    );
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
