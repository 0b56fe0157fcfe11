use super::test_support::{Daemon, fake_mps_control, fake_mps_daemon, ignore_command, recorded};
use super::*;
use std::path::Path;

fn settings(dir: &Path, control: PathBuf) -> MpsSettings {
    MpsSettings {
        control_path: control,
        root_dir: dir.join("plugin/mps"),
        ready_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(10),
        private_shm: None,
    }
}

fn gpus(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn claim_uid_must_be_a_plain_name() {
    let sup = MpsSupervisor::new(settings(Path::new("/x"), PathBuf::from("/bin/false")));
    for bad in ["", "..", "a/b", "../x"] {
        assert!(
            matches!(sup.dirs(bad), Err(MpsError::InvalidClaimUid { .. })),
            "{bad:?}"
        );
    }
    let dirs = sup.dirs("0b7c-uid").unwrap();
    assert_eq!(dirs.pipe, Path::new("/x/plugin/mps/0b7c-uid/pipe"));
}

#[test]
fn private_shm_wraps_launch_in_unshare_and_mounts_shm() {
    let mut s = settings(
        Path::new("/x"),
        PathBuf::from("/usr/bin/nvidia-cuda-mps-control"),
    );
    let plain = MpsSupervisor::new(s.clone());
    let dirs = plain.dirs("u").unwrap();
    assert_eq!(
        plain.launch_command(&dirs),
        (s.control_path.clone(), vec!["-d".to_owned()])
    );
    assert!(
        plain
            .edits(&dirs)
            .mounts
            .iter()
            .all(|m| m.container_path != "/dev/shm")
    );

    s.private_shm = Some(PrivateShm {
        unshare_path: "/usr/bin/unshare".into(),
        shell_path: "/bin/sh".into(),
    });
    let private = MpsSupervisor::new(s);
    let (program, args) = private.launch_command(&dirs);
    assert_eq!(program, Path::new("/usr/bin/unshare"));
    assert_eq!(args[..4], ["--mount", "--propagation", "private", "--"]);
    assert_eq!(
        args[args.len() - 2..],
        ["/x/plugin/mps/u/shm", "/usr/bin/nvidia-cuda-mps-control"]
    );
    let shm = private
        .edits(&dirs)
        .mounts
        .into_iter()
        .find(|m| m.container_path == "/dev/shm")
        .unwrap();
    assert_eq!(shm.host_path, dirs.shm);
}

#[tokio::test]
async fn start_applies_limits_and_stop_quits_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), None);
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    let limits = MpsLimits {
        active_thread_percentage: Some(50),
        pinned_memory_limit_bytes: Some(4 << 30),
        ..MpsLimits::default()
    };
    let edits = sup
        .start("claim-1", &gpus(&["GPU-a", "GPU-b"]), &limits)
        .await
        .unwrap();
    let dirs = sup.dirs("claim-1").unwrap();
    assert_eq!(
        edits.env,
        [
            (
                "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
                "/tmp/nvidia-mps".to_owned()
            ),
            (
                "CUDA_MPS_LOG_DIRECTORY".to_owned(),
                "/var/log/nvidia-mps".to_owned()
            ),
        ]
    );
    assert_eq!(edits.mounts[0].host_path, dirs.pipe);
    assert_eq!(edits.mounts[0].container_path, "/tmp/nvidia-mps");
    assert_eq!(
        recorded(tmp.path()),
        [
            format!(
                "start args=-d visible=GPU-a,GPU-b pipe={} log={}",
                dirs.pipe.display(),
                dirs.log.display()
            ),
            "cmd set_default_active_thread_percentage 50".to_owned(),
            "cmd get_default_active_thread_percentage".to_owned(),
            "cmd set_default_device_pinned_mem_limit GPU-a 4096M".to_owned(),
            "cmd get_default_device_pinned_mem_limit GPU-a".to_owned(),
            "cmd set_default_device_pinned_mem_limit GPU-b 4096M".to_owned(),
            "cmd get_default_device_pinned_mem_limit GPU-b".to_owned(),
        ]
    );
    assert!(dirs.log.is_dir() && dirs.shm.is_dir());

    sup.stop("claim-1").await.unwrap();
    assert_eq!(recorded(tmp.path()).last().unwrap(), "cmd quit");
    assert!(!dirs.root.exists());
    sup.stop("claim-1").await.unwrap();
    assert_eq!(recorded(tmp.path()).len(), 8, "a second stop sends nothing");
}

