//! CDI specs built by `gpu_dra::cdi` as accepted by a second CDI implementation: the
//! CNCF's Rust library (`container-device-interface` 1.1.1, run through tools/cdi-check,
//! which `make tools` builds). The box's node agent already resolves our specs with the Go
//! library; this test holds the Rust one to the same files.
//!
//! Specs for a full GPU, a MIG device and an MPS claim are built the way prepare builds
//! them (control nodes and device nodes with type and numbers, MPS env and mounts through
//! the common edits), written with the project's atomic writer into a temp dir, checked
//! against the crate's built-in JSON schema and parser, loaded into its cache, and every
//! CDI device id is injected into an OCI runtime spec whose edits are checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use gpu_dra::cdi::{
    self, CdiDeviceInput, ContainerEdits, DeviceNode, MigCapNode, Mount, cdi_device_id,
};
use gpu_dra::sharing::mps::CONTAINER_PIPE_DIR;
use serde_json::Value;

const GPU_CLAIM: &str = "0b6e3c1a-7d2f-4a8e-9c5b-1f2e3d4c5b6a";
const MIG_CLAIM: &str = "1c7f4d2b-8e3a-4b9f-8d6c-2a3b4c5d6e7f";
const MPS_CLAIM: &str = "2d8a5e3c-9f4b-4cab-9e7d-3b4c5d6e7f80";
/// Character major of /dev/nvidia* and of nvidia-caps, as /proc/devices reports them.
const NVIDIA_MAJOR: u32 = 195;
const CAPS_MAJOR: u32 = 508;
const UVM_MAJOR: u32 = 510;

fn cdi_check() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bin/cdi-check");
    assert!(
        bin.exists(),
        "{} missing: run `make tools` (make test does)",
        bin.display()
    );
    bin
}

/// Control nodes with numbers, as prepare passes them (the runtime need not stat them).
fn control() -> Vec<DeviceNode> {
    vec![
        DeviceNode::char("/dev/nvidiactl", NVIDIA_MAJOR, 255),
        DeviceNode::char("/dev/nvidia-uvm", UVM_MAJOR, 0),
        DeviceNode::char("/dev/nvidia-uvm-tools", UVM_MAJOR, 1),
    ]
}

fn gpu(name: &str, uuid: &str, minor: u32) -> CdiDeviceInput {
    CdiDeviceInput {
        device_nodes: vec![DeviceNode::char(
            format!("/dev/nvidia{minor}"),
            NVIDIA_MAJOR,
            minor,
        )],
        ..CdiDeviceInput::gpu(name, uuid, minor)
    }
}

