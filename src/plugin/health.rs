//! The kubelet's DRA resource health service (`v1alpha1.DRAResourceHealth`, KEP-4680).
//!
//! Owns the translation of [`HealthSnapshot`]s into `NodeWatchResources` stream
//! messages: the complete list at once, again on every change, and at least every
//! [`RESEND_INTERVAL`] so the kubelet never lets a device time out to Unknown while the
//! plugin runs. It must not judge health itself (the `health` module does). Streams end
//! when the server shuts down or the health state is gone.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::health::{Health, HealthSnapshot};
use crate::proto::health_v1alpha1::{
    DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesRequest,
    NodeWatchResourcesResponse, dra_resource_health_server::DraResourceHealth,
};

/// How often the complete list is resent without a change.
pub const RESEND_INTERVAL: Duration = Duration::from_secs(30);
/// `health_check_timeout_seconds` sent with every device: two resend intervals.
pub const HEALTH_CHECK_TIMEOUT_SECONDS: i64 = 60;

/// The health gRPC service over a snapshot receiver.
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
}

/// The wire message for `snapshot`: every device, `last_updated_time` the later of the
/// verdict change and the last confirmation by the health watch.
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

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<NodeWatchResourcesResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = ResponseStream;

    async fn node_watch_resources(
        &self,
        _: Request<NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        info!("kubelet watches device health");
        let mut health = self.health.clone();
        let stop = self.stop.clone();
        let resend = self.resend;
        let stream = async_stream::stream! {
            let first = response(&health.borrow_and_update());
            yield Ok(first);
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
                yield Ok(next);
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
