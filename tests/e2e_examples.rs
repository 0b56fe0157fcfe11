//! The seed scenarios of examples/ on the box (issue 5, item 7): a dgx-h100 node (two GPUs
//! in MIG mode with static instances) and an L40S node, one plugin each. Applies
//! deploy/deviceclasses.yaml and every example, then checks what each pod got and the
//! compute policy the fake GPUs read back. `make demo` runs the same scenarios.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::TestBox;
use support::driver::{FakeGpus, Plugin};
use support::examples::{render, run_examples};

const STEP: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenarios_with_resource_claims() {
    let b = TestBox::start(&["node-a", "node-b"]).unwrap();
    let dgx = FakeGpus::new("dgx-h100-static-mig").unwrap();
    let l40s = FakeGpus::new("l40s-single").unwrap();
    let plugin_a = Plugin::start(&b, "node-a", &dgx).unwrap();
    let mut plugin_b = Plugin::start(&b, "node-b", &l40s).unwrap();
    let gpus = BTreeMap::from([("node-a".to_string(), &dgx), ("node-b".to_string(), &l40s)]);
    let reports = run_examples(&b, STEP).await.unwrap_or_else(|err| {
        panic!(
            "{err:#}\n--- plugin node-a ---\n{}\n--- plugin node-b ---\n{}\n--- box ---\n{}",
            plugin_a.log_tail(40),
            plugin_b.log_tail(40),
            b.log_tail(20)
        )
    });
    eprintln!("{}", render(&reports, &gpus));
    let by_ns = |ns: &str| {
        reports
            .iter()
            .filter(|r| r.pod.starts_with(&format!("{ns}/")))
            .collect::<Vec<_>>()
    };
    let dgx_state = dgx.state();
    let l40s_state = l40s.state();

    // Ollama: three replicas on one GPU, time slice Long.
    let ollama: BTreeSet<String> = by_ns("ollama")
        .iter()
        .filter_map(|r| r.env("NVIDIA_VISIBLE_DEVICES"))
        .collect();
    assert_eq!(ollama.len(), 1, "ollama replicas share one GPU: {ollama:?}");
    let ollama_gpu = ollama.first().unwrap();
    assert_eq!(
        dgx_state.gpus[ollama_gpu].timeslice, 3,
        "ollama GPU time slice Long"
    );

    // Profiles: class-level config; dev gets time slice Short, training an exclusive GPU.
    let profile = |pod: &str| {
        reports
            .iter()
            .find(|r| r.pod == format!("profiles/{pod}"))
            .and_then(|r| r.env("NVIDIA_VISIBLE_DEVICES"))
            .unwrap()
    };
    let notebook = profile("notebook");
    assert_ne!(&notebook, ollama_gpu);
    assert_eq!(
        dgx_state.gpus[&notebook].timeslice, 1,
        "dev profile time slice Short"
    );
    let trainer = profile("trainer");
    assert_eq!(
        format!("{:?}", dgx_state.gpus[&trainer].compute_mode),
        "ExclusiveProcess",
        "training profile: exclusive GPU"
    );

    // MIG profile selected by CEL.
    let mig = by_ns("mig-demo")[0];
    assert!(
        mig.env("NVIDIA_VISIBLE_DEVICES")
            .unwrap()
            .starts_with("MIG-")
    );

    // TGI: both servers on the L40S, MPS with the claim's limits.
    let tgi_reports = by_ns("tgi");
    assert!(tgi_reports.iter().all(|r| r.node == "node-b"));
    let tgi_gpu: BTreeSet<String> = tgi_reports
        .iter()
        .filter_map(|r| r.env("NVIDIA_VISIBLE_DEVICES"))
        .collect();
    assert_eq!(tgi_gpu.len(), 1);
    let l40s_uuid = tgi_gpu.first().unwrap();
    assert_eq!(
        format!("{:?}", l40s_state.gpus[l40s_uuid].compute_mode),
        "ExclusiveProcess",
        "MPS needs EXCLUSIVE_PROCESS"
    );
    let pipe = tgi_reports[0]
        .env("CUDA_MPS_PIPE_DIRECTORY")
        .expect("MPS pipe dir injected");
    assert_eq!(
        tgi_reports[1].env("CUDA_MPS_PIPE_DIRECTORY").as_deref(),
        Some(pipe.as_str())
    );
    let daemon = l40s_state
        .mps_daemons
        .values()
        .find(|d| d.running)
        .expect("an MPS control daemon runs for the claim");
    assert_eq!(daemon.default_active_thread_percentage, Some(50.0));
    let limits: Vec<&String> = daemon.default_device_pinned_mem_limits.values().collect();
    assert_eq!(
        limits,
        vec!["18432M"],
        "18Gi pinned memory limit per client"
    );

    let daemon_pid = daemon.pid;

    // A plugin restart re-adopts the claim's MPS daemon from the checkpoint.
    plugin_b.kill();
    plugin_b.restart(&l40s).unwrap();
    b.wait(STEP, "plugin on node-b serving again", || async {
        plugin_b.check_alive()?;
        Ok(plugin_b
            .log_tail(200)
            .contains("recovered prepared claims from the checkpoint kept=1")
            .then_some(()))
    })
    .await
    .unwrap();
    let state = l40s.state();
    let running: Vec<u32> = state
        .mps_daemons
        .values()
        .filter(|d| d.running)
        .map(|d| d.pid)
        .collect();
    assert_eq!(
        running,
        vec![daemon_pid],
        "the same daemon keeps serving the claim"
    );

    // Deleting both TGI pods unprepares the claim: daemon stopped, compute mode restored.
    let client = b.client().await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "tgi");
    for pod in ["tgi-llama", "tgi-mistral"] {
        pods.delete(pod, &Default::default()).await.unwrap();
    }
    b.wait(
        STEP,
        "MPS daemon stopped and compute mode Default",
        || async {
            let state = l40s.state();
            let stopped = state.mps_daemons.values().all(|d| !d.running);
            let default = format!("{:?}", state.gpus[l40s_uuid].compute_mode) == "Default";
            Ok((stopped && default).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err:#}\n--- plugin node-b ---\n{}", plugin_b.log_tail(40)));
}

/// examples/mig-dynamic.yaml (seed 004's MIG claims by profile) on a dynamic MIG node:
/// both pods get a MIG device of their profile, created at prepare on the one MIG-mode GPU,
/// and the GPU is empty again once they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mig_claims_by_profile_on_a_dynamic_mig_node() {
    use support::dynamic_mig::{
        DynamicMigNode, NAMESPACE, NODE, instances, render_dynamic_mig, run_dynamic_mig_example,
    };
    let b = TestBox::start(&[NODE]).unwrap();
    let node = DynamicMigNode::start(&b).unwrap();
    let reports = run_dynamic_mig_example(&b, STEP)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "{err:#}\n--- plugin ---\n{}\n--- box ---\n{}",
                node.plugin.log_tail(40),
                b.log_tail(20)
            )
        });
    eprintln!("{}", render_dynamic_mig(&reports, &node));
    let made = instances(&node.gpus);
    // (GI profile id, placement size) of each instance: 1g.10gb is 19 / 1 slice, 3g.40gb 9 / 4.
    let mut shapes: Vec<(u32, u32)> = made.iter().map(|i| (i.2, i.4)).collect();
    shapes.sort();
    assert_eq!(shapes, [(9, 4), (19, 1)], "{made:?}");
    assert_eq!(
        made[0].0, made[1].0,
        "both on the one MIG-mode GPU: {made:?}"
    );
    for (pod, profile) in [("small-model", 19), ("large-model", 9)] {
        let report = reports
            .iter()
            .find(|r| r.pod == format!("{NAMESPACE}/{pod}"))
            .unwrap_or_else(|| panic!("{pod} missing from {reports:?}"));
        let mig = report.env("NVIDIA_VISIBLE_DEVICES").unwrap_or_default();
        let behind = made.iter().find(|i| i.5.contains(&mig));
        assert_eq!(
            behind.map(|i| i.2),
            Some(profile),
            "{pod} sees {mig:?}, instances {made:?}"
        );
    }

    let client = b.client().await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, NAMESPACE);
    for pod in ["small-model", "large-model"] {
        pods.delete(pod, &Default::default()).await.unwrap();
    }
    b.wait(STEP, "the GPU without instances", || async {
        Ok(instances(&node.gpus).is_empty().then_some(()))
    })
    .await
    .unwrap_or_else(|err| panic!("{err:#}\n--- plugin ---\n{}", node.plugin.log_tail(40)));
}
