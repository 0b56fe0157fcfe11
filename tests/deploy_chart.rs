//! The Helm chart deploy/helm/gpu-dra: lint, render, values schema, the plain manifests
//! rendered from it, and every rendered object accepted by the box's real API server.
//!
//! Helm is the one `make tools` builds from the Go module proxy (tools/go.mod). Values
//! files: the chart's `ci/*-values.yaml` (default, NVIDIA compat mode, GPU-operator
//! layout, webhook with a chart-generated CA, webhook with cert-manager, MPS launcher
//! `session`) must lint and
//! render; `deploy/helm/bad-values/*.yaml` must fail `helm template` naming the field.
//! Rendered objects are sent to the API server as server-side apply dry-runs with strict
//! field validation (nothing changes in the box but the namespace, applied as
//! tests/deploy_manifests.rs applies it); cert-manager's kinds are checked by shape only
//! (the box has no cert-manager CRDs).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use serde_json::Value;

const RELEASE: &str = "gpu-dra";
const NAMESPACE: &str = "gpu-dra";
const FIELD_MANAGER: &str = "deploy-test";
const PLAIN_FILES: [&str; 6] = [
    "namespace.yaml",
    "rbac.yaml",
    "node-isolation.yaml",
    "deviceclasses.yaml",
    "daemonset.yaml",
    "webhook.yaml",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("deploy/helm/gpu-dra")
}

fn helm() -> Command {
    let bin = root().join("tools/bin/helm");
    assert!(
        bin.exists(),
        "{} missing: run `make tools` (make test does)",
        bin.display()
    );
    Command::new(bin)
}

/// `helm template` of the chart with `values` (relative to the chart's `ci/` when bare).
fn template(values: &Path) -> std::process::Output {
    helm()
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--values"])
        .arg(values)
        .output()
        .expect("helm runs")
}

fn ci_values(name: &str) -> PathBuf {
    chart().join("ci").join(format!("{name}-values.yaml"))
}

const CI_VALUES: [&str; 6] = [
    "default",
    "compat",
    "gpu-operator",
    "webhook-generated-ca",
    "webhook-cert-manager",
    "mps-session",
];

/// The objects `helm template` renders with the `ci/<name>-values.yaml` file.
fn render(name: &str) -> Vec<Value> {
    let out = template(&ci_values(name));
    assert!(
        out.status.success(),
        "helm template with {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
}

fn names_of(objects: &[Value], kind: &str) -> Vec<String> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .map(|o| o["metadata"]["name"].as_str().expect("name").to_owned())
        .collect()
}

