//! Deterministic identifiers: GPU and MIG UUIDs derived from a seed, and the opaque handle
//! values the C ABI hands out.
//!
//! Owns only pure encode/decode functions; it must not keep state. UUIDs follow the shape
//! NVML prints (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, `MIG-...`). Handles are plain
//! tagged integers cast to pointers by the FFI layer; callers treat them as opaque and the
//! fake never dereferences them.

/// 64-bit FNV-1a over `parts`, each part followed by a 0 byte, starting from `basis`.
fn fnv1a(basis: u64, parts: &[&str]) -> u64 {
    let mut h = basis;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

/// splitmix64 finaliser, so nearby inputs (GPU 0, GPU 1) give unrelated UUIDs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A UUID-shaped string (`PREFIX-8-4-4-4-12` lowercase hex) derived from `parts`.
pub fn derived_uuid(prefix: &str, parts: &[&str]) -> String {
    let hi = fnv1a(0xcbf2_9ce4_8422_2325, parts);
    let lo = fnv1a(0x6c62_272e_07bb_0142, parts);
    let x = (u128::from(hi) << 64) | u128::from(lo);
    let hex = format!("{x:032x}");
    format!(
        "{prefix}-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The UUID of the GPU at NVML index `index` for topology seed `seed`.
pub fn gpu_uuid(seed: &str, index: u32) -> String {
    derived_uuid("GPU", &[seed, "gpu", &index.to_string()])
}

/// The UUID of a MIG device (GI `gi`, CI `ci` on `gpu_uuid`); `generation` makes a
/// re-created instance get a new UUID, as on hardware.
pub fn mig_uuid(gpu_uuid: &str, gi: u32, ci: u32, generation: u64) -> String {
    derived_uuid(
        "MIG",
        &[
            gpu_uuid,
            &gi.to_string(),
            &ci.to_string(),
            &generation.to_string(),
        ],
    )
}

/// What an opaque NVML handle refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handle {
    /// A full GPU (`nvmlDevice_t`), by NVML index.
    Device {
        /// NVML index.
        gpu: u32,
    },
    /// A MIG device (`nvmlDevice_t`): one compute instance inside one GPU instance.
    MigDevice {
        /// Parent NVML index.
        gpu: u32,
        /// GPU instance id.
        gi: u32,
        /// Compute instance id.
        ci: u32,
    },
    /// A GPU instance (`nvmlGpuInstance_t`).
    GpuInstance {
        /// Parent NVML index.
        gpu: u32,
        /// GPU instance id.
        gi: u32,
    },
    /// A compute instance (`nvmlComputeInstance_t`).
    ComputeInstance {
        /// Parent NVML index.
        gpu: u32,
        /// GPU instance id.
        gi: u32,
        /// Compute instance id.
        ci: u32,
    },
    /// An event set (`nvmlEventSet_t`), by process-local id.
    EventSet {
        /// Process-local id.
        id: u32,
    },
}

const FIELD: u64 = 0xFFFF;

impl Handle {
    /// The non-zero integer the FFI layer turns into a pointer.
    pub fn encode(self) -> u64 {
        let (tag, a, b, c) = match self {
            Handle::Device { gpu } => (1u64, gpu, 0, 0),
            Handle::MigDevice { gpu, gi, ci } => (2, gpu, gi, ci),
            Handle::GpuInstance { gpu, gi } => (3, gpu, gi, 0),
            Handle::ComputeInstance { gpu, gi, ci } => (4, gpu, gi, ci),
            Handle::EventSet { id } => (5, id, 0, 0),
        };
        (tag << 52)
            | ((u64::from(a) & FIELD) << 32)
            | ((u64::from(b) & FIELD) << 16)
            | (u64::from(c) & FIELD)
    }

    /// Decode a value made by [`Handle::encode`]; `None` for anything else (null included).
    pub fn decode(v: u64) -> Option<Handle> {
        let a = ((v >> 32) & FIELD) as u32;
        let b = ((v >> 16) & FIELD) as u32;
        let c = (v & FIELD) as u32;
        if v >> 48 & 0xF != 0 {
            return None;
        }
        Some(match v >> 52 {
            1 if b == 0 && c == 0 => Handle::Device { gpu: a },
            2 => Handle::MigDevice {
                gpu: a,
                gi: b,
                ci: c,
            },
            3 if c == 0 => Handle::GpuInstance { gpu: a, gi: b },
            4 => Handle::ComputeInstance {
                gpu: a,
                gi: b,
                ci: c,
            },
            5 if b == 0 && c == 0 => Handle::EventSet { id: a },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_deterministic_and_shaped_like_nvml() {
        let a = gpu_uuid("seed", 0);
        assert_eq!(a, gpu_uuid("seed", 0));
        assert_ne!(a, gpu_uuid("seed", 1));
        assert_ne!(a, gpu_uuid("other", 0));
        assert_eq!(a.len(), 40);
        assert!(a.starts_with("GPU-"));
        let m = mig_uuid(&a, 1, 0, 0);
        assert!(m.starts_with("MIG-"));
        assert_ne!(m, mig_uuid(&a, 1, 0, 1));
    }

    #[test]
    fn handles_round_trip_and_reject_garbage() {
        for h in [
            Handle::Device { gpu: 7 },
            Handle::MigDevice {
                gpu: 1,
                gi: 13,
                ci: 2,
            },
            Handle::GpuInstance { gpu: 0, gi: 0 },
            Handle::ComputeInstance {
                gpu: 3,
                gi: 2,
                ci: 0,
            },
            Handle::EventSet { id: 9 },
        ] {
            assert_ne!(h.encode(), 0);
            assert_eq!(Handle::decode(h.encode()), Some(h));
        }
        assert_eq!(Handle::decode(0), None);
        assert_eq!(Handle::decode(0xdead_beef), None);
        assert_eq!(Handle::decode(9 << 52), None);
    }
}
