//! Rebuilds the checkpoint from what is true when the checkpoint file is lost, unusable or
//! from another boot: the ResourceClaims the API server says are allocated to this node for
//! this driver, and the CDI specs on disk.
//!
//! Owns the one-off LIST of claims at start (the claim cache is for prepare) and the pure
//! rule: a claim is re-recorded `PrepareCompleted` when its spec exists (the spec is
//! written after every GPU side effect) and the API server still has it, same UID,
//! allocated here; its policy comes from its allocation's config, as at prepare. The
//! normal recovery then re-adopts its MPS daemon and keeps its spec and GPU policy. A spec
//! of a claim the API server no longer has is an orphan. Dynamic MIG: which devices were
//! dynamic is read from this node's ResourceSlices still in the API server (a device with
//! `consumesCounters`); static MIG devices have the same names and are never adopted. An
//! instance at the placement of such a device that a live claim has allocated here is the
//! driver's own ([`adoptable_instances`], so start-up neither reports it as foreign nor
//! keeps the GPU static), and so is a MIG-off GPU whose published full GPU a live claim
//! holds ([`adoptable_full_gpus`]). With the claim's spec it is re-recorded in use with
//! its ids (or its full-GPU record); without a spec (a prepare cut before the spec, so no
//! container can use it) the claim is recorded `PrepareStarted`, so recovery destroys the
//! instance (or switches MIG mode back on) and the kubelet's retry prepares it afresh.
//! Must not touch GPUs, daemons or
//! files itself. ResourceClaims have no field selector beyond name and namespace (upstream
//! `resourceclaim` strategy), so the LIST is paginated and filtered here, keeping only this
//! node's claims.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::allocation::allocated_devices;
use super::mig_dynamic::{self, InstanceRecord};
use super::plan::plan_claim;
use super::records;
use crate::checkpoint::{ClaimEntry, ClaimState};
use crate::inventory::Inventory;
use crate::plugin::ClaimRef;

/// Page size of the LIST.
const PAGE: u32 = 250;

/// Lists the ResourceClaims allocated to `node` for `driver` (all namespaces, paginated,
/// managed fields dropped). Errors: the API server could not be asked.
pub async fn list_node_claims(
    client: &Client,
    driver: &str,
    node: &str,
) -> Result<Vec<ResourceClaim>, kube::Error> {
    let api: Api<ResourceClaim> = Api::all(client.clone());
    let mut params = ListParams::default().limit(PAGE);
    let mut found = Vec::new();
    loop {
        let page = api.list(&params).await?;
        for mut claim in page.items {
            if allocated_devices(&claim, driver, node).is_ok() {
                claim.managed_fields_mut().clear();
                found.push(claim);
            }
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(found),
        }
    }
}

/// What [`rebuild_entries`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Rebuilt {
    /// Entries to record, by claim UID.
    pub entries: BTreeMap<String, ClaimEntry>,
    /// Claims with a spec that are live but could not be planned (uid, error); their spec is
    /// kept, the kubelet's unprepare removes it.
    pub unplanned: Vec<(String, String)>,
    /// Live claims (allocated here) with at least one pod in `reservedFor`.
    pub in_use: usize,
}

/// Pure: the entries for claims that have a spec in `spec_uids` and are in `live` (claims
/// allocated to this node for `driver`).
pub fn rebuild_entries(
    live: &[ResourceClaim],
    spec_uids: &BTreeSet<String>,
    inventory: &Inventory,
    driver: &str,
    node: &str,
) -> Rebuilt {
    let mut out = Rebuilt::default();
    for claim in live {
        let uid = claim.uid().unwrap_or_default();
        if claim
            .status
            .as_ref()
            .and_then(|s| s.reserved_for.as_ref())
            .is_some_and(|r| !r.is_empty())
        {
            out.in_use += 1;
        }
        let has_spec = spec_uids.contains(&uid);
        let cref = ClaimRef {
            namespace: claim.namespace().unwrap_or_default(),
            name: claim.name_any(),
            uid: uid.clone(),
        };
        match plan_claim(claim, inventory, driver, node) {
            Ok(mut plans) => {
                let instances = mig_dynamic::adopt_existing(&mut plans, inventory);
                let full = super::mig_steps::full_records(&plans);
                let state = if has_spec {
                    ClaimState::PrepareCompleted
                } else if instances.iter().any(|r| r.gi_id.is_some()) || !full.is_empty() {
                    ClaimState::PrepareStarted
                } else {
                    continue;
                };
                let mut entry = ClaimEntry {
                    state,
                    namespace: cref.namespace.clone(),
                    name: cref.name.clone(),
                    devices: records(&cref, &plans),
                    extra: BTreeMap::new(),
                };
                mig_dynamic::set_records(&mut entry, &instances);
                super::mig_full::set_records(&mut entry, &full);
                out.entries.insert(uid, entry);
            }
            Err(err) if has_spec => out.unplanned.push((uid, err.to_string())),
            Err(_) => {}
        }
    }
    out
}

