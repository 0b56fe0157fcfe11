//! CDI (Container Device Interface) specs for prepared claims: the serde model (`spec`),
//! the minimum version rule (`version`), the pure per-claim builder (`claim_spec`) and the
//! atomic file writer (`writer`).
//!
//! Owns everything under `<cdi-root>/gpu-dra.dev-claim_*.json`; must not talk to NVML or
//! the kubelet. Follows the CDI specification (cncf-tags/container-device-interface,
//! SPEC.md and specs-go) and the DRA kubelet plugin convention of one transient spec per
//! claim returning qualified device ids.

pub mod claim_spec;
pub mod spec;
pub mod version;
pub mod writer;

pub use claim_spec::{
    CdiDeviceInput, KIND, MigCapNode, cdi_device_id, cdi_device_name, claim_spec,
    claim_spec_with_common, spec_path,
};
pub use spec::{ContainerEdits, Device, DeviceNode, Hook, Mount, Spec};
pub use version::minimum_version;
pub use writer::{CdiWriteError, SpecFile, list_specs, remove_spec, write_spec};
