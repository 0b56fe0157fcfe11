//! The kubelet's side of the benches: a tonic client over the plugin's Unix socket (one
//! HTTP/2 connection, as the kubelet uses) and the timed calls. Latency is measured here,
//! at the client.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use gpu_dra::proto::dra_v1 as v1;
use gpu_dra::proto::pluginregistration as reg;

use super::DRIVER;

/// The DRA service client.
pub type Client = v1::dra_plugin_client::DraPluginClient<Channel>;

/// Dials a Unix socket with tonic (the URI is required by the API but unused).
pub async fn channel(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_owned();
    Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .context("connecting to the plugin socket")
}

/// A DRA client on `socket`.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    Ok(Client::new(channel(socket).await?))
}

/// Time from "sockets bound" until the registration service answers GetInfo.
pub async fn first_get_info(socket: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut client = reg::registration_client::RegistrationClient::new(channel(socket).await?);
    let info = client.get_info(reg::InfoRequest {}).await?.into_inner();
    if info.name != DRIVER {
        bail!("GetInfo answered driver {:?}", info.name);
    }
    Ok(start.elapsed())
}

/// `n` empty NodePrepareResources calls (gRPC and dispatch, no claim).
pub async fn empty_rpcs(client: &mut Client, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .node_prepare_resources(v1::NodePrepareResourcesRequest { claims: vec![] })
            .await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Prepares one claim; an error unless it answered exactly one device.
pub async fn prepare_one(client: &mut Client, claim: &v1::Claim) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let response = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await?
        .into_inner();
    let took = t.elapsed();
    let answer = response
        .claims
        .get(&claim.uid)
        .with_context(|| format!("no answer for claim {}", claim.name))?;
    if !answer.error.is_empty() || answer.devices.len() != 1 {
        bail!("prepare of {} failed: {:?}", claim.name, answer);
    }
    Ok(took)
}

/// Unprepares one claim; an error when it answered one.
pub async fn unprepare_one(client: &mut Client, claim: &v1::Claim) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let response = client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![claim.clone()],
        })
        .await?
        .into_inner();
    let took = t.elapsed();
    match response.claims.get(&claim.uid) {
        Some(answer) if answer.error.is_empty() => Ok(took),
        other => bail!("unprepare of {} failed: {:?}", claim.name, other),
    }
}

/// Prepare then unprepare each claim in turn; (prepare latencies, unprepare latencies).
pub async fn one_claim_loop(
    client: &mut Client,
    claims: &[v1::Claim],
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut prepare = Vec::with_capacity(claims.len());
    let mut unprepare = Vec::with_capacity(claims.len());
    for claim in claims {
        prepare.push(prepare_one(client, claim).await?);
        unprepare.push(unprepare_one(client, claim).await?);
    }
    Ok((prepare, unprepare))
}
