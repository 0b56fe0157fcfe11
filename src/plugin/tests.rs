//! gRPC over real Unix sockets in a temp dir, through tonic clients.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use super::*;
use crate::proto::dra_v1 as v1;
use crate::proto::dra_v1beta1 as v1beta1;
use crate::proto::pluginregistration as reg;

/// Answers "a" with one device, "b" with an error, and leaves out everything else.
#[derive(Default)]
struct FakeDriver {
    calls: Mutex<Vec<(&'static str, Vec<ClaimRef>)>>,
}

impl NodeDriver for FakeDriver {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        self.calls.lock().unwrap().push(("prepare", claims.clone()));
        let mut out = BTreeMap::new();
        for claim in claims {
            match claim.uid.as_str() {
                "a" => {
                    out.insert(
                        claim.uid,
                        Ok(vec![PreparedDevice {
                            request_names: vec!["gpu".into()],
                            pool_name: "node-1".into(),
                            device_name: "gpu-0".into(),
                            cdi_device_ids: vec!["gpu-dra.dev/claim=a-gpu-0".into()],
                            share_id: Some("share-1".into()),
                        }]),
                    );
                }
                "b" => {
                    out.insert(claim.uid, Err("bad config".into()));
                }
                _ => {}
            }
        }
        out
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        self.calls
            .lock()
            .unwrap()
            .push(("unprepare", claims.clone()));
        claims
            .into_iter()
            .filter(|c| c.uid != "c")
            .map(|c| {
                let answer = if c.uid == "b" {
                    Err("busy".to_owned())
                } else {
                    Ok(())
                };
                (c.uid, answer)
            })
            .collect()
    }
}

struct Running {
    _dir: tempfile::TempDir,
    config: PluginServerConfig,
    driver: Arc<FakeDriver>,
    state: tokio::sync::watch::Receiver<RegistrationState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("kubelet");
    let config = PluginServerConfig {
        driver_name: "gpu.gpu-dra.dev".into(),
        registration_socket: root.join("plugins_registry/gpu.gpu-dra.dev-reg.sock"),
        dra_socket: root.join("plugins/gpu.gpu-dra.dev/dra.sock"),
        shutdown_grace: Duration::from_secs(5),
    };
    let driver = Arc::new(FakeDriver::default());
    let server = PluginServer::bind(config.clone(), Arc::clone(&driver)).unwrap();
    let state = server.registration_state();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    Running {
        _dir: dir,
        config,
        driver,
        state,
        shutdown,
        task,
    }
}

async fn channel(path: &Path) -> Channel {
    let path: PathBuf = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

fn v1_claims(uids: &[&str]) -> Vec<v1::Claim> {
    uids.iter()
        .map(|uid| v1::Claim {
            namespace: "default".into(),
            uid: (*uid).into(),
            name: format!("claim-{uid}"),
        })
        .collect()
}

fn v1beta1_claims(uids: &[&str]) -> Vec<v1beta1::Claim> {
    uids.iter()
        .map(|uid| v1beta1::Claim {
            namespace: "default".into(),
            uid: (*uid).into(),
            name: format!("claim-{uid}"),
        })
        .collect()
}

async fn stop(running: Running) -> PluginServerConfig {
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.task)
        .await
        .expect("server stops within the deadline")
        .unwrap()
        .unwrap();
    running.config
}

#[tokio::test]
async fn registration_get_info_and_status() {
    let mut running = start();
    {
        let mut client = reg::registration_client::RegistrationClient::new(
            channel(&running.config.registration_socket).await,
        );
        let info = client
            .get_info(reg::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "DRAPlugin");
        assert_eq!(info.name, "gpu.gpu-dra.dev");
        assert_eq!(
            info.endpoint,
            running.config.dra_socket.to_string_lossy().as_ref()
        );
        assert_eq!(
            info.supported_versions,
            ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
        );
        client
            .notify_registration_status(reg::RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            })
            .await
            .unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(5),
        running
            .state
            .wait_for(|s| *s == RegistrationState::Registered),
    )
    .await
    .unwrap()
    .unwrap();
    stop(running).await;
}

