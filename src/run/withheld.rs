//! Wiring of the GPUs discovery holds back: what the checkpoint says is in use, and a
//! Node Event per GPU withheld or kept in its last shape, and when it is published again.
//!
//! The decision is [`crate::inventory::survey`]'s; this only feeds it the checkpoint's
//! facts and reports its outcome on the Node (`kubectl describe node` shows it). An Event
//! that cannot be posted (API server away) is logged and not retried: the log carries it.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::Checkpoint;
use crate::inventory::{Holdback, InUse, Unsettled};

/// The MIG devices the checkpoint's claims hold (any phase: a half-done prepare may
/// already have handed its device out).
pub fn in_use_of(checkpoint: &Checkpoint) -> InUse {
    InUse::from_devices(
        checkpoint
            .claims
            .values()
            .flat_map(|c| &c.devices)
            .map(|d| (d.gpu_uuid.as_str(), d.mig_uuid.as_deref())),
    )
}

/// One Event per change of `holdback` (its current value first) until `stop`.
pub async fn report_holdback(
    client: kube::Client,
    driver: String,
    node: String,
    mut holdback: watch::Receiver<Holdback>,
    stop: CancellationToken,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: driver,
            instance: Some(node.clone()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node),
        ..ObjectReference::default()
    };
    let mut before = Holdback::default();
    loop {
        let now = holdback.borrow_and_update().clone();
        for event in events(&before, &now) {
            if let Err(err) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %err, reason = %event.reason, "posting a GPU discovery Event on the node failed");
            }
        }
        before = now;
        tokio::select! {
            () = stop.cancelled() => return,
            changed = holdback.changed() => if changed.is_err() { return },
        }
    }
}

/// The Events for going from `before` to `after` (pure).
fn events(before: &Holdback, after: &Holdback) -> Vec<Event> {
    let event = |type_, reason: &str, note: String| Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "DiscoverGPUs".into(),
        secondary: None,
    };
    let name = |u: &Unsettled| format!("gpu-{} ({})", u.minor, u.uuid);
    let mut out = Vec::new();
    for u in &after.withheld {
        if !before.withheld.contains(u) {
            out.push(event(
                EventType::Warning,
                "GPUWithheld",
                format!(
                    "{} not published: {}; its shape is read again with backoff",
                    name(u),
                    u.reason
                ),
            ));
        }
    }
    for u in &after.kept {
        if !before.kept.contains(u) {
            out.push(event(
                EventType::Warning,
                "GPUShapeKept",
                format!(
                    "{} published in its last known shape: {}; read again with backoff",
                    name(u),
                    u.reason
                ),
            ));
        }
    }
    let held = |h: &Holdback, uuid: &str| h.withheld.iter().chain(&h.kept).any(|u| u.uuid == uuid);
    for u in before.withheld.iter().chain(&before.kept) {
        if !held(after, &u.uuid) {
            out.push(event(
                EventType::Normal,
                "GPUPublished",
                format!("{} read cleanly again: published as read", name(u)),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu0(reason: &str) -> Unsettled {
        Unsettled {
            uuid: "GPU-0".into(),
            minor: 0,
            reason: reason.into(),
        }
    }

    #[test]
    fn one_event_when_withheld_and_one_when_published_again() {
        let none = Holdback::default();
        let withheld = Holdback {
            withheld: vec![gpu0("nvmlDeviceGetMigMode failed")],
            kept: Vec::new(),
        };
        let first = events(&none, &withheld);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].reason, "GPUWithheld");
        assert_eq!(first[0].type_, EventType::Warning);
        assert!(events(&withheld, &withheld).is_empty(), "no repeats");
        let back = events(&withheld, &none);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].reason, "GPUPublished");
        assert_eq!(back[0].type_, EventType::Normal);
    }
}
