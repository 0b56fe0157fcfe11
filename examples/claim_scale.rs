//! Claim cache cost at scale: plugin memory and API server watch load, cluster-wide
//! ResourceClaim watch against the node-scoped claim source.
//!
//! `cargo run --release --example claim_scale [-- CLAIMS NODES]` (default 2,500 claims
//! across 100 nodes) starts a box (tests/cluster, one agent node), creates for every claim
//! a pod bound to its node (`spec.nodeName`; the nodes have no agent, so the pods stay
//! Pending) and an allocated ResourceClaim reserved for it, then runs each claim cache
//! in a child process of its own and reports the child's resident memory once the cache
//! is filled, and the API server's own counters (`apiserver_watch_events_total`,
//! `_sizes_sum`, `apiserver_request_total`) while it fills and while every claim is
//! changed once. Modes: `cluster` is one reflector over all ResourceClaims, as the
//! plugin had before (its cost is per node, so x NODES for the cluster); `node` is one
//! node's [`ClaimSource`]; `nodes` is NODES sources in one process (the whole cluster's
//! plugins' watches at once). Slow (minutes), so not part of `make test`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use gpu_dra::claims::ClaimSource;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use serde_json::json;

const DRIVER: &str = "gpu.gpu-dra.dev";
const NS: &str = "scale";

fn node(i: usize) -> String {
    format!("sim-{i:03}")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Child: fills one kind of cache, prints `filled <rss KiB> <baseline KiB>`, then waits
/// for stdin to close (the parent changes every claim meanwhile).
async fn child(mode: &str, claims: usize, nodes: usize) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let baseline = rss_kib();
    let mut tasks = Vec::new();
    match mode {
        "cluster" => {
            let (store, writer) = reflector::store::<ResourceClaim>();
            let stream = watcher(
                Api::<ResourceClaim>::all(client),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(|c| c.metadata.managed_fields = None)
            .reflect(writer);
            tasks.push(tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while stream.next().await.is_some() {}
            }));
            wait_until("the reflector", || store.state().len() >= claims).await?;
        }
        "node" | "nodes" => {
            let count = if mode == "node" { 1 } else { nodes };
            let mut sources = Vec::new();
            for i in 0..count {
                let (source, watch) = ClaimSource::new(client.clone(), &node(i));
                tasks.push(tokio::spawn(watch.run()));
                sources.push(source);
            }
            let per_node = claims / nodes;
            wait_until("the node sources", || {
                sources.iter().all(|s| s.stats().claims >= per_node)
            })
            .await?;
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    println!("filled {} {baseline}", rss_kib());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    println!("end {}", rss_kib());
    Ok(())
}

/// Sums of the API server counters we report, by name and resource.
async fn metrics(client: &Client) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let wanted = [
            "apiserver_watch_events_total",
            "apiserver_watch_events_sizes_sum",
            "apiserver_request_total",
            "apiserver_response_sizes_sum",
        ];
        if !wanted.contains(&name) {
            continue;
        }
        for kind in ["resourceclaims", "pods"] {
            if !labels.contains(&format!("resource=\"{kind}\"")) {
                continue;
            }
            let verb = labels
                .split(',')
                .find_map(|l| l.strip_prefix("verb=\""))
                .map(|v| v.trim_end_matches(['"', '}']))
                .unwrap_or("");
            let key = format!("{name} {kind} {verb}").trim_end().to_owned();
            *out.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(out)
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("    {k}: {d:.0}"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn create_objects(client: &Client, claims: usize, nodes: usize) -> anyhow::Result<()> {
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let rcs: Api<ResourceClaim> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(0..claims)
        .map(|i| {
            let (pods, rcs) = (pods.clone(), rcs.clone());
            async move {
                let (name, node) = (format!("claim-{i:05}"), node(i % nodes));
                let params = json!({"apiVersion": "gpu.gpu-dra.dev/v1alpha1", "kind": "GpuConfig",
                    "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}});
                let claim: ResourceClaim = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"app": "scale"}},
                    "spec": {"devices": {
                        "requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}],
                        "config": [{"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": params}}]}}
                }))?;
                rcs.create(&PostParams::default(), &claim).await?;
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("pod-{i:05}")},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                        "resources": {"claims": [{"name": "gpu"}]}}],
                        "resourceClaims": [{"name": "gpu", "resourceClaimName": name}]}
                }))?;
                let pod = pods.create(&PostParams::default(), &pod).await?;
                let status = json!({"status": {
                    "allocation": {
                        "devices": {
                            "results": [{"request": "gpu", "driver": DRIVER, "pool": node, "device": format!("gpu-{}", i / nodes % 8)}],
                            "config": [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": params}}]},
                        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": [node]}]}]}},
                    "reservedFor": [{"resource": "pods", "name": pod.metadata.name, "uid": pod.metadata.uid}]}});
                rcs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn change_every_claim(client: &Client, claims: usize) -> anyhow::Result<()> {
    let rcs: Api<ResourceClaim> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(0..claims)
        .map(|i| {
            let rcs = rcs.clone();
            async move {
                let patch = json!({"metadata": {"annotations": {"scale/touched": "1"}}});
                rcs.patch(
                    &format!("claim-{i:05}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn measure(
    client: &Client,
    kubeconfig: &std::path::Path,
    mode: &str,
    claims: usize,
    nodes: usize,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let start = metrics(client).await?;
    let began = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--child", mode, &claims.to_string(), &nodes.to_string()])
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("child stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let filled_in = began.elapsed();
    let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    anyhow::ensure!(
        fields.first().map(String::as_str) == Some("filled"),
        "child said {line:?}"
    );
    let filled = metrics(client).await?;
    change_every_claim(client, claims).await?;
    // Let the watch deliver the changes before reading the counters again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let changed = metrics(client).await?;
    child
        .stdin
        .take()
        .context("child stdin")?
        .write_all(b"\n")?;
    line.clear();
    out.read_line(&mut line)?;
    child.wait()?;
    println!(
        "mode {mode}: filled in {:.1} s, RSS {} KiB filled (baseline {} KiB), {} at the end",
        filled_in.as_secs_f64(),
        fields.get(1).map_or("?", String::as_str),
        fields.get(2).map_or("?", String::as_str),
        line.trim()
    );
    println!("  API server while filling:\n{}", delta(&start, &filled));
    println!(
        "  API server while every claim changed once:\n{}",
        delta(&filled, &changed)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let claims = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(2500);
        let nodes = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(100);
        return child(&args[2], claims, nodes).await;
    }
    let claims: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(2500);
    let nodes: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(100);
    let b = support::TestBox::start(&["node-a"])?;
    let client = b.client().await;
    // A private copy: the children read it after the box's own files may be cleaned up.
    let kubeconfig = tempfile::NamedTempFile::new()?;
    std::fs::copy(b.kubeconfig(), kubeconfig.path())?;
    let began = Instant::now();
    create_objects(&client, claims, nodes).await?;
    println!(
        "{claims} claims and pods across {nodes} nodes created in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    for mode in ["cluster", "node", "nodes"] {
        measure(&client, kubeconfig.path(), mode, claims, nodes).await?;
    }
    Ok(())
}
