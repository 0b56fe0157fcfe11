//! A fake NVIDIA Management Library for tests: `libnvidia_ml.so` exporting the NVML C ABI
//! the driver uses, over a model of real GPUs (presets with real MIG tables), a state file
//! shared by every process, and fake `nvidia-smi` / `nvidia-cuda-mps-control` tools.
//!
//! Layers (one way): [`presets`] (hardware facts) -> [`topology`] (which GPUs) ->
//! [`state`] (what they remember) -> [`engine`] (pure rules) -> [`store`] / [`procfs`]
//! (files) -> [`machine`] (wiring) -> `ffi` (the C ABI, the only unsafe code), [`smi`],
//! [`mps`] (tools) and [`control`] (test API). See the crate README.

pub mod control;
pub mod engine;
mod ffi;
pub mod ids;
pub mod machine;
pub mod memory_limits;
pub mod mps;
pub mod mps_v3;
pub mod presets;
pub mod procfs;
pub mod smi;
pub mod state;
pub mod store;
pub mod topology;
