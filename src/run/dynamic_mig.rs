//! Start-up of dynamic MIG in the kubelet plugin: the `--dynamic-mig` choice, the
//! annotating discovery, the NVML MIG control, and the report (log + Node Event, through
//! `crate::events`) of GPU instances the driver did not create, at start and when a
//! prepare finds one at an allocated placement ([`foreign_report`], which also marks it in
//! the published inventory). After a checkpoint loss it reads this node's ResourceSlices
//! to tell the dynamic devices of live claims from static ones. The decisions are
//! [`crate::prepare::mig_select`]'s and [`crate::prepare::rebuild`]'s.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::checkpoint::CheckpointWriter;
use crate::cli::PluginArgs;
use crate::inventory::Discover;

/// Chooses the dynamic MIG GPUs (`--dynamic-mig`), marks them in the inventory, reports
/// GPU instances on them that the driver did not create (log and a Node Event), and
/// returns the annotating discovery plus the NVML MIG control (`None` when no GPU is
/// dynamic or NVML cannot be initialised for it: then nothing is marked dynamic).
///
/// `live_after_loss`: after a checkpoint loss, the claims the API server has allocated to
/// this node; instances at the placements of their dynamic devices (as this node's
/// ResourceSlices, read with `client`, show them) count as the driver's own
/// ([`crate::prepare::rebuild::adoptable_instances`], `adoptable_full_gpus`).
pub(super) async fn setup(
    args: &PluginArgs,
    discovery: Arc<dyn Discover>,
    inventory_tx: &watch::Sender<crate::inventory::Inventory>,
    checkpoint: &CheckpointWriter,
    nvml_library: &Path,
    live_after_loss: Option<&[k8s_openapi::api::resource::v1::ResourceClaim]>,
    client: &kube::Client,
) -> (
    Arc<dyn Discover>,
    Option<Arc<dyn crate::prepare::mig_control::MigControl>>,
) {
    use crate::prepare::{mig_control, mig_select};
    let mut owned = mig_select::owned_records(&checkpoint.snapshot());
    let mut full = crate::prepare::mig_full::full_gpu_uuids(&checkpoint.snapshot());
    if let Some(live) = live_after_loss {
        use crate::prepare::rebuild::{adoptable_full_gpus, adoptable_instances};
        let partitionable = published_partitionable(client, args).await;
        let inv = inventory_tx.borrow().clone();
        let (driver, node) = (&args.driver_name, &args.node_name);
        let adopted = adoptable_instances(live, &inv, driver, node, &partitionable);
        let adopted_full = adoptable_full_gpus(live, &inv, driver, node, &partitionable);
        if !adopted.is_empty() || !adopted_full.is_empty() {
            info!(
                instances = adopted.len(),
                full_gpus = adopted_full.len(),
                "dynamic MIG devices of claims allocated here adopted after the checkpoint loss"
            );
        }
        owned.extend(adopted);
        full.extend(adopted_full);
    }
    let mut chosen =
        mig_select::choose_with(&inventory_tx.borrow(), &args.dynamic_mig, &owned, &full);
    let control = if chosen.is_empty() {
        None
    } else {
        match mig_control::NvmlMigControl::new(Some(nvml_library)) {
            Ok(c) => Some(Arc::new(c) as Arc<dyn mig_control::MigControl>),
            Err(err) => {
                tracing::error!(error = %err, "dynamic MIG disabled: NVML MIG control unavailable");
                chosen.clear();
                None
            }
        }
    };
    inventory_tx.send_modify(|inv| mig_select::annotate_with(inv, &chosen, &owned, &full));
    let foreign: Vec<String> = inventory_tx
        .borrow()
        .gpus
        .iter()
        .flat_map(|g| {
            g.dynamic_mig.iter().flat_map(move |d| {
                d.foreign.iter().map(move |f| {
                    format!(
                        "GPU {} instance {} (profile id {}, memory slices {}..{})",
                        g.uuid,
                        f.gi_id,
                        f.gi_profile_id,
                        f.placement.start,
                        f.placement.start + f.placement.size
                    )
                })
            })
        })
        .collect();
    if !chosen.is_empty() {
        info!(gpus = ?chosen, "dynamic MIG GPUs");
    }
    if !foreign.is_empty() {
        let note = format!(
            "GPU instances this driver did not create on dynamic MIG GPUs are kept and their placements not offered: {}; to hand them back, delete them (nvidia-smi mig -i <gpu> -dci -gi <id>, then -dgi -gi <id>) when no workload uses them",
            foreign.join("; ")
        );
        warn_unknown_instances("unknown MIG instances", "DiscoverMigInstances", note);
    }
    let wrapped: Arc<dyn Discover> = Arc::new(mig_select::DynamicMigDiscovery::new(
        discovery,
        chosen,
        checkpoint.clone(),
    ));
    (wrapped, control)
}

/// Names of this node's published devices that consume counters (dynamic MIG devices), as
/// the API server still has them; empty when it cannot be asked (then nothing is adopted
/// and every instance stays as it is).
async fn published_partitionable(
    client: &kube::Client,
    args: &PluginArgs,
) -> std::collections::BTreeSet<String> {
    use k8s_openapi::api::resource::v1::ResourceSlice;
    let api: kube::Api<ResourceSlice> = kube::Api::all(client.clone());
    let lp = kube::api::ListParams::default().fields(&format!(
        "spec.nodeName={},spec.driver={}",
        args.node_name, args.driver_name
    ));
    match api.list(&lp).await {
        Ok(list) => list
            .items
            .iter()
            .flat_map(|s| s.spec.devices.iter().flatten())
            .filter(|d| d.consumes_counters.is_some())
            .map(|d| d.name.clone())
            .collect(),
        Err(err) => {
            tracing::warn!(error = %err, "listing this node's ResourceSlices failed; no dynamic MIG device is adopted after the checkpoint loss");
            Default::default()
        }
    }
}

/// The report of a GPU instance the driver did not create found at an allocated placement
/// during prepare: marks it foreign in the published inventory (the reconciler then
/// republishes without the placements it overlaps), logs it and posts the
/// `UnknownMigInstances` Node Event. The next inventory refresh finds it foreign too.
pub(super) fn foreign_report(
    inventory_tx: watch::Sender<crate::inventory::Inventory>,
) -> crate::prepare::mig_dynamic::ForeignReport {
    Arc::new(
        move |gpu_uuid: &str, f: crate::inventory::ForeignInstance| {
            let added = inventory_tx
                .send_if_modified(|inv| crate::prepare::mig_select::add_foreign(inv, gpu_uuid, f));
            if !added {
                return;
            }
            let note = format!(
                "GPU {gpu_uuid} instance {} (profile id {}, memory slices {}..{}) was created outside this driver on a dynamic MIG GPU: kept, its placements are no longer offered; delete it (nvidia-smi mig -i <gpu> -dci -gi {}, then -dgi -gi {}) when no workload uses it",
                f.gi_id,
                f.gi_profile_id,
                f.placement.start,
                f.placement.start + f.placement.size,
                f.gi_id,
                f.gi_id
            );
            warn_unknown_instances(
                "unknown MIG instance at an allocated placement",
                "PrepareMigDevice",
                note,
            );
        },
    )
}

/// Logs `note` as a warning (`message`) and posts it as the `UnknownMigInstances` Node
/// Event of `action`.
fn warn_unknown_instances(message: &str, action: &str, note: String) {
    tracing::warn!(note = %note, "{message}");
    crate::events::notify(crate::events::Notice::Node {
        warning: true,
        reason: "UnknownMigInstances".into(),
        action: action.into(),
        note,
    });
}
