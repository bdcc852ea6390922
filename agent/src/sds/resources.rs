//! Which SDS resources a request names, and the Envoy `Secret`s built for
//! them. Pure functions over the caller's identities and visible bundles:
//! everything here is decided without a socket.
//!
//! Each requested name resolves on its own (a request may name `ROOTCA` and
//! the trust domain ID together, or `default` and the SPIFFE ID it stands
//! for; each gets its resource under the name asked for). A name that
//! resolves to nothing the caller may have fails the whole request with
//! InvalidArgument, as in SPIRE: Envoy then reports the error instead of
//! waiting for a secret that will never come.

use std::collections::BTreeSet;
use std::sync::Arc;

use prost::Message;
use prost::bytes::Bytes;
use tessera_workload_api::sds::{self, config_core, tls};
use tonic::Status;

use super::bundles::VisibleBundles;
use super::config::SdsConfig;
use crate::entries::Identity;
use crate::identity::X509Svid;
use crate::identity::pem;

/// How validation contexts are written for one Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Envoy's SPIFFE certificate validator: each trust domain's CAs verify
    /// only SVIDs of that domain (Envoy >= 1.18).
    Spiffe,
    /// A plain `trusted_ca` (older Envoys, or when asked for).
    TrustedCa,
}

/// The node metadata key with which one Envoy overrides
/// `sds.disable_spiffe_cert_validation` (SPIRE's key).
pub const DISABLE_SPIFFE_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";

impl Validation {
    /// The validation style for `node`: the SPIFFE validator unless the
    /// config or the node's metadata disables it, or the node is an Envoy
    /// older than 1.18 (which lacks the validator).
    pub fn for_node(node: &config_core::Node, config: &SdsConfig) -> Self {
        let mut disabled = config.disable_spiffe_cert_validation;
        if let Some(value) = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION_KEY))
            .and_then(metadata_bool)
        {
            disabled = value;
        }
        if disabled || !has_spiffe_validator(node) {
            Self::TrustedCa
        } else {
            Self::Spiffe
        }
    }
}

/// A metadata value read as a boolean: a bool, or a string in Go's
/// `strconv.ParseBool` forms (SPIRE's reading). Anything else is ignored.
fn metadata_bool(value: &prost_types::Value) -> Option<bool> {
    use prost_types::value::Kind;
    match value.kind.as_ref()? {
        Kind::BoolValue(b) => Some(*b),
        Kind::StringValue(s) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Envoy 1.18 added the SPIFFE validator; a node without a structured
/// version is assumed to have it.
fn has_spiffe_validator(node: &config_core::Node) -> bool {
    use config_core::node::UserAgentVersionType;
    match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentBuildVersion(build)) => match &build.version {
            Some(v) => v.major_number > 1 || (v.major_number == 1 && v.minor_number >= 18),
            None => true,
        },
        _ => true,
    }
}

/// One resource a request asks for, under the name it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// The X509-SVID of `identities[identity]`.
    Certificate { name: String, identity: usize },
    /// One trust domain's bundle.
    Bundle {
        name: String,
        domain: spiffe::TrustDomain,
    },
    /// Every visible bundle, in one SPIFFE validator.
    AllBundles { name: String },
}

/// Resolves requested `names` (empty ones ignored; none at all means
/// everything) against what the caller may have.
pub fn resolve(
    names: &[String],
    identities: &[Identity],
    bundles: &VisibleBundles,
    config: &SdsConfig,
) -> Result<Vec<Wanted>, Status> {
    let mut seen = BTreeSet::new();
    let requested: Vec<&String> = names
        .iter()
        .filter(|n| !n.is_empty() && seen.insert(n.as_str()))
        .collect();
    if requested.is_empty() {
        let bundles = bundles.iter().map(|(td, _)| Wanted::Bundle {
            name: td.id_string(),
            domain: td.clone(),
        });
        let certificates = identities
            .iter()
            .enumerate()
            .map(|(i, ident)| Wanted::Certificate {
                name: ident.spiffe_id.to_string(),
                identity: i,
            });
        return Ok(bundles.chain(certificates).collect());
    }
    let mut wanted = Vec::with_capacity(requested.len());
    let mut unknown = Vec::new();
    for name in requested {
        let name = name.clone();
        if name == config.default_all_bundles_name {
            wanted.push(Wanted::AllBundles { name });
        } else if name == config.default_bundle_name {
            let domain = bundles.own().clone();
            wanted.push(Wanted::Bundle { name, domain });
        } else if name == config.default_svid_name && !identities.is_empty() {
            wanted.push(Wanted::Certificate { name, identity: 0 });
        } else if let Some((domain, _)) = bundles.iter().find(|(td, _)| td.id_string() == name) {
            let domain = domain.clone();
            wanted.push(Wanted::Bundle { name, domain });
        } else if let Some(i) = identities
            .iter()
            .position(|ident| ident.spiffe_id.to_string() == name)
        {
            wanted.push(Wanted::Certificate { name, identity: i });
        } else {
            unknown.push(name);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Status::invalid_argument(format!(
            "workload is not authorized for the requested identities {unknown:?}"
        )));
    }
    Ok(wanted)
}