/// Names of the devices of `live` claims allocated to `node` for `driver` that the
/// node's published slices (`partitionable`: device names with `consumesCounters`) show
/// as dynamic MIG devices.
fn allocated_partitionable(
    live: &[ResourceClaim],
    driver: &str,
    node: &str,
    partitionable: &BTreeSet<String>,
) -> BTreeSet<String> {
    live.iter()
        .filter_map(|c| allocated_devices(c, driver, node).ok())
        .flatten()
        .map(|d| d.device)
        .filter(|d| partitionable.contains(d))
        .collect()
}

/// The MIG instances of `inventory` standing at the placement of a dynamic MIG device
/// (one of `partitionable`, the published device names with `consumesCounters`) that one
/// of the `live` claims (allocated to `node` for `driver`) has: the driver made them for
/// those claims. Matched by device name (`gpu-<minor>-mig-<profile>-<GI profile id>-<start>`,
/// the same for an existing instance and a placement), full-size compute instances only.
pub fn adoptable_instances(
    live: &[ResourceClaim],
    inventory: &Inventory,
    driver: &str,
    node: &str,
    partitionable: &BTreeSet<String>,
) -> Vec<InstanceRecord> {
    let allocated = allocated_partitionable(live, driver, node, partitionable);
    inventory
        .gpus
        .iter()
        .flat_map(|g| g.mig_devices.iter().map(move |m| (g, m)))
        .filter(|(_, m)| !m.is_partial_compute_instance() && allocated.contains(&m.device_name()))
        .map(|(g, m)| InstanceRecord {
            device: m.device_name(),
            gpu_uuid: g.uuid.clone(),
            gpu_minor: g.minor,
            gi_profile_id: m.gi_profile_id,
            placement: m.placement,
            gi_id: Some(m.gi_id),
            ci_id: Some(m.ci_id),
            mig_uuid: Some(m.uuid.clone()),
        })
        .collect()
}

/// UUIDs of the MIG-capable GPUs of `inventory` now out of MIG mode whose full GPU was
/// published as a dynamic device (in `partitionable`) and is allocated to one of the `live`
/// claims: the driver switched their MIG mode off for that claim.
pub fn adoptable_full_gpus(
    live: &[ResourceClaim],
    inventory: &Inventory,
    driver: &str,
    node: &str,
    partitionable: &BTreeSet<String>,
) -> BTreeSet<String> {
    let allocated = allocated_partitionable(live, driver, node, partitionable);
    inventory
        .gpus
        .iter()
        .filter(|g| g.mig.capable && !g.mig.enabled && !g.mig_profiles.is_empty())
        .filter(|g| allocated.contains(&g.device_name()))
        .map(|g| g.uuid.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::fixtures::dgx_h100;

    fn live(device: &str) -> ResourceClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "c", "uid": "uid-c"},
            "spec": {"devices": {"requests": []}},
            "status": {"allocation": {"devices": {"results": [
                {"request": "mig", "driver": "gpu.gpu-dra.dev", "pool": "node-a", "device": device}
            ]}}},
        }))
        .expect("claim")
    }

    #[test]
    fn only_devices_published_as_dynamic_are_adopted() {
        // GPU 1 of the fixture holds a static 3g.40gb at slice 0, allocated to a claim.
        let inv = dgx_h100();
        let claims = [live("gpu-1-mig-3g40gb-9-0")];
        let adopt = |published: &[&str]| {
            let names: BTreeSet<String> = published.iter().map(|s| s.to_string()).collect();
            adoptable_instances(&claims, &inv, "gpu.gpu-dra.dev", "node-a", &names)
        };
        assert!(
            adopt(&[]).is_empty(),
            "a static MIG device is never adopted"
        );
        let found = adopt(&["gpu-1-mig-3g40gb-9-0"]);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].gi_profile_id, found[0].placement.start), (9, 0));
        assert!(found[0].gi_id.is_some() && found[0].mig_uuid.is_some());
        // Another node's pool or driver: nothing.
        let names = BTreeSet::from(["gpu-1-mig-3g40gb-9-0".to_string()]);
        assert!(adoptable_instances(&claims, &inv, "other.dev", "node-a", &names).is_empty());
    }

    #[test]
    fn a_mig_off_gpu_is_a_full_dynamic_gpu_only_when_published_so() {
        let mut inv = dgx_h100();
        inv.gpus[3].mig.capable = true;
        inv.gpus[3].mig_profiles = inv.gpus[1].mig_profiles.clone();
        let claims = [live("gpu-3")];
        let names = BTreeSet::from(["gpu-3".to_string()]);
        let found = adoptable_full_gpus(&claims, &inv, "gpu.gpu-dra.dev", "node-a", &names);
        assert_eq!(found, BTreeSet::from([inv.gpus[3].uuid.clone()]));
        let none =
            adoptable_full_gpus(&claims, &inv, "gpu.gpu-dra.dev", "node-a", &BTreeSet::new());
        assert!(none.is_empty(), "a plain full GPU stays plain");
    }
}
