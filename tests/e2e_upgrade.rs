//! Rolling update of the node plugin on the tests/cluster box: the kubelet's own plugin
//! manager and DRA manager, two plugin processes for one node with per-pod socket names
//! (as a DaemonSet with maxSurge 1 runs them), and a misconfigured second instance.
//!
//! Instance A serves; a second instance without a pod UID refuses to start and names A;
//! instance B starts while A serves, registers, and the kubelet switches to it (B
//! forwards to A, the lock holder); A stops; B takes over. Claims prepared before,
//! during and after the switch stay prepared, none twice, the time slice of a live
//! claim survives, and no ResourceSlice is deleted. Then B is SIGKILLed and instance C
//! takes over from the dead holder (its left-behind registration removed).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

use support::TestBox;
use support::driver::{DRIVER, FakeGpus, Plugin};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

struct Env {
    b: &'static TestBox,
    client: kube::Client,
    gpus: FakeGpus,
    pods: Api<Pod>,
    ns: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_keeps_every_claim_prepared_once() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100").unwrap();
    apply_device_classes(&client).await;
    let ns = b.create_namespace("upgrade").await;
    let env = Env {
        b,
        pods: Api::namespaced(client.clone(), &ns),
        client,
        gpus,
        ns,
    };
    let uid_a = uuid::Uuid::new_v4().to_string();
    let uid_b = uuid::Uuid::new_v4().to_string();
    let mut a =
        Plugin::start_with(b, NODE, &env.gpus, "a", &[format!("--pod-uid={uid_a}")]).unwrap();
    let mut others = Vec::new();
    if let Err(err) = scenario(&env, &mut a, &uid_a, &uid_b, &mut others).await {
        let logs: Vec<String> = std::iter::once(&a)
            .chain(others.iter())
            .map(|p| p.log_tail(40))
            .collect();
        panic!(
            "{err:#}\n--- plugin logs ---\n{}\n--- box logs ---\n{}",
            logs.join("\n---\n"),
            b.log_tail(30)
        );
    }
}

