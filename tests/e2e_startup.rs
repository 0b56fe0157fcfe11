//! End-to-end tests of the plugin's start on the tests/cluster box when something it
//! depends on is not answering: a MIG query that fails once at start must never publish
//! a MIG GPU whole while one of its MIG devices is in use, and an API server that is down
//! at start must not stop the plugin from serving the kubelet from local state. One box
//! and one plugin (dgx-h100-static-mig) for the binary; the scenarios run in order.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use gpu_dra::proto::dra_v1 as v1;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use nvidia_ml::control::{self, Fault, Times};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use support::TestBox;
use support::driver::{DRIVER, FakeGpus, Plugin};
use support::scenario::{
    Env, Step, apply_device_classes, claim_of_pod, create_template, pod, run_steps,
};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);
/// `NVML_ERROR_NOT_SUPPORTED`.
const NOT_SUPPORTED: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_under_faults() {
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
    let steps: [(&str, Step); 2] = [
        ("MIG GPU in use never published whole", |e| {
            Box::pin(mig_gpu_in_use_is_never_published_whole(e))
        }),
        ("API server down at start", |e| {
            Box::pin(api_server_down_at_start(e))
        }),
    ];
    run_steps(&mut env, &steps).await;
}

/// A live MIG claim on gpu-0, the plugin restarted with a one-shot NOT_SUPPORTED from
/// `nvmlDeviceGetMigMode` on gpu-0: no version of our slices ever holds `gpu-0` as a full
/// GPU, the node is told (Events), and the slices return to their shape.
async fn mig_gpu_in_use_is_never_published_whole(e: &mut Env) -> anyhow::Result<()> {
    let before =
        e.b.wait(STEP, "the 12 devices of node-a published", || async {
            e.plugin.check_alive()?;
            let names = published(&e.client).await?;
            Ok((names.len() == 12).then_some(names))
        })
        .await?;
    anyhow::ensure!(!before.contains("gpu-0"), "{before:?}");
    let gpu0 = control::load_topology(&e.gpus.topology())?.gpus[0]
        .uuid
        .clone();
    let ns = e.b.create_namespace("mig-restart").await;
    create_template(
        &e.client,
        &ns,
        "on-gpu-0",
        json!({"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "mig.gpu-dra.dev",
            "selectors": [{"cel": {"expression":
                format!("device.attributes['{DRIVER}'].parentUUID == '{gpu0}'")}}]}}]}),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &pod(
            "mig",
            json!({"name": "gpu", "resourceClaimTemplateName": "on-gpu-0"}),
        ),
    )
    .await?;
    wait_running(e, &pods, "mig").await?;

    // Every version of our slices from here on is looked at.
    let whole_seen = Arc::new(AtomicBool::new(false));
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(watch_for_whole_gpu0(
        e.client.clone(),
        Arc::clone(&whole_seen),
        synced_tx,
    ));
    synced_rx.await?;

    e.plugin.kill();
    control::inject_fault(
        &e.gpus.state_path(),
        Fault {
            function: "nvmlDeviceGetMigMode".into(),
            gpu_uuid: Some(gpu0.clone()),
            error: NOT_SUPPORTED,
            times: Times::Once,
        },
    )?;
    e.plugin.restart(&e.gpus)?;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(e.client.clone());
    let withheld =
        e.b.wait(STEP, "a GPUWithheld Event for gpu-0 on node-a", || async {
            e.plugin.check_alive()?;
            node_event(&events, "GPUWithheld").await
        })
        .await?;
    anyhow::ensure!(withheld.contains("gpu-0"), "event note: {withheld}");
    anyhow::ensure!(e.gpus.state().faults.is_empty(), "the fault fired");
    e.b.wait(
        STEP,
        "a GPUPublished Event and the slices in shape",
        || async {
            e.plugin.check_alive()?;
            Ok((node_event(&events, "GPUPublished").await?.is_some()
                && published(&e.client).await? == before)
                .then_some(()))
        },
    )
    .await?;
    watch.abort();
    anyhow::ensure!(
        !whole_seen.load(Ordering::SeqCst),
        "a version of the slices held gpu-0 as a full GPU"
    );
    delete_and_wait_gone(e, &pods, "mig").await
}

