//! NVML liveness: a cheap NVML call made at a fixed interval, its outcome published on a
//! `tokio::sync::watch` channel for the readiness probe.
//!
//! Owns the call, its time limit and the status it publishes; it must not decide what a
//! failure means for the node (the probe reads the snapshot, the kubelet acts on it).
//! The call is `nvmlDeviceGetCount_v2`: it touches the kernel driver on every call, so it
//! fails when the driver is unloaded or wedged, and it costs microseconds. A call that
//! hangs (a GPU fallen off the bus can stall NVML) is reported as failing after the time
//! limit, and no second call is started while it still runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::error::NvmlError;
use tokio::sync::watch;

use crate::inventory::NvmlDiscovery;

/// Interval between two liveness calls.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Time a liveness call may take before NVML counts as not answering.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether NVML answered the last liveness call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NvmlStatus {
    /// No call has completed yet.
    #[default]
    Unknown,
    /// The last call succeeded and saw `gpus` GPUs.
    Answering {
        /// `nvmlDeviceGetCount_v2`'s answer.
        gpus: u32,
    },
    /// The last call failed or did not return in time; `error` says which.
    Failing {
        /// The NVML error, or the time limit that passed.
        error: String,
    },
}

/// The NVML call the liveness check makes; implemented over [`NvmlDiscovery`]'s handle.
pub trait NvmlPing: Send + Sync + 'static {
    /// Returns the GPU count, or the NVML error.
    fn ping(&self) -> Result<u32, NvmlError>;
}

impl NvmlPing for NvmlDiscovery {
    fn ping(&self) -> Result<u32, NvmlError> {
        self.nvml().device_count()
    }
}

/// Calls `ping` every `interval` (the first call at once) until `stop` completes, sending
/// each outcome on `tx`; a call running longer than `timeout` is reported as failing.
pub async fn watch_nvml(
    ping: Arc<dyn NvmlPing>,
    interval: Duration,
    timeout: Duration,
    tx: watch::Sender<NvmlStatus>,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => {}
        }
        let p = Arc::clone(&ping);
        let mut call = tokio::task::spawn_blocking(move || p.ping());
        let outcome = tokio::select! {
            () = &mut stop => return,
            outcome = &mut call => outcome,
            () = tokio::time::sleep(timeout) => {
                send(&tx, NvmlStatus::Failing {
                    error: format!("nvmlDeviceGetCount_v2 did not return within {timeout:?}"),
                });
                tokio::select! {
                    () = &mut stop => return,
                    outcome = call => outcome,
                }
            }
        };
        let status = match outcome {
            Ok(Ok(gpus)) => NvmlStatus::Answering { gpus },
            Ok(Err(e)) => NvmlStatus::Failing {
                error: format!("nvmlDeviceGetCount_v2: {e}"),
            },
            Err(e) => NvmlStatus::Failing {
                error: format!("NVML liveness call panicked: {e}"),
            },
        };
        send(&tx, status);
    }
}

/// Sends `status` if it differs from the current one, logging transitions once.
fn send(tx: &watch::Sender<NvmlStatus>, status: NvmlStatus) {
    tx.send_if_modified(|current| {
        if *current == status {
            return false;
        }
        match &status {
            NvmlStatus::Failing { error } => {
                tracing::warn!(error = %error, "NVML is not answering")
            }
            NvmlStatus::Answering { gpus } if !matches!(current, NvmlStatus::Answering { .. }) => {
                tracing::info!(gpus, "NVML is answering")
            }
            _ => {}
        }
        *current = status;
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers with the queued results in order, then with the last one.
    struct Scripted(Mutex<Vec<Result<u32, NvmlError>>>, Duration);

    impl NvmlPing for Scripted {
        fn ping(&self) -> Result<u32, NvmlError> {
            std::thread::park_timeout(self.1);
            let mut queue = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() > 1 {
                queue.remove(0)
            } else {
                match &queue[0] {
                    Ok(n) => Ok(*n),
                    Err(_) => Err(NvmlError::Unknown),
                }
            }
        }
    }

    async fn next(rx: &mut watch::Receiver<NvmlStatus>) -> NvmlStatus {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a status within the deadline")
            .expect("sender alive");
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn failures_and_recovery_are_published() {
        let ping = Arc::new(Scripted(
            Mutex::new(vec![Ok(8), Err(NvmlError::DriverNotLoaded), Ok(8)]),
            Duration::ZERO,
        ));
        let (tx, mut rx) = watch::channel(NvmlStatus::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(watch_nvml(
            ping,
            Duration::from_millis(10),
            Duration::from_secs(5),
            tx,
            stop.clone().cancelled_owned(),
        ));
        assert_eq!(next(&mut rx).await, NvmlStatus::Answering { gpus: 8 });
        let NvmlStatus::Failing { error } = next(&mut rx).await else {
            panic!("expected a failure")
        };
        assert!(error.starts_with("nvmlDeviceGetCount_v2: "), "{error}");
        assert_eq!(next(&mut rx).await, NvmlStatus::Answering { gpus: 8 });
        stop.cancel();
        task.await.expect("task ends on stop");
    }

    #[tokio::test]
    async fn a_hanging_call_counts_as_failing() {
        let ping = Arc::new(Scripted(
            Mutex::new(vec![Ok(1)]),
            Duration::from_millis(500),
        ));
        let (tx, mut rx) = watch::channel(NvmlStatus::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(watch_nvml(
            ping,
            Duration::from_secs(60),
            Duration::from_millis(20),
            tx,
            stop.clone().cancelled_owned(),
        ));
        let NvmlStatus::Failing { error } = next(&mut rx).await else {
            panic!("expected a time-out failure")
        };
        assert!(error.contains("did not return within"), "{error}");
        // The hung call finally returns: NVML answers again.
        assert_eq!(next(&mut rx).await, NvmlStatus::Answering { gpus: 1 });
        stop.cancel();
        task.await.expect("task ends on stop");
    }
}
