//! Runs the registration, DRA and (optionally) DRA health services on their Unix sockets
//! until shutdown.
//!
//! Owns the socket lifecycle order the kubelet relies on: the DRA socket exists before
//! the registration socket appears (the kubelet dials the endpoint right after
//! GetInfo), and on shutdown the registration socket goes first so the kubelet
//! deregisters the plugin. It must not exit without removing both sockets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tracing::{info, warn};

use super::authority;
use super::dra::{DraV1, DraV1beta1};
use super::driver::NodeDriver;
use super::health::{HealthService, RESEND_INTERVAL};
use super::registration::{RegistrationService, RegistrationState};
use super::socket::{SocketError, UnixSocket};
use crate::health::HealthSnapshot;
use crate::proto::dra_v1::dra_plugin_server::DraPluginServer as DraV1Server;
use crate::proto::dra_v1beta1::dra_plugin_server::DraPluginServer as DraV1beta1Server;
use crate::proto::health_v1::dra_resource_health_server::DraResourceHealthServer as HealthV1Server;
use crate::proto::health_v1alpha1::dra_resource_health_server::DraResourceHealthServer as HealthV1alpha1Server;
use crate::proto::pluginregistration::registration_server::RegistrationServer;

/// Default time in-flight RPCs get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where and as whom the plugin serves.
#[derive(Clone, Debug)]
pub struct PluginServerConfig {
    /// DRA driver name answered in GetInfo, e.g. `gpu.gpu-dra.dev`.
    pub driver_name: String,
    /// Registration socket, `<kubelet-root>/plugins_registry/<driver>-reg.sock`.
    pub registration_socket: PathBuf,
    /// DRA service socket, `<kubelet-root>/plugins/<driver>/dra.sock`; absolute.
    pub dra_socket: PathBuf,
    /// How long in-flight RPCs may run after shutdown before connections are dropped.
    pub shutdown_grace: Duration,
}

/// Why the plugin server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be created or removed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A bound socket could not be handed to the runtime.
    #[error("cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A gRPC server failed while serving.
    #[error("gRPC server on {path} failed")]
    Serve {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Both kubelet-facing gRPC servers over one [`NodeDriver`], with sockets bound.
pub struct PluginServer<D> {
    config: PluginServerConfig,
    driver: Arc<D>,
    registration: RegistrationService,
    health: Option<watch::Receiver<HealthSnapshot>>,
    dra_socket: UnixSocket,
    registration_socket: UnixSocket,
}

impl<D: NodeDriver> PluginServer<D> {
    /// Binds the DRA socket, then the registration socket (replacing stale ones, mode
    /// 0600). The kubelet may connect as soon as this returns; calls are answered once
    /// [`PluginServer::serve`] runs.
    pub fn bind(config: PluginServerConfig, driver: Arc<D>) -> Result<Self, ServerError> {
        let dra_socket = UnixSocket::bind(&config.dra_socket)?;
        let registration_socket = match UnixSocket::bind(&config.registration_socket) {
            Ok(socket) => socket,
            Err(e) => {
                if let Err(remove) = dra_socket.remove() {
                    warn!(error = %remove, "cannot remove DRA socket");
                }
                return Err(e.into());
            }
        };
        let registration = RegistrationService::new(&config.driver_name, &config.dra_socket);
        Ok(Self {
            config,
            driver,
            registration,
            health: None,
            dra_socket,
            registration_socket,
        })
    }

    /// Also serves the DRA resource health service (`v1` and `v1alpha1`) from
    /// `health` on the DRA socket, and lists it in GetInfo. Call before
    /// [`PluginServer::serve`].
    #[must_use]
    pub fn with_health(mut self, health: watch::Receiver<HealthSnapshot>) -> Self {
        self.registration = self.registration.with_health_service();
        self.health = Some(health);
        self
    }

    /// The kubelet's registration verdict, updated on NotifyRegistrationStatus.
    pub fn registration_state(&self) -> watch::Receiver<RegistrationState> {
        self.registration.subscribe()
    }

    /// Serves until `shutdown` is cancelled or a server fails, gives in-flight RPCs
    /// the configured grace, then removes the registration socket and the DRA socket.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let Self {
            config,
            driver,
            registration,
            health,
            dra_socket,
            registration_socket,
        } = self;
        let result = serve_both(
            &config,
            driver,
            registration,
            health,
            &dra_socket,
            &registration_socket,
            shutdown,
        )
        .await;
        let removed = registration_socket.remove().and(dra_socket.remove());
        info!(driver = %config.driver_name, "plugin server stopped");
        result?;
        removed?;
        Ok(())
    }
}

async fn serve_both<D: NodeDriver>(
    config: &PluginServerConfig,
    driver: Arc<D>,
    registration: RegistrationService,
    health: Option<watch::Receiver<HealthSnapshot>>,
    dra_socket: &UnixSocket,
    registration_socket: &UnixSocket,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    // Every accepted connection goes through the authority front (see `authority`).
    let listen = |socket: &UnixSocket| {
        socket
            .tokio_listener()
            .map(|l| {
                UnixListenerStream::new(l).map(|conn| conn.map(|c| Fronted(authority::front(c))))
            })
            .map_err(|source| ServerError::Listen {
                path: socket.path().to_owned(),
                source,
            })
    };
    let dra_incoming = listen(dra_socket)?;
    let registration_incoming = listen(registration_socket)?;
    // Either server failing stops the other: a plugin with one socket is useless.
    let stop = shutdown.child_token();

    let dra = Server::builder()
        .add_service(DraV1Server::new(DraV1::new(Arc::clone(&driver))))
        .add_service(DraV1beta1Server::new(DraV1beta1::new(driver)))
        // Health streams never finish on their own: end them with the server.
        .add_optional_service(health.as_ref().map(|health| {
            HealthV1Server::new(HealthService::new(health.clone(), RESEND_INTERVAL, stop.clone()))
        }))
        .add_optional_service(health.map(|health| {
            HealthV1alpha1Server::new(HealthService::new(health, RESEND_INTERVAL, stop.clone()))
        }))
        .serve_with_incoming_shutdown(dra_incoming, stop.clone().cancelled_owned());
    let registration = Server::builder()
        .add_service(RegistrationServer::new(registration))
        .serve_with_incoming_shutdown(registration_incoming, stop.clone().cancelled_owned());
    info!(
        driver = %config.driver_name,
        registration_socket = %config.registration_socket.display(),
        dra_socket = %config.dra_socket.display(),
        "serving kubelet plugin"
    );

    let run = async {
        let (dra, registration) = tokio::join!(
            async {
                let r = dra.await;
                stop.cancel();
                r
            },
            async {
                let r = registration.await;
                stop.cancel();
                r
            },
        );
        dra.map_err(|source| ServerError::Serve {
            path: config.dra_socket.clone(),
            source,
        })?;
        registration.map_err(|source| ServerError::Serve {
            path: config.registration_socket.clone(),
            source,
        })
    };
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => result,
        () = stop.cancelled() => {
            match tokio::time::timeout(config.shutdown_grace, &mut run).await {
                Ok(result) => result,
                Err(_) => {
                    warn!(grace = ?config.shutdown_grace, "connections still open after the shutdown grace; closing them");
                    Ok(())
                }
            }
        }
    }
}

/// A connection behind the authority front, as tonic's server takes it.
struct Fronted(tokio::io::DuplexStream);

impl tonic::transport::server::Connected for Fronted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for Fronted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Fronted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
