//! The HTTPS server of the admission webhook: routes, TLS, certificate reload, shutdown.
//!
//! Owns the HTTP surface (`POST /validate` takes an `admission.k8s.io/v1` AdmissionReview
//! and answers one; `GET /healthz` answers `ok` in plain text), loading the serving
//! certificate and key (PEM) into a rustls config with the ring provider, re-reading them
//! when their files change (cert-manager rotates the mounted Secret in place), and a
//! graceful stop. It must not judge objects: [`super::review`] does.
//!
//! Follows the API server's webhook client expectations: TLS only, ALPN `h2` and
//! `http/1.1`, a JSON AdmissionReview of the same version in the reply.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::review::review_with_duplicates;

/// Largest request body accepted (an UPDATE carries the object twice; objects are
/// limited to about 1.5 MiB by etcd).
const BODY_LIMIT: usize = 8 << 20;
/// How often the certificate and key files are checked for a change.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How long open connections may finish their requests after a stop is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors of starting or running the webhook server.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A certificate or key file could not be read or holds no usable PEM item.
    #[error("reading TLS {what} from {path}")]
    ReadPem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file named by the flag.
        path: PathBuf,
        /// What the PEM reader reported.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls rejected the certificate/key pair (e.g. the key does not match).
    #[error("building the TLS config from {cert} and {key}")]
    Tls {
        /// Certificate chain file.
        cert: PathBuf,
        /// Private key file.
        key: PathBuf,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// Binding or serving on the address failed.
    #[error("serving HTTPS on {addr}")]
    Serve {
        /// The bind address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Where and how the webhook serves.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Address and port to listen on (port 0 picks a free one; the log names it).
    pub bind_address: SocketAddr,
    /// PEM certificate chain file.
    pub tls_cert_file: PathBuf,
    /// PEM private key file (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: PathBuf,
    /// DRA driver name whose opaque config is judged.
    pub driver_name: String,
}

/// The webhook's routes: `POST /validate` and `GET /healthz`, judging for `driver`.
pub fn router(driver: &str) -> Router {
    let driver: Arc<str> = Arc::from(driver);
    Router::new()
        .route("/validate", post(validate))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(driver)
}

async fn healthz() -> &'static str {
    "ok"
}

/// Decodes the AdmissionReview, judges it and answers with the response review.
async fn validate(State(driver): State<Arc<str>>, body: Bytes) -> Response {
    let incoming: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => {
            warn!(%error, "request body is not an AdmissionReview");
            return (
                StatusCode::BAD_REQUEST,
                format!("request body is not an AdmissionReview: {error}"),
            )
                .into_response();
        }
    };
    let request: AdmissionRequest<DynamicObject> = match incoming.try_into() {
        Ok(request) => request,
        Err(_) => {
            let answer = AdmissionResponse::invalid("AdmissionReview carries no request");
            return axum::Json(answer.into_review()).into_response();
        }
    };
    // The decoded review kept one value of each repeated key: find them in the bytes.
    let duplicates: Vec<crate::config::DuplicateKey> = crate::config::find_duplicate_keys(&body)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| {
            let path = match d.path.as_str() {
                "request.object" => "",
                other => other.strip_prefix("request.object.")?,
            };
            Some(crate::config::DuplicateKey {
                path: path.to_owned(),
                key: d.key,
            })
        })
        .collect();
    let answer = review_with_duplicates(&request, &driver, &duplicates);
    let namespace = request.namespace.as_deref().unwrap_or("");
    if answer.allowed {
        debug!(uid = %request.uid, kind = %request.kind.kind, namespace, name = %request.name, "allowed");
    } else {
        info!(
            uid = %request.uid,
            kind = %request.kind.kind,
            namespace,
            name = %request.name,
            reason = %answer.result.message,
            "denied"
        );
    }
    axum::Json(answer.into_review()).into_response()
}