fn plugin_env(objects: &[Value], name: &str) -> Option<String> {
    let ds = find(objects, "DaemonSet", "gpu-dra-kubelet-plugin");
    ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

#[test]
fn chart_lints_with_every_values_file() {
    for name in CI_VALUES {
        let out = helm()
            .arg("lint")
            .arg(chart())
            .args(["--namespace", NAMESPACE, "--values"])
            .arg(ci_values(name))
            .output()
            .expect("helm runs");
        assert!(
            out.status.success(),
            "helm lint with {name}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn plain_manifests_are_the_rendered_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(root().join("deploy/render-manifests.sh"))
        .arg(dir.path())
        .output()
        .expect("render-manifests.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in PLAIN_FILES {
        let rendered = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let committed = std::fs::read_to_string(root().join("deploy").join(file)).unwrap();
        assert!(
            rendered == committed,
            "deploy/{file} differs from the chart: run `make deploy-manifests` and commit"
        );
    }
}

#[test]
fn bad_values_fail_naming_the_field() {
    for (file, field) in [
        (
            "wrong-type.yaml",
            "at '/plugin/kubeletRoot': got number, want string",
        ),
        ("relative-driver-root.yaml", "at '/plugin/driverRoot'"),
        (
            "no-unavailable-no-surge.yaml",
            "at '/plugin/rollingUpdate/maxSurge'",
        ),
        ("secret-without-ca.yaml", "at '/webhook/tls/caBundle'"),
        ("unknown-key.yaml", "'driverRoot' not allowed"),
        ("unknown-mps-launcher.yaml", "at '/mps/launcher'"),
    ] {
        let out = template(&root().join("deploy/helm/bad-values").join(file));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} rendered");
        assert!(stderr.contains(field), "{file}: {stderr}");
    }
}

#[test]
fn default_values_use_the_image_make_image_tags() {
    let objects = render("default");
    let ds = find(&objects, "DaemonSet", "gpu-dra-kubelet-plugin");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["containers"][0]["image"],
        format!("ghcr.io/gpu-dra/gpu-dra:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    // Surge upgrades: the new pod registers (per-pod sockets) while the old one serves.
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(
        plugin_env(&objects, "GPU_DRA_HTTP_ADDRESS").as_deref(),
        Some("0.0.0.0:8080")
    );
    let container = &spec["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let uid = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "GPU_DRA_POD_UID")
        .expect("GPU_DRA_POD_UID");
    assert_eq!(uid["valueFrom"]["fieldRef"]["fieldPath"], "metadata.uid");
    assert_eq!(volume(spec, "driver-root")["hostPath"]["path"], "/");
    assert_eq!(
        names_of(&objects, "DeviceClass"),
        [
            "gpu.gpu-dra.dev",
            "mig.gpu-dra.dev",
            "gpu-shared.gpu-dra.dev"
        ]
    );
    let shared = find(&objects, "DeviceClass", "gpu-shared.gpu-dra.dev");
    assert_eq!(
        shared["spec"]["extendedResourceName"],
        "nvidia.com/gpu.shared"
    );
    assert_eq!(
        plugin_env(&objects, "GPU_DRA_CONSUMABLE_SHARES").as_deref(),
        Some("disabled"),
        "shares are off unless the admin turns them on"
    );
    assert!(
        names_of(&objects, "Deployment").is_empty(),
        "webhook off by default"
    );
    assert!(
        names_of(&objects, "Namespace").is_empty(),
        "helm --create-namespace owns it"
    );
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn plugin_pod(objects: &[Value]) -> &Value {
    &find(objects, "DaemonSet", "gpu-dra-kubelet-plugin")["spec"]["template"]["spec"]
}

/// (mount path, volume name, read-only) of the plugin container's mounts.
fn plugin_mounts(pod: &Value) -> Vec<(String, String, bool)> {
    pod["containers"][0]["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().expect("mountPath").to_owned(),
                m["name"].as_str().expect("name").to_owned(),
                m["readOnly"] == true,
            )
        })
        .collect()
}

fn plugin_args(pod: &Value) -> Vec<String> {
    pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

/// The parsed `kubelet-plugin` flags of the rendered args (what the plugin would run with).
fn parsed_plugin_args(pod: &Value) -> gpu_dra::cli::PluginArgs {
    use clap::Parser as _;
    let mut argv = vec!["gpu-dra".to_owned()];
    argv.extend(plugin_args(pod));
    argv.push("--node-name=n".to_owned());
    match gpu_dra::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("rendered args {argv:?}: {e}"))
        .command
    {
        gpu_dra::cli::Command::KubeletPlugin(args) => args,
        _ => panic!("rendered args are not kubelet-plugin"),
    }
}

#[test]
fn default_mps_launcher_is_a_host_systemd_scope_with_its_wiring() {
    let objects = render("default");
    let pod = plugin_pod(&objects);
    let args = parsed_plugin_args(pod);
    assert_eq!(
        args.mps_launcher,
        gpu_dra::cli::MpsLauncherKind::SystemdScope
    );
    assert!(
        args.mps_private_shm,
        "daemon and clients share the claim's /dev/shm"
    );
    // systemd must see the launcher's PID: the host's PID namespace.
    assert_eq!(pod["hostPID"], true);
    let mounts = plugin_mounts(pod);
    for (path, name) in [
        ("/run/systemd", "host-systemd"),
        ("/run/dbus/system_bus_socket", "host-dbus"),
    ] {
        assert!(
            mounts.contains(&(path.to_owned(), name.to_owned(), true)),
            "{path} mounted read-only from volume {name}: {mounts:?}"
        );
        assert_eq!(volume(pod, name)["hostPath"]["path"], path);
    }
    assert_eq!(volume(pod, "host-systemd")["hostPath"]["type"], "Directory");
    assert_eq!(volume(pod, "host-dbus")["hostPath"]["type"], "Socket");
    // The per-claim shm dirs live under the plugin data dir, a host path shared with the
    // claim's containers through CDI.
    assert!(
        mounts
            .iter()
            .any(|(path, _, ro)| path == "/var/lib/kubelet/plugins" && !ro),
        "{mounts:?}"
    );
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], true);
}

#[test]
fn session_launcher_renders_no_host_pid_nor_systemd_mounts() {
    let objects = render("mps-session");
    let pod = plugin_pod(&objects);
    let args = parsed_plugin_args(pod);
    assert_eq!(args.mps_launcher, gpu_dra::cli::MpsLauncherKind::Session);
    assert!(args.mps_private_shm);
    assert!(pod.get("hostPID").is_none(), "hostPID rendered: {pod}");
    let mounts = plugin_mounts(pod);
    assert!(
        !mounts.iter().any(|(path, _, _)| path.starts_with("/run/")),
        "{mounts:?}"
    );
    for name in ["host-systemd", "host-dbus"] {
        assert!(
            !pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == name),
            "volume {name} rendered"
        );
    }
}

#[test]
fn compat_mode_renders_nvidia_named_device_classes() {
    let objects = render("compat");
    assert_eq!(
        names_of(&objects, "DeviceClass"),
        [
            "gpu.nvidia.com",
            "mig.nvidia.com",
            "gpu-shared.nvidia.com",
            "gpu-dev.nvidia.com",
            "gpu-prod.nvidia.com",
            "gpu-training.nvidia.com"
        ]
    );
    let gpu = find(&objects, "DeviceClass", "gpu.nvidia.com");
    let cel = gpu["spec"]["selectors"][0]["cel"]["expression"]
        .as_str()
        .unwrap();
    assert_eq!(
        cel,
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'"
    );
    let training = find(&objects, "DeviceClass", "gpu-training.nvidia.com");
    let opaque = &training["spec"]["config"][0]["opaque"];
    assert_eq!(opaque["driver"], "gpu.nvidia.com");
    assert_eq!(opaque["parameters"]["sharing"]["strategy"], "Exclusive");
    assert_eq!(
        plugin_env(&objects, "GPU_DRA_DRIVER_NAME").as_deref(),
        Some("gpu.nvidia.com")
    );
}

