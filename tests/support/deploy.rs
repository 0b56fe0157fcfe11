//! The plugin's own identity and command line in the box, read from `deploy/*.yaml` at run
//! time (so they follow the manifests, and later the chart's rendered files).
//!
//! Owns: applying the namespace, ServiceAccount, RBAC and node-isolation policy of the
//! manifests to a box; a stand-in for the DaemonSet's pod on a node (the pod template with
//! `nodeName` set, so a token bound to it carries the node name as a kubelet-issued one
//! does); a TokenRequest for the ServiceAccount bound to that pod and a kubeconfig with
//! that token; and the DaemonSet container's args and env with its host paths mapped to
//! the box's directories.
//! Must not: grant the plugin anything beyond the manifests (no admin credentials reach
//! the plugin process).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use serde::Deserialize;
use serde_json::{Value, json};

use super::cluster::TestBox;

/// Field manager of the objects applied here.
const FIELD_MANAGER: &str = "gpu-dra-test-identity";
/// Lifetime asked for the plugin's token (longer than any test).
const TOKEN_SECONDS: i64 = 24 * 3600;

/// All YAML documents of `deploy/<file>` as JSON, empty documents skipped.
pub fn documents(file: &str) -> anyhow::Result<Vec<Value>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).with_context(|| format!("parsing {file}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn the_kind(file: &str, kind: &str) -> anyhow::Result<Value> {
    documents(file)?
        .into_iter()
        .find(|d| d["kind"] == kind)
        .ok_or_else(|| anyhow!("deploy/{file} has no {kind}"))
}

/// Server-side applies one manifest object (strict field validation).
pub async fn apply(client: &kube::Client, doc: &Value) -> anyhow::Result<()> {
    let api_version = doc["apiVersion"].as_str().context("apiVersion")?;
    let kind = doc["kind"].as_str().context("kind")?;
    let name = doc["metadata"]["name"].as_str().context("metadata.name")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (resource, caps) =
        pinned_kind(client, &GroupVersionKind::gvk(group, version, kind)).await?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = doc["metadata"]["namespace"].as_str().context("namespace")?;
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    api.patch(name, &params, &Patch::Apply(doc))
        .await
        .with_context(|| format!("applying {kind} {name}"))?;
    Ok(())
}

/// The DaemonSet's ServiceAccount `(namespace, name)`.
fn service_account() -> anyhow::Result<(String, String)> {
    let ds = the_kind("daemonset.yaml", "DaemonSet")?;
    let ns = ds["metadata"]["namespace"]
        .as_str()
        .context("DaemonSet namespace")?;
    let sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .context("DaemonSet serviceAccountName")?;
    Ok((ns.to_owned(), sa.to_owned()))
}

/// Applies namespace, ServiceAccount, RBAC and node-isolation policy from deploy/, creates
/// (or finds) the plugin pod stand-in on `node`, requests a token bound to it and writes a
/// kubeconfig with that token into the box's state dir. Returns the kubeconfig and the
/// pod's UID (what the downward API gives the container) once the token can read its Node
/// (RBAC in effect).
pub async fn plugin_kubeconfig(b: &TestBox, node: &str) -> anyhow::Result<(PathBuf, String)> {
    let admin = b.client().await;
    for file in ["namespace.yaml", "rbac.yaml", "node-isolation.yaml"] {
        for doc in documents(file)? {
            apply(&admin, &doc)
                .await
                .with_context(|| format!("deploy/{file}"))?;
        }
    }
    let (ns, sa) = service_account()?;
    let pod = plugin_pod(&admin, &ns, node).await?;
    let pod_uid = pod
        .metadata
        .uid
        .clone()
        .context("plugin pod without a UID")?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(TOKEN_SECONDS),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for ServiceAccount {ns}/{sa}"))?
        .status
        .context("TokenRequest answered without a token")?
        .token;

    let kc = Kubeconfig::read_from(b.kubeconfig())?;
    let cluster = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("admin kubeconfig without a cluster")?;
    let file = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "box", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "plugin", "context": {"cluster": "box", "user": sa}}],
        "current-context": "plugin",
    });
    let path = b.state_dir().join(format!("plugin-{node}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&file)?)?;

    let client = client_from(&path).await?;
    let nodes: Api<Node> = Api::all(client);
    b.wait(
        Duration::from_secs(30),
        "the plugin's token may read its Node",
        || async { Ok(nodes.get(node).await.map(|_| Some(()))?) },
    )
    .await?;
    Ok((path, pod_uid))
}

/// A client from `kubeconfig`.
pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The DaemonSet's pod on `node` as the DaemonSet controller would create it (template,
/// `nodeName` set); an existing one is reused.
async fn plugin_pod(admin: &kube::Client, ns: &str, node: &str) -> anyhow::Result<Pod> {
    let ds = the_kind("daemonset.yaml", "DaemonSet")?;
    let name = format!(
        "{}-{node}",
        ds["metadata"]["name"].as_str().context("DaemonSet name")?
    );
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    if let Some(pod) = pods.get_opt(&name).await? {
        return Ok(pod);
    }
    let template = &ds["spec"]["template"];
    let mut spec = template["spec"].clone();
    spec["nodeName"] = json!(node);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"]},
        "spec": spec,
    }))?;
    match pods.create(&PostParams::default(), &pod).await {
        Ok(pod) => Ok(pod),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(pods.get(&name).await?),
        Err(e) => Err(e).with_context(|| format!("creating the plugin pod {ns}/{name}")),
    }
}

