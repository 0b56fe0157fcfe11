//! GPU health for the kubelet's DRA health service (KEP-4680) and for scheduling.
//!
//! Owns what "healthy" means for the devices this plugin publishes: the XID catalogue
//! ([`xid`], pure), the per-device health published on watch channels ([`state`]), the
//! NVML XID event watch feeding it ([`watcher`], behind [`XidSource`]), the verdicts kept
//! across restarts ([`verdicts`]) and the admin's clear requests ([`clear`]). It must not
//! serve gRPC (the `plugin` module streams [`HealthSnapshot`]s to the kubelet), publish
//! slices (the `slices` module turns [`UnhealthyGpus`] into device taints) nor change
//! GPU settings.

pub mod clear;
pub mod state;
pub mod verdicts;
pub mod watcher;
pub mod xid;

pub use state::{
    DeviceHealth, Health, HealthSnapshot, HealthState, UnhealthyGpu, UnhealthyGpus, unix_now,
};
pub use verdicts::{VerdictStore, VerdictsLoaded, persist_verdicts};
pub use watcher::{
    NvmlXidSource, WAIT_TIMEOUT, WatchError, XidEvent, XidSource, run_xid_loop, spawn_xid_watcher,
    start_nvml_watcher, watch_with_retry,
};
pub use xid::{MAX_MESSAGE_LEN, XidVerdict, classify};
