//! Picks the opaque config that applies to one allocated device.
//!
//! Owns the precedence rule over `ResourceClaim.status.allocation.devices.config[]`; pure
//! (no I/O, no device facts: the caller then runs `validate::validate_for_device`).
//!
//! Rule (KEP-4381 semantics as NVIDIA's driver applies them, plus the issue's
//! "request-specific beats general"): only entries whose `opaque.driver` is our driver
//! count; an entry with no `requests` applies to every request, an entry naming `req`
//! applies to `req` and its sub-requests `req/sub`, an entry naming `req/sub` only to that
//! sub-request. Among applicable entries the winner is the greatest by
//! (source: FromClass < FromClaim, specificity: general < main request < exact sub-request,
//! position in the list). So a claim's config always beats its class's, and within one
//! source a request-specific entry beats a general one wherever it is listed (NVIDIA's
//! driver lets a later general entry win; we deem that surprising). Every applicable entry
//! is validated, also those that lose: a bad config is reported, never silently ignored.
//! Two applicable entries at the same (source, specificity) with the same kind and
//! different configs are an error naming both ([`super::conflict`]): position would pick
//! one and silently drop the other, so position only ever chooses between equal copies.

use std::fmt;

use k8s_openapi::api::resource::v1::DeviceAllocationConfiguration;

use super::api::Config;
use super::conflict::{Candidate, conflicts};
use super::validate::{FieldError, join_errors, validate_opaque};

/// Where an allocation config entry came from (`allocation.devices.config[].source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfigSource {
    /// `FromClass`: a DeviceClass's `spec.config`.
    FromClass,
    /// `FromClaim`: the ResourceClaim's `spec.devices.config`.
    FromClaim,
}

impl ConfigSource {
    /// Parses the API's string; `None` for unknown values.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "FromClass" => Some(ConfigSource::FromClass),
            "FromClaim" => Some(ConfigSource::FromClaim),
            _ => None,
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigSource::FromClass => "FromClass",
            ConfigSource::FromClaim => "FromClaim",
        })
    }
}

/// The config that applies to a device, with the entry it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedConfig {
    /// The validated config (not yet checked against the device: see `validate_for_device`).
    pub config: Config,
    /// Index of the winning entry in `allocation.devices.config[]`.
    pub index: usize,
    /// Source of the winning entry.
    pub source: ConfigSource,
}

/// A bad entry in `allocation.devices.config[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    /// Index of the entry in `allocation.devices.config[]`.
    pub index: usize,
    /// The entry's `source` as written (may be an unknown value).
    pub source: String,
    /// What is wrong, with paths inside `opaque.parameters`.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match ConfigSource::parse(&self.source) {
            Some(ConfigSource::FromClass) => "DeviceClass config",
            Some(ConfigSource::FromClaim) => "claim config",
            None => "config",
        };
        write!(
            f,
            "{origin} #{} ({}): {}",
            self.index,
            self.source,
            join_errors(&self.errors)
        )
    }
}

/// How well an entry's `requests` match a device's request (greater is more specific).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    General,
    MainRequest,
    Exact,
}

fn specificity(entry_requests: &[String], request: &str) -> Option<Specificity> {
    if entry_requests.is_empty() {
        return Some(Specificity::General);
    }
    let main = request.split_once('/').map(|(m, _)| m);
    entry_requests
        .iter()
        .filter_map(|r| {
            if r == request {
                Some(Specificity::Exact)
            } else if Some(r.as_str()) == main {
                Some(Specificity::MainRequest)
            } else {
                None
            }
        })
        .max()
}

/// Resolves the effective config of one device allocated for `request` (the allocation
/// result's `request`, possibly `main/sub`) from `configs` (`allocation.devices.config`).
///
/// Returns `Ok(None)` when no entry of `driver` applies (= no policy change), the winner
/// otherwise. Errors: one [`EntryError`] per applicable entry of `driver` that has an
/// unknown `source` or fails [`validate_opaque`], in list order.
pub fn resolve(
    configs: &[DeviceAllocationConfiguration],
    driver: &str,
    request: &str,
) -> Result<Option<ResolvedConfig>, Vec<EntryError>> {
    let mut errors = Vec::new();
    let mut best: Option<((ConfigSource, Specificity, usize), ResolvedConfig)> = None;
    let mut valid: Vec<(usize, (ConfigSource, Specificity), Config)> = Vec::new();
    for (index, entry) in configs.iter().enumerate() {
        let Some(opaque) = entry.opaque.as_ref().filter(|o| o.driver == driver) else {
            continue;
        };
        let requests = entry.requests.as_deref().unwrap_or_default();
        let Some(spec) = specificity(requests, request) else {
            continue;
        };
        let entry_error = |errors| EntryError {
            index,
            source: entry.source.clone(),
            errors,
        };
        let Some(source) = ConfigSource::parse(&entry.source) else {
            errors.push(entry_error(vec![FieldError {
                path: "source".into(),
                message: format!(
                    "unsupported value {:?}; allowed: FromClass, FromClaim",
                    entry.source
                ),
            }]));
            continue;
        };
        match validate_opaque(&opaque.parameters.0) {
            Ok(config) => {
                valid.push((index, (source, spec), config.clone()));
                let key = (source, spec, index);
                if best.as_ref().is_none_or(|(k, _)| key > *k) {
                    best = Some((
                        key,
                        ResolvedConfig {
                            config,
                            index,
                            source,
                        },
                    ));
                }
            }
            Err(field_errors) => errors.push(entry_error(field_errors)),
        }
    }
    errors.extend(same_source_conflicts(configs, &valid, request));
    errors.sort_by_key(|e| e.index);
    if errors.is_empty() {
        Ok(best.map(|(_, r)| r))
    } else {
        Err(errors)
    }
}

