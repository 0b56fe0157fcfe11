//! Keeps a `tokio::sync::watch` channel holding the node's current inventory.
//!
//! Owns periodic re-discovery (NVML calls block, so they run on the blocking pool) and
//! publishes a new value only when the inventory changed, so the slice reconciler
//! re-publishes exactly on change (a MIG reconfiguration, a GPU gone). It must not
//! interpret the inventory; a failed discovery keeps the last good value and is logged.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::model::Inventory;
use super::nvml::Discover;

/// Re-discovers every `interval` until `shutdown` completes, sending the inventory on `tx`
/// only when it differs from the current value. The first re-discovery happens one
/// `interval` after the start (the caller seeds the channel with its first discovery).
pub async fn refresh_inventory(
    discover: Arc<dyn Discover>,
    interval: Duration,
    tx: watch::Sender<Inventory>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let d = Arc::clone(&discover);
        match tokio::task::spawn_blocking(move || d.discover()).await {
            Ok(Ok(inv)) => {
                let inv = keep_mig_shape(&tx.borrow(), inv);
                let changed = tx.send_if_modified(|cur| {
                    if *cur == inv {
                        false
                    } else {
                        *cur = inv;
                        true
                    }
                });
                if changed {
                    tracing::info!("inventory changed");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "re-discovering GPUs; keeping the last inventory")
            }
            Err(e) => tracing::warn!(error = %e, "inventory discovery task failed"),
        }
    }
}

/// `next` with every GPU that was MIG-capable in `last` but reads as not MIG-capable now
/// (a transient NOT_SUPPORTED from `nvmlDeviceGetMigMode`; MIG capability is a property
/// of the GPU model and does not go away) replaced by its last known shape, so a MIG GPU
/// is never republished whole. Pure.
pub fn keep_mig_shape(last: &Inventory, mut next: Inventory) -> Inventory {
    for gpu in &mut next.gpus {
        if let Some(prev) = last.gpus.iter().find(|p| p.uuid == gpu.uuid)
            && prev.mig.capable
            && !gpu.mig.capable
        {
            tracing::warn!(gpu = %gpu.uuid, "GPU reads as not MIG-capable; keeping its last known MIG shape");
            *gpu = prev.clone();
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::DiscoverError;
    use crate::inventory::fixtures::dgx_h100;
    use std::sync::Mutex;

    /// Answers from a script, repeating the last answer.
    struct Scripted(Mutex<Vec<Result<Inventory, ()>>>);

    impl Discover for Scripted {
        fn discover(&self) -> Result<Inventory, DiscoverError> {
            let mut s = self.0.lock().expect("lock");
            let next = if s.len() > 1 {
                s.remove(0)
            } else {
                s[0].clone()
            };
            next.map_err(|()| DiscoverError::UnknownProfile {
                gpu: "GPU-x".into(),
                index: 0,
                profile_id: 99,
            })
        }
    }

    #[test]
    fn a_mig_gpu_is_never_republished_whole() {
        let last = dgx_h100();
        let mut next = last.clone();
        let mig = next
            .gpus
            .iter_mut()
            .find(|g| g.mig.enabled)
            .expect("MIG GPU");
        mig.mig = crate::inventory::MigState::default();
        mig.mig_devices.clear();
        assert_eq!(keep_mig_shape(&last, next), last);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_only_changes_and_survives_errors() {
        let a = dgx_h100();
        let mut b = dgx_h100();
        b.gpus.pop();
        let script = Scripted(Mutex::new(vec![
            Ok(a.clone()),
            Err(()),
            Ok(a.clone()),
            Ok(b.clone()),
        ]));
        let (tx, mut rx) = watch::channel(a.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(refresh_inventory(
            Arc::new(script),
            Duration::from_secs(30),
            tx,
            async {
                let _ = stop_rx.await;
            },
        ));
        rx.changed().await.expect("a change");
        assert_eq!(
            *rx.borrow_and_update(),
            b,
            "A, error, A are not changes; B is"
        );
        stop_tx.send(()).expect("stop");
        task.await.expect("join");
        assert!(!rx.has_changed().unwrap_or(false));
    }
}
