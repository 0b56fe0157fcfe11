//! The kill campaign's model: claim kinds, their templates, and the invariants checked after
//! every kill-and-restart round.
//!
//! Owns: the ResourceClaimTemplate of each claim kind (plain full GPU, time-sliced Long,
//! MPS, Exclusive, static MIG device), the seeded choice of actions and kill points, and
//! the pure invariant check over one snapshot of the node (checkpoint, CDI spec files, the
//! fake GPUs' state). Must not: talk to the API server or the plugin (the test does).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::driver::DRIVER;

/// Environment variable with the campaign's seed (decimal); default [`DEFAULT_SEED`].
pub const SEED_ENV: &str = "GPU_DRA_CHAOS_SEED";
/// Environment variable with the number of kill points; default [`DEFAULT_KILLS`].
pub const KILLS_ENV: &str = "GPU_DRA_CHAOS_KILLS";
/// Seed when [`SEED_ENV`] is unset.
pub const DEFAULT_SEED: u64 = 20_261_201;
/// Kill points when [`KILLS_ENV`] is unset (what `make test` runs).
pub const DEFAULT_KILLS: usize = 50;

/// A kind of claim the campaign creates pods for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A whole GPU, no sharing config.
    Plain,
    /// A whole GPU, `TimeSlicing` interval `Long` (time slice 3).
    TimeSliced,
    /// A whole GPU shared through MPS (EXCLUSIVE_PROCESS plus one control daemon).
    Mps,
    /// A whole GPU, strategy `Exclusive` (EXCLUSIVE_PROCESS).
    Exclusive,
    /// A static MIG device.
    Mig,
}

/// Every kind, in template-name order.
pub const KINDS: [Kind; 5] = [
    Kind::Plain,
    Kind::TimeSliced,
    Kind::Mps,
    Kind::Exclusive,
    Kind::Mig,
];

impl Kind {
    /// Name of the kind's ResourceClaimTemplate.
    pub fn template(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::TimeSliced => "time-sliced",
            Kind::Mps => "mps",
            Kind::Exclusive => "exclusive",
            Kind::Mig => "mig",
        }
    }

    /// Whether the kind takes a whole GPU (else a MIG device).
    pub fn full_gpu(self) -> bool {
        self != Kind::Mig
    }

    /// The kind's `spec.spec.devices` of its ResourceClaimTemplate.
    pub fn devices(self) -> Value {
        let class = if self.full_gpu() {
            "gpu.gpu-dra.dev"
        } else {
            "mig.gpu-dra.dev"
        };
        let request = json!([{"name": "gpu", "exactly": {"deviceClassName": class}}]);
        let sharing = match self {
            Kind::TimeSliced => {
                json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})
            }
            Kind::Mps => {
                json!({"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}})
            }
            Kind::Exclusive => json!({"strategy": "Exclusive"}),
            Kind::Plain | Kind::Mig => return json!({"requests": request}),
        };
        json!({"requests": request, "config": [{"requests": ["gpu"], "opaque": {"driver": DRIVER,
            "parameters": {"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharing": sharing}}}]})
    }
}

/// The seed from [`SEED_ENV`] (or the default) and the number of kill points from
/// [`KILLS_ENV`] (or the default). Panics on a value that is not a number.
pub fn settings() -> (u64, usize) {
    let seed = std::env::var(SEED_ENV).ok().map_or(DEFAULT_SEED, |s| {
        s.parse().expect("GPU_DRA_CHAOS_SEED: a u64")
    });
    let kills = std::env::var(KILLS_ENV).ok().map_or(DEFAULT_KILLS, |s| {
        s.parse().expect("GPU_DRA_CHAOS_KILLS: a count")
    });
    (seed, kills)
}

/// A live claim as the API server and the test know it.
#[derive(Debug, Clone)]
pub struct LiveClaim {
    /// `namespace/pod` of the pod using it.
    pub pod: String,
    /// Claim UID.
    pub uid: String,
    /// Its kind.
    pub kind: Kind,
}

/// One snapshot of what the node holds, read right after the pods settled.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// The checkpoint (`plugins/<driver>/checkpoint.json`) as JSON; `Null` if absent.
    pub checkpoint: Value,
    /// File names in the node's CDI dir.
    pub cdi_files: BTreeSet<String>,
    /// The fake GPUs' state.
    pub gpus: nvidia_ml::control::State,
    /// Pids of MPS daemons recorded running whose process is gone.
    pub dead_daemon_pids: BTreeSet<u32>,
}

/// One invariant violation: which invariant (a stable id for the known-violations list) and
/// what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// Stable invariant id, e.g. `mps-daemon-running`.
    pub invariant: &'static str,
    /// What was found.
    pub detail: String,
}

