//! Tests of the share daemons' view of the disk and the container edits of a namespace.

use std::time::Duration;

use super::*;
use crate::sharing::mps::MpsSettings;

fn shares(root: &std::path::Path, private_shm: bool) -> ComputeShares {
    let mps = MpsSupervisor::new(MpsSettings {
        control_path: "/nonexistent/nvidia-cuda-mps-control".into(),
        root_dir: root.to_owned(),
        ready_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_secs(1),
        private_shm: private_shm.then(|| crate::sharing::PrivateShm {
            unshare_path: "unshare".into(),
            shell_path: "/bin/sh".into(),
        }),
    });
    ComputeShares {
        mps,
        support: ComputeSupport::detect("615.71.09"),
        allow_scheduling_only: false,
    }
}

#[test]
fn claims_of_a_daemon_are_its_namespace_sockets_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let s = shares(dir.path(), false);
    assert!(s.gpus_on_disk().is_empty());
    for ns in ["default", "uid-a", "uid-b"] {
        std::fs::create_dir_all(dir.path().join("GPU-1/pipe/shares").join(ns)).unwrap();
    }
    assert_eq!(s.gpus_on_disk(), ["GPU-1"]);
    assert_eq!(s.namespaces_on_disk("GPU-1"), ["uid-a", "uid-b"]);
    assert!(s.namespaces_on_disk("GPU-2").is_empty());
}

#[test]
fn a_claim_sees_only_its_namespace_socket_directory() {
    let dir = tempfile::tempdir().unwrap();
    let edits = shares(dir.path(), true).edits("GPU-1", "uid-a").unwrap();
    assert_eq!(
        edits.env,
        [(
            "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
            "/tmp/nvidia-mps".to_owned()
        )]
    );
    assert_eq!(
        edits.mounts[0].host_path,
        dir.path().join("GPU-1/pipe/shares/uid-a")
    );
    assert_eq!(edits.mounts[0].container_path, "/tmp/nvidia-mps");
    assert_eq!(edits.mounts[1].host_path, dir.path().join("GPU-1/shm"));
    assert_eq!(
        shares(dir.path(), false)
            .edits("GPU-1", "uid-a")
            .unwrap()
            .mounts
            .len(),
        1
    );
}

#[test]
fn the_daemon_starts_with_protocol_three_in_multi_user_mode() {
    let dir = tempfile::tempdir().unwrap();
    let base = shares(dir.path(), false).mps;
    let mps = base.with_root(
        dir.path().join("mps-shares"),
        v3::DAEMON_ARGS.iter().map(|s| (*s).to_owned()).collect(),
    );
    let dirs = mps.dirs("GPU-1").unwrap();
    let (_, args) = mps.launch_command(&dirs);
    assert_eq!(args, ["-d", "-p", "3", "-m"]);
    assert_eq!(dirs.pipe, dir.path().join("mps-shares/GPU-1/pipe"));
}
