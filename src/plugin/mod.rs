//! Kubelet plugin endpoint: the registration socket, the DRA node service and the DRA
//! resource health service (KEP-4680).
//!
//! Owns the two Unix sockets the kubelet talks to (KUBELET-PROTOCOL.md sections 1-2)
//! and the translation between the kubelet's gRPC messages and the [`NodeDriver`]
//! trait. It must not prepare anything itself: preparing is the `prepare` module's
//! job behind [`NodeDriver`]. `tonic::Status` is built only here, at the edge, and only
//! for requests that cannot be answered at all; per-claim failures travel as per-claim
//! error strings, as the kubelet expects (every claim in a request gets an entry).

mod authority;
mod dra;
mod driver;
mod health;
mod registration;
mod server;
mod socket;

pub use dra::{DraV1, DraV1beta1, MISSING_ANSWER};
pub use driver::{ClaimRef, NodeDriver, PreparedDevice};
pub use health::{
    HEALTH_CHECK_TIMEOUT_SECONDS, HealthService, RESEND_INTERVAL, response, response_v1alpha1,
};
pub use registration::{
    DRA_PLUGIN_TYPE, DRA_SERVICE_VERSIONS, HEALTH_SERVICE_VERSIONS, RegistrationService,
    RegistrationState,
};
pub use server::{PluginServer, PluginServerConfig, SHUTDOWN_GRACE, ServerError};
pub use socket::{
    MAX_SOCKET_PATH, SocketError, UnixSocket, dra_socket_path, registration_socket_path,
    remove_left_behind,
};

#[cfg(test)]
mod tests;