fn spec_file(uid: &str) -> String {
    format!("gpu-dra.dev-claim_{uid}.json")
}

/// Checks every invariant of the campaign on `snap` given the live claims `live`:
///
/// - `claim-prepared`: each live claim is `PrepareCompleted` in the checkpoint;
/// - `one-cdi-spec`: each live claim has exactly one CDI spec file;
/// - `no-leftover-entry` / `no-leftover-spec` / `no-leftover-daemon`: nothing for any claim
///   that is not live (checkpoint entry, spec file, running MPS daemon);
/// - `gpu-compute-mode`, `gpu-time-slice`: each full GPU is EXCLUSIVE_PROCESS exactly when
///   an MPS or Exclusive claim holds it and time slice 3 exactly when a time-sliced claim
///   does, else Default / 0;
/// - `mps-daemon-running`: each live MPS claim has one daemon recorded running, its process
///   alive, on its GPU.
pub fn check(live: &[LiveClaim], snap: &NodeSnapshot) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut v = |invariant: &'static str, detail: String| out.push(Violation { invariant, detail });
    let entries = snap.checkpoint["claims"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let live_uids: BTreeSet<&str> = live.iter().map(|c| c.uid.as_str()).collect();
    // GPU UUID -> kinds holding it (from the checkpoint's device records).
    let mut holders: BTreeMap<String, Vec<Kind>> = BTreeMap::new();
    for c in live {
        let entry = &entries.get(&c.uid).cloned().unwrap_or(Value::Null);
        if entry["state"] != "PrepareCompleted" {
            v(
                "claim-prepared",
                format!(
                    "{} claim {} ({:?}): checkpoint state {}",
                    c.pod, c.uid, c.kind, entry["state"]
                ),
            );
        }
        let specs = snap.cdi_files.iter().filter(|f| f.contains(&c.uid)).count();
        if specs != 1 || !snap.cdi_files.contains(&spec_file(&c.uid)) {
            v(
                "one-cdi-spec",
                format!(
                    "{} claim {} ({:?}): {specs} CDI spec files",
                    c.pod, c.uid, c.kind
                ),
            );
        }
        for d in entry["devices"].as_array().into_iter().flatten() {
            if let Some(gpu) = d["gpuUuid"].as_str()
                && c.kind.full_gpu()
            {
                holders.entry(gpu.to_owned()).or_default().push(c.kind);
            }
        }
    }
    for uid in entries.keys().filter(|u| !live_uids.contains(u.as_str())) {
        v(
            "no-leftover-entry",
            format!("checkpoint entry for claim {uid}, which no running pod uses"),
        );
    }
    for f in &snap.cdi_files {
        let owned = live_uids.iter().any(|u| *f == spec_file(u));
        if f.starts_with("gpu-dra.dev-claim_") && !owned {
            v(
                "no-leftover-spec",
                format!("CDI spec {f}, which no running pod uses"),
            );
        }
    }
    let mut mps_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (pipe, d) in snap.gpus.mps_daemons.iter().filter(|(_, d)| d.running) {
        let owner = live
            .iter()
            .find(|c| c.kind == Kind::Mps && pipe.contains(&format!("/{}/", c.uid)));
        match owner {
            None => v(
                "no-leftover-daemon",
                format!(
                    "MPS daemon pid {} ({pipe}) runs for no live MPS claim",
                    d.pid
                ),
            ),
            Some(c) => {
                if snap.dead_daemon_pids.contains(&d.pid) {
                    v(
                        "mps-daemon-running",
                        format!(
                            "{} claim {}: MPS daemon pid {} recorded running, process gone",
                            c.pod, c.uid, d.pid
                        ),
                    );
                } else {
                    *mps_of.entry(c.uid.as_str()).or_default() += 1;
                }
            }
        }
    }
    for c in live.iter().filter(|c| c.kind == Kind::Mps) {
        let n = mps_of.get(c.uid.as_str()).copied().unwrap_or(0);
        if n != 1 {
            v(
                "mps-daemon-running",
                format!("{} claim {}: {n} live MPS daemons", c.pod, c.uid),
            );
        }
    }
    for (uuid, g) in &snap.gpus.gpus {
        let kinds = holders.get(uuid).cloned().unwrap_or_default();
        let exclusive = kinds
            .iter()
            .any(|k| matches!(k, Kind::Mps | Kind::Exclusive));
        let want_mode = if exclusive {
            nvidia_ml::control::ComputeMode::ExclusiveProcess
        } else {
            nvidia_ml::control::ComputeMode::Default
        };
        if g.compute_mode != want_mode {
            v(
                "gpu-compute-mode",
                format!(
                    "GPU {uuid} held by {kinds:?}: compute mode {:?}, want {want_mode:?}",
                    g.compute_mode
                ),
            );
        }
        let want_slice = if kinds.contains(&Kind::TimeSliced) {
            3
        } else {
            0
        };
        if g.timeslice != want_slice {
            v(
                "gpu-time-slice",
                format!(
                    "GPU {uuid} held by {kinds:?}: time slice {}, want {want_slice}",
                    g.timeslice
                ),
            );
        }
    }
    out
}

