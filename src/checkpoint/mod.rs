//! The plugin's checkpoint: which claims are prepared on this node, durable across plugin
//! restarts. `model` is the versioned document, `store` loads (with quarantine and boot id
//! checks) and saves it atomically, `writer` is the one task that owns it at run time and
//! commits concurrent updates in groups.
//!
//! Must not decide recovery actions (the prepare module does). Follows the kubelet-plugin
//! convention of a checkpoint in the plugin data dir (`<kubelet-root>/plugins/<driver>/
//! checkpoint.json`) and NVIDIA's two-phase claim record (COMPAT.md).

pub mod model;
pub mod store;
pub mod writer;

pub use model::{
    CHECKPOINT_FILE_NAME, CHECKPOINT_VERSION, Checkpoint, ClaimEntry, ClaimState,
    PreparedDeviceRecord,
};
pub use store::{CheckpointError, CheckpointStore, DEFAULT_BOOT_ID_PATH, LoadOutcome, Loaded};
pub use writer::CheckpointWriter;
