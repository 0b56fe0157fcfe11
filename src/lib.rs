//! gpu-dra: a Kubernetes DRA (Dynamic Resource Allocation) driver for NVIDIA GPUs.
//!
//! The node plugin discovers GPUs through NVML, publishes them as ResourceSlices,
//! and prepares ResourceClaims (compute policy + CDI spec) when the kubelet asks.
//! See `README.md` for the architecture picture; each module's docs say what it owns.

pub mod cdi;
pub mod checkpoint;
pub mod claims;
pub mod cli;
pub mod config;
pub mod devnodes;
pub mod driver_root;
pub mod events;
pub mod health;
pub mod http;
pub mod instance;
pub mod inventory;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod nvml_liveness;
pub mod nvml_raw;
pub mod plugin;
pub mod prepare;
pub mod proto;
pub mod run;
pub mod sharing;
pub mod slices;
pub mod state_files;
pub mod status;
pub mod tool_env;
pub mod webhook;
