//! Health to scheduling on the tests/cluster box: XID 79 on a MIG GPU puts the device
//! taint `<driver>/xid=79` on each of its MIG devices in the published ResourceSlice; the
//! taint survives a SIGKILL and restart of the plugin; `gpu-dra clear-unhealthy` removes it.
//!
//! And the scheduler acts on it (KEP-5055 device taints, GA in 1.37): with every GPU but
//! one tainted by XID 79, a claim any GPU satisfies is allocated the healthy one; with
//! every GPU tainted a pod stays Pending, unschedulable; once an admin clears the verdicts
//! it schedules.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::driver::{DRIVER, FakeGpus, Plugin, target_dir};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

/// The tests of this binary share the box's node: one plugin at a time.
static NODE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Device name -> XID taint value, for the devices of GPU `minor` in this node's slices.
async fn xid_taints(
    api: &Api<ResourceSlice>,
    minor: u32,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let list = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
        .await?;
    let prefix = format!("gpu-{minor}-mig-");
    let mut out = Vec::new();
    for slice in list.items {
        for d in slice.spec.devices.unwrap_or_default() {
            if d.name.starts_with(&prefix) {
                let xid = d
                    .taints
                    .unwrap_or_default()
                    .into_iter()
                    .find(|t| t.key == format!("{DRIVER}/xid"))
                    .and_then(|t| t.value);
                out.push((d.name, xid));
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_taints_the_gpu_until_cleared() {
    let _node = NODE_LOCK.lock().await;
    let b = support::shared();
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let topology = nvidia_ml::control::load_topology(&gpus.topology()).unwrap();
    let gpu = topology.gpus[0].clone();
    let mut plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let api: Api<ResourceSlice> = Api::all(b.client().await);
    let fail = |plugin: &Plugin, e: anyhow::Error| -> ! {
        panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(60))
    };

    let published = support::wait_for(STEP, "untainted MIG devices of the GPU", || {
        let api = api.clone();
        async move {
            let t = xid_taints(&api, gpu.minor).await?;
            Ok((!t.is_empty() && t.iter().all(|(_, x)| x.is_none())).then_some(t))
        }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e))
    .len();

    // The XID watch is registered once the plugin serves; retry the injection until seen.
    let minor = gpu.minor;
    let all_tainted = move |api: Api<ResourceSlice>| async move {
        let t = xid_taints(&api, minor).await?;
        Ok::<_, anyhow::Error>(
            (t.len() == published && t.iter().all(|(_, x)| x.as_deref() == Some("79")))
                .then_some(()),
        )
    };
    support::wait_for(STEP, "XID taint on every MIG device of the GPU", || {
        let api = api.clone();
        let state = gpus.state_path();
        let uuid = gpu.uuid.clone();
        async move {
            if all_tainted(api).await?.is_some() {
                return Ok(Some(()));
            }
            nvidia_ml::control::inject_xid(&state, &uuid, 79)?;
            Ok(None)
        }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e));

    // SIGKILL and restart: the verdict comes back from the plugin dir.
    plugin.kill();
    let verdicts = b
        .kubelet_root(NODE)
        .join(format!("plugins/{DRIVER}/health.json"));
    let saved = std::fs::read_to_string(&verdicts).unwrap();
    assert!(saved.contains(&gpu.uuid), "{saved}");
    plugin.restart(&gpus).unwrap();
    support::wait_for(STEP, "restarted plugin logs the restored verdict", || {
        let restored = plugin.log_tail(400).contains("verdict restored");
        async move { Ok(restored.then_some(())) }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e));
    assert!(all_tainted(api.clone()).await.unwrap().is_some());

    // The admin clears it.
    let out = std::process::Command::new(target_dir().join("gpu-dra"))
        .args([
            "clear-unhealthy",
            "--gpu",
            &gpu.uuid,
            "--driver-name",
            DRIVER,
            "--kubelet-root",
        ])
        .arg(b.kubelet_root(NODE))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::wait_for(STEP, "XID taints gone", || {
        let api = api.clone();
        async move {
            let t = xid_taints(&api, gpu.minor).await?;
            Ok((t.len() == published && t.iter().all(|(_, x)| x.is_none())).then_some(()))
        }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e));
    plugin.check_alive().unwrap();
}

/// Device name -> XID taint value of the full-GPU devices (`gpu-<minor>`) in this node's
/// slices.
async fn gpu_taints(
    api: &Api<ResourceSlice>,
) -> anyhow::Result<std::collections::BTreeMap<String, Option<String>>> {
    let list = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}")))
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for slice in list.items {
        for d in slice.spec.devices.unwrap_or_default() {
            let full = d
                .name
                .strip_prefix("gpu-")
                .is_some_and(|m| m.bytes().all(|b| b.is_ascii_digit()));
            if full {
                let xid = d
                    .taints
                    .unwrap_or_default()
                    .into_iter()
                    .find(|t| t.key == format!("{DRIVER}/xid"))
                    .and_then(|t| t.value);
                out.insert(d.name, xid);
            }
        }
    }
    Ok(out)
}

/// Injects XID 79 on each of `gpus` (UUID, device name) until the slices show the taint on
/// all of them (the XID watch registers once the plugin serves).
async fn taint(
    api: &Api<ResourceSlice>,
    state: &Path,
    gpus: &[(String, String)],
) -> anyhow::Result<()> {
    support::wait_for(STEP, "XID taints on the GPUs", || async {
        let taints = gpu_taints(api).await?;
        let mut all = true;
        for (uuid, device) in gpus {
            if taints.get(device).cloned().flatten().as_deref() != Some("79") {
                all = false;
                nvidia_ml::control::inject_xid(state, uuid, 79)?;
            }
        }
        Ok(all.then_some(()))
    })
    .await
}

/// A claim `name` for any one full GPU and a pod `name` using it.
async fn claim_and_pod(client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let claim: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "gpu",
            "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}]}}
    }))?;
    Api::<ResourceClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &claim)
        .await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                            "resources": {"claims": [{"name": "gpu"}]}}]
        }
    }))?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}