/// Box directories standing in for the host paths the DaemonSet mounts.
pub struct HostPaths {
    /// For `/var/lib/kubelet` (and below).
    pub kubelet_root: PathBuf,
    /// For `/var/run/cdi`.
    pub cdi_root: PathBuf,
    /// For the driver root's host path (`/` or `/run/nvidia/driver`).
    pub driver_root: PathBuf,
    /// The plugin pod's UID, for `metadata.uid` fields.
    pub pod_uid: String,
}

impl HostPaths {
    fn map(&self, host: &str) -> anyhow::Result<PathBuf> {
        let host = Path::new(host);
        if let Ok(rest) = host.strip_prefix("/var/lib/kubelet") {
            return Ok(self.kubelet_root.join(rest));
        }
        if let Ok(rest) = host.strip_prefix("/var/run/cdi") {
            return Ok(self.cdi_root.join(rest));
        }
        if let Ok(rest) = host.strip_prefix("/sys/fs/cgroup") {
            // The node agent's fake cgroup tree, beside the kubelet root.
            let node_dir = self.kubelet_root.parent().unwrap_or(&self.kubelet_root);
            return Ok(below(&node_dir.join("cgroup"), rest));
        }
        if host == Path::new("/") || host == Path::new("/run/nvidia/driver") {
            return Ok(self.driver_root.clone());
        }
        // The host's systemd (mps.launcher systemd-scope): sockets no arg names; the box's
        // plugin, a host process, launches MPS daemons with `session` (tests/support/driver.rs).
        if host == Path::new("/run/systemd") || host == Path::new("/run/dbus/system_bus_socket") {
            return Ok(host.to_path_buf());
        }
        bail!(
            "the box has no directory for the DaemonSet's host path {}: add it to tests/support/deploy.rs",
            host.display()
        )
    }
}

/// `dir` joined with `rest`, `dir` itself (no trailing slash) when `rest` is empty.
fn below(dir: &Path, rest: &Path) -> PathBuf {
    if rest.as_os_str().is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(rest)
    }
}

/// The plugin container's command line: args (the first is the subcommand) and env.
pub struct ContainerCommand {
    /// `args` of the container.
    pub args: Vec<String>,
    /// `env` of the container, values resolved.
    pub env: Vec<(String, String)>,
}

/// The plugin container's command line from deploy/daemonset.yaml, with
/// container paths below a hostPath mount rewritten to the box directory of that host
/// path, `spec.nodeName` fields set to `node` and `metadata.uid` fields to the pod's UID.
pub fn container_command(node: &str, paths: &HostPaths) -> anyhow::Result<ContainerCommand> {
    let ds = the_kind("daemonset.yaml", "DaemonSet")?;
    let spec = &ds["spec"]["template"]["spec"];
    let container = spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "plugin"))
        .context("DaemonSet has no container named plugin")?;
    let mut host_of_volume = BTreeMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if let (Some(name), Some(path)) = (v["name"].as_str(), v["hostPath"]["path"].as_str()) {
            host_of_volume.insert(name.to_owned(), path.to_owned());
        }
    }
    // (container mount path, box directory), longest mount path first.
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let mount = m["mountPath"].as_str().context("mountPath")?;
        let volume = m["name"].as_str().context("volumeMount name")?;
        if let Some(host) = host_of_volume.get(volume) {
            mounts.push((PathBuf::from(mount), paths.map(host)?));
        }
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.as_os_str().len()));
    let map_value = |value: &str| -> String {
        let (prefix, path) = match value.split_once('=') {
            Some((flag, path)) if flag.starts_with("--") => (format!("{flag}="), path),
            _ => (String::new(), value),
        };
        for (mount, dir) in &mounts {
            if let Ok(rest) = Path::new(path).strip_prefix(mount) {
                return format!("{prefix}{}", below(dir, rest).display());
            }
        }
        // The kubelet root is the same path inside and outside the container (the
        // kubelet dials the sockets at the paths the plugin registers), so it maps even
        // where only its subdirectories are mounts.
        if let Ok(rest) = Path::new(path).strip_prefix("/var/lib/kubelet") {
            return format!("{prefix}{}", below(&paths.kubelet_root, rest).display());
        }
        value.to_owned()
    };
    let args = container["args"]
        .as_array()
        .context("plugin container args")?
        .iter()
        .map(|a| a.as_str().map(map_value).context("non-string arg"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut env = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?.to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            map_value(v)
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            node.to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid" {
            paths.pod_uid.clone()
        } else {
            bail!("env {name} of the plugin container has a source the box cannot provide");
        };
        env.push((name, value));
    }
    Ok(ContainerCommand { args, env })
}
