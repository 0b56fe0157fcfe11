//! Health to scheduling on the tests/cluster box: XID 79 on a MIG GPU puts the device
//! taint `<driver>/xid=79` on each of its MIG devices in the published ResourceSlice; the
//! taint survives a SIGKILL and restart of the plugin; `gpu-dra clear-unhealthy` removes it.

mod support;

use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, ListParams};
use support::driver::{DRIVER, FakeGpus, Plugin, target_dir};

const NODE: &str = "node-a";
const STEP: Duration = Duration::from_secs(90);

/// Device name -> XID taint value, for the devices of GPU `minor` in this node's slices.
async fn xid_taints(
    api: &Api<ResourceSlice>,
    minor: u32,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let list = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
        .await?;
    let prefix = format!("gpu-{minor}-mig-");
    let mut out = Vec::new();
    for slice in list.items {
        for d in slice.spec.devices.unwrap_or_default() {
            if d.name.starts_with(&prefix) {
                let xid = d
                    .taints
                    .unwrap_or_default()
                    .into_iter()
                    .find(|t| t.key == format!("{DRIVER}/xid"))
                    .and_then(|t| t.value);
                out.push((d.name, xid));
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_taints_the_gpu_until_cleared() {
    let b = support::shared();
    let gpus = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let topology = nvidia_ml::control::load_topology(&gpus.topology()).unwrap();
    let gpu = topology.gpus[0].clone();
    let mut plugin = Plugin::start(b, NODE, &gpus).unwrap();
    let api: Api<ResourceSlice> = Api::all(b.client().await);
    let fail = |plugin: &Plugin, e: anyhow::Error| -> ! {
        panic!("{e:#}\n--- plugin log ---\n{}", plugin.log_tail(60))
    };

    let published = support::wait_for(STEP, "untainted MIG devices of the GPU", || {
        let api = api.clone();
        async move {
            let t = xid_taints(&api, gpu.minor).await?;
            Ok((!t.is_empty() && t.iter().all(|(_, x)| x.is_none())).then_some(t))
        }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e))
    .len();

    // The XID watch is registered once the plugin serves; retry the injection until seen.
    let minor = gpu.minor;
    let all_tainted = move |api: Api<ResourceSlice>| async move {
        let t = xid_taints(&api, minor).await?;
        Ok::<_, anyhow::Error>(
            (t.len() == published && t.iter().all(|(_, x)| x.as_deref() == Some("79")))
                .then_some(()),
        )
    };
    support::wait_for(STEP, "XID taint on every MIG device of the GPU", || {
        let api = api.clone();
        let state = gpus.state_path();
        let uuid = gpu.uuid.clone();
        async move {
            if all_tainted(api).await?.is_some() {
                return Ok(Some(()));
            }
            nvidia_ml::control::inject_xid(&state, &uuid, 79)?;
            Ok(None)
        }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e));

    // SIGKILL and restart: the verdict comes back from the plugin dir.
    plugin.kill();
    let verdicts = b
        .kubelet_root(NODE)
        .join(format!("plugins/{DRIVER}/health.json"));
    let saved = std::fs::read_to_string(&verdicts).unwrap();
    assert!(saved.contains(&gpu.uuid), "{saved}");
    plugin.restart(&gpus).unwrap();
    support::wait_for(STEP, "restarted plugin logs the restored verdict", || {
        let restored = plugin.log_tail(400).contains("verdict restored");
        async move { Ok(restored.then_some(())) }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e));
    assert!(all_tainted(api.clone()).await.unwrap().is_some());

    // The admin clears it.
    let out = std::process::Command::new(target_dir().join("gpu-dra"))
        .args([
            "clear-unhealthy",
            "--gpu",
            &gpu.uuid,
            "--driver-name",
            DRIVER,
            "--kubelet-root",
        ])
        .arg(b.kubelet_root(NODE))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::wait_for(STEP, "XID taints gone", || {
        let api = api.clone();
        async move {
            let t = xid_taints(&api, gpu.minor).await?;
            Ok((t.len() == published && t.iter().all(|(_, x)| x.is_none())).then_some(()))
        }
    })
    .await
    .unwrap_or_else(|e| fail(&plugin, e));
    plugin.check_alive().unwrap();
}
