//! Feeds XID critical-error events into [`HealthState`].
//!
//! Owns the blocking event loop over an [`XidSource`] (a small trait at the NVML seam)
//! and the real source over nvml-wrapper's `EventSet`, registered for
//! `EventTypes::CRITICAL_XID_ERROR` on every GPU (NVML `nvmlDeviceRegisterEvents` /
//! `nvmlEventSetWait_v2`). It must not decide what an XID means (that is `xid`) nor
//! serve anything. The loop runs on a blocking thread and checks for shutdown between
//! waits, so it stops within one wait timeout. A watch that cannot be set up, or fails
//! later, is set up again with exponential backoff; meanwhile devices read UNKNOWN.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::EventSet;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::state::{HealthState, unix_now};
use super::xid::{XidVerdict, classify};

/// How long one wait blocks: the longest a shutdown waits for the loop.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// One XID critical error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidEvent {
    /// UUID of the GPU (or MIG device) that raised it.
    pub gpu_uuid: String,
    /// The XID code.
    pub xid: u64,
}

/// Why the health watch failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// NVML could not be loaded or initialised.
    #[error("cannot initialise NVML from {lib}")]
    Init {
        /// Library path, or the loader default.
        lib: String,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// XID events could not be registered for a GPU.
    #[error("cannot register XID events on GPU {index}")]
    Register {
        /// NVML index of the GPU.
        index: u32,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// Waiting for events failed.
    #[error("waiting for NVML events failed")]
    Wait {
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
}

/// A blocking source of XID events.
pub trait XidSource {
    /// Waits up to `timeout` for the next event; `Ok(None)` when none came.
    fn wait(&mut self, timeout: Duration) -> Result<Option<XidEvent>, WatchError>;
}

/// Consecutive wait failures after which the watch gives up.
const MAX_CONSECUTIVE_ERRORS: u32 = 10;

/// Runs until `stop` is cancelled: every event goes into `state`, every wait marks the
/// list as checked. After repeated wait failures the devices are marked unknown and the
/// loop returns the last error.
pub fn run_xid_loop<S: XidSource + ?Sized>(
    source: &mut S,
    state: &HealthState,
    stop: &CancellationToken,
) -> Result<(), WatchError> {
    let mut errors = 0;
    while !stop.is_cancelled() {
        match source.wait(WAIT_TIMEOUT) {
            Ok(event) => {
                errors = 0;
                let now = unix_now();
                if let Some(event) = event {
                    record(state, &event, now);
                }
                state.checked(now);
            }
            Err(err) => {
                errors += 1;
                warn!(error = %err, errors, "XID event wait failed");
                if errors >= MAX_CONSECUTIVE_ERRORS {
                    state.watch_failed(&err.to_string(), unix_now());
                    return Err(err);
                }
                // Back off one wait period before the next try, so a failing NVML
                // call does not spin this thread.
                std::thread::sleep(WAIT_TIMEOUT);
            }
        }
    }
    Ok(())
}

fn record(state: &HealthState, event: &XidEvent, now: i64) {
    crate::metrics::events::xid_event(event.xid);
    match classify(event.xid) {
        XidVerdict::Application => {
            info!(gpu = %event.gpu_uuid, xid = event.xid, "application XID; device stays healthy");
        }
        XidVerdict::Unlisted => {
            warn!(gpu = %event.gpu_uuid, xid = event.xid, "XID not in the critical list; device stays healthy");
        }
        XidVerdict::Unhealthy(_) => {
            if let Some(message) = state.record_xid(&event.gpu_uuid, event.xid, now) {
                error!(gpu = %event.gpu_uuid, xid = event.xid, %message, "GPU marked unhealthy");
                crate::events::device_unhealthy(&event.gpu_uuid, event.xid, &message);
            }
        }
    }
}

/// Runs [`run_xid_loop`] over `source` on a blocking thread.
pub fn spawn_xid_watcher<S: XidSource + Send + 'static>(
    mut source: S,
    state: Arc<HealthState>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), WatchError>> {
    tokio::task::spawn_blocking(move || run_xid_loop(&mut source, &state, &stop))
}

/// First delay before the event watch is set up again after a failure; doubles up to
/// [`MAX_RETRY_DELAY`].
pub const MIN_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts to set up the event watch.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Runs `attempt` on blocking threads until `stop`, retrying it with exponential backoff
/// ([`MIN_RETRY_DELAY`] doubling to [`MAX_RETRY_DELAY`]) whenever it fails.
///
/// `attempt(state, stop, registered)` sets up an event watch, calls `registered` once its
/// events are registered, then watches until `stop` (`Ok`) or a failure (`Err`). After a
/// failure the devices read UNKNOWN until an attempt registers again; then they are
/// healthy (unhealthy verdicts stay) and the backoff starts over. `settled` is sent after
/// the first attempt registered or failed.
pub async fn watch_with_retry<F>(
    attempt: F,
    state: Arc<HealthState>,
    stop: CancellationToken,
    settled: tokio::sync::oneshot::Sender<()>,
) where
    F: Fn(&HealthState, &CancellationToken, &mut dyn FnMut()) -> Result<(), WatchError>
        + Send
        + Sync
        + 'static,
{
    let attempt = Arc::new(attempt);
    let mut settled = Some(settled);
    let mut delay = MIN_RETRY_DELAY;
    let (registered_tx, mut registered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    while !stop.is_cancelled() {
        let (attempt, state_for, stop_for) =
            (Arc::clone(&attempt), Arc::clone(&state), stop.clone());
        let registered_tx = registered_tx.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let mut on_registered = || {
                state_for.watch_restored(unix_now());
                let _ = registered_tx.send(());
            };
            attempt(&state_for, &stop_for, &mut on_registered)
        });
        let outcome = loop {
            tokio::select! {
                Some(()) = registered_rx.recv() => {
                    delay = MIN_RETRY_DELAY;
                    if let Some(s) = settled.take() { let _ = s.send(()); }
                }
                joined = &mut task => break joined,
            }
        };
        let err = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err.to_string(),
            Err(join) => format!("health watch task failed: {join}"),
        };
        if stop.is_cancelled() {
            return;
        }
        error!(error = %err, retry_in_s = delay.as_secs(), "GPU health watch failed; devices read UNKNOWN until it runs again");
        state.watch_failed(&err, unix_now());
        if let Some(s) = settled.take() {
            let _ = s.send(());
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Watches XIDs through NVML loaded from `lib_path` (default: the loader's
/// `libnvidia-ml.so.1`) until `stop`, setting the watch up again with backoff whenever
/// NVML init, `nvmlEventSetCreate`, `nvmlDeviceRegisterEvents` or repeated waits fail
/// ([`watch_with_retry`]). Returns once the first attempt registered its events (so no
/// XID raised after this returns is missed) or failed.
pub async fn start_nvml_watcher(
    lib_path: Option<&Path>,
    state: Arc<HealthState>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let lib_path: Option<PathBuf> = lib_path.map(Path::to_owned);
    let (settled, ready) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(watch_with_retry(
        move |state: &HealthState, stop: &CancellationToken, registered: &mut dyn FnMut()| {
            watch_nvml(lib_path.as_deref(), state, stop, registered)
        },
        state,
        stop,
        settled,
    ));
    // Dropped unsent only if the task ended early: either way the watch is settled.
    let _ = ready.await;
    task
}

fn watch_nvml(
    lib_path: Option<&Path>,
    state: &HealthState,
    stop: &CancellationToken,
    registered: &mut dyn FnMut(),
) -> Result<(), WatchError> {
    let init = match lib_path {
        Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
        None => Nvml::init(),
    };
    let nvml = init.map_err(|source| WatchError::Init {
        lib: lib_path.map_or_else(
            || "libnvidia-ml.so.1".to_owned(),
            |p| p.display().to_string(),
        ),
        source,
    })?;
    let mut source = NvmlXidSource::new(&nvml)?;
    info!(gpus = source.gpus, "watching GPUs for XID critical errors");
    registered();
    run_xid_loop(&mut source, state, stop)
}

/// [`XidSource`] over an NVML event set registered for XID critical errors on every GPU
/// that supports them.
pub struct NvmlXidSource<'nvml> {
    set: EventSet<'nvml>,
    gpus: u32,
}

impl<'nvml> NvmlXidSource<'nvml> {
    /// Creates the event set and registers every GPU of `nvml` that supports XID events.
    pub fn new(nvml: &'nvml Nvml) -> Result<Self, WatchError> {
        let register = |index: u32, source: NvmlError| WatchError::Register { index, source };
        let count = nvml.device_count().map_err(|e| register(0, e))?;
        let mut set = nvml.create_event_set().map_err(|e| register(0, e))?;
        let mut gpus = 0;
        for index in 0..count {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| register(index, e))?;
            let supported = device
                .supported_event_types()
                .map_err(|e| register(index, e))?;
            if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
                warn!(
                    index,
                    "GPU does not report XID events; its health is not watched"
                );
                continue;
            }
            set = device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| register(index, e.error))?;
            gpus += 1;
        }
        Ok(Self { set, gpus })
    }
}

