//! Keeps a `tokio::sync::watch` channel holding the node's current inventory.
//!
//! Owns periodic re-discovery (NVML calls block, so they run on the blocking pool) and
//! publishes a new value only when the inventory changed, so the slice reconciler
//! re-publishes exactly on change (a MIG reconfiguration, a GPU gone). What a pass may
//! publish is decided by [`super::survey::resolve`]: a GPU not read as it is keeps its
//! last shape or stays withheld, and is read again with backoff (from
//! [`Refresh::retry`], doubling up to [`Refresh::interval`]) instead of at the next
//! interval, until it reads cleanly. A failed discovery keeps the last value. The GPUs
//! held back are reported on a second channel ([`Holdback`]) and logged when that changes.
//! It must not interpret the inventory otherwise.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::model::Inventory;
use super::nvml::Discover;
use super::survey::{Holdback, InUse, Resolved, resolve};

/// What is in use now (read before each pass; from the checkpoint in the plugin).
pub type InUseSource = Arc<dyn Fn() -> InUse + Send + Sync>;

/// Settings of [`refresh_inventory`].
#[derive(Clone)]
pub struct Refresh {
    /// Where GPUs are read from.
    pub discover: Arc<dyn Discover>,
    /// What the checkpoint says is in use.
    pub in_use: InUseSource,
    /// Time between passes while every GPU reads cleanly.
    pub interval: Duration,
    /// First retry delay while a GPU is held back or discovery fails.
    pub retry: Duration,
}

/// Re-discovers until `shutdown` completes, sending the inventory on `tx` only when it
/// differs from the current value and the held-back GPUs on `holdback` when they change.
/// The first pass comes one `interval` after the start, or one `retry` if `holdback`
/// already holds GPUs (the caller seeds both channels with its first discovery).
pub async fn refresh_inventory(
    refresh: Refresh,
    tx: watch::Sender<Inventory>,
    holdback: watch::Sender<Holdback>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = refresh.retry;
    let mut delay = if holdback.borrow().is_empty() {
        refresh.interval
    } else {
        next_backoff(&mut backoff, refresh.interval)
    };
    loop {
        // The re-discovery period (or the withheld-GPU backoff): NVML offers no change
        // event for MIG shape or GPU presence, so discovery is timed.
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(delay) => {}
        }
        let d = Arc::clone(&refresh.discover);
        let in_use = (refresh.in_use)();
        let settled = match tokio::task::spawn_blocking(move || d.survey()).await {
            Ok(Ok(survey)) => {
                let last = tx.borrow().clone();
                let resolved = resolve(Some(&last), survey, &in_use);
                let settled = resolved.is_settled();
                publish(&tx, &holdback, resolved);
                settled
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::prepare::error_chain(&e), "re-discovering GPUs; keeping the last inventory");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "inventory discovery task failed");
                false
            }
        };
        delay = if settled {
            backoff = refresh.retry;
            refresh.interval
        } else {
            next_backoff(&mut backoff, refresh.interval)
        };
    }
}

/// The current backoff, doubling the next one up to `max`.
fn next_backoff(backoff: &mut Duration, max: Duration) -> Duration {
    let now = (*backoff).min(max);
    *backoff = (now * 2).min(max);
    now
}

/// Sends the resolved inventory and held-back GPUs when they changed, logging the change.
pub fn publish(
    tx: &watch::Sender<Inventory>,
    holdback: &watch::Sender<Holdback>,
    resolved: Resolved,
) {
    let Resolved {
        inventory,
        holdback: next,
    } = resolved;
    holdback.send_if_modified(|cur| {
        if *cur == next {
            return false;
        }
        log_change(cur, &next);
        *cur = next;
        true
    });
    let changed = tx.send_if_modified(|cur| {
        if *cur == inventory {
            false
        } else {
            *cur = inventory;
            true
        }
    });
    if changed {
        tracing::info!("inventory changed");
    }
}