#[tokio::test]
async fn readiness_waits_for_the_control_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), Some("sleep 0.3"));
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    let limits = MpsLimits {
        active_thread_percentage: Some(10),
        ..MpsLimits::default()
    };
    sup.start("slow", &gpus(&["GPU-a"]), &limits).await.unwrap();
    // The limit command only succeeds once the pipe exists, so reaching it proves the wait.
    assert_eq!(
        recorded(tmp.path())[1..],
        [
            "cmd set_default_active_thread_percentage 10",
            "cmd get_default_active_thread_percentage"
        ]
    );
}

#[tokio::test]
async fn daemon_that_never_gets_ready_fails_with_deadline_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), Some("exit 0"));
    let mut s = settings(tmp.path(), control);
    s.ready_timeout = Duration::from_millis(200);
    let sup = MpsSupervisor::new(s);
    let err = sup
        .start("never", &gpus(&["GPU-a"]), &MpsLimits::default())
        .await
        .unwrap_err();
    assert!(matches!(err, MpsError::NotReady { .. }), "{err}");
    assert!(!sup.dirs("never").unwrap().root.exists());
}

#[tokio::test]
async fn failing_limit_command_stops_daemon_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), None);
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    let limits = MpsLimits {
        pinned_memory_limit_bytes: Some(1 << 30),
        ..MpsLimits::default()
    };
    let err = sup
        .start("c", &gpus(&["GPU-unknown"]), &limits)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, MpsError::CommandFailed { .. }) && text.contains("Invalid device"),
        "{text}"
    );
    assert_eq!(recorded(tmp.path()).last().unwrap(), "cmd quit");
    assert!(!sup.dirs("c").unwrap().root.exists());
}

#[tokio::test]
async fn missing_binary_and_stale_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = MpsSupervisor::new(settings(tmp.path(), tmp.path().join("absent")));
    let err = missing
        .start("c", &gpus(&["GPU-a"]), &MpsLimits::default())
        .await
        .unwrap_err();
    assert!(matches!(err, MpsError::Spawn { .. }), "{err}");
    assert!(!missing.dirs("c").unwrap().root.exists());
    // A stale control pipe whose daemon is gone: quit fails, stop still cleans up.
    let dirs = missing.dirs("stale").unwrap();
    std::fs::create_dir_all(&dirs.pipe).unwrap();
    std::fs::write(dirs.pipe.join("control"), "").unwrap();
    missing.stop("stale").await.unwrap();
    assert!(!dirs.root.exists());
}

#[tokio::test]
async fn adopt_keeps_a_live_daemon_and_restarts_a_dead_one() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), None);
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    let limits = MpsLimits {
        active_thread_percentage: Some(30),
        ..MpsLimits::default()
    };
    sup.start("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
    let (outcome, _) = sup.adopt("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
    assert_eq!(outcome, AdoptOutcome::Adopted);
    let starts = |lines: &[String]| lines.iter().filter(|l| l.starts_with("start")).count();
    assert_eq!(starts(&recorded(tmp.path())), 1);

    // The daemon died with the node's processes: pipe gone, directories left behind.
    std::fs::remove_file(sup.dirs("c").unwrap().pipe.join("control")).unwrap();
    let (outcome, edits) = sup.adopt("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
    assert_eq!(outcome, AdoptOutcome::Restarted);
    assert_eq!(starts(&recorded(tmp.path())), 2);
    assert!(!edits.env.is_empty());
    assert_eq!(sup.claim_dirs().unwrap(), ["c"]);
}

#[tokio::test]
async fn limit_the_daemon_accepts_without_effect_fails_the_start_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), None);
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    ignore_command(tmp.path(), "set_default_device_pinned_mem_limit");
    let limits = MpsLimits {
        active_thread_percentage: Some(50),
        pinned_memory_limit_bytes: Some(2 << 30),
        ..MpsLimits::default()
    };
    let err = sup
        .start("c", &gpus(&["GPU-a"]), &limits)
        .await
        .unwrap_err();
    let MpsError::LimitNotApplied {
        gpus: ref gpu,
        ref wanted,
        ref read,
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(
        (gpu.as_str(), wanted.as_str(), read.as_str()),
        ("GPU-a", "2048M", "0")
    );
    let text = err.to_string();
    assert!(
        text.contains("default device pinned memory limit") && text.contains("retries"),
        "{text}"
    );
    assert_eq!(recorded(tmp.path()).last().unwrap(), "cmd quit");
    assert!(!sup.dirs("c").unwrap().root.exists());
}

