//! The plugin's Events on the tests/cluster box, checked by the Event objects
//! (`events.k8s.io/v1`: reason, type, regarding, related, series), never by log lines.
//!
//! One plugin on node-a (fake dgx-h100-static-mig), in order:
//! - an MPS claim whose first daemon start is refused by the fake
//!   `nvidia-cuda-mps-control`: `MPSDaemonFailed` on the claim; the retry runs the pod;
//! - a second claim allocated the GPU a time-sliced (Long) claim holds, asking Short:
//!   `PolicyConflict` on the claim and the Node, the kubelet's retries counted in one
//!   Event's `series.count`;
//! - XID 79 on the GPU of a running whole-GPU claim: `DeviceUnhealthy` on the Node and on
//!   that claim;
//! - the plugin killed, the MPS daemon killed, the plugin started again:
//!   `MPSDaemonRestarted` on the MPS claim;
//! - ResourceSlice writes denied by a ValidatingAdmissionPolicy for longer than the
//!   threshold (`--slice-failure-event-after=3`): one `ResourceSlicePublishFailing` on the
//!   Node however many retries fail, and `ResourceSlicePublishRecovered` once allowed.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceClaimTemplate, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use support::driver::{FakeGpus, Plugin};

const NODE: &str = "node-a";
const DRIVER: &str = "gpu.gpu-dra.dev";
const STEP: Duration = Duration::from_secs(90);

fn pod(name: &str, template: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": template}],
            "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                            "resources": {"claims": [{"name": "gpu"}]}}]
        }
    }))
    .unwrap()
}

/// Events in `namespace` with `reason` regarding an object of `kind` named `name`.
async fn events(
    client: &kube::Client,
    namespace: &str,
    reason: &str,
    kind: &str,
    name: &str,
) -> anyhow::Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name)
                })
        })
        .collect())
}

