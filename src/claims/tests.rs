//! Claim checks, the fixed map, the node cache, and the pod watch / GET logic against a
//! mock API server.

use http::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{
    AllocationResult, ResourceClaimConsumerReference, ResourceClaimStatus,
};
use kube::client::Body;
use serde_json::json;
use tower_test::mock;

use super::*;

fn claim_ref(uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        name: "c".into(),
        uid: uid.into(),
    }
}

fn claim(uid: &str, allocated: bool) -> ResourceClaim {
    let mut claim = ResourceClaim::default();
    claim.metadata.namespace = Some("ns".into());
    claim.metadata.name = Some("c".into());
    claim.metadata.uid = Some(uid.into());
    if allocated {
        claim.status = Some(ResourceClaimStatus {
            allocation: Some(AllocationResult::default()),
            ..Default::default()
        });
    }
    claim
}

#[test]
fn verify_checks_uid_then_allocation() {
    assert!(verify(&claim_ref("u1"), Arc::new(claim("u1", true))).is_ok());
    let err = verify(&claim_ref("u1"), Arc::new(claim("u2", true))).unwrap_err();
    assert!(
        matches!(&err, ClaimError::Replaced { expected, found, .. } if expected == "u1" && found == "u2")
    );
    assert!(err.to_string().contains("claim was replaced"));
    let err = verify(&claim_ref("u1"), Arc::new(claim("u1", false))).unwrap_err();
    assert!(matches!(err, ClaimError::NotAllocated { .. }));
}

#[tokio::test]
async fn fixed_claims_lookup() {
    let mut claims = FixedClaims::new();
    claims.insert(claim("u1", true));
    assert!(claims.get(&claim_ref("u1")).await.is_ok());
    assert!(matches!(
        claims.get(&claim_ref("u2")).await,
        Err(ClaimError::Replaced { .. })
    ));
    let other = ClaimRef {
        name: "other".into(),
        ..claim_ref("u1")
    };
    assert!(matches!(
        claims.get(&other).await,
        Err(ClaimError::NotFound { .. })
    ));
}

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

fn json(status: u16, body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// Answers one GET for ns/c with `response`, checking the request path.
async fn serve_one_get(mut handle: Handle, response: Response<Body>) {
    let (request, send) = handle.next_request().await.expect("one API request");
    assert_eq!(request.method(), http::Method::GET);
    assert_eq!(
        request.uri().path(),
        "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c"
    );
    send.send_response(response);
}

/// A live pod `p-<uid>` in ns using claim `c` directly.
fn pod(uid: &str, claim_name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": format!("p-{uid}"), "uid": uid},
        "spec": {"nodeName": "node-a", "containers": [],
                 "resourceClaims": [{"name": "gpu", "resourceClaimName": claim_name}]},
        "status": {"phase": "Running"}
    }))
    .unwrap()
}

fn reserved_for(mut claim: ResourceClaim, pod_uids: &[&str]) -> ResourceClaim {
    let status = claim.status.get_or_insert_with(Default::default);
    status.reserved_for = Some(
        pod_uids
            .iter()
            .map(|uid| ResourceClaimConsumerReference {
                resource: "pods".into(),
                name: format!("p-{uid}"),
                uid: (*uid).into(),
                api_group: None,
            })
            .collect(),
    );
    claim
}

/// A source whose cache knows pod `pod-1` (using claim c) and, if given, claim `cached`.
fn source_with(client: Client, cached: Option<ResourceClaim>) -> ClaimSource {
    let (source, _watch) = ClaimSource::new(client, "node-a");
    {
        let mut cache = source.lock();
        cache.apply(PodClaims::from_pod(&pod("pod-1", "c")).unwrap());
        if let Some(mut claim) = cached {
            if claim
                .status
                .as_ref()
                .is_some_and(|s| s.reserved_for.is_none())
            {
                claim = reserved_for(claim, &["pod-1"]);
            }
            assert!(cache.store(Arc::new(claim)));
        }
    }
    source
}

#[tokio::test]
async fn cache_hit_needs_no_api_call() {
    let (client, handle) = mock_client();
    // With the handle gone, any API call would fail: success proves a cache hit.
    drop(handle);
    let source = source_with(client, Some(claim("u1", true)));
    let found = source.get(&claim_ref("u1")).await.unwrap();
    assert_eq!(found.metadata.uid.as_deref(), Some("u1"));
}

