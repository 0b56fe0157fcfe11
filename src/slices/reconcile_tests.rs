//! Tests of the slice reconciler ([`super::reconcile`]): the field selector, the loop
//! against a mock API server (tower-test, no cluster needed) with a dropped field, and
//! drift repair through a mock watch stream.

mod names {
    use super::super::reconcile::*;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    #[test]
    fn field_selector_names_node_and_driver() {
        assert_eq!(
            Reconciler::field_selector(DRIVER, "node-a"),
            "spec.nodeName=node-a,spec.driver=gpu.gpu-dra.dev"
        );
    }
}

mod loop_tests {
    use super::super::desired::SliceFeatures;
    use super::super::reconcile::*;
    use crate::inventory::fixtures::dgx_h100;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::Value;
    use serde_json::json;
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::sync::watch;

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

mod drift_tests {
    use super::super::desired::SliceFeatures;
    use super::super::reconcile::*;
    use crate::inventory::fixtures::dgx_h100;
    use bytes::Bytes;
    use futures::StreamExt;
    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use http_body_util::combinators::UnsyncBoxBody;
    use kube::client::Body;
    use serde_json::Value;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio::sync::watch;
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
