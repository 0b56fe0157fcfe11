//! Wiring of each subcommand: builds the components from parsed flags and runs them.
//!
//! Owns process-level concerns only: the Kubernetes client from flags, signal
//! handling (SIGTERM/SIGINT -> graceful stop, sockets removed), and which component
//! runs for which subcommand. Logic lives in the modules it wires; errors are
//! `anyhow` here and nowhere below.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::watch;

use crate::checkpoint::{CheckpointStore, CheckpointWriter, DEFAULT_BOOT_ID_PATH, LoadOutcome};
use crate::claims::ClaimSource;
use crate::cli::{ClearUnhealthyArgs, InventoryArgs, PluginArgs, WebhookArgs};
use crate::health::{
    HealthSnapshot, HealthState, VerdictStore, VerdictsLoaded, persist_verdicts,
    start_nvml_watcher, unix_now,
};
use crate::inventory::{
    Discover, NvmlDiscovery, refresh_inventory, render_inventory, render_slices,
};
use crate::plugin::{NodeDriver, PluginServer, PluginServerConfig, SHUTDOWN_GRACE};
use crate::prepare::{Preparer, PreparerConfig};
use crate::sharing::{
    MpsSettings, MpsSupervisor, NvidiaSmiTimeSlice, NvmlComputeControl, SharingManager,
};
use crate::slices::desired::{SliceFeatures, desired_slices};
use crate::slices::reconcile::{PublishStatus, Reconciler};

/// Where sysfs is mounted (PCIe root lookup for the `pcieRoot` attribute).
const SYSFS_ROOT: &str = "/sys";
/// How often the inventory is re-read (MIG instances created outside the driver).
const INVENTORY_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// Time limit of one nvidia-smi or MPS control command.
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Kubernetes client from `--kubeconfig`, else in-cluster / `$KUBECONFIG` / `~/.kube/config`.
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and none could be inferred")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}

/// The plugin server's configuration derived from the command line.
pub fn plugin_server_config(args: &PluginArgs) -> PluginServerConfig {
    PluginServerConfig {
        driver_name: args.driver_name.clone(),
        registration_socket: args.registration_socket(),
        dra_socket: args.dra_socket(),
        shutdown_grace: SHUTDOWN_GRACE,
    }
}

/// Runs the node plugin with `driver` (and the health service over `health`, if given)
/// until SIGTERM/SIGINT; sockets are removed on exit.
pub async fn serve_plugin<D: NodeDriver>(
    args: &PluginArgs,
    driver: Arc<D>,
    health: Option<watch::Receiver<HealthSnapshot>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut server = PluginServer::bind(plugin_server_config(args), driver)
        .context("starting the kubelet plugin sockets")?;
    if let Some(health) = health {
        server = server.with_health(health);
    }
    server
        .serve(shutdown)
        .await
        .context("serving the kubelet plugin")
}

