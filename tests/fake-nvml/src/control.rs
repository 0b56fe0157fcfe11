//! The test-facing control API: inject faults and XID events into a fake machine and read
//! back what a plugin did to it — without NVML, without environment variables.
//!
//! Owns nothing but thin, documented wrappers over the state store; every function takes
//! the state file path explicitly (`<topology>.state.json` unless `FAKE_NVML_STATE` was
//! used; see [`state_path`]). Works before any NVML user opened the machine: the
//! topology's GPUs are added to the state on first NVML use.
//!
//! ```no_run
//! use nvidia_ml::control::{self, Fault, Times};
//! let state = control::state_path(std::path::Path::new("/tmp/topo.yaml"));
//! control::inject_fault(&state, Fault {
//!     function: "nvmlDeviceSetComputeMode".into(),
//!     gpu_uuid: None,
//!     error: 999, // NVML_ERROR_UNKNOWN
//!     times: Times::Once,
//! }).unwrap();
//! let s = control::read_state(&state).unwrap();
//! for (uuid, gpu) in &s.gpus { println!("{uuid}: {:?} timeslice {}", gpu.compute_mode, gpu.timeslice); }
//! ```

use std::path::{Path, PathBuf};

use crate::engine::Engine;
pub use crate::state::{
    ComputeInstanceState, ComputeMode, Fault, GpuInstanceState, GpuState, MemoryLimit, MpsDaemon,
    MpsNamespace, MpsServer, NO_EFFECT, State, Times, XidEvent,
};
use crate::store::{StateStore, StoreError};
pub use crate::topology::{MemoryLimitBackend, Topology, TopologyError};

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The state file could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// File name of the fake library Cargo builds (`cdylib` of this crate).
pub const CDYLIB_NAME: &str = "libnvidia_ml.so";

/// Find the fake library for the running test: the newest `libnvidia_ml.so` in the
/// directory of the current executable (`target/<profile>/deps/`, where Cargo builds it
/// whenever a crate depending on `fake-nvml` is tested) or its parent (`target/<profile>/`,
/// where `cargo build` copies it). `None` if neither exists.
pub fn find_cdylib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(CDYLIB_NAME))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// The default state file of topology file `topology` (`<topology>.state.json`).
pub fn state_path(topology: &Path) -> PathBuf {
    crate::topology::default_state_path(topology)
}

/// Load and resolve a topology file (to learn GPU UUIDs, minors, models).
pub fn load_topology(topology: &Path) -> Result<Topology, TopologyError> {
    Topology::load(topology)
}

/// Make the next matching NVML call(s) fail: `fault.function` (exact symbol name, e.g.
/// `nvmlDeviceCreateGpuInstanceWithPlacement`, or `nvidia-smi compute-policy` /
/// `nvidia-smi -c` for the fake nvidia-smi) on `fault.gpu_uuid` (any GPU when `None`)
/// returns `fault.error` (an `nvmlReturn_t`) `fault.times` times. Faults are matched in
/// injection order.
pub fn inject_fault(state_path: &Path, fault: Fault) -> Result<(), ControlError> {
    StateStore::new(state_path, None).update(|s| s.faults.push(fault))?;
    Ok(())
}

/// Remove every pending fault.
pub fn clear_faults(state_path: &Path) -> Result<(), ControlError> {
    StateStore::new(state_path, None).update(|s| s.faults.clear())?;
    Ok(())
}

/// Deliver XID `xid` on GPU `gpu_uuid` to every event set registered for
/// `nvmlEventTypeXidCriticalError` on it (in any process). Returns the event's sequence number.
pub fn inject_xid(state_path: &Path, gpu_uuid: &str, xid: u64) -> Result<u64, ControlError> {
    Ok(StateStore::new(state_path, None).update(|s| Engine::push_xid(s, gpu_uuid, xid))?)
}

/// Everything the fake remembers: per-GPU compute mode, time slice, MIG mode, GPU and
/// compute instances (ids, placements, MIG UUIDs), pending faults, XIDs, MPS daemons with
/// their recorded limits. An empty state if nothing used the machine yet.
///
/// An MPS daemon record reads `running: true` only while its process exists (and is not a
/// zombie): a daemon killed by a signal (SIGTERM, SIGKILL, its process group killed) is
/// gone, as a real one would be, though it could not update its record.
pub fn read_state(state_path: &Path) -> Result<State, ControlError> {
    let mut state = StateStore::new(state_path, None).read()?;
    for d in state.mps_daemons.values_mut() {
        d.running = d.running && crate::mps::process_alive(d.pid);
    }
    Ok(state)
}
