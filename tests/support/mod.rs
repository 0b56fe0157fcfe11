//! Shared helpers for the integration tests (include with `mod support;`).
//!
//! Owns: test-only plumbing (the Kubernetes test rig from `tests/cluster`).
//! Must not: hold product logic; every test binary compiles its own copy, so
//! items unused by one test binary are allowed.
#![allow(dead_code)]

pub mod chaos;
pub mod cluster;
pub mod deploy;
pub mod driver;
pub mod dynamic_mig;
pub mod examples;
pub mod scenario;
pub mod share_claims;
pub mod share_limits;
pub mod shares;

#[allow(unused_imports)]
pub use cluster::{TestBox, shared, wait_for};
