//! End-to-end test of `gpu-dra webhook` on the box's real API server (issue 5, item 6).
//!
//! The test issues a throwaway CA and a serving certificate for 127.0.0.1/localhost,
//! runs the webhook binary on a free loopback port and registers it with a
//! ValidatingWebhookConfiguration (`clientConfig.url` + `caBundle`). The registration is
//! scoped to this test: claims and templates by a namespace label only the test's
//! namespace carries, DeviceClasses (cluster-scoped) by an object label, so nothing else
//! on the box is ever sent to this webhook. Then: bad configs are rejected with the field
//! path and allowed values, good ones and other drivers' configs pass.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceClaimTemplate};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};

const DRIVER: &str = "gpu.gpu-dra.dev";
const STEP: Duration = Duration::from_secs(60);

/// The webhook child process; killed (and reaped) when dropped, even if the test panics.
struct Webhook {
    child: Mutex<Child>,
}

impl Webhook {
    /// `Some(exit status)` once the process has exited.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        child.try_wait().ok().flatten()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// PEM of a throwaway CA and of a serving cert + key for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn issue_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gpu-dra webhook e2e CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn start_webhook(dir: &Path, pki: &Pki, port: u16) -> Webhook {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    let log = std::fs::File::create(dir.join("webhook.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gpu-dra"))
        .arg("webhook")
        .arg("--bind-address")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--driver-name")
        .arg(DRIVER)
        .env_remove("GPU_DRA_DRIVER_NAME")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Webhook {
        child: Mutex::new(child),
    }
}

fn webhook_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("webhook.log")).unwrap_or_default()
}

fn mps(percentage: i64) -> Value {
    json!({
        "apiVersion": "gpu.gpu-dra.dev/v1alpha1",
        "kind": "GpuConfig",
        "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": percentage}}
    })
}

fn claim_spec(driver: &str, params: Value) -> Value {
    json!({"devices": {
        "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
        "config": [{"requests": ["gpu"], "opaque": {"driver": driver, "parameters": params}}]
    }})
}

fn claim(name: &str, driver: &str, params: Value) -> ResourceClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": claim_spec(driver, params)
    }))
    .unwrap()
}

