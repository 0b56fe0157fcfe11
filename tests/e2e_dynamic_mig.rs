//! End-to-end dynamic MIG on the tests/cluster box: the real scheduler allocates MIG
//! placements of a partitionable GPU (KEP-4815, counters), our plugin creates the GPU and
//! compute instances at prepare through the fake NVML and destroys them at unprepare.
//! Topology `dgx-h100-dynamic-mig`: GPU 0 in MIG mode without instances, the rest whole.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaimTemplate, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use support::driver::{DRIVER, FakeGpus, Plugin};
use support::scenario::{apply_device_classes, env_of};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "half"}],
            "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                            "resources": {"claims": [{"name": "gpu"}]}}]
        }
    }))
    .expect("pod")
}

/// `(profile id, placement start)` of GPU 0's GPU instances, each with one compute instance.
fn gpu0_instances(gpus: &FakeGpus) -> Vec<(u32, u32, usize)> {
    let topo = nvidia_ml::control::load_topology(&gpus.topology()).expect("topology");
    let state = gpus.state();
    state
        .gpus
        .get(&topo.gpus[0].uuid)
        .map(|g| {
            g.gpu_instances
                .values()
                .map(|gi| {
                    (
                        gi.profile_id,
                        gi.placement_start,
                        gi.compute_instances.len(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_pack_one_gpu_a_third_waits_and_the_gpu_empties() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100-dynamic-mig").expect("fake GPUs");
    let plugin = Plugin::start(b, NODE, &gpus).expect("plugin");
    apply_device_classes(&client).await;
    let fail = |err: anyhow::Error| -> ! {
        panic!(
            "{err:#}\n--- plugin log ---\n{}\n--- box logs ---\n{}",
            plugin.log_tail(60),
            b.log_tail(30)
        )
    };

    // Published: GPU 0's counter set, its 25 placements and its full GPU, all consuming.
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    b.wait(STEP, "dynamic MIG slices of node-a", || async {
        plugin.check_alive()?;
        let list = slices.list(&lp).await?;
        let sets = list
            .items
            .iter()
            .flat_map(|s| s.spec.shared_counters.iter().flatten())
            .filter(|c| c.name == "gpu-0-counter-set")
            .count();
        let consuming = list
            .items
            .iter()
            .flat_map(|s| s.spec.devices.iter().flatten())
            .filter(|d| d.consumes_counters.is_some())
            .count();
        Ok((sets == 1 && consuming == 26).then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));

    let ns = b.create_namespace("dynamic-mig").await;
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns);
    let template = serde_json::from_value(json!({
        "metadata": {"name": "half"},
        "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "mig.gpu-dra.dev",
            "selectors": [{"cel": {"expression":
                "device.attributes['gpu.gpu-dra.dev'].profile == '3g.40gb'"}}]}}]}}}
    }))
    .expect("template");
    templates
        .create(&PostParams::default(), &template)
        .await
        .expect("create template");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for name in ["one", "two"] {
        pods.create(&PostParams::default(), &pod(name))
            .await
            .expect("create pod");
    }
    let mut uuids = Vec::new();
    for name in ["one", "two"] {
        let result = b
            .wait(STEP, &format!("pod {name} Running"), || async {
                let p = pods.get(name).await?;
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                Ok(running
                    .then(|| b.container_result(NODE, &ns, name, "ctr"))
                    .flatten())
            })
            .await
            .unwrap_or_else(|e| fail(e));
        let uuid = env_of(&result, "NVIDIA_VISIBLE_DEVICES").unwrap_or_default();
        assert!(
            uuid.starts_with("MIG-"),
            "pod {name} sees {uuid:?}: {result}"
        );
        uuids.push(uuid);
    }
    assert_ne!(uuids[0], uuids[1]);
    let mut made = gpu0_instances(&gpus);
    made.sort();
    assert_eq!(
        made,
        [(9, 0, 1), (9, 4, 1)],
        "two 3g.40gb instances pack GPU 0"
    );

    // A third 3g.40gb does not fit: the scheduler leaves it Pending (Unschedulable).
    pods.create(&PostParams::default(), &pod("three"))
        .await
        .expect("create third");
    b.wait(STEP, "pod three unschedulable", || async {
        let p = pods.get("three").await?;
        let unschedulable = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            });
        Ok(unschedulable.then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));
    assert_eq!(
        gpu0_instances(&gpus).len(),
        2,
        "nothing created for the Pending pod"
    );

    // The pods go; so do the instances.
    for name in ["three", "one", "two"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }
    for name in ["three", "one", "two"] {
        b.wait(STEP, &format!("pod {name} gone"), || async {
            Ok(pods.get_opt(name).await?.is_none().then_some(()))
        })
        .await
        .unwrap_or_else(|e| fail(e));
    }
    b.wait(STEP, "GPU 0 without instances", || async {
        Ok(gpu0_instances(&gpus).is_empty().then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));
}
