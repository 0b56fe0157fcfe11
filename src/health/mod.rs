//! GPU health for the kubelet's DRA health service (KEP-4680).
//!
//! Owns what "healthy" means for the devices this plugin publishes: the XID catalogue
//! ([`xid`], pure), the per-device health published on a watch channel ([`state`]) and
//! the NVML XID event watch feeding it ([`watcher`], behind [`XidSource`]). It must not
//! serve gRPC (the `plugin` module streams [`HealthSnapshot`]s to the kubelet) nor change
//! GPU settings.

pub mod state;
pub mod watcher;
pub mod xid;

pub use state::{DeviceHealth, Health, HealthSnapshot, HealthState, unix_now};
pub use watcher::{
    NvmlXidSource, WAIT_TIMEOUT, WatchError, XidEvent, XidSource, run_xid_loop, spawn_xid_watcher,
    start_nvml_watcher,
};
pub use xid::{MAX_MESSAGE_LEN, XidVerdict, classify};
