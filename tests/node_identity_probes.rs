//! The plugin as the DaemonSet runs it, on the tests/cluster box: its own ServiceAccount
//! token (bound to its pod, so it carries the node name), the container's args and env
//! from deploy/daemonset.yaml, the driver found below the driver root, and the
//! `/healthz` and `/readyz` probes the DaemonSet uses.
//!
//! One plugin on node-a (fake L40S), the phases in order: no driver yet (alive, not
//! ready, every searched path reported), driver installed (ready without a restart),
//! the identity's rights (RBAC of deploy/rbac.yaml, the node-isolation policy), NVML
//! failing and recovering (fake NVML fault injection).

mod support;

use std::time::Duration;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, ListParams, PostParams};
use nvidia_ml::control::{self, Fault, Times};
use serde_json::json;

use support::driver::{DRIVER, FakeGpus, Plugin, target_dir};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(60);
const PLUGIN_USER: &str = "system:serviceaccount:gpu-dra:gpu-dra-kubelet-plugin";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// `NVML_ERROR_GPU_IS_LOST`.
const GPU_IS_LOST: u32 = 15;

async fn wait_probe(
    b: &support::TestBox,
    plugin: &Plugin,
    what: &str,
    want: impl Fn(u16, &str) -> bool,
) -> anyhow::Result<String> {
    b.wait(STEP, what, || async {
        plugin.check_alive()?;
        let (status, body) = plugin.probe("/readyz").await?;
        Ok(want(status, &body).then_some(body))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_runs_as_the_daemonset_with_probes_and_its_own_identity() {
    let b = support::shared();
    let gpus = FakeGpus::new("l40s-single").unwrap();
    let plugin = Plugin::start_before_driver(b, NODE, &gpus).unwrap();
    let fail =
        |e: anyhow::Error| -> ! { panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(40)) };

    // No driver below the driver root: the process serves, is not ready, and says
    // where it looked.
    let body = wait_probe(
        b,
        &plugin,
        "readyz reports the missing driver",
        |s, body| s == 503 && body.contains("[-]driver failed"),
    )
    .await
    .unwrap_or_else(|e| fail(e));
    let searched = gpus
        .driver_root()
        .join(format!("usr/lib/{}-linux-gnu", std::env::consts::ARCH))
        .join("libnvidia-ml.so.1");
    for path in [
        searched,
        gpus.driver_root().join("usr/lib64/libnvidia-ml.so.1"),
    ] {
        assert!(body.contains(&path.display().to_string()), "{body}");
    }
    let (status, _) = plugin.probe("/healthz").await.unwrap_or_else(|e| fail(e));
    assert_eq!(status, 200);

    // The driver appears (as the GPU operator's driver container installs it later):
    // ready without a restart.
    let installed = std::time::Instant::now();
    gpus.install_driver(&target_dir()).unwrap();
    let body = wait_probe(
        b,
        &plugin,
        "readyz passes once the driver is there",
        |s, _| s == 200,
    )
    .await
    .unwrap_or_else(|e| fail(e));
    eprintln!(
        "driver installed to ready: {:.2}s (driver search every 10 s)",
        installed.elapsed().as_secs_f64()
    );
    assert_eq!(
        body,
        "[+]driver ok\n[+]registration ok\n[+]resourceslices ok\n[+]nvml ok\nreadyz check passed\n"
    );

    // Who the plugin is: its ServiceAccount, with the node of its pod.
    let kubeconfig = b.state_dir().join(format!("plugin-{NODE}.kubeconfig"));
    let as_plugin = support::deploy::client_from(&kubeconfig).await.unwrap();
    let review = Api::<SelfSubjectReview>::all(as_plugin.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let user = review.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(user.username.as_deref(), Some(PLUGIN_USER));
    assert_eq!(
        user.extra.and_then(|mut e| e.remove(NODE_NAME_EXTRA)),
        Some(vec![NODE.to_owned()])
    );

    // What it may do, proven with its own token. Its slices are there (it wrote them);
    // it cannot `update` them (not in deploy/rbac.yaml: it applies), nor write another
    // node's slice (the node-isolation policy).
    let slices: Api<ResourceSlice> = Api::all(as_plugin);
    let mut mine = slices
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}")))
        .await
        .unwrap()
        .items;
    assert_eq!(mine.len(), 1, "{mine:?}");
    let slice = mine.remove(0);
    let name = slice.metadata.name.clone().expect("name");
    match slices.replace(&name, &PostParams::default(), &slice).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden")),
        other => panic!("update of a slice should be forbidden by RBAC: {other:?}"),
    }
    let other_node: ResourceSlice = serde_json::from_value(json!({
        "metadata": {"generateName": "node-b-gpu-"},
        "spec": {
            "driver": DRIVER,
            "nodeName": "node-b",
            "pool": {"name": "node-b", "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0"}]
        }
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let denial = b
        .wait(STEP, "the policy denies a node-b slice", || async {
            match slices.create(&dry_run, &other_node).await {
                Err(kube::Error::Api(s))
                    if s.message.contains("gpu-dra-resourceslices-own-node") =>
                {
                    Ok(Some(s))
                }
                Err(e) => Err(e.into()),
                Ok(_) => Ok(None),
            }
        })
        .await
        .unwrap();
    assert_eq!(denial.code, 403, "{denial:?}");

    // NVML stops answering: not ready, still alive; back to ready when it answers again.
    control::inject_fault(
        &gpus.state_path(),
        Fault {
            function: "nvmlDeviceGetCount_v2".into(),
            gpu_uuid: None,
            error: GPU_IS_LOST,
            times: Times::Always,
        },
    )
    .unwrap();
    wait_probe(b, &plugin, "readyz fails while NVML fails", |s, body| {
        s == 503 && body.contains("[-]nvml failed") && body.contains("[+]registration ok")
    })
    .await
    .unwrap_or_else(|e| fail(e));
    let (status, _) = plugin.probe("/healthz").await.unwrap_or_else(|e| fail(e));
    assert_eq!(status, 200);
    let cleared = std::time::Instant::now();
    control::clear_faults(&gpus.state_path()).unwrap();
    wait_probe(
        b,
        &plugin,
        "readyz passes when NVML answers again",
        |s, _| s == 200,
    )
    .await
    .unwrap_or_else(|e| fail(e));
    eprintln!(
        "NVML answering to ready: {:.2}s (liveness call every 5 s)",
        cleared.elapsed().as_secs_f64()
    );
}

/// Every path the DaemonSet gives the container lands in the box's directories: a new
/// host path in the manifest (or the chart) that the box cannot stand in for fails here.
#[test]
fn the_daemonsets_paths_map_into_the_box() {
    let base = std::path::Path::new("/box");
    let paths = support::deploy::HostPaths {
        kubelet_root: base.join("kubelet"),
        cdi_root: base.join("cdi"),
        driver_root: base.join("driver-root"),
        pod_uid: "0b9e7c1e-5d7a-4a51-9f0c-2f6f3c1d2e4a".into(),
    };
    let command = support::deploy::container_command(NODE, &paths).unwrap();
    assert_eq!(
        command.args.first().map(String::as_str),
        Some("kubelet-plugin")
    );
    let values = command
        .args
        .iter()
        .map(|a| a.split_once('=').map_or(a.as_str(), |(_, v)| v))
        .chain(command.env.iter().map(|(_, v)| v.as_str()));
    for value in values.filter(|v| v.starts_with('/')) {
        assert!(
            value.starts_with("/box/"),
            "{value} is a host path outside the box"
        );
    }
    let env: std::collections::BTreeMap<_, _> = command.env.iter().cloned().collect();
    assert_eq!(env.get("GPU_DRA_NODE_NAME").map(String::as_str), Some(NODE));
    assert_eq!(
        env.get("GPU_DRA_DRIVER_ROOT").map(String::as_str),
        Some("/box/driver-root")
    );
}
