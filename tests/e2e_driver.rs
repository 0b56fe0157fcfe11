//! End-to-end tests of the driver on the tests/cluster box (issue 4, item 10): the real
//! API server, scheduler, resource-claim controller and the kubelet's DRA manager, our
//! plugin as a child process, and the fake NVML (dgx-h100, two GPUs in MIG mode holding
//! static instances). One box and one plugin for the whole binary; the scenarios run in
//! order because they share the node's GPUs.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};

use support::driver::{DRIVER, FakeGpus, Plugin};
use support::scenario::{
    Env, Step, apply_device_classes, claim_of_pod, create_template, env_of, pod, run_steps,
};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_end_to_end() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let mut env = Env {
        b,
        client,
        gpus,
        plugin,
    };
    apply_device_classes(&env.client).await;

    let steps: [(&str, Step); 8] = [
        ("slices published", |e| Box::pin(slices_are_published(e))),
        ("deleted slices repaired", |e| {
            Box::pin(deleted_slices_are_repaired(e))
        }),
        ("one GPU per pod", |e| Box::pin(pod_gets_one_gpu(e))),
        ("undecodable claim fails alone", |e| {
            Box::pin(undecodable_claim_fails_alone(e))
        }),
        ("shared time-sliced claim", |e| {
            Box::pin(shared_claim_is_time_sliced(e))
        }),
        ("MIG profile by CEL", |e| Box::pin(mig_profile_by_cel(e))),
        ("plugin SIGKILL mid-stream", |e| {
            Box::pin(plugin_killed_mid_stream(e))
        }),
        ("corrupt checkpoint", |e| {
            Box::pin(corrupt_checkpoint_is_quarantined(e))
        }),
    ];
    run_steps(&mut env, &steps).await;
}

