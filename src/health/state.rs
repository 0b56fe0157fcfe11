//! Per-device health of the devices this plugin publishes, on a watch channel.
//!
//! Owns the verdict per physical GPU (by UUID) and projects it onto the published
//! devices of the inventory: a full GPU `gpu-<minor>`, or, with MIG enabled, its MIG
//! devices (the same rule as `slices::desired`); MIG devices share their parent's
//! verdict. Every change is published as a complete [`HealthSnapshot`] (KEP-4680 sends
//! the complete list each time). It must not talk to NVML, files or gRPC.
//!
//! The unhealthy GPUs are also published on their own channel ([`UnhealthyGpus`]): the
//! slice reconciler turns them into device taints and `health::verdicts` persists them,
//! so a verdict outlives a plugin restart. An unhealthy GPU stays unhealthy until it is
//! reset (it leaves the inventory and comes back), the node reboots (a new boot id drops
//! the persisted verdicts) or an admin clears it ([`HealthState::clear`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::xid::{XidVerdict, classify, truncate};
use crate::inventory::Inventory;

/// Health of one published device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not known (the health watch is not running).
    Unknown,
    /// No critical error seen.
    Healthy,
    /// A critical XID was seen on the device's GPU.
    Unhealthy,
}

/// Health of one published device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Pool name (the node name).
    pub pool: String,
    /// Published device name, e.g. `gpu-0` or `gpu-0-mig-1g10gb-19-0`.
    pub device: String,
    /// UUID of the physical GPU the device lives on.
    pub gpu_uuid: String,
    /// Current verdict.
    pub health: Health,
    /// When the verdict last changed, Unix seconds.
    pub last_updated: i64,
    /// Why (empty while healthy), at most 1024 characters.
    pub message: String,
}

/// The complete health list, sorted by device name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Every published device.
    pub devices: Vec<DeviceHealth>,
    /// When the health watch last confirmed the list, Unix seconds (advances without
    /// notifying receivers).
    pub checked_at: i64,
}

/// A GPU made unhealthy by a critical XID: what its device taint and the verdict file
/// carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UnhealthyGpu {
    /// The XID that made it unhealthy (the first critical one seen).
    pub xid: u64,
    /// When, Unix seconds.
    pub since: i64,
    /// The health message (names the XID and what to do).
    pub message: String,
    /// The GPU left the inventory since (fell off the bus, is being reset); when it comes
    /// back, the verdict is cleared.
    #[serde(default)]
    pub gone: bool,
}

/// Unhealthy GPUs by GPU UUID (sorted).
pub type UnhealthyGpus = BTreeMap<String, UnhealthyGpu>;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Verdict {
    health: Health,
    since: i64,
    message: String,
    /// The critical XID, for unhealthy verdicts.
    xid: Option<u64>,
    /// The GPU is missing from the inventory.
    gone: bool,
}

struct Inner {
    inventory: Inventory,
    /// Verdict per GPU UUID; GPUs not listed are healthy since `started`.
    verdicts: BTreeMap<String, Verdict>,
    started: i64,
}

/// Health of the node's published devices; share it behind an `Arc`.
pub struct HealthState {
    pool: String,
    inner: Mutex<Inner>,
    tx: watch::Sender<HealthSnapshot>,
    unhealthy_tx: watch::Sender<UnhealthyGpus>,
}

