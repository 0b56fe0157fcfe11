//! The per-GPU policy ledger: which claims use which physical GPU under which policy.
//!
//! Owns: the pure admission and release rules; no I/O, no locks, no clocks. The caller
//! (`SharingManager`) executes the [`Action`]s it returns and serialises calls per GPU.
//!
//! Must not: touch the hardware or decide how a policy is applied.
//!
//! Rules (deterministic; issue 5 "Conflicts"). The first claim that prepares with a
//! policy on a GPU sets that GPU's policy; later claims are judged against it:
//!
//! | GPU holds \ new claim asks | none  | TimeSlicing(i) | TimeSlicing(j≠i) | MPS      | Exclusive |
//! |----------------------------|-------|----------------|------------------|----------|-----------|
//! | nothing (free)             | join  | apply          | apply            | apply    | apply     |
//! | only no-policy claims      | join  | apply          | apply            | conflict | conflict  |
//! | TimeSlicing(i)             | join  | share          | conflict         | conflict | conflict  |
//! | MPS                        | conflict | conflict    | conflict         | conflict | conflict  |
//! | Exclusive                  | conflict | conflict    | conflict         | conflict | conflict  |
//!
//! Why: a claim without a policy asks for nothing and runs fine on a time-sliced GPU, so it
//! joins one (it gets the interval the holder chose). MPS puts the GPU in EXCLUSIVE_PROCESS
//! mode with one control daemon per claim, so processes of any other claim could not create
//! a context: MPS is one claim per GPU (pods share MPS by sharing the claim). Exclusive
//! means exactly one claim. A claim preparing again with the same policy is idempotent;
//! with a different one it is a conflict with itself (claims are immutable).
//!
//! Release: when the last claim holding a policy leaves a GPU, its policy is restored to
//! the default ([`Action::Restore`]) even if no-policy claims remain (they asked for the
//! default).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::control::TimeSlice;

/// A compute policy a claim asks for on its physical GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "camelCase")]
pub enum Policy {
    /// Time-slicing with the given interval (`nvidia-smi compute-policy --set-timeslice`).
    TimeSlicing {
        /// The interval.
        interval: TimeSlice,
    },
    /// An MPS control daemon for the claim, GPU in EXCLUSIVE_PROCESS mode.
    Mps(MpsLimits),
    /// EXCLUSIVE_PROCESS without MPS: one process of one claim owns the GPU.
    Exclusive,
}

/// Limits applied through the MPS control daemon to the servers it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MpsLimits {
    /// `set_default_active_thread_percentage` (0..=100; percent of the GPU's SMs per client).
    pub active_thread_percentage: Option<u8>,
    /// `set_default_device_pinned_mem_limit` for every GPU of the claim, in bytes.
    pub pinned_memory_limit_bytes: Option<u64>,
    /// Per-GPU override of the pinned memory limit, keyed by GPU UUID, in bytes.
    pub per_device_pinned_memory_limit_bytes: BTreeMap<String, u64>,
}

/// The short name of a policy's strategy, for messages.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::TimeSlicing { interval } => write!(f, "TimeSlicing (interval {interval:?})"),
            Policy::Mps(_) => f.write_str("MPS"),
            Policy::Exclusive => f.write_str("Exclusive"),
        }
    }
}

/// What the caller must do to the GPU after a ledger decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to change on the hardware.
    Nothing,
    /// Apply this policy to the GPU (it is free of other policies).
    Apply(Policy),
    /// Undo this policy: the GPU goes back to the default (time slice Default, compute
    /// mode Default; MPS daemon stopped by the caller).
    Restore(Policy),
}

/// A claim was refused because the GPU is used under an incompatible policy (boxed in
/// results: it carries five strings).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "GPU {gpu_uuid} is already used by claim {holder_claim} with {holder_policy}; claim {claim_uid} asks for {requested}: {rule}. Use the same sharing config in both claims, share one claim between the pods, or let the scheduler pick another GPU"
)]
pub struct Conflict {
    /// The physical GPU.
    pub gpu_uuid: String,
    /// The claim that was refused.
    pub claim_uid: String,
    /// What it asked for (`no sharing policy` when none).
    pub requested: String,
    /// The claim holding the GPU's policy (the earliest by UID when several share it).
    pub holder_claim: String,
    /// The policy it holds (`no sharing policy` when none).
    pub holder_policy: String,
    /// The rule that refused it.
    pub rule: &'static str,
}

#[derive(Debug, Clone, Default)]
struct GpuEntry {
    /// Claim UID -> the policy it asked for.
    claims: BTreeMap<String, Option<Policy>>,
}

impl GpuEntry {
    /// The policy in force and the first claim (by UID) holding it.
    fn holder(&self) -> Option<(&str, &Policy)> {
        self.claims
            .iter()
            .find_map(|(claim, policy)| policy.as_ref().map(|p| (claim.as_str(), p)))
    }
}

