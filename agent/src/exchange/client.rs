//! Who is asking the exchange, and what a token can be bound to.
//!
//! Two kinds of caller reach the same stages:
//! - [`Caller::Local`]: a process on this node, attested from its Unix
//!   socket credentials (the exchange socket). It holds the identities its
//!   entries give it, and its current X509-SVID is in the SVID cache.
//! - [`Caller::Remote`]: a client of the HTTPS face. Nothing is known of it
//!   but its address, the X509-SVID it may present as TLS client
//!   certificate, and the credentials in its request.
//!
//! Everything that differs between them is answered here (which SPIFFE IDs
//! the caller holds, its selectors, how it appears in the audit log, whose
//! budget its records count against), so the exchange's stages do not
//! branch on the transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;
use tessera_attestor::AttestedPeer;

use crate::entries::Identity;
use crate::identity::X509Svid;

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A process on this node and the identities its entries give it.
    Local {
        peer: Arc<AttestedPeer>,
        identities: Vec<Identity>,
    },
    /// A client over TCP (the HTTPS face).
    Remote(RemoteCaller),
}

/// A client of the HTTPS face.
#[derive(Debug, Clone, Default)]
pub struct RemoteCaller {
    pub addr: Option<SocketAddr>,
    /// The X509-SVID of this trust domain it presented as TLS client
    /// certificate (verified against the bundle during the handshake).
    pub certificate: Option<Arc<ClientCertificate>>,
    /// SPIFFE IDs it proved before the request was read: its certificate's,
    /// or that of a JWT-SVID sent as `Authorization: Bearer` (resource
    /// servers introspecting and revoking).
    pub proven: Vec<String>,
}

/// A verified TLS client certificate: an X509-SVID.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub spiffe_id: String,
    pub leaf_der: Vec<u8>,
    pub not_after: SystemTime,
}

impl Caller {
    /// Whether the caller holds `id`: an identity of the attested process,
    /// or one the remote client proved.
    pub fn holds(&self, id: &str) -> bool {
        match self {
            Caller::Local { identities, .. } => identities.iter().any(|i| names(&i.spiffe_id, id)),
            Caller::Remote(r) => r.proven.iter().any(|p| p == id),
        }
    }

    /// Every SPIFFE ID the caller holds.
    pub fn ids(&self) -> Vec<String> {
        match self {
            Caller::Local { identities, .. } => {
                identities.iter().map(|i| i.spiffe_id.to_string()).collect()
            }
            Caller::Remote(r) => r.proven.clone(),
        }
    }

    /// The local identity `id` (with its SVID lifetimes), for a local caller.
    pub fn local_identity(&self, id: &str) -> Option<&Identity> {
        match self {
            Caller::Local { identities, .. } => identities.iter().find(|i| names(&i.spiffe_id, id)),
            Caller::Remote(_) => None,
        }
    }

    /// Attested selectors as `type:value` (rendered once per connection);
    /// a remote caller has none, so a policy that requires one never
    /// permits it.
    pub fn selectors(&self) -> &[String] {
        match self {
            Caller::Local { peer, .. } => peer.selector_strings(),
            Caller::Remote(_) => &[],
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Caller::Remote(_))
    }

    /// How the caller appears in audit records, as a JSON value (records
    /// other than the exchange's; that one writes [`CallerRecord`] directly).
    pub fn audit_json(&self) -> Value {
        serde_json::to_value(CallerRecord(self)).unwrap_or_default()
    }

    /// Whose budget of records that change nothing this caller's count
    /// against: its first identity, or, for a remote client that proved
    /// none yet, its IP address.
    pub fn budget_key(&self) -> String {
        match self {
            Caller::Local { identities, .. } => identities
                .first()
                .map(|i| i.spiffe_id.to_string())
                .unwrap_or_default(),
            Caller::Remote(r) => match (r.proven.first(), r.addr) {
                (Some(id), _) => id.clone(),
                (None, Some(addr)) => format!("remote:{}", addr.ip()),
                (None, None) => "remote".into(),
            },
        }
    }
}

/// Whether `text` is `id` written out, compared without writing it out.
fn names(id: &spiffe::SpiffeId, text: &str) -> bool {
    text.strip_prefix("spiffe://")
        .and_then(|t| t.strip_prefix(id.trust_domain().as_str()))
        .is_some_and(|path| path == id.path())
}

/// How a caller appears in audit records: a local process by its PID, its
/// selectors and the SPIFFE IDs it holds; a remote client by its TLS client
/// certificate's identity, its address and the IDs it proved. Written
/// straight from the caller, without collecting strings first.
pub struct CallerRecord<'a>(pub &'a Caller);

