//! Opaque device configuration: the versioned API (`api`), its quantities (`quantity`),
//! the shared validation used by the plugin and the admission webhook (`validate`), the
//! precedence rule picking one config per device (`resolve`), entries of one source that
//! conflict under it (`conflict`) and duplicate keys in raw JSON (`duplicates`).
//!
//! Owns decoding and judging configs; must not apply them (that is `sharing` / `prepare`).
//! Follows KEP-4381 (DRA structured parameters: opaque config in classes and claims) and
//! NVIDIA's `resource.nvidia.com/v1beta1` API for compatibility (COMPAT.md).

pub mod api;
pub mod conflict;
pub mod duplicates;
pub mod quantity;
pub mod resolve;
pub mod validate;

pub use api::{
    ApiVersion, Config, GpuConfig, Kind, MigDeviceConfig, MpsConfig, Sharing, TimeSliceInterval,
};
pub use conflict::{Candidate, Conflict, conflicts};
pub use duplicates::{DuplicateKey, find_duplicate_keys};
pub use resolve::{ConfigSource, EntryError, ResolvedConfig, resolve};
pub use validate::{DeviceFacts, FieldError, join_errors, validate_for_device, validate_opaque};
