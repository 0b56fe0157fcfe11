//! The slice reconciler: the only writer of this driver's ResourceSlices for this node.
//!
//! Owns: server-side apply (field manager = driver name, forced) of the desired slices,
//! deletion of stale ones, the pool generation, drift repair (the kubelet deletes a node's
//! slices at its start and 30 s after the plugin disconnects; anyone may edit them) and
//! re-publication when a new inventory arrives on a `tokio::sync::watch` channel.
//!
//! The decisions are pure and live in [`super::plan`]; the loop in [`Reconciler::run`]
//! only executes plans. A dropped field is reported once (log and
//! [`PublishStatus::dropped_fields`]), the matching [`SliceFeatures`] flag is turned off,
//! and it is ignored when comparing, so we never re-apply in a loop. Device taints of
//! unhealthy GPUs ([`Reconciler::with_health`]) are re-published on every health change;
//! when the API server drops taints, those GPUs' devices are withheld instead. Waiting
//! for the API server at start (the Node's UID) is [`super::start`]'s; the loop's tests
//! against a mock API server are in `reconcile_tests.rs`.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

use super::desired::{SliceFeatures, desired_slices_with};
use super::plan::{Published, dropped_fields, plan, with_generation};
use super::taints::{HealthTaints, TaintEffect};
use crate::health::UnhealthyGpus;
use crate::inventory::Inventory;

/// Where publication stands; sent on a watch channel after every reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStatus {
    /// Pool generation last published.
    pub generation: i64,
    /// Number of slices in the pool.
    pub slices: usize,
    /// Number of devices published.
    pub devices: usize,
    /// Field paths the API server dropped (feature gate off); each was logged once.
    pub dropped_fields: BTreeSet<String>,
    /// True when the last reconcile found or left the API server in the desired state.
    pub in_sync: bool,
    /// The last reconcile error, if the last attempt failed.
    pub last_error: Option<String>,
    /// How long the last pass took (read by the metrics).
    pub last_pass: Duration,
}

