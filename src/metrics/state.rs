//! State series, rendered at scrape time from snapshots (pure: no I/O, no locks held by
//! other modules).
//!
//! Owns `gpu_dra_prepared_claims`, `gpu_dra_devices`, `gpu_dra_gpu_sharing_policy`,
//! `gpu_dra_mps_daemons`, `gpu_dra_checkpoint_writes_total` and
//! `gpu_dra_prepared_device_info`. The info series carries dcgm-exporter's own label
//! names for the GPU (`UUID`: the physical GPU's UUID, also for MIG devices) and the MIG
//! GPU instance (`GPU_I_ID`: the GPU instance id; `GPU_I_PROFILE`: the profile name), as
//! in dcgm-exporter's collectors (`internal/pkg/collector`), so that
//! `gpu_dra_prepared_device_info * on(UUID, GPU_I_ID) group_left DCGM_FI_...` attaches
//! namespace, pod and claim to a DCGM series. A whole GPU has no `GPU_I_ID`, which
//! PromQL treats like the empty value DCGM leaves out for non-MIG GPUs.
//!
//! Shape of the info series: one series per prepared device x pod x container, where the
//! pods are this node's pods referencing the claim and the containers those whose
//! `resources.claims` (or, for an extended-resource claim, the pod's
//! `status.extendedResourceClaimStatus.requestMappings`) use it ([`super::pods`]). A pod
//! that lists the claim but gives it to no container has one series with `container=""`;
//! a claim whose pods are not known (yet) has one with `pod=""` and `container=""`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::checkpoint::{Checkpoint, ClaimState, PreparedDeviceRecord};
use crate::health::{Health, HealthSnapshot};
use crate::inventory::Inventory;
use crate::sharing::Policy;

type Labels = Vec<(String, String)>;
type GaugeFamily = Family<Labels, Gauge>;

/// The snapshots one scrape renders.
pub struct StateInput<'a> {
    /// The durable checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// Successful checkpoint writes since the plugin started.
    pub checkpoint_writes: u64,
    /// Device health.
    pub health: &'a HealthSnapshot,
    /// The inventory (MIG GPU instance ids and profile names).
    pub inventory: &'a Inventory,
    /// Pods using each claim and their containers using it, by claim UID
    /// ([`super::events::claim_pods`]).
    pub pods: &'a BTreeMap<String, super::events::ClaimUsers>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn policy_of(record: &PreparedDeviceRecord) -> Option<Policy> {
    record
        .sharing
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// `(strategy, time_slice, compute_mode)` label values of a GPU's policy.
pub fn policy_labels(policy: Option<&Policy>) -> (&'static str, String, &'static str) {
    match policy {
        None => ("None", String::new(), "Default"),
        Some(Policy::TimeSlicing { interval }) => {
            ("TimeSlicing", format!("{interval:?}"), "Default")
        }
        Some(Policy::Mps(_)) => ("MPS", String::new(), "ExclusiveProcess"),
        Some(Policy::Exclusive) => ("Exclusive", String::new(), "ExclusiveProcess"),
    }
}

fn health_label(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Unknown => "unknown",
    }
}

