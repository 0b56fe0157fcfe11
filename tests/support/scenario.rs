//! Scenario plumbing shared by the end-to-end test binaries that run one plugin on one node
//! through ordered steps: the environment, the step runner (which prints the plugin's and
//! the box's logs on a failure), and the small object builders the steps use.
//!
//! Owns: test-only helpers. Must not: hold product logic.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::DeviceClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::TestBox;
use super::driver::{FakeGpus, Plugin};

/// What the steps of one run share: the box, a client, the node's fake GPUs and its plugin.
pub struct Env {
    /// The shared box.
    pub b: &'static TestBox,
    /// An admin client of the box's API server.
    pub client: kube::Client,
    /// The node's fake GPUs.
    pub gpus: FakeGpus,
    /// The node's plugin.
    pub plugin: Plugin,
}

/// One scenario of a run.
pub type Step = fn(&mut Env) -> futures::future::BoxFuture<'_, anyhow::Result<()>>;

/// Runs `steps` in order; the first that fails panics with its error and the last lines
/// of the plugin's and the box's logs.
pub async fn run_steps(env: &mut Env, steps: &[(&str, Step)]) {
    for (name, step) in steps {
        if let Err(err) = step(env).await {
            panic!(
                "step '{name}' failed: {err:#}\n--- plugin log ---\n{}\n--- box logs ---\n{}",
                env.plugin.log_tail(80),
                env.b.log_tail(30)
            );
        }
    }
}

/// Applies deploy/deviceclasses.yaml (server-side apply, field manager `e2e`).
pub async fn apply_device_classes(client: &kube::Client) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/deviceclasses.yaml"
    ))
    .expect("deviceclasses.yaml");
    let classes: Api<DeviceClass> = Api::all(client.clone());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let class: DeviceClass = serde::Deserialize::deserialize(doc).expect("class");
        let name = class.metadata.name.clone().expect("name");
        classes
            .patch(
                &name,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&class),
            )
            .await
            .expect("apply class");
    }
}

/// Creates ResourceClaimTemplate `ns/name` whose claims ask for `devices`.
pub async fn create_template(
    client: &kube::Client,
    ns: &str,
    name: &str,
    devices: Value,
) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::resource::v1::ResourceClaimTemplate> =
        Api::namespaced(client.clone(), ns);
    let t = serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": {"spec": {"devices": devices}}}),
    )?;
    api.create(&PostParams::default(), &t).await?;
    Ok(())
}

/// A one-container pod named `name` whose container uses pod claim `claim` (named `gpu`).
pub fn pod(name: &str, claim: Value) -> Pod {
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

/// The name of the claim generated for `pod`'s first pod claim.
pub async fn claim_of_pod(pods: &Api<Pod>, pod: &str) -> anyhow::Result<String> {
    let p = pods.get(pod).await?;
    p.status
        .and_then(|s| s.resource_claim_statuses)
        .and_then(|s| s.into_iter().next())
        .and_then(|s| s.resource_claim_name)
        .ok_or_else(|| anyhow::anyhow!("pod {pod} has no generated claim"))
}

/// The value of `key` in a container result's `env` list (`KEY=value` strings).
pub fn env_of(result: &Value, key: &str) -> Option<String> {
    result["env"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
}
