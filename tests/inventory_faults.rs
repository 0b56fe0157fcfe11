//! Discovery under NVML faults, through the real nvml-wrapper and the fake libnvidia-ml:
//! `gpu-dra inventory --slices` prints what the plugin would publish at start (it weighs
//! the plugin's checkpoint the same way), so a one-shot fault on a MIG query must never
//! show a MIG GPU whole or drop an in-use MIG device; the GPU is withheld instead, and the
//! next discovery shows it as it is.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use gpu_dra::checkpoint::{Checkpoint, ClaimEntry, ClaimState, PreparedDeviceRecord};
use k8s_openapi::api::resource::v1::ResourceSlice;
use nvidia_ml::control::{self, Fault, Times};
use support::driver::{DRIVER, FakeGpus, target_dir};

/// `NVML_ERROR_NOT_SUPPORTED`.
const NOT_SUPPORTED: u32 = 3;
/// `NVML_ERROR_NOT_FOUND`.
const NOT_FOUND: u32 = 6;
/// `NVML_ERROR_UNKNOWN`.
const UNKNOWN: u32 = 999;

fn run(gpus: &FakeGpus, kubelet_root: &Path) -> Output {
    let mut cmd = Command::new(target_dir().join("gpu-dra"));
    cmd.arg("inventory")
        .arg("--slices")
        .arg("--node-name=node-a")
        .arg(format!("--kubelet-root={}", kubelet_root.display()))
        .arg(format!(
            "--nvml-lib-path={}",
            target_dir().join("libnvidia_ml.so").display()
        ));
    gpus.apply_env(&mut cmd);
    cmd.output().expect("gpu-dra runs")
}

/// Published device name -> its `uuid` attribute.
fn devices(out: &Output) -> BTreeMap<String, String> {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| -> ResourceSlice { serde::Deserialize::deserialize(doc).unwrap() })
        .flat_map(|s| s.spec.devices.unwrap_or_default())
        .map(|d| {
            let uuid = d
                .attributes
                .as_ref()
                .and_then(|a| a.get("uuid"))
                .and_then(|v| v.string.clone())
                .unwrap_or_default();
            (d.name, uuid)
        })
        .collect()
}

fn of_gpu0(devices: &BTreeMap<String, String>) -> BTreeSet<&str> {
    devices
        .keys()
        .map(String::as_str)
        .filter(|n| *n == "gpu-0" || n.starts_with("gpu-0-"))
        .collect()
}

fn fault_on_gpu0(gpus: &FakeGpus, function: &str, error: u32) {
    let uuid = control::load_topology(&gpus.topology()).unwrap().gpus[0]
        .uuid
        .clone();
    control::inject_fault(
        &gpus.state_path(),
        Fault {
            function: function.into(),
            gpu_uuid: Some(uuid),
            error,
            times: Times::Once,
        },
    )
    .unwrap();
}

/// A checkpoint of this boot holding one claim prepared on MIG device `mig_uuid` of `gpu_uuid`.
fn write_checkpoint(kubelet_root: &Path, device: &str, gpu_uuid: &str, mig_uuid: &str) {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let mut cp = Checkpoint::new(boot_id.trim());
    cp.claims.insert(
        "uid-mig".into(),
        ClaimEntry {
            state: ClaimState::PrepareCompleted,
            namespace: "ns".into(),
            name: "mig".into(),
            devices: vec![PreparedDeviceRecord {
                pool: "node-a".into(),
                device: device.into(),
                request_names: vec!["mig".into()],
                gpu_uuid: gpu_uuid.into(),
                mig_uuid: Some(mig_uuid.into()),
                cdi_device_ids: Vec::new(),
                sharing: None,
                share_id: None,
            }],
            extra: BTreeMap::new(),
        },
    );
    let dir = kubelet_root.join("plugins").join(DRIVER);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(gpu_dra::checkpoint::CHECKPOINT_FILE_NAME),
        gpu_dra::checkpoint::model::encode(&cp).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_failed_mig_mode_query_withholds_the_gpu_then_it_returns_in_shape() {
    for error in [NOT_SUPPORTED, UNKNOWN] {
        let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
        let root = tempfile::tempdir().unwrap();
        let clean = devices(&run(&gpus, root.path()));
        let shape = of_gpu0(&clean);
        assert!(
            !shape.contains("gpu-0") && shape.len() == 3,
            "gpu-0 holds 3 MIG devices: {shape:?}"
        );

        fault_on_gpu0(&gpus, "nvmlDeviceGetMigMode", error);
        let out = run(&gpus, root.path());
        let faulted = devices(&out);
        assert!(
            gpus.state().faults.is_empty(),
            "the fault fired (error {error})"
        );
        assert!(
            of_gpu0(&faulted).is_empty(),
            "error {error}: gpu-0 neither whole nor partial: {:?}",
            of_gpu0(&faulted)
        );
        assert_eq!(faulted.len(), clean.len() - 3, "the other GPUs stay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("gpu-0") && stderr.contains("nvmlDeviceGetMigMode"),
            "{stderr}"
        );

        assert_eq!(devices(&run(&gpus, root.path())), clean, "back in shape");
    }
}

#[test]
fn a_mig_device_in_use_that_reads_as_not_found_withholds_its_gpu() {
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let root = tempfile::tempdir().unwrap();
    let clean = devices(&run(&gpus, root.path()));
    // The first MIG device handle of gpu-0 (index 0) is the one the fault hides.
    let state = gpus.state();
    let gpu0 = control::load_topology(&gpus.topology()).unwrap().gpus[0]
        .uuid
        .clone();
    let first = state.gpus[&gpu0]
        .gpu_instances
        .values()
        .flat_map(|gi| gi.compute_instances.values())
        .map(|ci| ci.uuid.clone())
        .next()
        .expect("gpu-0 has MIG devices");
    let (name, _) = clean
        .iter()
        .find(|(_, uuid)| **uuid == first)
        .expect("the MIG device is published");
    write_checkpoint(root.path(), name, &gpu0, &first);

    fault_on_gpu0(&gpus, "nvmlDeviceGetMigDeviceHandleByIndex", NOT_FOUND);
    let out = run(&gpus, root.path());
    let faulted = devices(&out);
    assert!(gpus.state().faults.is_empty(), "the fault fired");
    assert!(
        of_gpu0(&faulted).is_empty(),
        "gpu-0 withheld, not published without its in-use MIG device: {:?}",
        of_gpu0(&faulted)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(first.as_str()), "{stderr}");
    assert_eq!(devices(&run(&gpus, root.path())), clean, "back in shape");
}

#[test]
fn a_gpu_without_mig_is_published_whole() {
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = run(&gpus, root.path());
    let names: Vec<String> = devices(&out).into_keys().collect();
    assert_eq!(names, ["gpu-0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("withheld"), "{stderr}");
}
