//! Consumable shares of a full GPU: the capacities a shareable GPU is published with, and
//! the reading of what an allocation consumed from them.
//!
//! Owns the share capacity names, units and request policies (KEP-5075 consumable
//! capacity, `resource.k8s.io/v1`, beta and on by default since Kubernetes 1.36), and the
//! parsing of `status.allocation.devices.results[].consumedCapacity` into a [`Share`].
//! Pure: no I/O. It must not enforce anything; limits are applied at prepare by the
//! sharing code, which reads [`Share`].
//!
//! Names follow NVIDIA's DRA driver where it has them (`--consumable-shares` with
//! `disabled`, `memory` or a share count; capacities `memory` in bytes with a 1Mi step and
//! `shares` in count mode). `compute` (percent of the GPU's SMs) is ours. Upstream facts
//! this module relies on (k8s.io/api resource/v1 types and validation, 1.37):
//!
//! - a `requestPolicy` needs `allowMultipleAllocations: true`; `validRange.min` is
//!   required, `(default - min)` and `(max - min)` must be multiples of `step`, and
//!   `max <= value`;
//! - a request without an amount for a capacity consumes `requestPolicy.default`; an
//!   amount off the step is rounded up to the next step; an amount above `max` makes the
//!   device unsuitable (the scheduler reports the claim cannot be allocated);
//! - a DeviceClass cannot carry a default consumption, and the scheduler builds the claim
//!   of an extended resource (`nvidia.com/gpu.shared: 1`) with a device count only, so a
//!   share size without amounts in the claim can only come from the slice's
//!   `requestPolicy.default`: that is why the share count is a node setting.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::resource::v1::{
    CapacityRequestPolicy, CapacityRequestPolicyRange, Device, DeviceCapacity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use thiserror::Error;

use crate::config::quantity::parse_quantity;

/// Capacity name of the GPU memory a share may use, in bytes.
pub const MEMORY: &str = "memory";
/// Capacity name of the share of the GPU's streaming multiprocessors, in percent (0..=100).
pub const COMPUTE: &str = "compute";
/// Capacity name of the share count (count mode only): the GPU holds `N` shares.
pub const SHARES: &str = "shares";
/// Granularity of memory amounts, bytes (1 MiB, as NVIDIA's driver uses).
pub const MEMORY_STEP_BYTES: u64 = 1 << 20;
/// The whole GPU's compute, percent.
pub const COMPUTE_WHOLE: u64 = 100;
/// Most shares per GPU in count mode: each share needs at least 1% of compute.
pub const MAX_SHARE_COUNT: u32 = 100;

/// How the full GPUs of this node are published (`--consumable-shares`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsumableShares {
    /// Exclusive devices (no `allowMultipleAllocations`), as before.
    #[default]
    Disabled,
    /// Shareable by `memory` and `compute`; an amount a claim leaves out defaults to the
    /// whole GPU, so a claim that asks for nothing still gets the GPU to itself.
    Memory,
    /// Shareable, and a claim that asks for nothing gets 1/N of the GPU (memory and
    /// compute) and one of N `shares`: the `nvidia.com/gpu.shared` mode.
    Count(u32),
}

impl ConsumableShares {
    /// Whether full GPUs are published shareable.
    pub fn enabled(self) -> bool {
        self != ConsumableShares::Disabled
    }
}

/// `--consumable-shares` values that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SharesModeError {
    /// `unlimited`: NVIDIA's mode with a default of 0 bytes has no budget to enforce.
    #[error(
        "--consumable-shares=unlimited is not supported: a share without a memory budget cannot be limited; use `memory` (claims state their amounts) or a share count such as 4"
    )]
    Unlimited,
    /// A share count of 0 or above [`MAX_SHARE_COUNT`].
    #[error(
        "--consumable-shares={0}: a share count must be 1..=100 (each share gets at least 1% of compute)"
    )]
    CountOutOfRange(String),
    /// Anything else.
    #[error("--consumable-shares={0}: expected `disabled`, `memory` or a share count 1..=100")]
    Unknown(String),
}

