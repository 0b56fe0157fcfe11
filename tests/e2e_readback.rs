//! Read-back of GPU settings on the box: a setting that the fake GPU reports as taken but
//! does not hold (the fake NVML's `NO_EFFECT` fault: `nvmlDeviceSetComputeMode`,
//! `nvidia-smi compute-policy --set-timeslice` and an MPS limit all succeed without effect)
//! fails the claim with an event naming the GPU, the setting and both values, leaves
//! nothing of the claim on the node, and the node agent's retry succeeds once it takes.
//! Then stale settings left on a free GPU are reset for a claim with no sharing config.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceClaimTemplate, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nvidia_ml::control::{self, ComputeMode, Fault, NO_EFFECT, Times};
use serde_json::{Value, json};

use support::TestBox;
use support::chaos::{KINDS, Kind};
use support::driver::{DRIVER, FakeGpus, Plugin, target_dir};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(120);
/// A fault that fires on every matching call until cleared, counting down.
const STANDING: u32 = 1_000_000;

struct Node {
    b: &'static TestBox,
    client: kube::Client,
    gpus: FakeGpus,
    plugin: Plugin,
    ns: String,
}

impl Node {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn setup(&self) -> anyhow::Result<()> {
        support::examples::apply_file(
            &self.client,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/deviceclasses.yaml"),
        )
        .await?;
        let templates: Api<ResourceClaimTemplate> = Api::namespaced(self.client.clone(), &self.ns);
        for kind in KINDS {
            let t = serde_json::from_value(json!({"metadata": {"name": kind.template()},
                "spec": {"spec": {"devices": kind.devices()}}}))?;
            templates.create(&PostParams::default(), &t).await?;
        }
        let slices: Api<ResourceSlice> = Api::all(self.client.clone());
        let lp =
            ListParams::default().fields(&format!("spec.nodeName={NODE},spec.driver={DRIVER}"));
        self.b
            .wait(STEP, "devices published", || async {
                self.plugin.check_alive()?;
                let n: usize = slices
                    .list(&lp)
                    .await?
                    .items
                    .iter()
                    .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
                    .sum();
                Ok((n == 12).then_some(()))
            })
            .await
    }