/// Errors of one reconcile pass (the loop retries with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Server-side apply of a slice failed.
    #[error("applying ResourceSlice {slice}")]
    Apply {
        /// Slice name.
        slice: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a stale slice failed.
    #[error("deleting ResourceSlice {slice}")]
    Delete {
        /// Slice name.
        slice: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading the Node (for its UID) failed.
    #[error("reading Node {node}")]
    NodeLookup {
        /// Node name.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The watch of our slices ended (the stream is infinite unless the client is gone).
    #[error("watch of ResourceSlices for node {node} ended")]
    WatchEnded {
        /// Node name.
        node: String,
    },
}

/// First retry delay after a failed reconcile; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Publishes the inventory of one node as ResourceSlices and keeps them there.
pub struct Reconciler {
    api: Api<ResourceSlice>,
    driver: String,
    node: String,
    node_uid: String,
    features: SliceFeatures,
    last: Option<Published>,
    dropped: BTreeSet<String>,
    unhealthy: watch::Receiver<UnhealthyGpus>,
    taint_effect: TaintEffect,
    /// Keeps the default (empty) health channel open when none was given.
    _no_health: Option<watch::Sender<UnhealthyGpus>>,
}

impl Reconciler {
    /// A reconciler for `driver` on node `node` (`node_uid` for the owner reference).
    /// `features` are the optional fields to try; dropped ones are turned off at run time.
    pub fn new(
        client: kube::Client,
        driver: &str,
        node: &str,
        node_uid: &str,
        features: SliceFeatures,
    ) -> Self {
        let (no_health, unhealthy) = watch::channel(UnhealthyGpus::new());
        Reconciler {
            api: Api::all(client),
            driver: driver.to_string(),
            node: node.to_string(),
            node_uid: node_uid.to_string(),
            features,
            last: None,
            dropped: BTreeSet::new(),
            unhealthy,
            taint_effect: TaintEffect::default(),
            _no_health: Some(no_health),
        }
    }

    /// Taints the devices of the GPUs on `unhealthy` with `effect` (see
    /// [`super::taints`]), re-publishing on every change.
    pub fn with_health(
        mut self,
        unhealthy: watch::Receiver<UnhealthyGpus>,
        effect: TaintEffect,
    ) -> Self {
        self.unhealthy = unhealthy;
        self.taint_effect = effect;
        self._no_health = None;
        self
    }

    /// Field selector for this driver's slices on this node.
    pub fn field_selector(driver: &str, node: &str) -> String {
        format!("spec.nodeName={node},spec.driver={driver}")
    }

    /// Runs until `shutdown` completes: watches our slices, reconciles on every watch event
    /// and inventory change, retries failures with exponential backoff, and reports on
    /// `status`. Returns an error only when the watch stream ends.
    pub async fn run(
        mut self,
        mut inventory: watch::Receiver<Inventory>,
        status: watch::Sender<PublishStatus>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ReconcileError> {
        let (store, writer) = reflector::store::<ResourceSlice>();
        let config =
            watcher::Config::default().fields(&Self::field_selector(&self.driver, &self.node));
        let events = reflector(writer, watcher(self.api.clone(), config).default_backoff());
        let mut events = std::pin::pin!(events);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ready = false;
        let mut dirty = true;
        let mut inventory_open = true;
        let mut health_open = true;
        let mut backoff = MIN_BACKOFF;
        // The retry backoff timer, reset after each failed pass; a select! arm, not a
        // synchronisation sleep.
        let retry = tokio::time::sleep(Duration::ZERO);
        let mut retry = std::pin::pin!(retry);
        let mut retry_pending = false;
        loop {
            if !(dirty && ready) || retry_pending {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    changed = inventory.changed(), if inventory_open => {
                        // A closed sender leaves the last inventory in place.
                        inventory_open = changed.is_ok();
                        dirty = true;
                    }
                    changed = self.unhealthy.changed(), if health_open => {
                        health_open = changed.is_ok();
                        dirty = true;
                    }
                    event = events.next() => match event {
                        Some(Ok(watcher::Event::InitDone)) => { ready = true; dirty = true; }
                        Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                        Some(Ok(_)) => dirty = true,
                        Some(Err(e)) => tracing::warn!(error = %e, node = %self.node, "watching ResourceSlices"),
                        None => return Err(ReconcileError::WatchEnded { node: self.node.clone() }),
                    },
                    () = &mut retry, if retry_pending => { retry_pending = false; dirty = true; }
                }
                continue;
            }
            dirty = false;
            let inv = inventory.borrow_and_update().clone();
            let existing: Vec<ResourceSlice> =
                store.state().iter().map(|s| (**s).clone()).collect();
            let started = tokio::time::Instant::now();
            match self.reconcile_once(&inv, &existing).await {
                Ok(mut report) => {
                    report.status.last_pass = started.elapsed();
                    backoff = MIN_BACKOFF;
                    // A newly dropped field changes the desired slices: go again.
                    dirty = report.features_changed;
                    status.send_replace(report.status);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reconciling ResourceSlices");
                    status.send_modify(|s| {
                        s.in_sync = false;
                        s.last_error = Some(format!("{e}: {}", source_chain(&e)));
                        s.last_pass = started.elapsed();
                    });
                    retry.as_mut().reset(tokio::time::Instant::now() + backoff);
                    retry_pending = true;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One pass: compute desired slices and the plan, then execute it.
    #[tracing::instrument(name = "reconcile_slices", skip_all, fields(node = %self.node))]
    async fn reconcile_once(
        &mut self,
        inv: &Inventory,
        existing: &[ResourceSlice],
    ) -> Result<PassReport, ReconcileError> {
        let features = self.features.without_dropped(&self.dropped);
        let health = HealthTaints::new(
            &self.driver,
            self.taint_effect,
            self.unhealthy.borrow_and_update().clone(),
        );
        let desired = desired_slices_with(
            inv,
            &health,
            &self.driver,
            &self.node,
            &self.node_uid,
            0,
            &features,
        );
        let plan = plan(&desired, existing, self.last.as_ref(), &self.dropped);
        self.last = Some(Published {
            generation: plan.generation,
            content: desired.iter().map(|s| with_generation(s, 0)).collect(),
        });
        let params = PatchParams::apply(&self.driver).force();
        let mut newly_dropped = BTreeSet::new();
        for slice in &plan.apply {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let stored = self
                .api
                .patch(&name, &params, &Patch::Apply(slice))
                .await
                .map_err(|source| ReconcileError::Apply {
                    slice: name.clone(),
                    source,
                })?;
            if let (Ok(sent), Ok(got)) = (
                serde_json::to_value(&slice.spec),
                serde_json::to_value(&stored.spec),
            ) {
                for path in dropped_fields(&sent, &got, "spec") {
                    if !self.dropped.contains(&path) {
                        newly_dropped.insert(path);
                    }
                }
            }
            tracing::debug!(slice = %name, "applied ResourceSlice");
        }
        for stale in &plan.delete {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: stale.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match self.api.delete(&stale.name, &dp).await {
                Ok(_) => tracing::info!(slice = %stale.name, "deleted stale ResourceSlice"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(source) => {
                    return Err(ReconcileError::Delete {
                        slice: stale.name.clone(),
                        source,
                    });
                }
            }
        }
        for path in &newly_dropped {
            tracing::warn!(
                field = %path,
                "the API server dropped this ResourceSlice field (feature gate off?); publishing without it"
            );
            if path.starts_with("spec.devices[*].taints") && !health.gpus.is_empty() {
                tracing::warn!(
                    gpus = ?health.gpus.keys().collect::<Vec<_>>(),
                    "device taints are not kept: the devices of unhealthy GPUs are withheld instead"
                );
            }
        }
        let features_changed = !newly_dropped.is_empty()
            && self
                .features
                .without_dropped(self.dropped.iter().chain(&newly_dropped))
                != features;
        self.dropped.extend(newly_dropped);
        if !plan.is_empty() {
            tracing::info!(
                applied = plan.apply.len(),
                deleted = plan.delete.len(),
                "ResourceSlices published"
            );
        }
        Ok(PassReport {
            status: PublishStatus {
                generation: plan.generation,
                slices: desired.len(),
                devices: desired
                    .iter()
                    .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
                    .sum(),
                dropped_fields: self.dropped.clone(),
                in_sync: true,
                last_error: None,
                last_pass: Duration::ZERO,
            },
            features_changed,
        })
    }
}

struct PassReport {
    status: PublishStatus,
    features_changed: bool,
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}
