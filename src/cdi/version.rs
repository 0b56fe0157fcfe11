//! The minimum `cdiVersion` a spec needs, computed from the fields it uses.
//!
//! Owns the version rules only. Follows the CDI specification's `specs-go/version.go`
//! (`MinimumRequiredVersion`): runtimes refuse a spec whose declared version is lower than
//! its fields need, and older runtimes refuse versions they do not know, so we emit the
//! lowest version that is valid. Rules: base 0.3.0; mount `type` -> 0.4.0; a device name
//! not starting with a letter (claim UIDs can start with a digit) or a device node
//! `hostPath` -> 0.5.0; annotations (spec or device) or a `.` in the kind's class -> 0.6.0;
//! `additionalGids` -> 0.7.0. (0.8.0 added no fields; intelRdt, 0.7.0, is not modelled.)

use super::spec::{ContainerEdits, Spec};

/// The versions this module can emit, lowest first.
pub const KNOWN_VERSIONS: [&str; 5] = ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0"];

/// Returns the minimum `cdiVersion` for `spec` (one of [`KNOWN_VERSIONS`]); the spec's own
/// `cdi_version` field is ignored.
pub fn minimum_version(spec: &Spec) -> &'static str {
    let all_edits = || {
        spec.devices
            .iter()
            .map(|d| &d.container_edits)
            .chain(std::iter::once(&spec.container_edits))
    };
    let needs_070 = all_edits().any(|e| !e.additional_gids.is_empty());
    if needs_070 {
        return "0.7.0";
    }
    let class_has_dot = spec
        .kind
        .split_once('/')
        .is_some_and(|(_, class)| class.contains('.'));
    let needs_060 = !spec.annotations.is_empty()
        || spec.devices.iter().any(|d| !d.annotations.is_empty())
        || class_has_dot;
    if needs_060 {
        return "0.6.0";
    }
    let needs_050 = spec.devices.iter().any(|d| {
        d.name
            .chars()
            .next()
            .is_some_and(|c| !c.is_ascii_alphabetic())
    }) || all_edits()
        .any(|e: &ContainerEdits| e.device_nodes.iter().any(|n| n.host_path.is_some()));
    if needs_050 {
        return "0.5.0";
    }
    if all_edits().any(|e| e.mounts.iter().any(|m| m.mount_type.is_some())) {
        return "0.4.0";
    }
    "0.3.0"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdi::spec::{Device, DeviceNode, Mount};

    fn spec_with(device_name: &str, edits: ContainerEdits) -> Spec {
        Spec {
            cdi_version: String::new(),
            kind: "gpu-dra.dev/claim".into(),
            devices: vec![Device {
                name: device_name.into(),
                container_edits: edits,
                ..Device::default()
            }],
            ..Spec::default()
        }
    }

    #[test]
    fn base_version_for_plain_edits() {
        let edits = ContainerEdits {
            env: vec!["A=B".into()],
            device_nodes: vec![DeviceNode::at("/dev/nvidia0")],
            ..Default::default()
        };
        assert_eq!(minimum_version(&spec_with("gpu0", edits)), "0.3.0");
    }

    #[test]
    fn mount_type_needs_040() {
        let mount = Mount {
            host_path: "/a".into(),
            container_path: "/a".into(),
            mount_type: Some("bind".into()),
            options: vec![],
        };
        let edits = ContainerEdits {
            mounts: vec![mount],
            ..Default::default()
        };
        assert_eq!(minimum_version(&spec_with("gpu0", edits)), "0.4.0");
    }

    #[test]
    fn digit_name_or_host_path_needs_050() {
        assert_eq!(
            minimum_version(&spec_with("7f3a-gpu-0", ContainerEdits::default())),
            "0.5.0"
        );
        let node = DeviceNode {
            host_path: Some("/dev/nvidia0".into()),
            ..DeviceNode::at("/dev/nvidia1")
        };
        let mut spec = spec_with("gpu0", ContainerEdits::default());
        spec.container_edits.device_nodes.push(node);
        assert_eq!(minimum_version(&spec), "0.5.0");
    }

    #[test]
    fn annotations_or_dotted_class_need_060() {
        let mut spec = spec_with("7f3a", ContainerEdits::default());
        spec.annotations.insert("a".into(), "b".into());
        assert_eq!(minimum_version(&spec), "0.6.0");
        let mut spec = spec_with("gpu0", ContainerEdits::default());
        spec.devices[0].annotations.insert("a".into(), "b".into());
        assert_eq!(minimum_version(&spec), "0.6.0");
        let mut spec = spec_with("gpu0", ContainerEdits::default());
        spec.kind = "example.com/claim.v1".into();
        assert_eq!(minimum_version(&spec), "0.6.0");
    }

    #[test]
    fn additional_gids_need_070() {
        let mut spec = spec_with("gpu0", ContainerEdits::default());
        spec.annotations.insert("a".into(), "b".into());
        spec.devices[0].container_edits.additional_gids = vec![44];
        assert_eq!(minimum_version(&spec), "0.7.0");
    }
}
