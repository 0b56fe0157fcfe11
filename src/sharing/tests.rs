//! Component tests of the sharing manager over recording doubles and a stand-in MPS daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::mps::test_support::{fake_mps_control, recorded};
use super::*;

/// Records every call; fails or refuses on chosen GPUs.
#[derive(Default)]
struct Hardware {
    events: Mutex<Vec<String>>,
    modes: Mutex<BTreeMap<String, ComputeMode>>,
    slices: Mutex<BTreeMap<String, TimeSlice>>,
    fail_set: Mutex<BTreeSet<String>>,
    /// GPUs whose setters report success and change nothing.
    no_effect: Mutex<BTreeSet<String>>,
    no_time_slice: BTreeSet<String>,
    barrier: Option<tokio::sync::Barrier>,
}

impl Hardware {
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
    fn fail(&self, gpu: &str) {
        self.fail_set.lock().unwrap().insert(gpu.to_owned());
    }
    fn heal(&self) {
        self.fail_set.lock().unwrap().clear();
        self.no_effect.lock().unwrap().clear();
    }
    fn ignore_sets(&self, gpu: &str) {
        self.no_effect.lock().unwrap().insert(gpu.to_owned());
    }
    fn ignores(&self, gpu: &str) -> bool {
        self.no_effect.lock().unwrap().contains(gpu)
    }
    /// Leaves `gpu` as a crash or a manual change would: no claim, non-default settings.
    fn make_stale(&self, gpu: &str, mode: ComputeMode, slice: TimeSlice) {
        self.modes.lock().unwrap().insert(gpu.to_owned(), mode);
        self.slices.lock().unwrap().insert(gpu.to_owned(), slice);
    }
    fn failing(&self, gpu: &str) -> bool {
        self.fail_set.lock().unwrap().contains(gpu)
    }
    fn nvml_error(gpu: &str) -> ControlError {
        ControlError::CommandFailed {
            command: "injected".into(),
            gpu_uuid: gpu.into(),
            status: "exit status: 1".into(),
            stderr: "injected failure".into(),
        }
    }
}

impl ComputeControl for Hardware {
    fn set_compute_mode(&self, gpu_uuid: &str, mode: ComputeMode) -> Result<(), ControlError> {
        if self.failing(gpu_uuid) {
            return Err(Self::nvml_error(gpu_uuid));
        }
        self.events
            .lock()
            .unwrap()
            .push(format!("mode {gpu_uuid} {mode:?}"));
        if !self.ignores(gpu_uuid) {
            self.modes.lock().unwrap().insert(gpu_uuid.to_owned(), mode);
        }
        Ok(())
    }
    fn compute_mode(&self, gpu_uuid: &str) -> Result<ComputeMode, ControlError> {
        Ok(self
            .modes
            .lock()
            .unwrap()
            .get(gpu_uuid)
            .copied()
            .unwrap_or(ComputeMode::Default))
    }
}

impl TimeSliceControl for Hardware {
    fn set_time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
        interval: TimeSlice,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            if let Some(barrier) = &self.barrier {
                barrier.wait().await;
            }
            if self.failing(gpu_uuid) {
                return Err(Self::nvml_error(gpu_uuid));
            }
            self.events
                .lock()
                .unwrap()
                .push(format!("slice {gpu_uuid} {interval:?}"));
            if !self.ignores(gpu_uuid) {
                self.slices
                    .lock()
                    .unwrap()
                    .insert(gpu_uuid.to_owned(), interval);
            }
            Ok(())
        })
    }
    fn time_slice<'a>(
        &'a self,
        gpu_uuid: &'a str,
    ) -> BoxFuture<'a, Result<TimeSliceState, ControlError>> {
        Box::pin(async move {
            if self.no_time_slice.contains(gpu_uuid) {
                return Ok(TimeSliceState::Unsupported {
                    detail: "Timeslice: Not Supported".into(),
                });
            }
            let current = self
                .slices
                .lock()
                .unwrap()
                .get(gpu_uuid)
                .copied()
                .unwrap_or(TimeSlice::Default);
            Ok(TimeSliceState::Supported(current))
        })
    }
}