/// The device allocated to claim `name`, once it is allocated.
async fn allocated(claims: &Api<ResourceClaim>, name: &str) -> anyhow::Result<Option<String>> {
    let c = claims.get(name).await?;
    Ok(c.status
        .and_then(|s| s.allocation)
        .and_then(|a| a.devices)
        .and_then(|d| d.results.into_iter().flatten().next())
        .map(|r| r.device))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_allocates_around_tainted_gpus() {
    let _node = NODE_LOCK.lock().await;
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100").unwrap();
    let plugin = Plugin::start(b, NODE, &gpus).unwrap();
    if let Err(e) = scheduling(b, &client, &gpus, &plugin).await {
        panic!(
            "{e:#}\n--- plugin log ---\n{}\n--- box logs ---\n{}",
            plugin.log_tail(60),
            b.log_tail(30)
        );
    }
}

async fn scheduling(
    b: &support::TestBox,
    client: &kube::Client,
    gpus: &FakeGpus,
    plugin: &Plugin,
) -> anyhow::Result<()> {
    support::examples::apply_file(
        client,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/deviceclasses.yaml"),
    )
    .await?;
    let ns = b.create_namespace("taint-scheduling").await;
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let all: Vec<(String, String)> = nvidia_ml::control::load_topology(&gpus.topology())?
        .gpus
        .iter()
        .map(|g| (g.uuid.clone(), format!("gpu-{}", g.minor)))
        .collect();
    b.wait(STEP, "every GPU published untainted", || async {
        plugin.check_alive()?;
        let t = gpu_taints(&slices).await?;
        let ok = all.iter().all(|(_, d)| t.get(d) == Some(&None));
        Ok(ok.then_some(()))
    })
    .await?;
    let (healthy, sick) = all.split_last().ok_or_else(|| anyhow::anyhow!("no GPUs"))?;
    taint(&slices, &gpus.state_path(), sick).await?;

    // Any GPU would do; only the healthy one may be allocated.
    claim_and_pod(client, &ns, "first").await?;
    let device = b
        .wait(STEP, "claim first allocated", || {
            allocated(&claims, "first")
        })
        .await?;
    anyhow::ensure!(
        device == healthy.1,
        "claim allocated {device}, want the only untainted GPU {}",
        healthy.1
    );
    pods.delete("first", &DeleteParams::default()).await?;
    claims.delete("first", &DeleteParams::default()).await?;
    b.wait(STEP, "claim first gone", || async {
        Ok(claims.get_opt("first").await?.is_none().then_some(()))
    })
    .await?;

    // Every GPU tainted: the scheduler reports the pod unschedulable.
    taint(&slices, &gpus.state_path(), std::slice::from_ref(healthy)).await?;
    claim_and_pod(client, &ns, "second").await?;
    b.wait(STEP, "pod second unschedulable", || async {
        let p = pods.get("second").await?;
        let cond = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled");
        Ok(cond
            .filter(|c| {
                c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
                    && c.message
                        .as_deref()
                        .is_some_and(|m| m.contains("cannot allocate all claims"))
            })
            .map(|_| ()))
    })
    .await?;
    anyhow::ensure!(
        allocated(&claims, "second").await?.is_none(),
        "claim second allocated although every GPU is tainted"
    );

    // The admin clears every verdict: the pod schedules and runs.
    let out = std::process::Command::new(target_dir().join("gpu-dra"))
        .args([
            "clear-unhealthy",
            "--gpu",
            "all",
            "--driver-name",
            DRIVER,
            "--kubelet-root",
        ])
        .arg(b.kubelet_root(NODE))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "clear-unhealthy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait(STEP, "pod second running", || async {
        plugin.check_alive()?;
        let p = pods.get("second").await?;
        let running = p.status.and_then(|s| s.phase).as_deref() == Some("Running");
        Ok((running && b.container_result(NODE, &ns, "second", "ctr").is_some()).then_some(()))
    })
    .await?;
    let t = gpu_taints(&slices).await?;
    anyhow::ensure!(t.values().all(Option::is_none), "taints left: {t:?}");
    pods.delete("second", &DeleteParams::default()).await?;
    Ok(())
}