#[tokio::test]
async fn adopt_reads_the_limits_back() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_control(tmp.path(), None);
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    let limits = MpsLimits {
        active_thread_percentage: Some(30),
        ..MpsLimits::default()
    };
    sup.start("c", &gpus(&["GPU-a"]), &limits).await.unwrap();
    ignore_command(tmp.path(), "set_default_active_thread_percentage");
    let other = MpsLimits {
        active_thread_percentage: Some(60),
        ..MpsLimits::default()
    };
    let err = sup.adopt("c", &gpus(&["GPU-a"]), &other).await.unwrap_err();
    assert!(
        matches!(&err, MpsError::LimitNotApplied { read, wanted, .. } if read == "30.0" && wanted == "60"),
        "{err}"
    );
}

fn daemon_pids(sup: &MpsSupervisor, claim: &str) -> Vec<u32> {
    let pipe = sup.dirs(claim).unwrap().pipe;
    sup.procs.of_pipe(&pipe).iter().map(|p| p.pid).collect()
}

#[tokio::test]
async fn a_daemon_that_ignores_quit_is_stopped_by_signal() {
    for behaviour in [Daemon::IgnoresQuit, Daemon::IgnoresQuitAndTerm] {
        let tmp = tempfile::tempdir().unwrap();
        let control = fake_mps_daemon(tmp.path(), behaviour);
        let mut s = settings(tmp.path(), control);
        s.command_timeout = Duration::from_millis(300);
        let sup = MpsSupervisor::new(s);
        sup.start("c", &gpus(&["GPU-a"]), &MpsLimits::default())
            .await
            .unwrap();
        let pids = daemon_pids(&sup, "c");
        assert_eq!(pids.len(), 1, "{behaviour:?}: one daemon process");
        sup.stop("c").await.unwrap();
        assert!(
            !sup.procs.alive(pids[0]),
            "{behaviour:?}: the daemon is gone"
        );
        assert_eq!(recorded(tmp.path()).last().unwrap(), "cmd quit");
        assert!(!sup.dirs("c").unwrap().root.exists());
    }
}

#[tokio::test]
async fn an_honest_daemon_is_not_signalled_and_orphans_are_found_by_process() {
    let tmp = tempfile::tempdir().unwrap();
    let control = fake_mps_daemon(tmp.path(), Daemon::Honest);
    let sup = MpsSupervisor::new(settings(tmp.path(), control));
    sup.start("c", &gpus(&["GPU-a"]), &MpsLimits::default())
        .await
        .unwrap();
    let pid = daemon_pids(&sup, "c")[0];
    sup.stop("c").await.unwrap();
    assert!(!sup.procs.alive(pid));

    // A daemon whose directories were removed is still found, and stopped, by process.
    sup.start("orphan", &gpus(&["GPU-a"]), &MpsLimits::default())
        .await
        .unwrap();
    let pid = daemon_pids(&sup, "orphan")[0];
    let dirs = sup.dirs("orphan").unwrap();
    // The stand-in lives on without its pipe while `<dir>/stay` exists.
    std::fs::write(tmp.path().join("stay"), "").unwrap();
    assert_eq!(sup.daemon_claims(), ["orphan"]);
    std::fs::remove_dir_all(&dirs.root).unwrap();
    assert!(sup.claim_dirs().unwrap().is_empty());
    assert_eq!(sup.daemon_claims(), ["orphan"]);
    sup.stop("orphan").await.unwrap();
    assert!(!sup.procs.alive(pid));
    assert!(sup.daemon_claims().is_empty());
}
