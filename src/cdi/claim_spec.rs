//! Builds the CDI spec of one prepared claim (pure), and the names around it.
//!
//! Owns the content of our per-claim specs: kind `gpu-dra.dev/claim`, one CDI device per
//! allocated DRA device named `<claimUID>-<device name>`, and edits common to the claim
//! (the NVIDIA control nodes and `NVIDIA_VISIBLE_DEVICES`). Must not read the host: the
//! prepare module passes GPU facts in (minor numbers, UUIDs, MIG capability numbers read
//! from `/proc/driver/nvidia/capabilities`). Follows NVIDIA's reference driver's claim
//! specs (COMPAT.md) minus the driver-library mounts/hooks, which need NVIDIA's nvcdi
//! library: on a real node those come from the container toolkit (`nvidia-ctk cdi
//! generate` spec, or its runtime hook), so callers may add them through
//! [`claim_spec_with_common`].
//!
//! `NVIDIA_VISIBLE_DEVICES` lists every device of the claim and sits in the spec-level
//! edits, so a container that references only some of a claim's requests still sees the
//! claim's full UUID list in that variable (device nodes stay per device).

use std::path::{Path, PathBuf};

use super::spec::{ContainerEdits, Device, DeviceNode, Mount, Spec};
use super::version::minimum_version;

/// CDI vendor of our specs.
pub const VENDOR: &str = "gpu-dra.dev";
/// CDI class of our specs.
pub const CLASS: &str = "claim";
/// CDI kind (`<vendor>/<class>`) of our specs.
pub const KIND: &str = "gpu-dra.dev/claim";
/// Spec file name prefix (`<vendor>-<class>_`), shared by all our claim specs.
pub const SPEC_FILE_PREFIX: &str = "gpu-dra.dev-claim_";
/// Spec file extension.
pub const SPEC_FILE_SUFFIX: &str = ".json";
/// Control device nodes every CUDA container needs, in the order they are written.
pub const CONTROL_DEVICE_NODES: [&str; 3] =
    ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"];
/// Directory of the MIG capability device nodes.
pub const NVIDIA_CAPS_DIR: &str = "/dev/nvidia-caps";
/// Environment variable listing the visible GPU/MIG UUIDs for the NVIDIA container stack.
pub const VISIBLE_DEVICES_ENV: &str = "NVIDIA_VISIBLE_DEVICES";

/// What the spec needs to know about one allocated device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdiDeviceInput {
    /// DRA device name in the pool (`gpu-0`, `gpu-1-mig-1g10gb-19-0`).
    pub device_name: String,
    /// GPU or MIG UUID, listed in `NVIDIA_VISIBLE_DEVICES`.
    pub uuid: String,
    /// Device nodes of this device (its `/dev/nvidiaN`, MIG capability nodes).
    pub device_nodes: Vec<DeviceNode>,
    /// Extra environment for this device, `(key, value)`.
    pub env: Vec<(String, String)>,
    /// Extra mounts for this device (e.g. an MPS pipe directory).
    pub mounts: Vec<Mount>,
}

/// One MIG capability device node, `/dev/nvidia-caps/nvidia-cap<minor>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigCapNode {
    /// Minor number, read from `/proc/driver/nvidia/capabilities/gpu<M>/mig/gi<G>[/ci<C>]/access`.
    pub minor: u32,
    /// Major number of `nvidia-caps` from `/proc/devices`; `None` lets the runtime stat the
    /// host node.
    pub major: Option<u32>,
}

impl CdiDeviceInput {
    /// A full GPU: node `/dev/nvidia<minor>`.
    pub fn gpu(device_name: impl Into<String>, uuid: impl Into<String>, minor: u32) -> Self {
        Self {
            device_name: device_name.into(),
            uuid: uuid.into(),
            device_nodes: vec![DeviceNode::at(format!("/dev/nvidia{minor}"))],
            ..Self::default()
        }
    }

    /// A MIG device: its parent's `/dev/nvidia<parent_minor>` plus the capability nodes of
    /// its GPU instance and compute instance (`caps`, in that order).
    pub fn mig(
        device_name: impl Into<String>,
        mig_uuid: impl Into<String>,
        parent_minor: u32,
        caps: &[MigCapNode],
    ) -> Self {
        let mut device_nodes = vec![DeviceNode::at(format!("/dev/nvidia{parent_minor}"))];
        device_nodes.extend(caps.iter().map(|cap| DeviceNode {
            node_type: cap.major.map(|_| "c".to_string()),
            major: cap.major.map(i64::from),
            minor: cap.major.map(|_| i64::from(cap.minor)),
            ..DeviceNode::at(format!("{NVIDIA_CAPS_DIR}/nvidia-cap{}", cap.minor))
        }));
        Self {
            device_name: device_name.into(),
            uuid: mig_uuid.into(),
            device_nodes,
            ..Self::default()
        }
    }
}