/// `gpu-dra kubelet-plugin`: discovers GPUs, publishes ResourceSlices, recovers prepared
/// claims from the checkpoint, then serves the kubelet until SIGTERM/SIGINT.
pub async fn kubelet_plugin(args: PluginArgs) -> anyhow::Result<()> {
    info!(
        driver = %args.driver_name,
        node = %args.node_name,
        kubelet_root = %args.kubelet_root.display(),
        "starting kubelet plugin"
    );
    let shutdown = shutdown_on_signal()?;
    let discovery: Arc<dyn Discover> = Arc::new(
        NvmlDiscovery::new(args.nvml_lib_path.as_deref(), SYSFS_ROOT)
            .context("initialising NVML for discovery")?,
    );
    let inventory = discovery.discover().context("discovering GPUs")?;
    info!(gpus = inventory.gpus.len(), driver_version = %inventory.driver_version, "discovered GPUs");
    let client = kube_client(args.kubeconfig.as_deref()).await?;

    let plugin_dir = args.plugin_data_dir();
    std::fs::create_dir_all(&plugin_dir)
        .with_context(|| format!("creating plugin directory {}", plugin_dir.display()))?;
    let store = CheckpointStore::new(&plugin_dir, Path::new(DEFAULT_BOOT_ID_PATH));
    let verdicts = VerdictStore::new(
        &plugin_dir,
        store.current_boot_id().context("reading the boot id")?,
    );
    let health = Arc::new(HealthState::restore(
        args.node_name.clone(),
        inventory.clone(),
        unix_now(),
        load_verdicts(&verdicts)?,
    ));
    tokio::spawn(persist_verdicts(
        verdicts,
        health.subscribe_unhealthy(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::health::clear::serve_clear_requests(
        plugin_dir.clone(),
        Arc::clone(&health),
        shutdown.clone(),
    ));
    let (inventory_tx, inventory_rx) = watch::channel(inventory);
    let inventory_rx_for_health = inventory_rx.clone();
    let loaded = store.load().context("reading the checkpoint")?;
    report_checkpoint_outcome(&client, &args, &loaded.outcome).await;
    let (checkpoint, _writer_task) = CheckpointWriter::spawn(store, loaded.checkpoint);

    let sharing = SharingManager::new(
        Arc::new(
            NvmlComputeControl::new(args.nvml_lib_path.as_deref())
                .context("initialising NVML for compute mode control")?,
        ),
        Arc::new(NvidiaSmiTimeSlice::new(&args.nvidia_smi_path, TOOL_TIMEOUT)),
        MpsSupervisor::new(MpsSettings {
            control_path: args.mps_control_path.clone(),
            root_dir: plugin_dir.join("mps"),
            ready_timeout: TOOL_TIMEOUT,
            command_timeout: TOOL_TIMEOUT,
            private_shm: None,
        }),
    );
    let (claims, claim_watch) = ClaimSource::new(client.clone());
    tokio::spawn(claim_watch.run());
    let preparer = Preparer::new(
        PreparerConfig {
            driver_name: args.driver_name.clone(),
            node_name: args.node_name.clone(),
            cdi_root: args.cdi_root.clone(),
            proc_root: args.proc_root.clone(),
        },
        claims,
        inventory_rx.clone(),
        sharing,
        checkpoint,
    );
    preparer.recover().await;

    let reconciler = Reconciler::for_node(
        client.clone(),
        &args.driver_name,
        &args.node_name,
        SliceFeatures::default(),
    )
    .await
    .context("looking up this node for the ResourceSlices' owner")?
    .with_health(health.subscribe_unhealthy(), args.unhealthy_taint_effect);
    let (status_tx, _status_rx) = watch::channel(PublishStatus::default());
    let slices_stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(err) = reconciler
            .run(inventory_rx, status_tx, slices_stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %err, "ResourceSlice publishing stopped");
        }
    });
    let refresh_stop = shutdown.clone();
    tokio::spawn(refresh_inventory(
        discovery,
        INVENTORY_REFRESH,
        inventory_tx,
        refresh_stop.cancelled_owned(),
    ));

    let health_rx = health.subscribe();
    let health_watch = start_nvml_watcher(
        args.nvml_lib_path.as_deref(),
        Arc::clone(&health),
        shutdown.clone(),
    )
    .await;
    tokio::spawn(follow_inventory(
        inventory_rx_for_health,
        health,
        shutdown.clone(),
    ));

    let served = serve_plugin(&args, Arc::new(preparer), Some(health_rx), shutdown.clone()).await;
    // The server returns on shutdown or failure; either way the health watch stops.
    shutdown.cancel();
    if let Err(err) = health_watch.await {
        tracing::warn!(error = %err, "GPU health watch task failed");
    }
    served
}

/// Restores the unhealthy verdicts of this boot, logging what was found.
fn load_verdicts(store: &VerdictStore) -> anyhow::Result<crate::health::UnhealthyGpus> {
    let loaded = store.load().context("reading GPU health verdicts")?;
    match &loaded {
        VerdictsLoaded::Fresh => {}
        VerdictsLoaded::Restored(gpus) => {
            for (uuid, gpu) in gpus {
                tracing::warn!(gpu = %uuid, xid = gpu.xid, "GPU stays unhealthy (verdict restored); clear it with `gpu-dra clear-unhealthy` once repaired");
            }
        }
        VerdictsLoaded::PreviousBoot { boot_id, gpus } => {
            info!(%boot_id, gpus, "dropping GPU health verdicts of a previous boot (the reboot reset the GPUs)");
        }
        VerdictsLoaded::Corrupt { moved_to, reason } => {
            tracing::warn!(moved_to = %moved_to.display(), %reason, "unusable GPU health verdicts moved aside; every GPU starts healthy");
        }
    }
    Ok(loaded.into_gpus())
}

