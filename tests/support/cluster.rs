//! The Kubernetes test rig ("box") for integration tests.
//!
//! Owns: building `tests/cluster/bin/box` (via `make -C tests/cluster`) when it
//! is missing or older than its sources, starting `box up` with a fresh temp
//! state dir, waiting with deadlines until the control plane and the
//! simulated nodes are ready, per-test namespaces, and tearing the box down.
//! Must not: sleep for synchronisation (everything polls a condition with a
//! deadline) or hang: every wait has a deadline and a crashed component fails
//! the wait at once with the last log lines of every component.
//! Upstream behaviour: readiness mirrors what `kubectl get --raw /readyz`,
//! the kube-system leader-election Leases and Node `Ready` conditions report.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Default deadline for the box to become ready (build time not included).
/// Override with env `GPU_DRA_BOX_READY_SECS`.
const DEFAULT_READY_SECS: u64 = 180;

/// One running box: etcd, kube-apiserver, kube-controller-manager,
/// kube-scheduler and the node agent for `nodes`, all children of one
/// `box up` process whose state (kubeconfig, logs, kubelet roots, CDI dirs,
/// container results) lives in [`TestBox::state_dir`].
pub struct TestBox {
    child: Mutex<Option<Child>>,
    /// Closing it makes `box up --exit-on-stdin-close` stop the box, so a
    /// test process that dies never leaks one.
    stdin: Mutex<Option<ChildStdin>>,
    state: Option<tempfile::TempDir>,
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    nodes: Vec<String>,
}

/// The box shared by all tests of one test binary (nodes `["node-a"]`),
/// started on first use. Tests isolate themselves with
/// [`TestBox::create_namespace`]. Panics (in every caller) if it cannot start.
pub fn shared() -> &'static TestBox {
    static SHARED: OnceLock<Result<TestBox, String>> = OnceLock::new();
    match SHARED.get_or_init(|| TestBox::start(&["node-a"]).map_err(|e| format!("{e:#}"))) {
        Ok(b) => b,
        Err(e) => panic!("shared test box failed to start: {e}"),
    }
}

/// Polls `check` every 100 ms until it returns `Ok(Some(value))` or `deadline`
/// (a duration from now) passes. `Ok(None)` and `Err(_)` mean "not yet"; the
/// last error or "still not satisfied" is part of the timeout error, which
/// names `what`.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let end = Instant::now() + deadline;
    let mut last: String;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = String::from("condition not yet true"),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rig_dir() -> PathBuf {
    repo_root().join("tests").join("cluster")
}

/// Path of the rig binary built by `make -C tests/cluster`.
pub fn box_binary() -> PathBuf {
    rig_dir().join("bin").join("box")
}

fn newest_source_mtime(dir: &Path) -> anyhow::Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut files: Vec<PathBuf> = ["go.mod", "go.sum", "Makefile"].iter().map(|f| dir.join(f)).collect();
    let cmd_dir = dir.join("cmd").join("box");
    for entry in std::fs::read_dir(&cmd_dir).with_context(|| format!("read {}", cmd_dir.display()))? {
        files.push(entry?.path());
    }
    for f in files {
        let m = std::fs::metadata(&f).with_context(|| format!("stat {}", f.display()))?.modified()?;
        newest = newest.max(m);
    }
    Ok(newest)
}

