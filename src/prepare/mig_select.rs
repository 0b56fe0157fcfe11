//! Which GPUs are under dynamic MIG management, and which of their instances are the
//! driver's own.
//!
//! Owns the `--dynamic-mig` setting (`auto`, `off`, or a list of GPU minors / UUIDs), the
//! choice made once at start (a GPU's management mode never changes under running
//! workloads), and the annotation of every discovered inventory: a chosen GPU gets
//! [`DynamicMig`], listing as foreign each existing GPU instance that no checkpoint record
//! claims ([`DynamicMigDiscovery`] wraps discovery so refreshes keep it). A chosen GPU out
//! of MIG mode stays dynamic only while a claim holds its full GPU (the driver switched
//! MIG mode off for it, [`super::mig_full`]); otherwise it is a plain full GPU. Pure
//! except the wrapper, which only reads the checkpoint snapshot.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::checkpoint::{Checkpoint, CheckpointWriter};
use crate::inventory::{Discover, DiscoverError, DynamicMig, ForeignInstance, Gpu, Inventory};

use super::mig_dynamic::{InstanceRecord, records_of};

/// The `--dynamic-mig` setting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DynamicMigMode {
    /// GPUs in MIG mode whose existing instances (if any) are all the driver's own.
    #[default]
    Auto,
    /// No GPU: MIG stays static everywhere (today's behaviour).
    Off,
    /// These GPUs (minor numbers or UUIDs), when in MIG mode; their unknown instances are
    /// kept and reported.
    Gpus(Vec<String>),
}

/// Parses `auto`, `off` or a comma-separated list of GPU minors / `GPU-` UUIDs.
///
/// Errors: an empty list or an entry that is neither a number nor a `GPU-` UUID.
pub fn parse_mode(s: &str) -> Result<DynamicMigMode, String> {
    match s.trim() {
        "auto" => Ok(DynamicMigMode::Auto),
        "off" | "none" => Ok(DynamicMigMode::Off),
        list => {
            let items: Vec<String> = list
                .split(',')
                .map(|x| x.trim().to_owned())
                .filter(|x| !x.is_empty())
                .collect();
            if items.is_empty() {
                return Err("expected auto, off or a list of GPU minors / UUIDs".to_owned());
            }
            if let Some(bad) = items
                .iter()
                .find(|x| x.parse::<u32>().is_err() && !x.starts_with("GPU-"))
            {
                return Err(format!(
                    "{bad:?} is neither a GPU minor number nor a GPU UUID (GPU-...); expected auto, off or a list such as 0,1"
                ));
            }
            Ok(DynamicMigMode::Gpus(items))
        }
    }
}

/// Every instance record of the checkpoint, any claim state.
pub fn owned_records(cp: &Checkpoint) -> Vec<InstanceRecord> {
    cp.claims.values().flat_map(records_of).collect()
}

fn is_owned(gpu: &Gpu, gi_profile_id: u32, start: u32, owned: &[InstanceRecord]) -> bool {
    owned.iter().any(|r| {
        r.gpu_uuid == gpu.uuid && r.gi_profile_id == gi_profile_id && r.placement.start == start
    })
}

/// The UUIDs of the GPUs of `inv` that `mode` puts under dynamic MIG, given the instances
/// the checkpoint records as the driver's.
pub fn choose(
    inv: &Inventory,
    mode: &DynamicMigMode,
    owned: &[InstanceRecord],
) -> BTreeSet<String> {
    choose_with(inv, mode, owned, &BTreeSet::new())
}

/// [`choose`], also taking the GPUs whose full GPU a claim holds (`full_gpus`, UUIDs from
/// [`crate::prepare::mig_full::full_gpu_uuids`]): the driver switched their MIG mode off,
/// and they stay dynamic.
pub fn choose_with(
    inv: &Inventory,
    mode: &DynamicMigMode,
    owned: &[InstanceRecord],
    full_gpus: &BTreeSet<String>,
) -> BTreeSet<String> {
    inv.gpus
        .iter()
        .filter(|g| (g.mig.enabled || full_gpus.contains(&g.uuid)) && !g.mig_profiles.is_empty())
        .filter(|g| match mode {
            DynamicMigMode::Off => false,
            DynamicMigMode::Auto => g
                .mig_devices
                .iter()
                .all(|m| is_owned(g, m.gi_profile_id, m.placement.start, owned)),
            DynamicMigMode::Gpus(list) => list
                .iter()
                .any(|x| *x == g.uuid || x.parse::<u32>().ok() == Some(g.minor)),
        })
        .map(|g| g.uuid.clone())
        .collect()
}