/// `gpu-dra clear-unhealthy`: asks the running plugin to clear a GPU's unhealthy verdict
/// and waits until it did.
pub async fn clear_unhealthy(args: ClearUnhealthyArgs) -> anyhow::Result<()> {
    let dir = args.plugin_data_dir();
    let request = crate::health::clear::request_clear(&dir, &args.gpu).with_context(|| {
        format!(
            "asking the plugin in {} to clear {}",
            dir.display(),
            args.gpu
        )
    })?;
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs(args.timeout_seconds);
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(200));
    while request.exists() {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the plugin did not pick up {} within {} s (is gpu-dra kubelet-plugin running with --kubelet-root {} --driver-name {}?); the request stays and is applied when it starts",
                request.display(),
                args.timeout_seconds,
                args.kubelet_root.display(),
                args.driver_name
            );
        }
        ticks.tick().await;
    }
    println!(
        "cleared the unhealthy verdict of {}; its device taints are removed with the next ResourceSlice update",
        args.gpu
    );
    Ok(())
}

/// Keeps the health list's devices in step with the inventory until `stop`.
async fn follow_inventory(
    mut inventory: watch::Receiver<crate::inventory::Inventory>,
    health: Arc<HealthState>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = inventory.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let current = inventory.borrow_and_update().clone();
        health.set_inventory(current);
    }
}

/// Logs how the checkpoint was loaded; a quarantined or previous-boot checkpoint is also
/// reported as a Warning Event on this node, so `kubectl describe node` shows it.
async fn report_checkpoint_outcome(
    client: &kube::Client,
    args: &PluginArgs,
    outcome: &LoadOutcome,
) {
    let (reason, note) = match outcome {
        LoadOutcome::Fresh | LoadOutcome::Loaded => return,
        LoadOutcome::PreviousBoot {
            previous_boot_id,
            stale_claims,
        } => (
            "CheckpointFromPreviousBoot",
            format!(
                "checkpoint of boot {previous_boot_id} dropped: {} prepared claim(s) did not survive the reboot and will be prepared again",
                stale_claims.len()
            ),
        ),
        LoadOutcome::Quarantined { path, reason } => (
            "CheckpointQuarantined",
            format!(
                "unusable checkpoint moved to {} ({reason}); the plugin starts empty and orphaned CDI specs are removed",
                path.display()
            ),
        ),
    };
    tracing::warn!(reason, note = %note, "checkpoint");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: args.driver_name.clone(),
            instance: Some(args.node_name.clone()),
        },
    );
    let node = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(args.node_name.clone()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "LoadCheckpoint".into(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, &node).await {
        tracing::warn!(error = %err, "posting the checkpoint Event on the node failed");
    }
}

/// `gpu-dra inventory`: prints the discovered GPUs, or with `--slices` the ResourceSlices
/// the plugin would publish on that node (YAML).
pub async fn inventory(args: InventoryArgs) -> anyhow::Result<()> {
    let discovery = NvmlDiscovery::new(args.nvml_lib_path.as_deref(), SYSFS_ROOT)
        .context("initialising NVML")?;
    let inventory = discovery.discover().context("discovering GPUs")?;
    if args.slices {
        let node = args.node_name.as_deref().unwrap_or_default();
        let slices = desired_slices(
            &inventory,
            &args.driver_name,
            node,
            "",
            1,
            &SliceFeatures::default(),
        );
        print!(
            "{}",
            render_slices(&slices).context("rendering ResourceSlices")?
        );
    } else {
        print!("{}", render_inventory(&inventory));
    }
    Ok(())
}

/// `gpu-dra webhook`: serves the validating admission webhook until SIGTERM/SIGINT.
pub async fn webhook(args: WebhookArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal()?;
    let settings = crate::webhook::WebhookSettings {
        bind_address: args.bind_address,
        tls_cert_file: args.tls_cert_file,
        tls_key_file: args.tls_key_file,
        driver_name: args.driver_name,
    };
    crate::webhook::serve(&settings, shutdown)
        .await
        .context("admission webhook")?;
    info!("admission webhook stopped");
    Ok(())
}
