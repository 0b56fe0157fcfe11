//! Wiring of each subcommand: builds the components from parsed flags and runs them.
//!
//! Owns process-level concerns only: the Kubernetes client from flags, signal
//! handling (SIGTERM/SIGINT -> graceful stop, sockets removed), and which component
//! runs for which subcommand. Logic lives in the modules it wires; errors are
//! `anyhow` here and nowhere below.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::{InventoryArgs, PluginArgs, WebhookArgs};
use crate::plugin::{
    ClaimRef, NodeDriver, PluginServer, PluginServerConfig, PreparedDevice, SHUTDOWN_GRACE,
};

/// Error every claim gets from [`NotImplementedDriver`].
pub const NOT_IMPLEMENTED: &str = "not implemented: this gpu-dra build cannot prepare claims yet";

/// Placeholder [`NodeDriver`] failing every prepare with [`NOT_IMPLEMENTED`], so the
/// plugin can register and answer the kubelet before the prepare state machine exists.
/// Unprepare succeeds: nothing was ever prepared, and failing it would block pod deletion.
#[derive(Clone, Copy, Debug, Default)]
pub struct NotImplementedDriver;

impl NodeDriver for NotImplementedDriver {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<PreparedDevice>, String>> {
        claims
            .into_iter()
            .map(|c| (c.uid, Err(NOT_IMPLEMENTED.to_owned())))
            .collect()
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        claims.into_iter().map(|c| (c.uid, Ok(()))).collect()
    }
}

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

/// Runs the node plugin with `driver` until SIGTERM/SIGINT; sockets are removed on exit.
pub async fn serve_plugin<D: NodeDriver>(
    args: &PluginArgs,
    driver: Arc<D>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = PluginServer::bind(plugin_server_config(args), driver)
        .context("starting the kubelet plugin sockets")?;
    server
        .serve(shutdown)
        .await
        .context("serving the kubelet plugin")
}

/// `gpu-dra kubelet-plugin`: for now serves the kubelet with [`NotImplementedDriver`].
pub async fn kubelet_plugin(args: PluginArgs) -> anyhow::Result<()> {
    info!(
        driver = %args.driver_name,
        node = %args.node_name,
        kubelet_root = %args.kubelet_root.display(),
        "starting kubelet plugin"
    );
    let shutdown = shutdown_on_signal()?;
    serve_plugin(&args, Arc::new(NotImplementedDriver), shutdown).await
}

/// `gpu-dra inventory`: discovery is not wired into this command yet.
pub async fn inventory(args: InventoryArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "inventory not built yet (driver {}, slices: {})",
        args.driver_name,
        args.slices
    )
}

/// `gpu-dra webhook`: the admission webhook is not built yet.
pub async fn webhook(args: WebhookArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "webhook not built yet (would listen on {})",
        args.bind_address
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn placeholder_answers_every_claim() {
        let claims = vec![
            ClaimRef {
                namespace: "a".into(),
                name: "a".into(),
                uid: "1".into(),
            },
            ClaimRef {
                namespace: "b".into(),
                name: "b".into(),
                uid: "2".into(),
            },
        ];
        let prepared = NotImplementedDriver.prepare(claims.clone()).await;
        assert_eq!(prepared.len(), 2);
        assert!(
            prepared
                .values()
                .all(|r| r.as_ref().unwrap_err() == NOT_IMPLEMENTED)
        );
        let unprepared = NotImplementedDriver.unprepare(claims).await;
        assert_eq!(unprepared.len(), 2);
        assert!(unprepared.values().all(Result::is_ok));
    }
}
