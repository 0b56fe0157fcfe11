//! End to end: compute limits of GPU shares on the tests/cluster box — the real API server
//! and the kubelet's DRA manager, our plugin as a child process, the fake NVML and fake
//! `nvidia-cuda-mps-control` of an L40S on an r615 driver (MPS v3) on node-a and on a 570
//! driver (legacy MPS v2 only) on node-b.
//!
//! The claims are allocated by the test, as the scheduler writes a share's allocation
//! (`consumedCapacity` with `memory` and `compute`, `shareID`, `reservedFor`), so the test
//! does not depend on which slices are published. What is asserted is what the fake GPU
//! and its MPS daemon recorded: one daemon per GPU (protocol 3, multi-user), a namespace per
//! claim with its active thread percentage and pinned memory limit, the GPU's compute mode,
//! and what each container was given by its CDI spec.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};

use support::TestBox;
use support::driver::{DRIVER, FakeGpus, Plugin};
use support::share_claims::{ShareAllocation, allocated_share, pod_running};

const STEP: Duration = Duration::from_secs(90);

fn test_box() -> &'static TestBox {
    static BOX: OnceLock<Result<TestBox, String>> = OnceLock::new();
    match BOX.get_or_init(|| TestBox::start(&["node-a", "node-b"]).map_err(|e| format!("{e:#}"))) {
        Ok(b) => b,
        Err(e) => panic!("test box failed to start: {e}"),
    }
}

/// A share claim and its pod on `node`, allocated `consumed` of gpu-0; `config`: opaque
/// GpuConfig parameters carried by the allocation (as the scheduler copies claim configs).
async fn share(
    client: &kube::Client,
    at: (&str, &str),
    name: &str,
    consumed: Option<Value>,
    config: Option<Value>,
) -> anyhow::Result<(Pod, ResourceClaim)> {
    let allocation = ShareAllocation {
        capacity: None,
        consumed,
        config,
    };
    allocated_share(client, at, name, allocation).await
}

fn uid(claim: &ResourceClaim) -> String {
    claim.metadata.uid.clone().unwrap_or_default()
}

async fn running(b: &TestBox, plugin: &Plugin, pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    pod_running(b, (plugin, 60), pods, name, STEP).await
}

async fn ready(b: &TestBox, plugin: &Plugin) -> anyhow::Result<()> {
    b.wait(STEP, "plugin ready", || async {
        plugin.check_alive()?;
        Ok((plugin.probe("/readyz").await?.0 == 200).then_some(()))
    })
    .await
    .map_err(|e| e.context(plugin.log_tail(60)))
}

/// The running share daemon of the GPU, if any.
fn daemon(gpus: &FakeGpus, gpu: &str) -> Option<nvidia_ml::control::MpsDaemon> {
    gpus.state()
        .mps_daemons
        .into_values()
        .find(|d| d.running && d.visible_devices.as_deref() == Some(gpu))
}

/// (active thread percentage, pinned memory limit) of the claim's namespace.
fn namespace(d: &nvidia_ml::control::MpsDaemon, claim: &str) -> Option<(f64, Option<String>)> {
    let ns = d.servers.get("shares")?.namespaces.get(claim)?;
    Some((ns.active_thread_percentage?, ns.pinned_memory_limit.clone()))
}

async fn condition(
    claims: &Api<ResourceClaim>,
    name: &str,
    type_: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let c = claims.get(name).await?;
    Ok(c.status
        .and_then(|s| s.devices)
        .and_then(|d| d.into_iter().find(|d| d.device == "gpu-0"))
        .and_then(|d| d.conditions)
        .and_then(|cs| cs.into_iter().find(|c| c.type_ == type_))
        .map(|c| (c.status, c.reason, c.message)))
}

