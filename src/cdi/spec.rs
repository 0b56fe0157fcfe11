//! Serde model of a CDI spec file (the subset of fields a producer writes).
//!
//! Owns the JSON shape only: field names are camelCase exactly as the CDI specification's
//! `specs-go` types, empty and unset fields are skipped (`omitempty`), maps are sorted.
//! Must not decide content (see `claim_spec`) nor the `cdiVersion` (see `version`).
//! Unknown fields are rejected on decode, as the CDI runtimes do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A CDI spec document (`/var/run/cdi/*.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// `cdiVersion`: the minimum version the used fields need (see `version::minimum_version`).
    pub cdi_version: String,
    /// `kind`: `<vendor>/<class>`, e.g. `gpu-dra.dev/claim`.
    pub kind: String,
    /// `annotations` (spec level, needs 0.6.0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `devices`: always written, even when empty (required by the spec).
    pub devices: Vec<Device>,
    /// `containerEdits` applied once for any device of this spec.
    #[serde(default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// One CDI device (`devices[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// `name`: the part after `=` in the qualified device id.
    pub name: String,
    /// `annotations` (device level, needs 0.6.0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `containerEdits`: always written (required by the spec).
    pub container_edits: ContainerEdits,
}

/// `containerEdits`: what the runtime adds to the OCI spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    /// `env`: `KEY=VALUE` strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `deviceNodes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    /// `hooks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    /// `mounts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// `additionalGids` (needs 0.7.0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
}

impl ContainerEdits {
    /// True when no edit is set (the object is then left out of the document).
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.hooks.is_empty()
            && self.mounts.is_empty()
            && self.additional_gids.is_empty()
    }
}

/// `deviceNodes[]`: a device node to create in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    /// `path` in the container (and on the host unless `hostPath` is set).
    pub path: String,
    /// `hostPath` when it differs from `path` (needs 0.5.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `type`: `c`, `b` or `p`; runtimes stat the host node when unset.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// `major` number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    /// `minor` number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    /// `fileMode` (Go `os.FileMode` as an integer, e.g. 0o666 = 438).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    /// `permissions`: cgroup access, a combination of `r`, `w`, `m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    /// `uid` owning the node in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// `gid` owning the node in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl DeviceNode {
    /// A character device node at `path` with known numbers, so the runtime need not stat
    /// the host node (which may not exist in the runtime's mount namespace).
    pub fn char(path: impl Into<String>, major: u32, minor: u32) -> Self {
        Self {
            path: path.into(),
            node_type: Some("c".into()),
            major: Some(i64::from(major)),
            minor: Some(i64::from(minor)),
            ..Self::default()
        }
    }

    /// A node at `path` whose type and numbers the runtime reads from the host.
    pub fn at(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }
}

/// `mounts[]`: a bind (or other) mount into the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// `hostPath`: source on the host.
    pub host_path: String,
    /// `containerPath`: target in the container.
    pub container_path: String,
    /// `type` of the mount, e.g. `bind` (needs 0.4.0).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub mount_type: Option<String>,
    /// `options`, e.g. `["ro", "nosuid", "nodev", "bind"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// `hooks[]`: an OCI hook.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// `hookName`: OCI lifecycle point, e.g. `createContainer`.
    pub hook_name: String,
    /// `path` of the executable.
    pub path: String,
    /// `args` including argv\[0\].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// `env`: `KEY=VALUE` strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `timeout` in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}
