//! The OCI image archive deploy/image/build.sh writes (`make image` over the release
//! binary; `make image-check`, which `make test` runs, over the debug binary so CI needs
//! no release build — the recipe and everything checked here are the same): its index, manifest and config read as an OCI runtime would (digests
//! checked), the entrypoint, user and labels those of deploy/image/Containerfile, and the
//! unpacked root file system running `gpu-dra --version` and `gpu-dra inventory` (fake
//! NVML copied in) under chroot, so every shared library the binary links is in the image,
//! and every program of deploy/image/programs (the MPS launchers `setsid`, `systemd-run`,
//! `unshare`, `mount`, `sh`) found through the image's PATH and running there too.
//!
//! Needs root (chroot; CI runs as root) and the archive of `make image-check`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::driver::{FakeGpus, target_dir};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// PATH of the chroot command (host) and of the process in the image: nothing else leaks in.
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/image/gpu-dra-<version>-check.oci.tar`, next to the profile directories.
fn archive() -> PathBuf {
    let path = target_dir()
        .parent()
        .expect("target dir")
        .join("image")
        .join(format!("gpu-dra-{VERSION}-check.oci.tar"));
    assert!(
        path.exists(),
        "{} missing: run `make image-check` (make test does)",
        path.display()
    );
    path
}

/// The chart's default image reference: values.yaml `image.repository` and the chart's
/// appVersion (the default tag).
fn chart_image() -> String {
    let read = |p: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(root().join(p)).unwrap()).unwrap()
    };
    let values = read("deploy/helm/gpu-dra/values.yaml");
    let chart = read("deploy/helm/gpu-dra/Chart.yaml");
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(VERSION),
        "Chart.yaml appVersion"
    );
    format!(
        "{}:{}",
        values["image"]["repository"].as_str().unwrap(),
        chart["appVersion"].as_str().unwrap()
    )
}

/// `LABEL`, `USER` and `ENTRYPOINT` of the Containerfile, `${VERSION}` substituted.
fn containerfile() -> (serde_json::Map<String, Value>, String, String) {
    let text = std::fs::read_to_string(root().join("deploy/image/Containerfile")).unwrap();
    let mut labels = serde_json::Map::new();
    let (mut user, mut entrypoint) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(kv) = line.strip_prefix("LABEL ") {
            let (k, v) = kv.split_once('=').unwrap();
            let v = v.trim_matches('"').replace("${VERSION}", VERSION);
            labels.insert(k.to_owned(), Value::String(v));
        } else if let Some(u) = line.strip_prefix("USER ") {
            user = u.to_owned();
        } else if let Some(e) = line.strip_prefix("ENTRYPOINT ") {
            let list: Vec<String> = serde_json::from_str(e).unwrap();
            entrypoint = list[0].clone();
        }
    }
    (labels, user, entrypoint)
}

/// The programs of deploy/image/programs (absolute paths).
fn programs() -> Vec<String> {
    std::fs::read_to_string(root().join("deploy/image/programs"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A blob of the layout, its sha256 digest checked.
fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let data = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    let actual = ring::digest::digest(&ring::digest::SHA256, &data);
    let actual: String = actual.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(actual, hex, "blob digest");
    data
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_size(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn image_archive_runs_the_plugin_binary_from_its_root_file_system() {
    let archive = archive();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(&rootfs).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));

    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        chart_image(),
        "the chart's default image is the one make image tags"
    );
    let manifest: Value =
        serde_json::from_slice(&blob(&layout, manifests[0]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let (labels, user, entrypoint) = containerfile();
    // The default PATH of an image config (as BuildKit writes it): the plugin runs its
    // launchers by name.
    let image_path = config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e.as_str()?.strip_prefix("PATH="))
        .expect("the image config sets PATH")
        .to_owned();
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!([entrypoint])
    );
    assert_eq!(config["config"]["User"], user);
    assert_eq!(user, "0:0", "the node plugin runs as root");
    assert_eq!(config["config"]["Labels"], Value::Object(labels));
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        VERSION
    );

    let mut compressed = 0;
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let digest = layer["digest"].as_str().unwrap();
        compressed += blob(&layout, digest).len();
        let path = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&path)
            .arg("-C")
            .arg(&rootfs));
    }
    eprintln!(
        "image {}: archive {} bytes, layers {compressed} bytes compressed, root file system {} bytes",
        chart_image(),
        std::fs::metadata(&archive).unwrap().len(),
        dir_size(&rootfs)
    );

    let version = run(Command::new("chroot")
        .arg(&rootfs)
        .arg(&entrypoint)
        .arg("--version")
        .env_clear()
        .env("PATH", PATH));
    assert_eq!(version.trim(), format!("gpu-dra {VERSION}"));

    // The fake NVML and its GPUs inside the root file system, at image paths.
    let gpus = FakeGpus::new("dgx-h100").unwrap();
    let fake = rootfs.join("opt/fake-nvml");
    std::fs::create_dir_all(fake.join("proc")).unwrap();
    std::fs::copy(
        target_dir().join("libnvidia_ml.so"),
        fake.join("libnvidia_ml.so"),
    )
    .unwrap();
    std::fs::copy(gpus.topology(), fake.join("topology.yaml")).unwrap();
    let inventory = run(Command::new("chroot")
        .arg(&rootfs)
        .arg(&entrypoint)
        .arg("inventory")
        .arg("--nvml-lib-path=/opt/fake-nvml/libnvidia_ml.so")
        .env_clear()
        .env("PATH", PATH)
        .env("FAKE_NVML_TOPOLOGY", "/opt/fake-nvml/topology.yaml")
        .env("FAKE_NVML_PROC_ROOT", "/opt/fake-nvml/proc"));
    for minor in 0..8 {
        assert!(inventory.contains(&format!("gpu-{minor} ")), "{inventory}");
    }
    assert!(inventory.contains("NVIDIA H100 80GB HBM3"), "{inventory}");

    // The MPS launchers, by name through the image's PATH as the plugin runs them.
    let progs = programs();
    for name in ["setsid", "systemd-run", "unshare", "mount", "sh"] {
        assert!(
            progs.iter().any(|p| p.ends_with(&format!("/{name}"))),
            "{name} not in deploy/image/programs"
        );
    }
    for program in &progs {
        let name = Path::new(program).file_name().unwrap().to_str().unwrap();
        let mut cmd = Command::new("chroot");
        cmd.arg(&rootfs).env_clear().env("PATH", &image_path);
        match name {
            // dash has no --version: run a command.
            "sh" => cmd.args([name, "-c", "echo sh runs"]),
            _ => cmd.args([name, "--version"]),
        };
        let out = run(&mut cmd);
        eprintln!("{program}: {}", out.lines().next().unwrap_or_default());
        assert!(!out.trim().is_empty(), "{program} printed nothing");
    }
    // glibc's libraries the driver's nvidia-smi and nvidia-cuda-mps-control link.
    for lib in ["libpthread.so.0", "libdl.so.2", "librt.so.1"] {
        let found = walk(&rootfs).into_iter().any(|p| p.ends_with(lib));
        assert!(found, "{lib} not in the image");
    }
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            files.extend(walk(&e.path()));
        } else {
            files.push(e.path());
        }
    }
    files
}
