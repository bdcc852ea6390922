//! The SDS scenarios: the agent as Envoys use it. An Envoy opens one
//! connection to the socket and one StreamSecrets stream per secret (here:
//! its certificate and its validation context), sends a first request that
//! carries its whole node description (Envoy 1.40's is about 60 KiB: the
//! list of every extension it was built with), and ACKs every response,
//! again with its node. The requests sent here have the same shape and size.

use tessera_workload_api::codec::SmallBufferCodec;
use tessera_workload_api::sds::{self, discovery};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::*;

const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
/// What an Envoy sends first on a stream: about this many bytes.
const ENVOY_REQUEST_BYTES: usize = 60 * 1024;

/// A DiscoveryRequest as Envoy sends it: the fields SDS reads, and a node
/// with the extension list SDS skips.
#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyRequest {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, optional, tag = "2")]
    node: Option<EnvoyNode>,
    #[prost(string, repeated, tag = "3")]
    resource_names: Vec<String>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    response_nonce: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyNode {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    cluster: String,
    #[prost(string, tag = "6")]
    user_agent_name: String,
    #[prost(message, repeated, tag = "9")]
    extensions: Vec<EnvoyExtension>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyExtension {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    category: String,
}

/// A node description of about [`ENVOY_REQUEST_BYTES`].
fn envoy_node() -> EnvoyNode {
    let mut node = EnvoyNode {
        id: "bench".into(),
        cluster: "bench".into(),
        user_agent_name: "envoy".into(),
        extensions: Vec::new(),
    };
    let mut i = 0;
    while prost::Message::encoded_len(&node) < ENVOY_REQUEST_BYTES {
        node.extensions.push(EnvoyExtension {
            name: format!("envoy.filters.http.bench_extension_{i:04}"),
            category: "envoy.filters.http".into(),
        });
        i += 1;
    }
    node
}

fn request(node: &EnvoyNode, name: &str, version: &str, nonce: &str) -> EnvoyRequest {
    EnvoyRequest {
        version_info: version.into(),
        node: Some(node.clone()),
        resource_names: vec![name.into()],
        type_url: sds::SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
    }
}

/// One open StreamSecrets stream that has its first response and has
/// ACKed it, as an idle Envoy's stream is.
struct SecretStream {
    _requests: mpsc::Sender<EnvoyRequest>,
    _responses: tonic::Streaming<discovery::DiscoveryResponse>,
}

/// Opens a stream for `name` on `channel`, waits for the first response
/// and ACKs it; returns the stream and the time to the first response.
async fn open_secret_stream(
    channel: Channel,
    node: &EnvoyNode,
    name: &str,
) -> anyhow::Result<(SecretStream, Duration)> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel(2);
    tx.send(request(node, name, "", "")).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let mut responses = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(STREAM_SECRETS),
            SmallBufferCodec::<EnvoyRequest, discovery::DiscoveryResponse>::default(),
        )
        .await?
        .into_inner();
    let first = responses
        .message()
        .await?
        .context("the stream ended without a response")?;
    let took = started.elapsed();
    if first.resources.len() != 1 {
        bail!("expected one secret, got {}", first.resources.len());
    }
    tx.send(request(node, name, &first.version_info, &first.nonce))
        .await?;
    Ok((
        SecretStream {
            _requests: tx,
            _responses: responses,
        },
        took,
    ))
}

async fn channel_to(socket: &Path) -> anyhow::Result<Channel> {
    Ok(client::channel(
        socket,
        tonic::transport::Endpoint::from_static("http://localhost"),
    )
    .await?)
}