/// Builds the rig if the binary is missing or older than its sources.
/// Serialised across threads and processes with a lock file.
fn ensure_built() -> anyhow::Result<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = rig_dir();
    let bin = box_binary();
    std::fs::create_dir_all(dir.join("bin"))?;
    let lock = std::fs::File::create(dir.join("bin").join(".build.lock"))?;
    lock.lock().context("lock tests/cluster/bin/.build.lock")?;
    let stale = match std::fs::metadata(&bin).and_then(|m| m.modified()) {
        Ok(built) => built < newest_source_mtime(&dir)?,
        Err(_) => true,
    };
    if stale {
        let started = Instant::now();
        eprintln!("support::cluster: building the rig (make -C {}) ...", dir.display());
        let out = Command::new("make")
            .arg("-C")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .context("run make (is GNU make installed?)")?;
        if !out.status.success() {
            bail!(
                "building the test rig failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!("support::cluster: rig built in {:.1}s", started.elapsed().as_secs_f64());
    }
    Ok(bin)
}

/// Env `GPU_DRA_BOX_KEEP` set: keep state dirs (logs, kubelet roots) after the box stops.
fn keep_state() -> bool {
    std::env::var_os("GPU_DRA_BOX_KEEP").is_some()
}

fn ready_deadline() -> Duration {
    let secs = std::env::var("GPU_DRA_BOX_READY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_READY_SECS);
    Duration::from_secs(secs)
}

impl TestBox {
    /// Builds the rig if needed, starts `box up` for `nodes` in a fresh temp
    /// state dir and waits until the API server is healthy, the scheduler and
    /// controller-manager hold their leases and every node is Ready.
    ///
    /// Errors: build failure (with make's output), a component crash or a
    /// timeout (with the last log lines of every component).
    pub fn start(nodes: &[&str]) -> anyhow::Result<TestBox> {
        anyhow::ensure!(!nodes.is_empty(), "TestBox::start needs at least one node");
        let bin = ensure_built()?;
        let state = tempfile::Builder::new().prefix("gpu-dra-box-").tempdir()?;
        let state_dir = state.path().to_path_buf();
        let up_log = std::fs::File::create(state_dir.join("up.log"))?;
        let mut child = Command::new(&bin)
            .arg("up")
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--nodes")
            .arg(nodes.join(","))
            .arg("--exit-on-stdin-close")
            .args((!keep_state()).then_some("--remove-state-dir-on-exit"))
            .stdin(Stdio::piped())
            .stdout(up_log.try_clone()?)
            .stderr(up_log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdin = child.stdin.take();
        let b = TestBox {
            child: Mutex::new(Some(child)),
            stdin: Mutex::new(stdin),
            kubeconfig: state_dir.join("kubeconfig"),
            state_dir,
            state: Some(state),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
        };
        let started = Instant::now();
        if let Err(e) = b.wait_ready(ready_deadline()) {
            let tail = b.log_tail(40);
            b.stop();
            return Err(e.context(format!("test box did not become ready; component logs:\n{tail}")));
        }
        eprintln!(
            "support::cluster: box ready in {:.1}s (state dir {})",
            started.elapsed().as_secs_f64(),
            b.state_dir.display()
        );
        Ok(b)
    }

    /// Fails at once if `box up` has exited.
    fn check_alive(&self) -> anyhow::Result<()> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = guard.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("box up exited with {status}");
        }
        Ok(())
    }

    /// Readiness, checked from a private runtime on its own thread (callers
    /// may be inside a tokio runtime).
    fn wait_ready(&self, deadline: Duration) -> anyhow::Result<()> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(self.wait_ready_async(deadline))
            })
            .join()
            .map_err(|_| anyhow!("readiness thread panicked"))?
        })
    }

    async fn wait_ready_async(&self, deadline: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        let left = || end.saturating_duration_since(Instant::now());
        wait_for(left(), "kubeconfig written by box up", || async {
            self.check_alive()?;
            Ok(self.kubeconfig.exists().then_some(()))
        })
        .await?;
        let client = self.try_client().await?;
        wait_for(left(), "apiserver /readyz", || async {
            self.check_alive()?;
            let req = http::Request::get("/readyz").body(Vec::new())?;
            let text = client.request_text(req).await?;
            Ok((text.trim() == "ok").then_some(()))
        })
        .await?;
        for lease in ["kube-scheduler", "kube-controller-manager"] {
            let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
            wait_for(left(), &format!("{lease} lease held"), || async {
                self.check_alive()?;
                let l = leases.get_opt(lease).await?;
                Ok(l.and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty()).map(|_| ()))
            })
            .await?;
        }
        let api: Api<Node> = Api::all(client.clone());
        for node in &self.nodes {
            wait_for(left(), &format!("node {node} Ready"), || async {
                self.check_alive()?;
                let n = api.get_opt(node).await?;
                let ready = n
                    .and_then(|n| n.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                Ok(ready.then_some(()))
            })
            .await?;
        }
        Ok(())
    }

    async fn try_client(&self) -> anyhow::Result<kube::Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("read {}", self.kubeconfig.display()))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// A client for the box's API server with admin rights (group system:masters).
    /// Panics if the kubeconfig cannot be loaded (the box is broken).
    pub async fn client(&self) -> kube::Client {
        match self.try_client().await {
            Ok(c) => c,
            Err(e) => panic!("client for test box {}: {e:#}", self.state_dir.display()),
        }
    }

    /// Admin kubeconfig (`<state dir>/kubeconfig`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The box's state dir; everything the box writes lives below it.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Names of the simulated nodes.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Kubelet root dir of `node` (holds `plugins_registry/` and `plugins/`):
    /// pass it to the driver as its kubelet root.
    pub fn kubelet_root(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node).join("kubelet")
    }

    /// CDI spec dir the node agent resolves CDI ids from for `node`.
    pub fn cdi_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node).join("cdi")
    }

    /// The JSON the node agent wrote for one container once its pod's claims
    /// were prepared: `cdiDevices`, `env`, `deviceNodes` (`path`, `type`,
    /// `major`, `minor`), `mounts` (`destination`, `source`, `type`,
    /// `options`), optional `hooks`, plus `node`, `namespace`, `pod`,
    /// `podUID`, `container`. `None` while not (or no longer) prepared.
    pub fn container_result(&self, node: &str, ns: &str, pod: &str, container: &str) -> Option<serde_json::Value> {
        let path = self
            .state_dir
            .join("nodes")
            .join(node)
            .join("containers")
            .join(format!("{ns}_{pod}_{container}.json"));
        let data = std::fs::read(path).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Creates a namespace `<prefix>-<unique suffix>` and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let suffix = format!("{}-{n}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let mut base: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        base.truncate(63 - suffix.len() - 1);
        let name = format!("{}-{suffix}", base.trim_matches('-'));
        let ns: Namespace = match serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "box.gpu-dra.dev/test": "true" } }
        })) {
            Ok(ns) => ns,
            Err(e) => panic!("namespace object: {e}"),
        };
        let api: Api<Namespace> = Api::all(self.client().await);
        if let Err(e) = api.create(&PostParams::default(), &ns).await {
            panic!("create namespace {name}: {e}\n{}", self.log_tail(20));
        }
        name
    }

    /// Like [`wait_for`], with the last log lines of every component appended on timeout.
    pub async fn wait<T, F, Fut>(&self, deadline: Duration, what: &str, check: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<T>>>,
    {
        wait_for(deadline, what, check).await.map_err(|e| e.context(self.log_tail(30)))
    }

    /// The last `lines` lines of every component log (`up`, etcd, apiserver,
    /// controller-manager, scheduler, node-agent), each under a header.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut files = vec![self.state_dir.join("up.log")];
        if let Ok(rd) = std::fs::read_dir(self.state_dir.join("logs")) {
            let mut logs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            logs.sort();
            files.extend(logs);
        }
        let mut out = String::new();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| format!("(unreadable: {e})"));
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!("===== {name} (last {} lines) =====\n", all.len() - from));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// SIGTERM to `box up`, then wait for it (it stops its children first).
    /// Falls back to closing stdin and finally SIGKILL after 30 s.
    fn stop(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut child) = guard.take() else { return };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if let Some(mut stdin) = self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stdin.flush();
        }
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= end => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::park_timeout(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for TestBox {
    fn drop(&mut self) {
        self.stop();
        if keep_state()
            && let Some(state) = self.state.take()
        {
            eprintln!("support::cluster: keeping box state dir {}", state.keep().display());
        }
    }
}
