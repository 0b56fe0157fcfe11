//! `/healthz` and `/readyz` of the node plugin, computed from read-only snapshots.
//!
//! Owns what "ready" means: the NVIDIA driver was found and NVML loaded, the kubelet
//! accepted the registration, the node's ResourceSlices are published (the reconciler's
//! last pass left the API server in the desired state), and NVML answered its last
//! liveness call. `/healthz` only says the process serves HTTP: a liveness failure makes
//! the kubelet restart the container, which would not help any of the readiness causes.
//! It reads `tokio::sync::watch` snapshots and must not write state or call NVML or the
//! API server. Body format as the kube-apiserver's verbose `/readyz`: one `[+]name ok` or
//! `[-]name failed: reason` line per check, then `readyz check passed|failed`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

use crate::nvml_liveness::NvmlStatus;
use crate::plugin::RegistrationState;
use crate::slices::reconcile::PublishStatus;

/// Whether the plugin has found and loaded the NVIDIA driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverStatus {
    /// Still looking (at start, or the driver is not installed yet); `error` lists every
    /// path searched or says why NVML did not initialise.
    Searching {
        /// Why the driver is not usable yet.
        error: String,
    },
    /// NVML loaded from `library`.
    Loaded {
        /// The library loaded.
        library: std::path::PathBuf,
    },
}

impl Default for DriverStatus {
    fn default() -> Self {
        DriverStatus::Searching {
            error: "not searched yet".to_owned(),
        }
    }
}

/// The snapshots readiness is computed from (receivers of the owners' watch channels).
#[derive(Clone, Debug)]
pub struct ProbeInputs {
    /// Driver discovery (`run.rs` while it waits for the driver).
    pub driver: watch::Receiver<DriverStatus>,
    /// The kubelet's verdict on the registration (`PluginServer::registration_state`).
    pub registration: watch::Receiver<RegistrationState>,
    /// ResourceSlice publication (the slices reconciler).
    pub publish: watch::Receiver<PublishStatus>,
    /// The NVML liveness check.
    pub nvml: watch::Receiver<NvmlStatus>,
}

/// The sending halves matching [`ProbeInputs`], for the owners of each state.
#[derive(Debug)]
pub struct ProbeSenders {
    /// See [`ProbeInputs::driver`].
    pub driver: watch::Sender<DriverStatus>,
    /// See [`ProbeInputs::registration`].
    pub registration: watch::Sender<RegistrationState>,
    /// See [`ProbeInputs::publish`].
    pub publish: watch::Sender<PublishStatus>,
    /// See [`ProbeInputs::nvml`].
    pub nvml: watch::Sender<NvmlStatus>,
}

/// Fresh channels, every input at its initial (not ready) value.
pub fn probe_channels() -> (ProbeSenders, ProbeInputs) {
    let (driver, driver_rx) = watch::channel(DriverStatus::default());
    let (registration, registration_rx) = watch::channel(RegistrationState::Pending);
    let (publish, publish_rx) = watch::channel(PublishStatus::default());
    let (nvml, nvml_rx) = watch::channel(NvmlStatus::default());
    (
        ProbeSenders {
            driver,
            registration,
            publish,
            nvml,
        },
        ProbeInputs {
            driver: driver_rx,
            registration: registration_rx,
            publish: publish_rx,
            nvml: nvml_rx,
        },
    )
}

/// One readiness check's outcome: `failure` is `None` when it passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Stable check name: `driver`, `registration`, `resourceslices`, `nvml`.
    pub name: &'static str,
    /// Why the check fails.
    pub failure: Option<String>,
}

/// The readiness checks for the given snapshots, in a fixed order (pure).
pub fn readiness(
    driver: &DriverStatus,
    registration: &RegistrationState,
    publish: &PublishStatus,
    nvml: &NvmlStatus,
) -> Vec<Check> {
    let driver = match driver {
        DriverStatus::Loaded { .. } => None,
        DriverStatus::Searching { error } => Some(error.clone()),
    };
    let registration = match registration {
        RegistrationState::Registered => None,
        RegistrationState::Pending => {
            Some("the kubelet has not confirmed the plugin registration yet".to_owned())
        }
        RegistrationState::Rejected { error } => {
            Some(format!("the kubelet rejected the registration: {error}"))
        }
    };
    let slices = match (&publish.last_error, publish.in_sync) {
        (Some(error), _) => Some(format!("publishing ResourceSlices failed: {error}")),
        (None, true) => None,
        (None, false) => Some("ResourceSlices not published yet".to_owned()),
    };
    let nvml = match nvml {
        NvmlStatus::Answering { .. } => None,
        NvmlStatus::Unknown => Some("no NVML liveness call has completed yet".to_owned()),
        NvmlStatus::Failing { error } => Some(error.clone()),
    };
    vec![
        Check {
            name: "driver",
            failure: driver,
        },
        Check {
            name: "registration",
            failure: registration,
        },
        Check {
            name: "resourceslices",
            failure: slices,
        },
        Check {
            name: "nvml",
            failure: nvml,
        },
    ]
}

