//! What `tessera approvals` and `tessera token revoke` need to act at the
//! fleet authority: the operator's X.509-SVID, fetched from the Workload API
//! like any workload's, presented over mTLS ([`crate::fleet::operator`]).

use std::path::Path;

use anyhow::{Context, bail};
use clap::Args;
use tessera_workload_api as pb;

use super::{client, status};
use crate::fleet::operator::OperatorClient;
use crate::identity::pem;

#[derive(Args)]
pub(super) struct AuthorityArgs {
    /// Act at the fleet authority (host:port) for every node, with this
    /// caller's X.509-SVID from the Workload API; its SPIFFE ID must be in
    /// the authority's server.operators.
    #[arg(long, value_name = "HOST:PORT")]
    pub(super) authority: Option<String>,
    /// DNS name in the authority's certificate (upstream.server_name).
    #[arg(long, value_name = "NAME", default_value = "tessera-authority")]
    pub(super) server_name: String,
    /// Which of the caller's X.509-SVIDs to present, when it has several
    /// (default: the first).
    #[arg(long, value_name = "SPIFFE_ID")]
    pub(super) operator_id: Option<String>,
}

/// A client for `addr` holding the caller's X.509-SVID (from the Workload
/// API at `socket`, else SPIFFE_ENDPOINT_SOCKET) and trusting its bundle.
pub(super) async fn connect(
    args: &AuthorityArgs,
    addr: &str,
    socket: Option<&Path>,
) -> anyhow::Result<OperatorClient> {
    let mut c = client::connect_resolved(socket).await?;
    let resp = c
        .fetch_x509svid(pb::with_security_header(pb::X509svidRequest {}))
        .await
        .map_err(status)?
        .into_inner()
        .message()
        .await
        .map_err(status)?
        .context("the agent closed the stream without an answer")?;
    let svid = match &args.operator_id {
        Some(id) => resp
            .svids
            .iter()
            .find(|s| &s.spiffe_id == id)
            .with_context(|| format!("the Workload API gives this caller no SVID for {id}"))?,
        None => resp
            .svids
            .first()
            .context("the Workload API gives this caller no X.509-SVID")?,
    };
    let chain = pem::split_der_certs(&svid.x509_svid)?;
    let Some(leaf) = chain.first() else {
        bail!("the X.509-SVID for {} is empty", svid.spiffe_id);
    };
    let cas: Vec<Vec<u8>> = pem::split_der_certs(&svid.bundle)?
        .iter()
        .map(|c| c.to_vec())
        .collect();
    OperatorClient::new(addr, &args.server_name, leaf, &svid.x509_svid_key, &cas)
        .with_context(|| format!("as {}", svid.spiffe_id))
}