/// The CDI device name of a claim's device: `<claimUID>-<device name>`.
pub fn cdi_device_name(claim_uid: &str, device_name: &str) -> String {
    format!("{claim_uid}-{device_name}")
}

/// The qualified CDI device id returned to the kubelet:
/// `gpu-dra.dev/claim=<claimUID>-<device name>`.
pub fn cdi_device_id(claim_uid: &str, device_name: &str) -> String {
    format!("{KIND}={}", cdi_device_name(claim_uid, device_name))
}

/// The spec file name of a claim: `gpu-dra.dev-claim_<claimUID>.json`.
pub fn spec_file_name(claim_uid: &str) -> String {
    format!("{SPEC_FILE_PREFIX}{claim_uid}{SPEC_FILE_SUFFIX}")
}

/// The spec file path of a claim under `cdi_root` (normally `/var/run/cdi`).
pub fn spec_path(cdi_root: &Path, claim_uid: &str) -> PathBuf {
    cdi_root.join(spec_file_name(claim_uid))
}

/// The claim UID a spec file name belongs to, when it is one of ours (inverse of
/// [`spec_file_name`]).
pub fn claim_uid_of_file_name(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix(SPEC_FILE_PREFIX)?
        .strip_suffix(SPEC_FILE_SUFFIX)
        .filter(|uid| !uid.is_empty())
}

/// Builds the spec of claim `claim_uid` with `devices` (in allocation order) and the
/// standard common edits; `cdiVersion` is the minimum the content needs.
pub fn claim_spec(claim_uid: &str, devices: &[CdiDeviceInput]) -> Spec {
    claim_spec_with_common(claim_uid, devices, ContainerEdits::default())
}