/// The `/readyz` answer for `checks`: 200 when all pass, else 503; the verbose body.
pub fn render(checks: &[Check]) -> (StatusCode, String) {
    let mut body = String::new();
    for check in checks {
        match &check.failure {
            None => body.push_str(&format!("[+]{} ok\n", check.name)),
            Some(reason) => body.push_str(&format!("[-]{} failed: {reason}\n", check.name)),
        }
    }
    if checks.iter().all(|c| c.failure.is_none()) {
        body.push_str("readyz check passed\n");
        (StatusCode::OK, body)
    } else {
        body.push_str("readyz check failed\n");
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Routes `/healthz` and `/readyz` over `inputs`.
pub fn routes(inputs: ProbeInputs) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(inputs)
}

async fn readyz(State(inputs): State<ProbeInputs>) -> (StatusCode, String) {
    let checks = readiness(
        &inputs.driver.borrow(),
        &inputs.registration.borrow(),
        &inputs.publish.borrow(),
        &inputs.nvml.borrow(),
    );
    render(&checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn failing(checks: &[Check]) -> Vec<&'static str> {
        checks
            .iter()
            .filter(|c| c.failure.is_some())
            .map(|c| c.name)
            .collect()
    }

    fn in_sync() -> PublishStatus {
        PublishStatus {
            generation: 1,
            slices: 1,
            devices: 8,
            in_sync: true,
            ..PublishStatus::default()
        }
    }

    fn loaded() -> DriverStatus {
        DriverStatus::Loaded {
            library: "/driver-root/usr/lib64/libnvidia-ml.so.1".into(),
        }
    }

    #[test]
    fn ready_only_when_every_check_passes() {
        let answering = NvmlStatus::Answering { gpus: 8 };
        let all = readiness(
            &loaded(),
            &RegistrationState::Registered,
            &in_sync(),
            &answering,
        );
        assert_eq!(failing(&all), Vec::<&str>::new());
        assert_eq!(render(&all).0, StatusCode::OK);

        let before_registration = readiness(
            &loaded(),
            &RegistrationState::Pending,
            &in_sync(),
            &answering,
        );
        assert_eq!(failing(&before_registration), ["registration"]);
        let rejected = RegistrationState::Rejected {
            error: "unsupported version".into(),
        };
        assert_eq!(
            failing(&readiness(&loaded(), &rejected, &in_sync(), &answering)),
            ["registration"]
        );
        let nvml_down = NvmlStatus::Failing {
            error: "nvmlDeviceGetCount_v2: Unknown Error".into(),
        };
        assert_eq!(
            failing(&readiness(
                &loaded(),
                &RegistrationState::Registered,
                &in_sync(),
                &nvml_down
            )),
            ["nvml"]
        );
        let publish_failed = PublishStatus {
            last_error: Some("forbidden".into()),
            ..in_sync()
        };
        assert_eq!(
            failing(&readiness(
                &loaded(),
                &RegistrationState::Registered,
                &publish_failed,
                &answering
            )),
            ["resourceslices"]
        );
        let at_start = readiness(
            &DriverStatus::default(),
            &RegistrationState::Pending,
            &PublishStatus::default(),
            &NvmlStatus::Unknown,
        );
        assert_eq!(
            failing(&at_start),
            ["driver", "registration", "resourceslices", "nvml"]
        );
        assert_eq!(render(&at_start).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn readyz_follows_the_snapshots_and_healthz_always_answers() {
        let (senders, inputs) = probe_channels();
        let router = routes(inputs);
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.ends_with("readyz check failed\n"), "{body}");

        senders.driver.send_replace(loaded());
        senders.publish.send_replace(in_sync());
        senders.nvml.send_replace(NvmlStatus::Answering { gpus: 1 });
        // Not registered yet: still not ready.
        assert_eq!(
            get(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        senders
            .registration
            .send_replace(RegistrationState::Registered);
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            "[+]driver ok\n[+]registration ok\n[+]resourceslices ok\n[+]nvml ok\nreadyz check passed\n"
        );
        // NVML stops answering: not ready, the process still healthy.
        senders.nvml.send_replace(NvmlStatus::Failing {
            error: "nvmlDeviceGetCount_v2: GPU is lost".into(),
        });
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("[-]nvml failed: nvmlDeviceGetCount_v2: GPU is lost\n"),
            "{body}"
        );
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
    }
}