impl XidSource for NvmlXidSource<'_> {
    fn wait(&mut self, timeout: Duration) -> Result<Option<XidEvent>, WatchError> {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let data = match self.set.wait(ms) {
            Ok(data) => data,
            Err(NvmlError::Timeout) => return Ok(None),
            Err(source) => return Err(WatchError::Wait { source }),
        };
        let Some(XidError::Value(xid)) = data.event_data else {
            return Ok(None);
        };
        let gpu_uuid = data
            .device
            .uuid()
            .map_err(|source| WatchError::Wait { source })?;
        Ok(Some(XidEvent { gpu_uuid, xid }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::health::state::Health;
    use crate::inventory::fixtures;

    /// Events fed through a channel; waits return `None` on timeout.
    struct ChannelSource(mpsc::Receiver<XidEvent>);

    impl XidSource for ChannelSource {
        fn wait(&mut self, timeout: Duration) -> Result<Option<XidEvent>, WatchError> {
            Ok(self.0.recv_timeout(timeout).ok())
        }
    }

    #[tokio::test]
    async fn events_reach_the_state_and_the_loop_stops() {
        let inventory = fixtures::dgx_h100();
        let uuid = inventory.gpus[1].uuid.clone();
        let state = Arc::new(HealthState::new("node-1", inventory, 100));
        let mut rx = state.subscribe();
        let (tx, events) = mpsc::channel();
        let stop = CancellationToken::new();
        let task = spawn_xid_watcher(ChannelSource(events), Arc::clone(&state), stop.clone());

        tx.send(XidEvent {
            gpu_uuid: uuid.clone(),
            xid: 43,
        })
        .unwrap();
        tx.send(XidEvent {
            gpu_uuid: uuid.clone(),
            xid: 95,
        })
        .unwrap();
        let snapshot = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.devices.iter().any(|d| d.health == Health::Unhealthy)),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        for d in snapshot
            .devices
            .iter()
            .filter(|d| d.health == Health::Unhealthy)
        {
            assert_eq!(d.gpu_uuid, uuid);
            assert!(d.message.starts_with("XID 95"), "{}", d.message);
        }

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_failed_watch_reads_unknown_and_is_set_up_again() {
        use std::sync::atomic::{AtomicU32, Ordering};

        let state = Arc::new(HealthState::new("node-1", fixtures::dgx_h100(), 100));
        let mut rx = state.subscribe();
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        let (settled_tx, settled_rx) = tokio::sync::oneshot::channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_with_retry(
            move |_: &HealthState, stop: &CancellationToken, registered: &mut dyn FnMut()| {
                // nvmlEventSetCreate fails once, as NVML answers NVML_ERROR_UNKNOWN.
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(WatchError::Register {
                        index: 0,
                        source: NvmlError::Unknown,
                    });
                }
                registered();
                futures::executor::block_on(stop.cancelled());
                Ok(())
            },
            Arc::clone(&state),
            stop.clone(),
            settled_tx,
        ));
        settled_rx.await.unwrap();
        let unknown = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.devices.iter().all(|d| d.health == Health::Unknown)),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        assert!(
            unknown.devices[0]
                .message
                .contains("cannot register XID events")
        );
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|s| s.devices.iter().all(|d| d.health == Health::Healthy)),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
}
