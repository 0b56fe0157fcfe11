//! The one-shot subcommands: `inventory`, `webhook`, `status`, `migrate` and
//! `clear-unhealthy`. Like the rest of `run`, wiring only: each builds what its module
//! needs from the parsed flags and prints the result; logic lives in the modules.

use std::path::Path;

use anyhow::Context as _;
use tracing::info;

use super::{SYSFS_ROOT, kube_client, shutdown_on_signal};
use crate::cli::{ClearUnhealthyArgs, InventoryArgs, WebhookArgs};
use crate::driver_root::{self, Overrides};
use crate::inventory::{
    Discover, NvmlDiscovery, render_inventory, render_placements, render_slices,
};
use crate::slices::desired::{SliceFeatures, desired_slices};

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

/// `gpu-dra inventory`: prints the discovered GPUs, or with `--slices` the ResourceSlices
/// the plugin would publish on that node (YAML).
pub async fn inventory(args: InventoryArgs) -> anyhow::Result<()> {
    let library = match (&args.nvml_lib_path, &args.driver_root) {
        (None, Some(root)) => Some(
            driver_root::locate(root, std::env::consts::ARCH, &Overrides::default())?.nvml_library,
        ),
        (given, _) => given.clone(),
    };
    let discovery =
        NvmlDiscovery::new(library.as_deref(), SYSFS_ROOT).context("initialising NVML")?;
    // As the plugin starts: a GPU whose MIG shape is unknown is withheld (and named).
    let survey = discovery.survey().context("discovering GPUs")?;
    let checkpoint = args
        .kubelet_root
        .join("plugins")
        .join(&args.driver_name)
        .join(crate::checkpoint::CHECKPOINT_FILE_NAME);
    let recorded = match std::fs::read(&checkpoint).map_err(|e| e.to_string()) {
        Ok(bytes) => match crate::checkpoint::model::decode(&bytes) {
            Ok(cp) => Some(cp),
            Err(reason) => {
                eprintln!(
                    "checkpoint {} unusable ({reason}): MIG devices in use unknown",
                    checkpoint.display()
                );
                None
            }
        },
        // No plugin ran here (or not as this user): nothing known to be in use.
        Err(_) => None,
    };
    let in_use = recorded
        .as_ref()
        .map(super::withheld::in_use_of)
        .unwrap_or_default();
    let resolved = crate::inventory::resolve(None, survey, &in_use);
    for u in &resolved.holdback.withheld {
        eprintln!(
            "gpu-{} ({}) withheld: {}; run again once NVML reads it",
            u.minor, u.uuid, u.reason
        );
    }
    let mut inventory = resolved.inventory;
    // As the plugin chooses and marks its dynamic MIG GPUs at start.
    let known = dynamic_mig_instances(&mut inventory, &args.dynamic_mig, recorded.as_ref());
    if args.slices {
        let node = args.node_name.as_deref().unwrap_or_default();
        let slices = desired_slices(
            &inventory,
            &args.driver_name,
            node,
            "",
            1,
            &SliceFeatures {
                consumable_shares: args.consumable_shares,
                ..SliceFeatures::default()
            },
        );
        print!(
            "{}",
            render_slices(&slices).context("rendering ResourceSlices")?
        );
    } else {
        print!("{}", render_inventory(&inventory));
        print!("{}", render_placements(&inventory, &known));
    }
    Ok(())
}

/// Marks the GPUs `mode` puts under dynamic MIG in `inv` (as the plugin does at start,
/// from the instances `checkpoint` records) and returns those recorded instances with
/// their claims.
fn dynamic_mig_instances(
    inv: &mut crate::inventory::Inventory,
    mode: &crate::prepare::mig_select::DynamicMigMode,
    checkpoint: Option<&crate::checkpoint::Checkpoint>,
) -> Vec<crate::inventory::placements::KnownInstance> {
    use crate::prepare::{mig_dynamic, mig_select};
    let empty = crate::checkpoint::Checkpoint::new("");
    let checkpoint = checkpoint.unwrap_or(&empty);
    let owned = mig_select::owned_records(checkpoint);
    let chosen = mig_select::choose(inv, mode, &owned);
    mig_select::annotate(inv, &chosen, &owned);
    checkpoint
        .claims
        .values()
        .flat_map(|entry| {
            mig_dynamic::records_of(entry).into_iter().map(move |r| {
                crate::inventory::placements::KnownInstance {
                    gpu_uuid: r.gpu_uuid,
                    gi_profile_id: r.gi_profile_id,
                    start: r.placement.start,
                    claim: format!("{}/{}", entry.namespace, entry.name),
                }
            })
        })
        .collect()
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

/// `gpu-dra status`: reads NVML and the checkpoint (read only), asks the API server for
/// the claims' pods unless `--no-api` or unreachable, prints a table or JSON.
pub async fn status(args: crate::cli::StatusArgs) -> anyhow::Result<()> {
    use crate::status::{NodeStatus, build, render_table};
    let library = match (&args.nvml_lib_path, &args.driver_root) {
        (None, Some(root)) => Some(
            driver_root::locate(root, std::env::consts::ARCH, &Overrides::default())?.nvml_library,
        ),
        (given, _) => given.clone(),
    };
    let discovery =
        NvmlDiscovery::new(library.as_deref(), SYSFS_ROOT).context("initialising NVML")?;
    let inventory = discovery.discover().context("discovering GPUs")?;
    let path = args
        .kubelet_root
        .join("plugins")
        .join(&args.driver_name)
        .join(crate::checkpoint::CHECKPOINT_FILE_NAME);
    let (checkpoint, checkpoint_error) = match std::fs::read(&path) {
        Ok(bytes) => match crate::checkpoint::model::decode(&bytes) {
            Ok(cp) => (cp, None),
            Err(reason) => (crate::checkpoint::Checkpoint::new(""), Some(reason)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (crate::checkpoint::Checkpoint::new(""), None)
        }
        Err(e) => (crate::checkpoint::Checkpoint::new(""), Some(e.to_string())),
    };
    let (pods, api_error) = if args.no_api {
        (Default::default(), Some("--no-api".to_owned()))
    } else {
        match claim_pods(args.kubeconfig.as_deref(), &checkpoint).await {
            Ok(p) => (p, None),
            Err(e) => (Default::default(), Some(format!("{e:#}"))),
        }
    };
    let verdicts_path = path.with_file_name(crate::health::verdicts::VERDICTS_FILE_NAME);
    let (unhealthy, health_error) =
        match std::fs::read_to_string(crate::checkpoint::DEFAULT_BOOT_ID_PATH) {
            Ok(boot_id) => {
                match crate::status::verdicts::read_verdicts(&verdicts_path, boot_id.trim()) {
                    Ok(gpus) => (gpus, None),
                    Err(e) => (Default::default(), Some(e)),
                }
            }
            Err(e) => (Default::default(), Some(format!("boot id: {e}"))),
        };
    let report = NodeStatus {
        node: args.node_name.clone(),
        checkpoint: path.display().to_string(),
        checkpoint_error,
        api_error,
        health_error,
        gpus: build(&inventory, &checkpoint, &pods, &unhealthy),
    };
    match args.output {
        crate::cli::StatusOutput::Table => print!("{}", render_table(&report)),
        crate::cli::StatusOutput::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).context("encoding JSON")?
            )
        }
    }
    Ok(())
}