/// One [`EntryError`] on the later entry of each pair of `valid` entries (index, level,
/// config) that conflict for `request` ([`conflicts`]), naming both.
fn same_source_conflicts(
    configs: &[DeviceAllocationConfiguration],
    valid: &[(usize, (ConfigSource, Specificity), Config)],
    request: &str,
) -> Vec<EntryError> {
    let candidates: Vec<Candidate<'_, _>> = valid
        .iter()
        .map(|(index, level, config)| Candidate {
            index: *index,
            level: *level,
            config,
        })
        .collect();
    conflicts(&candidates)
        .into_iter()
        .map(|c| {
            let source = configs
                .get(c.later)
                .map(|e| e.source.clone())
                .unwrap_or_default();
            let what = match valid.iter().find(|v| v.0 == c.later).map(|v| v.1.1) {
                Some(Specificity::General) => "every request".to_owned(),
                _ => format!("request {request:?}"),
            };
            let origin = match ConfigSource::parse(&source) {
                Some(ConfigSource::FromClass) => "DeviceClass config",
                _ => "claim config",
            };
            let kind = valid
                .iter()
                .find(|v| v.0 == c.later)
                .map_or("config", |v| v.2.kind().as_str());
            EntryError {
                index: c.later,
                source,
                errors: vec![FieldError::new(
                    "",
                    format!(
                        "conflicts with {origin} #{earlier}: both configure {what} with a \
                         different {kind}; the precedence rule would silently apply #{later} \
                         only: remove one entry or merge them",
                        earlier = c.earlier,
                        later = c.later,
                    ),
                )],
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::api::{Sharing, TimeSliceInterval};
    use k8s_openapi::api::resource::v1::OpaqueDeviceConfiguration;
    use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
    use serde_json::json;

    const DRIVER: &str = "gpu.gpu-dra.dev";

    fn entry(
        source: &str,
        requests: &[&str],
        driver: &str,
        interval: &str,
    ) -> DeviceAllocationConfiguration {
        DeviceAllocationConfiguration {
            source: source.into(),
            requests: (!requests.is_empty())
                .then(|| requests.iter().map(|s| s.to_string()).collect()),
            opaque: Some(OpaqueDeviceConfiguration {
                driver: driver.into(),
                parameters: RawExtension(json!({
                    "apiVersion": "gpu.gpu-dra.dev/v1alpha1",
                    "kind": "GpuConfig",
                    "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}}
                })),
            }),
        }
    }

    fn interval_of(r: &ResolvedConfig) -> TimeSliceInterval {
        match r.config.sharing() {
            Some(Sharing::TimeSlicing { interval }) => *interval,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn winner(
        configs: &[DeviceAllocationConfiguration],
        request: &str,
    ) -> (usize, TimeSliceInterval) {
        let r = resolve(configs, DRIVER, request)
            .expect("valid")
            .expect("some config");
        (r.index, interval_of(&r))
    }

    #[test]
    fn nothing_applies_means_none() {
        assert_eq!(resolve(&[], DRIVER, "gpu"), Ok(None));
        let configs = [
            entry("FromClaim", &[], "gpu.nvidia.com", "Long"),
            entry("FromClaim", &["other"], DRIVER, "Long"),
            DeviceAllocationConfiguration {
                source: "FromClaim".into(),
                requests: None,
                opaque: None,
            },
        ];
        assert_eq!(resolve(&configs, DRIVER, "gpu"), Ok(None));
    }

    #[test]
    fn claim_beats_class_and_later_copy_beats_earlier() {
        let configs = [
            entry("FromClaim", &[], DRIVER, "Medium"),
            entry("FromClass", &[], DRIVER, "Long"),
            entry("FromClaim", &[], DRIVER, "Medium"),
        ];
        assert_eq!(winner(&configs, "gpu"), (2, TimeSliceInterval::Medium));
        let r = resolve(&configs[..2], DRIVER, "gpu")
            .expect("valid")
            .expect("some");
        assert_eq!((r.index, r.source), (0, ConfigSource::FromClaim));
    }

    #[test]
    fn two_different_entries_of_one_source_for_one_request_are_rejected_naming_both() {
        for (source, origin) in [
            ("FromClaim", "claim config"),
            ("FromClass", "DeviceClass config"),
        ] {
            let configs = [
                entry(source, &["gpu"], DRIVER, "Short"),
                entry("FromClaim", &["other"], DRIVER, "Long"),
                entry(source, &["gpu"], DRIVER, "Medium"),
            ];
            let errs = resolve(&configs, DRIVER, "gpu").expect_err("conflict");
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!((errs[0].index, errs[0].source.as_str()), (2, source));
            let text = errs[0].to_string();
            assert!(
                text.contains("#2 ") && text.ends_with(&format!("({source}): conflicts with {origin} #0: both configure request \"gpu\" with a different GpuConfig; the precedence rule would silently apply #2 only: remove one entry or merge them")),
                "{text}"
            );
            // The other request is unaffected.
            assert_eq!(winner(&configs, "other"), (1, TimeSliceInterval::Long));
        }
        // Two general entries of one source conflict for every request.
        let configs = [
            entry("FromClass", &[], DRIVER, "Short"),
            entry("FromClass", &[], DRIVER, "Long"),
        ];
        let errs = resolve(&configs, DRIVER, "x").expect_err("conflict");
        assert!(
            errs[0].to_string().contains("both configure every request"),
            "{}",
            errs[0]
        );
        // Across sources or levels there is no conflict: that is what precedence is for.
        let configs = [
            entry("FromClass", &["gpu"], DRIVER, "Short"),
            entry("FromClaim", &["gpu"], DRIVER, "Long"),
            entry("FromClaim", &[], DRIVER, "Medium"),
            entry("FromClaim", &["gpu/sub"], DRIVER, "Short"),
        ];
        assert_eq!(winner(&configs, "gpu"), (1, TimeSliceInterval::Long));
        assert_eq!(winner(&configs, "gpu/sub"), (3, TimeSliceInterval::Short));
    }

    #[test]
    fn request_specific_applies_only_to_its_request_and_beats_general() {
        let configs = [
            entry("FromClaim", &["a"], DRIVER, "Long"),
            entry("FromClaim", &[], DRIVER, "Short"),
        ];
        assert_eq!(winner(&configs, "a"), (0, TimeSliceInterval::Long));
        assert_eq!(winner(&configs, "b"), (1, TimeSliceInterval::Short));
        // A claim's general config still beats a class's request-specific one.
        let configs = [
            entry("FromClass", &["a"], DRIVER, "Long"),
            entry("FromClaim", &[], DRIVER, "Short"),
        ];
        assert_eq!(winner(&configs, "a"), (1, TimeSliceInterval::Short));
    }

    #[test]
    fn main_request_covers_sub_requests_and_exact_sub_request_wins() {
        let configs = [
            entry("FromClaim", &["a/small"], DRIVER, "Long"),
            entry("FromClaim", &["a"], DRIVER, "Medium"),
        ];
        assert_eq!(winner(&configs, "a/small"), (0, TimeSliceInterval::Long));
        assert_eq!(winner(&configs, "a/large"), (1, TimeSliceInterval::Medium));
        assert_eq!(winner(&configs, "a"), (1, TimeSliceInterval::Medium));
        assert_eq!(resolve(&configs, DRIVER, "ab/small"), Ok(None));
    }

    #[test]
    fn bad_entries_are_named_by_index_and_source() {
        let mut bad = entry("FromClass", &[], DRIVER, "Forever");
        let configs = [entry("FromClaim", &[], DRIVER, "Long"), bad.clone()];
        let errs = resolve(&configs, DRIVER, "gpu").expect_err("bad entry");
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].index, errs[0].source.as_str()), (1, "FromClass"));
        assert_eq!(errs[0].errors[0].path, "sharing.timeSlicingConfig.interval");
        assert!(errs[0].to_string().starts_with("DeviceClass config #1 (FromClass): sharing.timeSlicingConfig.interval: unsupported value \"Forever\""), "{}", errs[0]);
        // A bad entry for another request or driver does not matter here.
        bad.requests = Some(vec!["other".into()]);
        assert!(resolve(&[bad.clone()], DRIVER, "gpu").is_ok());
        bad.requests = None;
        bad.source = "FromSomewhere".into();
        let errs = resolve(&[bad], DRIVER, "gpu").expect_err("unknown source");
        assert_eq!(errs[0].errors[0].path, "source");
        assert!(
            errs[0].errors[0]
                .message
                .contains("allowed: FromClass, FromClaim")
        );
    }
}
