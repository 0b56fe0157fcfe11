use std::collections::BTreeMap;

use super::*;
use crate::checkpoint::{ClaimEntry, ClaimState, PreparedDeviceRecord};

fn checkpoint_with(uid: &str, gpu: &str, device: &str) -> Checkpoint {
    let mut checkpoint = Checkpoint::new("boot");
    checkpoint.claims.insert(
        uid.into(),
        ClaimEntry {
            state: ClaimState::PrepareCompleted,
            namespace: "ml".into(),
            name: "trainer-gpu".into(),
            devices: vec![PreparedDeviceRecord {
                pool: "node-a".into(),
                device: device.into(),
                request_names: vec!["gpu".into()],
                gpu_uuid: gpu.into(),
                mig_uuid: None,
                cdi_device_ids: vec![],
                sharing: None,
                share_id: None,
            }],
            extra: BTreeMap::new(),
        },
    );
    checkpoint
}

fn claim() -> ClaimRef {
    ClaimRef {
        namespace: "ml".into(),
        name: "trainer-gpu".into(),
        uid: "uid-1".into(),
    }
}

#[test]
fn unhealthy_gpu_posts_on_the_node_and_on_each_claim_holding_it() {
    let node = node_reference("node-a");
    let checkpoint = checkpoint_with("uid-1", "GPU-1", "gpu-1");
    let notice = Notice::DeviceUnhealthy {
        gpu_uuid: "GPU-1".into(),
        xid: 79,
        message: "GPU has fallen off the bus".into(),
    };
    let out = postings(&notice, &node, &checkpoint);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        node.uid.as_deref(),
        Some("node-a"),
        "kubectl describe node finds it"
    );
    assert_eq!(out[0].regarding, node);
    assert_eq!(out[0].reason, "DeviceUnhealthy");
    assert!(out[0].warning);
    assert_eq!(out[1].regarding, claim_reference(&claim()));
    assert_eq!(out[1].related.as_ref(), Some(&node));
    assert!(out[1].note.contains("gpu-1"));

    let other = Notice::DeviceUnhealthy {
        gpu_uuid: "GPU-2".into(),
        xid: 48,
        message: "double-bit ECC".into(),
    };
    assert_eq!(
        postings(&other, &node, &checkpoint).len(),
        1,
        "no claim on GPU-2"
    );
}

#[test]
fn claim_events_regard_the_claim_and_the_node() {
    let node = node_reference("node-a");
    let checkpoint = Checkpoint::new("boot");
    for (notice, reason) in [
        (
            Notice::PolicyConflict {
                claim: claim(),
                message: "GPU-1 is held by claim uid-0 under MPS".into(),
            },
            "PolicyConflict",
        ),
        (
            Notice::MpsDaemonFailed {
                claim: claim(),
                action: "PrepareClaim",
                message: "nvidia-cuda-mps-control -d exited 1".into(),
            },
            "MPSDaemonFailed",
        ),
    ] {
        let out = postings(&notice, &node, &checkpoint);
        assert_eq!(out.len(), 2);
        let claim_ref = claim_reference(&claim());
        assert_eq!(claim_ref.kind.as_deref(), Some("ResourceClaim"));
        assert_eq!(claim_ref.uid.as_deref(), Some("uid-1"));
        assert_eq!(out[0].regarding, claim_ref);
        assert_eq!(out[1].regarding, node);
        assert_eq!(out[1].related.as_ref(), Some(&claim_ref));
        for p in &out {
            assert_eq!(p.reason, reason);
            assert!(p.warning);
        }
    }
}

#[test]
fn restarted_daemon_names_its_claim_from_the_checkpoint() {
    let node = node_reference("node-a");
    let checkpoint = checkpoint_with("uid-1", "GPU-1", "gpu-1");
    let out = postings(
        &Notice::MpsDaemonRestarted {
            claim_uid: "uid-1".into(),
        },
        &node,
        &checkpoint,
    );
    assert_eq!(out[0].regarding, claim_reference(&claim()));
    assert_eq!(out[0].reason, "MPSDaemonRestarted");
}

#[test]
fn slice_outage_events_are_on_the_node_and_recovery_is_normal() {
    let node = node_reference("node-a");
    let checkpoint = Checkpoint::new("boot");
    let failing = postings(
        &Notice::SlicePublishFailing {
            failing_for_secs: 61,
            error: "forbidden".into(),
        },
        &node,
        &checkpoint,
    );
    assert_eq!(failing[0].reason, "ResourceSlicePublishFailing");
    assert!(failing[0].warning);
    let recovered = postings(
        &Notice::SlicePublishRecovered {
            failed_for_secs: 90,
        },
        &node,
        &checkpoint,
    );
    assert_eq!(recovered[0].reason, "ResourceSlicePublishRecovered");
    assert!(!recovered[0].warning);
}

#[test]
fn long_notes_are_cut_to_what_the_api_server_accepts() {
    let node = node_reference("node-a");
    let notice = Notice::PolicyConflict {
        claim: claim(),
        message: "é".repeat(2000),
    };
    for p in postings(&notice, &node, &Checkpoint::new("boot")) {
        assert!(p.note.len() <= MAX_NOTE);
    }
}

#[test]
fn only_conflicts_and_mps_failures_of_a_claim_are_events() {
    let conflict = crate::sharing::Conflict {
        gpu_uuid: "GPU-1".into(),
        claim_uid: "uid-1".into(),
        requested: "MPS".into(),
        holder_claim: "uid-0".into(),
        holder_policy: "TimeSlicing(Long)".into(),
        rule: "MPS needs the GPU to itself",
    };
    let refused = PrepareError::Sharing(Box::new(SharingError::Conflict(Box::new(conflict))));
    let notice = claim_notice("prepare", &claim(), &refused).expect("conflict notice");
    assert!(
        matches!(&notice, Notice::PolicyConflict { claim: c, message } if c == &claim() && message.contains("uid-0")),
        "{notice:?}"
    );
    let other = PrepareError::Checkpoint(crate::checkpoint::CheckpointError::WriterStopped);
    assert_eq!(
        claim_notice("prepare", &claim(), &other),
        None,
        "a checkpoint error is not an Event"
    );
}