#[tokio::test]
async fn prepare_and_unprepare_v1() {
    let running = start();
    {
        let mut client =
            v1::dra_plugin_client::DraPluginClient::new(channel(&running.config.dra_socket).await);
        let response = client
            .node_prepare_resources(v1::NodePrepareResourcesRequest {
                claims: v1_claims(&["a", "b", "c"]),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.claims.len(), 3);
        let a = &response.claims["a"];
        assert_eq!(a.error, "");
        assert_eq!(
            a.devices,
            [v1::Device {
                request_names: vec!["gpu".into()],
                pool_name: "node-1".into(),
                device_name: "gpu-0".into(),
                cdi_device_ids: vec!["gpu-dra.dev/claim=a-gpu-0".into()],
                share_id: Some("share-1".into()),
            }]
        );
        assert_eq!(response.claims["b"].error, "bad config");
        assert!(response.claims["b"].devices.is_empty());
        // The driver left "c" out: the kubelet still gets an entry saying so.
        assert_eq!(response.claims["c"].error, MISSING_ANSWER);

        let response = client
            .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                claims: v1_claims(&["a", "b", "c"]),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.claims.len(), 3);
        assert_eq!(response.claims["a"].error, "");
        assert_eq!(response.claims["b"].error, "busy");
        assert_eq!(response.claims["c"].error, MISSING_ANSWER);
    }
    let calls = running.driver.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].1[0],
        ClaimRef {
            namespace: "default".into(),
            name: "claim-a".into(),
            uid: "a".into()
        }
    );
    stop(running).await;
}

#[tokio::test]
async fn prepare_and_unprepare_v1beta1() {
    let running = start();
    {
        let mut client = v1beta1::dra_plugin_client::DraPluginClient::new(
            channel(&running.config.dra_socket).await,
        );
        let response = client
            .node_prepare_resources(v1beta1::NodePrepareResourcesRequest {
                claims: v1beta1_claims(&["a", "c"]),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.claims.len(), 2);
        assert_eq!(
            response.claims["a"].devices,
            [v1beta1::Device {
                request_names: vec!["gpu".into()],
                pool_name: "node-1".into(),
                device_name: "gpu-0".into(),
                cdi_device_ids: vec!["gpu-dra.dev/claim=a-gpu-0".into()],
            }]
        );
        assert_eq!(response.claims["c"].error, MISSING_ANSWER);
        let response = client
            .node_unprepare_resources(v1beta1::NodeUnprepareResourcesRequest {
                claims: v1beta1_claims(&["a"]),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.claims["a"].error, "");
    }
    stop(running).await;
}

#[tokio::test]
async fn sockets_are_private_and_removed_on_shutdown() {
    let running = start();
    for path in [
        &running.config.registration_socket,
        &running.config.dra_socket,
    ] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert!(meta.file_type().is_socket(), "{}", path.display());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            path.display()
        );
    }
    let config = stop(running).await;
    assert!(!config.registration_socket.exists());
    assert!(!config.dra_socket.exists());
}

#[tokio::test]
async fn stale_sockets_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = PluginServerConfig {
        driver_name: "gpu.gpu-dra.dev".into(),
        registration_socket: dir.path().join("plugins_registry/d-reg.sock"),
        dra_socket: dir.path().join("plugins/d/dra.sock"),
        shutdown_grace: Duration::from_secs(5),
    };
    for path in [&config.registration_socket, &config.dra_socket] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    }
    let server = PluginServer::bind(config.clone(), Arc::new(FakeDriver::default())).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    {
        let mut client = reg::registration_client::RegistrationClient::new(
            channel(&config.registration_socket).await,
        );
        let info = client
            .get_info(reg::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "gpu.gpu-dra.dev");
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!config.registration_socket.exists());
}

/// XID events fed through a channel (the test double at the NVML seam).
struct ChannelXids(std::sync::mpsc::Receiver<crate::health::XidEvent>);

