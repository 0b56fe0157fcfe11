//! The slice reconciler: the only writer of this driver's ResourceSlices for this node.
//!
//! Owns: server-side apply (field manager = driver name, forced) of the desired slices,
//! deletion of stale ones, the pool generation, drift repair (the kubelet deletes a node's
//! slices at its start and 30 s after the plugin disconnects; anyone may edit them) and
//! re-publication when a new inventory arrives on a `tokio::sync::watch` channel.
//!
//! The decisions are pure and live in [`super::plan`]; the loop in [`Reconciler::run`]
//! only executes plans. A dropped field is reported once (log and
//! [`PublishStatus::dropped_fields`]), the matching [`SliceFeatures`] flag is turned off,
//! and it is ignored when comparing, so we never re-apply in a loop. Device taints of
//! unhealthy GPUs ([`Reconciler::with_health`]) are re-published on every health change;
//! when the API server drops taints, those GPUs' devices are withheld instead.
//!

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

use super::desired::{SliceFeatures, desired_slices_with};
use super::plan::{Published, dropped_fields, plan, with_generation};
use super::taints::{HealthTaints, TaintEffect};
use crate::health::UnhealthyGpus;
use crate::inventory::Inventory;

/// Where publication stands; sent on a watch channel after every reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStatus {
    /// Pool generation last published.
    pub generation: i64,
    /// Number of slices in the pool.
    pub slices: usize,
    /// Number of devices published.
    pub devices: usize,
    /// Field paths the API server dropped (feature gate off); each was logged once.
    pub dropped_fields: BTreeSet<String>,
    /// True when the last reconcile found or left the API server in the desired state.
    pub in_sync: bool,
    /// The last reconcile error, if the last attempt failed.
    pub last_error: Option<String>,
    /// How long the last pass took (read by the metrics).
    pub last_pass: Duration,
}

