//! Many nodes, one trust domain: the `tessera authority` signing service and
//! the agent's upstream mode.
//!
//! * [`server`]: the authority. Stateless replicas share one key directory (a
//!   mounted Secret) and read the cluster from the Kubernetes API; they attest
//!   nodes ([`kube`] TokenReview, or single-use [`join`] tokens), give each a
//!   short-lived node SVID, and sign only identities the node is entitled to
//!   ([`entitlement`]).
//! * [`client`]: the agent side. Workload keys are generated on the node and
//!   sent as CSRs in batches; private keys never leave it. The trust bundle is
//!   polled and pushed to open Workload API streams.
//! * [`wire`]: the JSON bodies both sides exchange over mTLS ([`tls`], and
//!   `transport::https_client`).
//! * The fleet's shared state: revocations made on any node reach every node
//!   through a store the replicas share ([`store`], on the Kubernetes API
//!   through [`informer`]); replicas take them from nodes and stream them
//!   back ([`feed`]), nodes publish and follow them ([`follow`]).
//!
//! * Fleet-wide approvals: pending approvals kept as custom resources an
//!   operator decides with kubectl; decisions streamed to the waiting node
//!   ([`approvals`]).
//! * Node control: join tokens in the Kubernetes API, redeemed once across
//!   replicas, and node denials every replica enforces ([`nodes`]).
//! * Live registration: entries as custom resources, watched by each replica
//!   and streamed to nodes ([`registration`]); federation relationships as
//!   custom resources ([`federation`]) and the foreign bundles the replicas
//!   fetched kept in the store ([`foreign_bundles`]); both kinds of object
//!   get a `Ready` condition ([`status`]).
//!
//! The design and its trust model are in `docs/architecture.md`.

pub mod approvals;
pub mod client;
pub mod entitlement;
pub mod federation;
pub mod feed;
pub mod follow;
pub mod foreign_bundles;
pub mod informer;
pub mod join;
pub mod kube;
pub mod nodes;
pub mod operator;
pub mod registration;
pub mod server;
pub mod status;
pub mod store;
pub mod subscribe;
pub mod tls;
pub mod wire;

/// Path prefix reserved for the fleet's own identities (nodes, the
/// authority). No workload is ever issued an ID under it, so a workload SVID
/// can never pass as a node SVID.
pub const RESERVED_PATH: &str = "/tessera/";

/// The selector type every upstream-mode agent adds to its callers, with the
/// node name as value; entries for machines outside Kubernetes use it to say
/// which node may get them.
pub const NODE_SELECTOR: &str = "tessera:node";

/// How a node proved itself; part of its SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A projected service account token checked with TokenReview.
    Kubernetes,
    /// A single-use join token.
    Joined,
}

impl NodeKind {
    fn segment(self) -> &'static str {
        match self {
            NodeKind::Kubernetes => "k8s",
            NodeKind::Joined => "join",
        }
    }
}

/// A node as the authority knows it: parsed from its node SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub name: String,
}

impl Node {
    /// `spiffe://<td>/tessera/node/<k8s|join>/<name>`.
    pub fn spiffe_id(&self, td: &spiffe::TrustDomain) -> Result<spiffe::SpiffeId, String> {
        spiffe::SpiffeId::new(format!(
            "{}{}node/{}/{}",
            td.id_string(),
            RESERVED_PATH,
            self.kind.segment(),
            self.name
        ))
        .map_err(|e| format!("node name {:?} does not make a SPIFFE ID: {e}", self.name))
    }

    /// The node an ID names, if it is a node ID of `td`.
    pub fn from_spiffe_id(id: &spiffe::SpiffeId, td: &spiffe::TrustDomain) -> Option<Self> {
        if !id.is_member_of(td) {
            return None;
        }
        let rest = id
            .path()
            .strip_prefix(RESERVED_PATH)?
            .strip_prefix("node/")?;
        let (kind, name) = rest.split_once('/')?;
        let kind = match kind {
            "k8s" => NodeKind::Kubernetes,
            "join" => NodeKind::Joined,
            _ => return None,
        };
        (!name.is_empty() && !name.contains('/')).then(|| Node {
            kind,
            name: name.to_string(),
        })
    }
}

/// Whether `id` is in the reserved part of the namespace.
pub fn is_reserved(id: &spiffe::SpiffeId) -> bool {
    id.path().starts_with(RESERVED_PATH) || id.path() == RESERVED_PATH.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_and_reject_others() {
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let n = Node {
            kind: NodeKind::Kubernetes,
            name: "worker-1".into(),
        };
        let id = n.spiffe_id(&td).unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://example.org/tessera/node/k8s/worker-1"
        );
        assert_eq!(Node::from_spiffe_id(&id, &td), Some(n));
        assert!(is_reserved(&id));
        for other in [
            "spiffe://example.org/ns/default/sa/x",
            "spiffe://other.org/tessera/node/k8s/worker-1",
            "spiffe://example.org/tessera/node/vm/worker-1",
            "spiffe://example.org/tessera/node/k8s/a/b",
        ] {
            let id = spiffe::SpiffeId::new(other).unwrap();
            assert_eq!(Node::from_spiffe_id(&id, &td), None, "{other}");
        }
        assert!(!is_reserved(
            &spiffe::SpiffeId::new("spiffe://example.org/tesserae").unwrap()
        ));
    }
}
