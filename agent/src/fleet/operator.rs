//! Operators at the authority: decisions people make for the whole fleet
//! (approvals, revocations), over the authority's mTLS listener.
//!
//! **The credential** is an X.509-SVID of the trust domain whose SPIFFE ID
//! `[server] operators` lists, presented as the TLS client certificate. The
//! handshake verifies it against the trust domain's CAs (as it verifies node
//! SVIDs); each request checks it is still valid and listed. Why an SVID:
//! an operator gets one from any agent's Workload API the way a workload
//! does (an entry for the operator's user or tool), it is short-lived and
//! rotated, its private key never leaves the operator's machine, and it
//! names who decided in every audit record. Node SVIDs (the reserved
//! `/tessera/` path) can never be listed, so a node cannot act as an
//! operator; a workload SVID not listed is refused (403).
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/operator/approvals` | every approval pending (or decided) on any node |
//! | `POST /v1/operator/approvals/{id}/approve` (`?node=`) | approve one |
//! | `POST /v1/operator/approvals/{id}/deny` (`?node=`) | deny one |
//! | `POST /v1/operator/revocations` | revoke a token or end a task, fleet-wide |
//!
//! [`OperatorClient`] is the caller's side (`tessera approvals ... --authority`,
//! `tessera token revoke --authority`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::transport::https_client as http;

/// The body of `POST /v1/operator/revocations`: a token (verified by the
/// authority, revoked by its `jti` until it expires), or a task of a
/// principal (every token of it, as `tessera token revoke --task` on the
/// principal's node ends it).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The SPIFFE ID whose task `task_id` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

/// Whether `id` may act as an operator: listed in `operators`, and never a
/// fleet identity (config validation refuses those; checked again here).
pub fn is_operator(operators: &[spiffe::SpiffeId], id: &spiffe::SpiffeId) -> bool {
    !super::is_reserved(id) && operators.iter().any(|o| o == id)
}

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorCallError {
    #[error("the authority's TLS configuration: {0}")]
    Tls(#[from] super::tls::TlsError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("the authority refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the authority's answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// An operator talking to the authority with their X.509-SVID.
pub struct OperatorClient {
    addr: String,
    server_name: String,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl OperatorClient {
    /// `addr` is `host:port`; the authority's certificate is verified
    /// against `cas` (the trust domain's bundle, DER) as `server_name`;
    /// `leaf`/`key` (DER, PKCS#8) are the operator's X.509-SVID.
    pub fn new(
        addr: &str,
        server_name: &str,
        leaf: &[u8],
        key: &[u8],
        cas: &[Vec<u8>],
    ) -> Result<Self, OperatorCallError> {
        let roots = super::tls::roots(cas.iter().map(Vec::as_slice))?;
        Ok(Self {
            addr: addr.to_string(),
            server_name: server_name.to_string(),
            tls: super::tls::client_config(roots, Some((leaf, key)))?,
            timeout: Duration::from_secs(10),
        })
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, OperatorCallError> {
        let (status, bytes) = http::send(http::Request {
            addr: &self.addr,
            server_name: &self.server_name,
            tls: self.tls.clone(),
            method,
            path,
            bearer: None,
            content_type: "application/json",
            body: body.map(|b| b.to_string().into_bytes()),
            timeout: self.timeout,
        })
        .await?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(OperatorCallError::Refused { status, message });
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Every approval pending or decided on any node (JSON array).
    pub async fn approvals(&self) -> Result<Value, OperatorCallError> {
        self.call(hyper::Method::GET, "/v1/operator/approvals", None)
            .await
    }

    /// Approves or denies the approval `id` (a node's approval id, or the
    /// ApprovalRequest's name), on `node` where two nodes use one id.
    pub async fn decide(
        &self,
        id: &str,
        node: Option<&str>,
        approve: bool,
    ) -> Result<Value, OperatorCallError> {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let mut path = format!(
            "/v1/operator/approvals/{}/{}",
            enc(id),
            if approve { "approve" } else { "deny" }
        );
        if let Some(n) = node {
            path.push_str(&format!("?node={}", enc(n)));
        }
        self.call(hyper::Method::POST, &path, None).await
    }

    /// Revokes a token or ends a task across the fleet.
    pub async fn revoke(&self, req: &RevokeRequest) -> Result<Value, OperatorCallError> {
        self.call(
            hyper::Method::POST,
            "/v1/operator/revocations",
            Some(&serde_json::to_value(req)?),
        )
        .await
    }
}

/// The operator a request comes from: the SPIFFE ID of its client
/// certificate if the certificate is still valid and the ID listed.
pub fn authorize(
    operators: &[spiffe::SpiffeId],
    peer: Option<&(spiffe::SpiffeId, SystemTime)>,
    now: SystemTime,
) -> Result<spiffe::SpiffeId, (u16, String)> {
    match peer {
        None => Err((
            401,
            "an operator's X.509-SVID is required as the TLS client certificate".into(),
        )),
        Some((_, not_after)) if *not_after <= now => Err((
            401,
            "the X.509-SVID presented on this connection has expired; reconnect with a valid one"
                .into(),
        )),
        Some((id, _)) if is_operator(operators, id) => Ok(id.clone()),
        Some((id, _)) => Err((
            403,
            format!("{id} is not an operator of this authority (server.operators)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_unexpired_non_fleet_ids_are_operators() {
        let id = |s: &str| spiffe::SpiffeId::new(s).unwrap();
        let alice = id("spiffe://example.org/ops/alice");
        let node = id("spiffe://example.org/tessera/node/k8s/worker-1");
        let ops = vec![alice.clone(), node.clone()];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let later = now + Duration::from_secs(60);
        assert_eq!(
            authorize(&ops, Some(&(alice.clone(), later)), now),
            Ok(alice.clone())
        );
        assert_eq!(authorize(&ops, None, now).unwrap_err().0, 401);
        assert_eq!(
            authorize(&ops, Some(&(alice.clone(), now)), now)
                .unwrap_err()
                .0,
            401
        );
        assert_eq!(
            authorize(
                &ops,
                Some(&(id("spiffe://example.org/ops/bob"), later)),
                now
            )
            .unwrap_err()
            .0,
            403
        );
        // Even if listed, a node identity never acts as an operator.
        assert_eq!(
            authorize(&ops, Some(&(node, later)), now).unwrap_err().0,
            403
        );
    }
}