/// Seconds since the Unix epoch now (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl HealthState {
    /// Every device of `inventory` healthy as of `now` (Unix seconds), pool `pool`.
    pub fn new(pool: impl Into<String>, inventory: Inventory, now: i64) -> Self {
        Self::restore(pool, inventory, now, UnhealthyGpus::new())
    }

    /// Like [`HealthState::new`], with the GPUs of `unhealthy` (verdicts persisted before
    /// a restart) unhealthy. A restored GPU missing from `inventory` is marked gone.
    pub fn restore(
        pool: impl Into<String>,
        inventory: Inventory,
        now: i64,
        unhealthy: UnhealthyGpus,
    ) -> Self {
        let mut verdicts = BTreeMap::new();
        for (uuid, u) in unhealthy {
            let present = inventory.gpus.iter().any(|g| g.uuid == uuid);
            verdicts.insert(
                uuid,
                Verdict {
                    health: Health::Unhealthy,
                    since: u.since,
                    message: u.message,
                    xid: Some(u.xid),
                    gone: u.gone || !present,
                },
            );
        }
        let inner = Inner {
            inventory,
            verdicts,
            started: now,
        };
        let pool = pool.into();
        let (tx, _) = watch::channel(project(&pool, &inner, now));
        let (unhealthy_tx, _) = watch::channel(unhealthy_of(&inner));
        Self {
            pool,
            inner: Mutex::new(inner),
            tx,
            unhealthy_tx,
        }
    }

    /// A receiver of the unhealthy GPUs; the current set is available at once.
    pub fn subscribe_unhealthy(&self) -> watch::Receiver<UnhealthyGpus> {
        self.unhealthy_tx.subscribe()
    }

    /// The GPUs currently unhealthy.
    pub fn unhealthy(&self) -> UnhealthyGpus {
        self.unhealthy_tx.borrow().clone()
    }

    /// A receiver of the snapshots; the current one is available at once.
    pub fn subscribe(&self) -> watch::Receiver<HealthSnapshot> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> HealthSnapshot {
        self.tx.borrow().clone()
    }

    /// Records XID `xid` raised by `uuid` (a GPU or MIG UUID) at `now`. Returns the new
    /// message if this made the GPU unhealthy (receivers are notified), `None` if health
    /// is unchanged (application XID, unlisted XID, unknown UUID, already unhealthy).
    pub fn record_xid(&self, uuid: &str, xid: u64, now: i64) -> Option<String> {
        let XidVerdict::Unhealthy(message) = classify(xid) else {
            return None;
        };
        self.update(|inner| {
            let gpu = inner
                .inventory
                .gpus
                .iter()
                .find(|g| g.uuid == uuid || g.mig_devices.iter().any(|m| m.uuid == uuid))?;
            let current = inner.verdicts.get(&gpu.uuid);
            if current.is_some_and(|v| v.health == Health::Unhealthy) {
                return None;
            }
            inner.verdicts.insert(
                gpu.uuid.clone(),
                Verdict {
                    health: Health::Unhealthy,
                    since: now,
                    message: message.clone(),
                    xid: Some(xid),
                    gone: false,
                },
            );
            Some(message)
        })
    }

    /// Clears the unhealthy verdict of GPU `gpu` (its UUID, or its device name
    /// `gpu-<minor>`), or of every GPU when `gpu` is `None`: an admin's word that the GPU
    /// was repaired. Returns the UUIDs cleared (receivers are notified if any).
    pub fn clear(&self, gpu: Option<&str>) -> Vec<String> {
        self.update(|inner| {
            let by_name: Option<String> = gpu.and_then(|g| {
                inner
                    .inventory
                    .gpus
                    .iter()
                    .find(|x| x.uuid == g || x.device_name() == g)
                    .map(|x| x.uuid.clone())
            });
            let cleared: Vec<String> = inner
                .verdicts
                .iter()
                .filter(|(uuid, v)| {
                    v.health == Health::Unhealthy
                        && gpu.is_none_or(|g| *uuid == g || by_name.as_deref() == Some(uuid))
                })
                .map(|(uuid, _)| uuid.clone())
                .collect();
            for uuid in &cleared {
                inner.verdicts.remove(uuid);
            }
            (!cleared.is_empty()).then_some(cleared)
        })
        .unwrap_or_default()
    }

    /// The health watch runs again: devices that were unknown are healthy from `now`.
    pub fn watch_restored(&self, now: i64) {
        self.update(|inner| {
            let before = inner.verdicts.len();
            inner.verdicts.retain(|_, v| v.health != Health::Unknown);
            if inner.verdicts.len() == before {
                return None;
            }
            inner.started = inner.started.max(now);
            Some(())
        });
    }

    /// Marks every GPU not already unhealthy as unknown (the health watch cannot run);
    /// `reason` becomes the message.
    pub fn watch_failed(&self, reason: &str, now: i64) {
        let message = truncate(format!("GPU health is not watched: {reason}"));
        self.update(|inner| {
            let uuids: Vec<String> = inner
                .inventory
                .gpus
                .iter()
                .map(|g| g.uuid.clone())
                .collect();
            for uuid in uuids {
                let verdict = inner.verdicts.entry(uuid).or_insert_with(|| Verdict {
                    health: Health::Unknown,
                    since: now,
                    message: message.clone(),
                    xid: None,
                    gone: false,
                });
                if verdict.health == Health::Healthy {
                    verdict.health = Health::Unknown;
                    verdict.since = now;
                    verdict.message.clone_from(&message);
                }
            }
            Some(())
        });
    }

    /// Replaces the inventory (MIG devices created or removed); verdicts stay with
    /// their GPU UUIDs. An unhealthy GPU missing from `inventory` is marked gone; a gone
    /// GPU that is back was reset (or replaced) and is healthy again. Receivers are
    /// notified only if something they see changed.
    pub fn set_inventory(&self, inventory: Inventory) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.inventory = inventory;
        let present: std::collections::BTreeSet<String> = inner
            .inventory
            .gpus
            .iter()
            .map(|g| g.uuid.clone())
            .collect();
        inner.verdicts.retain(|uuid, v| {
            if v.health != Health::Unhealthy {
                return true;
            }
            if !present.contains(uuid) {
                v.gone = true;
                return true;
            }
            if v.gone {
                tracing::info!(gpu = %uuid, "GPU is back after leaving the inventory (reset); its unhealthy verdict is cleared");
                return false;
            }
            true
        });
        let unhealthy = unhealthy_of(&inner);
        self.unhealthy_tx.send_if_modified(|current| {
            if *current == unhealthy {
                return false;
            }
            *current = unhealthy;
            true
        });
        let pool = &self.pool;
        self.tx.send_if_modified(|snapshot| {
            let next = project(pool, &inner, snapshot.checked_at);
            if next.devices == snapshot.devices {
                return false;
            }
            *snapshot = next;
            true
        });
    }

    /// Notes that the health watch confirmed the list at `now`, without notifying
    /// receivers (periodic resends carry it).
    pub fn checked(&self, now: i64) {
        self.tx.send_if_modified(|snapshot| {
            snapshot.checked_at = snapshot.checked_at.max(now);
            false
        });
    }

    fn update<T>(&self, change: impl FnOnce(&mut Inner) -> Option<T>) -> Option<T> {
        let mut inner = self.inner.lock().ok()?;
        let out = change(&mut inner)?;
        let pool = &self.pool;
        self.tx.send_modify(|snapshot| {
            *snapshot = project(pool, &inner, snapshot.checked_at);
        });
        let unhealthy = unhealthy_of(&inner);
        self.unhealthy_tx.send_if_modified(|current| {
            if *current == unhealthy {
                return false;
            }
            *current = unhealthy;
            true
        });
        Some(out)
    }
}