#[tokio::test]
async fn miss_falls_back_to_get() {
    let (client, handle) = mock_client();
    let source = source_with(client, None);
    let server = tokio::spawn(serve_one_get(
        handle,
        json(200, &serde_json::to_value(claim("u1", true)).unwrap()),
    ));
    let found = source.get(&claim_ref("u1")).await.unwrap();
    assert_eq!(found.metadata.uid.as_deref(), Some("u1"));
    server.await.unwrap();
}

#[tokio::test]
async fn uid_mismatch_in_cache_asks_the_api_server() {
    let (client, handle) = mock_client();
    // The cache still has the old claim; the API server has the new one the kubelet means.
    let source = source_with(client, Some(claim("old", true)));
    let server = tokio::spawn(serve_one_get(
        handle,
        json(200, &serde_json::to_value(claim("new", true)).unwrap()),
    ));
    let found = source.get(&claim_ref("new")).await.unwrap();
    assert_eq!(found.metadata.uid.as_deref(), Some("new"));
    server.await.unwrap();
}

#[tokio::test]
async fn replaced_claim_is_reported() {
    let (client, handle) = mock_client();
    let source = source_with(client, None);
    let server = tokio::spawn(serve_one_get(
        handle,
        json(200, &serde_json::to_value(claim("new", true)).unwrap()),
    ));
    let err = source.get(&claim_ref("old")).await.unwrap_err();
    assert!(matches!(err, ClaimError::Replaced { .. }), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn unallocated_in_cache_is_rechecked_then_refused() {
    let (client, handle) = mock_client();
    let source = source_with(client, Some(claim("u1", false)));
    let server = tokio::spawn(serve_one_get(
        handle,
        json(200, &serde_json::to_value(claim("u1", false)).unwrap()),
    ));
    let err = source.get(&claim_ref("u1")).await.unwrap_err();
    assert!(matches!(err, ClaimError::NotAllocated { .. }), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn missing_claim_is_not_found() {
    let (client, handle) = mock_client();
    let source = source_with(client, None);
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "resourceclaims.resource.k8s.io \"c\" not found",
        "reason": "NotFound", "code": 404
    });
    let server = tokio::spawn(serve_one_get(handle, json(404, &status)));
    let err = source.get(&claim_ref("u1")).await.unwrap_err();
    assert!(matches!(err, ClaimError::NotFound { .. }), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn api_failure_keeps_its_source() {
    let (client, handle) = mock_client();
    let source = source_with(client, None);
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "etcd unavailable", "reason": "InternalError", "code": 500
    });
    let server = tokio::spawn(serve_one_get(handle, json(500, &status)));
    let err = source.get(&claim_ref("u1")).await.unwrap_err();
    assert!(matches!(err, ClaimError::Api { .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    server.await.unwrap();
}

/// Answers the next request, which must be a GET of `path`, with `response`.
async fn expect_get(handle: &mut Handle, path: &str, response: Response<Body>) {
    let (request, send) = handle.next_request().await.expect("an API request");
    assert_eq!(request.method(), http::Method::GET);
    assert_eq!(request.uri().path(), path);
    send.send_response(response);
}

const CLAIMS: &str = "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims";

/// A claim document whose opaque parameters nest `levels` deep.
fn deep_claim(name: &str, uid: &str, levels: usize) -> serde_json::Value {
    let mut params = json!(1);
    for _ in 0..levels {
        params = json!([params]);
    }
    let mut doc = serde_json::to_value(claim(uid, true)).unwrap();
    doc["metadata"]["name"] = json!(name);
    doc["spec"] =
        json!({"devices": {"config": [{"opaque": {"driver": "d", "parameters": {"x": params}}}]}});
    doc
}

#[tokio::test]
async fn undecodable_claim_fails_alone_with_a_clear_error() {
    let (client, mut handle) = mock_client();
    let source = source_with(client, Some(claim("u1", true)));
    let deep = ClaimRef {
        namespace: "ns".into(),
        name: "deep".into(),
        uid: "u9".into(),
    };
    let lookup = tokio::spawn({
        let source = source.clone();
        async move { source.get(&deep).await }
    });
    expect_get(
        &mut handle,
        &format!("{CLAIMS}/deep"),
        json(200, &deep_claim("deep", "u9", 200)),
    )
    .await;
    let err = lookup.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ClaimError::Undecodable { name, source: DecodeError::TooDeep { .. }, .. } if name == "deep"),
        "{err}"
    );
    let text = crate::prepare::error_chain(&err);
    assert!(
        text.contains("ns/deep") && text.contains("opaque parameters"),
        "{text}"
    );
    // The other claim is still served from the cache (no API call: the mock is gone).
    drop(handle);
    assert!(source.get(&claim_ref("u1")).await.is_ok());
}

fn list(kind: &str, items: Vec<serde_json::Value>) -> Response<Body> {
    json(
        200,
        &json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "10"}, "items": items}),
    )
}

