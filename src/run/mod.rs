//! Wiring of each subcommand: builds the components from parsed flags and runs them.
//!
//! Owns process-level concerns only: the Kubernetes client from flags, signal
//! handling (SIGTERM/SIGINT -> graceful stop, sockets removed), and which component
//! runs for which subcommand. Logic lives in the modules it wires; errors are
//! `anyhow` here and nowhere below.

mod commands;
mod dynamic_mig;
mod withheld;

pub use commands::{clear_unhealthy, inventory, migrate, status, webhook};

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use kube::runtime::events::EventType;
use tokio::sync::watch;

use crate::checkpoint::{CheckpointStore, CheckpointWriter, DEFAULT_BOOT_ID_PATH, LoadOutcome};
use crate::claims::ClaimSource;
use crate::cli::MpsLauncherKind;
use crate::cli::PluginArgs;
use crate::driver_root::{self, DriverFiles, NotFound, Overrides};
use crate::health::{
    HealthSnapshot, HealthState, VerdictStore, VerdictsLoaded, persist_verdicts,
    start_nvml_watcher, unix_now,
};
use crate::http::HttpServer;
use crate::http::probes::{DriverStatus, probe_channels};
use crate::instance::{HandOverDriver, Holder, TAKE_OVER_TIMEOUT, startup};
use crate::inventory::{Discover, Holdback, NvmlDiscovery, Refresh, refresh_inventory, resolve};
use crate::nvml_liveness::{self, NvmlPing};
use crate::plugin::{
    NodeDriver, PluginServer, PluginServerConfig, RegistrationState, SHUTDOWN_GRACE,
    dra_socket_path, registration_socket_path,
};
use crate::prepare::{Preparer, PreparerConfig};
use crate::sharing::{
    MpsLauncher, MpsSettings, MpsSupervisor, NvidiaSmiTimeSlice, NvmlComputeControl, PrivateShm,
    SharingManager,
};
use crate::slices::desired::SliceFeatures;
use crate::slices::reconcile::Reconciler;