async fn scenario(
    e: &Env,
    a: &mut Plugin,
    uid_a: &str,
    uid_b: &str,
    others: &mut Vec<Plugin>,
) -> anyhow::Result<()> {
    let initial_slices = wait_slices(e, a).await?;
    create_claims(e).await?;

    // Before: prepared by A.
    create_pods(e, &["before-0", "before-1"], None).await?;
    create_pods(e, &["ts-0"], Some("ts")).await?;
    for pod in ["before-0", "before-1", "ts-0"] {
        wait_running(e, pod).await?;
    }
    let ts_uuid = gpu_uuid_of_claim(e, "ts").await?;
    anyhow::ensure!(
        timeslice(e, &ts_uuid) == Some(3),
        "Long time slice set by A"
    );
    let specs_before = cdi_specs(e);
    let checkpoint_before = checkpoint_claims(e)?;

    // A misconfigured second instance (no pod UID): refuses to start, names A, changes nothing.
    others.push(Plugin::start_unmanaged(
        e.b,
        NODE,
        &e.gpus,
        "misconfigured",
    )?);
    let refused = &others[0];
    let status = support::wait_for(STEP, "second instance exits", || async {
        refused.exit_status()
    })
    .await?;
    anyhow::ensure!(!status.success(), "second instance exited with {status}");
    let a_pid = a.pid().unwrap_or_default();
    let log = refused.log_tail(20);
    anyhow::ensure!(
        log.contains(&format!("pid {a_pid} ")) && log.contains(uid_a),
        "the refusal names the holder (pid {a_pid}, pod UID {uid_a}):\n{log}"
    );
    a.check_alive()?;
    anyhow::ensure!(cdi_specs(e) == specs_before, "CDI specs changed");
    anyhow::ensure!(
        checkpoint_claims(e)? == checkpoint_before,
        "checkpoint changed"
    );

    // From here on every ResourceSlice deletion is counted.
    let deletions = count_slice_deletions(e).await?;

    // During: B registers while A serves; the kubelet prefers B, which forwards to A.
    let a_dra = dra_socket(e, uid_a);
    let b_dra = dra_socket(e, uid_b);
    others.push(Plugin::start_with(
        e.b,
        NODE,
        &e.gpus,
        "b",
        &[format!("--pod-uid={uid_b}")],
    )?);
    let b = others.last_mut().ok_or_else(|| anyhow::anyhow!("no B"))?;
    support::wait_for(STEP, "the kubelet connected to B's DRA socket", || async {
        b.check_alive()?;
        Ok((connections(&b_dra) >= 1).then_some(()))
    })
    .await?;
    create_pods(e, &["during-0", "during-1"], None).await?;
    create_pods(e, &["ts-1"], Some("ts")).await?;
    for pod in ["during-0", "during-1", "ts-1"] {
        wait_running(e, pod).await?;
    }
    // The kubelet's connection plus B's forwarding connection.
    anyhow::ensure!(
        connections(&a_dra) >= 2,
        "B forwarded to A: {} connection(s) on A's DRA socket",
        connections(&a_dra)
    );
    // Prepared by A, unprepared through B.
    delete_and_wait_gone(e, &["before-1"]).await?;

    // The switch: a pod on its way while A stops.
    create_pods(e, &["switch-0"], None).await?;
    let status = a.terminate()?;
    anyhow::ensure!(
        status.is_some_and(|s| s.success()),
        "A stopped cleanly: {status:?}"
    );
    anyhow::ensure!(
        !a_dra.exists() && !registration_socket(e, uid_a).exists(),
        "A removed its own sockets"
    );
    anyhow::ensure!(
        b_dra.exists() && registration_socket(e, uid_b).exists(),
        "B's sockets stay"
    );
    wait_running(e, "switch-0").await?;

    // After: B holds the lock and serves from its own state.
    create_pods(e, &["after-0"], None).await?;
    wait_running(e, "after-0").await?;
    anyhow::ensure!(
        timeslice(e, &ts_uuid) == Some(3),
        "B's take-over kept the live claim's time slice"
    );
    // Prepared by A (through B), unprepared by B.
    delete_and_wait_gone(e, &["during-0", "ts-0", "ts-1"]).await?;
    e.b.wait(STEP, "B restored the default time slice", || async {
        Ok((timeslice(e, &ts_uuid) == Some(0)).then_some(()))
    })
    .await?;

    // Every live pod still Running, each claim prepared exactly once.
    let live = ["before-0", "during-1", "switch-0", "after-0"];
    let mut claims = BTreeSet::new();
    let mut devices = BTreeSet::new();
    for pod in live {
        wait_running(e, pod).await?;
        let (uid, device) = claim_of_pod(e, pod).await?;
        claims.insert(uid);
        devices.insert(device);
    }
    anyhow::ensure!(
        devices.len() == live.len(),
        "one GPU per claim: {devices:?}"
    );
    let expected_specs: BTreeSet<String> = claims
        .iter()
        .map(|uid| format!("gpu-dra.dev-claim_{uid}.json"))
        .collect();
    anyhow::ensure!(
        cdi_specs(e) == expected_specs,
        "one CDI spec per live claim: {:?} vs {expected_specs:?}",
        cdi_specs(e)
    );
    let checkpoint = checkpoint_claims(e)?;
    anyhow::ensure!(
        checkpoint.keys().cloned().collect::<BTreeSet<_>>() == claims,
        "checkpoint holds exactly the live claims: {checkpoint:?}"
    );
    anyhow::ensure!(
        checkpoint.values().all(|state| state == "PrepareCompleted"),
        "{checkpoint:?}"
    );
    anyhow::ensure!(
        deletions.load(Ordering::SeqCst) == 0,
        "ResourceSlices deleted during the switch"
    );
    let slices_now = slice_uids(e).await?;
    anyhow::ensure!(
        slices_now == initial_slices,
        "the same slice objects: {initial_slices:?} -> {slices_now:?}"
    );

    // B crashes (SIGKILL: its sockets stay behind); C, the next pod, takes over at once,
    // removes B's dead registration and unprepares what A and B prepared.
    let b = others.last_mut().ok_or_else(|| anyhow::anyhow!("no B"))?;
    b.kill();
    anyhow::ensure!(
        registration_socket(e, uid_b).exists(),
        "SIGKILL leaves B's socket"
    );
    let uid_c = uuid::Uuid::new_v4().to_string();
    let c_dra = dra_socket(e, &uid_c);
    others.push(Plugin::start_with(
        e.b,
        NODE,
        &e.gpus,
        "c",
        &[format!("--pod-uid={uid_c}")],
    )?);
    let c: &Plugin = others.last().ok_or_else(|| anyhow::anyhow!("no C"))?;
    support::wait_for(STEP, "C took over from the killed B", || async {
        c.check_alive()?;
        let ready = connections(&c_dra) >= 1 && !registration_socket(e, uid_b).exists();
        Ok(ready.then_some(()))
    })
    .await?;
    delete_and_wait_gone(e, &live).await?;
    anyhow::ensure!(
        cdi_specs(e).is_empty(),
        "CDI specs left: {:?}",
        cdi_specs(e)
    );
    anyhow::ensure!(checkpoint_claims(e)?.is_empty(), "checkpoint not empty");
    anyhow::ensure!(
        deletions.load(Ordering::SeqCst) == 0,
        "ResourceSlices deleted while B was down"
    );
    let c = others.last_mut().ok_or_else(|| anyhow::anyhow!("no C"))?;
    let status = c.terminate()?;
    anyhow::ensure!(status.is_some_and(|s| s.success()), "C stopped: {status:?}");
    anyhow::ensure!(
        !c_dra.exists() && !registration_socket(e, &uid_c).exists(),
        "C removed its sockets"
    );
    Ok(())
}

