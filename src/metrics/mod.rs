//! Prometheus metrics of the node plugin, served as `/metrics` (text exposition format,
//! through the prometheus-client crate).
//!
//! Owns the metric names and label sets. Two kinds of series:
//! - event series ([`events`]): RPC latency, claim errors, XID events, slice publish
//!   passes; counted by small hooks at the gRPC edge, the prepare loop, the XID watch and
//!   a follower of the reconciler's `PublishStatus` channel;
//! - state series ([`state`]): prepared claims, devices, per-GPU sharing policy, MPS
//!   daemons, checkpoint writes and the per-device info series, rendered at scrape time
//!   from the checkpoint, health and inventory snapshots.
//!
//! This module only reads snapshots: it never writes CDI specs, the checkpoint, GPU
//! settings or any other plugin state, and a scrape makes no NVML or API server call.

pub mod events;
pub mod pods;
pub mod state;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::checkpoint::{Checkpoint, CheckpointWriter};
use crate::health::HealthSnapshot;
use crate::inventory::Inventory;

/// Content type of the Prometheus text exposition format served.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The snapshots the state series are rendered from; filled in once the plugin has
/// loaded them (before that only the event series are served).
#[derive(Clone)]
pub struct Sources {
    /// The durable checkpoint.
    pub checkpoint: watch::Receiver<Arc<Checkpoint>>,
    /// Checkpoint writes so far ([`CheckpointWriter::writes`]).
    pub writer: CheckpointWriter,
    /// Device health (XID verdicts).
    pub health: watch::Receiver<HealthSnapshot>,
    /// The current inventory (MIG GPU instance ids and profiles).
    pub inventory: watch::Receiver<Inventory>,
}

/// Where `/metrics` reads from: `None` until the plugin has its state.
pub type SourcesSlot = watch::Receiver<Option<Sources>>;

/// The `/metrics` route over `sources`.
pub fn routes(sources: SourcesSlot) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(sources)
}

async fn metrics(State(sources): State<SourcesSlot>) -> impl IntoResponse {
    let current = sources.borrow().clone();
    match render(current.as_ref()) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {err}\n"),
        ),
    }
}

/// The whole exposition: event series, then the state series of `sources` (if any).
pub fn render(sources: Option<&Sources>) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    events::encode(&mut out)?;
    if let Some(s) = sources {
        let checkpoint = Arc::clone(&s.checkpoint.borrow());
        let health = s.health.borrow().clone();
        let inventory = s.inventory.borrow().clone();
        let pods = events::claim_pods(&checkpoint);
        let input = state::StateInput {
            checkpoint: &checkpoint,
            checkpoint_writes: s.writer.writes(),
            health: &health,
            inventory: &inventory,
            pods: &pods,
        };
        prometheus_client::encoding::text::encode_registry(&mut out, &state::registry(&input))?;
    }
    prometheus_client::encoding::text::encode_eof(&mut out)?;
    Ok(out)
}
