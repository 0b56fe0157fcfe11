//! The rules of the fake GPU: what each NVML operation does to [`State`] and which
//! `nvmlReturn_t` it answers, as the hardware and driver do.
//!
//! Pure: operates on a [`Topology`] and a `&mut State`, no I/O, no globals, so every rule is
//! unit-tested here. The FFI layer and `nvidia-smi` only translate arguments and call these.
//!
//! Behaviour followed (NVML API reference, MIG user guide):
//! - GPU instances need MIG mode enabled (`NOT_SUPPORTED` otherwise, as NVML documents for
//!   `nvmlDeviceCreateGpuInstance`); an unknown profile id is `INVALID_ARGUMENT`; a
//!   placement that is not one of the profile's documented starts is `INVALID_ARGUMENT`;
//!   overlap with an existing instance (in memory slices) or exceeding the profile's
//!   instance count is `INSUFFICIENT_RESOURCES`.
//! - Without a placement the lowest free documented start is used.
//! - Destroying a GPU instance that still has compute instances is `IN_USE`; disabling MIG
//!   while GPU instances exist is `IN_USE`.
//! - GPU instance ids are the smallest free id from 1, compute instance ids from 0.
//! - MIG mode changes apply at once (current = pending), as on an idle GPU; with
//!   `migModeRequiresReset` in the topology they stay pending (activation status
//!   `RESET_REQUIRED`) until [`Engine::reset_gpu`] (`nvidia-smi -r`). While processes
//!   hold the GPU (`clients`), a change cannot activate: activation status `IN_USE`, mode
//!   and pending mode unchanged ("the caller is expected to idle the device and retry").

use std::collections::BTreeMap;

use nvml_wrapper_sys::bindings as sys;

use crate::ids;
use crate::presets::{self, CiProfile, GiProfile};
use crate::state::{
    ComputeInstanceState, ComputeMode, GpuInstanceState, GpuState, State, XidEvent,
};
use crate::topology::{GpuSpec, ProfileRef, Topology};

/// An `nvmlReturn_t` value.
pub type Code = u32;

/// `NVML_SUCCESS`.
pub const SUCCESS: Code = sys::nvmlReturn_enum_NVML_SUCCESS;
/// `NVML_ERROR_UNINITIALIZED`.
pub const UNINITIALIZED: Code = sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
/// `NVML_ERROR_INVALID_ARGUMENT`.
pub const INVALID_ARGUMENT: Code = sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
/// `NVML_ERROR_NOT_SUPPORTED`.
pub const NOT_SUPPORTED: Code = sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
/// `NVML_ERROR_NOT_FOUND`.
pub const NOT_FOUND: Code = sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
/// `NVML_ERROR_INSUFFICIENT_SIZE`.
pub const INSUFFICIENT_SIZE: Code = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
/// `NVML_ERROR_DRIVER_NOT_LOADED`.
pub const DRIVER_NOT_LOADED: Code = sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
/// `NVML_ERROR_TIMEOUT`.
pub const TIMEOUT: Code = sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
/// `NVML_ERROR_RESET_REQUIRED`.
pub const RESET_REQUIRED: Code = sys::nvmlReturn_enum_NVML_ERROR_RESET_REQUIRED;
/// `NVML_ERROR_IN_USE`.
pub const IN_USE: Code = sys::nvmlReturn_enum_NVML_ERROR_IN_USE;
/// `NVML_ERROR_INSUFFICIENT_RESOURCES`.
pub const INSUFFICIENT_RESOURCES: Code = sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES;
/// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`.
pub const ARGUMENT_VERSION_MISMATCH: Code =
    sys::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
/// `NVML_ERROR_UNKNOWN`.
pub const UNKNOWN: Code = sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN;

/// Event types the fake reports as supported (XID, ECC, P-state, clock).
pub const SUPPORTED_EVENTS: u64 = (sys::nvmlEventTypeXidCriticalError
    | sys::nvmlEventTypeSingleBitEccError
    | sys::nvmlEventTypeDoubleBitEccError
    | sys::nvmlEventTypePState
    | sys::nvmlEventTypeClock) as u64;

/// `nvmlErrorString` text for `code`.
pub fn error_string(code: Code) -> &'static std::ffi::CStr {
    match code {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request",
        18 => c"RM has detected an NVML/RM version mismatch",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        22 => c"The requested vgpu operation is not available on target device, because ECC is enabled",
        23 => c"Insufficient resources",
        24 => c"Frequency not supported",
        25 => c"Argument version mismatch",
        26 => c"Deprecated",
        27 => c"Not ready",
        28 => c"GPU not found",
        29 => c"Invalid state",
        _ => c"Unknown Error",
    }
}