    async fn create(&self, name: &str, kind: Kind) -> anyhow::Result<()> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": kind.template()}],
                "containers": [{"name": "ctr", "image": "registry.example/cuda:none",
                                "resources": {"claims": [{"name": "gpu"}]}}]
            }
        }))?;
        self.pods().create(&PostParams::default(), &pod).await?;
        Ok(())
    }

    async fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.pods().delete(name, &DeleteParams::default()).await?;
        self.b
            .wait(STEP, &format!("pod {name} gone"), || async {
                Ok(self.pods().get_opt(name).await?.is_none().then_some(()))
            })
            .await
    }

    async fn claim_uid(&self, pod: &str) -> anyhow::Result<String> {
        let claims: Api<ResourceClaim> = Api::namespaced(self.client.clone(), &self.ns);
        self.b
            .wait(STEP, &format!("claim of {pod}"), || async {
                let name = self
                    .pods()
                    .get(pod)
                    .await?
                    .status
                    .and_then(|s| s.resource_claim_statuses)
                    .and_then(|s| s.into_iter().next())
                    .and_then(|s| s.resource_claim_name);
                let Some(name) = name else { return Ok(None) };
                Ok(claims.get(&name).await?.metadata.uid)
            })
            .await
    }

    async fn running(&self, pod: &str) -> anyhow::Result<()> {
        self.b
            .wait(STEP, &format!("pod {pod} Running"), || async {
                self.plugin.check_alive()?;
                let phase = self.pods().get(pod).await?.status.and_then(|s| s.phase);
                Ok((phase.as_deref() == Some("Running")
                    && self
                        .b
                        .container_result(NODE, &self.ns, pod, "ctr")
                        .is_some())
                .then_some(()))
            })
            .await
    }

    /// The FailedPrepareDynamicResources message for `pod` that contains every one of `words`.
    async fn failure_event(&self, pod: &str, words: &[&str]) -> anyhow::Result<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        self.b
            .wait(
                STEP,
                &format!("prepare failure of {pod} naming {words:?}"),
                || async {
                    let lp = ListParams::default().fields(&format!("involvedObject.name={pod}"));
                    Ok(events.list(&lp).await?.items.into_iter().find_map(|e| {
                        let m = e.message.unwrap_or_default();
                        (e.reason.as_deref() == Some("FailedPrepareDynamicResources")
                            && words.iter().all(|w| m.contains(w)))
                        .then_some(m)
                    }))
                },
            )
            .await
    }

    fn checkpoint(&self) -> anyhow::Result<Value> {
        let path = self
            .b
            .kubelet_root(NODE)
            .join(format!("plugins/{DRIVER}/checkpoint.json"));
        Ok(match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(e.into()),
        })
    }

    /// The physical GPU of a prepared claim, from the checkpoint.
    fn claim_gpu(&self, uid: &str) -> anyhow::Result<String> {
        let cp = self.checkpoint()?;
        let entry = &cp["claims"][uid];
        anyhow::ensure!(entry["state"] == "PrepareCompleted", "{uid}: {entry}");
        entry["devices"][0]["gpuUuid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("{uid}: no GPU in {entry}"))
    }

    fn inject(&self, function: &str) -> anyhow::Result<()> {
        control::inject_fault(
            &self.gpus.state_path(),
            Fault {
                function: function.into(),
                gpu_uuid: None,
                error: NO_EFFECT,
                times: Times::N(STANDING),
            },
        )?;
        Ok(())
    }

    /// Waits until the standing fault fired at least twice (a failed attempt and the node
    /// agent's retry), then checks the node holds nothing of claim `uid`.
    async fn expect_refused(&self, pod: &str, uid: &str) -> anyhow::Result<()> {
        self.b
            .wait(STEP, "the fault fired twice", || async {
                let fired = self
                    .gpus
                    .state()
                    .faults
                    .iter()
                    .any(|f| matches!(f.times, Times::N(n) if n <= STANDING - 2));
                Ok(fired.then_some(()))
            })
            .await?;
        let phase = self.pods().get(pod).await?.status.and_then(|s| s.phase);
        anyhow::ensure!(phase.as_deref() != Some("Running"), "{pod} runs");
        let spec = self
            .b
            .cdi_dir(NODE)
            .join(format!("gpu-dra.dev-claim_{uid}.json"));
        // Between two attempts nothing of the claim stays: no spec, no completed entry.
        self.b
            .wait(STEP, "nothing of the refused claim on the node", || async {
                let entry = self.checkpoint()?["claims"][uid].clone();
                Ok((entry.is_null() && !spec.exists()).then_some(()))
            })
            .await
    }

    /// Runs the fake nvidia-smi with `args`.
    fn smi(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new(target_dir().join("nvidia-smi"));
        cmd.args(args);
        self.gpus.apply_env(&mut cmd);
        let out = cmd.output()?;
        anyhow::ensure!(out.status.success(), "nvidia-smi {args:?}: {out:?}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_do_not_take_fail_the_claim_and_stale_ones_are_reset() {
    let b = support::shared();
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let node = Node {
        b,
        client: b.client().await,
        gpus,
        plugin,
        ns: b.create_namespace("readback").await,
    };
    if let Err(err) = run(&node).await {
        panic!(
            "{err:#}\n--- plugin log ---\n{}\n--- box logs ---\n{}",
            node.plugin.log_tail(60),
            node.b.log_tail(30)
        );
    }
}

async fn run(node: &Node) -> anyhow::Result<()> {
    node.setup().await?;
    let state = node.gpus.state_path();

    // `--set-timeslice` exits 0 and the GPU keeps its time slice.
    node.inject("nvidia-smi compute-policy")?;
    node.create("ts", Kind::TimeSliced).await?;
    let uid = node.claim_uid("ts").await?;
    node.expect_refused("ts", &uid).await?;
    let msg = node
        .failure_event("ts", &["time slice", "Long", "reads back Default", "GPU-"])
        .await?;
    eprintln!("readback: {msg}");
    control::clear_faults(&state)?;
    node.running("ts").await?;
    let gpu = node.claim_gpu(&uid)?;
    anyhow::ensure!(node.gpus.state().gpus[&gpu].timeslice == 3);

    // nvmlDeviceSetComputeMode returns success and the mode stays DEFAULT.
    node.inject("nvmlDeviceSetComputeMode")?;
    node.create("excl", Kind::Exclusive).await?;
    let uid = node.claim_uid("excl").await?;
    node.expect_refused("excl", &uid).await?;
    node.failure_event(
        "excl",
        &["compute mode", "ExclusiveProcess", "Default", "GPU-"],
    )
    .await?;
    control::clear_faults(&state)?;
    node.running("excl").await?;
    let gpu = node.claim_gpu(&uid)?;
    anyhow::ensure!(node.gpus.state().gpus[&gpu].compute_mode == ComputeMode::ExclusiveProcess);

    // The MPS daemon accepts the limit and keeps its default; no daemon is left behind.
    node.inject("nvidia-cuda-mps-control set_default_active_thread_percentage")?;
    node.create("mps", Kind::Mps).await?;
    let uid = node.claim_uid("mps").await?;
    node.expect_refused("mps", &uid).await?;
    node.failure_event("mps", &["default active thread percentage", "100.0", "50"])
        .await?;
    let running = |s: &control::State| {
        s.mps_daemons
            .values()
            .filter(|d| d.running && d.pipe_dir.contains(&uid))
            .count()
    };
    anyhow::ensure!(
        running(&node.gpus.state()) <= 1,
        "one attempt's daemon at most"
    );
    control::clear_faults(&state)?;
    node.running("mps").await?;
    anyhow::ensure!(running(&node.gpus.state()) == 1);

    for pod in ["ts", "excl", "mps"] {
        node.delete(pod).await?;
    }

    // Stale settings on every free full GPU (as a crash or an operator could leave them);
    // a claim with no sharing config gets its GPU back to DEFAULT and time slice 0.
    let s = node.gpus.state();
    let full: Vec<String> = s
        .gpus
        .iter()
        .filter(|(_, g)| !g.mig_current)
        .map(|(u, _)| u.clone())
        .collect();
    for gpu in &full {
        node.smi(&["-i", gpu, "-c", "3"])?;
        node.smi(&["compute-policy", "-i", gpu, "--set-timeslice", "3"])?;
    }
    node.create("plain", Kind::Plain).await?;
    node.running("plain").await?;
    let uid = node.claim_uid("plain").await?;
    let gpu = node.claim_gpu(&uid)?;
    let s = node.gpus.state();
    anyhow::ensure!(
        s.gpus[&gpu].compute_mode == ComputeMode::Default && s.gpus[&gpu].timeslice == 0,
        "{gpu}: {:?}",
        s.gpus[&gpu]
    );
    for other in full.iter().filter(|g| **g != gpu) {
        anyhow::ensure!(
            s.gpus[other].compute_mode == ComputeMode::ExclusiveProcess,
            "{other}: a GPU the claim does not use is left as it is"
        );
    }
    node.delete("plain").await?;
    Ok(())
}