/// Pods in `status.reservedFor` of each checkpointed claim (one GET per claim; a claim
/// replaced under the same name is skipped).
async fn claim_pods(
    kubeconfig: Option<&Path>,
    checkpoint: &crate::checkpoint::Checkpoint,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
    use k8s_openapi::api::resource::v1::ResourceClaim;
    let client = kube_client(kubeconfig).await?;
    let mut out = std::collections::BTreeMap::new();
    for (uid, entry) in &checkpoint.claims {
        let api: kube::Api<ResourceClaim> = kube::Api::namespaced(client.clone(), &entry.namespace);
        let claim = api
            .get_opt(&entry.name)
            .await
            .with_context(|| format!("reading ResourceClaim {}/{}", entry.namespace, entry.name))?;
        let Some(claim) = claim.filter(|c| c.metadata.uid.as_deref() == Some(uid.as_str())) else {
            continue;
        };
        let pods = claim
            .status
            .and_then(|s| s.reserved_for)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.resource == "pods")
            .map(|r| r.name)
            .collect();
        out.insert(uid.clone(), pods);
    }
    Ok(out)
}

/// `gpu-dra migrate`: reads the legacy config (file or ConfigMap) and the Nodes, writes
/// the DRA objects and prints the report on stderr. Any unmappable field fails the
/// command (no objects written unless `--partial`).
pub async fn migrate(args: crate::cli::MigrateArgs) -> anyhow::Result<()> {
    use crate::migrate::{MigrateInput, legacy, objects};
    use k8s_openapi::api::core::v1::{ConfigMap, Node};
    use std::collections::BTreeMap;
    let mut client = None;
    let configs = match (&args.from_file, &args.configmap) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            legacy::named_configs(&text, &args.default_config)
                .with_context(|| format!("{}", path.display()))?
        }
        (None, Some(reference)) => {
            let (namespace, name) = reference
                .split_once('/')
                .context("--configmap must be NAMESPACE/NAME")?;
            let c = kube_client(args.kubeconfig.as_deref()).await?;
            let cm = kube::Api::<ConfigMap>::namespaced(c.clone(), namespace)
                .get(name)
                .await
                .with_context(|| format!("reading ConfigMap {reference}"))?;
            client = Some(c);
            cm.data.unwrap_or_default().into_iter().collect()
        }
        (None, None) => anyhow::bail!("give --from-file or --configmap"),
    };
    let label = |labels: Option<&BTreeMap<String, String>>| {
        labels.and_then(|l| l.get(legacy::NODE_CONFIG_LABEL).cloned())
    };
    let nodes: BTreeMap<String, Option<String>> = if let Some(path) = &args.nodes_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: k8s_openapi::List<Node> = serde_yaml::from_str(&text)
            .with_context(|| format!("{}: not a NodeList", path.display()))?;
        list.items
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    label(n.metadata.labels.as_ref()),
                )
            })
            .collect()
    } else if let Some(c) = client {
        kube::Api::<Node>::all(c)
            .list(&Default::default())
            .await
            .context("listing Nodes")?
            .items
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    label(n.metadata.labels.as_ref()),
                )
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let migration = crate::migrate::migrate(&MigrateInput {
        configs,
        nodes,
        default_config: args.default_config,
        driver_name: args.driver_name,
        namespace: args.namespace,
    });
    eprint!("{}", migration.report());
    if migration.errors.is_empty() || args.partial {
        let yaml = objects::render(&migration.objects).context("rendering objects")?;
        match &args.output {
            Some(path) => {
                std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))?
            }
            None => print!("{yaml}"),
        }
    }
    if !migration.errors.is_empty() {
        anyhow::bail!(
            "{} field(s) cannot be mapped (listed above){}",
            migration.errors.len(),
            if args.partial {
                ""
            } else {
                "; nothing written (--partial writes the rest)"
            }
        );
    }
    Ok(())
}
