//! The state-of-the-world xDS handshake of one StreamSecrets stream
//! (Envoy's "xDS REST and gRPC protocol"), as SPIRE's agent plays it:
//!
//! * every response carries a fresh nonce; a request whose `response_nonce`
//!   is not the last one sent predates a response the client has not seen
//!   yet and is ignored (its successor will carry the right nonce);
//! * a request with the last nonce ACKs the response when it repeats its
//!   `version_info`, and NACKs it otherwise (Envoy adds `error_detail`); a
//!   NACK is logged and counted, never answered with the same secrets again;
//! * the first request, and any later one that names other resources, is
//!   answered at once;
//! * when a secret changes (rotation, new bundle, entry change) the stream
//!   pushes a response with the next version; when nothing the request
//!   names has changed, nothing is sent.
//!
//! Versions and nonces are counters of this stream (a new stream starts
//! again from 1, as in SPIRE); a version names the content, so it moves
//! only when the content does.

use std::hash::{Hash, Hasher};

use tessera_workload_api::sds::{self, discovery};
use tonic::Status;

use super::config::SdsConfig;
use super::resources::Validation;

/// What one stream has agreed with its client so far.
#[derive(Debug)]
pub struct Xds {
    /// The resource names of the last accepted request; None before the
    /// first request.
    names: Option<Vec<String>>,
    validation: Validation,
    /// The version of the content last sent (0: nothing sent yet).
    version: u64,
    /// A digest of the resources last sent.
    digest: u64,
    /// The nonce of the last response (0: none sent).
    nonce: u64,
}

/// What a request (not a stale one) asks of the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Received {
    /// Answer now: the first request, other names, or another validation
    /// style.
    pub answer: bool,
    /// The client rejected the last response, with this reason.
    pub rejected: Option<String>,
}

impl Xds {
    pub fn new(config: &SdsConfig) -> Self {
        Self {
            names: None,
            validation: if config.disable_spiffe_cert_validation {
                Validation::TrustedCa
            } else {
                Validation::Spiffe
            },
            version: 0,
            digest: 0,
            nonce: 0,
        }
    }

    /// The names to answer for; None until the first request.
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    pub fn validation(&self) -> Validation {
        self.validation
    }

    /// Whether any response has been sent.
    pub fn has_responded(&self) -> bool {
        self.nonce > 0
    }

    /// Takes in a request. `Ok(None)`: stale, ignore it. An error ends the
    /// stream (a request for another resource type).
    pub fn receive(
        &mut self,
        request: discovery::DiscoveryRequest,
        config: &SdsConfig,
    ) -> Result<Option<Received>, Status> {
        if !request.type_url.is_empty() && request.type_url != sds::SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "this stream serves {}, not {}",
                sds::SECRET_TYPE_URL,
                request.type_url
            )));
        }
        let mut rejected = None;
        if self.has_responded() {
            if request.response_nonce != self.nonce.to_string() {
                return Ok(None);
            }
            if let Some(detail) = &request.error_detail {
                rejected = Some(detail.message.clone());
            } else if request.version_info != self.version.to_string() {
                rejected = Some(format!(
                    "version {:?} applied instead of {}",
                    request.version_info, self.version
                ));
            }
        }
        let mut answer = false;
        // Envoy may send its node only once per stream; keep what it said.
        if let Some(node) = &request.node {
            let validation = Validation::for_node(node, config);
            answer |= validation != self.validation;
            self.validation = validation;
        }
        let names = request.resource_names;
        if self.names.as_ref().is_none_or(|old| !same_set(old, &names)) {
            self.names = Some(names);
            answer = true;
        }
        Ok(Some(Received { answer, rejected }))
    }

    /// The response that carries `resources`, numbered; None when they are
    /// exactly what was last sent and the client did not ask again
    /// (`answer` false).
    pub fn respond(
        &mut self,
        resources: Vec<prost_types::Any>,
        answer: bool,
    ) -> Option<discovery::DiscoveryResponse> {
        let digest = digest(&resources);
        let changed = self.version == 0 || digest != self.digest;
        if !changed && !answer {
            return None;
        }
        if changed {
            self.version += 1;
            self.digest = digest;
        }
        self.nonce += 1;
        Some(discovery::DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            canary: false,
            type_url: sds::SECRET_TYPE_URL.into(),
            nonce: self.nonce.to_string(),
        })
    }
}

