//! `gpu-dra status`: per GPU and MIG device of one node, the sharing policy in force, the
//! claims and pods holding it and the MPS daemon, as a table or JSON.
//!
//! Owns the report's shape and rendering (pure: [`build`], [`render_table`]). The inputs
//! are read by `run.rs`: the inventory from NVML, the checkpoint file (read only, never
//! moved aside or rewritten: that is the plugin's job) and, when the API server answers,
//! the claims' `status.reservedFor`, and the plugin's health verdicts file ([`verdicts`]).
//! Works while the plugin is down.

pub mod verdicts;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::checkpoint::{Checkpoint, ClaimState, PreparedDeviceRecord};
use crate::health::UnhealthyGpus;
use crate::inventory::Inventory;
use crate::metrics::state::policy_labels;
use crate::sharing::Policy;

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node name (as given), may be empty.
    pub node: String,
    /// The checkpoint file read.
    pub checkpoint: String,
    /// Why the checkpoint could not be read (then no claims are listed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_error: Option<String>,
    /// Why pods could not be looked up in the API server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_error: Option<String>,
    /// Why the health verdicts could not be read (then every GPU shows `Healthy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
    /// Every GPU of the node.
    pub gpus: Vec<GpuStatus>,
}

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    /// DRA device name (`gpu-0`).
    pub device: String,
    /// GPU UUID.
    pub uuid: String,
    /// Product name.
    pub product: String,
    /// `Healthy`, or `Unhealthy` after a critical XID (then its MIG devices are too).
    pub health: String,
    /// The critical XID that made it unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid: Option<u64>,
    /// What the XID means and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_message: Option<String>,
    /// Sharing strategy in force (`None`, `TimeSlicing`, `MPS`, `Exclusive`).
    pub strategy: String,
    /// Time slice interval (TimeSlicing only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub time_slice: String,
    /// Compute mode the policy sets (`Default`, `ExclusiveProcess`).
    pub compute_mode: String,
    /// The claim whose MPS control daemon serves this GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mps_daemon: Option<String>,
    /// Claims holding the whole GPU.
    pub claims: Vec<ClaimHold>,
    /// MIG devices (MIG mode only).
    pub mig_devices: Vec<MigStatus>,
}

/// One MIG device.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigStatus {
    /// DRA device name.
    pub device: String,
    /// MIG device UUID.
    pub uuid: String,
    /// Profile (`1g.10gb`).
    pub profile: String,
    /// GPU instance id (dcgm-exporter's `GPU_I_ID`).
    pub gpu_instance_id: u32,
    /// Claims holding it.
    pub claims: Vec<ClaimHold>,
}

/// A claim holding a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimHold {
    /// `namespace/name`.
    pub claim: String,
    /// Claim UID.
    pub uid: String,
    /// Checkpoint phase.
    pub state: String,
    /// Pods in the claim's `status.reservedFor` (empty when not looked up).
    pub pods: Vec<String>,
}

fn hold(
    uid: &str,
    namespace: &str,
    name: &str,
    state: ClaimState,
    pods: &BTreeMap<String, Vec<String>>,
) -> ClaimHold {
    ClaimHold {
        claim: format!("{namespace}/{name}"),
        uid: uid.to_owned(),
        state: format!("{state:?}"),
        pods: pods.get(uid).cloned().unwrap_or_default(),
    }
}

