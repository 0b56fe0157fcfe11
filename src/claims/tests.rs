//! Claim checks, the fixed map, and the cache/GET logic against a mock API server.

use http::{Request, Response};
use k8s_openapi::api::resource::v1::{AllocationResult, ResourceClaimStatus};
use kube::client::Body;
use kube::runtime::watcher;
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

fn source_with(client: Client, cached: Option<ResourceClaim>) -> ClaimSource {
    let (store, mut writer) = reflector::store();
    if let Some(claim) = cached {
        writer.apply_watcher_event(&watcher::Event::Apply(claim));
    }
    ClaimSource::with_store(client, store)
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

#[tokio::test]
async fn watch_fills_the_cache_from_all_namespaces() {
    let (client, mut handle) = mock_client();
    let (source, watch) = ClaimSource::new(client);
    let watch = tokio::spawn(watch.run());

    let (request, send) = handle.next_request().await.expect("initial list");
    assert_eq!(request.method(), http::Method::GET);
    assert_eq!(
        request.uri().path(),
        "/apis/resource.k8s.io/v1/resourceclaims"
    );
    let mut listed = serde_json::to_value(claim("u1", true)).unwrap();
    listed["metadata"]["managedFields"] = serde_json::json!([{"manager": "kube-scheduler"}]);
    send.send_response(json(
        200,
        &serde_json::json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimList",
            "metadata": {"resourceVersion": "10"},
            "items": [listed],
        }),
    ));
    tokio::time::timeout(std::time::Duration::from_secs(5), source.ready())
        .await
        .expect("cache ready within the deadline")
        .unwrap();
    // Served from the cache: the next request the mock sees is the watch, not a GET.
    let found = source.get(&claim_ref("u1")).await.unwrap();
    assert!(
        found
            .metadata
            .managed_fields
            .as_deref()
            .unwrap_or_default()
            .is_empty()
    );
    let (request, _send) = handle.next_request().await.expect("watch request");
    assert!(
        request
            .uri()
            .query()
            .unwrap_or_default()
            .contains("watch=true")
    );
    watch.abort();
}