/// `sds-first`: a new Envoy each time: connect, attest, open a stream for
/// its certificate, first response.
pub(super) async fn sds_first(p: &BenchParams) -> anyhow::Result<BenchResult> {
    let target = target(p, &entry_for_me("bench/sds")?, "")?;
    let node = Arc::new(envoy_node());
    // Warm the cache: the scenario measures a cached identity.
    open_secret_stream(channel_to(&target.socket).await?, &node, "default").await?;
    let socket = Arc::new(target.socket.clone());
    let cpu_before = target.cpu_seconds();
    let (latencies, seconds) = closed_loop(p.clients, p.duration, move |_| {
        let (socket, node) = (socket.clone(), node.clone());
        async move {
            open_secret_stream(channel_to(&socket).await?, &node, "default").await?;
            Ok(())
        }
    })
    .await?;
    let mut extra = cpu_per_op_extra(&target, cpu_before, latencies.len());
    extra.insert(
        "request_bytes".into(),
        prost::Message::encoded_len(&request(&envoy_node(), "default", "", "")).into(),
    );
    Ok(BenchResult {
        scenario: "sds-first".into(),
        params: params_map(&[
            ("clients", p.clients.into()),
            ("duration_s", p.duration.as_secs_f64().into()),
        ]),
        ops: latencies.len() as u64,
        seconds,
        latencies,
        agent_rss_bytes: target.rss_bytes(),
        extra,
    })
}

/// `sds-idle-memory`: S streams held as S/2 Envoys hold them (one
/// connection each, a certificate stream and a bundle stream), each
/// answered and ACKed; the agent's RSS then, and per stream above the
/// agent's RSS before any Envoy connected. The latencies are the time to
/// each stream's first response while they open (16 Envoys at a time).
/// A running agent (`--socket`) must allow S/2 connections from one
/// process, and is measured as it is (start it fresh for a fair figure).
pub(super) async fn sds_idle_memory(p: &BenchParams) -> anyhow::Result<Vec<BenchResult>> {
    let envoys = p.streams.div_ceil(2).max(1);
    // Every Envoy is this one process: let it hold them all.
    let limits = format!(
        "max_connections_per_uid = {0}\nmax_connections_per_process = {0}\n",
        envoys + 16
    );
    let target = target_with_limits(p, &entry_for_me("bench/sds")?, "", &limits)?;
    let baseline = target.rss_bytes();
    let node = Arc::new(envoy_node());
    let socket = Arc::new(target.socket.clone());
    let started = Instant::now();
    let mut held = Vec::with_capacity(envoys * 2);
    let mut latencies = Vec::with_capacity(envoys * 2);
    const AT_ONCE: usize = 16;
    for batch in (0..envoys).collect::<Vec<_>>().chunks(AT_ONCE) {
        let mut tasks = Vec::with_capacity(batch.len());
        for _ in batch {
            let (socket, node) = (socket.clone(), node.clone());
            tasks.push(tokio::spawn(async move {
                let channel = channel_to(&socket).await?;
                let cert = open_secret_stream(channel.clone(), &node, "default").await?;
                let bundle = open_secret_stream(channel, &node, "ROOTCA").await?;
                Ok::<_, anyhow::Error>([cert, bundle])
            }));
        }
        for t in tasks {
            for (stream, took) in t.await?? {
                held.push(stream);
                latencies.push(took);
            }
        }
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = target.rss_bytes();
    let mut extra = serde_json::Map::new();
    extra.insert(
        "baseline_rss_bytes".into(),
        baseline.map_or(serde_json::Value::Null, Into::into),
    );
    if let (Some(rss), Some(baseline)) = (rss, baseline) {
        let grown = rss.saturating_sub(baseline);
        extra.insert(
            "bytes_per_stream".into(),
            (grown / held.len() as u64).into(),
        );
        extra.insert(
            "bytes_per_connection".into(),
            (grown / envoys as u64).into(),
        );
    }
    extra.insert("connections".into(), envoys.into());
    drop(held);
    Ok(vec![BenchResult {
        scenario: "sds-idle-memory".into(),
        params: params_map(&[("streams", (envoys * 2).into())]),
        ops: (envoys * 2) as u64,
        seconds: opened.as_secs_f64(),
        latencies,
        agent_rss_bytes: rss,
        extra,
    }])
}