async fn slices_are_published(e: &mut Env) -> anyhow::Result<()> {
    let slices: Api<ResourceSlice> = Api::all(e.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    let names =
        e.b.wait(STEP, "ResourceSlices of node-a", || async {
            e.plugin.check_alive()?;
            let list = slices.list(&lp).await?;
            let names: BTreeSet<String> = list
                .items
                .iter()
                .flat_map(|s| s.spec.devices.iter().flatten().map(|d| d.name.clone()))
                .collect();
            Ok((!names.is_empty()).then_some(names))
        })
        .await?;
    // dgx-h100-static-mig: GPUs 0 and 1 in MIG mode (6 MIG devices), 6 full GPUs.
    let full: Vec<&String> = names.iter().filter(|n| !n.contains("-mig-")).collect();
    anyhow::ensure!(full.len() == 6, "full GPUs published: {full:?}");
    anyhow::ensure!(names.len() == 12, "devices published: {names:?}");
    anyhow::ensure!(
        !names.contains("gpu-0") && names.contains("gpu-2"),
        "{names:?}"
    );
    Ok(())
}

async fn wait_running(e: &Env, pods: &Api<Pod>, name: &str) -> anyhow::Result<Value> {
    e.b.wait(
        STEP,
        &format!("pod {name} Running with a container result"),
        || async {
            let p = pods.get(name).await?;
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            Ok((phase == "Running")
                .then(|| e.b.container_result(NODE, &ns, name, "ctr"))
                .flatten())
        },
    )
    .await
}

fn device_paths(result: &Value) -> Vec<String> {
    result["deviceNodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["path"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The device allocated to a claim and the device's `uuid` attribute in our slices.
async fn allocated(e: &Env, ns: &str, claim: &str) -> anyhow::Result<(String, String)> {
    let claims: Api<ResourceClaim> = Api::namespaced(e.client.clone(), ns);
    let c = claims.get(claim).await?;
    let device = c
        .status
        .and_then(|s| s.allocation)
        .and_then(|a| a.devices)
        .and_then(|d| d.results)
        .and_then(|r| r.into_iter().next())
        .map(|r| r.device)
        .ok_or_else(|| anyhow::anyhow!("claim {ns}/{claim} not allocated"))?;
    let slices: Api<ResourceSlice> = Api::all(e.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    let uuid = slices
        .list(&lp)
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.spec.devices.unwrap_or_default())
        .find(|d| d.name == device)
        .and_then(|d| d.attributes?.get("uuid")?.string.clone())
        .ok_or_else(|| anyhow::anyhow!("device {device} has no uuid attribute"))?;
    Ok((device, uuid))
}

async fn delete_and_wait_gone(e: &Env, pods: &Api<Pod>, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    for name in names {
        e.b.wait(STEP, &format!("pod {name} gone (unprepared)"), || async {
            Ok(pods.get_opt(name).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

fn cdi_specs(e: &Env) -> BTreeSet<String> {
    std::fs::read_dir(e.b.cdi_dir(NODE))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("gpu-dra.dev-claim_"))
                .collect()
        })
        .unwrap_or_default()
}

async fn pod_gets_one_gpu(e: &mut Env) -> anyhow::Result<()> {
    let ns = e.b.create_namespace("one-gpu").await;
    let pods = one_gpu_pods(e, &ns).await?;
    create_one_gpu_pods(&pods, &["job".to_string()]).await?;
    let result = wait_running(e, &pods, "job").await?;
    let claim = claim_of_pod(&pods, "job").await?;
    let (device, uuid) = allocated(e, &ns, &claim).await?;
    let minor = device.strip_prefix("gpu-").unwrap_or_default();
    let paths = device_paths(&result);
    anyhow::ensure!(
        paths.contains(&format!("/dev/nvidia{minor}")),
        "device nodes {paths:?}"
    );
    anyhow::ensure!(
        paths.contains(&"/dev/nvidiactl".to_string()),
        "device nodes {paths:?}"
    );
    anyhow::ensure!(
        env_of(&result, "NVIDIA_VISIBLE_DEVICES").as_deref() == Some(uuid.as_str()),
        "env {:?}",
        result["env"]
    );
    delete_and_wait_gone(e, &pods, &["job".into()]).await?;
    anyhow::ensure!(
        cdi_specs(e).is_empty(),
        "CDI specs left: {:?}",
        cdi_specs(e)
    );
    Ok(())
}

/// A claim whose opaque parameters nest 200 levels deep (past serde_json's 128-level
/// recursion limit) fails its own pod's prepare with an error naming it; a pod beside it
/// on the same node still gets its GPU.
async fn undecodable_claim_fails_alone(e: &mut Env) -> anyhow::Result<()> {
    let ns = e.b.create_namespace("deep").await;
    let mut params = json!(1);
    for _ in 0..200 {
        params = json!([params]);
    }
    let claim = |name: &str, parameters: Option<Value>| {
        let config: Vec<Value> = parameters
            .into_iter()
            .map(|p| json!({"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": p}}))
            .collect();
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name},
            "spec": {"devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
                "config": config}}
        })
    };
    let url = <ResourceClaim as kube::Resource>::url_path(&(), Some(&ns));
    // Raw requests: the typed client cannot decode the API server's answer for the deep one.
    for (name, parameters) in [("deep", Some(json!({"x": params}))), ("fine", None)] {
        let request = kube::core::Request::new(&url).create(
            &PostParams::default(),
            serde_json::to_vec(&claim(name, parameters))?,
        )?;
        e.client.request_text(request).await?;
    }
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &ns);
    for name in ["deep", "fine"] {
        pods.create(
            &PostParams::default(),
            &pod(name, json!({"name": "gpu", "resourceClaimName": name})),
        )
        .await?;
    }
    wait_running(e, &pods, "fine").await?;
    let message =
        e.b.wait(STEP, "prepare of the deep claim refused", || async {
            let p = pods.get("deep").await?;
            let failed = p
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "ResourcesPrepared" && c.status == "False");
            Ok(failed.and_then(|c| c.message))
        })
        .await?;
    anyhow::ensure!(
        message.contains(&format!("{ns}/deep")) && message.contains("nested more than"),
        "error for the deep claim: {message}"
    );
    delete_and_wait_gone(e, &pods, &["deep".into(), "fine".into()]).await?;
    anyhow::ensure!(
        cdi_specs(e).is_empty(),
        "CDI specs left: {:?}",
        cdi_specs(e)
    );
    Ok(())
}

