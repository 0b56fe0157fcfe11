//! The plugin's checkpoint: which claims are prepared on this node, durable across plugin
//! restarts. `model` is the versioned document, `store` loads (with quarantine and boot id
//! checks) and saves it atomically, `writer` is the one task that owns it at run time and
//! commits concurrent updates in groups.
//!
//! Must not decide recovery actions (the prepare module does). Follows the kubelet-plugin
//! convention of a checkpoint in the plugin data dir (`<kubelet-root>/plugins/<driver>/
//! checkpoint.json`) and NVIDIA's two-phase claim record (COMPAT.md).
//!
//! # What must be durable against what
//!
//! Everything the checkpoint describes is boot-scoped: CDI specs (tmpfs on real nodes),
//! compute modes and time slices (reset by the driver at boot), MPS daemons (processes).
//! The file carries the boot id, and after a reboot the kubelet prepares every claim again.
//! So the checkpoint has to survive exactly one thing, a crash or kill of the plugin
//! process, and the kernel's page cache survives that: a write followed by a rename is
//! visible, whole, to the next plugin process without any fsync. An OS crash or power loss
//! is the one event an fsync would protect against, and it voids the boot the state
//! belongs to. Hence: atomic temp file + rename (readers never see a half-written file
//! within a boot), no file or directory fsync, 0 fsyncs per prepare/unprepare pair (7 for
//! a claim without sharing policy and 9 with one before). What an OS crash can leave on a
//! disk-backed plugin dir (the old file, the new one, an empty or torn one) is handled at
//! load: a decodable file from another boot is [`LoadOutcome::PreviousBoot`], and one that
//! does not decode but predates the boot is [`LoadOutcome::TornFromPreviousBoot`], not
//! corruption. Either way recovery rebuilds from what is true (API server, CDI dir, GPUs),
//! so a checkpoint lost for any reason never costs a running workload.

pub mod model;
pub mod store;
pub mod writer;

pub use model::{
    CHECKPOINT_FILE_NAME, CHECKPOINT_VERSION, Checkpoint, ClaimEntry, ClaimState,
    PreparedDeviceRecord,
};
pub use store::{
    CheckpointError, CheckpointStore, DEFAULT_BOOT_ID_PATH, DEFAULT_PROC_STAT_PATH, LoadOutcome,
    Loaded,
};
pub use writer::CheckpointWriter;
