//! gpu-dra: a Kubernetes DRA (Dynamic Resource Allocation) driver for NVIDIA GPUs.
//!
//! The node plugin discovers GPUs through NVML, publishes them as ResourceSlices,
//! and prepares ResourceClaims (compute policy + CDI spec) when the kubelet asks.
//! See `README.md` for the architecture picture; each module's docs say what it owns.

pub mod inventory;
pub mod nvml_raw;
pub mod slices;