impl FromStr for ConsumableShares {
    type Err = SharesModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "disabled" => Ok(ConsumableShares::Disabled),
            "memory" => Ok(ConsumableShares::Memory),
            "unlimited" => Err(SharesModeError::Unlimited),
            other => match other.parse::<u64>() {
                Ok(n) if (1..=u64::from(MAX_SHARE_COUNT)).contains(&n) => {
                    Ok(ConsumableShares::Count(n as u32))
                }
                Ok(_) => Err(SharesModeError::CountOutOfRange(other.to_owned())),
                Err(_) if other.starts_with('-') && other[1..].parse::<u64>().is_ok() => {
                    Err(SharesModeError::CountOutOfRange(other.to_owned()))
                }
                Err(_) => Err(SharesModeError::Unknown(other.to_owned())),
            },
        }
    }
}

impl fmt::Display for ConsumableShares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsumableShares::Disabled => f.write_str("disabled"),
            ConsumableShares::Memory => f.write_str("memory"),
            ConsumableShares::Count(n) => write!(f, "{n}"),
        }
    }
}

/// Makes `device` (a full GPU with `memory_bytes` of memory) shareable per `mode`: sets
/// `allowMultipleAllocations` and the `memory`, `compute` (and in count mode `shares`)
/// capacities with their request policies. Leaves the device untouched when disabled.
///
/// Memory is published rounded down to [`MEMORY_STEP_BYTES`] so that the policy's `max`
/// and `default` sit on the step, as the API server requires.
pub fn make_shareable(device: &mut Device, memory_bytes: u64, mode: ConsumableShares) {
    let divisor = match mode {
        ConsumableShares::Disabled => return,
        ConsumableShares::Memory => 1,
        ConsumableShares::Count(n) => u64::from(n.max(1)),
    };
    let memory = memory_bytes / MEMORY_STEP_BYTES * MEMORY_STEP_BYTES;
    let capacity = device.capacity.get_or_insert_with(BTreeMap::new);
    // The API server wants min + step <= value: a GPU of under 2 MiB keeps its plain
    // memory capacity (no policy; an allocation then consumes all of it).
    if memory >= 2 * MEMORY_STEP_BYTES {
        let default = (memory / divisor / MEMORY_STEP_BYTES).max(1) * MEMORY_STEP_BYTES;
        capacity.insert(
            MEMORY.to_owned(),
            ranged(memory, default, MEMORY_STEP_BYTES, MEMORY_STEP_BYTES),
        );
    }
    let compute_default = (COMPUTE_WHOLE / divisor).max(1);
    capacity.insert(
        COMPUTE.to_owned(),
        ranged(COMPUTE_WHOLE, compute_default, 1, 1),
    );
    if let ConsumableShares::Count(n) = mode {
        capacity.insert(SHARES.to_owned(), ranged(n.into(), 1, 1, 1));
    }
    device.allow_multiple_allocations = Some(true);
}

/// A capacity of `value` with policy `{default, validRange {min, max: value, step}}`; the
/// step is left out where `min + step` would pass `value` (the API server refuses that),
/// e.g. `shares` of a count of 1.
fn ranged(value: u64, default: u64, min: u64, step: u64) -> DeviceCapacity {
    let q = |v: u64| Quantity(v.to_string());
    DeviceCapacity {
        value: q(value),
        request_policy: Some(CapacityRequestPolicy {
            default: Some(q(default)),
            valid_range: Some(CapacityRequestPolicyRange {
                min: q(min),
                max: Some(q(value)),
                step: (min + step <= value).then(|| q(step)),
            }),
            valid_values: None,
        }),
    }
}

/// What one allocation of a shareable GPU consumed, read from the allocation result's
/// `consumedCapacity` (the scheduler's figures after rounding to the request policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// GPU memory the share may use, bytes (`memory`).
    pub memory_bytes: u64,
    /// Percent of the GPU's streaming multiprocessors (`compute`), 0..=100.
    pub compute_percent: u8,
    /// Shares of the GPU's N (`shares`), in count mode only.
    pub shares: Option<u32>,
}

