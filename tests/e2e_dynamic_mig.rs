//! End-to-end dynamic MIG on the tests/cluster box: the real scheduler allocates MIG
//! placements of a partitionable GPU (KEP-4815, counters), our plugin creates the GPU and
//! compute instances at prepare through the fake NVML and destroys them at unprepare.
//! Topology `dgx-h100-dynamic-mig`: GPU 0 in MIG mode without instances, the rest whole.
//! Then a lost checkpoint under a live dynamic MIG pod: the plugin restarts, re-adopts the
//! instance (instance and CDI spec unchanged), new pods on the claim start, the placement
//! is not offered again, and unprepare still destroys it.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceClaimTemplate, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use support::driver::{DRIVER, FakeGpus, Plugin};
use support::scenario::{apply_device_classes, env_of};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

fn pod(name: &str) -> Pod {
    pod_with(
        name,
        json!({"name": "gpu", "resourceClaimTemplateName": "half"}),
    )
}

fn pod_with(name: &str, claim: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [claim],
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

/// Waits until pod `name` is Running and the node agent has its container `ctr`'s result;
/// returns that result (the wait's error after [`STEP`]).
async fn wait_running_result(
    b: &support::TestBox,
    pods: &Api<Pod>,
    ns: &str,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    b.wait(STEP, &format!("pod {name} Running"), || async {
        let p = pods.get(name).await?;
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        Ok(running
            .then(|| b.container_result(NODE, ns, name, "ctr"))
            .flatten())
    })
    .await
}

/// Waits until the scheduler marks pod `name` unschedulable (`PodScheduled` False, reason
/// `Unschedulable`); `what` names the wait. Errors: the wait's, after [`STEP`].
async fn wait_unschedulable(
    b: &support::TestBox,
    pods: &Api<Pod>,
    name: &str,
    what: &str,
) -> anyhow::Result<()> {
    b.wait(STEP, what, || async {
        let p = pods.get(name).await?;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claims_pack_one_gpu_a_third_waits_and_the_gpu_empties() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100-dynamic-mig").expect("fake GPUs");
    // A RefCell: the failure report reads the plugin's log while the test restarts it.
    let plugin = std::cell::RefCell::new(Plugin::start(b, NODE, &gpus).expect("plugin"));
    apply_device_classes(&client).await;
    let fail = |err: anyhow::Error| -> ! {
        panic!(
            "{err:#}\n--- plugin log ---\n{}\n--- box logs ---\n{}",
            plugin.borrow().log_tail(60),
            b.log_tail(30)
        )
    };

    // Published: GPU 0's counter set, its 25 placements and its full GPU, all consuming.
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
    b.wait(STEP, "dynamic MIG slices of node-a", || async {
        plugin.borrow().check_alive()?;
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
        let result = wait_running_result(b, &pods, &ns, name)
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
    wait_unschedulable(b, &pods, "three", "pod three unschedulable")
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

    // A lost checkpoint under a live pod on a named claim.
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let kept: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "kept"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "mig.gpu-dra.dev",
            "selectors": [{"cel": {"expression":
                "device.attributes['gpu.gpu-dra.dev'].profile == '3g.40gb'"}}]}}]}}
    }))
    .expect("claim");
    let kept = claims
        .create(&PostParams::default(), &kept)
        .await
        .expect("create claim");
    let kept_uid = kept.metadata.uid.clone().expect("uid");
    let on_kept = |name: &str| pod_with(name, json!({"name": "gpu", "resourceClaimName": "kept"}));
    pods.create(&PostParams::default(), &on_kept("four"))
        .await
        .expect("create four");
    let running = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            Ok(
                (p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                    .then_some(()),
            )
        }
    };
    b.wait(STEP, "pod four Running", || running("four"))
        .await
        .unwrap_or_else(|e| fail(e));
    let state_before = gpus.state().gpus[&nvidia_ml::control::load_topology(&gpus.topology())
        .expect("topology")
        .gpus[0]
        .uuid]
        .clone();
    let spec_path = b
        .cdi_dir(NODE)
        .join(format!("gpu-dra.dev-claim_{kept_uid}.json"));
    let spec_before = std::fs::read(&spec_path).expect("spec of the kept claim");
    let checkpoint = b
        .kubelet_root(NODE)
        .join(format!("plugins/{DRIVER}/checkpoint.json"));
    plugin.borrow_mut().kill();
    std::fs::remove_file(&checkpoint).expect("lose the checkpoint");
    plugin.borrow_mut().restart(&gpus).expect("restart");
    b.wait(STEP, "kept claim rebuilt with its MIG instance", || async {
        plugin.borrow().check_alive()?;
        let Ok(bytes) = std::fs::read(&checkpoint) else {
            return Ok(None);
        };
        let cp: serde_json::Value = serde_json::from_slice(&bytes)?;
        let entry = &cp["claims"][&kept_uid];
        Ok((entry["state"] == "PrepareCompleted"
            && entry["extra"]["dynamicMig"][0]["giId"].is_u64())
        .then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));
    let topo = nvidia_ml::control::load_topology(&gpus.topology()).expect("topology");
    assert_eq!(
        gpus.state().gpus[&topo.gpus[0].uuid].gpu_instances,
        state_before.gpu_instances,
        "instance untouched"
    );
    assert_eq!(
        std::fs::read(&spec_path).expect("spec"),
        spec_before,
        "CDI spec byte for byte"
    );
    // A new pod on the claim starts; a second 3g.40gb gets the other half, a third
    // waits: the kept placement is not offered again.
    pods.create(&PostParams::default(), &on_kept("five"))
        .await
        .expect("create five");
    b.wait(STEP, "pod five Running", || running("five"))
        .await
        .unwrap_or_else(|e| fail(e));
    for name in ["six", "seven"] {
        pods.create(&PostParams::default(), &pod(name))
            .await
            .expect("create pod");
    }
    b.wait(STEP, "pod six Running", || running("six"))
        .await
        .unwrap_or_else(|e| fail(e));
    wait_unschedulable(b, &pods, "seven", "pod seven unschedulable")
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(gpu0_instances(&gpus).len(), 2);
    for name in ["seven", "six", "five", "four"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }
    claims
        .delete("kept", &DeleteParams::default())
        .await
        .expect("delete claim");
    b.wait(
        STEP,
        "GPU 0 without instances after the rebuilt claim",
        || async { Ok(gpu0_instances(&gpus).is_empty().then_some(())) },
    )
    .await
    .unwrap_or_else(|e| fail(e));

    // The full GPU of dynamic GPU 0: MIG mode off while its pod runs.
    let gpu0 = topo.gpus[0].uuid.clone();
    let mig_on = || {
        let g = &gpus.state().gpus[&gpu0];
        (g.mig_current, g.mig_pending)
    };
    let whole: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "whole"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
            "deviceClassName": "gpu.gpu-dra.dev",
            "selectors": [{"cel": {"expression":
                format!("device.attributes['gpu.gpu-dra.dev'].uuid == '{gpu0}'")}}]}}]}}
    }))
    .expect("claim");
    claims
        .create(&PostParams::default(), &whole)
        .await
        .expect("create whole");
    pods.create(
        &PostParams::default(),
        &pod_with(
            "whole",
            json!({"name": "gpu", "resourceClaimName": "whole"}),
        ),
    )
    .await
    .expect("create whole pod");
    let result = wait_running_result(b, &pods, &ns, "whole")
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(
        env_of(&result, "NVIDIA_VISIBLE_DEVICES").as_deref(),
        Some(gpu0.as_str()),
        "{result}"
    );
    assert_eq!(mig_on(), (false, false), "MIG mode off for the full GPU");
    pods.create(&PostParams::default(), &pod("eight"))
        .await
        .expect("create eight");
    wait_unschedulable(
        b,
        &pods,
        "eight",
        "pod eight unschedulable beside the full GPU",
    )
    .await
    .unwrap_or_else(|e| fail(e));
    pods.delete("whole", &DeleteParams::default())
        .await
        .expect("delete whole");
    claims
        .delete("whole", &DeleteParams::default())
        .await
        .expect("delete whole claim");
    b.wait(STEP, "MIG mode back on GPU 0", || async {
        Ok((mig_on() == (true, true)).then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));
    b.wait(STEP, "pod eight Running once the full GPU is free", || {
        running("eight")
    })
    .await
    .unwrap_or_else(|e| fail(e));
    assert_eq!(gpu0_instances(&gpus).len(), 1);
    pods.delete("eight", &DeleteParams::default())
        .await
        .expect("delete eight");
    b.wait(STEP, "GPU 0 empty at the end", || async {
        Ok(gpu0_instances(&gpus).is_empty().then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(e));
}