async fn shared_claim_is_time_sliced(e: &mut Env) -> anyhow::Result<()> {
    let ns = e.b.create_namespace("timeslice").await;
    let claims: Api<ResourceClaim> = Api::namespaced(e.client.clone(), &ns);
    let claim: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "shared-gpu"},
        "spec": {"devices": {
            "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
                "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}}}]
        }}
    }))?;
    claims.create(&PostParams::default(), &claim).await?;
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &ns);
    let names: Vec<String> = (0..3).map(|i| format!("ollama-{i}")).collect();
    for name in &names {
        pods.create(
            &PostParams::default(),
            &pod(
                name,
                json!({"name": "gpu", "resourceClaimName": "shared-gpu"}),
            ),
        )
        .await?;
    }
    let mut seen = BTreeSet::new();
    for name in &names {
        let result = wait_running(e, &pods, name).await?;
        seen.insert(env_of(&result, "NVIDIA_VISIBLE_DEVICES").unwrap_or_default());
    }
    let (_, uuid) = allocated(e, &ns, "shared-gpu").await?;
    anyhow::ensure!(
        seen == BTreeSet::from([uuid.clone()]),
        "pods saw {seen:?}, claim has {uuid}"
    );
    let slice = e.gpus.state().gpus.get(&uuid).map(|g| g.timeslice);
    anyhow::ensure!(
        slice == Some(3),
        "time slice of {uuid}: {slice:?} (want 3 = Long)"
    );

    delete_and_wait_gone(e, &pods, &names).await?;
    // The claim is unprepared with its last pod: the GPU is back to the default.
    e.b.wait(STEP, "time slice restored to Default", || async {
        Ok((e.gpus.state().gpus.get(&uuid).map(|g| g.timeslice) == Some(0)).then_some(()))
    })
    .await?;
    anyhow::ensure!(
        cdi_specs(e).is_empty(),
        "CDI specs left: {:?}",
        cdi_specs(e)
    );
    Ok(())
}

async fn mig_profile_by_cel(e: &mut Env) -> anyhow::Result<()> {
    let ns = e.b.create_namespace("mig").await;
    create_template(&e.client, &ns, "small", json!({"requests": [{"name": "gpu", "exactly": {
        "deviceClassName": "mig.gpu-dra.dev",
        "selectors": [{"cel": {"expression": "device.attributes['gpu.gpu-dra.dev'].profile == '1g.10gb'"}}]}}]}))
    .await?;
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &pod(
            "small",
            json!({"name": "gpu", "resourceClaimTemplateName": "small"}),
        ),
    )
    .await?;
    let result = wait_running(e, &pods, "small").await?;
    let claim = claim_of_pod(&pods, "small").await?;
    let (device, uuid) = allocated(e, &ns, &claim).await?;
    anyhow::ensure!(device.contains("-mig-1g10gb-"), "allocated {device}");
    anyhow::ensure!(uuid.starts_with("MIG-"), "uuid {uuid}");
    anyhow::ensure!(
        env_of(&result, "NVIDIA_VISIBLE_DEVICES") == Some(uuid),
        "env {:?}",
        result["env"]
    );
    let caps: Vec<String> = device_paths(&result)
        .into_iter()
        .filter(|p| p.starts_with("/dev/nvidia-caps/"))
        .collect();
    anyhow::ensure!(caps.len() == 2, "MIG capability nodes: {caps:?}");
    delete_and_wait_gone(e, &pods, &["small".into()]).await?;
    Ok(())
}