/// Build the power-on state of `topo`, creating its static instances by the runtime rules.
/// Errors name the GPU entry (`gpus[i]: ...`).
pub fn initial_state(topo: &Topology) -> Result<State, String> {
    let mut state = State::default();
    reconcile(topo, &mut state)?;
    Ok(state)
}

/// Add every topology GPU missing from `state` at its power-on settings (so a state file
/// made by the control API before any NVML user, or an older one, is completed).
pub fn reconcile(topo: &Topology, state: &mut State) -> Result<(), String> {
    for spec in &topo.gpus {
        if let Some(g) = state.gpus.get_mut(&spec.uuid) {
            g.index = spec.index;
            g.minor = spec.minor;
            continue;
        }
        state.gpus.insert(
            spec.uuid.clone(),
            GpuState {
                index: spec.index,
                minor: spec.minor,
                compute_mode: spec.compute_mode,
                timeslice: 0,
                mig_current: spec.mig_mode,
                mig_pending: spec.mig_mode,
                gpu_instances: BTreeMap::new(),
                clients: 0,
            },
        );
        let mut engine = Engine { topo, state };
        for (n, gi) in spec.gpu_instances.iter().enumerate() {
            let ctx = |what: &str, code: Code| {
                format!(
                    "gpus[{}].gpuInstances[{n}]: {what}: {}",
                    spec.index,
                    error_string(code).to_string_lossy()
                )
            };
            let profile = match &gi.profile {
                ProfileRef::Id(id) => spec.model.gi_profile_by_id(*id),
                ProfileRef::Name(name) => spec.model.gi_profile_by_name(name),
            }
            .ok_or_else(|| ctx("unknown profile", INVALID_ARGUMENT))?;
            let gi_id = engine
                .create_gpu_instance(spec.index, profile.id, gi.placement)
                .map_err(|c| ctx("creating GPU instance", c))?;
            let cis = match &gi.compute_instances {
                Some(list) => list.clone(),
                None => vec![format!("{}c", profile.slices)],
            };
            for ci in cis {
                let slices: u32 = ci
                    .strip_suffix('c')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        ctx(
                            &format!("compute instance {ci:?} is not <N>c"),
                            INVALID_ARGUMENT,
                        )
                    })?;
                let id = presets::ci_profile_id_for_slices(slices)
                    .ok_or_else(|| ctx(&format!("compute instance {ci}"), INVALID_ARGUMENT))?;
                engine
                    .create_compute_instance(spec.index, gi_id, id, None)
                    .map_err(|c| ctx(&format!("creating compute instance {ci}"), c))?;
            }
        }
    }
    Ok(())
}

fn overlaps(a_start: u32, a_size: u32, b_start: u32, b_size: u32) -> bool {
    a_start < b_start + b_size && b_start < a_start + a_size
}

/// The rules, over one topology and a state borrowed for one operation.
pub struct Engine<'a> {
    /// The machine.
    pub topo: &'a Topology,
    /// What it remembers.
    pub state: &'a mut State,
}