fn manager(dir: &Path, hw: &Arc<Hardware>) -> SharingManager {
    let control = fake_mps_control(dir, None);
    let mps = MpsSupervisor::new(MpsSettings {
        control_path: control,
        root_dir: dir.join("plugin/mps"),
        ready_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(10),
        private_shm: None,
    });
    SharingManager::new(hw.clone(), hw.clone(), mps)
}

fn gpus(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn long() -> Option<Policy> {
    Some(Policy::TimeSlicing {
        interval: TimeSlice::Long,
    })
}

fn mps_policy() -> Option<Policy> {
    Some(Policy::Mps(MpsLimits {
        active_thread_percentage: Some(40),
        pinned_memory_limit_bytes: Some(16 << 30),
        per_device_pinned_memory_limit_bytes: [("GPU-b".to_owned(), 8 << 30)].into(),
    }))
}

#[tokio::test]
async fn time_slicing_is_probed_set_shared_and_restored_by_last_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    let edits = m.apply(&gpus(&["GPU-a"]), "c1", long()).await.unwrap();
    assert_eq!(edits, ClaimEdits::default());
    m.apply(&gpus(&["GPU-a"]), "c2", long()).await.unwrap();
    m.apply(&gpus(&["GPU-a"]), "c3", None).await.unwrap();
    assert_eq!(hw.events(), ["slice GPU-a Long"]);
    m.release("c1").await.unwrap();
    m.release("c3").await.unwrap();
    assert_eq!(
        hw.events(),
        ["slice GPU-a Long"],
        "c2 still holds the policy"
    );
    m.release("c2").await.unwrap();
    assert_eq!(hw.events(), ["slice GPU-a Long", "slice GPU-a Default"]);
    assert!(m.entries().is_empty());
}

#[tokio::test]
async fn no_policy_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    m.apply(&gpus(&["GPU-a"]), "c1", None).await.unwrap();
    m.release("c1").await.unwrap();
    assert!(hw.events().is_empty());
}

#[tokio::test]
async fn unsupported_time_slice_fails_claim_clearly_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware {
        no_time_slice: ["GPU-t4".to_owned()].into(),
        ..Hardware::default()
    });
    let m = manager(tmp.path(), &hw);
    let err = m.apply(&gpus(&["GPU-t4"]), "c1", long()).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, SharingError::TimeSliceUnsupported { .. }),
        "{text}"
    );
    assert!(
        text.contains("GPU-t4") && text.contains("c1") && text.contains("remove the TimeSlicing"),
        "{text}"
    );
    assert!(hw.events().is_empty());
    assert!(m.entries().is_empty());
}

#[tokio::test]
async fn failure_on_second_gpu_rolls_back_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    hw.fail("GPU-b");
    let m = manager(tmp.path(), &hw);
    let err = m
        .apply(&gpus(&["GPU-b", "GPU-a"]), "c1", long())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("GPU-b") && text.contains("setting time slice Long"),
        "{text}"
    );
    assert_eq!(hw.events(), ["slice GPU-a Long", "slice GPU-a Default"]);
    assert!(m.entries().is_empty());
    // The GPU is free again.
    hw.heal();
    m.apply(&gpus(&["GPU-a", "GPU-b"]), "c2", Some(Policy::Exclusive))
        .await
        .unwrap();
}

#[tokio::test]
async fn conflict_is_refused_before_any_hardware_change() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    m.apply(&gpus(&["GPU-b"]), "holder", long()).await.unwrap();
    let err = m
        .apply(&gpus(&["GPU-a", "GPU-b"]), "late", mps_policy())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SharingError::Conflict(_)), "{text}");
    assert!(
        text.contains("claim holder with TimeSlicing (interval Long)") && text.contains("late"),
        "{text}"
    );
    assert_eq!(hw.events(), ["slice GPU-b Long"]);
    assert!(recorded(tmp.path()).is_empty(), "no MPS daemon started");
}

