//! `gpu-dra inventory` through the real nvml-wrapper and the fake libnvidia-ml (issue 3's
//! "done when"): the dgx-h100 preset is listed, and `--slices` prints ResourceSlices.

mod support;

use std::process::Command;

use k8s_openapi::api::resource::v1::ResourceSlice;
use support::driver::{FakeGpus, target_dir};

fn inventory(gpus: &FakeGpus, args: &[&str]) -> String {
    let mut cmd = Command::new(target_dir().join("gpu-dra"));
    cmd.arg("inventory")
        .arg(format!(
            "--nvml-lib-path={}",
            target_dir().join("libnvidia_ml.so").display()
        ))
        .args(args);
    gpus.apply_env(&mut cmd);
    let out = cmd.output().expect("gpu-dra runs");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn lists_the_dgx_h100_preset() {
    let gpus = FakeGpus::new("dgx-h100").unwrap();
    let text = inventory(&gpus, &[]);
    assert!(text.starts_with("Driver "), "{text}");
    for minor in 0..8 {
        assert!(
            text.contains(&format!("gpu-{minor} ")),
            "gpu-{minor} missing:\n{text}"
        );
    }
    assert_eq!(
        text.matches("NVIDIA H100 80GB HBM3").count(),
        9,
        "8 GPUs + profile table:\n{text}"
    );
}

#[test]
fn prints_the_slices_it_would_publish() {
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let yaml = inventory(&gpus, &["--slices", "--node-name=node-a"]);
    let slices: Vec<ResourceSlice> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    assert_eq!(slices.len(), 1);
    let spec = &slices[0].spec;
    assert_eq!(spec.driver, "gpu.gpu-dra.dev");
    assert_eq!(spec.node_name.as_deref(), Some("node-a"));
    let names: Vec<&str> = spec
        .devices
        .iter()
        .flatten()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(names.contains(&"gpu-0-mig-3g40gb-9-0"), "{names:?}");
}

#[test]
fn finds_nvml_below_a_driver_root() {
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let run = |gpus: &FakeGpus| {
        let mut cmd = Command::new(target_dir().join("gpu-dra"));
        cmd.arg("inventory")
            .arg(format!("--driver-root={}", gpus.driver_root().display()));
        gpus.apply_env(&mut cmd);
        cmd.output().expect("gpu-dra runs")
    };
    std::fs::create_dir_all(gpus.driver_root()).unwrap();
    let missing = run(&gpus);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    let searched = gpus.driver_root().join("usr/lib64/libnvidia-ml.so.1");
    assert!(stderr.contains(&searched.display().to_string()), "{stderr}");

    gpus.install_driver(&target_dir()).unwrap();
    let found = run(&gpus);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    assert!(String::from_utf8_lossy(&found.stdout).contains("NVIDIA L40S"));
}