/// As [`claim_spec`], with `extra_common` edits appended to the spec-level edits (driver
/// library mounts, hooks, claim-wide MPS settings). A device node in `extra_common`
/// replaces the default control node of the same path (e.g. one with type and numbers).
pub fn claim_spec_with_common(
    claim_uid: &str,
    devices: &[CdiDeviceInput],
    extra_common: ContainerEdits,
) -> Spec {
    let uuids: Vec<&str> = devices.iter().map(|d| d.uuid.as_str()).collect();
    let mut common = ContainerEdits {
        env: vec![format!("{VISIBLE_DEVICES_ENV}={}", uuids.join(","))],
        device_nodes: CONTROL_DEVICE_NODES
            .iter()
            .map(|p| DeviceNode::at(*p))
            .collect(),
        ..ContainerEdits::default()
    };
    common.env.extend(extra_common.env);
    // A caller that knows a control node's numbers passes it in full: it replaces the
    // path-only default of the same path.
    common
        .device_nodes
        .retain(|d| !extra_common.device_nodes.iter().any(|x| x.path == d.path));
    common.device_nodes.extend(extra_common.device_nodes);
    common.hooks.extend(extra_common.hooks);
    common.mounts.extend(extra_common.mounts);
    common.additional_gids.extend(extra_common.additional_gids);

    let devices = devices
        .iter()
        .map(|d| Device {
            name: cdi_device_name(claim_uid, &d.device_name),
            container_edits: ContainerEdits {
                env: d.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                device_nodes: d.device_nodes.clone(),
                mounts: d.mounts.clone(),
                ..ContainerEdits::default()
            },
            ..Device::default()
        })
        .collect();
    let mut spec = Spec {
        cdi_version: String::new(),
        kind: KIND.into(),
        devices,
        container_edits: common,
        ..Spec::default()
    };
    spec.cdi_version = minimum_version(&spec).to_string();
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const UID: &str = "4f7c2a9e-1b3d-4e5f-8a6b-9c0d1e2f3a4b";

    #[test]
    fn names_and_ids() {
        assert_eq!(
            cdi_device_id(UID, "gpu-0"),
            format!("gpu-dra.dev/claim={UID}-gpu-0")
        );
        assert_eq!(spec_file_name(UID), format!("gpu-dra.dev-claim_{UID}.json"));
        assert_eq!(
            spec_path(Path::new("/var/run/cdi"), "u1"),
            PathBuf::from("/var/run/cdi/gpu-dra.dev-claim_u1.json")
        );
        assert_eq!(claim_uid_of_file_name(&spec_file_name(UID)), Some(UID));
        assert_eq!(claim_uid_of_file_name("gpu-dra.dev-claim_.json"), None);
        assert_eq!(
            claim_uid_of_file_name("k8s.gpu.nvidia.com-claim_x.json"),
            None
        );
        assert_eq!(claim_uid_of_file_name("gpu-dra.dev-claim_x.json.tmp"), None);
    }

    #[test]
    fn golden_gpu_claim_spec() {
        let spec = claim_spec(
            UID,
            &[
                CdiDeviceInput::gpu("gpu-0", "GPU-11111111-2222-3333-4444-555555555555", 0),
                CdiDeviceInput::gpu("gpu-3", "GPU-66666666-7777-8888-9999-000000000000", 3),
            ],
        );
        let expected = r#"{
  "cdiVersion": "0.5.0",
  "kind": "gpu-dra.dev/claim",
  "devices": [
    {
      "name": "4f7c2a9e-1b3d-4e5f-8a6b-9c0d1e2f3a4b-gpu-0",
      "containerEdits": {
        "deviceNodes": [
          {
            "path": "/dev/nvidia0"
          }
        ]
      }
    },
    {
      "name": "4f7c2a9e-1b3d-4e5f-8a6b-9c0d1e2f3a4b-gpu-3",
      "containerEdits": {
        "deviceNodes": [
          {
            "path": "/dev/nvidia3"
          }
        ]
      }
    }
  ],
  "containerEdits": {
    "env": [
      "NVIDIA_VISIBLE_DEVICES=GPU-11111111-2222-3333-4444-555555555555,GPU-66666666-7777-8888-9999-000000000000"
    ],
    "deviceNodes": [
      {
        "path": "/dev/nvidiactl"
      },
      {
        "path": "/dev/nvidia-uvm"
      },
      {
        "path": "/dev/nvidia-uvm-tools"
      }
    ]
  }
}"#;
        assert_eq!(
            serde_json::to_string_pretty(&spec).expect("serialise"),
            expected
        );
        let back: Spec = serde_json::from_str(expected).expect("decode");
        assert_eq!(back, spec);
    }

    #[test]
    fn golden_mig_claim_spec() {
        let mut mig = CdiDeviceInput::mig(
            "gpu-1-mig-1g10gb-19-0",
            "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            1,
            &[
                MigCapNode {
                    minor: 21,
                    major: Some(237),
                },
                MigCapNode {
                    minor: 22,
                    major: Some(237),
                },
            ],
        );
        mig.env
            .push(("CUDA_MPS_PIPE_DIRECTORY".into(), "/mps/pipe".into()));
        mig.mounts.push(Mount {
            host_path: "/var/lib/kubelet/plugins/gpu.gpu-dra.dev/mps/u/pipe".into(),
            container_path: "/mps/pipe".into(),
            mount_type: Some("bind".into()),
            options: vec!["rw".into(), "bind".into()],
        });
        let spec = claim_spec("abc", &[mig]);
        let expected = r#"{
  "cdiVersion": "0.4.0",
  "kind": "gpu-dra.dev/claim",
  "devices": [
    {
      "name": "abc-gpu-1-mig-1g10gb-19-0",
      "containerEdits": {
        "env": [
          "CUDA_MPS_PIPE_DIRECTORY=/mps/pipe"
        ],
        "deviceNodes": [
          {
            "path": "/dev/nvidia1"
          },
          {
            "path": "/dev/nvidia-caps/nvidia-cap21",
            "type": "c",
            "major": 237,
            "minor": 21
          },
          {
            "path": "/dev/nvidia-caps/nvidia-cap22",
            "type": "c",
            "major": 237,
            "minor": 22
          }
        ],
        "mounts": [
          {
            "hostPath": "/var/lib/kubelet/plugins/gpu.gpu-dra.dev/mps/u/pipe",
            "containerPath": "/mps/pipe",
            "type": "bind",
            "options": [
              "rw",
              "bind"
            ]
          }
        ]
      }
    }
  ],
  "containerEdits": {
    "env": [
      "NVIDIA_VISIBLE_DEVICES=MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    ],
    "deviceNodes": [
      {
        "path": "/dev/nvidiactl"
      },
      {
        "path": "/dev/nvidia-uvm"
      },
      {
        "path": "/dev/nvidia-uvm-tools"
      }
    ]
  }
}"#;
        assert_eq!(
            serde_json::to_string_pretty(&spec).expect("serialise"),
            expected
        );
    }

    #[test]
    fn unknown_spec_fields_are_rejected_on_decode() {
        let err = serde_json::from_str::<Spec>(
            r#"{"cdiVersion": "0.5.0", "kind": "a/b", "devices": [], "extra": 1}"#,
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn mig_caps_without_major_let_the_runtime_stat() {
        let d = CdiDeviceInput::mig(
            "m",
            "MIG-x",
            0,
            &[MigCapNode {
                minor: 30,
                major: None,
            }],
        );
        assert_eq!(
            d.device_nodes[1],
            DeviceNode::at("/dev/nvidia-caps/nvidia-cap30")
        );
    }

    #[test]
    fn extra_common_edits_are_appended() {
        let extra = ContainerEdits {
            env: vec!["X=1".into()],
            additional_gids: vec![44],
            ..Default::default()
        };
        let spec = claim_spec_with_common("u", &[CdiDeviceInput::gpu("gpu-0", "GPU-a", 0)], extra);
        assert_eq!(
            spec.container_edits.env,
            ["NVIDIA_VISIBLE_DEVICES=GPU-a", "X=1"]
        );
        assert_eq!(spec.cdi_version, "0.7.0");
    }
}
