//! A fake machine as one process sees it: the resolved topology plus its state store.
//!
//! Owns the wiring from environment / explicit paths to [`Topology`] + [`StateStore`] and
//! the "lock, complete from topology, run a rule, persist" step every user (FFI,
//! `nvidia-smi`, MPS control) goes through. Only the binaries and the FFI layer read the
//! environment, through [`Machine::from_env`]; tests pass paths to [`Machine::open`].

use std::path::{Path, PathBuf};

use crate::engine::{self, Code, Engine};
use crate::state::State;
use crate::store::{StateStore, StoreError};
use crate::topology::{self, Topology, TopologyError};

/// Environment variable naming the topology file.
pub const TOPOLOGY_ENV: &str = "FAKE_NVML_TOPOLOGY";
/// Environment variable overriding the state file path.
pub const STATE_ENV: &str = "FAKE_NVML_STATE";
/// Environment variable naming the fake proc root to maintain (optional).
pub const PROC_ROOT_ENV: &str = "FAKE_NVML_PROC_ROOT";

/// Errors opening or using a fake machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// `FAKE_NVML_TOPOLOGY` is not set.
    #[error("{TOPOLOGY_ENV} is not set; point it at a topology file")]
    NoTopology,
    /// The topology file is unusable.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The state file is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored state does not fit the topology (e.g. static instances changed).
    #[error("state {path} does not fit the topology: {reason}")]
    Mismatch {
        /// State file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Topology + state of one fake machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The resolved topology.
    pub topo: Topology,
    /// The shared state file.
    pub store: StateStore,
}

impl Machine {
    /// Open from `FAKE_NVML_TOPOLOGY`, `FAKE_NVML_STATE` and `FAKE_NVML_PROC_ROOT`.
    pub fn from_env() -> Result<Machine, MachineError> {
        let topo = std::env::var_os(TOPOLOGY_ENV).ok_or(MachineError::NoTopology)?;
        let state = std::env::var_os(STATE_ENV).map(PathBuf::from);
        let proc_root = std::env::var_os(PROC_ROOT_ENV).map(PathBuf::from);
        Machine::open(Path::new(&topo), state.as_deref(), proc_root.as_deref())
    }

    /// Open the topology at `topology`; state at `state` or `<topology>.state.json`.
    pub fn open(
        topology: &Path,
        state: Option<&Path>,
        proc_root: Option<&Path>,
    ) -> Result<Machine, MachineError> {
        let topo = Topology::load(topology)?;
        let state_path = state
            .map(Path::to_path_buf)
            .unwrap_or_else(|| topology::default_state_path(topology));
        let machine = Machine {
            topo,
            store: StateStore::new(state_path, proc_root.map(Path::to_path_buf)),
        };
        // Materialise the state (and proc tree) right away so outside readers see the GPUs.
        machine.with(|_| Ok(()))?.ok();
        Ok(machine)
    }

    /// Run rule `f` under the state lock after completing the state from the topology.
    /// The outer error is I/O; the inner one is the NVML answer.
    pub fn with<R>(
        &self,
        f: impl FnOnce(&mut Engine<'_>) -> Result<R, Code>,
    ) -> Result<Result<R, Code>, MachineError> {
        let topo = &self.topo;
        let out = self
            .store
            .update(|state| -> Result<Result<R, Code>, String> {
                engine::reconcile(topo, state)?;
                Ok(f(&mut Engine { topo, state }))
            })?;
        out.map_err(|reason| MachineError::Mismatch {
            path: self.store.path().to_path_buf(),
            reason,
        })
    }

    /// A snapshot of the state.
    pub fn snapshot(&self) -> Result<State, MachineError> {
        Ok(self.store.read()?)
    }
}

/// The state store named by the environment (`FAKE_NVML_STATE`, else
/// `<FAKE_NVML_TOPOLOGY>.state.json`) without loading the topology (for tools that only
/// touch MPS records).
pub fn store_from_env() -> Result<StateStore, MachineError> {
    let proc_root = std::env::var_os(PROC_ROOT_ENV).map(PathBuf::from);
    if let Some(s) = std::env::var_os(STATE_ENV) {
        return Ok(StateStore::new(PathBuf::from(s), proc_root));
    }
    let topo = std::env::var_os(TOPOLOGY_ENV).ok_or(MachineError::NoTopology)?;
    Ok(StateStore::new(
        topology::default_state_path(Path::new(&topo)),
        proc_root,
    ))
}
