//! DRA node service v1 and v1beta1 as thin wrappers over [`NodeDriver`].
//!
//! Owns the mapping between the kubelet's messages and [`ClaimRef`] /
//! [`PreparedDevice`], and the guarantee that every claim of a request gets an entry
//! in the response map (a missing entry would make the kubelet retry without telling
//! anyone why). v1beta1 differs only in having no `share_id`. One tracing span per RPC.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span, warn};

use super::driver::{ClaimRef, NodeDriver, PreparedDevice};
use crate::metrics::events::Rpc;
use crate::proto::{dra_v1 as v1, dra_v1beta1 as v1beta1};

/// Error answered for a claim the driver left out of its answer.
pub const MISSING_ANSWER: &str =
    "internal error: the driver returned no result for this claim; the kubelet will retry";

/// DRA node service v1 (`k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`) over a driver.
pub struct DraV1<D> {
    driver: Arc<D>,
}

/// DRA node service v1beta1 (`k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin`) over a
/// driver; identical to [`DraV1`] except that `share_id` is not sent.
pub struct DraV1beta1<D> {
    driver: Arc<D>,
}

impl<D: NodeDriver> DraV1<D> {
    /// Wraps a driver shared with the other service versions.
    pub fn new(driver: Arc<D>) -> Self {
        Self { driver }
    }
}

impl<D: NodeDriver> DraV1beta1<D> {
    /// Wraps a driver shared with the other service versions.
    pub fn new(driver: Arc<D>) -> Self {
        Self { driver }
    }
}

/// Fields every DRA claim message has; lets both versions share the conversion.
trait ClaimMessage {
    fn parts(&self) -> (&str, &str, &str);
}

impl ClaimMessage for v1::Claim {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.namespace, &self.name, &self.uid)
    }
}

impl ClaimMessage for v1beta1::Claim {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.namespace, &self.name, &self.uid)
    }
}

/// Converts the request's claims; a claim without a UID cannot be answered (the
/// response is keyed by UID), so the whole request is rejected.
fn claim_refs<C: ClaimMessage>(claims: &[C]) -> Result<Vec<ClaimRef>, Status> {
    let mut refs: Vec<ClaimRef> = Vec::with_capacity(claims.len());
    for claim in claims {
        let (namespace, name, uid) = claim.parts();
        if uid.is_empty() {
            return Err(Status::invalid_argument(format!(
                "claim {namespace}/{name} has an empty uid"
            )));
        }
        // The kubelet never repeats a claim in one call; if it does, answer once.
        if refs.iter().any(|r| r.uid == uid) {
            continue;
        }
        refs.push(ClaimRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        });
    }
    Ok(refs)
}