/// A way a checkpoint file can be unusable at start, each restarted over in the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// The first half of the file only (a torn write).
    Truncated,
    /// Bytes that are not JSON.
    Garbage,
    /// A format version this plugin does not read.
    FutureVersion,
    /// Valid JSON whose checksum does not match its claims.
    BadChecksum,
    /// A zero-length file.
    Empty,
    /// A valid file recorded under another boot id.
    PreviousBoot,
    /// A symlink to a copy of the valid file (never followed by the plugin).
    Symlink,
}

/// Every corruption, in the order the campaign applies them.
pub const CORRUPTIONS: [Corruption; 7] = [
    Corruption::Truncated,
    Corruption::Garbage,
    Corruption::FutureVersion,
    Corruption::BadChecksum,
    Corruption::Empty,
    Corruption::PreviousBoot,
    Corruption::Symlink,
];

impl Corruption {
    /// The damaged content written over a valid checkpoint `good`; `None` for
    /// [`Corruption::Symlink`], which keeps the content and replaces the file by a link.
    pub fn content(self, good: &[u8]) -> Option<Vec<u8>> {
        let edit = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut doc: Value = serde_json::from_slice(good).expect("valid checkpoint");
            f(doc.as_object_mut().expect("checkpoint is an object"));
            serde_json::to_vec_pretty(&doc).expect("serialisable")
        };
        Some(match self {
            Corruption::Truncated => good[..good.len() / 2].to_vec(),
            Corruption::Garbage => b"\x00\xffgpu-dra\x7f{not json]\n".repeat(8),
            Corruption::FutureVersion => edit(&|o| {
                o.insert("version".into(), json!(99));
            }),
            Corruption::BadChecksum => edit(&|o| {
                o.insert("checksum".into(), json!("fnv1a64:0000000000000000"));
            }),
            Corruption::Empty => Vec::new(),
            Corruption::PreviousBoot => edit(&|o| {
                o.insert(
                    "bootId".into(),
                    json!("00000000-0000-4000-8000-000000000000"),
                );
            }),
            Corruption::Symlink => return None,
        })
    }
}

/// What a restart or a second instance must leave as it was for the live claims:
///
/// - `gpu-settings-kept`: each GPU's compute mode, time slice and MIG instances;
/// - `mps-daemon-kept`: the running MPS daemons (pipe dir and pid: none restarted);
/// - `cdi-specs-kept`: the set of CDI spec files.
pub fn kept(before: &NodeSnapshot, after: &NodeSnapshot) -> Vec<Violation> {
    let mut out = Vec::new();
    for (uuid, b) in &before.gpus.gpus {
        let a = after.gpus.gpus.get(uuid);
        let same = a.is_some_and(|a| {
            a.compute_mode == b.compute_mode
                && a.timeslice == b.timeslice
                && a.gpu_instances == b.gpu_instances
        });
        if !same {
            out.push(Violation {
                invariant: "gpu-settings-kept",
                detail: format!(
                    "GPU {uuid}: compute mode {:?}, time slice {}, {} GPU instances before; \
                     after {:?}",
                    b.compute_mode,
                    b.timeslice,
                    b.gpu_instances.len(),
                    a.map(|a| (a.compute_mode, a.timeslice, a.gpu_instances.len()))
                ),
            });
        }
    }
    let daemons = |s: &NodeSnapshot| -> BTreeMap<String, u32> {
        s.gpus
            .mps_daemons
            .iter()
            .filter(|(_, d)| d.running)
            .map(|(pipe, d)| (pipe.clone(), d.pid))
            .collect()
    };
    if daemons(before) != daemons(after) {
        out.push(Violation {
            invariant: "mps-daemon-kept",
            detail: format!(
                "running MPS daemons {:?} before, {:?} after",
                daemons(before),
                daemons(after)
            ),
        });
    }
    if before.cdi_files != after.cdi_files {
        out.push(Violation {
            invariant: "cdi-specs-kept",
            detail: format!(
                "CDI specs {:?} before, {:?} after",
                before.cdi_files, after.cdi_files
            ),
        });
    }
    out
}