/// Sets `seen` if any version of this node's slices holds the device `gpu-0`; `synced`
/// fires once the initial list is in.
async fn watch_for_whole_gpu0(
    client: kube::Client,
    seen: Arc<AtomicBool>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let api: Api<ResourceSlice> = Api::all(client);
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    let mut stream = std::pin::pin!(watcher(api, config));
    let mut synced = Some(synced);
    while let Some(event) = stream.next().await {
        let slice = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(watcher::Event::InitDone) => {
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
                continue;
            }
            _ => continue,
        };
        if slice
            .spec
            .devices
            .iter()
            .flatten()
            .any(|d| d.name == "gpu-0")
        {
            seen.store(true, Ordering::SeqCst);
        }
    }
}

/// The plugin restarted while its API server is unreachable (a TCP proxy in front of the
/// box's apiserver, refusing): it serves the kubelet (unprepare of a checkpointed claim
/// works, prepare of an unknown claim fails naming the API server), is not ready, and
/// publishes the slices once the API server answers.
async fn api_server_down_at_start(e: &mut Env) -> anyhow::Result<()> {
    let ns = e.b.create_namespace("offline").await;
    create_template(
        &e.client,
        &ns,
        "one-gpu",
        json!({"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}]}),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &pod(
            "offline",
            json!({"name": "gpu", "resourceClaimTemplateName": "one-gpu"}),
        ),
    )
    .await?;
    wait_running(e, &pods, "offline").await?;
    let claim_name = claim_of_pod(&pods, "offline").await?;
    let claims: Api<ResourceClaim> = Api::namespaced(e.client.clone(), &ns);
    let uid = claims
        .get(&claim_name)
        .await?
        .metadata
        .uid
        .ok_or_else(|| anyhow::anyhow!("claim without a UID"))?;
    let spec =
        e.b.cdi_dir(NODE)
            .join(format!("gpu-dra.dev-claim_{uid}.json"));
    anyhow::ensure!(spec.exists(), "{} written by prepare", spec.display());

    e.plugin.kill();
    let slices: Api<ResourceSlice> = Api::all(e.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    slices
        .delete_collection(&DeleteParams::default(), &lp)
        .await?;
    let proxy = ApiProxy::start(apiserver_address(e.b)?).await?;
    let kubeconfig = e.b.state_dir().join(format!("plugin-{NODE}.kubeconfig"));
    point_kubeconfig_at(&kubeconfig, proxy.address)?;
    e.plugin.restart(&e.gpus)?;

    let socket = e.plugin.dra_socket().to_path_buf();
    let claim = v1::Claim {
        namespace: ns.clone(),
        uid: uid.clone(),
        name: claim_name.clone(),
    };
    let plugin = &e.plugin;
    let answer =
        e.b.wait(
            STEP,
            "NodeUnprepareResources answered while the API server is down",
            || {
                let (socket, claim) = (socket.clone(), claim.clone());
                async move {
                    plugin.check_alive()?;
                    let mut client = dra_client(socket).await?;
                    let response = client
                        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                            claims: vec![claim],
                        })
                        .await?
                        .into_inner();
                    Ok(Some(response))
                }
            },
        )
        .await?;
    let error = answer
        .claims
        .get(&uid)
        .map(|r| r.error.clone())
        .ok_or_else(|| anyhow::anyhow!("no answer for the claim: {answer:?}"))?;
    anyhow::ensure!(error.is_empty(), "unprepare failed: {error}");
    anyhow::ensure!(!spec.exists(), "{} removed by unprepare", spec.display());
    let checkpoint: Value = serde_json::from_slice(&std::fs::read(
        e.b.kubelet_root(NODE)
            .join(format!("plugins/{DRIVER}/checkpoint.json")),
    )?)?;
    anyhow::ensure!(
        checkpoint["claims"].get(&uid).is_none(),
        "the claim left the checkpoint: {}",
        checkpoint["claims"]
    );

    let mut client = dra_client(socket.clone()).await?;
    let prepared = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![v1::Claim {
                namespace: ns.clone(),
                uid: "uid-not-here".into(),
                name: "not-here".into(),
            }],
        })
        .await?
        .into_inner();
    let error = prepared
        .claims
        .get("uid-not-here")
        .map(|r| r.error.clone())
        .unwrap_or_default();
    anyhow::ensure!(error.contains("API server"), "prepare error: {error:?}");

    let (status, body) = e.plugin.probe("/readyz").await?;
    anyhow::ensure!(status != 200, "ready without slices: {body}");
    anyhow::ensure!(body.contains("[-]resourceslices"), "{body}");
    anyhow::ensure!(
        slices.list(&lp).await?.items.is_empty(),
        "slices published without an API server"
    );

    proxy.up.store(true, Ordering::SeqCst);
    e.b.wait(
        STEP,
        "slices published once the API server answers",
        || async {
            e.plugin.check_alive()?;
            Ok((published(&e.client).await?.len() == 12).then_some(()))
        },
    )
    .await?;
    e.b.wait(STEP, "/readyz ok", || async {
        let (status, _) = e.plugin.probe("/readyz").await?;
        Ok((status == 200).then_some(()))
    })
    .await?;
    delete_and_wait_gone(e, &pods, "offline").await
}

