//! The DRA health service of the real `gpu-dra kubelet-plugin` on the tests/cluster box
//! (KEP-4680, `v1`, as a 1.37 kubelet watches it): a tonic client of our own on the plugin's DRA socket sees every published
//! device healthy, then, after the fake NVML raises XID 79 on one GPU, that GPU's
//! devices (here its MIG devices) UNHEALTHY with a message naming XID 79; the box's
//! kubelet opens its own health stream too.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use gpu_dra::proto::health_v1::{
    HealthStatus, NodeWatchResourcesRequest, NodeWatchResourcesResponse,
    dra_resource_health_client::DraResourceHealthClient,
};
use support::driver::{FakeGpus, Plugin};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

async fn dra_channel(path: PathBuf) -> anyhow::Result<Channel> {
    // The URI is required by the API but unused: the connector dials the socket.
    Ok(Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?)
}

/// Devices of GPU `minor` in a message: `gpu-<minor>` or its MIG devices.
fn on_gpu(name: &str, minor: u32) -> bool {
    name == format!("gpu-{minor}") || name.starts_with(&format!("gpu-{minor}-mig-"))
}

fn unhealthy(message: &NodeWatchResourcesResponse) -> Vec<(String, String)> {
    message
        .devices
        .iter()
        .filter(|d| d.health == HealthStatus::Unhealthy as i32)
        .map(|d| {
            (
                d.device.clone().unwrap_or_default().device_name,
                d.message.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_makes_the_gpu_unhealthy() {
    let b = support::shared();
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let topology = nvidia_ml::control::load_topology(&gpus.topology()).unwrap();
    let gpu = &topology.gpus[0];
    let plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let socket = plugin.dra_socket().to_path_buf();

    // The plugin serves health only once its XID event set is registered.
    let mut stream = support::wait_for(STEP, "health stream from the plugin", || {
        let socket = socket.clone();
        async move {
            let mut client = DraResourceHealthClient::new(dra_channel(socket).await?);
            let stream = client
                .node_watch_resources(NodeWatchResourcesRequest {})
                .await?
                .into_inner();
            Ok(Some(stream))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(40)));

    let first = tokio::time::timeout(STEP, stream.message())
        .await
        .expect("first health list in time")
        .unwrap()
        .expect("stream open");
    assert!(
        first
            .devices
            .iter()
            .any(|d| on_gpu(&d.device.clone().unwrap_or_default().device_name, gpu.minor)),
        "GPU {} is published: {first:?}",
        gpu.minor
    );
    for d in &first.devices {
        assert_eq!(d.health, HealthStatus::Healthy as i32, "{d:?}");
        assert_eq!(d.device.as_ref().unwrap().pool_name, NODE);
    }

    nvidia_ml::control::inject_xid(&gpus.state_path(), &gpu.uuid, 79).unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    let bad = loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no UNHEALTHY in time\n--- plugin log ---\n{}",
                    plugin.log_tail(40)
                )
            })
            .unwrap()
            .expect("stream open");
        assert_eq!(message.devices.len(), first.devices.len());
        let bad = unhealthy(&message);
        if !bad.is_empty() {
            break bad;
        }
    };
    let expected = first
        .devices
        .iter()
        .filter(|d| on_gpu(&d.device.as_ref().unwrap().device_name, gpu.minor))
        .count();
    assert_eq!(bad.len(), expected, "{bad:?}");
    for (name, message) in &bad {
        assert!(on_gpu(name, gpu.minor), "{name}");
        assert!(message.contains("XID 79"), "{name}: {message}");
    }
    plugin.check_alive().unwrap();

    // The box's 1.37 kubelet (ResourceHealthStatus gate on) opens its own stream after
    // registering the plugin, choosing v1 from the versions offered: the plugin logs
    // one line per stream with the API version.
    support::wait_for(STEP, "the kubelet's health stream", || {
        let streams = plugin
            .log_tail(2000)
            .matches(r#"kubelet watches device health api="v1""#)
            .count();
        async move { Ok((streams >= 2).then_some(())) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(40)));
}
