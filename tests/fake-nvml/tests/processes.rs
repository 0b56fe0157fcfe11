//! The fake as other crates use it: nvml-wrapper dlopens `libnvidia_ml.so` in a child
//! process (the topology comes from that child's environment, never from this process's),
//! the fake `nvidia-smi` and `nvidia-cuda-mps-control` run as real processes, and the
//! control API reads back what they all did.
//!
//! The cdylib is found with `control::find_cdylib` (Cargo builds it into
//! `target/<profile>/deps/` together with the rlib these tests link).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nvidia_ml::control::{self, ComputeMode, Fault, Times};
use nvidia_ml::presets;
use serde_json::Value;

fn bin(name: &str) -> PathBuf {
    match name {
        "nvidia-smi" => PathBuf::from(env!("CARGO_BIN_EXE_nvidia-smi")),
        "nvidia-cuda-mps-control" => PathBuf::from(env!("CARGO_BIN_EXE_nvidia-cuda-mps-control")),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_fake-nvml-probe")),
    }
}

fn cdylib() -> PathBuf {
    control::find_cdylib().expect("libnvidia_ml.so next to the test binary")
}

struct Machine {
    dir: tempfile::TempDir,
    topology: PathBuf,
}

impl Machine {
    fn new(topology: &str) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.yaml");
        std::fs::write(&path, topology).unwrap();
        Machine {
            dir,
            topology: path,
        }
    }

    fn state(&self) -> PathBuf {
        control::state_path(&self.topology)
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("FAKE_NVML_TOPOLOGY", &self.topology)
            .env("FAKE_NVML_PROC_ROOT", self.dir.path().join("proc"))
            .env_remove("FAKE_NVML_STATE");
        c
    }

    fn probe(&self) -> Value {
        let out = self
            .command(&bin("fake-nvml-probe"))
            .arg(cdylib())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn smi(&self, args: &[&str]) -> Output {
        self.command(&bin("nvidia-smi"))
            .args(args)
            .output()
            .unwrap()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn nvml_wrapper_reads_back_every_model_preset() {
    for model in presets::MODELS.iter() {
        let mig = if model.mig_capable() {
            "    migMode: true\n    gpuInstances: [{profile: 19}, {profile: 9, placement: 4}]\n"
        } else {
            ""
        };
        let m = Machine::new(&format!("gpus:\n  - model: {}\n{mig}", model.key));
        let v = m.probe();
        let g = &v["gpus"][0];
        assert_eq!(g["name"], model.name, "{}", model.key);
        assert_eq!(
            g["memoryTotal"],
            model.memory_mib * 1024 * 1024,
            "{}",
            model.key
        );
        assert_eq!(g["computeCapability"][0], model.compute_capability.0);
        assert_eq!(g["computeCapability"][1], model.compute_capability.1);
        assert_eq!(g["pciDeviceId"], model.pci_device_id);
        assert_eq!(g["pciBusId"], "00000000:10:00.0");
        assert_eq!(g["minor"], 0);
        assert!(g["uuid"].as_str().unwrap().starts_with("GPU-"));
        if model.mig_capable() {
            assert_eq!(g["migCurrent"], 1, "{}", model.key);
            let devs = g["migDevices"].as_array().unwrap();
            assert_eq!(devs.len(), 2, "{}", model.key);
            let three_g = model.gi_profile_by_id(9).unwrap();
            let names: Vec<&str> = devs.iter().map(|d| d["name"].as_str().unwrap()).collect();
            assert!(
                names.contains(&format!("{} MIG {}", model.name, three_g.name).as_str()),
                "{names:?}"
            );
            assert!(
                devs.iter()
                    .all(|d| d["parentUuid"] == g["uuid"] && d["isMig"] == true)
            );
            // nvml-wrapper 0.13 drops what the placements symbol returns (README).
            assert_eq!(g["wrapperPossiblePlacements3g"], 0, "{}", model.key);
        } else {
            assert_eq!(g["migCurrent"], Value::Null, "{}", model.key);
        }
    }
    assert_eq!(v_arch("H100-SXM5-80GB"), "Hopper");
    assert_eq!(v_arch("A100-SXM4-40GB"), "Ampere");
    assert_eq!(v_arch("L40S"), "Ada");
    assert_eq!(v_arch("T4"), "Turing");
}

fn v_arch(model: &str) -> String {
    let m = Machine::new(&format!("gpus: [{{model: {model}}}]\n"));
    m.probe()["gpus"][0]["architecture"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn node_presets_enumerate_through_nvml_wrapper() {
    for (node, count, name) in [
        ("dgx-h100", 8, "NVIDIA H100 80GB HBM3"),
        ("dgx-a100", 8, "NVIDIA A100-SXM4-40GB"),
        ("l40s-single", 1, "NVIDIA L40S"),
    ] {
        let v = Machine::new(&format!("node: {node}\n")).probe();
        let gpus = v["gpus"].as_array().unwrap();
        assert_eq!(gpus.len(), count, "{node}");
        assert!(gpus.iter().all(|g| g["name"] == name));
        let mut uuids: Vec<&str> = gpus.iter().map(|g| g["uuid"].as_str().unwrap()).collect();
        uuids.dedup();
        assert_eq!(uuids.len(), count);
        assert_eq!(v["driverVersion"], "570.124.06");
    }
}

#[test]
fn nvidia_smi_and_the_library_agree_on_state() {
    let m = Machine::new(
        "node: dgx-h100\ngpus:\n  - migMode: true\n    gpuInstances: [{profile: 3g.40gb}]\n",
    );
    let before = m.probe();
    let gpu1 = before["gpus"][1]["uuid"].as_str().unwrap().to_string();
    let mig_uuid = before["gpus"][0]["migDevices"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let caps = m
        .dir
        .path()
        .join("proc/driver/nvidia/capabilities/gpu0/mig/gi1");
    let access = std::fs::read_to_string(caps.join("ci0/access")).unwrap();
    assert!(access.starts_with("DeviceFileMinor: 13\n"), "{access}");

    // What nvidia-smi lists is what NVML reports.
    let list = stdout(&m.smi(&["-L"]));
    assert!(
        list.contains(&format!("GPU 1: NVIDIA H100 80GB HBM3 (UUID: {gpu1})")),
        "{list}"
    );
    assert!(list.contains(&format!("(UUID: {mig_uuid})")), "{list}");

    // nvidia-smi changes, a fresh NVML process sees them, and so does the control API.
    let o = m.smi(&["-i", &gpu1, "-c", "EXCLUSIVE_PROCESS"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = m.smi(&["compute-policy", "-i", &gpu1, "--set-timeslice", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = m.smi(&["-i", "2", "-mig", "1"]);
    assert!(
        stdout(&o).contains("Enabled MIG Mode for GPU 00000000:3A:00.0"),
        "{}",
        stdout(&o)
    );
    let o = m.smi(&["-i", "2", "-r"]);
    assert!(
        stdout(&o).contains("GPU 00000000:3A:00.0 was successfully reset."),
        "{}",
        stdout(&o)
    );
    let after = m.probe();
    assert_eq!(after["gpus"][1]["computeMode"], "ExclusiveProcess");
    assert_eq!(after["gpus"][2]["migCurrent"], 1);
    assert_eq!(after["gpus"][0]["migDevices"][0]["uuid"], mig_uuid.as_str());
    let state = control::read_state(&m.state()).unwrap();
    assert_eq!(
        state.gpus[&gpu1].compute_mode,
        ComputeMode::ExclusiveProcess
    );
    assert_eq!(state.gpus[&gpu1].timeslice, 3);
    let q = stdout(&m.smi(&["-q", "-i", "1"]));
    assert!(
        q.contains("Exclusive_Process") && q.contains("Timeslice                         : Long"),
        "{q}"
    );
    let listed = stdout(&m.smi(&["compute-policy", "-l", "-i", &gpu1]));
    assert!(listed.contains("Long"), "{listed}");

    // Unknown options fail like the real tool.
    let o = m.smi(&["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nvidia-smi -h"));

    // Faults injected for an NVML function reach nvidia-smi and NVML users alike.
    control::inject_fault(
        &m.state(),
        Fault {
            function: "nvmlDeviceSetComputeMode".into(),
            gpu_uuid: None,
            error: 999,
            times: Times::N(1),
        },
    )
    .unwrap();
    assert_eq!(m.smi(&["-i", "0", "-c", "0"]).status.code(), Some(255));
    assert!(m.smi(&["-i", "0", "-c", "0"]).status.success());
}

#[test]
fn xid_injected_from_outside_reaches_an_nvml_event_set() {
    let m = Machine::new("node: l40s-single\n");
    let mut child = m
        .command(&bin("fake-nvml-probe"))
        .arg(cdylib())
        .args(["--wait-xid", "20000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let uuid = control::load_topology(&m.topology).unwrap().gpus[0]
        .uuid
        .clone();
    control::inject_xid(&m.state(), &uuid, 48).unwrap();
    let rest: String = lines.map(|l| l.unwrap()).collect();
    assert!(child.wait().unwrap().success());
    let v: Value = serde_json::from_str(&rest).unwrap();
    assert_eq!(
        (v["uuid"].as_str(), v["xid"].as_u64()),
        (Some(uuid.as_str()), Some(48))
    );
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mps_control_daemon_records_client_limits() {
    let m = Machine::new("node: l40s-single\n");
    let pipe = m.dir.path().join("mps/pipe");
    let log = m.dir.path().join("mps/log");
    let mps = |args: &[&str]| {
        let mut c = m.command(&bin("nvidia-cuda-mps-control"));
        c.args(args)
            .env("CUDA_MPS_PIPE_DIRECTORY", &pipe)
            .env("CUDA_MPS_LOG_DIRECTORY", &log)
            .env("CUDA_VISIBLE_DEVICES", "GPU-abc");
        c
    };
    let o = mps(&["-d"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(pipe.join("control").exists());
    assert!(!mps(&["-d"]).output().unwrap().status.success());

    let mut client = mps(&[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"set_default_active_thread_percentage 40\nset_default_device_pinned_mem_limit 0 18G\nget_default_active_thread_percentage\n")
        .unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "40.0\n40.0\n");

    let key = pipe.to_string_lossy().into_owned();
    let d = control::read_state(&m.state()).unwrap().mps_daemons[&key].clone();
    assert!(d.running);
    assert_eq!(d.default_active_thread_percentage, Some(40.0));
    assert_eq!(d.default_device_pinned_mem_limits["0"], "18G");
    assert_eq!(d.visible_devices.as_deref(), Some("GPU-abc"));
    assert_eq!(d.log_dir, log.to_string_lossy());

    let mut quit = mps(&[]).stdin(Stdio::piped()).spawn().unwrap();
    quit.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    assert!(quit.wait().unwrap().success());
    wait_until("the daemon to remove its pipe files", || {
        !pipe.join("control").exists()
    });
    let pid = d.pid;
    wait_until("the daemon process to exit", || {
        !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)
    });
    assert!(!control::read_state(&m.state()).unwrap().mps_daemons[&key].running);
}

#[test]
fn a_daemon_killed_by_a_signal_reads_as_not_running() {
    let m = Machine::new("node: l40s-single\n");
    let pipe = m.dir.path().join("mps/pipe");
    let o = m
        .command(&bin("nvidia-cuda-mps-control"))
        .arg("-d")
        .env("CUDA_MPS_PIPE_DIRECTORY", &pipe)
        .env("CUDA_MPS_LOG_DIRECTORY", m.dir.path().join("mps/log"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = pipe.to_string_lossy().into_owned();
    let d = control::read_state(&m.state()).unwrap().mps_daemons[&key].clone();
    assert!(d.running);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &d.pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let pid = d.pid;
    wait_until("the daemon process to exit", || {
        !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)
    });
    assert!(!control::read_state(&m.state()).unwrap().mps_daemons[&key].running);
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}