/// The identities whose X509-SVIDs `wanted` needs, each once, in order.
pub fn needed_identities(wanted: &[Wanted]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for w in wanted {
        if let Wanted::Certificate { identity, .. } = w
            && !out.contains(identity)
        {
            out.push(*identity);
        }
    }
    out
}

/// Builds the `Secret` of each wanted resource, packed in `Any`.
/// `svid_of(i)` must give the current X509-SVID of every identity that
/// [`needed_identities`] lists.
pub fn build(
    wanted: &[Wanted],
    svid_of: impl Fn(usize) -> Option<Arc<X509Svid>>,
    bundles: &VisibleBundles,
    validation: Validation,
) -> Result<Vec<prost_types::Any>, Status> {
    wanted
        .iter()
        .map(|w| {
            let secret = match w {
                Wanted::Certificate { name, identity } => {
                    let svid = svid_of(*identity)
                        .ok_or_else(|| Status::unavailable("SVID not yet available"))?;
                    certificate(name, &svid)?
                }
                Wanted::Bundle { name, domain } => {
                    let cas = bundles.cas(domain).ok_or_else(|| {
                        Status::not_found(format!("no bundle for trust domain {domain}"))
                    })?;
                    let context = match validation {
                        Validation::Spiffe => spiffe_validator([(domain, cas)])?,
                        Validation::TrustedCa => tls::CertificateValidationContext {
                            trusted_ca: Some(inline(pem_certificates(cas)?)),
                            custom_validator_config: None,
                        },
                    };
                    validation_context(name, context)
                }
                Wanted::AllBundles { name } => match validation {
                    Validation::Spiffe => validation_context(name, spiffe_validator(bundles.iter())?),
                    // Concatenated CAs of several domains would let each
                    // one vouch for IDs of the others.
                    Validation::TrustedCa => {
                        return Err(Status::failed_precondition(format!(
                            "{name:?} needs Envoy's SPIFFE certificate validator (Envoy >= 1.18, and \
                             {DISABLE_SPIFFE_VALIDATION_KEY} not set); ask for one trust domain's \
                             bundle instead"
                        )));
                    }
                },
            };
            Ok(prost_types::Any {
                type_url: sds::SECRET_TYPE_URL.into(),
                value: secret.encode_to_vec(),
            })
        })
        .collect()
}

fn inline(bytes: Vec<u8>) -> config_core::DataSource {
    config_core::DataSource {
        specifier: Some(config_core::data_source::Specifier::InlineBytes(
            Bytes::from(bytes),
        )),
    }
}

fn pem_certificates(der: &[u8]) -> Result<Vec<u8>, Status> {
    let certs = pem::split_der_certs(der)
        .map_err(|e| Status::internal(format!("malformed certificate: {e}")))?;
    Ok(certs
        .into_iter()
        .map(|c| pem::encode("CERTIFICATE", c))
        .collect::<String>()
        .into_bytes())
}

fn certificate(name: &str, svid: &X509Svid) -> Result<tls::Secret, Status> {
    Ok(tls::Secret {
        name: name.to_string(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(pem_certificates(&svid.chain_der)?)),
            private_key: Some(inline(
                pem::encode("PRIVATE KEY", &svid.key_pkcs8).into_bytes(),
            )),
        })),
    })
}

fn spiffe_validator<'a>(
    domains: impl IntoIterator<Item = (&'a spiffe::TrustDomain, &'a Bytes)>,
) -> Result<tls::CertificateValidationContext, Status> {
    let trust_domains = domains
        .into_iter()
        .map(|(td, cas)| {
            Ok(tls::spiffe_cert_validator_config::TrustDomain {
                name: td.as_str().to_string(),
                trust_bundle: Some(inline(pem_certificates(cas)?)),
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let config = tls::SpiffeCertValidatorConfig { trust_domains };
    Ok(tls::CertificateValidationContext {
        trusted_ca: None,
        custom_validator_config: Some(config_core::TypedExtensionConfig {
            name: sds::SPIFFE_VALIDATOR_NAME.into(),
            typed_config: Some(prost_types::Any {
                type_url: sds::SPIFFE_VALIDATOR_TYPE_URL.into(),
                value: config.encode_to_vec(),
            }),
        }),
    })
}

fn validation_context(name: &str, context: tls::CertificateValidationContext) -> tls::Secret {
    tls::Secret {
        name: name.to_string(),
        r#type: Some(tls::secret::Type::ValidationContext(context)),
    }
}

#[cfg(test)]
mod tests;