/// A fresh registry holding the state series of `input`.
pub fn registry(input: &StateInput<'_>) -> Registry {
    let mut registry = Registry::default();
    let claims = GaugeFamily::default();
    let devices = GaugeFamily::default();
    let sharing = GaugeFamily::default();
    let info = GaugeFamily::default();
    let mps: Gauge = Gauge::default();
    let writes = Counter::<u64, AtomicU64>::default();

    let mut prepared_devices = BTreeSet::new();
    let mut gpu_policy: BTreeMap<&str, Option<Policy>> = BTreeMap::new();
    for state in ["PrepareStarted", "PrepareCompleted"] {
        claims.get_or_create(&labels(&[("state", state)])).set(0);
    }
    for (uid, entry) in &input.checkpoint.claims {
        let state = match entry.state {
            ClaimState::PrepareStarted => "PrepareStarted",
            ClaimState::PrepareCompleted => "PrepareCompleted",
        };
        claims.get_or_create(&labels(&[("state", state)])).inc();
        let mut has_mps = false;
        for record in &entry.devices {
            prepared_devices.insert(record.device.as_str());
            let policy = policy_of(record);
            has_mps |= matches!(policy, Some(Policy::Mps(_)));
            let slot = gpu_policy.entry(record.gpu_uuid.as_str()).or_insert(None);
            if slot.is_none() {
                *slot = policy;
            }
            if entry.state != ClaimState::PrepareCompleted {
                continue;
            }
            let mig = record.mig_uuid.as_ref().and_then(|mig_uuid| {
                input
                    .inventory
                    .gpus
                    .iter()
                    .flat_map(|g| &g.mig_devices)
                    .find(|m| &m.uuid == mig_uuid)
            });
            let gi_id = mig.map(|m| m.gi_id.to_string()).unwrap_or_default();
            let profile = mig.map(|m| m.profile.clone()).unwrap_or_default();
            // One series per (pod, container) using the claim; `""` where unknown.
            let mut users: Vec<(String, String)> = Vec::new();
            for (pod, containers) in input.pods.get(uid).into_iter().flatten() {
                if containers.is_empty() {
                    users.push((pod.clone(), String::new()));
                }
                users.extend(containers.iter().map(|c| (pod.clone(), c.clone())));
            }
            if users.is_empty() {
                users.push((String::new(), String::new()));
            }
            for (pod, container) in users {
                let mut set = labels(&[
                    ("UUID", &record.gpu_uuid),
                    ("dra_device", &record.device),
                    ("namespace", &entry.namespace),
                    ("pod", &pod),
                    ("container", &container),
                    ("claim", &entry.name),
                    ("claim_uid", uid),
                ]);
                if !gi_id.is_empty() {
                    set.push(("GPU_I_ID".into(), gi_id.clone()));
                    set.push(("GPU_I_PROFILE".into(), profile.clone()));
                }
                if let Some(mig_uuid) = &record.mig_uuid {
                    set.push(("mig_uuid".into(), mig_uuid.clone()));
                }
                info.get_or_create(&set).set(1);
            }
        }
        if has_mps && entry.state == ClaimState::PrepareCompleted {
            mps.inc();
        }
    }
    for device in &input.health.devices {
        let prepared = prepared_devices.contains(device.device.as_str());
        devices
            .get_or_create(&labels(&[
                ("health", health_label(device.health)),
                ("prepared", if prepared { "true" } else { "false" }),
            ]))
            .inc();
    }
    for gpu in &input.inventory.gpus {
        let policy = gpu_policy.get(gpu.uuid.as_str()).cloned().flatten();
        let (strategy, time_slice, compute_mode) = policy_labels(policy.as_ref());
        sharing
            .get_or_create(&labels(&[
                ("UUID", &gpu.uuid),
                ("strategy", strategy),
                ("time_slice", &time_slice),
                ("compute_mode", compute_mode),
            ]))
            .set(1);
    }
    writes.inc_by(input.checkpoint_writes);

    registry.register(
        "gpu_dra_prepared_claims",
        "Claims in the checkpoint, by phase",
        claims,
    );
    registry.register(
        "gpu_dra_devices",
        "Published devices, by health and whether a claim holds them",
        devices,
    );
    registry.register(
        "gpu_dra_gpu_sharing_policy",
        "Sharing policy in force on each physical GPU (value 1)",
        sharing,
    );
    registry.register(
        "gpu_dra_mps_daemons",
        "MPS control daemons run for prepared claims",
        mps,
    );
    registry.register(
        "gpu_dra_checkpoint_writes",
        "Checkpoint files written since the plugin started",
        writes,
    );
    registry.register(
        "gpu_dra_prepared_device_info",
        "One series (value 1) per prepared device, pod and container using it; join with dcgm-exporter on(UUID, GPU_I_ID)",
        info,
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ClaimEntry;
    use crate::inventory::fixtures;

    fn record(
        device: &str,
        gpu: &str,
        mig: Option<&str>,
        sharing: Option<serde_json::Value>,
    ) -> PreparedDeviceRecord {
        PreparedDeviceRecord {
            pool: "node-a".into(),
            device: device.into(),
            request_names: vec!["gpu".into()],
            gpu_uuid: gpu.into(),
            mig_uuid: mig.map(Into::into),
            cdi_device_ids: vec![],
            sharing,
            share_id: None,
        }
    }

    #[test]
    fn info_series_carries_dcgm_labels_and_pods() {
        let inventory = fixtures::dgx_h100();
        let whole = inventory
            .gpus
            .iter()
            .find(|g| !g.mig.enabled)
            .expect("whole GPU");
        let mig_gpu = inventory
            .gpus
            .iter()
            .find(|g| !g.mig_devices.is_empty())
            .expect("MIG GPU");
        let mig = &mig_gpu.mig_devices[0];
        let mut checkpoint = Checkpoint::new("boot");
        checkpoint.claims.insert(
            "uid-1".into(),
            ClaimEntry {
                state: ClaimState::PrepareCompleted,
                namespace: "ml".into(),
                name: "shared".into(),
                devices: vec![record(
                    &whole.device_name(),
                    &whole.uuid,
                    None,
                    Some(serde_json::json!({"strategy": "timeSlicing", "interval": "Long"})),
                )],
                extra: BTreeMap::new(),
            },
        );
        checkpoint.claims.insert(
            "uid-2".into(),
            ClaimEntry {
                state: ClaimState::PrepareCompleted,
                namespace: "ml".into(),
                name: "mig".into(),
                devices: vec![record(
                    &mig.device_name(),
                    &mig_gpu.uuid,
                    Some(&mig.uuid),
                    None,
                )],
                extra: BTreeMap::new(),
            },
        );
        let pods = BTreeMap::from([(
            "uid-1".to_owned(),
            vec![
                (
                    "a".to_owned(),
                    vec!["main".to_owned(), "sidecar".to_owned()],
                ),
                ("b".to_owned(), vec![]),
            ],
        )]);
        let health = HealthSnapshot::default();
        let input = StateInput {
            checkpoint: &checkpoint,
            checkpoint_writes: 3,
            health: &health,
            inventory: &inventory,
            pods: &pods,
        };
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry(&input)).expect("encode");
        for (pod, container) in [("a", "main"), ("a", "sidecar"), ("b", "")] {
            let line = format!(
                "gpu_dra_prepared_device_info{{UUID=\"{}\",dra_device=\"{}\",namespace=\"ml\",pod=\"{pod}\",container=\"{container}\",claim=\"shared\",claim_uid=\"uid-1\"}} 1",
                whole.uuid,
                whole.device_name()
            );
            assert!(out.contains(&line), "{line}\n{out}");
        }
        assert!(
            out.contains("pod=\"\",container=\"\",claim=\"mig\""),
            "a claim without known pods still has its series: {out}"
        );
        let mig_line = format!(
            "GPU_I_ID=\"{}\",GPU_I_PROFILE=\"{}\",mig_uuid=\"{}\"}} 1",
            mig.gi_id, mig.profile, mig.uuid
        );
        assert!(out.contains(&mig_line), "{mig_line}\n{out}");
        let policy = format!(
            "gpu_dra_gpu_sharing_policy{{UUID=\"{}\",strategy=\"TimeSlicing\",time_slice=\"Long\",compute_mode=\"Default\"}} 1",
            whole.uuid
        );
        assert!(out.contains(&policy), "{policy}\n{out}");
        assert!(
            out.contains("gpu_dra_prepared_claims{state=\"PrepareCompleted\"} 2"),
            "{out}"
        );
        assert!(out.contains("gpu_dra_checkpoint_writes_total 3"), "{out}");
        assert!(out.contains("gpu_dra_mps_daemons 0"), "{out}");
    }
}