impl crate::health::XidSource for ChannelXids {
    fn wait(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<crate::health::XidEvent>, crate::health::WatchError> {
        Ok(self.0.recv_timeout(timeout).ok())
    }
}

#[tokio::test]
async fn health_stream_reports_xid_on_gpu_and_its_mig_devices() {
    use crate::health::{HealthState, XidEvent, spawn_xid_watcher};
    use crate::inventory::fixtures;
    use crate::proto::health_v1 as health;
    use crate::proto::health_v1alpha1 as health_v1alpha1;

    let inventory = fixtures::dgx_h100();
    let mig_gpu = inventory
        .gpus
        .iter()
        .find(|g| g.mig.enabled && !g.mig_devices.is_empty())
        .unwrap()
        .clone();
    let mut expected_unhealthy: Vec<String> = mig_gpu
        .mig_devices
        .iter()
        .map(|m| m.device_name())
        .collect();
    expected_unhealthy.sort();
    let device_count = HealthState::new("node-1", inventory.clone(), 0)
        .snapshot()
        .devices
        .len();
    let state = Arc::new(HealthState::new("node-1", inventory, 100));

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("kubelet");
    let config = PluginServerConfig {
        driver_name: "gpu.gpu-dra.dev".into(),
        registration_socket: root.join("plugins_registry/gpu.gpu-dra.dev-reg.sock"),
        dra_socket: root.join("plugins/gpu.gpu-dra.dev/dra.sock"),
        shutdown_grace: Duration::from_secs(5),
    };
    let server = PluginServer::bind(config.clone(), Arc::new(FakeDriver::default()))
        .unwrap()
        .with_health(state.subscribe());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    let (xids, events) = std::sync::mpsc::channel();
    let watcher = spawn_xid_watcher(ChannelXids(events), Arc::clone(&state), shutdown.clone());

    let mut registration = reg::registration_client::RegistrationClient::new(
        channel(&config.registration_socket).await,
    );
    let info = registration
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1.DRAResourceHealth",
            "v1alpha1.DRAResourceHealth"
        ]
    );

    // A 1.34-1.36 kubelet watches through v1alpha1 and gets the same complete list.
    let mut old_client =
        health_v1alpha1::dra_resource_health_client::DraResourceHealthClient::new(
            channel(&config.dra_socket).await,
        );
    let old_first = old_client
        .node_watch_resources(health_v1alpha1::NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old_first.devices.len(), device_count);
    assert!(old_first.devices.iter().all(|d| d.health
        == health_v1alpha1::HealthStatus::Healthy as i32
        && d.health_check_timeout_seconds == 60));

    let mut client = health::dra_resource_health_client::DraResourceHealthClient::new(
        channel(&config.dra_socket).await,
    );
    let mut stream = client
        .node_watch_resources(health::NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.devices.len(), device_count);
    for d in &first.devices {
        assert_eq!(d.health, health::HealthStatus::Healthy as i32);
        assert_eq!(d.device.as_ref().unwrap().pool_name, "node-1");
        assert_eq!(d.health_check_timeout_seconds, 60);
        assert!(d.last_updated_time >= 100);
        assert!(d.message.is_empty());
    }

    xids.send(XidEvent {
        gpu_uuid: mig_gpu.uuid.clone(),
        xid: 79,
    })
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let unhealthy = loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("UNHEALTHY within the deadline")
            .unwrap()
            .unwrap();
        assert_eq!(
            message.devices.len(),
            device_count,
            "always the complete list"
        );
        let mut unhealthy: Vec<(String, String)> = message
            .devices
            .iter()
            .filter(|d| d.health == health::HealthStatus::Unhealthy as i32)
            .map(|d| (d.device.clone().unwrap().device_name, d.message.clone()))
            .collect();
        if !unhealthy.is_empty() {
            unhealthy.sort();
            break unhealthy;
        }
    };
    let names: Vec<String> = unhealthy.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, expected_unhealthy);
    assert!(unhealthy.iter().all(|(_, m)| m.starts_with("XID 79 (")));

    // Shutdown ends the open stream and stops the watcher.
    shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.message().await {}
    });
    end.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn plain_server_does_not_list_health() {
    let running = start();
    let mut client = reg::registration_client::RegistrationClient::new(
        channel(&running.config.registration_socket).await,
    );
    let info = client
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.supported_versions,
        ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    );
    stop(running).await;
}