/// A `consumedCapacity` map that is not a share of a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShareError {
    /// A capacity is missing: the device was not published shareable.
    #[error("consumedCapacity has no `{0}`: the GPU was not published with consumable shares")]
    Missing(&'static str),
    /// A value is not a whole, non-negative quantity.
    #[error("consumedCapacity `{name}` = {value:?} is not a whole non-negative quantity")]
    Invalid {
        /// Capacity name.
        name: &'static str,
        /// The value as the claim status has it.
        value: String,
    },
    /// Compute above 100 percent.
    #[error("consumedCapacity `compute` = {0} is above 100 (percent of the GPU)")]
    ComputeAbove100(u64),
}

impl Share {
    /// Reads a share from a result's `consumedCapacity`; `Ok(None)` when the map is absent
    /// or empty (an exclusive allocation, the device was not shareable).
    ///
    /// Errors: [`ShareError`] when `memory` or `compute` is missing or malformed, or
    /// compute is above 100 (a slice edited by hand, or another driver's device).
    pub fn from_consumed(
        consumed: Option<&BTreeMap<String, Quantity>>,
    ) -> Result<Option<Share>, ShareError> {
        let Some(map) = consumed.filter(|m| !m.is_empty()) else {
            return Ok(None);
        };
        let read = |name: &'static str| -> Result<Option<u64>, ShareError> {
            map.get(name)
                .map(|q| {
                    parse_quantity(&q.0)
                        .ok()
                        .and_then(|v| u64::try_from(v).ok())
                        .ok_or_else(|| ShareError::Invalid {
                            name,
                            value: q.0.clone(),
                        })
                })
                .transpose()
        };
        let memory_bytes = read(MEMORY)?.ok_or(ShareError::Missing(MEMORY))?;
        let compute = read(COMPUTE)?.ok_or(ShareError::Missing(COMPUTE))?;
        let compute_percent = u8::try_from(compute)
            .ok()
            .filter(|c| u64::from(*c) <= COMPUTE_WHOLE)
            .ok_or(ShareError::ComputeAbove100(compute))?;
        let shares = read(SHARES)?.map(|s| u32::try_from(s).unwrap_or(u32::MAX));
        Ok(Some(Share {
            memory_bytes,
            compute_percent,
            shares,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L40S: u64 = 46_068 << 20;

    fn policy(d: &Device, name: &str) -> (String, String, String, String, String) {
        let c = &d.capacity.as_ref().expect("capacity")[name];
        let p = c.request_policy.as_ref().expect("policy");
        let r = p.valid_range.as_ref().expect("range");
        let s = |q: &Option<Quantity>| q.as_ref().expect("set").0.clone();
        let min = r.min.0.clone();
        (c.value.0.clone(), s(&p.default), min, s(&r.max), s(&r.step))
    }

    fn device() -> Device {
        Device {
            name: "gpu-0".into(),
            capacity: Some(BTreeMap::from([(
                MEMORY.to_owned(),
                DeviceCapacity {
                    value: Quantity((L40S + 123).to_string()),
                    request_policy: None,
                },
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn modes_parse_with_clear_errors() {
        assert_eq!("disabled".parse(), Ok(ConsumableShares::Disabled));
        assert_eq!("".parse(), Ok(ConsumableShares::Disabled));
        assert_eq!("memory".parse(), Ok(ConsumableShares::Memory));
        assert_eq!("4".parse(), Ok(ConsumableShares::Count(4)));
        assert_eq!("100".parse(), Ok(ConsumableShares::Count(100)));
        assert_eq!(
            "unlimited".parse::<ConsumableShares>(),
            Err(SharesModeError::Unlimited)
        );
        for bad in ["0", "101", "-3"] {
            let err = bad.parse::<ConsumableShares>().unwrap_err();
            assert_eq!(err, SharesModeError::CountOutOfRange(bad.into()));
            assert!(err.to_string().contains("1..=100"), "{err}");
        }
        let err = "half".parse::<ConsumableShares>().unwrap_err();
        assert!(err.to_string().contains("`disabled`, `memory`"), "{err}");
        for mode in [
            ConsumableShares::Disabled,
            ConsumableShares::Memory,
            ConsumableShares::Count(8),
        ] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
    }

    #[test]
    fn disabled_leaves_the_device_exclusive() {
        let mut d = device();
        make_shareable(&mut d, L40S + 123, ConsumableShares::Disabled);
        assert_eq!(d, device());
    }

    #[test]
    fn memory_mode_defaults_to_the_whole_gpu() {
        let mut d = device();
        make_shareable(&mut d, L40S + 123, ConsumableShares::Memory);
        assert_eq!(d.allow_multiple_allocations, Some(true));
        let whole = L40S.to_string();
        assert_eq!(
            policy(&d, MEMORY),
            (
                whole.clone(),
                whole.clone(),
                "1048576".into(),
                whole,
                "1048576".into()
            ),
            "memory rounded down to the 1Mi step; default whole"
        );
        assert_eq!(
            policy(&d, COMPUTE),
            (
                "100".into(),
                "100".into(),
                "1".into(),
                "100".into(),
                "1".into()
            )
        );
        assert!(!d.capacity.as_ref().expect("capacity").contains_key(SHARES));
    }

    #[test]
    fn count_mode_defaults_to_one_nth() {
        let mut d = device();
        make_shareable(&mut d, L40S, ConsumableShares::Count(3));
        let (_, mem_default, ..) = policy(&d, MEMORY);
        // 46068 MiB / 3 = 15356 MiB, on the step.
        assert_eq!(mem_default, (15_356u64 << 20).to_string());
        assert_eq!(policy(&d, COMPUTE).1, "33");
        assert_eq!(
            policy(&d, SHARES),
            ("3".into(), "1".into(), "1".into(), "3".into(), "1".into())
        );
    }

    /// The API server's rules for a validRange (k8s.io/kubernetes
    /// pkg/apis/resource/validation, validateRequestPolicyRange), checked on every mode.
    #[test]
    fn policies_satisfy_the_api_server_rules() {
        for mode in [
            ConsumableShares::Memory,
            ConsumableShares::Count(1),
            ConsumableShares::Count(7),
            ConsumableShares::Count(100),
        ] {
            for mem in [L40S, (81_559 << 20) + 5, 2 << 20, 1 << 20] {
                let mut d = device();
                make_shareable(&mut d, mem, mode);
                for (name, c) in d.capacity.as_ref().expect("capacity") {
                    let Some(p) = &c.request_policy else { continue };
                    let v = |q: &Quantity| parse_quantity(&q.0).expect("quantity");
                    let r = p.valid_range.as_ref().expect("range");
                    let (value, default) = (v(&c.value), v(p.default.as_ref().expect("d")));
                    let (min, max) = (v(&r.min), v(r.max.as_ref().expect("max")));
                    let Some(step) = r.step.as_ref().map(v) else {
                        assert_eq!((name.as_str(), min, max), (SHARES, 1, 1), "{mode}");
                        continue;
                    };
                    let ctx = format!("{mode} {mem} {name}");
                    assert!(min <= value && min <= default && default <= max, "{ctx}");
                    assert!(max <= value && min + step <= value, "{ctx}");
                    assert_eq!((default - min) % step, 0, "{ctx}");
                    assert_eq!((max - min) % step, 0, "{ctx}");
                }
            }
        }
    }

    fn consumed(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect()
    }

    #[test]
    fn reads_consumed_capacity() {
        assert_eq!(Share::from_consumed(None), Ok(None));
        assert_eq!(Share::from_consumed(Some(&BTreeMap::new())), Ok(None));
        assert_eq!(
            Share::from_consumed(Some(&consumed(&[("memory", "18Gi"), ("compute", "40")]))),
            Ok(Some(Share {
                memory_bytes: 18 << 30,
                compute_percent: 40,
                shares: None
            }))
        );
        assert_eq!(
            Share::from_consumed(Some(&consumed(&[
                ("memory", "11517Mi"),
                ("compute", "25"),
                ("shares", "1")
            ])))
            .map(|s| s.and_then(|s| s.shares)),
            Ok(Some(1))
        );
    }

    #[test]
    fn rejects_consumed_capacity_that_is_not_a_share() {
        assert_eq!(
            Share::from_consumed(Some(&consumed(&[("memory", "1Gi")]))),
            Err(ShareError::Missing(COMPUTE))
        );
        assert_eq!(
            Share::from_consumed(Some(&consumed(&[("memory", "1Gi"), ("compute", "150")]))),
            Err(ShareError::ComputeAbove100(150))
        );
        let err = Share::from_consumed(Some(&consumed(&[("memory", "-1Gi"), ("compute", "1")])))
            .unwrap_err();
        assert!(
            matches!(err, ShareError::Invalid { name: "memory", .. }),
            "{err}"
        );
    }
}

#[cfg(test)]
mod golden {
    use super::*;
    use crate::inventory::fixtures::dgx_h100;
    use crate::slices::desired::{SliceFeatures, desired_slices, validate_slice};

    use crate::slices::golden;

    fn slices(mode: ConsumableShares) -> Vec<k8s_openapi::api::resource::v1::ResourceSlice> {
        let features = SliceFeatures {
            consumable_shares: mode,
            ..SliceFeatures::default()
        };
        desired_slices(
            &dgx_h100(),
            "gpu.gpu-dra.dev",
            "node-a",
            "uid-1",
            1,
            &features,
        )
    }

    #[test]
    fn dgx_h100_memory_shares_golden() {
        let slices = slices(ConsumableShares::Memory);
        assert!(validate_slice(&slices[0]).is_empty());
        let yaml = crate::inventory::render_slices(&slices).expect("render");
        golden("dgx-h100-slices-shares-memory.yaml", &yaml);
    }

    #[test]
    fn dgx_h100_count_shares_golden() {
        let slices = slices(ConsumableShares::Count(4));
        assert!(validate_slice(&slices[0]).is_empty());
        let yaml = crate::inventory::render_slices(&slices).expect("render");
        golden("dgx-h100-slices-shares-4.yaml", &yaml);
    }

    #[test]
    fn only_full_gpus_become_shareable() {
        let slices = slices(ConsumableShares::Count(4));
        for d in slices[0].spec.devices.iter().flatten() {
            let is_mig = d.name.contains("-mig-");
            assert_eq!(
                d.allow_multiple_allocations.is_some(),
                !is_mig,
                "{}",
                d.name
            );
            let caps = d.capacity.as_ref().expect("capacity");
            assert_eq!(caps.contains_key(SHARES), !is_mig, "{}", d.name);
        }
    }

    #[test]
    fn dropped_consumable_capacity_falls_back_to_exclusive() {
        let features = SliceFeatures {
            consumable_shares: ConsumableShares::Memory,
            ..SliceFeatures::default()
        };
        for path in [
            "spec.devices[*].allowMultipleAllocations",
            "spec.devices[*].capacity.memory.requestPolicy",
        ] {
            let off = features.without_dropped(&[path.to_string()]);
            assert_eq!(off.consumable_shares, ConsumableShares::Disabled, "{path}");
            assert!(off.device_taints, "{path}");
        }
        let exclusive = desired_slices(&dgx_h100(), "d.x", "n", "u", 1, &SliceFeatures::default());
        let fallback = desired_slices(
            &dgx_h100(),
            "d.x",
            "n",
            "u",
            1,
            &features.without_dropped(&["spec.devices[*].allowMultipleAllocations".to_string()]),
        );
        assert_eq!(exclusive, fallback);
    }
}