/// A TCP proxy to the API server that drops every connection until `up` is set.
struct ApiProxy {
    address: SocketAddr,
    up: Arc<AtomicBool>,
}

impl ApiProxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(false));
        let forwarding = Arc::clone(&up);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !forwarding.load(Ordering::SeqCst) {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(ApiProxy { address, up })
    }
}

/// The box's API server address, from its admin kubeconfig.
fn apiserver_address(b: &TestBox) -> anyhow::Result<SocketAddr> {
    let kc = kube::config::Kubeconfig::read_from(b.kubeconfig())?;
    let server = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .ok_or_else(|| anyhow::anyhow!("admin kubeconfig without a server"))?;
    let uri: http::Uri = server.parse()?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("server {server} without host:port"))?;
    std::net::ToSocketAddrs::to_socket_addrs(authority.as_str())?
        .next()
        .ok_or_else(|| anyhow::anyhow!("server {server} does not resolve"))
}

/// Rewrites the server of `kubeconfig` to `https://<address>` (same host, so TLS checks hold).
fn point_kubeconfig_at(kubeconfig: &PathBuf, address: SocketAddr) -> anyhow::Result<()> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig)?)?;
    doc["clusters"][0]["cluster"]["server"] = serde_yaml::Value::from(format!("https://{address}"));
    std::fs::write(kubeconfig, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

async fn dra_client(
    socket: PathBuf,
) -> anyhow::Result<v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(v1::dra_plugin_client::DraPluginClient::new(channel))
}

/// Names of the devices in this node's slices.
async fn published(client: &kube::Client) -> anyhow::Result<BTreeSet<String>> {
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    Ok(slices
        .list(&lp)
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.spec.devices.unwrap_or_default())
        .map(|d| d.name)
        .collect())
}

/// The note of the newest Event with `reason` on node-a, if any.
async fn node_event(
    events: &Api<k8s_openapi::api::events::v1::Event>,
    reason: &str,
) -> anyhow::Result<Option<String>> {
    let list = events.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .rev()
        .find(|ev| {
            ev.reason.as_deref() == Some(reason)
                && ev.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NODE)
        })
        .map(|ev| ev.note.unwrap_or_default()))
}

async fn wait_running(e: &Env, pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    e.b.wait(STEP, &format!("pod {name} Running"), || async {
        e.plugin.check_alive()?;
        let p = pods.get(name).await?;
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        Ok((phase == "Running").then_some(()))
    })
    .await
}

async fn delete_and_wait_gone(e: &Env, pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    pods.delete(name, &DeleteParams::default()).await?;
    e.b.wait(STEP, &format!("pod {name} gone (unprepared)"), || async {
        Ok(pods.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}