/// Loads a PEM certificate chain and private key into a rustls server config using the
/// ring provider, offering ALPN `h2` and `http/1.1`.
pub fn load_tls(cert: &Path, key: &Path) -> Result<ServerConfig, WebhookError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|items| items.collect::<Result<Vec<_>, _>>())
        .and_then(|chain| {
            if chain.is_empty() {
                Err(rustls::pki_types::pem::Error::NoItemsFound)
            } else {
                Ok(chain)
            }
        })
        .map_err(|source| WebhookError::ReadPem {
            what: "certificate",
            path: cert.to_path_buf(),
            source,
        })?;
    let private_key =
        PrivateKeyDer::from_pem_file(key).map_err(|source| WebhookError::ReadPem {
            what: "private key",
            path: key.to_path_buf(),
            source,
        })?;
    let tls_error = |source| WebhookError::Tls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(tls_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the webhook until `shutdown` is cancelled, then lets open requests finish
/// (at most 10 s). Fails at once if the TLS files are unusable or the address is taken.
pub async fn serve(
    settings: &WebhookSettings,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let cert = settings.tls_cert_file.clone();
    let key = settings.tls_key_file.clone();
    let tls = RustlsConfig::from_config(Arc::new(load_tls(&cert, &key)?));
    let serve_error = |source| WebhookError::Serve {
        addr: settings.bind_address,
        source,
    };
    let listener = tokio::net::TcpListener::bind(settings.bind_address)
        .await
        .map_err(serve_error)?;
    let local = listener.local_addr().map_err(serve_error)?;
    let listener = listener.into_std().map_err(serve_error)?;
    let server =
        axum_server::tls_rustls::from_tcp_rustls(listener, tls.clone()).map_err(serve_error)?;
    let handle: Handle<SocketAddr> = Handle::new();
    let stopper = {
        let handle = handle.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
        })
    };
    let reloader = tokio::spawn(reload_on_change(tls, cert, key, shutdown.clone()));
    info!(address = %local, driver = %settings.driver_name, "admission webhook listening");
    let result = server
        .handle(handle)
        .serve(router(&settings.driver_name).into_make_service())
        .await
        .map_err(serve_error);
    stopper.abort();
    reloader.abort();
    result
}

