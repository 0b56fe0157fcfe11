//! The MPS limits of a claim as control-daemon commands, and the read-back of each.
//!
//! Owns: turning [`MpsLimits`] into `set_default_*` commands with the matching `get_default_*`
//! query, and judging the daemon's answer to that query (pure: no I/O).
//!
//! Must not: talk to the daemon (the supervisor sends the commands) or decide what a claim
//! may ask for beyond the daemon's own value ranges (the config module validates the API).
//!
//! Follows NVIDIA's MPS documentation (Legacy MPS v2 interface,
//! <https://docs.nvidia.com/deploy/mps/latest/mpsv2-interface.html>):
//! `set_default_active_thread_percentage <pct>` / `get_default_active_thread_percentage`
//! (printed as a decimal, e.g. `25.0`), and `set_default_device_pinned_mem_limit <dev>
//! <value>` / `get_default_device_pinned_mem_limit <dev>` with `<value>` an integer and a
//! `M` or `G` unit (the GPU Operator's MPS guide shows the query answering `3G`). A daemon
//! can accept a `set_` and keep the old value (the documentation warns that the defaults
//! only reach servers started later and are lost on `quit`), so every `set_` is followed by
//! its `get_` and a different answer fails the claim.

use super::MpsError;
use crate::sharing::policy::MpsLimits;

/// The value a `set_default_*` command must leave in the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Default active thread percentage (0..=100).
    ActiveThreadPercentage(u8),
    /// Default pinned device memory limit, in MiB.
    PinnedMemoryMib(u64),
}

/// One limit: the command that sets it, the query that reads it back, and the value wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSetting {
    /// The `set_default_*` command line, e.g. `set_default_device_pinned_mem_limit GPU-a 4096M`.
    pub set: String,
    /// The matching `get_default_*` command line.
    pub query: String,
    /// The GPU the limit is for (`None`: every GPU of the daemon).
    pub gpu_uuid: Option<String>,
    /// What the query must answer.
    pub wanted: Wanted,
}

impl LimitSetting {
    /// The setting's name for messages.
    pub fn name(&self) -> &'static str {
        match self.wanted {
            Wanted::ActiveThreadPercentage(_) => "default active thread percentage",
            Wanted::PinnedMemoryMib(_) => "default device pinned memory limit",
        }
    }

    /// The wanted value as the daemon's documentation writes it (`40`, `4096M`).
    pub fn wanted_text(&self) -> String {
        match self.wanted {
            Wanted::ActiveThreadPercentage(pct) => pct.to_string(),
            Wanted::PinnedMemoryMib(mib) => format!("{mib}M"),
        }
    }

    /// Whether `answer` (the query's stdout) shows the wanted value. `None` when the answer
    /// is not a value of this setting's kind.
    pub fn holds(&self, answer: &str) -> Option<bool> {
        match self.wanted {
            Wanted::ActiveThreadPercentage(pct) => {
                let read: f64 = answer.trim().parse().ok()?;
                Some((read - f64::from(pct)).abs() < 0.05)
            }
            Wanted::PinnedMemoryMib(mib) => Some(parse_mem_limit_mib(answer)? == mib),
        }
    }
}

/// The limit settings for `limits` on a daemon serving `gpu_uuids` (pure).
///
/// One active thread percentage when set, then one pinned memory limit per GPU that has a
/// limit (the per-device value wins over the global one), in GPU order. Bytes are rounded
/// down to whole MiB, the finest unit the daemon accepts. Errors
/// ([`MpsError::InvalidLimit`], [`MpsError::UnknownDevice`]): percentage over 100, a limit
/// under 1 MiB, a per-device key that is not one of `gpu_uuids`.
pub fn limit_settings(
    claim_uid: &str,
    gpu_uuids: &[String],
    limits: &MpsLimits,
) -> Result<Vec<LimitSetting>, MpsError> {
    let invalid = |what: String| MpsError::InvalidLimit {
        claim_uid: claim_uid.to_owned(),
        what,
    };
    let mut settings = Vec::new();
    if let Some(pct) = limits.active_thread_percentage {
        if pct > 100 {
            return Err(invalid(format!(
                "active thread percentage {pct} is outside 0..100"
            )));
        }
        settings.push(LimitSetting {
            set: format!("set_default_active_thread_percentage {pct}"),
            query: "get_default_active_thread_percentage".to_owned(),
            gpu_uuid: None,
            wanted: Wanted::ActiveThreadPercentage(pct),
        });
    }
    if let Some(device) = limits
        .per_device_pinned_memory_limit_bytes
        .keys()
        .find(|k| !gpu_uuids.contains(k))
    {
        return Err(MpsError::UnknownDevice {
            claim_uid: claim_uid.to_owned(),
            device: device.clone(),
            gpus: gpu_uuids.to_vec(),
        });
    }
    for uuid in gpu_uuids {
        let limit = limits
            .per_device_pinned_memory_limit_bytes
            .get(uuid)
            .copied()
            .or(limits.pinned_memory_limit_bytes);
        if let Some(bytes) = limit {
            let mib = bytes / (1024 * 1024);
            if mib == 0 {
                return Err(invalid(format!(
                    "pinned memory limit of {bytes} bytes for GPU {uuid} is below the 1 MiB the MPS daemon accepts"
                )));
            }
            settings.push(LimitSetting {
                set: format!("set_default_device_pinned_mem_limit {uuid} {mib}M"),
                query: format!("get_default_device_pinned_mem_limit {uuid}"),
                gpu_uuid: Some(uuid.clone()),
                wanted: Wanted::PinnedMemoryMib(mib),
            });
        }
    }
    Ok(settings)
}