fn same_set(a: &[String], b: &[String]) -> bool {
    fn set(v: &[String]) -> Vec<&str> {
        let mut v: Vec<&str> = v.iter().map(String::as_str).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
    set(a) == set(b)
}

/// Tells one set of resources from another (not a security boundary: it
/// only decides whether to push).
fn digest(resources: &[prost_types::Any]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in resources {
        r.type_url.hash(&mut h);
        r.value.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use tessera_workload_api::sds::config_core;

    use super::*;

    fn any(value: &[u8]) -> prost_types::Any {
        prost_types::Any {
            type_url: sds::SECRET_TYPE_URL.into(),
            value: value.to_vec(),
        }
    }

    fn request(names: &[&str], version: &str, nonce: &str) -> discovery::DiscoveryRequest {
        discovery::DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: sds::SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn answer() -> Option<Received> {
        Some(Received {
            answer: true,
            rejected: None,
        })
    }

    fn quiet() -> Option<Received> {
        Some(Received {
            answer: false,
            rejected: None,
        })
    }

    #[test]
    fn first_request_then_ack_then_push_on_change() {
        let c = SdsConfig::default();
        let mut x = Xds::new(&c);
        assert_eq!(x.names(), None);
        assert_eq!(
            x.receive(request(&["default"], "", ""), &c).unwrap(),
            answer()
        );
        assert_eq!(x.names().unwrap(), ["default"]);
        let r = x.respond(vec![any(b"v1")], true).unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("1", "1"));
        assert_eq!(r.type_url, sds::SECRET_TYPE_URL);
        // The ACK changes nothing and asks for nothing.
        assert_eq!(
            x.receive(request(&["default"], "1", "1"), &c).unwrap(),
            quiet()
        );
        // Same content again: nothing to push.
        assert!(x.respond(vec![any(b"v1")], false).is_none());
        // Rotation: a new version and nonce.
        let r = x.respond(vec![any(b"v2")], false).unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("2", "2"));
    }

    #[test]
    fn stale_nonces_are_ignored_whatever_they_ask() {
        let c = SdsConfig::default();
        let mut x = Xds::new(&c);
        x.receive(request(&["default"], "", ""), &c).unwrap();
        x.respond(vec![any(b"v1")], true).unwrap();
        x.respond(vec![any(b"v2")], false).unwrap();
        // Sent before the client saw response 2: ignored, names included.
        assert_eq!(x.receive(request(&["ROOTCA"], "1", "1"), &c).unwrap(), None);
        assert_eq!(x.names().unwrap(), ["default"]);
        assert_eq!(
            x.receive(request(&["default"], "2", "2"), &c).unwrap(),
            quiet()
        );
    }

    #[test]
    fn nacks_are_reported_and_not_answered_with_the_same_secrets() {
        let c = SdsConfig::default();
        let mut x = Xds::new(&c);
        x.receive(request(&["default"], "", ""), &c).unwrap();
        x.respond(vec![any(b"v1")], true).unwrap();
        let mut nack = request(&["default"], "", "1");
        nack.error_detail = Some(tessera_workload_api::sds::google::rpc::Status {
            code: 13,
            message: "bad key".into(),
            details: vec![],
        });
        let got = x.receive(nack, &c).unwrap().unwrap();
        assert_eq!(got.rejected.as_deref(), Some("bad key"));
        assert!(!got.answer);
        assert!(x.respond(vec![any(b"v1")], got.answer).is_none());
        // A version other than the one sent, without detail, is a NACK too.
        let got = x
            .receive(request(&["default"], "0", "1"), &c)
            .unwrap()
            .unwrap();
        assert!(got.rejected.unwrap().contains("\"0\""));
    }

    #[test]
    fn other_names_are_answered_even_with_unchanged_content() {
        let c = SdsConfig::default();
        let mut x = Xds::new(&c);
        x.receive(request(&["a", "b"], "", ""), &c).unwrap();
        x.respond(vec![any(b"v1")], true).unwrap();
        // The same set in another order, with a duplicate: not new.
        assert_eq!(
            x.receive(request(&["b", "a", "b"], "1", "1"), &c).unwrap(),
            quiet()
        );
        assert_eq!(x.receive(request(&["a"], "1", "1"), &c).unwrap(), answer());
        // Identical resources still get an answer (same version, new nonce).
        let r = x.respond(vec![any(b"v1")], true).unwrap();
        assert_eq!((r.version_info.as_str(), r.nonce.as_str()), ("1", "2"));
        // Even an empty list of resources is a first answer.
        let mut y = Xds::new(&c);
        y.receive(request(&[], "", ""), &c).unwrap();
        assert_eq!(y.respond(Vec::new(), true).unwrap().version_info, "1");
    }

    #[test]
    fn the_node_sets_the_validation_style_and_is_remembered() {
        use prost_types::value::Kind;
        let c = SdsConfig::default();
        let mut x = Xds::new(&c);
        assert_eq!(x.validation(), Validation::Spiffe);
        let mut first = request(&["ROOTCA"], "", "");
        first.node = Some(config_core::Node {
            metadata: Some(prost_types::Struct {
                fields: [(
                    "disable_spiffe_cert_validation".to_string(),
                    prost_types::Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        });
        x.receive(first, &c).unwrap();
        assert_eq!(x.validation(), Validation::TrustedCa);
        x.respond(vec![any(b"v1")], true).unwrap();
        // Later requests without a node keep it.
        x.receive(request(&["ROOTCA"], "1", "1"), &c).unwrap();
        assert_eq!(x.validation(), Validation::TrustedCa);
        // A node that changes the style is answered.
        let mut again = request(&["ROOTCA"], "1", "1");
        again.node = Some(config_core::Node::default());
        assert_eq!(x.receive(again, &c).unwrap(), answer());
        assert_eq!(x.validation(), Validation::Spiffe);
    }

    #[test]
    fn other_resource_types_end_the_stream() {
        let c = SdsConfig::default();
        let mut x = Xds::new(&c);
        let mut r = request(&["default"], "", "");
        r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let status = x.receive(r, &c).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        // No type (a bare SDS client) is this one.
        let mut r = request(&["default"], "", "");
        r.type_url.clear();
        assert!(x.receive(r, &c).unwrap().is_some());
    }
}