#[tokio::test]
async fn exclusive_sets_and_restores_compute_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    m.apply(&gpus(&["GPU-a"]), "c1", Some(Policy::Exclusive))
        .await
        .unwrap();
    assert!(m.apply(&gpus(&["GPU-a"]), "c2", None).await.is_err());
    m.release("c1").await.unwrap();
    assert_eq!(
        hw.events(),
        ["mode GPU-a ExclusiveProcess", "mode GPU-a Default"]
    );
}

#[tokio::test]
async fn mps_sets_exclusive_process_starts_daemon_and_tears_down() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    let edits = m
        .apply(&gpus(&["GPU-b", "GPU-a"]), "c1", mps_policy())
        .await
        .unwrap();
    assert_eq!(
        hw.events(),
        ["mode GPU-a ExclusiveProcess", "mode GPU-b ExclusiveProcess"]
    );
    assert!(edits.env.contains(&(
        "CUDA_MPS_PIPE_DIRECTORY".to_owned(),
        "/tmp/nvidia-mps".to_owned()
    )));
    let pipe = tmp.path().join("plugin/mps/c1/pipe");
    assert_eq!(edits.mounts[0].host_path, pipe);
    let lines = recorded(tmp.path());
    assert!(lines[0].contains("visible=GPU-a,GPU-b"), "{lines:?}");
    assert_eq!(
        lines[1..],
        [
            "cmd set_default_active_thread_percentage 40",
            "cmd get_default_active_thread_percentage",
            "cmd set_default_device_pinned_mem_limit GPU-a 16384M",
            "cmd get_default_device_pinned_mem_limit GPU-a",
            "cmd set_default_device_pinned_mem_limit GPU-b 8192M",
            "cmd get_default_device_pinned_mem_limit GPU-b",
        ]
    );
    // Preparing again is idempotent: same edits, the live daemon is kept.
    let again = m
        .apply(&gpus(&["GPU-a", "GPU-b"]), "c1", mps_policy())
        .await
        .unwrap();
    assert_eq!(again, edits);
    assert_eq!(
        recorded(tmp.path())
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        1
    );
    assert_eq!(hw.events().len(), 2);

    m.release("c1").await.unwrap();
    assert_eq!(
        recorded(tmp.path())
            .iter()
            .filter(|l| *l == "cmd quit")
            .count(),
        1
    );
    assert!(!tmp.path().join("plugin/mps/c1").exists());
    assert_eq!(
        hw.events()[2..],
        ["mode GPU-a Default", "mode GPU-b Default"]
    );
}

#[tokio::test]
async fn mps_daemon_failure_rolls_back_compute_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    let bad = Some(Policy::Mps(MpsLimits {
        pinned_memory_limit_bytes: Some(1 << 30),
        ..MpsLimits::default()
    }));
    let err = m
        .apply(&gpus(&["GPU-unknown"]), "c1", bad)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SharingError::Mps(MpsError::CommandFailed { .. })),
        "{err}"
    );
    assert_eq!(
        hw.events(),
        [
            "mode GPU-unknown ExclusiveProcess",
            "mode GPU-unknown Default"
        ]
    );
    assert!(m.entries().is_empty());
}

#[tokio::test]
async fn invalid_mps_limits_are_refused_before_hardware() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    let bad = Some(Policy::Mps(MpsLimits {
        active_thread_percentage: Some(150),
        ..MpsLimits::default()
    }));
    assert!(m.apply(&gpus(&["GPU-a"]), "c1", bad).await.is_err());
    assert!(
        m.apply(&[], "c1", long()).await.is_err(),
        "a policy needs a GPU"
    );
    assert!(hw.events().is_empty());
}