fn policy_of(record: &PreparedDeviceRecord) -> Option<Policy> {
    record
        .sharing
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The per-GPU rows of `inventory` with the holders recorded in `checkpoint`, the pods
/// by claim UID and the unhealthy GPUs by UUID.
pub fn build(
    inventory: &Inventory,
    checkpoint: &Checkpoint,
    pods: &BTreeMap<String, Vec<String>>,
    unhealthy: &UnhealthyGpus,
) -> Vec<GpuStatus> {
    let mut rows = Vec::new();
    for gpu in &inventory.gpus {
        let mut policy = None;
        let mut mps = None;
        let mut claims = Vec::new();
        let mut migs: Vec<MigStatus> = gpu
            .mig_devices
            .iter()
            .map(|m| MigStatus {
                device: m.device_name(),
                uuid: m.uuid.clone(),
                profile: m.profile.clone(),
                gpu_instance_id: m.gi_id,
                claims: Vec::new(),
            })
            .collect();
        for (uid, entry) in &checkpoint.claims {
            for record in entry.devices.iter().filter(|r| r.gpu_uuid == gpu.uuid) {
                let p = policy_of(record);
                if matches!(p, Some(Policy::Mps(_))) {
                    mps = Some(format!("{}/{}", entry.namespace, entry.name));
                }
                if policy.is_none() {
                    policy = p;
                }
                let h = hold(uid, &entry.namespace, &entry.name, entry.state, pods);
                match record
                    .mig_uuid
                    .as_ref()
                    .and_then(|u| migs.iter_mut().find(|m| &m.uuid == u))
                {
                    Some(mig) => mig.claims.push(h),
                    None => claims.push(h),
                }
            }
        }
        let (strategy, time_slice, compute_mode) = policy_labels(policy.as_ref());
        let verdict = unhealthy.get(&gpu.uuid);
        rows.push(GpuStatus {
            device: gpu.device_name(),
            uuid: gpu.uuid.clone(),
            product: gpu.name.clone(),
            health: if verdict.is_some() {
                "Unhealthy"
            } else {
                "Healthy"
            }
            .to_owned(),
            xid: verdict.map(|v| v.xid),
            health_message: verdict.map(|v| v.message.clone()),
            strategy: strategy.to_owned(),
            time_slice,
            compute_mode: compute_mode.to_owned(),
            mps_daemon: mps,
            claims,
            mig_devices: migs,
        });
    }
    rows
}

fn holders(claims: &[ClaimHold]) -> (String, String) {
    if claims.is_empty() {
        return ("-".into(), "-".into());
    }
    let names: Vec<String> = claims
        .iter()
        .map(|c| {
            if c.state == "PrepareCompleted" {
                c.claim.clone()
            } else {
                format!("{} ({})", c.claim, c.state)
            }
        })
        .collect();
    let pods: Vec<String> = claims.iter().flat_map(|c| c.pods.clone()).collect();
    (
        names.join(","),
        if pods.is_empty() {
            "-".into()
        } else {
            pods.join(",")
        },
    )
}

/// The report as an aligned table, one line per GPU and per MIG device, then any notes.
pub fn render_table(status: &NodeStatus) -> String {
    let mut rows = vec![
        [
            "DEVICE",
            "UUID",
            "HEALTH",
            "POLICY",
            "COMPUTE MODE",
            "MPS DAEMON",
            "CLAIMS",
            "PODS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for gpu in &status.gpus {
        let policy = if gpu.time_slice.is_empty() {
            gpu.strategy.clone()
        } else {
            format!("{} ({})", gpu.strategy, gpu.time_slice)
        };
        let (claims, pods) = holders(&gpu.claims);
        let health = match gpu.xid {
            Some(xid) => format!("{} (XID {xid})", gpu.health),
            None => gpu.health.clone(),
        };
        rows.push(vec![
            gpu.device.clone(),
            gpu.uuid.clone(),
            health.clone(),
            policy,
            gpu.compute_mode.clone(),
            gpu.mps_daemon.clone().unwrap_or_else(|| "-".into()),
            claims,
            pods,
        ]);
        for mig in &gpu.mig_devices {
            let (claims, pods) = holders(&mig.claims);
            rows.push(vec![
                format!("  {}", mig.device),
                mig.uuid.clone(),
                health.clone(),
                format!("MIG {} GI {}", mig.profile, mig.gpu_instance_id),
                String::new(),
                String::new(),
                claims,
                pods,
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if let Some(e) = &status.checkpoint_error {
        let _ = writeln!(out, "\ncheckpoint {}: {e}", status.checkpoint);
    }
    if let Some(e) = &status.api_error {
        let _ = writeln!(out, "\npods not looked up: {e}");
    }
    if let Some(e) = &status.health_error {
        let _ = writeln!(out, "\nhealth verdicts not read: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ClaimEntry;
    use crate::inventory::fixtures;

    #[test]
    fn holders_policy_and_mps_per_gpu_and_mig_device() {
        let inventory = fixtures::dgx_h100();
        let whole = &inventory.gpus[0];
        let mig_gpu = &inventory.gpus[1];
        let mig = &mig_gpu.mig_devices[0];
        let record = |device: String, gpu: &str, mig: Option<&str>, sharing| PreparedDeviceRecord {
            pool: "n".into(),
            device,
            request_names: vec!["gpu".into()],
            gpu_uuid: gpu.into(),
            mig_uuid: mig.map(Into::into),
            cdi_device_ids: vec![],
            sharing,
            share_id: None,
        };
        let mut checkpoint = Checkpoint::new("boot");
        checkpoint.claims.insert(
            "u1".into(),
            ClaimEntry {
                state: ClaimState::PrepareCompleted,
                namespace: "tgi".into(),
                name: "mps".into(),
                devices: vec![record(
                    whole.device_name(),
                    &whole.uuid,
                    None,
                    Some(
                        serde_json::to_value(Policy::Mps(crate::sharing::MpsLimits::default()))
                            .expect("json"),
                    ),
                )],
                extra: BTreeMap::new(),
            },
        );
        checkpoint.claims.insert(
            "u2".into(),
            ClaimEntry {
                state: ClaimState::PrepareStarted,
                namespace: "ml".into(),
                name: "small".into(),
                devices: vec![record(
                    mig.device_name(),
                    &mig_gpu.uuid,
                    Some(&mig.uuid),
                    None,
                )],
                extra: BTreeMap::new(),
            },
        );
        let pods = BTreeMap::from([(
            "u1".to_owned(),
            vec!["tgi-a".to_owned(), "tgi-b".to_owned()],
        )]);
        let unhealthy = UnhealthyGpus::from([(
            mig_gpu.uuid.clone(),
            crate::health::UnhealthyGpu {
                xid: 48,
                since: 1,
                message: "double-bit ECC error".into(),
                gone: false,
            },
        )]);
        let gpus = build(&inventory, &checkpoint, &pods, &unhealthy);
        assert_eq!(gpus.len(), inventory.gpus.len());
        assert_eq!(gpus[0].strategy, "MPS");
        assert_eq!(gpus[0].compute_mode, "ExclusiveProcess");
        assert_eq!(gpus[0].mps_daemon.as_deref(), Some("tgi/mps"));
        assert_eq!(gpus[0].claims[0].pods, ["tgi-a", "tgi-b"]);
        assert!(gpus[1].claims.is_empty());
        assert_eq!(gpus[1].mig_devices[0].claims[0].claim, "ml/small");
        assert_eq!(gpus[2].strategy, "None");
        assert_eq!((gpus[0].health.as_str(), gpus[0].xid), ("Healthy", None));
        assert_eq!(
            (gpus[1].health.as_str(), gpus[1].xid),
            ("Unhealthy", Some(48))
        );
        let status = NodeStatus {
            node: "n".into(),
            checkpoint: "/x".into(),
            checkpoint_error: None,
            api_error: Some("no kubeconfig".into()),
            health_error: None,
            gpus,
        };
        let table = render_table(&status);
        let first = table.lines().nth(1).expect("gpu row");
        assert!(
            first.contains("MPS") && first.contains("tgi/mps") && first.contains("tgi-a,tgi-b"),
            "{table}"
        );
        assert!(table.contains("ml/small (PrepareStarted)"), "{table}");
        assert!(table.contains("Unhealthy (XID 48)"), "{table}");
        assert!(
            table.contains("pods not looked up: no kubeconfig"),
            "{table}"
        );
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["gpus"][1]["migDevices"][0]["claims"][0]["uid"], "u2");
    }
}
