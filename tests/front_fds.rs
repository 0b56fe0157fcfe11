//! The kubelet-facing sockets release every connection, however it ends.
//!
//! Its own test binary: it counts this process's open descriptors (/proc/self/fd), so
//! nothing else may run beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_dra::plugin::{ClaimRef, NodeDriver, PluginServer, PluginServerConfig, PreparedDevice};
use gpu_dra::proto::pluginregistration as reg;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};

struct NoClaims;

impl NodeDriver for NoClaims {
    async fn prepare(
        &self,
        _claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        BTreeMap::new()
    }

    async fn unprepare(&self, _claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        BTreeMap::new()
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(Iterator::count)
        .unwrap_or(0)
}

async fn get_info(path: &Path) -> String {
    let path: PathBuf = path.to_owned();
    let channel = Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    let mut client = reg::registration_client::RegistrationClient::new(channel);
    client
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .name
}

/// Waits until at most `want` descriptors are open; returns the last count seen.
async fn settle(want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = open_fds();
        if now <= want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The descriptor count once it has not changed for 20 reads in a row (10 s at most).
async fn steady() -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (open_fds(), 0);
    while same < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = open_fds();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_at_any_point_release_their_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let config = PluginServerConfig {
        driver_name: "gpu.gpu-dra.dev".into(),
        registration_socket: dir.path().join("plugins_registry/gpu.gpu-dra.dev-reg.sock"),
        dra_socket: dir.path().join("plugins/gpu.gpu-dra.dev/dra.sock"),
        shutdown_grace: Duration::from_secs(5),
    };
    let server = PluginServer::bind(config.clone(), Arc::new(NoClaims)).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    // One full call first: the listeners are then in the runtime and every lazily
    // opened descriptor exists; its own connection closes in the background.
    assert_eq!(
        get_info(&config.registration_socket).await,
        "gpu.gpu-dra.dev"
    );
    let baseline = steady().await;

    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for i in 0..500 {
        let socket = if i % 2 == 0 {
            &config.registration_socket
        } else {
            &config.dra_socket
        };
        let mut conn = UnixStream::connect(socket).await.unwrap();
        match i % 5 {
            // Connect and close at once.
            0 => {}
            // Part of a preface, or something that is not HTTP/2.
            1 => conn.write_all(&preface[..10]).await.unwrap(),
            2 => conn
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap(),
            // A preface and SETTINGS, then gone.
            3 => {
                conn.write_all(preface).await.unwrap();
                conn.write_all(&settings).await.unwrap();
            }
            // A frame too large: the front answers GOAWAY and closes.
            _ => {
                conn.write_all(preface).await.unwrap();
                conn.write_all(&settings).await.unwrap();
                conn.write_all(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1])
                    .await
                    .unwrap();
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
                    .await;
                assert!(
                    rest.windows(2).any(|w| w == [0x07, 0x00]),
                    "no GOAWAY among {} bytes",
                    rest.len()
                );
            }
        }
        drop(conn);
    }
    let after = settle(baseline).await;
    assert!(
        after <= baseline,
        "{after} descriptors open after 500 connections, {baseline} before"
    );
    // The server still answers.
    assert_eq!(
        get_info(&config.registration_socket).await,
        "gpu.gpu-dra.dev"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
