//! Smoke test of the Kubernetes test rig without our driver (issue 2, item 6):
//! a DeviceClass and a hand-written ResourceSlice for node-a, a
//! ResourceClaimTemplate and a Pod. The real scheduler allocates and binds,
//! the resource-claim controller creates and reserves the claim, and the node
//! agent (kubelet DRA manager) reports that no plugin is registered.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::api::resource::v1::{
    DeviceClass, ResourceClaim, ResourceClaimTemplate, ResourceSlice,
};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const STEP: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_allocates_claim_controller_reserves_and_agent_reports_missing_plugin() {
    let b = support::shared();
    let client = b.client().await;
    let ns = b.create_namespace("smoke").await;
    let driver = format!("{ns}.example.com");
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

    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let slice: ResourceSlice = serde_json::from_value(json!({
        "metadata": { "generateName": format!("node-a-{}-", driver.replace('.', "-")) },
        "spec": {
            "driver": driver,
            "nodeName": "node-a",
            "pool": { "name": "node-a", "generation": 1, "resourceSliceCount": 1 },
            "devices": [ { "name": "gpu-0", "attributes": { "model": { "string": "fixture" } } } ]
        }
    }))
    .unwrap();
    let slice = slices.create(&PostParams::default(), &slice).await.unwrap();

    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns);
    let template: ResourceClaimTemplate = serde_json::from_value(json!({
        "metadata": { "name": "one-gpu" },
        "spec": { "spec": { "devices": { "requests": [
            { "name": "gpu", "exactly": { "deviceClassName": class_name } }
        ] } } }
    }))
    .unwrap();
    templates
        .create(&PostParams::default(), &template)
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "smoke" },
        "spec": {
            "resourceClaims": [ { "name": "gpu", "resourceClaimTemplateName": "one-gpu" } ],
            "containers": [ {
                "name": "ctr",
                "image": "registry.example/none:latest",
                "resources": { "claims": [ { "name": "gpu" } ] }
            } ]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    // The real scheduler allocates the device and binds the pod to node-a.
    let bound = b
        .wait(STEP, "pod bound to node-a", || async {
            let p = pods.get("smoke").await?;
            Ok(p.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .map(|n| (n, p)))
        })
        .await
        .unwrap();
    assert_eq!(bound.0, "node-a");
    let pod_uid = bound.1.metadata.uid.clone().unwrap();

    // The resource-claim controller created the claim from the template; it
    // is allocated from our slice and reserved for the pod.
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let claim = b
        .wait(STEP, "claim allocated and reserved for the pod", || async {
            let p = pods.get("smoke").await?;
            let Some(name) = p
                .status
                .and_then(|s| s.resource_claim_statuses)
                .and_then(|v| v.into_iter().find(|s| s.name == "gpu"))
                .and_then(|s| s.resource_claim_name)
            else {
                return Ok(None);
            };
            let c = claims.get(&name).await?;
            let st = c.status.clone().unwrap_or_default();
            let reserved = st
                .reserved_for
                .unwrap_or_default()
                .iter()
                .any(|r| r.uid == pod_uid);
            Ok((st.allocation.is_some() && reserved).then_some(c))
        })
        .await
        .unwrap();
    let owner = &claim.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Pod", pod_uid.as_str())
    );
    let results = claim
        .status
        .unwrap()
        .allocation
        .unwrap()
        .devices
        .unwrap()
        .results
        .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(
        (
            results[0].driver.as_str(),
            results[0].pool.as_str(),
            results[0].device.as_str()
        ),
        (driver.as_str(), "node-a", "gpu-0")
    );

    // The node agent's kubelet DRA manager cannot find a plugin for the driver:
    // a Warning event and a False pod condition say so, the pod stays Pending.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let want = format!("DRA driver {driver} is not registered");
    let event = b
        .wait(STEP, "FailedPrepareDynamicResources event", || async {
            let lp = ListParams::default().fields("involvedObject.name=smoke");
            let list = events.list(&lp).await?;
            Ok(list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("FailedPrepareDynamicResources")
                    && e.message.as_deref().is_some_and(|m| m.contains(&want))
            }))
        })
        .await
        .unwrap();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.source.and_then(|s| s.host).as_deref(), Some("node-a"));
    let condition = b
        .wait(STEP, "ResourcesPrepared=False condition", || async {
            let p = pods.get("smoke").await?;
            let conds = p.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(conds
                .into_iter()
                .find(|c| c.type_ == "ResourcesPrepared" && c.status == "False"))
        })
        .await
        .unwrap();
    assert!(condition.message.unwrap_or_default().contains(&want));
    let phase = pods
        .get("smoke")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Pending"));
    assert!(b.container_result("node-a", &ns, "smoke", "ctr").is_none());

    // Deleting the pod: the agent (nothing prepared) finishes termination and
    // removes the pod; the garbage collector removes the generated claim.
    pods.delete("smoke", &DeleteParams::default())
        .await
        .unwrap();
    b.wait(STEP, "pod removed by the node agent", || async {
        Ok(pods.get_opt("smoke").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    let claim_name = claim.metadata.name.unwrap();
    b.wait(STEP, "generated claim garbage-collected", || async {
        Ok(claims.get_opt(&claim_name).await?.is_none().then_some(()))
    })
    .await
    .unwrap();

    slices
        .delete(&slice.metadata.name.unwrap(), &DeleteParams::default())
        .await
        .unwrap();
    classes
        .delete(&class_name, &DeleteParams::default())
        .await
        .unwrap();
}