/// The claim generated for `pod`'s `gpu` entry.
async fn claim_of(client: &kube::Client, ns: &str, pod: &str) -> anyhow::Result<ResourceClaim> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods.get(pod).await?;
    let name = p
        .status
        .and_then(|s| s.resource_claim_statuses)
        .and_then(|s| s.into_iter().next())
        .and_then(|s| s.resource_claim_name)
        .ok_or_else(|| anyhow::anyhow!("{pod}: no generated claim yet"))?;
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), ns);
    Ok(claims.get(&name).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_node_and_claims() {
    let b = support::shared();
    let client = b.client().await;
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let mut plugin = Plugin::start_with(
        b,
        NODE,
        &gpus,
        "",
        &["--slice-failure-event-after=3".to_owned()],
    )
    .unwrap();
    for doc in support::deploy::documents("deviceclasses.yaml").unwrap() {
        support::deploy::apply(&client, &doc).await.unwrap();
    }
    let ns = b.create_namespace("events").await;

    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let gpu_config = |sharing: Value| {
        json!([{"opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharing": sharing}}}])
    };
    let whole = json!([{"name": "gpu", "exactly": {"deviceClassName": "gpu.gpu-dra.dev"}}]);
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns);
    for (name, devices) in [
        (
            "mps",
            json!({"requests": whole, "config": gpu_config(json!({"strategy": "MPS"}))}),
        ),
        (
            "long",
            json!({"requests": whole, "config": gpu_config(json!({"strategy": "TimeSlicing",
                "timeSlicingConfig": {"interval": "Long"}}))}),
        ),
    ] {
        let t: ResourceClaimTemplate = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"spec": {"devices": devices}}}),
        )
        .unwrap();
        templates.create(&PostParams::default(), &t).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            Ok((p.status.and_then(|s| s.phase).as_deref() == Some("Running")).then_some(()))
        }
    };

    // MPS daemon start refused once: MPSDaemonFailed on the claim, then the retry runs it.
    nvidia_ml::control::inject_fault(
        &gpus.state_path(),
        nvidia_ml::control::Fault {
            function: "nvidia-cuda-mps-control -d".into(),
            gpu_uuid: None,
            error: 999,
            times: nvidia_ml::control::Times::N(1),
        },
    )
    .unwrap();
    pods.create(&PostParams::default(), &pod("mps", "mps"))
        .await
        .unwrap();
    b.wait(STEP, "mps pod Running", || running("mps"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));
    let mps_claim = claim_of(&client, &ns, "mps").await.unwrap();
    let mps_claim_name = mps_claim.metadata.name.clone().unwrap();
    let mps_uid = mps_claim.metadata.uid.clone().unwrap();
    let failed = b
        .wait(STEP, "MPSDaemonFailed on the MPS claim", || async {
            let found = events(
                &client,
                &ns,
                "MPSDaemonFailed",
                "ResourceClaim",
                &mps_claim_name,
            )
            .await?;
            Ok(found.into_iter().next())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    assert_eq!(
        failed.regarding.as_ref().and_then(|r| r.uid.as_deref()),
        Some(mps_uid.as_str())
    );
    assert_eq!(
        failed.related.as_ref().and_then(|r| r.name.as_deref()),
        Some(NODE)
    );

    // A GPU time-sliced (Long) by one claim, and a second claim allocated the same GPU
    // with another interval. The scheduler never allocates one device twice, so the
    // allocation is written the way a scheduler writes it (status.allocation and
    // reservedFor), for a pod bound to node-a: prepare must refuse it with one Event
    // that aggregates the kubelet's retries.
    pods.create(&PostParams::default(), &pod("trainer", "long"))
        .await
        .unwrap();
    b.wait(STEP, "trainer Running", || running("trainer"))
        .await
        .unwrap();
    let trainer_claim = claim_of(&client, &ns, "trainer").await.unwrap();
    let trainer_name = trainer_claim.metadata.name.clone().unwrap();
    let device = trainer_claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .map(|r| r[0].device.clone())
        .unwrap();
    let short = json!({"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short"}});
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let second: ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "second"},
        "spec": {"devices": {"requests": whole, "config": gpu_config(short.clone())}}
    }))
    .unwrap();
    let second = claims
        .create(&PostParams::default(), &second)
        .await
        .unwrap();
    let second_uid = second.metadata.uid.clone().unwrap();
    let second_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "second"},
        "spec": {
            "nodeName": NODE,
            "resourceClaims": [{"name": "gpu", "resourceClaimName": "second"}],
            "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                            "resources": {"claims": [{"name": "gpu"}]}}]
        }
    }))
    .unwrap();
    let second_pod = pods
        .create(&PostParams::default(), &second_pod)
        .await
        .unwrap();
    claims
        .patch_status(
            "second",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "allocation": {
                    "devices": {
                        "results": [{"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}],
                        "config": [{"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": {
                            "apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig", "sharing": short}}}]
                    },
                    "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                        {"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}
                },
                "reservedFor": [{"resource": "pods", "name": "second",
                                 "uid": second_pod.metadata.uid.clone().unwrap()}]
            }})),
        )
        .await
        .unwrap();
    let conflict = b
        .wait(STEP, "PolicyConflict repeated in one Event", || async {
            let found = events(&client, &ns, "PolicyConflict", "ResourceClaim", "second").await?;
            anyhow::ensure!(found.len() <= 1, "one Event object, got {}", found.len());
            Ok(found
                .into_iter()
                .next()
                .filter(|e| e.series.as_ref().is_some_and(|s| s.count >= 2)))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));
    assert_eq!(conflict.type_.as_deref(), Some("Warning"));
    assert_eq!(
        conflict.regarding.as_ref().and_then(|r| r.uid.as_deref()),
        Some(second_uid.as_str())
    );
    let holder_uid = trainer_claim.metadata.uid.clone().unwrap();
    assert!(
        conflict
            .note
            .as_deref()
            .unwrap_or_default()
            .contains(&holder_uid),
        "names the holder: {conflict:?}"
    );
    let on_node = events(&client, "default", "PolicyConflict", "Node", NODE)
        .await
        .unwrap();
    assert!(
        on_node
            .iter()
            .any(|e| e.related.as_ref().and_then(|r| r.name.as_deref()) == Some("second")),
        "{on_node:?}"
    );
    pods.delete("second", &DeleteParams::default())
        .await
        .unwrap();

    // XID 79 on a running claim's GPU.
    let result = b.container_result(NODE, &ns, "trainer", "ctr").unwrap();
    let uuid = result["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix("NVIDIA_VISIBLE_DEVICES="))
        .unwrap()
        .to_owned();
    nvidia_ml::control::inject_xid(&gpus.state_path(), &uuid, 79).unwrap();
    b.wait(
        STEP,
        "DeviceUnhealthy on the Node and the claim",
        || async {
            let node = events(&client, "default", "DeviceUnhealthy", "Node", NODE).await?;
            let claim = events(
                &client,
                &ns,
                "DeviceUnhealthy",
                "ResourceClaim",
                &trainer_name,
            )
            .await?;
            let node_ok = node
                .iter()
                .any(|e| e.note.as_deref().unwrap_or_default().contains(&uuid));
            Ok((node_ok && claim.len() == 1).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));

    // The MPS daemon dies while the plugin is down: restarted at start-up, with an Event.
    plugin.kill();
    let pid_file = b
        .kubelet_root(NODE)
        .join("plugins")
        .join(DRIVER)
        .join("mps")
        .join(&mps_uid)
        .join("pipe/nvidia-cuda-mps-control.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    plugin.restart(&gpus).unwrap();
    let restarted = b
        .wait(STEP, "MPSDaemonRestarted on the MPS claim", || async {
            let found = events(
                &client,
                &ns,
                "MPSDaemonRestarted",
                "ResourceClaim",
                &mps_claim_name,
            )
            .await?;
            Ok(found.into_iter().next())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));
    assert_eq!(restarted.type_.as_deref(), Some("Warning"));

    // ResourceSlice writes denied for longer than the threshold, then allowed again.
    let deny = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "events-e2e-deny-slices"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["resource.k8s.io"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": ["resourceslices"]}]},
            "validations": [{"expression": format!("object.spec.nodeName != '{NODE}'"),
                             "message": "ResourceSlice writes for node-a are suspended by the test"}]
        }
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "events-e2e-deny-slices"},
        "spec": {"policyName": "events-e2e-deny-slices", "validationActions": ["Deny"]}
    });
    support::deploy::apply(&client, &deny).await.unwrap();
    support::deploy::apply(&client, &binding).await.unwrap();
    let probe: ResourceSlice = serde_json::from_value(json!({
        "metadata": {"name": "events-e2e-probe"},
        "spec": {"driver": DRIVER, "nodeName": NODE, "pool": {"name": "probe", "generation": 1, "resourceSliceCount": 1}, "devices": []}
    }))
    .unwrap();
    b.wait(STEP, "the policy denies node-a's slices", || async {
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        Ok(slices.create(&dry, &probe).await.is_err().then_some(()))
    })
    .await
    .unwrap();
    slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().fields(&format!("spec.nodeName={NODE}")),
        )
        .await
        .unwrap();
    b.wait(
        STEP,
        "ResourceSlicePublishFailing after 3 failing retries",
        || async {
            let (_, body) = plugin.probe("/metrics").await?;
            let failures: f64 = body
                .lines()
                .find_map(|l| l.strip_prefix("gpu_dra_slice_publish_failures_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
            let found = events(
                &client,
                "default",
                "ResourceSlicePublishFailing",
                "Node",
                NODE,
            )
            .await?;
            Ok((failures >= 3.0 && !found.is_empty()).then_some(found))
        },
    )
    .await
    .map(|found| {
        assert_eq!(found.len(), 1, "one Event per outage: {found:?}");
        assert!(
            found[0].series.is_none(),
            "not repeated per retry: {found:?}"
        );
        assert_eq!(found[0].type_.as_deref(), Some("Warning"));
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));
    let bindings: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingAdmissionPolicyBinding",
            ),
            "validatingadmissionpolicybindings",
        ),
    );
    bindings
        .delete("events-e2e-deny-slices", &DeleteParams::default())
        .await
        .unwrap();
    let recovered = b
        .wait(STEP, "ResourceSlicePublishRecovered", || async {
            let found = events(
                &client,
                "default",
                "ResourceSlicePublishRecovered",
                "Node",
                NODE,
            )
            .await?;
            Ok(found.into_iter().next())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plugin.log_tail(40)));
    assert_eq!(recovered.type_.as_deref(), Some("Normal"));
    plugin.check_alive().unwrap();
}
