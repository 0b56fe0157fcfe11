//! Component tests of per-pod GPU memory limits in the prepare state machine: fixed
//! claims with consumed capacity, the dgx-h100 fixture inventory, a recording fake of the
//! NVML memory-limit seam, a temp cgroup tree, CDI dir and checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::json;
use tokio::sync::watch;

use super::*;
use crate::checkpoint::CheckpointStore;
use crate::claims::FixedClaims;
use crate::inventory::fixtures::dgx_h100;
use crate::sharing::memory_limit::{CHECKPOINT_KEY, Limits, MemoryLimitSettings};
use crate::sharing::memory_limit_tests::FakeLimits;
use crate::sharing::{
    ComputeControl, ComputeMode, ControlError, MpsSettings, MpsSupervisor, TimeSlice,
    TimeSliceControl, TimeSliceState,
};

const DRIVER: &str = "gpu.gpu-dra.dev";
const NODE: &str = "node-a";
const GIB: u64 = 1 << 30;

struct NoHardware;

impl ComputeControl for NoHardware {
    fn set_compute_mode(&self, _: &str, _: ComputeMode) -> Result<(), ControlError> {
        Ok(())
    }
    fn compute_mode(&self, _: &str) -> Result<ComputeMode, ControlError> {
        Ok(ComputeMode::Default)
    }
}

impl TimeSliceControl for NoHardware {
    fn set_time_slice<'a>(
        &'a self,
        _: &'a str,
        _: TimeSlice,
    ) -> futures::future::BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async { Ok(()) })
    }
    fn time_slice<'a>(
        &'a self,
        _: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<TimeSliceState, ControlError>> {
        Box::pin(async { Ok(TimeSliceState::Supported(TimeSlice::Default)) })
    }
}

struct Node {
    dir: tempfile::TempDir,
    fake: Arc<FakeLimits>,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        std::fs::create_dir_all(&proc_root).unwrap();
        std::fs::write(
            proc_root.join("devices"),
            "Character devices:\n195 nvidia-frontend\n237 nvidia-uvm\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("boot_id"), "boot-1\n").unwrap();
        std::fs::create_dir_all(dir.path().join("plugin")).unwrap();
        std::fs::create_dir_all(dir.path().join("cgroup")).unwrap();
        std::fs::write(
            dir.path().join("cgroup/cgroup.controllers"),
            "memory dmem\n",
        )
        .unwrap();
        Self {
            dir,
            fake: Arc::new(FakeLimits::default()),
        }
    }

    fn cgroup_root(&self) -> PathBuf {
        self.dir.path().join("cgroup")
    }

    /// A preparer (as after a plugin start) over this node's files.
    fn preparer(
        &self,
        claims: &[ResourceClaim],
        driver: &str,
        allow: bool,
    ) -> Preparer<FixedClaims> {
        let plugin = self.dir.path().join("plugin");
        let store = CheckpointStore::new(&plugin, &self.dir.path().join("boot_id"));
        let (checkpoint, _task) =
            CheckpointWriter::spawn(store.clone(), store.load().unwrap().checkpoint);
        let mps = MpsSupervisor::new(MpsSettings {
            control_path: self.dir.path().join("no-mps-control"),
            root_dir: plugin.join("mps"),
            ready_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            private_shm: None,
        });
        let sharing = SharingManager::new(Arc::new(NoHardware), Arc::new(NoHardware), mps);
        let mut fixed = FixedClaims::new();
        for c in claims {
            fixed.insert(c.clone());
        }
        let (_tx, inventory) = watch::channel(dgx_h100());
        let config = PreparerConfig {
            driver_name: DRIVER.into(),
            node_name: NODE.into(),
            cdi_root: self.dir.path().join("cdi"),
            proc_root: self.dir.path().join("proc"),
        };
        let limiter = MemoryLimiter::new(
            Some(self.fake.clone()),
            driver,
            MemoryLimitSettings {
                cgroup_root: self.cgroup_root(),
                allow_scheduling_only: allow,
            },
        );
        Preparer::new(config, fixed, inventory, sharing, checkpoint)
            .with_memory_limits(Arc::new(limiter))
    }

