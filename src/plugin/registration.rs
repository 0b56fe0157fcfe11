//! Kubelet plugin watcher registration service (`pluginregistration.Registration`).
//!
//! Owns what the plugin tells the kubelet about itself (type `DRAPlugin`, driver name,
//! DRA socket path, service versions in preference order) and publishes the kubelet's
//! verdict through a `tokio::sync::watch` channel. It must not list a service the
//! server does not serve: the kubelet (1.34+) picks the first entry it knows.

use std::path::PathBuf;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
    registration_server::Registration,
};

/// Plugin type the kubelet's plugin watcher routes to its DRA manager.
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";

/// The health service's entries in `supported_versions`, newest first (KEP-4680): a 1.37+
/// kubelet picks the first it knows (`v1`), 1.34-1.36 kubelets know only `v1alpha1`.
/// The kubelet opens a health stream only for a version listed here.
pub const HEALTH_SERVICE_VERSIONS: [&str; 2] =
    ["v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth"];

/// The DRA node services we serve, in preference order (v1: kubelet 1.34+, v1beta1:
/// 1.32+). Kubelets older than 1.34 refuse a plugin whose list has no service they know.
pub const DRA_SERVICE_VERSIONS: [&str; 2] = ["v1.DRAPlugin", "v1beta1.DRAPlugin"];

/// Registration state as last reported by the kubelet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    /// The kubelet has not called NotifyRegistrationStatus yet.
    Pending,
    /// The kubelet accepted the plugin.
    Registered,
    /// The kubelet refused the plugin; `error` is the kubelet's reason.
    Rejected {
        /// Reason given by the kubelet.
        error: String,
    },
}

/// The Registration gRPC service; create with [`RegistrationService::new`].
pub struct RegistrationService {
    driver_name: String,
    endpoint: PathBuf,
    health_served: bool,
    state: watch::Sender<RegistrationState>,
}

impl RegistrationService {
    /// Creates the service for `driver_name` whose DRA socket is at `endpoint` (an
    /// absolute path, identical inside and outside the container).
    pub fn new(driver_name: impl Into<String>, endpoint: impl Into<PathBuf>) -> Self {
        let (state, _) = watch::channel(RegistrationState::Pending);
        Self {
            driver_name: driver_name.into(),
            endpoint: endpoint.into(),
            health_served: false,
            state,
        }
    }

    /// Also lists [`HEALTH_SERVICE_VERSIONS`]: call only when the health service is served
    /// on the endpoint.
    pub fn with_health_service(mut self) -> Self {
        self.health_served = true;
        self
    }

    /// A receiver of the registration state; starts at [`RegistrationState::Pending`].
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }

    /// The PluginInfo answered to GetInfo.
    pub fn plugin_info(&self) -> PluginInfo {
        PluginInfo {
            r#type: DRA_PLUGIN_TYPE.to_owned(),
            name: self.driver_name.clone(),
            endpoint: self.endpoint.to_string_lossy().into_owned(),
            supported_versions: DRA_SERVICE_VERSIONS
                .iter()
                .chain(HEALTH_SERVICE_VERSIONS.iter().filter(|_| self.health_served))
                .map(|v| (*v).to_owned())
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        info!(driver = %self.driver_name, "kubelet asked for plugin info");
        Ok(Response::new(self.plugin_info()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let state = if status.plugin_registered {
            info!(driver = %self.driver_name, "registered with the kubelet");
            RegistrationState::Registered
        } else {
            error!(
                driver = %self.driver_name,
                error = %status.error,
                served = ?DRA_SERVICE_VERSIONS,
                "kubelet rejected the plugin registration; this plugin serves the DRA node \
                 service v1 and v1beta1 and needs a kubelet 1.34 or newer with DRA enabled"
            );
            RegistrationState::Rejected {
                error: status.error,
            }
        };
        self.state.send_replace(state);
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_version_listed_only_when_served() {
        let plain = RegistrationService::new("gpu.gpu-dra.dev", "/x/dra.sock");
        assert_eq!(
            plain.plugin_info().supported_versions,
            ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
        );
        let health = plain.with_health_service();
        assert_eq!(
            health.plugin_info().supported_versions,
            [
                "v1.DRAPlugin",
                "v1beta1.DRAPlugin",
                "v1.DRAResourceHealth",
                "v1alpha1.DRAResourceHealth"
            ]
        );
    }

    #[tokio::test]
    async fn notify_updates_watch_channel() {
        let service = RegistrationService::new("gpu.gpu-dra.dev", "/x/dra.sock");
        let rx = service.subscribe();
        assert_eq!(*rx.borrow(), RegistrationState::Pending);
        service
            .notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: false,
                error: "boom".into(),
            }))
            .await
            .unwrap();
        assert_eq!(
            *rx.borrow(),
            RegistrationState::Rejected {
                error: "boom".into()
            }
        );
    }
}