/// Where sysfs is mounted (PCIe root lookup for the `pcieRoot` attribute).
const SYSFS_ROOT: &str = "/sys";
/// How often the inventory is re-read (MIG instances created outside the driver).
const INVENTORY_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// First retry of a GPU discovery could not read as it is (doubles up to the refresh).
const INVENTORY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a stopping instance waits for its last checkpoint write before exiting.
const CHECKPOINT_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);
/// Time limit of one nvidia-smi or MPS control command.
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// How often the driver root is searched again while the NVIDIA driver is missing.
const DRIVER_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

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
/// until SIGTERM/SIGINT; sockets are removed on exit. The kubelet's registration verdict
/// is copied to `registration`, if given.
pub async fn serve_plugin<D: NodeDriver>(
    args: &PluginArgs,
    driver: Arc<D>,
    health: Option<watch::Receiver<HealthSnapshot>>,
    registration: Option<watch::Sender<RegistrationState>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut server = PluginServer::bind(plugin_server_config(args), driver)
        .context("starting the kubelet plugin sockets")?;
    if let Some(health) = health {
        server = server.with_health(health);
    }
    if let Some(tx) = registration {
        let mut state = server.registration_state();
        tokio::spawn(async move {
            loop {
                tx.send_replace(state.borrow_and_update().clone());
                if state.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    server
        .serve(shutdown)
        .await
        .context("serving the kubelet plugin")
}

/// `gpu-dra kubelet-plugin`: claims this node's plugin directory (one instance, or a
/// rolling-update hand-over), waits for the NVIDIA driver, discovers GPUs, publishes
/// ResourceSlices, recovers prepared claims from the checkpoint, then serves the kubelet
/// until SIGTERM/SIGINT.
pub async fn kubelet_plugin(args: PluginArgs) -> anyhow::Result<()> {
    info!(
        driver = %args.driver_name,
        node = %args.node_name,
        kubelet_root = %args.kubelet_root.display(),
        "starting kubelet plugin"
    );
    let shutdown = shutdown_on_signal()?;
    let plugin_dir = args.plugin_data_dir();
    crate::state_files::StateDir::create(&plugin_dir, true)
        .with_context(|| format!("creating plugin directory {}", plugin_dir.display()))?;
    let me = Holder::this_process(
        args.pod_uid.clone(),
        args.dra_socket(),
        args.registration_socket(),
    );
    let fixed_sockets = (
        registration_socket_path(
            &args.kubelet_root.join("plugins_registry"),
            &args.driver_name,
            None,
        ),
        dra_socket_path(&plugin_dir, None),
    );
    let standing = startup::claim(&plugin_dir, &me, fixed_sockets)
        .await
        .context("claiming this node's plugin directory")?;

    let (probes, probe_inputs) = probe_channels();
    let (metrics_tx, metrics_rx) = watch::channel(None);
    let routes =
        crate::http::probes::routes(probe_inputs).merge(crate::metrics::routes(metrics_rx));
    let http = HttpServer::bind(args.http_address, routes)
        .await
        .context("starting the probe HTTP server")?;
    info!(address = %http.local_addr(), "serving /healthz, /readyz and /metrics");
    let http_task = tokio::spawn(http.serve(shutdown.clone()));
    let Some((files, nvml)) = wait_for_driver(&args, &probes.driver, &shutdown).await else {
        return Ok(());
    };
    let nvml_library = files.nvml_library.clone();
    let discovery: Arc<dyn Discover> = nvml.clone();
    // GPUs whose MIG shape could not be read are set apart; what is published of them is
    // decided once the checkpoint says what is in use.
    let Some(survey) = first_survey(&discovery, &shutdown).await else {
        return Ok(());
    };
    info!(gpus = survey.inventory.gpus.len(), unresolved = survey.unresolved.len(), driver_version = %survey.inventory.driver_version, "discovered GPUs");
    // Verdicts are read now (a successor serves health while it forwards); only the
    // lock holder writes them.
    let store = CheckpointStore::new(&plugin_dir, Path::new(DEFAULT_BOOT_ID_PATH));
    let verdicts = VerdictStore::new(
        &plugin_dir,
        store.current_boot_id().context("reading the boot id")?,
    );
    let health = Arc::new(HealthState::restore(
        args.node_name.clone(),
        survey.inventory.clone(),
        unix_now(),
        load_verdicts(&verdicts)?,
    ));
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    // Notices are queued from here on; the poster starts once the checkpoint is loaded.
    let notices = crate::events::install();

    // Read-only: runs while a successor forwards, so its health stream is current.
    tokio::spawn(nvml_liveness::watch_nvml(
        nvml as Arc<dyn NvmlPing>,
        nvml_liveness::CHECK_INTERVAL,
        nvml_liveness::CALL_TIMEOUT,
        probes.nvml,
        shutdown.clone().cancelled_owned(),
    ));
    let health_watch =
        start_nvml_watcher(Some(&nvml_library), Arc::clone(&health), shutdown.clone()).await;

    // Rolling update: serve now by forwarding to the running instance, mutate nothing
    // until it has stopped (see the hand-over argument in `crate::instance`).
    let mut registration = Some(probes.registration);
    let predecessor = standing.predecessor_dra_socket().map(Path::to_path_buf);
    let (driver, take_over) = HandOverDriver::new(predecessor.clone(), TAKE_OVER_TIMEOUT);
    let driver = Arc::new(driver);
    let mut early_server = None;
    if let Some(predecessor) = predecessor {
        info!(predecessor = %predecessor.display(), "another instance serves this node: registering now, forwarding calls to it until it stops");
        let (server_args, server_driver, server_stop) =
            (args.clone(), Arc::clone(&driver), shutdown.clone());
        let health_rx = health.subscribe();
        let server_registration = registration.take();
        early_server = Some(tokio::spawn(async move {
            serve_plugin(
                &server_args,
                server_driver,
                Some(health_rx),
                server_registration,
                server_stop,
            )
            .await
        }));
    }
    let (instance_lock, previous) = tokio::select! {
        taken = standing.take_over(&me) => taken.context("waiting for the other instance to stop")?,
        () = shutdown.cancelled() => {
            return match early_server {
                Some(task) => task.await.context("plugin server task")?,
                None => Ok(()),
            };
        }
    };
    if early_server.is_some() {
        info!("previous instance stopped: taking over");
    }
    if let Some(previous) = &previous {
        startup::remove_sockets_left_by(previous, &me);
    }

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
    let loaded = store.load().context("reading the checkpoint")?;
    let resolved = resolve(None, survey, &withheld::in_use_of(&loaded.checkpoint));
    crate::inventory::refresh::log_change(&Holdback::default(), &resolved.holdback);
    health.set_inventory(resolved.inventory.clone());
    let (holdback_tx, holdback_rx) = watch::channel(resolved.holdback);
    tokio::spawn(withheld::report_holdback(
        client.clone(),
        args.driver_name.clone(),
        args.node_name.clone(),
        holdback_rx,
        shutdown.clone(),
    ));
    let (inventory_tx, inventory_rx) = watch::channel(resolved.inventory);
    let inventory_rx_for_health = inventory_rx.clone();
    report_checkpoint_outcome(&loaded.outcome);
    let (checkpoint, writer_task) = CheckpointWriter::spawn(store, loaded.checkpoint);
    let checkpoint_now = checkpoint.subscribe();
    tokio::spawn(crate::events::run(
        client.clone(),
        args.driver_name.clone(),
        args.node_name.clone(),
        checkpoint.subscribe(),
        notices,
        shutdown.clone(),
    ));
    let checkpoint_for_events = checkpoint.subscribe();
    let (discovery, mig_control) =
        dynamic_mig::setup(&args, discovery, &inventory_tx, &checkpoint, &nvml_library).await;

    // nvidia-smi and the MPS daemons find the driver's libraries through links under the
    // plugin dir; the plugin itself loaded NVML by path.
    let tool_env = crate::tool_env::prepare(
        &args.driver_root,
        &nvml_library,
        &plugin_dir.join(crate::tool_env::LIBRARY_DIR),
    )
    .unwrap_or_else(|err| {
        tracing::warn!(error = %err, "nvidia-smi and MPS daemons run without the driver library path");
        Vec::new()
    });
    let sharing = SharingManager::new(
        Arc::new(
            NvmlComputeControl::new(Some(&nvml_library))
                .context("initialising NVML for compute mode control")?,
        ),
        Arc::new(
            NvidiaSmiTimeSlice::new(
                tool_path(files.nvidia_smi, driver_root::NVIDIA_SMI),
                TOOL_TIMEOUT,
            )
            .with_env(tool_env.clone()),
        ),
        MpsSupervisor::new(MpsSettings {
            control_path: tool_path(files.mps_control, driver_root::MPS_CONTROL),
            root_dir: plugin_dir.join("mps"),
            ready_timeout: TOOL_TIMEOUT,
            command_timeout: TOOL_TIMEOUT,
            private_shm: args.mps_private_shm.then(|| PrivateShm {
                unshare_path: "unshare".into(),
                shell_path: "/bin/sh".into(),
            }),
        })
        .with_launcher(match args.mps_launcher {
            MpsLauncherKind::Direct => MpsLauncher::Direct,
            MpsLauncherKind::Session => MpsLauncher::Session {
                setsid_path: "setsid".into(),
            },
            MpsLauncherKind::SystemdScope => MpsLauncher::SystemdScope {
                systemd_run_path: "systemd-run".into(),
            },
        })
        .with_tool_env(tool_env),
    )
    .with_compute_shares(crate::sharing::share_daemon::ComputeShareSettings {
        root_dir: plugin_dir.join("mps-shares"),
        driver_version: inventory_rx.borrow().driver_version.clone(),
        allow_scheduling_only: args.allow_scheduling_only_shares,
    });
    let (claims, pod_watch) = ClaimSource::new(client.clone(), &args.node_name);
    tokio::spawn(pod_watch.run());
    metrics_tx.send_replace(Some(crate::metrics::Sources {
        checkpoint: checkpoint.subscribe(),
        writer: checkpoint.clone(),
        health: health.subscribe(),
        inventory: inventory_rx.clone(),
    }));
    tokio::spawn(crate::metrics::events::follow_publish(
        probes.publish.subscribe(),
    ));
    tokio::spawn(crate::events::publish::follow_publish(
        probes.publish.subscribe(),
        std::time::Duration::from_secs(args.slice_failure_event_after),
    ));
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
    )
    .with_memory_limits(Arc::new(memory_limiter(
        &args,
        &nvml_library,
        &inventory_rx.borrow().driver_version,
    )));
    let preparer = match mig_control {
        Some(control) => preparer.with_mig_control(control),
        None => preparer,
    };
    tokio::spawn(crate::sharing::memory_limit_status::report_device_status(
        client.clone(),
        args.driver_name.clone(),
        preparer.checkpoint().subscribe(),
    ));
    let report = if loaded.outcome == LoadOutcome::Loaded {
        preparer.recover().await
    } else {
        let live = list_node_claims_with_retry(&client, &args).await;
        let report = preparer.recover_after_loss(live.as_deref()).await;
        report_rebuild(&report);
        report
    };
    crate::events::mps_recovered(&report.mps, &checkpoint_for_events.borrow());

    // The kubelet is served from local state while the API server is away; slices are
    // published once it answers (`/readyz` stays false until then).
    let status_tx = probes.publish;
    let slices_stop = shutdown.clone();
    let (slices_client, unhealthy, taint_effect) = (
        client.clone(),
        health.subscribe_unhealthy(),
        args.unhealthy_taint_effect,
    );
    let (driver_name, node_name) = (args.driver_name.clone(), args.node_name.clone());
    let consumable_shares = args.consumable_shares;
    tokio::spawn(async move {
        let Some(reconciler) = Reconciler::for_node_when_reachable(
            slices_client,
            &driver_name,
            &node_name,
            SliceFeatures {
                consumable_shares,
                ..SliceFeatures::default()
            },
            &status_tx,
            slices_stop.cancelled(),
        )
        .await
        else {
            return;
        };
        if let Err(err) = reconciler
            .with_health(unhealthy, taint_effect)
            .run(inventory_rx, status_tx, slices_stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %err, "ResourceSlice publishing stopped");
        }
    });
    let refresh_stop = shutdown.clone();
    tokio::spawn(refresh_inventory(
        Refresh {
            discover: discovery,
            in_use: Arc::new(move || withheld::in_use_of(&checkpoint_now.borrow())),
            interval: INVENTORY_REFRESH,
            retry: INVENTORY_RETRY,
        },
        inventory_tx,
        holdback_tx,
        refresh_stop.cancelled_owned(),
    ));

    let health_rx = health.subscribe();
    tokio::spawn(follow_inventory(
        inventory_rx_for_health,
        health,
        shutdown.clone(),
    ));

    take_over.complete(Arc::new(preparer));
    let served = match early_server {
        Some(task) => {
            drop(driver);
            task.await.context("plugin server task")?
        }
        None => {
            serve_plugin(
                &args,
                driver,
                Some(health_rx),
                registration,
                shutdown.clone(),
            )
            .await
        }
    };
    // With the server gone the preparer is dropped; the writer ends once a write still
    // queued by a call the kubelet gave up on is on disk. Only then may a successor read.
    if tokio::time::timeout(CHECKPOINT_DRAIN, writer_task)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?CHECKPOINT_DRAIN, "checkpoint writer still busy at exit");
    }
    // The server returns on shutdown or failure; either way the health watch stops.
    shutdown.cancel();
    if let Err(err) = health_watch.await {
        tracing::warn!(error = %err, "GPU health watch task failed");
    }
    match http_task.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(error = %format!("{err:#}"), "probe HTTP server had stopped")
        }
        Err(err) => tracing::warn!(error = %err, "probe HTTP server task failed"),
    }
    // Released only now, after the sockets are gone and every answered call is on disk.
    info!(lock = %instance_lock.path().display(), "releasing the instance lock");
    drop(instance_lock);
    served
}