impl Engine<'_> {
    /// The GPU spec at `gpu`, or `INVALID_ARGUMENT`.
    pub fn spec(&self, gpu: u32) -> Result<&GpuSpec, Code> {
        self.topo.gpu(gpu).ok_or(INVALID_ARGUMENT)
    }

    /// The state of GPU `gpu`, or `INVALID_ARGUMENT`.
    pub fn gpu(&self, gpu: u32) -> Result<&GpuState, Code> {
        let spec = self.spec(gpu)?;
        self.state.gpus.get(&spec.uuid).ok_or(UNKNOWN)
    }

    fn gpu_mut(&mut self, gpu: u32) -> Result<&mut GpuState, Code> {
        let uuid = self.spec(gpu)?.uuid.clone();
        self.state.gpus.get_mut(&uuid).ok_or(UNKNOWN)
    }

    /// Fire an injected fault for `function` on `gpu` (`None` for system calls).
    pub fn fault(&mut self, function: &str, gpu: Option<u32>) -> Result<(), Code> {
        let uuid = gpu.and_then(|g| self.topo.gpu(g)).map(|s| s.uuid.clone());
        match self.state.take_fault(function, uuid.as_deref()) {
            Some(code) => Err(code),
            None => Ok(()),
        }
    }

    /// Set the compute mode from an `nvmlComputeMode_t` value.
    pub fn set_compute_mode(&mut self, gpu: u32, mode: u32) -> Result<(), Code> {
        let mode = ComputeMode::from_nvml(mode).ok_or(INVALID_ARGUMENT)?;
        self.gpu_mut(gpu)?.compute_mode = mode;
        Ok(())
    }

    /// Set the compute-policy time slice (0..=3).
    pub fn set_timeslice(&mut self, gpu: u32, value: u32) -> Result<(), Code> {
        if !self.spec(gpu)?.model.timeslice_supported {
            return Err(NOT_SUPPORTED);
        }
        if value > 3 {
            return Err(INVALID_ARGUMENT);
        }
        self.gpu_mut(gpu)?.timeslice = value;
        Ok(())
    }

    /// Set MIG mode (0/1); returns the activation status (`SUCCESS`, `IN_USE` while
    /// processes hold the GPU, or `RESET_REQUIRED` when the topology says the change waits
    /// for a GPU reset).
    pub fn set_mig_mode(&mut self, gpu: u32, mode: u32) -> Result<Code, Code> {
        let spec = self.spec(gpu)?;
        if !spec.model.mig_capable() {
            return Err(NOT_SUPPORTED);
        }
        let needs_reset = spec.mig_mode_requires_reset;
        let enable = match mode {
            sys::NVML_DEVICE_MIG_DISABLE => false,
            sys::NVML_DEVICE_MIG_ENABLE => true,
            _ => return Err(INVALID_ARGUMENT),
        };
        let g = self.gpu_mut(gpu)?;
        if !enable && !g.gpu_instances.is_empty() {
            return Err(IN_USE);
        }
        if g.clients > 0 && g.mig_current != enable {
            return Ok(IN_USE);
        }
        g.mig_pending = enable;
        if needs_reset && g.mig_current != enable {
            return Ok(RESET_REQUIRED);
        }
        g.mig_current = enable;
        Ok(SUCCESS)
    }

    /// Reset the GPU: pending MIG mode becomes current; `IN_USE` while GPU instances exist.
    pub fn reset_gpu(&mut self, gpu: u32) -> Result<(), Code> {
        let g = self.gpu_mut(gpu)?;
        if !g.gpu_instances.is_empty() {
            return Err(IN_USE);
        }
        g.mig_current = g.mig_pending;
        Ok(())
    }

    fn mig_profile(&self, gpu: u32, profile_id: u32) -> Result<&'static GiProfile, Code> {
        let spec = self.spec(gpu)?;
        if !spec.model.mig_capable() {
            return Err(NOT_SUPPORTED);
        }
        spec.model
            .gi_profile_by_id(profile_id)
            .ok_or(INVALID_ARGUMENT)
    }

    fn require_mig(&self, gpu: u32) -> Result<(), Code> {
        if !self.spec(gpu)?.model.mig_capable() || !self.gpu(gpu)?.mig_current {
            return Err(NOT_SUPPORTED);
        }
        Ok(())
    }

    /// GPU instance profile by NVML index (`nvmlDeviceGetGpuInstanceProfileInfo`).
    pub fn gpu_instance_profile(&self, gpu: u32, index: u32) -> Result<&'static GiProfile, Code> {
        let spec = self.spec(gpu)?;
        if !spec.model.mig_capable() {
            return Err(NOT_SUPPORTED);
        }
        if index >= sys::NVML_GPU_INSTANCE_PROFILE_COUNT {
            return Err(INVALID_ARGUMENT);
        }
        spec.model.gi_profile_by_index(index).ok_or(NOT_SUPPORTED)
    }

    /// Documented placements of `profile_id` as (start, size), in memory slices.
    pub fn possible_placements(&self, gpu: u32, profile_id: u32) -> Result<Vec<(u32, u32)>, Code> {
        let p = self.mig_profile(gpu, profile_id)?;
        Ok(p.placement_starts
            .iter()
            .map(|s| (*s, p.placement_size))
            .collect())
    }

    fn free_starts(&self, gpu: u32, p: &GiProfile) -> Result<Vec<u32>, Code> {
        let g = self.gpu(gpu)?;
        Ok(p.placement_starts
            .iter()
            .copied()
            .filter(|s| {
                g.gpu_instances.values().all(|gi| {
                    !overlaps(*s, p.placement_size, gi.placement_start, gi.placement_size)
                })
            })
            .collect())
    }

    /// How many more instances of `profile_id` fit (`nvmlDeviceGetGpuInstanceRemainingCapacity`).
    pub fn gpu_instance_remaining_capacity(&self, gpu: u32, profile_id: u32) -> Result<u32, Code> {
        let p = self.mig_profile(gpu, profile_id)?;
        self.require_mig(gpu)?;
        let g = self.gpu(gpu)?;
        let existing = g
            .gpu_instances
            .values()
            .filter(|gi| gi.profile_id == p.id)
            .count() as u32;
        let mut taken: Vec<(u32, u32)> = g
            .gpu_instances
            .values()
            .map(|gi| (gi.placement_start, gi.placement_size))
            .collect();
        let mut fit = 0;
        for s in p.placement_starts {
            if taken
                .iter()
                .all(|(ts, tz)| !overlaps(*s, p.placement_size, *ts, *tz))
            {
                taken.push((*s, p.placement_size));
                fit += 1;
            }
        }
        Ok(fit.min(p.instance_count.saturating_sub(existing)))
    }

    /// Create a GPU instance; `start` picks the placement. Returns its id.
    pub fn create_gpu_instance(
        &mut self,
        gpu: u32,
        profile_id: u32,
        start: Option<u32>,
    ) -> Result<u32, Code> {
        let p = self.mig_profile(gpu, profile_id)?;
        self.require_mig(gpu)?;
        if let Some(s) = start
            && !p.placement_starts.contains(&s)
        {
            return Err(INVALID_ARGUMENT);
        }
        let existing = self
            .gpu(gpu)?
            .gpu_instances
            .values()
            .filter(|gi| gi.profile_id == p.id)
            .count() as u32;
        if existing >= p.instance_count {
            return Err(INSUFFICIENT_RESOURCES);
        }
        let free = self.free_starts(gpu, p)?;
        let start = match start {
            Some(s) if free.contains(&s) => s,
            Some(_) => return Err(INSUFFICIENT_RESOURCES),
            None => *free.first().ok_or(INSUFFICIENT_RESOURCES)?,
        };
        let g = self.gpu_mut(gpu)?;
        let id = (1..)
            .find(|i| !g.gpu_instances.contains_key(i))
            .unwrap_or(u32::MAX);
        g.gpu_instances.insert(
            id,
            GpuInstanceState {
                id,
                profile_id: p.id,
                placement_start: start,
                placement_size: p.placement_size,
                compute_instances: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// Destroy GPU instance `gi`.
    pub fn destroy_gpu_instance(&mut self, gpu: u32, gi: u32) -> Result<(), Code> {
        let g = self.gpu_mut(gpu)?;
        let inst = g.gpu_instances.get(&gi).ok_or(INVALID_ARGUMENT)?;
        if !inst.compute_instances.is_empty() {
            return Err(IN_USE);
        }
        g.gpu_instances.remove(&gi);
        Ok(())
    }

    /// Ids of the GPU instances of `profile_id`, ascending.
    pub fn gpu_instances(&self, gpu: u32, profile_id: u32) -> Result<Vec<u32>, Code> {
        let p = self.mig_profile(gpu, profile_id)?;
        self.require_mig(gpu)?;
        Ok(self
            .gpu(gpu)?
            .gpu_instances
            .values()
            .filter(|gi| gi.profile_id == p.id)
            .map(|gi| gi.id)
            .collect())
    }

    /// GPU instance `gi`, or `NOT_FOUND`.
    pub fn gpu_instance(&self, gpu: u32, gi: u32) -> Result<&GpuInstanceState, Code> {
        self.require_mig(gpu)?;
        self.gpu(gpu)?.gpu_instances.get(&gi).ok_or(NOT_FOUND)
    }

    /// Compute instance profiles GI `gi` offers.
    pub fn compute_instance_profiles(&self, gpu: u32, gi: u32) -> Result<Vec<CiProfile>, Code> {
        let spec = self.spec(gpu)?;
        let inst = self.gpu_instance(gpu, gi).map_err(|_| INVALID_ARGUMENT)?;
        let p = spec
            .model
            .gi_profile_by_id(inst.profile_id)
            .ok_or(UNKNOWN)?;
        Ok(presets::ci_profiles(spec.model, p))
    }

    /// Compute instance profile `ci_profile` of GI `gi`.
    pub fn compute_instance_profile(
        &self,
        gpu: u32,
        gi: u32,
        ci_profile: u32,
    ) -> Result<CiProfile, Code> {
        if ci_profile >= sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            return Err(INVALID_ARGUMENT);
        }
        self.compute_instance_profiles(gpu, gi)?
            .into_iter()
            .find(|c| c.id == ci_profile)
            .ok_or(NOT_SUPPORTED)
    }

    fn ci_free_starts(&self, gpu: u32, gi: u32, c: &CiProfile) -> Result<Vec<u32>, Code> {
        let inst = self.gpu_instance(gpu, gi)?;
        Ok(c.placement_starts
            .iter()
            .copied()
            .filter(|s| {
                inst.compute_instances
                    .values()
                    .all(|ci| !overlaps(*s, c.slices, ci.placement_start, ci.placement_size))
            })
            .collect())
    }

    /// How many more compute instances of `ci_profile` fit in GI `gi`.
    pub fn compute_instance_remaining_capacity(
        &self,
        gpu: u32,
        gi: u32,
        ci_profile: u32,
    ) -> Result<u32, Code> {
        let c = self.compute_instance_profile(gpu, gi, ci_profile)?;
        let inst = self.gpu_instance(gpu, gi)?;
        let mut taken: Vec<(u32, u32)> = inst
            .compute_instances
            .values()
            .map(|ci| (ci.placement_start, ci.placement_size))
            .collect();
        let mut fit = 0;
        for s in &c.placement_starts {
            if taken
                .iter()
                .all(|(ts, tz)| !overlaps(*s, c.slices, *ts, *tz))
            {
                taken.push((*s, c.slices));
                fit += 1;
            }
        }
        Ok(fit)
    }

    /// Create a compute instance in GI `gi`; returns its id.
    pub fn create_compute_instance(
        &mut self,
        gpu: u32,
        gi: u32,
        ci_profile: u32,
        start: Option<u32>,
    ) -> Result<u32, Code> {
        let c = self.compute_instance_profile(gpu, gi, ci_profile)?;
        if let Some(s) = start
            && !c.placement_starts.contains(&s)
        {
            return Err(INVALID_ARGUMENT);
        }
        let free = self.ci_free_starts(gpu, gi, &c)?;
        let start = match start {
            Some(s) if free.contains(&s) => s,
            Some(_) => return Err(INSUFFICIENT_RESOURCES),
            None => *free.first().ok_or(INSUFFICIENT_RESOURCES)?,
        };
        let gpu_uuid = self.spec(gpu)?.uuid.clone();
        self.state.mig_generation += 1;
        let generation = self.state.mig_generation;
        let inst = self
            .gpu_mut(gpu)?
            .gpu_instances
            .get_mut(&gi)
            .ok_or(INVALID_ARGUMENT)?;
        let id = (0..)
            .find(|i| !inst.compute_instances.contains_key(i))
            .unwrap_or(u32::MAX);
        inst.compute_instances.insert(
            id,
            ComputeInstanceState {
                id,
                profile_id: c.id,
                placement_start: start,
                placement_size: c.slices,
                uuid: ids::mig_uuid(&gpu_uuid, gi, id, generation),
            },
        );
        Ok(id)
    }

    /// Destroy compute instance `ci` of GI `gi`.
    pub fn destroy_compute_instance(&mut self, gpu: u32, gi: u32, ci: u32) -> Result<(), Code> {
        let inst = self
            .gpu_mut(gpu)?
            .gpu_instances
            .get_mut(&gi)
            .ok_or(INVALID_ARGUMENT)?;
        inst.compute_instances
            .remove(&ci)
            .map(|_| ())
            .ok_or(INVALID_ARGUMENT)
    }

    /// Compute instance `ci` of GI `gi`.
    pub fn compute_instance(
        &self,
        gpu: u32,
        gi: u32,
        ci: u32,
    ) -> Result<&ComputeInstanceState, Code> {
        self.gpu_instance(gpu, gi)?
            .compute_instances
            .get(&ci)
            .ok_or(NOT_FOUND)
    }

    /// MIG devices of `gpu` as (gi, ci), in the order NVML indexes them.
    pub fn mig_devices(&self, gpu: u32) -> Result<Vec<(u32, u32)>, Code> {
        let g = self.gpu(gpu)?;
        if !g.mig_current {
            return Ok(Vec::new());
        }
        Ok(g.gpu_instances
            .values()
            .flat_map(|gi| gi.compute_instances.keys().map(move |ci| (gi.id, *ci)))
            .collect())
    }

    /// The GI profile and CI state behind a MIG device handle; `INVALID_ARGUMENT` if stale.
    pub fn mig_device(
        &self,
        gpu: u32,
        gi: u32,
        ci: u32,
    ) -> Result<(&'static GiProfile, &ComputeInstanceState), Code> {
        let spec = self.spec(gpu)?;
        let inst = self.gpu_instance(gpu, gi).map_err(|_| INVALID_ARGUMENT)?;
        let c = inst.compute_instances.get(&ci).ok_or(INVALID_ARGUMENT)?;
        let p = spec
            .model
            .gi_profile_by_id(inst.profile_id)
            .ok_or(UNKNOWN)?;
        Ok((p, c))
    }

    /// Name of a MIG device: `<product> MIG <profile>` as NVML reports it.
    pub fn mig_device_name(&self, gpu: u32, gi: u32, ci: u32) -> Result<String, Code> {
        let spec = self.spec(gpu)?;
        let (p, c) = self.mig_device(gpu, gi, ci)?;
        let cp = presets::ci_profiles(spec.model, p)
            .into_iter()
            .find(|x| x.id == c.profile_id)
            .ok_or(UNKNOWN)?;
        Ok(format!("{} MIG {}", spec.model.name, cp.name(p)))
    }

    /// Record an XID event on `gpu_uuid`; returns its sequence number.
    pub fn push_xid(state: &mut State, gpu_uuid: &str, xid: u64) -> u64 {
        let seq = state.xid_events.last().map_or(0, |e| e.seq) + 1;
        state.xid_events.push(XidEvent {
            seq,
            gpu_uuid: gpu_uuid.to_string(),
            xid,
        });
        seq
    }

    /// The first XID event after `after` on a GPU registered (by index) for XID events.
    pub fn next_xid(&self, after: u64, registered: &BTreeMap<u32, u64>) -> Option<(u32, XidEvent)> {
        self.state
            .xid_events
            .iter()
            .filter(|e| e.seq > after)
            .find_map(|e| {
                let spec = self.topo.gpu_by_uuid(&e.gpu_uuid)?;
                let mask = registered.get(&spec.index)?;
                (mask & u64::from(sys::nvmlEventTypeXidCriticalError) != 0)
                    .then(|| (spec.index, e.clone()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn topo(model: &str) -> Topology {
        let text = format!("gpus:\n  - model: {model}\n    migMode: true\n  - model: {model}\n");
        Topology::parse(&text, Path::new("t")).unwrap()
    }

    fn with<R>(t: &Topology, s: &mut State, f: impl FnOnce(&mut Engine<'_>) -> R) -> R {
        f(&mut Engine { topo: t, state: s })
    }

    #[test]
    fn h100_full_layouts_from_the_mig_guide_fit_exactly() {
        let t = topo("H100-SXM5-80GB");
        // 7 x 1g.10gb; 3 x 2g.20gb + 1 x 1g.10gb; 4g.40gb + 3g.40gb; 2 x 3g.40gb; 7g.80gb;
        // 4 x 1g.20gb.
        let layouts: [&[u32]; 6] = [
            &[19; 7],
            &[14, 14, 14, 19],
            &[5, 9],
            &[9, 9],
            &[0],
            &[15; 4],
        ];
        for layout in layouts {
            let mut s = initial_state(&t).unwrap();
            with(&t, &mut s, |e| {
                for p in layout {
                    e.create_gpu_instance(0, *p, None).unwrap();
                }
                for p in [19, 20, 15, 14, 9, 5, 0] {
                    assert_eq!(
                        e.gpu_instance_remaining_capacity(0, p),
                        Ok(0),
                        "{layout:?} {p}"
                    );
                    assert_eq!(
                        e.create_gpu_instance(0, p, None),
                        Err(INSUFFICIENT_RESOURCES)
                    );
                }
            });
        }
    }

    #[test]
    fn empty_gpu_placements_and_capacities_match_the_mig_user_guide() {
        // `nvidia-smi mig -lgipp` / `-lgip` on an empty A100 or H100 (same layout).
        let documented: [(u32, &[u32], u32, u32); 7] = [
            (19, &[0, 1, 2, 3, 4, 5, 6], 1, 7),
            (20, &[0, 1, 2, 3, 4, 5, 6], 1, 1),
            (15, &[0, 2, 4, 6], 2, 4),
            (14, &[0, 2, 4], 2, 3),
            (9, &[0, 4], 4, 2),
            (5, &[0], 4, 1),
            (0, &[0], 8, 1),
        ];
        for model in ["A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB", "H200"] {
            let t = topo(model);
            let mut s = initial_state(&t).unwrap();
            with(&t, &mut s, |e| {
                for (id, starts, size, capacity) in documented {
                    let want: Vec<(u32, u32)> = starts.iter().map(|s| (*s, size)).collect();
                    assert_eq!(e.possible_placements(0, id).unwrap(), want, "{model} {id}");
                    assert_eq!(
                        e.gpu_instance_remaining_capacity(0, id),
                        Ok(capacity),
                        "{model} {id}"
                    );
                }
            });
        }
    }

    #[test]
    fn a100_placement_and_capacity_rules() {
        let t = topo("A100-SXM4-40GB");
        let mut s = initial_state(&t).unwrap();
        with(&t, &mut s, |e| {
            assert_eq!(e.possible_placements(0, 9).unwrap(), vec![(0, 4), (4, 4)]);
            assert_eq!(e.possible_placements(0, 0).unwrap(), vec![(0, 8)]);
            assert_eq!(
                e.possible_placements(0, 15).unwrap(),
                vec![(0, 2), (2, 2), (4, 2), (6, 2)]
            );
            assert_eq!(e.gpu_instance_remaining_capacity(0, 19), Ok(7));
            assert_eq!(e.gpu_instance_remaining_capacity(0, 20), Ok(1));
            // Unknown profile, undocumented placement, overlap.
            assert_eq!(e.create_gpu_instance(0, 7, None), Err(INVALID_ARGUMENT));
            assert_eq!(e.create_gpu_instance(0, 9, Some(2)), Err(INVALID_ARGUMENT));
            let gi = e.create_gpu_instance(0, 9, Some(4)).unwrap();
            assert_eq!(gi, 1);
            assert_eq!(
                e.create_gpu_instance(0, 14, Some(4)),
                Err(INSUFFICIENT_RESOURCES)
            );
            // 3g at 4 leaves room for one 3g/4g at 0, or 1g at 0..3.
            assert_eq!(e.gpu_instance_remaining_capacity(0, 9), Ok(1));
            assert_eq!(e.gpu_instance_remaining_capacity(0, 5), Ok(1));
            assert_eq!(e.gpu_instance_remaining_capacity(0, 19), Ok(4));
            assert_eq!(e.gpu_instance_remaining_capacity(0, 0), Ok(0));
            // +me: only one at a time.
            e.create_gpu_instance(0, 20, None).unwrap();
            assert_eq!(
                e.create_gpu_instance(0, 20, None),
                Err(INSUFFICIENT_RESOURCES)
            );
            // CIs inside the 3g: a 2c at 0 leaves room for one 1c, at 2.
            let c0 = e.create_compute_instance(0, gi, 1, None).unwrap();
            assert_eq!(
                e.create_compute_instance(0, gi, 1, None),
                Err(INSUFFICIENT_RESOURCES)
            );
            assert_eq!(
                e.create_compute_instance(0, gi, 4, None),
                Err(NOT_SUPPORTED)
            );
            assert_eq!(
                e.create_compute_instance(0, gi, 99, None),
                Err(INVALID_ARGUMENT)
            );
            let c1 = e.create_compute_instance(0, gi, 0, None).unwrap();
            assert_eq!(e.compute_instance_remaining_capacity(0, gi, 0), Ok(0));
            assert_eq!((c0, c1), (0, 1));
            assert_eq!(e.compute_instance(0, gi, 1).unwrap().placement_start, 2);
            assert_eq!(e.mig_devices(0).unwrap(), vec![(1, 0), (1, 1)]);
            assert_eq!(
                e.mig_device_name(0, 1, 0).unwrap(),
                "NVIDIA A100-SXM4-40GB MIG 2c.3g.20gb"
            );
            assert_eq!(e.destroy_gpu_instance(0, gi), Err(IN_USE));
            assert_eq!(e.set_mig_mode(0, 0), Err(IN_USE));
            e.destroy_compute_instance(0, gi, 0).unwrap();
            e.destroy_compute_instance(0, gi, 1).unwrap();
            e.destroy_gpu_instance(0, gi).unwrap();
        });
    }

    #[test]
    fn mig_mode_change_on_a_busy_gpu_does_not_activate() {
        let t = topo("H100-SXM5-80GB");
        let mut s = initial_state(&t).unwrap();
        with(&t, &mut s, |e| {
            e.gpu_mut(0).unwrap().clients = 1;
            assert_eq!(e.set_mig_mode(0, 0), Ok(IN_USE));
            let g = e.gpu(0).unwrap();
            assert_eq!((g.mig_current, g.mig_pending), (true, true));
            // Asking for the mode already in effect is no change.
            assert_eq!(e.set_mig_mode(0, 1), Ok(SUCCESS));
            e.gpu_mut(0).unwrap().clients = 0;
            assert_eq!(e.set_mig_mode(0, 0), Ok(SUCCESS));
            let g = e.gpu(0).unwrap();
            assert_eq!((g.mig_current, g.mig_pending), (false, false));
            assert_eq!(e.set_mig_mode(0, 1), Ok(SUCCESS));
        });
    }

    #[test]
    fn mig_disabled_and_non_mig_models_refuse_instances() {
        let t = topo("A100-SXM4-80GB");
        let mut s = initial_state(&t).unwrap();
        with(&t, &mut s, |e| {
            assert_eq!(e.create_gpu_instance(1, 19, None), Err(NOT_SUPPORTED));
            assert_eq!(e.set_mig_mode(1, 1), Ok(SUCCESS));
            assert_eq!(e.create_gpu_instance(1, 19, None), Ok(1));
        });
        let t = Topology::parse(
            "gpus: [{model: H200, migModeRequiresReset: true}]",
            Path::new("t"),
        )
        .unwrap();
        let mut s = initial_state(&t).unwrap();
        with(&t, &mut s, |e| {
            assert_eq!(e.set_mig_mode(0, 1), Ok(RESET_REQUIRED));
            let g = e.gpu(0).unwrap();
            assert_eq!((g.mig_current, g.mig_pending), (false, true));
            assert_eq!(e.create_gpu_instance(0, 0, None), Err(NOT_SUPPORTED));
            e.reset_gpu(0).unwrap();
            assert_eq!(e.create_gpu_instance(0, 0, None), Ok(1));
            assert_eq!(e.reset_gpu(0), Err(IN_USE));
        });
        let t = Topology::parse("gpus: [{model: L40S}]", Path::new("t")).unwrap();
        let mut s = initial_state(&t).unwrap();
        with(&t, &mut s, |e| {
            assert_eq!(e.set_mig_mode(0, 1), Err(NOT_SUPPORTED));
            assert_eq!(e.gpu_instance_profile(0, 0), Err(NOT_SUPPORTED));
            assert_eq!(e.set_timeslice(0, 2), Ok(()));
            assert_eq!(e.set_timeslice(0, 4), Err(INVALID_ARGUMENT));
            assert_eq!(e.set_compute_mode(0, 3), Ok(()));
            assert_eq!(e.set_compute_mode(0, 1), Err(INVALID_ARGUMENT));
        });
        assert_eq!(
            s.gpus.values().next().unwrap().compute_mode,
            ComputeMode::ExclusiveProcess
        );
        let t = Topology::parse("gpus: [{model: T4}]", Path::new("t")).unwrap();
        let mut s = initial_state(&t).unwrap();
        with(&t, &mut s, |e| {
            assert_eq!(e.set_timeslice(0, 1), Err(NOT_SUPPORTED))
        });
    }

    #[test]
    fn recreated_mig_devices_get_new_uuids_and_xids_are_routed() {
        let t = topo("H100-SXM5-80GB");
        let mut s = initial_state(&t).unwrap();
        let (a, b) = with(&t, &mut s, |e| {
            let gi = e.create_gpu_instance(0, 0, None).unwrap();
            e.create_compute_instance(0, gi, 4, None).unwrap();
            let a = e.compute_instance(0, gi, 0).unwrap().uuid.clone();
            e.destroy_compute_instance(0, gi, 0).unwrap();
            e.create_compute_instance(0, gi, 4, None).unwrap();
            (a, e.compute_instance(0, gi, 0).unwrap().uuid.clone())
        });
        assert_ne!(a, b);
        let uuid1 = t.gpus[1].uuid.clone();
        Engine::push_xid(&mut s, &t.gpus[0].uuid, 13);
        Engine::push_xid(&mut s, &uuid1, 79);
        let regs = BTreeMap::from([(1u32, SUPPORTED_EVENTS)]);
        let e = Engine {
            topo: &t,
            state: &mut s,
        };
        let (gpu, ev) = e.next_xid(0, &regs).unwrap();
        assert_eq!((gpu, ev.xid, ev.seq), (1, 79, 2));
        assert!(e.next_xid(2, &regs).is_none());
    }
}