fn plugin_dir(e: &Env) -> std::path::PathBuf {
    e.b.kubelet_root(NODE).join("plugins").join(DRIVER)
}

fn dra_socket(e: &Env, pod_uid: &str) -> std::path::PathBuf {
    gpu_dra::plugin::dra_socket_path(&plugin_dir(e), Some(pod_uid))
}

fn registration_socket(e: &Env, pod_uid: &str) -> std::path::PathBuf {
    gpu_dra::plugin::registration_socket_path(
        &e.b.kubelet_root(NODE).join("plugins_registry"),
        DRIVER,
        Some(pod_uid),
    )
}

/// Connected (accepted) Unix sockets bound to `path`, from /proc/net/unix (state 03).
fn connections(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table
        .lines()
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() >= 8 && cols[5] == "03" && cols[7] == path
        })
        .count()
}

async fn apply_device_classes(client: &kube::Client) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/deviceclasses.yaml"
    ))
    .unwrap();
    let classes: Api<DeviceClass> = Api::all(client.clone());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let class: DeviceClass = serde::Deserialize::deserialize(doc).unwrap();
        let name = class.metadata.name.clone().unwrap();
        classes
            .patch(
                &name,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&class),
            )
            .await
            .unwrap();
    }
}

fn slice_params() -> ListParams {
    ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"))
}

async fn slice_uids(e: &Env) -> anyhow::Result<BTreeSet<String>> {
    let slices: Api<ResourceSlice> = Api::all(e.client.clone());
    Ok(slices
        .list(&slice_params())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.uid)
        .collect())
}

async fn wait_slices(e: &Env, a: &Plugin) -> anyhow::Result<BTreeSet<String>> {
    e.b.wait(STEP, "ResourceSlices of node-a", || async {
        a.check_alive()?;
        let uids = slice_uids(e).await?;
        Ok((!uids.is_empty()).then_some(uids))
    })
    .await
}