/// Runs cdi-check over `dir` for `ids`; the OCI spec it printed.
fn check(dir: &Path, ids: &[String]) -> Value {
    let out = Command::new(cdi_check())
        .arg(dir)
        .args(ids)
        .output()
        .expect("cdi-check runs");
    assert!(
        out.status.success(),
        "container-device-interface rejected our specs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("OCI spec JSON")
}

fn env(oci: &Value) -> Vec<String> {
    oci["process"]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn devices(oci: &Value) -> Vec<(String, i64, i64)> {
    oci["linux"]["devices"]
        .as_array()
        .expect("linux.devices")
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_owned(),
                d["major"].as_i64().unwrap(),
                d["minor"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn specs_for_gpu_mig_and_mps_claims_validate_and_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let common = |extra: ContainerEdits| ContainerEdits {
        device_nodes: control(),
        ..extra
    };

    let gpu_spec = cdi::claim_spec_with_common(
        GPU_CLAIM,
        &[gpu("gpu-0", "GPU-0b6e3c1a-0000-0000-0000-000000000000", 0)],
        common(ContainerEdits::default()),
    );
    // Parent GPU node plus the GI and CI capability nodes with the nvidia-caps major, as
    // prepare reads them from /proc.
    let caps = [
        MigCapNode {
            minor: 12,
            major: Some(CAPS_MAJOR),
        },
        MigCapNode {
            minor: 13,
            major: Some(CAPS_MAJOR),
        },
    ];
    let mut mig = CdiDeviceInput::mig(
        "gpu-1-mig-1g10gb-19-0",
        "MIG-1c7f4d2b-0000-0000-0000-000000000000",
        1,
        &caps,
    );
    mig.device_nodes[0] = DeviceNode::char("/dev/nvidia1", NVIDIA_MAJOR, 1);
    let mig_spec =
        cdi::claim_spec_with_common(MIG_CLAIM, &[mig], common(ContainerEdits::default()));
    let pipe = dir.path().join("mps").join(MPS_CLAIM).join("pipe");
    let mps_spec = cdi::claim_spec_with_common(
        MPS_CLAIM,
        &[
            gpu("gpu-2", "GPU-2d8a5e3c-0000-0000-0000-000000000002", 2),
            gpu("gpu-3", "GPU-2d8a5e3c-0000-0000-0000-000000000003", 3),
        ],
        common(ContainerEdits {
            env: vec![format!("CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE_DIR}")],
            mounts: vec![Mount {
                host_path: pipe.display().to_string(),
                container_path: CONTAINER_PIPE_DIR.to_owned(),
                mount_type: Some("bind".into()),
                options: ["rw", "nosuid", "nodev", "bind"].map(String::from).to_vec(),
            }],
            ..ContainerEdits::default()
        }),
    );
    let specs = dir.path().join("cdi");
    for (uid, spec) in [
        (GPU_CLAIM, &gpu_spec),
        (MIG_CLAIM, &mig_spec),
        (MPS_CLAIM, &mps_spec),
    ] {
        cdi::write_spec(&specs, uid, spec).expect("spec written");
    }

    // Whole GPU.
    let oci = check(&specs, &[cdi_device_id(GPU_CLAIM, "gpu-0")]);
    let nodes = devices(&oci);
    assert!(
        nodes.contains(&("/dev/nvidia0".into(), 195, 0)),
        "{nodes:?}"
    );
    assert!(
        nodes.contains(&("/dev/nvidiactl".into(), 195, 255)),
        "{nodes:?}"
    );
    assert!(
        nodes.contains(&("/dev/nvidia-uvm-tools".into(), 510, 1)),
        "{nodes:?}"
    );
    assert!(
        env(&oci).contains(
            &"NVIDIA_VISIBLE_DEVICES=GPU-0b6e3c1a-0000-0000-0000-000000000000".to_owned()
        ),
        "{:?}",
        env(&oci)
    );

    // MIG device: parent GPU node plus both capability nodes.
    let oci = check(&specs, &[cdi_device_id(MIG_CLAIM, "gpu-1-mig-1g10gb-19-0")]);
    let nodes = devices(&oci);
    for node in [
        ("/dev/nvidia1".to_owned(), 195, 1),
        ("/dev/nvidia-caps/nvidia-cap12".to_owned(), 508, 12),
        ("/dev/nvidia-caps/nvidia-cap13".to_owned(), 508, 13),
    ] {
        assert!(nodes.contains(&node), "{node:?} in {nodes:?}");
    }
    assert!(
        env(&oci).contains(
            &"NVIDIA_VISIBLE_DEVICES=MIG-1c7f4d2b-0000-0000-0000-000000000000".to_owned()
        )
    );

    // MPS claim over two GPUs: both nodes, the pipe directory env and its bind mount.
    let oci = check(
        &specs,
        &[
            cdi_device_id(MPS_CLAIM, "gpu-2"),
            cdi_device_id(MPS_CLAIM, "gpu-3"),
        ],
    );
    let nodes = devices(&oci);
    assert!(
        nodes.contains(&("/dev/nvidia2".into(), 195, 2)),
        "{nodes:?}"
    );
    assert!(
        nodes.contains(&("/dev/nvidia3".into(), 195, 3)),
        "{nodes:?}"
    );
    assert!(env(&oci).contains(&format!("CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE_DIR}")));
    let mounts = oci["mounts"].as_array().expect("mounts");
    let mount = mounts
        .iter()
        .find(|m| m["destination"] == CONTAINER_PIPE_DIR)
        .unwrap_or_else(|| panic!("pipe mount in {mounts:?}"));
    assert_eq!(mount["source"], pipe.display().to_string());
}

#[test]
fn an_unknown_device_id_is_unresolvable() {
    let dir = tempfile::tempdir().unwrap();
    let spec = cdi::claim_spec_with_common(
        GPU_CLAIM,
        &[gpu("gpu-0", "GPU-0b6e3c1a-0000-0000-0000-000000000000", 0)],
        ContainerEdits {
            device_nodes: control(),
            ..ContainerEdits::default()
        },
    );
    cdi::write_spec(dir.path(), GPU_CLAIM, &spec).unwrap();
    let out = Command::new(cdi_check())
        .arg(dir.path())
        .arg(cdi_device_id(GPU_CLAIM, "gpu-7"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "an id of no spec resolved");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unresolvable CDI devices"), "{stderr}");
}