/// Logs the GPUs newly held back (warning) and those read cleanly again (info).
pub fn log_change(before: &Holdback, after: &Holdback) {
    for u in &after.withheld {
        if !before.withheld.contains(u) {
            tracing::warn!(gpu = %u.uuid, device = %format!("gpu-{}", u.minor), reason = %u.reason, "GPU withheld: not published until NVML reads it cleanly; retrying with backoff");
        }
    }
    for u in &after.kept {
        if !before.kept.contains(u) {
            tracing::warn!(gpu = %u.uuid, device = %format!("gpu-{}", u.minor), reason = %u.reason, "GPU kept in its last known shape; retrying with backoff");
        }
    }
    let still = |uuid: &str| {
        after
            .withheld
            .iter()
            .chain(&after.kept)
            .any(|u| u.uuid == uuid)
    };
    for u in before.withheld.iter().chain(&before.kept) {
        if !still(&u.uuid) {
            tracing::info!(gpu = %u.uuid, device = %format!("gpu-{}", u.minor), "GPU read cleanly again: published as read");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::fixtures::dgx_h100;
    use crate::inventory::survey::{Survey, Unresolved};
    use crate::inventory::{DiscoverError, Gpu};
    use nvml_wrapper::error::NvmlError;
    use std::sync::Mutex;

    /// One scripted pass: an inventory, a discovery error, or an inventory with one GPU
    /// unresolved.
    #[derive(Clone)]
    enum Pass {
        Read(Inventory),
        Fails,
        Unresolved(Inventory, Box<Gpu>),
    }

    /// Answers from a script, repeating the last answer; counts the passes.
    struct Scripted(Mutex<(Vec<Pass>, usize)>);

    impl Scripted {
        fn passes(&self) -> usize {
            self.0.lock().expect("lock").1
        }
    }

    impl Discover for Scripted {
        fn discover(&self) -> Result<Inventory, DiscoverError> {
            unreachable!("the loop surveys")
        }

        fn survey(&self) -> Result<Survey, DiscoverError> {
            let mut s = self.0.lock().expect("lock");
            s.1 += 1;
            let next = if s.0.len() > 1 {
                s.0.remove(0)
            } else {
                s.0[0].clone()
            };
            match next {
                Pass::Read(inventory) => Ok(Survey {
                    inventory,
                    unresolved: Vec::new(),
                }),
                Pass::Fails => Err(DiscoverError::System {
                    function: "nvmlDeviceGetCount_v2",
                    source: NvmlError::Unknown,
                }),
                Pass::Unresolved(inventory, gpu) => Ok(Survey {
                    inventory,
                    unresolved: vec![Unresolved {
                        index: gpu.index,
                        minor: gpu.minor,
                        uuid: gpu.uuid.clone(),
                        error: DiscoverError::Gpu {
                            function: "nvmlDeviceGetMigMode",
                            gpu: gpu.uuid.clone(),
                            source: NvmlError::NotSupported,
                        },
                    }],
                }),
            }
        }
    }

    fn settings(script: Arc<Scripted>) -> Refresh {
        Refresh {
            discover: script,
            in_use: Arc::new(InUse::default),
            interval: Duration::from_secs(60),
            retry: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sends_only_changes_and_survives_errors() {
        let a = dgx_h100();
        let mut b = dgx_h100();
        b.gpus.pop();
        let script = Arc::new(Scripted(Mutex::new((
            vec![
                Pass::Read(a.clone()),
                Pass::Fails,
                Pass::Read(a.clone()),
                Pass::Read(b.clone()),
            ],
            0,
        ))));
        let (tx, mut rx) = watch::channel(a.clone());
        let (hb_tx, _hb_rx) = watch::channel(Holdback::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(refresh_inventory(
            settings(Arc::clone(&script)),
            tx,
            hb_tx,
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

    #[tokio::test(start_paused = true)]
    async fn a_withheld_gpu_is_retried_with_backoff_and_published_once_read() {
        let full = dgx_h100();
        let mut without = full.clone();
        let gpu = without.gpus.remove(1);
        let script = Arc::new(Scripted(Mutex::new((
            vec![
                Pass::Unresolved(without.clone(), Box::new(gpu.clone())),
                Pass::Unresolved(without.clone(), Box::new(gpu.clone())),
                Pass::Read(full.clone()),
            ],
            0,
        ))));
        // As the start leaves it: the GPU withheld.
        let start = resolve(
            None,
            Scripted(Mutex::new((
                vec![Pass::Unresolved(without.clone(), Box::new(gpu))],
                0,
            )))
            .survey()
            .expect("survey"),
            &InUse::default(),
        );
        assert_eq!(start.holdback.withheld.len(), 1);
        let (tx, mut rx) = watch::channel(start.inventory);
        let (hb_tx, mut hb_rx) = watch::channel(start.holdback);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let began = tokio::time::Instant::now();
        let task = tokio::spawn(refresh_inventory(
            settings(Arc::clone(&script)),
            tx,
            hb_tx,
            async {
                let _ = stop_rx.await;
            },
        ));
        rx.changed().await.expect("published once read");
        assert_eq!(*rx.borrow_and_update(), full);
        assert_eq!(script.passes(), 3, "withheld, withheld, read");
        // Passes at 1 s, 3 s and 7 s, not after the 60 s interval.
        assert_eq!(began.elapsed(), Duration::from_secs(1 + 2 + 4));
        hb_rx.changed().await.expect("holdback cleared");
        assert!(hb_rx.borrow().is_empty());
        stop_tx.send(()).expect("stop");
        task.await.expect("join");
    }

    #[test]
    fn backoff_doubles_up_to_the_interval() {
        let mut b = Duration::from_secs(1);
        let max = Duration::from_secs(5);
        let seen: Vec<u64> = (0..5)
            .map(|_| next_backoff(&mut b, max).as_secs())
            .collect();
        assert_eq!(seen, [1, 2, 4, 5, 5]);
    }
}
