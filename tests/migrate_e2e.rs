//! `gpu-dra migrate` end to end on the tests/cluster box: for each seed's device-plugin
//! ConfigMap (src/migrate/testdata, from ../shared/seeds 000, 002 and 003) the ConfigMap
//! is created in the box, node-a is labelled with `nvidia.com/device-plugin.config` as
//! the seed's guide labels its nodes, `gpu-dra migrate --configmap` reads both from the
//! API server, and its objects are applied (strict field validation). Then the seed's own
//! pods and Deployments (`seedNNN-workloads.yaml`, unchanged: they ask
//! `nvidia.com/gpu` limits) must be scheduled through the DeviceClass's
//! `extendedResourceName` (KEP-5004, GA in 1.37): the scheduler writes a special claim
//! and `status.extendedResourceClaimStatus`, the node agent (the kubelet's DRA manager)
//! prepares it through our plugin, and every container gets our CDI device id of one
//! whole GPU.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use support::driver::{FakeGpus, Plugin};

const NODE: &str = "node-a";
const DRIVER: &str = "gpu.gpu-dra.dev";
const STEP: Duration = Duration::from_secs(120);

fn testdata(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/migrate/testdata")
        .join(file)
}

/// One seed: its ConfigMap fixture, the named config its node uses, its workloads and
/// where their pods run.
struct Seed {
    id: &'static str,
    profile: &'static str,
    namespace: &'static str,
    pods: usize,
}

const SEEDS: [Seed; 3] = [
    Seed {
        id: "seed000",
        profile: "any",
        namespace: "model-hosting",
        pods: 6,
    },
    Seed {
        id: "seed002",
        profile: "default",
        namespace: "default",
        pods: 4,
    },
    Seed {
        id: "seed003",
        profile: "any",
        namespace: "llm-testing",
        pods: 2,
    },
];

async fn create<K>(api: &Api<K>, value: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create {object:?}: {e}"),
    }
}

async fn label_node(client: &kube::Client, key: &str, value: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
        )
        .await
        .unwrap();
}

