//! Runs the gpu-dra kubelet plugin as a child process against a box node and a fake GPU.
//!
//! Owns: the fake GPU node (a topology copied into a temp dir, its state file and fake
//! /proc tree from tests/fake-nvml) and the plugin process (start, SIGKILL, restart,
//! log file). Paths of the fake NVML artefacts come from the workspace target dir
//! (`cargo build --workspace`, which `make test` runs first).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use anyhow::Context;

use super::cluster::TestBox;

/// The default driver name the plugin runs under.
pub const DRIVER: &str = "gpu.gpu-dra.dev";

/// `target/<profile>`, the directory of the test binary's parent.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A simulated GPU node: topology, state file and fake /proc in a temp dir.
pub struct FakeGpus {
    dir: tempfile::TempDir,
}

impl FakeGpus {
    /// Copies `tests/fake-nvml/topologies/<name>.yaml` into a fresh temp dir.
    pub fn new(topology: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("gpu-dra-fake-gpus-")
            .tempdir()?;
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fake-nvml/topologies")
            .join(format!("{topology}.yaml"));
        std::fs::copy(&src, dir.path().join("topology.yaml"))
            .with_context(|| format!("copying {}", src.display()))?;
        std::fs::create_dir_all(dir.path().join("proc"))?;
        Ok(Self { dir })
    }

    /// The topology file (`FAKE_NVML_TOPOLOGY`).
    pub fn topology(&self) -> PathBuf {
        self.dir.path().join("topology.yaml")
    }

    /// The fake GPUs' shared state file.
    pub fn state_path(&self) -> PathBuf {
        nvidia_ml::control::state_path(&self.topology())
    }

    /// The fake /proc root the fake library maintains (`FAKE_NVML_PROC_ROOT`).
    pub fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    /// Reads the fake GPUs' state (compute mode, time slice, instances, MPS daemons).
    pub fn state(&self) -> nvidia_ml::control::State {
        nvidia_ml::control::read_state(&self.state_path()).expect("fake NVML state readable")
    }

    /// Sets the fake library's environment on `cmd`.
    pub fn apply_env(&self, cmd: &mut Command) {
        cmd.env("FAKE_NVML_TOPOLOGY", self.topology())
            .env("FAKE_NVML_PROC_ROOT", self.proc_root());
    }
}

/// The plugin process for one node of a box.
pub struct Plugin {
    child: Mutex<Option<Child>>,
    log: PathBuf,
    args: Vec<String>,
    /// Spawn in a process group of its own (see [`Plugin::start_in_group`]).
    own_group: bool,
}

impl Plugin {
    /// Starts `gpu-dra kubelet-plugin` for `node` of `b` on the fake GPUs `gpus`.
    pub fn start(b: &TestBox, node: &str, gpus: &FakeGpus) -> anyhow::Result<Self> {
        Self::start_with(b, node, gpus, false)
    }

    /// Like [`Plugin::start`], but the plugin (and every restart) leads a process group of
    /// its own, which [`Plugin::kill_group`] kills whole, as a container runtime kills a
    /// container with everything it started.
    pub fn start_in_group(b: &TestBox, node: &str, gpus: &FakeGpus) -> anyhow::Result<Self> {
        Self::start_with(b, node, gpus, true)
    }

    fn start_with(
        b: &TestBox,
        node: &str,
        gpus: &FakeGpus,
        own_group: bool,
    ) -> anyhow::Result<Self> {
        let target = target_dir();
        let lib = target.join("libnvidia_ml.so");
        anyhow::ensure!(
            lib.exists(),
            "{} missing: run `cargo build --workspace` (make test does) before the tests",
            lib.display()
        );
        let args = vec![
            "kubelet-plugin".to_string(),
            format!("--node-name={node}"),
            format!("--kubelet-root={}", b.kubelet_root(node).display()),
            format!("--cdi-root={}", b.cdi_dir(node).display()),
            format!("--kubeconfig={}", b.kubeconfig().display()),
            format!("--nvml-lib-path={}", lib.display()),
            format!("--nvidia-smi-path={}", target.join("nvidia-smi").display()),
            format!(
                "--mps-control-path={}",
                target.join("nvidia-cuda-mps-control").display()
            ),
            format!("--proc-root={}", gpus.proc_root().display()),
        ];
        let log = b.state_dir().join(format!("plugin-{node}.log"));
        let mut plugin = Plugin {
            child: Mutex::new(None),
            log,
            args,
            own_group,
        };
        plugin.spawn(gpus)?;
        Ok(plugin)
    }

    fn spawn(&mut self, gpus: &FakeGpus) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(target_dir().join("gpu-dra"));
        cmd.args(&self.args)
            .env("GPU_DRA_LOG_LEVEL", "info,gpu_dra=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        gpus.apply_env(&mut cmd);
        if self.own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        *self.child.get_mut().unwrap_or_else(|p| p.into_inner()) =
            Some(cmd.spawn().context("spawning gpu-dra kubelet-plugin")?);
        Ok(())
    }

    /// SIGKILLs the plugin (no clean shutdown: sockets and state stay as they are).
    pub fn kill(&mut self) {
        if let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILLs the plugin's whole process group (`kill(-pgid, SIGKILL)`) and reaps the
    /// plugin. Only for a plugin from [`Plugin::start_in_group`].
    pub fn kill_group(&mut self) {
        if let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            if let Some(pgid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
            let _ = child.wait();
        }
    }

    /// Starts the plugin again with the same arguments.
    pub fn restart(&mut self, gpus: &FakeGpus) -> anyhow::Result<()> {
        self.kill();
        self.spawn(gpus)
    }

    /// Fails if the plugin has exited.
    pub fn check_alive(&self) -> anyhow::Result<()> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = guard.as_mut()
            && let Some(status) = child.try_wait()?
        {
            anyhow::bail!("plugin exited with {status}; log:\n{}", self.log_tail(40));
        }
        Ok(())
    }

    /// The last `lines` lines of the plugin's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(child) = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            // SIGTERM first so the plugin removes its sockets; the box goes away anyway.
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = child.wait();
        }
    }
}
