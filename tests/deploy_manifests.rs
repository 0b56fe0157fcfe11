//! The manifests in deploy/ against the box's real API server (issue 4, item 11).
//!
//! Every object of every file is sent with server-side apply and strict field validation,
//! so an unknown field, a schema violation or a CEL expression that does not compile fails
//! the test. Objects that change the cluster for others are only dry-run: the DaemonSet,
//! the webhook's Deployment, Service, PodDisruptionBudget and its
//! ValidatingWebhookConfiguration (failurePolicy Fail with no webhook behind it would block
//! every claim). The namespace, ServiceAccount, RBAC, the node-isolation policy and the
//! DeviceClasses are applied for real (idempotent apply, field manager `deploy-test`):
//! other tests use the classes, and the policy is then exercised by impersonating the
//! plugin's ServiceAccount with a node-bound token's extra.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use serde::Deserialize;
use serde_json::{Value, json};

const FILES: [&str; 6] = [
    "namespace.yaml",
    "rbac.yaml",
    "node-isolation.yaml",
    "deviceclasses.yaml",
    "daemonset.yaml",
    "webhook.yaml",
];
const FIELD_MANAGER: &str = "deploy-test";
const PLUGIN_USER: &str = "system:serviceaccount:gpu-dra:gpu-dra-kubelet-plugin";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const STEP: Duration = Duration::from_secs(60);

/// Kinds only dry-run: they would start pods or intercept other tests' requests.
fn dry_run_only(kind: &str) -> bool {
    matches!(
        kind,
        "DaemonSet"
            | "Deployment"
            | "Service"
            | "PodDisruptionBudget"
            | "ValidatingWebhookConfiguration"
    )
}

/// All YAML documents of `deploy/<file>` as JSON, empty documents skipped.
fn documents(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn gvk(doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let kind = doc["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// Server-side applies one manifest object (strict validation), dry-run if asked.
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

fn slice(node: &str) -> ResourceSlice {
    serde_json::from_value(json!({
        "metadata": {"generateName": format!("{node}-gpu-gpu-dra-dev-")},
        "spec": {
            "driver": "gpu.gpu-dra.dev",
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0"}]
        }
    }))
    .expect("slice")
}

/// A client acting as the plugin's ServiceAccount, with `node` as the token's node extra
/// (what a pod-bound token of a plugin pod on that node carries); `None`: no extra.
async fn plugin_client(kubeconfig: &std::path::Path, node: Option<&str>) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(PLUGIN_USER.to_owned());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".to_owned(),
        "system:serviceaccounts:gpu-dra".to_owned(),
        "system:authenticated".to_owned(),
    ]);
    if let Some(node) = node {
        let extra =
            std::collections::HashMap::from([(NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()])]);
        config.auth_info.impersonate_user_extra = Some(extra);
    }
    kube::Client::try_from(config).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_manifests_are_accepted_and_the_node_policy_holds() {
    let b = support::shared();
    let client = b.client().await;

    let mut applied: BTreeMap<String, bool> = BTreeMap::new();
    for file in FILES {
        for doc in documents(file) {
            let kind = doc["kind"].as_str().expect("kind").to_owned();
            let name = doc["metadata"]["name"].as_str().expect("name").to_owned();
            let dry_run = dry_run_only(&kind);
            let started = std::time::Instant::now();
            let object = apply(&client, &doc, dry_run).await.unwrap_or_else(|e| {
                panic!("{file}: {kind} {name} rejected by the API server: {e}")
            });
            eprintln!(
                "{file}: {kind} {name} accepted ({}, {:?})",
                if dry_run { "dry-run" } else { "applied" },
                started.elapsed()
            );
            assert_eq!(object.metadata.name.as_deref(), Some(name.as_str()));
            applied.insert(format!("{kind}/{name}"), dry_run);
        }
    }
    for (object, dry_run) in [
        ("Namespace/gpu-dra", false),
        ("ServiceAccount/gpu-dra-kubelet-plugin", false),
        ("ClusterRole/gpu-dra-kubelet-plugin", false),
        ("ClusterRoleBinding/gpu-dra-kubelet-plugin", false),
        (
            "ValidatingAdmissionPolicy/gpu-dra-resourceslices-own-node",
            false,
        ),
        (
            "ValidatingAdmissionPolicyBinding/gpu-dra-resourceslices-own-node",
            false,
        ),
        ("DeviceClass/gpu.gpu-dra.dev", false),
        ("DeviceClass/mig.gpu-dra.dev", false),
        ("DaemonSet/gpu-dra-kubelet-plugin", true),
        ("Deployment/gpu-dra-webhook", true),
        ("Service/gpu-dra-webhook", true),
        ("ValidatingWebhookConfiguration/gpu-dra-webhook", true),
    ] {
        assert_eq!(
            applied.get(object),
            Some(&dry_run),
            "{object} in {applied:?}"
        );
    }

    // Applying again is a no-op (idempotent SSA: same field manager, same fields).
    for doc in documents("deviceclasses.yaml") {
        apply(&client, &doc, false).await.expect("re-apply");
    }

    // The node-isolation policy: the plugin on node-a may write node-a's slices only.
    let create = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let on_node_a: Api<ResourceSlice> =
        Api::all(plugin_client(b.kubeconfig(), Some("node-a")).await);
    let denial = b
        .wait(
            STEP,
            "policy denies the node-a plugin a node-b slice",
            || async {
                match on_node_a.create(&create, &slice("node-b")).await {
                    Err(kube::Error::Api(s))
                        if s.message.contains("gpu-dra-resourceslices-own-node") =>
                    {
                        Ok(Some(s))
                    }
                    Err(e) => Err(e.into()),
                    Ok(_) => Ok(None),
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(denial.code, 403, "{denial:?}");
    assert!(
        denial
            .message
            .contains("the gpu-dra plugin on node node-a may only write ResourceSlices of that node, not of node node-b"),
        "{}",
        denial.message
    );
    on_node_a
        .create(&create, &slice("node-a"))
        .await
        .expect("the plugin may write its own node's slice (RBAC + policy)");

    // A token without a node name (not from a pod) is refused outright.
    let unbound: Api<ResourceSlice> = Api::all(plugin_client(b.kubeconfig(), None).await);
    match unbound.create(&create, &slice("node-a")).await {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("carries no node name"), "{}", s.message)
        }
        other => panic!("expected a denial, got {other:?}"),
    }

    // Everyone else (here: the admin) is not matched by the policy.
    let admin: Api<ResourceSlice> = Api::all(client.clone());
    admin
        .create(&create, &slice("node-b"))
        .await
        .expect("admin writes any slice");
}