/// The unhealthy verdicts of `inner`.
fn unhealthy_of(inner: &Inner) -> UnhealthyGpus {
    inner
        .verdicts
        .iter()
        .filter(|(_, v)| v.health == Health::Unhealthy)
        .map(|(uuid, v)| {
            (
                uuid.clone(),
                UnhealthyGpu {
                    xid: v.xid.unwrap_or_default(),
                    since: v.since,
                    message: v.message.clone(),
                    gone: v.gone,
                },
            )
        })
        .collect()
}

/// The published devices of `inner.inventory` with their GPU's verdict.
fn project(pool: &str, inner: &Inner, checked_at: i64) -> HealthSnapshot {
    let healthy = Verdict {
        health: Health::Healthy,
        since: inner.started,
        message: String::new(),
        xid: None,
        gone: false,
    };
    let mut devices = Vec::new();
    for gpu in &inner.inventory.gpus {
        let verdict = inner.verdicts.get(&gpu.uuid).unwrap_or(&healthy);
        let names = if gpu.mig.enabled {
            gpu.mig_devices.iter().map(|m| m.device_name()).collect()
        } else {
            vec![gpu.device_name()]
        };
        devices.extend(names.into_iter().map(|device| DeviceHealth {
            pool: pool.to_owned(),
            device,
            gpu_uuid: gpu.uuid.clone(),
            health: verdict.health,
            last_updated: verdict.since,
            message: verdict.message.clone(),
        }));
    }
    devices.sort_by(|a, b| a.device.cmp(&b.device));
    HealthSnapshot {
        devices,
        checked_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::fixtures;
    use crate::slices::desired::{SliceFeatures, desired_devices};

    fn names(snapshot: &HealthSnapshot) -> Vec<String> {
        snapshot.devices.iter().map(|d| d.device.clone()).collect()
    }

    #[test]
    fn lists_exactly_the_published_devices_all_healthy() {
        let inventory = fixtures::dgx_h100();
        let mut published: Vec<String> = desired_devices(&inventory, &SliceFeatures::default())
            .into_iter()
            .map(|d| d.name)
            .collect();
        published.sort();
        let state = HealthState::new("node-1", inventory, 100);
        let snapshot = state.snapshot();
        assert_eq!(names(&snapshot), published);
        assert!(snapshot.devices.iter().all(|d| d.health == Health::Healthy
            && d.pool == "node-1"
            && d.last_updated == 100
            && d.message.is_empty()));
    }

    #[test]
    fn critical_xid_marks_the_gpu_and_its_mig_devices_unhealthy() {
        let inventory = fixtures::dgx_h100();
        let mig_gpu = inventory
            .gpus
            .iter()
            .find(|g| g.mig.enabled && !g.mig_devices.is_empty())
            .expect("fixture has a MIG GPU")
            .clone();
        let state = HealthState::new("node-1", inventory, 100);
        let mut rx = state.subscribe();
        rx.borrow_and_update();

        // An application XID changes nothing and notifies nobody.
        assert_eq!(state.record_xid(&mig_gpu.uuid, 13, 150), None);
        assert!(!rx.has_changed().unwrap());

        // Raised through a MIG UUID: the parent and all its MIG devices go unhealthy.
        let message = state
            .record_xid(&mig_gpu.mig_devices[0].uuid, 48, 200)
            .unwrap();
        assert!(message.starts_with("XID 48"));
        assert!(rx.has_changed().unwrap());
        let snapshot = rx.borrow_and_update().clone();
        for d in &snapshot.devices {
            if d.gpu_uuid == mig_gpu.uuid {
                assert_eq!(d.health, Health::Unhealthy, "{}", d.device);
                assert_eq!(d.last_updated, 200);
                assert_eq!(d.message, message);
            } else {
                assert_eq!(d.health, Health::Healthy, "{}", d.device);
            }
        }
        let unhealthy = snapshot
            .devices
            .iter()
            .filter(|d| d.health == Health::Unhealthy)
            .count();
        assert_eq!(unhealthy, mig_gpu.mig_devices.len());

        // A second critical XID keeps the first verdict.
        assert_eq!(state.record_xid(&mig_gpu.uuid, 79, 300), None);
        assert_eq!(state.record_xid("GPU-unknown", 79, 300), None);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn verdicts_survive_inventory_changes_and_checks_do_not_notify() {
        let inventory = fixtures::dgx_h100();
        let gpu = inventory
            .gpus
            .iter()
            .find(|g| !g.mig.enabled)
            .unwrap()
            .clone();
        let state = HealthState::new("node-1", inventory.clone(), 100);
        state.record_xid(&gpu.uuid, 79, 200).unwrap();
        let mut rx = state.subscribe();
        rx.borrow_and_update();

        state.checked(500);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(state.snapshot().checked_at, 500);

        state.set_inventory(inventory.clone());
        assert!(!rx.has_changed().unwrap(), "same devices, no notification");

        let mut fewer = inventory;
        fewer.gpus.retain(|g| g.uuid == gpu.uuid);
        state.set_inventory(fewer);
        assert!(rx.has_changed().unwrap());
        let snapshot = rx.borrow_and_update().clone();
        assert_eq!(snapshot.devices.len(), 1);
        assert_eq!(snapshot.devices[0].health, Health::Unhealthy);
        assert_eq!(snapshot.checked_at, 500);
    }

    #[test]
    fn failed_watch_makes_healthy_devices_unknown() {
        let inventory = fixtures::dgx_h100();
        let gpu = inventory.gpus[0].uuid.clone();
        let state = HealthState::new("node-1", inventory, 100);
        state.record_xid(&gpu, 79, 200).unwrap();
        state.watch_failed("NVML event sets not supported", 300);
        for d in state.snapshot().devices {
            if d.gpu_uuid == gpu {
                assert_eq!(d.health, Health::Unhealthy);
            } else {
                assert_eq!(d.health, Health::Unknown);
                assert!(d.message.contains("NVML event sets not supported"));
            }
        }
    }

    #[test]
    fn verdicts_restore_publish_and_clear_when_the_gpu_comes_back() {
        let inventory = fixtures::dgx_h100();
        let gpu = inventory
            .gpus
            .iter()
            .find(|g| g.mig.enabled)
            .unwrap()
            .clone();
        let state = HealthState::new("node-1", inventory.clone(), 100);
        let mut unhealthy = state.subscribe_unhealthy();
        unhealthy.borrow_and_update();
        state.record_xid(&gpu.uuid, 79, 200).unwrap();
        assert!(unhealthy.has_changed().unwrap());
        let saved = unhealthy.borrow_and_update().clone();
        assert_eq!(saved[&gpu.uuid].xid, 79);
        assert_eq!(saved[&gpu.uuid].since, 200);

        // A restarted plugin restores the verdict.
        let restored = HealthState::restore("node-1", inventory.clone(), 300, saved.clone());
        assert_eq!(restored.unhealthy(), saved);
        assert!(
            restored
                .snapshot()
                .devices
                .iter()
                .any(|d| d.gpu_uuid == gpu.uuid
                    && d.health == Health::Unhealthy
                    && d.last_updated == 200)
        );

        // The GPU leaves the inventory (reset in progress), then comes back healthy.
        let mut without = inventory.clone();
        without.gpus.retain(|g| g.uuid != gpu.uuid);
        restored.set_inventory(without);
        assert!(restored.unhealthy()[&gpu.uuid].gone);
        restored.set_inventory(inventory.clone());
        assert!(restored.unhealthy().is_empty());
        assert!(
            restored
                .snapshot()
                .devices
                .iter()
                .all(|d| d.health == Health::Healthy)
        );

        // An admin clears by device name.
        assert_eq!(state.clear(Some("gpu-99")), Vec::<String>::new());
        assert_eq!(
            state.clear(Some(&gpu.device_name())),
            vec![gpu.uuid.clone()]
        );
        assert!(state.unhealthy().is_empty());
    }

    #[test]
    fn a_restored_watch_makes_unknown_devices_healthy_and_keeps_verdicts() {
        let inventory = fixtures::dgx_h100();
        let gpu = inventory.gpus[0].uuid.clone();
        let state = HealthState::new("node-1", inventory, 100);
        state.record_xid(&gpu, 79, 200).unwrap();
        state.watch_failed("event set", 300);
        state.watch_restored(400);
        for d in state.snapshot().devices {
            let want = if d.gpu_uuid == gpu {
                Health::Unhealthy
            } else {
                Health::Healthy
            };
            assert_eq!(d.health, want, "{}", d.device);
        }
    }
}