/// Runs `gpu-dra migrate --configmap` against the box; returns the objects it wrote.
fn migrate(b: &support::TestBox, configmap: &str) -> Vec<Value> {
    let out = std::process::Command::new(support::driver::target_dir().join("gpu-dra"))
        .arg("migrate")
        .arg("--configmap")
        .arg(configmap)
        .arg(format!("--kubeconfig={}", b.kubeconfig().display()))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate {configmap}: {report}");
    assert!(report.contains("# drain boundary"), "{report}");
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `attributes[name].string` of a published device.
fn attribute(slices: &[ResourceSlice], device: &str, name: &str) -> Option<String> {
    slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .find(|d| d.name == device)
        .and_then(|d| d.attributes.as_ref())
        .and_then(|a| a.get(name))
        .and_then(|a| a.string.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_configmaps_migrate_and_their_pods_run_unchanged() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100").unwrap();
    let plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let fail =
        |e: anyhow::Error| -> ! { panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(40)) };

    // What the seeds' guides take for granted in the cluster: their namespaces, the
    // Ollama guide's PersistentVolumeClaim, and seed 003's `eks-node: gpu` node label.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["gpu-operator", "model-hosting", "llm-testing"] {
        create(&namespaces, json!({"metadata": {"name": ns}})).await;
    }
    // The box runs no PersistentVolume controller: the volume is bound as it would bind
    // it (claimRef, volumeName, both Bound).
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    create(
        &pvs,
        json!({"metadata": {"name": "ollama-models"}, "spec": {
            "capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
            "storageClassName": "", "hostPath": {"path": "/tmp/ollama-models"},
            "claimRef": {"namespace": "model-hosting", "name": "ollama-pvc"}}}),
    )
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "model-hosting");
    create(
        &pvcs,
        json!({"metadata": {"name": "ollama-pvc",
                "annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": "ollama-models",
            "resources": {"requests": {"storage": "10Gi"}}}}),
    )
    .await;
    let bound = json!({"status": {"phase": "Bound"}});
    pvs.patch_status(
        "ollama-models",
        &PatchParams::default(),
        &Patch::Merge(&bound),
    )
    .await
    .unwrap();
    pvcs.patch_status(
        "ollama-pvc",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "10Gi"}}}),
        ),
    )
    .await
    .unwrap();
    label_node(&client, "eks-node", "gpu").await;
    // The chart's classes, whose GPU class also names nvidia.com/gpu: the migrated class,
    // created later, must be the one that serves it.
    for doc in support::deploy::documents("deviceclasses.yaml").unwrap() {
        support::deploy::apply(&client, &doc).await.unwrap();
    }
    // Creation timestamps have one-second resolution and a tie goes to the lower name
    // (the scheduler's extended-resource cache), so the migrated class must be created
    // in a later second than the chart's.
    let classes: Api<DeviceClass> = Api::all(client.clone());
    let chart_created = classes
        .get("gpu.gpu-dra.dev")
        .await
        .unwrap()
        .metadata
        .creation_timestamp
        .expect("the chart's GPU class has a creation timestamp")
        .0
        .as_second();
    b.wait(
        STEP,
        "a second after the chart's classes were created",
        || async {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            Ok((i64::try_from(now)? > chart_created).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| fail(e));

    let slices: Vec<ResourceSlice> = b
        .wait(STEP, "node-a's ResourceSlices", || async {
            let api: Api<ResourceSlice> = Api::all(client.clone());
            let list = api.list(&ListParams::default()).await?.items;
            let devices: usize = list
                .iter()
                .filter(|s| s.spec.node_name.as_deref() == Some(NODE))
                .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
                .sum();
            Ok((devices >= 8).then_some(list))
        })
        .await
        .unwrap_or_else(|e| fail(e));

    for seed in &SEEDS {
        let text =
            std::fs::read_to_string(testdata(&format!("{}-configmap.yaml", seed.id))).unwrap();
        let cm: Value = serde_yaml::from_str(&text).unwrap();
        support::deploy::apply(&client, &cm).await.unwrap();
        label_node(&client, "nvidia.com/device-plugin.config", seed.profile).await;
        let objects = migrate(
            b,
            &format!("gpu-operator/{}", cm["metadata"]["name"].as_str().unwrap()),
        );
        let served = objects
            .iter()
            .find(|o| o["spec"]["extendedResourceName"] == "nvidia.com/gpu")
            .unwrap_or_else(|| panic!("{}: a class for nvidia.com/gpu in {objects:?}", seed.id));
        assert_eq!(served["kind"], "DeviceClass");
        for object in &objects {
            support::deploy::apply(&client, object)
                .await
                .unwrap_or_else(|e| panic!("{}: {e:#}", seed.id));
        }
        support::examples::apply_file(&client, &testdata(&format!("{}-workloads.yaml", seed.id)))
            .await
            .unwrap();

        let pods_api: Api<Pod> = Api::namespaced(client.clone(), seed.namespace);
        let pods: Vec<Pod> = b
            .wait(
                STEP,
                &format!("{}: {} pods Running", seed.id, seed.pods),
                || async {
                    let pods = pods_api.list(&ListParams::default()).await?.items;
                    let running = pods
                        .iter()
                        .filter(|p| {
                            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        })
                        .count();
                    if pods.len() == seed.pods && running == seed.pods {
                        return Ok(Some(pods));
                    }
                    let waiting: Vec<String> = pods
                        .iter()
                        .map(|p| {
                            let st = p.status.as_ref();
                            let why: Vec<String> = st
                                .and_then(|s| s.conditions.clone())
                                .unwrap_or_default()
                                .into_iter()
                                .filter(|c| c.status != "True")
                                .map(|c| format!("{}: {}", c.type_, c.message.unwrap_or_default()))
                                .collect();
                            format!(
                                "{} {:?} {why:?}",
                                p.metadata.name.as_deref().unwrap_or_default(),
                                st.and_then(|s| s.phase.clone())
                            )
                        })
                        .collect();
                    anyhow::bail!("{} pods: {waiting:?}", pods.len())
                },
            )
            .await
            .unwrap_or_else(|e| fail(e));

        let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), seed.namespace);
        let mut devices = BTreeSet::new();
        for pod in &pods {
            let name = pod.metadata.name.clone().unwrap();
            let status = pod.status.as_ref().unwrap();
            let ext = status
                .extended_resource_claim_status
                .as_ref()
                .unwrap_or_else(|| {
                    panic!("{}: {name} has no extendedResourceClaimStatus", seed.id)
                });
            let container = &pod.spec.as_ref().unwrap().containers[0].name;
            assert!(
                ext.request_mappings
                    .iter()
                    .any(|m| &m.container_name == container && m.resource_name == "nvidia.com/gpu"),
                "{name}: {ext:?}"
            );
            let claim = claims.get(&ext.resource_claim_name).await.unwrap();
            let uid = claim.metadata.uid.clone().unwrap();
            let requests = serde_json::to_value(&claim.spec).unwrap()["devices"].clone();
            assert_eq!(
                requests["requests"][0]["exactly"]["deviceClassName"], served["metadata"]["name"],
                "{name}: served through the migrated class: {requests}"
            );
            let class_config = claim
                .status
                .as_ref()
                .and_then(|s| s.allocation.as_ref())
                .and_then(|a| a.devices.as_ref())
                .and_then(|d| d.config.clone())
                .unwrap_or_default();
            let got: Vec<Value> = class_config
                .iter()
                .filter(|c| c.source == "FromClass")
                .map(|c| json!({"opaque": c.opaque}))
                .collect();
            let want = served["spec"]["config"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                got, want,
                "{name}: the legacy policy reaches the allocation"
            );
            let results = claim
                .status
                .as_ref()
                .and_then(|s| s.allocation.as_ref())
                .and_then(|a| a.devices.as_ref())
                .and_then(|d| d.results.clone())
                .unwrap_or_default();
            assert_eq!(results.len(), 1, "{name}: one device for nvidia.com/gpu: 1");
            let device = &results[0];
            assert_eq!(device.driver, DRIVER);
            assert_eq!(device.pool, NODE);
            // A whole GPU: a `gpu` device, and the container sees exactly its UUID.
            assert_eq!(
                attribute(&slices, &device.device, "type").as_deref(),
                Some("gpu"),
                "{name}: {}",
                device.device
            );
            assert!(
                devices.insert(device.device.clone()),
                "{name}: {} twice",
                device.device
            );
            let result = b
                .container_result(NODE, seed.namespace, &name, container)
                .unwrap_or_else(|| panic!("{}: no container result for {name}", seed.id));
            assert_eq!(
                result["cdiDevices"],
                json!([format!("gpu-dra.dev/claim={uid}-{}", device.device)]),
                "{name}"
            );
            let uuid = attribute(&slices, &device.device, "uuid").unwrap();
            assert!(
                result["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e == &json!(format!("NVIDIA_VISIBLE_DEVICES={uuid}"))),
                "{name}: {result}"
            );
        }

        // Remove the seed's workloads; their special claims go with their pods.
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(client.clone(), seed.namespace);
        deployments
            .delete_collection(&DeleteParams::background(), &ListParams::default())
            .await
            .unwrap();
        pods_api
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
        b.wait(
            STEP,
            &format!("{}: pods and claims gone", seed.id),
            || async {
                let pods = pods_api.list(&ListParams::default()).await?.items;
                let left = claims.list(&ListParams::default()).await?.items;
                Ok((pods.is_empty() && left.is_empty()).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| fail(e));
    }
    plugin.check_alive().unwrap();
}