/// The API error of a rejected request (panics if the request succeeded).
fn rejection<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_rejects_bad_opaque_config_on_the_real_api_server() {
    let b = support::shared();
    let client = b.client().await;
    let ns = b.create_namespace("webhook").await;
    let scope_label = "webhook-e2e.gpu-dra.dev/run";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {scope_label: ns}}})),
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let pki = issue_pki();
    let port = free_loopback_port();
    let started = Instant::now();
    let webhook = start_webhook(dir.path(), &pki, port);
    b.wait(Duration::from_secs(30), "webhook listening", || async {
        if let Some(status) = webhook.exited() {
            anyhow::bail!(
                "gpu-dra webhook exited with {status}:\n{}",
                webhook_log(dir.path())
            );
        }
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ()))
    })
    .await
    .unwrap();
    eprintln!("webhook listening after {:?}", started.elapsed());

    // Register it, scoped to this test's namespace and to labelled DeviceClasses.
    let config_name = format!("{ns}.webhook-e2e.gpu-dra.dev");
    let url = format!("https://127.0.0.1:{port}/validate");
    let hook = |name: &str, resources: &[&str], selector: Value| {
        let mut hook = json!({
            "name": name,
            "clientConfig": {"url": url},
            "rules": [{
                "apiGroups": ["resource.k8s.io"],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"],
                "resources": resources,
            }],
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        });
        let key = if resources == ["deviceclasses"] {
            "objectSelector"
        } else {
            "namespaceSelector"
        };
        hook[key] = selector;
        hook
    };
    let selector = json!({"matchLabels": {scope_label: ns}});
    let mut registration: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": config_name},
        "webhooks": [
            hook("claims.webhook-e2e.gpu-dra.dev", &["resourceclaims", "resourceclaimtemplates"], selector.clone()),
            hook("classes.webhook-e2e.gpu-dra.dev", &["deviceclasses"], selector),
        ]
    }))
    .unwrap();
    for hook in registration.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(pki.ca_pem.clone().into_bytes()));
    }
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .create(&PostParams::default(), &registration)
        .await
        .unwrap();

    // Effective once a dry-run create of a known-bad claim comes back denied by it.
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let registered = Instant::now();
    b.wait(STEP, "webhook effective", || async {
        match claims
            .create(&dry_run, &claim("probe", DRIVER, mps(150)))
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("denied the request") => Ok(Some(())),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(None),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nwebhook log:\n{}", webhook_log(dir.path())));
    eprintln!(
        "webhook effective {:?} after registration",
        registered.elapsed()
    );

    // A bad claim is rejected with the field path, the value and the allowed range.
    let call = Instant::now();
    let status = rejection(
        claims
            .create(&PostParams::default(), &claim("bad", DRIVER, mps(150)))
            .await,
    );
    eprintln!("rejected create took {:?}", call.elapsed());
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains(
            "admission webhook \"claims.webhook-e2e.gpu-dra.dev\" denied the request: \
             spec.devices.config[0].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage: "
        ),
        "{}",
        status.message
    );
    assert!(status.message.contains("150"), "{}", status.message);
    assert!(claims.get_opt("bad").await.unwrap().is_none());

    // Wrong apiVersion and kind: both named, with the allowed values.
    let status = rejection(
        claims
            .create(
                &PostParams::default(),
                &claim(
                    "bad-kind",
                    DRIVER,
                    json!({"apiVersion": "gpu.gpu-dra.dev/v2", "kind": "TpuConfig"}),
                ),
            )
            .await,
    );
    for part in [
        "spec.devices.config[0].opaque.parameters.apiVersion: ",
        "gpu.gpu-dra.dev/v1alpha1",
        "spec.devices.config[0].opaque.parameters.kind: ",
        "GpuConfig, MigDeviceConfig",
    ] {
        assert!(
            status.message.contains(part),
            "{part} missing in {}",
            status.message
        );
    }

    // A repeated key in the parameters (sent as raw bytes: typed clients cannot repeat
    // one) reaches the webhook verbatim and is denied with its path.
    let body = format!(
        r#"{{"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {{"name": "repeated-key"}},
            "spec": {{"devices": {{
                "requests": [{{"name": "gpu", "exactly": {{"deviceClassName": "gpu.gpu-dra.dev"}}}}],
                "config": [{{"requests": ["gpu"], "opaque": {{"driver": "{DRIVER}", "parameters":
                    {{"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                      "sharing": {{"strategy": "MPS", "strategy": "TimeSlicing"}}}}}}}}]}}}}}}"#
    );
    let post = http::Request::post(format!(
        "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims"
    ))
    .header("content-type", "application/json")
    .body(body.into_bytes())
    .unwrap();
    let status = rejection(client.request_text(post).await);
    assert!(
        status.message.contains(
            "denied the request: spec.devices.config[0].opaque.parameters.sharing.strategy: \
             duplicate key \"strategy\""
        ),
        "{}",
        status.message
    );

    // Two different configs of one claim for one request: denied naming both entries.
    let mut spec = claim_spec(DRIVER, mps(40));
    spec["devices"]["config"]
        .as_array_mut()
        .unwrap()
        .push(json!({"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": mps(60)}}));
    let two: ResourceClaim =
        serde_json::from_value(json!({"metadata": {"name": "two-configs"}, "spec": spec})).unwrap();
    let status = rejection(claims.create(&PostParams::default(), &two).await);
    assert!(
        status.message.contains(
            "spec.devices.config[1]: conflicts with spec.devices.config[0]: both configure \
             request \"gpu\" with a different GpuConfig"
        ),
        "{}",
        status.message
    );

    // A good claim passes; so does a bad-looking config for another driver.
    let call = Instant::now();
    claims
        .create(&PostParams::default(), &claim("good", DRIVER, mps(40)))
        .await
        .unwrap();
    eprintln!("allowed create took {:?}", call.elapsed());
    claims
        .create(
            &PostParams::default(),
            &claim("other-driver", "gpu.nvidia.com", mps(150)),
        )
        .await
        .unwrap();

    // Templates are judged at spec.spec.devices.config.
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns);
    let template = |name: &str, params: Value| -> ResourceClaimTemplate {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"spec": claim_spec(DRIVER, params)}
        }))
        .unwrap()
    };
    let mig_time_sliced = json!({
        "apiVersion": "gpu.gpu-dra.dev/v1alpha1",
        "kind": "MigDeviceConfig",
        "sharing": {"strategy": "TimeSlicing"}
    });
    let status = rejection(
        templates
            .create(&PostParams::default(), &template("bad", mig_time_sliced))
            .await,
    );
    assert!(
        status
            .message
            .contains("spec.spec.devices.config[0].opaque.parameters.sharing"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("allowed: MPS"),
        "{}",
        status.message
    );
    templates
        .create(&PostParams::default(), &template("good", mps(100)))
        .await
        .unwrap();

    // DeviceClasses carrying the test's label are judged at spec.config.
    let classes: Api<DeviceClass> = Api::all(client.clone());
    let class = |name: &str, params: Value| -> DeviceClass {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {scope_label: ns}},
            "spec": {
                "selectors": [{"cel": {"expression": "device.driver == 'gpu.gpu-dra.dev'"}}],
                "config": [{"opaque": {"driver": DRIVER, "parameters": params}}]
            }
        }))
        .unwrap()
    };
    let status = rejection(
        classes
            .create(
                &PostParams::default(),
                &class(&format!("{ns}-bad"), mps(-5)),
            )
            .await,
    );
    assert!(
        status.message.contains(
            "admission webhook \"classes.webhook-e2e.gpu-dra.dev\" denied the request: spec.config[0].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage: "
        ),
        "{}",
        status.message
    );
    let good_class = format!("{ns}-good");
    classes
        .create(&PostParams::default(), &class(&good_class, mps(25)))
        .await
        .unwrap();
    // UPDATE is judged too: turning the good class bad is rejected, the class unchanged.
    let status = rejection(
        classes
            .patch(
                &good_class,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"config": [
                    {"opaque": {"driver": DRIVER, "parameters": mps(101)}}
                ]}})),
            )
            .await,
    );
    assert!(
        status.message.contains(
            "spec.config[0].opaque.parameters.sharing.mpsConfig.defaultActiveThreadPercentage: "
        ),
        "{}",
        status.message
    );
    let kept = classes.get(&good_class).await.unwrap();
    let kept = serde_json::to_value(kept.spec).unwrap();
    assert_eq!(
        kept["config"][0]["opaque"]["parameters"]["sharing"]["mpsConfig"]["defaultActiveThreadPercentage"],
        25
    );

    // Clean up what is cluster-wide; the namespace's objects go with the namespace.
    configs
        .delete(&config_name, &DeleteParams::default())
        .await
        .unwrap();
    classes
        .delete(&good_class, &DeleteParams::default())
        .await
        .unwrap();
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        webhook.exited().is_none(),
        "webhook exited:\n{}",
        webhook_log(dir.path())
    );
    // SIGTERM stops it cleanly (exit status 0).
    let pid = webhook.child.lock().unwrap().id();
    let stopping = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = b
        .wait(
            Duration::from_secs(15),
            "webhook exit after SIGTERM",
            || async { Ok(webhook.exited()) },
        )
        .await
        .unwrap();
    assert!(status.success(), "{status}:\n{}", webhook_log(dir.path()));
    eprintln!("webhook stopped {:?} after SIGTERM", stopping.elapsed());
    let log = webhook_log(dir.path());
    assert!(log.contains("denied"), "webhook log has no denial:\n{log}");
}