/// Comma-separated claim UIDs for the RPC span's `claim.uid` field.
fn uid_list(claims: &[ClaimRef]) -> String {
    claims
        .iter()
        .map(|c| c.uid.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Keeps exactly one answer per requested claim: the driver's, or [`MISSING_ANSWER`].
/// Answers for claims that were not requested are dropped. Failures are logged here,
/// once, with the claim's identity.
fn complete<T>(
    claims: &[ClaimRef],
    mut answers: BTreeMap<String, Result<T, String>>,
) -> BTreeMap<String, Result<T, String>> {
    let mut out = BTreeMap::new();
    for claim in claims {
        let answer = answers
            .remove(&claim.uid)
            .unwrap_or_else(|| Err(MISSING_ANSWER.to_owned()));
        if let Err(error) = &answer {
            warn!(
                claim.uid = %claim.uid,
                claim.namespace = %claim.namespace,
                claim.name = %claim.name,
                error = %error,
                "claim failed"
            );
        }
        out.insert(claim.uid.clone(), answer);
    }
    out
}

async fn prepare<D: NodeDriver>(
    driver: &D,
    version: &'static str,
    claims: Vec<ClaimRef>,
) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
    let span = info_span!(
        "NodePrepareResources",
        rpc.version = version,
        claims = claims.len(),
        claim.uid = %uid_list(&claims),
    );
    async {
        let started = std::time::Instant::now();
        let answers = complete(&claims, driver.prepare(claims.clone()).await);
        let ok = answers.values().all(Result::is_ok);
        crate::metrics::events::observe_rpc(Rpc::Prepare, ok, started.elapsed());
        answers
    }
    .instrument(span)
    .await
}

async fn unprepare<D: NodeDriver>(
    driver: &D,
    version: &'static str,
    claims: Vec<ClaimRef>,
) -> BTreeMap<String, Result<(), String>> {
    let span = info_span!(
        "NodeUnprepareResources",
        rpc.version = version,
        claims = claims.len(),
        claim.uid = %uid_list(&claims),
    );
    async {
        let started = std::time::Instant::now();
        let answers = complete(&claims, driver.unprepare(claims.clone()).await);
        let ok = answers.values().all(Result::is_ok);
        crate::metrics::events::observe_rpc(Rpc::Unprepare, ok, started.elapsed());
        answers
    }
    .instrument(span)
    .await
}

#[tonic::async_trait]
impl<D: NodeDriver> v1::dra_plugin_server::DraPlugin for DraV1<D> {
    async fn node_prepare_resources(
        &self,
        request: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        let claims = claim_refs(&request.get_ref().claims)?;
        let answers = prepare(self.driver.as_ref(), "v1", claims).await;
        let claims: HashMap<_, _> = answers
            .into_iter()
            .map(|(uid, answer)| {
                let response = match answer {
                    Ok(devices) => v1::NodePrepareResourceResponse {
                        devices: devices
                            .into_iter()
                            .map(|d| v1::Device {
                                request_names: d.request_names,
                                pool_name: d.pool_name,
                                device_name: d.device_name,
                                cdi_device_ids: d.cdi_device_ids,
                                share_id: d.share_id,
                            })
                            .collect(),
                        error: String::new(),
                    },
                    Err(error) => v1::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    },
                };
                (uid, response)
            })
            .collect();
        Ok(Response::new(v1::NodePrepareResourcesResponse { claims }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        let claims = claim_refs(&request.get_ref().claims)?;
        let answers = unprepare(self.driver.as_ref(), "v1", claims).await;
        let claims = answers
            .into_iter()
            .map(|(uid, answer)| {
                let error = answer.err().unwrap_or_default();
                (uid, v1::NodeUnprepareResourceResponse { error })
            })
            .collect();
        Ok(Response::new(v1::NodeUnprepareResourcesResponse { claims }))
    }
}

#[tonic::async_trait]
impl<D: NodeDriver> v1beta1::dra_plugin_server::DraPlugin for DraV1beta1<D> {
    async fn node_prepare_resources(
        &self,
        request: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        let claims = claim_refs(&request.get_ref().claims)?;
        let answers = prepare(self.driver.as_ref(), "v1beta1", claims).await;
        let claims: HashMap<_, _> = answers
            .into_iter()
            .map(|(uid, answer)| {
                let response = match answer {
                    // v1beta1 has no share_id: older kubelets cannot consume it.
                    Ok(devices) => v1beta1::NodePrepareResourceResponse {
                        devices: devices
                            .into_iter()
                            .map(|d| v1beta1::Device {
                                request_names: d.request_names,
                                pool_name: d.pool_name,
                                device_name: d.device_name,
                                cdi_device_ids: d.cdi_device_ids,
                            })
                            .collect(),
                        error: String::new(),
                    },
                    Err(error) => v1beta1::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    },
                };
                (uid, response)
            })
            .collect();
        Ok(Response::new(v1beta1::NodePrepareResourcesResponse {
            claims,
        }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let claims = claim_refs(&request.get_ref().claims)?;
        let answers = unprepare(self.driver.as_ref(), "v1beta1", claims).await;
        let claims = answers
            .into_iter()
            .map(|(uid, answer)| {
                let error = answer.err().unwrap_or_default();
                (uid, v1beta1::NodeUnprepareResourceResponse { error })
            })
            .collect();
        Ok(Response::new(v1beta1::NodeUnprepareResourcesResponse {
            claims,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: "ns".into(),
            name: format!("claim-{uid}"),
            uid: uid.into(),
        }
    }

    #[test]
    fn complete_fills_missing_and_drops_unrequested() {
        let mut answers = BTreeMap::new();
        answers.insert("a".to_owned(), Ok(()));
        answers.insert("z".to_owned(), Ok(()));
        let out = complete(&[claim("a"), claim("b")], answers);
        assert_eq!(out.len(), 2);
        assert_eq!(out["a"], Ok(()));
        assert_eq!(out["b"], Err(MISSING_ANSWER.to_owned()));
    }

    /// Collects formatted log output for one test, without a global subscriber.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Failing;

    impl NodeDriver for Failing {
        async fn prepare(
            &self,
            claims: Vec<ClaimRef>,
        ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
            claims
                .into_iter()
                .map(|c| (c.uid, Err("no such device".to_owned())))
                .collect()
        }
        async fn unprepare(&self, _: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
            BTreeMap::new()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rpc_span_and_claim_errors_carry_claim_uid() {
        use crate::proto::dra_v1::dra_plugin_server::DraPlugin as _;
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let service = DraV1::new(Arc::new(Failing));
        let response = service
            .node_prepare_resources(Request::new(v1::NodePrepareResourcesRequest {
                claims: vec![v1::Claim {
                    namespace: "ns".into(),
                    uid: "uid-1".into(),
                    name: "gpu-claim".into(),
                }],
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.claims["uid-1"].error, "no such device");
        let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(logs.lines().next().unwrap()).unwrap();
        assert_eq!(line["fields"]["claim.uid"], "uid-1");
        assert_eq!(line["fields"]["error"], "no such device");
        assert_eq!(line["span"]["name"], "NodePrepareResources");
        assert_eq!(line["span"]["claim.uid"], "uid-1");
        assert_eq!(line["span"]["rpc.version"], "v1");
    }

    #[test]
    fn claim_refs_rejects_empty_uid_and_dedups() {
        let msg = |uid: &str| v1::Claim {
            namespace: "ns".into(),
            uid: uid.into(),
            name: "n".into(),
        };
        let refs = claim_refs(&[msg("a"), msg("a"), msg("b")]).unwrap();
        assert_eq!(
            refs.iter().map(|r| r.uid.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let err = claim_refs(&[msg("")]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