/// Waits (deadline 5 s) until the cache holds `claims` claims.
async fn wait_claims(source: &ClaimSource, claims: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while source.stats().claims != claims {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cache: {:?}",
            source.stats()
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn pod_watch_fetches_this_nodes_claims_and_drops_them_with_their_pods() {
    let (client, mut handle) = mock_client();
    let (source, watch) = ClaimSource::new(client, "node-a");
    let watch = tokio::spawn(watch.run());

    let (request, send) = handle.next_request().await.expect("initial pod list");
    assert_eq!(request.uri().path(), "/api/v1/pods");
    let query = request.uri().query().unwrap_or_default().to_owned();
    assert!(
        query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{query}"
    );
    // Pod 1 uses claim c directly; pod 2 gets claim "gen" from a template (resolved in
    // its status); pod 3 uses none; pod 4 uses a claim nobody can decode.
    let mut templated = serde_json::to_value(pod("pod-2", "unused")).unwrap();
    templated["spec"]["resourceClaims"] =
        json!([{"name": "gpu", "resourceClaimTemplateName": "t"}]);
    templated["status"]["resourceClaimStatuses"] =
        json!([{"name": "gpu", "resourceClaimName": "gen"}]);
    let mut plain = serde_json::to_value(pod("pod-3", "x")).unwrap();
    plain["spec"]["resourceClaims"] = json!([]);
    send.send_response(list(
        "PodList",
        vec![
            serde_json::to_value(pod("pod-1", "c")).unwrap(),
            templated,
            plain,
            serde_json::to_value(pod("pod-4", "deep")).unwrap(),
        ],
    ));
    let mut gen_claim = serde_json::to_value(reserved_for(claim("u2", true), &["pod-2"])).unwrap();
    gen_claim["metadata"]["name"] = json!("gen");
    let mut watch_request = None;
    let mut fetched = Vec::new();
    for _ in 0..4 {
        let (request, send) = handle
            .next_request()
            .await
            .expect("claim GETs and the watch");
        let path = request.uri().path().to_owned();
        match path.strip_prefix(&format!("{CLAIMS}/")) {
            Some("c") => send.send_response(json(
                200,
                &serde_json::to_value(reserved_for(claim("u1", true), &["pod-1"])).unwrap(),
            )),
            Some("gen") => send.send_response(json(200, &gen_claim)),
            Some("deep") => send.send_response(json(200, &deep_claim("deep", "u4", 200))),
            _ => {
                assert_eq!(path, "/api/v1/pods");
                watch_request = Some((request, send));
                continue;
            }
        }
        fetched.push(path);
    }
    fetched.sort();
    assert_eq!(
        fetched,
        [
            format!("{CLAIMS}/c"),
            format!("{CLAIMS}/deep"),
            format!("{CLAIMS}/gen")
        ]
    );
    wait_claims(&source, 2).await;
    assert_eq!(source.stats().pods, 3);

    // Served from the cache, the undecodable claim's failure notwithstanding.
    let generated = ClaimRef {
        name: "gen".into(),
        ..claim_ref("u2")
    };
    assert!(source.get(&generated).await.is_ok());
    assert!(source.get(&claim_ref("u1")).await.is_ok());

    // Pod 1 goes: its claim goes with it.
    let (request, send) = watch_request.expect("watch request");
    assert!(
        request
            .uri()
            .query()
            .unwrap_or_default()
            .contains("watch=true")
    );
    let mut gone = serde_json::to_value(pod("pod-1", "c")).unwrap();
    gone["metadata"]["resourceVersion"] = json!("11");
    let event = json!({"type": "DELETED", "object": gone});
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(format!("{event}\n").into_bytes()))
            .unwrap(),
    );
    wait_claims(&source, 1).await;
    assert_eq!(source.stats().pods, 2);
    watch.abort();
}

