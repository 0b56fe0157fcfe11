//! `/metrics` of the plugin on the tests/cluster box, and the join of
//! examples/monitoring/gpu-dra.rules.yaml against a dcgm-exporter exposition.
//!
//! One plugin on node-a (fake dgx-h100-static-mig), two pods: one on a whole GPU
//! (time-sliced, Long), one on a 1g.10gb MIG device. The scrape must show the RPC
//! latency, the prepared claims, the sharing policy of the GPU and one info series per
//! pod and container using the claim (each pod also has a sidecar without claims, which
//! gets none); the rule's join keys (`on (UUID, GPU_I_ID)`) must then match exactly one series
//! of tests/fixtures/dcgm-exporter-dgx-h100-static-mig.prom (dcgm-exporter's own label
//! names) for each pod, giving each pod the value of its own device. Last, with the
//! plugin stopped, `gpu-dra status -o json` still lists both pods on their devices and
//! the GPU made unhealthy by XID 79.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaimTemplate};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use support::driver::{FakeGpus, Plugin};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/dcgm-exporter-dgx-h100-static-mig.prom"
);
const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/monitoring/gpu-dra.rules.yaml"
);

/// One sample of a text exposition: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped). Label
/// values here hold no escaped quotes.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').expect("sample line has a value");
        let (name, labels) = match head.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label pair");
            map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
        }
        out.push(Sample {
            name: name.to_owned(),
            labels: map,
            value: value.parse().expect("sample value"),
        });
    }
    out
}

/// The value of `label`, PromQL style: absent is the empty string.
fn label<'a>(s: &'a Sample, label: &str) -> &'a str {
    s.labels.get(label).map_or("", String::as_str)
}

async fn apply_device_classes(client: &kube::Client) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/deviceclasses.yaml"
    ))
    .unwrap();
    let classes: Api<DeviceClass> = Api::all(client.clone());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let class: DeviceClass = serde::Deserialize::deserialize(doc).unwrap();
        let name = class.metadata.name.clone().unwrap();
        classes
            .patch(
                &name,
                &PatchParams::apply("metrics-e2e").force(),
                &Patch::Apply(&class),
            )
            .await
            .unwrap();
    }
}

fn pod(name: &str, template: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": template}],
            "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                            "resources": {"claims": [{"name": "gpu"}]}},
                           {"name": "sidecar", "image": "registry.example/proxy:none"}]
        }
    }))
    .unwrap()
}

