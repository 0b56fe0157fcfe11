//! The kubelet-facing driver of an instance: its own preparer once it holds the instance
//! lock, and until then a forwarder to the lock holder's DRA socket.
//!
//! Owns the choice, per call, between the local driver, the holder and waiting for the
//! take-over (see the hand-over argument in [`super`]). It must not touch prepared state:
//! before the take-over it only relays calls over DRA v1 (the service every gpu-dra
//! version serves) and returns the holder's per-claim answers unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info};

use crate::plugin::{ClaimRef, NodeDriver, PreparedDevice};
use crate::proto::dra_v1 as v1;
use crate::proto::dra_v1::dra_plugin_client::DraPluginClient;

/// How long a call waits for the take-over when the holder cannot be reached; below the
/// kubelet's 45 s DRA call timeout, so the kubelet gets an answer and retries.
pub const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(40);

/// Error answered per claim when the take-over did not finish in time.
pub const TAKE_OVER_PENDING: &str = "the previous gpu-dra instance on this node has stopped and this one has not taken over yet (rolling update); the kubelet will retry";

/// [`NodeDriver`] of an instance; see the module docs.
pub struct HandOverDriver<D> {
    local: watch::Receiver<Option<Arc<D>>>,
    holder: Option<(PathBuf, DraPluginClient<Channel>)>,
    take_over_timeout: Duration,
}

/// Completes the take-over: from [`TakeOver::complete`] on, calls go to the local driver.
pub struct TakeOver<D>(watch::Sender<Option<Arc<D>>>);

impl<D> TakeOver<D> {
    /// Switches every later call to `driver`; calls waiting for the take-over proceed.
    pub fn complete(self, driver: Arc<D>) {
        self.0.send_replace(Some(driver));
        info!("serving prepared state from this instance");
    }
}

fn client(socket: PathBuf) -> DraPluginClient<Channel> {
    // The URI is required by the API but unused: the connector dials the socket, on
    // each (re)connect, so nothing is opened before the first forwarded call.
    let channel = Endpoint::from_static("http://localhost").connect_with_connector_lazy(
        tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }),
    );
    DraPluginClient::new(channel)
}

impl<D: NodeDriver> HandOverDriver<D> {
    /// A driver that answers from the local driver given to [`TakeOver::complete`];
    /// before that, calls go to the holder at `holder_dra_socket` (if any) and otherwise
    /// wait up to `take_over_timeout`.
    pub fn new(
        holder_dra_socket: Option<PathBuf>,
        take_over_timeout: Duration,
    ) -> (Self, TakeOver<D>) {
        let (tx, rx) = watch::channel(None);
        let driver = HandOverDriver {
            local: rx,
            holder: holder_dra_socket.map(|s| (s.clone(), client(s))),
            take_over_timeout,
        };
        (driver, TakeOver(tx))
    }

    fn local_now(&self) -> Option<Arc<D>> {
        self.local.borrow().clone()
    }

    async fn local_eventually(&self) -> Option<Arc<D>> {
        let mut rx = self.local.clone();
        let waited = tokio::time::timeout(self.take_over_timeout, rx.wait_for(Option::is_some));
        match waited.await {
            Ok(Ok(local)) => local.clone(),
            _ => None,
        }
    }

    fn request(claims: &[ClaimRef]) -> Vec<v1::Claim> {
        claims
            .iter()
            .map(|c| v1::Claim {
                namespace: c.namespace.clone(),
                uid: c.uid.clone(),
                name: c.name.clone(),
            })
            .collect()
    }
}

fn pending<T>(claims: &[ClaimRef]) -> BTreeMap<String, Result<T, String>> {
    claims
        .iter()
        .map(|c| (c.uid.clone(), Err(TAKE_OVER_PENDING.to_owned())))
        .collect()
}

fn device(d: v1::Device) -> PreparedDevice {
    PreparedDevice {
        request_names: d.request_names,
        pool_name: d.pool_name,
        device_name: d.device_name,
        cdi_device_ids: d.cdi_device_ids,
        share_id: d.share_id,
    }
}

fn outcome(error: String) -> Result<(), String> {
    if error.is_empty() { Ok(()) } else { Err(error) }
}