/// Modification times of the certificate and key files (`None` where unreadable).
fn file_times(cert: &Path, key: &Path) -> [Option<SystemTime>; 2] {
    [cert, key].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Re-reads the certificate and key whenever either file changes (checked every 30 s).
async fn reload_on_change(tls: RustlsConfig, cert: PathBuf, key: PathBuf, stop: CancellationToken) {
    let mut watch = CertWatch::new(cert, key);
    let mut ticks = tokio::time::interval(CERT_CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match watch.check(&tls) {
            Reload::Unchanged => {}
            Reload::Reloaded => {
                info!(cert = %watch.cert.display(), "reloaded the serving certificate")
            }
            Reload::Failed(error) => {
                warn!(error = %crate::prepare::error_chain(&error), "keeping the previous serving certificate")
            }
        }
    }
}

/// Outcome of one [`CertWatch::check`].
#[derive(Debug)]
enum Reload {
    /// Neither file changed since the last successful load.
    Unchanged,
    /// The pair was re-read and is now served to new connections.
    Reloaded,
    /// The files changed but do not load (e.g. caught between the two writes); the
    /// previous pair stays in use and the next check tries again.
    Failed(WebhookError),
}

/// The certificate and key files and their modification times at the last load.
struct CertWatch {
    cert: PathBuf,
    key: PathBuf,
    seen: [Option<SystemTime>; 2],
}

impl CertWatch {
    /// Starts watching with the files' current times (the pair already loaded).
    fn new(cert: PathBuf, key: PathBuf) -> Self {
        let seen = file_times(&cert, &key);
        Self { cert, key, seen }
    }

    /// Reloads `tls` from the files if either changed since the last successful load.
    fn check(&mut self, tls: &RustlsConfig) -> Reload {
        let now = file_times(&self.cert, &self.key);
        if now == self.seen {
            return Reload::Unchanged;
        }
        match load_tls(&self.cert, &self.key) {
            Ok(config) => {
                tls.reload_from_config(Arc::new(config));
                self.seen = now;
                Reload::Reloaded
            }
            Err(error) => Reload::Failed(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    async fn call(request: Request<Body>) -> (StatusCode, Bytes) {
        let response = router("gpu.gpu-dra.dev")
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, body)
    }

    #[tokio::test]
    async fn healthz_answers_plain_ok() {
        let (status, body) = call(
            Request::get("/healthz")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn validate_answers_a_review_with_the_request_uid() {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "resource.k8s.io", "version": "v1", "kind": "DeviceClass"},
                "resource": {"group": "resource.k8s.io", "version": "v1", "resource": "deviceclasses"},
                "name": "x",
                "operation": "CREATE",
                "userInfo": {},
                "object": {"metadata": {"name": "x"}, "spec": {"config": [{"opaque": {
                    "driver": "gpu.gpu-dra.dev",
                    "parameters": {"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "Gpu"}
                }}]}}
            }
        });
        let request = Request::post("/validate")
            .header("content-type", "application/json")
            .body(Body::from(review.to_string()))
            .expect("request");
        let (status, body) = call(request).await;
        assert_eq!(status, StatusCode::OK);
        let answer: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"]
            .as_str()
            .expect("message");
        assert!(
            message.starts_with("spec.config[0].opaque.parameters.kind: "),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_repeated_key_in_our_parameters_is_denied_naming_its_path() {
        // serde_json keeps the last "strategy"; the body still has both.
        let body = r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-2",
                "kind": {"group": "resource.k8s.io", "version": "v1", "kind": "DeviceClass"},
                "resource": {"group": "resource.k8s.io", "version": "v1", "resource": "deviceclasses"},
                "name": "x", "operation": "CREATE", "userInfo": {},
                "object": {"metadata": {"name": "x"}, "spec": {"config": [{"opaque": {
                    "driver": "gpu.gpu-dra.dev",
                    "parameters": {"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                        "sharing": {"strategy": "MPS", "strategy": "TimeSlicing"}}}}]}},
                "oldObject": {"a": 1, "a": 2}}}"#;
        let request = Request::post("/validate")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let (status, body) = call(request).await;
        assert_eq!(status, StatusCode::OK);
        let answer: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
        let causes = answer["response"]["status"]["details"]["causes"]
            .as_array()
            .expect("causes");
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(
            causes[0]["field"],
            "spec.config[0].opaque.parameters.sharing.strategy"
        );
        assert!(
            causes[0]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("duplicate key \"strategy\"")),
            "{causes:?}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_bad_request() {
        let request = Request::post("/validate")
            .body(Body::from("{"))
            .expect("request");
        let (status, _) = call(request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn tls_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, "not pem").expect("write");
        std::fs::write(&key, "not pem").expect("write");
        let error = load_tls(&cert, &key).expect_err("no certificate");
        assert!(error.to_string().contains("tls.crt"), "{error}");
        let missing = dir.path().join("missing.crt");
        let error = load_tls(&missing, &key).expect_err("missing file");
        assert!(error.to_string().contains("missing.crt"), "{error}");
    }

    /// Writes a fresh self-signed pair for localhost, both files stamped with `stamp`.
    fn write_pair(cert: &Path, key: &Path, stamp: SystemTime) {
        let issued =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        std::fs::write(cert, issued.cert.pem()).expect("write");
        std::fs::write(key, issued.signing_key.serialize_pem()).expect("write");
        for path in [cert, key] {
            let file = std::fs::File::options()
                .write(true)
                .open(path)
                .expect("open");
            file.set_modified(stamp).expect("set mtime");
        }
    }

    #[test]
    fn changed_files_are_reloaded_and_a_broken_pair_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        write_pair(&cert, &key, t0);
        let tls = RustlsConfig::from_config(Arc::new(load_tls(&cert, &key).expect("pair")));
        let mut watch = CertWatch::new(cert.clone(), key.clone());
        let first = tls.get_inner();
        assert!(matches!(watch.check(&tls), Reload::Unchanged));
        assert!(Arc::ptr_eq(&first, &tls.get_inner()));

        // Half-written rotation: a new certificate with the old key does not load.
        let issued =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        std::fs::write(&cert, issued.cert.pem()).expect("write");
        assert!(matches!(
            watch.check(&tls),
            Reload::Failed(WebhookError::Tls { .. })
        ));
        assert!(Arc::ptr_eq(&first, &tls.get_inner()));

        // The completed rotation is picked up, once.
        write_pair(&cert, &key, t0 + Duration::from_secs(60));
        assert!(matches!(watch.check(&tls), Reload::Reloaded));
        let second = tls.get_inner();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(matches!(watch.check(&tls), Reload::Unchanged));
        assert!(Arc::ptr_eq(&second, &tls.get_inner()));
    }

    #[test]
    fn tls_loads_a_matching_pair_and_rejects_a_foreign_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issued =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let other = rcgen::KeyPair::generate().expect("key");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let foreign = dir.path().join("foreign.key");
        std::fs::write(&cert, issued.cert.pem()).expect("write");
        std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write");
        std::fs::write(&foreign, other.serialize_pem()).expect("write");
        let config = load_tls(&cert, &key).expect("valid pair");
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let error = load_tls(&cert, &foreign).expect_err("mismatched key");
        assert!(matches!(error, WebhookError::Tls { .. }), "{error}");
    }
}