/// The first discovery, asked again with backoff ([`INVENTORY_RETRY`] doubling up to
/// [`INVENTORY_REFRESH`]) while NVML fails as a whole, so a transient error at start does
/// not end the process; `None` on `shutdown`.
async fn first_survey(
    discovery: &Arc<dyn Discover>,
    shutdown: &CancellationToken,
) -> Option<crate::inventory::Survey> {
    let mut backoff = INVENTORY_RETRY;
    loop {
        let d = Arc::clone(discovery);
        match tokio::task::spawn_blocking(move || d.survey()).await {
            Ok(Ok(survey)) => return Some(survey),
            Ok(Err(err)) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(err)), retry_in_ms = backoff.as_millis() as u64, "discovering GPUs failed; nothing is published until it works")
            }
            Err(err) => tracing::warn!(error = %err, "GPU discovery task failed"),
        }
        // Backoff before the next GPU discovery attempt (NVML has no readiness event).
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(INVENTORY_REFRESH);
    }
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

/// Searches the driver root and initialises NVML, again every [`DRIVER_RETRY`] until it
/// works (the GPU operator may install the driver after the plugin starts) or `shutdown`
/// (`None`). Meanwhile the plugin is not ready: `status` holds every path searched or the
/// NVML error, which is also logged whenever it changes.
async fn wait_for_driver(
    args: &PluginArgs,
    status: &watch::Sender<DriverStatus>,
    shutdown: &CancellationToken,
) -> Option<(DriverFiles, Arc<NvmlDiscovery>)> {
    let overrides = Overrides {
        nvml_library: args.nvml_lib_path.clone(),
        nvidia_smi: args.nvidia_smi_path.clone(),
        mps_control: args.mps_control_path.clone(),
    };
    let mut logged: Option<String> = None;
    loop {
        let attempt = driver_root::locate(&args.driver_root, std::env::consts::ARCH, &overrides)
            .map_err(|e| e.to_string())
            .and_then(|files| {
                NvmlDiscovery::new(Some(&files.nvml_library), SYSFS_ROOT)
                    .map(|nvml| (files, nvml))
                    .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
            });
        match attempt {
            Ok((files, nvml)) => {
                info!(
                    nvml = %files.nvml_library.display(),
                    driver_root = %args.driver_root.display(),
                    "NVML loaded"
                );
                status.send_replace(DriverStatus::Loaded {
                    library: files.nvml_library.clone(),
                });
                return Some((files, Arc::new(nvml)));
            }
            Err(error) => {
                if logged.as_ref() != Some(&error) {
                    tracing::error!(
                        error = %error,
                        retry_every = ?DRIVER_RETRY,
                        "NVIDIA driver not usable; the plugin stays not ready until it is"
                    );
                    logged = Some(error.clone());
                }
                status.send_replace(DriverStatus::Searching { error });
            }
        }
        // Retry period of the driver-root search: the GPU operator may install the driver
        // after the plugin starts, and there is no event for that.
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(DRIVER_RETRY) => {}
        }
    }
}