impl<D: NodeDriver> NodeDriver for HandOverDriver<D> {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        if let Some(local) = self.local_now() {
            return local.prepare(claims).await;
        }
        if let Some((socket, client)) = &self.holder {
            let request = v1::NodePrepareResourcesRequest {
                claims: Self::request(&claims),
            };
            match client.clone().node_prepare_resources(request).await {
                Ok(answer) => {
                    debug!(holder = %socket.display(), claims = claims.len(), "prepare forwarded to the lock holder");
                    return answer
                        .into_inner()
                        .claims
                        .into_iter()
                        .map(|(uid, r)| {
                            let result = outcome(r.error)
                                .map(|()| r.devices.into_iter().map(device).collect());
                            (uid, result)
                        })
                        .collect();
                }
                Err(status) => {
                    info!(holder = %socket.display(), error = %status.message(), "lock holder unreachable; waiting for the take-over");
                }
            }
        }
        match self.local_eventually().await {
            Some(local) => local.prepare(claims).await,
            None => pending(&claims),
        }
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        if let Some(local) = self.local_now() {
            return local.unprepare(claims).await;
        }
        if let Some((socket, client)) = &self.holder {
            let request = v1::NodeUnprepareResourcesRequest {
                claims: Self::request(&claims),
            };
            match client.clone().node_unprepare_resources(request).await {
                Ok(answer) => {
                    debug!(holder = %socket.display(), claims = claims.len(), "unprepare forwarded to the lock holder");
                    return answer
                        .into_inner()
                        .claims
                        .into_iter()
                        .map(|(uid, r)| (uid, outcome(r.error)))
                        .collect();
                }
                Err(status) => {
                    info!(holder = %socket.display(), error = %status.message(), "lock holder unreachable; waiting for the take-over");
                }
            }
        }
        match self.local_eventually().await {
            Some(local) => local.unprepare(claims).await,
            None => pending(&claims),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::plugin::{PluginServer, PluginServerConfig};

    /// Answers every claim with one device named after `name`, and records the calls.
    struct Recording {
        name: &'static str,
        calls: Mutex<Vec<(&'static str, String)>>,
    }

    impl Recording {
        fn new(name: &'static str) -> Arc<Self> {
            Arc::new(Recording {
                name,
                calls: Mutex::new(Vec::new()),
            })
        }

        fn calls(&self) -> Vec<(&'static str, String)> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl NodeDriver for Recording {
        async fn prepare(
            &self,
            claims: Vec<ClaimRef>,
        ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
            let mut calls = self.calls.lock().unwrap();
            claims
                .into_iter()
                .map(|c| {
                    calls.push(("prepare", c.uid.clone()));
                    let device = PreparedDevice {
                        device_name: self.name.to_owned(),
                        pool_name: "node-a".into(),
                        cdi_device_ids: vec![format!("k/c={}", c.uid)],
                        share_id: Some("share".into()),
                        ..PreparedDevice::default()
                    };
                    let answer = if c.uid == "bad" {
                        Err("bad claim".to_owned())
                    } else {
                        Ok(vec![device])
                    };
                    (c.uid, answer)
                })
                .collect()
        }

        async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
            let mut calls = self.calls.lock().unwrap();
            claims
                .into_iter()
                .map(|c| {
                    calls.push(("unprepare", c.uid.clone()));
                    (c.uid, Ok(()))
                })
                .collect()
        }
    }

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: "ns".into(),
            name: format!("claim-{uid}"),
            uid: uid.into(),
        }
    }

    /// A running holder instance on sockets in `dir`.
    fn holder(dir: &std::path::Path, driver: Arc<Recording>) -> (PathBuf, CancellationToken) {
        let config = PluginServerConfig {
            driver_name: "gpu.gpu-dra.dev".into(),
            registration_socket: dir.join("reg.sock"),
            dra_socket: dir.join("dra.sock"),
            shutdown_grace: Duration::from_secs(1),
        };
        let server = PluginServer::bind(config, driver).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(stop.clone()));
        (dir.join("dra.sock"), stop)
    }

    #[tokio::test]
    async fn forwards_to_the_holder_until_the_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let old = Recording::new("from-old");
        let (socket, _stop) = holder(dir.path(), Arc::clone(&old));
        let (driver, take_over) = HandOverDriver::<Recording>::new(Some(socket), TAKE_OVER_TIMEOUT);

        let answers = driver.prepare(vec![claim("a"), claim("bad")]).await;
        let devices = answers["a"].as_ref().unwrap();
        assert_eq!(devices[0].device_name, "from-old");
        assert_eq!(devices[0].cdi_device_ids, vec!["k/c=a".to_string()]);
        assert_eq!(devices[0].share_id.as_deref(), Some("share"));
        assert_eq!(answers["bad"], Err("bad claim".to_owned()));
        assert_eq!(driver.unprepare(vec![claim("a")]).await["a"], Ok(()));

        let new = Recording::new("from-new");
        take_over.complete(Arc::clone(&new));
        let answers = driver.prepare(vec![claim("b")]).await;
        assert_eq!(answers["b"].as_ref().unwrap()[0].device_name, "from-new");
        assert_eq!(
            old.calls(),
            vec![
                ("prepare", "a".into()),
                ("prepare", "bad".into()),
                ("unprepare", "a".into())
            ]
        );
        assert_eq!(new.calls(), vec![("prepare", "b".into())]);
    }

    #[tokio::test]
    async fn unreachable_holder_waits_for_the_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("dra-gone.sock");
        let (driver, take_over) = HandOverDriver::<Recording>::new(Some(gone), TAKE_OVER_TIMEOUT);
        let driver = Arc::new(driver);
        let call = tokio::spawn({
            let driver = Arc::clone(&driver);
            async move { driver.unprepare(vec![claim("a")]).await }
        });
        let new = Recording::new("from-new");
        take_over.complete(Arc::clone(&new));
        assert_eq!(call.await.unwrap()["a"], Ok(()));
        assert_eq!(new.calls(), vec![("unprepare", "a".into())]);
    }

    #[tokio::test]
    async fn no_take_over_in_time_fails_each_claim_for_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("dra-gone.sock");
        let (driver, _take_over) =
            HandOverDriver::<Recording>::new(Some(gone), Duration::from_millis(50));
        let answers = driver.prepare(vec![claim("a"), claim("b")]).await;
        assert_eq!(answers.len(), 2);
        assert!(
            answers
                .values()
                .all(|a| a == &Err(TAKE_OVER_PENDING.to_owned()))
        );
    }
}