impl serde::Serialize for CallerRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(3))?;
        match self.0 {
            Caller::Local { peer, identities } => {
                map.serialize_entry("pid", &peer.process.pid)?;
                map.serialize_entry("selectors", peer.selector_strings())?;
                map.serialize_entry("spiffe_ids", &SpiffeIds(identities))?;
            }
            Caller::Remote(r) => {
                map.serialize_entry(
                    "certificate",
                    &r.certificate.as_ref().map(|c| c.spiffe_id.as_str()),
                )?;
                map.serialize_entry("remote", &r.addr.map(|a| a.to_string()))?;
                map.serialize_entry("spiffe_ids", &r.proven)?;
            }
        }
        map.end()
    }
}

/// The identities' SPIFFE IDs as a sequence of strings.
struct SpiffeIds<'a>(&'a [Identity]);

impl serde::Serialize for SpiffeIds<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for identity in self.0 {
            seq.serialize_element(&format_args!("{}", identity.spiffe_id))?;
        }
        seq.end()
    }
}

/// The certificate a token is bound to (RFC 8705 `cnf`), and which bounds
/// its lifetime: a local caller's current X509-SVID, or a remote client's
/// TLS client certificate.
pub enum Holder {
    Svid(Arc<X509Svid>),
    Certificate(Arc<ClientCertificate>),
}

impl Holder {
    /// The leaf certificate (RFC 8705 thumbprints the leaf only).
    pub fn leaf_der(&self) -> &[u8] {
        match self {
            Holder::Svid(svid) => leaf_der(&svid.chain_der),
            Holder::Certificate(c) => &c.leaf_der,
        }
    }

    pub fn not_after(&self) -> SystemTime {
        match self {
            Holder::Svid(svid) => svid.not_after,
            Holder::Certificate(c) => c.not_after,
        }
    }
}

/// The first certificate of a DER chain: its first element, found from the
/// element's tag and length alone. Parsing the whole certificate to find
/// where it ends cost ~3 % of an exchange's CPU. Anything that is not a
/// definite-length SEQUENCE inside `chain` is returned whole, as before.
fn leaf_der(chain: &[u8]) -> &[u8] {
    first_der_sequence(chain).unwrap_or(chain)
}

fn first_der_sequence(der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != SEQUENCE {
        return None;
    }
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        // Long form: the low bits count the length octets (0 is the
        // indefinite form, which DER forbids).
        let n = usize::from(first & 0x7f);
        if n == 0 || n > std::mem::size_of::<u32>() {
            return None;
        }
        let len = rest
            .get(..n)?
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (2 + n, len)
    };
    der.get(..header.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(name: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn an_id_is_named_by_its_text_only() {
        let id = spiffe::SpiffeId::new("spiffe://example.org/a/b").unwrap();
        assert!(names(&id, &id.to_string()));
        for other in [
            "spiffe://example.org/a",
            "spiffe://example.org/a/b/",
            "spiffe://example.orgx/a/b",
            "spiffe://example.or/ga/b",
            "example.org/a/b",
            "",
        ] {
            assert!(!names(&id, other), "{other}");
        }
    }

    #[test]
    fn the_leaf_is_the_first_certificate_as_a_parser_reads_it() {
        let leaf = certificate("leaf.example");
        let mut chain = leaf.clone();
        chain.extend_from_slice(&certificate("ca.example"));
        // The judge: where x509-parser says the first certificate ends.
        let (rest, _) = x509_parser::parse_x509_certificate(&chain).unwrap();
        assert_eq!(leaf_der(&chain), &chain[..chain.len() - rest.len()]);
        assert_eq!(leaf_der(&chain), leaf.as_slice());
        assert_eq!(leaf_der(&leaf), leaf.as_slice());
    }

    #[test]
    fn what_is_not_a_whole_sequence_is_returned_whole() {
        let leaf = certificate("leaf.example");
        for bad in [
            &[][..],
            &[0x30][..],
            &[0x31, 0x01, 0x00][..],
            &[0x30, 0x80, 0x00, 0x00][..],
            &[0x30, 0x85, 1, 0, 0, 0, 0][..],
            &leaf[..leaf.len() - 1],
        ] {
            assert_eq!(leaf_der(bad), bad);
        }
        assert_eq!(leaf_der(&[0x30, 0x00, 0x05]), &[0x30, 0x00]);
    }
}