/// Marks the GPUs of `dynamic` in `inv` and lists their foreign GPU instances.
pub fn annotate(inv: &mut Inventory, dynamic: &BTreeSet<String>, owned: &[InstanceRecord]) {
    annotate_with(inv, dynamic, owned, &BTreeSet::new());
}

/// [`annotate`], also marking the GPUs of `full_gpus` (UUIDs) whose full GPU a claim holds.
pub fn annotate_with(
    inv: &mut Inventory,
    dynamic: &BTreeSet<String>,
    owned: &[InstanceRecord],
    full_gpus: &BTreeSet<String>,
) {
    for gpu in &mut inv.gpus {
        // Out of MIG mode, a GPU is dynamic only while a claim holds its full GPU.
        let dynamic_now = gpu.mig.enabled || full_gpus.contains(&gpu.uuid);
        if !dynamic.contains(&gpu.uuid) || !dynamic_now {
            gpu.dynamic_mig = None;
            continue;
        }
        let mut foreign: Vec<ForeignInstance> = gpu
            .mig_devices
            .iter()
            .filter(|m| !is_owned(gpu, m.gi_profile_id, m.placement.start, owned))
            .map(|m| ForeignInstance {
                gi_id: m.gi_id,
                gi_profile_id: m.gi_profile_id,
                placement: m.placement,
            })
            .collect();
        foreign.sort_by_key(|f| (f.placement.start, f.gi_id));
        foreign.dedup();
        gpu.dynamic_mig = Some(DynamicMig { foreign });
    }
}

/// Adds `instance` to the foreign GPU instances of dynamic GPU `gpu_uuid` in `inv`, so
/// the placements it overlaps (and the full GPU) are no longer published. Returns false
/// when it was listed already or the GPU is not dynamic.
pub fn add_foreign(inv: &mut Inventory, gpu_uuid: &str, instance: ForeignInstance) -> bool {
    let Some(d) = inv
        .gpus
        .iter_mut()
        .find(|g| g.uuid == gpu_uuid)
        .and_then(|g| g.dynamic_mig.as_mut())
    else {
        return false;
    };
    if d.foreign.contains(&instance) {
        return false;
    }
    d.foreign.push(instance);
    d.foreign.sort_by_key(|f| (f.placement.start, f.gi_id));
    true
}

/// Discovery that annotates each inventory for dynamic MIG (see [`annotate`]), reading
/// the driver's instances from the current checkpoint.
pub struct DynamicMigDiscovery {
    inner: Arc<dyn Discover>,
    dynamic: BTreeSet<String>,
    checkpoint: CheckpointWriter,
    last_foreign: std::sync::Mutex<Vec<(String, ForeignInstance)>>,
}

