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

/// Compute mode and time slice that take every setting (no hardware).
struct NoHardware;

impl crate::sharing::ComputeControl for NoHardware {
    fn set_compute_mode(
        &self,
        _gpu_uuid: &str,
        _mode: ComputeMode,
    ) -> Result<(), crate::sharing::ControlError> {
        Ok(())
    }
    fn compute_mode(&self, _gpu_uuid: &str) -> Result<ComputeMode, crate::sharing::ControlError> {
        Ok(ComputeMode::Default)
    }
}

impl crate::sharing::TimeSliceControl for NoHardware {
    fn set_time_slice<'a>(
        &'a self,
        _gpu_uuid: &'a str,
        _interval: crate::sharing::TimeSlice,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::sharing::ControlError>> {
        Box::pin(async { Ok(()) })
    }
    fn time_slice<'a>(
        &'a self,
        _gpu_uuid: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<crate::sharing::TimeSliceState, crate::sharing::ControlError>,
    > {
        Box::pin(async {
            Ok(crate::sharing::TimeSliceState::Supported(
                crate::sharing::TimeSlice::Default,
            ))
        })
    }
}

#[tokio::test]
async fn a_policy_claim_is_refused_on_a_gpu_whose_shares_run_under_its_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let hw = std::sync::Arc::new(NoHardware);
    let manager = SharingManager::new(hw.clone(), hw, shares(dir.path(), false).mps)
        .with_compute_shares(ComputeShareSettings {
            root_dir: dir.path().join("mps-shares"),
            driver_version: "615.71.09".into(),
            allow_scheduling_only: false,
        });
    std::fs::create_dir_all(dir.path().join("mps-shares/GPU-1/pipe/shares/uid-share")).unwrap();
    let gpus = ["GPU-1".to_owned()];
    let err = manager
        .apply(&gpus, "uid-ts", Some(Policy::Exclusive))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, SharingError::Conflict(_))
            && text.contains("GPU-1")
            && text.contains("uid-share"),
        "{text}"
    );
    // Another GPU, or a claim without a policy, is not refused.
    let other = ["GPU-2".to_owned()];
    assert!(
        manager
            .apply(
                &other,
                "uid-ts",
                Some(Policy::TimeSlicing {
                    interval: crate::sharing::TimeSlice::Default
                })
            )
            .await
            .is_ok()
    );
    assert!(manager.apply(&gpus, "uid-plain", None).await.is_ok());
}