/// Counts Deleted events of this node's slices from now on (after the initial list).
async fn count_slice_deletions(e: &Env) -> anyhow::Result<Arc<AtomicUsize>> {
    let deletions = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let api: Api<ResourceSlice> = Api::all(e.client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    let counter = Arc::clone(&deletions);
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut events = std::pin::pin!(watcher(api, config));
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(watcher::Event::Delete(_)) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(STEP, ready_rx).await??;
    Ok(deletions)
}

async fn create_claims(e: &Env) -> anyhow::Result<()> {
    let templates: Api<k8s_openapi::api::resource::v1::ResourceClaimTemplate> =
        Api::namespaced(e.client.clone(), &e.ns);
    let template = serde_json::from_value(json!({
        "metadata": {"name": "one-gpu"},
        "spec": {"spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}]}}}
    }))?;
    templates.create(&PostParams::default(), &template).await?;
    let claims: Api<ResourceClaim> = Api::namespaced(e.client.clone(), &e.ns);
    let claim = serde_json::from_value(json!({
        "metadata": {"name": "ts"},
        "spec": {"devices": {
            "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
                "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}}}]
        }}
    }))?;
    claims.create(&PostParams::default(), &claim).await?;
    Ok(())
}

/// Creates pods with their own claim from `one-gpu`, or sharing the claim `shared`.
async fn create_pods(e: &Env, names: &[&str], shared: Option<&str>) -> anyhow::Result<()> {
    for name in names {
        let claim = match shared {
            Some(claim) => json!({"name": "gpu", "resourceClaimName": claim}),
            None => json!({"name": "gpu", "resourceClaimTemplateName": "one-gpu"}),
        };
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "resourceClaims": [claim],
                "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                                "resources": {"claims": [{"name": "gpu"}]}}]
            }
        }))?;
        e.pods.create(&PostParams::default(), &pod).await?;
    }
    Ok(())
}

async fn wait_running(e: &Env, name: &str) -> anyhow::Result<Value> {
    e.b.wait(
        STEP,
        &format!("pod {name} Running with its CDI devices"),
        || async {
            let p = e.pods.get(name).await?;
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            Ok((phase == "Running")
                .then(|| e.b.container_result(NODE, &e.ns, name, "ctr"))
                .flatten()
                .filter(|r| r["cdiDevices"].as_array().is_some_and(|d| !d.is_empty())))
        },
    )
    .await
}

async fn delete_and_wait_gone(e: &Env, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        e.pods.delete(name, &DeleteParams::default()).await?;
    }
    for name in names {
        e.b.wait(STEP, &format!("pod {name} gone (unprepared)"), || async {
            Ok(e.pods.get_opt(name).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// The claim UID and allocated device of a pod's (generated) claim.
async fn claim_of_pod(e: &Env, pod: &str) -> anyhow::Result<(String, String)> {
    let p = e.pods.get(pod).await?;
    let name = p
        .status
        .and_then(|s| s.resource_claim_statuses)
        .and_then(|s| s.into_iter().next())
        .and_then(|s| s.resource_claim_name)
        .ok_or_else(|| anyhow::anyhow!("pod {pod} has no generated claim"))?;
    let claims: Api<ResourceClaim> = Api::namespaced(e.client.clone(), &e.ns);
    let c = claims.get(&name).await?;
    let device = allocated_device(&c)?;
    Ok((c.metadata.uid.unwrap_or_default(), device))
}

fn allocated_device(c: &ResourceClaim) -> anyhow::Result<String> {
    c.status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .and_then(|r| r.first())
        .map(|r| r.device.clone())
        .ok_or_else(|| anyhow::anyhow!("claim {:?} not allocated", c.metadata.name))
}

/// The `uuid` attribute of the device allocated to claim `name`.
async fn gpu_uuid_of_claim(e: &Env, name: &str) -> anyhow::Result<String> {
    let claims: Api<ResourceClaim> = Api::namespaced(e.client.clone(), &e.ns);
    let device = allocated_device(&claims.get(name).await?)?;
    let slices: Api<ResourceSlice> = Api::all(e.client.clone());
    slices
        .list(&slice_params())
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.spec.devices.unwrap_or_default())
        .find(|d| d.name == device)
        .and_then(|d| d.attributes?.get("uuid")?.string.clone())
        .ok_or_else(|| anyhow::anyhow!("device {device} has no uuid attribute"))
}

fn timeslice(e: &Env, uuid: &str) -> Option<u32> {
    e.gpus.state().gpus.get(uuid).map(|g| g.timeslice)
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

/// Claim UID -> state, from the shared checkpoint file.
fn checkpoint_claims(e: &Env) -> anyhow::Result<BTreeMap<String, String>> {
    let cp: Value = serde_json::from_slice(&std::fs::read(plugin_dir(e).join("checkpoint.json"))?)?;
    Ok(cp["claims"]
        .as_object()
        .map(|claims| {
            claims
                .iter()
                .map(|(uid, c)| {
                    (
                        uid.clone(),
                        c["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}
