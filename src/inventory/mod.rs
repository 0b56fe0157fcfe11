//! GPU inventory: what this node has, as plain owned data.
//!
//! Owns the inventory model ([`model`]), its discovery through NVML ([`nvml`] and
//! [`nvml_mig`], behind the [`Discover`] trait so callers can substitute a fixed inventory),
//! what may be published from a discovery that partly failed ([`survey`]), re-discovery
//! ([`refresh`]), the placements view of dynamic MIG GPUs ([`placements`]) and its printouts for the `inventory` subcommand ([`render`]). It must not publish anything or change GPU settings:
//! discovery is read-only. Names and attributes follow NVIDIA's reference DRA driver
//! (design/COMPAT.md).

pub mod fixtures;
pub mod model;
pub mod nvml;
pub mod nvml_mig;
pub mod placements;
pub mod refresh;
pub mod render;
pub mod survey;

pub use model::{
    ComputeCapability, DeviceRef, DynamicMig, ForeignInstance, Gpu, Inventory, MigDevice,
    MigProfile, MigState, Placement,
};
pub use nvml::{Discover, DiscoverError, FixedInventory, NvmlDiscovery};
pub use refresh::{InUseSource, Refresh, refresh_inventory};
pub use render::{
    RenderError, render_inventory, render_inventory_yaml, render_placements, render_slices,
};
pub use survey::{Holdback, InUse, Resolved, Survey, Unresolved, Unsettled, resolve};
