//! An MPS control daemon outlives the plugin the way a container runtime really stops a
//! container: every process of the container's cgroup killed at once (cgroup v2
//! `cgroup.kill`, what runc and crun use), not only its process group.
//!
//! Two launchers, each with a stand-in plugin process in a cgroup of its own that runs the
//! supervisor's launch command for one claim (the fake `nvidia-cuda-mps-control` of
//! tests/fake-nvml, a real daemon process):
//!
//! - `session` (`setsid`): the daemon is in the plugin's cgroup and dies with it. This is
//!   the honest outcome the chart's `mps.launcher: session` documents.
//! - `systemd-scope` (`systemd-run --scope`): the distribution's real systemd runs as PID 1
//!   of its own PID, mount, cgroup and UTS namespaces (as systemd-nspawn starts one), with
//!   a cgroup2 subtree of this machine as its root; the stand-in plugin joins its PID and
//!   mount namespaces (the DaemonSet's `hostPID` and `/run/systemd` mount), the real
//!   `systemd-run` moves the launcher into the transient unit
//!   `gpu-dra-mps-<claimUID>.scope`, the plugin's cgroup is killed, the daemon lives on in
//!   the scope, a fresh supervisor (in the same PID namespace) re-adopts it and its `quit`
//!   ends the scope.
//!
//! Needs root, a writable cgroup2 mount with `cgroup.kill` (Linux 5.14+), util-linux
//! (`unshare`, `nsenter`, `setsid`) and systemd (`make test` installs what is missing).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpu_dra::sharing::policy::MpsLimits;
use gpu_dra::sharing::{AdoptOutcome, MpsLauncher, MpsSettings, MpsSupervisor};
use support::driver::{FakeGpus, target_dir};

const CLAIM: &str = "claim-mps-cgroup";

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The cgroup2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid
/// host) from /proc/self/mountinfo.
fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup2"))
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap_or_default()))
        })
        .expect("no cgroup2 file system mounted: this test needs cgroup v2")
}

