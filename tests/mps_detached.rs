//! An MPS control daemon outlives the plugin the way a container runtime stops it: the
//! plugin's whole process group killed at once. The fake `nvidia-cuda-mps-control` (a
//! real daemon process, tests/fake-nvml) is launched with the plugin's own launch command;
//! a restarted plugin (a fresh supervisor) then re-adopts it.

mod support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpu_dra::sharing::policy::MpsLimits;
use gpu_dra::sharing::{AdoptOutcome, MpsLauncher, MpsSettings, MpsSupervisor};
use rustix::process::{Pid, Signal, kill_process_group};
use support::driver::{FakeGpus, target_dir};

const CLAIM: &str = "claim-mps-1";

fn supervisor(control: &Path, root: &Path, launcher: MpsLauncher) -> MpsSupervisor {
    MpsSupervisor::new(MpsSettings {
        control_path: control.to_owned(),
        root_dir: root.to_owned(),
        ready_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(10),
        private_shm: None,
    })
    .with_launcher(launcher)
}

/// (process group, session, state) of `pid` from /proc, or `None` once it is gone.
fn stat(pid: i32) -> Option<(i32, i32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some((
        fields[2].parse().ok()?,
        fields[3].parse().ok()?,
        fields[0].chars().next()?,
    ))
}

fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(_, _, state)| state != 'Z')
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A stand-in plugin process in its own process group that runs the supervisor's launch
/// command for [`CLAIM`] (as `MpsSupervisor::start` does), then stays; returns it and the
/// daemon's pid once the daemon is up.
fn plugin_with_daemon(gpus: &FakeGpus, sup: &MpsSupervisor) -> (Child, i32) {
    let dirs = sup.dirs(CLAIM).unwrap();
    for dir in [&dirs.pipe, &dirs.log, &dirs.shm] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let (program, args) = sup.launch_command(&dirs);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#""$@" && exec sleep 600"#)
        .arg("plugin")
        .arg(program)
        .args(args)
        .env("CUDA_VISIBLE_DEVICES", "GPU-0")
        .env("CUDA_MPS_PIPE_DIRECTORY", &dirs.pipe)
        .env("CUDA_MPS_LOG_DIRECTORY", &dirs.log)
        .stdin(Stdio::null())
        .process_group(0);
    gpus.apply_env(&mut cmd);
    let plugin = cmd.spawn().unwrap();
    let pid_file = dirs.pipe.join("nvidia-cuda-mps-control.pid");
    let mut daemon = 0;
    wait_until("the daemon wrote its pid", || {
        daemon = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        daemon > 0 && dirs.pipe.join("control").exists()
    });
    (plugin, daemon)
}

fn kill_group(plugin: &mut Child) {
    let pgid = Pid::from_raw(plugin.id() as i32).unwrap();
    kill_process_group(pgid, Signal::KILL).unwrap();
    plugin.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mps_daemon_survives_the_plugin_process_group_and_is_re_adopted() {
    let control = target_dir().join("nvidia-cuda-mps-control");
    assert!(
        control.exists(),
        "{} missing: run `cargo build --workspace` (make test does) first",
        control.display()
    );
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The fake tool finds its GPUs through the environment: a wrapper sets it for the
    // supervisor's own commands too (written before anything is spawned).
    let wrapper = tmp.path().join("nvidia-cuda-mps-control");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport FAKE_NVML_TOPOLOGY='{}' FAKE_NVML_PROC_ROOT='{}'\nexec '{}' \"$@\"\n",
            gpus.topology().display(),
            gpus.proc_root().display(),
            control.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    // Control: a daemon started directly is in the plugin's group and dies with it.
    let direct = supervisor(&wrapper, &tmp.path().join("direct"), MpsLauncher::Direct);
    let (mut plugin, daemon) = plugin_with_daemon(&gpus, &direct);
    assert_eq!(stat(daemon).unwrap().0, plugin.id() as i32);
    kill_group(&mut plugin);
    wait_until("the direct daemon died with the plugin", || !alive(daemon));

    // Detached: own session and process group; the group kill leaves it running.
    let root = tmp.path().join("mps");
    let session = MpsLauncher::Session {
        setsid_path: "setsid".into(),
    };
    let (mut plugin, daemon) =
        plugin_with_daemon(&gpus, &supervisor(&wrapper, &root, session.clone()));
    let (plugin_group, plugin_session, _) = stat(plugin.id() as i32).unwrap();
    let (daemon_group, daemon_session, _) = stat(daemon).unwrap();
    assert_ne!(
        daemon_group, plugin_group,
        "daemon in the plugin's process group"
    );
    assert_ne!(
        daemon_session, plugin_session,
        "daemon in the plugin's session"
    );
    kill_group(&mut plugin);
    assert!(
        alive(daemon),
        "daemon killed with the plugin's process group"
    );

    // The restarted plugin re-adopts the running daemon instead of starting another.
    let restarted = supervisor(&wrapper, &root, session);
    let limits = MpsLimits {
        active_thread_percentage: Some(50),
        ..MpsLimits::default()
    };
    let (outcome, _edits) = restarted
        .adopt(CLAIM, &["GPU-0".to_owned()], &limits)
        .await
        .unwrap_or_else(|e| panic!("adopt: {e}"));
    assert_eq!(outcome, AdoptOutcome::Adopted);
    assert!(alive(daemon), "the adopted daemon still runs");
    let pid_file = root.join(CLAIM).join("pipe/nvidia-cuda-mps-control.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        daemon.to_string(),
        "no second daemon was started"
    );
    restarted.stop(CLAIM).await.unwrap();
    wait_until("the daemon quit", || !alive(daemon));
}