impl DynamicMigDiscovery {
    /// Wraps `inner` for the GPUs `dynamic` (UUIDs).
    pub fn new(
        inner: Arc<dyn Discover>,
        dynamic: BTreeSet<String>,
        checkpoint: CheckpointWriter,
    ) -> Self {
        Self {
            inner,
            dynamic,
            checkpoint,
            last_foreign: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl Discover for DynamicMigDiscovery {
    fn discover(&self) -> Result<Inventory, DiscoverError> {
        let mut inv = self.inner.discover()?;
        let snapshot = self.checkpoint.snapshot();
        let owned = owned_records(&snapshot);
        let full = super::mig_full::full_gpu_uuids(&snapshot);
        annotate_with(&mut inv, &self.dynamic, &owned, &full);
        let foreign: Vec<(String, ForeignInstance)> = inv
            .gpus
            .iter()
            .flat_map(|g| {
                g.dynamic_mig
                    .iter()
                    .flat_map(|d| d.foreign.iter().map(|f| (g.uuid.clone(), *f)))
            })
            .collect();
        let mut last = self
            .last_foreign
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (gpu, f) in foreign.iter().filter(|x| !last.contains(x)) {
            tracing::warn!(gpu = %gpu, gi_id = f.gi_id, gi_profile_id = f.gi_profile_id, start = f.placement.start, size = f.placement.size, "GPU instance not created by this driver on a dynamic MIG GPU: kept, its placements are not offered");
        }
        *last = foreign;
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Placement;
    use crate::inventory::fixtures::{dgx_h100, h100, with_mig};

    fn record(gpu: &Gpu, profile: u32, start: u32, size: u32) -> InstanceRecord {
        InstanceRecord {
            device: String::new(),
            gpu_uuid: gpu.uuid.clone(),
            gpu_minor: gpu.minor,
            gi_profile_id: profile,
            placement: Placement { start, size },
            gi_id: None,
            ci_id: None,
            mig_uuid: None,
        }
    }

    #[test]
    fn parse() {
        assert_eq!(parse_mode("auto"), Ok(DynamicMigMode::Auto));
        assert_eq!(parse_mode("off"), Ok(DynamicMigMode::Off));
        assert_eq!(
            parse_mode("0, GPU-x"),
            Ok(DynamicMigMode::Gpus(vec!["0".into(), "GPU-x".into()]))
        );
        assert!(parse_mode("gpu0").unwrap_err().contains("gpu0"));
        assert!(parse_mode(",").is_err());
    }

    #[test]
    fn auto_takes_empty_mig_gpus_and_those_with_only_own_instances() {
        let mut inv = dgx_h100();
        inv.gpus[0] = with_mig(h100(0), &[]);
        inv.gpus[3] = with_mig(h100(3), &[(9, 4, 2)]);
        let owned = vec![record(&inv.gpus[3], 9, 4, 4)];
        let chosen = choose(&inv, &DynamicMigMode::Auto, &owned);
        let want: BTreeSet<String> = [inv.gpus[0].uuid.clone(), inv.gpus[3].uuid.clone()].into();
        // GPUs 1 and 2 have static instances nobody recorded; the rest are not in MIG mode.
        assert_eq!(chosen, want);
        assert!(choose(&inv, &DynamicMigMode::Off, &owned).is_empty());
    }

    #[test]
    fn listed_gpus_keep_foreign_instances_out() {
        let mut inv = dgx_h100();
        let mode = parse_mode("1").unwrap();
        let owned = vec![record(&inv.gpus[1], 9, 0, 4)];
        let chosen = choose(&inv, &mode, &owned);
        assert_eq!(chosen.len(), 1);
        annotate(&mut inv, &chosen, &owned);
        let dynamic = inv.gpus[1].dynamic_mig.as_ref().expect("dynamic");
        // 3g.40gb@0 is ours; 2g.20gb@4 and 1g.10gb@6 were made by hand.
        let starts: Vec<u32> = dynamic.foreign.iter().map(|f| f.placement.start).collect();
        assert_eq!(starts, [4, 6]);
        assert!(inv.gpus[2].dynamic_mig.is_none());
    }

    #[test]
    fn a_gpu_out_of_mig_mode_stays_dynamic_only_while_a_claim_holds_its_full_gpu() {
        let mut inv = dgx_h100();
        inv.gpus[0] = with_mig(h100(0), &[]);
        inv.gpus[0].mig.enabled = false;
        inv.gpus[0].mig.pending = false;
        let uuid = inv.gpus[0].uuid.clone();
        let full = BTreeSet::from([uuid.clone()]);
        let mode = DynamicMigMode::Auto;
        assert!(choose(&inv, &mode, &[]).is_empty(), "MIG off: not dynamic");
        let chosen = choose_with(&inv, &mode, &[], &full);
        assert_eq!(chosen, BTreeSet::from([uuid.clone()]));
        let mut held = inv.clone();
        annotate_with(&mut held, &chosen, &[], &full);
        assert!(held.gpus[0].dynamic_mig.is_some());
        // Released (no record) but MIG mode still off: a plain full GPU.
        annotate_with(&mut inv, &chosen, &[], &BTreeSet::new());
        assert!(inv.gpus[0].dynamic_mig.is_none());
    }
}
