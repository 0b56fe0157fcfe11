//! `gpu-dra webhook`: the validating admission webhook for opaque device config.
//!
//! Owns rejecting ResourceClaims, ResourceClaimTemplates and DeviceClasses whose opaque
//! config for our driver would fail at prepare time, before any pod depends on them:
//! [`review`] is the pure decision, [`server`] the HTTPS surface. It must not mutate
//! objects or judge other drivers' config. Validity itself is
//! [`crate::config::validate_opaque`], shared with the kubelet plugin, so the webhook and
//! the plugin can never disagree about what is valid; so is the rule that two entries of
//! one object may not configure one request differently ([`crate::config::conflicts`]).
//! Repeated JSON keys are found in the raw review body ([`server`]) before it is decoded.
//! New claims asking for a share amount no GPU can give (`compute` above 100) are denied
//! naming the field ([`capacity`]).
//!
//! Follows Kubernetes dynamic admission control (ValidatingWebhookConfiguration,
//! `admission.k8s.io/v1` AdmissionReview) and KEP-4381 for where opaque config lives.

pub mod capacity;
pub mod conflicts;
pub mod review;
pub mod server;

pub use review::{RESOURCE_GROUP, ReviewedKind, config_errors, review, review_with_duplicates};
pub use server::{WebhookError, WebhookSettings, load_tls, router, serve};
