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

/// A DGX H100 with every GPU in MIG mode; GPU 1 holds a 3g.40gb instance at slice 0 and a
/// 1g.10gb at slice 6.
const ALL_MIG: &str = "seed: inventory-dynamic-mig\nnode: dgx-h100\ngpus:\n  - migMode: true\n  - migMode: true\n    gpuInstances:\n      - {profile: 3g.40gb, placement: 0}\n      - {profile: 1g.10gb, placement: 6}\n  - migMode: true\n  - migMode: true\n  - migMode: true\n  - migMode: true\n  - migMode: true\n  - migMode: true\n";

/// A kubelet root whose plugin checkpoint records GPU 1's 3g.40gb at 0 as created by the
/// driver for claim `ml/small`.
fn kubelet_root_owning_gpu1_3g(gpus: &FakeGpus) -> tempfile::TempDir {
    use gpu_dra::checkpoint::model::{Checkpoint, ClaimEntry, ClaimState, encode};
    use gpu_dra::prepare::mig_dynamic::{InstanceRecord, set_records};
    let topo = nvidia_ml::control::load_topology(&gpus.topology()).unwrap();
    let mut entry = ClaimEntry {
        state: ClaimState::PrepareCompleted,
        namespace: "ml".into(),
        name: "small".into(),
        devices: Vec::new(),
        extra: Default::default(),
    };
    set_records(
        &mut entry,
        &[InstanceRecord {
            device: "gpu-1-mig-3g40gb-9-0".into(),
            gpu_uuid: topo.gpus[1].uuid.clone(),
            gpu_minor: 1,
            gi_profile_id: 9,
            placement: gpu_dra::inventory::Placement { start: 0, size: 4 },
            gi_id: None,
            ci_id: None,
            mig_uuid: None,
        }],
    );
    let mut cp = Checkpoint::new("boot");
    cp.claims.insert("uid-small".into(), entry);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("plugins/gpu.gpu-dra.dev");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("checkpoint.json"), encode(&cp).unwrap()).unwrap();
    root
}

/// The line of `device` in the placements part of an inventory printout.
fn line_of<'a>(text: &'a str, device: &str) -> &'a str {
    let placements = text
        .find("Dynamic MIG placements")
        .map_or("", |at| &text[at..]);
    placements
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{device} ")))
        .unwrap_or_else(|| panic!("no line for {device}:\n{text}"))
}

#[test]
fn shows_dynamic_gpus_with_their_placements_and_what_holds_them() {
    let gpus = FakeGpus::new("dgx-h100").unwrap();
    std::fs::write(gpus.topology(), ALL_MIG).unwrap();
    let root = kubelet_root_owning_gpu1_3g(&gpus);
    let kubelet_root = format!("--kubelet-root={}", root.path().display());

    // Listed GPUs, as `kubelet-plugin --dynamic-mig 0,1` manages them.
    let text = inventory(&gpus, &[&kubelet_root, "--dynamic-mig=0,1"]);
    assert!(
        text.contains("Dynamic MIG placements of gpu-0 (GPU-"),
        "{text}"
    );
    assert!(
        text.contains(": 2 GPU instances, 1 by this driver, 1 foreign"),
        "{text}"
    );
    assert!(!text.contains("placements of gpu-2 "), "{text}");
    // Every H100 placement of GPU 0 is free: 7 + 4 + 3 + 2 + 2 + 1 + ... per profile.
    let gpu0 = text
        .split("Dynamic MIG placements of ")
        .find(|s| s.starts_with("gpu-0 "))
        .unwrap();
    assert_eq!(gpu0.matches("  free").count(), 25, "{gpu0}");
    let l = line_of(&text, "gpu-0-mig-3g40gb-9-4");
    assert!(l.contains(" 3g.40gb ") && l.contains("  4    4 "), "{l}");
    assert!(l.contains("MiB") && l.ends_with("free"), "{l}");
    // GPU 1: its 3g.40gb at 0 is the driver's (claim ml/small), its 1g.10gb at 6 foreign.
    let own = line_of(&text, "gpu-1-mig-3g40gb-9-0");
    assert!(
        own.contains("in use: GPU instance ") && own.ends_with(", driver, claim ml/small"),
        "{own}"
    );
    let foreign = line_of(&text, "gpu-1-mig-1g10gb-19-6");
    assert!(
        foreign.contains("foreign (not created by this driver)"),
        "{foreign}"
    );
    assert!(line_of(&text, "gpu-1-mig-1g10gb-19-1").contains("overlaps GPU instance"));
    assert!(line_of(&text, "gpu-1-mig-3g40gb-9-4").contains("not offered: overlaps foreign"));
    assert!(line_of(&text, "gpu-1-mig-1g10gb-19-5").ends_with("free"));

    // `auto` (the plugin's default) leaves GPU 1 static for its foreign instance; without
    // the checkpoint every instance is foreign.
    let auto = inventory(&gpus, &[&kubelet_root]);
    assert!(!auto.contains("placements of gpu-1 "), "{auto}");
    for minor in [0, 2, 7] {
        assert!(
            auto.contains(&format!("placements of gpu-{minor} (")),
            "{auto}"
        );
    }
    let none = tempfile::tempdir().unwrap();
    let bare = inventory(
        &gpus,
        &[
            &format!("--kubelet-root={}", none.path().display()),
            "--dynamic-mig=1",
        ],
    );
    assert!(
        bare.contains(": 2 GPU instances, 0 by this driver, 2 foreign"),
        "{bare}"
    );
    assert!(!inventory(&gpus, &["--dynamic-mig=off"]).contains("Dynamic MIG"));

    // `--slices` publishes what the plugin would: GPU 1's free placements only.
    let yaml = inventory(
        &gpus,
        &[
            "--slices",
            "--node-name=node-a",
            &kubelet_root,
            "--dynamic-mig=1",
        ],
    );
    assert!(yaml.contains("gpu-1-counter-set"), "{yaml}");
    assert!(yaml.contains("name: gpu-1-mig-1g10gb-19-5"), "{yaml}");
    assert!(!yaml.contains("name: gpu-1-mig-3g40gb-9-4"), "{yaml}");
}