async fn plugin_killed_mid_stream(e: &mut Env) -> anyhow::Result<()> {
    let ns = e.b.create_namespace("crash").await;
    let pods = one_gpu_pods(e, &ns).await?;
    let names: Vec<String> = (0..6).map(|i| format!("stream-{i}")).collect();
    create_one_gpu_pods(&pods, &names).await?;
    // Kill as soon as the first pod is prepared: the others are in flight or queued.
    wait_running(e, &pods, &names[0]).await?;
    e.plugin.kill();
    e.plugin.restart(&e.gpus)?;
    for name in &names {
        wait_running(e, &pods, name).await?;
    }
    let mut devices = BTreeSet::new();
    for name in &names {
        let claim = claim_of_pod(&pods, name).await?;
        devices.insert(allocated(e, &ns, &claim).await?.0);
    }
    anyhow::ensure!(
        devices.len() == names.len(),
        "each pod has its own GPU: {devices:?}"
    );
    anyhow::ensure!(
        cdi_specs(e).len() == names.len(),
        "one CDI spec per claim: {:?}",
        cdi_specs(e)
    );
    delete_and_wait_gone(e, &pods, &names).await?;
    anyhow::ensure!(
        cdi_specs(e).is_empty(),
        "orphaned CDI specs: {:?}",
        cdi_specs(e)
    );
    let checkpoint =
        e.b.kubelet_root(NODE)
            .join(format!("plugins/{DRIVER}/checkpoint.json"));
    let cp: Value = serde_json::from_slice(&std::fs::read(&checkpoint)?)?;
    anyhow::ensure!(
        cp["claims"].as_object().is_none_or(|c| c.is_empty()),
        "checkpoint still holds claims: {}",
        cp["claims"]
    );
    Ok(())
}

async fn corrupt_checkpoint_is_quarantined(e: &mut Env) -> anyhow::Result<()> {
    e.plugin.kill();
    let dir = e.b.kubelet_root(NODE).join(format!("plugins/{DRIVER}"));
    std::fs::write(
        dir.join("checkpoint.json"),
        b"{\"version\": 1, \"claims\": [truncated",
    )?;
    e.plugin.restart(&e.gpus)?;
    // Reported on the node, never a crash loop.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(e.client.clone());
    let note =
        e.b.wait(STEP, "CheckpointQuarantined event on node-a", || async {
            e.plugin.check_alive()?;
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .into_iter()
                .find(|ev| ev.reason.as_deref() == Some("CheckpointQuarantined"))
                .and_then(|ev| ev.note))
        })
        .await?;
    anyhow::ensure!(
        note.contains("checkpoint.json.corrupt-"),
        "event note: {note}"
    );
    let moved = std::fs::read_dir(&dir)?.filter_map(Result::ok).any(|d| {
        d.file_name()
            .to_string_lossy()
            .starts_with("checkpoint.json.corrupt-")
    });
    anyhow::ensure!(moved, "corrupt checkpoint kept aside in {}", dir.display());

    // The plugin keeps working with a fresh checkpoint.
    let ns = e.b.create_namespace("after-quarantine").await;
    let pods = one_gpu_pods(e, &ns).await?;
    create_one_gpu_pods(&pods, &["again".to_string()]).await?;
    wait_running(e, &pods, "again").await?;
    delete_and_wait_gone(e, &pods, &["again".into()]).await
}

/// Creates the `one-gpu` ResourceClaimTemplate (one full GPU) in `ns` and returns the
/// namespace's pod API.
async fn one_gpu_pods(e: &Env, ns: &str) -> anyhow::Result<Api<Pod>> {
    create_template(
        &e.client,
        ns,
        "one-gpu",
        json!({"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}]}),
    )
    .await?;
    Ok(Api::namespaced(e.client.clone(), ns))
}

/// Creates one pod per name, each with its own claim from the `one-gpu` template.
async fn create_one_gpu_pods(pods: &Api<Pod>, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        let claim = json!({"name": "gpu", "resourceClaimTemplateName": "one-gpu"});
        pods.create(&PostParams::default(), &pod(name, claim))
            .await?;
    }
    Ok(())
}

async fn deleted_slices_are_repaired(e: &mut Env) -> anyhow::Result<()> {
    // What the kubelet does at its start and after 30 s without a connected plugin.
    let slices: Api<ResourceSlice> = Api::all(e.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    let before = slices.list(&lp).await?.items.len();
    anyhow::ensure!(before > 0, "no slices to delete");
    slices
        .delete_collection(&DeleteParams::default(), &lp)
        .await?;
    e.b.wait(STEP, "ResourceSlices re-published", || async {
        e.plugin.check_alive()?;
        let list = slices.list(&lp).await?;
        let devices: usize = list
            .items
            .iter()
            .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
            .sum();
        Ok((list.items.len() == before && devices == 12).then_some(()))
    })
    .await?;
    Ok(())
}
