//! Runs the gpu-dra kubelet plugin as a child process against a box node and a fake GPU.
//!
//! Owns: the fake GPU node (a topology copied into a temp dir, its state file, fake
//! /proc tree and a driver root holding the fake NVML artefacts from tests/fake-nvml) and
//! the plugin process (start, SIGKILL, restart, log file). The plugin runs as the
//! DaemonSet runs it: with the container's args and env from deploy/daemonset.yaml (host
//! paths mapped to the box, see `support::deploy`) and a token of its ServiceAccount, not
//! the admin kubeconfig. Paths of the fake NVML artefacts come from the workspace target
//! dir (`cargo build --workspace`, which `make test` runs first).

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

    /// A driver root laid out as a Debian/Ubuntu host's (`usr/lib/<multiarch>/libnvidia-ml.so.1`,
    /// `usr/bin/nvidia-smi`, `usr/bin/nvidia-cuda-mps-control`) holding the fake NVML
    /// artefacts of `target` (hard links, or copies across file systems): the driver
    /// installed; files already there are kept.
    pub fn install_driver(&self, target: &Path) -> anyhow::Result<PathBuf> {
        let root = self.driver_root();
        let multiarch = format!("usr/lib/{}-linux-gnu", std::env::consts::ARCH);
        for (from, to) in [
            ("libnvidia_ml.so", format!("{multiarch}/libnvidia-ml.so.1")),
            ("nvidia-smi", "usr/bin/nvidia-smi".to_owned()),
            (
                "nvidia-cuda-mps-control",
                "usr/bin/nvidia-cuda-mps-control".to_owned(),
            ),
        ] {
            let dest = root.join(to);
            if dest.exists() {
                continue;
            }
            std::fs::create_dir_all(dest.parent().expect("below the root"))?;
            let src = target.join(from);
            if std::fs::hard_link(&src, &dest).is_err() {
                std::fs::copy(&src, &dest)
                    .with_context(|| format!("copying {} into the driver root", src.display()))?;
            }
        }
        Ok(root)
    }

    /// The node's driver root (empty until [`FakeGpus::install_driver`]).
    pub fn driver_root(&self) -> PathBuf {
        self.dir.path().join("driver-root")
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
    env: Vec<(String, String)>,
    http_address: std::net::SocketAddr,
    dra_socket: PathBuf,
    /// Spawn in a process group of its own (see [`Plugin::start_in_group`]).
    own_group: bool,
}

impl Plugin {
    /// Starts `gpu-dra kubelet-plugin` for `node` of `b` on the fake GPUs `gpus`.
    pub fn start(b: &TestBox, node: &str, gpus: &FakeGpus) -> anyhow::Result<Self> {
        Self::start_with(b, node, gpus, "", &[])
    }

    /// Like [`Plugin::start`], but the driver root stays as it is (empty unless
    /// [`FakeGpus::install_driver`] ran): the plugin waits for the driver.
    pub fn start_before_driver(b: &TestBox, node: &str, gpus: &FakeGpus) -> anyhow::Result<Self> {
        Self::launch(b, node, gpus, "", &[], true, false)
    }

    /// Like [`Plugin::start`] with `more` arguments appended (e.g. `--pod-uid=...`);
    /// a non-empty `instance` names the log file `plugin-<node>-<instance>.log`, so
    /// several instances for one node keep separate logs.
    pub fn start_with(
        b: &TestBox,
        node: &str,
        gpus: &FakeGpus,
        instance: &str,
        more: &[String],
    ) -> anyhow::Result<Self> {
        gpus.install_driver(&target_dir())?;
        Self::launch(b, node, gpus, instance, more, true, false)
    }

    /// Like [`Plugin::start_with`], but without the DaemonSet's `GPU_DRA_POD_UID`: a
    /// manual run, or a DaemonSet that lost its rolling-update settings.
    pub fn start_unmanaged(
        b: &TestBox,
        node: &str,
        gpus: &FakeGpus,
        instance: &str,
    ) -> anyhow::Result<Self> {
        gpus.install_driver(&target_dir())?;
        Self::launch(b, node, gpus, instance, &[], false, false)
    }

    /// Like [`Plugin::start`], but the plugin (and every restart) leads a process group of
    /// its own, which [`Plugin::kill_group`] kills whole, as a container runtime kills a
    /// container with everything it started.
    pub fn start_in_group(b: &TestBox, node: &str, gpus: &FakeGpus) -> anyhow::Result<Self> {
        gpus.install_driver(&target_dir())?;
        Self::launch(b, node, gpus, "", &[], true, true)
    }

