//! The I/O edge of the node-scoped claim source: the watch of this node's pods, and the
//! GETs of one claim (raw JSON, decoded on its own) and of one pod.
//!
//! The pod watch is a kube-runtime watcher with the field selector `spec.nodeName=<node>`,
//! as kubelets and DaemonSets use, so the API server sends this node only its own pods'
//! changes. The scheduler writes a claim's allocation and reservation before it binds the
//! pod, so a bound pod's claims are fetched (bounded concurrency) as soon as the pod is
//! seen, ahead of the kubelet's prepare call. Must not watch or list ResourceClaims.

use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::GetParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::cache::{ClaimKey, NodeCache, PodClaims};
use super::decode::{DecodeError, decode_claim};

/// How many claim GETs the pod watch runs at once (a re-list of a full node asks for
/// up to `maxPods` claims at once).
pub const FETCH_CONCURRENCY: usize = 8;

/// Why one claim could not be fetched.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// No claim of that name.
    NotFound,
    /// The API server could not be asked or refused.
    Api(kube::Error),
    /// The claim's JSON could not be decoded.
    Decode(DecodeError),
}

/// GETs one ResourceClaim as raw JSON and decodes it with [`decode_claim`].
pub(crate) async fn get_claim(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<ResourceClaim, FetchError> {
    let url = ResourceClaim::url_path(&(), Some(namespace));
    let request = kube::core::Request::new(url)
        .get(name, &GetParams::default())
        .map_err(|e| FetchError::Api(kube::Error::BuildRequest(e)))?;
    match client.request_text(request).await {
        Ok(text) => decode_claim(text.as_bytes()).map_err(FetchError::Decode),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(FetchError::NotFound),
        Err(err) => Err(FetchError::Api(err)),
    }
}

/// GETs one pod; `None` if it no longer exists.
pub(crate) async fn get_pod(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Pod>, kube::Error> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
}

/// The watch that fills a [`super::ClaimSource`]'s cache; run it with [`PodWatch::run`].
pub struct PodWatch {
    pub(crate) cache: Arc<Mutex<NodeCache>>,
    pub(crate) client: Client,
    pub(crate) node_name: String,
}

impl PodWatch {
    /// Watches this node's pods into the cache and fetches the claims they reference,
    /// retrying with backoff; returns only when the watch stream ends (it does not on its
    /// own).
    pub async fn run(self) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let limit = Arc::new(Semaphore::new(FETCH_CONCURRENCY));
        while let Some(event) = stream.next().await {
            let fetch = match event {
                Ok(event) => self.apply(event),
                Err(error) => {
                    warn!(error = %error, node = %self.node_name, "pod watch failed; retrying");
                    continue;
                }
            };
            for key in fetch {
                let (cache, client, limit) = (
                    Arc::clone(&self.cache),
                    self.client.clone(),
                    Arc::clone(&limit),
                );
                tokio::spawn(async move {
                    let Ok(_permit) = limit.acquire_owned().await else {
                        return;
                    };
                    fetch_into(&cache, &client, key).await;
                });
            }
        }
    }

    fn apply(&self, event: watcher::Event<Pod>) -> Vec<ClaimKey> {
        crate::metrics::events::pod_event(&event);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Init => {
                cache.relist_start();
                Vec::new()
            }
            watcher::Event::InitApply(pod) => PodClaims::from_pod(&pod)
                .map(|p| cache.relist_apply(p))
                .unwrap_or_default(),
            watcher::Event::InitDone => {
                cache.relist_done();
                Vec::new()
            }
            watcher::Event::Apply(pod) => PodClaims::from_pod(&pod)
                .map(|p| cache.apply(p))
                .unwrap_or_default(),
            watcher::Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    cache.delete(uid);
                }
                Vec::new()
            }
        }
    }
}

/// Fetches one claim for the cache; a failure is logged and left to prepare's own GET,
/// which reports it to the kubelet for that claim alone.
async fn fetch_into(cache: &Mutex<NodeCache>, client: &Client, key: ClaimKey) {
    let result = get_claim(client, &key.0, &key.1).await;
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    match result {
        Ok(claim) => {
            cache.store(Arc::new(claim));
        }
        Err(error) => {
            cache.fetch_failed(&key);
            match error {
                FetchError::NotFound => {
                    debug!(claim.namespace = %key.0, claim.name = %key.1, "claim of a pod on this node not found")
                }
                FetchError::Api(error) => {
                    warn!(claim.namespace = %key.0, claim.name = %key.1, error = %error, "fetching a claim of a pod on this node failed; prepare asks again")
                }
                FetchError::Decode(error) => {
                    warn!(claim.namespace = %key.0, claim.name = %key.1, error = %error, "claim of a pod on this node cannot be decoded; its prepare will fail")
                }
            }
        }
    }
}
