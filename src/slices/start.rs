//! Start of ResourceSlice publication: the Node's UID, waited for with backoff.
//!
//! The slices carry an owner reference to the Node (so node deletion garbage-collects
//! them), which needs the Node's UID from the API server. An API server that is not
//! reachable at start must not stop the plugin (the kubelet is served from local state
//! meanwhile), so the lookup is retried with exponential backoff ([`super::reconcile`]'s
//! [`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`]); every failure is reported on the
//! publication status, so `/readyz` names it, and logged when it changes. It must not
//! write anything.

use std::future::Future;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use tokio::sync::watch;

use super::desired::SliceFeatures;
use super::reconcile::{MAX_BACKOFF, MIN_BACKOFF, PublishStatus, ReconcileError, Reconciler};

impl Reconciler {
    /// Like [`Reconciler::new`], reading the Node's UID (for the owner reference) from the
    /// API server once.
    ///
    /// Errors: [`ReconcileError::NodeLookup`] when the Node cannot be read.
    pub async fn for_node(
        client: kube::Client,
        driver: &str,
        node: &str,
        features: SliceFeatures,
    ) -> Result<Self, ReconcileError> {
        let uid = node_uid(&client, node).await?;
        Ok(Self::new(client, driver, node, &uid, features))
    }

    /// Like [`Reconciler::for_node`], asking again with backoff until the API server
    /// answers; each failure is sent on `status` (`last_error`, not in sync). `None` when
    /// `shutdown` completes first.
    pub async fn for_node_when_reachable(
        client: kube::Client,
        driver: &str,
        node: &str,
        features: SliceFeatures,
        status: &watch::Sender<PublishStatus>,
        shutdown: impl Future<Output = ()>,
    ) -> Option<Self> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = MIN_BACKOFF;
        let mut logged: Option<String> = None;
        loop {
            let attempt = tokio::select! {
                () = &mut shutdown => return None,
                uid = node_uid(&client, node) => uid,
            };
            match attempt {
                Ok(uid) => {
                    if logged.is_some() {
                        tracing::info!(node, "API server answered: publishing ResourceSlices");
                    }
                    return Some(Self::new(client, driver, node, &uid, features));
                }
                Err(err) => {
                    let error = crate::prepare::error_chain(&err);
                    if logged.as_ref() != Some(&error) {
                        tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64, "API server not answering: serving the kubelet from local state, ResourceSlices wait");
                        logged = Some(error.clone());
                    }
                    status.send_modify(|s| {
                        s.in_sync = false;
                        s.last_error = Some(error);
                    });
                }
            }
            // The retry backoff (a select! arm, not a synchronisation sleep).
            tokio::select! {
                () = &mut shutdown => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The UID of Node `node`.
async fn node_uid(client: &kube::Client, node: &str) -> Result<String, ReconcileError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let found = nodes
        .get(node)
        .await
        .map_err(|source| ReconcileError::NodeLookup {
            node: node.to_string(),
            source,
        })?;
    Ok(found.metadata.uid.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use std::time::Duration;

    /// An API server that fails `failures` Node GETs (503), then answers.
    async fn serve(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        failures: usize,
    ) {
        let mut seen = 0;
        while let Some((req, send)) = handle.next_request().await {
            assert!(
                req.uri().path().ends_with("/api/v1/nodes/node-a"),
                "{}",
                req.uri()
            );
            seen += 1;
            let (code, body) = if seen <= failures {
                (
                    503,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": "etcd unavailable", "reason": "ServiceUnavailable", "code": 503}),
                )
            } else {
                (
                    200,
                    json!({"kind": "Node", "apiVersion": "v1",
                           "metadata": {"name": "node-a", "uid": "uid-node-a"}}),
                )
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_api_server_and_reports_meanwhile() {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let server = tokio::spawn(serve(handle, 3));
        let (status_tx, status_rx) = watch::channel(PublishStatus::default());
        let began = tokio::time::Instant::now();
        let reconciler = Reconciler::for_node_when_reachable(
            client,
            "gpu.gpu-dra.dev",
            "node-a",
            SliceFeatures::default(),
            &status_tx,
            std::future::pending(),
        )
        .await;
        assert!(reconciler.is_some());
        // Three failures: retried after 200, 400 and 800 ms.
        assert_eq!(began.elapsed(), Duration::from_millis(1400));
        let status = status_rx.borrow().clone();
        assert!(!status.in_sync);
        let error = status.last_error.expect("the failure is reported");
        assert!(
            error.contains("reading Node node-a") && error.contains("etcd unavailable"),
            "{error}"
        );
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn stops_waiting_on_shutdown() {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let server = tokio::spawn(serve(handle, usize::MAX));
        let (status_tx, _status_rx) = watch::channel(PublishStatus::default());
        let reconciler = Reconciler::for_node_when_reachable(
            client,
            "gpu.gpu-dra.dev",
            "node-a",
            SliceFeatures::default(),
            &status_tx,
            tokio::time::sleep(Duration::from_secs(5)),
        )
        .await;
        assert!(reconciler.is_none());
        server.abort();
    }
}