#[test]
fn gpu_operator_layout_mounts_its_driver_root() {
    let objects = render("gpu-operator");
    let ds = find(&objects, "DaemonSet", "gpu-dra-kubelet-plugin");
    let volumes = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let driver = volumes.iter().find(|v| v["name"] == "driver-root").unwrap();
    assert_eq!(driver["hostPath"]["path"], "/run/nvidia/driver");
    // The plugin searches the operator's layout below the mount itself.
    assert_eq!(
        plugin_env(&objects, "GPU_DRA_DRIVER_ROOT").as_deref(),
        Some("/driver-root")
    );
    assert_eq!(
        plugin_env(&objects, "GPU_DRA_LOG_FORMAT").as_deref(),
        Some("text")
    );
}

#[test]
fn generated_ca_signs_the_webhook_serving_certificate() {
    let objects = render("webhook-generated-ca");
    let secret = find(&objects, "Secret", "gpu-dra-webhook-tls");
    let decode = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 string"))
            .expect("base64")
    };
    let vwc = find(
        &objects,
        "ValidatingWebhookConfiguration",
        "gpu-dra-webhook",
    );
    let ca_bundle = decode(&vwc["webhooks"][0]["clientConfig"]["caBundle"]);
    assert_eq!(ca_bundle, decode(&secret["data"]["ca.crt"]));
    let ca = CertificateDer::from_pem_slice(&ca_bundle).expect("CA PEM");
    let leaf = CertificateDer::from_pem_slice(&decode(&secret["data"]["tls.crt"])).expect("PEM");
    let anchor = webpki::anchor_from_trusted_cert(&ca).expect("CA is a trust anchor");
    let cert = webpki::EndEntityCert::try_from(&leaf).expect("serving certificate");
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .expect("the generated CA signs the serving certificate");
    let service = ServerName::try_from("gpu-dra-webhook.gpu-dra.svc").unwrap();
    cert.verify_is_valid_for_subject_name(&service)
        .expect("certificate names the webhook Service");
    let deployment = find(&objects, "Deployment", "gpu-dra-webhook");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "gpu-dra-webhook-tls"
    );
}

#[test]
fn cert_manager_mode_issues_the_service_name() {
    let objects = render("webhook-cert-manager");
    let cert = find(&objects, "Certificate", "gpu-dra-webhook");
    assert_eq!(cert["spec"]["secretName"], "gpu-dra-webhook-tls");
    assert_eq!(cert["spec"]["dnsNames"][0], "gpu-dra-webhook.gpu-dra.svc");
    assert_eq!(
        cert["spec"]["issuerRef"]["name"],
        "gpu-dra-webhook-selfsigned"
    );
    find(&objects, "Issuer", "gpu-dra-webhook-selfsigned");
    let vwc = find(
        &objects,
        "ValidatingWebhookConfiguration",
        "gpu-dra-webhook",
    );
    assert_eq!(
        vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "gpu-dra/gpu-dra-webhook"
    );
}

fn gvk(doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let kind = doc["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// Server-side applies one object with strict field validation, dry-run if asked.
async fn apply(
    client: &kube::Client,
    doc: &Value,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let (resource, caps) = pinned_kind(client, &gvk(doc)).await?;
    let name = doc["metadata"]["name"].as_str().expect("metadata.name");
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .expect("namespaced object names its namespace");
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    params.dry_run = dry_run;
    api.patch(name, &params, &Patch::Apply(doc)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_is_accepted_by_the_api_server() {
    let b = support::shared();
    let client = b.client().await;
    // The release namespace, as the plain manifests create it (idempotent, same manager
    // and content as tests/deploy_manifests.rs).
    let namespace_file = std::fs::read_to_string(root().join("deploy/namespace.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&namespace_file) {
        let doc = Value::deserialize(doc).unwrap();
        if !doc.is_null() {
            apply(&client, &doc, false)
                .await
                .expect("namespace applied");
        }
    }
    for name in CI_VALUES {
        let objects = render(name);
        let mut accepted = 0;
        for doc in &objects {
            let kind = doc["kind"].as_str().unwrap();
            let object = doc["metadata"]["name"].as_str().unwrap();
            if doc["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("cert-manager.io/")
            {
                continue; // no cert-manager CRDs in the box; shape checked above
            }
            apply(&client, doc, true).await.unwrap_or_else(|e| {
                panic!("{name}: {kind} {object} rejected by the API server: {e}")
            });
            accepted += 1;
        }
        eprintln!("{name}: {accepted} objects accepted (dry-run)");
        assert!(accepted >= 8, "{name}: only {accepted} objects");
    }
}