/// The expression of the recording rule `record`.
fn rule_expr(record: &str) -> String {
    let rules: Value = serde_yaml::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .find(|r| r["record"] == record)
        .and_then(|r| r["expr"].as_str())
        .unwrap_or_else(|| panic!("rule {record} in {RULES}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_join_dcgm_per_pod() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let fail =
        |e: anyhow::Error| -> ! { panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(40)) };
    apply_device_classes(&client).await;

    let ns = b.create_namespace("metrics").await;
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns);
    for (name, devices) in [
        (
            "whole",
            json!({"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}],
            "config": [{"opaque": {"driver": "gpu.gpu-dra.dev", "parameters": {
                "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}}}}]}),
        ),
        (
            "small",
            json!({"requests": [{"name": "gpu", "exactly": {"deviceClassName": "mig.gpu-dra.dev",
            "selectors": [{"cel": {"expression": "device.attributes['gpu.gpu-dra.dev'].profile == '1g.10gb'"}}]}}]}),
        ),
    ] {
        let t = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"spec": {"devices": devices}}}),
        )
        .unwrap();
        templates.create(&PostParams::default(), &t).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (name, template) in [("trainer", "whole"), ("notebook", "small")] {
        pods.create(&PostParams::default(), &pod(name, template))
            .await
            .unwrap();
    }

    // Scrape until both pods have their info series (the prepare path records them).
    let scraped = b
        .wait(
            STEP,
            "both pods in gpu_dra_prepared_device_info",
            || async {
                plugin.check_alive()?;
                let (status, body) = plugin.probe("/metrics").await?;
                anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
                let samples = parse(&body);
                let named = |pod: &str| {
                    samples.iter().any(|s| {
                        s.name == "gpu_dra_prepared_device_info"
                            && label(s, "namespace") == ns
                            && label(s, "pod") == pod
                    })
                };
                Ok((named("trainer") && named("notebook")).then_some(samples))
            },
        )
        .await
        .unwrap_or_else(|e| fail(e));

    let value = |name: &str, want: &[(&str, &str)]| -> Option<f64> {
        scraped
            .iter()
            .find(|s| s.name == name && want.iter().all(|(k, v)| label(s, k) == *v))
            .map(|s| s.value)
    };
    assert!(
        value(
            "gpu_dra_node_prepare_resources_duration_seconds_count",
            &[("result", "success")]
        )
        .is_some_and(|n| n >= 2.0),
        "prepare latency count"
    );
    assert!(
        value("gpu_dra_prepared_claims", &[("state", "PrepareCompleted")])
            .is_some_and(|n| n >= 2.0)
    );
    assert!(value("gpu_dra_checkpoint_writes_total", &[]).is_some_and(|n| n >= 2.0));
    assert!(
        value(
            "gpu_dra_devices",
            &[("health", "healthy"), ("prepared", "true")]
        )
        .is_some_and(|n| n >= 2.0)
    );
    assert_eq!(value("gpu_dra_mps_daemons", &[]), Some(0.0));
    let info: Vec<&Sample> = scraped
        .iter()
        .filter(|s| s.name == "gpu_dra_prepared_device_info" && label(s, "namespace") == ns)
        .collect();
    let trainer = info
        .iter()
        .find(|s| label(s, "pod") == "trainer")
        .unwrap_or_else(|| panic!("trainer info in {info:#?}"));
    let notebook = info
        .iter()
        .find(|s| label(s, "pod") == "notebook")
        .unwrap_or_else(|| panic!("notebook info in {info:#?}"));
    assert!(label(trainer, "GPU_I_ID").is_empty(), "{trainer:?}");
    // One series per container using the claim: `ctr`, not the sidecar without claims.
    assert_eq!(label(trainer, "container"), "ctr", "{trainer:?}");
    assert_eq!(label(notebook, "container"), "ctr", "{notebook:?}");
    assert!(
        !info.iter().any(|s| label(s, "container") == "sidecar"),
        "{info:#?}"
    );
    assert_eq!(label(notebook, "GPU_I_PROFILE"), "1g.10gb", "{notebook:?}");
    assert!(!label(notebook, "GPU_I_ID").is_empty(), "{notebook:?}");
    assert!(
        label(trainer, "claim").starts_with("trainer-gpu-"),
        "{trainer:?}"
    );
    assert_eq!(
        value(
            "gpu_dra_gpu_sharing_policy",
            &[
                ("UUID", label(trainer, "UUID")),
                ("strategy", "TimeSlicing")
            ]
        )
        .map(|_| ()),
        Some(()),
        "time-sliced GPU {}",
        label(trainer, "UUID")
    );

    // The rules join on dcgm-exporter's label names.
    let utilization = rule_expr("namespace_pod_container_device:gpu_dra_gpu_utilization:ratio");
    let framebuffer = rule_expr("namespace_pod_container_device:gpu_dra_framebuffer_used:bytes");
    for (expr, dcgm) in [
        (&utilization, "DCGM_FI_PROF_GR_ENGINE_ACTIVE"),
        (&framebuffer, "DCGM_FI_DEV_FB_USED"),
    ] {
        assert!(expr.contains("on (UUID, GPU_I_ID) group_left"), "{expr}");
        assert!(expr.contains("max by (UUID, GPU_I_ID)"), "{expr}");
        assert!(
            expr.contains("max by (namespace, pod, container, claim, UUID, GPU_I_ID)"),
            "{expr}"
        );
        assert!(
            expr.contains(dcgm) && expr.contains("gpu_dra_prepared_device_info"),
            "{expr}"
        );
    }
    // Per pod, each device counts once however many containers use it.
    for record in [
        "namespace_pod_device:gpu_dra_gpu_utilization:ratio",
        "namespace_pod_device:gpu_dra_framebuffer_used:bytes",
    ] {
        let expr = rule_expr(record);
        assert!(
            expr.contains(
                "max by (namespace, pod, claim, UUID, GPU_I_ID) (namespace_pod_container_device:"
            ),
            "{record}: {expr}"
        );
    }
    let fixture = parse(&std::fs::read_to_string(FIXTURE).unwrap());
    let keys = ["UUID", "GPU_I_ID"];
    let join = |info: &Sample, dcgm: &str| -> Vec<Sample> {
        fixture
            .iter()
            .filter(|d| d.name == dcgm && keys.iter().all(|k| label(d, k) == label(info, k)))
            .cloned()
            .collect()
    };
    for (info, gpu_instance) in [(trainer, None), (notebook, Some("1g.10gb"))] {
        for dcgm in ["DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_DEV_FB_USED"] {
            let matched = join(info, dcgm);
            assert_eq!(matched.len(), 1, "{dcgm} for {info:?}: {matched:?}");
            assert_eq!(
                label(&matched[0], "GPU_I_PROFILE"),
                gpu_instance.unwrap_or(""),
                "{matched:?}"
            );
        }
    }
    // Different devices: each pod gets its own device's value.
    let active = |info: &Sample| join(info, "DCGM_FI_PROF_GR_ENGINE_ACTIVE")[0].value;
    assert!((active(trainer) - active(notebook)).abs() > 1e-9);

    assert!(
        value("gpu_dra_slice_publish_duration_seconds_count", &[]).is_some_and(|n| n >= 1.0),
        "slice publish passes"
    );

    // An XID on an idle GPU: counted by code, and its device turns unhealthy.
    let idle = scraped
        .iter()
        .find(|s| {
            s.name == "gpu_dra_gpu_sharing_policy"
                && label(s, "UUID") != label(trainer, "UUID")
                && label(s, "UUID") != label(notebook, "UUID")
        })
        .map(|s| label(s, "UUID").to_owned())
        .expect("an idle GPU");
    nvidia_ml::control::inject_xid(&gpus.state_path(), &idle, 79).unwrap();
    b.wait(STEP, "XID 79 counted and a device unhealthy", || async {
        let (_, body) = plugin.probe("/metrics").await?;
        let samples = parse(&body);
        let has = |name: &str, want: &[(&str, &str)], min: f64| {
            samples.iter().any(|s| {
                s.name == name && want.iter().all(|(k, v)| label(s, k) == *v) && s.value >= min
            })
        };
        Ok((has("gpu_dra_xid_events_total", &[("xid", "79")], 1.0)
            && has("gpu_dra_devices", &[("health", "unhealthy")], 1.0))
        .then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));

    // `gpu-dra status` with the plugin down: checkpoint + NVML + the claims' pods.
    let trainer_uuid = label(trainer, "UUID").to_owned();
    let notebook_mig = label(notebook, "mig_uuid").to_owned();
    let mut plugin = plugin;
    plugin.kill();
    let mut cmd = std::process::Command::new(support::driver::target_dir().join("gpu-dra"));
    cmd.arg("status")
        .arg("-o")
        .arg("json")
        .arg(format!("--kubelet-root={}", b.kubelet_root(NODE).display()))
        .arg(format!(
            "--nvml-lib-path={}",
            support::driver::target_dir()
                .join("libnvidia_ml.so")
                .display()
        ))
        .arg(format!("--kubeconfig={}", b.kubeconfig().display()));
    gpus.apply_env(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("apiError").is_none(), "{report}");
    let gpu = report["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["uuid"] == trainer_uuid.as_str())
        .unwrap_or_else(|| panic!("{trainer_uuid} in {report}"));
    assert_eq!(gpu["strategy"], "TimeSlicing", "{gpu}");
    assert_eq!(gpu["health"], "Healthy", "{gpu}");
    let sick = report["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["uuid"] == idle.as_str())
        .unwrap_or_else(|| panic!("{idle} in {report}"));
    assert_eq!(sick["health"], "Unhealthy", "the plugin's verdict: {sick}");
    assert_eq!(sick["xid"], 79, "{sick}");
    assert_eq!(gpu["timeSlice"], "Long", "{gpu}");
    assert_eq!(gpu["claims"][0]["pods"], json!(["trainer"]), "{gpu}");
    let mig = report["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["migDevices"].as_array().unwrap())
        .find(|m| m["uuid"] == notebook_mig.as_str())
        .unwrap_or_else(|| panic!("{notebook_mig} in {report}"));
    assert_eq!(mig["claims"][0]["pods"], json!(["notebook"]), "{mig}");
}