    fn pod_cgroup(&self, uid: &str) -> PathBuf {
        let dir = self
            .cgroup_root()
            .join(format!("kubepods/besteffort/pod{uid}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn limit(&self, gpu: &str, cgroup: &Path) -> Option<Limits> {
        self.fake
            .limits
            .lock()
            .unwrap()
            .get(&(gpu.to_owned(), cgroup.to_owned()))
            .copied()
    }
}

fn share_claim(name: &str, memory: &str, pods: &[&str]) -> ResourceClaim {
    let reserved: Vec<_> = pods
        .iter()
        .map(|p| json!({"resource": "pods", "name": format!("pod-{p}"), "uid": p}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "uid": format!("uid-{name}")},
        "spec": {"devices": {"requests": []}},
        "status": {
            "allocation": {"devices": {"results": [{
                "request": "gpu", "driver": DRIVER, "pool": NODE, "device": "gpu-0",
                "shareID": format!("share-{name}"), "consumedCapacity": {"memory": memory}}]}},
            "reservedFor": reserved,
        },
    }))
    .unwrap()
}

fn cref(name: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

#[tokio::test]
async fn two_shares_get_one_limit_each_on_their_pods_and_lose_it_at_unprepare() {
    let node = Node::new();
    let gpu = dgx_h100().gpus[0].uuid.clone();
    let claims = [
        share_claim("tgi-a", "18Gi", &["p1"]),
        share_claim("tgi-b", "20Gi", &["p2"]),
    ];
    let (cg1, cg2) = (node.pod_cgroup("p1"), node.pod_cgroup("p2"));
    let preparer = node.preparer(&claims, "615.71.09", false);
    preparer.prepare_claim(&cref("tgi-a")).await.unwrap();
    preparer.prepare_claim(&cref("tgi-b")).await.unwrap();
    assert_eq!(
        node.limit(&gpu, &cg1),
        Some(Limits {
            soft: 18 * GIB,
            hard: 18 * GIB
        })
    );
    assert_eq!(
        node.limit(&gpu, &cg2),
        Some(Limits {
            soft: 20 * GIB,
            hard: 20 * GIB
        })
    );

    // The limit is recorded, so a restarted plugin still clears it at unprepare.
    let entry = preparer.checkpoint().snapshot().claims["uid-tgi-a"].clone();
    assert_eq!(
        entry.extra[CHECKPOINT_KEY]["applied"][0]["cgroup"],
        json!(cg1)
    );
    drop(preparer);
    let restarted = node.preparer(&claims, "615.71.09", false);
    restarted.recover().await;
    assert_eq!(
        node.limit(&gpu, &cg1),
        Some(Limits {
            soft: 18 * GIB,
            hard: 18 * GIB
        })
    );
    restarted.unprepare_claim(&cref("tgi-a")).await.unwrap();
    assert_eq!(node.limit(&gpu, &cg1), None);
    assert!(
        node.limit(&gpu, &cg2).is_some(),
        "the other pod keeps its limit"
    );

    // The pod's cgroup went first: counts as cleared.
    std::fs::remove_dir(&cg2).unwrap();
    restarted.unprepare_claim(&cref("tgi-b")).await.unwrap();
    assert!(restarted.checkpoint().snapshot().claims.is_empty());
}

#[tokio::test]
async fn a_node_without_limit_support_refuses_shares_unless_scheduling_only_is_allowed() {
    let node = Node::new();
    let claims = [share_claim("tgi-a", "18Gi", &["p1"])];
    node.pod_cgroup("p1");
    let strict = node.preparer(&claims, "570.124.06", false);
    let err = strict.prepare_claim(&cref("tgi-a")).await.unwrap_err();
    let text = error_chain(&err);
    assert!(
        text.contains("r615")
            && text.contains("gpu-0")
            && text.contains("--allow-scheduling-only-shares"),
        "{text}"
    );
    assert!(strict.checkpoint().snapshot().claims.is_empty());
    drop(strict);

    let lenient = node.preparer(&claims, "570.124.06", true);
    lenient.prepare_claim(&cref("tgi-a")).await.unwrap();
    let entry = lenient.checkpoint().snapshot().claims["uid-tgi-a"].clone();
    let reason = entry.extra[CHECKPOINT_KEY]["schedulingOnly"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("upgrade the driver"), "{reason}");
    assert!(node.fake.limits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_limit_fails_the_claim_and_leaves_nothing() {
    let node = Node::new();
    let claims = [
        share_claim("tgi-a", "18Gi", &["p1"]),
        share_claim("shared", "18Gi", &["p2", "p3"]),
    ];
    let preparer = node.preparer(&claims, "615.71.09", false);

    // Pod cgroup not there yet (kubelet still creating it): failed, retried later.
    let err = preparer.prepare_claim(&cref("tgi-a")).await.unwrap_err();
    assert!(
        error_chain(&err).contains("no cgroup of pod ns/pod-p1"),
        "{}",
        error_chain(&err)
    );
    let cg = node.pod_cgroup("p1");

    *node.fake.fail_set.lock().unwrap() = Some(nvml_wrapper::error::NvmlError::NoPermission);
    let err = preparer.prepare_claim(&cref("tgi-a")).await.unwrap_err();
    assert!(
        error_chain(&err).contains(&cg.display().to_string()),
        "{}",
        error_chain(&err)
    );
    assert!(preparer.checkpoint().snapshot().claims.is_empty());
    assert!(
        !node
            .dir
            .path()
            .join("cdi")
            .join(format!("{}.json", "x"))
            .exists()
    );
    assert!(
        cdi::list_specs(&node.dir.path().join("cdi"))
            .map(|(s, _)| s.is_empty())
            .unwrap_or(true)
    );

    // The retry succeeds.
    preparer.prepare_claim(&cref("tgi-a")).await.unwrap();
    assert!(node.limit(&dgx_h100().gpus[0].uuid, &cg).is_some());

    // A claim shared by two pods is refused enforcement, said clearly.
    let err = preparer.prepare_claim(&cref("shared")).await.unwrap_err();
    assert!(
        error_chain(&err).contains("shared by 2 pods"),
        "{}",
        error_chain(&err)
    );
}

#[tokio::test]
async fn limits_of_claims_rebuilt_after_a_lost_checkpoint_are_still_cleared() {
    let node = Node::new();
    let gpu = dgx_h100().gpus[0].uuid.clone();
    let claims = [share_claim("tgi-a", "18Gi", &["p1"])];
    let cg = node.pod_cgroup("p1");
    let preparer = node.preparer(&claims, "615.71.09", false);
    preparer.prepare_claim(&cref("tgi-a")).await.unwrap();
    drop(preparer);
    std::fs::remove_file(
        node.dir
            .path()
            .join("plugin")
            .join(crate::checkpoint::CHECKPOINT_FILE_NAME),
    )
    .unwrap();

    let restarted = node.preparer(&claims, "615.71.09", false);
    restarted.recover_after_loss(Some(&claims)).await;
    assert!(
        node.limit(&gpu, &cg).is_some(),
        "recovery keeps the running pod's limit"
    );
    let entry = restarted.checkpoint().snapshot().claims["uid-tgi-a"].clone();
    assert!(entry.extra.contains_key(CHECKPOINT_KEY), "{entry:?}");
    restarted.unprepare_claim(&cref("tgi-a")).await.unwrap();
    assert_eq!(node.limit(&gpu, &cg), None);
}