#[tokio::test]
async fn failed_release_keeps_claim_for_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    m.apply(&gpus(&["GPU-a", "GPU-b"]), "c1", long())
        .await
        .unwrap();
    hw.fail("GPU-b");
    assert!(m.release("c1").await.is_err());
    assert_eq!(m.entries().len(), 1, "only GPU-b still records the claim");
    hw.heal();
    m.release("c1").await.unwrap();
    assert!(m.entries().is_empty());
    assert_eq!(
        hw.events()
            .iter()
            .filter(|e| e.ends_with("Default"))
            .count(),
        2
    );
}

#[tokio::test]
async fn different_gpus_apply_in_parallel() {
    let tmp = tempfile::tempdir().unwrap();
    // Each set waits until the other is also in progress: a node-wide lock would deadlock.
    let hw = Arc::new(Hardware {
        barrier: Some(tokio::sync::Barrier::new(2)),
        ..Hardware::default()
    });
    let m = manager(tmp.path(), &hw);
    let (a, b) = (gpus(&["GPU-a"]), gpus(&["GPU-b"]));
    let both = futures::future::join(m.apply(&a, "c1", long()), m.apply(&b, "c2", long()));
    let (r1, r2) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("applies on different GPUs must not wait for each other");
    r1.unwrap();
    r2.unwrap();
}

#[tokio::test]
async fn restore_rebuilds_ledger_and_recovers_mps_daemons() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let first = manager(tmp.path(), &hw);
    first
        .apply(&gpus(&["GPU-a"]), "live", mps_policy_a())
        .await
        .unwrap();
    first
        .apply(&gpus(&["GPU-b"]), "dead", mps_policy_b())
        .await
        .unwrap();
    first.apply(&gpus(&["GPU-c"]), "ts", long()).await.unwrap();
    let checkpoint = first.entries();
    // "dead" lost its daemon; an orphan directory exists for a claim the checkpoint lacks.
    std::fs::remove_file(tmp.path().join("plugin/mps/dead/pipe/control")).unwrap();
    std::fs::create_dir_all(tmp.path().join("plugin/mps/orphan/pipe")).unwrap();

    let second = manager(tmp.path(), &hw);
    second.restore(checkpoint.clone());
    assert_eq!(second.entries(), checkpoint);
    let report = second.recover_mps().await;
    assert_eq!(report.adopted, ["live"]);
    assert_eq!(report.restarted, ["dead"]);
    assert_eq!(report.stopped_orphans, ["orphan"]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // The restored ledger still enforces the rules and restores on release.
    assert!(
        second
            .apply(&gpus(&["GPU-c"]), "other", Some(Policy::Exclusive))
            .await
            .is_err()
    );
    second.release("ts").await.unwrap();
    assert_eq!(hw.events().last().unwrap(), "slice GPU-c Default");
}

fn mps_policy_a() -> Option<Policy> {
    Some(Policy::Mps(MpsLimits {
        active_thread_percentage: Some(25),
        ..MpsLimits::default()
    }))
}

fn mps_policy_b() -> Option<Policy> {
    Some(Policy::Mps(MpsLimits {
        pinned_memory_limit_bytes: Some(2 << 30),
        ..MpsLimits::default()
    }))
}

#[tokio::test]
async fn compute_mode_that_does_not_take_fails_the_claim_and_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    hw.ignore_sets("GPU-b");
    let err = m
        .apply(&gpus(&["GPU-a", "GPU-b"]), "c1", Some(Policy::Exclusive))
        .await
        .unwrap_err();
    let SharingError::NotApplied {
        ref gpu_uuid,
        setting,
        ref wanted,
        ref read,
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(
        (gpu_uuid.as_str(), setting, wanted.as_str(), read.as_str()),
        ("GPU-b", "compute mode", "ExclusiveProcess", "Default")
    );
    assert!(
        err.to_string().contains("nvidia-smi -q -d COMPUTE"),
        "{err}"
    );
    assert_eq!(hw.compute_mode("GPU-a").unwrap(), ComputeMode::Default);
    assert!(
        hw.events().contains(&"mode GPU-a Default".to_owned()),
        "{:?}",
        hw.events()
    );
    assert!(m.entries().is_empty());
    hw.heal();
    m.apply(&gpus(&["GPU-a", "GPU-b"]), "c1", Some(Policy::Exclusive))
        .await
        .unwrap();
    assert_eq!(
        hw.compute_mode("GPU-b").unwrap(),
        ComputeMode::ExclusiveProcess
    );
}