/// The ledger of claims per physical GPU. Plain data; rebuilt from the checkpoint at start.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    gpus: BTreeMap<String, GpuEntry>,
}

fn describe(policy: Option<&Policy>) -> String {
    policy.map_or_else(|| "no sharing policy".to_owned(), Policy::to_string)
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides whether `claim_uid` may use `gpu_uuid` with `policy`, without recording it.
    ///
    /// Returns the [`Action`] to execute, or the [`Conflict`] (rules in the module docs).
    pub fn check(
        &self,
        gpu_uuid: &str,
        claim_uid: &str,
        policy: Option<&Policy>,
    ) -> Result<Action, Box<Conflict>> {
        let Some(entry) = self.gpus.get(gpu_uuid).filter(|e| !e.claims.is_empty()) else {
            return Ok(policy.map_or(Action::Nothing, |p| Action::Apply(p.clone())));
        };
        let conflict = |holder_claim: &str, holder_policy: Option<&Policy>, rule| {
            Box::new(Conflict {
                gpu_uuid: gpu_uuid.to_owned(),
                claim_uid: claim_uid.to_owned(),
                requested: describe(policy),
                holder_claim: holder_claim.to_owned(),
                holder_policy: describe(holder_policy),
                rule,
            })
        };
        if let Some(existing) = entry.claims.get(claim_uid) {
            if existing.as_ref() == policy {
                return Ok(Action::Nothing);
            }
            return Err(conflict(
                claim_uid,
                existing.as_ref(),
                "a claim cannot change its sharing policy while prepared",
            ));
        }
        let Some((holder_claim, held)) = entry.holder() else {
            // Only no-policy claims use the GPU.
            let first = entry.claims.keys().next().map_or("", String::as_str);
            return match policy {
                None => Ok(Action::Nothing),
                Some(p @ Policy::TimeSlicing { .. }) => Ok(Action::Apply(p.clone())),
                Some(Policy::Mps(_)) => Err(conflict(
                    first,
                    None,
                    "MPS needs the GPU to itself (EXCLUSIVE_PROCESS)",
                )),
                Some(Policy::Exclusive) => Err(conflict(
                    first,
                    None,
                    "Exclusive means a single claim on the GPU",
                )),
            };
        };
        match (held, policy) {
            (Policy::TimeSlicing { .. }, None) => Ok(Action::Nothing),
            (
                Policy::TimeSlicing {
                    interval: held_interval,
                },
                Some(Policy::TimeSlicing { interval }),
            ) => {
                if held_interval == interval {
                    Ok(Action::Nothing)
                } else {
                    Err(conflict(
                        holder_claim,
                        Some(held),
                        "time-slice intervals differ",
                    ))
                }
            }
            (Policy::TimeSlicing { .. }, Some(_)) => Err(conflict(
                holder_claim,
                Some(held),
                "the GPU is time-sliced; MPS and Exclusive need it to themselves",
            )),
            (Policy::Mps(_), _) => Err(conflict(
                holder_claim,
                Some(held),
                "MPS is one claim per GPU (share the claim instead)",
            )),
            (Policy::Exclusive, _) => Err(conflict(
                holder_claim,
                Some(held),
                "Exclusive means a single claim on the GPU",
            )),
        }
    }

    /// Records `claim_uid` on `gpu_uuid` with `policy` (after [`Ledger::check`] and a
    /// successful hardware action). Replaces an earlier record of the same claim.
    pub fn record(&mut self, gpu_uuid: &str, claim_uid: &str, policy: Option<Policy>) {
        self.gpus
            .entry(gpu_uuid.to_owned())
            .or_default()
            .claims
            .insert(claim_uid.to_owned(), policy);
    }

    /// [`Ledger::check`] then [`Ledger::record`] when admitted.
    pub fn admit(
        &mut self,
        gpu_uuid: &str,
        claim_uid: &str,
        policy: Option<Policy>,
    ) -> Result<Action, Box<Conflict>> {
        let action = self.check(gpu_uuid, claim_uid, policy.as_ref())?;
        self.record(gpu_uuid, claim_uid, policy);
        Ok(action)
    }

    /// Whether a claim other than `claim_uid` is recorded on `gpu_uuid` (with or without a
    /// policy). A GPU no other claim holds may have its stale settings reset.
    pub fn held_by_others(&self, gpu_uuid: &str, claim_uid: &str) -> bool {
        self.gpus
            .get(gpu_uuid)
            .is_some_and(|e| e.claims.keys().any(|c| c != claim_uid))
    }

    /// What removing `claim_uid` from `gpu_uuid` requires, without removing it.
    pub fn plan_release(&self, gpu_uuid: &str, claim_uid: &str) -> Action {
        let Some(entry) = self.gpus.get(gpu_uuid) else {
            return Action::Nothing;
        };
        let Some(Some(policy)) = entry.claims.get(claim_uid) else {
            return Action::Nothing;
        };
        let others_hold = entry
            .claims
            .iter()
            .any(|(claim, other)| claim != claim_uid && other.is_some());
        if others_hold {
            Action::Nothing
        } else {
            Action::Restore(policy.clone())
        }
    }

    /// Removes `claim_uid` from `gpu_uuid`, returning what to undo (see [`Ledger::plan_release`]).
    pub fn release(&mut self, gpu_uuid: &str, claim_uid: &str) -> Action {
        let action = self.plan_release(gpu_uuid, claim_uid);
        if let Some(entry) = self.gpus.get_mut(gpu_uuid) {
            entry.claims.remove(claim_uid);
            if entry.claims.is_empty() {
                self.gpus.remove(gpu_uuid);
            }
        }
        action
    }

    /// The GPUs `claim_uid` is recorded on, sorted, with the policy it asked for.
    pub fn claim_gpus(&self, claim_uid: &str) -> Vec<(String, Option<Policy>)> {
        self.gpus
            .iter()
            .filter_map(|(gpu, entry)| {
                entry
                    .claims
                    .get(claim_uid)
                    .map(|p| (gpu.clone(), p.clone()))
            })
            .collect()
    }

    /// Every (GPU UUID, claim UID, policy) entry, sorted: what the checkpoint needs.
    pub fn entries(&self) -> Vec<(String, String, Option<Policy>)> {
        self.gpus
            .iter()
            .flat_map(|(gpu, entry)| {
                entry
                    .claims
                    .iter()
                    .map(move |(claim, policy)| (gpu.clone(), claim.clone(), policy.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(interval: TimeSlice) -> Option<Policy> {
        Some(Policy::TimeSlicing { interval })
    }

    fn mps() -> Option<Policy> {
        Some(Policy::Mps(MpsLimits {
            active_thread_percentage: Some(50),
            ..MpsLimits::default()
        }))
    }

    #[test]
    fn first_claim_sets_policy_and_free_no_policy_claim_does_nothing() {
        let mut ledger = Ledger::new();
        assert_eq!(
            ledger.admit("G", "a", ts(TimeSlice::Long)),
            Ok(Action::Apply(ts(TimeSlice::Long).unwrap()))
        );
        assert_eq!(ledger.admit("H", "b", None), Ok(Action::Nothing));
        assert_eq!(
            ledger.admit("I", "c", Some(Policy::Exclusive)),
            Ok(Action::Apply(Policy::Exclusive))
        );
    }

    #[test]
    fn identical_time_slice_shares_and_different_interval_conflicts_naming_holder() {
        let mut ledger = Ledger::new();
        ledger.admit("G", "a", ts(TimeSlice::Long)).unwrap();
        assert_eq!(
            ledger.admit("G", "b", ts(TimeSlice::Long)),
            Ok(Action::Nothing)
        );
        let err = ledger.admit("G", "c", ts(TimeSlice::Short)).unwrap_err();
        assert_eq!(err.holder_claim, "a");
        assert_eq!(err.claim_uid, "c");
        let text = err.to_string();
        assert!(
            text.contains("claim a with TimeSlicing (interval Long)"),
            "{text}"
        );
        assert!(
            text.contains("asks for TimeSlicing (interval Short)"),
            "{text}"
        );
        assert!(
            ledger.claim_gpus("c").is_empty(),
            "a refused claim is not recorded"
        );
    }

    #[test]
    fn no_policy_claim_joins_time_sliced_gpu_but_not_mps_or_exclusive() {
        let mut ledger = Ledger::new();
        ledger.admit("G", "a", ts(TimeSlice::Medium)).unwrap();
        assert_eq!(ledger.admit("G", "b", None), Ok(Action::Nothing));
        ledger.admit("M", "m", mps()).unwrap();
        assert_eq!(ledger.admit("M", "x", None).unwrap_err().holder_claim, "m");
        ledger.admit("E", "e", Some(Policy::Exclusive)).unwrap();
        assert_eq!(ledger.admit("E", "x", None).unwrap_err().holder_claim, "e");
    }

    #[test]
    fn mps_and_exclusive_are_single_claim() {
        let mut ledger = Ledger::new();
        ledger.admit("M", "m", mps()).unwrap();
        assert!(
            ledger.admit("M", "n", mps()).is_err(),
            "identical MPS is still one claim per GPU"
        );
        assert!(ledger.admit("M", "n", ts(TimeSlice::Default)).is_err());
        ledger.admit("E", "e", Some(Policy::Exclusive)).unwrap();
        assert!(ledger.admit("E", "f", Some(Policy::Exclusive)).is_err());
    }

    #[test]
    fn time_sliced_gpu_refuses_mps_and_exclusive() {
        let mut ledger = Ledger::new();
        ledger.admit("G", "a", ts(TimeSlice::Default)).unwrap();
        let err = ledger.admit("G", "b", mps()).unwrap_err();
        assert!(err.to_string().contains("asks for MPS"), "{err}");
        assert!(ledger.admit("G", "b", Some(Policy::Exclusive)).is_err());
    }

    #[test]
    fn gpu_with_only_no_policy_claims_accepts_time_slicing_refuses_mps_and_exclusive() {
        let mut ledger = Ledger::new();
        ledger.admit("G", "a", None).unwrap();
        assert_eq!(
            ledger
                .check("G", "b", mps().as_ref())
                .unwrap_err()
                .holder_claim,
            "a"
        );
        assert!(ledger.check("G", "b", Some(&Policy::Exclusive)).is_err());
        assert_eq!(
            ledger.admit("G", "b", ts(TimeSlice::Short)),
            Ok(Action::Apply(ts(TimeSlice::Short).unwrap()))
        );
        // The time-slice holder now sets the rule for later claims.
        assert!(ledger.admit("G", "c", ts(TimeSlice::Long)).is_err());
    }

    #[test]
    fn same_claim_again_is_idempotent_and_cannot_change_policy() {
        let mut ledger = Ledger::new();
        ledger.admit("G", "a", ts(TimeSlice::Long)).unwrap();
        assert_eq!(
            ledger.admit("G", "a", ts(TimeSlice::Long)),
            Ok(Action::Nothing)
        );
        assert!(
            ledger
                .check("G", "a", ts(TimeSlice::Short).as_ref())
                .is_err()
        );
    }

    #[test]
    fn release_restores_when_last_policy_holder_leaves() {
        let mut ledger = Ledger::new();
        ledger.admit("G", "a", ts(TimeSlice::Long)).unwrap();
        ledger.admit("G", "b", ts(TimeSlice::Long)).unwrap();
        ledger.admit("G", "c", None).unwrap();
        assert_eq!(
            ledger.release("G", "a"),
            Action::Nothing,
            "b still holds the policy"
        );
        assert_eq!(
            ledger.release("G", "b"),
            Action::Restore(ts(TimeSlice::Long).unwrap())
        );
        assert_eq!(
            ledger.release("G", "c"),
            Action::Nothing,
            "no-policy claim restores nothing"
        );
        assert!(ledger.entries().is_empty());
        assert_eq!(
            ledger.release("G", "c"),
            Action::Nothing,
            "release is idempotent"
        );
        // After restore the GPU is free for any policy.
        assert_eq!(
            ledger.admit("G", "d", mps()),
            Ok(Action::Apply(mps().unwrap()))
        );
    }

    #[test]
    fn policy_serialises_with_a_strategy_tag_for_the_checkpoint() {
        let json = serde_json::to_string(&ts(TimeSlice::Long)).unwrap();
        assert_eq!(json, r#"{"strategy":"timeSlicing","interval":"Long"}"#);
        let limits = MpsLimits {
            active_thread_percentage: Some(50),
            pinned_memory_limit_bytes: None,
            per_device_pinned_memory_limit_bytes: [("GPU-a".to_owned(), 1 << 30)].into(),
        };
        let json = serde_json::to_string(&Policy::Mps(limits.clone())).unwrap();
        assert_eq!(
            json,
            r#"{"strategy":"mps","activeThreadPercentage":50,"pinnedMemoryLimitBytes":null,"perDevicePinnedMemoryLimitBytes":{"GPU-a":1073741824}}"#
        );
        for policy in [
            Policy::Exclusive,
            Policy::Mps(limits),
            ts(TimeSlice::Short).unwrap(),
        ] {
            let back: Policy =
                serde_json::from_str(&serde_json::to_string(&policy).unwrap()).unwrap();
            assert_eq!(back, policy);
        }
    }

    #[test]
    fn entries_and_claim_gpus_are_sorted() {
        let mut ledger = Ledger::new();
        ledger.record("G2", "b", None);
        ledger.record("G1", "b", ts(TimeSlice::Short));
        ledger.record("G1", "a", ts(TimeSlice::Short));
        assert_eq!(
            ledger
                .entries()
                .iter()
                .map(|(g, c, _)| format!("{g}/{c}"))
                .collect::<Vec<_>>(),
            ["G1/a", "G1/b", "G2/b"]
        );
        assert_eq!(
            ledger
                .claim_gpus("b")
                .iter()
                .map(|(g, _)| g.as_str())
                .collect::<Vec<_>>(),
            ["G1", "G2"]
        );
    }
}
