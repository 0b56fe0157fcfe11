//! The kubelet's DRA resource health service (KEP-4680), served as `v1.DRAResourceHealth`
//! (kubelet 1.37+ prefers it) and `v1alpha1.DRAResourceHealth` (kubelets 1.34-1.36; the
//! 1.37-1.39 kubelets keep it for the transition). Both carry the same messages.
//!
//! Owns the translation of [`HealthSnapshot`]s into `NodeWatchResources` stream
//! messages: the complete list at once, again on every change, and at least every
//! [`RESEND_INTERVAL`] so the kubelet never lets a device time out to Unknown while the
//! plugin runs. It must not judge health itself (the `health` module does). Streams end
//! when the server shuts down or the health state is gone.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::health::{Health, HealthSnapshot};
use crate::proto::health_v1::{
    DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesResponse,
    dra_resource_health_server::DraResourceHealth as DraResourceHealthV1,
};
use crate::proto::health_v1alpha1 as v1alpha1;

/// How often the complete list is resent without a change.
pub const RESEND_INTERVAL: Duration = Duration::from_secs(30);
/// `health_check_timeout_seconds` sent with every device: two resend intervals.
pub const HEALTH_CHECK_TIMEOUT_SECONDS: i64 = 60;

/// The health gRPC service over a snapshot receiver; it implements both API versions.
#[derive(Clone)]
pub struct HealthService {
    health: watch::Receiver<HealthSnapshot>,
    resend: Duration,
    stop: CancellationToken,
}

impl HealthService {
    /// Streams `health`, resending every `resend`; open streams end when `stop` is
    /// cancelled.
    pub fn new(
        health: watch::Receiver<HealthSnapshot>,
        resend: Duration,
        stop: CancellationToken,
    ) -> Self {
        Self {
            health,
            resend,
            stop,
        }
    }

    /// The stream of complete lists one `NodeWatchResources` call of API `version` gets
    /// (as v1 messages).
    fn watch(
        &self,
        version: &'static str,
    ) -> impl Stream<Item = NodeWatchResourcesResponse> + Send + 'static {
        info!(api = version, "kubelet watches device health");
        let mut health = self.health.clone();
        let stop = self.stop.clone();
        let resend = self.resend;
        async_stream::stream! {
            let first = response(&health.borrow_and_update());
            yield first;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    changed = health.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                    () = tokio::time::sleep(resend) => {}
                }
                let next = response(&health.borrow_and_update());
                yield next;
            }
        }
    }
}

/// The v1 wire message for `snapshot`: every device, `last_updated_time` the later of
/// the verdict change and the last confirmation by the health watch (Unix seconds).
pub fn response(snapshot: &HealthSnapshot) -> NodeWatchResourcesResponse {
    let devices = snapshot
        .devices
        .iter()
        .map(|d| DeviceHealth {
            device: Some(DeviceIdentifier {
                pool_name: d.pool.clone(),
                device_name: d.device.clone(),
            }),
            health: match d.health {
                Health::Unknown => HealthStatus::Unknown,
                Health::Healthy => HealthStatus::Healthy,
                Health::Unhealthy => HealthStatus::Unhealthy,
            } as i32,
            last_updated_time: d.last_updated.max(snapshot.checked_at),
            health_check_timeout_seconds: HEALTH_CHECK_TIMEOUT_SECONDS,
            message: d.message.clone(),
        })
        .collect();
    NodeWatchResourcesResponse { devices }
}

/// The same list as a v1alpha1 message: the two versions have identical fields and
/// enum values (k8s.io/kubelet dra-health v1 and v1alpha1).
pub fn response_v1alpha1(v1: NodeWatchResourcesResponse) -> v1alpha1::NodeWatchResourcesResponse {
    let devices = v1
        .devices
        .into_iter()
        .map(|d| v1alpha1::DeviceHealth {
            device: d.device.map(|id| v1alpha1::DeviceIdentifier {
                pool_name: id.pool_name,
                device_name: id.device_name,
            }),
            health: d.health,
            last_updated_time: d.last_updated_time,
            health_check_timeout_seconds: d.health_check_timeout_seconds,
            message: d.message,
        })
        .collect();
    v1alpha1::NodeWatchResourcesResponse { devices }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl DraResourceHealthV1 for HealthService {
    type NodeWatchResourcesStream = Boxed<NodeWatchResourcesResponse>;

    async fn node_watch_resources(
        &self,
        _: Request<crate::proto::health_v1::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        Ok(Response::new(Box::pin(self.watch("v1").map(Ok))))
    }
}

#[tonic::async_trait]
impl v1alpha1::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = Boxed<v1alpha1::NodeWatchResourcesResponse>;

    async fn node_watch_resources(
        &self,
        _: Request<v1alpha1::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        Ok(Response::new(Box::pin(
            self.watch("v1alpha1").map(|r| Ok(response_v1alpha1(r))),
        )))
    }
}