#[tokio::test]
async fn time_slice_that_does_not_take_fails_the_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    hw.ignore_sets("GPU-a");
    let err = m.apply(&gpus(&["GPU-a"]), "c1", long()).await.unwrap_err();
    assert!(
        matches!(&err, SharingError::NotApplied { setting: "time slice", wanted, read, .. }
            if wanted == "Long" && read == "Default"),
        "{err}"
    );
    assert!(
        err.to_string().contains("GPU-a") && err.to_string().contains("c1"),
        "{err}"
    );
    assert!(m.entries().is_empty());
    // Releasing a policy the GPU does not give back fails too, and keeps the claim.
    hw.heal();
    m.apply(&gpus(&["GPU-a"]), "c1", long()).await.unwrap();
    hw.ignore_sets("GPU-a");
    let err = m.release("c1").await.unwrap_err();
    assert!(
        matches!(&err, SharingError::NotApplied { read, .. } if read == "Long"),
        "{err}"
    );
    assert_eq!(m.entries().len(), 1);
    hw.heal();
    m.release("c1").await.unwrap();
    assert!(m.entries().is_empty());
}

#[tokio::test]
async fn stale_settings_of_a_gpu_no_claim_holds_are_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    // A claim with no sharing config on a GPU left in EXCLUSIVE_PROCESS and time slice Long.
    hw.make_stale("GPU-a", ComputeMode::ExclusiveProcess, TimeSlice::Long);
    m.apply(&gpus(&["GPU-a"]), "plain", None).await.unwrap();
    assert_eq!(hw.events(), ["mode GPU-a Default", "slice GPU-a Default"]);
    // A time-sliced claim gets its interval and the default compute mode.
    hw.make_stale("GPU-b", ComputeMode::ExclusiveProcess, TimeSlice::Short);
    m.apply(&gpus(&["GPU-b"]), "ts", long()).await.unwrap();
    assert_eq!(hw.events()[2..], ["slice GPU-b Long", "mode GPU-b Default"]);
    // An Exclusive claim gets EXCLUSIVE_PROCESS and the default time slice.
    hw.make_stale("GPU-c", ComputeMode::Default, TimeSlice::Medium);
    m.apply(&gpus(&["GPU-c"]), "ex", Some(Policy::Exclusive))
        .await
        .unwrap();
    assert_eq!(
        hw.events()[4..],
        ["mode GPU-c ExclusiveProcess", "slice GPU-c Default"]
    );
}

#[tokio::test]
async fn a_gpu_another_claim_holds_is_never_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    m.apply(&gpus(&["GPU-a"]), "first", None).await.unwrap();
    hw.make_stale("GPU-a", ComputeMode::ExclusiveProcess, TimeSlice::Long);
    m.apply(&gpus(&["GPU-a"]), "second", None).await.unwrap();
    assert!(hw.events().is_empty(), "{:?}", hw.events());
}

#[tokio::test]
async fn a_reset_that_does_not_take_fails_a_plain_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let hw = Arc::new(Hardware::default());
    let m = manager(tmp.path(), &hw);
    hw.make_stale("GPU-a", ComputeMode::ExclusiveProcess, TimeSlice::Default);
    hw.ignore_sets("GPU-a");
    let err = m.apply(&gpus(&["GPU-a"]), "plain", None).await.unwrap_err();
    assert!(
        matches!(&err, SharingError::NotApplied { wanted, read, .. }
            if wanted == "Default" && read == "ExclusiveProcess"),
        "{err}"
    );
    assert!(m.entries().is_empty());
}