/// The kubelet's `FailedPrepareDynamicResources` message on the pod that names every one
/// of `words`.
async fn prepare_failure(
    b: &TestBox,
    client: &kube::Client,
    (ns, pod): (&str, &str),
    words: &[&str],
) -> anyhow::Result<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    b.wait(
        STEP,
        &format!("a failed prepare of {pod} naming {words:?}"),
        || async {
            let list = events
                .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
                .await?;
            Ok(list.items.into_iter().find_map(|e| {
                let m = e.message.unwrap_or_default();
                (e.reason.as_deref() == Some("FailedPrepareDynamicResources")
                    && words.iter().all(|w| m.contains(w)))
                .then_some(m)
            }))
        },
    )
    .await
}

/// [`share`] `name` allocated `(consumed, config)`, then [`prepare_failure`] of its pod
/// naming `words`. Returns the claim.
async fn refused_share(
    b: &TestBox,
    client: &kube::Client,
    at: (&str, &str),
    name: &str,
    (consumed, config): (Option<Value>, Option<Value>),
    words: &[&str],
) -> anyhow::Result<ResourceClaim> {
    let (_, claim) = share(client, at, name, consumed, config).await?;
    prepare_failure(b, client, (at.0, name), words).await?;
    Ok(claim)
}

fn count(d: &nvidia_ml::control::MpsDaemon, prefix: &str) -> usize {
    d.commands.iter().filter(|c| c.starts_with(prefix)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_of_one_gpu_get_their_own_namespaces_on_one_mps_v3_daemon() -> anyhow::Result<()> {
    let b = test_box();
    let node = "node-a";
    let client = b.client().await;
    let gpus = FakeGpus::new("l40s-r615")?;
    let topo = nvidia_ml::control::load_topology(&gpus.topology())?;
    let gpu = topo.gpus[0].uuid.clone();
    let mut plugin = Plugin::start(b, node, &gpus)?;
    let ns = b.create_namespace("compute").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let at = (ns.as_str(), node);

    let (_, a) = share(
        &client,
        at,
        "tgi-a",
        Some(json!({"memory": "18Gi", "compute": "40"})),
        None,
    )
    .await?;
    let (_, c) = share(
        &client,
        at,
        "tgi-b",
        Some(json!({"memory": "12Gi", "compute": "30"})),
        None,
    )
    .await?;
    running(b, &plugin, &pods, "tgi-a").await?;
    running(b, &plugin, &pods, "tgi-b").await?;

    // One daemon for the GPU, protocol 3 in multi-user mode, a namespace per claim with
    // the claim's consumed compute and memory; the GPU in EXCLUSIVE_PROCESS.
    let d = daemon(&gpus, &gpu).expect("a running MPS daemon for the GPU");
    assert_eq!((d.protocol, d.multiuser), (3, true), "{d:?}");
    assert_eq!(
        gpus.state()
            .mps_daemons
            .values()
            .filter(|d| d.running)
            .count(),
        1
    );
    assert_eq!(
        d.servers["shares"].allowed_devices.as_deref(),
        Some(gpu.as_str())
    );
    assert_eq!(namespace(&d, &uid(&a)), Some((40.0, Some("18432M".into()))));
    assert_eq!(namespace(&d, &uid(&c)), Some((30.0, Some("12288M".into()))));
    assert_eq!(
        gpus.state().gpus[&gpu].compute_mode,
        nvidia_ml::control::ComputeMode::ExclusiveProcess
    );
    // Each container reaches its own namespace's socket directory and nothing else.
    let ctr = b
        .container_result(node, &ns, "tgi-a", "ctr")
        .expect("tgi-a's container was prepared");
    assert!(
        ctr["env"]
            .as_array()
            .unwrap()
            .contains(&json!("CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps")),
        "{ctr}"
    );
    let mount = ctr["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/tmp/nvidia-mps")
        .cloned()
        .expect("the MPS pipe mount");
    assert!(
        mount["source"]
            .as_str()
            .unwrap()
            .ends_with(&format!("mps-shares/{gpu}/pipe/shares/{}", uid(&a))),
        "{mount}"
    );
    // The claim says so in its device status.
    let (status, _, message) = b
        .wait(STEP, "tgi-a's compute condition", || async {
            condition(&claims, "tgi-a", "GPUComputeLimitEnforced").await
        })
        .await?;
    assert_eq!(status, "True");
    assert!(message.contains("active thread percentage 40"), "{message}");

    // A plugin restart, then one with the checkpoint lost: the daemon, its namespaces and
    // limits stay as they are (nothing is set again).
    let sets = count(&d, "namespace set");
    let creates = count(&d, "namespace create");
    plugin.restart(&gpus)?;
    ready(b, &plugin).await?;
    let checkpoint = b
        .kubelet_root(node)
        .join(format!("plugins/{DRIVER}/checkpoint.json"));
    plugin.kill();
    std::fs::remove_file(&checkpoint)?;
    plugin.restart(&gpus)?;
    ready(b, &plugin).await?;
    let after = daemon(&gpus, &gpu).expect("the daemon survives plugin restarts");
    assert_eq!(after.pid, d.pid);
    assert_eq!(
        namespace(&after, &uid(&a)),
        Some((40.0, Some("18432M".into())))
    );
    assert_eq!(
        namespace(&after, &uid(&c)),
        Some((30.0, Some("12288M".into())))
    );
    assert_eq!(
        (
            count(&after, "namespace set"),
            count(&after, "namespace create")
        ),
        (sets, creates)
    );

    // The daemon dies while the plugin is down: the next plugin starts it afresh with the
    // live claims' namespaces and limits (their clients must reconnect).
    plugin.kill();
    let pid = rustix::process::Pid::from_raw(d.pid as i32).expect("a daemon pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
    plugin.restart(&gpus)?;
    ready(b, &plugin).await?;
    let d = b
        .wait(STEP, "the share daemon started afresh", || async {
            Ok(daemon(&gpus, &gpu).filter(|n| n.pid != d.pid && namespace(n, &uid(&c)).is_some()))
        })
        .await
        .map_err(|e| e.context(plugin.log_tail(60)))?;
    assert_eq!((d.protocol, d.multiuser), (3, true));
    assert_eq!(namespace(&d, &uid(&a)), Some((40.0, Some("18432M".into()))));
    assert_eq!(namespace(&d, &uid(&c)), Some((30.0, Some("12288M".into()))));

    // A third share joins the running daemon.
    let (_, e) = share(
        &client,
        at,
        "tgi-c",
        Some(json!({"memory": "8Gi", "compute": "20"})),
        None,
    )
    .await?;
    running(b, &plugin, &pods, "tgi-c").await?;
    let joined = daemon(&gpus, &gpu).expect("the daemon");
    assert_eq!(joined.pid, d.pid);
    assert_eq!(
        namespace(&joined, &uid(&e)),
        Some((20.0, Some("8192M".into())))
    );

    // Pods go: their namespaces go; the last one stops the daemon and restores the mode.
    pods.delete("tgi-a", &DeleteParams::default()).await?;
    b.wait(STEP, "tgi-a's namespace deleted", || async {
        let d = daemon(&gpus, &gpu).ok_or_else(|| anyhow::anyhow!("daemon gone too early"))?;
        Ok(namespace(&d, &uid(&a)).is_none().then_some(()))
    })
    .await?;
    assert_eq!(daemon(&gpus, &gpu).map(|d| d.pid), Some(d.pid));
    pods.delete("tgi-b", &DeleteParams::default()).await?;
    pods.delete("tgi-c", &DeleteParams::default()).await?;
    b.wait(
        STEP,
        "the share daemon stopped and the compute mode back to Default",
        || async {
            let mode = gpus.state().gpus[&gpu].compute_mode;
            Ok(
                (daemon(&gpus, &gpu).is_none() && mode == nvidia_ml::control::ComputeMode::Default)
                    .then_some(()),
            )
        },
    )
    .await
    .map_err(|e| e.context(plugin.log_tail(60)))?;

    // Bad input: a share on a GPU another claim holds time-sliced, and a share whose
    // GpuConfig asks for a sharing strategy.
    let time_sliced = json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
        "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}});
    let (_, holder) = share(&client, at, "whole", None, Some(time_sliced.clone())).await?;
    running(b, &plugin, &pods, "whole").await?;
    let late = json!({"memory": "8Gi", "compute": "20"});
    let words = [gpu.as_str(), &uid(&holder), "TimeSlicing"];
    refused_share(b, &client, at, "late", (Some(late), None), &words).await?;
    pods.delete("whole", &DeleteParams::default()).await?;
    pods.delete("late", &DeleteParams::default()).await?;
    let configured = (
        Some(json!({"memory": "8Gi", "compute": "20"})),
        Some(time_sliced),
    );
    let words = [gpu.as_str(), "sharing.strategy", "remove `sharing`"];
    refused_share(b, &client, at, "configured", configured, &words).await?;
    assert!(
        daemon(&gpus, &gpu).is_none(),
        "a refused share starts no daemon"
    );
    pods.delete("configured", &DeleteParams::default()).await?;

    // A daemon that takes a namespace limit and keeps another value fails the claim, naming
    // the GPU and the setting, and the failed prepare leaves no daemon behind; once the
    // daemon behaves, the kubelet's retry prepares it.
    use nvidia_ml::control::{ComputeMode, Fault, NO_EFFECT, Times};
    nvidia_ml::control::inject_fault(
        &gpus.state_path(),
        Fault {
            function: "nvidia-cuda-mps-control namespace set".into(),
            gpu_uuid: None,
            error: NO_EFFECT,
            times: Times::Always,
        },
    )?;
    let consumed = json!({"memory": "8Gi", "compute": "25"});
    let words = [gpu.as_str(), "active_thread_percentage", "wanted 25"];
    let ignored = refused_share(b, &client, at, "ignored", (Some(consumed), None), &words).await?;
    b.wait(STEP, "the failed prepare rolled back", || async {
        let mode = gpus.state().gpus[&gpu].compute_mode;
        Ok((daemon(&gpus, &gpu).is_none() && mode == ComputeMode::Default).then_some(()))
    })
    .await?;
    nvidia_ml::control::clear_faults(&gpus.state_path())?;
    running(b, &plugin, &pods, "ignored").await?;
    let d = daemon(&gpus, &gpu).expect("the daemon");
    assert_eq!(
        namespace(&d, &uid(&ignored)),
        Some((25.0, Some("8192M".into())))
    );
    pods.delete("ignored", &DeleteParams::default()).await?;
    b.wait(STEP, "the share daemon stopped", || async {
        Ok(daemon(&gpus, &gpu).is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_mps_v2_node_refuses_compute_shares_unless_scheduling_only() -> anyhow::Result<()>
{
    let b = test_box();
    let node = "node-b";
    let client = b.client().await;
    let gpus = FakeGpus::new("l40s-single")?;
    let mut plugin = Plugin::start(b, node, &gpus)?;
    let ns = b.create_namespace("compute-v2").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    // All of the GPU's memory (no memory limit to set), 40% of its compute.
    let consumed = json!({"memory": "46068Mi", "compute": "40"});
    let words = [
        "compute share of gpu-0 (40% on GPU-",
        "upgrade the driver to r615",
        "--allow-scheduling-only-shares",
    ];
    refused_share(
        b,
        &client,
        (&ns, node),
        "tgi",
        (Some(consumed), None),
        &words,
    )
    .await?;

    // Allowed scheduling-only: the pod runs, no daemon, the claim says why.
    plugin.terminate()?;
    let plugin = Plugin::start_with(
        b,
        node,
        &gpus,
        "lenient",
        &["--allow-scheduling-only-shares".to_owned()],
    )?;
    running(b, &plugin, &pods, "tgi").await?;
    let (status, reason, message) = b
        .wait(STEP, "the compute condition", || async {
            condition(&claims, "tgi", "GPUComputeLimitEnforced").await
        })
        .await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "SchedulingOnly")
    );
    assert!(message.contains("MPS v2"), "{message}");
    assert!(gpus.state().mps_daemons.values().all(|d| !d.running));
    pods.delete("tgi", &DeleteParams::default()).await?;
    Ok(())
}
