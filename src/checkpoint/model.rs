//! The checkpoint document: which claims this plugin prepared, in which phase, with what.
//!
//! Owns the on-disk shape (version 1) and its checksum; pure (no I/O). Follows the
//! two-phase record of NVIDIA's reference driver (PrepareStarted -> PrepareCompleted, node
//! boot id) with our own field names:
//!
//! ```json
//! {"version": 1, "bootId": "…", "checksum": "fnv1a64:…",
//!  "claims": {"<uid>": {"state": "PrepareCompleted", "namespace": "ns", "name": "c",
//!    "devices": [{"pool": "node-a", "device": "gpu-0", "requestNames": ["gpu"],
//!                 "gpuUuid": "GPU-…", "cdiDeviceIds": ["gpu-dra.dev/claim=<uid>-gpu-0"],
//!                 "sharing": {"strategy": "TimeSlicing", …}}]}}}
//! ```
//!
//! The checksum (FNV-1a 64 over the compact JSON of `claims` as written) detects edited or
//! damaged files that still parse; it is optional on read so a hand-repaired file without
//! it still loads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The checkpoint format version this code reads and writes.
pub const CHECKPOINT_VERSION: u32 = 1;
/// File name of the checkpoint in the plugin data dir.
pub const CHECKPOINT_FILE_NAME: &str = "checkpoint.json";

/// The whole checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Format version, [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// Node boot id (`/proc/sys/kernel/random/boot_id`) when the state was recorded.
    pub boot_id: String,
    /// Prepared (or being prepared) claims by claim UID.
    #[serde(default)]
    pub claims: BTreeMap<String, ClaimEntry>,
}

impl Checkpoint {
    /// An empty checkpoint for the current boot.
    pub fn new(boot_id: impl Into<String>) -> Self {
        Self {
            version: CHECKPOINT_VERSION,
            boot_id: boot_id.into(),
            claims: BTreeMap::new(),
        }
    }
}

/// Phase of a claim's preparation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimState {
    /// Recorded before any side effect; on restart such a claim is rolled back.
    PrepareStarted,
    /// All side effects done and the CDI spec written; answers are served from here.
    PrepareCompleted,
}

/// One claim's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimEntry {
    /// Phase.
    pub state: ClaimState,
    /// Claim namespace.
    pub namespace: String,
    /// Claim name.
    pub name: String,
    /// Devices of this driver allocated to the claim on this node.
    #[serde(default)]
    pub devices: Vec<PreparedDeviceRecord>,
    /// Further facts the prepare module keeps per claim (e.g. MPS daemon details).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

/// One prepared device of a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDeviceRecord {
    /// Pool (= node name).
    pub pool: String,
    /// DRA device name (`gpu-0`, `gpu-1-mig-1g10gb-19-0`).
    pub device: String,
    /// Base request names this device was allocated for, as answered to the kubelet
    /// (`req` for a sub-request `req/sub`).
    pub request_names: Vec<String>,
    /// UUID of the physical GPU (the parent GPU for a MIG device): the unit of policy.
    pub gpu_uuid: String,
    /// MIG device UUID, for MIG devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_uuid: Option<String>,
    /// Qualified CDI device ids returned to the kubelet.
    pub cdi_device_ids: Vec<String>,
    /// Applied sharing policy (`sharing::Policy` as JSON); `None` when the claim asked for
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<Value>,
    /// Share id of the allocation result (consumable capacity), answered back unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
}

/// FNV-1a 64 of `bytes`, as `fnv1a64:<16 hex digits>`.
pub(crate) fn checksum(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("fnv1a64:{hash:016x}")
}

/// Serialises `checkpoint` with its checksum (pretty JSON, trailing newline).
pub fn encode(checkpoint: &Checkpoint) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(checkpoint)?;
    let claims = serde_json::to_vec(&value["claims"])?;
    if let Value::Object(obj) = &mut value {
        obj.insert("checksum".into(), checksum(&claims).into());
    }
    let mut bytes = serde_json::to_vec_pretty(&value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses checkpoint bytes; the error is a human-readable reason the file cannot be used
/// (not JSON, unknown version, checksum mismatch, bad field).
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let version = value.get("version").and_then(Value::as_u64);
    match version {
        Some(v) if v == u64::from(CHECKPOINT_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unknown version {v}; this plugin reads version {CHECKPOINT_VERSION}"
            ));
        }
        None => return Err("no numeric \"version\" field".to_string()),
    }
    if let Some(obj) = value.as_object_mut()
        && let Some(stored) = obj.remove("checksum")
    {
        let claims = obj.get("claims").cloned().unwrap_or(Value::Null);
        let claims = serde_json::to_vec(&claims).map_err(|e| e.to_string())?;
        let actual = checksum(&claims);
        if stored.as_str() != Some(actual.as_str()) {
            return Err(format!(
                "checksum mismatch: stored {stored}, content has {actual}"
            ));
        }
    }
    serde_path_to_error::deserialize(value)
        .map_err(|e| format!("invalid field {}: {}", e.path(), e.inner()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn sample() -> Checkpoint {
        let mut cp = Checkpoint::new("boot-1");
        cp.claims.insert(
            "uid-1".into(),
            ClaimEntry {
                state: ClaimState::PrepareCompleted,
                namespace: "default".into(),
                name: "shared-gpu".into(),
                devices: vec![PreparedDeviceRecord {
                    pool: "node-a".into(),
                    device: "gpu-0".into(),
                    request_names: vec!["gpu".into()],
                    gpu_uuid: "GPU-a".into(),
                    mig_uuid: None,
                    cdi_device_ids: vec!["gpu-dra.dev/claim=uid-1-gpu-0".into()],
                    sharing: Some(json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})),
                    share_id: None,
                }],
                extra: BTreeMap::new(),
            },
        );
        cp
    }

    #[test]
    fn round_trip_with_checksum() {
        let cp = sample();
        let bytes = encode(&cp).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(text.contains("\"checksum\": \"fnv1a64:"), "{text}");
        assert!(text.contains("\"state\": \"PrepareCompleted\""));
        assert!(text.contains("\"cdiDeviceIds\""));
        assert_eq!(decode(&bytes), Ok(cp));
    }

    #[test]
    fn missing_checksum_is_accepted() {
        let bytes = serde_json::to_vec(&sample()).expect("encode");
        assert_eq!(decode(&bytes), Ok(sample()));
    }

    #[test]
    fn rejects_tampering_versions_and_garbage() {
        let text = String::from_utf8(encode(&sample()).expect("encode")).expect("utf8");
        let edited = text.replace("shared-gpu", "other");
        assert!(
            decode(edited.as_bytes())
                .expect_err("edited")
                .starts_with("checksum mismatch")
        );
        let v2 = text.replace("\"version\": 1", "\"version\": 2");
        assert_eq!(
            decode(v2.as_bytes()),
            Err("unknown version 2; this plugin reads version 1".into())
        );
        assert!(
            decode(b"{\"bootId\": \"x\"}")
                .expect_err("no version")
                .contains("version")
        );
        assert!(
            decode(b"{\"version\": 1, \"boot")
                .expect_err("truncated")
                .starts_with("not valid JSON")
        );
        let bad_state = serde_json::to_string(&sample())
            .expect("json")
            .replace("PrepareCompleted", "Done");
        let err = decode(bad_state.as_bytes()).expect_err("bad state");
        assert!(err.contains("claims.uid-1.state"), "{err}");
    }
}