    fn launch(
        b: &TestBox,
        node: &str,
        gpus: &FakeGpus,
        instance: &str,
        more: &[String],
        managed: bool,
        own_group: bool,
    ) -> anyhow::Result<Self> {
        let target = target_dir();
        let lib = target.join("libnvidia_ml.so");
        anyhow::ensure!(
            lib.exists(),
            "{} missing: run `cargo build --workspace` (make test does) before the tests",
            lib.display()
        );
        let identity_started = std::time::Instant::now();
        let (kubeconfig, pod_uid) = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(super::deploy::plugin_kubeconfig(b, node))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("identity thread panicked"))?
        })?;
        eprintln!(
            "support::driver: ServiceAccount token for {node} in {:.2}s",
            identity_started.elapsed().as_secs_f64()
        );
        let paths = super::deploy::HostPaths {
            kubelet_root: b.kubelet_root(node),
            cdi_root: b.cdi_dir(node),
            driver_root: gpus.driver_root(),
            pod_uid: pod_uid.clone(),
        };
        let super::deploy::ContainerCommand { mut args, mut env } =
            super::deploy::container_command(node, &paths)?;
        if !managed {
            env.retain(|(name, _)| name != "GPU_DRA_POD_UID");
        }
        let http_address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // What differs from a pod: no in-cluster config, the fake /proc, a free port; and
        // the kubelet's default directories mapped to the box unless the manifest sets them.
        let set = |flag: &str, env_name: &str| {
            args.iter().any(|a| a.starts_with(&format!("--{flag}=")))
                || env.iter().any(|(n, _)| n == env_name)
        };
        let mut extra = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--proc-root={}", gpus.proc_root().display()),
            format!("--http-address={http_address}"),
            // The box's plugin is a host process on a machine whose PID 1 is not systemd:
            // MPS daemons detach with setsid (tests/mps_cgroup_kill.rs runs systemd-scope
            // against a real systemd).
            "--mps-launcher=session".to_owned(),
        ];
        if !set("kubelet-root", "GPU_DRA_KUBELET_ROOT") {
            extra.push(format!("--kubelet-root={}", b.kubelet_root(node).display()));
        }
        if !set("cdi-root", "GPU_DRA_CDI_ROOT") {
            extra.push(format!("--cdi-root={}", b.cdi_dir(node).display()));
        }
        // These replace the manifest's own value of the same flag (clap takes one).
        for flag in &extra {
            let name = flag.split('=').next().unwrap_or_default().to_owned() + "=";
            args.retain(|a| !a.starts_with(&name));
        }
        args.extend(extra);
        // Nor a private /dev/shm per MPS daemon (the chart's default): with it, the fault
        // test of tests/e2e_chaos.rs run after its kill campaign finds claims and an MPS
        // daemon left on the node (tests/e2e_examples.rs alone passes with it).
        args.retain(|a| a != "--mps-private-shm");
        args.extend(more.iter().cloned());
        let log = match instance {
            "" => b.state_dir().join(format!("plugin-{node}.log")),
            name => b.state_dir().join(format!("plugin-{node}-{name}.log")),
        };
        // The socket names the plugin derives from its pod UID (flag, else env).
        let pod_uid = args
            .iter()
            .rev()
            .find_map(|a| a.strip_prefix("--pod-uid="))
            .map(str::to_owned)
            .or_else(|| {
                env.iter()
                    .find(|(name, _)| name == "GPU_DRA_POD_UID")
                    .map(|(_, v)| v.clone())
            });
        let dra_socket = gpu_dra::plugin::dra_socket_path(
            &b.kubelet_root(node).join("plugins").join(DRIVER),
            pod_uid.as_deref(),
        );
        let mut plugin = Plugin {
            child: Mutex::new(None),
            log,
            args,
            env,
            http_address,
            dra_socket,
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Tests read the text log (the manifest's JSON format is for log collectors).
            .env("GPU_DRA_LOG_FORMAT", "text")
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

    /// Process id of the running plugin, if any.
    pub fn pid(&self) -> Option<u32> {
        let guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(Child::id)
    }

    /// The exit status, once the plugin has exited (`None` while it runs).
    pub fn exit_status(&self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => anyhow::bail!("plugin not started"),
        }
    }

    /// SIGTERMs the plugin (clean shutdown, as the kubelet stops a pod) and waits for it
    /// to exit; returns its exit status.
    pub fn terminate(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(mut child) = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(None);
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        Ok(Some(child.wait()?))
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

    /// The DRA service socket this instance serves (per-pod name under a DaemonSet).
    pub fn dra_socket(&self) -> &Path {
        &self.dra_socket
    }

    /// Where the plugin serves `/healthz` and `/readyz`.
    pub fn http_address(&self) -> std::net::SocketAddr {
        self.http_address
    }

    /// GETs `path` (`/healthz`, `/readyz`) from the plugin's HTTP server: status and body.
    pub async fn probe(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use http_body_util::BodyExt as _;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{}{path}", self.http_address).parse()?;
        let response = client.get(uri).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
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