/// The tool's path, or its bare name (PATH lookup when run) with a warning when it was
/// not found: only claims that need it fail, with the spawn error.
fn tool_path(found: Result<std::path::PathBuf, NotFound>, name: &str) -> std::path::PathBuf {
    found.unwrap_or_else(|missing| {
        tracing::warn!(error = %missing, "claims that need {name} fail until it is installed");
        std::path::PathBuf::from(name)
    })
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

/// The claims allocated to this node, asking the API server a few times (about 15 s in
/// all); `None` when it stays unreachable (recovery then removes nothing).
async fn list_node_claims_with_retry(
    client: &kube::Client,
    args: &PluginArgs,
) -> Option<Vec<k8s_openapi::api::resource::v1::ResourceClaim>> {
    let mut delay = std::time::Duration::from_millis(500);
    for attempt in 1..=5 {
        match crate::prepare::rebuild::list_node_claims(client, &args.driver_name, &args.node_name)
            .await
        {
            Ok(claims) => return Some(claims),
            Err(err) => {
                tracing::warn!(attempt, error = %err, "listing this node's ResourceClaims for recovery failed");
                // Exponential backoff between LIST attempts while the API server is away.
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    None
}

/// Posts what recovery rebuilt after a checkpoint loss as a Node Event.
fn report_rebuild(report: &crate::prepare::RecoveryReport) {
    let (type_, reason, note) = if report.deferred {
        (
            EventType::Warning,
            "CheckpointRebuildDeferred",
            "API server unreachable at start: prepared claims not rebuilt; no CDI spec, MPS daemon or GPU policy was removed".to_string(),
        )
    } else {
        (
            EventType::Normal,
            "CheckpointRebuilt",
            format!(
                "rebuilt {} prepared claim(s) from the API server and CDI specs ({} in use by pods); {} orphaned CDI spec(s) removed; {} MPS daemon(s) adopted, {} restarted",
                report.rebuilt.len(),
                report.in_use,
                report.orphan_specs_removed.len(),
                report.mps.adopted.len(),
                report.mps.restarted.len()
            ),
        )
    };
    tracing::info!(reason, note = %note, "checkpoint recovery");
    crate::events::notify(crate::events::Notice::Node {
        warning: type_ == EventType::Warning,
        reason: reason.into(),
        action: "RecoverClaims".into(),
        note,
    });
}

/// Logs how the checkpoint was loaded; a quarantined or previous-boot checkpoint is also
/// reported as a Warning Event on this node, so `kubectl describe node` shows it.
fn report_checkpoint_outcome(outcome: &LoadOutcome) {
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
        LoadOutcome::TornFromPreviousBoot { reason } => (
            "CheckpointFromPreviousBoot",
            format!(
                "checkpoint torn by the crash that ended the previous boot ({reason}) dropped; prepared state is rebuilt from the API server and the node"
            ),
        ),
        LoadOutcome::Quarantined { path, reason } => (
            "CheckpointQuarantined",
            format!(
                "unusable checkpoint moved to {} ({reason}); prepared claims are rebuilt from the API server and the CDI specs on disk",
                path.display()
            ),
        ),
    };
    tracing::warn!(reason, note = %note, "checkpoint");
    crate::events::notify(crate::events::Notice::Node {
        warning: true,
        reason: reason.into(),
        action: "LoadCheckpoint".into(),
        note,
    });
}

/// The per-pod GPU memory limiter, with support detected now; an NVML library that cannot
/// be loaded for it counts as one without the memory-limit symbols.
fn memory_limiter(
    args: &PluginArgs,
    nvml_library: &Path,
    driver_version: &str,
) -> crate::sharing::memory_limit::MemoryLimiter {
    use crate::sharing::memory_limit::{MemoryLimitSettings, MemoryLimiter, NvmlMemoryLimits};
    let control = match NvmlMemoryLimits::load(Some(nvml_library)) {
        Ok(control) => control.map(|c| Arc::new(c) as Arc<_>),
        Err(err) => {
            tracing::warn!(error = %err, "loading NVML for GPU memory limits failed; shares get no limit");
            None
        }
    };
    let limiter = MemoryLimiter::new(
        control,
        driver_version,
        MemoryLimitSettings {
            cgroup_root: args.cgroup_root.clone(),
            allow_scheduling_only: args.allow_scheduling_only_shares,
        },
    );
    match &limiter.support().problem {
        None => {
            info!(cgroup_root = %args.cgroup_root.display(), "GPU memory shares are enforced per pod")
        }
        Some(problem) => {
            tracing::warn!(reason = %problem, scheduling_only_allowed = args.allow_scheduling_only_shares, "GPU memory shares cannot be enforced on this node")
        }
    }
    limiter
}
