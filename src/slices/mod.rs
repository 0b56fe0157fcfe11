//! ResourceSlice publishing: the desired slices (pure) and the reconciler that alone
//! writes slices of this driver and node to the API server.
//!
//! Follows KEP-4381 (structured parameters, resource.k8s.io/v1) for the slice shape and
//! the pool generation rules; names and attributes follow design/COMPAT.md.

pub mod desired;
pub mod partitionable;
pub mod plan;
pub mod reconcile;
#[cfg(test)]
mod reconcile_tests;
pub mod shares;
pub mod start;
pub mod taints;
