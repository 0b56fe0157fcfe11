//! Proves the box's prepare path end to end with a minimal DRA kubelet
//! plugin built from the upstream kubeletplugin helper (`box example-plugin`):
//! plugin registration through the kubelet plugin manager, NodePrepareResources
//! from the kubelet DRA manager, CDI resolution into the per-container result
//! and pod annotation, pod Running, and unprepare + pod removal on delete.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaimTemplate, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const STEP: Duration = Duration::from_secs(60);

/// Stops the example plugin when the test ends (closing its stdin).
struct PluginProcess(Child);

impl Drop for PluginProcess {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_plugin_claim_is_prepared_resolved_and_unprepared() {
    let b = support::shared();
    let client = b.client().await;
    let ns = b.create_namespace("prep").await;
    let driver = format!("{ns}.example.com");
    let log = std::fs::File::create(
        b.state_dir()
            .join("logs")
            .join(format!("example-plugin-{ns}.log")),
    )
    .unwrap();
    let _plugin = PluginProcess(
        Command::new(support::cluster::box_binary())
            .arg("example-plugin")
            .arg(format!("--kubeconfig={}", b.kubeconfig().display()))
            .arg("--node=node-a")
            .arg(format!(
                "--kubelet-root={}",
                b.kubelet_root("node-a").display()
            ))
            .arg(format!("--cdi-dir={}", b.cdi_dir("node-a").display()))
            .arg(format!("--driver-name={driver}"))
            .arg("--exit-on-stdin-close")
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // The plugin publishes its devices through the upstream ResourceSlice controller.
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    b.wait(STEP, "example plugin ResourceSlice", || async {
        let lp = ListParams::default().fields(&format!("spec.driver={driver}"));
        Ok((!slices.list(&lp).await?.items.is_empty()).then_some(()))
    })
    .await
    .unwrap();

    let class_name = format!("{ns}-class");
    let classes: Api<DeviceClass> = Api::all(client.clone());
    let class: DeviceClass = serde_json::from_value(json!({
        "metadata": { "name": class_name },
        "spec": { "selectors": [ { "cel": { "expression": format!("device.driver == \"{driver}\"") } } ] }
    }))
    .unwrap();
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns);
    let template: ResourceClaimTemplate = serde_json::from_value(json!({
        "metadata": { "name": "one" },
        "spec": { "spec": { "devices": { "requests": [
            { "name": "dev", "exactly": { "deviceClassName": class_name } }
        ] } } }
    }))
    .unwrap();
    templates
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "user" },
        "spec": {
            "resourceClaims": [ { "name": "dev", "resourceClaimTemplateName": "one" } ],
            "containers": [
                { "name": "with", "image": "registry.example/none:latest",
                  "env": [ { "name": "FROM_POD", "value": "yes" } ],
                  "resources": { "claims": [ { "name": "dev" } ] } },
                { "name": "without", "image": "registry.example/none:latest" }
            ]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    let running = b
        .wait(STEP, "pod Running", || async {
            let p = pods.get("user").await?;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            Ok((phase.as_deref() == Some("Running")).then_some(p))
        })
        .await
        .unwrap();
    let statuses = running
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .clone()
        .unwrap();
    assert_eq!(statuses.len(), 2);
    assert!(
        statuses
            .iter()
            .all(|s| s.ready && s.state.as_ref().unwrap().running.is_some())
    );

    let with = b
        .container_result("node-a", &ns, "user", "with")
        .expect("result for container 'with'");
    let ids = with["cdiDevices"].as_array().unwrap();
    assert_eq!(ids.len(), 1);
    let id = ids[0].as_str().unwrap();
    assert!(id.starts_with("example.box.gpu-dra.dev/claim="), "{id}");
    let env: Vec<&str> = with["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"FROM_POD=yes"), "{env:?}");
    assert!(
        env.iter().any(|e| e.starts_with("EXAMPLE_DEVICE=dev-")),
        "{env:?}"
    );
    assert_eq!(
        with["deviceNodes"],
        json!([{ "path": "/dev/null", "type": "c", "major": 1, "minor": 3 }])
    );
    assert_eq!(with["mounts"][0]["destination"], json!("/example"));
    let without = b
        .container_result("node-a", &ns, "user", "without")
        .expect("result for container 'without'");
    assert_eq!(without["cdiDevices"], json!([]));

    let annotation = running.metadata.annotations.unwrap()["box.gpu-dra.dev/containers"].clone();
    let annotation: serde_json::Value = serde_json::from_str(&annotation).unwrap();
    assert_eq!(annotation["with"]["cdiDevices"], with["cdiDevices"]);

    // The CDI spec the plugin wrote exists while prepared ...
    let claim_uid = id.trim_start_matches("example.box.gpu-dra.dev/claim=")[..36].to_string();
    let spec = b
        .cdi_dir("node-a")
        .join(format!("example.box.gpu-dra.dev-claim_{claim_uid}.json"));
    assert!(spec.exists(), "{}", spec.display());

    // ... and is gone after delete: the agent unprepared, then removed the pod.
    pods.delete("user", &DeleteParams::default()).await.unwrap();
    b.wait(STEP, "pod removed by the node agent", || async {
        Ok(pods.get_opt("user").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    assert!(!spec.exists(), "CDI spec still present after unprepare");
    assert!(b.container_result("node-a", &ns, "user", "with").is_none());

    classes
        .delete(&class_name, &DeleteParams::default())
        .await
        .unwrap();
}