/// Errors of one reconcile pass (the loop retries with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Server-side apply of a slice failed.
    #[error("applying ResourceSlice {slice}")]
    Apply {
        /// Slice name.
        slice: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a stale slice failed.
    #[error("deleting ResourceSlice {slice}")]
    Delete {
        /// Slice name.
        slice: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading the Node (for its UID) failed.
    #[error("reading Node {node}")]
    NodeLookup {
        /// Node name.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The watch of our slices ended (the stream is infinite unless the client is gone).
    #[error("watch of ResourceSlices for node {node} ended")]
    WatchEnded {
        /// Node name.
        node: String,
    },
}

/// First retry delay after a failed reconcile; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Publishes the inventory of one node as ResourceSlices and keeps them there.
pub struct Reconciler {
    api: Api<ResourceSlice>,
    driver: String,
    node: String,
    node_uid: String,
    features: SliceFeatures,
    last: Option<Published>,
    dropped: BTreeSet<String>,
    unhealthy: watch::Receiver<UnhealthyGpus>,
    taint_effect: TaintEffect,
    /// Keeps the default (empty) health channel open when none was given.
    _no_health: Option<watch::Sender<UnhealthyGpus>>,
}

impl Reconciler {
    /// A reconciler for `driver` on node `node` (`node_uid` for the owner reference).
    /// `features` are the optional fields to try; dropped ones are turned off at run time.
    pub fn new(
        client: kube::Client,
        driver: &str,
        node: &str,
        node_uid: &str,
        features: SliceFeatures,
    ) -> Self {
        let (no_health, unhealthy) = watch::channel(UnhealthyGpus::new());
        Reconciler {
            api: Api::all(client),
            driver: driver.to_string(),
            node: node.to_string(),
            node_uid: node_uid.to_string(),
            features,
            last: None,
            dropped: BTreeSet::new(),
            unhealthy,
            taint_effect: TaintEffect::default(),
            _no_health: Some(no_health),
        }
    }

    /// Taints the devices of the GPUs on `unhealthy` with `effect` (see
    /// [`super::taints`]), re-publishing on every change.
    pub fn with_health(
        mut self,
        unhealthy: watch::Receiver<UnhealthyGpus>,
        effect: TaintEffect,
    ) -> Self {
        self.unhealthy = unhealthy;
        self.taint_effect = effect;
        self._no_health = None;
        self
    }

    /// Like [`Reconciler::new`], reading the Node's UID (for the owner reference) from the
    /// API server.
    pub async fn for_node(
        client: kube::Client,
        driver: &str,
        node: &str,
        features: SliceFeatures,
    ) -> Result<Self, ReconcileError> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let found = nodes
            .get(node)
            .await
            .map_err(|source| ReconcileError::NodeLookup {
                node: node.to_string(),
                source,
            })?;
        let uid = found.metadata.uid.unwrap_or_default();
        Ok(Self::new(client, driver, node, &uid, features))
    }

    /// Field selector for this driver's slices on this node.
    pub fn field_selector(driver: &str, node: &str) -> String {
        format!("spec.nodeName={node},spec.driver={driver}")
    }

    /// Runs until `shutdown` completes: watches our slices, reconciles on every watch event
    /// and inventory change, retries failures with exponential backoff, and reports on
    /// `status`. Returns an error only when the watch stream ends.
    pub async fn run(
        mut self,
        mut inventory: watch::Receiver<Inventory>,
        status: watch::Sender<PublishStatus>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ReconcileError> {
        let (store, writer) = reflector::store::<ResourceSlice>();
        let config =
            watcher::Config::default().fields(&Self::field_selector(&self.driver, &self.node));
        let events = reflector(writer, watcher(self.api.clone(), config).default_backoff());
        let mut events = std::pin::pin!(events);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ready = false;
        let mut dirty = true;
        let mut inventory_open = true;
        let mut health_open = true;
        let mut backoff = MIN_BACKOFF;
        // The retry backoff timer, reset after each failed pass; a select! arm, not a
        // synchronisation sleep.
        let retry = tokio::time::sleep(Duration::ZERO);
        let mut retry = std::pin::pin!(retry);
        let mut retry_pending = false;
        loop {
            if !(dirty && ready) || retry_pending {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    changed = inventory.changed(), if inventory_open => {
                        // A closed sender leaves the last inventory in place.
                        inventory_open = changed.is_ok();
                        dirty = true;
                    }
                    changed = self.unhealthy.changed(), if health_open => {
                        health_open = changed.is_ok();
                        dirty = true;
                    }
                    event = events.next() => match event {
                        Some(Ok(watcher::Event::InitDone)) => { ready = true; dirty = true; }
                        Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                        Some(Ok(_)) => dirty = true,
                        Some(Err(e)) => tracing::warn!(error = %e, node = %self.node, "watching ResourceSlices"),
                        None => return Err(ReconcileError::WatchEnded { node: self.node.clone() }),
                    },
                    () = &mut retry, if retry_pending => { retry_pending = false; dirty = true; }
                }
                continue;
            }
            dirty = false;
            let inv = inventory.borrow_and_update().clone();
            let existing: Vec<ResourceSlice> =
                store.state().iter().map(|s| (**s).clone()).collect();
            let started = tokio::time::Instant::now();
            match self.reconcile_once(&inv, &existing).await {
                Ok(mut report) => {
                    report.status.last_pass = started.elapsed();
                    backoff = MIN_BACKOFF;
                    // A newly dropped field changes the desired slices: go again.
                    dirty = report.features_changed;
                    status.send_replace(report.status);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reconciling ResourceSlices");
                    status.send_modify(|s| {
                        s.in_sync = false;
                        s.last_error = Some(format!("{e}: {}", source_chain(&e)));
                        s.last_pass = started.elapsed();
                    });
                    retry.as_mut().reset(tokio::time::Instant::now() + backoff);
                    retry_pending = true;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One pass: compute desired slices and the plan, then execute it.
    #[tracing::instrument(name = "reconcile_slices", skip_all, fields(node = %self.node))]
    async fn reconcile_once(
        &mut self,
        inv: &Inventory,
        existing: &[ResourceSlice],
    ) -> Result<PassReport, ReconcileError> {
        let features = self.features.without_dropped(&self.dropped);
        let health = HealthTaints::new(
            &self.driver,
            self.taint_effect,
            self.unhealthy.borrow_and_update().clone(),
        );
        let desired = desired_slices_with(
            inv,
            &health,
            &self.driver,
            &self.node,
            &self.node_uid,
            0,
            &features,
        );
        let plan = plan(&desired, existing, self.last.as_ref(), &self.dropped);
        self.last = Some(Published {
            generation: plan.generation,
            content: desired.iter().map(|s| with_generation(s, 0)).collect(),
        });
        let params = PatchParams::apply(&self.driver).force();
        let mut newly_dropped = BTreeSet::new();
        for slice in &plan.apply {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let stored = self
                .api
                .patch(&name, &params, &Patch::Apply(slice))
                .await
                .map_err(|source| ReconcileError::Apply {
                    slice: name.clone(),
                    source,
                })?;
            if let (Ok(sent), Ok(got)) = (
                serde_json::to_value(&slice.spec),
                serde_json::to_value(&stored.spec),
            ) {
                for path in dropped_fields(&sent, &got, "spec") {
                    if !self.dropped.contains(&path) {
                        newly_dropped.insert(path);
                    }
                }
            }
            tracing::debug!(slice = %name, "applied ResourceSlice");
        }
        for stale in &plan.delete {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: stale.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match self.api.delete(&stale.name, &dp).await {
                Ok(_) => tracing::info!(slice = %stale.name, "deleted stale ResourceSlice"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(source) => {
                    return Err(ReconcileError::Delete {
                        slice: stale.name.clone(),
                        source,
                    });
                }
            }
        }
        for path in &newly_dropped {
            tracing::warn!(
                field = %path,
                "the API server dropped this ResourceSlice field (feature gate off?); publishing without it"
            );
            if path.starts_with("spec.devices[*].taints") && !health.gpus.is_empty() {
                tracing::warn!(
                    gpus = ?health.gpus.keys().collect::<Vec<_>>(),
                    "device taints are not kept: the devices of unhealthy GPUs are withheld instead"
                );
            }
        }
        let features_changed = !newly_dropped.is_empty()
            && self
                .features
                .without_dropped(self.dropped.iter().chain(&newly_dropped))
                != features;
        self.dropped.extend(newly_dropped);
        if !plan.is_empty() {
            tracing::info!(
                applied = plan.apply.len(),
                deleted = plan.delete.len(),
                "ResourceSlices published"
            );
        }
        Ok(PassReport {
            status: PublishStatus {
                generation: plan.generation,
                slices: desired.len(),
                devices: desired
                    .iter()
                    .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
                    .sum(),
                dropped_fields: self.dropped.clone(),
                in_sync: true,
                last_error: None,
                last_pass: Duration::ZERO,
            },
            features_changed,
        })
    }
}

struct PassReport {
    status: PublishStatus,
    features_changed: bool,
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    #[test]
    fn field_selector_names_node_and_driver() {
        assert_eq!(
            Reconciler::field_selector(DRIVER, "node-a"),
            "spec.nodeName=node-a,spec.driver=gpu.gpu-dra.dev"
        );
    }
}

/// The loop against a mock API server (tower-test), no cluster needed.
#[cfg(test)]
mod loop_tests {
    use super::*;
    use crate::inventory::fixtures::dgx_h100;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::Value;
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    const DRIVER: &str = "gpu.gpu-dra.dev";

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn ok(v: &Value) -> Response<Body> {
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(v).expect("json")))
            .expect("response")
    }

    /// A minimal API server for our ResourceSlices: answers the initial list (empty), keeps
    /// watches open and idle, records server-side applies and stores them without device
    /// taints, as an API server with DRADeviceTaints off does.
    async fn serve(mut handle: Handle, applied: Arc<Mutex<Vec<Value>>>) {
        let mut idle_watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            let method = req.method().clone();
            if method == Method::GET && uri.contains("watch=true") {
                idle_watches.push(send);
                continue;
            }
            if method == Method::GET {
                assert!(
                    uri.contains("spec.nodeName%3Dnode-a")
                        && uri.contains("spec.driver%3Dgpu.gpu-dra.dev"),
                    "{uri}"
                );
                send.send_response(ok(&json!({
                    "apiVersion": "resource.k8s.io/v1",
                    "kind": "ResourceSliceList",
                    "metadata": {"resourceVersion": "1"},
                    "items": []
                })));
                continue;
            }
            assert_eq!(method, Method::PATCH, "{uri}");
            assert!(
                uri.contains("fieldManager=gpu.gpu-dra.dev") && uri.contains("force=true"),
                "{uri}"
            );
            let body = req.into_body().collect_bytes().await.expect("body");
            let mut obj: Value = serde_json::from_slice(&body).expect("apply body is JSON");
            applied.lock().expect("lock").push(obj.clone());
            for d in obj["spec"]["devices"].as_array_mut().into_iter().flatten() {
                d.as_object_mut().expect("device object").remove("taints");
            }
            obj["metadata"]["uid"] = json!("uid-slice");
            obj["metadata"]["resourceVersion"] = json!("2");
            send.send_response(ok(&obj));
        }
    }

    async fn wait_for(
        rx: &mut watch::Receiver<PublishStatus>,
        f: impl Fn(&PublishStatus) -> bool,
    ) -> PublishStatus {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let current = rx.borrow_and_update().clone();
                if f(&current) {
                    return current;
                }
                rx.changed().await.expect("status sender alive");
            }
        })
        .await
        .expect("status reached before the deadline")
    }

    #[tokio::test]
    async fn publishes_falls_back_once_on_dropped_field_and_republishes_on_change() {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let applied = Arc::new(Mutex::new(Vec::new()));
        let server = tokio::spawn(serve(handle, applied.clone()));

        let mut inv = dgx_h100();
        inv.gpus[0].mig.pending = true; // gpu-0 gets a taint
        let (inv_tx, inv_rx) = watch::channel(inv.clone());
        let (status_tx, mut status_rx) = watch::channel(PublishStatus::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let reconciler =
            Reconciler::new(client, DRIVER, "node-a", "uid-1", SliceFeatures::default());
        let task = tokio::spawn(reconciler.run(inv_rx, status_tx, async {
            let _ = stop_rx.await;
        }));

        let st = wait_for(&mut status_rx, |s| s.generation == 2).await;
        assert_eq!(
            st.dropped_fields,
            BTreeSet::from(["spec.devices[*].taints".to_string()])
        );
        assert!(st.in_sync);
        {
            let a = applied.lock().expect("lock");
            assert_eq!(a.len(), 2, "one apply with taints, one without");
            assert_eq!(a[0]["metadata"]["name"], "node-a-gpu-gpu-dra-dev-00");
            assert!(a[0]["spec"]["devices"][0].get("taints").is_some());
            assert!(a[1]["spec"]["devices"][0].get("taints").is_none());
            assert_eq!(a[1]["spec"]["pool"]["generation"], 2);
            assert_eq!(a[1]["metadata"]["ownerReferences"][0]["kind"], "Node");
        }

        inv.gpus.pop();
        inv_tx.send(inv).expect("send inventory");
        let st = wait_for(&mut status_rx, |s| s.generation == 3).await;
        assert_eq!(st.devices, 10);
        assert_eq!(applied.lock().expect("lock").len(), 3);

        stop_tx.send(()).expect("stop");
        task.await.expect("join").expect("clean stop");
        server.abort();
    }
}

/// Drift repair through the watch: a mock API server that streams watch events.
#[cfg(test)]
mod drift_tests {
    use super::*;
    use crate::inventory::fixtures::dgx_h100;
    use bytes::Bytes;
    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use http_body_util::combinators::UnsyncBoxBody;
    use kube::client::Body;
    use serde_json::Value;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    type RespBody = UnsyncBoxBody<Bytes, Infallible>;
    type Handle = tower_test::mock::Handle<Request<Body>, Response<RespBody>>;

    fn full(v: &Value) -> Response<RespBody> {
        let body = http_body_util::Full::new(Bytes::from(serde_json::to_vec(v).expect("json")));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body.boxed_unsync())
            .expect("response")
    }

    enum Control {
        /// Delete every stored slice and tell the watchers (what the kubelet does at start).
        DeleteAll,
        /// Re-send a MODIFIED event for every stored slice, unchanged.
        Nudge,
    }

    /// An API server for our slices with a real watch stream: applies are stored and
    /// announced (ADDED / MODIFIED), `Control` messages simulate other writers.
    async fn serve(
        mut handle: Handle,
        mut control: mpsc::Receiver<Control>,
        applied: Arc<Mutex<Vec<Value>>>,
    ) {
        let mut stored: BTreeMap<String, Value> = BTreeMap::new();
        let mut watchers: Vec<mpsc::Sender<Bytes>> = Vec::new();
        let mut rv = 10u64;
        let announce = |watchers: &mut Vec<mpsc::Sender<Bytes>>, kind: &str, obj: &Value| {
            let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).expect("json");
            line.push(b'\n');
            watchers.retain(|w| w.try_send(Bytes::from(line.clone())).is_ok());
        };
        loop {
            tokio::select! {
                req = handle.next_request() => {
                    let Some((req, send)) = req else { return };
                    let uri = req.uri().to_string();
                    let method = req.method().clone();
                    if method == Method::GET && uri.contains("watch=true") {
                        let (tx, rx) = mpsc::channel::<Bytes>(64);
                        watchers.push(tx);
                        let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)));
                        let body = http_body_util::StreamBody::new(stream).boxed_unsync();
                        send.send_response(Response::builder().status(200).body(body).expect("response"));
                    } else if method == Method::GET {
                        send.send_response(full(&json!({
                            "apiVersion": "resource.k8s.io/v1",
                            "kind": "ResourceSliceList",
                            "metadata": {"resourceVersion": rv.to_string()},
                            "items": stored.values().cloned().collect::<Vec<_>>(),
                        })));
                    } else if method == Method::PATCH {
                        let body = req.into_body().collect_bytes().await.expect("body");
                        let mut obj: Value = serde_json::from_slice(&body).expect("json");
                        applied.lock().expect("lock").push(obj.clone());
                        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
                        rv += 1;
                        obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                        let kind = if stored.contains_key(&name) { "MODIFIED" } else { "ADDED" };
                        stored.insert(name, obj.clone());
                        announce(&mut watchers, kind, &obj);
                        send.send_response(full(&obj));
                    } else {
                        panic!("unexpected {method} {uri}");
                    }
                }
                c = control.recv() => match c {
                    Some(Control::DeleteAll) => {
                        for (_, obj) in std::mem::take(&mut stored) {
                            announce(&mut watchers, "DELETED", &obj);
                        }
                    }
                    Some(Control::Nudge) => {
                        for obj in stored.values() {
                            announce(&mut watchers, "MODIFIED", obj);
                        }
                    }
                    None => return,
                },
            }
        }
    }

    /// Waits until `count` applies were recorded and the reconciler reported after them.
    async fn wait_applied(
        applied: &Arc<Mutex<Vec<Value>>>,
        status: &mut watch::Receiver<PublishStatus>,
        count: usize,
    ) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if applied.lock().expect("lock").len() >= count
                    && status.borrow_and_update().in_sync
                {
                    return;
                }
                status.changed().await.expect("status sender alive");
            }
        })
        .await
        .expect("applies seen before the deadline");
    }

    #[tokio::test]
    async fn deleted_slices_are_repaired_and_converged_state_is_left_alone() {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<RespBody>>();
        let client = kube::Client::new(svc, "default");
        let applied = Arc::new(Mutex::new(Vec::new()));
        let (control_tx, control_rx) = mpsc::channel(4);
        let server = tokio::spawn(serve(handle, control_rx, applied.clone()));

        let (_inv_tx, inv_rx) = watch::channel(dgx_h100());
        let (status_tx, mut status_rx) = watch::channel(PublishStatus::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let reconciler = Reconciler::new(
            client,
            "gpu.gpu-dra.dev",
            "node-a",
            "uid-1",
            SliceFeatures::default(),
        );
        let task = tokio::spawn(reconciler.run(inv_rx, status_tx, async {
            let _ = stop_rx.await;
        }));

        wait_applied(&applied, &mut status_rx, 1).await;
        // The ADDED event of our own apply triggers a pass that must not write again.
        status_rx.mark_unchanged();
        control_tx.send(Control::Nudge).await.expect("control");
        status_rx.changed().await.expect("status");
        status_rx.mark_unchanged();
        control_tx.send(Control::Nudge).await.expect("control");
        status_rx.changed().await.expect("status");
        assert_eq!(
            applied.lock().expect("lock").len(),
            1,
            "no writes when converged"
        );

        // The kubelet deletes the node's slices: they come back at the same generation.
        control_tx.send(Control::DeleteAll).await.expect("control");
        wait_applied(&applied, &mut status_rx, 2).await;
        let a = applied.lock().expect("lock").clone();
        assert_eq!(a[1]["metadata"]["name"], "node-a-gpu-gpu-dra-dev-00");
        assert_eq!(a[1]["spec"]["pool"]["generation"], 1);
        assert_eq!(status_rx.borrow().generation, 1);

        stop_tx.send(()).expect("stop");
        task.await.expect("join").expect("clean stop");
        server.abort();
    }
}