/// The `set_default_*` commands of [`limit_settings`], in order (pure; same errors).
pub fn limit_commands(
    claim_uid: &str,
    gpu_uuids: &[String],
    limits: &MpsLimits,
) -> Result<Vec<String>, MpsError> {
    Ok(limit_settings(claim_uid, gpu_uuids, limits)?
        .into_iter()
        .map(|s| s.set)
        .collect())
}

/// A pinned memory limit as the daemon prints it, in MiB: an integer (or decimal) with a
/// unit `K`, `M`, `G` or `T` (also `KB`/`KiB`, ..., any case, binary multiples); `0` alone is
/// "no limit". `None` for anything else (a bare non-zero number has no documented unit).
pub fn parse_mem_limit_mib(answer: &str) -> Option<u64> {
    let text = answer.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let per_mib = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" if value == 0.0 => return Some(0),
        "k" => 1.0 / 1024.0,
        "m" => 1.0,
        "g" => 1024.0,
        "t" => 1024.0 * 1024.0,
        _ => return None,
    };
    // Whole MiB is the finest unit the daemon takes; round to absorb decimal printing.
    Some((value * per_mib).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn limit_commands_follow_the_control_daemon_syntax() {
        let limits = MpsLimits {
            active_thread_percentage: Some(40),
            pinned_memory_limit_bytes: Some(18 * 1024 * 1024 * 1024 + 512),
            per_device_pinned_memory_limit_bytes: [("GPU-b".to_owned(), 2048 * 1024 * 1024)].into(),
        };
        assert_eq!(
            limit_commands("c", &gpus(&["GPU-a", "GPU-b"]), &limits).unwrap(),
            [
                "set_default_active_thread_percentage 40",
                "set_default_device_pinned_mem_limit GPU-a 18432M",
                "set_default_device_pinned_mem_limit GPU-b 2048M",
            ]
        );
        let queries: Vec<String> = limit_settings("c", &gpus(&["GPU-a", "GPU-b"]), &limits)
            .unwrap()
            .into_iter()
            .map(|s| s.query)
            .collect();
        assert_eq!(
            queries,
            [
                "get_default_active_thread_percentage",
                "get_default_device_pinned_mem_limit GPU-a",
                "get_default_device_pinned_mem_limit GPU-b",
            ]
        );
        assert!(
            limit_commands("c", &gpus(&["GPU-a"]), &MpsLimits::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn limit_commands_reject_bad_values() {
        let pct = MpsLimits {
            active_thread_percentage: Some(101),
            ..MpsLimits::default()
        };
        assert!(
            limit_commands("c", &gpus(&["G"]), &pct)
                .unwrap_err()
                .to_string()
                .contains("0..100")
        );
        let tiny = MpsLimits {
            pinned_memory_limit_bytes: Some(1000),
            ..MpsLimits::default()
        };
        assert!(matches!(
            limit_commands("c", &gpus(&["G"]), &tiny),
            Err(MpsError::InvalidLimit { .. })
        ));
        let stranger = MpsLimits {
            per_device_pinned_memory_limit_bytes: [("GPU-x".to_owned(), 1 << 30)].into(),
            ..MpsLimits::default()
        };
        let err = limit_commands("c", &gpus(&["G"]), &stranger).unwrap_err();
        assert!(err.to_string().contains("GPU-x"), "{err}");
    }

    #[test]
    fn read_back_judges_the_daemon_answers() {
        let limits = MpsLimits {
            active_thread_percentage: Some(25),
            pinned_memory_limit_bytes: Some(3 << 30),
            ..MpsLimits::default()
        };
        let s = limit_settings("c", &gpus(&["GPU-a"]), &limits).unwrap();
        assert_eq!(s[0].holds("25.0\n"), Some(true));
        assert_eq!(s[0].holds("100.0"), Some(false));
        assert_eq!(s[0].holds("Cannot find"), None);
        for same in ["3G", "3072M", "3072 MiB", "3g", "3145728K", " 3G\n"] {
            assert_eq!(s[1].holds(same), Some(true), "{same}");
        }
        assert_eq!(s[1].holds("0"), Some(false));
        assert_eq!(s[1].holds("2G"), Some(false));
        assert_eq!(s[1].holds("3072"), None, "no unit: not a documented answer");
        assert_eq!(s[1].wanted_text(), "3072M");
    }
}