/// A fresh cgroup below this process's own cgroup2 cgroup; removed (with its children,
/// once empty) on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str) -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("no cgroup2 line in /proc/self/cgroup");
        let dir = cgroup2_mount()
            .join(own.trim_start_matches('/'))
            .join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {} (needs root): {e}", dir.display()));
        assert!(
            dir.join("cgroup.kill").exists(),
            "{} has no cgroup.kill: needs Linux 5.14 or newer",
            dir.display()
        );
        Self(dir)
    }

    fn child(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

/// Process ids (as this PID namespace sees them) in cgroup `dir`; empty once it is gone.
fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process of cgroup `dir` at once, as a container runtime does.
fn kill_cgroup(dir: &Path) {
    std::fs::write(dir.join("cgroup.kill"), "1").unwrap();
    wait_until("the killed cgroup is empty", || procs(dir).is_empty());
}

fn remove_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn supervisor(control: &Path, root: &Path, launcher: MpsLauncher) -> MpsSupervisor {
    MpsSupervisor::new(MpsSettings {
        control_path: control.to_owned(),
        root_dir: root.to_owned(),
        ready_timeout: Duration::from_secs(20),
        command_timeout: Duration::from_secs(20),
        private_shm: None,
    })
    .with_launcher(launcher)
}

/// A wrapper around the fake control tool that gives it the fake GPUs' environment
/// (written before anything is spawned).
fn control_wrapper(dir: &Path, gpus: &FakeGpus) -> PathBuf {
    let control = target_dir().join("nvidia-cuda-mps-control");
    assert!(
        control.exists(),
        "{} missing: run `cargo build --workspace` (make test does) first",
        control.display()
    );
    let wrapper = dir.join("nvidia-cuda-mps-control");
    executable(
        &wrapper,
        &format!(
            "#!/bin/sh\nexport FAKE_NVML_TOPOLOGY='{}' FAKE_NVML_PROC_ROOT='{}'\nexec '{}' \"$@\"\n",
            gpus.topology().display(),
            gpus.proc_root().display(),
            control.display()
        ),
    );
    wrapper
}

/// Starts a stand-in plugin in cgroup `cgroup` that runs `sup`'s launch command for
/// [`CLAIM`] and then stays; `enter` is the `nsenter` target (PID and mount namespaces)
/// or `None` for this machine's. Entered, it sees `/run/systemd` read-only, as the
/// chart mounts it. Returns it once the daemon's control pipe is up.
fn plugin_with_daemon(sup: &MpsSupervisor, cgroup: &Path, enter: Option<i32>) -> Child {
    let dirs = sup.dirs(CLAIM).unwrap();
    for dir in [&dirs.pipe, &dirs.log, &dirs.shm] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let (program, args) = sup.launch_command(&dirs);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(
        r#"echo $$ > "$1/cgroup.procs" || exit 1
enter=$2; shift 2
if [ -n "$enter" ]; then exec nsenter -t "$enter" --pid --mount -- unshare --mount --propagation private -- /bin/sh -c 'mount --bind /run/systemd /run/systemd && mount -o remount,bind,ro /run/systemd && "$@" && exec sleep 600' plugin "$@"; fi
"$@" && exec sleep 600"#,
    );
    cmd.arg("plugin")
        .arg(cgroup)
        .arg(enter.map(|p| p.to_string()).unwrap_or_default())
        .arg(program)
        .args(args)
        .env("CUDA_VISIBLE_DEVICES", "GPU-0")
        .env("CUDA_MPS_PIPE_DIRECTORY", &dirs.pipe)
        .env("CUDA_MPS_LOG_DIRECTORY", &dirs.log)
        .stdin(Stdio::null());
    let plugin = cmd.spawn().unwrap();
    wait_until("the daemon created its control pipe", || {
        dirs.pipe.join("control").exists()
    });
    plugin
}

fn daemon_pid_file(sup: &MpsSupervisor) -> String {
    let dirs = sup.dirs(CLAIM).unwrap();
    std::fs::read_to_string(dirs.pipe.join("nvidia-cuda-mps-control.pid"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The distribution's systemd binary.
fn systemd_binary() -> PathBuf {
    ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("systemd is not installed: `make test` installs it (apt-get install systemd)")
}

/// A real systemd as PID 1 of new PID, mount, cgroup, UTS and IPC namespaces, its cgroup
/// root `root`. It starts only `gpu-dra-test.target` (empty) and runs no generators, so
/// it changes nothing outside its namespaces. Killed (with every process of its PID
/// namespace) on drop.
struct Systemd {
    unshare: Child,
    pid: i32,
}

impl Systemd {
    fn boot(dir: &Path, root: &Path) -> Self {
        let units = dir.join("units");
        let generators = dir.join("generators");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::create_dir_all(&generators).unwrap();
        std::fs::write(
            units.join("gpu-dra-test.target"),
            "[Unit]\nDescription=gpu-dra MPS test\n",
        )
        .unwrap();
        let boot = dir.join("boot");
        // The trailing ':' keeps the distribution's unit directories (slices) after ours.
        executable(
            &boot,
            &format!(
                "#!/bin/sh\nset -e\nmount -t tmpfs -o mode=0755 tmpfs /run\nmount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
                 exec env -i container=gpu-dra-test SYSTEMD_UNIT_PATH='{}:' SYSTEMD_GENERATOR_PATH='{}' '{}' --unit=gpu-dra-test.target\n",
                units.display(),
                generators.display(),
                systemd_binary().display()
            ),
        );
        let log = std::fs::File::create(dir.join("systemd.log")).unwrap();
        let unshare = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec unshare --pid --fork --mount --propagation private --mount-proc --cgroup --uts --ipc -- "$2""#)
            .arg("boot")
            .arg(root)
            .arg(&boot)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let mut pid = 0;
        wait_until("unshare forked systemd", || {
            pid = std::fs::read_to_string(&children)
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            pid > 0
        });
        let systemd = Self { unshare, pid };
        // Its API socket, in its mount namespace, exists once it accepts requests; then
        // `--wait` blocks until the start-up job is done (systemd's own readiness).
        let private = PathBuf::from(format!("/proc/{pid}/root/run/systemd/private"));
        wait_until("systemd listens on /run/systemd/private", || {
            private.exists()
        });
        let state = systemd
            .command("systemctl")
            .args(["is-system-running", "--wait"])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        let log = std::fs::read_to_string(dir.join("systemd.log")).unwrap_or_default();
        assert!(
            state == "running" || state == "degraded",
            "systemd is {state:?}; its log:\n{log}"
        );
        assert!(
            root.join("init.scope").exists(),
            "systemd did not take its cgroup root; log:\n{log}"
        );
        systemd
    }

    /// `program` run in systemd's PID and mount namespaces.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid.to_string())
            .args(["--pid", "--mount", "--", program]);
        cmd
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
        let _ = self.unshare.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_daemon_dies_with_the_plugin_cgroup() {
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = control_wrapper(tmp.path(), &gpus);
    let cgroups = Cgroup::new("gpu-dra-mps-session");
    let plugin_cgroup = cgroups.child("plugin");

    let session = MpsLauncher::Session {
        setsid_path: "setsid".into(),
    };
    let sup = supervisor(&wrapper, &tmp.path().join("mps"), session);
    let mut plugin = plugin_with_daemon(&sup, &plugin_cgroup, None);
    let daemon: i32 = daemon_pid_file(&sup).parse().unwrap();
    assert!(
        procs(&plugin_cgroup).contains(&daemon),
        "a setsid daemon stays in the plugin's cgroup"
    );
    kill_cgroup(&plugin_cgroup);
    plugin.wait().unwrap();
    // Own session and process group do not help: the runtime kills the whole cgroup.
    let stat = std::fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "daemon {daemon} survived its cgroup's kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_scope_daemon_survives_the_plugin_cgroup_and_is_re_adopted() {
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = control_wrapper(tmp.path(), &gpus);
    let cgroups = Cgroup::new("gpu-dra-mps-scope");
    let host_root = cgroups.child("host");
    let systemd = Systemd::boot(tmp.path(), &host_root);
    // Like a container runtime's pod cgroup: outside systemd's units, inside its tree.
    let plugin_cgroup = host_root.join("kubepods").join("plugin");
    std::fs::create_dir_all(&plugin_cgroup).unwrap();

    let scope = MpsLauncher::SystemdScope {
        systemd_run_path: "systemd-run".into(),
    };
    let root = tmp.path().join("mps");
    let sup = supervisor(&wrapper, &root, scope.clone());
    let mut plugin = plugin_with_daemon(&sup, &plugin_cgroup, Some(systemd.pid));
    let unit = host_root
        .join("system.slice")
        .join(MpsLauncher::unit_name(CLAIM));
    // The launcher (`-d` forks the daemon, then returns) ends; the daemon stays in the scope.
    wait_until("only the daemon is left in its scope", || {
        procs(&unit).len() == 1
    });
    let daemon = procs(&unit)[0];
    let cmdline = std::fs::read(format!("/proc/{daemon}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("nvidia-cuda-mps-control"),
        "process {daemon} in {} is not the MPS daemon",
        unit.display()
    );
    assert!(
        !procs(&plugin_cgroup).contains(&daemon),
        "daemon left in the plugin's cgroup"
    );
    let before = daemon_pid_file(&sup);

    kill_cgroup(&plugin_cgroup);
    plugin.wait().unwrap();
    assert_eq!(
        procs(&unit),
        vec![daemon],
        "daemon killed with the plugin's cgroup"
    );

    // The restarted plugin, in the same (host) PID namespace, re-adopts the daemon.
    let in_host = tmp.path().join("control-in-host");
    executable(
        &in_host,
        &format!(
            "#!/bin/sh\nexec nsenter -t {} --pid --mount -- '{}' \"$@\"\n",
            systemd.pid,
            wrapper.display()
        ),
    );
    let restarted = supervisor(&in_host, &root, scope);
    let limits = MpsLimits {
        active_thread_percentage: Some(50),
        ..MpsLimits::default()
    };
    let (outcome, _edits) = restarted
        .adopt(CLAIM, &["GPU-0".to_owned()], &limits)
        .await
        .unwrap_or_else(|e| panic!("adopt: {e}"));
    assert_eq!(outcome, AdoptOutcome::Adopted);
    assert_eq!(procs(&unit), vec![daemon], "the adopted daemon still runs");
    assert_eq!(
        daemon_pid_file(&sup),
        before,
        "no second daemon was started"
    );

    // Its quit ends the daemon, and systemd unloads the empty scope.
    restarted.stop(CLAIM).await.unwrap();
    wait_until("systemd removed the daemon's scope", || !unit.exists());
}