#[tokio::test]
async fn claim_reserved_for_a_live_pod_is_in_use() {
    let (client, mut handle) = mock_client();
    let source = source_with(client, Some(reserved_for(claim("u1", true), &["pod-1"])));
    let check = tokio::spawn({
        let source = source.clone();
        async move { source.in_use_by(&claim_ref("u1")).await }
    });
    // Confirmed against the API server: the pod still runs.
    expect_get(
        &mut handle,
        "/api/v1/namespaces/ns/pods/p-pod-1",
        json(200, &serde_json::to_value(pod("pod-1", "c")).unwrap()),
    )
    .await;
    let holder = check.await.unwrap().expect("in use");
    assert_eq!(holder.uid, "pod-1");
    let err = ClaimError::in_use(&claim_ref("u1"), holder);
    assert!(err.to_string().contains("ns/p-pod-1"), "{err}");

    // The pod was deleted meanwhile (the watch has not said so yet): not in use.
    let check = tokio::spawn({
        let source = source.clone();
        async move { source.in_use_by(&claim_ref("u1")).await }
    });
    let mut deleting = serde_json::to_value(pod("pod-1", "c")).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    expect_get(
        &mut handle,
        "/api/v1/namespaces/ns/pods/p-pod-1",
        json(200, &deleting),
    )
    .await;
    assert_eq!(check.await.unwrap(), None);
}

#[tokio::test]
async fn claim_not_reserved_for_a_live_pod_is_free_without_api_calls() {
    let (client, handle) = mock_client();
    drop(handle);
    // Reserved for another pod only.
    let source = source_with(
        client.clone(),
        Some(reserved_for(claim("u1", true), &["other"])),
    );
    assert_eq!(source.in_use_by(&claim_ref("u1")).await, None);
    // Another UID than the cached claim's: no evidence.
    let source = source_with(
        client.clone(),
        Some(reserved_for(claim("u1", true), &["pod-1"])),
    );
    assert_eq!(source.in_use_by(&claim_ref("u2")).await, None);
    // The pod has terminated.
    let source = source_with(client, Some(reserved_for(claim("u1", true), &["pod-1"])));
    let mut done = pod("pod-1", "c");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    source.lock().apply(PodClaims::from_pod(&done).unwrap());
    assert_eq!(source.in_use_by(&claim_ref("u1")).await, None);
}

#[test]
fn cache_keeps_only_claims_of_known_pods() {
    let mut cache = NodeCache::default();
    let c = Arc::new(reserved_for(claim("u1", true), &["pod-1"]));
    assert!(!cache.store(Arc::clone(&c)), "no pod references it");
    let p1 = PodClaims::from_pod(&pod("pod-1", "c")).unwrap();
    assert_eq!(cache.apply(p1.clone()), [("ns".to_owned(), "c".to_owned())]);
    // In flight: not asked for twice.
    assert!(cache.apply(p1.clone()).is_empty());
    assert!(cache.store(Arc::clone(&c)));
    // A second pod on the claim the cached copy does not list yet: fetch again.
    let p2 = PodClaims::from_pod(&pod("pod-2", "c")).unwrap();
    assert_eq!(cache.apply(p2).len(), 1);
    cache.fetch_failed(&("ns".into(), "c".into()));
    cache.delete("pod-1");
    assert_eq!(cache.stats(), CacheStats { pods: 1, claims: 1 });
    cache.delete("pod-2");
    assert_eq!(cache.stats(), CacheStats { pods: 0, claims: 0 });

    // A re-list drops pods deleted while the watch was down, and their claims.
    cache.apply(p1.clone());
    assert!(cache.store(Arc::clone(&c)));
    cache.relist_start();
    cache.relist_apply(PodClaims::from_pod(&pod("pod-3", "d")).unwrap());
    assert_eq!(cache.stats().claims, 1, "kept until the re-list is done");
    cache.relist_done();
    assert_eq!(cache.stats(), CacheStats { pods: 1, claims: 0 });
}

#[tokio::test]
async fn copy_reserved_only_for_ended_pods_is_not_answered_from() {
    let (client, mut handle) = mock_client();
    // Cached while pod-1 ran; pod-1 has ended and pod-2 is new: the claim may have been
    // deallocated and allocated again since.
    let source = source_with(client, Some(claim("u1", true)));
    let mut done = pod("pod-1", "c");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    source.lock().apply(PodClaims::from_pod(&done).unwrap());
    let lookup = tokio::spawn({
        let source = source.clone();
        async move { source.get(&claim_ref("u1")).await }
    });
    let fresh = reserved_for(claim("u1", true), &["pod-2"]);
    expect_get(
        &mut handle,
        &format!("{CLAIMS}/c"),
        json(200, &serde_json::to_value(fresh).unwrap()),
    )
    .await;
    let found = lookup.await.unwrap().unwrap();
    assert_eq!(
        found
            .status
            .as_ref()
            .unwrap()
            .reserved_for
            .as_ref()
            .unwrap()[0]
            .uid,
        "pod-2"
    );
}
